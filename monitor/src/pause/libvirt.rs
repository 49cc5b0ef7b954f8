//! Pause windows from libvirt (`migmon watch --libvirt URI`, repeatable), through the official `virt` bindings
//! (cargo feature `libvirt`, on by default; it links Debian's libvirt).
//!
//! Most KVM hosts run QEMU under libvirt, which keeps QEMU's monitor for itself. migmon follows each daemon's domain
//! events instead: on one thread it runs libvirt's (blocking) event loop, connects to every URI, and connects again,
//! with a warning, when a daemon dies or restarts (keepalive: 3 probes 2 s apart). For each running domain, and for
//! each domain that starts or arrives by migration or restore, it reads the domain XML: the MAC, the host-side tap
//! (`<target dev>`) and its bridge (`<source bridge>`). It finds the tap in the root network namespace or in one
//! under `/run/netns` (by name and libvirt's tap MAC), so the probes can attach to it.
//!
//! | libvirt event (detail) | phase |
//! |---|---|
//! | `lifecycle` Suspended (Paused, I/O error, ...) | `pause`, on a new window (`virsh suspend`, or the first step of `virsh save`) |
//! | `migration-iteration` 1 while running | `setup` (mode `live`) on a new window |
//! | `migration-iteration` 1 while paused | `setup` (mode `quick`) on the paused window: paused, then moved (a save) |
//! | `migration-iteration` n > 1 | `round` n − 2 (bytes, pages, bandwidth from the job's statistics) |
//! | `lifecycle` Suspended (Migrated, Postcopy) | `pause` (the switch-over) |
//! | `job-completed`, operation save or outgoing migration | the last `round` and `complete` (libvirt's elapsed time, downtime, bytes) |
//! | `lifecycle` Resumed with a window open | `resume` (a plain resume, or the source taking the VM back: `rollback` first) |
//! | `lifecycle` Started (Migrated, Restored), then Resumed | `setup` and `resume` with role `destination` |
//! | `lifecycle` Stopped (destroyed, crashed, ...) with a window open | `failed` |
//!
//! A suspend and a resume is a plain pause (a window without a migration mode). A save and its restore, on this
//! daemon or another one this monitor follows, is one quick migration through storage, paused from the save's stop
//! to the restore's resume. A live migration between two daemons this monitor follows is one migration id (the
//! domain's UUID ties the sides together); with a monitor per host, the correlation joins the halves by MAC.
//!
//! Times: libvirt's events carry none, so a pause or resume is timed by QEMU's own STOP or RESUME, which libvirt
//! passes through with QEMU's wall-clock timestamp (converted with the offset measured at each connection, recorded
//! as a `clock_offset` event), when the daemon is on this machine; otherwise (a remote URI, or a driver without
//! QEMU monitor events) on arrival.

use std::{fmt, net::IpAddr};

use migmon_base::mac::MacAddr;

pub mod domain;
#[cfg(feature = "libvirt")]
mod driver;
#[cfg(feature = "libvirt")]
mod ffi;
pub mod translate;

#[cfg(feature = "libvirt")]
pub use driver::{follow, interfaces};

/// Errors following libvirt.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    #[error(
        "cannot connect to libvirt at {uri}: {message} (is libvirtd running, and may this user use its socket?)"
    )]
    Connect { uri: String, message: String },
    #[error("cannot start libvirt's event loop: {0}")]
    EventLoop(String),
    #[error("libvirt is already followed in this process (give every URI to one `--libvirt` list)")]
    AlreadyFollowing,
    #[error("cannot start the libvirt thread")]
    Spawn(#[source] std::io::Error),
    #[error("this migmon was built without libvirt: rebuild with the `libvirt` feature (needs libvirt-dev)")]
    NotBuilt,
}

/// A domain's network interface on this host: what the probes attach to and which VM it carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmIface {
    pub domain: String,
    pub uuid: String,
    pub mac: Option<MacAddr>,
    /// The host-side device (a tap, or a macvtap).
    pub tap: String,
    /// The named network namespace the tap is in (`None`: this process's own, or not found).
    pub netns: Option<String>,
    pub bridge: Option<String>,
    pub ips: Vec<IpAddr>,
}

impl VmIface {
    /// `IF` or `IF@NETNS`, as `--iface` takes it.
    pub fn iface(&self) -> String {
        match &self.netns {
            Some(ns) => format!("{}@{ns}", self.tap),
            None => self.tap.clone(),
        }
    }

    /// `MAC` or `MAC=IP` entries, as `--vm` takes them.
    pub fn vm_entries(&self) -> Vec<String> {
        let Some(mac) = self.mac else {
            return Vec::new();
        };
        if self.ips.is_empty() {
            vec![mac.to_string()]
        } else {
            self.ips.iter().map(|ip| format!("{mac}={ip}")).collect()
        }
    }
}

impl fmt::Display for VmIface {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "domain {} interface {}", self.domain, self.iface())?;
        if let Some(mac) = self.mac {
            write!(f, " mac {mac}")?;
        }
        if let Some(b) = &self.bridge {
            write!(f, " bridge {b}")?;
        }
        for ip in &self.ips {
            write!(f, " ip {ip}")?;
        }
        Ok(())
    }
}

/// The MAC libvirt gives a guest's tap: the guest's with its first byte set to `0xfe`.
fn tap_mac(guest: MacAddr) -> MacAddr {
    let mut o = guest.octets();
    o[0] = 0xfe;
    MacAddr(o)
}

/// The link-layer addresses of the interfaces in the calling thread's network namespace, by name.
fn links_here() -> Vec<(String, Option<MacAddr>)> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|a| {
            let mac = a
                .address
                .as_ref()
                .and_then(|s| s.as_link_addr())
                .and_then(nix::sys::socket::LinkAddr::addr)
                .map(MacAddr);
            a.address
                .as_ref()
                .and_then(|s| s.as_link_addr())
                .map(|_| (a.interface_name, mac))
        })
        .collect()
}

/// The unix socket of a local libvirt URI: its `socket=` parameter, or the system daemon's default socket.
fn unix_socket(uri: &str) -> Option<std::path::PathBuf> {
    let (scheme, rest) = uri.split_once("://")?;
    let host = rest.split(['/', '?']).next().unwrap_or("");
    let unix_transport = scheme.ends_with("+unix") || !scheme.contains('+');
    if !host.is_empty() || !unix_transport {
        return None;
    }
    if let Some(q) = rest.split_once('?').map(|(_, q)| q)
        && let Some(path) = q.split('&').find_map(|kv| kv.strip_prefix("socket="))
    {
        return Some(path.into());
    }
    let session = rest.contains("/session");
    if session {
        return None;
    }
    ["/run/libvirt/virtqemud-sock", "/run/libvirt/libvirt-sock"]
        .into_iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.exists())
}

/// A network namespace migmon can name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Netns {
    /// This process's own.
    Own,
    /// One under `/run/netns`.
    Named(String),
}

impl Netns {
    pub fn name(&self) -> Option<&str> {
        match self {
            Self::Own => None,
            Self::Named(n) => Some(n),
        }
    }
}

/// The network namespace of the daemon behind a local URI, by the credentials of its socket's listener; `None`
/// when unknown (a remote URI, or a namespace without a name).
pub fn daemon_netns(uri: &str) -> Option<Netns> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    use std::os::unix::fs::MetadataExt;
    let stream = std::os::unix::net::UnixStream::connect(unix_socket(uri)?).ok()?;
    let pid = getsockopt(&stream, PeerCredentials).ok()?.pid();
    let inode = std::fs::metadata(format!("/proc/{pid}/ns/net")).ok()?.ino();
    if Some(inode) == crate::netns::inode_of(None) {
        return Some(Netns::Own);
    }
    crate::netns::names_by_inode().remove(&inode).map(Netns::Named)
}

/// Whether interface `name` exists in namespace `netns` (`None`: this process's own).
pub fn has_link(netns: Option<&str>, name: &str) -> bool {
    let links = if netns.is_none() {
        links_here()
    } else {
        crate::netns::run_in(netns, links_here).unwrap_or_default()
    };
    links.iter().any(|(n, _)| n == name)
}

/// Finds the namespace of tap `name`: this process's own, or one under `/run/netns`. With the guest's MAC, a tap
/// whose MAC is libvirt's (`fe:` and the guest's last five bytes) is preferred over one that only has the name.
pub fn locate_tap(name: &str, guest_mac: Option<MacAddr>) -> Option<String> {
    let want = guest_mac.map(tap_mac);
    let mut by_name: Option<Option<String>> = None;
    let mut candidates: Vec<Option<String>> = vec![None];
    let mut names: Vec<String> = crate::netns::names_by_inode().into_values().collect();
    names.sort();
    candidates.extend(names.into_iter().map(Some));
    for ns in candidates {
        let links = if ns.is_none() {
            links_here()
        } else {
            crate::netns::run_in(ns.as_deref(), links_here).unwrap_or_default()
        };
        for (n, mac) in links {
            if n != name {
                continue;
            }
            if want.is_some() && mac == want {
                return ns;
            }
            by_name.get_or_insert_with(|| ns.clone());
        }
    }
    by_name.flatten()
}

/// Adds the interfaces of the running domains of every URI to `--iface` and `--vm` lists (each once), so the probes
/// attach to them from the start. Returns a warning per daemon that could not be read (the follower waits for it).
pub fn add_running(uris: &[String], ifaces: &mut Vec<String>, vms: &mut Vec<String>) -> Vec<String> {
    let mut warnings = Vec::new();
    for uri in uris {
        match interfaces(uri) {
            Ok(found) => {
                for v in found {
                    let iface = v.iface();
                    if !ifaces.contains(&iface) {
                        ifaces.push(iface);
                    }
                    for e in v.vm_entries() {
                        if !vms.contains(&e) {
                            vms.push(e);
                        }
                    }
                }
            }
            Err(e) => warnings.push(e.to_string()),
        }
    }
    warnings
}

/// Without the `libvirt` feature, `--libvirt` is refused with a clear message.
#[cfg(not(feature = "libvirt"))]
pub fn follow(
    _uris: &[String],
    _emit: impl super::Emit,
    _ifaces: impl Fn(&VmIface) + Send + 'static,
) -> Result<super::SourceHandle, LibvirtError> {
    Err(LibvirtError::NotBuilt)
}

/// Without the `libvirt` feature, `--libvirt` is refused with a clear message.
#[cfg(not(feature = "libvirt"))]
pub fn interfaces(_uri: &str) -> Result<Vec<VmIface>, LibvirtError> {
    Err(LibvirtError::NotBuilt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iface_and_vm_entries() {
        let mut v = VmIface {
            domain: "g1".into(),
            uuid: "u".into(),
            mac: Some("52:54:00:79:00:02".parse().unwrap()),
            tap: "vnet0".into(),
            netns: Some("hosta".into()),
            bridge: Some("br0".into()),
            ips: Vec::new(),
        };
        assert_eq!(v.iface(), "vnet0@hosta");
        assert_eq!(v.vm_entries(), vec!["52:54:00:79:00:02".to_owned()]);
        v.ips.push("10.0.0.2".parse().unwrap());
        assert_eq!(v.vm_entries(), vec!["52:54:00:79:00:02=10.0.0.2".to_owned()]);
        assert_eq!(
            v.to_string(),
            "domain g1 interface vnet0@hosta mac 52:54:00:79:00:02 bridge br0 ip 10.0.0.2"
        );
        assert_eq!(tap_mac(v.mac.unwrap()).to_string(), "fe:54:00:79:00:02");
    }

    #[test]
    fn unix_sockets_of_uris() {
        assert_eq!(
            unix_socket("qemu+unix:///system?socket=/tmp/a/libvirt-sock"),
            Some("/tmp/a/libvirt-sock".into())
        );
        assert_eq!(unix_socket("qemu+tcp://10.0.0.2/system"), None);
        assert_eq!(unix_socket("qemu+ssh://h/system?socket=/x"), None);
        assert_eq!(unix_socket("qemu:///session"), None);
        assert_eq!(daemon_netns("qemu+unix:///system?socket=/nonexistent/sock"), None);
    }

    #[test]
    fn the_loopback_is_found_here_and_a_missing_tap_nowhere() {
        assert!(has_link(None, "lo"));
        assert_eq!(locate_tap("lo", None), None);
        assert_eq!(locate_tap("mm-no-such-tap", None), None);
    }
}
