//! The two-host testbed: a client, two hypervisor hosts and a switch, each in its own network namespace.
//!
//! ```text
//!  PREFIX-client      PREFIX-switch                       PREFIX-a (host A)          PREFIX-b (host B)
//!  eth0 .1 ───────── port-client ┐                        ┌ tap-a (VM here)          ┌ tap-b (or here)
//!                                br-sw                    br-a                       br-b
//!                    port-a ─────┤                        └ up-a ── port-a           └ up-b ── port-b
//!                    port-b ─────┘                          mig .129 ───────────────── mig .130
//! ```
//!
//! - Each host has its own bridge with the VM's tap and an uplink veth to the switch's bridge; the client hangs
//!   off the switch on `port-client`. A VM moving from A to B is re-learned by the switch's bridge
//!   (port-a → port-b) and by both hosts' bridges (tap-a → up-a on A, up-b → tap-b on B), as a real access
//!   switch and two hypervisor vswitches would.
//! - A separate veth `mig` between the two hosts carries the migration stream.
//! - Addresses come from 10.77.0.0/16, used only inside these namespaces: testbed `N` (derived from the prefix)
//!   has the LAN 10.77.N.0/25 (client .1, VMs from .10) and the migration link 10.77.N.128/30 (A .129, B .130).
//!   The LAN also carries IPv6: the unique local `fd00:77:N::/64` (client `::1`, VMs from `::10`).
//!   No namespace has a default route or any link to the root namespace, so nothing can leave.
//! - Every namespace name carries the prefix, so testbeds with different prefixes never collide. Interface names
//!   are fixed (each lives in its testbed's own namespaces) and distinct within a testbed (see [`Host::tap`]).
//!
//! [`Topology::up`] is idempotent; [`Topology::down`] removes everything with the prefix, also after a crash
//! (it first ends the processes still running inside the namespaces, which would otherwise keep them alive).
//!
//! Beside it, smaller topologies for single tests and benchmarks, each built in one call: [`VethNetns`],
//! [`BridgeNetns`], [`VethPair`] and [`VmHost`].

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use crate::net::{Link, NetError, Netns, netns_exists, try_ip_in, try_run, wait_until};

mod small;
pub use small::{BridgeNetns, BridgePort, VethNetns, VethPair, VmHost, add_address};

/// The testbed's documented range (docs/testbed.md).
pub const RANGE: &str = "10.77.0.0/16";
/// The switch's bridge.
pub const SWITCH_BRIDGE: &str = "br-sw";
/// The host-to-host migration link, on both sides.
pub const MIG_LINK: &str = "mig";
/// The client's interface.
pub const CLIENT_IF: &str = "eth0";
/// The switch's ports.
pub const SWITCH_PORTS: [&str; 3] = ["port-a", "port-b", "port-client"];
/// The switch's port for the second client, when there is one ([`Testbed::add_second_client`]).
pub const CLIENT2_PORT: &str = "port-client2";

/// One of the two hypervisor hosts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Host {
    A,
    B,
}

impl Host {
    #[must_use]
    pub fn other(self) -> Self {
        match self {
            Self::A => Self::B,
            Self::B => Self::A,
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            Self::A => "a",
            Self::B => "b",
        }
    }

    /// The VM's tap on this host. Every interface name of the testbed is distinct, although each lives in its own
    /// namespace: the bridge tracepoint names bridges and ports without their namespace, so three bridges all
    /// called `br0` would be one bridge in migmon's FDB lane.
    pub fn tap(self) -> &'static str {
        match self {
            Self::A => "tap-a",
            Self::B => "tap-b",
        }
    }

    /// This host's bridge.
    pub fn bridge(self) -> &'static str {
        match self {
            Self::A => "br-a",
            Self::B => "br-b",
        }
    }

    /// This host's veth to the switch.
    pub fn uplink(self) -> &'static str {
        match self {
            Self::A => "up-a",
            Self::B => "up-b",
        }
    }

    /// The switch port this host's uplink plugs into.
    pub fn switch_port(self) -> &'static str {
        match self {
            Self::A => SWITCH_PORTS[0],
            Self::B => SWITCH_PORTS[1],
        }
    }
}

/// Errors bringing the testbed up or down.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("testbed prefix {prefix:?} is not usable: {why}")]
    Prefix { prefix: String, why: &'static str },
    #[error("cannot build the testbed {prefix}: {step}")]
    Up {
        prefix: String,
        step: String,
        #[source]
        source: NetError,
    },
    #[error("cannot remove the testbed namespace {netns}")]
    Down {
        netns: String,
        #[source]
        source: NetError,
    },
}

/// The names and addresses of one testbed. Plain data: building it touches nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    pub prefix: String,
    /// The third octet of the testbed's addresses.
    pub index: u8,
}

impl Topology {
    /// The testbed called `prefix` (letters, digits and `-`, at most 24 characters).
    pub fn new(prefix: &str) -> Result<Self, TopologyError> {
        let bad = |why| TopologyError::Prefix {
            prefix: prefix.to_owned(),
            why,
        };
        if prefix.is_empty() || prefix.len() > 24 {
            return Err(bad("it must have 1 to 24 characters"));
        }
        if !prefix.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(bad("use only letters, digits and '-'"));
        }
        Ok(Self {
            prefix: prefix.to_owned(),
            index: index_of(prefix),
        })
    }

    pub fn client_ns(&self) -> String {
        format!("{}-client", self.prefix)
    }

    /// The second client's namespace ([`Testbed::add_second_client`]): clients whose namespace-wide TCP settings
    /// (`tcp_retries2`, the route's `rto_min`) differ from the first client's.
    pub fn client2_ns(&self) -> String {
        format!("{}-client2", self.prefix)
    }

    /// The second client's address, `.2` on the LAN.
    pub fn client2_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.index, 2)
    }

    /// The second client's IPv6 address, `fd00:77:N::2`.
    pub fn client2_ip6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x77, u16::from(self.index), 0, 0, 0, 0, 2)
    }

    /// Adds a second client namespace ([`Testbed::client2_ns`], interface [`CLIENT_IF`]) on the switch's port
    /// [`CLIENT2_PORT`]. Idempotent; [`Testbed::down`] removes it with the rest.
    pub fn add_second_client(&self) -> Result<(), TopologyError> {
        let (client, switch) = (self.client2_ns(), self.switch_ns());
        if netns_exists(&client) {
            return Ok(());
        }
        let step = |step: &str| {
            let prefix = self.prefix.clone();
            let step = step.to_owned();
            move |source| TopologyError::Up { prefix, step, source }
        };
        let ns = Netns::create(&client).map_err(step("create the second client's namespace"))?;
        let link = Link::try_veth(CLIENT_IF, Some(&client), CLIENT2_PORT, Some(&switch))
            .map_err(step("second client link"))?;
        try_ip_in(
            Some(&switch),
            &["link", "set", CLIENT2_PORT, "master", SWITCH_BRIDGE],
        )
        .map_err(step("second client port into the switch"))?;
        let cidr = format!("{}/{}", self.client2_ip(), self.lan_prefix_len());
        try_ip_in(Some(&client), &["addr", "add", &cidr, "dev", CLIENT_IF])
            .map_err(step("second client address"))?;
        let cidr6 = format!("{}/64", self.client2_ip6());
        try_ip_in(
            Some(&client),
            &["-6", "addr", "add", &cidr6, "dev", CLIENT_IF, "nodad"],
        )
        .map_err(step("second client IPv6 address"))?;
        let up = |ns: &str, dev: &str| {
            try_ip_in(Some(ns), &["-br", "link", "show", "up"])
                .is_ok_and(|out| out.lines().any(|l| l.split(['@', ' ']).next() == Some(dev)))
        };
        if !wait_until(Duration::from_secs(5), || {
            up(&client, CLIENT_IF) && up(&switch, CLIENT2_PORT)
        }) {
            return Err(step("wait for the second client's link")(NetError::Command {
                cmd: "ip -br link show up".into(),
                stderr: "the second client's link is still down after 5 s".into(),
            }));
        }
        link.keep();
        ns.keep();
        Ok(())
    }

    pub fn switch_ns(&self) -> String {
        format!("{}-switch", self.prefix)
    }

    pub fn host_ns(&self, h: Host) -> String {
        format!("{}-{}", self.prefix, h.suffix())
    }

    /// Every namespace of the testbed.
    pub fn namespaces(&self) -> Vec<String> {
        vec![
            self.client_ns(),
            self.switch_ns(),
            self.host_ns(Host::A),
            self.host_ns(Host::B),
        ]
    }

    pub fn client_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.index, 1)
    }

    /// The client's IPv6 address: the unique local `fd00:77:N::1` (`N` as for the IPv4 LAN).
    pub fn client_ip6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x77, u16::from(self.index), 0, 0, 0, 0, 1)
    }

    /// The IPv6 address of VM number `n`: `fd00:77:N::10` + n, in a /64.
    pub fn vm_ip6(&self, n: u8) -> Ipv6Addr {
        Ipv6Addr::new(
            0xfd00,
            0x77,
            u16::from(self.index),
            0,
            0,
            0,
            0,
            0x10 + u16::from(n),
        )
    }

    /// The address of VM number `n` (0, 1, ...).
    pub fn vm_ip(&self, n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.index, 10 + n)
    }

    /// The LAN prefix length (client and VMs).
    pub fn lan_prefix_len(&self) -> u8 {
        25
    }

    /// The host's address on the migration link.
    pub fn mig_ip(&self, h: Host) -> Ipv4Addr {
        match h {
            Host::A => Ipv4Addr::new(10, 77, self.index, 129),
            Host::B => Ipv4Addr::new(10, 77, self.index, 130),
        }
    }

    /// `--iface`/`--egress` arguments for migmon: `IF@NETNS` of the tap on a host.
    pub fn tap_at(&self, h: Host) -> String {
        format!("{}@{}", h.tap(), self.host_ns(h))
    }

    /// Every bridge port of the testbed as `IF@NETNS`: the taps, the uplinks, the switch ports.
    pub fn ports(&self) -> Vec<String> {
        let mut v = vec![self.tap_at(Host::A), self.tap_at(Host::B)];
        for h in [Host::A, Host::B] {
            v.push(format!("{}@{}", h.uplink(), self.host_ns(h)));
        }
        for p in SWITCH_PORTS {
            v.push(format!("{p}@{}", self.switch_ns()));
        }
        v
    }

    /// Whether every namespace and interface is there and up.
    pub fn is_up(&self) -> bool {
        let links = |ns: &str, want: &[&str]| {
            try_ip_in(Some(ns), &["-br", "link", "show", "up"]).is_ok_and(|out| {
                want.iter()
                    .all(|w| out.lines().any(|l| l.split(['@', ' ']).next() == Some(*w)))
            })
        };
        self.namespaces().iter().all(|n| netns_exists(n))
            && links(&self.client_ns(), &[CLIENT_IF])
            && links(
                &self.switch_ns(),
                &[SWITCH_BRIDGE, SWITCH_PORTS[0], SWITCH_PORTS[1], SWITCH_PORTS[2]],
            )
            && [Host::A, Host::B]
                .iter()
                .all(|h| links(&self.host_ns(*h), &[h.bridge(), h.tap(), h.uplink(), MIG_LINK]))
    }

    /// Brings the testbed up. Does nothing when it is already up; rebuilds it when only part of it is there (after
    /// a crash).
    pub fn up(&self) -> Result<(), TopologyError> {
        if self.is_up() {
            return Ok(());
        }
        if self.namespaces().iter().any(|n| netns_exists(n)) {
            self.down()?;
        }
        self.build().inspect_err(|_| {
            let _ = self.down();
        })
    }

    fn build(&self) -> Result<(), TopologyError> {
        let step = |step: String| {
            let prefix = self.prefix.clone();
            move |source| TopologyError::Up { prefix, step, source }
        };
        // The guards undo a half-built testbed if a step fails; once complete, ownership passes to the namespaces.
        let mut netns = Vec::new();
        for n in self.namespaces() {
            netns.push(Netns::create(&n).map_err(step(format!("create namespace {n}")))?);
        }
        let (client, switch) = (self.client_ns(), self.switch_ns());
        let mut links = vec![
            Link::try_bridge(SWITCH_BRIDGE, Some(&switch)).map_err(step(format!("bridge in {switch}")))?,
        ];
        for h in [Host::A, Host::B] {
            let ns = self.host_ns(h);
            links.push(Link::try_bridge(h.bridge(), Some(&ns)).map_err(step(format!("bridge in {ns}")))?);
            links.push(
                Link::try_tap(h.tap(), Some(&ns), Some(h.bridge())).map_err(step(format!("tap in {ns}")))?,
            );
            let port = h.switch_port();
            links.push(
                Link::try_veth(h.uplink(), Some(&ns), port, Some(&switch))
                    .map_err(step(format!("uplink {ns} to {switch}")))?,
            );
            try_ip_in(Some(&ns), &["link", "set", h.uplink(), "master", h.bridge()])
                .map_err(step(format!("uplink into the bridge of {ns}")))?;
            try_ip_in(Some(&switch), &["link", "set", port, "master", SWITCH_BRIDGE])
                .map_err(step(format!("{port} into the switch")))?;
        }
        links.push(
            Link::try_veth(CLIENT_IF, Some(&client), SWITCH_PORTS[2], Some(&switch))
                .map_err(step("client link".into()))?,
        );
        try_ip_in(
            Some(&switch),
            &["link", "set", SWITCH_PORTS[2], "master", SWITCH_BRIDGE],
        )
        .map_err(step("client port into the switch".into()))?;
        let client_cidr = format!("{}/{}", self.client_ip(), self.lan_prefix_len());
        try_ip_in(Some(&client), &["addr", "add", &client_cidr, "dev", CLIENT_IF])
            .map_err(step("client address".into()))?;
        // IPv6 too, usable at once (no duplicate address detection on a LAN this testbed owns).
        let client_cidr6 = format!("{}/64", self.client_ip6());
        try_ip_in(
            Some(&client),
            &["-6", "addr", "add", &client_cidr6, "dev", CLIENT_IF, "nodad"],
        )
        .map_err(step("client IPv6 address".into()))?;
        let (a, b) = (self.host_ns(Host::A), self.host_ns(Host::B));
        links.push(
            Link::try_veth(MIG_LINK, Some(&a), MIG_LINK, Some(&b)).map_err(step("migration link".into()))?,
        );
        for h in [Host::A, Host::B] {
            let cidr = format!("{}/30", self.mig_ip(h));
            try_ip_in(Some(&self.host_ns(h)), &["addr", "add", &cidr, "dev", MIG_LINK])
                .map_err(step("migration link address".into()))?;
        }
        // Addresses are usable once duplicate address detection is out of the way (IPv4: at once) and the links
        // report carrier; wait for the latter so the first connection does not race the veth coming up.
        let ready = wait_until(Duration::from_secs(5), || self.is_up());
        if !ready {
            return Err(step("wait for the links to come up".into())(NetError::Command {
                cmd: "ip -br link show up".into(),
                stderr: "some testbed link is still down after 5 s".into(),
            }));
        }
        for l in links {
            l.keep();
        }
        for n in netns {
            n.keep();
        }
        Ok(())
    }

    /// Removes every namespace of the testbed (and with them every interface), after ending the processes still
    /// running inside them. Returns the namespaces removed. Safe to call when nothing is there.
    pub fn down(&self) -> Result<Vec<String>, TopologyError> {
        let mut removed = Vec::new();
        for ns in self.namespaces().into_iter().chain([self.client2_ns()]) {
            if !netns_exists(&ns) {
                continue;
            }
            end_processes_in(&ns);
            try_run("ip", &["netns", "del", &ns]).map_err(|source| TopologyError::Down {
                netns: ns.clone(),
                source,
            })?;
            removed.push(ns);
        }
        Ok(removed)
    }

    /// A readable account of the testbed: namespaces, addresses, links, FDBs and processes.
    pub fn status(&self) -> String {
        let mut s = String::new();
        let up = self.is_up();
        let _ = writeln!(
            s,
            "testbed {} ({}): {}",
            self.prefix,
            RANGE,
            if up {
                "up"
            } else if self.namespaces().iter().any(|n| netns_exists(n)) {
                "partly up (run `./x testbed up` to rebuild it, or `down`)"
            } else {
                "down"
            }
        );
        let _ = writeln!(
            s,
            "  client {}/{}, VMs from {}, migration link A {} / B {}",
            self.client_ip(),
            self.lan_prefix_len(),
            self.vm_ip(0),
            self.mig_ip(Host::A),
            self.mig_ip(Host::B)
        );
        for ns in self.namespaces() {
            if !netns_exists(&ns) {
                let _ = writeln!(s, "  {ns}: missing");
                continue;
            }
            let _ = writeln!(s, "  {ns}:");
            if let Ok(out) = try_ip_in(Some(&ns), &["-br", "addr"]) {
                for l in out.lines().filter(|l| !l.starts_with("lo ")) {
                    let _ = writeln!(s, "    {}", l.split_whitespace().collect::<Vec<_>>().join(" "));
                }
            }
            if let Ok(out) = try_run("bridge", &["-n", &ns, "fdb", "show", "dynamic"]) {
                for l in out
                    .lines()
                    .filter(|l| !l.contains("permanent") && l.contains("master"))
                {
                    let _ = writeln!(s, "    fdb {l}");
                }
            }
            let pids = pids_in(&ns);
            if !pids.is_empty() {
                let names: Vec<String> = pids
                    .iter()
                    .map(|p| {
                        let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
                        format!("{p} {}", comm.trim())
                    })
                    .collect();
                let _ = writeln!(s, "    processes: {}", names.join(", "));
            }
        }
        s
    }
}

/// The third octet for a prefix: a stable hash into 1..=250, so a second process computes the same addresses.
fn index_of(prefix: &str) -> u8 {
    // FNV-1a: stable across Rust versions, unlike `DefaultHasher`.
    let h = prefix.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (h % 250) as u8 + 1
}

/// Processes running inside a namespace (`ip netns pids`).
fn pids_in(ns: &str) -> Vec<i32> {
    try_run("ip", &["netns", "pids", ns])
        .map(|out| out.split_whitespace().filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default()
}

/// Ends the processes inside `ns` (the VMMs a crashed run left behind): SIGTERM, then SIGKILL after 3 s.
fn end_processes_in(ns: &str) {
    use nix::{sys::signal, unistd::Pid};
    let pids = pids_in(ns);
    if pids.is_empty() {
        return;
    }
    for p in &pids {
        let _ = signal::kill(Pid::from_raw(*p), signal::Signal::SIGTERM);
    }
    let gone = wait_until(Duration::from_secs(3), || pids_in(ns).is_empty());
    if !gone {
        for p in pids_in(ns) {
            let _ = signal::kill(Pid::from_raw(p), signal::Signal::SIGKILL);
        }
        wait_until(Duration::from_secs(2), || pids_in(ns).is_empty());
    }
}

/// A testbed that is taken down when dropped (tests, the demo).
#[derive(Debug)]
pub struct Testbed {
    pub topo: Topology,
}

impl Testbed {
    /// Brings the testbed `prefix` up (rebuilding any leftover of a crashed run) and owns it.
    pub fn up(prefix: &str) -> Result<Self, TopologyError> {
        let topo = Topology::new(prefix)?;
        topo.down()?;
        topo.up()?;
        Ok(Self { topo })
    }
}

impl std::ops::Deref for Testbed {
    type Target = Topology;

    fn deref(&self) -> &Topology {
        &self.topo
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let _ = self.topo.down();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_addresses_follow_the_prefix() {
        let t = Topology::new("mmdemo").unwrap();
        assert_eq!(t.host_ns(Host::A), "mmdemo-a");
        assert_eq!(t.tap_at(Host::B), "tap-b@mmdemo-b");
        assert_eq!(t.ports().len(), 7);
        let i = t.index;
        assert!((1..=250).contains(&i));
        assert_eq!(t.vm_ip(0), Ipv4Addr::new(10, 77, i, 10));
        assert_eq!(t.mig_ip(Host::B), Ipv4Addr::new(10, 77, i, 130));
        assert_eq!(
            t.vm_ip6(1).segments(),
            [0xfd00, 0x77, u16::from(i), 0, 0, 0, 0, 0x11]
        );
        assert_eq!(Topology::new("mmdemo").unwrap().index, i, "stable");
    }

    #[test]
    fn bad_prefixes_are_refused() {
        assert!(Topology::new("").is_err());
        assert!(Topology::new("a b").is_err());
        assert!(Topology::new(&"x".repeat(25)).is_err());
    }
}
