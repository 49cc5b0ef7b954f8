//! Guest RAM as plain data: the page size, the RAM regions, the flat page index over them ([`RamLayout`]) and the
//! dirty-page bitmap. Nothing here touches guest memory; [`crate::ram_io`] does.
//!
//! The flat page index numbers the pages of region 0, then those of region 1, and so on, in guest-physical order.
//! The wire protocol, the dirty bitmaps and the RAM hash all use it, so the two sides agree as long as their
//! layouts (checked in the hello message) are equal.

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

/// Errors of guest RAM: its layout, and access to it.
#[derive(Debug, thiserror::Error)]
pub enum RamError {
    #[error("guest RAM region at {gpa:#x} (+{size:#x}) is not page aligned or empty")]
    Unaligned { gpa: u64, size: u64 },
    #[error("guest RAM regions overlap or are out of order at {gpa:#x}")]
    Overlap { gpa: u64 },
    #[error("page run {page}+{npages} is outside guest RAM ({total} pages) or crosses a region boundary")]
    OutOfRange { page: u64, npages: u64, total: u64 },
    #[error("cannot map {bytes} bytes of guest RAM")]
    Map {
        bytes: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("guest RAM access at {gpa:#x} failed")]
    Access {
        gpa: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// The flat page index over a list of regions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamLayout {
    /// Each region with the flat index of its first page.
    regions: Vec<(RamRegion, u64)>,
    total_pages: u64,
}

impl RamLayout {
    /// Checks that the regions are page aligned, non-empty and in ascending guest-physical order.
    pub fn new(regions: &[RamRegion]) -> Result<Self, RamError> {
        let mut out = Vec::with_capacity(regions.len());
        let mut next_page = 0u64;
        let mut end = 0u64;
        for &region in regions {
            let RamRegion { gpa, size } = region;
            if size == 0 || !gpa.is_multiple_of(PAGE_U64) || !size.is_multiple_of(PAGE_U64) {
                return Err(RamError::Unaligned { gpa, size });
            }
            if gpa < end {
                return Err(RamError::Overlap { gpa });
            }
            end = gpa.checked_add(size).ok_or(RamError::Overlap { gpa })?;
            out.push((region, next_page));
            next_page += region.pages();
        }
        Ok(Self {
            regions: out,
            total_pages: next_page,
        })
    }

    /// The regions, in guest-physical order.
    pub fn regions(&self) -> Vec<RamRegion> {
        self.regions.iter().map(|(r, _)| *r).collect()
    }

    pub fn total_pages(&self) -> u64 {
        self.total_pages
    }

    pub fn total_bytes(&self) -> u64 {
        self.total_pages * PAGE_U64
    }

    /// The region holding `page`, with the flat index of its first page.
    fn region_of(&self, page: u64) -> Option<(RamRegion, u64)> {
        self.regions
            .iter()
            .find(|(r, first)| page >= *first && page < first + r.pages())
            .copied()
    }

    /// Pages from `page` to the end of its region (0 if `page` is out of range).
    pub fn pages_left_in_region(&self, page: u64) -> u64 {
        self.region_of(page)
            .map_or(0, |(r, first)| first + r.pages() - page)
    }

    /// The guest-physical address of a page.
    pub fn gpa_of(&self, page: u64) -> Option<u64> {
        self.region_of(page)
            .map(|(r, first)| r.gpa + (page - first) * PAGE_U64)
    }

    /// The guest-physical address of a run of pages that lies inside one region; `None` when it does not (or is
    /// empty).
    pub fn run_gpa(&self, page: u64, npages: u64) -> Option<u64> {
        let (r, first) = self.region_of(page)?;
        let end = page.checked_add(npages)?;
        (npages > 0 && end <= first + r.pages()).then(|| r.gpa + (page - first) * PAGE_U64)
    }

    /// Whether a run of pages is in range and inside one region.
    pub fn run_in_one_region(&self, page: u64, npages: u64) -> bool {
        self.run_gpa(page, npages).is_some()
    }

    /// The error for a run that is not inside one region.
    pub fn out_of_range(&self, page: u64, npages: u64) -> RamError {
        RamError::OutOfRange {
            page,
            npages,
            total: self.total_pages,
        }
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
mod tests {
    use super::*;

    fn two_regions() -> RamLayout {
        RamLayout::new(&[
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
        let l = two_regions();
        assert_eq!(l.total_pages(), 24);
        assert_eq!(l.gpa_of(15), Some(15 * PAGE_U64));
        assert_eq!(l.gpa_of(16), Some(1 << 32));
        assert_eq!(l.gpa_of(24), None);
        assert!(l.run_in_one_region(14, 2));
        assert!(!l.run_in_one_region(15, 2), "a run may not cross regions");
        assert!(!l.run_in_one_region(23, 2));
        assert!(!l.run_in_one_region(3, 0));
        assert_eq!(l.run_gpa(17, 2), Some((1 << 32) + PAGE_U64));
        assert_eq!(l.pages_left_in_region(10), 6);
    }

    #[test]
    fn bad_layouts_are_refused() {
        let r = |gpa, size| RamRegion { gpa, size };
        assert!(matches!(
            RamLayout::new(&[r(1, 4096)]),
            Err(RamError::Unaligned { .. })
        ));
        assert!(matches!(
            RamLayout::new(&[r(0, 0)]),
            Err(RamError::Unaligned { .. })
        ));
        assert!(matches!(
            RamLayout::new(&[r(0, 8192), r(4096, 4096)]),
            Err(RamError::Overlap { .. })
        ));
        assert!(matches!(
            RamLayout::new(&[r(u64::MAX - 4095, 8192)]),
            Err(RamError::Unaligned { .. } | RamError::Overlap { .. })
        ));
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
    fn zero_check() {
        assert!(is_zero(&[0; 33]));
        assert!(!is_zero(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 1]));
    }
}
