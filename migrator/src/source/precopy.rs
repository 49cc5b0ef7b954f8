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
    source::session::{Progress, RoundStats, STATE_BYTES_GUESS, STATE_TIME_GUESS, Session, past_deadline},
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
    /// The dirty set at the previous decision (pages), `None` at the first.
    pub previous_dirty: Option<u64>,
    /// Rounds sent since the estimate first fit the budget.
    pub extra_rounds: u32,
}

/// The switch-over rule (see the crate documentation): pause once the estimate fits the budget and the dirty set
/// has stopped shrinking (or is small, or enough extra rounds were spent); until then, iterate.
pub fn decide(
    est: &Estimate,
    budget: Duration,
    trend: Trend,
    timed_out: bool,
    on_timeout: OnTimeout,
) -> Decision {
    if est.pause() <= budget {
        let shrinking = trend
            .previous_dirty
            .is_some_and(|prev| (est.dirty_pages as f64) <= prev as f64 * SHRINK);
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
    let first = send_first_round(vm, s, progress)?;
    let converged = converge(vm, opts, s, first.data_pages)?;
    s.report.rounds = converged.round;
    switch_over(vm, opts, s, progress, &converged)
}

/// Starts the dirty log and sends round 0: every page that may hold data (the others as zero flags).
fn send_first_round<S: MigrationSource>(
    vm: &mut S,
    s: &mut Session,
    progress: &mut Progress,
) -> Result<RoundStats, MigrationError> {
    vm.start_dirty_log()
        .map_err(MigrationError::vm("start dirty logging"))?;
    progress.dirty_log = true;
    // Residency after the log started: a page touched after this is in the next dirty set.
    let resident = s.ram.resident_pages();
    let total = s.ram.total_pages();
    s.tracker.update(|st| {
        st.state = MigrationState::Precopy;
        st.iteration = 0;
        st.dirty_pages = total;
        st.remaining_bytes = total * PAGE_SIZE as u64;
    });
    let r0 = s.send_round(0, 0..total, total, Some(&resident))?;
    s.bandwidth.record(r0.bytes, r0.secs);
    s.end_round(0, &r0)?;
    Ok(r0)
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
/// `first_pages`: the data pages of round 0, what the first dirty set is compared with.
fn converge<S: MigrationSource>(
    vm: &mut S,
    opts: &MigrateOptions,
    s: &mut Session,
    first_pages: u64,
) -> Result<Converged, MigrationError> {
    let (state_bytes, state_time) = state_figures();
    let deadline = s.started + opts.timeout;
    let mut round = 1u32;
    let mut trend = Trend {
        previous_dirty: Some(first_pages),
        extra_rounds: 0,
    };
    loop {
        let dirty = vm
            .take_dirty_pages()
            .map_err(MigrationError::vm("read the dirty log"))?;
        let est = Estimate {
            dirty_pages: dirty.count_ones(),
            bandwidth: s.bandwidth.rate(),
            state_bytes,
            state_time,
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
            trend.extra_rounds += u32::from(decision == Decision::Iterate);
        }
        trend.previous_dirty = Some(est.dirty_pages);
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
                let st = s.send_round(round, dirty.iter_ones(), est.dirty_pages, None)?;
                s.bandwidth.record(st.bytes, st.secs);
                s.end_round(round, &st)?;
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
        // 1 GiB/s: 30 ms is about 7600 pages after the state cost.
        let first = Trend::default();
        assert_eq!(
            decide(&est(100), budget, first, false, OnTimeout::Abort),
            Decision::SwitchOver
        );
        assert_eq!(
            decide(&est(8192), budget, first, false, OnTimeout::Abort),
            Decision::Iterate
        );
        assert_eq!(
            decide(&est(8192), budget, first, true, OnTimeout::Abort),
            Decision::Abort
        );
        assert_eq!(
            decide(&est(8192), budget, first, true, OnTimeout::Force),
            Decision::Force
        );
        // Fits even after the timeout: a normal switch-over.
        assert_eq!(
            decide(&est(0), budget, first, true, OnTimeout::Abort),
            Decision::SwitchOver
        );
        // Within budget and still shrinking fast: one more round makes the pause shorter.
        let shrinking = Trend {
            previous_dirty: Some(4000),
            extra_rounds: 0,
        };
        assert_eq!(
            decide(&est(1000), budget, shrinking, false, OnTimeout::Abort),
            Decision::Iterate
        );
        // Not shrinking any more, small, out of extra rounds, or out of time: pause now.
        let flat = Trend {
            previous_dirty: Some(1100),
            extra_rounds: 0,
        };
        assert_eq!(
            decide(&est(1000), budget, flat, false, OnTimeout::Abort),
            Decision::SwitchOver
        );
        assert_eq!(
            decide(&est(50), budget, shrinking, false, OnTimeout::Abort),
            Decision::SwitchOver
        );
        let spent = Trend {
            extra_rounds: MAX_EXTRA_ROUNDS,
            ..shrinking
        };
        assert_eq!(
            decide(&est(1000), budget, spent, false, OnTimeout::Abort),
            Decision::SwitchOver
        );
        assert_eq!(
            decide(&est(1000), budget, shrinking, true, OnTimeout::Abort),
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
