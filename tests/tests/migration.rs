//! Privileged migration tests: two real `migrator` processes (KVM, taps on one bridge), real TCP clients in their
//! own namespace, and the guest's services.
//!
//! Topology of every test (all names unique, removed by guards):
//!
//! ```text
//!  client netns              host netns
//!  ┌────────────┐  veth     ┌──────────────────────────────────────────┐
//!  │ 10.x.y.1 ──┼───────────┼─ br ── tapA  (migrator run,  source)      │
//!  │ clients    │           │     └─ tapB  (migrator receive, dest)     │
//!  └────────────┘           │  migration stream: unix socket            │
//!                           └──────────────────────────────────────────┘
//! ```
//!
//! Figures (pause, total, client gaps) are printed for the record; the benchmarks own them. The tests assert
//! outcomes: no aborted connection, intact streams, verified RAM, the RARP seen, the FDB moved, rollbacks.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    os::unix::net::UnixListener,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use integration_tests::{
    Netns, RarpCapture, TestDir, VmHost, fdb_port, kvm_available, migrator_bin, wait_until,
};
use migmon_base::MacAddr;
use serde_json::Value;
use testbed::clients::set_user_timeout;

const MAC: MacAddr = MacAddr([0x52, 0x54, 0x00, 0x6d, 0x69, 0x67]);

/// One test's world: the namespaces, the bridge, the taps and the addresses.
struct Bed {
    host: Netns,
    client: Netns,
    bridge: String,
    tap_a: String,
    tap_b: String,
    guest_ip: Ipv4Addr,
    dir: TestDir,
}

impl Bed {
    fn new() -> Self {
        let n = std::process::id() % 200 + 20;
        let client_ip = Ipv4Addr::new(10, n as u8, 7, 1);
        let VmHost {
            host,
            client,
            bridge,
            mut taps,
            ..
        } = VmHost::create("mg", 2, client_ip.into(), 24).expect("build the test's host and client");
        let (tap_b, tap_a) = (taps.pop().expect("tap B"), taps.pop().expect("tap A"));
        let dir = TestDir::new("migt");
        Self {
            host,
            client,
            bridge,
            tap_a,
            tap_b,
            guest_ip: Ipv4Addr::new(10, n as u8, 7, 2),
            dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// `migrator ARGS` in the host namespace, output to `log`.
    fn spawn(&self, args: &[&str], log: &str) -> Proc {
        let log_path = self.path(log);
        let out = std::fs::File::create(&log_path).expect("log file");
        let child = self
            .host
            .command(migrator_bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("start migrator");
        Proc {
            child: Some(child),
            log: log_path,
        }
    }

    /// Boots the guest on tap A with the API at `api` and waits until its echo service answers.
    fn boot(&self, extra: &[&str]) -> Proc {
        let api = self.path("a.api");
        let events = self.path("events");
        let ip = format!("{}/24", self.guest_ip);
        let mac = MAC.to_string();
        let mut args = vec![
            "run",
            "--tap",
            &self.tap_a,
            "--mac",
            &mac,
            "--ip",
            &ip,
            "--mem",
            "256M",
            "--api",
            api.to_str().expect("utf-8 path"),
            "--events",
            events.to_str().expect("utf-8 path"),
        ];
        args.extend_from_slice(extra);
        let mut p = self.spawn(&args, "a.log");
        let addr = SocketAddrV4::new(self.guest_ip, guest_abi::ECHO_PORT);
        let up = wait_until(Duration::from_secs(30), || {
            assert!(p.running(), "migrator run exited early:\n{}", p.log());
            self.client
                .run(|| TcpStream::connect_timeout(&addr.into(), Duration::from_millis(300)).is_ok())
        });
        assert!(up, "the guest's echo service never answered:\n{}", p.log());
        p
    }

    /// `migrator receive` on tap B, writing to the events file.
    fn receive(&self, listen: &Path, api: &Path) -> Proc {
        let events = self.path("events");
        let events = ["--events", events.to_str().expect("utf-8 path")];
        self.receive_on(&self.tap_b, listen, api, "b.log", &events)
    }

    /// `migrator receive` on `tap` with `extra` arguments, output to `log`; waits until its API is open.
    fn receive_on(&self, tap: &str, listen: &Path, api: &Path, log: &str, extra: &[&str]) -> Proc {
        let listen = format!("unix:{}", listen.display());
        let mut args = vec![
            "receive",
            "--tap",
            tap,
            "--listen",
            &listen,
            "--api",
            api.to_str().expect("utf-8 path"),
        ];
        args.extend_from_slice(extra);
        let p = self.spawn(&args, log);
        assert!(
            wait_until(Duration::from_secs(10), || api.exists()),
            "migrator receive never opened its API:\n{}",
            p.log()
        );
        p
    }

    /// `migrator migrate ...`; returns its output.
    fn migrate(&self, api: &Path, to: &Path, extra: &[&str]) -> Output {
        let to = format!("unix:{}", to.display());
        self.host
            .command(migrator_bin())
            .args([
                "migrate",
                "--api",
                api.to_str().expect("utf-8 path"),
                "--to",
                &to,
                "--verify",
            ])
            .args(extra)
            .output()
            .expect("run migrator migrate")
    }

    /// The bridge port the VM's MAC is learned on.
    fn fdb_port(&self) -> Option<String> {
        fdb_port(Some(&self.host.name), &self.bridge, MAC)
    }

    fn events(&self) -> Vec<Value> {
        std::fs::read_to_string(self.path("events"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// `migrator status` of the migrator behind `api`.
fn status(api: &Path) -> Option<Value> {
    let out = Command::new(migrator_bin())
        .args(["status", "--api", api.to_str().expect("utf-8 path")])
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

/// A migrator process, killed on drop.
struct Proc {
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let c = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The guest's dirtier's completed passes over its working set, from the guest's last stats line on the
    /// serial console (`dirtier passes N`, at most every 2 s).
    fn dirtier_passes(&self) -> u64 {
        self.log()
            .lines()
            .filter_map(|l| l.split("dirtier passes ").nth(1))
            .filter_map(|n| n.trim().parse().ok())
            .next_back()
            .unwrap_or(0)
    }

    fn kill(&mut self) {
        if let Some(c) = self.child.as_mut() {
            // `ip netns exec` execs the migrator, so the child pid is the migrator's.
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What one client saw.
#[derive(Debug, Default, Clone)]
struct ClientResult {
    /// Records or responses received.
    count: u64,
    /// The error that ended it, with its errno.
    error: Option<(String, Option<i32>)>,
    /// The longest time without progress.
    max_gap: Duration,
}

/// A client thread (stream or request/response) with a stop flag.
struct Client {
    stop: Arc<AtomicBool>,
    progress: Arc<AtomicU64>,
    handle: JoinHandle<ClientResult>,
}

impl Client {
    /// Connects from the client namespace; the socket stays there.
    fn connect(bed: &Bed, port: u16, user_timeout_ms: Option<u32>) -> TcpStream {
        let addr = SocketAddrV4::new(bed.guest_ip, port);
        let s = bed
            .client
            .run(|| TcpStream::connect_timeout(&addr.into(), Duration::from_secs(5)))
            .expect("connect to the guest");
        if let Some(ms) = user_timeout_ms {
            set_user_timeout(&s, Duration::from_millis(ms.into())).expect("set TCP_USER_TIMEOUT");
        }
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        s
    }

    /// Reads the sequence-numbered stream (at `rate` records/s) and checks every record.
    fn stream(bed: &Bed, rate: u32) -> Self {
        let mut s = Self::connect(bed, guest_abi::STREAM_PORT, None);
        s.write_all(&rate.to_be_bytes()).expect("stream request");
        Self::spawn("stream", move |stop, progress| {
            let mut r = ClientResult::default();
            let mut rec = vec![0u8; guest_abi::STREAM_RECORD];
            let mut last = Instant::now();
            while !stop.load(Ordering::SeqCst) {
                if let Err(e) = s.read_exact(&mut rec) {
                    r.error = Some((e.to_string(), e.raw_os_error()));
                    break;
                }
                let mut n = [0u8; 8];
                n.copy_from_slice(&rec[..8]);
                let n = u64::from_be_bytes(n);
                if n != r.count || rec[8..].iter().any(|&b| b != n as u8) {
                    r.error = Some((
                        format!("record {n} where {} was due: the stream is broken", r.count),
                        None,
                    ));
                    break;
                }
                r.count += 1;
                progress.store(r.count, Ordering::SeqCst);
                r.max_gap = r.max_gap.max(last.elapsed());
                last = Instant::now();
            }
            r
        })
    }

    /// Request/response: 64-byte answers, one request at a time, as fast as they come back.
    fn request_response(bed: &Bed, user_timeout_ms: Option<u32>) -> Self {
        let mut s = Self::connect(bed, guest_abi::RR_PORT, user_timeout_ms);
        Self::spawn("rr", move |stop, progress| {
            let mut r = ClientResult::default();
            let mut last = Instant::now();
            let mut seq = 0u32;
            let len = 64u32;
            let mut resp = vec![0u8; 4 + len as usize];
            while !stop.load(Ordering::SeqCst) {
                let mut req = seq.to_be_bytes().to_vec();
                req.extend_from_slice(&len.to_be_bytes());
                let res = s.write_all(&req).and_then(|()| s.read_exact(&mut resp));
                if let Err(e) = res {
                    r.error = Some((e.to_string(), e.raw_os_error()));
                    break;
                }
                if resp[..4] != seq.to_be_bytes() || resp[4..].iter().any(|&b| b != seq as u8) {
                    r.error = Some((format!("bad response to request {seq}"), None));
                    break;
                }
                seq += 1;
                r.count += 1;
                progress.store(r.count, Ordering::SeqCst);
                r.max_gap = r.max_gap.max(last.elapsed());
                last = Instant::now();
                std::thread::sleep(Duration::from_millis(5));
            }
            r
        })
    }

    fn spawn(
        name: &str,
        f: impl FnOnce(Arc<AtomicBool>, Arc<AtomicU64>) -> ClientResult + Send + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(AtomicU64::new(0));
        let (s, p) = (stop.clone(), progress.clone());
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || f(s, p))
            .expect("client thread");
        Self {
            stop,
            progress,
            handle,
        }
    }

    fn progress(&self) -> u64 {
        self.progress.load(Ordering::SeqCst)
    }

    fn finish(self) -> ClientResult {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().expect("client thread")
    }
}

/// 8 stream + 8 request/response clients, all making progress.
fn sixteen_clients(bed: &Bed) -> Vec<Client> {
    let mut v = Vec::new();
    for _ in 0..8 {
        v.push(Client::stream(bed, 20));
        v.push(Client::request_response(bed, None));
    }
    assert!(
        wait_until(Duration::from_secs(10), || v.iter().all(|c| c.progress() > 5)),
        "not every client got going: {:?}",
        v.iter().map(Client::progress).collect::<Vec<_>>()
    );
    v
}

/// Waits until every client made progress beyond what it had at the call.
fn all_progress(clients: &[Client], timeout: Duration) -> bool {
    let base: Vec<u64> = clients.iter().map(Client::progress).collect();
    wait_until(timeout, || {
        clients.iter().zip(&base).all(|(c, b)| c.progress() > b + 3)
    })
}

fn summary(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "migrate failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout).expect("JSON summary")
}

fn print_figures(what: &str, s: &Value, clients: &[ClientResult]) {
    eprintln!("{what}: summary {s}");
    let gap = clients.iter().map(|c| c.max_gap).max().unwrap_or_default();
    eprintln!(
        "{what}: total {:.1} ms, pause {:.1} ms (floor {:.2} ms), {} bytes, {} rounds, largest client gap {:?}",
        s["total_ms"].as_f64().unwrap_or(f64::NAN),
        s["pause_ms"].as_f64().unwrap_or(f64::NAN),
        s["floor_ms"].as_f64().unwrap_or(f64::NAN),
        s["bytes"],
        s["rounds"],
        gap
    );
}

#[test]
fn guest_services_answer() {
    if !kvm_available("the migration tests") {
        return;
    }
    let bed = Bed::new();
    let _a = bed.boot(&[]);
    let mut echo = Client::connect(&bed, guest_abi::ECHO_PORT, None);
    echo.write_all(b"hello, guest").expect("echo write");
    let mut back = [0u8; 12];
    echo.read_exact(&mut back).expect("echo read");
    assert_eq!(&back, b"hello, guest");
    let clients = vec![Client::stream(&bed, 0), Client::request_response(&bed, None)];
    assert!(
        all_progress(&clients, Duration::from_secs(10)),
        "stream and request/response make progress"
    );
    for c in clients {
        let r = c.finish();
        assert!(r.error.is_none(), "{r:?}");
    }
}

#[test]
fn live_migration_keeps_every_connection() {
    if !kvm_available("the migration tests") {
        return;
    }
    let bed = Bed::new();
    let mut a = bed.boot(&[]);
    let (api_a, api_b, sock) = (bed.path("a.api"), bed.path("b.api"), bed.path("b.sock"));
    let mut b = bed.receive(&sock, &api_b);
    let clients = sixteen_clients(&bed);
    assert_eq!(
        bed.fdb_port().as_deref(),
        Some(bed.tap_a.as_str()),
        "the MAC is learned on tap A first"
    );
    let rarp = RarpCapture::start(&bed.client, MAC.octets());

    let s = summary(&bed.migrate(&api_a, &sock, &["--mode", "live", "--downtime", "30ms"]));
    assert!(s["verified_hash"].is_string(), "RAM was hashed at both ends: {s}");
    assert!(
        a.wait_exit(Duration::from_secs(10))
            .is_some_and(|st| st.success()),
        "the source exits 0 after the ack:\n{}",
        a.log()
    );
    assert!(b.running(), "the destination runs the guest:\n{}", b.log());
    assert!(
        all_progress(&clients, Duration::from_secs(10)),
        "every client goes on after the move"
    );
    assert!(
        wait_until(Duration::from_secs(5), || rarp.count() >= 5),
        "5 RARP frames reach the client side, saw {}",
        rarp.count()
    );
    assert!(
        wait_until(Duration::from_secs(5), || bed.fdb_port().as_deref()
            == Some(bed.tap_b.as_str())),
        "the bridge entry moved to tap B: {:?}",
        bed.fdb_port()
    );
    let results: Vec<ClientResult> = clients.into_iter().map(Client::finish).collect();
    for r in &results {
        assert!(r.error.is_none(), "a connection broke: {r:?}");
    }
    print_figures("live, idle, 16 clients", &s, &results);
    let evs = bed.events();
    for (role, ev) in [
        ("source", "pause"),
        ("destination", "resume"),
        ("destination", "announce"),
        ("source", "complete"),
    ] {
        assert!(
            evs.iter()
                .any(|e| e["role"] == role && e["event"] == ev && e["mac"] == MAC.to_string()),
            "event {role}/{ev} missing"
        );
    }
    // Back to A: the received VM migrates again.
    let sock_a = bed.path("a2.sock");
    let api_a2 = bed.path("a2.api");
    let mut a2 = bed.receive_on(&bed.tap_a, &sock_a, &api_a2, "a2.log", &[]);
    let clients = vec![Client::stream(&bed, 20), Client::request_response(&bed, None)];
    let back = summary(&bed.migrate(&api_b, &sock_a, &["--mode", "live"]));
    assert!(
        b.wait_exit(Duration::from_secs(10))
            .is_some_and(|st| st.success()),
        "{}",
        b.log()
    );
    assert!(a2.running(), "{}", a2.log());
    assert!(
        all_progress(&clients, Duration::from_secs(10)),
        "clients go on after A -> B -> A"
    );
    for c in clients {
        let r = c.finish();
        assert!(r.error.is_none(), "{r:?}");
    }
    print_figures("live back to A", &back, &[]);
}

#[test]
fn live_migration_converges_under_the_dirtier() {
    if !kvm_available("the migration tests") {
        return;
    }
    let bed = Bed::new();
    let a = bed.boot(&["--dirty", "32M@125M"]);
    // The precondition of the figures: the dirtier has written its whole working set once, so round 0 carries it.
    // On a loaded machine the guest may take far longer than the 0.26 s of guest time that takes.
    assert!(
        wait_until(Duration::from_secs(60), || a.dirtier_passes() >= 1),
        "the guest's dirtier never completed a pass over its 32 MiB working set (a guest problem, not a \
         migration one):\n{}",
        a.log()
    );
    let (api_a, api_b, sock) = (bed.path("a.api"), bed.path("b.api"), bed.path("b.sock"));
    let mut b = bed.receive(&sock, &api_b);
    let clients = vec![Client::stream(&bed, 20), Client::request_response(&bed, None)];
    assert!(all_progress(&clients, Duration::from_secs(10)));
    let s = summary(&bed.migrate(
        &api_a,
        &sock,
        &[
            "--mode",
            "live",
            "--downtime",
            "30ms",
            "--timeout",
            "20s",
            "--on-timeout",
            "abort",
        ],
    ));
    assert!(
        s["data_pages"].as_u64().is_some_and(|p| p >= 8192),
        "the guest's dirtier did not fill its 32 MiB working set (a guest problem, not a migration one): {s}"
    );
    assert_eq!(
        s["forced"], false,
        "the switch-over rule found a pause within budget: {s}"
    );
    assert!(s["expected_pause_ms"].as_f64().is_some_and(|e| e <= 30.0), "{s}");
    assert!(b.running(), "{}", b.log());
    assert!(all_progress(&clients, Duration::from_secs(10)));
    let results: Vec<ClientResult> = clients.into_iter().map(Client::finish).collect();
    for r in &results {
        assert!(r.error.is_none(), "{r:?}");
    }
    print_figures("live, dirtier 32M@125M, budget 30 ms", &s, &results);
}

#[test]
fn quick_migration_pause_outlasts_tcp_user_timeout() {
    if !kvm_available("the migration tests") {
        return;
    }
    let bed = Bed::new();
    let _a = bed.boot(&[]);
    let (api_a, api_b, sock) = (bed.path("a.api"), bed.path("b.api"), bed.path("b.sock"));
    let _b = bed.receive(&sock, &api_b);
    let clients: Vec<Client> = (0..4)
        .map(|_| Client::request_response(&bed, Some(5000)))
        .collect();
    assert!(all_progress(&clients, Duration::from_secs(10)));
    let file = bed.path("suspend.img");
    let s = summary(&bed.migrate(
        &api_a,
        &sock,
        &[
            "--mode",
            "quick",
            "--extra-pause",
            "8s",
            "--via-file",
            file.to_str().expect("utf-8"),
        ],
    ));
    assert!(s["extra_pause_ms"].as_f64().is_some_and(|p| p >= 8000.0), "{s}");
    assert!(
        s["notes"].to_string().contains("--extra-pause"),
        "the report labels the extra pause: {s}"
    );
    let results: Vec<ClientResult> = clients.into_iter().map(Client::finish).collect();
    for r in &results {
        assert_eq!(
            r.error.as_ref().and_then(|e| e.1),
            Some(libc::ETIMEDOUT),
            "with TCP_USER_TIMEOUT 5 s an 8 s pause aborts the connection: {r:?}"
        );
    }
    print_figures("quick, 8 s extra pause", &s, &results);

    // Back to A with a 1 s pause: the same clients' settings survive.
    let sock_a = bed.path("a2.sock");
    let api_a2 = bed.path("a2.api");
    let mut a2 = bed.receive_on(&bed.tap_a, &sock_a, &api_a2, "a2.log", &[]);
    let clients: Vec<Client> = (0..4)
        .map(|_| Client::request_response(&bed, Some(5000)))
        .collect();
    assert!(all_progress(&clients, Duration::from_secs(10)));
    let s = summary(&bed.migrate(&api_b, &sock_a, &["--mode", "quick", "--extra-pause", "1s"]));
    assert!(a2.running(), "{}", a2.log());
    assert!(
        all_progress(&clients, Duration::from_secs(15)),
        "a 1 s pause is survived"
    );
    let results: Vec<ClientResult> = clients.into_iter().map(Client::finish).collect();
    for r in &results {
        assert!(r.error.is_none(), "{r:?}");
    }
    print_figures("quick, 1 s extra pause", &s, &results);
}

/// A relay from `listen` to `to` that flips one byte after `after` bytes of the source's stream.
fn corrupting_relay(listen: &Path, to: PathBuf, after: u64) -> JoinHandle<()> {
    let l = UnixListener::bind(listen).expect("relay socket");
    std::thread::spawn(move || {
        let Ok((mut from, _)) = l.accept() else { return };
        let Ok(mut dst) = std::os::unix::net::UnixStream::connect(&to) else {
            return;
        };
        let (mut back_from, mut back_dst) =
            (from.try_clone().expect("clone"), dst.try_clone().expect("clone"));
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut back_dst, &mut back_from);
        });
        let mut seen = 0u64;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if seen <= after && after < seen + n as u64 {
                buf[(after - seen) as usize] ^= 0x20;
            }
            seen += n as u64;
            if dst.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    })
}

#[test]
fn failed_migrations_roll_back() {
    if !kvm_available("the migration tests") {
        return;
    }
    let bed = Bed::new();
    let mut a = bed.boot(&["--dirty", "32M@50M"]);
    let api_a = bed.path("a.api");
    let clients = vec![Client::stream(&bed, 20), Client::request_response(&bed, None)];
    assert!(all_progress(&clients, Duration::from_secs(10)));

    // 1. The destination dies mid-transfer.
    let (api_b, sock) = (bed.path("b.api"), bed.path("b.sock"));
    let mut b = bed.receive(&sock, &api_b);
    let migrate = {
        let host = bed.host.name.clone();
        let (api, to) = (api_a.clone(), format!("unix:{}", sock.display()));
        std::thread::spawn(move || {
            Command::new("ip")
                .args(["netns", "exec", &host])
                .arg(migrator_bin())
                .args([
                    "migrate",
                    "--api",
                    api.to_str().expect("utf-8"),
                    "--to",
                    &to,
                    "--max-bandwidth",
                    "8M",
                ])
                .output()
                .expect("migrate")
        })
    };
    assert!(
        wait_until(Duration::from_secs(10), || status(&api_a)
            .is_some_and(|s| s["state"] == "precopy")),
        "the transfer got going"
    );
    b.kill();
    let out = migrate.join().expect("migrate thread");
    assert!(!out.status.success(), "migrate reports the failure");
    assert!(a.running(), "the source keeps the guest:\n{}", a.log());
    assert!(
        wait_until(Duration::from_secs(5), || status(&api_a)
            .is_some_and(|s| s["state"] == "running")),
        "the source is ready for another try"
    );
    assert!(
        all_progress(&clients, Duration::from_secs(10)),
        "clients survive a dead destination"
    );

    // 2. The stream is corrupted on the way.
    let (api_c, sock_c, relay) = (bed.path("c.api"), bed.path("c.sock"), bed.path("relay.sock"));
    let mut c = bed.receive(&sock_c, &api_c);
    let _relay = corrupting_relay(&relay, sock_c.clone(), 256 << 10);
    let out = bed.migrate(&api_a, &relay, &["--mode", "live"]);
    assert!(!out.status.success(), "migrate reports the failure");
    let st = c
        .wait_exit(Duration::from_secs(20))
        .expect("the destination exits");
    assert!(!st.success(), "the destination exits non-zero");
    let log = c.log();
    assert!(log.contains("corrupted"), "the destination says why:\n{log}");
    assert!(!log.contains("panicked"), "no panic:\n{log}");
    assert!(a.running(), "the source keeps the guest:\n{}", a.log());
    assert!(
        all_progress(&clients, Duration::from_secs(10)),
        "clients survive a corrupted stream"
    );
    for c in clients {
        let r = c.finish();
        assert!(r.error.is_none(), "{r:?}");
    }
    let evs = bed.events();
    assert!(
        evs.iter().filter(|e| e["event"] == "rollback").count() >= 2,
        "two rollbacks were reported"
    );
}

/// `migrator tls-init DIR`.
fn tls_init(dir: &Path) {
    let out = Command::new(migrator_bin())
        .arg("tls-init")
        .arg(dir)
        .output()
        .expect("run migrator tls-init");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A free TCP port on the host namespace's loopback (bound and released).
fn free_port(bed: &Bed) -> u16 {
    bed.host
        .run(|| std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()))
        .expect("a free port")
        .port()
}

/// `migrator receive` on tap B at `tcp:127.0.0.1:PORT` with `extra`; waits for its API.
fn receive_tcp(bed: &Bed, port: u16, api: &Path, extra: &[&str], log: &str) -> Proc {
    let listen = format!("tcp:127.0.0.1:{port}");
    let mut args = vec![
        "receive",
        "--tap",
        &bed.tap_b,
        "--listen",
        &listen,
        "--api",
        api.to_str().expect("utf-8 path"),
    ];
    args.extend_from_slice(extra);
    let mut p = bed.spawn(&args, log);
    assert!(
        wait_until(Duration::from_secs(10), || api.exists() || !p.running()),
        "migrator receive never opened its API"
    );
    p
}

/// `migrator migrate` to `tcp:127.0.0.1:PORT` with `extra`.
fn migrate_tcp(bed: &Bed, api: &Path, port: u16, extra: &[&str]) -> Output {
    let to = format!("tcp:127.0.0.1:{port}");
    bed.host
        .command(migrator_bin())
        .args([
            "migrate",
            "--api",
            api.to_str().expect("utf-8 path"),
            "--to",
            &to,
            "--verify",
        ])
        .args(extra)
        .output()
        .expect("run migrator migrate")
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn tls_migration_outlasts_scans_strangers_and_oversized_guests() {
    if !kvm_available("the migration tests") {
        return;
    }
    let bed = Bed::new();
    let mut a = bed.boot(&[]);
    let api_a = bed.path("a.api");
    let (creds, stranger) = (bed.path("tls"), bed.path("stranger"));
    tls_init(&creds);
    tls_init(&stranger);
    let creds_s = creds.to_str().expect("utf-8").to_owned();
    let stranger_s = stranger.to_str().expect("utf-8").to_owned();
    let clients = vec![Client::stream(&bed, 20), Client::request_response(&bed, None)];
    assert!(all_progress(&clients, Duration::from_secs(10)));

    // Plain TCP without --insecure: refused at both ends, naming both options.
    let port = free_port(&bed);
    let mut plain = receive_tcp(&bed, port, &bed.path("plain.api"), &[], "plain.log");
    let st = plain
        .wait_exit(Duration::from_secs(10))
        .expect("receive refuses at once");
    assert!(!st.success());
    let log = plain.log();
    assert!(log.contains("--tls-creds") && log.contains("--insecure"), "{log}");
    let out = migrate_tcp(&bed, &api_a, port, &[]);
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(err.contains("--tls-creds") && err.contains("--insecure"), "{err}");

    // --max-mem below the guest's 256 MiB: refused by name, and the receiver keeps listening.
    let (port_small, api_small) = (free_port(&bed), bed.path("small.api"));
    let mut small = receive_tcp(
        &bed,
        port_small,
        &api_small,
        &["--tls-creds", &creds_s, "--max-mem", "128MiB"],
        "small.log",
    );
    let out = migrate_tcp(&bed, &api_a, port_small, &["--tls-creds", &creds_s]);
    assert!(!out.status.success());
    assert!(stderr_of(&out).contains("--max-mem"), "{}", stderr_of(&out));
    assert!(small.running(), "still listening:\n{}", small.log());
    assert!(
        wait_until(Duration::from_secs(5), || status(&api_small)
            .is_some_and(|s| s["rejected_peers"] == 1)),
        "the refusal is counted: {:?}",
        status(&api_small)
    );
    small.kill();

    // The real receiver: a port scan, garbage, a stranger's certificate, then the source.
    let (port, api_b) = (free_port(&bed), bed.path("b.api"));
    let mut b = receive_tcp(&bed, port, &api_b, &["--tls-creds", &creds_s], "b.log");
    bed.host.run(|| {
        drop(TcpStream::connect(("127.0.0.1", port)).expect("scan"));
        let mut g = TcpStream::connect(("127.0.0.1", port)).expect("garbage peer");
        let _ = g.write_all(&[0x5a; 2048]);
    });
    let out = migrate_tcp(&bed, &api_a, port, &["--tls-creds", &stranger_s]);
    assert!(!out.status.success(), "a stranger's certificate is refused");
    assert!(
        wait_until(Duration::from_secs(10), || status(&api_b)
            .is_some_and(|s| s["rejected_peers"].as_u64() >= Some(3))),
        "scan, garbage and stranger are counted: {:?}\n{}",
        status(&api_b),
        b.log()
    );
    assert!(b.running(), "the receiver keeps listening:\n{}", b.log());
    assert!(a.running() && status(&api_a).is_some_and(|s| s["state"] == "running"));

    let s = summary(&migrate_tcp(
        &bed,
        &api_a,
        port,
        &["--tls-creds", &creds_s, "--mode", "live"],
    ));
    assert!(s["verified_hash"].is_string(), "{s}");
    assert!(
        a.wait_exit(Duration::from_secs(10))
            .is_some_and(|st| st.success()),
        "{}",
        a.log()
    );
    assert!(b.running(), "{}", b.log());
    assert!(b.log().contains("mutual TLS"), "{}", b.log());
    assert!(
        all_progress(&clients, Duration::from_secs(10)),
        "clients go on after a TLS move"
    );
    let results: Vec<ClientResult> = clients.into_iter().map(Client::finish).collect();
    for r in &results {
        assert!(r.error.is_none(), "{r:?}");
    }
    print_figures("live over mutual TLS", &s, &results);
}

#[test]
fn qemu_loads_the_credentials_tls_init_makes() {
    let Ok(qemu) = which_qemu() else {
        eprintln!("SKIP: qemu-system-x86_64 is not installed; QEMU's tls-creds-x509 cannot be checked");
        return;
    };
    let dir = TestDir::new("qemutls");
    tls_init(&dir);
    let d = dir.to_str().expect("utf-8");
    let mut child = Command::new(qemu)
        .args([
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-qmp",
            "stdio",
        ])
        .arg("-object")
        .arg(format!(
            "tls-creds-x509,id=srv,dir={d},endpoint=server,verify-peer=on,sanity-check=on"
        ))
        .arg("-object")
        .arg(format!(
            "tls-creds-x509,id=cli,dir={d},endpoint=client,sanity-check=on"
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"quit\"}\n")
        .expect("qmp");
    let out = child.wait_with_output().expect("qemu output");
    assert!(
        out.status.success(),
        "QEMU refused the credentials: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("host-qmp-quit"));
}

fn which_qemu() -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("qemu-system-x86_64"))
        .find(|p| p.is_file())
        .ok_or(())
}

/// Message kinds of the migration stream the relay below acts on (see migrator's protocol module).
const CMD_STATE: u32 = 5;
const CMD_COMMIT: u32 = 13;

/// A unix relay from `listen` to `to` that forwards the source's stream message by message until one of command
/// `at`; then it either stalls (`stall`: both connections stay open, nothing more goes through) or cuts both.
fn fault_relay(listen: &Path, to: PathBuf, at: u32, stall: bool) -> JoinHandle<()> {
    let l = UnixListener::bind(listen).expect("relay socket");
    std::thread::spawn(move || {
        let Ok((mut from, _)) = l.accept() else { return };
        let Ok(mut dst) = std::os::unix::net::UnixStream::connect(&to) else {
            return;
        };
        let stalled = Arc::new(AtomicBool::new(false));
        let (mut back_from, mut back_dst, st) = (
            from.try_clone().expect("clone"),
            dst.try_clone().expect("clone"),
            stalled.clone(),
        );
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = back_dst.read(&mut buf) {
                if n == 0 || st.load(Ordering::SeqCst) || back_from.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        let mut header = [0u8; 32];
        while from.read_exact(&mut header).is_ok() {
            let command = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
            let length = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
            if command == at {
                stalled.store(true, Ordering::SeqCst);
                if stall {
                    let _ = std::io::copy(&mut from, &mut std::io::sink());
                }
                break;
            }
            let mut payload = vec![0u8; length as usize];
            if from.read_exact(&mut payload).is_err()
                || dst.write_all(&header).is_err()
                || dst.write_all(&payload).is_err()
            {
                break;
            }
        }
        let _ = dst.shutdown(std::net::Shutdown::Both);
        let _ = from.shutdown(std::net::Shutdown::Both);
    })
}

/// A source guest with two clients making progress, a destination listening, and a relay between them that
/// stalls or cuts the migration stream at one command.
struct Faulted {
    a: Proc,
    api_a: PathBuf,
    clients: Vec<Client>,
    api_b: PathBuf,
    b: Proc,
    /// Where the source migrates to: the relay's socket.
    relay: PathBuf,
    _relaying: JoinHandle<()>,
}

impl Faulted {
    fn start(bed: &Bed, at: u32, stall: bool) -> Self {
        let a = bed.boot(&[]);
        let api_a = bed.path("a.api");
        let clients = vec![Client::stream(bed, 20), Client::request_response(bed, None)];
        assert!(all_progress(&clients, Duration::from_secs(10)));
        let (api_b, sock, relay) = (bed.path("b.api"), bed.path("b.sock"), bed.path("relay.sock"));
        let b = bed.receive(&sock, &api_b);
        let relaying = fault_relay(&relay, sock, at, stall);
        Self {
            a,
            api_a,
            clients,
            api_b,
            b,
            relay,
            _relaying: relaying,
        }
    }
}

/// The source's pause, from its own events: pause to resume (a rollback) or to complete, ms.
fn source_pause_ms(evs: &[Value]) -> Option<f64> {
    let ts = |ev: &str| {
        evs.iter()
            .filter(|e| e["role"] == "source" && e["event"] == ev)
            .filter_map(|e| e["ts_ns"].as_u64())
            .next_back()
    };
    Some((ts("resume")? - ts("pause")?) as f64 / 1e6)
}

#[test]
fn a_destination_stalled_in_the_pause_gets_the_guest_resumed_at_the_source_within_max_pause() {
    if !kvm_available("the migration tests") {
        return;
    }
    let bed = Bed::new();
    let Faulted {
        mut a,
        api_a,
        clients,
        mut b,
        relay,
        ..
    } = Faulted::start(&bed, CMD_STATE, true);
    let max_pause = 500.0;
    let out = bed.migrate(&api_a, &relay, &["--mode", "live", "--max-pause", "500ms"]);
    assert!(!out.status.success(), "the migration fails");
    let err = stderr_of(&out);
    assert!(err.contains("--max-pause"), "{err}");
    let pause = source_pause_ms(&bed.events()).expect("pause and resume events of the source");
    eprintln!("destination stalled in the pause: the guest ran again at the source after {pause:.1} ms");
    assert!(
        pause <= max_pause,
        "paused {pause:.1} ms > --max-pause {max_pause} ms"
    );
    assert!(a.running(), "{}", a.log());
    assert!(status(&api_a).is_some_and(|s| s["state"] == "running"));
    let st = b
        .wait_exit(Duration::from_secs(20))
        .expect("the destination gives up");
    assert!(!st.success(), "{}", b.log());
    assert!(
        all_progress(&clients, Duration::from_secs(10)),
        "clients go on at the source"
    );
    for c in clients {
        let r = c.finish();
        assert!(r.error.is_none(), "{r:?}");
    }
}

/// Whether the guest's echo service answers (from the client namespace).
fn echo_answers(bed: &Bed) -> bool {
    let addr = SocketAddrV4::new(bed.guest_ip, guest_abi::ECHO_PORT);
    bed.client.run(|| {
        let Ok(mut s) = TcpStream::connect_timeout(&addr.into(), Duration::from_millis(300)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut back = [0u8; 4];
        s.write_all(b"ping").is_ok() && s.read_exact(&mut back).is_ok() && &back == b"ping"
    })
}

#[test]
fn a_lost_commit_leaves_both_sides_paused_until_the_operator_picks_one() {
    if !kvm_available("the migration tests") {
        return;
    }
    let bed = Bed::new();
    let Faulted {
        mut a,
        api_a,
        clients,
        api_b,
        mut b,
        relay,
        ..
    } = Faulted::start(&bed, CMD_COMMIT, false);
    let out = bed.migrate(&api_a, &relay, &["--mode", "live"]);
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(
        err.contains("IN DOUBT") && err.contains("resume --force"),
        "{err}"
    );
    let state = |api: &Path| status(api).map(|s| s["state"].as_str().unwrap_or_default().to_owned());
    assert!(
        wait_until(Duration::from_secs(10), || state(&api_b).as_deref()
            == Some("in_doubt")),
        "the destination is in doubt: {:?}\n{}",
        status(&api_b),
        b.log()
    );
    assert_eq!(state(&api_a).as_deref(), Some("in_doubt"), "{}", a.log());
    assert!(!echo_answers(&bed), "no copy runs while in doubt");
    // The operator picks the destination.
    let out = Command::new(migrator_bin())
        .args(["resume", "--api", api_b.to_str().expect("utf-8")])
        .output()
        .expect("resume");
    assert!(
        !out.status.success() && stderr_of(&out).contains("--force"),
        "resume needs --force"
    );
    let out = Command::new(migrator_bin())
        .args(["resume", "--force", "--api", api_b.to_str().expect("utf-8")])
        .output()
        .expect("resume --force");
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(
        wait_until(Duration::from_secs(10), || echo_answers(&bed)),
        "the guest runs at B"
    );
    assert_eq!(state(&api_b).as_deref(), Some("running"));
    assert_eq!(
        state(&api_a).as_deref(),
        Some("in_doubt"),
        "A still holds its copy paused"
    );
    let out = Command::new(migrator_bin())
        .args(["cancel", "--api", api_a.to_str().expect("utf-8")])
        .output()
        .expect("cancel");
    assert!(out.status.success(), "{}", stderr_of(&out));
    let st = a
        .wait_exit(Duration::from_secs(10))
        .expect("A drops its copy and exits");
    assert!(!st.success());
    assert!(b.running(), "{}", b.log());
    assert!(
        all_progress(&clients, Duration::from_secs(20)),
        "clients go on at B"
    );
    for c in clients {
        let r = c.finish();
        assert!(r.error.is_none(), "{r:?}");
    }
}
