//! The migration engines end to end over real sockets, with a fake VM made of plain anonymous memory and a
//! "guest" thread that dirties pages. Pure logic: the KVM VM is tested in tests/tests/migration.rs.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use migevents::{MigrationEvent, Mode, Phase, Role};

use crate::{
    announce::{AnnounceSchedule, RARP_FRAME_LEN},
    engine::{
        BoxedVmError, MigrateOptions, MigrationError, MigrationSource, MigrationTarget, OnTimeout, Tracker,
        VmIdentity,
    },
    protocol::Hello,
    ram::{DirtyBitmap, PAGE_SIZE, RamRegion},
    ram_io::GuestRam,
    receive::{ReceiveOptions, ReceiveReport, receive},
    source::migrate,
    transport::{Endpoint, Listener},
};

const PAGES: u64 = 2048; // 8 MiB

fn layout() -> Vec<RamRegion> {
    vec![
        RamRegion {
            gpa: 0,
            size: PAGES / 2 * PAGE_SIZE as u64,
        },
        RamRegion {
            gpa: 1 << 32,
            size: PAGES / 2 * PAGE_SIZE as u64,
        },
    ]
}

/// The fake vCPU: holds `lock` while it writes a page, checks `paused` under it.
struct Guest {
    ram: GuestRam,
    lock: Mutex<()>,
    paused: AtomicBool,
    stop: AtomicBool,
    dirty: Vec<AtomicU64>,
    logging: AtomicBool,
    writes: AtomicU64,
}

impl Guest {
    fn write(&self, page: u64, value: u8) {
        let _g = self.lock.lock().unwrap();
        if self.paused.load(Ordering::SeqCst) {
            return;
        }
        self.ram.write(page, 0, &[value; PAGE_SIZE]).unwrap();
        self.dirty[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::SeqCst);
        self.writes.fetch_add(1, Ordering::Relaxed);
    }
}

struct FakeSource {
    guest: Arc<Guest>,
    dirtier: Option<JoinHandle<()>>,
    pending: Vec<Vec<u8>>,
    resumes: u32,
    pauses: u32,
    announces: u32,
    fail_save: bool,
    /// Frames keep reaching the paused tap (one per take) — a busy network.
    busy_tap: bool,
    /// The last pause and resume instants.
    paused_at: Option<Instant>,
    resumed_at: Option<Instant>,
}

impl FakeSource {
    /// A source whose RAM holds some data; with `rate` > 0 a thread rewrites `working_set` pages at `rate` pages/s.
    fn new(working_set: u64, rate: u64) -> Self {
        let ram = GuestRam::anonymous(&layout()).unwrap();
        for p in (0..PAGES).step_by(7) {
            ram.write(p, (p % 4096) as usize, &[(p % 251) as u8 + 1]).unwrap();
        }
        let guest = Arc::new(Guest {
            ram,
            lock: Mutex::new(()),
            paused: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            dirty: (0..PAGES.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            logging: AtomicBool::new(false),
            writes: AtomicU64::new(0),
        });
        let dirtier = (rate > 0).then(|| {
            let g = guest.clone();
            std::thread::spawn(move || {
                let start = Instant::now();
                let mut n = 0u64;
                while !g.stop.load(Ordering::SeqCst) {
                    let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
                    while n < due {
                        g.write(100 + n % working_set, (n % 200) as u8 + 1);
                        n += 1;
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
            })
        });
        Self {
            guest,
            dirtier,
            pending: Vec::new(),
            resumes: 0,
            pauses: 0,
            announces: 0,
            fail_save: false,
            busy_tap: false,
            paused_at: None,
            resumed_at: None,
        }
    }

    fn paused(&self) -> bool {
        self.guest.paused.load(Ordering::SeqCst)
    }
}

impl Drop for FakeSource {
    fn drop(&mut self) {
        self.guest.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.dirtier.take() {
            t.join().unwrap();
        }
    }
}

const MAC: [u8; 6] = [0x52, 0x54, 0, 0xab, 0xcd, 0xef];

impl MigrationSource for FakeSource {
    fn identity(&self) -> VmIdentity {
        VmIdentity {
            mac: MAC,
            ips: vec!["10.0.0.2".into()],
            host: "fake".into(),
            config: b"fake-config".to_vec(),
        }
    }
    fn guest_ram(&self) -> GuestRam {
        self.guest.ram.clone()
    }
    fn start_dirty_log(&mut self) -> Result<(), BoxedVmError> {
        self.guest.logging.store(true, Ordering::SeqCst);
        for w in &self.guest.dirty {
            w.store(0, Ordering::SeqCst);
        }
        Ok(())
    }
    fn take_dirty_pages(&mut self) -> Result<DirtyBitmap, BoxedVmError> {
        let words = self
            .guest
            .dirty
            .iter()
            .map(|w| w.swap(0, Ordering::SeqCst))
            .collect();
        Ok(DirtyBitmap::from_words(words, PAGES))
    }
    fn stop_dirty_log(&mut self) -> Result<(), BoxedVmError> {
        self.guest.logging.store(false, Ordering::SeqCst);
        Ok(())
    }
    fn pause(&mut self) -> Result<(), BoxedVmError> {
        let _g = self.guest.lock.lock().unwrap();
        self.guest.paused.store(true, Ordering::SeqCst);
        self.pauses += 1;
        self.paused_at = Some(Instant::now());
        self.pending = vec![vec![0xaa; 64], vec![0xbb; 1514]];
        Ok(())
    }
    fn resume(&mut self) -> Result<(), BoxedVmError> {
        self.guest.paused.store(false, Ordering::SeqCst);
        self.resumes += 1;
        self.resumed_at = Some(Instant::now());
        Ok(())
    }
    fn save_state(&mut self) -> Result<Vec<u8>, BoxedVmError> {
        if self.fail_save {
            return Err("vcpu state unavailable".into());
        }
        Ok(vec![0x5a; 3000])
    }
    fn take_pending_frames(&mut self) -> Vec<Vec<u8>> {
        if self.busy_tap && self.paused() {
            self.pending.push(vec![0xcc; 60]);
        }
        std::mem::take(&mut self.pending)
    }
    fn return_frames(&mut self, mut frames: Vec<Vec<u8>>) {
        frames.append(&mut self.pending);
        self.pending = frames;
    }
    fn announce(&mut self) -> Result<(), BoxedVmError> {
        self.announces += 1;
        Ok(())
    }
}

#[derive(Default, Debug)]
struct FakeTarget {
    ram: Option<GuestRam>,
    state: Vec<u8>,
    running: bool,
    sent: Vec<Vec<u8>>,
    delivered: Vec<Vec<u8>>,
    garps: u32,
    scribble: bool,
}

impl MigrationTarget for FakeTarget {
    fn guest_ram(&self) -> GuestRam {
        self.ram.clone().unwrap()
    }
    fn restore_state(&mut self, state: &[u8]) -> Result<(), BoxedVmError> {
        self.state = state.to_vec();
        if self.scribble {
            let ram = self.ram.as_ref().unwrap();
            let mut first = [0u8];
            ram.read(5, &mut first).unwrap();
            ram.write(5, 0, &[first[0] ^ 0x40]).unwrap();
        }
        Ok(())
    }
    fn resume(&mut self) -> Result<(), BoxedVmError> {
        self.running = true;
        Ok(())
    }
    fn deliver_frames(&mut self, frames: Vec<Vec<u8>>) -> Result<(), BoxedVmError> {
        assert!(self.running, "frames are delivered after resume");
        self.delivered.extend(frames);
        Ok(())
    }
    fn send_frame(&mut self, frame: &[u8]) -> Result<(), BoxedVmError> {
        self.sent.push(frame.to_vec());
        Ok(())
    }
    fn request_garp(&mut self) -> Result<(), BoxedVmError> {
        self.garps += 1;
        Ok(())
    }
}

fn fast_announce() -> AnnounceSchedule {
    AnnounceSchedule {
        initial: Duration::from_millis(5),
        max: Duration::from_millis(20),
        rounds: 5,
        step: Duration::from_millis(5),
    }
}

fn temp_path(name: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    std::env::temp_dir().join(format!(
        "migrator-{}-{}-{name}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ))
}

type DestResult = Result<(FakeTarget, ReceiveReport), MigrationError>;

/// Starts a receiver on a fresh TCP port; returns its endpoint and the thread.
fn start_destination(
    scribble: bool,
    fail_create: bool,
    events: PathBuf,
) -> (Endpoint, JoinHandle<DestResult>) {
    let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let ep = l.local_endpoint();
    let t = std::thread::spawn(move || {
        let stream = l.accept()?;
        let opts = ReceiveOptions {
            announce: fast_announce(),
            idle_timeout: Duration::from_secs(3),
            events: Some(events),
            host: "dst".into(),
            ..ReceiveOptions::default()
        };
        receive(
            stream,
            |h: &Hello| -> Result<FakeTarget, BoxedVmError> {
                if fail_create {
                    return Err("no /dev/kvm here".into());
                }
                assert_eq!(h.config, b"fake-config");
                Ok(FakeTarget {
                    ram: Some(GuestRam::anonymous(&h.regions)?),
                    scribble,
                    ..FakeTarget::default()
                })
            },
            &opts,
            &Tracker::default(),
        )
    });
    (ep, t)
}

/// Options of a migration over plain TCP on loopback (the tests' relays read the stream).
fn plain_tcp(to: Endpoint, mode: Mode) -> MigrateOptions {
    MigrateOptions {
        insecure: true,
        ..MigrateOptions::new(to, mode)
    }
}

fn events_of(path: &PathBuf) -> Vec<MigrationEvent> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| MigrationEvent::from_line(l).unwrap())
        .collect()
}

fn names(evs: &[MigrationEvent], role: Role) -> Vec<String> {
    evs.iter()
        .filter(|e| e.role == role)
        .map(|e| {
            let v = serde_json::to_value(&e.phase).unwrap();
            v["event"].as_str().unwrap().to_owned()
        })
        .collect()
}

fn ram_hash(ram: &GuestRam) -> u128 {
    ram.hash()
}

#[test]
fn live_idle_migrates_everything_and_announces() {
    let events = temp_path("events");
    let (ep, dst) = start_destination(false, false, events.clone());
    let mut src = FakeSource::new(0, 0);
    let mut opts = plain_tcp(ep, Mode::Live);
    opts.verify = true;
    let report = migrate(&mut src, &opts, Some(&events), &Tracker::default());
    let (target, dreport) = dst
        .join()
        .unwrap()
        .map_err(|e| crate::engine::error_chain(&e))
        .unwrap();
    let report = report.unwrap();

    assert!(
        src.paused(),
        "the source stays paused after a successful migration"
    );
    assert_eq!(src.resumes, 0);
    assert_eq!(ram_hash(&src.guest.ram), ram_hash(&target.guest_ram()));
    assert!(target.running);
    assert_eq!(target.state, vec![0x5a; 3000]);
    assert_eq!(
        target.delivered,
        vec![vec![0xaa; 64], vec![0xbb; 1514]],
        "forwarded frames arrive in order"
    );
    assert_eq!(target.garps, 1);
    assert_eq!(target.sent.len(), 5);
    assert!(
        target
            .sent
            .iter()
            .all(|f| f.len() == RARP_FRAME_LEN && f[6..12] == MAC)
    );
    assert_eq!(report.rounds, 1, "an idle guest converges after round 0");
    assert_eq!(report.data_pages, PAGES.div_ceil(7));
    assert!(report.verified_hash.is_some());
    assert!(report.pause_ms > 0.0 && report.total_ms >= report.pause_ms);
    assert!(report.floor_ms > 0.0);
    assert_eq!(dreport.forwarded_frames, 2);
    assert_eq!(dreport.announces, 5);
    assert_eq!(dreport.migration_id, report.migration_id);

    let evs = events_of(&events);
    assert!(
        evs.iter()
            .all(|e| e.migration_id == report.migration_id && e.mac == "52:54:00:ab:cd:ef")
    );
    let s = names(&evs, Role::Source);
    assert_eq!(s, ["setup", "round", "pause", "round", "state_sent", "complete"]);
    let d = names(&evs, Role::Destination);
    assert_eq!(
        d,
        [
            "setup",
            "round",
            "round",
            "state_sent",
            "resume",
            "announce",
            "announce",
            "announce",
            "announce",
            "announce",
            "complete"
        ]
    );
    let ts: Vec<u64> = evs.iter().map(|e| e.ts_ns).collect();
    let pause = evs.iter().find(|e| e.phase == Phase::Pause).unwrap().ts_ns;
    let resume = evs.iter().find(|e| e.phase == Phase::Resume).unwrap().ts_ns;
    assert!(pause < resume && ts.iter().all(|&t| t > 0));
    let _ = std::fs::remove_file(events);
}

#[test]
fn live_with_a_dirtier_iterates_and_stays_consistent() {
    let events = temp_path("events");
    let (ep, dst) = start_destination(false, false, events.clone());
    // 512 pages rewritten at 20000 pages/s (80 MiB/s) against a tight budget: several rounds are needed.
    let mut src = FakeSource::new(512, 20_000);
    std::thread::sleep(Duration::from_millis(20));
    let mut opts = plain_tcp(ep, Mode::Live);
    opts.verify = true;
    opts.downtime = Duration::from_millis(3);
    opts.max_bandwidth = Some(200 << 20);
    opts.timeout = Duration::from_secs(3);
    let report = migrate(&mut src, &opts, Some(&events), &Tracker::default()).unwrap();
    let (target, _) = dst.join().unwrap().unwrap();
    assert!(src.guest.writes.load(Ordering::Relaxed) > 0);
    assert_eq!(
        ram_hash(&src.guest.ram),
        ram_hash(&target.guest_ram()),
        "every dirtied page made it"
    );
    assert!(report.rounds >= 1);
    assert!(report.notes.iter().any(|n| n.contains("--max-bandwidth")));
    let _ = std::fs::remove_file(events);
}

#[test]
fn timeout_abort_keeps_the_guest_and_force_moves_it() {
    let events = temp_path("events");
    let (ep, dst) = start_destination(false, false, events.clone());
    let mut src = FakeSource::new(1024, 200_000);
    let mut opts = plain_tcp(ep, Mode::Live);
    opts.downtime = Duration::from_micros(1);
    opts.timeout = Duration::from_millis(150);
    opts.on_timeout = OnTimeout::Abort;
    opts.max_bandwidth = Some(50 << 20);
    let err = migrate(&mut src, &opts, Some(&events), &Tracker::default()).unwrap_err();
    assert!(matches!(err, MigrationError::NotConverged { .. }), "{err}");
    assert!(!src.paused(), "an aborted pre-copy never paused the guest");
    let derr = dst.join().unwrap().unwrap_err();
    assert!(matches!(derr, MigrationError::SourceAborted { .. }), "{derr}");
    assert!(names(&events_of(&events), Role::Source).ends_with(&["failed".into(), "rollback".into()]));

    let (ep, dst) = start_destination(false, false, events.clone());
    opts.to = ep;
    opts.on_timeout = OnTimeout::Force;
    opts.verify = true;
    let report = migrate(&mut src, &opts, Some(&events), &Tracker::default()).unwrap();
    let (target, _) = dst.join().unwrap().unwrap();
    assert!(report.forced && report.rounds >= 1);
    assert_eq!(ram_hash(&src.guest.ram), ram_hash(&target.guest_ram()));
    let _ = std::fs::remove_file(events);
}

#[test]
fn quick_via_file_with_extra_pause() {
    let events = temp_path("events");
    let file = temp_path("suspend");
    let (ep, dst) = start_destination(false, false, events.clone());
    let mut src = FakeSource::new(64, 5000);
    let mut opts = plain_tcp(ep, Mode::Quick);
    opts.verify = true;
    opts.via_file = Some(file.clone());
    opts.extra_pause = Duration::from_millis(100);
    let report = migrate(&mut src, &opts, Some(&events), &Tracker::default()).unwrap();
    let (target, dreport) = dst.join().unwrap().unwrap();
    assert_eq!(ram_hash(&src.guest.ram), ram_hash(&target.guest_ram()));
    assert!(report.pause_ms >= 100.0 && (report.extra_pause_ms - 100.0).abs() < 1e-9);
    assert!(report.notes.iter().any(|n| n.contains("--extra-pause")));
    assert!(report.notes.iter().any(|n| n.contains("fsynced")));
    assert!(!file.exists(), "the suspend file is removed after success");
    // An existing file (or a link) is never written through.
    std::fs::write(&file, b"someone else's").unwrap();
    let (ep2, dst2) = start_destination(false, false, events.clone());
    let mut again = plain_tcp(ep2, Mode::Quick);
    again.via_file = Some(file.clone());
    let err = migrate(&mut src, &again, None, &Tracker::default()).unwrap_err();
    assert!(err.to_string().contains("suspend file"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"someone else's");
    assert!(!src.paused());
    let _ = dst2.join();
    assert_eq!(dreport.forwarded_frames, 2);
    assert!(dreport.pause_ms >= 100.0);
    let s = names(&events_of(&events), Role::Source);
    assert_eq!(s, ["setup", "pause", "round", "state_sent", "complete"]);
    let _ = std::fs::remove_file(events);
    let _ = std::fs::remove_file(file);
}

#[test]
fn extra_pause_past_the_max_pause_is_refused_before_anything_moves() {
    let mut src = FakeSource::new(0, 0);
    let mut opts = plain_tcp(Endpoint::Tcp("127.0.0.1:9".into()), Mode::Quick);
    opts.extra_pause = Duration::from_secs(2);
    opts.max_pause = Some(Duration::from_secs(1));
    let err = migrate(&mut src, &opts, None, &Tracker::default()).unwrap_err();
    assert!(
        err.to_string().contains("--extra-pause") && err.to_string().contains("--max-pause"),
        "{err}"
    );
    assert!(!src.paused());
}

#[test]
fn quick_direct() {
    let events = temp_path("events");
    let (ep, dst) = start_destination(false, false, events.clone());
    let mut src = FakeSource::new(0, 0);
    let mut opts = plain_tcp(ep, Mode::Quick);
    opts.verify = true;
    migrate(&mut src, &opts, Some(&events), &Tracker::default()).unwrap();
    let (target, _) = dst.join().unwrap().unwrap();
    assert_eq!(ram_hash(&src.guest.ram), ram_hash(&target.guest_ram()));
    let _ = std::fs::remove_file(events);
}

#[test]
fn verify_mismatch_fails_loudly_and_rolls_back() {
    let events = temp_path("events");
    let (ep, dst) = start_destination(true, false, events.clone());
    let mut src = FakeSource::new(0, 0);
    let mut opts = plain_tcp(ep, Mode::Live);
    opts.verify = true;
    let err = migrate(&mut src, &opts, Some(&events), &Tracker::default()).unwrap_err();
    assert!(
        matches!(&err, MigrationError::DestinationAborted { reason } if reason.contains("hash mismatch")),
        "{err}"
    );
    assert!(!src.paused() && src.resumes == 1, "the source resumed its guest");
    assert_eq!(
        src.pending.len(),
        2,
        "the frames that were forwarded are handed back to the source guest"
    );
    let derr = dst.join().unwrap().unwrap_err();
    assert!(matches!(derr, MigrationError::VerifyMismatch { .. }));
    let s = names(&events_of(&events), Role::Source);
    assert!(
        s.ends_with(&["failed".into(), "resume".into(), "rollback".into()]),
        "{s:?}"
    );
    let _ = std::fs::remove_file(events);
}

#[test]
fn destination_that_cannot_create_the_vm() {
    let events = temp_path("events");
    let (ep, dst) = start_destination(false, true, events.clone());
    let mut src = FakeSource::new(0, 0);
    let opts = plain_tcp(ep, Mode::Live);
    let err = migrate(&mut src, &opts, Some(&events), &Tracker::default()).unwrap_err();
    assert!(err.to_string().contains("/dev/kvm"), "{err}");
    assert!(!src.paused());
    assert!(dst.join().unwrap().is_err());
    let _ = std::fs::remove_file(events);
}

#[test]
fn source_failure_while_paused_rolls_back() {
    let events = temp_path("events");
    let (ep, dst) = start_destination(false, false, events.clone());
    let mut src = FakeSource::new(0, 0);
    src.fail_save = true;
    let err = migrate(
        &mut src,
        &plain_tcp(ep, Mode::Live),
        Some(&events),
        &Tracker::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("save its state"), "{err}");
    assert!(!src.paused() && src.resumes == 1);
    let derr = dst.join().unwrap().unwrap_err();
    assert!(derr.to_string().contains("vcpu state unavailable"), "{derr}");
    let _ = std::fs::remove_file(events);
}

/// A relay between source and destination that, after `after` bytes, either flips one byte or cuts the
/// connection (as if the destination died).
fn relay(to: Endpoint, after: u64, corrupt: bool) -> Endpoint {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let ep = Endpoint::Tcp(listener.local_addr().unwrap().to_string());
    let Endpoint::Tcp(to) = to else { unreachable!() };
    std::thread::spawn(move || {
        let (mut from_src, _) = listener.accept().unwrap();
        let mut to_dst = TcpStream::connect(to).unwrap();
        let (mut back_src, mut back_dst) = (from_src.try_clone().unwrap(), to_dst.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut back_dst, &mut back_src);
            let _ = back_src.shutdown(std::net::Shutdown::Both);
        });
        let mut seen = 0u64;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match from_src.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let chunk = &mut buf[..n];
            if seen + n as u64 > after {
                let i = (after.saturating_sub(seen)) as usize;
                if corrupt {
                    chunk[i] ^= 0x10;
                    seen = u64::MAX / 2;
                } else {
                    let _ = to_dst.write_all(&chunk[..i]);
                    let _ = to_dst.shutdown(std::net::Shutdown::Both);
                    let _ = from_src.shutdown(std::net::Shutdown::Both);
                    break;
                }
            }
            seen = seen.saturating_add(n as u64);
            if to_dst.write_all(chunk).is_err() {
                break;
            }
        }
        let _ = to_dst.shutdown(std::net::Shutdown::Write);
    });
    ep
}

#[test]
fn corrupted_stream_is_caught_and_the_source_rolls_back() {
    for after in [10u64, 500, 200_000, 1_000_000] {
        let events = temp_path("events");
        let (ep, dst) = start_destination(false, false, events.clone());
        let mut src = FakeSource::new(0, 0);
        let mut opts = plain_tcp(relay(ep, after, true), Mode::Live);
        opts.verify = true;
        let err = migrate(&mut src, &opts, Some(&events), &Tracker::default()).unwrap_err();
        assert!(!src.paused(), "corruption at {after}: {err}");
        let derr = dst.join().unwrap().unwrap_err();
        let text = crate::engine::error_chain(&derr);
        assert!(text.contains("corrupted"), "corruption at {after}: {text}");
        let _ = std::fs::remove_file(events);
    }
}

#[test]
fn destination_dying_mid_transfer_rolls_back() {
    for after in [100u64, 300_000] {
        let events = temp_path("events");
        let (ep, dst) = start_destination(false, false, events.clone());
        let mut src = FakeSource::new(256, 5000);
        let opts = plain_tcp(relay(ep, after, false), Mode::Live);
        let err = migrate(&mut src, &opts, Some(&events), &Tracker::default()).unwrap_err();
        assert!(!src.paused(), "cut at {after}: {err}");
        let derr = dst.join().unwrap().unwrap_err();
        assert!(
            crate::engine::error_chain(&derr).contains("closed"),
            "cut at {after}: {derr}"
        );
        let _ = std::fs::remove_file(events);
    }
}

/// A receiver behind the accept loop, with TLS credentials from `creds` (or plain), RAM capped at `max_mem`.
fn start_guarded_destination(
    creds: Option<PathBuf>,
    max_mem: u64,
) -> (Endpoint, Tracker, JoinHandle<DestResult>) {
    let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let ep = l.local_endpoint();
    let tracker = Tracker::default();
    let tr = tracker.clone();
    let t = std::thread::spawn(move || {
        let tls = creds.map(|d| crate::tls::server_config(&d).unwrap());
        let opts = ReceiveOptions {
            announce: fast_announce(),
            idle_timeout: Duration::from_secs(20),
            max_mem,
            ..ReceiveOptions::default()
        };
        let arrival = crate::accept::wait_for_source(&l, tls.as_ref(), &opts, &tr)?;
        let outcome = crate::receive::receive_arrival(
            arrival,
            |h: &Hello| -> Result<FakeTarget, BoxedVmError> {
                Ok(FakeTarget {
                    ram: Some(GuestRam::anonymous(&h.regions)?),
                    ..FakeTarget::default()
                })
            },
            &opts,
            &tr,
        )?;
        match outcome {
            crate::receive::Outcome::Running(t, r) => Ok((t, r)),
            crate::receive::Outcome::InDoubt { reason, .. } => Err(MigrationError::InDoubt {
                side: "destination",
                reason,
            }),
        }
    });
    (ep, tracker, t)
}

fn tls_dir(tag: &str) -> PathBuf {
    let d = temp_path(tag);
    crate::tls::tls_init(&d, &crate::tls::TlsInit::default()).unwrap();
    d
}

#[test]
fn tls_receiver_survives_scans_garbage_and_strangers_then_migrates() {
    let creds = tls_dir("creds");
    let stranger = tls_dir("stranger");
    let (ep, tracker, dst) = start_guarded_destination(Some(creds.clone()), 1 << 30);
    let Endpoint::Tcp(addr) = ep.clone() else {
        unreachable!()
    };
    // A port scan: connect and close.
    drop(TcpStream::connect(&addr).unwrap());
    // Garbage instead of a TLS hello.
    let mut g = TcpStream::connect(&addr).unwrap();
    g.write_all(&[0xab; 4096]).unwrap();
    drop(g);
    // A source with certificates of another CA.
    let mut src = FakeSource::new(0, 0);
    let mut opts = MigrateOptions::new(ep.clone(), Mode::Live);
    opts.tls = Some(crate::transport::ClientTls {
        creds: stranger.clone(),
        hostname: None,
    });
    let err = migrate(&mut src, &opts, None, &Tracker::default()).unwrap_err();
    assert!(crate::engine::error_chain(&err).contains("TLS"), "{err}");
    assert!(!src.paused());
    // Plain TCP without --insecure is refused before a byte moves.
    let plain = migrate(
        &mut src,
        &MigrateOptions::new(ep.clone(), Mode::Live),
        None,
        &Tracker::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        plain.contains("--tls-creds") && plain.contains("--insecure"),
        "{plain}"
    );
    // Each refused peer is checked on its own thread: wait (with a deadline) until all three were counted, so the
    // real source below cannot overtake a slow check on a loaded machine.
    let deadline = Instant::now() + Duration::from_secs(20);
    while tracker.snapshot().rejected_peers < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        tracker.snapshot().rejected_peers,
        3,
        "scan, garbage and stranger counted: {:?}",
        tracker.snapshot()
    );
    assert!(!dst.is_finished(), "the receiver keeps listening");
    // The real source.
    opts.tls = Some(crate::transport::ClientTls {
        creds: creds.clone(),
        hostname: None,
    });
    opts.verify = true;
    let report = migrate(&mut src, &opts, None, &Tracker::default())
        .map_err(|e| crate::engine::error_chain(&e))
        .unwrap();
    let (target, _) = dst.join().unwrap().unwrap();
    assert_eq!(ram_hash(&src.guest.ram), ram_hash(&target.guest_ram()));
    assert!(report.verified_hash.is_some());
    assert_eq!(
        tracker.snapshot().rejected_peers,
        3,
        "only the scan, the garbage and the stranger were refused: {:?}",
        tracker.snapshot()
    );
    let _ = std::fs::remove_dir_all(creds);
    let _ = std::fs::remove_dir_all(stranger);
}

#[test]
fn max_mem_refuses_a_large_guest_and_keeps_listening() {
    let (ep, tracker, dst) = start_guarded_destination(None, 4 << 20);
    let mut src = FakeSource::new(0, 0);
    let err = migrate(&mut src, &plain_tcp(ep, Mode::Live), None, &Tracker::default()).unwrap_err();
    let text = crate::engine::error_chain(&err);
    assert!(text.contains("--max-mem"), "{text}");
    assert!(!src.paused());
    let deadline = Instant::now() + Duration::from_secs(5);
    while tracker.snapshot().rejected_peers == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(tracker.snapshot().rejected_peers, 1);
    assert!(!dst.is_finished(), "the receiver keeps listening");
}

/// What [`relay_at`] does when the source sends a message of its command.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Stop forwarding (both ways), keep both connections open: a destination that stalls.
    Stall,
    /// Close both connections: the message is lost and the destination is gone.
    Cut,
}

/// A relay that forwards whole messages from the source until one of command `at`, where it applies `fault`.
fn relay_at(to: Endpoint, at: crate::protocol::Command, fault: Fault) -> Endpoint {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let ep = Endpoint::Tcp(listener.local_addr().unwrap().to_string());
    let Endpoint::Tcp(to) = to else { unreachable!() };
    std::thread::spawn(move || {
        let (mut from_src, _) = listener.accept().unwrap();
        let mut to_dst = TcpStream::connect(to).unwrap();
        let stalled = Arc::new(AtomicBool::new(false));
        let (mut back_src, mut back_dst, st) = (
            from_src.try_clone().unwrap(),
            to_dst.try_clone().unwrap(),
            stalled.clone(),
        );
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = back_dst.read(&mut buf) {
                if n == 0 || st.load(Ordering::SeqCst) || back_src.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        let mut header = [0u8; crate::protocol::HEADER_SIZE];
        loop {
            if from_src.read_exact(&mut header).is_err() {
                break;
            }
            let h = crate::protocol::Header::decode(&header);
            if h.command == at as u32 {
                match fault {
                    Fault::Stall => {
                        stalled.store(true, Ordering::SeqCst);
                        // Both connections stay open and nothing more goes through, until the source gives up.
                        let _ = std::io::copy(&mut from_src, &mut std::io::sink());
                    }
                    Fault::Cut => {}
                }
                let _ = to_dst.shutdown(std::net::Shutdown::Both);
                let _ = from_src.shutdown(std::net::Shutdown::Both);
                return;
            }
            let mut payload = vec![0u8; h.length as usize];
            if from_src.read_exact(&mut payload).is_err()
                || to_dst.write_all(&header).is_err()
                || to_dst.write_all(&payload).is_err()
            {
                break;
            }
        }
        let _ = to_dst.shutdown(std::net::Shutdown::Both);
    });
    ep
}

#[test]
fn a_destination_stalled_in_the_pause_gets_the_guest_resumed_here_within_max_pause() {
    use crate::protocol::Command;
    for at in [Command::State, Command::Complete] {
        let events = temp_path("events");
        let (ep, dst) = start_destination(false, false, events.clone());
        let mut src = FakeSource::new(0, 0);
        let mut opts = plain_tcp(relay_at(ep, at, Fault::Stall), Mode::Live);
        let max_pause = Duration::from_millis(400);
        opts.max_pause = Some(max_pause);
        let err = migrate(&mut src, &opts, Some(&events), &Tracker::default()).unwrap_err();
        assert!(
            matches!(err, MigrationError::PauseDeadline(_)),
            "stall at {at:?}: {err}"
        );
        assert!(!src.paused(), "the guest runs at the source again");
        let paused = src.resumed_at.unwrap() - src.paused_at.unwrap();
        assert!(
            paused <= max_pause,
            "stall at {at:?}: paused {paused:?} > {max_pause:?}"
        );
        assert_eq!(src.announces, 1, "the rolled-back source announces its MAC again");
        let derr = dst.join().unwrap().unwrap_err();
        assert!(
            !matches!(derr, MigrationError::InDoubt { .. }),
            "never ready, so not in doubt: {derr}"
        );
        let _ = std::fs::remove_file(events);
    }
}

#[test]
fn a_lost_commit_leaves_both_sides_paused_in_doubt_and_one_can_resume() {
    let (ep, dst) = start_destination_keeping_doubt();
    let mut src = FakeSource::new(0, 0);
    let opts = plain_tcp(
        relay_at(ep, crate::protocol::Command::Commit, Fault::Cut),
        Mode::Live,
    );
    let tracker = Tracker::default();
    let err = migrate(&mut src, &opts, None, &tracker).unwrap_err();
    assert!(
        matches!(err, MigrationError::InDoubt { side: "source", .. }),
        "{err}"
    );
    assert!(err.to_string().contains("resume --force"), "{err}");
    assert!(
        src.paused() && src.resumes == 0,
        "a committed source never resumes on its own"
    );
    assert_eq!(tracker.snapshot().state, crate::engine::MigrationState::InDoubt);
    let outcome = dst.join().unwrap().unwrap();
    let crate::receive::Outcome::InDoubt {
        mut target,
        mac,
        reason,
    } = outcome
    else {
        panic!("the destination is in doubt too");
    };
    assert!(!target.running, "held paused: {reason}");
    // The operator picks the destination.
    crate::receive::resume_held(&mut target, mac).unwrap();
    assert!(target.running && target.sent.len() == 1 && target.garps == 1);
}

/// A receiver (plain TCP) that returns its outcome as it is, in doubt included.
fn start_destination_keeping_doubt() -> (
    Endpoint,
    JoinHandle<Result<crate::receive::Outcome<FakeTarget>, MigrationError>>,
) {
    let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let ep = l.local_endpoint();
    let t = std::thread::spawn(move || {
        let opts = ReceiveOptions {
            announce: fast_announce(),
            idle_timeout: Duration::from_secs(5),
            ..ReceiveOptions::default()
        };
        let arrival = crate::receive::greet(l.accept()?, &opts)?;
        crate::receive::receive_arrival(
            arrival,
            |h: &Hello| -> Result<FakeTarget, BoxedVmError> {
                Ok(FakeTarget {
                    ram: Some(GuestRam::anonymous(&h.regions)?),
                    ..FakeTarget::default()
                })
            },
            &opts,
            &Tracker::default(),
        )
    });
    (ep, t)
}

#[test]
fn cancel_stops_pre_copy_and_the_guest_keeps_running() {
    let (ep, dst) = start_destination(false, false, temp_path("events"));
    // A working set rewritten faster than it can converge within 1 ms.
    let mut src = FakeSource::new(1500, 400_000);
    let mut opts = plain_tcp(ep, Mode::Live);
    opts.downtime = Duration::from_micros(10);
    opts.on_timeout = OnTimeout::Abort;
    let tracker = Tracker::default();
    let t = tracker.clone();
    let canceller = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        while t.snapshot().iteration < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        t.cancel();
    });
    let err = migrate(&mut src, &opts, None, &tracker).unwrap_err();
    canceller.join().unwrap();
    assert!(matches!(err, MigrationError::Cancelled), "{err}");
    assert!(!src.paused());
    assert!(dst.join().unwrap().is_err());
}

#[test]
fn frames_that_keep_arriving_in_the_pause_reach_the_destination_guest() {
    let events = temp_path("events");
    let (ep, dst) = start_destination(false, false, events.clone());
    let mut src = FakeSource::new(0, 0);
    src.busy_tap = true;
    let report = migrate(&mut src, &plain_tcp(ep, Mode::Live), None, &Tracker::default())
        .map_err(|e| crate::engine::error_chain(&e))
        .unwrap();
    let (target, dreport) = dst.join().unwrap().unwrap();
    assert!(target.running);
    assert!(report.forwarded_frames > 2, "{report:?}");
    assert_eq!(
        dreport.forwarded_frames, report.forwarded_frames,
        "every forwarded frame reached the guest"
    );
    let _ = std::fs::remove_file(events);
}
