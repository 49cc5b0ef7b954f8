//! Guest RAM as the migration engines see it: regions of host memory addressed by a flat page index, plus the
//! dirty-page bitmap type.
//!
//! The flat page index numbers the pages of region 0, then those of region 1, and so on, in guest-physical order.
//! The wire protocol, the dirty bitmaps and the RAM hash all use it, so the two sides agree as long as their
//! layouts (checked in the hello message) are equal.

use std::{any::Any, sync::Arc};

use xxhash_rust::xxh3::Xxh3;

/// Bytes per guest page.
pub const PAGE_SIZE: usize = 4096;
const PAGE_U64: u64 = PAGE_SIZE as u64;

/// One guest-physical RAM region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRegion {
    /// Guest-physical start, page aligned.
    pub gpa: u64,
    /// Length in bytes, a non-zero multiple of the page size.
    pub size: u64,
}

impl RamRegion {
    pub fn pages(&self) -> u64 {
        self.size / PAGE_U64
    }
}

/// Errors building a [`GuestRam`].
#[derive(Debug, thiserror::Error)]
pub enum RamError {
    #[error("guest RAM region at {gpa:#x} (+{size:#x}) is not page aligned or empty")]
    Unaligned { gpa: u64, size: u64 },
    #[error("guest RAM regions overlap or are out of order at {gpa:#x}")]
    Overlap { gpa: u64 },
}

#[derive(Clone, Copy, Debug)]
struct HostRegion {
    region: RamRegion,
    first_page: u64,
    host: *mut u8,
}

/// A view of guest RAM: host pointers of every region, kept alive by an owner handle.
///
/// Reads while the guest runs race with the guest's writes. That is what pre-copy is built on: a page written
/// during the copy is in the next dirty set and is sent again, so a torn copy never survives to the final round.
/// Writes ([`GuestRam::write_run`], [`GuestRam::zero_run`]) are only made while the guest does not run (the
/// destination before resume).
#[derive(Clone)]
pub struct GuestRam {
    regions: Vec<HostRegion>,
    total_pages: u64,
    _owner: Arc<dyn Any + Send + Sync>,
}

// SAFETY: the pointers address mappings kept alive by `_owner` (which is Send + Sync); access through them is
// either copy-out of racy data (documented above) or writes while the guest is stopped.
unsafe impl Send for GuestRam {}
// SAFETY: as for Send.
unsafe impl Sync for GuestRam {}

impl std::fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRam")
            .field("layout", &self.layout())
            .field("total_pages", &self.total_pages)
            .finish_non_exhaustive()
    }
}

impl GuestRam {
    /// Builds the view from `(gpa, host pointer, length)` triples in guest-physical order.
    ///
    /// # Safety
    /// Each `host` pointer must be valid for reads and writes of `len` bytes for as long as `owner` lives, and the
    /// regions must not overlap in host memory.
    pub unsafe fn new(
        regions: &[(u64, *mut u8, usize)],
        owner: Arc<dyn Any + Send + Sync>,
    ) -> Result<Self, RamError> {
        let mut out = Vec::with_capacity(regions.len());
        let mut next_page = 0u64;
        let mut end = 0u64;
        for &(gpa, host, len) in regions {
            let size = len as u64;
            if size == 0 || !gpa.is_multiple_of(PAGE_U64) || !size.is_multiple_of(PAGE_U64) {
                return Err(RamError::Unaligned { gpa, size });
            }
            if gpa < end {
                return Err(RamError::Overlap { gpa });
            }
            end = gpa.checked_add(size).ok_or(RamError::Overlap { gpa })?;
            let region = RamRegion { gpa, size };
            out.push(HostRegion {
                region,
                first_page: next_page,
                host,
            });
            next_page += region.pages();
        }
        Ok(Self {
            regions: out,
            total_pages: next_page,
            _owner: owner,
        })
    }

    /// An anonymous, private, zero-filled mapping of `regions` (for tests and tools).
    pub fn anonymous(regions: &[RamRegion]) -> Result<Self, RamError> {
        let mut maps = Vec::new();
        let mut triples = Vec::new();
        for r in regions {
            let map = AnonMap::new(r.size as usize).map_err(|_| RamError::Unaligned {
                gpa: r.gpa,
                size: r.size,
            })?;
            triples.push((r.gpa, map.ptr, map.len));
            maps.push(map);
        }
        // SAFETY: every pointer comes from a live mapping of its length, owned by `maps`, which the view keeps.
        unsafe { Self::new(&triples, Arc::new(maps)) }
    }

    /// The regions, in guest-physical order.
    pub fn layout(&self) -> Vec<RamRegion> {
        self.regions.iter().map(|r| r.region).collect()
    }

    pub fn total_pages(&self) -> u64 {
        self.total_pages
    }

    pub fn total_bytes(&self) -> u64 {
        self.total_pages * PAGE_U64
    }

    fn region_of(&self, page: u64) -> Option<&HostRegion> {
        self.regions
            .iter()
            .find(|r| page >= r.first_page && page < r.first_page + r.region.pages())
    }

    /// Pages from `page` to the end of its region (0 if `page` is out of range).
    pub fn pages_left_in_region(&self, page: u64) -> u64 {
        self.region_of(page)
            .map_or(0, |r| r.first_page + r.region.pages() - page)
    }

    /// The guest-physical address of a page.
    pub fn gpa_of(&self, page: u64) -> Option<u64> {
        self.region_of(page)
            .map(|r| r.region.gpa + (page - r.first_page) * PAGE_U64)
    }

    /// Host pointer of a run of pages that lies inside one region.
    fn run_ptr(&self, page: u64, npages: u64) -> Option<*mut u8> {
        let r = self.region_of(page)?;
        let end = page.checked_add(npages)?;
        if npages == 0 || end > r.first_page + r.region.pages() {
            return None;
        }
        let offset = ((page - r.first_page) * PAGE_U64) as usize;
        // SAFETY: `offset` is inside the region, checked above.
        Some(unsafe { r.host.add(offset) })
    }

    /// Whether a run of pages is in range and inside one region.
    pub fn run_in_one_region(&self, page: u64, npages: u64) -> bool {
        self.run_ptr(page, npages).is_some()
    }

    /// Copies a run of pages (inside one region) into `dst`, which must be `npages * PAGE_SIZE` long.
    /// Returns false when the run is out of range.
    pub fn copy_out(&self, page: u64, npages: u64, dst: &mut [u8]) -> bool {
        let Some(src) = self.run_ptr(page, npages) else {
            return false;
        };
        if dst.len() as u64 != npages * PAGE_U64 {
            return false;
        }
        // SAFETY: `src` is valid for `dst.len()` bytes (checked by run_ptr); `dst` is a distinct Rust buffer. The
        // guest may write the source concurrently; the copy is then torn, which the dirty log makes harmless.
        unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), dst.len()) };
        true
    }

    /// A mutable slice over a run of pages, for filling while the guest does not run.
    ///
    /// # Safety
    /// The guest must not run and no other slice over these pages may be alive.
    #[expect(
        clippy::mut_from_ref,
        reason = "guest RAM is shared memory; exclusivity is the caller's promise"
    )]
    pub unsafe fn run_mut(&self, page: u64, npages: u64) -> Option<&mut [u8]> {
        let ptr = self.run_ptr(page, npages)?;
        // SAFETY: in range (run_ptr); exclusivity is the caller's promise.
        Some(unsafe { std::slice::from_raw_parts_mut(ptr, (npages * PAGE_U64) as usize) })
    }

    /// A shared slice over a run of pages, for reading while the guest does not run.
    ///
    /// # Safety
    /// Nobody may write these pages while the slice lives.
    pub unsafe fn run(&self, page: u64, npages: u64) -> Option<&[u8]> {
        let ptr = self.run_ptr(page, npages)?;
        // SAFETY: in range (run_ptr); the absence of writers is the caller's promise.
        Some(unsafe { std::slice::from_raw_parts(ptr, (npages * PAGE_U64) as usize) })
    }

    /// Which pages may hold data: one `mincore` per region. A page that was never touched is not resident and
    /// reads as zero. With swap enabled a swapped-out page is not resident either, so then every page counts.
    pub fn resident_pages(&self) -> DirtyBitmap {
        let mut bits = DirtyBitmap::new(self.total_pages);
        let swap = swap_enabled();
        for r in &self.regions {
            let pages = r.region.pages() as usize;
            let mut vec = vec![0u8; pages];
            let rc = if swap {
                -1
            } else {
                // SAFETY: `host` is the page-aligned start of a live mapping of `size` bytes; `vec` has one byte
                // per page.
                unsafe { libc::mincore(r.host.cast(), r.region.size as usize, vec.as_mut_ptr()) }
            };
            for (i, v) in vec.iter().enumerate() {
                if rc != 0 || v & 1 == 1 {
                    bits.set(r.first_page + i as u64);
                }
            }
        }
        bits
    }

    /// Zeroes a run of pages, only where `maybe_nonzero` says they may hold data (fresh pages stay untouched).
    ///
    /// # Safety
    /// The guest must not run.
    pub unsafe fn zero_run(&self, page: u64, npages: u64, maybe_nonzero: &mut DirtyBitmap) -> bool {
        if self.run_ptr(page, npages).is_none() {
            return false;
        }
        for p in page..page + npages {
            if maybe_nonzero.get(p) {
                // SAFETY: in range (checked above); the caller promises the guest is stopped.
                if let Some(s) = unsafe { self.run_mut(p, 1) } {
                    s.fill(0);
                }
                maybe_nonzero.clear(p);
            }
        }
        true
    }

    /// A 128-bit hash of the RAM contents: xxh3 over (page index, bytes) of every non-zero page, in order.
    /// Pages that were never touched count as zero without being read, so hashing a mostly empty guest is cheap.
    ///
    /// # Safety
    /// Nobody may write guest RAM during the call (the guest is paused).
    pub unsafe fn hash(&self) -> u128 {
        let resident = self.resident_pages();
        let mut h = Xxh3::new();
        for page in resident.iter_ones() {
            // SAFETY: the caller guarantees no writers; `page` is in range (the bitmap has total_pages bits).
            let Some(bytes) = (unsafe { self.run(page, 1) }) else {
                continue;
            };
            if !is_zero(bytes) {
                h.update(&page.to_le_bytes());
                h.update(bytes);
            }
        }
        h.digest128()
    }
}

/// Whether every byte is zero (word-wise, so the compiler vectorises it).
pub fn is_zero(bytes: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets the aligned middle part.
        unsafe { bytes.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0)
        && words.iter().fold(0u64, |acc, &w| acc | w) == 0
        && tail.iter().all(|&b| b == 0)
}

fn swap_enabled() -> bool {
    std::fs::read_to_string("/proc/swaps").map_or(true, |s| s.lines().count() > 1)
}

/// A private anonymous mapping (unmapped on drop).
struct AnonMap {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value.
unsafe impl Send for AnonMap {}
// SAFETY: as for Send; shared access goes through GuestRam's documented rules.
unsafe impl Sync for AnonMap {}

impl AnonMap {
    fn new(len: usize) -> std::io::Result<Self> {
        // SAFETY: a fresh anonymous mapping; no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { ptr: ptr.cast(), len })
    }
}

impl Drop for AnonMap {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping created in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// One bit per guest page (flat page index).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    bits: u64,
}

impl DirtyBitmap {
    pub fn new(bits: u64) -> Self {
        Self {
            words: vec![0; bits.div_ceil(64) as usize],
            bits,
        }
    }

    /// Every page set.
    pub fn full(bits: u64) -> Self {
        let mut b = Self::new(bits);
        b.words.fill(u64::MAX);
        b.trim();
        b
    }

    /// From KVM-style words (bit `i % 64` of word `i / 64` is page `i`). Extra words are ignored; bits past
    /// `bits` are cleared.
    pub fn from_words(mut words: Vec<u64>, bits: u64) -> Self {
        words.resize(bits.div_ceil(64) as usize, 0);
        let mut b = Self { words, bits };
        b.trim();
        b
    }

    fn trim(&mut self) {
        let rem = self.bits % 64;
        if rem != 0
            && let Some(last) = self.words.last_mut()
        {
            *last &= (1u64 << rem) - 1;
        }
    }

    pub fn len(&self) -> u64 {
        self.bits
    }

    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    pub fn set(&mut self, i: u64) {
        if i < self.bits {
            self.words[(i / 64) as usize] |= 1 << (i % 64);
        }
    }

    pub fn clear(&mut self, i: u64) {
        if i < self.bits {
            self.words[(i / 64) as usize] &= !(1 << (i % 64));
        }
    }

    pub fn get(&self, i: u64) -> bool {
        i < self.bits && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    pub fn count_ones(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// `self |= other` (bits beyond `self.len()` are ignored).
    pub fn union_with(&mut self, other: &Self) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
        self.trim();
    }

    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// The set pages, ascending.
    pub fn iter_ones(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = u64::from(w.trailing_zeros());
                w &= w - 1;
                Some(wi as u64 * 64 + b)
            })
        })
    }
}

#[cfg(test)]
#[expect(
    clippy::undocumented_unsafe_blocks,
    reason = "test RAM is never run by a guest"
)]
mod tests {
    use super::*;

    fn two_regions() -> GuestRam {
        GuestRam::anonymous(&[
            RamRegion {
                gpa: 0,
                size: 16 * PAGE_U64,
            },
            RamRegion {
                gpa: 1 << 32,
                size: 8 * PAGE_U64,
            },
        ])
        .unwrap()
    }

    #[test]
    fn flat_index_spans_regions() {
        let ram = two_regions();
        assert_eq!(ram.total_pages(), 24);
        assert_eq!(ram.gpa_of(15), Some(15 * PAGE_U64));
        assert_eq!(ram.gpa_of(16), Some(1 << 32));
        assert_eq!(ram.gpa_of(24), None);
        assert!(ram.run_in_one_region(14, 2));
        assert!(!ram.run_in_one_region(15, 2), "a run may not cross regions");
        assert!(!ram.run_in_one_region(23, 2));
        assert_eq!(ram.pages_left_in_region(10), 6);
    }

    #[test]
    fn bitmap_ops() {
        let mut b = DirtyBitmap::new(130);
        for i in [0, 63, 64, 129, 500] {
            b.set(i);
        }
        assert_eq!(b.iter_ones().collect::<Vec<_>>(), vec![0, 63, 64, 129]);
        assert_eq!(b.count_ones(), 4);
        let f = DirtyBitmap::full(130);
        assert_eq!(f.count_ones(), 130);
        let w = DirtyBitmap::from_words(vec![u64::MAX; 5], 70);
        assert_eq!(w.count_ones(), 70);
        b.clear(63);
        assert!(!b.get(63));
        let mut u = DirtyBitmap::new(130);
        u.union_with(&b);
        assert_eq!(u, b);
    }

    #[test]
    fn residency_and_hash() {
        let ram = two_regions();
        let empty = unsafe { ram.hash() };
        assert_eq!(
            ram.resident_pages().count_ones(),
            0,
            "fresh memory is not resident"
        );
        unsafe { ram.run_mut(17, 1).unwrap()[5] = 9 };
        assert!(ram.resident_pages().get(17));
        let one = unsafe { ram.hash() };
        assert_ne!(empty, one);
        // A page that is resident but zero hashes like an untouched one.
        unsafe { ram.run_mut(3, 1).unwrap()[0] = 0 };
        assert_eq!(unsafe { ram.hash() }, one);
        let mut maybe = ram.resident_pages();
        assert!(unsafe { ram.zero_run(16, 8, &mut maybe) });
        assert_eq!(unsafe { ram.hash() }, empty);
        assert!(is_zero(&[0; 33]));
        assert!(!is_zero(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 1]));
    }
}
