//! The QMP follower against a real QEMU (Debian's qemu-system-x86, installed by `./x setup`): `stop` and `cont`
//! driven through a second QMP connection must come out of the follower as one pause window, stamped with
//! `CLOCK_MONOTONIC` via the measured offset, which is recorded first.
//!
//! Then migrations of our guest ELF (`-M microvm,acpi=off`, PVH entry, KVM) between two QEMUs, the destination started
//! with `-incoming` after the follower already waits for its socket: a live migration, a quick one (`stop`, a hold,
//! `migrate`, `cont` on the destination), and a QEMU that restarts (its socket goes away and comes back as the
//! destination). Each must come out as exactly one migration, whose pause matches QEMU's own STOP (source) and
//! RESUME (destination) stamps.

#![expect(clippy::unwrap_used, reason = "a test: a failed setup step should panic")]

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::fs::FileTypeExt,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use migevents::{Phase, Role, monotonic_ns};
use migmon_analysis::trace::Event;
use monitor::pause::qmp;
use serde_json::Value;
use testbed::net::wait_until;

/// Kills and reaps QEMU and removes its directory (if it owns one), also when the test fails.
struct Qemu {
    child: Child,
    dir: Option<PathBuf>,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// A second QMP client that drives QEMU; it keeps the events it reads (QEMU's own stamps).
struct Driver {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: Vec<Value>,
}

impl Driver {
    fn connect(path: &Path) -> Self {
        let s = UnixStream::connect(path).expect("connect to the driver QMP socket");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut d = Self {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
            events: Vec::new(),
        };
        let greeting = d.line();
        assert!(greeting.contains("\"QMP\""), "{greeting}");
        d.cmd("qmp_capabilities");
        d
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.reader.read_line(&mut l).expect("read from QMP");
        l
    }

    /// Sends a command and waits for its reply (keeping events).
    fn cmd(&mut self, name: &str) {
        self.cmd_with(name, &Value::Null);
    }

    fn cmd_with(&mut self, name: &str, args: &Value) {
        let mut c = serde_json::json!({ "execute": name });
        if !args.is_null() {
            c["arguments"] = args.clone();
        }
        writeln!(self.writer, "{c}").unwrap();
        loop {
            let l = self.line();
            assert!(!l.is_empty(), "QEMU closed the socket");
            let v: Value = serde_json::from_str(&l).unwrap();
            if v.get("return").is_some() {
                return;
            }
            assert!(v.get("error").is_none(), "{name} failed: {l}");
            self.events.push(v);
        }
    }

    /// Waits for an event (its name, and a MIGRATION status when given); returns its wall stamp in ns.
    fn wait_event(&mut self, name: &str, status: Option<&str>) -> i64 {
        loop {
            if let Some(t) = self.stamp(name, status) {
                return t;
            }
            let l = self.line();
            assert!(!l.is_empty(), "QEMU closed the socket waiting for {name}");
            let v: Value = serde_json::from_str(&l).unwrap();
            if let Some(st) = v.pointer("/data/status").and_then(Value::as_str) {
                assert!(st != "failed", "the migration failed: {l}");
            }
            self.events.push(v);
        }
    }

    /// The wall stamp (ns) of the first event seen with this name (and status).
    fn stamp(&self, name: &str, status: Option<&str>) -> Option<i64> {
        self.events
            .iter()
            .find(|v| {
                v["event"] == name
                    && status.is_none_or(|s| v.pointer("/data/status").and_then(Value::as_str) == Some(s))
            })
            .map(|v| {
                v["timestamp"]["seconds"].as_i64().unwrap() * 1_000_000_000
                    + v["timestamp"]["microseconds"].as_i64().unwrap() * 1000
            })
    }
}

#[test]
fn follower_turns_stop_and_cont_into_a_pause_window() {
    let qemu_bin = "qemu-system-x86_64";
    if Command::new(qemu_bin).arg("--version").output().is_err() {
        eprintln!("skipping: {qemu_bin} is not installed (./x setup installs Debian's qemu-system-x86)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("migmon-qmp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let follow_sock = dir.join("follow.qmp");
    let drive_sock = dir.join("drive.qmp");
    let child = Command::new(qemu_bin)
        .args(["-M", "none", "-display", "none", "-nodefaults"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", follow_sock.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", drive_sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start QEMU");
    let _qemu = Qemu {
        child,
        dir: Some(dir),
    };
    assert!(
        wait_until(Duration::from_secs(20), || follow_sock.exists()
            && drive_sock.exists()),
        "QEMU did not create its QMP sockets"
    );

    let (tx, rx) = mpsc::channel();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The first connect is made before the driver acts, so its stop is seen.
    let follower = rt.block_on(qmp::Follower::start(follow_sock.clone(), tx));
    let handle = rt.spawn(follower.run());
    let mut driver = Driver::connect(&drive_sock);

    let before = monotonic_ns();
    driver.cmd("stop");
    driver.cmd("cont");
    let after = monotonic_ns();

    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(ev) = rx.recv_timeout(Duration::from_millis(100)) {
            got.push(ev);
        }
        let n = got
            .iter()
            .filter(|e| matches!(e, Event::Migration { ev, .. } if matches!(ev.phase, Phase::Pause | Phase::Resume)))
            .count();
        if n >= 2 {
            break;
        }
    }
    handle.abort();
    drop(rt);

    assert!(
        matches!(&got[0], Event::ClockOffset { source, .. } if source.starts_with("qmp:")),
        "the offset is recorded first: {got:?}"
    );
    let phases: Vec<(&Phase, u64, &str, &str)> = got
        .iter()
        .filter_map(|e| match e {
            Event::Migration { ev, source } => {
                Some((&ev.phase, ev.ts_ns, ev.migration_id.as_str(), source.as_str()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(phases.len(), 2, "{got:?}");
    let (pause, resume) = (&phases[0], &phases[1]);
    assert_eq!(*pause.0, Phase::Pause);
    assert_eq!(*resume.0, Phase::Resume);
    assert_eq!(pause.2, resume.2, "one window");
    assert_eq!(pause.3, "qmp");
    // QMP stamps in µs of wall time; after conversion the window sits inside our monotonic bracket (with 1 ms of
    // slack for the µs rounding and the offset measurement).
    let slack = 1_000_000;
    assert!(
        pause.1 + slack >= before && pause.1 <= resume.1 && resume.1 <= after + slack,
        "{before} {phases:?} {after}"
    );

    // The correlation makes it a migration with a vCPU pause measured by QMP.
    let a = migmon_analysis::correlate::correlate(&got);
    assert_eq!(a.migrations.len(), 1);
    assert_eq!(
        a.migrations[0].downtime.vcpu_pause.as_ref().unwrap().source,
        "qmp"
    );
}

const MAC: &str = "52:54:00:71:6d:70";

/// Builds the release guest image as the migrator's build script does and returns the ELF's path.
fn guest_elf() -> PathBuf {
    testbed::guest::build().unwrap_or_else(|e| panic!("{e}"))
}

/// Why these tests cannot run here, if they cannot.
fn skip_reason() -> Option<String> {
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        return Some(
            "qemu-system-x86_64 is not installed (./x setup installs Debian's qemu-system-x86)".into(),
        );
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Some("/dev/kvm cannot be opened (run as root on a host with KVM)".into());
    }
    None
}

/// A directory for one test's sockets and serial logs, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(test: &str) -> Self {
        let d = std::env::temp_dir().join(format!("migmon-qmpq-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Self(d)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One QEMU running our guest (microvm, PVH, KVM) with two QMP sockets: `NAME.qmp` for migmon, `NAME.drive` for the
/// test. With `incoming`, it waits for a migration on that unix socket.
struct Vm {
    qemu: Qemu,
    driver: Driver,
}

fn boot(dir: &Path, elf: &Path, name: &str, incoming: Option<&Path>) -> Vm {
    let follow = dir.join(format!("{name}.qmp"));
    let drive = dir.join(format!("{name}.drive"));
    let serial = dir.join(format!("{name}.serial"));
    // A QEMU that ran here before left its sockets and log behind.
    for stale in [&follow, &drive, &serial] {
        let _ = std::fs::remove_file(stale);
    }
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-M",
        "microvm,acpi=off",
        "-accel",
        "kvm",
        "-m",
        "64M",
        "-smp",
        "1",
    ])
    .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
    .arg("-serial")
    .arg(format!("file:{}", serial.display()))
    .arg("-kernel")
    .arg(elf)
    // The guest dirties 4 MiB at 16 MiB/s, so a live migration takes more than one round.
    .args(["-append", &format!("ip=10.79.0.2/24 mac={MAC} dirty=4M@16M")])
    .args(["-netdev", "hubport,id=n0,hubid=0", "-device"])
    .arg(format!("virtio-net-device,netdev=n0,mac={MAC}"))
    .arg("-qmp")
    .arg(format!("unix:{},server=on,wait=off", follow.display()))
    .arg("-qmp")
    .arg(format!("unix:{},server=on,wait=off", drive.display()));
    if let Some(sock) = incoming {
        cmd.args(["-incoming", &format!("unix:{}", sock.display())]);
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start QEMU");
    let qemu = Qemu { child, dir: None };
    let is_socket = |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.file_type().is_socket());
    assert!(
        wait_until(Duration::from_secs(20), || is_socket(&drive)),
        "QEMU {name} did not create its QMP sockets"
    );
    let mut driver = Driver::connect(&drive);
    driver.cmd_with(
        "migrate-set-capabilities",
        &serde_json::json!({"capabilities": [{"capability": "events", "state": true}]}),
    );
    if incoming.is_none() {
        assert!(
            wait_until(Duration::from_secs(30), || std::fs::read_to_string(&serial)
                .is_ok_and(|s| s.contains("PVH boot"))),
            "the guest did not boot through PVH under QEMU {name}: {:?}",
            std::fs::read_to_string(&serial)
        );
    }
    Vm { qemu, driver }
}

/// Collects the follower's events until `done` holds (or 30 s pass).
/// Whether the events show a whole move: the source's completion and the destination's resume.
fn moved(g: &[Event]) -> bool {
    has_phase(g, Role::Source, |p| matches!(p, Phase::Complete { .. }))
        && has_phase(g, Role::Destination, |p| *p == Phase::Resume)
}

fn collect(rx: &mpsc::Receiver<Event>, got: &mut Vec<Event>, done: impl Fn(&[Event]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done(got) && Instant::now() < deadline {
        if let Ok(ev) = rx.recv_timeout(Duration::from_millis(100)) {
            got.push(ev);
        }
    }
    assert!(done(got), "the follower did not report it within 30 s: {got:#?}");
}

fn has_phase(got: &[Event], role: Role, pred: impl Fn(&Phase) -> bool) -> bool {
    got.iter()
        .any(|e| matches!(e, Event::Migration { ev, .. } if ev.role == role && pred(&ev.phase)))
}

fn connections(got: &[Event], sock: &Path) -> usize {
    let want = format!("qmp:{}", sock.display());
    got.iter()
        .filter(|e| matches!(e, Event::ClockOffset { source, .. } if *source == want))
        .count()
}

/// Migrates `src` to the unix socket `to`, QEMU's own way; returns when the source says completed.
fn migrate(src: &mut Vm, to: &Path) {
    src.driver.cmd_with(
        "migrate",
        &serde_json::json!({"uri": format!("unix:{}", to.display())}),
    );
    src.driver.wait_event("MIGRATION", Some("completed"));
}

/// The one migration in `got`: its mode, and its pause measured by migmon against QEMU's STOP → RESUME stamps.
fn check_one_migration(got: &[Event], mode: &str, qemu_pause_ns: i64, what: &str) {
    let a = migmon_analysis::correlate::correlate(got);
    assert_eq!(
        a.migrations.len(),
        1,
        "{what}: exactly one migration: {:#?}",
        a.migrations
    );
    let m = &a.migrations[0];
    assert_eq!(m.mode.as_deref(), Some(mode), "{what}");
    assert!(!m.timeline.rounds.is_empty(), "{what}: rounds from query-migrate");
    assert!(m.timeline.complete.is_some(), "{what}: complete");
    let measured = m.downtime.vcpu_pause.as_ref().expect("a vCPU pause").ns as i64;
    // Both stamps are QEMU's (µs); they reach the trace through two connections' offsets, each measured to well under
    // a millisecond.
    let diff = (measured - qemu_pause_ns).abs();
    eprintln!(
        "{what}: mode {mode}, {} rounds, pause measured {:.3} ms, QEMU's STOP→RESUME {:.3} ms, difference {} ns",
        m.timeline.rounds.len(),
        measured as f64 / 1e6,
        qemu_pause_ns as f64 / 1e6,
        diff
    );
    assert!(
        diff <= 1_000_000,
        "{what}: measured {measured} ns, QEMU says {qemu_pause_ns} ns"
    );
}

/// Follows both sockets before either QEMU exists: the sockets appear later and are picked up. The followers run on
/// the returned runtime until it is dropped.
fn follow_both(dir: &Path) -> (PathBuf, PathBuf, mpsc::Receiver<Event>, tokio::runtime::Runtime) {
    let (a, b) = (dir.join("a.qmp"), dir.join("b.qmp"));
    let (tx, rx) = mpsc::channel();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.spawn(qmp::follow(a.clone(), tx.clone()));
    rt.spawn(qmp::follow(b.clone(), tx));
    (a, b, rx, rt)
}

#[test]
fn a_live_migration_to_a_destination_started_later_is_one_migration() {
    if let Some(why) = skip_reason() {
        eprintln!("skipping: {why}");
        return;
    }
    let elf = guest_elf();
    let dir = Dir::new("live");
    let (a, b, rx, handles) = follow_both(&dir.0);
    let mut got = Vec::new();
    let mut src = boot(&dir.0, &elf, "a", None);
    collect(&rx, &mut got, |g| connections(g, &a) == 1);
    let incoming = dir.0.join("in.sock");
    let mut dst = boot(&dir.0, &elf, "b", Some(&incoming));
    collect(&rx, &mut got, |g| connections(g, &b) == 1);
    migrate(&mut src, &incoming);
    let stop = src.driver.wait_event("STOP", None);
    let resume = dst.driver.wait_event("RESUME", None);
    collect(&rx, &mut got, moved);
    // Dropping the runtime stops the followers.
    drop(handles);
    check_one_migration(&got, "live", resume - stop, "live migration");
    drop((src.qemu, dst.qemu));
}

#[test]
fn stop_hold_migrate_cont_is_one_quick_migration() {
    if let Some(why) = skip_reason() {
        eprintln!("skipping: {why}");
        return;
    }
    let elf = guest_elf();
    let dir = Dir::new("quick");
    let (a, b, rx, handles) = follow_both(&dir.0);
    let mut got = Vec::new();
    let mut src = boot(&dir.0, &elf, "a", None);
    collect(&rx, &mut got, |g| connections(g, &a) == 1);
    src.driver.cmd("stop");
    let stop = src.driver.wait_event("STOP", None);
    // The hold: the destination starts only now, while the source stays stopped.
    let incoming = dir.0.join("in.sock");
    let mut dst = boot(&dir.0, &elf, "b", Some(&incoming));
    collect(&rx, &mut got, |g| connections(g, &b) == 1);
    migrate(&mut src, &incoming);
    dst.driver.wait_event("MIGRATION", Some("completed"));
    dst.driver.cmd("cont");
    let resume = dst.driver.wait_event("RESUME", None);
    collect(&rx, &mut got, moved);
    // Dropping the runtime stops the followers.
    drop(handles);
    check_one_migration(&got, "quick", resume - stop, "stop, hold, migrate, cont");
    drop((src.qemu, dst.qemu));
}

#[test]
fn a_qemu_that_restarts_is_followed_again() {
    if let Some(why) = skip_reason() {
        eprintln!("skipping: {why}");
        return;
    }
    let elf = guest_elf();
    let dir = Dir::new("restart");
    let (a, b, rx, handles) = follow_both(&dir.0);
    let mut got = Vec::new();
    // QEMU on a.qmp runs, then dies: its socket goes away.
    let first = boot(&dir.0, &elf, "a", None);
    collect(&rx, &mut got, |g| connections(g, &a) == 1);
    drop(first);
    collect(&rx, &mut got, |g| {
        g.iter()
            .any(|e| matches!(e, Event::Note { message, .. } if message.contains("a.qmp") && message.contains("closed")))
    });
    // It comes back on the same path as the destination of a migration from b.
    let mut src = boot(&dir.0, &elf, "b", None);
    collect(&rx, &mut got, |g| connections(g, &b) == 1);
    let incoming = dir.0.join("in.sock");
    let mut dst = boot(&dir.0, &elf, "a", Some(&incoming));
    collect(&rx, &mut got, |g| connections(g, &a) == 2);
    migrate(&mut src, &incoming);
    let stop = src.driver.wait_event("STOP", None);
    let resume = dst.driver.wait_event("RESUME", None);
    collect(&rx, &mut got, moved);
    // Dropping the runtime stops the followers.
    drop(handles);
    assert!(
        got.iter()
            .any(|e| matches!(e, Event::Note { message, .. } if message.contains("reconnect 1"))),
        "the reconnect is counted: {got:#?}"
    );
    check_one_migration(&got, "live", resume - stop, "restarted QEMU");
    drop((src.qemu, dst.qemu));
}
