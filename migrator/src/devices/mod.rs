//! Devices: a COM1 log port and a virtio-net card on the virtio-mmio transport.

pub mod net;
pub mod serial;
pub mod virtio_mmio;
