//! Guest RAM I/O for the migration engines: [`GuestRam`] reads and writes pages by flat page index (see
//! [`crate::ram`]) through vm-memory's volatile slices, finds the pages that may hold data, and hashes RAM;
//! [`RamSink`] stores received page batches in it.
//!
//! Nothing here makes a Rust reference into guest memory: every access is a volatile copy between guest RAM and a
//! buffer of ours ([`vm_memory::VolatileSlice::copy_to`] / [`vm_memory::VolatileSlice::copy_from`]). A copy made
//! while the guest runs may be torn, which is what pre-copy is built on: a page written during the copy is in the
//! next dirty set and is sent again, so a torn copy never survives to the final round. The destination writes only
//! while its guest does not run (before resume). Writes are marked in the VMM's dirty bitmap, as every write made
//! through [`GuestMemoryMmap`] is.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, bitmap::AtomicBitmap};
use xxhash_rust::xxh3::Xxh3;

use crate::{
    memory::GuestMemoryMmap,
    protocol::PageSink,
    ram::{DirtyBitmap, PAGE_SIZE, RamError, RamLayout, RamRegion, is_zero},
};

/// Guest RAM with its flat page index. Cheap to clone: the mappings are shared and stay alive as long as a clone
/// does.
#[derive(Clone)]
pub struct GuestRam {
    layout: RamLayout,
    mem: GuestMemoryMmap,
}

impl std::fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRam")
            .field("layout", &self.layout.regions())
            .field("total_pages", &self.layout.total_pages())
            .finish_non_exhaustive()
    }
}

impl GuestRam {
    /// The view of `mem`, whose regions must be page aligned and in guest-physical order.
    pub fn new(mem: GuestMemoryMmap) -> Result<Self, RamError> {
        let regions: Vec<RamRegion> = mem
            .iter()
            .map(|r| RamRegion {
                gpa: r.start_addr().0,
                size: r.len(),
            })
            .collect();
        Ok(Self {
            layout: RamLayout::new(&regions)?,
            mem,
        })
    }

    /// Fresh anonymous, zero-filled RAM of `regions` (for tests and tools).
    pub fn anonymous(regions: &[RamRegion]) -> Result<Self, RamError> {
        RamLayout::new(regions)?;
        let ranges: Vec<(GuestAddress, usize)> = regions
            .iter()
            .map(|r| (GuestAddress(r.gpa), r.size as usize))
            .collect();
        let mem = vm_memory::GuestMemoryMmap::<AtomicBitmap>::from_ranges(&ranges).map_err(|source| {
            RamError::Map {
                bytes: regions.iter().map(|r| r.size).sum(),
                source,
            }
        })?;
        Self::new(mem)
    }

    pub fn layout(&self) -> &RamLayout {
        &self.layout
    }

    /// The regions, in guest-physical order.
    pub fn regions(&self) -> Vec<RamRegion> {
        self.layout.regions()
    }

    pub fn total_pages(&self) -> u64 {
        self.layout.total_pages()
    }

    pub fn total_bytes(&self) -> u64 {
        self.layout.total_bytes()
    }

    /// The guest-physical address of byte `offset` of page `page`, for an access of `len` bytes that must stay
    /// inside the region of `page`.
    fn gpa(&self, page: u64, offset: usize, len: usize) -> Result<GuestAddress, RamError> {
        let npages = (offset + len).div_ceil(PAGE_SIZE).max(1) as u64;
        let gpa = self
            .layout
            .run_gpa(page, npages)
            .ok_or_else(|| self.layout.out_of_range(page, npages))?;
        Ok(GuestAddress(gpa + offset as u64))
    }

    /// Copies `dst.len()` bytes from the start of page `page` out of guest RAM (the bytes must lie in one region).
    pub fn read(&self, page: u64, dst: &mut [u8]) -> Result<(), RamError> {
        if dst.is_empty() {
            return Ok(());
        }
        let addr = self.gpa(page, 0, dst.len())?;
        let slice = self
            .mem
            .get_slice(addr, dst.len())
            .map_err(|source| RamError::Access { gpa: addr.0, source })?;
        slice.copy_to(dst);
        Ok(())
    }

    /// Copies `src` into guest RAM at byte `offset` of page `page` (the bytes must lie in one region).
    pub fn write(&self, page: u64, offset: usize, src: &[u8]) -> Result<(), RamError> {
        if src.is_empty() {
            return Ok(());
        }
        let addr = self.gpa(page, offset, src.len())?;
        let slice = self
            .mem
            .get_slice(addr, src.len())
            .map_err(|source| RamError::Access { gpa: addr.0, source })?;
        slice.copy_from(src);
        Ok(())
    }

    /// Zeroes a run of pages (inside one region), only where `maybe_nonzero` says they may hold data: pages never
    /// touched stay untouched (and so do not become resident).
    pub fn zero(&self, page: u64, npages: u64, maybe_nonzero: &mut DirtyBitmap) -> Result<(), RamError> {
        static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
        if !self.layout.run_in_one_region(page, npages) {
            return Err(self.layout.out_of_range(page, npages));
        }
        for p in page..page + npages {
            if maybe_nonzero.get(p) {
                self.write(p, 0, &ZERO_PAGE)?;
                maybe_nonzero.clear(p);
            }
        }
        Ok(())
    }

    /// Which pages may hold data: one `mincore` per region. A page that was never touched is not resident and
    /// reads as zero. With swap enabled a swapped-out page is not resident either, so then every page counts.
    pub fn resident_pages(&self) -> DirtyBitmap {
        let mut bits = DirtyBitmap::new(self.total_pages());
        let swap = swap_enabled();
        let mut first_page = 0u64;
        for region in self.mem.iter() {
            let pages = region.len() / PAGE_SIZE as u64;
            let mut vec = vec![0u8; pages as usize];
            let rc = if swap {
                -1
            } else {
                // SAFETY: `as_ptr` is the page-aligned start of this region's live mapping of `len` bytes (kept
                // alive by `self.mem`); mincore only reads the page tables and writes one byte per page to `vec`.
                unsafe { libc::mincore(region.as_ptr().cast(), region.len() as usize, vec.as_mut_ptr()) }
            };
            for (i, v) in vec.iter().enumerate() {
                if rc != 0 || v & 1 == 1 {
                    bits.set(first_page + i as u64);
                }
            }
            first_page += pages;
        }
        bits
    }

    /// A 128-bit hash of the RAM contents: xxh3 over (page index, bytes) of every non-zero page, in order.
    /// Pages that were never touched count as zero without being read, so hashing a mostly empty guest is cheap.
    /// Meaningful only while nothing writes guest RAM (the guest is paused, or has not run yet).
    pub fn hash(&self) -> u128 {
        let resident = self.resident_pages();
        let mut h = Xxh3::new();
        let mut page_bytes = vec![0u8; PAGE_SIZE];
        for page in resident.iter_ones() {
            if self.read(page, &mut page_bytes).is_ok() && !is_zero(&page_bytes) {
                h.update(&page.to_le_bytes());
                h.update(&page_bytes);
            }
        }
        h.digest128()
    }
}

/// Guest RAM at the destination as the sink of page batches ([`MessageReader::read_pages`]); it remembers which
/// pages may hold data now, so that a later zero run only writes those.
///
/// [`MessageReader::read_pages`]: crate::protocol::MessageReader::read_pages
pub struct RamSink<'a> {
    pub ram: &'a GuestRam,
    pub maybe_nonzero: &'a mut DirtyBitmap,
}

impl PageSink for RamSink<'_> {
    fn write(&mut self, page: u64, offset: usize, data: &[u8]) -> Result<(), RamError> {
        if data.is_empty() {
            return Ok(());
        }
        self.ram.write(page, offset, data)?;
        let first = page + (offset / PAGE_SIZE) as u64;
        let last = page + ((offset + data.len() - 1) / PAGE_SIZE) as u64;
        for p in first..=last {
            self.maybe_nonzero.set(p);
        }
        Ok(())
    }

    fn zero(&mut self, page: u64, npages: u64) -> Result<(), RamError> {
        self.ram.zero(page, npages, self.maybe_nonzero)
    }
}

fn swap_enabled() -> bool {
    std::fs::read_to_string("/proc/swaps").map_or(true, |s| s.lines().count() > 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_regions() -> GuestRam {
        GuestRam::anonymous(&[
            RamRegion {
                gpa: 0,
                size: 16 * PAGE_SIZE as u64,
            },
            RamRegion {
                gpa: 1 << 32,
                size: 8 * PAGE_SIZE as u64,
            },
        ])
        .unwrap()
    }

    #[test]
    fn reads_and_writes_by_flat_page() {
        let ram = two_regions();
        assert_eq!(ram.total_pages(), 24);
        ram.write(16, 5, &[1, 2, 3]).unwrap();
        let mut page = vec![0u8; PAGE_SIZE];
        ram.read(16, &mut page).unwrap();
        assert_eq!(&page[4..9], &[0, 1, 2, 3, 0]);
        // Not across regions, not past the end.
        let mut two = vec![0u8; 2 * PAGE_SIZE];
        assert!(matches!(ram.read(15, &mut two), Err(RamError::OutOfRange { .. })));
        assert!(ram.write(15, PAGE_SIZE - 1, &[1, 1]).is_err());
        assert!(ram.write(24, 0, &[1]).is_err());
        ram.read(14, &mut two).unwrap();
    }

    #[test]
    fn residency_and_hash() {
        let ram = two_regions();
        let empty = ram.hash();
        assert_eq!(
            ram.resident_pages().count_ones(),
            0,
            "fresh memory is not resident"
        );
        ram.write(17, 5, &[9]).unwrap();
        assert!(ram.resident_pages().get(17));
        let one = ram.hash();
        assert_ne!(empty, one);
        // A page that is resident but zero hashes like an untouched one.
        ram.write(3, 0, &[0]).unwrap();
        assert_eq!(ram.hash(), one);
        let mut maybe = ram.resident_pages();
        ram.zero(16, 8, &mut maybe).unwrap();
        assert_eq!(ram.hash(), empty);
        assert!(!maybe.get(17));
        assert!(ram.zero(15, 2, &mut maybe).is_err());
    }
}
