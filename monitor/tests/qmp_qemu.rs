//! The QMP follower against a real QEMU (Debian's qemu-system-x86, installed by `./x setup`): `stop` and `cont`
//! driven through a second QMP connection must come out of the follower as one pause window, stamped with
//! `CLOCK_MONOTONIC` via the measured offset, which is recorded first.

#![expect(clippy::unwrap_used, reason = "a test: a failed setup step should panic")]

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use migevents::{Phase, monotonic_ns};
use migmon_analysis::trace::Event;
use monitor::pause::qmp;
use testbed::net::wait_until;

/// Kills and reaps QEMU and removes its directory, also when the test fails.
struct Qemu {
    child: Child,
    dir: PathBuf,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A second QMP client that drives QEMU.
struct Driver {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Driver {
    fn connect(path: &Path) -> Self {
        let s = UnixStream::connect(path).expect("connect to the driver QMP socket");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut d = Self {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
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

    /// Sends a command and waits for its reply (skipping events).
    fn cmd(&mut self, name: &str) {
        writeln!(self.writer, "{{\"execute\":\"{name}\"}}").unwrap();
        loop {
            let l = self.line();
            assert!(!l.is_empty(), "QEMU closed the socket");
            if l.contains("\"return\"") {
                return;
            }
            assert!(!l.contains("\"error\""), "{name} failed: {l}");
        }
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
    let _qemu = Qemu { child, dir };
    assert!(
        wait_until(Duration::from_secs(20), || follow_sock.exists()
            && drive_sock.exists()),
        "QEMU did not create its QMP sockets"
    );

    let (tx, rx) = mpsc::channel();
    let handle = qmp::follow(&follow_sock, tx).expect("follow QMP");
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
    handle.stop();

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
