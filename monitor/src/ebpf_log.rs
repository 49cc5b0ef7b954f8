//! The kernel programs' own diagnostics (`migmon watch --ebpf-log`): aya-log records, read from each instance's
//! `AYA_LOGS` ring buffer by [`aya_log::EbpfLogger`] and turned into `note` events (level `ebpf-debug`,
//! `ebpf-info`, ...), so they reach the output and the trace in order with everything else.
//!
//! Off by default: the programs are loaded with `AYA_LOG_LEVEL` 0, and each log statement then costs a load and a
//! branch. On, they log at debug level and below.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, PoisonError},
};

use migmon_analysis::trace::Event;

use crate::decode::mono_now_ns;

/// The most records held between two drains; older ones are dropped (and counted).
const HELD: usize = 4096;

/// The level the programs log at with `--ebpf-log`: aya-log's `Debug` (`Error` 1 … `Trace` 5; 0 is off).
pub const LEVEL_ON: u8 = aya_log::Level::Debug as u8;

/// The `AYA_LOG_LEVEL` the programs are loaded with.
pub fn level(on: bool) -> u8 {
    if on { LEVEL_ON } else { 0 }
}

/// One diagnostic a kernel program logged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelLine {
    /// `error`, `warn`, `info`, `debug` or `trace`.
    pub level: &'static str,
    /// Where in the programs it was logged (`l2`, `flow`, ...).
    pub module: String,
    pub message: String,
}

impl KernelLine {
    /// The line as a trace note, naming the namespace of the instance that logged it.
    pub fn to_event(&self, netns: Option<&str>) -> Event {
        Event::Note {
            ts_ns: mono_now_ns(),
            level: format!("ebpf-{}", self.level),
            message: format!(
                "kernel {} ({}): {}",
                self.module,
                netns.unwrap_or("root netns"),
                self.message
            ),
        }
    }
}

/// A [`log::Log`] that keeps what aya-log hands it until the collector takes it (clones share what they hold).
#[derive(Clone, Default)]
pub struct KernelLog {
    held: Arc<Mutex<Held>>,
}

#[derive(Default)]
struct Held {
    lines: VecDeque<KernelLine>,
    dropped: u64,
}

impl KernelLog {
    /// Takes the lines held so far, and how many were dropped since the last call.
    pub fn take(&self) -> (Vec<KernelLine>, u64) {
        let mut h = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        (h.lines.drain(..).collect(), std::mem::take(&mut h.dropped))
    }
}

impl log::Log for KernelLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let module = record.module_path().unwrap_or(record.target());
        let line = KernelLine {
            level: match record.level() {
                log::Level::Error => "error",
                log::Level::Warn => "warn",
                log::Level::Info => "info",
                log::Level::Debug => "debug",
                log::Level::Trace => "trace",
            },
            // `monitor::l2` → `l2`.
            module: module.rsplit("::").next().unwrap_or(module).to_owned(),
            message: record.args().to_string(),
        };
        let mut h = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if h.lines.len() >= HELD {
            h.lines.pop_front();
            h.dropped += 1;
        }
        h.lines.push_back(line);
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use log::Log;

    use super::*;

    #[test]
    fn records_become_bounded_notes() {
        let k = KernelLog::default();
        for i in 0..HELD + 3 {
            k.log(
                &log::Record::builder()
                    .level(log::Level::Debug)
                    .module_path(Some("monitor::l2"))
                    .args(format_args!("ifindex {i}: ARP cut short"))
                    .build(),
            );
        }
        let (lines, dropped) = k.take();
        assert_eq!((lines.len(), dropped), (HELD, 3));
        let Event::Note { level, message, .. } = lines[0].to_event(Some("hosta")) else {
            panic!()
        };
        assert_eq!(level, "ebpf-debug");
        assert_eq!(message, "kernel l2 (hosta): ifindex 3: ARP cut short");
        assert_eq!(k.take().0.len(), 0);
        assert_eq!(level_of_off(), 0);
    }

    fn level_of_off() -> u8 {
        level(false)
    }
}
