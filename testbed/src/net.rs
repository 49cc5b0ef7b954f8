//! Network namespaces, veths, bridges and taps, as RAII guards, plus the small helpers around `ip`.
//!
//! Two flavours of every operation:
//! - fallible ones ([`try_run`], [`Netns::create`], [`in_netns`]) returning [`NetError`], for the topology and
//!   the tasks (`./x testbed`, `./x demo`), which must clean up and say what went wrong;
//! - panicking shorthands ([`run`], [`ip`], [`Netns::new`], [`Link::veth`]) for the privileged tests, where a
//!   failed set-up step is a failed test.
//!
//! Every guard deletes what it made on drop, also when a test panics. Nothing here adds a route out of a namespace.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use migmon_base::MacAddr;
use nix::sched::{CloneFlags, setns};

/// Errors of the network helpers.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot run {cmd}: is it installed? (`./x setup` installs iproute2)")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{cmd}` failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("no network namespace {name} ({}): list them with `ip netns list`", path.display())]
    OpenNetns {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {name}: this needs root (CAP_SYS_ADMIN)")]
    EnterNetns {
        name: String,
        #[source]
        source: nix::Error,
    },
    #[error("the thread working in network namespace {name} panicked")]
    Panicked { name: String },
}

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

/// Runs a command; returns its stdout, or its stderr in the error when it fails.
pub fn try_run(cmd: &str, args: &[&str]) -> Result<String, NetError> {
    let shown = || format!("{cmd} {}", args.join(" "));
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NetError::Spawn {
            cmd: cmd.to_owned(),
            source,
        })?;
    if !out.status.success() {
        return Err(NetError::Command {
            cmd: shown(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip [-n NETNS] ARGS...`.
pub fn try_ip_in(netns: Option<&str>, args: &[&str]) -> Result<String, NetError> {
    let mut all: Vec<&str> = Vec::new();
    if let Some(ns) = netns {
        all.extend(["-n", ns]);
    }
    all.extend_from_slice(args);
    try_run("ip", &all)
}

/// Runs a command line inside a namespace (`ip netns exec`), e.g. `sysctl` or `nft`.
pub fn try_netns_exec(netns: &str, cmd: &[&str]) -> Result<String, NetError> {
    let mut args = vec!["netns", "exec", netns];
    args.extend_from_slice(cmd);
    try_run("ip", &args)
}

/// Runs a command; panics with its output when it fails.
pub fn run(cmd: &str, args: &[&str]) -> String {
    try_run(cmd, args).unwrap_or_else(|e| panic!("{e}"))
}

/// `ip ARGS...`; panics when it fails.
pub fn ip(args: &[&str]) {
    run("ip", args);
}

/// `ip [-n NETNS] ARGS...`; panics when it fails.
pub fn ip_in(netns: Option<&str>, args: &[&str]) {
    try_ip_in(netns, args).unwrap_or_else(|e| panic!("{e}"));
}

/// Runs a command line inside a namespace; panics when it fails.
pub fn netns_exec(netns: &str, cmd: &[&str]) -> String {
    try_netns_exec(netns, cmd).unwrap_or_else(|e| panic!("{e}"))
}

/// The file of a named namespace: `/run/netns/NAME`.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

/// Whether a named namespace exists.
pub fn netns_exists(name: &str) -> bool {
    netns_path(name).exists()
}

/// Runs `f` on a thread inside namespace `name`: sockets created there stay in it. The calling thread does not
/// change namespace.
pub fn in_netns<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> Result<T, NetError> {
    let path = netns_path(name);
    let file = File::open(&path).map_err(|source| NetError::OpenNetns {
        name: name.to_owned(),
        path,
        source,
    })?;
    std::thread::scope(|s| {
        let handle = s.spawn(|| {
            setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| NetError::EnterNetns {
                name: name.to_owned(),
                source,
            })?;
            Ok(f())
        });
        handle.join().map_err(|_| NetError::Panicked {
            name: name.to_owned(),
        })?
    })
}

/// A network namespace, deleted on drop (with every interface in it).
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// A new namespace with a unique name starting with `prefix`; panics when it cannot be made.
    pub fn new(prefix: &str) -> Self {
        Self::create(&unique(prefix)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A new namespace called `name` with `lo` up.
    pub fn create(name: &str) -> Result<Self, NetError> {
        try_ip_in(None, &["netns", "add", name])?;
        let ns = Self {
            name: name.to_owned(),
        };
        try_ip_in(Some(name), &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs `f` on a thread inside this namespace (sockets created there stay in it); panics when it cannot enter.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.try_run(f).expect("enter the test namespace")
    }

    /// Runs `f` on a thread inside this namespace (sockets created there stay in it).
    pub fn try_run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NetError> {
        in_netns(&self.name, f)
    }

    /// A [`Command`] that runs `program` inside this namespace (`ip netns exec`), for processes that must live
    /// there (a VMM on a tap, a server).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Gives up ownership: the namespace stays after the guard is gone.
    pub fn keep(self) -> String {
        let me = std::mem::ManuallyDrop::new(self);
        me.name.clone()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// An interface, deleted on drop (deleting one end of a veth deletes both).
#[derive(Debug)]
pub struct Link {
    pub name: String,
    pub netns: Option<String>,
}

impl Link {
    /// A veth pair: `a` in `netns_a` (None: root), `b` in `netns_b`; both up. Returns the guard of `a`. Panics
    /// when it cannot be made.
    pub fn veth(a: &str, netns_a: Option<&str>, b: &str, netns_b: Option<&str>) -> Self {
        Self::try_veth(a, netns_a, b, netns_b).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A veth pair, both ends up (fallible).
    pub fn try_veth(
        a: &str,
        netns_a: Option<&str>,
        b: &str,
        netns_b: Option<&str>,
    ) -> Result<Self, NetError> {
        let mut args = vec!["link", "add", a];
        if let Some(ns) = netns_a {
            args.extend(["netns", ns]);
        }
        args.extend(["type", "veth", "peer", "name", b]);
        if let Some(ns) = netns_b {
            args.extend(["netns", ns]);
        }
        try_ip_in(None, &args)?;
        let link = Self {
            name: a.to_owned(),
            netns: netns_a.map(str::to_owned),
        };
        for (name, ns) in [(a, netns_a), (b, netns_b)] {
            try_ip_in(ns, &["link", "set", name, "up"])?;
        }
        Ok(link)
    }

    /// A bridge in `netns`, up, without STP. Panics when it cannot be made.
    pub fn bridge(name: &str, netns: Option<&str>) -> Self {
        Self::try_bridge(name, netns).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A bridge in `netns`, up, without STP (fallible).
    pub fn try_bridge(name: &str, netns: Option<&str>) -> Result<Self, NetError> {
        try_ip_in(netns, &["link", "add", name, "type", "bridge", "stp_state", "0"])?;
        let link = Self {
            name: name.to_owned(),
            netns: netns.map(str::to_owned),
        };
        try_ip_in(netns, &["link", "set", name, "up"])?;
        Ok(link)
    }

    /// A persistent tap device in `netns` (for a VMM to open there), enslaved to `bridge` when given, up.
    pub fn try_tap(name: &str, netns: Option<&str>, bridge: Option<&str>) -> Result<Self, NetError> {
        try_ip_in(netns, &["tuntap", "add", "dev", name, "mode", "tap"])?;
        let link = Self {
            name: name.to_owned(),
            netns: netns.map(str::to_owned),
        };
        if let Some(br) = bridge {
            try_ip_in(netns, &["link", "set", name, "master", br])?;
        }
        try_ip_in(netns, &["link", "set", name, "up"])?;
        Ok(link)
    }

    /// Gives up ownership: the interface stays after the guard is gone.
    pub fn keep(self) {
        std::mem::forget(self);
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

/// The bridge port a MAC is learned on (`bridge fdb show br BRIDGE` in `netns`), if any.
pub fn fdb_port(netns: Option<&str>, bridge: &str, mac: MacAddr) -> Option<String> {
    let mut args: Vec<&str> = Vec::new();
    if let Some(ns) = netns {
        args.extend(["-n", ns]);
    }
    args.extend(["fdb", "show", "br", bridge]);
    let out = try_run("bridge", &args).ok()?;
    out.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        let learned = w.next()?.parse::<MacAddr>().ok()? == mac;
        (learned && w.next() == Some("dev")).then(|| w.next().unwrap_or("").to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_fit_an_interface() {
        let a = unique("tbx");
        let b = unique("tbx");
        assert_ne!(a, b);
        assert!(a.len() <= 15, "{a}");
    }

    #[test]
    fn wait_until_reports_timeout_and_success() {
        assert!(!wait_until(Duration::from_millis(30), || false));
        let mut n = 0;
        assert!(wait_until(Duration::from_secs(1), || {
            n += 1;
            n > 2
        }));
    }

    #[test]
    fn failed_command_carries_stderr() {
        let e = try_run("sh", &["-c", "echo nope >&2; exit 3"]).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }
}
