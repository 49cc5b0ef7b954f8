//! Verdicts from the wire agree with the sockets' and with what the clients saw: the testbed scenario (a live and a
//! 6 s quick migration of the real guest, every client with data in flight during the pause) watched with
//! `--tcp both`, then with `--tcp wire` alone, under the windows-2003 client profile (5 retransmissions: the quick
//! migration times them out), then with `--tcp both` under Linux defaults (they outlast it) and a 2 s
//! `TCP_USER_TIMEOUT` (it cuts the backoff short). With both, each client connection keeps the sockets' verdict and the
//! wire's view agrees with it; with the wire alone, the trace has no socket event and each verdict comes from the
//! wire; and every verdict is what the client's own socket saw.
#![expect(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

use std::{sync::atomic::AtomicBool, time::Duration};

use integration_tests::{TestDir, migmon_bin, migrator_bin, unique};
use serde_json::Value;
use testbed::{
    clients::Profile,
    scenario::{self, Config, Run, Ui},
};

fn run(tcp: &str, profile: Profile) -> Run {
    let out = TestDir::new(&format!("mmagree-{tcp}"));
    let cfg = Config {
        prefix: unique("tag"),
        clients: 4,
        quick_pause: Duration::from_secs(6),
        profile,
        out: out.to_path_buf(),
        migmon: migmon_bin(),
        migrator: migrator_bin(),
        mem: "256M".into(),
        dirty: Some("8M@16M".into()),
        settle: Duration::from_secs(3),
        migmon_args: vec!["--tcp".into(), tcp.into()],
        monitor_per_host: false,
    };
    let say = |m: &str| eprintln!("agreement ({tcp}, {profile:?}): {m}");
    let interrupted = AtomicBool::new(false);
    let run = scenario::run(
        &cfg,
        &Ui {
            say: &say,
            interrupted: &interrupted,
        },
    )
    .unwrap_or_else(|e| panic!("the scenario with --tcp {tcp} failed: {e}"));
    if tcp == "wire" {
        let trace = std::fs::read_to_string(&run.outputs.trace).unwrap();
        let socket_events = trace.lines().filter(|l| l.contains("\"kind\":\"tcp_")).count();
        assert_eq!(socket_events, 0, "--tcp wire attaches no socket tracepoint");
        assert!(
            trace.contains("\"kind\":\"flow_"),
            "the flow tracker followed the clients"
        );
    }
    run
}

fn migration<'a>(report: &'a Value, mode: &str) -> &'a Value {
    report["migrations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mode"] == mode)
        .unwrap_or_else(|| panic!("no {mode} migration in the report: {report:#}"))
}

/// Each client's connection: the verdict agrees with what its socket saw, on the basis `tcp` asks for.
fn check(run: &Run, tcp: &str) {
    for (mode, outcome) in [("live", &run.live), ("quick", &run.quick)] {
        let m = migration(&run.report, mode);
        let conns = m["connections"].as_array().unwrap();
        for c in &outcome.clients {
            let v = conns
                .iter()
                .find(|v| v["sport"] == c.local.port() && v["daddr"] == c.remote.ip().to_string())
                .unwrap_or_else(|| panic!("--tcp {tcp}: client {} not in the {mode} report: {m:#}", c.local));
            let (fate, reason) = match (c.verdict.is_alive(), c.verdict.errno()) {
                (true, _) => ("survived", Value::Null),
                (false, Some(libc::ETIMEDOUT)) => ("aborted", Value::from("etimedout")),
                _ => panic!(
                    "--tcp {tcp}: {mode}: client {} neither alive nor timed out: {c:?}",
                    c.local
                ),
            };
            let wire = &v["wire"];
            assert_eq!(v["fate"], fate, "--tcp {tcp}: {mode}: {v:#}");
            assert_eq!(wire["fate"], fate, "--tcp {tcp}: {mode}: the wire's fate: {v:#}");
            if fate == "aborted" {
                assert_eq!(v["reason"], reason, "--tcp {tcp}: {mode}: {v:#}");
                assert_eq!(wire["reason"], reason, "--tcp {tcp}: {mode}: {v:#}");
            }
            match tcp {
                "both" => {
                    assert_eq!(v["basis"], "sockets", "{v:#}");
                    assert_eq!(v["wire_agrees"], true, "{v:#}");
                }
                _ => assert_eq!(v["basis"], "wire", "{v:#}"),
            }
        }
    }
}

#[test]
fn wire_verdicts_agree_with_the_sockets_and_the_clients() {
    if std::fs::metadata("/dev/kvm").is_err() {
        eprintln!("SKIP: /dev/kvm is missing: the scenario needs KVM");
        return;
    }
    for (tcp, profile) in [
        ("both", Profile::Windows2003),
        ("wire", Profile::Windows2003),
        ("both", Profile::Linux),
        ("both", Profile::UserTimeout(Duration::from_secs(2))),
    ] {
        let run = run(tcp, profile);
        eprintln!("{}", run.compare);
        check(&run, tcp);
    }
}
