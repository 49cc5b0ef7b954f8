//! The reduced demo: `./x demo`'s own scenario (`testbed::scenario`) on a testbed of its own, with 4 clients and a
//! shorter quick pause. Asserts the thesis: the live migration aborts nothing; the quick one aborts every client
//! connection with ETIMEDOUT, as the clients' sockets and migmon's report both say; the announce is seen and the
//! FDB moves in both migrations; every output file is written.
#![expect(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

use std::time::Duration;

use integration_tests::{TestDir, kvm_available, run_scenario, scenario_config, unique};
use serde_json::Value;
use testbed::scenario::{self, Config};

fn migration<'a>(report: &'a Value, mode: &str) -> &'a Value {
    report["migrations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mode"] == mode)
        .unwrap_or_else(|| panic!("no {mode} migration in the report: {report:#}"))
}

/// Each client connection, IPv4 and IPv6, is in migmon's quick-migration report, aborted with ETIMEDOUT as its own
/// socket saw.
fn every_client_is_judged_as_its_socket_saw(run: &scenario::Run, quick: &Value) {
    let conns = quick["connections"].as_array().unwrap();
    assert!(
        run.quick.clients.iter().any(|c| c.remote.ip() == run.guest_ip6)
            && run.quick.clients.iter().any(|c| c.remote.ip() == run.guest_ip),
        "clients over both IPv4 and IPv6: {:#?}",
        run.quick.clients
    );
    for c in &run.quick.clients {
        let v = conns
            .iter()
            .find(|v| v["sport"] == c.local.port() && v["daddr"] == c.remote.ip().to_string())
            .unwrap_or_else(|| panic!("client {} not in the quick report: {quick:#}", c.local));
        assert_eq!(v["fate"], "aborted", "{v:#}");
        assert_eq!(v["reason"], "etimedout", "{v:#}");
    }
}

#[test]
fn live_keeps_every_session_quick_aborts_every_one() {
    if !kvm_available("the demo") {
        return;
    }
    let out = TestDir::new("mmdemo-test");
    let cfg = Config {
        quick_pause: Duration::from_secs(8),
        ..scenario_config("tbd", &out)
    };
    let run = run_scenario(&cfg, "demo");
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
            !m["timeline"]["first_na"].is_null(),
            "the guest's neighbor advertisement was seen: {m:#}"
        );
        assert!(
            !m["timeline"]["fdb_moves"].as_array().unwrap().is_empty(),
            "the FDB moved: {m:#}"
        );
    }
    every_client_is_judged_as_its_socket_saw(&run, quick);
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
}

/// Connects from namespace `from` to a listener at `addr` in namespace `to`; returns whether a byte went through.
fn tcp_reaches(from: &str, to: &str, addr: std::net::SocketAddrV4) -> bool {
    use std::io::{Read, Write};
    let listener = testbed::net::in_netns(to, || std::net::TcpListener::bind(addr))
        .unwrap()
        .unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
        b[0]
    });
    let sent = testbed::net::in_netns(from, || {
        std::net::TcpStream::connect_timeout(&addr.into(), Duration::from_secs(5))
            .and_then(|mut s| s.write_all(&[42]))
            .is_ok()
    })
    .unwrap();
    sent && server.join().unwrap() == 42
}

#[test]
fn testbed_up_is_idempotent_isolated_and_down_cleans_up_after_a_crash() {
    use testbed::{
        net::{netns_exists, try_ip_in, wait_until},
        topology::{Host, Testbed, Topology},
    };
    let topo = Topology::new(&unique("tbt")).unwrap();
    let other = Topology::new(&unique("tbt")).unwrap();
    // Guards: both go down even if an assertion fails.
    let _guards = (Testbed { topo: topo.clone() }, Testbed { topo: other.clone() });
    topo.up().unwrap();
    other.up().unwrap();
    assert!(
        topo.is_up() && other.is_up(),
        "{}{}",
        topo.status(),
        other.status()
    );
    // `up` again leaves the running testbed alone: same namespace (inode) as before.
    let inode = |ns: &str| {
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(testbed::net::netns_path(ns)).unwrap())
    };
    let before = inode(&topo.host_ns(Host::A));
    topo.up().unwrap();
    assert_eq!(inode(&topo.host_ns(Host::A)), before, "up is idempotent");

    // The client reaches host A's bridge through the switch and A's uplink; A reaches B over the migration link.
    let ha = topo.host_ns(Host::A);
    let probe_ip = topo.vm_ip(0);
    try_ip_in(
        Some(&ha),
        &["addr", "add", &format!("{probe_ip}/25"), "dev", Host::A.bridge()],
    )
    .unwrap();
    assert!(
        tcp_reaches(
            &topo.client_ns(),
            &ha,
            std::net::SocketAddrV4::new(probe_ip, 9001)
        ),
        "client → switch → host A: {}",
        topo.status()
    );
    assert!(
        tcp_reaches(
            &ha,
            &topo.host_ns(Host::B),
            std::net::SocketAddrV4::new(topo.mig_ip(Host::B), 9002)
        ),
        "host A → host B over the migration link"
    );
    // Nothing is routed out: no namespace has a default route.
    for ns in topo.namespaces() {
        let routes = try_ip_in(Some(&ns), &["route", "show", "default"]).unwrap();
        assert!(routes.trim().is_empty(), "{ns} has a default route: {routes}");
    }

    // A crash: a process left running inside host B, and a namespace missing. `up` rebuilds, `down` ends the
    // process and removes everything.
    let mut leftover = std::process::Command::new("ip")
        .args(["netns", "exec", &topo.host_ns(Host::B), "sleep", "600"])
        .spawn()
        .unwrap();
    assert!(wait_until(Duration::from_secs(5), || {
        testbed::net::try_run("ip", &["netns", "pids", &topo.host_ns(Host::B)])
            .is_ok_and(|o| !o.trim().is_empty())
    }));
    testbed::net::try_run("ip", &["netns", "del", &topo.switch_ns()]).unwrap();
    assert!(!topo.is_up());
    topo.up().unwrap();
    assert!(topo.is_up(), "a partial testbed is rebuilt: {}", topo.status());
    assert!(
        wait_until(Duration::from_secs(5), || leftover
            .try_wait()
            .ok()
            .flatten()
            .is_some()),
        "rebuilding ended the process left inside"
    );
    topo.down().unwrap();
    for ns in topo.namespaces() {
        assert!(!netns_exists(&ns), "{ns} was removed");
    }
    assert!(other.is_up(), "the other testbed is untouched");
    other.down().unwrap();
    assert!(!other.namespaces().iter().any(|n| netns_exists(n)));
}
