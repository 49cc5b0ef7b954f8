//! The virtio-mmio transport (virtio 1.x "modern" register layout, version 2).
//!
//! The guest reaches it through `KVM_EXIT_MMIO` exits on the window at [`guest_abi::MMIO_BASE`]. It negotiates
//! features, sets up its queues (held here as virtio-queue [`Queue`]s) and writes `QueueNotify`, which the transport
//! hands to the device. The guest has no interrupts and polls its used rings, but `InterruptStatus` is kept correct:
//! bit 0 is set whenever the device adds used buffers, until the guest acknowledges it.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use crate::{bus::BusDevice, memory::GuestMemoryMmap, persist::Persist};

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x554d_4551; // "QEMU", as most VMMs report

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const REG_CONFIG: u64 = 0x100;

/// Device status bits.
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_FAILED: u32 = 0x80;

/// `InterruptStatus` bit: the device used buffers.
pub const INT_USED_RING: u32 = 1;

/// `VIRTIO_F_VERSION_1`.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// A device behind the transport.
pub trait VirtioDevice: Send {
    /// The virtio device id (1 = net).
    fn device_type(&self) -> u32;
    /// The largest size of each queue.
    fn queue_max_sizes(&self) -> &[u16];
    /// The features offered.
    fn features(&self) -> u64;
    /// The features the driver accepted (a subset of [`VirtioDevice::features`]).
    fn ack_features(&mut self, features: u64);
    /// Reads the device configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver wrote `QueueNotify` for queue `index`. Returns whether used buffers were added.
    fn queue_notify(&mut self, index: u16, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool;
    /// The driver reset the device.
    fn reset(&mut self);
}

/// A queue's saved registers and ring positions (virtio-queue's `QueueState`, which has no serde).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(q: QueueSnapshot) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// Saved transport registers and queues.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    pub status: u32,
    pub driver_features: u64,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub queues: Vec<QueueSnapshot>,
}

/// Errors restoring the transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("the saved transport has {found} queues, the device has {expected}")]
    QueueCount { expected: usize, found: usize },
    #[error("queue {index} is invalid")]
    Queue {
        index: usize,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("saved queue {index} has max size {found}, the device offers {expected}")]
    QueueMaxSize { index: usize, expected: u16, found: u16 },
    #[error("the saved driver features {0:#x} are not all offered by this device")]
    Features(u64),
}

/// The virtio-mmio register file around a device and its queues.
#[derive(Debug)]
pub struct MmioTransport<D> {
    device: D,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    status: u32,
    driver_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    queue_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
}

fn new_queues(sizes: &[u16]) -> Result<Vec<Queue>, MmioError> {
    sizes
        .iter()
        .enumerate()
        .map(|(index, &s)| Queue::new(s).map_err(|source| MmioError::Queue { index, source }))
        .collect()
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// Wraps `device`; fails only if the device declares an invalid queue size.
    pub fn new(device: D, mem: GuestMemoryMmap) -> Result<Self, MmioError> {
        let queues = new_queues(device.queue_max_sizes())?;
        Ok(Self {
            device,
            mem,
            queues,
            status: 0,
            driver_features: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            interrupt_status: 0,
            config_generation: 0,
        })
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The device, its queues and guest memory at once (for the I/O thread).
    pub fn parts(&mut self) -> (&mut D, &mut [Queue], &GuestMemoryMmap) {
        (&mut self.device, &mut self.queues, &self.mem)
    }

    /// Whether the driver has finished setting the device up.
    pub fn driver_ok(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0 && self.status & STATUS_FAILED == 0
    }

    /// Records that the device added used buffers.
    pub fn signal_used(&mut self) {
        self.interrupt_status |= INT_USED_RING;
    }

    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        self.device.reset();
    }

    /// A guest read of `data.len()` bytes at `offset` into the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            self.device.read_config(offset - REG_CONFIG, data);
            return;
        }
        let value = match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt_status,
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    /// A guest write of `data` at `offset` into the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= REG_CONFIG {
            // The net device's configuration is read-only.
            return;
        }
        let mut bytes = [0u8; 4];
        let n = data.len().min(4);
        bytes[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(bytes);
        let set_addr = |q: &mut Queue, reg: u64, v: u32| match reg {
            REG_QUEUE_DESC_LOW => q.set_desc_table_address(Some(v), None),
            REG_QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(v)),
            REG_QUEUE_DRIVER_LOW => q.set_avail_ring_address(Some(v), None),
            REG_QUEUE_DRIVER_HIGH => q.set_avail_ring_address(None, Some(v)),
            REG_QUEUE_DEVICE_LOW => q.set_used_ring_address(Some(v), None),
            _ => q.set_used_ring_address(None, Some(v)),
        };
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES if self.status & STATUS_FEATURES_OK == 0 => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32),
                _ => {}
            },
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(v as u16);
                }
            }
            REG_QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH => {
                if let Some(q) = self.selected_queue() {
                    set_addr(q, offset, v);
                }
            }
            REG_QUEUE_NOTIFY => {
                if self.driver_ok() {
                    let (device, queues, mem) = (&mut self.device, &mut self.queues, &self.mem);
                    if device.queue_notify(v as u16, queues, mem) {
                        self.interrupt_status |= INT_USED_RING;
                    }
                }
            }
            REG_INTERRUPT_ACK => self.interrupt_status &= !v,
            REG_STATUS => self.write_status(v),
            _ => {}
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        if v & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            if self.driver_features & !self.device.features() != 0 {
                // The driver accepted something we did not offer: refuse FEATURES_OK.
                self.status = v & !STATUS_FEATURES_OK;
                return;
            }
            self.device.ack_features(self.driver_features);
        }
        self.status = v;
    }
}

/// On the MMIO bus, at the transport's window.
impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        Self::read(self, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        Self::write(self, offset, data);
    }
}

impl<D: VirtioDevice> Persist for MmioTransport<D> {
    type State = MmioState;
    type Error = MmioError;

    fn save(&self) -> Result<MmioState, MmioError> {
        Ok(MmioState {
            status: self.status,
            driver_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
        })
    }

    fn restore(&mut self, state: &MmioState) -> Result<(), MmioError> {
        let max_sizes = self.device.queue_max_sizes().to_vec();
        if state.queues.len() != max_sizes.len() {
            return Err(MmioError::QueueCount {
                expected: max_sizes.len(),
                found: state.queues.len(),
            });
        }
        if state.driver_features & !self.device.features() != 0 {
            return Err(MmioError::Features(state.driver_features));
        }
        let mut queues = Vec::with_capacity(max_sizes.len());
        for (index, (snap, &max)) in state.queues.iter().zip(&max_sizes).enumerate() {
            if snap.max_size != max {
                return Err(MmioError::QueueMaxSize {
                    index,
                    expected: max,
                    found: snap.max_size,
                });
            }
            let q = Queue::try_from(QueueState::from(*snap))
                .map_err(|source| MmioError::Queue { index, source })?;
            queues.push(q);
        }
        self.queues = queues;
        self.status = state.status;
        self.driver_features = state.driver_features;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.queue_sel = state.queue_sel;
        self.interrupt_status = state.interrupt_status;
        self.config_generation = state.config_generation;
        if self.status & STATUS_FEATURES_OK != 0 {
            self.device.ack_features(self.driver_features);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;

    #[derive(Debug, Default)]
    struct Dummy {
        acked: u64,
        notified: Vec<u16>,
    }
    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            1
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | (1 << 5)
        }
        fn ack_features(&mut self, f: u64) {
            self.acked = f;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = (offset as u8).wrapping_add(i as u8);
            }
        }
        fn queue_notify(&mut self, index: u16, _: &mut [Queue], _: &GuestMemoryMmap) -> bool {
            self.notified.push(index);
            true
        }
        fn reset(&mut self) {
            self.acked = 0;
        }
    }

    fn r32(t: &mut MmioTransport<Dummy>, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn w32(t: &mut MmioTransport<Dummy>, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn transport() -> MmioTransport<Dummy> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        MmioTransport::new(Dummy::default(), mem).unwrap()
    }

    #[test]
    fn driver_init_sequence_and_state_round_trip() {
        let mut t = transport();
        assert_eq!(r32(&mut t, REG_MAGIC), MAGIC_VALUE);
        assert_eq!(r32(&mut t, REG_VERSION), 2);
        assert_eq!(r32(&mut t, REG_DEVICE_ID), 1);
        w32(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w32(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r32(&mut t, REG_DEVICE_FEATURES), 1);
        w32(&mut t, REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(r32(&mut t, REG_DEVICE_FEATURES), 1 << 5);
        w32(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        w32(&mut t, REG_DRIVER_FEATURES, 1);
        w32(&mut t, REG_DRIVER_FEATURES_SEL, 0);
        w32(&mut t, REG_DRIVER_FEATURES, 1 << 5);
        w32(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(r32(&mut t, REG_STATUS) & STATUS_FEATURES_OK, STATUS_FEATURES_OK);
        assert_eq!(t.device().acked, VIRTIO_F_VERSION_1 | (1 << 5));
        for q in 0..2u32 {
            w32(&mut t, REG_QUEUE_SEL, q);
            assert_eq!(r32(&mut t, REG_QUEUE_NUM_MAX), 16);
            w32(&mut t, REG_QUEUE_NUM, 16);
            w32(&mut t, REG_QUEUE_DESC_LOW, 0x1000 * (q + 1));
            w32(&mut t, REG_QUEUE_DRIVER_LOW, 0x1000 * (q + 1) + 0x100);
            w32(&mut t, REG_QUEUE_DEVICE_LOW, 0x1000 * (q + 1) + 0x200);
            w32(&mut t, REG_QUEUE_READY, 1);
            assert_eq!(r32(&mut t, REG_QUEUE_READY), 1);
        }
        w32(&mut t, REG_STATUS, 0xf);
        assert!(t.driver_ok());
        w32(&mut t, REG_QUEUE_NOTIFY, 1);
        assert_eq!(t.device().notified, vec![1]);
        assert_eq!(r32(&mut t, REG_INTERRUPT_STATUS), INT_USED_RING);
        w32(&mut t, REG_INTERRUPT_ACK, INT_USED_RING);
        assert_eq!(r32(&mut t, REG_INTERRUPT_STATUS), 0);
        let mut cfg = [0u8; 2];
        t.read(REG_CONFIG + 4, &mut cfg);
        assert_eq!(cfg, [4, 5]);

        let saved = t.save().unwrap();
        assert_eq!(saved.queues[1].desc_table, 0x2000);
        let mut u = transport();
        u.restore(&saved).unwrap();
        assert_eq!(u.save().unwrap(), saved);
        assert!(u.driver_ok());
        assert_eq!(u.device().acked, saved.driver_features);

        let mut bad = saved.clone();
        bad.queues.pop();
        assert!(matches!(
            transport().restore(&bad),
            Err(MmioError::QueueCount { .. })
        ));
        let mut bad = saved.clone();
        bad.queues[0].size = 3;
        assert!(matches!(
            transport().restore(&bad),
            Err(MmioError::Queue { index: 0, .. })
        ));
        let mut bad = saved;
        bad.driver_features |= 1 << 40;
        assert!(matches!(transport().restore(&bad), Err(MmioError::Features(_))));

        w32(&mut t, REG_STATUS, 0);
        assert_eq!(r32(&mut t, REG_STATUS), 0);
        assert_eq!(t.device().acked, 0);
    }

    #[test]
    fn refuses_unoffered_features() {
        let mut t = transport();
        w32(&mut t, REG_DRIVER_FEATURES, 1 << 7);
        w32(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(r32(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
    }
}
