//! virtio-net over a tap: RX and TX queues, features `VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS`.
//!
//! Every buffer starts with the 12-byte `virtio_net_hdr` (version 1 layout, `num_buffers` included); we never
//! offload, so the header we write is zero apart from `num_buffers = 1`, and the one we read is skipped.
//!
//! - TX runs on the vCPU thread, when the guest writes `QueueNotify` for queue 1.
//! - RX runs on the I/O thread: frames read from the tap wait in a backlog and go into the buffers the guest posted
//!   on queue 0. With no buffer posted, the device is *stalled* and the I/O thread stops reading the tap until the
//!   guest notifies queue 0. While the VM is paused, nothing is written to guest RAM: frames stay in the backlog,
//!   from where a migration carries them to the destination.

use std::{collections::VecDeque, sync::Arc};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::{
    devices::virtio_mmio::{VIRTIO_F_VERSION_1, VirtioDevice},
    memory::GuestMemoryMmap,
    persist::Persist,
    tap::{MAX_FRAME, Tap, TapError},
};

/// Where transmitted frames go: the tap, or a collector in tests.
pub trait FrameSink: Send + Sync + std::fmt::Debug {
    fn send_frame(&self, frame: &[u8]) -> Result<(), TapError>;
}

impl FrameSink for Tap {
    fn send_frame(&self, frame: &[u8]) -> Result<(), TapError> {
        self.write_frame(frame)
    }
}

/// virtio device id of a network card.
pub const VIRTIO_ID_NET: u32 = 1;
/// `VIRTIO_NET_F_MAC`.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// `VIRTIO_NET_F_STATUS`.
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
/// Size of `virtio_net_hdr` with `VIRTIO_F_VERSION_1`.
pub const NET_HDR_LEN: usize = 12;
/// Queue index of RX and TX.
pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;
/// Entries per queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most frames the backlog holds; older frames are dropped beyond it, as a full NIC ring would.
pub const MAX_BACKLOG: usize = 65_536;
const LINK_UP: u16 = 1;

/// Saved net device state (the frames in the backlog travel separately).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub mac: [u8; 6],
    pub acked_features: u64,
}

/// Errors restoring the net device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("the saved net device has MAC {saved:02x?}, this VM was created with {ours:02x?}")]
    MacMismatch { saved: [u8; 6], ours: [u8; 6] },
}

/// Counters, for logs and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    pub rx_frames: u64,
    pub tx_frames: u64,
    pub rx_dropped: u64,
    pub tx_errors: u64,
}

/// The virtio-net device.
#[derive(Debug)]
pub struct NetDevice {
    mac: [u8; 6],
    tx: Arc<dyn FrameSink>,
    acked_features: u64,
    backlog: VecDeque<Vec<u8>>,
    paused: bool,
    rx_stalled: bool,
    rx_posted: Option<Arc<EventFd>>,
    tx_buf: Vec<u8>,
    counters: NetCounters,
}

impl NetDevice {
    /// A device with `mac` whose transmitted frames go to `tx` (the tap).
    pub fn new(mac: [u8; 6], tx: Arc<dyn FrameSink>) -> Self {
        Self {
            mac,
            tx,
            acked_features: 0,
            backlog: VecDeque::new(),
            paused: false,
            rx_stalled: false,
            rx_posted: None,
            tx_buf: Vec::with_capacity(MAX_FRAME),
            counters: NetCounters::default(),
        }
    }

    /// Signalled (from the vCPU thread) when the guest posts RX buffers, so the I/O thread can resume reading.
    pub fn set_rx_posted_event(&mut self, event: Arc<EventFd>) {
        self.rx_posted = Some(event);
    }

    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    /// Whether RX waits for the guest to post buffers.
    pub fn rx_stalled(&self) -> bool {
        self.rx_stalled
    }

    pub fn paused(&self) -> bool {
        self.paused
    }

    /// Stops (or restarts) writing guest RAM; frames keep queueing in the backlog meanwhile.
    pub fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
    }

    /// Whether the I/O thread should read the tap now: it always does while paused (the frames must be carried
    /// along), otherwise only while the guest has buffers posted.
    pub fn wants_tap_frames(&self) -> bool {
        self.backlog.len() < MAX_BACKLOG && (self.paused || !self.rx_stalled)
    }

    pub fn backlog_len(&self) -> usize {
        self.backlog.len()
    }

    /// Queues a frame read from the tap (or forwarded by a migration) for the guest.
    pub fn push_frame(&mut self, frame: Vec<u8>) {
        if self.backlog.len() >= MAX_BACKLOG {
            self.backlog.pop_front();
            self.counters.rx_dropped += 1;
        }
        self.backlog.push_back(frame);
    }

    /// Puts frames in front of the backlog, in order (frames from before a migration come before later ones).
    pub fn prepend_frames(&mut self, frames: Vec<Vec<u8>>) {
        for f in frames.into_iter().rev() {
            self.backlog.push_front(f);
        }
        while self.backlog.len() > MAX_BACKLOG {
            self.backlog.pop_back();
            self.counters.rx_dropped += 1;
        }
    }

    /// Takes every frame in the backlog.
    pub fn take_backlog(&mut self) -> Vec<Vec<u8>> {
        self.backlog.drain(..).collect()
    }

    /// Moves backlog frames into the guest's RX buffers. Returns how many were delivered.
    pub fn deliver_rx(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> usize {
        if self.paused {
            return 0;
        }
        let Some(rxq) = queues.get_mut(RX_QUEUE as usize) else {
            return 0;
        };
        if !rxq.ready() {
            self.rx_stalled = true;
            return 0;
        }
        let mut delivered = 0;
        while let Some(frame) = self.backlog.front() {
            let Some(chain) = rxq.pop_descriptor_chain(mem) else {
                self.rx_stalled = true;
                break;
            };
            let head = chain.head_index();
            let mut hdr = [0u8; NET_HDR_LEN];
            hdr[10] = 1; // num_buffers
            let mut parts: [&[u8]; 2] = [&hdr, frame];
            let mut written = 0usize;
            'descs: for desc in chain.writable() {
                let mut room = desc.len() as usize;
                let mut addr = desc.addr().0;
                for part in &mut parts {
                    if room == 0 {
                        break;
                    }
                    let n = part.len().min(room);
                    if n == 0 {
                        continue;
                    }
                    if mem.write_slice(&part[..n], GuestAddress(addr)).is_err() {
                        break 'descs;
                    }
                    *part = &part[n..];
                    addr += n as u64;
                    room -= n;
                    written += n;
                }
                if parts.iter().all(|p| p.is_empty()) {
                    break;
                }
            }
            if !parts[1].is_empty() {
                // The buffer was too small (or bad): the guest gets what fit, the rest is counted as dropped.
                self.counters.rx_dropped += 1;
            }
            // A bad used-ring address cannot be fixed from here; the guest will see its ring stuck.
            if rxq.add_used(mem, head, written as u32).is_err() {
                self.counters.rx_dropped += 1;
            }
            self.backlog.pop_front();
            self.counters.rx_frames += 1;
            delivered += 1;
        }
        delivered
    }

    fn process_tx(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let Some(txq) = queues.get_mut(TX_QUEUE as usize) else {
            return false;
        };
        if !txq.ready() {
            return false;
        }
        let mut used = false;
        while let Some(chain) = txq.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            self.tx_buf.clear();
            let mut ok = true;
            for desc in chain.readable() {
                let len = desc.len() as usize;
                let start = self.tx_buf.len();
                if start + len > MAX_FRAME + NET_HDR_LEN {
                    ok = false;
                    break;
                }
                self.tx_buf.resize(start + len, 0);
                if mem.read_slice(&mut self.tx_buf[start..], desc.addr()).is_err() {
                    ok = false;
                    break;
                }
            }
            if ok && self.tx_buf.len() > NET_HDR_LEN {
                if self.tx.send_frame(&self.tx_buf[NET_HDR_LEN..]).is_ok() {
                    self.counters.tx_frames += 1;
                } else {
                    self.counters.tx_errors += 1;
                }
            } else {
                self.counters.tx_errors += 1;
            }
            if txq.add_used(mem, head, 0).is_err() {
                self.counters.tx_errors += 1;
            }
            used = true;
        }
        used
    }
}

impl VirtioDevice for NetDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&self.mac);
        config[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| config.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    fn queue_notify(&mut self, index: u16, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        match index {
            RX_QUEUE => {
                self.rx_stalled = false;
                if let Some(event) = &self.rx_posted {
                    // A full eventfd counter still wakes the reader, so a failed write loses nothing.
                    let _ = event.write(1);
                }
                false
            }
            TX_QUEUE => self.process_tx(queues, mem),
            _ => false,
        }
    }

    fn reset(&mut self) {
        self.acked_features = 0;
        self.rx_stalled = false;
    }
}

impl Persist for NetDevice {
    type State = NetState;
    type Error = NetError;

    fn save(&self) -> Result<NetState, NetError> {
        Ok(NetState {
            mac: self.mac,
            acked_features: self.acked_features,
        })
    }

    fn restore(&mut self, state: &NetState) -> Result<(), NetError> {
        if state.mac != self.mac {
            return Err(NetError::MacMismatch {
                saved: state.mac,
                ours: self.mac,
            });
        }
        self.acked_features = state.acked_features & self.features();
        // The guest's posted buffers are in RAM: try them before waiting for a notify.
        self.rx_stalled = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use virtio_queue::{
        desc::{RawDescriptor, split::Descriptor as SplitDescriptor},
        mock::MockSplitQueue,
    };
    use vm_memory::{Address, GuestAddress};

    use super::*;

    const VRING_DESC_F_WRITE: u16 = 2;

    #[derive(Debug, Default)]
    struct Collect(Mutex<Vec<Vec<u8>>>);
    impl FrameSink for Collect {
        fn send_frame(&self, frame: &[u8]) -> Result<(), TapError> {
            self.0.lock().unwrap().push(frame.to_vec());
            Ok(())
        }
    }

    fn used_idx(mem: &GuestMemoryMmap, q: &MockSplitQueue<'_, GuestMemoryMmap>) -> u16 {
        mem.read_obj::<u16>(q.used_addr().unchecked_add(2)).unwrap()
    }

    fn used_len(mem: &GuestMemoryMmap, q: &MockSplitQueue<'_, GuestMemoryMmap>, i: u64) -> u32 {
        mem.read_obj::<u32>(q.used_addr().unchecked_add(4 + 8 * i + 4))
            .unwrap()
    }

    #[test]
    fn rx_fills_posted_buffers_stalls_and_pauses() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let rx = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let tx = MockSplitQueue::create(&mem, GuestAddress(0x2000), 16);
        let mut queues = vec![
            rx.create_queue::<Queue>().unwrap(),
            tx.create_queue::<Queue>().unwrap(),
        ];
        let sink = Arc::new(Collect::default());
        let mut dev = NetDevice::new([2, 0, 0, 0, 0, 9], sink.clone());

        // One 2 KiB buffer posted; two frames waiting.
        let buf = RawDescriptor::from(SplitDescriptor::new(0x1_0000, 2048, VRING_DESC_F_WRITE, 0));
        rx.add_desc_chains(&[buf], 0).unwrap();
        dev.push_frame(vec![0xab; 100]);
        dev.push_frame(vec![0xcd; 60]);
        assert_eq!(dev.deliver_rx(&mut queues, &mem), 1);
        assert_eq!(used_idx(&mem, &rx), 1);
        assert_eq!(used_len(&mem, &rx, 0), (NET_HDR_LEN + 100) as u32);
        let mut got = [0u8; NET_HDR_LEN + 100];
        mem.read_slice(&mut got, GuestAddress(0x1_0000)).unwrap();
        assert_eq!(&got[..10], &[0; 10]);
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
        assert!(got[NET_HDR_LEN..].iter().all(|&b| b == 0xab));

        // No buffer left: stalled, the second frame waits and the tap is not read.
        assert!(dev.rx_stalled());
        assert!(!dev.wants_tap_frames());
        assert_eq!(dev.backlog_len(), 1);

        // Paused: nothing reaches guest memory even with a buffer; the tap is still drained into the backlog.
        dev.set_paused(true);
        assert!(dev.wants_tap_frames());
        let buf2 = RawDescriptor::from(SplitDescriptor::new(0x1_1000, 2048, VRING_DESC_F_WRITE, 0));
        rx.add_desc_chains(&[buf2], 1).unwrap();
        assert!(!dev.queue_notify(RX_QUEUE, &mut queues, &mem));
        assert_eq!(dev.deliver_rx(&mut queues, &mem), 0);
        assert_eq!(used_idx(&mem, &rx), 1);
        let carried = dev.take_backlog();
        assert_eq!(carried, vec![vec![0xcd; 60]]);

        // Frames carried from elsewhere go first once running again.
        dev.push_frame(vec![0xee; 42]);
        dev.prepend_frames(carried);
        dev.set_paused(false);
        assert_eq!(dev.deliver_rx(&mut queues, &mem), 1);
        assert_eq!(used_len(&mem, &rx, 1), (NET_HDR_LEN + 60) as u32);
        assert_eq!(dev.backlog_len(), 1);
    }

    #[test]
    fn tx_strips_the_header_and_sends_each_chain() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let rx = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let tx = MockSplitQueue::create(&mem, GuestAddress(0x2000), 16);
        let mut queues = vec![
            rx.create_queue::<Queue>().unwrap(),
            tx.create_queue::<Queue>().unwrap(),
        ];
        let sink = Arc::new(Collect::default());
        let mut dev = NetDevice::new([2, 0, 0, 0, 0, 9], sink.clone());
        // A header descriptor and a payload descriptor in one chain, then a single-descriptor chain.
        mem.write_slice(&[0u8; NET_HDR_LEN], GuestAddress(0x3_0000))
            .unwrap();
        mem.write_slice(&[0x11u8; 60], GuestAddress(0x3_1000)).unwrap();
        let mut one = vec![0u8; NET_HDR_LEN];
        one.extend_from_slice(&[0x22; 64]);
        mem.write_slice(&one, GuestAddress(0x3_2000)).unwrap();
        let chain = [
            RawDescriptor::from(SplitDescriptor::new(0x3_0000, NET_HDR_LEN as u32, 1, 1)),
            RawDescriptor::from(SplitDescriptor::new(0x3_1000, 60, 0, 0)),
        ];
        tx.add_desc_chains(&chain, 0).unwrap();
        tx.add_desc_chains(
            &[RawDescriptor::from(SplitDescriptor::new(
                0x3_2000,
                one.len() as u32,
                0,
                0,
            ))],
            2,
        )
        .unwrap();
        assert!(dev.queue_notify(TX_QUEUE, &mut queues, &mem));
        let sent = sink.0.lock().unwrap().clone();
        assert_eq!(sent, vec![vec![0x11; 60], vec![0x22; 64]]);
        assert_eq!(used_idx(&mem, &tx), 2);
        assert_eq!(dev.counters().tx_frames, 2);
    }

    #[test]
    fn config_space_has_mac_and_link_up() {
        let dev = NetDevice::new([2, 1, 2, 3, 4, 5], Arc::new(Collect::default()));
        let mut cfg = [0u8; 8];
        dev.read_config(0, &mut cfg);
        assert_eq!(cfg, [2, 1, 2, 3, 4, 5, 1, 0]);
        let mut past = [0xffu8; 4];
        dev.read_config(6, &mut past);
        assert_eq!(past, [1, 0, 0, 0]);
        assert_eq!(
            dev.features(),
            VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS
        );
    }
}
