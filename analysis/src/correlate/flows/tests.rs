//! Wire verdicts on synthetic segment sequences: timer backoff, a fast retransmit, a tail loss probe, a reset in the
//! window, a client that gave up, a flow picked up mid-stream, and the agreement with the sockets' verdict.

use migevents::Mode;

use super::*;
use crate::{
    correlate::{MigrationReport, correlate},
    fixtures::*,
    trace::FlowSide::{Peer, Vm},
};

const PORT: u16 = 41000;

/// A quick migration of the VM paused at `pause_ms` and resumed at `resume_ms`, plus `flow` and a note at 20 s.
fn judged(pause_ms: u64, resume_ms: u64, flow: Vec<Event>) -> MigrationReport {
    let mut ev = migration("q1", VM_MAC, VM_IP, Mode::Quick, pause_ms, resume_ms);
    ev.extend(flow);
    ev.push(note(20_000));
    let a = correlate(&ev);
    assert_eq!(a.migrations.len(), 1, "{:#?}", a.migrations);
    a.migrations.into_iter().next().unwrap()
}

fn only(m: &MigrationReport) -> &ConnectionVerdict {
    assert_eq!(m.connections.len(), 1, "{:#?}", m.connections);
    &m.connections[0]
}

fn kinds(side: &SideRetransmits) -> Vec<Option<RetransmitKind>> {
    side.retransmits.iter().map(|r| r.kind).collect()
}

/// The client's head segment, resent after `silence` ms.
fn head(silence: u64) -> FlowSeg {
    FlowSeg::data(Peer, PORT, 1000, 100).silence(silence)
}

#[test]
fn rto_backoff_200_400_800_then_progress_after_resume() {
    let open = FlowSeg::data(Peer, PORT, 900, 100);
    let m = judged(
        1000,
        2000,
        vec![
            flow_open(100, &open, "uplink"),
            flow_open(100, &open, "tapA"),
            flow_rtx(1200, &head(200), "uplink"),
            // The same retransmission seen on a second port counts once.
            flow_rtx(1200, &head(200), "br-port"),
            flow_rtx(1600, &head(400), "uplink"),
            flow_rtx(2400, &head(800), "uplink"),
            flow_progress(2401, &FlowSeg::data(Vm, PORT, 1, 0), "tapB"),
        ],
    );
    let c = only(&m);
    let w = c.wire.as_ref().unwrap();
    assert_eq!(c.basis, Basis::Wire);
    assert_eq!(kinds(&w.peer), vec![Some(RetransmitKind::Rto); 3]);
    assert_eq!((w.peer.rto_us, w.peer.backoff), (Some(200_000), 2));
    assert_eq!(c.fate, Fate::Survived);
    assert_eq!(c.first_progress_ns, Some(2401 * MS));
    assert_eq!(w.progress_by, Some(Vm));
    assert_eq!(c.retransmit_ns, vec![1200 * MS, 1600 * MS, 2400 * MS]);
    assert_eq!((c.base_rto_us, c.highest_backoff), (Some(200_000), 2));
    assert_eq!(c.first_rto_ns, Some(1200 * MS));
    assert!(!c.proof.is_empty());
}

#[test]
fn a_client_whose_backoff_ends_before_the_resume_gave_up() {
    let m = judged(
        1000,
        8000,
        vec![
            flow_open(100, &FlowSeg::data(Peer, PORT, 900, 100), "uplink"),
            flow_rtx(1200, &head(200), "uplink"),
            flow_rtx(1600, &head(400), "uplink"),
            flow_rtx(2400, &head(800), "uplink"),
            // After the resume the VM speaks; the client's kernel, which had given up, answers with a RST.
            flow_rst(8010, &FlowSeg::data(Peer, PORT, 1000, 0).flags(0x04), "uplink"),
        ],
    );
    let c = only(&m);
    let w = c.wire.as_ref().unwrap();
    // The next retransmission was due at 2400 + 2 × 800 = 4000 ms, long before the resume.
    assert_eq!(w.peer.next_due_ns, Some(4000 * MS));
    assert_eq!(
        c.fate,
        Fate::Aborted {
            reason: AbortReason::Etimedout,
            at_ns: 4000 * MS
        }
    );
    assert!(
        w.basis.contains("gave up") && w.basis.contains("reset the connection"),
        "{}",
        w.basis
    );
    assert!(
        c.proof.iter().any(|e| matches!(e, Event::FlowReset { .. })),
        "{:#?}",
        c.proof
    );
    assert_eq!(c.retransmits, 3);
}

#[test]
fn a_fast_retransmit_and_a_tail_loss_probe_are_told_from_timer_retransmissions() {
    // Fast: the peer's ACK point resent 2 ms after the sender's previous segment, more data outstanding behind it.
    let fast = FlowSeg::data(Peer, PORT, 1000, 100)
        .seq_end(5000)
        .peer_ack(1000)
        .silence(2);
    let s = side_retransmits(&[(10 * MS, &fast.on("uplink"))]);
    assert_eq!(kinds(&s), vec![Some(RetransmitKind::Fast)]);
    assert_eq!(s.rto_us, None, "no timer series, no RTO");

    // TLP: the sender's last segment resent while earlier ones are unacknowledged; then the timer, 200 ms later.
    let tlp = FlowSeg::data(Peer, PORT, 4900, 100)
        .seq_end(5000)
        .peer_ack(1000)
        .silence(30);
    let rto = FlowSeg::data(Peer, PORT, 1000, 100)
        .seq_end(5000)
        .peer_ack(1000)
        .silence(200);
    let s = side_retransmits(&[(30 * MS, &tlp.on("uplink")), (230 * MS, &rto.on("uplink"))]);
    assert_eq!(
        kinds(&s),
        vec![Some(RetransmitKind::Tlp), Some(RetransmitKind::Rto)]
    );
    assert_eq!((s.rto_us, s.backoff), (Some(200_000), 0));
    assert_eq!(s.next_due_ns, Some(630 * MS));

    // A lone segment resent after a long silence is the timer's; one after a short one is not known.
    let s = side_retransmits(&[(300 * MS, &head(300).on("uplink"))]);
    assert_eq!(kinds(&s), vec![Some(RetransmitKind::Rto)]);
    let s = side_retransmits(&[(300 * MS, &head(60).on("uplink"))]);
    assert_eq!(kinds(&s), vec![None]);
}

#[test]
fn a_reset_during_the_window_aborts_and_says_who_sent_it() {
    let m = judged(
        1000,
        3000,
        vec![
            flow_open(100, &FlowSeg::data(Peer, PORT, 900, 100), "uplink"),
            flow_rtx(1200, &head(200), "uplink"),
            flow_rst(1500, &FlowSeg::data(Peer, PORT, 1100, 0).flags(0x04), "uplink"),
        ],
    );
    let c = only(&m);
    assert_eq!(
        c.fate,
        Fate::Aborted {
            reason: AbortReason::RstSent,
            at_ns: 1500 * MS
        }
    );
    let r = c.wire.as_ref().unwrap().reset.as_ref().unwrap();
    assert_eq!((r.by, r.during_window), (Peer, true));
}

#[test]
fn a_flow_picked_up_mid_stream_and_silent_across_the_window_survived() {
    // No SYN: the tracker picked the flow up from a data segment; nothing was in flight during the pause.
    let m = judged(
        1000,
        1100,
        vec![flow_open(500, &FlowSeg::data(Vm, PORT, 77_000, 1400), "tapA")],
    );
    let c = only(&m);
    assert_eq!(c.fate, Fate::Survived);
    assert!(c.wire.as_ref().unwrap().silent);
    assert!(!c.opened_during_window);
    assert_eq!((c.retransmits, c.first_progress_ns), (0, None));
}

#[test]
fn retransmissions_pending_and_nothing_after_the_resume_is_unresolved() {
    let mut ev = migration("q1", VM_MAC, VM_IP, Mode::Quick, 1000, 2000);
    ev.extend([
        flow_open(100, &FlowSeg::data(Peer, PORT, 900, 100), "uplink"),
        flow_rtx(1200, &head(200), "uplink"),
        flow_rtx(1600, &head(400), "uplink"),
        note(2100),
    ]);
    let a = correlate(&ev);
    assert_eq!(a.migrations[0].connections[0].fate, Fate::Unresolved);
}

#[test]
fn with_both_bases_the_socket_verdict_carries_the_wire_view_and_disagreements_are_flagged() {
    let t = tuple(PORT, VM_IP);
    let flow = vec![
        flow_open(100, &FlowSeg::data(Peer, PORT, 900, 100), "uplink"),
        flow_rtx(1200, &head(200), "uplink"),
        flow_rtx(1600, &head(400), "uplink"),
        flow_rtx(2400, &head(800), "uplink"),
        // The client's kernel answers the resumed VM with a RST: it had given up.
        flow_rst(8010, &FlowSeg::data(Peer, PORT, 1000, 0).flags(0x04), "uplink"),
    ];
    let sockets = [
        state(50, t, "SYN_SENT", "ESTABLISHED"),
        rtx(1200, t, 1, 200),
        rtx(1600, t, 2, 200),
        rtx(2400, t, 3, 200),
    ];
    // The client socket timed out at 4000 ms, as the wire infers.
    let mut agreeing = flow.clone();
    agreeing.extend(sockets.iter().cloned());
    agreeing.extend([state(4000, t, "ESTABLISHED", "CLOSE"), err(4000, t, 110)]);
    let m = judged(1000, 8000, agreeing);
    let c = only(&m);
    assert_eq!(c.basis, Basis::Sockets);
    assert_eq!(c.wire_agrees, Some(true));
    assert_eq!(c.wire.as_ref().unwrap().fate, c.fate);
    assert!(
        m.warnings.iter().all(|w| !w.contains("the wire says")),
        "{:?}",
        m.warnings
    );

    // Here the socket lives on (no error, no close) while the wire saw the client stop and reset.
    let mut disagreeing = flow;
    disagreeing.extend(sockets.iter().cloned());
    let m = judged(1000, 8000, disagreeing);
    let c = only(&m);
    assert_eq!(c.wire_agrees, Some(false));
    assert!(
        m.warnings
            .iter()
            .any(|w| w.contains("the wire says aborted: ETIMEDOUT")),
        "{:?}",
        m.warnings
    );
}

/// Traces of the testbed scenario recorded with `--tcp both` (a live migration, then a 6 s quick one under the
/// windows-2003 client profile): in the first, three of the four clients timed out; in the second, two did, and two
/// whose backoff had ended before the resume were kept by the resumed VM's ACK, which came before their late timer.
/// Each client socket's verdict and the wire's agree, and the wire's inferred abort times are the sockets' to within
/// 20 ms.
#[test]
fn on_kernel_traces_the_wire_agrees_with_every_socket() {
    for (name, aborted) in [("kernel_demo_both.trace", 3), ("kernel_both_late_timer.trace", 2)] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/flows")
            .join(name);
        let a = crate::correlate::analyse(&crate::trace::read_trace(&path).unwrap());
        assert_eq!(a.migrations.len(), 2, "{name}");
        let mut judged = 0;
        for m in &a.migrations {
            for c in m.connections.iter().filter(|c| c.basis == Basis::Sockets) {
                let w = c
                    .wire
                    .as_ref()
                    .unwrap_or_else(|| panic!("{name}: no wire view: {c:#?}"));
                assert_eq!(c.wire_agrees, Some(true), "{name}: {}: {c:#?}", m.id);
                if let (Fate::Aborted { at_ns: s, .. }, Fate::Aborted { at_ns: w, .. }) = (&c.fate, &w.fate) {
                    assert!(s.abs_diff(*w) < 20 * MS, "{name}: socket {s}, wire {w}");
                }
                judged += 1;
            }
        }
        assert_eq!(judged, 8, "{name}");
        let quick = &a.migrations[1];
        assert_eq!(quick.aborted, aborted, "{name}");
        for c in quick.connections.iter().filter(|c| c.basis == Basis::Sockets) {
            let w = c.wire.as_ref().unwrap();
            // Each client first sent a tail loss probe, then its timer took over, doubling from ~90 ms.
            assert_eq!(
                w.peer.retransmits[0].kind,
                Some(RetransmitKind::Tlp),
                "{name}: {w:#?}"
            );
            assert!(
                w.peer.retransmits[1..]
                    .iter()
                    .all(|r| r.kind == Some(RetransmitKind::Rto))
            );
            assert!(
                w.peer.rto_us.is_some_and(|us| (80_000..100_000).contains(&us)),
                "{name}: {w:#?}"
            );
        }
    }
}

/// `whatif` replays a wire verdict as a socket's, from the client's retransmissions and the RTO the wire inferred:
/// a client whose backoff (200/400/800 ms) stopped 3 s after its first retransmission is what `tcp_retries2` = 3
/// gives from a 200 ms RTO; the defaults would have carried it through the 7 s outage.
#[test]
fn whatif_replays_a_wire_verdict_from_the_inferred_rto() {
    use crate::whatif::{Settings, whatif};
    let mut ev = migration("q1", VM_MAC, VM_IP, Mode::Quick, 1000, 8000);
    ev.extend([
        flow_open(100, &FlowSeg::data(Peer, PORT, 900, 100), "uplink"),
        flow_rtx(1200, &head(200), "uplink"),
        flow_rtx(1600, &head(400), "uplink"),
        flow_rtx(2400, &head(800), "uplink"),
        flow_rst(8010, &FlowSeg::data(Peer, PORT, 1000, 0).flags(0x04), "uplink"),
        note(20_000),
    ]);
    let a = correlate(&ev);
    let c = &a.migrations[0].connections[0];
    assert_eq!((c.basis, c.base_rto_us), (Basis::Wire, Some(200_000)));
    let in_force = Settings {
        tcp_retries2: 3,
        ..Settings::default()
    };
    let w = whatif(&a, &in_force, &Settings::default());
    assert_eq!((w.agree, w.judged), (1, 1), "{}", crate::whatif::render_text(&w));
    let row = &w.rows[0];
    assert!(row.baseline_agrees && row.observed.is_aborted());
    assert!(
        !matches!(row.scenario, crate::whatif::Prediction::Aborts { .. }),
        "{}",
        crate::whatif::render_text(&w)
    );
}

/// A client whose backoff ended before the resume but whose timer fired late: the resumed VM's ACK of the segments
/// held during the pause came first, and the client went on (progress, no RST). It survived.
#[test]
fn a_late_timer_overtaken_by_the_resumed_vm_survives() {
    let m = judged(
        1000,
        4200,
        vec![
            flow_open(100, &FlowSeg::data(Peer, PORT, 900, 100), "uplink"),
            flow_rtx(1200, &head(200), "uplink"),
            flow_rtx(1600, &head(400), "uplink"),
            flow_rtx(2400, &head(800), "uplink"),
            flow_progress(4210, &FlowSeg::data(Vm, PORT, 1, 0), "tapB"),
            flow_progress(4215, &FlowSeg::data(Peer, PORT, 1100, 100), "uplink"),
        ],
    );
    let c = only(&m);
    assert_eq!(c.wire.as_ref().unwrap().peer.next_due_ns, Some(4000 * MS));
    assert_eq!(c.fate, Fate::Survived, "{:#?}", c.wire);
    assert_eq!(c.first_progress_ns, Some(4210 * MS));
}
