//! migmon end to end with the real migrator: a live and a quick migration of the real guest, with request/response
//! clients in their own namespace, watched by `migmon watch --record` with the probes on both taps and the
//! migrators' events on `--events-listen`, gated by `--until-migrations 1`.
//!
//! Live: the report says 0 aborted, the RARP and the FDB move were seen, and the gate and `migmon check` exit 0.
//! Quick with an 8 s pause against clients with `TCP_USER_TIMEOUT` 5 s: every client connection is reported aborted
//! with ETIMEDOUT under its own 4-tuple, as the clients themselves saw, and the gate, `migmon check` and the `JUnit`
//! files say it failed.
#![expect(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use integration_tests::{Netns, TestDir, VmHost, Watch, kvm_available, migmon_bin, migrator_bin, wait_until};
use serde_json::Value;
use testbed::clients::set_user_timeout;

/// Hands each test its own subnet.
static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

const MAC: &str = "52:54:00:6d:6d:65";

/// Whether the test can run here; says why not.
fn runnable() -> bool {
    kvm_available("the end-to-end test")
}

/// The migration tests' topology: a host namespace with a bridge and two taps, a client namespace on a veth.
struct Bed {
    host: Netns,
    client: Netns,
    tap_a: String,
    tap_b: String,
    guest_ip: Ipv4Addr,
    dir: TestDir,
}

impl Bed {
    fn new() -> Self {
        // A subnet per test: sockets of an earlier test in this process may still be closing towards its IP.
        let k = NEXT.fetch_add(1, Ordering::SeqCst);
        let n = ((std::process::id() + 97 * k) % 200 + 21) as u8;
        let client_ip = Ipv4Addr::new(10, n, 9, 1);
        let VmHost {
            host,
            client,
            mut taps,
            ..
        } = VmHost::create("ce", 2, client_ip.into(), 24).expect("build the test's host and client");
        let (tap_b, tap_a) = (taps.pop().unwrap(), taps.pop().unwrap());
        let dir = TestDir::new("migmon-e2e");
        Self {
            host,
            client,
            tap_a,
            tap_b,
            guest_ip: Ipv4Addr::new(10, n, 9, 2),
            dir,
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_owned()
    }

    fn migrator(&self, args: &[&str], log: &str) -> Proc {
        let out = std::fs::File::create(self.path(log)).unwrap();
        let child = self
            .host
            .command(migrator_bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Proc {
            child,
            log: self.path(log),
        }
    }
}

struct Proc {
    child: Child,
    log: String,
}

impl Proc {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A request/response client: one 64-byte request at a time; returns the errno that ended it, if any.
struct Client {
    local_port: u16,
    stop: Arc<AtomicBool>,
    progress: Arc<AtomicU64>,
    handle: JoinHandle<Option<i32>>,
}

impl Client {
    fn start(bed: &Bed, user_timeout_ms: Option<u32>) -> Self {
        let addr = SocketAddrV4::new(bed.guest_ip, guest_abi::RR_PORT);
        let mut s = bed
            .client
            .run(|| TcpStream::connect_timeout(&addr.into(), Duration::from_secs(5)))
            .unwrap();
        if let Some(ms) = user_timeout_ms {
            set_user_timeout(&s, Duration::from_millis(ms.into())).expect("set TCP_USER_TIMEOUT");
        }
        s.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
        let local_port = s.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(AtomicU64::new(0));
        let (st, pr) = (stop.clone(), progress.clone());
        let handle = std::thread::spawn(move || {
            let mut seq = 0u32;
            let mut resp = [0u8; 4 + 64];
            while !st.load(Ordering::SeqCst) {
                let mut req = seq.to_be_bytes().to_vec();
                req.extend_from_slice(&64u32.to_be_bytes());
                if let Err(e) = s.write_all(&req).and_then(|()| s.read_exact(&mut resp)) {
                    return e.raw_os_error().or(Some(0));
                }
                seq += 1;
                pr.store(u64::from(seq), Ordering::SeqCst);
                // Pacing the load generator, not synchronisation.
                std::thread::sleep(Duration::from_millis(5));
            }
            None
        });
        Self {
            local_port,
            stop,
            progress,
            handle,
        }
    }

    fn finish(self) -> Option<i32> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().unwrap()
    }
}

struct Run {
    gate: Option<i32>,
    report: Value,
    clients: Vec<(u16, Option<i32>)>,
    trace: String,
    bed: Bed,
    stderr: String,
}

/// Boots the guest on tap A, starts 4 clients, then runs each `(mode, extra migrate args)` step: A → B, B → A, …
fn migrate(steps: &[(&str, &[&str])], user_timeout_ms: Option<u32>) -> Option<Run> {
    if !runnable() {
        return None;
    }
    let bed = Bed::new();
    let (sock, trace, junit) = (
        bed.path("events.sock"),
        bed.path("run.trace"),
        bed.path("gate.xml"),
    );
    let watch = watch_migrations(&bed, &sock, &trace, &junit, steps.len());
    let mut procs = vec![boot(&bed, &sock)];
    let clients: Vec<Client> = (0..4).map(|_| Client::start(&bed, user_timeout_ms)).collect();
    assert!(
        wait_until(Duration::from_secs(10), || clients
            .iter()
            .all(|c| c.progress.load(Ordering::SeqCst) > 10)),
        "the clients did not get going"
    );
    let mut source_api = bed.path("api0");
    for (k, (mode, extra)) in steps.iter().enumerate() {
        source_api = migrate_step(&bed, &mut procs, &sock, &source_api, k, mode, extra);
    }
    let (_, stderr, gate) = watch.wait_exit(Duration::from_secs(90));
    let clients: Vec<(u16, Option<i32>)> = clients.into_iter().map(|c| (c.local_port, c.finish())).collect();
    let out = Command::new(migmon_bin())
        .args(["report", &trace, "--format", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        Path::new(&junit).exists(),
        "the gate wrote its JUnit file: {stderr}"
    );
    drop(procs);
    Some(Run {
        gate,
        report,
        clients,
        trace,
        bed,
        stderr,
    })
}

/// `migmon watch` on both taps, fed by the migrators' events, until `migrations` migrations have settled.
fn watch_migrations(bed: &Bed, sock: &str, trace: &str, junit: &str, migrations: usize) -> Watch {
    let at = |tap: &str| format!("{tap}@{}", bed.host.name);
    let vm = format!("{MAC}={}", bed.guest_ip);
    let until = migrations.to_string();
    Watch::start(&[
        "--vm",
        &vm,
        "--iface",
        &at(&bed.tap_a),
        "--iface",
        &at(&bed.tap_b),
        "--egress",
        &at(&bed.tap_a),
        "--egress",
        &at(&bed.tap_b),
        "--port",
        &guest_abi::RR_PORT.to_string(),
        "--events-listen",
        sock,
        "--record",
        trace,
        "--until-migrations",
        &until,
        "--settle",
        "3s",
        "--junit",
        junit,
    ])
}

/// `migrator run` on tap A with its API at `api0`; waits until the guest's echo service answers.
fn boot(bed: &Bed, sock: &str) -> Proc {
    let ip = format!("{}/24", bed.guest_ip);
    let api = bed.path("api0");
    let run = bed.migrator(
        &[
            "run", "--tap", &bed.tap_a, "--mac", MAC, "--ip", &ip, "--mem", "256M", "--api", &api,
            "--events", sock,
        ],
        "run.log",
    );
    let echo = SocketAddrV4::new(bed.guest_ip, guest_abi::ECHO_PORT);
    assert!(
        wait_until(Duration::from_secs(30), || bed.client.run(|| {
            TcpStream::connect_timeout(&echo.into(), Duration::from_millis(300)).is_ok()
        })),
        "the guest never answered:\n{}",
        run.log()
    );
    run
}

/// Step `k`: `migrator receive` on the other tap, then `migrator migrate --mode MODE` to it from `source_api`.
/// Returns the API of the VM's new home.
fn migrate_step(
    bed: &Bed,
    procs: &mut Vec<Proc>,
    sock: &str,
    source_api: &str,
    k: usize,
    mode: &str,
    extra: &[&str],
) -> String {
    let tap = if k.is_multiple_of(2) {
        &bed.tap_b
    } else {
        &bed.tap_a
    };
    let (api, stream) = (
        bed.path(&format!("api{}", k + 1)),
        bed.path(&format!("mig{k}.sock")),
    );
    let listen = format!("unix:{stream}");
    procs.push(bed.migrator(
        &[
            "receive", "--tap", tap, "--listen", &listen, "--api", &api, "--events", sock,
        ],
        &format!("receive{k}.log"),
    ));
    assert!(
        wait_until(Duration::from_secs(10), || Path::new(&api).exists()),
        "{}",
        procs[procs.len() - 1].log()
    );
    let mut args = vec![
        "migrate", "--api", source_api, "--to", &listen, "--mode", mode, "--verify",
    ];
    args.extend_from_slice(extra);
    let out = bed.host.command(migrator_bin()).args(&args).output().unwrap();
    assert!(
        out.status.success(),
        "migrate {k} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        procs.iter().map(Proc::log).collect::<Vec<_>>().join("\n")
    );
    api
}

fn verdict(report: &Value, port: u16) -> &Value {
    report["migrations"][0]["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["sport"] == port)
        .unwrap_or_else(|| panic!("client port {port} not in the report: {report:#}"))
}

fn check(run: &Run) -> (Option<i32>, String, String) {
    let junit = run.bed.path("check.xml");
    let out = Command::new(migmon_bin())
        .args(["check", &run.trace, "--junit", &junit])
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        std::fs::read_to_string(&junit).unwrap(),
    )
}

#[test]
fn live_migration_every_session_survives() {
    let Some(run) = migrate(&[("live", &[])], None) else {
        return;
    };
    let m = &run.report["migrations"][0];
    assert_eq!(run.gate, Some(0), "the gate passes: {}", run.stderr);
    assert_eq!(m["mode"], "live");
    assert_eq!(m["aborted"], 0, "{m:#}");
    for (port, err) in &run.clients {
        assert_eq!(*err, None, "client {port} failed");
        assert_eq!(verdict(&run.report, *port)["fate"], "survived");
    }
    assert!(!m["timeline"]["first_rarp"].is_null(), "the RARP was seen: {m:#}");
    assert!(
        !m["timeline"]["fdb_moves"].as_array().unwrap().is_empty(),
        "the FDB moved: {m:#}"
    );
    assert_eq!(m["downtime"]["vcpu_pause"]["source"], "migrator");
    let (code, out, junit) = check(&run);
    assert_eq!(code, Some(0), "{out}");
    assert!(junit.contains("failures=\"0\""), "{junit}");
}

#[test]
fn quick_migration_aborts_each_session_with_etimedout() {
    let Some(run) = migrate(&[("quick", &["--extra-pause", "8s"])], Some(5000)) else {
        return;
    };
    let m = &run.report["migrations"][0];
    assert_eq!(run.gate, Some(1), "the gate fails: {}", run.stderr);
    assert_eq!(m["mode"], "quick");
    for (port, err) in &run.clients {
        assert_eq!(*err, Some(libc::ETIMEDOUT), "client {port} saw ETIMEDOUT");
        let v = verdict(&run.report, *port);
        assert_eq!(v["fate"], "aborted", "{v:#}");
        assert_eq!(v["reason"], "etimedout", "{v:#}");
        assert_eq!(v["daddr"], run.bed.guest_ip.to_string());
        assert_eq!(v["dport"], guest_abi::RR_PORT);
    }
    assert_eq!(m["aborted"], run.clients.len(), "{m:#}");
    let (code, out, junit) = check(&run);
    assert_eq!(code, Some(1), "{out}");
    for (port, _) in &run.clients {
        assert!(
            out.contains(&format!(":{port} → {}:", run.bed.guest_ip)),
            "4-tuple named: {out}"
        );
    }
    assert!(
        junit.contains("<failure") && junit.contains("ETIMEDOUT"),
        "{junit}"
    );
}

/// The demo's sequence in one watch: live A → B, then quick B → A with an 8 s pause, against clients with
/// `TCP_USER_TIMEOUT` 5 s. Two migrations, the first with 0 aborted and the RARP on B, the second with every client
/// aborted with ETIMEDOUT and the RARP on A; the gate, over both, fails.
#[test]
fn back_to_back_live_then_quick() {
    let Some(run) = migrate(&[("live", &[]), ("quick", &["--extra-pause", "8s"])], Some(5000)) else {
        return;
    };
    assert_eq!(
        run.gate,
        Some(1),
        "the gate fails on the quick one: {}",
        run.stderr
    );
    let ms = run.report["migrations"].as_array().unwrap();
    assert_eq!(ms.len(), 2, "{:#}", run.report);
    let (live, quick) = (&ms[0], &ms[1]);
    assert_eq!(
        (live["mode"].as_str(), quick["mode"].as_str()),
        (Some("live"), Some("quick"))
    );
    assert_eq!(live["aborted"], 0, "{live:#}");
    assert_eq!(quick["aborted"], run.clients.len(), "{quick:#}");
    let rarp_port = |m: &Value| {
        m["timeline"]["first_rarp"]["port"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    assert!(rarp_port(live).starts_with(&run.bed.tap_b), "{live:#}");
    assert!(rarp_port(quick).starts_with(&run.bed.tap_a), "{quick:#}");
    for (port, err) in &run.clients {
        assert_eq!(*err, Some(libc::ETIMEDOUT), "client {port}");
        let in_live = live["connections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["sport"] == *port)
            .unwrap();
        assert_eq!(in_live["fate"], "survived");
        let in_quick = quick["connections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["sport"] == *port)
            .unwrap();
        assert_eq!(in_quick["reason"], "etimedout");
    }
}
