//! Rate pacing in integer arithmetic (the guest is soft-float): how many units are due at a time, and when the
//! next batch is due.

/// Paces work at `rate` units per second from a start time, in microseconds.
#[derive(Clone, Copy, Debug)]
pub struct Pacer {
    rate: u64,
    start_us: u64,
    done: u64,
    max_backlog: u64,
}

impl Pacer {
    /// A pacer for `rate` units per second (`rate > 0`), starting at `now_us`. At most `max_backlog` units may be
    /// owed at once: a guest that was paused (for instance by a migration) does not try to catch up the whole pause.
    pub fn new(rate: u64, now_us: u64, max_backlog: u64) -> Self {
        Self {
            rate: rate.max(1),
            start_us: now_us,
            done: 0,
            max_backlog: max_backlog.max(1),
        }
    }

    fn earned(&self, now_us: u64) -> u64 {
        let elapsed = u128::from(now_us.saturating_sub(self.start_us));
        (elapsed * u128::from(self.rate) / 1_000_000).min(u128::from(u64::MAX)) as u64
    }

    /// Units owed now. Drops any backlog beyond `max_backlog` by moving the start forward.
    pub fn due(&mut self, now_us: u64) -> u64 {
        let owed = self.earned(now_us).saturating_sub(self.done);
        if owed > self.max_backlog {
            let skip = owed - self.max_backlog;
            // Pretend the skipped units were done; keeps `done` monotonic and the rate exact afterwards.
            self.done += skip;
            return self.max_backlog;
        }
        owed
    }

    /// Records that `units` were done.
    pub fn record(&mut self, units: u64) {
        self.done += units;
    }

    /// Units done so far (including skipped backlog).
    pub fn done(&self) -> u64 {
        self.done
    }

    /// The time (µs) at which `batch` more units will be owed than are now done.
    pub fn next_due_us(&self, batch: u64) -> u64 {
        let target = u128::from(self.done + batch.max(1));
        let us = (target * 1_000_000).div_ceil(u128::from(self.rate));
        self.start_us.saturating_add(us.min(u128::from(u64::MAX)) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_follows_rate() {
        let mut p = Pacer::new(1000, 5_000_000, 1_000_000);
        assert_eq!(p.due(5_000_000), 0);
        assert_eq!(p.due(5_000_999), 0);
        assert_eq!(p.due(5_001_000), 1);
        assert_eq!(p.due(5_500_000), 500);
        p.record(400);
        assert_eq!(p.due(5_500_000), 100);
        assert_eq!(p.next_due_us(101), 5_501_000);
    }

    #[test]
    fn backlog_is_capped_and_rate_kept() {
        let mut p = Pacer::new(100, 0, 10);
        assert_eq!(p.due(60_000_000), 10);
        p.record(10);
        assert_eq!(p.due(60_000_000), 0);
        assert_eq!(p.due(60_010_000), 1);
    }

    #[test]
    fn huge_rates_do_not_overflow() {
        let mut p = Pacer::new(u64::MAX, 0, u64::MAX);
        assert_eq!(p.due(10_000_000), u64::MAX);
        assert!(p.next_due_us(1) <= 1);
    }
}
