//! Ports that come and go: `migmon watch` with only `--bridge`, on the two-host testbed, while the real migrator
//! moves the real guest from host A to host B, whose tap is created when the migration starts (as a VMM started
//! for an incoming migration creates its tap), and whose source tap is deleted after it (as the source VMM's exit
//! takes its tap along).
//!
//! The trace must show: the tap on B attached (from its `RTM_NEWLINK`) before the guest's first frame and its RARP
//! announce there, both seen; the VM's MAC learned without `--vm`; the same verdicts as a watch given every port by
//! hand (every client survives the live migration, the announce and the FDB move are seen); the source's tap
//! detached as deleted, with no warning and no port that failed.
#![expect(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use integration_tests::{
    Link, Migrator, TestDir, Watch, boot_guest, kvm_available, migrator_bin, try_ip_in, unique, wait_until,
};
use migmon_analysis::{
    correlate::{Fate, analyse},
    trace::read_trace,
};
use serde_json::Value;
use testbed::{
    clients::{Client, ClientOptions, ClientReport, Verdict, start_mix},
    topology::{Host, Testbed},
};

const MAC: &str = "52:54:00:70:6f:72";

/// The events of `kind` on port `iface@netns`.
fn on<'a>(events: &'a [Value], kind: &str, iface: &str, netns: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["kind"] == kind && e["iface"] == iface && e["netns"] == netns)
        .collect()
}

fn ts(e: &Value) -> u64 {
    e["ts_ns"].as_u64().unwrap()
}

/// What one run left behind.
struct Run {
    events: Vec<Value>,
    stderr: String,
    trace: String,
    clients: Vec<ClientReport>,
    ns_a: String,
    ns_b: String,
    /// `CLOCK_MONOTONIC` when the destination's tap was created, and when it was up in the bridge.
    created_ns: u64,
    tap_b_up_ns: u64,
    _dir: TestDir,
    _bed: Testbed,
}

/// `migmon watch` with only `--bridge`, on host A's and host B's bridges; checks the ports there at start.
fn watch_bridges(ns_a: &str, ns_b: &str, sock: &str, trace: &str) -> Watch {
    let (br_a, br_b) = (
        format!("{}@{ns_a}", Host::A.bridge()),
        format!("{}@{ns_b}", Host::B.bridge()),
    );
    let (stream, rr) = (guest_abi::STREAM_PORT.to_string(), guest_abi::RR_PORT.to_string());
    let watch = Watch::start(&[
        "--bridge",
        &br_a,
        "--bridge",
        &br_b,
        "--port",
        &stream,
        "--port",
        &rr,
        "--events-listen",
        sock,
        "--record",
        trace,
    ]);
    let attached_at_start = watch.events();
    for (iface, ns) in [
        (Host::A.tap(), ns_a),
        (Host::A.uplink(), ns_a),
        (Host::B.uplink(), ns_b),
    ] {
        let a = on(&attached_at_start, "port_attached", iface, ns);
        assert_eq!(
            a.len(),
            1,
            "{iface}@{ns} attached once at start: {attached_at_start:#?}"
        );
        assert_eq!(a[0]["origin"], "bridge");
        assert!(
            a[0]["notified_ns"].is_null(),
            "a port there at start has no notification time"
        );
    }
    assert!(wait_until(Duration::from_secs(5), || Path::new(sock).exists()));

    watch
}

/// Boots the guest on A behind a watch with only `--bridge`, starts clients, creates B's tap and migrates the guest
/// there live, deletes A's tap; returns the watch's events once it stopped.
fn migrate_onto_a_new_tap() -> Run {
    let dir = TestDir::new("migmon-ports");
    let path = |name: &str| dir.join(name).display().to_string();
    let bed = Testbed::up(&unique("tpo")).expect("bring the testbed up");
    let (ns_a, ns_b) = (bed.host_ns(Host::A), bed.host_ns(Host::B));
    let (tap_a, tap_b) = (Host::A.tap(), Host::B.tap());
    // Host B has no tap for the VM until a migration brings one.
    try_ip_in(Some(&ns_b), &["link", "del", tap_b]).unwrap();

    let (sock, trace) = (path("events.sock"), path("run.trace"));
    let watch = watch_bridges(&ns_a, &ns_b, &sock, &trace);

    // The guest boots on A; clients connect to it from the client namespace behind the switch.
    let api_a = path("a.api");
    let mut run_a = boot_guest(&bed, MAC, &api_a, Some(&sock), &dir.join("run-a.log"));
    let clients = start_mix(&bed.client_ns(), bed.vm_ip(0).into(), 4, ClientOptions::default()).unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || clients
            .iter()
            .all(|c| c.progress() > 3)),
        "the clients did not get going"
    );
    // The MAC was never given: the bridge learned it on the tap.
    watch.wait_for("the VM's MAC learned", Duration::from_secs(10), |ev| {
        ev.iter().any(|e| e["kind"] == "mac_learned" && e["mac"] == MAC)
    });

    // The migration starts: the destination's tap appears in B's bridge, then its VMM waits for the stream.
    let created_ns = migevents::monotonic_ns();
    let tap = Link::try_tap(tap_b, Some(&ns_b), Some(Host::B.bridge())).unwrap();
    let tap_b_up_ns = migevents::monotonic_ns();
    let (api_b, mig) = (path("b.api"), format!("unix:{}", path("mig.sock")));
    let recv_b = Migrator::spawn(
        &ns_b,
        &[
            "receive", "--tap", tap_b, "--listen", &mig, "--api", &api_b, "--events", &sock,
        ],
        &dir.join("receive-b.log"),
    );
    assert!(
        wait_until(Duration::from_secs(15), || Path::new(&api_b).exists()),
        "{}",
        recv_b.log()
    );
    let out = Command::new(migrator_bin())
        .args([
            "migrate",
            "--api",
            &api_a,
            "--to",
            &mig,
            "--mode",
            "live",
            "--downtime",
            "30ms",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the migration failed: {}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        run_a.log(),
        recv_b.log()
    );
    assert!(
        wait_until(Duration::from_secs(15), || !run_a.running()),
        "the source did not hand over:\n{}",
        run_a.log()
    );

    // The source's VMM is gone; its tap goes with it.
    try_ip_in(Some(&ns_a), &["link", "del", tap_a]).unwrap();
    watch.wait_for("the source's tap detached", Duration::from_secs(10), |ev| {
        on(ev, "port_detached", tap_a, &ns_a).len() == 1
    });
    let base: Vec<u64> = clients.iter().map(Client::progress).collect();
    assert!(
        wait_until(Duration::from_secs(20), || clients
            .iter()
            .zip(&base)
            .all(|(c, b)| c.progress() > b + 3 || c.ended())),
        "the clients did not move on after the migration"
    );
    let clients: Vec<ClientReport> = clients.into_iter().map(Client::finish).collect();
    let (events, stderr) = watch.stop();
    drop((recv_b, tap));
    Run {
        events,
        stderr,
        trace,
        clients,
        ns_a,
        ns_b,
        created_ns,
        tap_b_up_ns,
        _dir: dir,
        _bed: bed,
    }
}

#[test]
fn a_vm_migrating_onto_a_new_tap_is_watched_from_its_first_frame() {
    if !kvm_available("the ports test") {
        return;
    }
    let started = Instant::now();
    let run = migrate_onto_a_new_tap();
    let (events, ns_a, ns_b) = (&run.events, &run.ns_a, &run.ns_b);
    let (tap_a, tap_b) = (Host::A.tap(), Host::B.tap());

    // The destination's tap: attached from its notification, before the VM's first frame and its announce.
    let attached = on(events, "port_attached", tap_b, ns_b);
    assert_eq!(attached.len(), 1, "{attached:#?}");
    let a = attached[0];
    assert_eq!(a["origin"], "bridge");
    assert_eq!(a["bridge"], Host::B.bridge());
    let hooks: Vec<&str> = a["hooks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap())
        .collect();
    assert_eq!(hooks, ["tc ingress", "tc egress"]);
    let (attach_ns, notified_ns) = (ts(a), a["notified_ns"].as_u64().unwrap());
    assert!(notified_ns >= run.created_ns && notified_ns <= attach_ns, "{a}");
    let first_frame = on(events, "mac_seen", tap_b, ns_b)
        .into_iter()
        .filter(|e| e["mac"] == MAC && e["direction"] == "ingress")
        .map(ts)
        .min()
        .expect("the VM's first frame on the new tap was seen");
    let rarps: Vec<u64> = on(events, "rarp", tap_b, ns_b)
        .into_iter()
        .filter(|e| e["sha"] == MAC)
        .map(ts)
        .collect();
    assert!(!rarps.is_empty(), "the destination's RARP announce was seen");
    let first_rarp = *rarps.iter().min().unwrap();
    assert!(
        attach_ns < first_frame && attach_ns < first_rarp,
        "attached at {attach_ns}, first frame {first_frame}, first RARP {first_rarp}"
    );
    let resume = events
        .iter()
        .filter(|e| e["kind"] == "migration" && e["event"] == "resume" && e["role"] == "destination")
        .map(ts)
        .min()
        .expect("the destination's resume");

    // The source's tap: detached as deleted, and nothing went wrong on the way.
    let detached = on(events, "port_detached", tap_a, ns_a);
    assert_eq!(detached[0]["reason"], "deleted", "{detached:#?}");
    let bad: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "port_failed" || (e["kind"] == "note" && e["level"] == "warning"))
        .collect();
    assert!(bad.is_empty(), "{bad:#?}\n{}", run.stderr);
    assert!(!run.stderr.contains("warning"), "{}", run.stderr);

    // The verdicts, as with every port given by hand: each client's connection survived, the announce and the FDB
    // move are in the report.
    let analysis = analyse(&read_trace(Path::new(&run.trace)).unwrap());
    assert_eq!(analysis.migrations.len(), 1, "{:#?}", analysis.warnings);
    let m = &analysis.migrations[0];
    assert_eq!(m.mode.as_deref(), Some("live"));
    assert_eq!(m.aborted, 0, "{m:#?}");
    for c in &run.clients {
        assert!(matches!(c.verdict, Verdict::Alive), "{c:?}");
        let v = m
            .connections
            .iter()
            .find(|v| v.tuple.sport == c.local.port() && v.tuple.saddr == c.local.ip())
            .unwrap_or_else(|| panic!("client {} is not in the report: {m:#?}", c.local));
        assert_eq!(v.fate, Fate::Survived, "{v:#?}");
    }
    let spans = &analysis.ports.spans;
    let span = |port: String| {
        spans
            .iter()
            .find(|s| s.port == port)
            .unwrap_or_else(|| panic!("{port}: {spans:#?}"))
    };
    assert!(span(format!("{tap_b}@{ns_b}")).attach_latency_ns.is_some());
    assert_eq!(
        span(format!("{tap_a}@{ns_a}")).detach_reason.as_deref(),
        Some("deleted")
    );
    assert!(m.warnings.is_empty(), "{:#?}", m.warnings);
    let rarp = m.timeline.first_rarp.as_ref().expect("the report's announce");
    assert_eq!(rarp.port, format!("{tap_b}@{ns_b}"));
    assert!(!m.timeline.fdb_moves.is_empty(), "the FDB move was seen");

    eprintln!(
        "ports: tap {tap_b} created, RTM_NEWLINK read {:.2} ms later, programs attached {:.2} ms after that ({:.2} ms \
         after the tap was up); after the attach: destination resumed +{:.1} ms, its first frame +{:.1} ms, its first \
         RARP +{:.1} ms; {} RARPs seen; test took {:.1} s",
        (notified_ns - run.created_ns) as f64 / 1e6,
        (attach_ns - notified_ns) as f64 / 1e6,
        attach_ns.saturating_sub(run.tap_b_up_ns) as f64 / 1e6,
        resume.saturating_sub(attach_ns) as f64 / 1e6,
        (first_frame - attach_ns) as f64 / 1e6,
        (first_rarp - attach_ns) as f64 / 1e6,
        rarps.len(),
        started.elapsed().as_secs_f64()
    );
}
