//! `migmon watch --libvirt URI` against Debian's real libvirt daemon managing QEMU (TCG) guests: suspend/resume,
//! `virsh save` + `virsh restore` across a daemon restart, and a live migration between two daemons on this
//! machine.
//!
//! Each daemon is a "host": its own network namespace, and a private mount namespace in which its run, state, log
//! and configuration directories are bind-mounted from a test directory (so its unix socket is reachable from the
//! root namespace, where migmon runs, at `DIR/run/libvirt-sock`). It has its own host UUID. Its QEMU guests boot
//! our guest ELF through the PVH entry under `-M microvm` with a virtio-mmio NIC: libvirt accepts that machine
//! with a direct kernel once the USB controller and memory balloon (which need PCI) are turned off, and the guest
//! is ready in well under a second, where a stock Linux kernel under TCG takes several.
//!
//! Every pause and resume migmon reports is checked against the test's own clock around the `virsh` command that
//! caused it (both are `CLOCK_MONOTONIC`).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use integration_tests::{Link, Netns, TestDir, Watch, dump, guest_elf, ip, of_kind, unique, wait_until};
use migmon_analysis::{
    correlate::{MigrationReport, correlate},
    trace::read_trace,
};
use serde_json::Value;

fn now_ns() -> u64 {
    migevents::monotonic_ns()
}

/// libvirt's cache of QEMU's capabilities, shared by the tests' daemons and kept between runs under the build's
/// target directory: probing QEMU takes a daemon several seconds, reading the cache none.
fn caps_cache() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/libvirt-test-cache");
    fs::create_dir_all(&dir).expect("create the capabilities cache");
    dir
}

/// Why the test cannot run here, if it cannot.
fn missing_tools() -> Option<String> {
    for tool in ["libvirtd", "virtlogd", "virsh", "qemu-system-x86_64", "unshare"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!("{tool} is missing (./x setup installs libvirt and QEMU)"));
        }
    }
    None
}

/// A libvirt daemon (with its virtlogd) in its own network and mount namespaces; on drop its domains are destroyed,
/// the daemons and any QEMU left are killed, and the directory and namespace removed (also when the test fails).
struct Daemon {
    dir: PathBuf,
    uri: String,
    // Dropped after `Drop::drop` has stopped the processes in it.
    ns: Netns,
}

impl Daemon {
    /// Starts a daemon in a new namespace; `cache` is shared between the test's daemons (QEMU's capabilities are
    /// probed once).
    fn start(tag: &str, root: &Path, cache: &Path) -> Self {
        let ns = Netns::new(&format!("lv{tag}"));
        let dir = root.join(&ns.name);
        for sub in ["run", "lib", "log", "etc"] {
            fs::create_dir_all(dir.join(sub)).expect("create the daemon's directories");
        }
        let copied = Command::new("cp")
            .arg("-a")
            .arg("/etc/libvirt/.")
            .arg(dir.join("etc"))
            .status()
            .is_ok_and(|s| s.success());
        assert!(copied, "cannot copy /etc/libvirt");
        let conf = |name: &str, extra: &str| {
            let path = dir.join("etc").join(name);
            let mut text = fs::read_to_string(&path).unwrap_or_default();
            text.push_str(extra);
            fs::write(&path, text).expect("write the daemon's configuration");
        };
        let host_uuid = fs::read_to_string("/proc/sys/kernel/random/uuid").expect("a random UUID");
        conf(
            "libvirtd.conf",
            &format!(
                "\nauth_unix_rw = \"none\"\nhost_uuid = \"{}\"\n",
                host_uuid.trim()
            ),
        );
        conf(
            "qemu.conf",
            "\nuser = \"root\"\ngroup = \"root\"\ndynamic_ownership = 0\nremember_owner = 0\nsecurity_driver = \"none\"\n",
        );
        let d = Self {
            uri: format!("qemu+unix:///system?socket={}/run/libvirt-sock", dir.display()),
            dir,
            ns,
        };
        d.launch(cache);
        d
    }

    /// Starts virtlogd and libvirtd in a private mount namespace inside the daemon's network namespace, and waits
    /// until libvirtd answers.
    fn launch(&self, cache: &Path) {
        let d = self.dir.display();
        let script = format!(
            "set -e; mkdir -p /run/libvirt; \
             mount --bind {d}/run /run/libvirt; mount --bind {d}/lib /var/lib/libvirt; \
             mount --bind {d}/log /var/log/libvirt; mount --bind {c} /var/cache/libvirt; \
             mount --bind {d}/etc /etc/libvirt; \
             [ -e /run/libvirt/virtlogd.pid ] && kill -0 $(cat /run/libvirt/virtlogd.pid) 2>/dev/null || \
                virtlogd -d -p /run/libvirt/virtlogd.pid; \
             libvirtd -d -p /run/libvirt/libvirtd.pid",
            c = cache.display()
        );
        let out = self
            .ns
            .command("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &script])
            .output()
            .expect("run unshare");
        assert!(
            out.status.success(),
            "cannot start libvirtd in {}: {}",
            self.ns.name,
            String::from_utf8_lossy(&out.stderr)
        );
        let up = wait_until(Duration::from_secs(30), || self.try_virsh(&["version"]).is_ok());
        assert!(
            up,
            "libvirtd in {} does not answer: {:?}",
            self.ns.name,
            self.try_virsh(&["version"])
        );
    }

    fn try_virsh(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("virsh")
            .args(["-q", "-c", &self.uri])
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn virsh(&self, args: &[&str]) -> String {
        self.try_virsh(args)
            .unwrap_or_else(|e| panic!("virsh {} on {}: {e}", args.join(" "), self.ns.name))
    }

    fn pid(&self, file: &str) -> Option<i32> {
        fs::read_to_string(self.dir.join("run").join(file))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// Kills libvirtd (its domains keep running) and waits until it is gone.
    fn kill_libvirtd(&self) {
        if let Some(pid) = self.pid("libvirtd.pid") {
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let gone = wait_until(Duration::from_secs(10), || {
                nix::sys::signal::kill(pid, None).is_err()
            });
            assert!(gone, "libvirtd in {} did not die", self.ns.name);
            let _ = fs::remove_file(self.dir.join("run/libvirtd.pid"));
        }
    }

    /// The tap a running domain has on this daemon.
    fn tap(&self, domain: &str) -> String {
        self.virsh(&["domiflist", domain])
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(list) = self.try_virsh(&["list", "--name"]) {
            for dom in list.lines().filter(|l| !l.trim().is_empty()) {
                let _ = self.try_virsh(&["destroy", dom.trim()]);
            }
        }
        let mut pids: Vec<i32> = ["libvirtd.pid", "virtlogd.pid"]
            .iter()
            .filter_map(|f| self.pid(f))
            .collect();
        if let Ok(dir) = fs::read_dir(self.dir.join("run/qemu")) {
            for e in dir.flatten() {
                if e.path().extension().is_some_and(|x| x == "pid")
                    && let Ok(s) = fs::read_to_string(e.path())
                    && let Ok(p) = s.trim().parse()
                {
                    pids.push(p);
                }
            }
        }
        for pid in pids {
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            wait_until(Duration::from_secs(5), || {
                nix::sys::signal::kill(pid, None).is_err()
            });
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

const BRIDGE: &str = "br-lv";
const GUEST_IP: &str = "10.80.0.2";

/// A bridge for the guests' taps in `ns`, with the host's address on the guests' LAN.
fn lan(ns: &Netns) -> Link {
    let br = Link::bridge(BRIDGE, Some(&ns.name));
    ip(&["-n", &ns.name, "addr", "add", "10.80.0.1/24", "dev", BRIDGE]);
    ip(&["-n", &ns.name, "link", "set", BRIDGE, "up"]);
    br
}

/// A guest domain: our ELF under microvm, TCG, a virtio-mmio NIC on the bridge, the serial console in a file.
fn domain_xml(name: &str, mac: &str, elf: &Path, serial: &Path) -> String {
    format!(
        "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='microvm'>hvm</type>
    <kernel>{elf}</kernel>
    <cmdline>ip={GUEST_IP}/24</cmdline>
  </os>
  <devices>
    <interface type='bridge'>
      <source bridge='{BRIDGE}'/>
      <mac address='{mac}'/>
      <model type='virtio'/>
      <address type='virtio-mmio'/>
    </interface>
    <serial type='file'><source path='{serial}' append='on'/></serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>",
        elf = elf.display(),
        serial = serial.display()
    )
}

/// A MAC unique to this test process.
fn test_mac(n: u8) -> String {
    let pid = std::process::id();
    format!("52:54:00:{:02x}:{:02x}:{n:02x}", (pid >> 8) as u8, pid as u8)
}

/// Defines and starts a guest on `d` and waits until it serves.
fn boot(d: &Daemon, dir: &Path, name: &str, mac: &str) -> PathBuf {
    let serial = dir.join(format!("{name}.serial"));
    let xml = dir.join(format!("{name}.xml"));
    fs::write(&xml, domain_xml(name, mac, &guest_elf(), &serial)).expect("write the domain XML");
    d.virsh(&["create", &xml.display().to_string()]);
    let ready = wait_until(Duration::from_secs(60), || {
        fs::read_to_string(&serial).is_ok_and(|s| s.contains("guest: ready"))
    });
    assert!(
        ready,
        "the guest did not get ready: {}",
        fs::read_to_string(&serial).unwrap_or_default()
    );
    serial
}

/// The guest answers on its echo port, from inside `ns`.
fn echoes(ns: &Netns) -> bool {
    ns.run(|| {
        use std::io::{Read, Write};
        let addr = format!("{GUEST_IP}:{}", guest_abi::ECHO_PORT)
            .parse()
            .expect("an address");
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let mut got = [0u8; 5];
        s.write_all(b"hello").is_ok() && s.read_exact(&mut got).is_ok() && &got == b"hello"
    })
}

/// Migration events of the watch, by phase.
fn phases<'a>(events: &'a [Value], phase: &str) -> Vec<&'a Value> {
    of_kind(events, "migration")
        .into_iter()
        .filter(|e| e["event"] == phase)
        .collect()
}

fn ts(e: &Value) -> u64 {
    e["ts_ns"].as_u64().unwrap_or(0)
}

/// Asserts `t` falls within the window a command ran in.
fn within(what: &str, t: u64, window: (u64, u64), events: &[Value]) {
    assert!(
        window.0 <= t && t <= window.1,
        "{what} at {t} is outside the command's window {window:?}; events:\n{}",
        dump(events)
    );
}

/// Runs `f`, returning the monotonic window it ran in.
fn timed(f: impl FnOnce()) -> (u64, u64) {
    let start = now_ns();
    f();
    (start, now_ns())
}

/// A note whose message contains `text` (and, with `level`, of that level).
fn has_note(events: &[Value], level: Option<&str>, text: &str) -> bool {
    of_kind(events, "note").iter().any(|n| {
        level.is_none_or(|l| n["level"] == l) && n["message"].as_str().is_some_and(|m| m.contains(text))
    })
}

/// `migmon watch --libvirt` on `uris`, recording into `trace`.
fn watch(uris: &[&str], trace: &Path) -> Watch {
    let mut args: Vec<String> = Vec::new();
    for u in uris {
        args.extend(["--libvirt".to_owned(), (*u).to_owned()]);
    }
    let trace = trace.display().to_string();
    args.extend(["--tcp", "sockets", "--port", "9", "--record", &trace].map(str::to_owned));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Watch::start(&args)
}

/// `virsh suspend`, then `virsh resume` once migmon reported the pause: the command windows.
fn plain_pause(watch: &Watch, host: &Daemon, name: &str) -> ((u64, u64), (u64, u64)) {
    let suspend = timed(|| {
        host.virsh(&["suspend", name]);
    });
    watch.wait_for("the pause", Duration::from_secs(10), |e| {
        phases(e, "pause").len() == 1
    });
    let resume = timed(|| {
        host.virsh(&["resume", name]);
    });
    let events = watch.wait_for("the resume", Duration::from_secs(10), |e| {
        phases(e, "resume").len() == 1
    });
    within(
        "the suspend's pause",
        ts(phases(&events, "pause")[0]),
        suspend,
        &events,
    );
    within("the resume", ts(phases(&events, "resume")[0]), resume, &events);
    (suspend, resume)
}

/// The daemon dies and comes back: a warning and a reconnect, and the watch goes on.
fn daemon_restart(watch: &Watch, host: &Daemon, cache: &Path) {
    host.kill_libvirtd();
    watch.wait_for("the lost connection's warning", Duration::from_secs(20), |e| {
        has_note(e, Some("warning"), "connecting again")
    });
    host.launch(cache);
    watch.wait_for("the reconnect", Duration::from_secs(20), |e| {
        has_note(e, None, "connected again (reconnect 1")
    });
}

/// `virsh save`, then `virsh restore`: the command windows, once migmon reported the restore's resume and attached
/// the restored domain's new tap.
fn save_and_restore(watch: &Watch, host: &Daemon, name: &str, image: &Path) -> ((u64, u64), (u64, u64)) {
    let image = image.display().to_string();
    let save = timed(|| {
        host.virsh(&["save", name, &image]);
    });
    let restore = timed(|| {
        host.virsh(&["restore", &image]);
    });
    let events = watch.wait_for("the restore's resume", Duration::from_secs(20), |e| {
        phases(e, "resume").len() == 2 && !phases(e, "complete").is_empty()
    });
    within("the save's pause", ts(phases(&events, "pause")[1]), save, &events);
    within(
        "the restore's resume",
        ts(phases(&events, "resume")[1]),
        restore,
        &events,
    );
    assert!(echoes(&host.ns), "the restored guest serves");
    let new_tap = host.tap(name);
    watch.wait_for("the restored tap's attach", Duration::from_secs(10), |e| {
        of_kind(e, "port_attached")
            .iter()
            .any(|p| p["iface"] == new_tap.as_str() && p["origin"] == "libvirt")
    });
    (save, restore)
}

/// Sends SIGCONT to a stopped process on drop, so a failed test never leaves a daemon frozen.
struct Frozen(nix::unistd::Pid);

impl Frozen {
    fn freeze(pid: i32) -> Self {
        let pid = nix::unistd::Pid::from_raw(pid);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP libvirtd");
        Self(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

/// A daemon that hangs (stopped, its socket still there): the watch notices by its keepalives, warns, counts the
/// lost connection, keeps trying without blocking, and connects again once the daemon answers; it stops cleanly.
#[test]
fn a_daemon_that_hangs_costs_a_warning_and_a_reconnect() {
    if let Some(why) = missing_tools() {
        eprintln!("skipped: {why}");
        return;
    }
    let started = Instant::now();
    let dir = TestDir::new("mmlvh");
    let cache = caps_cache();
    let host = Daemon::start("h", &dir, &cache);
    let trace = dir.join("run.trace");
    let watch = watch(&[&host.uri], &trace);
    let frozen = Frozen::freeze(host.pid("libvirtd.pid").expect("libvirtd's pid file"));
    let hung = Instant::now();
    watch.wait_for("the hung daemon's warning", Duration::from_secs(30), |e| {
        has_note(
            e,
            Some("warning"),
            "stopped answering keepalives; connecting again",
        )
    });
    let noticed = hung.elapsed();
    let events = watch.wait_for("the lost connection's count", Duration::from_secs(10), |e| {
        of_kind(e, "skipped")
            .iter()
            .any(|s| s["source"] == "libvirt" && s["reason"] == "connection_lost")
    });
    assert!(
        !has_note(&events, None, "connected again"),
        "a stopped daemon cannot have answered: {}",
        dump(&events)
    );
    drop(frozen);
    watch.wait_for("the reconnect", Duration::from_secs(30), |e| {
        has_note(e, None, "connected again (reconnect 1")
    });
    let (_, err) = watch.stop();
    assert!(!err.contains("panicked"), "{err}");
    eprintln!(
        "libvirt hang: noticed after {:.1} s (keepalive 3 × 2 s); test took {:.1} s",
        noticed.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

/// The pause of `m` lies between the two commands' windows.
fn pause_between(m: &MigrationReport, first: (u64, u64), second: (u64, u64)) -> u64 {
    let pause = m.downtime.vcpu_pause.as_ref().expect("a pause").ns;
    assert!(
        pause >= second.0 - first.1 && pause <= second.1 - first.0,
        "pause {pause} ns outside {first:?} .. {second:?}: {m:#?}"
    );
    pause
}

#[test]
fn suspend_resume_then_save_restore_across_a_daemon_restart() {
    if let Some(why) = missing_tools() {
        eprintln!("skipped: {why}");
        return;
    }
    let started = Instant::now();
    let dir = TestDir::new("mmlv");
    let cache = caps_cache();
    let host = Daemon::start("a", &dir, &cache);
    eprintln!("[{:?}] daemon up", started.elapsed());
    let _lan = lan(&host.ns);
    let name = unique("mmlvs");
    boot(&host, &dir, &name, &test_mac(1));
    let tap = host.tap(&name);
    let trace = dir.join("run.trace");
    let watch = watch(&[&host.uri], &trace);
    eprintln!("[{:?}] guest ready, migmon watching", started.elapsed());
    let expected_port = format!("{tap}@{}", host.ns.name);
    assert!(
        watch.stderr().contains(&expected_port),
        "the running domain's tap is watched: {}",
        watch.stderr()
    );

    let (suspend, resume) = plain_pause(&watch, &host, &name);
    daemon_restart(&watch, &host, &cache);
    eprintln!(
        "[{:?}] suspend/resume and the daemon's restart seen",
        started.elapsed()
    );
    let (save, restore) = save_and_restore(&watch, &host, &name, &dir.join("guest.save"));
    let (events, _) = watch.stop();

    let analysis = correlate(&read_trace(&trace).expect("read the trace").events);
    let m = &analysis.migrations;
    assert_eq!(
        m.len(),
        2,
        "a pause and a quick migration: {m:#?}\nevents:\n{}",
        dump(&events)
    );
    assert_eq!(m[0].mode, None, "suspend/resume is a plain pause");
    let plain = pause_between(&m[0], suspend, resume);
    assert_eq!(m[1].mode.as_deref(), Some("quick"), "save + restore: {:#?}", m[1]);
    assert_eq!(m[1].outcome, "completed");
    assert!(
        m[1].timeline.complete.is_some(),
        "libvirt's job figures: {:#?}",
        m[1]
    );
    let saved: u64 = m[1].timeline.rounds.iter().map(|r| r.bytes).sum();
    assert!(saved > 0, "bytes saved: {:#?}", m[1]);
    let quick = pause_between(&m[1], save, restore);
    eprintln!(
        "plain pause {:?}, save+restore pause {:?} ({saved} bytes); test took {:?}",
        Duration::from_nanos(plain),
        Duration::from_nanos(quick),
        started.elapsed()
    );
}

/// Two daemons, each with the guests' bridge, joined by a migration link (A 10.81.9.1, B 10.81.9.2).
struct TwoHosts {
    a: Daemon,
    b: Daemon,
    _links: Vec<Link>,
}

fn two_hosts(dir: &Path, cache: &Path) -> TwoHosts {
    let a = Daemon::start("a", dir, cache);
    let b = Daemon::start("b", dir, cache);
    let (va, vb) = (unique("lvm"), unique("lvm"));
    let links = vec![
        lan(&a.ns),
        lan(&b.ns),
        Link::veth(&va, Some(&a.ns.name), &vb, Some(&b.ns.name)),
    ];
    for (ns, dev, addr) in [(&a.ns, &va, "10.81.9.1/24"), (&b.ns, &vb, "10.81.9.2/24")] {
        ip(&["-n", &ns.name, "addr", "add", addr, "dev", dev]);
        ip(&["-n", &ns.name, "link", "set", dev, "up"]);
    }
    TwoHosts { a, b, _links: links }
}

#[test]
fn live_migration_between_two_daemons() {
    if let Some(why) = missing_tools() {
        eprintln!("skipped: {why}");
        return;
    }
    let started = Instant::now();
    let dir = TestDir::new("mmlv");
    let hosts = two_hosts(&dir, &caps_cache());
    let (a, b) = (&hosts.a, &hosts.b);
    eprintln!("[{:?}] daemons up", started.elapsed());
    let name = unique("mmlvl");
    boot(a, &dir, &name, &test_mac(2));
    let trace = dir.join("run.trace");
    let watch = watch(&[&a.uri, &b.uri], &trace);
    watch.wait_for("both daemons followed", Duration::from_secs(10), |e| {
        of_kind(e, "note")
            .iter()
            .filter(|n| {
                n["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("following host"))
            })
            .count()
            == 2
    });
    eprintln!("[{:?}] guest ready, migmon watching", started.elapsed());
    let migrate = timed(|| {
        a.virsh(&[
            "migrate",
            "--live",
            &name,
            &b.uri,
            "--migrateuri",
            "tcp://10.81.9.2",
        ]);
    });
    let events = watch.wait_for("the migration's end", Duration::from_secs(30), |e| {
        !phases(e, "complete").is_empty() && !phases(e, "resume").is_empty()
    });
    let (pause, resume) = (phases(&events, "pause"), phases(&events, "resume"));
    assert_eq!((pause.len(), resume.len()), (1, 1), "{}", dump(&events));
    within("the switch-over's pause", ts(pause[0]), migrate, &events);
    within("the destination's resume", ts(resume[0]), migrate, &events);
    assert_eq!(resume[0]["role"], "destination");
    eprintln!("[{:?}] migrated", started.elapsed());
    assert!(echoes(&b.ns), "the guest serves on host B");
    // B's new tap was attached when the incoming domain started, so the announces after resume are seen there.
    let tap_b = b.tap(&name);
    let on_b = |e: &&Value| e["iface"] == tap_b.as_str() && e["netns"] == b.ns.name.as_str();
    let events = watch.wait_for("QEMU's RARP on B's tap", Duration::from_secs(10), |e| {
        of_kind(e, "rarp").iter().any(on_b)
    });
    assert!(
        of_kind(&events, "port_attached")
            .iter()
            .any(|p| on_b(p) && p["origin"] == "libvirt"),
        "{}",
        dump(&events)
    );
    let (events, _) = watch.stop();
    check_live(&trace, a, b, &events, started);
}

/// The recorded live migration: one, live, completed, from A to B, its pause short, with rounds and the announce.
fn check_live(trace: &Path, a: &Daemon, b: &Daemon, events: &[Value], started: Instant) {
    let analysis = correlate(&read_trace(trace).expect("read the trace").events);
    let m = &analysis.migrations;
    assert_eq!(m.len(), 1, "one migration: {m:#?}\nevents:\n{}", dump(events));
    let m = &m[0];
    assert_eq!(m.mode.as_deref(), Some("live"));
    assert_eq!(m.outcome, "completed");
    assert_eq!(
        (m.source_host.as_deref(), m.destination_host.as_deref()),
        (Some(a.ns.name.as_str()), Some(b.ns.name.as_str()))
    );
    assert!(
        !m.timeline.rounds.is_empty() && m.timeline.complete.is_some(),
        "{m:#?}"
    );
    let p = m.downtime.vcpu_pause.as_ref().expect("the pause").ns;
    assert!(p > 0 && p < 2_000_000_000, "a live migration's pause: {p} ns");
    assert!(m.timeline.first_rarp.is_some(), "QEMU's announce seen: {m:#?}");
    eprintln!(
        "live migration: pause {:?}, libvirt's downtime {:?}, {} round(s); test took {:?}",
        Duration::from_nanos(p),
        m.downtime
            .vmm_reported_pause
            .as_ref()
            .map(|f| Duration::from_nanos(f.ns)),
        m.timeline.rounds.len(),
        started.elapsed()
    );
}
