//! The benchmarks' two topologies, from `testbed::topology`: a veth pair between two namespaces, and the two-host
//! testbed with its migration link. Names are unique per process and call, so parallel runs and the privileged tests
//! never collide; each namespace is deleted by its guard (with every interface inside it), also on failure.
//! Addresses (10.251.0.0/16 for the pairs, the testbed's 10.77.N.0/24) are used only inside these namespaces.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
};

use anyhow::{Context, Result};
pub use testbed::{net::Netns, topology::VethPair};
use testbed::{
    net::unique,
    topology::{Host, Testbed},
};

const NEEDS_ROOT: &str = "creating network namespaces needs root: run `sudo ./x bench`";

/// Two namespaces joined by a veth pair, with addresses 10.251.`net`.1/24 (a) and .2/24 (b).
pub fn veth_pair(net: u8) -> Result<VethPair> {
    let ip = |last| IpAddr::V4(Ipv4Addr::new(10, 251, net, last));
    VethPair::create("bv", [ip(1), ip(2)], 24).context(NEEDS_ROOT)
}

/// The migration topology, as between real hosts: `testbed::topology`'s two host namespaces, each with a bridge and
/// a tap for the guest, joined by a switch namespace that also holds the client, and a separate veth between the
/// hosts that carries the migration stream (TCP). Every namespace is deleted when the bed is dropped.
pub struct MigrationBed {
    /// Host A and host B (each runs the VMM on its tap).
    pub hosts: [Netns; 2],
    pub client: Netns,
    /// The guest's tap on each host (in that host's namespace).
    pub taps: [String; 2],
    /// Each host's address on the migration link.
    pub mig_ips: [Ipv4Addr; 2],
    pub guest_ip: Ipv4Addr,
    pub prefix_len: u8,
    pub dir: PathBuf,
    _testbed: Testbed,
}

impl MigrationBed {
    /// A fresh two-host testbed; `net` tells concurrent beds of one run apart.
    pub fn new(net: u8) -> Result<Self> {
        let prefix = format!("bm{net}-{}", std::process::id());
        let testbed = Testbed::up(&prefix).context(NEEDS_ROOT)?;
        // Guards on the testbed's own namespaces: deleting one twice is harmless.
        let ns = |name: String| Netns { name };
        let dir = std::env::temp_dir().join(unique("bench"));
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self {
            hosts: [ns(testbed.host_ns(Host::A)), ns(testbed.host_ns(Host::B))],
            client: ns(testbed.client_ns()),
            taps: [Host::A.tap().to_owned(), Host::B.tap().to_owned()],
            mig_ips: [testbed.mig_ip(Host::A), testbed.mig_ip(Host::B)],
            guest_ip: testbed.vm_ip(0),
            prefix_len: testbed.lan_prefix_len(),
            dir,
            _testbed: testbed,
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for MigrationBed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
