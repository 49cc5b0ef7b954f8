//! The I/O buses: address ranges mapped to devices behind the [`BusDevice`] trait.
//!
//! The vCPU does not know the devices: it hands every port I/O exit to the port bus and every MMIO exit to the MMIO
//! bus, which find the device whose range holds the address and call it with the offset into that range. The VM
//! builds both buses when it creates its devices. An access that hits no device reads as all ones and its writes are
//! dropped, as on real hardware.

use std::sync::{Arc, Mutex, PoisonError};

/// A device on a bus. `offset` is relative to the start of the device's range.
pub trait BusDevice: Send {
    /// A read of `data.len()` bytes at `offset`; the device fills `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors building a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    BadRange { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} overlaps the device at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
}

struct Mapping {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Address ranges and the devices behind them.
#[derive(Default)]
pub struct Bus {
    /// Sorted by `base`, never overlapping.
    mappings: Vec<Mapping>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.mappings.iter().map(|m| (m.base, m.len)))
            .finish()
    }
}

impl Bus {
    /// Maps `[base, base + len)` to `device`.
    pub fn insert(&mut self, base: u64, len: u64, device: Arc<Mutex<dyn BusDevice>>) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        if let Some(other) = self
            .mappings
            .iter()
            .find(|m| base < m.base + m.len && m.base < end)
        {
            return Err(BusError::Overlap {
                base,
                len,
                other: other.base,
            });
        }
        let at = self.mappings.partition_point(|m| m.base < base);
        self.mappings.insert(at, Mapping { base, len, device });
        Ok(())
    }

    /// The device holding `addr` and the offset of `addr` in its range.
    fn find(&self, addr: u64) -> Option<(&Mapping, u64)> {
        let i = self.mappings.partition_point(|m| m.base <= addr).checked_sub(1)?;
        let m = &self.mappings[i];
        (addr - m.base < m.len).then_some((m, addr - m.base))
    }

    /// Reads at `addr`: the device fills `data`; without a device it reads as all ones. Returns whether a device
    /// answered.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some((m, offset)) = self.find(addr) else {
            data.fill(0xff);
            return false;
        };
        m.device
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .read(offset, data);
        true
    }

    /// Writes `data` at `addr`; without a device the write is dropped. Returns whether a device took it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((m, offset)) => {
                m.device
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Remembers the last access.
    #[derive(Default)]
    struct Probe {
        last: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_with_offsets() {
        let a = Arc::new(Mutex::new(Probe::default()));
        let b = Arc::new(Mutex::new(Probe::default()));
        let mut bus = Bus::default();
        bus.insert(0x3f8, 8, a.clone()).unwrap();
        bus.insert(0x100, 0x10, b.clone()).unwrap();
        let mut data = [0u8; 2];
        assert!(bus.read(0x3fa, &mut data));
        assert_eq!(data, [2, 2]);
        assert!(bus.write(0x10f, &[7]));
        assert_eq!(b.lock().unwrap().last, Some((0xf, vec![7])));
        assert!(a.lock().unwrap().last.is_none());
        // Outside every range: all ones, write dropped.
        assert!(!bus.read(0x400, &mut data));
        assert_eq!(data, [0xff, 0xff]);
        assert!(!bus.write(0x110, &[1]));
        assert!(!bus.read(0xff, &mut data));
    }

    #[test]
    fn rejects_overlaps_and_bad_ranges() {
        let dev = || Arc::new(Mutex::new(Probe::default())) as Arc<Mutex<dyn BusDevice>>;
        let mut bus = Bus::default();
        bus.insert(0x1000, 0x100, dev()).unwrap();
        assert!(matches!(
            bus.insert(0x10ff, 1, dev()),
            Err(BusError::Overlap { other: 0x1000, .. })
        ));
        assert!(matches!(
            bus.insert(0xf00, 0x101, dev()),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(0x2000, 0, dev()),
            Err(BusError::BadRange { .. })
        ));
        assert!(matches!(
            bus.insert(u64::MAX, 2, dev()),
            Err(BusError::BadRange { .. })
        ));
        bus.insert(0x1100, 0x100, dev()).unwrap();
        bus.insert(0xf00, 0x100, dev()).unwrap();
    }
}
