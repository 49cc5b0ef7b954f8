//! The correlation end to end on the real kernel, without a VM: `migmon watch` with the real probes and its
//! migrator event socket (`--events-listen`, `--record`, `--until-migrations 1`, `--junit`). A process plays the
//! migrator (it sends `setup`/`pause`/`resume`/`complete` over the socket, exactly as `migrator` does) and a server
//! namespace plays the VM: during the "pause" every packet into it is dropped, as frames to a paused VM are.
//!
//! A short pause ("live") must come out as 0 aborted and `check` exit 0; a long pause with `tcp_retries2=3` in the
//! client namespace ("quick") as each client connection aborted with ETIMEDOUT, with its 4-tuple, and exit 1, in the
//! live gate, in `migmon check` and in the `JUnit` files. The test with the real migrator is `correlate_e2e.rs`.
#![expect(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use integration_tests::{Netns, TestDir, VethPair, Watch, netns_exec, run_migmon, wait_until};
use migevents::{EventSink, MigrationEvent, Mode, Phase, Role};
use serde_json::Value;

/// Hands each test its own subnet.
static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

struct Setup {
    client: Netns,
    server: Netns,
    client_ip: Ipv4Addr,
    server_ip: Ipv4Addr,
    dir: TestDir,
}

impl Setup {
    fn new() -> Self {
        // A subnet per test: sockets of an earlier test in this process may still be closing towards its IP.
        let pid = std::process::id() + 17 * NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let net = [10, 150 + (pid % 50) as u8, ((pid / 50) % 250) as u8];
        let client_ip = Ipv4Addr::new(net[0], net[1], net[2], 1);
        let server_ip = Ipv4Addr::new(net[0], net[1], net[2], 2);
        let VethPair { a, b, .. } = VethPair::create("cc", [client_ip.into(), server_ip.into()], 24)
            .expect("build the test's namespaces");
        let (client, server) = (a, b);
        let dir = TestDir::new("migmon-corr");
        Self {
            client,
            server,
            client_ip,
            server_ip,
            dir,
        }
    }

    fn freeze_server(&self, frozen: bool) {
        let rule = if frozen {
            "add table inet migmon_pause; add chain inet migmon_pause input { type filter hook input priority -300; policy drop; }"
        } else {
            "delete table inet migmon_pause"
        };
        netns_exec(&self.server.name, &["nft", rule]);
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// What one scenario left behind.
struct Outcome {
    /// The live gate's exit code.
    code: Option<i32>,
    /// `migmon report --format json` of the recorded trace.
    report: Value,
    /// The client ends (address, port) of the connections.
    tuples: Vec<(String, u64)>,
    stderr: String,
    trace: PathBuf,
    setup: Setup,
}

/// Runs one migration.
fn scenario(mode: Mode, pause: Duration) -> Outcome {
    let s = Setup::new();
    netns_exec(&s.client.name, &["sysctl", "-qw", "net.ipv4.tcp_retries2=3"]);
    let listener: TcpListener = s
        .server
        .run(|| TcpListener::bind(SocketAddr::from((s.server_ip, 0))))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let sock = s.dir.join("events.sock");
    let trace = s.dir.join("run.trace");
    let junit = s.dir.join("gate.xml");
    let watch = Watch::start(&[
        "--port",
        &port.to_string(),
        "--events-listen",
        path(&sock),
        "--record",
        path(&trace),
        "--until-migrations",
        "1",
        "--settle",
        "2s",
        "--junit",
        path(&junit),
    ]);
    assert!(
        wait_until(Duration::from_secs(5), || sock.exists()),
        "no events socket"
    );

    let mut conns = Vec::new();
    let mut tuples = Vec::new();
    for _ in 0..2 {
        let to = listener.local_addr().unwrap();
        let mut c = s
            .client
            .run(|| TcpStream::connect_timeout(&to, Duration::from_secs(5)))
            .unwrap();
        let (mut srv, _) = listener.accept().unwrap();
        c.write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        srv.read_exact(&mut buf).unwrap();
        tuples.push((s.client_ip.to_string(), u64::from(c.local_addr().unwrap().port())));
        conns.push((c, srv));
    }

    let mac = "52:54:00:c0:ff:ee";
    let id = format!("{mode:?}-{}", std::process::id()).to_lowercase();
    let mut sink = EventSink::open(&sock).unwrap();
    let send =
        |sink: &mut EventSink, role, phase| sink.send(&MigrationEvent::now(&id, mac, role, phase)).unwrap();
    send(
        &mut sink,
        Role::Source,
        Phase::Setup {
            mode,
            ram_bytes: 256 << 20,
            ips: vec![s.server_ip.to_string()],
            host: s.server.name.clone(),
            carries_frames: false,
        },
    );
    send(&mut sink, Role::Source, Phase::Pause);
    s.freeze_server(true);
    for (c, _) in &mut conns {
        c.write_all(b"written while the VM is paused").unwrap();
    }
    // The pause itself: what is measured, not a synchronisation.
    std::thread::sleep(pause);
    s.freeze_server(false);
    send(&mut sink, Role::Destination, Phase::Resume);
    send(
        &mut sink,
        Role::Source,
        Phase::Complete {
            total_ms: pause.as_secs_f64() * 1e3,
            pause_ms: pause.as_secs_f64() * 1e3,
            bytes: 0,
        },
    );
    let (_, stderr, code) = watch.wait_exit(Duration::from_secs(60));
    let (rc, json) = run_migmon(&["report", path(&trace), "--format", "json"]);
    assert_eq!(rc, Some(0), "report failed: {json}");
    let report: Value = serde_json::from_str(&json).unwrap();
    assert!(junit.exists(), "the gate wrote its JUnit file; stderr: {stderr}");
    drop(conns);
    Outcome {
        code,
        report,
        tuples,
        stderr,
        trace,
        setup: s,
    }
}

fn client_verdicts<'a>(report: &'a Value, tuples: &[(String, u64)]) -> Vec<&'a Value> {
    let m = &report["migrations"][0];
    let v: Vec<&Value> = m["connections"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| {
            tuples
                .iter()
                .any(|(ip, port)| c["saddr"] == ip.as_str() && c["sport"] == *port)
        })
        .collect();
    assert_eq!(v.len(), tuples.len(), "every client connection is judged: {m:#}");
    v
}

#[test]
fn short_pause_survives_and_passes_the_gate() {
    let Outcome {
        code,
        report,
        tuples,
        stderr,
        trace,
        setup: s,
    } = scenario(Mode::Live, Duration::from_millis(300));
    assert_eq!(code, Some(0), "the gate passes: {stderr}");
    assert!(
        stderr.contains("migmon: migration live-"),
        "a live line: {stderr}"
    );
    let m = &report["migrations"][0];
    assert_eq!(m["source"], "migrator");
    assert_eq!(m["aborted"], 0, "{m:#}");
    let pause = m["downtime"]["vcpu_pause"]["ns"].as_u64().unwrap();
    assert!(
        (300_000_000..2_000_000_000).contains(&pause),
        "vCPU pause {pause}"
    );
    for c in client_verdicts(&report, &tuples) {
        assert_eq!(c["fate"], "survived", "{c:#}");
        assert_eq!(c["state_at_pause"], "ESTABLISHED", "{c:#}");
        assert!(
            c["retransmits"].as_u64().unwrap() >= 1,
            "data written during the pause was retransmitted: {c:#}"
        );
        assert!(c["first_progress_ns"].as_u64().is_some(), "{c:#}");
    }
    let junit = s.dir.join("check.xml");
    let (rc, out) = run_migmon(&["check", path(&trace), "--junit", path(&junit)]);
    assert_eq!(rc, Some(0), "{out}");
    assert!(
        std::fs::read_to_string(&junit)
            .unwrap()
            .contains("failures=\"0\"")
    );
}

#[test]
fn long_pause_aborts_with_etimedout_and_fails_the_gate() {
    let Outcome {
        code,
        report,
        tuples,
        stderr,
        trace,
        setup: s,
    } = scenario(Mode::Quick, Duration::from_secs(5));
    assert_eq!(code, Some(1), "the gate fails: {stderr}");
    let gate = std::fs::read_to_string(s.dir.join("gate.xml")).unwrap();
    assert!(gate.contains("ETIMEDOUT"), "{gate}");
    let m = &report["migrations"][0];
    assert_eq!(m["mode"], "quick");
    for c in client_verdicts(&report, &tuples) {
        assert_eq!(c["fate"], "aborted", "{c:#}");
        assert_eq!(c["reason"], "etimedout", "{c:#}");
        assert_eq!(c["daddr"], report["migrations"][0]["ips"][0], "{c:#}");
        // tcp_retries2=3 from a ≥200 ms base: the 3 s limit counts from the first RTO retransmission, so four RTO
        // retransmissions go out (plus maybe a tail loss probe) and the fifth timer aborts.
        assert!((4..=5).contains(&c["retransmits"].as_u64().unwrap()), "{c:#}");
        assert!(
            c["proof"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["kind"] == "tcp_error" && e["errno"] == 110)
        );
    }
    let (rc, out) = run_migmon(&["check", path(&trace)]);
    assert_eq!(rc, Some(1), "{out}");
    for (ip, port) in &tuples {
        assert!(
            out.contains(&format!("{ip}:{port} → ")),
            "each aborted 4-tuple is named: {out}"
        );
    }
    // The model, under the settings in force, predicts what happened.
    let (rc, out) = run_migmon(&[
        "whatif",
        path(&trace),
        "--in-force-tcp-retries2",
        "3",
        "--tcp-retries2",
        "15",
    ]);
    assert_eq!(rc, Some(0), "{out}");
    assert!(out.contains("would survive"), "{out}");
    assert!(!out.contains("differs from what happened"), "{out}");
}

/// Kills and reaps a child process.
struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A second QMP client that drives QEMU: one command at a time, replies awaited (events skipped).
fn qmp_command(stream: &mut std::io::BufReader<std::os::unix::net::UnixStream>, cmd: &str) {
    use std::io::BufRead;
    writeln!(stream.get_mut(), "{{\"execute\":\"{cmd}\"}}").unwrap();
    loop {
        let mut line = String::new();
        assert!(
            stream.read_line(&mut line).unwrap() > 0,
            "QEMU closed the QMP socket"
        );
        assert!(!line.contains("\"error\""), "{cmd}: {line}");
        if line.contains("\"return\"") {
            return;
        }
    }
}

/// `migmon watch --qmp` on a real QEMU: `stop` and `cont` make one pause window from QMP, recorded with the clock
/// offset, and the gate passes.
#[test]
fn qmp_pause_window_through_watch() {
    use std::io::BufRead;
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipping: qemu-system-x86_64 is not installed (./x setup installs qemu-system-x86)");
        return;
    }
    let dir = TestDir::new("migmon-qmpw");
    let (follow, drive) = (dir.join("follow.qmp"), dir.join("drive.qmp"));
    let _qemu = Kill(
        Command::new("qemu-system-x86_64")
            .args(["-M", "none", "-display", "none", "-nodefaults"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", follow.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", drive.display()))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(wait_until(Duration::from_secs(20), || follow.exists() && drive.exists()));
    let trace = dir.join("qmp.trace");
    let watch = Watch::start(&[
        "--port",
        "1",
        "--qmp",
        path(&follow),
        "--record",
        path(&trace),
        "--until-migrations",
        "1",
        "--settle",
        "1s",
        // No TCP connection is alive at this pause, so it has no verdicts: the gate would fail closed on that.
        "--allow-damaged",
    ]);
    let s = std::os::unix::net::UnixStream::connect(&drive).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut drv = std::io::BufReader::new(s);
    let mut greeting = String::new();
    drv.read_line(&mut greeting).unwrap();
    qmp_command(&mut drv, "qmp_capabilities");
    qmp_command(&mut drv, "stop");
    qmp_command(&mut drv, "cont");
    let (_, stderr, code) = watch.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("following QMP"), "{stderr}");
    let (rc, json) = run_migmon(&["report", path(&trace), "--format", "json"]);
    assert_eq!(rc, Some(0));
    let report: Value = serde_json::from_str(&json).unwrap();
    let m = &report["migrations"][0];
    assert_eq!(m["source"], "qmp", "{report:#}");
    assert_eq!(m["downtime"]["vcpu_pause"]["source"], "qmp");
    let text = std::fs::read_to_string(&trace).unwrap();
    assert!(
        text.contains("\"kind\":\"clock_offset\""),
        "the offset is recorded"
    );
}

/// `migmon watch --metrics`: a migration announced on the events socket shows up in the Prometheus metrics.
#[test]
fn metrics_count_a_migration_live() {
    let dir = TestDir::new("migmon-metrics");
    let sock = dir.join("events.sock");
    let watch = Watch::start(&[
        "--port",
        "1",
        "--events-listen",
        path(&sock),
        "--metrics",
        "127.0.0.1:0",
    ]);
    let err = watch.stderr();
    let addr = err
        .lines()
        .find_map(|l| l.strip_prefix("migmon: metrics on http://"))
        .and_then(|l| l.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("no metrics address in: {err}"))
        .to_owned();
    let mut sink = EventSink::open(&sock).unwrap();
    for (role, phase) in [(Role::Source, Phase::Pause), (Role::Destination, Phase::Resume)] {
        sink.send(&MigrationEvent::now(
            "metrics-1",
            "52:54:00:00:00:42",
            role,
            phase,
        ))
        .unwrap();
    }
    let scrape = || {
        let mut s = TcpStream::connect(addr.as_str()).ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    };
    let ok = wait_until(Duration::from_secs(10), || {
        scrape().is_some_and(|b| {
            // Series carry host and VM labels: `name{host="...",vm="..."} 1`.
            let counted = |name: &str| b.lines().any(|l| l.starts_with(name) && l.ends_with(" 1"));
            counted("migmon_migrations_total{") && counted("migmon_pause_seconds_count{")
        })
    });
    assert!(ok, "metrics never counted the migration: {:?}", scrape());
    let _ = watch.stop();
}
