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

/// One side's records at `(ms, segment, is a retransmission)`, classified from 0.
fn classify(recs: &[(u64, FlowSeg, bool)]) -> SideRetransmits {
    let segs: Vec<FlowSegment> = recs.iter().map(|(_, s, _)| s.on("uplink")).collect();
    let sent: Vec<Sent<'_>> = recs
        .iter()
        .zip(&segs)
        .map(|((ms, _, retransmit), seg)| Sent {
            ts_ns: ms * MS,
            seg,
            retransmit: *retransmit,
        })
        .collect();
    side_retransmits(&sent, 0)
}

/// The client's outstanding data from 1000 to `end`, resent from the head as one segment after `silence` ms, the
/// sender having last sent new data `gap` ms before.
fn collapsed(end: u32, silence: u64, gap: u64) -> FlowSeg {
    FlowSeg::data(Peer, PORT, 1000, end - 1000)
        .seq_end(end)
        .peer_ack(1000)
        .silence(silence)
        .gap(gap)
}

fn assert_near(got: Option<u64>, want_us: u64, within: f64, what: &str) {
    let got = got.unwrap_or_else(|| panic!("{what}: no value"));
    let r = got as f64 / want_us as f64;
    assert!(
        (1.0 - within..=1.0 + within).contains(&r),
        "{what}: {got} µs against {want_us} µs"
    );
}

/// A client that keeps writing while its peer is silent: the head (sent at 100 ms) waits for the timer, but new
/// data went out 2 ms before each timer retransmission, so every one of them comes right after other segments.
/// They are the timer's all the same (no duplicate ACK evidence, not the tail probe): the RTO is 200 ms, not the
/// 400 ms of a series read from its second retransmission; each firing 20 ms late is fitted too.
#[test]
fn new_data_just_before_the_first_timer_retransmission_does_not_hide_it() {
    let rto = 200;
    let late = 20;
    let mut t = 100 + rto + late;
    let mut recs = vec![(100, FlowSeg::data(Peer, PORT, 1000, 8), false)];
    for k in 0..4u32 {
        let end = 1008 + 8 * (k + 1);
        recs.push((t, collapsed(end, 2, 2), true));
        t += (rto << (k + 1)) + late;
    }
    let s = classify(&recs);
    assert_eq!(kinds(&s), vec![Some(RetransmitKind::Rto); 4], "{s:#?}");
    assert_near(s.rto_us, rto * 1000, 0.01, "RTO");
    assert_eq!(s.backoff, 3);
    // The next was due 16 RTOs (and the same lateness) after the last.
    assert_eq!(s.next_due_ns.map(|d| d / MS), Some(t));

    // Without the record of the head's first sending, the intervals alone give the same RTO.
    let s = classify(&recs[1..]);
    assert_eq!(kinds(&s), vec![Some(RetransmitKind::Rto); 4]);
    assert_near(s.rto_us, rto * 1000, 0.01, "RTO from the intervals");

    // Two timer retransmissions: the head's first sending dates the first one, so the fit still sees the lateness.
    let s = classify(&recs[..3]);
    assert_eq!(kinds(&s), vec![Some(RetransmitKind::Rto); 2]);
    assert_near(
        s.rto_us,
        rto * 1000,
        0.01,
        "RTO from two retransmissions and the first wait",
    );
}

/// The flow tracker reads `gap_ns` and `silence_ns` from the coarse clock (4 ms ticks at 250 Hz); the intervals
/// between records are precise. A timer series whose waits are off by up to a tick still gives the RTO.
#[test]
fn the_coarse_clock_of_the_waits_does_not_move_the_inferred_rto() {
    let times = [291, 595, 1203, 2419];
    let recs: Vec<(u64, FlowSeg, bool)> = times
        .iter()
        .zip([148, 304, 608, 1216])
        .map(|(&t, coarse)| (t, head(coarse), true))
        .collect();
    let s = classify(&recs);
    assert_eq!(kinds(&s), vec![Some(RetransmitKind::Rto); 4], "{s:#?}");
    assert_near(s.rto_us, 152_000, 0.01, "RTO");
}

/// A tail loss probe resends the newest segment while older data is unacknowledged; the timer then resends from
/// the head. With a single segment outstanding the probe is also the head: the probe waits one RTO (Linux caps
/// the probe timeout at the RTO) and the timer fires one RTO after it, where the timer's own next would come two
/// RTOs later.
#[test]
fn a_tail_loss_probe_then_the_timer() {
    let probe = FlowSeg::data(Peer, PORT, 4900, 100)
        .seq_end(5000)
        .peer_ack(1000)
        .silence(30);
    let s = classify(&[
        (30, probe, true),
        (230, collapsed(5000, 200, 230), true),
        (630, collapsed(5000, 400, 630), true),
    ]);
    assert_eq!(
        kinds(&s),
        vec![
            Some(RetransmitKind::Tlp),
            Some(RetransmitKind::Rto),
            Some(RetransmitKind::Rto)
        ]
    );
    assert_near(s.rto_us, 200_000, 0.01, "RTO after a probe of the tail");
    assert_eq!(s.next_due_ns, Some(1430 * MS));

    let s = classify(&[
        (208, head(208), true),
        (416, head(208), true),
        (832, head(416), true),
        (1664, head(832), true),
    ]);
    assert_eq!(
        kinds(&s),
        vec![
            Some(RetransmitKind::Tlp),
            Some(RetransmitKind::Rto),
            Some(RetransmitKind::Rto),
            Some(RetransmitKind::Rto)
        ]
    );
    assert_near(s.rto_us, 208_000, 0.01, "RTO after a probe of the only segment");
    assert_eq!(s.backoff, 2);

    // The timer's own first retransmission of a single segment: the next comes two RTOs later.
    let s = classify(&[(200, head(200), true), (600, head(400), true)]);
    assert_eq!(kinds(&s), vec![Some(RetransmitKind::Rto); 2]);
    assert_near(s.rto_us, 200_000, 0.01, "RTO");
}

/// A fast retransmit answers duplicate ACKs: the receiver is alive and reports, with SACK, the data behind the
/// hole. The sender resends the head and then the other holes at once; a hole resent before any timer
/// retransmission (neither the head nor the tail) is that evidence. A head resent soon after new data without it
/// is not taken for a fast retransmit.
#[test]
fn a_fast_retransmit_needs_the_evidence_of_duplicate_acks() {
    let at = |seq: u32| {
        FlowSeg::data(Peer, PORT, seq, 100)
            .seq_end(5000)
            .peer_ack(1000)
            .silence(1)
    };
    let s = classify(&[(50, at(1000), true), (51, at(2000), true), (52, at(3000), true)]);
    assert_eq!(kinds(&s), vec![Some(RetransmitKind::Fast); 3], "{s:#?}");
    assert_eq!(s.rto_us, None, "no timer series, no RTO");

    // The same head retransmission 1 ms after new data, alone: not fast (no duplicate ACK evidence); the timer's,
    // but its wait is unknown, so no RTO is inferred from it.
    let s = classify(&[(50, at(1000), true)]);
    assert_eq!(kinds(&s), vec![Some(RetransmitKind::Rto)]);
    assert_eq!(s.rto_us, None);

    // A lone segment resent after a long wait is the timer's; after a short one the evidence is too short.
    let s = classify(&[(300, head(300), true)]);
    assert_eq!(kinds(&s), vec![Some(RetransmitKind::Rto)]);
    assert_eq!(s.rto_us, Some(300_000));
    let s = classify(&[(300, head(60), true)]);
    assert_eq!(kinds(&s), vec![None]);
}

/// A windows-2003 style client (5 retransmissions from an 80 ms RTO, then ETIMEDOUT): a probe at the RTO, then the
/// timer doubling from 86 ms, a few ms late each time; the resumed VM's segment is answered with a RST.
#[test]
fn a_windows_2003_schedule_of_five_retransmissions_gave_up() {
    let mut flow = vec![
        flow_open(100, &FlowSeg::data(Peer, PORT, 900, 100), "uplink"),
        flow_rtx(1088, &head(88), "uplink"),
    ];
    let mut t = 1088;
    for k in 0..5u64 {
        let interval = (86 << k) + 2;
        t += interval;
        flow.push(flow_rtx(t, &head(interval), "uplink"));
    }
    flow.push(flow_rst(
        8010,
        &FlowSeg::data(Peer, PORT, 1000, 0).flags(0x04),
        "uplink",
    ));
    let m = judged(1000, 8000, flow);
    let c = only(&m);
    let w = c.wire.as_ref().unwrap();
    assert_eq!(w.peer.retransmits[0].kind, Some(RetransmitKind::Tlp));
    assert!(
        w.peer.retransmits[1..]
            .iter()
            .all(|r| r.kind == Some(RetransmitKind::Rto))
    );
    assert_near(w.peer.rto_us, 86_000, 0.01, "RTO");
    assert_eq!(w.peer.backoff, 4);
    let due = w.peer.next_due_ns.unwrap();
    assert!(due.abs_diff((t + 32 * 86 + 2) * MS) < MS, "next due at {due}");
    assert_eq!(
        c.fate,
        Fate::Aborted {
            reason: AbortReason::Etimedout,
            at_ns: due
        }
    );
    assert_eq!(c.retransmits, 6);
    assert_near(c.base_rto_us, 86_000, 0.01, "the verdict's base RTO");
}

/// A client with `TCP_USER_TIMEOUT` 2 s gives up before its schedule would: after its probe and three timer
/// retransmissions (0.2, 0.6, 1.4 s after the loss) the series stops, and the client resets the connection when the
/// VM speaks after the resume. The wire infers the RTO from the series and the abort at the next due time (the
/// user timeout fired before it: the wire sees no segment at an abort).
#[test]
fn a_tcp_user_timeout_abort_cuts_the_series_short() {
    let m = judged(
        1000,
        7000,
        vec![
            flow_open(100, &FlowSeg::data(Peer, PORT, 900, 100), "uplink"),
            flow_progress(1000, &FlowSeg::data(Peer, PORT, 1000, 100), "uplink"),
            flow_rtx(1200, &head(200), "uplink"),
            flow_rtx(1400, &head(200), "uplink"),
            flow_rtx(1800, &head(400), "uplink"),
            flow_rtx(2600, &head(800), "uplink"),
            flow_rst(7010, &FlowSeg::data(Peer, PORT, 1100, 0).flags(0x04), "uplink"),
        ],
    );
    let c = only(&m);
    let w = c.wire.as_ref().unwrap();
    assert_eq!(
        kinds(&w.peer),
        vec![
            Some(RetransmitKind::Tlp),
            Some(RetransmitKind::Rto),
            Some(RetransmitKind::Rto),
            Some(RetransmitKind::Rto)
        ]
    );
    assert_near(w.peer.rto_us, 200_000, 0.01, "RTO");
    assert_eq!(w.peer.next_due_ns, Some(4200 * MS));
    assert_eq!(
        c.fate,
        Fate::Aborted {
            reason: AbortReason::Etimedout,
            at_ns: 4200 * MS
        }
    );
    assert_eq!(c.first_rto_ns, Some(1400 * MS));
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

/// `whatif` takes each wire verdict's own timer series: a client that wrote new data 2 ms before each timer
/// retransmission (and probed its tail first) is replayed from its first timer retransmission and its 200 ms RTO,
/// so the stuck segment dates from when the head was sent (1100 ms), not one backoff later.
#[test]
fn whatif_takes_the_timer_series_a_client_writing_through_the_pause_gave() {
    let late = 20;
    let mut flow = vec![
        flow_open(100, &FlowSeg::data(Peer, PORT, 900, 100), "uplink"),
        flow_progress(1100, &FlowSeg::data(Peer, PORT, 1000, 8), "uplink"),
        flow_rtx(
            1150,
            &FlowSeg::data(Peer, PORT, 1008, 8)
                .seq_end(1016)
                .peer_ack(1000)
                .silence(50),
            "uplink",
        ),
    ];
    let mut at = 1100 + 200 + late;
    for k in 0..4u32 {
        flow.push(flow_rtx(at, &collapsed(1016 + 8 * (k + 1), 2, 2), "uplink"));
        at += (200 << (k + 1)) + late;
    }
    flow.push(flow_progress(6010, &FlowSeg::data(Vm, PORT, 1, 0), "tapB"));
    let m = judged(1000, 6000, flow);
    let c = only(&m);
    let w = c.wire.as_ref().unwrap();
    assert_eq!(w.peer.retransmits[0].kind, Some(RetransmitKind::Tlp), "{w:#?}");
    assert_eq!(c.first_rto_ns, Some((1100 + 200 + late) * MS));
    assert_near(c.base_rto_us, 200_000, 0.01, "the verdict's base RTO");
    let outage = crate::whatif::outage_of(c, 6000 * MS, false).unwrap();
    assert!(
        outage.t0_ns.abs_diff((1100 + late) * MS) <= 2 * MS,
        "the stuck segment dates from {} ms",
        outage.t0_ns / MS
    );
    assert!(outage.base_rto_ns.abs_diff(200 * MS) <= 2 * MS);
}
