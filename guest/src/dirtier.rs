//! The memory dirtier: rewrites a working set at a fixed rate with changing, non-zero data, in small paced slices
//! so that the network keeps being polled.

use alloc::alloc::{Layout, alloc};
use core::ptr::NonNull;

use guest::pace::Pacer;
use smoltcp::time::Instant;

use crate::log;

/// Largest slice of work between two network polls: 1 ms worth at the configured rate, at least one page.
const SLICE_US: u64 = 1000;
/// The backlog the dirtier may owe after a pause (a migration) before it drops the rest: 10 ms worth.
const MAX_BACKLOG_US: u64 = 10_000;
/// The dirtier writes whole 8-byte words.
const WORD: u64 = 8;

/// The dirtier's state; does nothing when the working set is 0.
pub struct Dirtier {
    region: Option<(NonNull<u64>, u64)>,
    pacer: Pacer,
    /// Bytes per slice (a multiple of the word size).
    slice: u64,
    /// Next word to write.
    cursor: u64,
    /// Completed passes over the working set; mixed into the data so each pass writes new values.
    passes: u64,
}

impl Dirtier {
    /// A dirtier for `bytes` of working set at `rate` bytes/s (either 0 = off).
    pub fn new(bytes: u64, rate: u64, now_us: u64) -> Self {
        let words = bytes / WORD;
        let region = (words > 0 && rate > 0)
            .then(|| Layout::from_size_align((words * WORD) as usize, 4096).ok())
            .flatten()
            .and_then(|layout| {
                // SAFETY: the layout has a non-zero size.
                #[expect(clippy::cast_ptr_alignment, reason = "the layout is 4096-aligned")]
                let ptr = unsafe { alloc(layout) }.cast::<u64>();
                NonNull::new(ptr).map(|p| (p, words))
            });
        if words > 0 && rate > 0 && region.is_none() {
            log!("guest: dirtier: cannot allocate {bytes} bytes of working set; dirtier off");
        }
        if region.is_some() {
            log!(
                "guest: dirtier: {} KiB working set at {} KiB/s",
                bytes >> 10,
                rate >> 10
            );
        }
        let slice = (rate * SLICE_US / 1_000_000).max(4096) / WORD * WORD;
        let max_backlog = (rate * MAX_BACKLOG_US / 1_000_000).max(slice);
        Self {
            region,
            pacer: Pacer::new(rate.max(1), now_us, max_backlog),
            slice,
            cursor: 0,
            passes: 0,
        }
    }

    /// Completed passes over the working set.
    pub fn passes(&self) -> u64 {
        self.passes
    }

    /// Writes at most one slice of the bytes owed by now. Returns whether more is owed already (stay busy).
    pub fn work(&mut self, now_us: u64) -> bool {
        let Some((base, words)) = self.region else {
            return false;
        };
        let owed = self.pacer.due(now_us);
        if owed < WORD {
            return false;
        }
        let todo = owed.min(self.slice) / WORD;
        for _ in 0..todo {
            let value = word_value(self.passes, self.cursor);
            // SAFETY: cursor < words, and [base, base + words) is the dirtier's own heap allocation.
            unsafe { base.as_ptr().add(self.cursor as usize).write_volatile(value) };
            self.cursor += 1;
            if self.cursor == words {
                self.cursor = 0;
                self.passes += 1;
            }
        }
        self.pacer.record(todo * WORD);
        owed - todo * WORD >= WORD
    }

    /// When the next slice is due, if the dirtier runs.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.region?;
        Some(Instant::from_micros(self.pacer.next_due_us(self.slice) as i64))
    }
}

/// The value of word `index` in pass `pass`: never zero, different in every pass.
fn word_value(pass: u64, index: u64) -> u64 {
    let mixed = (pass.wrapping_add(1)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ index.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    mixed | 1
}
