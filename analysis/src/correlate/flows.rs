//! Verdicts from the wire: a connection's fate across a pause window, judged from the segments the flow tracker saw
//! on the VM's ports (`flow_*` events). On a hypervisor host no TCP endpoint is a local socket, so this is the only
//! basis there; where the clients run on the monitoring host (CI), it is checked against the sockets' verdicts.
//!
//! The rules, in `docs/report.md` ("Verdicts from the wire"):
//! - the same segment seen on several ports (tap, bridge port, uplink) counts once;
//! - each side's retransmissions in the window are classified per ACK point of the receiver (`classify_episode`):
//!   the timer (`rto`) resends the oldest unacknowledged data, whatever new data went out just before; a tail
//!   loss probe (`tlp`) resends the newest data before any timer retransmission, or, when one range alone is
//!   outstanding, is told from the timer's first by the interval to the next; a fast retransmit (`fast`) needs
//!   the evidence of duplicate ACKs: a hole behind later data resent before any timer retransmission; a SYN sent
//!   again is `syn`;
//! - the backoff schedule (`R`, `2R`, `4R`, … capped at 120 s, each firing a little late) is fitted to the timer
//!   retransmissions' precise times: the sender's RTO before backoff, its backoff, and when its next retransmission
//!   was due;
//! - the fate: `aborted` (`rst_sent` / `rst_received`, as the client's socket would say) when a RST came during the
//!   window; `aborted` (`etimedout`, inferred) when the client's timer series stopped, its next retransmission was
//!   due before the resume, and it reset the connection when the VM spoke again;
//!   `survived` on forward progress after the resume (a `flow_progress`, or the client's last retransmission followed
//!   by no other and no reset by the time the next was due), or when nothing crossed the wire at all (nothing was in
//!   flight); `unresolved` when retransmissions were pending and nothing came after the resume.

use std::net::IpAddr;

use serde::Serialize;

use super::{AbortReason, Basis, ConnectionVerdict, Fate, Network, fmt_dur};
use crate::trace::{Event, FlowSegment, FlowSide, FourTuple, RetransmitKind, TcpState};

/// The same segment seen on several ports within this long is one segment.
pub(super) const SAME_SEGMENT_NS: u64 = 2_000_000;
/// A lone retransmission that waited at least this long is taken for a timer retransmission.
const RTO_MIN_SILENCE_NS: u64 = 150_000_000;
/// Linux's longest RTO (`TCP_RTO_MAX`).
const RTO_MAX_NS: u64 = 120_000_000_000;
/// Interval ratios between consecutive timer retransmissions (the backoff doubles; timers fire a little late).
const BACKOFF_MIN: f64 = 1.6;
const BACKOFF_MAX: f64 = 2.7;
/// The ratio of the interval after a tail loss probe to the probe's own wait when the probe fired at the RTO.
const PROBE_MIN: f64 = 0.75;
const PROBE_MAX: f64 = 1.35;
/// At most this many flow segments of one connection go into its proof.
const MAX_PROOF: usize = 32;
/// A connection is over this long after its last segment the tracker reported: the tracker reports nothing of an
/// idle connection, and its LRU table evicts what stays idle while others come. A later segment of its 4-tuple starts
/// a new connection.
pub(super) const FLOW_IDLE_NS: u64 = 600_000_000_000;
/// Segments of a connection that ended (a RST, or a FIN from each side) still belong to it this long after (a FIN
/// or RST sent again, the other side's last word); later ones start a new connection.
pub(super) const FLOW_LINGER_NS: u64 = 10_000_000_000;

/// One retransmission seen on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WireRetransmit {
    pub ts_ns: u64,
    /// How it was sent, inferred from its timing and what it resent (absent: not enough evidence).
    pub kind: Option<RetransmitKind>,
    /// Time since the sender's previous segment.
    pub silence_ns: u64,
}

/// One side's retransmissions in a window, and what the wire infers from them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SideRetransmits {
    pub retransmits: Vec<WireRetransmit>,
    /// The sender's RTO before backoff, inferred from its timer retransmissions.
    pub rto_us: Option<u64>,
    /// Its highest backoff (timer retransmissions after the first).
    pub backoff: u32,
    /// When its next timer retransmission was due after its last one.
    pub next_due_ns: Option<u64>,
}

impl SideRetransmits {
    fn timer_count(&self) -> usize {
        self.retransmits
            .iter()
            .filter(|r| r.kind == Some(RetransmitKind::Rto))
            .count()
    }

    fn last_ns(&self) -> Option<u64> {
        self.retransmits.last().map(|r| r.ts_ns)
    }
}

/// A RST seen on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WireReset {
    pub ts_ns: u64,
    /// Who sent it.
    pub by: FlowSide,
    /// It came before the resume.
    pub during_window: bool,
}

/// What the wire saw of one connection across one pause window.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WireView {
    /// The client's (the VM's peer's) retransmissions.
    pub peer: SideRetransmits,
    /// The VM's retransmissions.
    pub vm: SideRetransmits,
    /// The first forward progress after the resume, and who made it.
    pub first_progress_ns: Option<u64>,
    pub progress_by: Option<FlowSide>,
    pub reset: Option<WireReset>,
    /// Nothing crossed the wire for this connection in the window: no retransmission, reset or progress.
    pub silent: bool,
    /// The wire's fate.
    #[serde(flatten)]
    pub fate: Fate,
    pub basis: String,
}

/// One tracked flow: its segments (each once, however many ports saw it), time-sorted.
#[derive(Debug)]
pub(super) struct Flow<'a> {
    /// Peer → VM, as a client socket would name it.
    pub tuple: FourTuple,
    pub events: Vec<&'a Event>,
    /// Its first RST.
    pub reset_ns: Option<u64>,
    /// Each side's first FIN: the VM's, the peer's.
    pub fin_ns: [Option<u64>; 2],
}

impl Flow<'_> {
    /// When it ended on the wire: its first RST, or the later of the two sides' FINs.
    pub fn closed_ns(&self) -> Option<u64> {
        let fins = match self.fin_ns {
            [Some(a), Some(b)] => Some(a.max(b)),
            _ => None,
        };
        match (self.reset_ns, fins) {
            (Some(r), Some(f)) => Some(r.min(f)),
            (r, f) => r.or(f),
        }
    }

    /// When it was over at the latest: closed, or [`FLOW_IDLE_NS`] after its last segment.
    pub fn ended_ns(&self) -> u64 {
        let idle = self
            .events
            .last()
            .map_or(0, |e| e.ts_ns().saturating_add(FLOW_IDLE_NS));
        self.closed_ns().map_or(idle, |c| c.min(idle))
    }

    /// A segment at `ts` is no longer this connection's: it ended more than [`FLOW_LINGER_NS`] before (closed), or
    /// the connection had been idle for [`FLOW_IDLE_NS`].
    pub fn over_at(&self, ts: u64) -> bool {
        let idle = self
            .events
            .last()
            .is_some_and(|e| e.ts_ns().saturating_add(FLOW_IDLE_NS) < ts);
        idle || self
            .closed_ns()
            .is_some_and(|c| c.saturating_add(FLOW_LINGER_NS) < ts)
    }
}

/// The flows in a trace.
#[derive(Default)]
pub(super) struct FlowIndex<'a> {
    pub flows: Vec<Flow<'a>>,
}

/// Peer → VM.
fn tuple_of(seg: &FlowSegment) -> FourTuple {
    FourTuple {
        saddr: seg.peer_addr,
        sport: seg.peer_port,
        daddr: seg.vm_addr,
        dport: seg.vm_port,
    }
}

/// The segment opens a connection: a SYN without ACK.
pub(super) fn is_syn(seg: &FlowSegment) -> bool {
    seg.tcp_flags & 0x12 == 0x02
}

/// The same segment, seen on another port.
fn same_segment(a: &Event, b: &Event) -> bool {
    let (Some(x), Some(y)) = (a.flow_segment(), b.flow_segment()) else {
        return false;
    };
    a.kind() == b.kind()
        && x.side == y.side
        && x.seq == y.seq
        && x.ack == y.ack
        && x.len == y.len
        && x.tcp_flags == y.tcp_flags
        && a.ts_ns().abs_diff(b.ts_ns()) <= SAME_SEGMENT_NS
}

impl<'a> FlowIndex<'a> {
    /// Groups `flow_*` events by connection. A SYN after other segments of the 4-tuple starts a new connection, and
    /// so does any segment after the connection was over ([`Flow::over_at`]).
    pub fn build(sorted: &[&'a Event]) -> Self {
        let mut idx = FlowIndex::default();
        let mut open: std::collections::HashMap<FourTuple, usize> = std::collections::HashMap::new();
        for e in sorted {
            let Some(seg) = e.flow_segment() else { continue };
            let tuple = tuple_of(seg);
            let last = open.get(&tuple).copied();
            // The same segment seen on another port counts once, even when it closed the connection.
            if last.is_some_and(|i| {
                idx.flows[i]
                    .events
                    .iter()
                    .rev()
                    .take_while(|x| e.ts_ns().abs_diff(x.ts_ns()) <= SAME_SEGMENT_NS)
                    .any(|x| same_segment(x, e))
            }) {
                continue;
            }
            let current = last.filter(|&i| {
                let f: &Flow<'_> = &idx.flows[i];
                let new_syn = is_syn(seg)
                    && f.events
                        .iter()
                        .any(|x| x.flow_segment().is_some_and(|s| !is_syn(s)));
                !new_syn && !f.over_at(e.ts_ns())
            });
            let i = current.unwrap_or_else(|| {
                idx.flows.push(Flow {
                    tuple,
                    events: Vec::new(),
                    reset_ns: None,
                    fin_ns: [None, None],
                });
                open.insert(tuple, idx.flows.len() - 1);
                idx.flows.len() - 1
            });
            let flow = &mut idx.flows[i];
            match e {
                Event::FlowReset { .. } => {
                    flow.reset_ns.get_or_insert(e.ts_ns());
                }
                Event::FlowFin { .. } => {
                    let side = usize::from(seg.side == FlowSide::Peer);
                    flow.fin_ns[side].get_or_insert(e.ts_ns());
                }
                _ => {}
            }
            flow.events.push(e);
        }
        idx
    }
}

/// A flow's segments of one kind and side in `[from, to)`.
fn segments<'a>(
    flow: &Flow<'a>,
    from: u64,
    to: u64,
    pick: impl Fn(&Event) -> bool,
) -> impl Iterator<Item = (&'a Event, &'a FlowSegment)> {
    flow.events
        .iter()
        .copied()
        .filter(move |e| e.ts_ns() >= from && e.ts_ns() < to && pick(e))
        .filter_map(|e| e.flow_segment().map(|s| (e, s)))
}

/// One segment a sender was recorded sending: a retransmission, or a record of new data (`flow_open`,
/// `flow_progress`), which tells when a range was first sent.
#[derive(Clone, Copy, Debug)]
pub struct Sent<'a> {
    pub ts_ns: u64,
    pub seg: &'a FlowSegment,
    pub retransmit: bool,
}

/// How long a retransmitted range had waited since it was last sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wait {
    /// Since an earlier record of the same range (its first sending, or its previous retransmission): precise.
    Exact(u64),
    /// At least this long: the time since the sender last sent new data (`gap_ns`, else `silence_ns`, read from
    /// the tracker's coarse clock). Data sent after the range makes its own wait longer than this.
    AtLeast(u64),
}

impl Wait {
    fn ns(self) -> u64 {
        match self {
            Self::Exact(n) | Self::AtLeast(n) => n,
        }
    }
}

/// One retransmission being classified.
struct Resent<'a> {
    ts_ns: u64,
    seg: &'a FlowSegment,
    wait: Wait,
}

impl Resent<'_> {
    /// It resends the receiver's ACK point: the oldest unacknowledged data (also when the tracker has not seen the
    /// receiver's ACK yet).
    fn head(&self) -> bool {
        self.seg.peer_ack.is_none_or(|a| {
            a.wrapping_sub(self.seg.seq) < self.seg.len.max(1) && !seq_before(a, self.seg.seq)
        })
    }

    /// It ends at the sender's highest sequence end: it resends the newest data.
    fn tail(&self) -> bool {
        self.seg
            .seq_end
            .is_some_and(|e| self.seg.seq.wrapping_add(self.seg.len) == e)
    }

    fn syn(&self) -> bool {
        self.seg.tcp_flags & 0x02 != 0
    }
}

/// `a` comes before `b` in sequence space.
fn seq_before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// Classifies one side's retransmissions at or after `from` and infers its RTO, backoff and next due time.
/// `sent` is what the side was recorded sending, time-sorted: records before `from` (and its records of new data)
/// only tell when a retransmitted range was last sent.
pub fn side_retransmits(sent: &[Sent<'_>], from: u64) -> SideRetransmits {
    let rtx: Vec<Resent<'_>> = sent
        .iter()
        .enumerate()
        .filter(|(_, s)| s.retransmit && s.ts_ns >= from)
        .map(|(i, s)| Resent {
            ts_ns: s.ts_ns,
            seg: s.seg,
            wait: wait_of(&sent[..i], s),
        })
        .collect();
    let mut kinds = vec![None; rtx.len()];
    let mut timer: Vec<usize> = Vec::new();
    // An episode: the retransmissions sent while the receiver's ACK point stayed the same.
    let mut start = 0;
    while start < rtx.len() {
        let ack = rtx[start].seg.peer_ack;
        let len = rtx[start..].iter().take_while(|r| r.seg.peer_ack == ack).count();
        let ep = &rtx[start..start + len];
        classify_episode(ep, &mut kinds[start..start + len]);
        let heads: Vec<usize> = (start..start + len)
            .filter(|&i| kinds[i] == Some(RetransmitKind::Rto) && rtx[i].head())
            .collect();
        if heads.len() > timer.len() {
            timer = heads;
        }
        start += len;
    }
    let mut out = SideRetransmits {
        retransmits: rtx
            .iter()
            .zip(&kinds)
            .map(|(r, &kind)| WireRetransmit {
                ts_ns: r.ts_ns,
                kind,
                silence_ns: r.seg.silence_ns,
            })
            .collect(),
        ..SideRetransmits::default()
    };
    let series: Vec<u64> = timer.iter().map(|&i| rtx[i].ts_ns).collect();
    if let Some(s) = timer.first().and_then(|&i| fit_schedule(&series, rtx[i].wait)) {
        out.rto_us = Some(s.rto_ns / 1000);
        out.backoff = (series.len() - 1) as u32;
        out.next_due_ns = Some(s.next_due(&series));
    }
    out
}

/// The wait of the retransmission `s`: since the sender's latest earlier record that started at the same sequence
/// number, else at least since it last sent new data.
fn wait_of(before: &[Sent<'_>], s: &Sent<'_>) -> Wait {
    let sends_data = |b: &&Sent<'_>| b.seg.len > 0 || b.seg.tcp_flags & 0x03 != 0;
    match before
        .iter()
        .rev()
        .find(|b| b.seg.seq == s.seg.seq && sends_data(b))
    {
        Some(b) => Wait::Exact(s.ts_ns - b.ts_ns),
        None => Wait::AtLeast(if s.seg.gap_ns > 0 {
            s.seg.gap_ns
        } else {
            s.seg.silence_ns
        }),
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    a as f64 / b.max(1) as f64
}

/// Labels the retransmissions of one episode (one ACK point of the receiver), in order.
///
/// - The timer resends the oldest unacknowledged data (the head), first one RTO after it was last sent, then after
///   intervals that double; once it has fired, what else the sender resends at that ACK point is loss recovery
///   after the timeout (Linux's `Loss` state), labelled `rto` as the kernel does.
/// - A tail loss probe resends the newest data while older data is unacknowledged, before any timer
///   retransmission.
/// - A fast retransmit, or SACK recovery, resends what the receiver's duplicate ACKs reported missing: the head,
///   then holes behind later data. A hole resent before any timer retransmission (neither the head nor the tail)
///   is that evidence, and the head retransmission it followed was the fast retransmit. Without it, a head
///   retransmission is never taken for a fast one, however soon it came after new data.
/// - A head retransmission that is also the tail (nothing else outstanding, or the timer resending the
///   outstanding data as one segment) is a probe or the timer's: [`single_range_kind`].
fn classify_episode(ep: &[Resent<'_>], kinds: &mut [Option<RetransmitKind>]) {
    let mut timer_fired = false;
    let mut probed = false;
    for (i, r) in ep.iter().enumerate() {
        let kind = if r.syn() {
            RetransmitKind::Syn
        } else if timer_fired {
            RetransmitKind::Rto
        } else if r.head() {
            let next_head = ep[i + 1..].iter().position(Resent::head).map(|j| i + 1 + j);
            let repairs = ep[i + 1..next_head.unwrap_or(ep.len())]
                .iter()
                .any(|x| !x.syn() && !x.head() && !x.tail());
            if repairs {
                RetransmitKind::Fast
            } else if probed || !r.tail() {
                RetransmitKind::Rto
            } else {
                let Some(k) = single_range_kind(r, next_head.map(|j| &ep[j])) else {
                    kinds[i] = None;
                    continue;
                };
                k
            }
        } else if r.tail() {
            probed = true;
            RetransmitKind::Tlp
        } else {
            RetransmitKind::Fast
        };
        timer_fired |= kind == RetransmitKind::Rto;
        kinds[i] = Some(kind);
    }
}

/// The first retransmission of an episode that resends all that is outstanding from the head: the timer's first
/// retransmission, or a tail loss probe (when one range alone is outstanding it is both head and tail).
///
/// Told apart by the interval to the next head retransmission against this one's wait: the timer's next comes two
/// RTOs later, one RTO after its first; a probe comes at most one RTO after the last sending (Linux caps the probe
/// timeout at the RTO, and with one segment outstanding it reaches the cap), and the timer one RTO after it.
/// A next interval far longer than twice the wait is a probe followed by a timer armed afresh when the wait is
/// exact, and the timer's when the wait is only a lower bound (new data was sent after the range's first part,
/// and the timer resent it all as one segment). A lone retransmission after a long wait is the timer's; after a
/// short one the evidence is too short.
fn single_range_kind(r: &Resent<'_>, next: Option<&Resent<'_>>) -> Option<RetransmitKind> {
    let long_wait = r.wait.ns() >= RTO_MIN_SILENCE_NS;
    let Some(next) = next else {
        return long_wait.then_some(RetransmitKind::Rto);
    };
    let q = ratio(next.ts_ns - r.ts_ns, r.wait.ns());
    if q > BACKOFF_MAX {
        return Some(match r.wait {
            Wait::Exact(_) => RetransmitKind::Tlp,
            Wait::AtLeast(_) => RetransmitKind::Rto,
        });
    }
    if q >= BACKOFF_MIN {
        return Some(RetransmitKind::Rto);
    }
    if q >= PROBE_MIN {
        // Between the bands, the nearer one (by ratio).
        let tlp = q <= PROBE_MAX || q / PROBE_MAX < BACKOFF_MIN / q;
        return Some(if tlp {
            RetransmitKind::Tlp
        } else {
            RetransmitKind::Rto
        });
    }
    long_wait.then_some(RetransmitKind::Rto)
}

/// A timer schedule fitted to timer retransmissions.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Schedule {
    /// The RTO before backoff.
    rto_ns: u64,
    /// How late each timer fired, on average (the timer wheel's granularity and slack, a probe timer that pushed
    /// the first one back).
    late_ns: u64,
}

impl Schedule {
    /// When the timer's next retransmission after `series` (its retransmission times) was due.
    fn next_due(self, series: &[u64]) -> u64 {
        let last = series[series.len() - 1];
        let backoff = u32::try_from(series.len()).unwrap_or(u32::MAX).min(40);
        let interval = self.rto_ns.saturating_mul(1u64 << backoff).min(RTO_MAX_NS);
        last.saturating_add(interval).saturating_add(self.late_ns)
    }
}

/// Fits Linux's backoff schedule to the times of a timer series: the first retransmission one RTO `R` after its
/// range was last sent, the k-th interval after it `min(2^k·R, 120 s)`, each firing a constant `late` behind
/// (least squares over the uncapped intervals and, when it is exact, the first wait; `late` kept within
/// `[0, R/2]`). The intervals come from the records' precise times, so the coarse clock of `gap_ns` and
/// `silence_ns` only enters through a lone retransmission's wait.
fn fit_schedule(series: &[u64], first_wait: Wait) -> Option<Schedule> {
    let mut points: Vec<(f64, f64)> = Vec::new();
    if let Wait::Exact(w) = first_wait {
        points.push((1.0, w as f64));
    }
    let rough = series.get(1).map(|&t| (t - series[0]) / 2);
    for (k, w) in series.windows(2).enumerate() {
        let a = f64::from(2u32.saturating_pow(u32::try_from(k + 1).unwrap_or(u32::MAX)));
        if rough.is_some_and(|r| a * r as f64 >= RTO_MAX_NS as f64) {
            break;
        }
        points.push((a, (w[1] - w[0]) as f64));
    }
    let (rto, late) = match points.as_slice() {
        [] => {
            let w = first_wait.ns();
            let known = matches!(first_wait, Wait::Exact(_)) || w >= RTO_MIN_SILENCE_NS;
            (known.then_some(w as f64)?, 0.0)
        }
        [(a, d)] => (d / a, 0.0),
        _ => least_squares(&points),
    };
    (rto >= 1_000.0).then_some(Schedule {
        rto_ns: rto as u64,
        late_ns: late as u64,
    })
}

/// `d = a·R + late` through `points` (a, d), `late` kept within `[0, R/2]`.
fn least_squares(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    let (sa, sd) = points
        .iter()
        .fold((0.0, 0.0), |(sa, sd), &(a, d)| (sa + a, sd + d));
    let (ma, md) = (sa / n, sd / n);
    let (sxy, sxx) = points.iter().fold((0.0, 0.0), |(sxy, sxx), &(a, d)| {
        (sxy + (a - ma) * (d - md), sxx + (a - ma) * (a - ma))
    });
    let rto = sxy / sxx;
    let late = md - rto * ma;
    if (0.0..=rto / 2.0).contains(&late) {
        return (rto, late);
    }
    // With `late` pinned to the nearer bound, `R` is the least-squares slope through the shifted points:
    // `late = 0`, or `late = R/2` (then `d = (a + 1/2)·R`).
    let (shift, half) = if late < 0.0 { (0.0, false) } else { (0.5, true) };
    let (num, den) = points.iter().fold((0.0, 0.0), |(num, den), &(a, d)| {
        (num + (a + shift) * d, den + (a + shift) * (a + shift))
    });
    let rto = num / den;
    (rto, if half { rto / 2.0 } else { 0.0 })
}

/// The kernel's timer wheel fires long timers up to an eighth late; allow a quarter, and at least 300 ms.
fn slack(due: u64, last: u64) -> u64 {
    (due.saturating_sub(last) / 4).max(300_000_000)
}

/// What the wire saw of `flow` from the pause to `window_end`.
fn wire_view(
    flow: &Flow<'_>,
    pause: u64,
    resume: u64,
    window_end: u64,
    trace_end: u64,
) -> (WireView, Vec<Event>) {
    // What each side was recorded sending up to the window's end: retransmissions, and new data (which dates the
    // ranges it resent).
    let sent_by = |side: FlowSide| -> Vec<Sent<'_>> {
        segments(flow, 0, window_end, |e| {
            matches!(
                e,
                Event::FlowRetransmit { .. } | Event::FlowProgress { .. } | Event::FlowOpen { .. }
            )
        })
        .filter(|(_, s)| s.side == side)
        .map(|(e, seg)| Sent {
            ts_ns: e.ts_ns(),
            seg,
            retransmit: matches!(e, Event::FlowRetransmit { .. }),
        })
        .collect()
    };
    let peer = side_retransmits(&sent_by(FlowSide::Peer), pause);
    let vm = side_retransmits(&sent_by(FlowSide::Vm), pause);
    let reset = segments(flow, pause, window_end, |e| matches!(e, Event::FlowReset { .. }))
        .next()
        .map(|(e, s)| WireReset {
            ts_ns: e.ts_ns(),
            by: s.side,
            during_window: e.ts_ns() < resume,
        });
    let progress = segments(flow, resume, window_end, |e| {
        matches!(e, Event::FlowProgress { .. })
    })
    .next();
    let silent =
        peer.retransmits.is_empty() && vm.retransmits.is_empty() && reset.is_none() && progress.is_none();
    let mut view = WireView {
        peer,
        vm,
        first_progress_ns: progress.map(|(e, _)| e.ts_ns()),
        progress_by: progress.map(|(_, s)| s.side),
        reset,
        silent,
        fate: Fate::Unresolved,
        basis: String::new(),
    };
    let (fate, basis, proof_until) = wire_fate(&view, resume, trace_end);
    view.fate = fate;
    view.basis = basis;
    let proof = segments(
        flow,
        pause.saturating_sub(1_000_000_000),
        proof_until.min(window_end),
        |e| !matches!(e, Event::FlowOpen { .. }),
    )
    .take(MAX_PROOF)
    .map(|(e, _)| e.clone())
    .collect();
    (view, proof)
}

/// The client's socket's name for a reset the wire saw.
fn reset_reason(by: FlowSide) -> AbortReason {
    match by {
        FlowSide::Vm => AbortReason::RstReceived,
        FlowSide::Peer => AbortReason::RstSent,
    }
}

/// The fate, its basis, and until when the segments prove it.
fn wire_fate(v: &WireView, resume: u64, trace_end: u64) -> (Fate, String, u64) {
    let who = |by: FlowSide| {
        if by == FlowSide::Vm {
            "the VM"
        } else {
            "the client"
        }
    };
    if let Some(r) = v.reset.as_ref().filter(|r| r.during_window) {
        let basis = format!("{} reset the connection during the window", who(r.by));
        return (aborted(reset_reason(r.by), r.ts_ns), basis, r.ts_ns + 1);
    }
    if let Some(fate) = gave_up(v, resume) {
        return fate;
    }
    if let Some(r) = v
        .reset
        .as_ref()
        .filter(|r| v.first_progress_ns.is_none_or(|p| r.ts_ns < p))
    {
        let basis = format!(
            "{} reset the connection after the resume, before any progress",
            who(r.by)
        );
        return (aborted(reset_reason(r.by), r.ts_ns), basis, r.ts_ns + 1);
    }
    if let (Some(p), Some(by)) = (v.first_progress_ns, v.progress_by) {
        let basis = format!(
            "{} made forward progress at resume+{}",
            who(by),
            fmt_dur(p.saturating_sub(resume))
        );
        return (Fate::Survived, basis, p + 1);
    }
    if let (Some(last), Some(due)) = (v.peer.last_ns(), v.peer.next_due_ns)
        && due + slack(due, last) <= trace_end
    {
        let basis = if last >= resume {
            format!(
                "the client's retransmission at resume+{} was its last: no further one, no reset",
                fmt_dur(last - resume)
            )
        } else {
            "the client's retransmissions stopped before the resume and none followed: the segment held during the \
             pause was delivered after it"
                .to_owned()
        };
        return (Fate::Survived, basis, last.max(resume) + 1);
    }
    if v.silent {
        return (
            Fate::Survived,
            "silent across the window: nothing was in flight on the wire".to_owned(),
            resume,
        );
    }
    (
        Fate::Unresolved,
        "retransmissions were pending and nothing came after the resume".to_owned(),
        trace_end.saturating_add(1),
    )
}

fn aborted(reason: AbortReason, at_ns: u64) -> Fate {
    Fate::Aborted { reason, at_ns }
}

/// The client gave up: its timer series stopped, its next retransmission was due before the resume and none came
/// (a late timer's would have been seen after the resume too, and would be the last one), and when the VM spoke
/// again the client answered with a RST before any progress. (Without that RST the client may still be alive: its
/// timer fires up to an eighth late, and an ACK from the resumed VM that comes first keeps the connection.)
fn gave_up(v: &WireView, resume: u64) -> Option<(Fate, String, u64)> {
    let due = v.peer.next_due_ns?;
    let rst = v.reset.as_ref().filter(|r| {
        r.by == FlowSide::Peer
            && !r.during_window
            && !(v.progress_by == Some(FlowSide::Peer) && v.first_progress_ns.is_some_and(|p| p < r.ts_ns))
    })?;
    if v.peer.timer_count() == 0 || due >= resume {
        return None;
    }
    let basis = format!(
        "the client's retransmissions (RTO {}, backoff {}) stopped: the next was due {} before the resume and none \
         came: it gave up (ETIMEDOUT), and it reset the connection when the VM spoke again",
        v.peer
            .rto_us
            .map_or_else(|| "?".to_owned(), |us| fmt_dur(us * 1000)),
        v.peer.backoff,
        fmt_dur(resume - due),
    );
    let until = rst.ts_ns.max(due) + 1;
    Some((aborted(AbortReason::Etimedout, due), basis, until))
}

/// A verdict for every tracked flow of the VM alive at the pause `pause`, from the wire alone.
pub(super) fn judge_flows(
    flows: &FlowIndex<'_>,
    ips: &[IpAddr],
    pause: u64,
    net: &Network,
    window_end: u64,
    trace_end: u64,
) -> Vec<ConnectionVerdict> {
    let resume = net.resume.unwrap_or(pause);
    let outage_end = net.restored.unwrap_or(pause);
    let mut out = Vec::new();
    for flow in &flows.flows {
        if !ips.is_empty() && !ips.contains(&flow.tuple.daddr) {
            continue;
        }
        let Some(first) = flow.events.first() else {
            continue;
        };
        // Reset, closed by both sides or idle before the pause.
        if flow.ended_ns() < pause || first.ts_ns() >= window_end {
            continue;
        }
        let opened_during = first.ts_ns() >= pause && first.flow_segment().is_some_and(is_syn);
        if opened_during && first.ts_ns() > outage_end {
            continue;
        }
        let (view, proof) = wire_view(flow, pause, resume, window_end, trace_end);
        let mut v = verdict_of(flow, view, proof, resume);
        v.opened_during_window = opened_during;
        out.push(v);
    }
    out.sort_by_key(|c| (c.tuple, c.netns));
    out
}

/// The connection's verdict from its wire view: the client's retransmissions stand for the socket's.
fn verdict_of(flow: &Flow<'_>, view: WireView, proof: Vec<Event>, resume: u64) -> ConnectionVerdict {
    let counted: Vec<&WireRetransmit> = view
        .peer
        .retransmits
        .iter()
        .filter(|r| match view.fate {
            Fate::Aborted { at_ns, .. } => r.ts_ns <= at_ns,
            _ => view.first_progress_ns.is_none_or(|p| r.ts_ns <= p),
        })
        .collect();
    let first_progress_ns = match view.fate {
        Fate::Survived => view
            .first_progress_ns
            .or_else(|| (!view.silent).then(|| view.peer.last_ns().unwrap_or(resume).max(resume))),
        _ => None,
    };
    let progress_basis = match view.fate {
        Fate::Aborted { .. } => "aborted before any forward progress".to_owned(),
        _ => view.basis.clone(),
    };
    ConnectionVerdict {
        tuple: flow.tuple,
        netns: 0,
        state_at_pause: Some(TcpState::Established),
        retransmits: counted.len() as u32,
        highest_backoff: view.peer.backoff,
        first_retransmit_ns: counted.first().map(|r| r.ts_ns),
        last_retransmit_ns: counted.last().map(|r| r.ts_ns),
        first_rto_ns: counted
            .iter()
            .find(|r| r.kind == Some(RetransmitKind::Rto))
            .map(|r| r.ts_ns),
        retransmit_ns: counted.iter().map(|r| r.ts_ns).collect(),
        base_rto_us: view.peer.rto_us,
        first_progress_ns,
        progress_basis,
        recovery_tail_ns: first_progress_ns.map(|p| p.saturating_sub(resume)),
        fate: view.fate,
        proof,
        afterwards: Vec::new(),
        opened_during_window: false,
        basis: Basis::Wire,
        wire: Some(view),
        wire_agrees: None,
    }
}

/// Whether the wire's fate tells the same story as the socket's: the same fate, and for an abort the same reason.
pub(super) fn agree(socket: &Fate, wire: &Fate) -> bool {
    match (socket, wire) {
        (Fate::Aborted { reason: a, .. }, Fate::Aborted { reason: b, .. }) => a == b,
        (a, b) => std::mem::discriminant(a) == std::mem::discriminant(b),
    }
}

#[cfg(test)]
mod tests;
