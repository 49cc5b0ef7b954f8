//! Namespaces and interfaces for the benchmarks, each removed by its guard (also on failure), and running code
//! inside a namespace from a `setns` thread. Names are `b` + a role letter + pid + counter, so parallel runs and
//! other helpers' tests never collide. Addresses come from 10.251.0.0/16, used only inside these namespaces.

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result, bail};

/// A short unique name: `prefix` + pid (hex) + counter (≤ 15 characters for prefixes of up to 4).
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{:x}{n:x}", std::process::id())
}

/// `ip ARGS`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run `ip`: install iproute2 (./x setup does)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `ip -n NETNS ARGS`.
pub fn ip_in(netns: &str, args: &[&str]) -> Result<()> {
    let mut all = vec!["-n", netns];
    all.extend_from_slice(args);
    ip(&all)
}

/// A network namespace, deleted on drop (which also deletes every interface inside it).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Result<Self> {
        let name = unique(prefix);
        ip(&["netns", "add", &name])
            .context("creating a network namespace needs root: run `sudo ./x bench`")?;
        let ns = Self { name };
        ip_in(&ns.name, &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs `f` on a thread inside this namespace; sockets created there stay in it.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        run_in(&self.name, f)
    }

    /// A `Command` that runs `program` inside this namespace (`ip netns exec`).
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
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

fn open_netns(name: &str) -> Result<File> {
    let path = format!("/run/netns/{name}");
    File::open(&path).with_context(|| format!("cannot open {path}"))
}

fn enter(file: &File, name: &str) -> Result<()> {
    // SAFETY: `file` is an open namespace file; setns only changes this thread's network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("cannot enter netns {name}"));
    }
    Ok(())
}

/// Runs `f` on a scoped thread inside namespace `name`.
pub fn run_in<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let file = open_netns(name)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(&file, name)?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("a thread in netns {name} panicked"))?
    })
}

/// Two namespaces joined by a veth pair, with addresses 10.251.`net`.1/24 (a) and .2/24 (b).
pub struct VethPair {
    pub a: Netns,
    pub b: Netns,
    pub if_a: String,
    pub if_b: String,
    pub ip_a: std::net::Ipv4Addr,
}

impl VethPair {
    pub fn new(net: u8) -> Result<Self> {
        let a = Netns::new("bva")?;
        let b = Netns::new("bvb")?;
        let if_a = unique("bea");
        let if_b = unique("beb");
        ip(&[
            "link", "add", &if_a, "netns", &a.name, "type", "veth", "peer", "name", &if_b, "netns", &b.name,
        ])?;
        let ip_a = std::net::Ipv4Addr::new(10, 251, net, 1);
        let ip_b = std::net::Ipv4Addr::new(10, 251, net, 2);
        for (ns, ifname, addr) in [(&a, &if_a, ip_a), (&b, &if_b, ip_b)] {
            ip_in(&ns.name, &["addr", "add", &format!("{addr}/24"), "dev", ifname])?;
            ip_in(&ns.name, &["link", "set", ifname, "up"])?;
        }
        Ok(Self {
            a,
            b,
            if_a,
            if_b,
            ip_a,
        })
    }
}

/// The migration topology: a host namespace with a bridge and two taps (source and destination VM ports), and a
/// client namespace on a veth into the bridge. Client 10.251.`net`.1, guest 10.251.`net`.2.
pub struct MigrationBed {
    pub host: Netns,
    pub client: Netns,
    pub taps: [String; 2],
    pub guest_ip: std::net::Ipv4Addr,
    pub dir: std::path::PathBuf,
}

impl MigrationBed {
    pub fn new(net: u8) -> Result<Self> {
        let host = Netns::new("bmh")?;
        let client = Netns::new("bmc")?;
        let bridge = unique("bbr");
        ip_in(
            &host.name,
            &["link", "add", &bridge, "type", "bridge", "stp_state", "0"],
        )?;
        ip_in(&host.name, &["link", "set", &bridge, "up"])?;
        let taps = [unique("bta"), unique("btb")];
        for tap in &taps {
            ip_in(&host.name, &["tuntap", "add", "dev", tap, "mode", "tap"])?;
            ip_in(&host.name, &["link", "set", tap, "master", &bridge])?;
            ip_in(&host.name, &["link", "set", tap, "up"])?;
        }
        let client_if = unique("bec");
        let host_if = unique("beh");
        ip(&[
            "link",
            "add",
            &client_if,
            "netns",
            &client.name,
            "type",
            "veth",
            "peer",
            "name",
            &host_if,
            "netns",
            &host.name,
        ])?;
        ip_in(&host.name, &["link", "set", &host_if, "master", &bridge])?;
        ip_in(&host.name, &["link", "set", &host_if, "up"])?;
        let client_ip = std::net::Ipv4Addr::new(10, 251, net, 1);
        let guest_ip = std::net::Ipv4Addr::new(10, 251, net, 2);
        ip_in(
            &client.name,
            &["addr", "add", &format!("{client_ip}/24"), "dev", &client_if],
        )?;
        ip_in(&client.name, &["link", "set", &client_if, "up"])?;
        let dir = std::env::temp_dir().join(unique("bench"));
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self {
            host,
            client,
            taps,
            guest_ip,
            dir,
        })
    }

    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.join(name)
    }
}

impl Drop for MigrationBed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
