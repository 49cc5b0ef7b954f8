use std::path::Path;

use super::*;
use crate::{
    correlate::{Analysis, analyse},
    trace::{ArpFrame, ClockTriple, TraceHeader, read_trace},
};

fn golden(name: &str) -> Trace {
    read_trace(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(name),
    )
    .unwrap()
}

const TAP_A: &str = "ceta139e3";
const TAP_B: &str = "cetb139e4";

/// The recorded run as the testbed's switch would have carried it: every broadcast frame a host's tap saw also
/// reaches the other host's uplink, 8 to 12 µs later (a veth and two bridges).
fn with_flood_copies(t: &Trace) -> Trace {
    let mut out = t.clone();
    let mut n = 0u64;
    for e in &t.events {
        let (Event::Rarp { ts_ns, frame } | Event::Garp { ts_ns, frame } | Event::Arp { ts_ns, frame }) = e
        else {
            continue;
        };
        if !frame.frame.starts_with("ffffffffffff") {
            continue;
        }
        n += 1;
        let other_uplink = if frame.port.iface.as_deref() == Some(TAP_A) {
            "up-b"
        } else {
            "up-a"
        };
        let copy = ArpFrame {
            port: Port {
                ifindex: 90,
                iface: Some(other_uplink.into()),
                netns: frame.port.netns.clone(),
            },
            ..frame.clone()
        };
        let ts_ns = ts_ns + 8_000 + (n * 7_919) % 4_000;
        out.events.push(match e {
            Event::Rarp { .. } => Event::Rarp { ts_ns, frame: copy },
            Event::Garp { .. } => Event::Garp { ts_ns, frame: copy },
            _ => Event::Arp { ts_ns, frame: copy },
        });
    }
    out.events.sort_by_key(Event::ts_ns);
    out
}

/// Which host's monitor would have recorded an event: ports by name, migration events by the host of their side,
/// the rest on A (the client's sockets, and the one bridge of the recorded run, taken as the switch A watches).
fn on_b(e: &Event, b_sides: &HashSet<(String, bool)>) -> bool {
    let mut e = e.clone();
    if let Some(p) = port_mut(&mut e) {
        return matches!(p.iface.as_deref(), Some(TAP_B | "up-b"));
    }
    match &e {
        Event::Migration { ev, .. } => {
            b_sides.contains(&(ev.migration_id.clone(), ev.role == migevents::Role::Source))
        }
        _ => false,
    }
}

/// The single-monitor trace split into the two hosts' traces, each with its header clocks and a clock sample
/// every 10 s (the true realtime: host A's clock is taken as exact).
fn split(t: &Trace) -> (Trace, Trace) {
    let mut b_sides = HashSet::new();
    for e in &t.events {
        if let Event::Migration { ev, .. } = e
            && let migevents::Phase::Setup { host, .. } = &ev.phase
            && host == TAP_B
        {
            b_sides.insert((ev.migration_id.clone(), ev.role == migevents::Role::Source));
        }
    }
    let h = t.header.clone().unwrap();
    let (start, unix) = (h.start_mono_ns, h.start_unix_ns);
    let end = t.events.iter().map(Event::ts_ns).max().unwrap();
    let header = |name: &str, boot: &str| TraceHeader {
        hostname: name.into(),
        boot_id: boot.into(),
        clocks: Some(ClockTriple {
            mono_ns: start,
            realtime_ns: unix,
            boottime_ns: start,
            uncertainty_ns: 40,
        }),
        ..h.clone()
    };
    let mut a = Trace {
        header: Some(header("host-a", "aaaa")),
        ..Trace::default()
    };
    let mut b = Trace {
        header: Some(header("host-b", "aaaa")),
        ..Trace::default()
    };
    for e in &t.events {
        if on_b(e, &b_sides) { &mut b } else { &mut a }
            .events
            .push(e.clone());
    }
    let mut ts = start + 10_000_000_000;
    while ts < end {
        for x in [&mut a, &mut b] {
            x.events.push(Event::ClockSample {
                ts_ns: ts,
                realtime_ns: unix + (ts - start),
                boottime_ns: ts,
                uncertainty_ns: 40,
            });
        }
        ts += 10_000_000_000;
    }
    for x in [&mut a, &mut b] {
        x.events.sort_by_key(Event::ts_ns);
    }
    (a, b)
}

fn input(name: &str, trace: Trace) -> Input {
    Input {
        name: name.into(),
        trace,
    }
}

fn merged_analysis(inputs: &[Input]) -> (Analysis, MergeInfo) {
    let m = merge(inputs).unwrap();
    let mut a = analyse(&m.trace);
    a.annotate_merge(&m.info);
    (a, m.info)
}

/// The merged report of the two shifted traces against the single monitor's report of the same run.
#[test]
fn a_shifted_host_merges_back_onto_the_single_monitor_report() {
    let single = with_flood_copies(&golden("kernel_migrator_live_then_quick.trace"));
    let want = analyse(&single);
    let (a, b) = split(&single);
    let anchor = a.header.as_ref().unwrap().start_mono_ns;
    // Host B's clock: 3.217 s ahead, 40 ppm fast; its realtime 30 ms off. The merge is told none of it.
    let b = shift_clock(&b, anchor, 3_217_000_123, 40.0, 30_000_000, "bbbb");
    let (got, info) = merged_analysis(&[input("a.trace", a), input("b.trace", b)]);

    let hb = &info.hosts[1];
    assert_eq!(hb.method, "shared frames", "{info:#?}");
    assert!(hb.pairs_sent > 0 && hb.pairs_received > 0, "{info:#?}");
    assert!((hb.drift_ppm + 40.0).abs() < 2.0, "{info:#?}");
    assert!(info.bound_ns <= 100_000, "bound {} ns: {info:#?}", info.bound_ns);

    assert_eq!(got.migrations.len(), want.migrations.len());
    let mut worst = 0u64;
    for (g, w) in got.migrations.iter().zip(&want.migrations) {
        assert_eq!(g.id, w.id);
        assert_eq!(g.outcome, w.outcome);
        assert_eq!(
            (g.survived, g.aborted, g.unresolved),
            (w.survived, w.aborted, w.unresolved),
            "{}",
            g.id
        );
        let fates = |m: &crate::correlate::MigrationReport| -> Vec<String> {
            m.connections
                .iter()
                .map(|c| format!("{} {}", c.tuple.sport, c.fate))
                .collect()
        };
        assert_eq!(fates(g), fates(w), "{}", g.id);
        for (name, gf, wf) in [
            ("pause", &g.downtime.vcpu_pause, &w.downtime.vcpu_pause),
            ("blackout", &g.downtime.blackout, &w.downtime.blackout),
            ("convergence", &g.downtime.convergence, &w.downtime.convergence),
        ] {
            let (Some(gf), Some(wf)) = (gf, wf) else {
                assert_eq!(gf.is_some(), wf.is_some(), "{} {name}", g.id);
                continue;
            };
            let err = gf.ns.abs_diff(wf.ns);
            worst = worst.max(err);
            assert_eq!(gf.bound_ns, Some(info.bound_ns));
            assert!(
                err <= info.bound_ns,
                "{} {name}: merged {} ns, single {} ns, bound {} ns",
                g.id,
                gf.ns,
                wf.ns,
                info.bound_ns
            );
        }
    }
    println!(
        "merge error: worst figure {worst} ns, bound {} ns; {}",
        info.bound_ns,
        render_text(&info)
    );
}

#[test]
fn nothing_shared_falls_back_to_realtime_and_says_so() {
    let single = golden("kernel_migrator_live_then_quick.trace");
    let (a, b) = split(&single);
    let anchor = a.header.as_ref().unwrap().start_mono_ns;
    let b = shift_clock(&b, anchor, 2_000_000_000, 0.0, 3_000_000, "bbbb");
    let (got, info) = merged_analysis(&[input("a.trace", a), input("b.trace", b)]);
    assert_eq!(info.hosts[1].method, "realtime");
    assert_eq!(info.bound_ns, REALTIME_BOUND_NS);
    assert!(
        info.warnings.iter().any(|w| w.contains("saw no frame in common")),
        "{info:#?}"
    );
    let want = analyse(&single);
    let (g, w) = (&got.migrations[0], &want.migrations[0]);
    let err = g
        .downtime
        .vcpu_pause
        .as_ref()
        .unwrap()
        .ns
        .abs_diff(w.downtime.vcpu_pause.as_ref().unwrap().ns);
    assert!(err <= 3_100_000, "off by the realtime error: {err}");
    let text = crate::report::render_text(&got, "a + b");
    assert!(text.contains("± 10.0 ms"), "{text}");
}

#[test]
fn bad_input_is_reported_and_nothing_is_dropped() {
    let single = golden("kernel_migrator_live_then_quick.trace");
    let (a, b) = split(&single);
    let n = a.events.len() + b.events.len();

    // The same host twice: one clock, identical events kept once and counted.
    let m = merge(&[input("a.trace", a.clone()), input("a-again.trace", a.clone())]).unwrap();
    assert_eq!(m.trace.events.len(), a.events.len());
    assert_eq!(m.info.duplicates, a.events.len());
    assert_eq!(m.info.hosts[1].method, "same clock");
    assert!(
        m.info
            .warnings
            .iter()
            .any(|w| w.contains("come from the same host")),
        "{:#?}",
        m.info
    );

    // No overlap: host B recorded an hour later by its realtime.
    let anchor = a.header.as_ref().unwrap().start_mono_ns;
    let late = shift_clock(&b, anchor, 0, 0.0, 3_600_000_000_000, "bbbb");
    let m = merge(&[input("a.trace", a.clone()), input("late.trace", late)]).unwrap();
    assert_eq!(m.trace.events.len(), n);
    assert!(
        m.info.warnings.iter().any(|w| w.contains("does not overlap")),
        "{:#?}",
        m.info
    );

    // A realtime step: one sample 250 ms off.
    let mut jumpy = shift_clock(&b, anchor, 0, 0.0, 0, "bbbb");
    for e in &mut jumpy.events {
        if let Event::ClockSample { realtime_ns, .. } = e {
            *realtime_ns += 250_000_000;
        }
    }
    let m = merge(&[input("a.trace", a.clone()), input("jumpy.trace", jumpy)]).unwrap();
    assert_eq!(m.trace.events.len(), n);
    assert_eq!(m.info.hosts[1].realtime_steps, 1, "{:#?}", m.info);
    assert!(
        m.info.warnings.iter().any(|w| w.contains("stepped by +250.0 ms")),
        "{:#?}",
        m.info
    );

    // Same-named ports on two hosts are told apart.
    let mut twin = a.clone();
    twin.header.as_mut().unwrap().hostname = "host-twin".into();
    twin.header.as_mut().unwrap().boot_id = "cccc".into();
    let m = merge(&[input("a.trace", a.clone()), input("twin.trace", twin)]).unwrap();
    assert_eq!(m.trace.events.len(), 2 * a.events.len());
    assert!(
        m.trace
            .events
            .iter()
            .any(|e| matches!(e, Event::MacSeen { port, .. }
        if port.netns.as_deref() == Some("host-twin/ceh139e0")))
    );

    assert!(matches!(merge(&[]), Err(MergeError::Empty)));
}

/// Old traces (no boot id, no clocks) still merge, by their header's start times.
#[test]
fn old_traces_merge_by_their_start_times() {
    let single = golden("kernel_migrator_live_then_quick.trace");
    let (mut a, mut b) = split(&single);
    for x in [&mut a, &mut b] {
        let h = x.header.as_mut().unwrap();
        h.clocks = None;
        h.boot_id.clear();
        x.events.retain(|e| !matches!(e, Event::ClockSample { .. }));
    }
    let m = merge(&[input("a.trace", a), input("b.trace", b)]).unwrap();
    assert_eq!(m.info.hosts[1].offset_ns, 0);
    assert_eq!(m.info.hosts[1].clock_samples, 1);
}
