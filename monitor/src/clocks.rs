//! What a trace records so that traces from several hosts can be merged: the kernel's boot id and the host's
//! clocks read together, once in the header and then every [`SAMPLE_EVERY`] as `clock_sample` events.

use std::{sync::mpsc::Sender, time::Duration};

use migmon_analysis::trace::{ClockTriple, Event, TRACE_VERSION, TraceHeader};
use nix::time::{ClockId, clock_gettime};

/// How often a recording samples the clocks.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);

/// Reads of the triple; the narrowest is kept.
const TRIES: usize = 5;

fn read(clock: ClockId) -> u64 {
    clock_gettime(clock).map_or(0, |t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
}

/// `CLOCK_MONOTONIC`, `CLOCK_REALTIME` and `CLOCK_BOOTTIME` read together: realtime and boottime between two
/// monotonic reads, the narrowest of a few tries kept; the monotonic time is the middle of the two reads and the
/// uncertainty half their distance.
pub fn read_triple() -> ClockTriple {
    let mut best: Option<(u64, ClockTriple)> = None;
    for _ in 0..TRIES {
        let m1 = read(ClockId::CLOCK_MONOTONIC);
        let real = read(ClockId::CLOCK_REALTIME);
        let boot = read(ClockId::CLOCK_BOOTTIME);
        let m2 = read(ClockId::CLOCK_MONOTONIC);
        let width = m2.saturating_sub(m1);
        if best.as_ref().is_none_or(|(w, _)| width < *w) {
            best = Some((
                width,
                ClockTriple {
                    mono_ns: m1 + width / 2,
                    realtime_ns: real,
                    boottime_ns: boot,
                    uncertainty_ns: width.div_ceil(2),
                },
            ));
        }
    }
    best.map(|(_, t)| t).unwrap_or_default()
}

/// The kernel's boot id, or `""` when `/proc` does not say.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Sends a `clock_sample` every [`SAMPLE_EVERY`] (the first one period from now) until the pipeline is gone or the task
/// is dropped.
pub async fn sample_clocks(tx: Sender<Event>) {
    let start = tokio::time::Instant::now() + SAMPLE_EVERY;
    let mut every = tokio::time::interval_at(start, SAMPLE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if tx.send(read_triple().to_event()).is_err() {
            return;
        }
    }
}

/// The header `--record` writes: now (the three clocks read together), this host (`host_name`, or the machine's
/// name) and its boot id, this command line.
pub fn trace_header(host_name: Option<&str>) -> TraceHeader {
    let clocks = read_triple();
    TraceHeader {
        kind: "trace_header".into(),
        version: TRACE_VERSION,
        migmon: env!("CARGO_PKG_VERSION").into(),
        start_mono_ns: clocks.mono_ns,
        start_unix_ns: clocks.realtime_ns,
        hostname: host_name.map_or_else(
            || {
                nix::unistd::gethostname()
                    .map(|h| h.to_string_lossy().into_owned())
                    .unwrap_or_default()
            },
            str::to_owned,
        ),
        command: std::env::args().collect(),
        boot_id: boot_id(),
        clocks: Some(clocks),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_triple_is_tight_and_consistent() {
        let t = read_triple();
        assert!(t.mono_ns > 0 && t.realtime_ns > 1_500_000_000_000_000_000);
        assert!(t.boottime_ns >= t.mono_ns.saturating_sub(t.uncertainty_ns));
        // Two reads of the monotonic clock are microseconds apart, even on a loaded machine.
        assert!(t.uncertainty_ns < 5_000_000, "{t:?}");
        let id = boot_id();
        assert_eq!(id.len(), 36, "{id:?}");
    }
}
