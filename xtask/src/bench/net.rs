//! The benchmarks' two topologies, from `testbed::topology`: a veth pair between two namespaces, and a host with a
//! bridge, two taps and a client. Names are unique per process and call, so parallel runs and the privileged tests
//! never collide; each namespace is deleted by its guard (with every interface inside it), also on failure.
//! Addresses come from 10.251.0.0/16, used only inside these namespaces.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
};

use anyhow::{Context, Result};
pub use testbed::{net::Netns, topology::VethPair};
use testbed::{net::unique, topology::VmHost};

const NEEDS_ROOT: &str = "creating network namespaces needs root: run `sudo ./x bench`";

/// Two namespaces joined by a veth pair, with addresses 10.251.`net`.1/24 (a) and .2/24 (b).
pub fn veth_pair(net: u8) -> Result<VethPair> {
    let ip = |last| IpAddr::V4(Ipv4Addr::new(10, 251, net, last));
    VethPair::create("bv", [ip(1), ip(2)], 24).context(NEEDS_ROOT)
}

/// The migration topology: a host namespace with a bridge and two taps (source and destination VM ports), and a
/// client namespace on a veth into the bridge. Client 10.251.`net`.1, guest 10.251.`net`.2.
pub struct MigrationBed {
    pub host: Netns,
    pub client: Netns,
    pub taps: [String; 2],
    pub guest_ip: Ipv4Addr,
    pub dir: PathBuf,
}

impl MigrationBed {
    pub fn new(net: u8) -> Result<Self> {
        let client_ip = Ipv4Addr::new(10, 251, net, 1);
        let VmHost {
            host, client, taps, ..
        } = VmHost::create("bm", 2, client_ip.into(), 24).context(NEEDS_ROOT)?;
        let taps = [taps[0].clone(), taps[1].clone()];
        let dir = std::env::temp_dir().join(unique("bench"));
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self {
            host,
            client,
            taps,
            guest_ip: Ipv4Addr::new(10, 251, net, 2),
            dir,
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
