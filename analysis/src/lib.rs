//! migmon's analysis: everything that reads a trace and says what it means, apart from the probes that record one.
//!
//! - [`trace`]: the typed event model and the trace file (JSON lines);
//! - [`correlate`]: pause windows joined with what the probes saw: a timeline, a downtime split and a verdict per
//!   TCP connection for every migration (pause windows inferred from the wire in [`correlate::wire`]);
//! - [`whatif`]: each connection's observed outage replayed against other TCP settings;
//! - [`check`]: the CI gate (limits, exit code, `JUnit`);
//! - [`report`]: text, JSON, HTML, SVG and side-by-side renderings of an analysis;
//! - [`export`]: JSONL, pcapng and Perfetto files;
//! - [`live`]: the correlation of a live watch in bounded memory (a look-back, held migration windows, a residue);
//! - [`merge`]: traces from several hosts on one timeline (clock offset and drift from the frames both saw).
//!
//! The crate has no eBPF or aya dependency: it builds and tests without the BPF toolchain. `monitor` (the `migmon`
//! binary) records traces with its probes and calls into this crate to analyse them.

pub mod check;
pub mod correlate;
pub mod export;
#[cfg(any(test, feature = "fixtures"))]
pub mod fixtures;
pub mod live;
pub mod merge;
pub mod report;
pub mod trace;
pub mod whatif;
