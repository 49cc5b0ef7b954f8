//! Correlation on synthetic event sequences: one test per edge case.

use std::net::{IpAddr, Ipv4Addr};

use migevents::{Mode, Phase, Role};

use super::*;
use crate::{
    fixtures::*,
    trace::{PauseSource, TcpCommon},
};

fn conn(m: &MigrationReport, sport: u16) -> &ConnectionVerdict {
    m.connections
        .iter()
        .find(|c| c.tuple.sport == sport)
        .unwrap_or_else(|| panic!("connection {sport} missing in {:#?}", m.connections))
}

#[test]
fn live_migration_timeline_and_split() {
    let a = correlate(&live_trace());
    assert_eq!(a.migrations.len(), 1, "{:#?}", a.migrations);
    let m = &a.migrations[0];
    assert_eq!(m.mode.as_deref(), Some("live"));
    assert_eq!(m.outcome, "completed");
    let tl = &m.timeline;
    assert_eq!(tl.pause.as_ref().unwrap().ts_ns, 1000 * MS);
    assert_eq!(tl.rounds.len(), 1);
    assert_eq!(tl.first_rarp.as_ref().unwrap().port, "tapB");
    assert_eq!(tl.first_garp.as_ref().unwrap().ts_ns, 1008 * MS);
    assert_eq!(tl.fdb_moves.len(), 2);
    let brs = tl.fdb_moves.iter().find(|f| f.bridge == "brS").unwrap();
    assert_eq!(
        (brs.from_port.as_deref(), brs.to_port.as_str()),
        (Some("upA"), "upB")
    );
    assert_eq!(tl.last_vm_frame_old_port.as_ref().unwrap().ts_ns, 998 * MS);
    let first_vm = tl.first_vm_frame_new_port.as_ref().unwrap();
    assert_eq!((first_vm.ts_ns, first_vm.port.as_str()), (1006 * MS, "tapB"));
    let first_to = tl.first_frame_to_vm_new_port.as_ref().unwrap();
    assert_eq!((first_to.ts_ns, first_to.port.as_str()), (1009 * MS, "tapB"));
    assert_eq!(
        tl.black_holed,
        vec![BlackHole {
            port: "tapA".into(),
            frames: 3,
            last_ns: 1007 * MS
        }]
    );

    let d = &m.downtime;
    assert_eq!(d.vcpu_pause.as_ref().unwrap().ns, 5 * MS);
    assert_eq!(d.vcpu_pause.as_ref().unwrap().source, "migrator");
    // From the last frame exchanged at the old port (999, towards the VM) to the first delivered at the new (1009).
    assert_eq!(d.blackout.as_ref().unwrap().ns, 10 * MS);
    assert_eq!(tl.last_frame_to_vm_old_port.as_ref().unwrap().ts_ns, 999 * MS);
    assert_eq!(d.blackout.as_ref().unwrap().source, "wire");
    assert_eq!(d.convergence.as_ref().unwrap().ns, 2 * MS); // 1005 → 1007
    assert_eq!(d.max_recovery_tail.as_ref().unwrap().ns, 195 * MS);

    assert_eq!((m.survived, m.aborted, m.unresolved), (2, 0, 0));
    let c1 = conn(m, 40001);
    assert_eq!(c1.state_at_pause, Some(TcpState::Established));
    assert_eq!(c1.retransmits, 1);
    assert_eq!(c1.first_progress_ns, Some(1200 * MS));
    assert_eq!(c1.recovery_tail_ns, Some(195 * MS));
    assert_eq!(c1.base_rto_us, Some(200_000));
    assert!(matches!(c1.proof[0], Event::TcpRetransmit { .. }));
    // Closing normally four seconds later is not an abort.
    assert_eq!(c1.fate, Fate::Survived);
    let c2 = conn(m, 40002);
    assert_eq!(
        (c2.retransmits, c2.fate, c2.first_progress_ns),
        (0, Fate::Survived, None)
    );
}

#[test]
fn quick_migration_fates_with_proof() {
    let a = correlate(&quick_trace());
    let m = &a.migrations[0];
    assert_eq!(m.mode.as_deref(), Some("quick"));
    assert_eq!(
        (m.survived, m.aborted, m.unresolved),
        (1, 4, 0),
        "{:#?}",
        m.connections
    );

    let c1 = conn(m, 41001);
    assert_eq!(
        c1.fate,
        Fate::Aborted {
            reason: AbortReason::Etimedout,
            at_ns: 7200 * MS
        }
    );
    assert_eq!((c1.retransmits, c1.highest_backoff), (4, 3));
    assert_eq!(c1.first_rto_ns, Some(1200 * MS));
    assert!(
        c1.proof
            .iter()
            .any(|e| matches!(e, Event::TcpError { errno: 110, .. }))
    );
    assert!(
        c1.proof
            .iter()
            .any(|e| matches!(e, Event::TcpState { new_state, .. } if *new_state == Some(TcpState::Close)))
    );

    let c2 = conn(m, 41002);
    assert!(
        matches!(
            c2.fate,
            Fate::Aborted {
                reason: AbortReason::RstReceived,
                ..
            }
        ),
        "{c2:#?}"
    );
    assert_eq!(c2.retransmits, 6);
    assert!(c2.proof.iter().any(|e| matches!(e, Event::TcpResetIn { .. })));

    assert!(matches!(
        conn(m, 41003).fate,
        Fate::Aborted {
            reason: AbortReason::RstSent,
            ..
        }
    ));
    let c4 = conn(m, 41004);
    assert!(matches!(
        c4.fate,
        Fate::Aborted {
            reason: AbortReason::ClosedByApplication,
            ..
        }
    ));
    assert_eq!(c4.state_at_pause, Some(TcpState::Established));

    let c5 = conn(m, 41005);
    assert_eq!(c5.fate, Fate::Survived);
    assert_eq!(c5.first_progress_ns, Some(13600 * MS));
    assert_eq!(c5.recovery_tail_ns, Some(4600 * MS));
    assert_eq!(c5.highest_backoff, 5);
}

#[test]
fn connections_opened_and_closed_around_the_window() {
    let before = tuple(42001, VM_IP);
    let during = tuple(42002, VM_IP);
    let after = tuple(42003, VM_IP);
    let mut ev = migration("m", VM_MAC, VM_IP, Mode::Quick, 1000, 3000);
    ev.extend([
        // Closed cleanly before the pause: not judged.
        state(100, before, "SYN_SENT", "ESTABLISHED"),
        state(500, before, "ESTABLISHED", "FIN_WAIT1"),
        state(501, before, "FIN_WAIT1", "FIN_WAIT2"),
        state(600, before, "FIN_WAIT2", "CLOSE"),
        // Opened during the pause: SYN retransmitted, established after resume. Listed, not counted.
        state(1500, during, "CLOSE", "SYN_SENT"),
        rtx(2500, during, 1, 1000),
        state(3100, during, "SYN_SENT", "ESTABLISHED"),
        // Opened long after: not part of this migration.
        state(20_000, after, "CLOSE", "SYN_SENT"),
        state(20_001, after, "SYN_SENT", "ESTABLISHED"),
    ]);
    let a = correlate(&ev);
    let m = &a.migrations[0];
    assert_eq!(m.connections.len(), 1, "{:#?}", m.connections);
    let c = &m.connections[0];
    assert_eq!(c.tuple, during);
    assert!(c.opened_during_window);
    assert_eq!(c.fate, Fate::Survived);
    assert_eq!(c.first_progress_ns, Some(3100 * MS));
    assert_eq!((m.survived, m.aborted), (0, 0));
}

#[test]
fn an_orderly_close_during_the_pause_that_completes_after_resume_survives() {
    let t = tuple(42101, VM_IP);
    let mut ev = migration("m", VM_MAC, VM_IP, Mode::Quick, 1000, 3000);
    ev.extend([
        state(100, t, "SYN_SENT", "ESTABLISHED"),
        state(1500, t, "ESTABLISHED", "FIN_WAIT1"),
        rtx(1700, t, 1, 200),
        rtx(2100, t, 2, 200),
        state(3050, t, "FIN_WAIT1", "FIN_WAIT2"),
        state(3051, t, "FIN_WAIT2", "TIME_WAIT"),
        state(3051, t, "TIME_WAIT", "CLOSE"),
        note(9000),
    ]);
    let m = &correlate(&ev).migrations[0];
    let c = &m.connections[0];
    assert_eq!(c.fate, Fate::Survived, "{c:#?}");
    assert_eq!(c.first_progress_ns, Some(3050 * MS));
    assert!(
        c.progress_basis.contains("FIN_WAIT1 → FIN_WAIT2"),
        "{}",
        c.progress_basis
    );
}

#[test]
fn a_rst_for_a_dead_connection_is_its_epilogue_not_a_new_connection() {
    let t = tuple(42201, VM_IP);
    let mut ev = migration("m", VM_MAC, VM_IP, Mode::Quick, 1000, 9000);
    ev.extend([
        state(100, t, "SYN_SENT", "ESTABLISHED"),
        rtx(1200, t, 1, 200),
        state(7200, t, "ESTABLISHED", "CLOSE"),
        err(7200, t, 110),
        // After resume the VM speaks on the connection: the client kernel, without a socket, answers with a RST.
        Event::TcpResetOut {
            ts_ns: 9100 * MS,
            tcp: TcpCommon { tuple: t, netns: 0 },
            state: None,
        },
    ]);
    let m = &correlate(&ev).migrations[0];
    assert_eq!(m.connections.len(), 1, "{:#?}", m.connections);
    let c = &m.connections[0];
    assert!(matches!(
        c.fate,
        Fate::Aborted {
            reason: AbortReason::Etimedout,
            ..
        }
    ));
    assert_eq!(c.afterwards.len(), 1);
    let text = crate::report::render_text(&correlate(&ev), "t");
    assert!(text.contains("RST sent to the VM at +8.10 s"), "{text}");
}

#[test]
fn reused_four_tuple_is_a_new_connection() {
    let t = tuple(43001, VM_IP);
    let mut ev = migration("m", VM_MAC, VM_IP, Mode::Quick, 1000, 2000);
    ev.extend([
        state(100, t, "SYN_SENT", "ESTABLISHED"),
        err(300, t, 104),
        state(300, t, "ESTABLISHED", "CLOSE"),
        state(400, t, "CLOSE", "SYN_SENT"),
        state(401, t, "SYN_SENT", "ESTABLISHED"),
        rtx(1200, t, 1, 200),
    ]);
    let m = &correlate(&ev).migrations[0];
    // The first incarnation died before the pause: only the second is judged.
    assert_eq!(m.connections.len(), 1);
    assert_eq!(m.connections[0].state_at_pause, Some(TcpState::Established));
    assert_eq!(m.connections[0].fate, Fate::Survived);
}

#[test]
fn back_to_back_migrations_split_the_connection_history() {
    let t = tuple(44001, VM_IP);
    let mut ev = migration("m1", VM_MAC, VM_IP, Mode::Live, 1000, 1010);
    ev.extend(migration("m2", VM_MAC, VM_IP, Mode::Quick, 3000, 3600));
    ev.extend([
        state(100, t, "SYN_SENT", "ESTABLISHED"),
        rtx(1020, t, 1, 200),
        rtx(3200, t, 1, 200),
        rtx(3600, t, 2, 200),
        rtx(4400, t, 3, 200),
        err(6000, t, 110),
        state(6000, t, "ESTABLISHED", "CLOSE"),
    ]);
    let a = correlate(&ev);
    assert_eq!(a.migrations.len(), 2);
    let (m1, m2) = (&a.migrations[0], &a.migrations[1]);
    assert_eq!(m1.id, "m1");
    assert_eq!(m1.connections[0].retransmits, 1);
    assert_eq!(m1.connections[0].fate, Fate::Survived);
    assert_eq!(m1.connections[0].first_progress_ns, Some(1020 * MS));
    assert_eq!(m2.connections[0].retransmits, 3);
    assert!(m2.connections[0].fate.is_aborted());
    assert_eq!((m1.aborted, m2.aborted), (0, 1));
}

#[test]
fn two_vms_at_once_keep_their_connections_apart() {
    let mac2 = "52:54:00:00:00:99";
    let ip2 = Ipv4Addr::new(10, 77, 0, 3);
    let a1 = tuple(45001, VM_IP);
    let b1 = tuple(45002, ip2);
    let mut ev = migration("vm1", VM_MAC, VM_IP, Mode::Quick, 1000, 5000);
    ev.extend(migration("vm2", mac2, ip2, Mode::Live, 1200, 1210));
    ev.extend([
        state(10, a1, "SYN_SENT", "ESTABLISHED"),
        state(10, b1, "SYN_SENT", "ESTABLISHED"),
        rtx(1200, a1, 1, 200),
        rtx(1600, a1, 2, 200),
        err(2200, a1, 110),
        state(2200, a1, "ESTABLISHED", "CLOSE"),
        rtx(1250, b1, 1, 200),
        rarp(5001, VM_MAC, "tapB"),
        rarp(1211, mac2, "tapD"),
    ]);
    let a = correlate(&ev);
    assert_eq!(a.migrations.len(), 2);
    let vm1 = a.migrations.iter().find(|m| m.id == "vm1").unwrap();
    let vm2 = a.migrations.iter().find(|m| m.id == "vm2").unwrap();
    assert_eq!(vm1.connections.len(), 1);
    assert_eq!(vm1.connections[0].tuple, a1);
    assert_eq!(vm1.aborted, 1);
    assert_eq!(vm2.connections.len(), 1);
    assert_eq!(vm2.connections[0].tuple, b1);
    assert_eq!(vm2.survived, 1);
    assert_eq!(vm1.timeline.first_rarp.as_ref().unwrap().port, "tapB");
    assert_eq!(vm2.timeline.first_rarp.as_ref().unwrap().port, "tapD");
}

/// The QMP source's current shape of `stop`, a hold, `migrate`, `cont` on the destination: the STOP, then a quick
/// setup on the same id, rounds and complete; the destination's RESUME on its own id.
fn qmp_quick(split: bool) -> Vec<Event> {
    let mid = if split { "qmp:a.qmp:2" } else { "qmp:a.qmp:1" };
    let mode = if split { Mode::Live } else { Mode::Quick };
    let setup = Phase::Setup {
        mode,
        ram_bytes: 0,
        ips: Vec::new(),
        host: "a.qmp".into(),
        carries_frames: false,
    };
    let round = Phase::Round {
        n: 0,
        pages: 300,
        bytes: 2_000_000,
        bandwidth: 100_000_000,
    };
    let complete = Phase::Complete {
        total_ms: 300.0,
        pause_ms: 300.0,
        bytes: 2_000_000,
    };
    vec![
        mig(1000, "qmp:a.qmp:1", VM_MAC, Role::Source, Phase::Pause, "qmp"),
        mig(3000, mid, VM_MAC, Role::Source, setup, "qmp"),
        mig(3300, mid, VM_MAC, Role::Source, round, "qmp"),
        mig(3300, mid, VM_MAC, Role::Source, complete, "qmp"),
        mig(
            3800,
            "qmp:b.qmp:in1",
            VM_MAC,
            Role::Destination,
            Phase::Resume,
            "qmp",
        ),
        note(9000),
    ]
}

#[test]
fn qmp_stop_then_migrate_is_one_quick_migration() {
    // As the QMP source writes it now, and as older traces split it (the migrate on an id of its own, mode live):
    // both read as one quick migration paused from the STOP to the destination's RESUME.
    for split in [false, true] {
        let a = correlate(&qmp_quick(split));
        assert_eq!(a.migrations.len(), 1, "split {split}: {:#?}", a.migrations);
        let m = &a.migrations[0];
        assert_eq!(m.mode.as_deref(), Some("quick"), "split {split}");
        assert_eq!(m.downtime.vcpu_pause.as_ref().unwrap().ns, 2800 * MS);
        assert_eq!(m.timeline.rounds.len(), 1);
        assert!(m.timeline.complete.is_some());
        assert_eq!(m.outcome, "completed", "split {split}");
    }
    // A stop and cont, then a live migration later: two, the second live.
    let mut ev = vec![
        mig(1000, "qmp:a.qmp:1", VM_MAC, Role::Source, Phase::Pause, "qmp"),
        mig(1200, "qmp:a.qmp:1", VM_MAC, Role::Source, Phase::Resume, "qmp"),
    ];
    let live = qmp_quick(true);
    ev.extend(live[1..4].iter().cloned());
    ev.extend([
        mig(3290, "qmp:a.qmp:2", VM_MAC, Role::Source, Phase::Pause, "qmp"),
        mig(
            3310,
            "qmp:b.qmp:in1",
            VM_MAC,
            Role::Destination,
            Phase::Resume,
            "qmp",
        ),
        note(9000),
    ]);
    let a = correlate(&ev);
    assert_eq!(a.migrations.len(), 2, "{:#?}", a.migrations);
    assert_eq!(a.migrations[1].mode.as_deref(), Some("live"));
    assert_eq!(a.migrations[1].downtime.vcpu_pause.as_ref().unwrap().ns, 20 * MS);
}

#[test]
fn qmp_halves_are_joined_and_labelled() {
    let mut ev = vec![
        mig(1000, "qmp:a.qmp:1", VM_MAC, Role::Source, Phase::Pause, "qmp"),
        mig(
            1025,
            "qmp:b.qmp:in1",
            VM_MAC,
            Role::Destination,
            Phase::Resume,
            "qmp",
        ),
        garp(1030, VM_MAC, VM_IP, "tapB"),
    ];
    let t = tuple(46001, VM_IP);
    ev.extend([
        state(1, t, "SYN_SENT", "ESTABLISHED"),
        rtx(1200, t, 1, 200),
        note(9000),
    ]);
    let a = correlate(&ev);
    assert_eq!(a.migrations.len(), 1, "{:#?}", a.migrations);
    let m = &a.migrations[0];
    assert_eq!(m.source, PauseSource::Qmp);
    assert_eq!(m.downtime.vcpu_pause.as_ref().unwrap().ns, 25 * MS);
    assert_eq!(m.downtime.vcpu_pause.as_ref().unwrap().source, "qmp");
    // The VM's IP came from its GARP.
    assert_eq!(m.ips, vec![IpAddr::from(VM_IP)]);
    assert_eq!(m.survived, 1);
}

#[test]
fn a_neighbor_advert_is_the_announce_and_names_the_vms_ipv6_address() {
    let vm6: std::net::Ipv6Addr = "fd00:77::10".parse().unwrap();
    let mut ev = vec![
        mig(1000, "qmp:a.qmp:1", VM_MAC, Role::Source, Phase::Pause, "qmp"),
        mig(
            1025,
            "qmp:b.qmp:in1",
            VM_MAC,
            Role::Destination,
            Phase::Resume,
            "qmp",
        ),
        neighbor_advert(1030, VM_MAC, vm6, "tapB"),
        // Another host's advertisement names no address of the VM.
        neighbor_advert(1031, "52:54:00:99:99:99", "fd00:77::99".parse().unwrap(), "tapB"),
    ];
    let t = FourTuple {
        saddr: std::net::IpAddr::V6("fd00:77::1".parse().unwrap()),
        sport: 46002,
        daddr: std::net::IpAddr::V6(vm6),
        dport: 7,
    };
    ev.extend([
        state(1, t, "SYN_SENT", "ESTABLISHED"),
        rtx(1200, t, 1, 200),
        note(9000),
    ]);
    let a = correlate(&ev);
    assert_eq!(a.migrations.len(), 1, "{:#?}", a.migrations);
    let m = &a.migrations[0];
    let na = m.timeline.first_na.as_ref().expect("the NA is the announce");
    assert_eq!((na.ts_ns, na.port.as_str()), (1030 * MS, "tapB"));
    assert!(m.timeline.first_garp.is_none());
    assert!(
        !m.warnings.iter().any(|w| w.contains("no RARP or GARP")),
        "{:?}",
        m.warnings
    );
    assert_eq!(
        m.ips,
        vec![std::net::IpAddr::V6(vm6)],
        "the VM's address came from its NA"
    );
    assert_eq!((m.connections.len(), m.survived), (1, 1), "{:#?}", m.connections);
    // A report without an NA keeps its JSON as before: no `first_na` key.
    let plain = correlate(&live_trace());
    let json = serde_json::to_value(&plain.migrations[0].timeline).unwrap();
    assert!(json.get("first_na").is_none(), "{json}");
    assert!(serde_json::to_value(&m.timeline).unwrap()["first_na"].is_object());
}

#[test]
fn wire_inference_without_any_pause_source() {
    let t = tuple(47001, VM_IP);
    let ev = vec![
        seen(0, VM_MAC, "tapA", Direction::Ingress),
        seen(0, VM_MAC, "upA", Direction::Ingress),
        stats(900, VM_MAC, "tapA", Direction::Ingress, 90, 0, 899),
        stats(900, VM_MAC, "upA", Direction::Ingress, 90, 0, 899),
        stats(1000, VM_MAC, "tapA", Direction::Ingress, 91, 0, 950),
        stats(1000, VM_MAC, "upA", Direction::Ingress, 91, 0, 950),
        rarp(1300, VM_MAC, "tapB"),
        seen(1300, VM_MAC, "tapB", Direction::Ingress),
        seen(1300, VM_MAC, "upB", Direction::Ingress),
        garp(1301, VM_MAC, VM_IP, "tapB"),
        state(1, t, "SYN_SENT", "ESTABLISHED"),
        rtx(1400, t, 1, 200),
        note(9000),
    ];
    let a = correlate(&ev);
    assert_eq!(a.migrations.len(), 1, "{:#?}", a.migrations);
    let m = &a.migrations[0];
    assert_eq!(m.source, PauseSource::Wire);
    let p = m.downtime.vcpu_pause.as_ref().unwrap();
    assert_eq!((p.ns, p.source.as_str()), (350 * MS, "wire"));
    assert!(p.basis.contains("inferred"));
    assert_eq!(m.timeline.first_vm_frame_new_port.as_ref().unwrap().port, "tapB");
    assert_eq!(m.survived, 1);

    // A migrator window for the same move suppresses the inference.
    let mut with_migrator = ev.clone();
    with_migrator.extend(migration("real", VM_MAC, VM_IP, Mode::Live, 960, 1290));
    let a = correlate(&with_migrator);
    assert_eq!(a.migrations.len(), 1);
    assert_eq!(a.migrations[0].source, PauseSource::Migrator);
}

#[test]
fn an_idle_vm_reappearing_on_its_own_ports_is_not_a_move() {
    let ev = vec![
        seen(0, VM_MAC, "tapA", Direction::Ingress),
        seen(0, VM_MAC, "upA", Direction::Ingress),
        seen(5000, VM_MAC, "tapA", Direction::Ingress),
        seen(5000, VM_MAC, "upA", Direction::Ingress),
    ];
    let a = correlate(&ev);
    assert!(a.migrations.is_empty());
    assert!(a.warnings.iter().any(|w| w.contains("no migration found")));
}

#[test]
fn losses_truncation_and_skipped_lines_are_warnings() {
    let mut ev = live_trace();
    ev.push(Event::Loss {
        ts_ns: 1001 * MS,
        cpu: 0,
        count: 7,
    });
    ev.push(Event::Note {
        ts_ns: 1002 * MS,
        level: "warn".into(),
        message: "skipped malformed QMP line from /run/a.qmp line 4: EOF".into(),
    });
    let trace = Trace {
        header: None,
        events: ev,
        truncated: true,
        skipped: vec![(12, "expected value".into())],
        ..Trace::default()
    };
    let a = analyse(&trace);
    assert_eq!(a.lost_events, 7);
    assert!(a.truncated);
    let all = a.warnings.join("\n");
    assert!(all.contains("7 events were lost"), "{all}");
    assert!(all.contains("truncated"), "{all}");
    assert!(all.contains("trace line 12 skipped"), "{all}");
    assert!(all.contains("/run/a.qmp line 4"), "{all}");
}

#[test]
fn a_migration_still_paused_when_the_trace_ends() {
    let t = tuple(48001, VM_IP);
    let mut ev = vec![
        setup(500, "cut", VM_MAC, VM_IP, Mode::Quick),
        mig(1000, "cut", VM_MAC, Role::Source, Phase::Pause, "migrator"),
        state(1, t, "SYN_SENT", "ESTABLISHED"),
    ];
    ev.extend([rtx(1200, t, 1, 200), rtx(1600, t, 2, 200)]);
    let a = correlate(&ev);
    let m = &a.migrations[0];
    assert_eq!(m.outcome, "in progress when the trace ended");
    assert_eq!(m.connections[0].fate, Fate::Unresolved);
    assert!(m.downtime.vcpu_pause.is_none());
}

#[test]
fn a_broadcast_on_a_rarely_used_port_while_the_vm_keeps_talking_is_not_a_move() {
    // The VM talks continuously on tapA (sampled every 100 ms); its broadcasts also reach upB, rarely. One of them
    // shows up on upB 60 ms after the last sampled frame: a candidate move, which tapA's next frames refute.
    let mut ev = vec![
        seen(0, VM_MAC, "tapA", Direction::Ingress),
        seen(0, VM_MAC, "upB", Direction::Ingress),
    ];
    for k in 1..=40u64 {
        ev.push(stats(
            k * 100,
            VM_MAC,
            "tapA",
            Direction::Ingress,
            k * 10,
            0,
            k * 100 - 1,
        ));
    }
    ev.push(seen(3060, VM_MAC, "upB", Direction::Ingress));
    let a = correlate(&ev);
    assert!(a.migrations.is_empty(), "{:#?}", a.migrations);
}

#[test]
fn an_idle_connection_gets_the_data_plane_restart_as_context() {
    let a = correlate(&live_trace());
    let c2 = a.migrations[0]
        .connections
        .iter()
        .find(|c| c.tuple.sport == 40002)
        .unwrap();
    assert!(
        c2.progress_basis
            .contains("traffic towards the VM flowed again at resume+4.0 ms (tapB)"),
        "{}",
        c2.progress_basis
    );
    assert_eq!(c2.first_progress_ns, None, "not a per-connection figure");
}

#[test]
fn rounds_reported_by_both_ends_count_once() {
    let round = |ts, n, role| {
        mig(
            ts,
            "m",
            VM_MAC,
            role,
            Phase::Round {
                n,
                pages: 10,
                bytes: 40960,
                bandwidth: 1,
            },
            "migrator",
        )
    };
    let mut ev = migration("m", VM_MAC, VM_IP, Mode::Live, 1000, 1010);
    ev.retain(|e| !matches!(e, Event::Migration { ev, .. } if matches!(ev.phase, Phase::Round { .. })));
    ev.extend([
        round(600, 0, Role::Source),
        round(601, 0, Role::Destination),
        round(800, 1, Role::Destination),
        round(799, 1, Role::Source),
        round(1005, 2, Role::Source),
    ]);
    let m = &correlate(&ev).migrations[0];
    let ns: Vec<(u32, u64)> = m.timeline.rounds.iter().map(|r| (r.n, r.ts_ns / MS)).collect();
    assert_eq!(ns, vec![(0, 600), (1, 799), (2, 1005)]);
}

#[test]
fn nonsense_input_does_not_panic() {
    // A resume before its pause, a pause without anything, retransmits with absurd fields, MACs in upper case.
    let t = tuple(49001, VM_IP);
    let mut ev = vec![
        mig(
            5000,
            "odd",
            &VM_MAC.to_uppercase(),
            Role::Destination,
            Phase::Resume,
            "migrator",
        ),
        mig(6000, "odd", VM_MAC, Role::Source, Phase::Pause, "migrator"),
        mig(7000, "lonely", "", Role::Source, Phase::Pause, "qmp"),
        state(1, t, "SYN_SENT", "ESTABLISHED"),
        Event::TcpRetransmit {
            ts_ns: 6100 * MS,
            tcp: TcpCommon { tuple: t, netns: 1 },
            state: None,
            retransmits: u32::MAX,
            backoff: u32::MAX,
            rto_us: u64::MAX / 2,
            srtt_us: u64::MAX,
            retransmit_kind: None,
        },
        stats(6200, VM_MAC, "tapA", Direction::Egress, 5, 9000, 1),
        fdb(6300, "br", "p", VM_MAC),
    ];
    ev.push(note(u64::MAX / MS));
    let a = correlate(&ev);
    let _ = crate::report::render_text(&a, "odd");
    let _ = crate::report::svg::render(&a);
    let _ = crate::report::compare::render(&a, Some(&crate::whatif::Settings::default().into()));
    let _ = crate::whatif::whatif(
        &a,
        &crate::whatif::Settings::default(),
        &crate::whatif::Settings::default(),
    );
    let _ = crate::export::perfetto::encode(&Trace::default(), &a);
}

#[test]
fn a_connection_still_retransmitting_when_the_trace_ends_says_when_the_next_was_due() {
    let t = tuple(48002, VM_IP);
    let mut ev = migration("short", VM_MAC, VM_IP, Mode::Quick, 1000, 2000);
    ev.push(state(1, t, "SYN_SENT", "ESTABLISHED"));
    // The third retransmission (RTO 800 ms) went out after resume; the next was due by 2400 + 1600 (+ slack 400).
    ev.extend([rtx(1200, t, 1, 200), rtx(1600, t, 2, 200), rtx(2400, t, 3, 200)]);
    let a = correlate(&ev);
    let c = &a.migrations[0].connections[0];
    assert_eq!(c.fate, Fate::Unresolved);
    assert_eq!(
        c.progress_basis,
        "survived so far: no abort by the trace's end (400.0 ms after resume); retransmission #3 came at \
         resume+400.0 ms, the next was due by resume+2.40 s"
    );
}

#[test]
fn a_watch_that_observed_past_the_next_due_retransmission_judges_the_connection_recovered() {
    // The live gate knows it was watching until now, later than the last event: a retransmission that was due and
    // never came means the last one got through. The same events with only the trace's end stay unresolved.
    let t = tuple(48003, VM_IP);
    let mut ev = migration("short", VM_MAC, VM_IP, Mode::Quick, 1000, 2000);
    ev.push(state(1, t, "SYN_SENT", "ESTABLISHED"));
    ev.extend([rtx(1200, t, 1, 200), rtx(1600, t, 2, 200), rtx(2400, t, 3, 200)]);
    let before_due = crate::correlate::analyse_events_until(&ev, 4000 * MS);
    assert_eq!(before_due.migrations[0].connections[0].fate, Fate::Unresolved);
    let after_due = crate::correlate::analyse_events_until(&ev, 5000 * MS);
    let c = &after_due.migrations[0].connections[0];
    assert_eq!(c.fate, Fate::Survived, "{}", c.progress_basis);
    assert_eq!(after_due.end_ns, 5000 * MS);
}
