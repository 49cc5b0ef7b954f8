//! Small single-purpose topologies for the privileged tests and the benchmarks, each built from [`crate::net`]'s
//! guards in one call:
//!
//! - [`VethNetns`]: a namespace reached by one veth from the root namespace (frames injected at the root end);
//! - [`BridgeNetns`]: a bridge in its own namespace whose ports are veths from the root namespace;
//! - [`VethPair`]: two namespaces joined by a veth, with an address at each end;
//! - [`VmHost`]: a host namespace with a bridge and taps for VMMs, and a client namespace on a veth into the bridge.
//!
//! Every name is `prefix` + a role + the pid + a counter ([`unique`]), so tests and benchmarks running at the same
//! time never collide; keep prefixes to at most 3 characters so interface names fit in 15. Each namespace is deleted
//! when its guard drops, also when a test panics, and every interface inside it goes with it (deleting one end of a
//! veth deletes both), so the interfaces need no guards of their own.

use std::net::IpAddr;

use crate::net::{Link, NetError, Netns, try_ip_in, unique};

/// A new namespace called `prefix` + `role` + pid + counter.
fn netns(prefix: &str, role: &str) -> Result<Netns, NetError> {
    Netns::create(&unique(&format!("{prefix}{role}")))
}

/// `ip -n NETNS addr add ADDR/LEN dev DEV` (IPv6 without duplicate address detection, usable at once).
pub fn add_address(netns: &str, dev: &str, addr: IpAddr, prefix_len: u8) -> Result<(), NetError> {
    let cidr = format!("{addr}/{prefix_len}");
    let mut args = vec!["addr", "add", cidr.as_str(), "dev", dev];
    if addr.is_ipv6() {
        args.push("nodad");
    }
    try_ip_in(Some(netns), &args).map(drop)
}

/// A namespace reached by one veth from the root namespace: frames sent on [`outer`](Self::outer) arrive on
/// [`inner`](Self::inner), where the probes under test are attached.
#[derive(Debug)]
pub struct VethNetns {
    pub ns: Netns,
    /// The end in the root namespace.
    pub outer: String,
    /// The end in [`ns`](Self::ns).
    pub inner: String,
}

impl VethNetns {
    pub fn create(prefix: &str) -> Result<Self, NetError> {
        let ns = netns(prefix, "n")?;
        let (outer, inner) = (unique(&format!("{prefix}o")), unique(&format!("{prefix}i")));
        Link::try_veth(&outer, None, &inner, Some(&ns.name))?.keep();
        Ok(Self { ns, outer, inner })
    }

    /// `inner@NETNS`, as migmon's `--iface` takes it.
    pub fn inner_at(&self) -> String {
        format!("{}@{}", self.inner, self.ns.name)
    }
}

/// One port of a [`BridgeNetns`]: a veth whose inner end is enslaved to the bridge.
#[derive(Clone, Debug)]
pub struct BridgePort {
    /// The bridge port, in the bridge's namespace.
    pub port: String,
    /// The other end, in the root namespace: frames sent here enter the bridge through [`port`](Self::port).
    pub outer: String,
}

/// A bridge (no STP) in its own namespace, with ports that are veths from the root namespace.
#[derive(Debug)]
pub struct BridgeNetns {
    pub ns: Netns,
    pub bridge: String,
    pub ports: Vec<BridgePort>,
    prefix: String,
}

impl BridgeNetns {
    /// A bridge with `ports` veth ports.
    pub fn create(prefix: &str, ports: usize) -> Result<Self, NetError> {
        let ns = netns(prefix, "n")?;
        let bridge = unique(&format!("{prefix}b"));
        Link::try_bridge(&bridge, Some(&ns.name))?.keep();
        let mut bed = Self {
            ns,
            bridge,
            ports: Vec::with_capacity(ports),
            prefix: prefix.to_owned(),
        };
        for _ in 0..ports {
            bed.add_port()?;
        }
        Ok(bed)
    }

    /// Adds one more veth port and returns it.
    pub fn add_port(&mut self) -> Result<BridgePort, NetError> {
        let port = unique(&format!("{}p", self.prefix));
        let outer = unique(&format!("{}q", self.prefix));
        Link::try_veth(&outer, None, &port, Some(&self.ns.name))?.keep();
        self.enslave(&port)?;
        let p = BridgePort { port, outer };
        self.ports.push(p.clone());
        Ok(p)
    }

    /// Puts an interface of the bridge's namespace (a tap, say) on the bridge.
    pub fn enslave(&self, dev: &str) -> Result<(), NetError> {
        try_ip_in(Some(&self.ns.name), &["link", "set", dev, "master", &self.bridge]).map(drop)
    }

    /// `DEV@NETNS` for an interface of the bridge's namespace, as migmon's `--iface` takes it.
    pub fn at(&self, dev: &str) -> String {
        format!("{dev}@{}", self.ns.name)
    }
}

/// Two namespaces joined by a veth, with an address at each end.
#[derive(Debug)]
pub struct VethPair {
    pub a: Netns,
    pub b: Netns,
    pub if_a: String,
    pub if_b: String,
    pub ip_a: IpAddr,
    pub ip_b: IpAddr,
}

impl VethPair {
    /// Namespaces `prefix`+`a` and `prefix`+`b`, with `ips` on their ends in a `/prefix_len` (IPv6 without
    /// duplicate address detection).
    pub fn create(prefix: &str, ips: [IpAddr; 2], prefix_len: u8) -> Result<Self, NetError> {
        let a = netns(prefix, "a")?;
        let b = netns(prefix, "b")?;
        let (if_a, if_b) = (unique(&format!("{prefix}va")), unique(&format!("{prefix}vb")));
        Link::try_veth(&if_a, Some(&a.name), &if_b, Some(&b.name))?.keep();
        add_address(&a.name, &if_a, ips[0], prefix_len)?;
        add_address(&b.name, &if_b, ips[1], prefix_len)?;
        Ok(Self {
            a,
            b,
            if_a,
            if_b,
            ip_a: ips[0],
            ip_b: ips[1],
        })
    }
}

/// A hypervisor host on one namespace: a bridge with taps for VMMs to open, and a client namespace on a veth into
/// the bridge, with an address on the VMs' LAN.
///
/// ```text
///  client netns                host netns
///  client_if  ──── veth ────── host_if ── bridge ── taps[0], taps[1], ...
/// ```
#[derive(Debug)]
pub struct VmHost {
    pub host: Netns,
    pub client: Netns,
    pub bridge: String,
    pub taps: Vec<String>,
    /// The client's interface, in [`client`](Self::client).
    pub client_if: String,
    /// The client veth's bridge port, in [`host`](Self::host).
    pub host_if: String,
}

impl VmHost {
    /// `taps` taps on the bridge, and the client at `client_ip`/`prefix_len`.
    pub fn create(prefix: &str, taps: usize, client_ip: IpAddr, prefix_len: u8) -> Result<Self, NetError> {
        let host = netns(prefix, "h")?;
        let client = netns(prefix, "c")?;
        let host_ns = Some(host.name.as_str());
        let bridge = unique(&format!("{prefix}br"));
        Link::try_bridge(&bridge, host_ns)?.keep();
        let taps: Vec<String> = (0..taps).map(|i| unique(&format!("{prefix}t{i}"))).collect();
        for tap in &taps {
            Link::try_tap(tap, host_ns, Some(&bridge))?.keep();
        }
        let (client_if, host_if) = (unique(&format!("{prefix}vc")), unique(&format!("{prefix}vh")));
        Link::try_veth(&client_if, Some(&client.name), &host_if, host_ns)?.keep();
        try_ip_in(host_ns, &["link", "set", &host_if, "master", &bridge])?;
        add_address(&client.name, &client_if, client_ip, prefix_len)?;
        Ok(Self {
            host,
            client,
            bridge,
            taps,
            client_if,
            host_if,
        })
    }

    /// `TAP@NETNS` of tap `i`, as migmon's `--iface` takes it.
    pub fn tap_at(&self, i: usize) -> String {
        format!("{}@{}", self.taps[i], self.host.name)
    }
}
