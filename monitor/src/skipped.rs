//! Input the monitor skipped, counted per source and reason for the whole process: a kernel record it could not
//! decode, a migrator or QMP line that did not parse, a line too long. Every skip is also a warning note; the counts
//! go into the trace as cumulative `skipped` records and into the metrics (`migmon_skipped_input_total`).

use std::{
    collections::BTreeMap,
    sync::{Mutex, PoisonError},
};

use migmon_analysis::trace::Event;

static COUNTS: Mutex<BTreeMap<(&'static str, &'static str), u64>> = Mutex::new(BTreeMap::new());

/// Counts one skipped input from `source` (`kernel`, `migrator`, `qmp`, ...) for `reason` (`undecodable`,
/// `malformed`, `too_long`, ...).
pub fn count(source: &'static str, reason: &'static str) {
    *COUNTS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry((source, reason))
        .or_default() += 1;
}

/// Every count so far.
pub fn snapshot() -> BTreeMap<(&'static str, &'static str), u64> {
    COUNTS.lock().unwrap_or_else(PoisonError::into_inner).clone()
}

/// The counts that changed since `prev` (which it updates), as `skipped` records at `ts_ns`.
pub fn changed(prev: &mut BTreeMap<(&'static str, &'static str), u64>, ts_ns: u64) -> Vec<Event> {
    let mut out = Vec::new();
    for (key, n) in snapshot() {
        if prev.get(&key) != Some(&n) {
            prev.insert(key, n);
            out.push(Event::Skipped {
                ts_ns,
                source: key.0.to_owned(),
                reason: key.1.to_owned(),
                count: n,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_become_cumulative_records_once_per_change() {
        let mut prev = BTreeMap::new();
        count("test-skipped", "odd");
        count("test-skipped", "odd");
        let first = changed(&mut prev, 5);
        assert!(first.iter().any(|e| matches!(e,
            Event::Skipped { source, reason, count: 2, .. } if source == "test-skipped" && reason == "odd")));
        assert!(
            changed(&mut prev, 6)
                .iter()
                .all(|e| !matches!(e, Event::Skipped { source, .. } if source == "test-skipped"))
        );
        count("test-skipped", "odd");
        assert!(
            changed(&mut prev, 7)
                .iter()
                .any(|e| matches!(e, Event::Skipped { count: 3, .. }))
        );
    }
}
