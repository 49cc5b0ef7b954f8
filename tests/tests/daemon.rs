//! `migmon watch` as a host daemon meets bad company: clients of its metrics endpoint that send garbage, too much or
//! nothing, and a `--record-dir` read while the watch writes it (and after a watch died mid-write). Every skipped
//! input is counted (a `skipped` record in the trace, `migmon_skipped_input_total` in the metrics), nothing stops
//! the watch, and `migmon check DIR` tells a trace in progress from a dead one.
#![expect(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use integration_tests::{TestDir, Watch, migmon_bin, of_kind, run_migmon, wait_until};
use migevents::{EventSink, MigrationEvent, Mode, Phase, Role};
use serde_json::Value;

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The address after `migmon: metrics on http://` in the watch's stderr.
fn metrics_addr(watch: &Watch) -> String {
    let err = watch.stderr();
    err.lines()
        .find_map(|l| l.strip_prefix("migmon: metrics on http://"))
        .and_then(|l| l.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("no metrics address in: {err}"))
        .to_owned()
}

/// Sends `bytes`, half-closes, and returns whatever comes back (a reset counts as nothing more).
fn exchange(addr: &str, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(bytes).unwrap();
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// The value of the sample `series` (name and labels, exactly as rendered) in a scrape.
fn sample(body: &str, series: &str) -> Option<u64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A garbage client, an over-long request line and a client that starts a request and goes quiet are each
/// answered or dropped, counted by reason in the metrics and as `skipped` records in the trace, and warned about;
/// the endpoint keeps serving scrapes throughout.
#[test]
fn metrics_endpoint_counts_bad_clients_and_keeps_serving() {
    let dir = TestDir::new("migmon-daemon-metrics");
    let trace = dir.join("run.trace");
    let watch = Watch::start(&[
        "--port",
        "1",
        "--metrics",
        "127.0.0.1:0",
        "--record",
        path(&trace),
    ]);
    let addr = metrics_addr(&watch);

    // The slow client first: it holds its connection while the others come and go.
    let mut slow = TcpStream::connect(addr.as_str()).unwrap();
    slow.write_all(b"GET /metr").unwrap();
    let slow_since = Instant::now();
    assert!(
        exchange(&addr, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n").starts_with("HTTP/1.1 400")
    );
    assert!(exchange(&addr, b"SSH-2.0-OpenSSH_9.2\r\n\r\n").starts_with("HTTP/1.1 400"));
    let long = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(64 * 1024));
    assert!(exchange(&addr, long.as_bytes()).starts_with("HTTP/1.1 431"));
    // Served while the slow client still waits.
    let scrape = || exchange(&addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(scrape().starts_with("HTTP/1.1 200 OK"));
    // The slow client is cut off (with a 408) once its time is up.
    slow.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut answer = String::new();
    let _ = slow.read_to_string(&mut answer);
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "{answer:?} after {:?}",
        slow_since.elapsed()
    );

    let series =
        |reason: &str| format!("migmon_skipped_input_total{{source=\"metrics\",reason=\"{reason}\"}}");
    let expected = [("bad_request", 2), ("too_long", 1), ("timeout", 1)];
    let counted = wait_until(Duration::from_secs(10), || {
        let body = scrape();
        expected
            .iter()
            .all(|(r, n)| sample(&body, &series(r)) == Some(*n))
    });
    assert!(counted, "the refusals were not counted:\n{}", scrape());
    let body = scrape();
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");

    let (events, err) = watch.stop();
    // Warned on stderr (the journal) and as notes, once per reason here (then at powers of two).
    for what in [
        "not an HTTP request (1 so far",
        "not an HTTP request (2 so far",
        "over 16 KiB (1 so far",
        "within 2 s (1 so far",
    ] {
        assert!(err.contains(what), "no warning {what:?} in:\n{err}");
        assert!(
            events
                .iter()
                .any(|e| e["kind"] == "note" && e["message"].as_str().is_some_and(|m| m.contains(what))),
            "no note {what:?}"
        );
    }
    // The trace carries the cumulative counts.
    let recorded = migmon_analysis::trace::read_trace(&trace).unwrap();
    for (reason, n) in expected {
        let last = recorded.events.iter().rev().find_map(|e| match e {
            migmon_analysis::trace::Event::Skipped {
                source,
                reason: r,
                count,
                ..
            } if source == "metrics" && r == reason => Some(*count),
            _ => None,
        });
        assert_eq!(
            last,
            Some(n),
            "skipped record for {reason}: {:?}",
            of_kind(&events, "skipped")
        );
    }
}

/// A loopback TCP connection on `listener`'s port that the watch sees open, and that carries data on demand.
struct Conn {
    client: TcpStream,
    server: TcpStream,
}

impl Conn {
    fn open(listener: &TcpListener) -> Self {
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let mut c = Self { client, server };
        c.exchange();
        c
    }

    fn exchange(&mut self) {
        self.client.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        self.server.read_exact(&mut buf).unwrap();
    }
}

/// One migration of a VM at 127.0.0.1, announced on the events socket around an exchange on `conn`, then waited for
/// until the watch has settled it (its live line on stderr).
fn migrate(watch: &Watch, sock: &Path, id: &str, conn: &mut Conn) {
    let mut sink = EventSink::open(sock).unwrap();
    let mut send = |role, phase| {
        sink.send(&MigrationEvent::now(id, "52:54:00:00:00:43", role, phase))
            .unwrap();
    };
    send(
        Role::Source,
        Phase::Setup {
            mode: Mode::Live,
            ram_bytes: 256 << 20,
            ips: vec!["127.0.0.1".to_owned()],
            host: "here".to_owned(),
            carries_frames: false,
        },
    );
    send(Role::Source, Phase::Pause);
    conn.exchange();
    send(Role::Destination, Phase::Resume);
    send(
        Role::Source,
        Phase::Complete {
            total_ms: 1.0,
            pause_ms: 1.0,
            bytes: 0,
        },
    );
    conn.exchange();
    let line = format!("migmon: migration {id} (live)");
    let settled = wait_until(Duration::from_secs(20), || watch.stderr().contains(&line));
    assert!(settled, "{id} did not settle: {}", watch.stderr());
}

/// `migmon check DIR` and `report DIR` on the `--record-dir` of a running watch read its unfinished traces as in
/// progress and pass; once a watch has died without its end records and another writes the directory, the dead
/// watch's trace fails the gate (closed) with a clear word, and `--allow-damaged` accepts it.
#[test]
fn check_of_a_record_dir_tells_a_running_watch_from_a_dead_one() {
    let dir = TestDir::new("migmon-daemon-recdir");
    let records = dir.join("traces");
    let sock = dir.join("events.sock");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let args = [
        "--port",
        &port,
        "--events-listen",
        path(&sock),
        "--record-dir",
        path(&records),
        "--settle",
        "1s",
    ];
    let first = Watch::start(&args);
    let mut conn = Conn::open(&listener);
    migrate(&first, &sock, "daemon-1", &mut conn);

    let records_arg = path(&records);
    // The directory is flushed within a fraction of a second of the last event.
    let mut last = (None, String::new());
    let passed = wait_until(Duration::from_secs(10), || {
        last = run_migmon(&["check", records_arg]);
        last.0 == Some(0)
    });
    let (rc, out) = last;
    assert!(passed, "check of a running watch's directory: exit {rc:?}\n{out}");
    assert!(
        out.contains("ok   trace in progress") && out.contains("background-000000.trace"),
        "{out}"
    );
    let (rc, out) = run_migmon(&["report", records_arg]);
    assert_eq!(rc, Some(0), "{out}");
    assert!(
        out.contains("IN PROGRESS: ") && !out.lines().any(|l| l.starts_with("WARNING: ")),
        "{out}"
    );

    // The watch dies without its end records; another takes the directory over.
    let pid = nix::unistd::Pid::from_raw(i32::try_from(first.pid()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    drop(first);
    let second = Watch::start(&args);
    let mut conn = Conn::open(&listener);
    migrate(&second, &sock, "daemon-2", &mut conn);
    let (rc, out) = run_migmon(&["check", records_arg]);
    assert_eq!(rc, Some(1), "a dead watch's trace must fail the gate:\n{out}");
    let dead = out
        .lines()
        .filter(|l| l.starts_with("FAIL truncated trace") && l.contains("no running migmon is writing it"))
        .collect::<Vec<_>>();
    assert!(
        dead.iter().any(|l| l.contains("background-000000.trace")),
        "{out}"
    );
    assert!(
        out.contains("background-000001.trace: still being written"),
        "the running watch's file: {out}"
    );
    let (rc, out) = run_migmon(&["check", records_arg, "--allow-damaged"]);
    assert_eq!(rc, Some(0), "{out}");
    let (rc, out) = run_migmon(&["report", records_arg]);
    assert_eq!(rc, Some(0), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("WARNING: ") && l.contains("no running migmon")),
        "{out}"
    );
    let _ = second.stop();
}

/// The capabilities `contrib/migmon.service` bounds migmon to (`CapabilityBoundingSet=`), as `setpriv` names them.
fn unit_capabilities() -> Vec<String> {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/migmon.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .unwrap_or_else(|| panic!("no CapabilityBoundingSet= in {}", unit.display()));
    line.split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_lowercase())
        .collect()
}

/// The number of a capability (linux/capability.h) among those a unit may name here.
fn capability_number(name: &str) -> u32 {
    match name {
        "chown" => 0,
        "dac_override" => 1,
        "dac_read_search" => 2,
        "kill" => 5,
        "setgid" => 6,
        "setuid" => 7,
        "net_bind_service" => 10,
        "net_raw" => 13,
        "net_admin" => 12,
        "ipc_lock" => 14,
        "sys_ptrace" => 19,
        "sys_admin" => 21,
        "sys_resource" => 24,
        "syslog" => 34,
        "perfmon" => 38,
        "bpf" => 39,
        other => panic!("capability {other}: add its number (linux/capability.h) here"),
    }
}

/// The bits of a `Cap*:` line of /proc/PID/status.
fn capability_mask(pid: u32, which: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix(which))
        .unwrap_or_else(|| panic!("no {which} in the status of {pid}"));
    u64::from_str_radix(hex.trim(), 16).unwrap()
}

/// migmon as the service unit runs it, as root bounded to the unit's capabilities and nothing else: it loads its
/// programs, follows a bridge in another namespace and attaches to a tap that joins it, takes migrator events on its
/// socket, records into a directory, serves metrics, and stops cleanly.
#[test]
fn runs_with_the_service_units_capabilities_only() {
    let caps = unit_capabilities();
    let bounding = format!(
        "-all,{}",
        caps.iter().map(|c| format!("+{c}")).collect::<Vec<_>>().join(",")
    );
    let dir = TestDir::new("migmon-daemon-caps");
    let ns = integration_tests::Netns::new("mmcaps");
    let _br = integration_tests::Link::bridge("br-caps", Some(&ns.name));
    let sock = dir.join("events.sock");
    let records = dir.join("traces");
    let mut cmd = Command::new("setpriv");
    cmd.args(["--bounding-set", &bounding, "--inh-caps", "-all", "--"])
        .arg(migmon_bin())
        .args(["watch", "--json", "--bridge", &format!("br-caps@{}", ns.name)])
        .args(["--events-listen", path(&sock), "--record-dir", path(&records)])
        .args(["--metrics", "127.0.0.1:0"]);
    let watch = Watch::start_command(cmd);

    // Exactly the unit's capabilities are in effect, less those this machine withholds from the test itself (setpriv
    // execs migmon: the pid is migmon's).
    let ours = capability_mask(std::process::id(), "CapBnd:");
    let wanted = caps.iter().fold(0u64, |m, c| m | 1 << capability_number(c));
    let withheld: Vec<&String> = caps
        .iter()
        .filter(|c| ours & 1 << capability_number(c) == 0)
        .collect();
    if !withheld.is_empty() {
        eprintln!("note: this machine withholds {withheld:?} from the test: migmon runs without them");
    }
    let effective = capability_mask(watch.pid(), "CapEff:");
    assert_eq!(effective, wanted & ours, "{effective:#x} for {caps:?}");

    let _tap = integration_tests::Link::try_tap("tap-caps", Some(&ns.name), Some("br-caps")).unwrap();
    let events = watch.wait_for("the tap's attach", Duration::from_secs(20), |e| {
        of_kind(e, "port_attached")
            .iter()
            .any(|p| p["iface"] == "tap-caps")
    });
    let attached = of_kind(&events, "port_attached")
        .into_iter()
        .find(|p| p["iface"] == "tap-caps")
        .unwrap()
        .clone();
    assert_eq!(
        attached["hooks"],
        serde_json::json!(["tc ingress", "tc egress"]),
        "{attached}"
    );
    let mut sink = EventSink::open(&sock).unwrap();
    sink.send(&MigrationEvent::now(
        "caps-1",
        "52:54:00:00:00:44",
        Role::Source,
        Phase::Pause,
    ))
    .unwrap();
    watch.wait_for("the migrator's event", Duration::from_secs(10), |e| {
        e.iter()
            .any(|v| v["kind"] == "migration" && v["migration_id"] == "caps-1")
    });
    let addr = metrics_addr(&watch);
    let body = exchange(&addr, b"GET /metrics HTTP/1.1\r\n\r\n");
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    let (events, err) = watch.stop();
    let bad: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "port_failed" || (e["kind"] == "note" && e["level"] == "warning"))
        .collect();
    assert!(bad.is_empty(), "{bad:#?}\n{err}");
    let (rc, out) = run_migmon(&["report", path(&records)]);
    assert_eq!(rc, Some(0), "{out}");
    assert!(out.contains("caps-1"), "{out}");
}
