//! One monitor per host, merged: the demo's scenario with `monitor_per_host`, so that one run has the one monitor of
//! every port and a monitor per host (its tap and uplink only, its own migrator events). The two hosts' traces,
//! merged, must give the one monitor's report: the same migrations and verdicts, and every figure within the
//! merge's stated bound. Both hosts share this machine's kernel and clock, so a second clock is simulated: host B's
//! trace is moved by an offset and a drift the merge is not told, and its realtime samples by tens of
//! milliseconds (time namespaces do not move `bpf_ktime_get_ns`).
#![expect(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

use std::{collections::HashSet, sync::atomic::AtomicBool, time::Duration};

use integration_tests::{TestDir, migmon_bin, migrator_bin, unique};
use migmon_analysis::{
    correlate::{Analysis, MigrationReport, analyse},
    merge::{self, Input},
    trace::{Trace, read_trace},
};
use testbed::{
    clients::Profile,
    scenario::{self, Config, Ui},
};

fn merged(inputs: &[Input]) -> (Analysis, merge::MergeInfo) {
    let m = merge::merge(inputs).unwrap();
    let mut a = analyse(&m.trace);
    merge::annotate(&mut a, &m.info);
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
    if std::fs::metadata("/dev/kvm").is_err() {
        eprintln!("SKIP: /dev/kvm is missing: the scenario needs KVM");
        return;
    }
    let migrator = migrator_bin();
    assert!(
        migrator.exists(),
        "{} does not exist: `./x test` builds it (by hand: cargo build --release -p migrator)",
        migrator.display()
    );
    let out = TestDir::new("mm2hosts-test");
    let cfg = Config {
        prefix: unique("tbh"),
        clients: 4,
        quick_pause: Duration::from_secs(6),
        profile: Profile::Windows2003,
        out: out.to_path_buf(),
        migmon: migmon_bin(),
        migrator,
        mem: "256M".into(),
        dirty: Some("8M@16M".into()),
        settle: Duration::from_secs(3),
        migmon_args: Vec::new(),
        monitor_per_host: true,
    };
    let say = |m: &str| eprintln!("two hosts: {m}");
    let interrupted = AtomicBool::new(false);
    let run = scenario::run(
        &cfg,
        &Ui {
            say: &say,
            interrupted: &interrupted,
        },
    )
    .unwrap_or_else(|e| panic!("the scenario failed: {e}"));
    let o = &run.outputs;
    assert_eq!(o.host_traces.len(), 2);
    let single = read_trace(&o.trace).unwrap();
    let want = analyse(&single);
    assert_eq!(want.migrations.len(), 2, "{:#?}", want.warnings);
    let (a, b) = (
        read_trace(&o.host_traces[0]).unwrap(),
        read_trace(&o.host_traces[1]).unwrap(),
    );
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
    let in_a: HashSet<String> = a
        .events
        .iter()
        .map(|e| serde_json::to_string(e).unwrap())
        .collect();
    let mut b_own = b.clone();
    b_own
        .events
        .retain(|e| !in_a.contains(&serde_json::to_string(e).unwrap()));
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
    assert!((hb.drift_ppm + 35.0).abs() < 5.0, "{info:#?}");
    assert!(
        info.bound_ns <= 100_000,
        "the bound is {} ns: {info:#?}",
        info.bound_ns
    );
    let worst = same_story(&got, &want, info.bound_ns, "host B shifted");
    eprintln!(
        "merge error: {worst} ns (as recorded: {worst_same_clock} ns), bound {} ns\n{}",
        info.bound_ns,
        merge::render_text(&info)
    );
    assert!(run.merged_report.is_some());
}
