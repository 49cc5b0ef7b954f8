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
//! `MIGMON_FAULT_STALLS` stalls (4; the bench runs 20), drawn from `MIGMON_FAULT_SEED` in three strata: pre-copy
//! (an offset inside round 0, measured on a clean migration first), the paused tail (inside the hash or the state
//! message) and the window before the commit (inside `Complete`, or when the destination's `Ready` comes back).
//! The paused strata are placed by message, not by offset: the source waits for each pre-copy round's
//! acknowledgement, so an offset past round 0 may land in a pre-copy round of another run. Also: the destination
//! killed after its `Ready` (the source re-announces its MAC), and quick migrations stalled mid-copy and at
//! `Complete` (the same `--max-pause`). The figures are printed as `faults:` lines for the bench.

#![expect(clippy::unwrap_used, reason = "a test: a failed setup step should panic")]

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream},
    path::Path,
    process::{Command, Output},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use integration_tests::{
    Migrator, Netns, RarpCapture, TestDir, VmHost, in_netns, kvm_available, migrator_bin, wait_until,
};
use serde_json::Value;

const MAC: &str = "52:54:00:66:61:75";
const CMD_ROUND_END: u32 = 4;
const CMD_STATE: u32 = 5;
const CMD_VERIFY: u32 = 7;
const CMD_COMPLETE: u32 = 8;
const CMD_READY: u32 = 12;
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
    /// Kill this process (the destination) when its `Ready` reaches the relay; the `Ready` is not forwarded.
    KillAtReady(u32),
    /// A cut inside the first message of this command, at this fraction (per mille) of its bytes: a landmark of
    /// the message sequence, so it falls in the same phase whatever the rounds before it weighed.
    CutIn(u32, u16),
    /// A stall inside the first message of this command, as [`Fault::CutIn`].
    StallIn(u32, u16),
    /// Close both directions when the destination's `Ready` reaches the relay (it is not forwarded).
    CutAtReady,
    /// Stop forwarding both ways, sockets open, when the destination's `Ready` reaches the relay.
    StallAtReady,
    /// Kill this process inside the first message of this command, as [`Fault::CutIn`].
    KillIn(u32, u16, u32),
}

impl Fault {
    /// A fault placed inside a message of `command`, as an offset once that message (`len` bytes at `offset`)
    /// comes; any other fault as it is.
    fn placed(self, command: u32, offset: u64, len: u64) -> Self {
        let at = |permille: u16| offset + len * u64::from(permille.min(999)) / 1000;
        match self {
            Self::CutIn(c, p) if c == command => Self::Cut(at(p)),
            Self::StallIn(c, p) if c == command => Self::Stall(at(p)),
            Self::KillIn(c, p, pid) if c == command => Self::Kill(at(p), pid),
            other => other,
        }
    }

    /// Whether the relay holds the sockets open at the end (the peers see a stall, not a close).
    fn stalls(self) -> bool {
        matches!(self, Self::Stall(_) | Self::StallIn(..) | Self::StallAtReady)
    }
}

/// Offsets of the stream's landmarks, from the relay.
#[derive(Clone, Debug, Default)]
struct Landmarks {
    /// The end of round 0 (its `RoundEnd`).
    first_round_end: u64,
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
            if fault.stalls() {
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

/// Copies destination → source message by message, so a fault can act on the destination's `Ready`.
fn relay_back(back_dst: &mut TcpStream, back_from: &mut TcpStream, fault: Fault, h: &AtomicBool) {
    let mut header = [0u8; 32];
    while back_dst.read_exact(&mut header).is_ok() && !h.load(Ordering::SeqCst) {
        let command = u32::from_le_bytes(header[0..4].try_into().unwrap());
        let length = u64::from_le_bytes(header[8..16].try_into().unwrap()).min(1 << 20);
        let mut msg = header.to_vec();
        msg.resize(32 + usize::try_from(length).unwrap(), 0);
        if back_dst.read_exact(&mut msg[32..]).is_err() {
            break;
        }
        if command == CMD_READY {
            // The destination has sent `Ready`; the source never sees it.
            match fault {
                Fault::KillAtReady(pid) => {
                    kill(pid);
                    h.store(true, Ordering::SeqCst);
                    let _ = back_from.shutdown(Shutdown::Both);
                    break;
                }
                Fault::CutAtReady => {
                    h.store(true, Ordering::SeqCst);
                    let _ = back_from.shutdown(Shutdown::Both);
                    let _ = back_dst.shutdown(Shutdown::Both);
                    break;
                }
                Fault::StallAtReady => {
                    h.store(true, Ordering::SeqCst);
                    break;
                }
                _ => {}
            }
        }
        if back_from.write_all(&msg).is_err() {
            break;
        }
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
    let back = std::thread::spawn(move || relay_back(&mut back_dst, &mut back_from, fault, &h));
    let (mut from, mut dst) = (from.try_clone().unwrap(), dst.try_clone().unwrap());
    let mut offset = 0u64;
    let mut header = [0u8; 32];
    let mut last_round_end = false;
    // The fault as an offset, once a fault placed inside a message has met its message.
    let mut active = fault;
    // Forwards `bytes` (at `offset`), honouring a cut, stall, flip or kill inside them. False: stop relaying.
    let mut forward = |bytes: &mut [u8], offset: &mut u64, fault: Fault| -> bool {
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
                if m.first_round_end == 0 {
                    m.first_round_end = offset;
                }
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
        if halted.load(Ordering::SeqCst) {
            break;
        }
        let mut msg = header.to_vec();
        msg.resize(32 + usize::try_from(length).unwrap(), 0);
        active = active.placed(command, offset, msg.len() as u64);
        if from.read_exact(&mut msg[32..]).is_err() {
            let _ = forward(&mut msg[..32], &mut offset, active);
            break;
        }
        if !forward(&mut msg, &mut offset, active) {
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
    if !fault.stalls() {
        let _ = dst.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    }
    let _ = back.join();
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

    fn spawn(&self, args: &[&str], log: &str) -> Migrator {
        Migrator::from_command(
            self.host().command(migrator_bin()).args(args),
            &self.dir.join(log),
        )
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
    proc: Migrator,
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
    /// A receiver on the other tap, the relay with `fault`, and a live `migrate` through it. Returns the receiver,
    /// the migrate's output and the relay.
    fn run(&mut self, fault_of: impl FnOnce(&Migrator, &Migrator) -> Fault) -> (Migrator, Output, Relay) {
        self.run_mode("live", fault_of)
    }

    /// As [`Case::run`], in `mode` (`live` or `quick`).
    fn run_mode(
        &mut self,
        mode: &str,
        fault_of: impl FnOnce(&Migrator, &Migrator) -> Fault,
    ) -> (Migrator, Output, Relay) {
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
                mode,
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
    recv: &mut Migrator,
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
        recv.kill();
    }
    assert!(
        bed.echo_answers(),
        "{what}: the guest does not answer after the rollback"
    );
    t.rolled_back += 1;
}

/// A message of the paused tail (`--verify`'s hash or the state), for a fault inside it.
fn tail_message(rng: &mut Rng) -> u32 {
    if rng.next().is_multiple_of(2) {
        CMD_VERIFY
    } else {
        CMD_STATE
    }
}

/// Where inside a message (per mille of its bytes).
fn permille(rng: &mut Rng) -> u16 {
    u16::try_from(rng.next() % 1000).unwrap()
}

/// The destination dies once it has sent `Ready`, which the source never gets: the source rolls back within
/// `--max-pause`, announces its MAC again (RARP frames from the guest's MAC reach the client namespace, and
/// nothing else can send them: the destination never resumed), and the guest runs there alone.
fn killed_after_ready(bed: &Bed, case: &mut Case<'_>, events: &str, t: &mut Tally) {
    t.cases += 1;
    let rarp = RarpCapture::start(
        bed.client(),
        MAC.parse::<migmon_base::MacAddr>().unwrap().octets(),
    );
    let (mut recv, out, relay) = case.run(|_, r| Fault::KillAtReady(r.pid()));
    drop(relay);
    let what = "destination killed after its ready";
    assert!(!out.status.success(), "{what}: the migration succeeded");
    assert!(
        recv.wait_exit(Duration::from_secs(5)),
        "{what}: the destination was killed and must be gone"
    );
    let pause = last_source_pause_ms(events).unwrap_or(f64::INFINITY);
    assert!(
        pause <= MAX_PAUSE_MS,
        "{what}: the source resumed after {pause:.1} ms > --max-pause {MAX_PAUSE_MS} ms"
    );
    assert_rolled_back(bed, case.home, &mut recv, RECV_EXIT, what, t);
    assert!(
        wait_until(Duration::from_secs(5), || rarp.count() >= 1),
        "{what}: the source did not announce its MAC again after the rollback"
    );
    eprintln!(
        "faults: {what}: the source resumed after {pause:.1} ms and sent {} RARP frames",
        rarp.count()
    );
}

/// Quick migrations stalled by the destination, mid-copy and at `Complete`: each rolls back within `--max-pause`.
fn quick_stalls(
    bed: &Bed,
    case: &mut Case<'_>,
    events: &str,
    marks: &Landmarks,
    rng: &mut Rng,
    t: &mut Tally,
) {
    // Round 0 of an idle guest is about as long in quick mode as in live mode: its first half is inside it.
    let mid_copy = rng.in_range(marks.first_round_end / 4, marks.first_round_end / 2);
    for (what, fault) in [
        (format!("quick, stall at {mid_copy}"), Fault::Stall(mid_copy)),
        (
            "quick, stall at the complete".to_owned(),
            Fault::StallIn(CMD_COMPLETE, 0),
        ),
    ] {
        t.cases += 1;
        let (mut recv, out, relay) = case.run_mode("quick", |_, _| fault);
        assert!(!out.status.success(), "{what}: the migration succeeded");
        let pause = last_source_pause_ms(events).unwrap_or(f64::INFINITY);
        t.max_stall_pause_ms = t.max_stall_pause_ms.max(pause);
        assert!(
            pause <= MAX_PAUSE_MS,
            "{what}: paused {pause:.1} ms > --max-pause {MAX_PAUSE_MS} ms"
        );
        assert_rolled_back(bed, case.home, &mut recv, Duration::from_secs(1), &what, t);
        drop(relay);
        eprintln!("faults: {what}: the source resumed after {pause:.1} ms");
    }
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

    // Stream cuts in three strata: round 0 (an offset inside it), the paused tail (inside the hash or the state)
    // and the window before the commit (inside `Complete`, or when the destination's `Ready` comes back). The last
    // two are placed by message, not by offset: the pre-copy rounds before them weigh differently in every run.
    let mut by_stratum = [0u32; 3];
    for i in 0..cuts {
        let s = usize::try_from(i).unwrap() % 3;
        let (name, fault) = match s {
            0 => ("pre-copy", Fault::Cut(rng.in_range(32, marks.first_round_end))),
            1 => (
                "paused tail",
                Fault::CutIn(tail_message(&mut rng), permille(&mut rng)),
            ),
            _ if i % 2 == 0 => (
                "before the commit",
                Fault::CutIn(CMD_COMPLETE, permille(&mut rng)),
            ),
            _ => ("before the commit", Fault::CutAtReady),
        };
        t.cases += 1;
        let (mut recv, out, relay) = case.run(|_, _| fault);
        drop(relay);
        let what = format!("{fault:?} ({name})");
        assert!(!out.status.success(), "{what}: the migration succeeded");
        assert_rolled_back(&bed, case.home, &mut recv, RECV_EXIT, &what, &mut t);
        by_stratum[s] += 1;
    }
    eprintln!(
        "faults: {cuts} stream cuts (pre-copy {}, paused tail {}, before the commit {}): one running copy each time",
        by_stratum[0], by_stratum[1], by_stratum[2]
    );

    // Stalls in the paused tail and before the commit: the source resumes within --max-pause.
    for i in 0..stalls {
        let fault = match i % 4 {
            0 | 2 => Fault::StallIn(tail_message(&mut rng), permille(&mut rng)),
            1 => Fault::StallIn(CMD_COMPLETE, permille(&mut rng)),
            _ => Fault::StallAtReady,
        };
        t.cases += 1;
        let (mut recv, out, relay) = case.run(|_, _| fault);
        let what = format!("{fault:?}");
        assert!(!out.status.success(), "{what}: the migration succeeded");
        let pause = last_source_pause_ms(&events).unwrap_or(f64::INFINITY);
        t.max_stall_pause_ms = t.max_stall_pause_ms.max(pause);
        assert!(
            pause <= MAX_PAUSE_MS,
            "{what}: paused {pause:.1} ms > --max-pause {MAX_PAUSE_MS} ms"
        );
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
    let (cmd, at) = (tail_message(&mut rng), permille(&mut rng));
    t.cases += 1;
    let (mut recv, out, relay) = case.run(|_, r| Fault::KillIn(cmd, at, r.pid()));
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

    // The destination killed after it sent `Ready` (which never arrives), before the commit.
    killed_after_ready(&bed, &mut case, &events, &mut t);

    // Quick mode has the same deadline: a destination stalled in the middle of the copy, or before the
    // `Complete`, gets the guest resumed at the source within --max-pause.
    quick_stalls(&bed, &mut case, &events, &marks, &mut rng, &mut t);

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
    recv.kill();
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
