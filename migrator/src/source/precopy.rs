//! Live migration by iterative pre-copy. The switch-over rule is in the crate documentation ([`crate`]).

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use migevents::Phase;

use crate::{
    engine::{MigrateOptions, MigrationError, MigrationSource, MigrationState, OnTimeout},
    protocol::HEADER_SIZE,
    ram::{DirtyBitmap, PAGE_SIZE},
    source::session::{
        Progress, RoundStats, STATE_BYTES_GUESS, STATE_TIME_GUESS, Session, past_deadline, stall_timeout,
    },
};

/// The state-transfer figures of this process's last migration (0 = none yet), used by the switch-over rule.
static LAST_STATE_BYTES: AtomicU64 = AtomicU64::new(0);
static LAST_STATE_NS: AtomicU64 = AtomicU64::new(0);

/// The inputs of the switch-over rule.
#[derive(Clone, Copy, Debug)]
pub struct Estimate {
    /// Pages in the dirty set now.
    pub dirty_pages: u64,
    /// Measured bandwidth, bytes/s.
    pub bandwidth: u64,
    /// State size (measured last time, or guessed).
    pub state_bytes: u64,
    /// Fixed state cost (save + restore; measured last time, or guessed).
    pub state_time: Duration,
}

impl Estimate {
    /// Bytes the final round would send: every dirty page with data, its share of an entry, plus the state.
    pub fn remaining_bytes(&self) -> u64 {
        self.dirty_pages * (PAGE_SIZE as u64 + 16) + self.state_bytes + 4 * HEADER_SIZE as u64
    }

    /// The expected pause.
    pub fn pause(&self) -> Duration {
        let transfer = self.remaining_bytes() as f64 / self.bandwidth.max(1) as f64;
        Duration::from_secs_f64(transfer) + self.state_time
    }

    /// How long sending the dirty set as one more round would take: its pages at the measured bandwidth, plus
    /// a round's fixed cost (the destination's acknowledgement, reading the dirty log).
    pub fn round_time(&self, overhead: Duration) -> Duration {
        let pages = self.dirty_pages * (PAGE_SIZE as u64 + 16);
        Duration::from_secs_f64(pages as f64 / self.bandwidth.max(1) as f64) + overhead
    }
}

/// The switch-over decision after a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Send another round.
    Iterate,
    /// Pause and finish: the estimate fits the budget.
    SwitchOver,
    /// Pause and finish anyway: `--timeout` with `--on-timeout force`.
    Force,
    /// Give up: `--timeout` with `--on-timeout abort`.
    Abort,
}

/// A dirty set this small (pages) is not worth another round.
pub const SMALL_DIRTY_SET: u64 = 64;
/// Another round within budget only when the dirty set shrank to at most this share of the previous one.
pub const SHRINK: f64 = 0.75;
/// The most pre-copy rounds that may be spent making a pause within budget shorter.
pub const MAX_EXTRA_ROUNDS: u32 = 8;

/// Where pre-copy stands at a decision.
#[derive(Clone, Copy, Debug, Default)]
pub struct Trend {
    /// The guest's measured dirty rate, pages per second: the dirty set over the time since the log was last read.
    pub dirty_rate: f64,
    /// The fixed cost of the last round beyond its bytes at the measured bandwidth.
    pub round_overhead: Duration,
    /// Rounds sent since the estimate first fit the budget.
    pub extra_rounds: u32,
}

impl Trend {
    /// The dirty set another round would leave (pages): what the guest dirties while this one goes over.
    pub fn next_dirty(&self, est: &Estimate) -> f64 {
        self.dirty_rate * est.round_time(self.round_overhead).as_secs_f64()
    }
}

/// The switch-over rule (see the crate documentation): pause once the estimate fits the budget, unless one more
/// round is predicted to shrink the dirty set clearly (and the set is not small, and extra rounds are left);
/// until the estimate fits, iterate.
pub fn decide(
    est: &Estimate,
    budget: Duration,
    trend: Trend,
    timed_out: bool,
    on_timeout: OnTimeout,
) -> Decision {
    if est.pause() <= budget {
        let shrinking = trend.next_dirty(est) <= est.dirty_pages as f64 * SHRINK;
        if shrinking
            && est.dirty_pages > SMALL_DIRTY_SET
            && trend.extra_rounds < MAX_EXTRA_ROUNDS
            && !timed_out
        {
            Decision::Iterate
        } else {
            Decision::SwitchOver
        }
    } else if timed_out {
        match on_timeout {
            OnTimeout::Force => Decision::Force,
            OnTimeout::Abort => Decision::Abort,
        }
    } else {
        Decision::Iterate
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn state_figures() -> (u64, Duration) {
    match (
        LAST_STATE_BYTES.load(Ordering::Relaxed),
        LAST_STATE_NS.load(Ordering::Relaxed),
    ) {
        (0, _) | (_, 0) => (STATE_BYTES_GUESS, STATE_TIME_GUESS),
        (b, ns) => (b, Duration::from_nanos(ns)),
    }
}

/// Runs the live migration on an open session.
pub fn run<S: MigrationSource>(
    vm: &mut S,
    opts: &MigrateOptions,
    s: &mut Session,
    progress: &mut Progress,
) -> Result<(), MigrationError> {
    let first = send_first_round(vm, opts, s, progress)?;
    let converged = converge(vm, opts, s, first)?;
    s.report.rounds = converged.round;
    switch_over(vm, opts, s, progress, &converged)
}

/// A round sent and acknowledged.
#[derive(Clone, Copy, Debug)]
struct SentRound {
    bytes: u64,
    /// From its first byte to the destination's acknowledgement.
    time: Duration,
    /// When the dirty set it was made of was read (the log started, for round 0).
    read_at: Instant,
}

/// Sends `round` and waits for its acknowledgement: a round ends when its pages are in the destination's RAM,
/// not when they fill the socket buffers (which hold megabytes: a pause that began then would wait for them).
/// The round's time, from its first byte to the acknowledgement, feeds the bandwidth.
fn send_acked_round(
    opts: &MigrateOptions,
    s: &mut Session,
    round: u32,
    pages: impl Iterator<Item = u64>,
    total: u64,
    known_zero: Option<&DirtyBitmap>,
) -> Result<(RoundStats, Duration), MigrationError> {
    let t0 = Instant::now();
    let st = s.send_round(round, pages, total, known_zero)?;
    s.end_round(round, &st)?;
    s.await_round_ack(round, stall_timeout(opts))?;
    let time = t0.elapsed();
    s.bandwidth.record(st.bytes, time.as_secs_f64());
    Ok((st, time))
}

/// Starts the dirty log and sends round 0: every page that may hold data (the others as zero flags).
fn send_first_round<S: MigrationSource>(
    vm: &mut S,
    opts: &MigrateOptions,
    s: &mut Session,
    progress: &mut Progress,
) -> Result<SentRound, MigrationError> {
    vm.start_dirty_log()
        .map_err(MigrationError::vm("start dirty logging"))?;
    progress.dirty_log = true;
    let read_at = Instant::now();
    // Residency after the log started: a page touched after this is in the next dirty set.
    let resident = s.ram.resident_pages();
    let total = s.ram.total_pages();
    s.tracker.update(|st| {
        st.state = MigrationState::Precopy;
        st.iteration = 0;
        st.dirty_pages = total;
        st.remaining_bytes = total * PAGE_SIZE as u64;
    });
    let (r0, time) = send_acked_round(opts, s, 0, 0..total, total, Some(&resident))?;
    Ok(SentRound {
        bytes: r0.bytes,
        time,
        read_at,
    })
}

/// Where pre-copy stopped iterating.
struct Converged {
    /// The dirty set read at the decision, not sent yet.
    dirty: DirtyBitmap,
    /// The pause the rule expected.
    expected: Duration,
    /// The round the final set goes out as (the rounds sent before the pause).
    round: u32,
}

/// Sends dirty sets round after round until the switch-over rule says pause (or force); fails when it says abort.
/// `last`: round 0.
fn converge<S: MigrationSource>(
    vm: &mut S,
    opts: &MigrateOptions,
    s: &mut Session,
    mut last: SentRound,
) -> Result<Converged, MigrationError> {
    let (state_bytes, state_time) = state_figures();
    let deadline = s.started + opts.timeout;
    let mut round = 1u32;
    let mut extra_rounds = 0;
    loop {
        let dirty = vm
            .take_dirty_pages()
            .map_err(MigrationError::vm("read the dirty log"))?;
        let read_at = Instant::now();
        let est = Estimate {
            dirty_pages: dirty.count_ones(),
            bandwidth: s.bandwidth.rate(),
            state_bytes,
            state_time,
        };
        let since_read = read_at.duration_since(last.read_at).as_secs_f64().max(1e-6);
        let at_bandwidth = Duration::from_secs_f64(last.bytes as f64 / est.bandwidth.max(1) as f64);
        let trend = Trend {
            dirty_rate: est.dirty_pages as f64 / since_read,
            round_overhead: last.time.saturating_sub(at_bandwidth),
            extra_rounds,
        };
        let expected = est.pause();
        s.tracker.update(|st| {
            st.iteration = round;
            st.dirty_pages = est.dirty_pages;
            st.remaining_bytes = est.remaining_bytes();
            st.bandwidth = est.bandwidth;
            st.expected_pause_ms = ms(expected);
            st.bytes_sent = s.writer.bytes();
        });
        let decision = decide(
            &est,
            opts.downtime,
            trend,
            Instant::now() >= deadline,
            opts.on_timeout,
        );
        if est.pause() <= opts.downtime {
            extra_rounds += u32::from(decision == Decision::Iterate);
        }
        match decision {
            Decision::SwitchOver => {}
            Decision::Force => {
                s.report.forced = true;
                s.report.notes.push(format!(
                    "did not converge within {:?}: switch-over forced with an expected pause of {:.1} ms",
                    opts.timeout,
                    ms(expected)
                ));
            }
            Decision::Abort => {
                return Err(MigrationError::NotConverged {
                    timeout: opts.timeout,
                    dirty_pages: est.dirty_pages,
                    expected_ms: ms(expected),
                    budget_ms: ms(opts.downtime),
                });
            }
            Decision::Iterate => {
                if s.tracker.cancelled() {
                    return Err(MigrationError::Cancelled);
                }
                let (st, time) = send_acked_round(opts, s, round, dirty.iter_ones(), est.dirty_pages, None)?;
                last = SentRound {
                    bytes: st.bytes,
                    time,
                    read_at,
                };
                round += 1;
                continue;
            }
        }
        return Ok(Converged {
            dirty,
            expected,
            round,
        });
    }
}

/// The pause: stop the vCPU, send the last dirty set and the tail, wait for the ack. Everything from here to the
/// ack is the pause.
fn switch_over<S: MigrationSource>(
    vm: &mut S,
    opts: &MigrateOptions,
    s: &mut Session,
    progress: &mut Progress,
    converged: &Converged,
) -> Result<(), MigrationError> {
    let paused_at = Instant::now();
    let deadline = pause_deadline(opts, paused_at);
    s.writer.get_mut().set_deadline(deadline);
    vm.pause().map_err(MigrationError::vm("pause"))?;
    progress.paused = true;
    paused(vm, opts, s, progress, converged, paused_at, deadline)
        .map_err(|e| past_deadline(e, deadline, opts.pause_deadline()))
}

/// Everything from the stopped vCPU to the ack.
fn paused<S: MigrationSource>(
    vm: &mut S,
    opts: &MigrateOptions,
    s: &mut Session,
    progress: &mut Progress,
    converged: &Converged,
    paused_at: Instant,
    deadline: Option<Instant>,
) -> Result<(), MigrationError> {
    let paused_ns = s.events.emit(Phase::Pause);
    let t_stopped = Instant::now();
    s.tracker.update(|st| st.state = MigrationState::Paused);
    let bytes0 = s.writer.bytes();
    let mut last = vm
        .take_dirty_pages()
        .map_err(MigrationError::vm("read the dirty log"))?;
    last.union_with(&converged.dirty);
    let n = last.count_ones();
    let st = s.send_round(converged.round, last.iter_ones(), n, None)?;
    s.end_round(converged.round, &st)?;
    // The dirty log stays on until the ack: turning it off rewrites the memslot, which is slow and not needed
    // while paused (and a rollback stops it).
    let t_final = Instant::now();
    s.send_tail(vm, opts.verify, paused_ns, deadline)?;
    s.report.final_bytes = s.writer.bytes() - bytes0;
    s.tracker.update(|st| st.state = MigrationState::Completing);
    let t_tail = Instant::now();
    s.await_ready_and_commit(vm, deadline, opts.pause_deadline(), progress)?;
    let ack = s.await_ack(vm)?;
    let b = &mut s.report.pause_breakdown;
    b.stop_vcpu_ms = ms(t_stopped - paused_at);
    b.final_round_ms = ms(t_final - t_stopped);
    b.tail_ms = ms(t_tail - t_final);
    b.destination_ms = ms(t_tail.elapsed());
    record_state_figures(s.report.state_bytes, s.report.state_ms, ack.restore_us);
    s.complete(paused_at, ack, ms(converged.expected));
    Ok(())
}

/// The instant by which the destination must be ready: `paused_at` plus the pause deadline, less what resuming
/// here takes (a tenth of the deadline, at most 50 ms), so that a rollback lands within the deadline.
pub fn pause_deadline(opts: &MigrateOptions, paused_at: Instant) -> Option<Instant> {
    opts.pause_deadline().map(|d| {
        let allowance = (d / 10).min(Duration::from_millis(50));
        paused_at + d.saturating_sub(allowance)
    })
}

/// Keeps the state cost for the next estimate: save + send here, restore + resume there (hashing excluded: it is
/// estimated on its own).
fn record_state_figures(state_bytes: u64, state_ms: f64, restore_us: u64) {
    LAST_STATE_BYTES.store(state_bytes.max(1), Ordering::Relaxed);
    let state_ns = (state_ms * 1e6) as u64 + restore_us * 1000;
    LAST_STATE_NS.store(
        state_ns.clamp(1, Duration::from_millis(50).as_nanos() as u64),
        Ordering::Relaxed,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn est(dirty_pages: u64) -> Estimate {
        Estimate {
            dirty_pages,
            bandwidth: 1 << 30,
            state_bytes: 64 << 10,
            state_time: Duration::from_millis(1),
        }
    }

    #[test]
    fn rule() {
        let budget = Duration::from_millis(30);
        // 1 GiB/s: 30 ms is about 7600 pages after the state cost; 1000 pages go over in about 3.8 ms.
        let slow = Trend {
            dirty_rate: 10_000.0,
            ..Trend::default()
        };
        assert_eq!(
            decide(&est(8192), budget, slow, false, OnTimeout::Abort),
            Decision::Iterate
        );
        assert_eq!(
            decide(&est(8192), budget, slow, true, OnTimeout::Abort),
            Decision::Abort
        );
        assert_eq!(
            decide(&est(8192), budget, slow, true, OnTimeout::Force),
            Decision::Force
        );
        // Fits even after the timeout: a normal switch-over.
        assert_eq!(
            decide(&est(0), budget, slow, true, OnTimeout::Abort),
            Decision::SwitchOver
        );
        // Within budget, and a dirtier much slower than the link: one more round leaves ~38 pages of 1000.
        assert!(slow.next_dirty(&est(1000)) < 50.0);
        assert_eq!(
            decide(&est(1000), budget, slow, false, OnTimeout::Abort),
            Decision::Iterate
        );
        // A dirtier as fast as the link: another round would leave as much as now. Pause.
        let fast = Trend {
            dirty_rate: 300_000.0,
            ..slow
        };
        assert!(fast.next_dirty(&est(1000)) > 1000.0);
        assert_eq!(
            decide(&est(1000), budget, fast, false, OnTimeout::Abort),
            Decision::SwitchOver
        );
        // A round's fixed cost counts: with 100 ms of it, even the slow dirtier refills the set.
        let costly = Trend {
            round_overhead: Duration::from_millis(100),
            ..slow
        };
        assert_eq!(
            decide(&est(1000), budget, costly, false, OnTimeout::Abort),
            Decision::SwitchOver
        );
        // Small, out of extra rounds, or out of time: pause now.
        assert_eq!(
            decide(&est(50), budget, slow, false, OnTimeout::Abort),
            Decision::SwitchOver
        );
        let spent = Trend {
            extra_rounds: MAX_EXTRA_ROUNDS,
            ..slow
        };
        assert_eq!(
            decide(&est(1000), budget, spent, false, OnTimeout::Abort),
            Decision::SwitchOver
        );
        assert_eq!(
            decide(&est(1000), budget, slow, true, OnTimeout::Abort),
            Decision::SwitchOver
        );
        let e = est(0);
        assert!(
            e.pause() >= Duration::from_millis(1),
            "the state cost is always counted"
        );
    }

    #[test]
    fn bandwidth_estimator() {
        let mut b = crate::source::session::Bandwidth::default();
        assert_eq!(b.rate(), 1 << 30);
        b.record(1000, 0.001);
        assert_eq!(b.rate(), 1_000_000);
        b.record(10 << 20, 0.01);
        assert_eq!(b.rate(), (10u64 << 20) * 100);
        b.record(10, 1.0); // tiny, latency-bound rounds do not drag it down
        assert_eq!(b.rate(), (10u64 << 20) * 100);
    }
}
