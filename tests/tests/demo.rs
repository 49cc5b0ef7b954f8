//! The reduced demo: `./x demo`'s own scenario (`testbed::scenario`) on a testbed of its own, with 4 clients and a
//! shorter quick pause. Asserts the thesis: the live migration aborts nothing; the quick one aborts every client
//! connection with ETIMEDOUT, as the clients' sockets and migmon's report both say; the announce is seen and the
//! FDB moves in both migrations; every output file is written.
#![expect(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

use std::{path::PathBuf, sync::atomic::AtomicBool, time::Duration};

use integration_tests::{migmon_bin, unique};
use serde_json::Value;
use testbed::{
    clients::Profile,
    scenario::{self, Config, Ui},
};

fn migrator_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MIGRATOR_BIN") {
        return PathBuf::from(p);
    }
    migmon_bin().with_file_name("migrator")
}

fn migration<'a>(report: &'a Value, mode: &str) -> &'a Value {
    report["migrations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mode"] == mode)
        .unwrap_or_else(|| panic!("no {mode} migration in the report: {report:#}"))
}

#[test]
fn live_keeps_every_session_quick_aborts_every_one() {
    if std::fs::metadata("/dev/kvm").is_err() {
        eprintln!("SKIP: /dev/kvm is missing: the demo needs KVM");
        return;
    }
    let migrator = migrator_bin();
    assert!(
        migrator.exists(),
        "{} does not exist: `./x test` builds it (by hand: cargo build --release -p migrator)",
        migrator.display()
    );
    let out = std::env::temp_dir().join(unique("mmdemo-test"));
    let cfg = Config {
        prefix: unique("tbd"),
        clients: 4,
        quick_pause: Duration::from_secs(6),
        profile: Profile::Windows2003,
        out: out.clone(),
        migmon: migmon_bin(),
        migrator,
        mem: "256M".into(),
        dirty: Some("8M@16M".into()),
        settle: Duration::from_secs(3),
    };
    let say = |m: &str| eprintln!("demo: {m}");
    let interrupted = AtomicBool::new(false);
    let run = scenario::run(
        &cfg,
        &Ui {
            say: &say,
            interrupted: &interrupted,
        },
    )
    .unwrap_or_else(|e| panic!("the reduced demo failed: {e}"));
    eprintln!("{}", run.compare);
    assert!(
        std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .is_ok_and(|o| !String::from_utf8_lossy(&o.stdout).contains(&cfg.prefix)),
        "the testbed is down again"
    );

    // What the clients saw.
    assert_eq!(run.live.aborted(), 0, "live: {:#?}", run.live.clients);
    for c in &run.quick.clients {
        assert_eq!(
            c.verdict.errno(),
            Some(libc::ETIMEDOUT),
            "quick: every client connection times out: {c:?}"
        );
    }
    // The arithmetic the demo prints agrees with what happened.
    assert!(run.quick.pause_ms() / 1e3 > run.arithmetic.abort_at.as_secs_f64());

    // What migmon saw.
    let live = migration(&run.report, "live");
    let quick = migration(&run.report, "quick");
    assert_eq!(live["aborted"], 0, "{live:#}");
    for m in [live, quick] {
        assert!(
            !m["timeline"]["first_rarp"].is_null(),
            "the announce was seen: {m:#}"
        );
        assert!(
            !m["timeline"]["fdb_moves"].as_array().unwrap().is_empty(),
            "the FDB moved: {m:#}"
        );
    }
    let conns = quick["connections"].as_array().unwrap();
    for c in &run.quick.clients {
        let v = conns
            .iter()
            .find(|v| v["sport"] == c.local.port() && v["daddr"] == run.guest_ip.to_string())
            .unwrap_or_else(|| panic!("client {} not in the quick report: {quick:#}", c.local));
        assert_eq!(v["fate"], "aborted", "{v:#}");
        assert_eq!(v["reason"], "etimedout", "{v:#}");
    }
    assert_eq!(
        run.watch_exit,
        Some(1),
        "the --until-migrations gate fails on the quick migration"
    );
    for p in [
        &run.outputs.trace,
        &run.outputs.svg,
        &run.outputs.pcapng,
        &run.outputs.perfetto,
        &run.outputs.report_json,
        &run.outputs.jsonl,
    ] {
        assert!(
            std::fs::metadata(p).is_ok_and(|m| m.len() > 0),
            "{} was written",
            p.display()
        );
    }
    let _ = std::fs::remove_dir_all(&out);
}
