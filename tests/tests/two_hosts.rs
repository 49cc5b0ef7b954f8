//! One monitor per host, merged: the demo's scenario with `monitor_per_host`, so that one run has the one monitor of
//! every port and a monitor per host (its tap and uplink only, its own migrator events). The two hosts' traces,
//! merged, must give the one monitor's report: the same migrations and verdicts, and every figure within the
//! merge's stated bound. Both hosts share this machine's kernel and clock, so a second clock is simulated: host B's
//! trace is moved by an offset and a drift the merge is not told, and its realtime samples by tens of
//! milliseconds (time namespaces do not move `bpf_ktime_get_ns`).
#![expect(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

use std::collections::HashSet;

use integration_tests::{TestDir, kvm_available, run_scenario, scenario_config};
use migmon_analysis::{
    correlate::{Analysis, MigrationReport, analyse},
    merge::{self, Input},
    trace::{Event, Trace, read_trace},
};
use testbed::scenario::Config;

/// The port (interface, namespace) of an L2 or flow event.
fn port_of(e: &Event) -> Option<(Option<String>, Option<String>)> {
    let p = match e {
        Event::Arp { frame, .. } | Event::Garp { frame, .. } | Event::Rarp { frame, .. } => &frame.port,
        Event::MacSeen { port, .. } | Event::MacStats { port, .. } | Event::Malformed { port, .. } => port,
        other => &other.flow_segment()?.port,
    };
    Some((p.iface.clone(), p.netns.clone()))
}

fn merged(inputs: &[Input]) -> (Analysis, merge::MergeInfo) {
    let m = merge::merge(inputs).unwrap();
    let mut a = analyse(&m.trace);
    a.annotate_merge(&m.info);
    (a, m.info)
}

/// Compares a merged analysis with the one monitor's; returns the largest figure error (ns).
fn same_story(got: &Analysis, want: &Analysis, bound: u64, what: &str) -> u64 {
    assert_eq!(
        got.migrations.iter().map(|m| &m.id).collect::<Vec<_>>(),
        want.migrations.iter().map(|m| &m.id).collect::<Vec<_>>(),
        "{what}: the same migrations"
    );
    let fates = |m: &MigrationReport| -> Vec<String> {
        let mut v: Vec<String> = m
            .connections
            .iter()
            .map(|c| format!("{}:{} {}", c.tuple.saddr, c.tuple.sport, c.fate))
            .collect();
        v.sort();
        v
    };
    let mut worst = 0;
    for (g, w) in got.migrations.iter().zip(&want.migrations) {
        assert_eq!(g.outcome, w.outcome, "{what} {}", g.id);
        assert_eq!(fates(g), fates(w), "{what} {}: the same verdicts", g.id);
        for (name, gf, wf) in [
            ("pause", &g.downtime.vcpu_pause, &w.downtime.vcpu_pause),
            ("blackout", &g.downtime.blackout, &w.downtime.blackout),
            ("convergence", &g.downtime.convergence, &w.downtime.convergence),
        ] {
            match (gf, wf) {
                (Some(gf), Some(wf)) => {
                    let err = gf.ns.abs_diff(wf.ns);
                    eprintln!(
                        "{what} {} {name}: merged {} ns ± {bound}, one monitor {} ns, off by {err} ns",
                        g.id, gf.ns, wf.ns
                    );
                    assert!(
                        err <= bound,
                        "{what} {} {name}: off by {err} ns, bound {bound} ns",
                        g.id
                    );
                    worst = worst.max(err);
                }
                (None, None) => {}
                _ => panic!("{what} {} {name}: merged {gf:?}, one monitor {wf:?}", g.id),
            }
        }
    }
    worst
}

#[test]
fn per_host_traces_merge_into_the_one_monitor_report() {
    if !kvm_available("the scenario") {
        return;
    }
    let out = TestDir::new("mm2hosts-test");
    let cfg = Config {
        monitor_per_host: true,
        ..scenario_config("tbh", &out)
    };
    let run = run_scenario(&cfg, "two hosts");
    let o = &run.outputs;
    assert_eq!(o.host_traces.len(), 2);
    assert!(run.merged_report.is_some());
    compare_run(&o.trace, &o.host_traces[0], &o.host_traces[1], 2);
}

/// The same comparison on the traces of a run kept earlier (`MIGMON_KEEP_TEST_DIR=1`, or `./x demo
/// --monitor-per-host`'s output directory): `MIGMON_TWO_HOSTS_DIR=DIR` with `migration.trace`, `host-a.trace` and
/// `host-b.trace` in it.
#[test]
fn a_kept_run_merges_into_its_one_monitor_report() {
    let Some(dir) = std::env::var_os("MIGMON_TWO_HOSTS_DIR") else {
        eprintln!(
            "SKIP: set MIGMON_TWO_HOSTS_DIR to a directory with migration.trace, host-a.trace, host-b.trace"
        );
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    compare_run(
        &dir.join("migration.trace"),
        &dir.join("host-a.trace"),
        &dir.join("host-b.trace"),
        1,
    );
}

/// The one monitor's trace against host A's and host B's merged, as recorded and with B on a simulated clock of
/// its own; `min_migrations` is how many the one monitor must have seen.
fn compare_run(single: &std::path::Path, a: &std::path::Path, b: &std::path::Path, min_migrations: usize) {
    let (a, b) = (read_trace(a).unwrap(), read_trace(b).unwrap());
    // The one monitor also watches the switch's ports, which belong to no host: its frames there are left out, so
    // that both sides judge from the same ports (a blackout measured from the VM's last frame at the switch ends
    // later than one measured at the tap).
    let host_ports: HashSet<(Option<String>, Option<String>)> = [&a, &b]
        .iter()
        .flat_map(|t| t.events.iter().filter_map(port_of))
        .collect();
    let mut single = read_trace(single).unwrap();
    single
        .events
        .retain(|e| port_of(e).is_none_or(|p| host_ports.contains(&p)));
    let want = analyse(&single);
    assert!(want.migrations.len() >= min_migrations, "{:#?}", want.warnings);
    for t in [&a, &b] {
        let h = t.header.as_ref().unwrap();
        assert!(h.clocks.is_some() && h.boot_id.len() == 36, "{h:?}");
    }
    let input = |name: &str, trace: Trace| Input {
        name: name.into(),
        trace,
    };

    // As recorded: one kernel, two host names. The kernel-wide events both monitors recorded are kept once.
    let (got, info) = merged(&[input("host-a.trace", a.clone()), input("host-b.trace", b.clone())]);
    assert_eq!(info.hosts[1].method, "shared frames", "{info:#?}");
    assert!(info.duplicates > 0, "{info:#?}");
    let worst_same_clock = same_story(&got, &want, info.bound_ns, "as recorded");

    // Host B on a clock of its own: B keeps only what its own kernel would have recorded (the events host A's
    // monitor did not record too), then its clock runs 2.5 s ahead and 35 ppm fast, its realtime 25 ms off.
    // (The same kernel event recorded by both monitors: the same fields, stamped within a millisecond.)
    let fields = |e: &Event| {
        let mut v = serde_json::to_value(e).unwrap();
        v.as_object_mut().unwrap().remove("ts_ns");
        v.to_string()
    };
    let mut in_a: std::collections::HashMap<String, Vec<u64>> = std::collections::HashMap::new();
    for e in &a.events {
        in_a.entry(fields(e)).or_default().push(e.ts_ns());
    }
    let mut b_own = b.clone();
    b_own.events.retain(|e| {
        let Some(ts) = in_a.get_mut(&fields(e)) else {
            return true;
        };
        match ts
            .iter()
            .position(|t| t.abs_diff(e.ts_ns()) <= merge::SAME_EVENT_NS)
        {
            Some(k) => {
                ts.swap_remove(k);
                false
            }
            None => true,
        }
    });
    let anchor = a.header.as_ref().unwrap().start_mono_ns;
    let shifted = merge::shift_clock(
        &b_own,
        anchor,
        2_500_000_000,
        35.0,
        25_000_000,
        "simulated-host-b",
    );
    let (got, info) = merged(&[input("host-a.trace", a), input("host-b-shifted.trace", shifted)]);
    let hb = &info.hosts[1];
    assert_eq!(hb.method, "shared frames", "{info:#?}");
    // A run shorter than the clock sample period leaves the drift unmeasured, and the bound says so.
    if info.hosts.iter().all(|h| h.clock_samples >= 2) {
        assert!(
            info.bound_ns <= 100_000,
            "the bound is {} ns: {info:#?}",
            info.bound_ns
        );
    }
    let worst = same_story(&got, &want, info.bound_ns, "host B shifted");
    eprintln!(
        "merge error: {worst} ns (as recorded: {worst_same_clock} ns), bound {} ns\n{}",
        info.bound_ns,
        merge::render_text(&info)
    );
}
