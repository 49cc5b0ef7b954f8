//! Helpers for the privileged integration tests (run as root by `./x test`, one test at a time).
//!
//! # How the tests drive migmon
//! The tests run the real `migmon` binary, as a user would: `migmon watch --json ...` as a child process whose
//! stdout lines are parsed as events ([`Watch`]). Cargo does not give a test in one package the path of another
//! package's binary, so [`migmon_bin`] and [`migrator_bin`] look for them next to the test executable's profile
//! directory (`target/<profile>/migmon`): `./x test` builds the release binaries before it runs the release
//! integration tests, and by hand `cargo build -p monitor -p migrator && cargo test -p integration-tests` does the
//! same in debug. `MIGMON_BIN` and `MIGRATOR_BIN` override the paths.
//!
//! # Namespaces and interfaces
//! Every test creates its own uniquely named namespaces and interfaces ([`unique`]) through RAII guards
//! ([`Netns`], [`Link`]) that delete them on drop, also when the test fails. Nothing is routed out of them. These
//! guards live in the `testbed` crate (`testbed::net`, re-exported here), next to the two-host topology and the TCP
//! client load generator that the demo and the benchmarks share. The usual shapes (a namespace behind a veth, a
//! bridge with veth ports, two namespaces joined by a veth, a host with taps and a client) are built in one call by
//! `testbed::topology` ([`VethNetns`], [`BridgeNetns`], [`VethPair`], [`VmHost`]).
//!
//! # Fixtures
//! Shared by the test files: [`Watch`] (a running `migmon watch`), [`Migrator`] (a running `migrator`, with
//! [`boot_guest`] for the guest on a testbed host), [`TestDir`] (a temporary directory, kept with
//! `MIGMON_KEEP_TEST_DIR=1`), [`frames`] (crafted L2 frames and a raw sender).

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, PoisonError},
    thread::JoinHandle,
    time::Duration,
};

use serde_json::Value;
pub use testbed::{
    net::*,
    topology::{BridgeNetns, BridgePort, VethNetns, VethPair, VmHost},
};

pub mod frames;

/// A binary of the workspace: the path in the environment variable `env` if set, else `target/<profile>/NAME`
/// next to the test executable. Panics with a remedy when it does not exist.
fn workspace_bin(name: &str, env: &str, package: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/NAME
    let profile_dir = exe.parent().and_then(|d| d.parent()).expect("target/<profile>");
    let bin = profile_dir.join(name);
    assert!(
        bin.exists(),
        "{} does not exist: build it first (`./x test` does; by hand: cargo build -p {package}{})",
        bin.display(),
        if profile_dir.ends_with("release") {
            " --release"
        } else {
            ""
        }
    );
    bin
}

/// The `migmon` binary under test (`MIGMON_BIN` overrides it).
pub fn migmon_bin() -> PathBuf {
    workspace_bin("migmon", "MIGMON_BIN", "monitor")
}

/// The `migrator` binary under test (`MIGRATOR_BIN` overrides it).
pub fn migrator_bin() -> PathBuf {
    workspace_bin("migrator", "MIGRATOR_BIN", "migrator")
}

/// Whether `/dev/kvm` exists; when it does not, prints that `what` is skipped and why.
pub fn kvm_available(what: &str) -> bool {
    if std::fs::metadata("/dev/kvm").is_err() {
        eprintln!("SKIP: /dev/kvm is missing: {what} needs KVM");
        return false;
    }
    true
}

/// The testbed scenario (`./x demo`'s) as the privileged tests run it: 4 Windows-2003 clients, a 256 MiB guest
/// with the dirtier, a 6 s quick pause, 3 s settle, one monitor; namespaces named from `tag`. Adjust the rest with
/// struct update syntax. Panics with the remedy when the migrator is not built.
pub fn scenario_config(tag: &str, out: &Path) -> testbed::scenario::Config {
    let migrator = migrator_bin();
    assert!(
        migrator.exists(),
        "{} does not exist: `./x test` builds it (by hand: cargo build --release -p migrator)",
        migrator.display()
    );
    testbed::scenario::Config {
        prefix: unique(tag),
        clients: 4,
        quick_pause: std::time::Duration::from_secs(6),
        profile: testbed::clients::Profile::Windows2003,
        more_profiles: Vec::new(),
        out: out.to_path_buf(),
        migmon: migmon_bin(),
        migrator,
        mem: "256M".into(),
        dirty: Some("8M@16M".into()),
        settle: std::time::Duration::from_secs(3),
        migmon_args: Vec::new(),
        monitor_per_host: false,
    }
}

/// Runs the testbed scenario, its progress lines prefixed with `what`; panics with the scenario's error.
pub fn run_scenario(cfg: &testbed::scenario::Config, what: &str) -> testbed::scenario::Run {
    let say = |m: &str| eprintln!("{what}: {m}");
    let interrupted = std::sync::atomic::AtomicBool::new(false);
    testbed::scenario::run(
        cfg,
        &testbed::scenario::Ui {
            say: &say,
            interrupted: &interrupted,
        },
    )
    .unwrap_or_else(|e| panic!("{what}: the scenario failed: {e}"))
}

/// A fresh directory under the system temp dir, `prefix` + pid + counter, removed on drop (also when the test fails)
/// unless `MIGMON_KEEP_TEST_DIR` is set, to look at the logs and traces afterwards. Derefs to its [`Path`].
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    /// Creates the directory; panics when it cannot.
    pub fn new(prefix: &str) -> Self {
        let path = std::env::temp_dir().join(unique(prefix));
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        Self { path }
    }
}

impl std::ops::Deref for TestDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.path
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var_os("MIGMON_KEEP_TEST_DIR").is_some() {
            eprintln!("kept {}", self.path.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Runs `migmon ARGS...` to the end: its exit code and its stdout.
pub fn run_migmon(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(migmon_bin())
        .args(args)
        .output()
        .expect("run migmon");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// A `migrator` process, its stdout and stderr in a log file; killed on drop.
pub struct Migrator {
    child: Child,
    log: PathBuf,
}

impl Migrator {
    /// Spawns `cmd` (a migrator command line, in whatever namespace it enters) with its output in `log`.
    pub fn from_command(cmd: &mut Command, log: &Path) -> Self {
        let out = std::fs::File::create(log)
            .unwrap_or_else(|e| panic!("create the migrator log {}: {e}", log.display()));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone the log file"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", cmd.get_program().display()));
        Self {
            child,
            log: log.to_owned(),
        }
    }

    /// `migrator ARGS...` inside network namespace `netns` (through `ip netns exec`).
    pub fn spawn(netns: &str, args: &[&str], log: &Path) -> Self {
        Self::from_command(
            Command::new("ip")
                .args(["netns", "exec", netns])
                .arg(migrator_bin())
                .args(args),
            log,
        )
    }

    /// What it wrote so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills it (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits until it exited; false when it still runs after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        wait_until(timeout, || !self.running())
    }
}

impl Drop for Migrator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `migrator run` of the guest on host A's tap of `bed`, with MAC `mac` and the testbed's first VM address; waits
/// until the guest's echo service answers from the client namespace. `events` is the migrator's `--events` path.
pub fn boot_guest(
    bed: &testbed::topology::Testbed,
    mac: &str,
    api: &str,
    events: Option<&str>,
    log: &Path,
) -> Migrator {
    use testbed::topology::Host;
    let ip = format!("{}/{}", bed.vm_ip(0), bed.lan_prefix_len());
    let mut args = vec![
        "run",
        "--tap",
        Host::A.tap(),
        "--mac",
        mac,
        "--ip",
        &ip,
        "--mem",
        "256M",
        "--api",
        api,
    ];
    if let Some(events) = events {
        args.extend(["--events", events]);
    }
    let run = Migrator::spawn(&bed.host_ns(Host::A), &args, log);
    let echo = std::net::SocketAddrV4::new(bed.vm_ip(0), guest_abi::ECHO_PORT);
    assert!(
        wait_until(Duration::from_secs(30), || in_netns(&bed.client_ns(), || {
            std::net::TcpStream::connect_timeout(&echo.into(), Duration::from_millis(300)).is_ok()
        })
        .unwrap_or(false)),
        "the guest never answered:\n{}",
        run.log()
    );
    run
}

/// A running `migmon watch --json`, its events collected as they come.
pub struct Watch {
    child: Child,
    events: Arc<Mutex<Vec<Value>>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

impl Watch {
    /// Starts `migmon watch --json ARGS...` and waits until the probes are attached.
    pub fn start(args: &[&str]) -> Self {
        let mut cmd = Command::new(migmon_bin());
        cmd.arg("watch").arg("--json").args(args);
        Self::start_command(cmd)
    }

    /// Starts `cmd`, a command that runs `migmon watch --json ...` in the end (through `setpriv`, say), and waits
    /// until the probes are attached.
    pub fn start_command(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start migmon");
        let events = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        let ev = Arc::clone(&events);
        let r1 = std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let v: Value =
                    serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad JSON line {line:?}: {e}"));
                ev.lock().unwrap_or_else(PoisonError::into_inner).push(v);
            }
        });
        let se = Arc::clone(&stderr);
        let r2 = std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut s = se.lock().unwrap_or_else(PoisonError::into_inner);
                s.push_str(&line);
                s.push('\n');
            }
        });
        let mut w = Self {
            child,
            events,
            stderr,
            readers: vec![r1, r2],
        };
        let ready = wait_until(Duration::from_secs(60), || {
            w.stderr
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains("migmon: watching")
                || w.child.try_wait().ok().flatten().is_some()
        });
        let err = w.stderr();
        assert!(
            ready && err.contains("migmon: watching"),
            "migmon did not start: {err}"
        );
        w
    }

    /// The process id of the running migmon.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The events so far.
    pub fn events(&self) -> Vec<Value> {
        self.events.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// What migmon wrote on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Waits until `cond` holds on the events so far; panics with the events when it does not in time.
    pub fn wait_for(&self, what: &str, timeout: Duration, cond: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let ok = wait_until(timeout, || {
            cond(&self.events.lock().unwrap_or_else(PoisonError::into_inner))
        });
        let events = self.events();
        assert!(
            ok,
            "timed out waiting for {what}; events:\n{}\nstderr:\n{}",
            dump(&events),
            self.stderr()
        );
        events
    }

    /// Waits for migmon to exit by itself (e.g. `--until-migrations`); returns the events, stderr and exit code.
    pub fn wait_exit(mut self, timeout: Duration) -> (Vec<Value>, String, Option<i32>) {
        let exited = wait_until(timeout, || self.child.try_wait().ok().flatten().is_some());
        assert!(
            exited,
            "migmon did not exit within {timeout:?}: {}",
            self.stderr()
        );
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let status = self.child.wait().expect("migmon status");
        (self.events(), self.stderr(), status.code())
    }

    /// Stops migmon with SIGINT (as Ctrl-C) and returns every event and its stderr.
    pub fn stop(mut self) -> (Vec<Value>, String) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let exited = wait_until(Duration::from_secs(30), || {
            self.child.try_wait().ok().flatten().is_some()
        });
        assert!(exited, "migmon did not stop on SIGINT");
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let status = self.child.wait().expect("migmon status");
        let err = self.stderr();
        assert!(status.success(), "migmon exited with {status}: {err}");
        (self.events(), err)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Events as lines, for failure messages.
pub fn dump(events: &[Value]) -> String {
    events.iter().map(Value::to_string).collect::<Vec<_>>().join("\n")
}

/// Events of one kind.
pub fn of_kind<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["kind"] == kind).collect()
}

/// Builds the release guest image exactly as the migrator's build script does and returns the ELF's path.
pub fn guest_elf() -> PathBuf {
    testbed::guest::build().unwrap_or_else(|e| panic!("{e}"))
}

/// Counts the RARP frames (reverse requests) from one MAC that reach a namespace: the announces of whichever side
/// runs the guest, as the clients' side of the bridge sees them. Stops and closes its socket on drop.
pub struct RarpCapture {
    count: Arc<std::sync::atomic::AtomicU64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl RarpCapture {
    /// Starts counting in `ns` (an `AF_PACKET` socket opened inside it stays bound to it).
    pub fn start(ns: &Netns, mac: [u8; 6]) -> Self {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let count = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let fd = ns.run(|| {
            // SAFETY: plain socket(2) call; the fd is owned by the thread below, which closes it.
            unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(0x8035u16.to_be())) }
        });
        assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: a valid fd and a timeval that outlives the call.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        let (c, st) = (count.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !st.load(Ordering::SeqCst) {
                // SAFETY: `buf` is writable for its length.
                let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
                // Ethernet source = the MAC, type RARP, opcode 3 (reverse request).
                if n >= 42 && buf[6..12] == mac[..] && buf[12..14] == [0x80, 0x35] && buf[20..22] == [0, 3] {
                    c.fetch_add(1, Ordering::SeqCst);
                }
            }
            // SAFETY: our fd, closed once.
            unsafe { libc::close(fd) };
        });
        Self {
            count,
            stop,
            handle: Some(handle),
        }
    }

    /// RARP frames counted so far.
    pub fn count(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for RarpCapture {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
