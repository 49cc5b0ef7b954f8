//! Verdicts from the wire: a connection's fate across a pause window, judged from the segments the flow tracker saw
//! on the VM's ports (`flow_*` events). On a hypervisor host no TCP endpoint is a local socket, so this is the only
//! basis there; where the clients run on the monitoring host (CI), it is checked against the sockets' verdicts.
//!
//! The rules, in `docs/report.md` ("Verdicts from the wire"):
//! - the same segment seen on several ports (tap, bridge port, uplink) counts once;
//! - each side's retransmissions in the window are classified: timer retransmissions (`rto`) come after a silence
//!   that doubles from one to the next; a fast retransmit resends the peer's ACK point right after other segments;
//!   a tail loss probe resends the sender's last segment while earlier ones are unacknowledged, or comes before a
//!   timer series whose first interval is more than 2.7 times its own silence; a SYN sent again is `syn`;
//! - from the timer series: the sender's RTO before backoff (half the first interval, else the first silence), its
//!   backoff, and when its next retransmission was due;
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
/// A retransmission this soon after the sender's previous segment, of the peer's ACK point, is a fast retransmit.
const FAST_MAX_SILENCE_NS: u64 = 20_000_000;
/// A lone retransmission after at least this much silence is taken for a timer retransmission.
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

/// Classifies one side's retransmissions (time-sorted) and infers its RTO, backoff and next due time.
pub fn side_retransmits(rtx: &[(u64, &FlowSegment)]) -> SideRetransmits {
    let mut out = SideRetransmits::default();
    for (i, &(ts, seg)) in rtx.iter().enumerate() {
        // After the first of a series, the timer retransmits (a probe or a fast retransmit that did not get through
        // leaves the rest to it), unless the sender is still busy: more holes repaired after duplicate ACKs.
        let kind = if i == 0 {
            first_kind(seg, rtx.get(1).map(|n| n.0 - ts))
        } else if seg.silence_ns > 0 && seg.silence_ns < FAST_MAX_SILENCE_NS {
            Some(RetransmitKind::Fast)
        } else {
            Some(RetransmitKind::Rto)
        };
        out.retransmits.push(WireRetransmit {
            ts_ns: ts,
            kind,
            silence_ns: seg.silence_ns,
        });
    }
    infer_schedule(&mut out);
    out
}

fn ratio(a: u64, b: u64) -> f64 {
    a as f64 / b.max(1) as f64
}

/// The kind of the first retransmission of a series, from what it resent and what followed.
///
/// Its timing is read from the time since the sender last sent new data (the lost segment's age, when the tracker
/// knew it), else its silence: the timer's first retransmission comes one RTO after, and the next two RTOs later; a
/// probe comes at most one RTO after (Linux caps the probe timeout at the RTO) and the timer one RTO after it.
fn first_kind(seg: &FlowSegment, next_interval: Option<u64>) -> Option<RetransmitKind> {
    let head = seg.peer_ack.is_some_and(|a| a == seg.seq);
    let tail = seg.seq_end.is_some_and(|e| seg.seq.wrapping_add(seg.len) == e);
    if seg.tcp_flags & 0x02 != 0 {
        return Some(RetransmitKind::Syn);
    }
    if tail && !head {
        return Some(RetransmitKind::Tlp);
    }
    if head && seg.silence_ns < FAST_MAX_SILENCE_NS && seg.silence_ns > 0 {
        return Some(RetransmitKind::Fast);
    }
    let since = if seg.gap_ns > 0 {
        seg.gap_ns
    } else {
        seg.silence_ns
    };
    match next_interval.map(|d| ratio(d, since)) {
        Some(r) if (BACKOFF_MIN..=BACKOFF_MAX).contains(&r) => Some(RetransmitKind::Rto),
        // A probe at the RTO, then the timer one RTO later.
        Some(r) if (PROBE_MIN..=PROBE_MAX).contains(&r) => Some(RetransmitKind::Tlp),
        // A probe, then the timer armed afresh: the next interval is far more than twice its wait.
        Some(r) if r > BACKOFF_MAX && tail => Some(RetransmitKind::Tlp),
        Some(_) | None if since >= RTO_MIN_SILENCE_NS => Some(RetransmitKind::Rto),
        _ => None,
    }
}

/// The RTO before backoff, the backoff and the next due time of a side's timer series.
fn infer_schedule(side: &mut SideRetransmits) {
    let timer: Vec<&WireRetransmit> = side
        .retransmits
        .iter()
        .filter(|r| r.kind == Some(RetransmitKind::Rto))
        .collect();
    let Some(first) = timer.first() else {
        return;
    };
    let base_ns = match timer.get(1) {
        Some(second) => (second.ts_ns - first.ts_ns) / 2,
        None => first.silence_ns,
    };
    if base_ns == 0 {
        return;
    }
    side.rto_us = Some(base_ns / 1000);
    side.backoff = (timer.len() - 1) as u32;
    let last = timer[timer.len() - 1];
    let last_interval = timer
        .len()
        .checked_sub(2)
        .map_or(base_ns, |i| last.ts_ns - timer[i].ts_ns);
    side.next_due_ns = Some(last.ts_ns + (2 * last_interval).min(RTO_MAX_NS));
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
    let rtx_of = |side: FlowSide| -> Vec<(u64, &FlowSegment)> {
        segments(flow, pause, window_end, |e| {
            matches!(e, Event::FlowRetransmit { .. })
        })
        .filter(|(_, s)| s.side == side)
        .map(|(e, s)| (e.ts_ns(), s))
        .collect()
    };
    let peer = side_retransmits(&rtx_of(FlowSide::Peer));
    let vm = side_retransmits(&rtx_of(FlowSide::Vm));
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
