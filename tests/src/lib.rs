//! Helpers for the privileged integration tests (run as root by `./x test`, one test at a time).
//!
//! # How the tests drive migmon
//! The tests run the real `migmon` binary, as a user would: `migmon watch --json ...` as a child process whose
//! stdout lines are parsed as events ([`Watch`]). Cargo does not give a test in one package the path of another
//! package's binary, so [`migmon_bin`] looks for it next to the test executable's profile directory
//! (`target/<profile>/migmon`): `./x test` builds the release binaries before it runs the release integration
//! tests, and by hand `cargo build -p monitor && cargo test -p integration-tests` does the same in debug.
//! `MIGMON_BIN` overrides the path.
//!
//! # Namespaces and interfaces
//! Every test creates its own uniquely named namespaces and interfaces ([`unique`]) through RAII guards
//! ([`Netns`], [`Link`]) that delete them on drop, also when the test fails. Nothing is routed out of them.
//! (The shared topology helpers of the `testbed` crate came later; these are the minimum the probe tests need.)

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU32, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::Value;

/// Polls `cond` until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A short name unique to this process and call: `prefix` + pid (hex) + counter. At most 15 characters for
/// prefixes of up to 5.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{:x}{n:x}", std::process::id())
}

/// Runs a command; panics with its output when it fails.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip ARGS...`.
pub fn ip(args: &[&str]) {
    run("ip", args);
}

/// Runs a shell command line inside a namespace (`ip netns exec`), e.g. `sysctl` or `nft`.
pub fn netns_exec(netns: &str, cmd: &[&str]) -> String {
    let mut args = vec!["netns", "exec", netns];
    args.extend_from_slice(cmd);
    run("ip", &args)
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Self {
        let name = unique(prefix);
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Self { name }
    }

    /// Runs `f` on a thread inside this namespace (sockets created there stay in it).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        monitor::netns::run_in(Some(&self.name), f).expect("enter the test namespace")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// An interface, deleted on drop (deleting one end of a veth deletes both).
pub struct Link {
    pub name: String,
    pub netns: Option<String>,
}

impl Link {
    /// A veth pair: `a` in `netns_a` (None: root), `b` in `netns_b`; both up. Returns the guard of `a`.
    pub fn veth(a: &str, netns_a: Option<&str>, b: &str, netns_b: Option<&str>) -> Self {
        let mut args = vec!["link", "add", a];
        if let Some(ns) = netns_a {
            args.extend(["netns", ns]);
        }
        args.extend(["type", "veth", "peer", "name", b]);
        if let Some(ns) = netns_b {
            args.extend(["netns", ns]);
        }
        ip(&args);
        for (name, ns) in [(a, netns_a), (b, netns_b)] {
            ip_in(ns, &["link", "set", name, "up"]);
        }
        Self {
            name: a.to_owned(),
            netns: netns_a.map(str::to_owned),
        }
    }

    /// A bridge in `netns`, up, without STP.
    pub fn bridge(name: &str, netns: Option<&str>) -> Self {
        ip_in(netns, &["link", "add", name, "type", "bridge", "stp_state", "0"]);
        ip_in(netns, &["link", "set", name, "up"]);
        Self {
            name: name.to_owned(),
            netns: netns.map(str::to_owned),
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let mut args: Vec<&str> = Vec::new();
        if let Some(ns) = &self.netns {
            args.extend(["-n", ns]);
        }
        args.extend(["link", "del", &self.name]);
        let _ = Command::new("ip").args(&args).stderr(Stdio::null()).status();
    }
}

/// `ip [-n NETNS] ARGS...`.
pub fn ip_in(netns: Option<&str>, args: &[&str]) {
    let mut all: Vec<&str> = Vec::new();
    if let Some(ns) = netns {
        all.extend(["-n", ns]);
    }
    all.extend_from_slice(args);
    ip(&all);
}

/// The `migmon` binary under test.
pub fn migmon_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MIGMON_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/migmon
    let profile_dir = exe.parent().and_then(|d| d.parent()).expect("target/<profile>");
    let bin = profile_dir.join("migmon");
    assert!(
        bin.exists(),
        "{} does not exist: build it first (`./x test` does; by hand: cargo build -p monitor{})",
        bin.display(),
        if profile_dir.ends_with("release") {
            " --release"
        } else {
            ""
        }
    );
    bin
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
        let mut child = Command::new(migmon_bin())
            .arg("watch")
            .arg("--json")
            .args(args)
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

/// Builds the release guest image exactly as the migrator's build script does
/// (`cargo build -p guest --release --target x86_64-unknown-none`) and returns the ELF's path.
pub fn guest_elf() -> PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&root)
        .args([
            "build",
            "-p",
            "guest",
            "--release",
            "--target",
            "x86_64-unknown-none",
        ])
        .status()
        .expect("cannot run cargo to build the guest");
    assert!(
        status.success(),
        "building the guest failed ({status}); see the output above"
    );
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    target.join("x86_64-unknown-none/release/guest")
}
