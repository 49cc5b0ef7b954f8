//! The residue of a stretch of trace: the few events of it that still matter to a correlation of what follows.
//!
//! A live watch keeps only a look-back of recent events (see [`crate::live`]). What happened before it still shapes
//! the verdicts of a migration that starts later: a connection opened long ago and silent since is alive at the
//! pause; the VM's last frame counters on each port say where it was and how many frames had been delivered there;
//! a bridge's last FDB entry says which port the MAC moves from. [`residue`] keeps exactly the events the
//! correlation reads for those, so that correlating `residue(older) ++ newer` judges every migration whose events
//! lie in `newer` as correlating `older ++ newer` does:
//!
//! - a TCP connection still open at the end (or closed within the close cluster before it): its first event, its
//!   first event that names its namespace, its last state change, and the `connect()` transition that opened it;
//!   `connect()` transitions no connection claimed yet; closed connections are dropped (they are never judged
//!   against a later pause), and so are connections whose CLOSE was never seen but whose 4-tuple a later opening
//!   in the same namespace took;
//! - per (MAC, direction, port): the last `mac_seen` and the last `mac_stats` sample (cumulative counters);
//! - per (MAC, bridge): the last `fdb_update`;
//! - per (kind, MAC, sender, address, port): the last ARP, GARP, RARP and neighbor advertisement (the VM's IPs and
//!   the ports it announced itself on);
//! - per tracked flow not over yet: its first segment, its first segment other than a SYN, its first RST, its FINs
//!   and its last segments (the wire basis judges every flow not over before a pause: reset, closed by both sides,
//!   or idle for [`super::flows::FLOW_IDLE_NS`]); flows over for good (closed [`super::flows::FLOW_LINGER_NS`]
//!   ago, or idle) are dropped;
//! - migration phase events of the last [`MIGRATION_MARGIN_NS`] (a later move on the wire is not inferred again when
//!   a recent migration covers it);
//! - every `port_failed` (each later migration warns about it).
//!
//! Everything else (notes, clock samples, counters of the monitor itself) is dropped.

use std::collections::BTreeMap;

use super::{
    CLOSE_CLUSTER_NS, ConnectionIndex, PENDING_OPEN_NS,
    flows::{FlowIndex, SAME_SEGMENT_NS},
    tcp_of,
};
use crate::trace::Event;

/// Migration phase events this much older than the end are dropped from a residue.
pub const MIGRATION_MARGIN_NS: u64 = 60_000_000_000;

/// The events of `events` (any order) that a correlation of later events still reads, observed until `end_ns`
/// (see the module documentation), in time order.
pub fn residue(events: &[Event], end_ns: u64) -> Vec<Event> {
    residue_until(events, end_ns, end_ns)
}

/// [`residue`] of a stretch whose TCP events (`tcp_*` kinds) run until `tcp_end_ns` and whose other events run until
/// `end_ns`: a live correlation condenses the TCP events of closed connections sooner than the rest.
pub fn residue_until(events: &[Event], tcp_end_ns: u64, end_ns: u64) -> Vec<Event> {
    let mut sorted: Vec<&Event> = events.iter().collect();
    sorted.sort_by_key(|e| e.ts_ns());
    let mut keep: Vec<&Event> = Vec::new();
    keep_connections(&sorted, tcp_end_ns, &mut keep);
    keep_flows(&sorted, end_ns, &mut keep);
    keep_l2(&sorted, &mut keep);
    keep.extend(sorted.iter().copied().filter(|e| {
        matches!(e, Event::Migration { .. }) && e.ts_ns().saturating_add(MIGRATION_MARGIN_NS) >= end_ns
    }));
    // Every later migration warns about each port that could not be watched (`correlate::ports`).
    keep.extend(
        sorted
            .iter()
            .copied()
            .filter(|e| matches!(e, Event::PortFailed { .. })),
    );
    // The same event can be kept for two reasons: keep it once, in time order, stably (as `sorted`: by time, then
    // by place in `events`).
    let place = |e: &Event| {
        (std::ptr::from_ref(e) as usize - events.as_ptr() as usize) / std::mem::size_of::<Event>().max(1)
    };
    let mut keep: Vec<(u64, usize, &Event)> = keep.into_iter().map(|e| (e.ts_ns(), place(e), e)).collect();
    keep.sort_unstable_by_key(|&(ts, i, _)| (ts, i));
    keep.dedup_by_key(|&mut (_, i, _)| i);
    keep.into_iter().map(|(_, _, e)| e.clone()).collect()
}

fn keep_connections<'a>(sorted: &[&'a Event], end_ns: u64, keep: &mut Vec<&'a Event>) {
    let tcp: Vec<&Event> = sorted.iter().copied().filter(|e| tcp_of(e).is_some()).collect();
    let conns = ConnectionIndex::build(&tcp);
    for life in &conns.lives {
        if life
            .ended_ns()
            .is_some_and(|c| c.saturating_add(CLOSE_CLUSTER_NS) < end_ns)
        {
            continue;
        }
        keep.extend(life.opened_by);
        keep.extend(life.events.first().copied());
        keep.extend(
            life.events
                .iter()
                .copied()
                .find(|e| matches!(tcp_of(e), Some((_, ns)) if ns != 0)),
        );
        keep.extend(
            life.events
                .iter()
                .rev()
                .copied()
                .find(|e| matches!(e, Event::TcpState { .. })),
        );
    }
    keep.extend(
        conns
            .pending
            .iter()
            .copied()
            .filter(|e| e.ts_ns().saturating_add(PENDING_OPEN_NS) >= end_ns),
    );
}

fn keep_flows<'a>(sorted: &[&'a Event], end_ns: u64, keep: &mut Vec<&'a Event>) {
    let flows = FlowIndex::build(sorted);
    for f in &flows.flows {
        // Over for good: no later segment joins it, and no later pause judges it.
        if f.over_at(end_ns) {
            continue;
        }
        keep.extend(f.events.first().copied());
        // Its FINs and its last segments say when it ends; the last ones also catch copies seen on another port.
        keep.extend(
            f.events
                .iter()
                .copied()
                .filter(|e| matches!(e, Event::FlowFin { .. })),
        );
        let last = f.events.last().map_or(0, |e| e.ts_ns());
        keep.extend(
            f.events
                .iter()
                .rev()
                .copied()
                .take_while(|e| e.ts_ns().saturating_add(SAME_SEGMENT_NS) >= last),
        );
        keep.extend(
            f.events
                .iter()
                .copied()
                .find(|e| e.flow_segment().is_some_and(|s| !super::flows::is_syn(s))),
        );
        keep.extend(
            f.events
                .iter()
                .copied()
                .find(|e| matches!(e, Event::FlowReset { .. })),
        );
    }
}

/// The last L2 event of each key (see the module documentation).
fn keep_l2<'a>(sorted: &[&'a Event], keep: &mut Vec<&'a Event>) {
    let mut last: BTreeMap<String, &'a Event> = BTreeMap::new();
    for e in sorted {
        let key = match e {
            Event::MacSeen {
                mac, port, direction, ..
            } => format!("seen {mac} {direction:?} {port}"),
            Event::MacStats {
                mac, port, direction, ..
            } => format!("stats {mac} {direction:?} {port}"),
            Event::FdbUpdate {
                mac, bridge, netns, ..
            } => format!("fdb {mac} {bridge}@{}", netns.as_deref().unwrap_or("")),
            Event::Arp { frame, .. } | Event::Garp { frame, .. } | Event::Rarp { frame, .. } => format!(
                "{} {} {} {} {}",
                e.kind(),
                frame.mac,
                frame.sha,
                frame.spa,
                frame.port
            ),
            Event::NeighborAdvert { frame, .. } => {
                format!("na {} {} {}", frame.mac, frame.target, frame.port)
            }
            _ => continue,
        };
        last.insert(key, e);
    }
    keep.extend(last.into_values());
}
