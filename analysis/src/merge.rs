//! Traces from several hosts merged onto one timeline.
//!
//! Each host's monitor records its own `CLOCK_MONOTONIC`. A merge maps every trace onto the clock of the first
//! one (the reference) in two steps:
//!
//! 1. **Realtime.** The header's clock triple and the `clock_sample` events pair each host's monotonic clock with
//!    its `CLOCK_REALTIME`. A straight line through them (least squares) gives each host's monotonic drift against
//!    realtime; two hosts' lines give a first map between their monotonic clocks, as good as their realtime clocks
//!    agree: NTP grade, taken as ± [`REALTIME_BOUND_NS`]. A realtime step between two samples (beyond
//!    [`STEP_TOLERANCE_NS`] plus 500 ppm) is reported, and the line is fitted on the longest stretch without one.
//! 2. **What both hosts saw.** A frame seen by both (the same bytes: RARP, GARP, ARP, NA, and flow segments with
//!    their headers) pairs an instant on one clock with an instant on the other. Candidate pairs are frames with the
//!    same bytes within ± [`MATCH_WINDOW_NS`] of the realtime map; the densest cluster of their offsets (within
//!    [`CLUSTER_WIDTH_NS`]) is the true one (a repeated RARP burst also pairs with its neighbours, each of those
//!    offsets once). A straight line through the cluster gives the offset; its slope, the drift, comes from the
//!    pairs when they span [`DRIFT_SPAN_NS`] or more (least squares, the one-way delay a term of its own when
//!    frames went both ways), otherwise from the realtime lines. Then, as NTP does with its delay envelope: a frame sent
//!    by host H and seen at host R arrives no earlier than it left, so its residual is an upper bound of the line's
//!    error; a frame sent by R and seen at H gives a lower bound. The offset is the middle of the tightest bounds,
//!    and the error bound half their distance, plus two standard errors of the drift (at least [`DRIFT_FLOOR_PPM`];
//!    [`UNKNOWN_DRIFT_PPM`] when neither the pairs nor the clock samples span long enough to measure it) over the
//!    distance from the pairs to the host's migration events. Which host sent a frame follows from where its source MAC's VM ran then (the
//!    migration events: the source until the destination resumed it). With frames of one direction only, the
//!    one-way delay is not measured and is taken as at most [`ASSUMED_DELAY_NS`].
//!
//! Every figure of the merged analysis that spans hosts carries the bound ([`annotate`]). Nothing is dropped:
//! traces of one host given twice share its clock and their identical events are kept once (counted, reported);
//! traces that do not overlap in time, and realtime steps, are reported in [`MergeInfo::warnings`].

use std::collections::{BTreeMap, HashMap, HashSet};

use migmon_base::units::fmt_ns;
use serde::Serialize;

use crate::trace::{Event, MacAddr, Port, Trace};

/// The error assumed of two hosts' realtime clocks against each other (NTP on a LAN: milliseconds).
pub const REALTIME_BOUND_NS: u64 = 10_000_000;
/// A change of realtime − monotonic between two samples beyond this (plus 500 ppm) is a step.
pub const STEP_TOLERANCE_NS: i64 = 1_000_000;
/// How far from the realtime map a frame seen by the other host may be to pair with it.
pub const MATCH_WINDOW_NS: i64 = 500_000_000;
/// The width of the cluster of pair offsets taken as the true one.
pub const CLUSTER_WIDTH_NS: i64 = 2_000_000;
/// Frame pairs spanning at least this long give the drift; shorter, the realtime samples do.
pub const DRIFT_SPAN_NS: u64 = 10_000_000_000;
/// The least error taken of a drift estimate (the realtime clocks' rate, NTP-disciplined).
pub const DRIFT_FLOOR_PPM: f64 = 1.0;
/// The drift error taken when neither the frames nor the clock samples measured it (a crystal's tolerance).
pub const UNKNOWN_DRIFT_PPM: f64 = 100.0;
/// The one-way delay taken when the frames went one way only (a LAN hop or two).
pub const ASSUMED_DELAY_NS: u64 = 100_000;

/// One trace to merge, with the name it is reported under (its path).
#[derive(Clone, Debug)]
pub struct Input {
    pub name: String,
    pub trace: Trace,
}

/// Errors merging traces.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("no trace to merge: give trace files or a directory of *.trace files")]
    Empty,
}

/// How one trace's clock was mapped onto the reference's: `t_ref = t + offset_ns + drift_ppm·10⁻⁶·(t − anchor_ns)`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct HostClock {
    /// The trace file.
    pub trace: String,
    pub host: String,
    /// The kernel's boot id (`""` in older traces).
    pub boot_id: String,
    pub events: usize,
    /// This trace's clock is the reference's (the reference itself, or the same host and boot).
    pub reference: bool,
    /// A time of this trace's clock near the middle of its events.
    pub anchor_ns: u64,
    pub offset_ns: i64,
    pub drift_ppm: f64,
    /// The error bound of the map, near the migrations.
    pub bound_ns: u64,
    /// `reference`, `same clock`, `shared frames`, or `realtime`.
    pub method: String,
    /// Frame pairs the offset rests on, by direction: sent by this host, sent by the reference, not known.
    pub pairs_sent: usize,
    pub pairs_received: usize,
    pub pairs_unknown: usize,
    /// The offset the realtime samples alone gave, for comparison.
    pub realtime_offset_ns: i64,
    pub clock_samples: usize,
    pub realtime_steps: usize,
}

/// How a merged analysis was put together.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct MergeInfo {
    pub hosts: Vec<HostClock>,
    /// The bound of a figure that spans two hosts: the two largest host bounds added.
    pub bound_ns: u64,
    /// Events present in two traces of one kernel, kept once.
    pub duplicates: usize,
    /// What is wrong with each trace file (see `Trace::damage`), prefixed with its name.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub damage: Vec<String>,
    /// The trace files a running watch is still writing (see `Trace::in_progress`), each with what that means.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub in_progress: Vec<String>,
    pub warnings: Vec<String>,
}

/// A merged trace (every time on the reference's clock) and how it was merged.
#[derive(Clone, Debug)]
pub struct Merged {
    pub trace: Trace,
    pub info: MergeInfo,
}

/// A linear map from one monotonic clock onto another.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct ClockMap {
    anchor: u64,
    offset: i64,
    /// Fractional drift (ppm · 10⁻⁶).
    drift: f64,
}

impl ClockMap {
    fn apply(&self, t: u64) -> u64 {
        let dt = t as f64 - self.anchor as f64;
        let shifted = i128::from(t) + i128::from(self.offset) + (self.drift * dt).round() as i128;
        u64::try_from(shifted.max(0)).unwrap_or(u64::MAX)
    }
}

/// One host's realtime line: `realtime − monotonic = q0 + rate·(t − m0)`.
#[derive(Clone, Copy, Debug)]
struct RealtimeLine {
    m0: u64,
    q0: i64,
    rate: f64,
    /// The rate was measured (samples spanning 5 s or more), not taken as 0.
    measured: bool,
}

impl RealtimeLine {
    fn q(&self, t: u64) -> i64 {
        self.q0 + (self.rate * (t as f64 - self.m0 as f64)).round() as i64
    }
}

/// The (monotonic, realtime) samples of a trace: the header's triple (or its start times) and the `clock_sample`s.
fn samples(t: &Trace) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    if let Some(h) = &t.header {
        match h.clocks {
            Some(c) => out.push((c.mono_ns, c.realtime_ns)),
            None if h.start_unix_ns > 0 => out.push((h.start_mono_ns, h.start_unix_ns)),
            None => {}
        }
    }
    for e in &t.events {
        if let Event::ClockSample {
            ts_ns, realtime_ns, ..
        } = e
        {
            out.push((*ts_ns, *realtime_ns));
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Fits the realtime line on the longest stretch of samples without a step; returns it and the steps (at, size).
fn realtime_line(s: &[(u64, u64)]) -> (Option<RealtimeLine>, Vec<(u64, i64)>) {
    if s.is_empty() {
        return (None, Vec::new());
    }
    let q = |i: usize| s[i].1 as i64 - s[i].0 as i64;
    let mut steps = Vec::new();
    let mut stretches = vec![(0, 1)];
    for i in 1..s.len() {
        let dt = s[i].0.saturating_sub(s[i - 1].0) as i64;
        let dq = q(i) - q(i - 1);
        if dq.abs() > STEP_TOLERANCE_NS + dt / 2000 {
            steps.push((s[i].0, dq));
            stretches.push((i, i + 1));
        } else if let Some(last) = stretches.last_mut() {
            last.1 = i + 1;
        }
    }
    let (a, b) = stretches.into_iter().max_by_key(|(a, b)| b - a).unwrap_or((0, 1));
    let part = &s[a..b];
    let m0 = part[part.len() / 2].0;
    let xs: Vec<f64> = part.iter().map(|p| p.0 as f64 - m0 as f64).collect();
    let ys: Vec<f64> = (a..b).map(|i| q(i) as f64).collect();
    let span = part.last().map_or(0, |l| l.0) - part[0].0;
    let measured = part.len() >= 2 && span >= 5_000_000_000;
    let (rate, q0) = if measured {
        let (slope, icpt, _) = least_squares(&xs, &ys);
        (slope, icpt.round() as i64)
    } else {
        (0.0, median_i64(ys.iter().map(|y| *y as i64).collect()))
    };
    (
        Some(RealtimeLine {
            m0,
            q0,
            rate,
            measured,
        }),
        steps,
    )
}

/// Least squares `y = slope·x + intercept`; also the slope's standard error.
fn least_squares(xs: &[f64], ys: &[f64]) -> (f64, f64, f64) {
    let n = xs.len() as f64;
    let mx = xs.iter().sum::<f64>() / n;
    let my = ys.iter().sum::<f64>() / n;
    let sxx: f64 = xs.iter().map(|x| (x - mx).powi(2)).sum();
    if sxx <= 0.0 {
        return (0.0, my, 0.0);
    }
    let sxy: f64 = xs.iter().zip(ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let slope = sxy / sxx;
    let icpt = my - slope * mx;
    let se = if xs.len() > 2 {
        let rss: f64 = xs
            .iter()
            .zip(ys)
            .map(|(x, y)| (y - slope * x - icpt).powi(2))
            .sum();
        (rss / (n - 2.0) / sxx).sqrt()
    } else {
        0.0
    };
    (slope, icpt, se)
}

/// Least squares `y = b·x + a + c·s` (`s` = ±1 by direction, so `c` is the one-way delay); `None` when the
/// directions and the times do not tell `b` and `c` apart. Returns `(b, a, c, standard error of b)`.
fn least_squares_with_delay(xs: &[f64], ss: &[f64], ys: &[f64]) -> Option<(f64, f64, f64, f64)> {
    let rows: Vec<[f64; 3]> = xs.iter().zip(ss).map(|(x, dir)| [*x, 1.0, *dir]).collect();
    let mut normal = [[0.0f64; 3]; 3];
    let mut rhs = [0.0f64; 3];
    for (row, y) in rows.iter().zip(ys) {
        for ((nrow, rh), r) in normal.iter_mut().zip(rhs.iter_mut()).zip(row) {
            for (cell, c) in nrow.iter_mut().zip(row) {
                *cell += r * c;
            }
            *rh += r * y;
        }
    }
    let det3 = |q: &[[f64; 3]; 3]| {
        q[0][0] * (q[1][1] * q[2][2] - q[1][2] * q[2][1]) - q[0][1] * (q[1][0] * q[2][2] - q[1][2] * q[2][0])
            + q[0][2] * (q[1][0] * q[2][1] - q[1][1] * q[2][0])
    };
    let det = det3(&normal);
    let scale = normal[0][0] * normal[1][1] * normal[2][2];
    if scale <= 0.0 || det.abs() < 1e-9 * scale {
        return None;
    }
    // Cramer's rule.
    let solve = |col: usize| {
        let mut q = normal;
        for (row, rh) in q.iter_mut().zip(rhs) {
            row[col] = rh;
        }
        det3(&q) / det
    };
    let (slope, icpt, delay) = (solve(0), solve(1), solve(2));
    let rss: f64 = rows
        .iter()
        .zip(ys)
        .map(|(r, y)| (y - slope * r[0] - icpt - delay * r[2]).powi(2))
        .sum();
    let dof = rows.len().saturating_sub(3).max(1) as f64;
    // The variance of the slope: σ² times the first diagonal entry of the normal matrix's inverse.
    let inv00 = (normal[1][1] * normal[2][2] - normal[1][2] * normal[2][1]) / det;
    Some((slope, icpt, delay, (rss / dof * inv00).max(0.0).sqrt()))
}

fn median_i64(mut v: Vec<i64>) -> i64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[v.len() / 2]
}

/// A frame a trace saw, with bytes another host may have seen too.
#[derive(Clone, Debug)]
struct Sighting {
    ts: u64,
    src: Option<MacAddr>,
}

fn sightings(t: &Trace) -> HashMap<&str, Vec<Sighting>> {
    let mut out: HashMap<&str, Vec<Sighting>> = HashMap::new();
    for e in &t.events {
        let bytes = match e {
            Event::Arp { frame, .. } | Event::Garp { frame, .. } | Event::Rarp { frame, .. } => &frame.frame,
            other => match other.flow_segment() {
                Some(seg) => &seg.frame,
                None => continue,
            },
        };
        if bytes.len() < 28 {
            continue;
        }
        let src = bytes.get(12..24).and_then(|h| {
            let mut mac = [0u8; 6];
            for (i, b) in mac.iter_mut().enumerate() {
                *b = u8::from_str_radix(h.get(2 * i..2 * i + 2)?, 16).ok()?;
            }
            Some(MacAddr::new(mac))
        });
        out.entry(bytes.as_str())
            .or_default()
            .push(Sighting { ts: e.ts_ns(), src });
    }
    out
}

/// Where each VM ran, from the migration events of every trace: (time on the reference clock, MAC, trace index).
fn vm_locations(inputs: &[Input], maps: &[ClockMap]) -> Vec<(u64, MacAddr, usize)> {
    use migevents::{Phase, Role};
    let mut out = Vec::new();
    for (i, inp) in inputs.iter().enumerate() {
        for e in &inp.trace.events {
            let Event::Migration { ev, .. } = e else {
                continue;
            };
            let here = matches!(
                (ev.role, &ev.phase),
                (
                    Role::Source,
                    Phase::Setup { .. } | Phase::Round { .. } | Phase::Rollback
                ) | (
                    Role::Destination,
                    Phase::Resume | Phase::Announce { .. } | Phase::Complete { .. }
                )
            );
            if let (true, Ok(mac)) = (here, ev.mac.parse::<MacAddr>()) {
                out.push((maps[i].apply(ev.ts_ns), mac, i));
            }
        }
    }
    out.sort_by_key(|l| l.0);
    out
}

/// Which trace's host sent a frame from `mac` at `t` (reference clock), when the migration events say.
fn sender(locations: &[(u64, MacAddr, usize)], mac: Option<MacAddr>, t: u64) -> Option<usize> {
    let mac = mac?;
    locations
        .iter()
        .rev()
        .find(|(at, m, _)| *at <= t && *m == mac)
        .map(|l| l.2)
}

/// A frame seen by the reference at `r` and by the other host at `h` (its own clock).
#[derive(Clone, Copy, Debug)]
struct Pair {
    r: u64,
    h: u64,
    src: Option<MacAddr>,
}

/// The pairs of frames both traces saw, within the match window of `coarse`, in the densest offset cluster.
fn matched_pairs(reference: &Trace, other: &Trace, coarse: &ClockMap) -> Vec<Pair> {
    let refs = sightings(reference);
    let mut cands: Vec<(i64, Pair)> = Vec::new();
    for (bytes, hs) in sightings(other) {
        let Some(rs) = refs.get(bytes) else { continue };
        for h in &hs {
            let hc = coarse.apply(h.ts) as i64;
            for r in rs {
                let d = r.ts as i64 - hc;
                if d.abs() <= MATCH_WINDOW_NS {
                    cands.push((
                        d,
                        Pair {
                            r: r.ts,
                            h: h.ts,
                            src: h.src,
                        },
                    ));
                }
            }
        }
    }
    cands.sort_by_key(|c| c.0);
    // The window of CLUSTER_WIDTH_NS holding the most candidates (the first such).
    let (mut best, mut best_n, mut lo) = ((0, 0), 0, 0);
    for hi in 0..cands.len() {
        while cands[hi].0 - cands[lo].0 > CLUSTER_WIDTH_NS {
            lo += 1;
        }
        if hi + 1 - lo > best_n {
            best_n = hi + 1 - lo;
            best = (lo, hi + 1);
        }
    }
    cands[best.0..best.1].iter().map(|c| c.1).collect()
}

/// The map of one host onto the reference from its frame pairs; `None` when there are none.
struct Fit {
    map: ClockMap,
    bound: u64,
    sent: usize,
    received: usize,
    unknown: usize,
    note: Option<String>,
}

/// Judges, for frame pairs and a clock map, whether this host (`true`) or the reference sent each.
type Senders<'a> = dyn Fn(&[Pair], &ClockMap) -> Vec<Option<bool>> + 'a;

fn fit_pairs(
    pairs: &[Pair],
    coarse: &ClockMap,
    senders: &Senders<'_>,
    span_of_interest: (u64, u64),
    realtime_rate_measured: bool,
) -> Option<Fit> {
    if pairs.is_empty() {
        return None;
    }
    let anchor = (pairs.iter().map(|p| u128::from(p.h)).sum::<u128>() / pairs.len() as u128) as u64;
    let xs: Vec<f64> = pairs.iter().map(|p| p.h as f64 - anchor as f64).collect();
    let ys: Vec<f64> = pairs.iter().map(|p| p.r as f64 - p.h as f64).collect();
    let span = pairs.iter().map(|p| p.h).max().unwrap_or(0) - pairs.iter().map(|p| p.h).min().unwrap_or(0);
    // Over a few seconds the frames' delay jitter (tens of µs) swamps a drift of tens of ppm: the realtime line's
    // drift is better there. The pairs' own drift is taken when they span DRIFT_SPAN_NS or more.
    let fits_drift = pairs.len() >= 3 && span >= DRIFT_SPAN_NS;
    let (drift, icpt, se) = if fits_drift {
        least_squares(&xs, &ys)
    } else {
        let d = coarse.drift;
        let resid: Vec<i64> = xs.iter().zip(&ys).map(|(x, y)| (y - d * x) as i64).collect();
        (d, median_i64(resid) as f64, 0.0)
    };
    let first = ClockMap {
        anchor,
        offset: icpt.round() as i64,
        drift,
    };
    // Who sent each frame, judged on the first line; then, with frames both ways, the line again with the one-way
    // delay as a term of its own (+ for frames sent here, − for frames sent by the reference), so that a drift is not
    // read into the delays when one direction's frames come earlier than the other's.
    let from = senders(pairs, &first);
    let dirs: Vec<f64> = from
        .iter()
        .map(|f| match f {
            Some(true) => 1.0,
            Some(false) => -1.0,
            None => 0.0,
        })
        .collect();
    let both = from.contains(&Some(true)) && from.contains(&Some(false));
    let (drift, icpt, se) = match (fits_drift && both && pairs.len() >= 4)
        .then(|| least_squares_with_delay(&xs, &dirs, &ys))
        .flatten()
    {
        Some((b, a, _, se_b)) => (b, a, se_b),
        None => (drift, icpt, se),
    };
    let line = ClockMap {
        anchor,
        offset: icpt.round() as i64,
        drift,
    };
    // The envelope: frames sent by this host bound the line's error from above, frames sent by the reference
    // from below.
    let (mut hi, mut lo) = (i64::MAX, i64::MIN);
    let (mut sent, mut received, mut unknown) = (0, 0, 0);
    let mut resid_unknown = Vec::new();
    for (p, from_here) in pairs.iter().zip(from) {
        let e = p.r as i64 - line.apply(p.h) as i64;
        match from_here {
            Some(true) => {
                sent += 1;
                hi = hi.min(e);
            }
            Some(false) => {
                received += 1;
                lo = lo.max(e);
            }
            None => {
                unknown += 1;
                resid_unknown.push(e);
            }
        }
    }
    let (corr, half, note) = envelope(sent, received, (lo, hi), &resid_unknown);
    let map = ClockMap {
        anchor,
        offset: line.offset + corr,
        drift,
    };
    // The drift's error, over the distance from the pairs to the migrations.
    let far = [span_of_interest.0, span_of_interest.1]
        .iter()
        .map(|t| (*t as f64 - anchor as f64).abs())
        .fold(0.0, f64::max);
    // Two standard errors of the drift (at least DRIFT_FLOOR_PPM; UNKNOWN_DRIFT_PPM when neither the pairs nor the
    // realtime samples measured it), over the distance from the pairs to the migrations.
    let floor = if fits_drift || realtime_rate_measured {
        DRIFT_FLOOR_PPM
    } else {
        UNKNOWN_DRIFT_PPM
    };
    let drift_err = (2.0 * se).max(floor * 1e-6);
    let bound = half.unsigned_abs() + (drift_err * far).ceil() as u64;
    Some(Fit {
        map,
        bound,
        sent,
        received,
        unknown,
        note,
    })
}

/// The correction to the fitted line and the half-width of its envelope, from the residuals of the frames each host
/// sent (`lo`: the highest of the reference's, `hi`: the lowest of this host's) or of frames whose sender is not
/// known, and a note when the envelope rests on an assumed one-way delay.
fn envelope(
    sent: usize,
    received: usize,
    (lo, hi): (i64, i64),
    resid_unknown: &[i64],
) -> (i64, i64, Option<String>) {
    let delay = ASSUMED_DELAY_NS as i64;
    match (sent > 0, received > 0) {
        (true, true) if lo <= hi => (i64::midpoint(lo, hi), (hi - lo) / 2, None),
        (true, true) => (
            i64::midpoint(lo, hi),
            (lo - hi) / 2,
            Some(format!(
                "the frames of the two directions disagree by {} (a frame's sender misjudged, or jitter): the bound \
                 covers both",
                fmt_ns((lo - hi) as u64)
            )),
        ),
        (true, false) => (
            hi - delay / 2,
            delay / 2,
            Some(format!(
                "frames went from this host only: the one-way delay is taken as at most {}",
                fmt_ns(ASSUMED_DELAY_NS)
            )),
        ),
        (false, true) => (
            lo + delay / 2,
            delay / 2,
            Some(format!(
                "frames went to this host only: the one-way delay is taken as at most {}",
                fmt_ns(ASSUMED_DELAY_NS)
            )),
        ),
        (false, false) => {
            let m = median_i64(resid_unknown.to_vec());
            let spread = resid_unknown.iter().map(|e| (e - m).abs()).max().unwrap_or(0);
            (
                m,
                spread + delay,
                Some(format!(
                    "which host sent the shared frames is not known (no migration events for their MACs): the \
                     one-way delay is taken as at most {}",
                    fmt_ns(ASSUMED_DELAY_NS)
                )),
            )
        }
    }
}

/// Host identity: host name and boot id.
fn identity(t: &Trace) -> (String, String) {
    t.header
        .as_ref()
        .map(|h| (h.hostname.clone(), h.boot_id.clone()))
        .unwrap_or_default()
}

/// The span of a trace's migration events (its own clock), or of all its events.
fn span_of_interest(t: &Trace) -> (u64, u64) {
    let mig: Vec<u64> = t
        .events
        .iter()
        .filter(|e| matches!(e, Event::Migration { .. }))
        .map(Event::ts_ns)
        .collect();
    let pick = if mig.is_empty() {
        t.events.iter().map(Event::ts_ns).collect()
    } else {
        mig
    };
    (
        pick.iter().copied().min().unwrap_or(0),
        pick.iter().copied().max().unwrap_or(0),
    )
}

/// Maps every absolute time of an event.
fn remap(e: &Event, m: &ClockMap) -> Event {
    let mut e = e.clone();
    match &mut e {
        Event::Migration { ev, .. } => ev.ts_ns = m.apply(ev.ts_ns),
        Event::MacStats {
            ts_ns,
            first_ns,
            last_ns,
            ..
        } => {
            *ts_ns = m.apply(*ts_ns);
            *first_ns = m.apply(*first_ns);
            *last_ns = m.apply(*last_ns);
        }
        Event::PortAttached {
            ts_ns, notified_ns, ..
        }
        | Event::PortDetached {
            ts_ns, notified_ns, ..
        } => {
            *ts_ns = m.apply(*ts_ns);
            *notified_ns = notified_ns.map(|n| m.apply(n));
        }
        other => set_ts(other, m),
    }
    e
}

fn set_ts(e: &mut Event, m: &ClockMap) {
    let t = e.ts_ns_mut();
    *t = m.apply(*t);
}

/// The port of an event, for telling apart same-named ports of different hosts.
fn port_mut(e: &mut Event) -> Option<&mut Port> {
    match e {
        Event::Arp { frame, .. } | Event::Garp { frame, .. } | Event::Rarp { frame, .. } => {
            Some(&mut frame.port)
        }
        Event::NeighborAdvert { frame, .. } => Some(&mut frame.port),
        Event::MacSeen { port, .. }
        | Event::MacStats { port, .. }
        | Event::Malformed { port, .. }
        | Event::PortAttached { port, .. }
        | Event::PortDetached { port, .. }
        | Event::PortFailed { port, .. } => Some(port),
        Event::FlowOpen { seg, .. }
        | Event::FlowRetransmit { seg, .. }
        | Event::FlowReset { seg, .. }
        | Event::FlowFin { seg, .. }
        | Event::FlowZeroWindow { seg, .. }
        | Event::FlowProgress { seg, .. } => Some(&mut seg.port),
        _ => None,
    }
}

/// Port and bridge names (with their namespace) each host group uses.
fn port_names(t: &Trace, drop: &HashSet<usize>) -> HashSet<(String, Option<String>)> {
    let mut out = HashSet::new();
    for (k, e) in t.events.iter().enumerate() {
        if drop.contains(&k) {
            continue;
        }
        let mut e = e.clone();
        if let Some(p) = port_mut(&mut e) {
            out.insert((
                p.iface.clone().unwrap_or_else(|| format!("if#{}", p.ifindex)),
                p.netns.clone(),
            ));
        }
        if let Event::FdbUpdate { bridge, netns, .. } = &e {
            out.insert((bridge.clone(), netns.clone()));
        }
    }
    out
}

fn qualify(netns: &mut Option<String>, host: &str) {
    *netns = Some(match netns.take() {
        Some(ns) => format!("{host}/{ns}"),
        None => host.to_owned(),
    });
}

/// Which traces share a clock: index of the first trace of the same host name and boot id, or with the very same
/// header (one recording given twice; older traces have no boot id). Warns about them, about two host names on one
/// kernel, and about one host name without boot ids.
fn clock_groups(inputs: &[Input], ids: &[(String, String)], warnings: &mut Vec<String>) -> Vec<usize> {
    let same = |i: usize, j: usize| {
        i == j
            || (ids[j] == ids[i] && !ids[i].1.is_empty())
            || (inputs[i].trace.header.is_some() && inputs[i].trace.header == inputs[j].trace.header)
    };
    let group_of: Vec<usize> = (0..inputs.len())
        .map(|i| (0..=i).find(|&j| same(i, j)).unwrap_or(i))
        .collect();
    for i in 0..inputs.len() {
        if let Some(j) = (0..i).find(|&j| group_of[j] == j && group_of[i] == i && ids[j].0 == ids[i].0) {
            warnings.push(format!(
                "{} and {} both come from host {} and have no boot id to tell whether it rebooted between them: \
                 taken as two clocks",
                inputs[j].name, inputs[i].name, ids[i].0
            ));
        }
        if group_of[i] != i {
            // One warning per group (a `--record-dir` directory holds many traces of one host).
            if (0..i).any(|j| j != group_of[i] && group_of[j] == group_of[i]) {
                continue;
            }
            let members = group_of.iter().filter(|&&g| g == group_of[i]).count();
            warnings.push(format!(
                "{} and {} come from the same host ({}, {}): one clock, merged without shifting; events present in \
                 both are kept once",
                inputs[group_of[i]].name,
                if members > 2 {
                    format!("{} other traces", members - 1)
                } else {
                    inputs[i].name.clone()
                },
                ids[i].0,
                if ids[i].1.is_empty() {
                    "the same recording".to_owned()
                } else {
                    format!("boot {}", ids[i].1)
                }
            ));
        } else if let Some(j) =
            (0..i).find(|&j| group_of[j] == j && ids[j].1 == ids[i].1 && !ids[i].1.is_empty())
        {
            warnings.push(format!(
                "{} ({}) and {} ({}) were recorded on one kernel (boot {}) under two host names: their clocks are \
                 one, but they are aligned as two hosts; kernel events both recorded are kept once",
                inputs[j].name, ids[j].0, inputs[i].name, ids[i].0, ids[i].1
            ));
        }
    }
    group_of
}

/// A trace's realtime line, its steps and how many samples it had.
struct Realtime {
    line: Option<RealtimeLine>,
    steps: Vec<(u64, i64)>,
    samples: usize,
}

/// Step 1: each trace's realtime line (steps and missing clocks reported), and the maps they give onto the
/// reference.
fn realtime_maps(inputs: &[Input], warnings: &mut Vec<String>) -> (Vec<Realtime>, Vec<ClockMap>) {
    let lines: Vec<Realtime> = inputs
        .iter()
        .map(|inp| {
            let s = samples(&inp.trace);
            let (line, steps) = realtime_line(&s);
            Realtime {
                line,
                steps,
                samples: s.len(),
            }
        })
        .collect();
    for (inp, rt) in inputs.iter().zip(&lines) {
        for (at, size) in &rt.steps {
            let since = inp.trace.header.as_ref().map_or(0, |h| h.start_mono_ns);
            warnings.push(format!(
                "{}: CLOCK_REALTIME stepped by {}{} against CLOCK_MONOTONIC at +{:.1} s (an NTP step or a manual \
                 set): the realtime alignment uses the longest stretch without a step",
                inp.name,
                if *size < 0 { "-" } else { "+" },
                fmt_ns(size.unsigned_abs()),
                at.saturating_sub(since) as f64 / 1e9
            ));
        }
        if rt.line.is_none() {
            warnings.push(format!(
                "{}: no clock reading (no header times, no clock_sample): it is merged unshifted",
                inp.name
            ));
        }
    }
    let maps = lines
        .iter()
        .map(|rt| {
            let (Some(li), Some(l0)) = (rt.line, lines[0].line) else {
                return ClockMap::default();
            };
            // t_ref = t + q_i(t) − q_0(t_ref), with t_ref ≈ t for the slowly varying q_0.
            ClockMap {
                anchor: li.m0,
                offset: li.q(li.m0) - l0.q(li.m0),
                drift: li.rate - l0.rate,
            }
        })
        .collect();
    (lines, maps)
}

/// Warns about each trace that overlaps no other in time (by realtime).
fn overlap_warnings(inputs: &[Input], coarse: &[ClockMap], warnings: &mut Vec<String>) {
    let ranges: Vec<(u64, u64)> = inputs
        .iter()
        .zip(coarse)
        .map(|(inp, m)| {
            let ts = inp.trace.events.iter().map(Event::ts_ns);
            (
                m.apply(ts.clone().min().unwrap_or(0)),
                m.apply(ts.max().unwrap_or(0)),
            )
        })
        .collect();
    for i in 1..inputs.len() {
        let overlaps = (0..inputs.len())
            .filter(|&j| j != i)
            .any(|j| ranges[i].0 <= ranges[j].1 && ranges[j].0 <= ranges[i].1);
        if !overlaps && !inputs[i].trace.events.is_empty() {
            warnings.push(format!(
                "{} does not overlap in time with any other trace (by realtime): nothing to correlate across \
                 hosts; its events are merged by realtime",
                inputs[i].name
            ));
        }
    }
}

/// Step 2: each host's map refined by the frames it and the reference both saw.
fn refine(
    inputs: &[Input],
    group_of: &[usize],
    coarse: &[ClockMap],
    realtime: &[Realtime],
) -> (Vec<ClockMap>, Vec<Option<Fit>>) {
    let measured = |i: usize| realtime[i].line.is_some_and(|l| l.measured);
    let mut maps = coarse.to_vec();
    maps[0] = ClockMap::default();
    let mut fits: Vec<Option<Fit>> = (0..inputs.len()).map(|_| None).collect();
    for i in 1..inputs.len() {
        if group_of[i] != i {
            continue;
        }
        let pairs = matched_pairs(&inputs[0].trace, &inputs[i].trace, &coarse[i]);
        let senders = |pairs: &[Pair], line: &ClockMap| {
            let mut m = maps.clone();
            m[i] = *line;
            let locs = vm_locations(inputs, &m);
            pairs
                .iter()
                .map(|p| sender(&locs, p.src, p.r).map(|s| group_of[s] == i))
                .collect()
        };
        fits[i] = fit_pairs(
            &pairs,
            &coarse[i],
            &senders,
            span_of_interest(&inputs[i].trace),
            measured(0) && measured(i),
        );
        if let Some(f) = &fits[i] {
            maps[i] = f.map;
        }
    }
    // Traces of one host follow their group's map.
    for i in 0..inputs.len() {
        maps[i] = maps[group_of[i]];
    }
    (maps, fits)
}

type PortName = (String, Option<String>);

/// The port and bridge names of each trace that another host's trace uses too.
fn port_clashes(
    inputs: &[Input],
    drop: &[HashSet<usize>],
    ids: &[(String, String)],
    group_of: &[usize],
    warnings: &mut Vec<String>,
) -> Vec<HashSet<PortName>> {
    let names: Vec<HashSet<PortName>> = inputs
        .iter()
        .zip(drop)
        .map(|(i, d)| port_names(&i.trace, d))
        .collect();
    let mut clash: Vec<HashSet<PortName>> = vec![HashSet::new(); inputs.len()];
    for i in 0..inputs.len() {
        for j in 0..inputs.len() {
            if group_of[i] != group_of[j] {
                clash[i].extend(names[i].intersection(&names[j]).cloned());
            }
        }
        if !clash[i].is_empty() {
            let mut list: Vec<String> = clash[i]
                .iter()
                .map(|(n, ns)| ns.as_ref().map_or(n.clone(), |ns| format!("{n}@{ns}")))
                .collect();
            list.sort();
            warnings.push(format!(
                "{}: ports named as on another host ({}): named after the host ({}) in the merge",
                inputs[i].name,
                list.join(", "),
                ids[i].0
            ));
        }
    }
    clash
}

/// One event of trace `i` as it goes into the merge: on the reference clock, with clashing port names qualified.
fn merged_event(e: &Event, map: &ClockMap, clash: &HashSet<PortName>, host: &str) -> Event {
    let mut m = remap(e, map);
    if clash.is_empty() {
        return m;
    }
    if let Some(p) = port_mut(&mut m) {
        let key = (
            p.iface.clone().unwrap_or_else(|| format!("if#{}", p.ifindex)),
            p.netns.clone(),
        );
        if clash.contains(&key) {
            qualify(&mut p.netns, host);
        }
    }
    if let Event::FdbUpdate { bridge, netns, .. } = &mut m
        && clash.contains(&(bridge.clone(), netns.clone()))
    {
        qualify(netns, host);
    }
    m
}

/// How far apart two monitors of one kernel stamp the same kernel event (each program on a tracepoint reads the
/// clock itself).
pub const SAME_EVENT_NS: u64 = 1_000_000;

/// Events of traces of one kernel (one boot id, or one recording given twice) that another of them holds too: a
/// trace given twice, or two monitors of one kernel (the testbed's hosts) that both record the kernel-wide
/// tracepoints (sockets, bridge FDB). An event with the same fields as one of another trace of that kernel, within
/// [`SAME_EVENT_NS`], is the same kernel event: kept once (the first trace's), one to one. Returns the indices to
/// leave out per trace, and how many.
/// Where an event's fields were seen: (trace, time, matched already).
type Sightings = Vec<(usize, u64, bool)>;

fn kernel_duplicates(
    inputs: &[Input],
    ids: &[(String, String)],
    group_of: &[usize],
) -> (Vec<HashSet<usize>>, usize) {
    let kernel_of: Vec<String> = (0..inputs.len())
        .map(|i| {
            if ids[i].1.is_empty() {
                format!("#{}", group_of[i])
            } else {
                ids[i].1.clone()
            }
        })
        .collect();
    let mut drop: Vec<HashSet<usize>> = vec![HashSet::new(); inputs.len()];
    let mut count = 0;
    // (kernel, fields without the time) → (trace, time, matched already)
    let mut seen: HashMap<(&str, String), Sightings> = HashMap::new();
    for (i, inp) in inputs.iter().enumerate() {
        if kernel_of.iter().filter(|k| **k == kernel_of[i]).count() < 2 {
            continue;
        }
        for (k, e) in inp.trace.events.iter().enumerate() {
            let mut v = serde_json::to_value(e).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.remove("ts_ns");
            }
            let ts = e.ts_ns();
            let entries = seen.entry((kernel_of[i].as_str(), v.to_string())).or_default();
            if let Some(m) = entries
                .iter_mut()
                .find(|(j, t, used)| *j != i && !*used && t.abs_diff(ts) <= SAME_EVENT_NS)
            {
                m.2 = true;
                drop[i].insert(k);
                count += 1;
            } else {
                entries.push((i, ts, false));
            }
        }
    }
    (drop, count)
}

/// How one trace was mapped, for [`MergeInfo`].
fn host_clock(
    i: usize,
    inp: &Input,
    id: &(String, String),
    map: &ClockMap,
    fit: Option<&Fit>,
    rt: &Realtime,
    realtime_offset_ns: i64,
) -> HostClock {
    let (method, bound, sent, received, unknown) = match fit {
        _ if i == 0 => ("reference", 0, 0, 0, 0),
        Some(f) => ("shared frames", f.bound, f.sent, f.received, f.unknown),
        None => ("realtime", REALTIME_BOUND_NS, 0, 0, 0),
    };
    HostClock {
        trace: inp.name.clone(),
        host: id.0.clone(),
        boot_id: id.1.clone(),
        events: inp.trace.events.len(),
        reference: i == 0,
        anchor_ns: map.anchor,
        offset_ns: map.offset,
        drift_ppm: map.drift * 1e6,
        bound_ns: bound,
        method: method.to_owned(),
        pairs_sent: sent,
        pairs_received: received,
        pairs_unknown: unknown,
        realtime_offset_ns,
        clock_samples: rt.samples,
        realtime_steps: rt.steps.len(),
    }
}

/// Merges traces onto the clock of the first. See the module documentation for the method.
pub fn merge(inputs: &[Input]) -> Result<Merged, MergeError> {
    if inputs.is_empty() {
        return Err(MergeError::Empty);
    }
    let mut warnings = Vec::new();
    let ids: Vec<(String, String)> = inputs.iter().map(|i| identity(&i.trace)).collect();
    let group_of = clock_groups(inputs, &ids, &mut warnings);
    let (realtime, coarse) = realtime_maps(inputs, &mut warnings);
    overlap_warnings(inputs, &coarse, &mut warnings);
    let (maps, fits) = refine(inputs, &group_of, &coarse, &realtime);

    // The merged trace is whole when its inputs are: each input's damage is listed in the merge, by file.
    let mut merged = Trace {
        header: inputs[0].trace.header.clone(),
        end: inputs[0].trace.end.clone(),
        in_progress: inputs[0].trace.in_progress,
        lines_read: inputs[0].trace.lines_read,
        hash_read: inputs[0].trace.hash_read,
        ..Trace::default()
    };
    let damage: Vec<String> = inputs
        .iter()
        .flat_map(|inp| {
            inp.trace
                .damage()
                .into_iter()
                .map(move |d| format!("{}: {d}", inp.name))
        })
        .collect();
    let in_progress: Vec<String> = inputs
        .iter()
        .filter(|inp| inp.trace.in_progress)
        .map(|inp| format!("{}: {}", inp.name, crate::trace::IN_PROGRESS))
        .collect();
    let (drop, duplicates) = kernel_duplicates(inputs, &ids, &group_of);
    let clash = port_clashes(inputs, &drop, &ids, &group_of, &mut warnings);
    for (i, inp) in inputs.iter().enumerate() {
        merged.truncated |= inp.trace.truncated;
        for (line, err) in &inp.trace.skipped {
            merged.skipped.push((*line, format!("{}: {err}", inp.name)));
        }
        for (k, e) in inp.trace.events.iter().enumerate() {
            if drop[i].contains(&k) {
                continue;
            }
            merged
                .events
                .push(merged_event(e, &maps[i], &clash[i], &ids[i].0));
        }
    }
    merged.events.sort_by_key(Event::ts_ns);
    if duplicates > 0 {
        warnings.push(format!(
            "{duplicates} events were in two traces of one kernel (the same time, the same fields) and are kept once"
        ));
    }

    let mut hosts: Vec<HostClock> = Vec::new();
    for (i, inp) in inputs.iter().enumerate() {
        let g = group_of[i];
        let mut h = host_clock(
            g,
            inp,
            &ids[i],
            &maps[i],
            fits[g].as_ref(),
            &realtime[i],
            coarse[i].offset,
        );
        if g != i {
            "same clock".clone_into(&mut h.method);
            h.bound_ns = hosts[g].bound_ns;
        } else if let Some(n) = fits[i].as_ref().and_then(|f| f.note.as_ref()) {
            warnings.push(format!("{}: {n}", inp.name));
        } else if h.method == "realtime" {
            warnings.push(format!(
                "{} and {} saw no frame in common (no broadcast frame at both hosts' ports): aligned by realtime \
                 alone, ± {} (NTP grade)",
                inputs[0].name,
                inp.name,
                fmt_ns(REALTIME_BOUND_NS)
            ));
        }
        hosts.push(h);
    }
    let mut bounds: BTreeMap<usize, u64> = BTreeMap::new();
    for (i, h) in hosts.iter().enumerate() {
        let b = bounds.entry(group_of[i]).or_default();
        *b = (*b).max(h.bound_ns);
    }
    let mut b: Vec<u64> = bounds.into_values().collect();
    b.sort_unstable_by(|x, y| y.cmp(x));
    let bound_ns = b.iter().take(2).sum();
    Ok(Merged {
        trace: merged,
        info: MergeInfo {
            hosts,
            bound_ns,
            duplicates,
            damage,
            in_progress,
            warnings,
        },
    })
}

/// The merge as text: one line per trace, then the warnings.
pub fn render_text(info: &MergeInfo) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    if info.hosts.iter().all(|h| h.reference || h.method == "same clock") {
        let _ = writeln!(s, "merged from {} traces, all on one clock", info.hosts.len());
    } else {
        let _ = writeln!(
            s,
            "merged from {} traces; figures that span hosts carry ± {}",
            info.hosts.len(),
            fmt_ns(info.bound_ns)
        );
    }
    for h in &info.hosts {
        let how = match h.method.as_str() {
            "reference" => "the reference clock".to_owned(),
            "same clock" => "same clock as another trace of this host".to_owned(),
            "shared frames" => format!(
                "offset {:+.6} s, drift {:+.2} ppm, ± {}, from {} shared frames ({} sent here, {} received, {} of \
                 unknown sender); realtime alone said {:+.6} s",
                h.offset_ns as f64 / 1e9,
                h.drift_ppm,
                fmt_ns(h.bound_ns),
                h.pairs_sent + h.pairs_received + h.pairs_unknown,
                h.pairs_sent,
                h.pairs_received,
                h.pairs_unknown,
                h.realtime_offset_ns as f64 / 1e9
            ),
            _ => format!(
                "offset {:+.6} s by realtime alone, ± {} (nothing shared)",
                h.offset_ns as f64 / 1e9,
                fmt_ns(h.bound_ns)
            ),
        };
        let _ = writeln!(
            s,
            "  {}  host {}{}  {} events, {} clock samples: {how}",
            h.trace,
            h.host,
            if h.boot_id.is_empty() {
                String::new()
            } else {
                format!(" (boot {})", &h.boot_id[..h.boot_id.len().min(8)])
            },
            h.events,
            h.clock_samples
        );
    }
    for w in &info.warnings {
        let _ = writeln!(s, "MERGE WARNING: {w}");
    }
    s
}

/// The trace as a host whose monotonic clock runs `offset_ns` ahead and `drift_ppm` faster (from `anchor_ns`) would
/// have recorded it, with its realtime clock `realtime_error_ns` off, on kernel `boot_id`. Two hosts of the testbed
/// share one kernel, hence one clock: the tests and the demo make the second clock with this.
pub fn shift_clock(
    trace: &Trace,
    anchor_ns: u64,
    offset_ns: i64,
    drift_ppm: f64,
    realtime_error_ns: i64,
    boot_id: &str,
) -> Trace {
    let m = ClockMap {
        anchor: anchor_ns,
        offset: offset_ns,
        drift: drift_ppm * 1e-6,
    };
    let mut out = trace.clone();
    let real = |r: u64| u64::try_from(i128::from(r) + i128::from(realtime_error_ns)).unwrap_or(0);
    if let Some(h) = &mut out.header {
        h.start_mono_ns = m.apply(h.start_mono_ns);
        h.start_unix_ns = real(h.start_unix_ns);
        boot_id.clone_into(&mut h.boot_id);
        if let Some(c) = &mut h.clocks {
            c.mono_ns = m.apply(c.mono_ns);
            c.boottime_ns = m.apply(c.boottime_ns);
            c.realtime_ns = real(c.realtime_ns);
        }
    }
    for e in &mut out.events {
        *e = remap(e, &m);
        if let Event::ClockSample {
            realtime_ns,
            boottime_ns,
            ..
        } = e
        {
            *realtime_ns = real(*realtime_ns);
            *boottime_ns = m.apply(*boottime_ns);
        }
    }
    out
}

#[cfg(test)]
mod tests;
