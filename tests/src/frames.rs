//! Crafted Ethernet frames for the L2 tests, and a raw sender that puts them on an interface of the root namespace
//! (the outer end of a veth whose inner end the probes watch).

use std::{fmt::Write as _, net::Ipv4Addr, time::Duration};

use migmon_base::MacAddr;
use pnet::datalink::{self, Channel, DataLinkSender};

use crate::wait_until;

/// A raw `AF_PACKET` sender on an interface of the root namespace.
pub struct RawSender {
    tx: Box<dyn DataLinkSender>,
    iface: String,
}

impl RawSender {
    /// Opens a sender on `iface`, waiting up to 5 s for the interface to be visible; panics when it cannot.
    pub fn open(iface: &str) -> Self {
        let visible = wait_until(Duration::from_secs(5), || {
            datalink::interfaces().iter().any(|i| i.name == iface)
        });
        assert!(visible, "interface {iface} not visible to pnet");
        let interface = datalink::interfaces()
            .into_iter()
            .find(|i| i.name == iface)
            .unwrap_or_else(|| panic!("interface {iface} vanished"));
        match datalink::channel(&interface, datalink::Config::default()) {
            Ok(Channel::Ethernet(tx, _rx)) => Self {
                tx,
                iface: iface.to_owned(),
            },
            Ok(_) => panic!("unexpected channel type on {iface}"),
            Err(e) => panic!("cannot open a raw channel on {iface}: {e}"),
        }
    }

    /// Sends one frame; panics when the kernel refuses it.
    pub fn send(&mut self, frame: &[u8]) {
        let iface = &self.iface;
        self.tx
            .send_to(frame, None)
            .unwrap_or_else(|| panic!("cannot queue a frame on {iface}"))
            .unwrap_or_else(|e| panic!("cannot send a frame on {iface}: {e}"));
    }
}

/// An Ethernet frame: dst, src, VLAN tags (TPID, VID) outermost first, ethertype, payload; not padded.
pub fn ethernet(dst: MacAddr, src: MacAddr, tags: &[(u16, u16)], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(18 + 4 * tags.len() + payload.len());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&src.octets());
    for (tpid, vid) in tags {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&vid.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An untagged frame zero-padded to the 60-byte Ethernet minimum (without FCS).
pub fn padded(dst: MacAddr, src: MacAddr, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = ethernet(dst, src, &[], ethertype, payload);
    if f.len() < 60 {
        f.resize(60, 0);
    }
    f
}

/// An Ethernet/IPv4 ARP (or RARP) body: hardware type 1, protocol 0x0800, `op`, sender and target.
pub fn arp_body(op: u16, sha: MacAddr, spa: Ipv4Addr, tha: MacAddr, tpa: Ipv4Addr) -> Vec<u8> {
    let mut b = Vec::with_capacity(28);
    b.extend_from_slice(&[0, 1, 8, 0, 6, 4]);
    b.extend_from_slice(&op.to_be_bytes());
    b.extend_from_slice(&sha.octets());
    b.extend_from_slice(&spa.octets());
    b.extend_from_slice(&tha.octets());
    b.extend_from_slice(&tpa.octets());
    b
}

/// QEMU's self-announce: a broadcast RARP request with sender = target = the VM's MAC and addresses 0.0.0.0,
/// padded to 60 bytes.
pub fn qemu_rarp(vm: MacAddr) -> Vec<u8> {
    let body = arp_body(3, vm, Ipv4Addr::UNSPECIFIED, vm, Ipv4Addr::UNSPECIFIED);
    padded(MacAddr::BROADCAST, vm, 0x8035, &body)
}

/// A locally administered unicast MAC unique to this test process: `02:TAG:pid:pid:00:LAST`.
pub fn test_mac(tag: u8, last: u8) -> MacAddr {
    let pid = std::process::id();
    MacAddr([0x02, tag, (pid >> 8) as u8, pid as u8, 0x00, last])
}

/// Lower-case hex without separators, as migmon's events write frame bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(2 * bytes.len()), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_rarp_layout() {
        let vm = MacAddr([0x52, 0x54, 0, 1, 2, 3]);
        let f = qemu_rarp(vm);
        assert_eq!(f.len(), 60);
        assert_eq!(&f[..6], &[0xff; 6]);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[20..22], &[0, 3], "RARP request");
        assert_eq!(&f[22..28], &vm.octets());
        assert_eq!(&f[32..38], &vm.octets());
        assert_eq!(hex(&f[12..14]), "8035");
    }

    #[test]
    fn tags_go_before_the_ethertype() {
        let f = ethernet(MacAddr::BROADCAST, test_mac(1, 2), &[(0x8100, 5)], 0x0800, &[1]);
        assert_eq!(&f[12..18], &[0x81, 0, 0, 5, 8, 0]);
        assert_eq!(f.len(), 19);
    }
}
