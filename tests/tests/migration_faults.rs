//! Fault injection between two real migrators: a relay on TCP (the migration link, loopback of the host namespace,
//! `--insecure`) that cuts the stream at a byte offset, stalls it, drops the commit, flips a byte, or kills one
//! side at a point of the stream. One guest is booted; every case migrates it from where it lives to a fresh
//! `migrator receive` on the other tap, through the relay.
//!
//! After every case: exactly one running copy (each side's API state, the receiver's process, the guest's echo
//! service), or, where the protocol cannot know (a lost commit), none until the operator picks one; after a rollback
//! from the pause, the source's RAM hash at resume equals its hash at the pause; the clients' connections stay
//! alive. A stall must end within `--max-pause`.
//!
//! Counts: `MIGMON_FAULT_CUTS` stream cuts (12 by default; `./x bench --only faults` runs 50) and
//! `MIGMON_FAULT_STALLS` stalls (4; the bench runs 20), at offsets drawn from `MIGMON_FAULT_SEED` in three strata:
//! pre-copy, the paused tail, and the window before the commit (measured on a clean migration first). The figures
//! are printed as `faults:` lines for the bench.

#![expect(clippy::unwrap_used, reason = "a test: a failed setup step should panic")]

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use integration_tests::{Netns, TestDir, VmHost, in_netns, kvm_available, migrator_bin, wait_until};
use serde_json::Value;

const MAC: &str = "52:54:00:66:61:75";
const CMD_ROUND_END: u32 = 4;
const CMD_COMPLETE: u32 = 8;
const CMD_COMMIT: u32 = 13;
const MAX_PAUSE_MS: f64 = 500.0;
/// How long a receiver whose source rolled back may take to exit.
const RECV_EXIT: Duration = Duration::from_secs(15);

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn in_range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo).max(1)
    }
}

/// What the relay does to the source → destination stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    None,
    /// Forward this many bytes, then close both directions.
    Cut(u64),
    /// Forward this many bytes, then stop forwarding both ways with the sockets open.
    Stall(u64),
    /// Stop at the commit: it never reaches the destination (both directions closed).
    DropCommit,
    /// XOR the byte at this offset.
    Flip(u64, u8),
    /// Kill this process when the stream reaches the offset.
    Kill(u64, u32),
    /// Kill this process right after the commit went through.
    KillAfterCommit(u32),
}

/// Offsets of the stream's landmarks, from the relay.
#[derive(Clone, Debug, Default)]
struct Landmarks {
    /// The first message after the last pre-copy round: the pause is about here.
    after_last_round: u64,
    complete: u64,
    commit: u64,
    total: u64,
}

struct Relay {
    port: u16,
    stop: Arc<AtomicBool>,
    marks: Arc<Mutex<Landmarks>>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    /// Listens on the host namespace's loopback and relays to `to_port` there.
    fn start(host: &Netns, to_port: u16, fault: Fault) -> Self {
        let l = host.run(|| TcpListener::bind("127.0.0.1:0")).unwrap();
        let port = l.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let marks = Arc::new(Mutex::new(Landmarks::default()));
        let host_name = host.name.clone();
        let (st, mk) = (stop.clone(), marks.clone());
        let thread = std::thread::spawn(move || {
            let Ok((from, _)) = l.accept() else { return };
            let Ok(Ok(dst)) = in_netns(&host_name, || TcpStream::connect(("127.0.0.1", to_port))) else {
                return;
            };
            relay(&from, &dst, fault, &st, &mk);
            // A stall holds the sockets open until the case is over.
            if matches!(fault, Fault::Stall(_)) {
                while !st.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            let _ = dst.shutdown(Shutdown::Both);
            let _ = from.shutdown(Shutdown::Both);
        });
        Self {
            port,
            stop,
            marks,
            thread: Some(thread),
        }
    }

    fn landmarks(&self) -> Landmarks {
        self.marks.lock().unwrap().clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn kill(pid: u32) {
    // SAFETY: kill(2) on a pid this test started.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
}

/// Copies source → destination message by message (headers parsed to mark the landmarks), destination → source in a
/// second thread, applying `fault`.
fn relay(from: &TcpStream, dst: &TcpStream, fault: Fault, stop: &AtomicBool, marks: &Mutex<Landmarks>) {
    let halted = Arc::new(AtomicBool::new(false));
    let (mut back_from, mut back_dst, h) = (
        from.try_clone().unwrap(),
        dst.try_clone().unwrap(),
        halted.clone(),
    );
    let back = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = back_dst.read(&mut buf) {
            if n == 0 || h.load(Ordering::SeqCst) || back_from.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    let (mut from, mut dst) = (from.try_clone().unwrap(), dst.try_clone().unwrap());
    let mut offset = 0u64;
    let mut header = [0u8; 32];
    let mut last_round_end = false;
    // Forwards `bytes` (at `offset`), honouring a cut, stall, flip or kill inside them. False: stop relaying.
    let mut forward = |bytes: &mut [u8], offset: &mut u64| -> bool {
        let start = *offset;
        let end = start + bytes.len() as u64;
        match fault {
            Fault::Cut(at) | Fault::Stall(at) | Fault::Kill(at, _) if (start..end).contains(&at) => {
                let n = usize::try_from(at - start).unwrap();
                let _ = dst.write_all(&bytes[..n]);
                *offset = at;
                if let Fault::Kill(_, pid) = fault {
                    kill(pid);
                    let _ = dst.write_all(&bytes[n..]);
                    *offset = end;
                    return true;
                }
                return false;
            }
            Fault::Flip(at, mask) if (start..end).contains(&at) => {
                bytes[usize::try_from(at - start).unwrap()] ^= mask;
            }
            _ => {}
        }
        *offset = end;
        dst.write_all(bytes).is_ok()
    };
    loop {
        if stop.load(Ordering::SeqCst) || from.read_exact(&mut header).is_err() {
            break;
        }
        let command = u32::from_le_bytes(header[0..4].try_into().unwrap());
        let length = u64::from_le_bytes(header[8..16].try_into().unwrap()).min(128 << 20);
        {
            let mut m = marks.lock().unwrap();
            if last_round_end && command != CMD_ROUND_END {
                m.after_last_round = offset;
                last_round_end = false;
            }
            if command == CMD_ROUND_END {
                last_round_end = true;
            }
            if command == CMD_COMPLETE {
                m.complete = offset;
            }
            if command == CMD_COMMIT {
                m.commit = offset;
            }
        }
        if command == CMD_COMMIT && fault == Fault::DropCommit {
            break;
        }
        let mut msg = header.to_vec();
        msg.resize(32 + usize::try_from(length).unwrap(), 0);
        if from.read_exact(&mut msg[32..]).is_err() {
            let _ = forward(&mut msg[..32], &mut offset);
            break;
        }
        if !forward(&mut msg, &mut offset) {
            break;
        }
        marks.lock().unwrap().total = offset;
        if command == CMD_COMMIT
            && let Fault::KillAfterCommit(pid) = fault
        {
            // The commit is in the destination's socket (written whole above) before the source dies.
            kill(pid);
        }
    }
    halted.store(true, Ordering::SeqCst);
    if !matches!(fault, Fault::Stall(_)) {
        let _ = dst.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    }
    let _ = back.join();
}

/// A migrator process, killed on drop.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_exit(&mut self, timeout: Duration) -> bool {
        wait_until(timeout, || !self.running())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client on the guest's echo service: 64 bytes out, the same back, over and over.
struct Client {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    thread: JoinHandle<Option<String>>,
}

impl Client {
    fn start(client: &Netns, guest: Ipv4Addr) -> Self {
        let addr = SocketAddrV4::new(guest, guest_abi::ECHO_PORT);
        let mut s = client
            .run(|| TcpStream::connect_timeout(&addr.into(), Duration::from_secs(5)))
            .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let (stop, count) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let (st, ct) = (stop.clone(), count.clone());
        let thread = std::thread::spawn(move || {
            let mut i = 0u8;
            while !st.load(Ordering::SeqCst) {
                let out = [i; 64];
                let mut back = [0u8; 64];
                if let Err(e) = s.write_all(&out).and_then(|()| s.read_exact(&mut back)) {
                    return Some(e.to_string());
                }
                if back != out {
                    return Some("the echo came back altered".to_owned());
                }
                ct.fetch_add(1, Ordering::SeqCst);
                i = i.wrapping_add(1);
                std::thread::sleep(Duration::from_millis(5));
            }
            None
        });
        Self { stop, count, thread }
    }

    fn progresses(&self, timeout: Duration) -> bool {
        let c0 = self.count.load(Ordering::SeqCst);
        wait_until(timeout, || self.count.load(Ordering::SeqCst) > c0)
    }

    fn finish(self) -> Option<String> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap()
    }
}

struct Bed {
    vm_host: VmHost,
    guest_ip: Ipv4Addr,
    dir: TestDir,
}

impl Bed {
    fn new() -> Self {
        let n = u8::try_from(std::process::id() % 200 + 20).unwrap();
        let client_ip = Ipv4Addr::new(10, n, 11, 1);
        let vm_host = VmHost::create("mf", 2, client_ip.into(), 24).expect("the test's host and client");
        Self {
            vm_host,
            guest_ip: Ipv4Addr::new(10, n, 11, 2),
            dir: TestDir::new("migf"),
        }
    }

    fn host(&self) -> &Netns {
        &self.vm_host.host
    }

    fn client(&self) -> &Netns {
        &self.vm_host.client
    }

    fn tap(&self, i: usize) -> &str {
        &self.vm_host.taps[i]
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_owned()
    }

    fn spawn(&self, args: &[&str], log: &str) -> Proc {
        let log = self.dir.join(log);
        let out = std::fs::File::create(&log).unwrap();
        let child = self
            .host()
            .command(migrator_bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Proc { child, log }
    }

    fn echo_answers(&self) -> bool {
        let addr = SocketAddrV4::new(self.guest_ip, guest_abi::ECHO_PORT);
        self.client().run(|| {
            let Ok(mut s) = TcpStream::connect_timeout(&addr.into(), Duration::from_millis(300)) else {
                return false;
            };
            let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
            let mut back = [0u8; 4];
            s.write_all(b"ping").is_ok() && s.read_exact(&mut back).is_ok() && &back == b"ping"
        })
    }

    fn free_port(&self) -> u16 {
        self.host()
            .run(|| TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()))
            .unwrap()
            .port()
    }
}

fn status(api: &str) -> Option<Value> {
    let out = Command::new(migrator_bin())
        .args(["status", "--api", api])
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

fn state(api: &str) -> String {
    status(api).map_or_else(
        || "gone".to_owned(),
        |s| s["state"].as_str().unwrap_or("?").to_owned(),
    )
}

/// The source's last pause → resume (a rollback), ms, from the events file.
fn last_source_pause_ms(events: &str) -> Option<f64> {
    let evs: Vec<Value> = std::fs::read_to_string(events)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let last = |ev: &str| {
        evs.iter()
            .filter(|e| e["role"] == "source" && e["event"] == ev)
            .filter_map(|e| e["ts_ns"].as_u64())
            .next_back()
    };
    let (p, r) = (last("pause")?, last("resume")?);
    (r > p).then(|| (r - p) as f64 / 1e6)
}

/// Where the guest lives: its migrator, its API, its tap index.
struct Home {
    proc: Proc,
    api: String,
    tap: usize,
}

#[derive(Debug, Default)]
struct Tally {
    cases: u32,
    rolled_back: u32,
    moved: u32,
    in_doubt_resolved: u32,
    hash_checked: u32,
    max_stall_pause_ms: f64,
}

struct Case<'a> {
    bed: &'a Bed,
    home: &'a mut Home,
    n: u32,
}

impl Case<'_> {
    /// A receiver on the other tap, the relay with `fault`, and `migrate` through it. Returns the receiver, the
    /// migrate's output and the relay.
    fn run(&mut self, fault_of: impl FnOnce(&Proc, &Proc) -> Fault) -> (Proc, Output, Relay) {
        self.n += 1;
        let bed = self.bed;
        let other = 1 - self.home.tap;
        let port = bed.free_port();
        let api = bed.path(&format!("r{}.api", self.n));
        let listen = format!("tcp:127.0.0.1:{port}");
        let events = bed.path("events");
        let mut recv = bed.spawn(
            &[
                "receive",
                "--tap",
                bed.tap(other),
                "--listen",
                &listen,
                "--insecure",
                "--api",
                &api,
                "--events",
                &events,
            ],
            &format!("r{}.log", self.n),
        );
        assert!(
            wait_until(Duration::from_secs(10), || Path::new(&api).exists()
                || !recv.running()),
            "receive never opened its API:\n{}",
            recv.log()
        );
        let fault = fault_of(&self.home.proc, &recv);
        let relay = Relay::start(bed.host(), port, fault);
        let to = format!("tcp:127.0.0.1:{}", relay.port);
        let out = bed
            .host()
            .command(migrator_bin())
            .args([
                "migrate",
                "--api",
                &self.home.api,
                "--to",
                &to,
                "--insecure",
                "--verify",
                "--mode",
                "live",
                "--max-pause",
                "500ms",
                "--timeout",
                "20s",
            ])
            .output()
            .unwrap();
        (recv, out, relay)
    }
}

fn env_u32(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// After a failed case: the guest runs at home only, its RAM as it was paused, the receiver gave up (within
/// `recv_exit`; a receiver behind a stalled connection still waits on it: it must not run the guest, and is killed).
fn assert_rolled_back(
    bed: &Bed,
    home: &mut Home,
    recv: &mut Proc,
    recv_exit: Duration,
    what: &str,
    t: &mut Tally,
) {
    assert!(
        home.proc.running(),
        "{what}: the source died:\n{}",
        home.proc.log()
    );
    assert!(
        wait_until(Duration::from_secs(10), || state(&home.api) == "running"),
        "{what}: the source is {} after the rollback:\n{}",
        state(&home.api),
        home.proc.log()
    );
    let st = status(&home.api).unwrap();
    if let (Some(p), Some(r)) = (st["pause_ram_hash"].as_str(), st["rollback_ram_hash"].as_str()) {
        assert_eq!(
            p, r,
            "{what}: the RAM at resume differs from the RAM at the pause"
        );
        t.hash_checked += 1;
    }
    // The receiver must not run the guest: it exits, or is left paused without a running guest.
    if !recv.wait_exit(recv_exit) {
        let api_state = status(&bed.path(&format!("r{}.api", t.cases + 1))).map(|s| s["state"].clone());
        assert!(
            api_state.as_ref().is_none_or(|s| s != "running"),
            "{what}: the destination runs a copy too: {api_state:?}\n{}",
            recv.log()
        );
        let _ = recv.child.kill();
    }
    assert!(
        bed.echo_answers(),
        "{what}: the guest does not answer after the rollback"
    );
    t.rolled_back += 1;
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario: the cases share the guest, its clients and the landmarks"
)]
fn faults_leave_exactly_one_running_copy() {
    if !kvm_available("the fault injection tests") {
        return;
    }
    let cuts = env_u32("MIGMON_FAULT_CUTS", 12);
    let stalls = env_u32("MIGMON_FAULT_STALLS", 4);
    let mut rng = Rng(u64::from(env_u32("MIGMON_FAULT_SEED", 13)));
    let started = Instant::now();
    let bed = Bed::new();
    let ip = format!("{}/24", bed.guest_ip);
    let api0 = bed.path("home0.api");
    let events = bed.path("events");
    let proc = bed.spawn(
        &[
            "run",
            "--tap",
            bed.tap(0),
            "--mac",
            MAC,
            "--ip",
            &ip,
            "--mem",
            "256M",
            "--api",
            &api0,
            "--events",
            &events,
        ],
        "home0.log",
    );
    let mut home = Home {
        proc,
        api: api0,
        tap: 0,
    };
    assert!(
        wait_until(Duration::from_secs(30), || bed.echo_answers()),
        "the guest never answered:\n{}",
        home.proc.log()
    );
    let clients: Vec<Client> = (0..4)
        .map(|_| Client::start(bed.client(), bed.guest_ip))
        .collect();
    assert!(clients.iter().all(|c| c.progresses(Duration::from_secs(10))));
    let mut t = Tally::default();
    let mut case = Case {
        bed: &bed,
        home: &mut home,
        n: 0,
    };

    // A clean migration through the relay: the landmarks of the stream, and the guest moves to the other tap.
    let (recv, out, relay) = case.run(|_, _| Fault::None);
    assert!(
        out.status.success(),
        "the clean migration failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let marks = relay.landmarks();
    drop(relay);
    eprintln!("faults: stream of a clean migration: {marks:?}");
    assert!(
        marks.after_last_round > 0
            && marks.complete > marks.after_last_round
            && marks.commit > marks.complete
    );
    let old = std::mem::replace(&mut case.home.proc, recv);
    drop(old);
    case.home.tap = 1 - case.home.tap;
    case.home.api = bed.path(&format!("r{}.api", case.n));
    assert!(
        wait_until(Duration::from_secs(10), || bed.echo_answers()),
        "the guest answers after the move"
    );

    // Stream cuts in three strata.
    let strata = [
        ("pre-copy", 32, marks.after_last_round),
        ("paused tail", marks.after_last_round, marks.complete),
        ("before the commit", marks.complete, marks.commit),
    ];
    let mut by_stratum = [0u32; 3];
    for i in 0..cuts {
        let s = usize::try_from(i).unwrap() % 3;
        let (name, lo, hi) = strata[s];
        let at = rng.in_range(lo, hi);
        t.cases += 1;
        let (mut recv, out, relay) = case.run(|_, _| Fault::Cut(at));
        drop(relay);
        assert!(
            !out.status.success(),
            "cut at {at} ({name}): the migration succeeded"
        );
        assert_rolled_back(
            &bed,
            case.home,
            &mut recv,
            RECV_EXIT,
            &format!("cut at {at} ({name})"),
            &mut t,
        );
        by_stratum[s] += 1;
    }
    eprintln!(
        "faults: {cuts} stream cuts (pre-copy {}, paused tail {}, before the commit {}): one running copy each time",
        by_stratum[0], by_stratum[1], by_stratum[2]
    );

    // Stalls in the paused tail and before the commit: the source resumes within --max-pause.
    for i in 0..stalls {
        let (lo, hi) = if i % 2 == 0 {
            (marks.after_last_round, marks.complete)
        } else {
            (marks.complete, marks.commit)
        };
        let at = rng.in_range(lo, hi);
        t.cases += 1;
        let (mut recv, out, relay) = case.run(|_, _| Fault::Stall(at));
        assert!(!out.status.success(), "stall at {at}: the migration succeeded");
        let pause = last_source_pause_ms(&events).unwrap_or(0.0);
        t.max_stall_pause_ms = t.max_stall_pause_ms.max(pause);
        assert!(
            pause <= MAX_PAUSE_MS,
            "stall at {at}: paused {pause:.1} ms > --max-pause {MAX_PAUSE_MS} ms"
        );
        let what = format!("stall at {at}");
        assert_rolled_back(&bed, case.home, &mut recv, Duration::from_secs(1), &what, &mut t);
        drop(relay);
    }
    eprintln!(
        "faults: {stalls} destination stalls: longest pause {:.1} ms, deadline {MAX_PAUSE_MS} ms",
        t.max_stall_pause_ms
    );

    // Random byte flips anywhere: detected (checksums), rolled back.
    for _ in 0..4 {
        let at = rng.in_range(0, marks.commit);
        let mask = u8::try_from(1 + rng.next() % 255).unwrap();
        t.cases += 1;
        let (mut recv, out, relay) = case.run(|_, _| Fault::Flip(at, mask));
        drop(relay);
        assert!(!out.status.success(), "flip at {at}: the migration succeeded");
        assert_rolled_back(
            &bed,
            case.home,
            &mut recv,
            RECV_EXIT,
            &format!("flip {mask:#04x} at {at}"),
            &mut t,
        );
    }

    // The destination killed in the paused tail.
    let at = rng.in_range(marks.after_last_round, marks.complete);
    t.cases += 1;
    let (mut recv, out, relay) = case.run(|_, r| Fault::Kill(at, r.pid()));
    drop(relay);
    assert!(
        !out.status.success(),
        "destination killed: the migration succeeded"
    );
    assert_rolled_back(
        &bed,
        case.home,
        &mut recv,
        RECV_EXIT,
        "destination killed",
        &mut t,
    );

    // A lost commit: both sides in doubt, no copy runs, until the operator resumes the source.
    t.cases += 1;
    let (mut recv, out, relay) = case.run(|_, _| Fault::DropCommit);
    drop(relay);
    assert!(!out.status.success(), "lost commit: the migration succeeded");
    let other_api = bed.path(&format!("r{}.api", case.n));
    assert!(
        wait_until(Duration::from_secs(10), || state(&case.home.api) == "in_doubt"),
        "lost commit: the source is {}",
        state(&case.home.api)
    );
    assert_ne!(state(&other_api), "running", "lost commit: the destination runs");
    assert!(!bed.echo_answers(), "lost commit: no copy may run while in doubt");
    let forced = Command::new(migrator_bin())
        .args(["resume", "--force", "--api", &case.home.api])
        .output()
        .unwrap();
    assert!(
        forced.status.success(),
        "{}",
        String::from_utf8_lossy(&forced.stderr)
    );
    let _ = Command::new(migrator_bin())
        .args(["cancel", "--api", &other_api])
        .output();
    assert!(recv.wait_exit(Duration::from_secs(15)) || state(&other_api) != "running");
    let _ = recv.child.kill();
    assert!(
        wait_until(Duration::from_secs(10), || bed.echo_answers()),
        "lost commit: the guest runs at the source"
    );
    t.in_doubt_resolved += 1;

    // The source killed after the commit: the destination runs the guest, alone.
    t.cases += 1;
    let (recv, _out, relay) = case.run(|h, _| Fault::KillAfterCommit(h.pid()));
    drop(relay);
    let new_api = bed.path(&format!("r{}.api", case.n));
    assert!(
        wait_until(Duration::from_secs(15), || state(&new_api) == "running"),
        "source killed after the commit: the destination is {}",
        state(&new_api)
    );
    assert!(!case.home.proc.running(), "the source was killed");
    assert!(
        wait_until(Duration::from_secs(10), || bed.echo_answers()),
        "the guest runs at the destination"
    );
    let old = std::mem::replace(&mut case.home.proc, recv);
    drop(old);
    t.moved += 1;

    let alive = clients.iter().all(|c| c.progresses(Duration::from_secs(20)));
    let errors: Vec<String> = clients.into_iter().filter_map(Client::finish).collect();
    eprintln!(
        "faults: {} cases in {:.0} s: {} rolled back (RAM hash at resume = at pause in {} of them), {} lost commit \
         resolved by the operator, {} moved after the source died; clients alive: {}",
        t.cases + 1,
        started.elapsed().as_secs_f64(),
        t.rolled_back,
        t.hash_checked,
        t.in_doubt_resolved,
        t.moved,
        errors.is_empty() && alive
    );
    // For `./x bench --only faults`.
    eprintln!(
        "faults-json: {}",
        serde_json::json!({
            "cases": t.cases + 1,
            "cuts": cuts,
            "cuts_pre_copy": by_stratum[0],
            "cuts_paused_tail": by_stratum[1],
            "cuts_before_commit": by_stratum[2],
            "stalls": stalls,
            "max_stall_pause_ms": t.max_stall_pause_ms,
            "deadline_ms": MAX_PAUSE_MS,
            "rolled_back": t.rolled_back,
            "hash_checked": t.hash_checked,
            "in_doubt_resolved": t.in_doubt_resolved,
            "moved": t.moved,
            "clients_alive": errors.is_empty() && alive,
            "seconds": started.elapsed().as_secs_f64(),
        })
    );
    assert!(errors.is_empty(), "client connections died: {errors:?}");
    assert!(alive, "the clients stopped progressing");
}
