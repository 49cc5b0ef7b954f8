//! Guest RAM: the host mapping (vm-memory), the KVM memslots, and dirty-page tracking.
//!
//! RAM is `[0, min(ram, MMIO_BASE))`, then `[4 GiB, 4 GiB + rest)` (see [`guest_abi`]). Each region is one KVM
//! memslot. Dirty pages are the union of two sources:
//!
//! - the KVM dirty log (`KVM_MEM_LOG_DIRTY_PAGES` + `KVM_GET_DIRTY_LOG`): pages the guest wrote;
//! - the VMM's own bitmap: pages the VMM wrote (received frames, used rings, the mailbox). vm-memory's
//!   [`AtomicBitmap`] backend marks them on every write made through [`GuestMemoryMmap`], which KVM cannot see.
//!
//! Both are read and cleared by [`Memory::take_dirty_pages`]. Pages are numbered by the flat page index of
//! [`crate::ram`]: the pages of region 0, then those of region 1.

use guest_abi::MMIO_BASE;
use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MmapRegion,
    bitmap::AtomicBitmap,
    mmap::{FromRangesError, GuestRegionMmap},
};

use crate::ram::{DirtyBitmap, PAGE_SIZE, RamError, RamRegion};

/// Guest memory with the VMM-side dirty bitmap: every write made through it marks its pages.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Where RAM above the MMIO hole starts.
pub const HIGH_RAM_START: u64 = 1 << 32;
/// RAM size granularity (one 2 MiB page of the identity map).
pub const RAM_ALIGN: u64 = 2 << 20;
/// Smallest RAM: the boot structures, the image at 2 MiB, its stack and heap.
pub const MIN_RAM: u64 = 16 << 20;
/// Largest RAM the identity map covers (see [`crate::boot`]).
pub const MAX_RAM: u64 = 64 << 30;

/// Errors of guest memory and memslots.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error(
        "guest RAM size {0:#x} is invalid: it must be a multiple of 2 MiB between {MIN_RAM:#x} and {MAX_RAM:#x}"
    )]
    InvalidSize(u64),
    #[error("cannot map {0} bytes of guest RAM")]
    Mmap(u64, #[source] FromRangesError),
    #[error("KVM_SET_USER_MEMORY_REGION for slot {slot} failed")]
    SetMemorySlot {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_GET_DIRTY_LOG for slot {slot} failed")]
    GetDirtyLog {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot describe guest RAM to the migration engine")]
    RamView(#[source] RamError),
}

/// The RAM regions of a guest with `ram_bytes` of RAM, in guest-physical order.
pub fn ram_regions(ram_bytes: u64) -> Result<Vec<RamRegion>, MemoryError> {
    if !ram_bytes.is_multiple_of(RAM_ALIGN) || !(MIN_RAM..=MAX_RAM).contains(&ram_bytes) {
        return Err(MemoryError::InvalidSize(ram_bytes));
    }
    let low = ram_bytes.min(MMIO_BASE);
    let mut regions = vec![RamRegion { gpa: 0, size: low }];
    if ram_bytes > low {
        regions.push(RamRegion {
            gpa: HIGH_RAM_START,
            size: ram_bytes - low,
        });
    }
    Ok(regions)
}

/// Guest RAM and its KVM memslots.
#[derive(Debug)]
pub struct Memory {
    mem: GuestMemoryMmap,
    regions: Vec<RamRegion>,
    dirty_log: bool,
}

impl Memory {
    /// Maps `ram_bytes` of zeroed anonymous guest RAM (not yet known to KVM).
    pub fn new(ram_bytes: u64) -> Result<Self, MemoryError> {
        let regions = ram_regions(ram_bytes)?;
        let ranges: Vec<(GuestAddress, usize)> = regions
            .iter()
            .map(|r| (GuestAddress(r.gpa), r.size as usize))
            .collect();
        let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| MemoryError::Mmap(ram_bytes, e))?;
        Ok(Self {
            mem,
            regions,
            dirty_log: false,
        })
    }

    /// The vm-memory view (cheap to clone: regions are shared).
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    pub fn ram_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    pub fn total_pages(&self) -> u64 {
        self.ram_bytes() / PAGE_SIZE as u64
    }

    /// Whether KVM dirty logging is on.
    pub fn dirty_log_enabled(&self) -> bool {
        self.dirty_log
    }

    fn host_regions(&self) -> impl Iterator<Item = (u32, &GuestRegionMmap<AtomicBitmap>)> {
        self.mem.iter().enumerate().map(|(i, r)| (i as u32, r))
    }

    fn set_slots(&self, vm: &VmFd, log_dirty: bool) -> Result<(), MemoryError> {
        for (slot, region) in self.host_regions() {
            let desc = kvm_userspace_memory_region {
                slot,
                flags: if log_dirty { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping of `memory_size` bytes owned by `self.mem`, which outlives the VM
            // (`Vm` drops its `VmFd` before its `Memory`), and slots never overlap.
            unsafe { vm.set_user_memory_region(desc) }
                .map_err(|source| MemoryError::SetMemorySlot { slot, source })?;
        }
        Ok(())
    }

    /// Registers every region as a KVM memslot (dirty logging off).
    pub fn register(&mut self, vm: &VmFd) -> Result<(), MemoryError> {
        self.set_slots(vm, false)?;
        self.dirty_log = false;
        Ok(())
    }

    /// Turns KVM dirty logging on and clears the VMM bitmap: the next [`Memory::take_dirty_pages`] reports the pages
    /// written from now on.
    pub fn start_dirty_log(&mut self, vm: &VmFd) -> Result<(), MemoryError> {
        for (_, region) in self.host_regions() {
            vmm_bitmap(region).reset();
        }
        self.set_slots(vm, true)?;
        self.dirty_log = true;
        Ok(())
    }

    /// Turns KVM dirty logging off.
    pub fn stop_dirty_log(&mut self, vm: &VmFd) -> Result<(), MemoryError> {
        self.set_slots(vm, false)?;
        self.dirty_log = false;
        Ok(())
    }

    /// Pages written since the last call (or since [`Memory::start_dirty_log`]): the KVM log OR the VMM bitmap,
    /// clearing both. Without dirty logging the KVM part is empty.
    pub fn take_dirty_pages(&self, vm: &VmFd) -> Result<DirtyBitmap, MemoryError> {
        let total = self.total_pages();
        let mut flat = vec![0u64; total.div_ceil(64) as usize];
        let mut first_page = 0u64;
        for (slot, region) in self.host_regions() {
            let pages = region.len() / PAGE_SIZE as u64;
            if self.dirty_log {
                let words = vm
                    .get_dirty_log(slot, region.len() as usize)
                    .map_err(|source| MemoryError::GetDirtyLog { slot, source })?;
                or_words_at(&mut flat, first_page, &words, pages);
            }
            let vmm = vmm_bitmap(region).get_and_reset();
            or_words_at(&mut flat, first_page, &vmm, pages);
            first_page += pages;
        }
        Ok(DirtyBitmap::from_words(flat, total))
    }
}

/// The VMM-side dirty bitmap of one region.
fn vmm_bitmap(region: &GuestRegionMmap<AtomicBitmap>) -> &AtomicBitmap {
    let mapping: &MmapRegion<AtomicBitmap> = region;
    mapping.bitmap()
}

/// `dst[bit_offset .. bit_offset + nbits] |= src[0 .. nbits]`, bitmaps in KVM word order (bit `i % 64` of word
/// `i / 64`). Bits of `src` past `nbits` and bits that would land past `dst` are ignored.
pub fn or_words_at(dst: &mut [u64], bit_offset: u64, src: &[u64], nbits: u64) {
    let shift = (bit_offset % 64) as u32;
    let base = (bit_offset / 64) as usize;
    let full_words = (nbits / 64) as usize;
    let rem = (nbits % 64) as u32;
    for (i, &w) in src.iter().enumerate().take(nbits.div_ceil(64) as usize) {
        let w = if i == full_words && rem != 0 {
            w & ((1u64 << rem) - 1)
        } else {
            w
        };
        if w == 0 {
            continue;
        }
        if let Some(d) = dst.get_mut(base + i) {
            *d |= w << shift;
        }
        if shift != 0
            && let Some(d) = dst.get_mut(base + i + 1)
        {
            *d |= w >> (64 - shift);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_split_around_the_mmio_hole() {
        assert_eq!(
            ram_regions(256 << 20).unwrap(),
            vec![RamRegion {
                gpa: 0,
                size: 256 << 20
            }]
        );
        let r = ram_regions(4 << 30).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0],
            RamRegion {
                gpa: 0,
                size: MMIO_BASE
            }
        );
        assert_eq!(r[1].gpa, HIGH_RAM_START);
        assert_eq!(r[0].size + r[1].size, 4 << 30);
        assert!(ram_regions((256 << 20) + 4096).is_err());
        assert!(ram_regions(2 << 20).is_err());
        assert!(ram_regions(MAX_RAM + RAM_ALIGN).is_err());
    }

    #[test]
    fn or_words_aligned_and_unaligned() {
        let mut dst = vec![0u64; 4];
        or_words_at(&mut dst, 64, &[0b1011, u64::MAX], 66);
        assert_eq!(dst, vec![0, 0b1011, 0b11, 0]);

        let mut dst = vec![1u64, 0, 0];
        or_words_at(&mut dst, 60, &[0xff], 8);
        assert_eq!(dst[0], 1 | (0xf << 60));
        assert_eq!(dst[1], 0xf);

        // Nothing spills past the destination.
        let mut dst = vec![0u64; 1];
        or_words_at(&mut dst, 63, &[u64::MAX], 64);
        assert_eq!(dst[0], 1 << 63);
    }

    #[test]
    fn vmm_writes_show_up_as_dirty_without_kvm_log() {
        use vm_memory::Bytes;
        let mem = Memory::new(16 << 20).unwrap();
        mem.guest_memory()
            .write_obj(0xdead_beefu32, GuestAddress(0x5000 + 8))
            .unwrap();
        mem.guest_memory()
            .write_slice(&[1u8; 4097], GuestAddress(0x10_0fff))
            .unwrap();
        let bits = vm_bitmap(&mem);
        assert_eq!(bits, vec![5, 0x100, 0x101]);
        // Taken means cleared.
        assert!(vm_bitmap(&mem).is_empty());
    }

    fn vm_bitmap(mem: &Memory) -> Vec<u64> {
        let mut flat = vec![0u64; mem.total_pages().div_ceil(64) as usize];
        for (_, region) in mem.host_regions() {
            let w = vmm_bitmap(region).get_and_reset();
            or_words_at(&mut flat, 0, &w, region.len() / 4096);
        }
        DirtyBitmap::from_words(flat, mem.total_pages())
            .iter_ones()
            .collect()
    }
}
