//! The virtio-net device (virtio-mmio, polled) as a smoltcp `Device`, with a `Hal` for identity-mapped RAM.

use core::{alloc::Layout, cell::RefCell, ptr::NonNull};

use alloc::alloc::{alloc_zeroed, dealloc};
use smoltcp::{
    phy::{self, DeviceCapabilities, Medium},
    time::Instant,
};
use virtio_drivers::{
    BufferDirection, Hal, PAGE_SIZE, PhysAddr,
    device::net::{RxBuffer, VirtIONet},
    transport::{
        DeviceType, Transport,
        mmio::{MmioTransport, VirtIOHeader},
    },
};

use crate::log;

/// Descriptors per virtqueue. The VMM's queues must allow at least this many.
pub const QUEUE_SIZE: usize = 256;
/// Bytes per receive buffer: the virtio-net header plus a full Ethernet frame.
const RX_BUFFER_LEN: usize = 2048;
/// Largest Ethernet frame sent, without FCS.
const MTU: usize = 1514;

/// DMA through identity-mapped guest RAM: physical address = virtual address, buffers come from the heap.
pub struct IdentityHal;

fn dma_layout(pages: usize) -> Layout {
    Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).expect("a page-aligned DMA layout is valid")
}

// SAFETY: dma_alloc returns zeroed, page-aligned, exclusively owned memory whose physical address is its virtual
// address (identity map), valid until dma_dealloc; share returns the physical (= virtual) address of buffers the
// driver keeps alive; nothing needs bouncing because the device (the VMM) sees all guest RAM.
unsafe impl Hal for IdentityHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        // SAFETY: the layout has a non-zero size (pages >= 1 in every virtio-drivers call).
        let ptr = unsafe { alloc_zeroed(dma_layout(pages.max(1))) };
        match NonNull::new(ptr) {
            Some(ptr) => (ptr.as_ptr() as PhysAddr, ptr),
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        // SAFETY: the driver passes back what dma_alloc returned for the same number of pages.
        unsafe { dealloc(vaddr.as_ptr(), dma_layout(pages.max(1))) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).expect("the MMIO window is not at address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr().cast::<u8>() as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

type Net = VirtIONet<IdentityHal, MmioTransport<'static>, QUEUE_SIZE>;

/// Frame counters, for the log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    pub rx_frames: u64,
    pub tx_frames: u64,
}

/// The guest's NIC.
pub struct NetDevice {
    net: RefCell<Net>,
    counters: RefCell<NetCounters>,
}

impl NetDevice {
    /// Probes and initializes the virtio-net device in the MMIO window at `base`. Panics (a boot failure the VMM
    /// sees on the serial port and `PORT_EXIT`) when there is no usable device.
    pub fn new(base: u64, size: u64, mac: [u8; 6]) -> Self {
        let header = NonNull::new(base as *mut VirtIOHeader).expect("the virtio-mmio base is not 0");
        // SAFETY: the VMM (or the command line) says a virtio-mmio device lives at [base, base + size); the window
        // is identity-mapped and only this driver touches it, for the guest's whole lifetime.
        let transport = unsafe { MmioTransport::new(header, size as usize) }
            .unwrap_or_else(|e| panic!("no virtio-mmio device at {base:#x}: {e}"));
        assert!(
            transport.device_type() == DeviceType::Network,
            "the virtio-mmio device at {base:#x} is a {:?}, not a network device",
            transport.device_type()
        );
        let net =
            Net::new(transport, RX_BUFFER_LEN).unwrap_or_else(|e| panic!("virtio-net init failed: {e}"));
        let device_mac = net.mac_address();
        if mac != [0; 6] && device_mac != mac {
            log!(
                "guest: note: the device's MAC {device_mac:02x?} differs from the boot MAC {mac:02x?}; using the boot MAC"
            );
        }
        log!("guest: virtio-net up at {base:#x}, {QUEUE_SIZE} descriptors per queue");
        Self {
            net: RefCell::new(net),
            counters: RefCell::default(),
        }
    }

    /// Frames so far.
    pub fn counters(&self) -> NetCounters {
        *self.counters.borrow()
    }

    /// The device's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.net.borrow().mac_address()
    }

    /// Acknowledges the device's interrupt (PVH boot under QEMU; the migrator's guest runs without interrupts).
    pub fn ack_interrupt(&mut self) {
        let _status = self.net.get_mut().ack_interrupt();
    }

    /// Whether a received frame waits in the receive queue.
    pub fn rx_pending(&self) -> bool {
        self.net.borrow().can_recv()
    }

    /// Sends a frame built outside smoltcp (the gratuitous ARP).
    pub fn send_raw(&mut self, frame: &[u8]) {
        let net = self.net.get_mut();
        let mut tx = net.new_tx_buffer(frame.len());
        tx.packet_mut().copy_from_slice(frame);
        match net.send(tx) {
            Ok(()) => self.counters.get_mut().tx_frames += 1,
            Err(e) => log!("guest: sending a raw frame failed: {e}"),
        }
    }
}

/// A received frame, returned to the receive queue once smoltcp has read it.
pub struct RxToken<'a> {
    buffer: RxBuffer,
    net: &'a RefCell<Net>,
}

/// Permission to send one frame.
pub struct TxToken<'a> {
    net: &'a RefCell<Net>,
    counters: &'a RefCell<NetCounters>,
}

impl phy::Device for NetDevice {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        let buffer = self.net.get_mut().receive().ok()?;
        self.counters.get_mut().rx_frames += 1;
        Some((
            RxToken {
                buffer,
                net: &self.net,
            },
            TxToken {
                net: &self.net,
                counters: &self.counters,
            },
        ))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<TxToken<'_>> {
        self.net.get_mut().can_send().then_some(TxToken {
            net: &self.net,
            counters: &self.counters,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU;
        caps.max_burst_size = None;
        caps
    }
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        let result = f(self.buffer.packet());
        if let Err(e) = self.net.borrow_mut().recycle_rx_buffer(self.buffer) {
            log!("guest: returning a receive buffer failed: {e}");
        }
        result
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let mut net = self.net.borrow_mut();
        let mut tx = net.new_tx_buffer(len);
        let result = f(tx.packet_mut());
        match net.send(tx) {
            Ok(()) => self.counters.borrow_mut().tx_frames += 1,
            Err(e) => log!("guest: sending a frame failed: {e}"),
        }
        result
    }
}
