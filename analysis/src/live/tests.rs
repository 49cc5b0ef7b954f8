//! The live correlation against the offline one: a long synthetic watch (two VMs migrating again and again, churn
//! of unrelated connections, connections opened long before the look-back, a flow on the wire) fed through a
//! [`LiveCorrelation`] with a short look-back, each final verdict compared with `correlate` of the whole trace.

use std::net::{IpAddr, Ipv4Addr};

use migevents::Mode;

use super::*;
use crate::{
    correlate::correlate,
    fixtures::{
        FlowSeg, MS, err, fdb, flow_fin, flow_open, flow_progress, flow_rst, flow_rtx, garp, migration, rarp,
        rst_in, rtx, seen, state, stats, tuple,
    },
    trace::{Direction, FlowSide, FourTuple, TcpCommon, TcpState},
};

const VM1: &str = "52:54:00:12:34:56";
const VM2: &str = "52:54:00:00:00:02";
const IP1: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const IP2: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 3);
const END_MS: u64 = 300_000;

/// A VM's migrations: (pause ms, resume ms, mode); it alternates between two taps and two uplinks.
struct Vm {
    mac: &'static str,
    ip: Ipv4Addr,
    taps: [&'static str; 2],
    ups: [&'static str; 2],
    moves: Vec<(u64, u64, Mode)>,
}

/// The VM's frame counters and announces: a sample every 500 ms on its port while it runs (ingress stops during a
/// pause, frames towards it keep reaching the old port until the FDB moves), a RARP, a GARP and the FDB moves after
/// each resume.
fn l2(vm: &Vm, out: &mut Vec<Event>) {
    let mut counters = [[0u64; 2]; 2]; // [tap][dir]
    let mut at = 0;
    let mut t = 500;
    let mut next = vm.moves.iter().peekable();
    out.push(fdb(100, "brS", vm.ups[0], vm.mac));
    out.push(seen(100, vm.mac, vm.taps[0], Direction::Ingress));
    while t < END_MS {
        let paused = vm.moves.iter().find(|(p, r, _)| t > *p && t <= *r + 2);
        for (dir, d) in [Direction::Ingress, Direction::Egress].into_iter().enumerate() {
            if paused.is_some() && dir == 0 {
                continue;
            }
            counters[at][dir] += 10;
            out.push(stats(t, vm.mac, vm.taps[at], d, counters[at][dir], 100, t - 1));
        }
        if let Some(&&(p, r, _)) = next.peek()
            && t + 500 > r
        {
            next.next();
            let from = at;
            at = 1 - at;
            out.push(stats(
                p,
                vm.mac,
                vm.taps[from],
                Direction::Ingress,
                counters[from][0],
                100,
                p - 1,
            ));
            out.push(seen(r + 1, vm.mac, vm.taps[at], Direction::Ingress));
            out.push(rarp(r + 1, vm.mac, vm.taps[at]));
            out.push(fdb(r + 2, "brS", vm.ups[at], vm.mac));
            out.push(garp(r + 3, vm.mac, vm.ip, vm.taps[at]));
            out.push(seen(r + 4, vm.mac, vm.taps[at], Direction::Egress));
        }
        t += 500;
    }
}

fn tcp_state(ts_ms: u64, t: FourTuple, old: Option<TcpState>, new: Option<TcpState>) -> Event {
    Event::TcpState {
        ts_ns: ts_ms * MS,
        tcp: TcpCommon {
            tuple: t,
            netns: 4026,
        },
        old_state: old,
        new_state: new,
    }
}

/// Connections of nobody watched: one every 50 ms, each open for 120 ms (a `connect()` without a source port
/// first, as the kernel reports it).
fn churn(out: &mut Vec<Event>) {
    let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let mut sport = 20_000u16;
    let mut t = 1_000;
    while t + 200 < END_MS {
        let conn = |sport| FourTuple {
            saddr: lo,
            sport,
            daddr: lo,
            dport: 9,
        };
        out.push(tcp_state(
            t,
            conn(0),
            Some(TcpState::Close),
            Some(TcpState::SynSent),
        ));
        out.push(tcp_state(
            t + 1,
            conn(sport),
            Some(TcpState::SynSent),
            Some(TcpState::Established),
        ));
        out.push(tcp_state(
            t + 120,
            conn(sport),
            Some(TcpState::Established),
            Some(TcpState::FinWait1),
        ));
        out.push(tcp_state(
            t + 121,
            conn(sport),
            Some(TcpState::FinWait1),
            Some(TcpState::FinWait2),
        ));
        out.push(tcp_state(
            t + 122,
            conn(sport),
            Some(TcpState::FinWait2),
            Some(TcpState::Close),
        ));
        sport = if sport == 60_000 { 20_000 } else { sport + 1 };
        t += 50;
    }
}

/// A server's connections whose CLOSE is never seen (half of them), on 30 client ports used again and again: an
/// accepted connection every 200 ms, each port again 6 s later. The next opening of a 4-tuple ends the connection
/// before it.
fn unclosed_churn(out: &mut Vec<Event>) {
    let conn = |cport| FourTuple {
        saddr: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
        sport: 80,
        daddr: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)),
        dport: 30_000 + cport,
    };
    let mut t = 1_100;
    let mut n = 0u16;
    while t + 200 < END_MS {
        let c = conn(n % 30);
        out.push(tcp_state(t, c, Some(TcpState::Listen), Some(TcpState::SynRecv)));
        out.push(tcp_state(
            t + 1,
            c,
            Some(TcpState::SynRecv),
            Some(TcpState::Established),
        ));
        if n.is_multiple_of(2) {
            out.push(tcp_state(
                t + 100,
                c,
                Some(TcpState::Established),
                Some(TcpState::CloseWait),
            ));
            out.push(tcp_state(
                t + 101,
                c,
                Some(TcpState::CloseWait),
                Some(TcpState::LastAck),
            ));
            out.push(tcp_state(
                t + 102,
                c,
                Some(TcpState::LastAck),
                Some(TcpState::Close),
            ));
        }
        n = n.wrapping_add(1);
        t += 200;
    }
}

/// The VM's flows the wire follows for a second each, one every 2 s on 50 client ports used again and again: most
/// end with a FIN from each side, every fifth with a RST.
fn flow_churn(out: &mut Vec<Event>) {
    // Each flow lives from 1.5 s to 2.5 s past an even second: no pause (at odd seconds) falls inside one.
    let mut t = 1_500;
    let mut n = 0u16;
    while t + 2_000 < END_MS {
        let port = 43_000 + n % 50;
        let syn = FlowSeg::data(FlowSide::Peer, port, 0, 0).flags(0x02);
        out.push(flow_open(t, &syn, "tapA"));
        if n % 5 == 4 {
            out.push(flow_rst(
                t + 1_000,
                &FlowSeg::data(FlowSide::Vm, port, 500, 0).flags(0x04),
                "tapA",
            ));
        } else {
            let fin = |side, seq| FlowSeg::data(side, port, seq, 0).flags(0x11);
            out.push(flow_fin(t + 1_000, &fin(FlowSide::Peer, 100), "tapA"));
            out.push(flow_fin(t + 1_001, &fin(FlowSide::Vm, 500), "tapA"));
        }
        n = n.wrapping_add(1);
        t += 2_000;
    }
}

fn scenario() -> (Vec<Event>, Vec<Vm>) {
    let vm1 = Vm {
        mac: VM1,
        ip: IP1,
        taps: ["tapA", "tapB"],
        ups: ["upA", "upB"],
        moves: [45_000, 85_000, 125_000, 165_000, 205_000, 245_000]
            .into_iter()
            .map(|p| (p, p + 10, Mode::Live))
            .collect(),
    };
    let vm2 = Vm {
        mac: VM2,
        ip: IP2,
        taps: ["tapC", "tapD"],
        ups: ["upC", "upD"],
        moves: vec![
            (65_000, 65_012, Mode::Live),
            (145_000, 151_000, Mode::Quick),
            (225_000, 225_008, Mode::Live),
        ],
    };
    let mut ev = Vec::new();
    for vm in [&vm1, &vm2] {
        for (i, &(p, r, mode)) in vm.moves.iter().enumerate() {
            ev.extend(migration(&format!("{}-{i}", vm.mac), vm.mac, vm.ip, mode, p, r));
        }
        l2(vm, &mut ev);
    }
    // VM1: one connection opened long before any look-back and silent since (a `connect()` without a port first);
    // one that retransmits through the third migration and recovers; one reset during the fourth.
    let long = tuple(40_001, IP1);
    ev.push(tcp_state(
        1_000,
        FourTuple { sport: 0, ..long },
        Some(TcpState::Close),
        Some(TcpState::SynSent),
    ));
    ev.push(state(1_001, long, "SYN_SENT", "ESTABLISHED"));
    let slow = tuple(40_002, IP1);
    ev.push(state(2_000, slow, "SYN_SENT", "ESTABLISHED"));
    ev.extend([rtx(125_060, slow, 1, 200), rtx(125_460, slow, 2, 200)]);
    let reset = tuple(40_003, IP1);
    ev.push(state(3_000, reset, "SYN_SENT", "ESTABLISHED"));
    ev.extend([
        rst_in(165_030, reset),
        state(165_030, reset, "ESTABLISHED", "CLOSE"),
    ]);
    // VM2: a connection that times out during the quick migration's 6 s pause.
    let dies = tuple(41_001, IP2);
    ev.push(state(4_000, dies, "SYN_SENT", "ESTABLISHED"));
    ev.extend([
        rtx(145_200, dies, 1, 200),
        rtx(145_600, dies, 2, 200),
        rtx(146_400, dies, 3, 200),
        rtx(148_000, dies, 4, 200),
        err(149_500, dies, 110),
        state(149_500, dies, "ESTABLISHED", "CLOSE"),
    ]);
    // VM1: a connection from a bound socket (its opening has its port) never seen closing, whose 4-tuple opens
    // again between the second and the third migration: judged by the first two, the new one by the next two; the
    // new one closes before the fifth.
    let reused = tuple(40_004, IP1);
    for (open, close) in [(1_500, None), (100_000, Some(200_000))] {
        ev.push(tcp_state(
            open,
            reused,
            Some(TcpState::Close),
            Some(TcpState::SynSent),
        ));
        ev.push(state(open + 1, reused, "SYN_SENT", "ESTABLISHED"));
        if let Some(c) = close {
            ev.push(state(c, reused, "ESTABLISHED", "CLOSE"));
        }
    }
    // A flow of VM1 the wire follows, picked up long before, retransmitting through the second migration.
    let f = FlowSeg::data(FlowSide::Peer, 42_001, 1_000, 100);
    ev.push(flow_open(5_000, &f, "tapA"));
    ev.extend([
        flow_rtx(
            85_005,
            &FlowSeg::data(FlowSide::Peer, 42_001, 1_000, 100).silence(300),
            "tapA",
        ),
        flow_progress(85_100, &FlowSeg::data(FlowSide::Peer, 42_001, 1_100, 100), "tapB"),
    ]);
    // Two flows of VM1 that end before the first migration (never judged): one closed by both sides, one reset.
    let fin = |side, seq| FlowSeg::data(side, 42_002, seq, 0).flags(0x11);
    ev.extend([
        flow_open(6_000, &FlowSeg::data(FlowSide::Peer, 42_002, 1_000, 100), "tapA"),
        flow_fin(30_000, &fin(FlowSide::Vm, 9_000), "tapA"),
        flow_fin(30_001, &fin(FlowSide::Peer, 1_100), "tapA"),
        flow_open(7_000, &FlowSeg::data(FlowSide::Peer, 42_003, 1_000, 100), "tapA"),
        flow_rst(
            40_000,
            &FlowSeg::data(FlowSide::Vm, 42_003, 9_000, 0).flags(0x04),
            "tapA",
        ),
    ]);
    churn(&mut ev);
    unclosed_churn(&mut ev);
    flow_churn(&mut ev);
    ev.sort_by_key(Event::ts_ns);
    (ev, vec![vm1, vm2])
}

/// The report with what only later events can change masked: unjudged connections of VMs whose first migration
/// comes after this one's pause.
impl LiveCorrelation {
    fn extend_for_test(&mut self, events: Vec<Event>) {
        for e in events {
            self.push(e);
        }
    }
}

fn masked(m: &MigrationReport, later_ips: &[IpAddr]) -> MigrationReport {
    let mut m = m.clone();
    m.unjudged
        .retain(|t| !later_ips.contains(&t.saddr) && !later_ips.contains(&t.daddr));
    m
}

#[test]
fn live_verdicts_are_the_offline_verdicts_in_bounded_memory() {
    let (events, vms) = scenario();
    let offline = correlate(&events);
    assert_eq!(offline.migrations.len(), 9, "{:#?}", offline.warnings);

    let cfg = LiveConfig {
        lookback_ns: 10_000 * MS,
        settle_ns: 3_000 * MS,
        keep: 4,
    };
    let mut live = LiveCorrelation::new(cfg);
    let mut released: Vec<MigrationReport> = Vec::new();
    let mut settled = 0;
    let mut max_held = 0;
    let mut it = events.iter().peekable();
    let mut now = 0;
    while now < END_MS * MS + HOLD_MAX_NS {
        now += 1_000 * MS;
        while let Some(e) = it.next_if(|e| e.ts_ns() <= now) {
            live.push(e.clone());
        }
        let up = live.update(now);
        settled += up.settled.len();
        released.extend(up.released);
        max_held = max_held.max(live.status().held);
    }

    let first_pause = |mac: &str| {
        vms.iter()
            .find(|v| v.mac == mac)
            .map_or(u64::MAX, |v| v.moves[0].0 * MS)
    };
    assert_eq!(released.len(), offline.migrations.len());
    assert_eq!(settled, offline.migrations.len());
    for off in &offline.migrations {
        let got = released
            .iter()
            .find(|m| m.id == off.id)
            .unwrap_or_else(|| panic!("{} was never released", off.id));
        let pause = off.timeline.pause.as_ref().map_or(0, |p| p.ts_ns);
        let later: Vec<IpAddr> = vms
            .iter()
            .filter(|v| first_pause(v.mac) > pause)
            .map(|v| IpAddr::V4(v.ip))
            .collect();
        assert_eq!(masked(got, &later), masked(off, &later), "{}", off.id);
    }
    // The verdicts say what the scenario did.
    let by_id = |id: &str| released.iter().find(|m| m.id == id).expect("released");
    let third = by_id(&format!("{VM1}-2"));
    assert_eq!((third.survived, third.aborted, third.retransmits), (5, 0, 2));
    let fourth = by_id(&format!("{VM1}-3"));
    assert_eq!((fourth.survived, fourth.aborted), (4, 1));
    // The connection whose 4-tuple opened again: its first life judged by the first two migrations, its second by
    // the next two, neither after the second closed; the flows closed before a pause are never judged.
    for (i, lives) in [1, 1, 1, 1, 0, 0].into_iter().enumerate() {
        let m = by_id(&format!("{VM1}-{i}"));
        let judged = m.connections.iter().filter(|c| c.tuple.sport == 40_004).count();
        assert_eq!(judged, lives, "{}", m.id);
        assert!(
            !m.connections
                .iter()
                .any(|c| matches!(c.tuple.sport, 42_002 | 42_003 | 43_000..=43_049)),
            "{m:#?}"
        );
    }
    let quick = by_id(&format!("{VM2}-1"));
    assert_eq!(quick.aborted, 1);
    assert!(quick.connections.iter().any(|c| matches!(
        c.fate,
        Fate::Aborted {
            reason: crate::correlate::AbortReason::Etimedout,
            ..
        }
    )));
    let second = by_id(&format!("{VM1}-1"));
    assert!(
        second
            .connections
            .iter()
            .any(|c| c.basis == crate::correlate::Basis::Wire),
        "{second:#?}"
    );
    // The silent connection opened 44 s before the first pause (beyond the 10 s look-back) is judged.
    let first = by_id(&format!("{VM1}-0"));
    assert!(
        first
            .connections
            .iter()
            .any(|c| c.tuple.sport == 40_001 && c.fate == Fate::Survived),
        "{first:#?}"
    );

    // Memory: TCP events of closed connections are condensed after 2 s, or after the earliest held pause (the
    // quick migration's 6 s pause, its settle and the update pace); the other events for the 10 s look-back. The
    // residue holds what is open, not what happened.
    let churn_per_s = 5 * 20 + 5 * 4;
    let l2_per_s = 2 * 5 + 2;
    let bound = churn_per_s * (2 + 6 + 3 + 2) + l2_per_s * (10 + 6 + 3 + 2) + 200;
    assert!(max_held <= bound, "held {max_held} events, bound {bound}");
    let st = live.status();
    // What is open at the end: the server's 30 latest connections, the VMs' connections, each port's last
    // counters, FDB entries and announces. Connections never seen closing leave it when their 4-tuple opens again.
    assert!(st.residue < 150, "{st:?}");
    assert_eq!(st.kept, 4);
    assert!(st.released_events as usize > events.len() * 9 / 10, "{st:?}");
    assert_eq!(st.released_unresolved, 0);
}

#[test]
fn a_migration_that_never_resumes_is_released_after_the_longest_hold() {
    let mut ev = migration("stuck", VM1, IP1, Mode::Live, 1_000, 2_000);
    ev.retain(|e| !matches!(e, Event::Migration { ev, .. } if matches!(ev.phase, migevents::Phase::Resume | migevents::Phase::Complete { .. })));
    let mut live = LiveCorrelation::new(LiveConfig::default());
    for e in ev {
        live.push(e);
    }
    let up = live.update(5_000 * MS);
    assert!(up.pending && up.in_flight && up.released.is_empty());
    let up = live.update(1_000 * MS + HOLD_MAX_NS + 1);
    assert_eq!(up.released.len(), 1);
    assert!(up.settled.is_empty(), "it never resumed: no live line");
    assert!(!up.pending);
    let up = live.update(1_000 * MS + HOLD_MAX_NS + 60_000 * MS);
    assert!(up.released.is_empty(), "released once");
    assert_eq!(live.status().held, 0);
}

#[test]
fn without_a_migration_only_the_look_back_moves() {
    let mut live = LiveCorrelation::new(LiveConfig {
        lookback_ns: 1_000 * MS,
        ..LiveConfig::default()
    });
    let t = tuple(40_001, IP1);
    live.push(state(100, t, "SYN_SENT", "ESTABLISHED"));
    for i in 0..100 {
        live.push(rtx(200 + i * 10, t, 1, 200));
    }
    // TCP events cannot start a migration: nothing to correlate, the look-back still moves.
    let up = live.update(5_000 * MS);
    assert!(up.analysis.events == 0 && !up.pending);
    let st = live.status();
    assert_eq!(st.held, 0);
    assert!(st.residue >= 1, "the open connection stays: {st:?}");
    // A phase event makes the next update correlate.
    live.extend_for_test(migration("m", VM1, IP1, Mode::Live, 6_000, 6_010));
    let up = live.update(6_100 * MS);
    assert!(up.pending && up.analysis.migrations.len() == 1);
}

#[test]
fn a_flow_idle_for_long_is_over_for_the_verdicts_and_the_residue() {
    // Two flows of VM1 picked up at the start: one never heard of again, one silent for 15 minutes and then making
    // progress after the resume of a migration at 900 s.
    let quiet = FlowSeg::data(FlowSide::Peer, 42_010, 1_000, 100);
    let back = FlowSeg::data(FlowSide::Peer, 42_011, 1_000, 100);
    let mut ev = vec![flow_open(1_000, &quiet, "tapA"), flow_open(2_000, &back, "tapA")];
    ev.extend(migration("late", VM1, IP1, Mode::Live, 900_000, 900_010));
    ev.push(flow_progress(
        900_100,
        &FlowSeg::data(FlowSide::Peer, 42_011, 1_100, 100),
        "tapA",
    ));
    ev.sort_by_key(Event::ts_ns);
    let offline = correlate(&ev);
    assert_eq!(offline.migrations.len(), 1);
    let judged: Vec<u16> = offline.migrations[0]
        .connections
        .iter()
        .map(|c| c.tuple.sport)
        .collect();
    assert_eq!(judged, vec![42_011], "{:#?}", offline.migrations[0]);

    let mut live = LiveCorrelation::new(LiveConfig {
        lookback_ns: 10_000 * MS,
        settle_ns: 3_000 * MS,
        keep: 4,
    });
    let mut released = Vec::new();
    let mut it = ev.iter().peekable();
    let mut now = 0;
    while now < 1_100_000 * MS {
        now += 5_000 * MS;
        while let Some(e) = it.next_if(|e| e.ts_ns() <= now) {
            live.push(e.clone());
        }
        // Something else goes on meanwhile (the residue is condensed again as events age).
        live.push(Event::Note {
            ts_ns: now,
            level: "info".to_owned(),
            message: "tick".to_owned(),
        });
        released.extend(live.update(now).released);
        let residue = live.status().residue;
        if now > 20_000 * MS && now < 600_000 * MS {
            assert_eq!(residue, 2, "both flows are open at {} s", now / 1_000 / MS);
        // Over 10 minutes after their last segment, out of the residue once the look-back (10 s) has passed that.
        } else if now > 615_000 * MS && now < 890_000 * MS {
            assert_eq!(residue, 0, "both flows are over at {} s", now / 1_000 / MS);
        }
    }
    assert_eq!(released.len(), 1);
    assert_eq!(released[0], offline.migrations[0]);
}
