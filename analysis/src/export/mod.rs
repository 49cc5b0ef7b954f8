//! Post-mortem exports of a trace: JSON lines (for jq), pcapng (for Wireshark/tshark) and a Perfetto trace.

use crate::trace::Trace;

pub mod jsonl;
pub mod pcapng;
pub mod perfetto;

/// Converts a `CLOCK_MONOTONIC` time of the trace to Unix ns with the header's anchor (or leaves it when the trace
/// has no header).
pub fn mono_to_unix(t: &Trace, mono: u64) -> u64 {
    match &t.header {
        Some(h) => h
            .start_unix_ns
            .saturating_add(mono)
            .saturating_sub(h.start_mono_ns),
        None => mono,
    }
}
