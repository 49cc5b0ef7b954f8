//! Raw Ethernet frames the guest sends itself, outside smoltcp.

/// Length of a minimum Ethernet frame without FCS: what the gratuitous ARP is padded to.
pub const MIN_FRAME: usize = 60;
/// Length of an unsolicited neighbor advertisement: Ethernet (14), IPv6 (40), ICMPv6 NA (24), one target
/// link-layer address option (8).
pub const NA_FRAME: usize = 86;

/// A gratuitous ARP request announcing `ip` at `mac`: broadcast, op 1 (request), sender = target = `ip`, target
/// hardware address zero, as Linux sends on `arping -U` / after a migration. Zero-padded to 60 bytes.
pub fn gratuitous_arp(mac: [u8; 6], ip: [u8; 4]) -> [u8; MIN_FRAME] {
    let mut f = [0u8; MIN_FRAME];
    f[0..6].copy_from_slice(&[0xff; 6]); // destination: broadcast
    f[6..12].copy_from_slice(&mac); // source
    f[12..14].copy_from_slice(&0x0806u16.to_be_bytes()); // ethertype ARP
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // htype Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // ptype IPv4
    f[18] = 6; // hlen
    f[19] = 4; // plen
    f[20..22].copy_from_slice(&1u16.to_be_bytes()); // op request
    f[22..28].copy_from_slice(&mac); // sha
    f[28..32].copy_from_slice(&ip); // spa
    // tha stays zero
    f[38..42].copy_from_slice(&ip); // tpa
    f
}

/// An unsolicited neighbor advertisement of `ip` at `mac`, as Linux sends one for each of its IPv6 addresses when
/// its link changes (and after a migration, `ndisc_notify`): to all nodes (`ff02::1`, Ethernet `33:33:00:00:00:01`),
/// from `ip` itself, hop limit 255, flags override (not solicited, not a router), target `ip`, with the target
/// link-layer address option.
pub fn unsolicited_neighbor_advert(mac: [u8; 6], ip: [u8; 16]) -> [u8; NA_FRAME] {
    const ALL_NODES: [u8; 16] = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    const ICMP: usize = 14 + 40;
    let mut f = [0u8; NA_FRAME];
    f[0..6].copy_from_slice(&[0x33, 0x33, 0, 0, 0, 1]); // destination: all-nodes multicast
    f[6..12].copy_from_slice(&mac); // source
    f[12..14].copy_from_slice(&0x86ddu16.to_be_bytes()); // ethertype IPv6
    f[14] = 0x60; // version 6, traffic class and flow label 0
    f[18..20].copy_from_slice(&32u16.to_be_bytes()); // payload length
    f[20] = 58; // next header: ICMPv6
    f[21] = 255; // hop limit (Neighbor Discovery)
    f[22..38].copy_from_slice(&ip); // source
    f[38..54].copy_from_slice(&ALL_NODES); // destination
    f[ICMP] = 136; // type: neighbor advertisement
    // code 0, checksum below
    f[ICMP + 4] = 0x20; // flags: override
    f[ICMP + 8..ICMP + 24].copy_from_slice(&ip); // target
    f[ICMP + 24] = 2; // option: target link-layer address
    f[ICMP + 25] = 1; // length: 8 bytes
    f[ICMP + 26..ICMP + 32].copy_from_slice(&mac);
    let sum = icmpv6_checksum(&ip, &ALL_NODES, &f[ICMP..]);
    f[ICMP + 2..ICMP + 4].copy_from_slice(&sum.to_be_bytes());
    f
}

/// The ICMPv6 checksum of `message` (checksum field zero) from `src` to `dst` (RFC 4443, with the RFC 8200
/// pseudo-header).
fn icmpv6_checksum(src: &[u8; 16], dst: &[u8; 16], message: &[u8]) -> u16 {
    fn add(sum: u32, bytes: &[u8]) -> u32 {
        let (pairs, rest) = bytes.as_chunks::<2>();
        let mut sum = pairs
            .iter()
            .fold(sum, |s, p| s + u32::from(u16::from_be_bytes(*p)));
        if let [last] = rest {
            sum += u32::from(*last) << 8;
        }
        sum
    }
    let len = message.len() as u32;
    let mut sum = add(add(0, src), dst);
    sum += (len >> 16) + (len & 0xffff) + 58;
    sum = add(sum, message);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use smoltcp::wire::{
        ArpOperation, ArpPacket, EthernetAddress, EthernetFrame, EthernetProtocol, Icmpv6Packet, Icmpv6Repr,
        IpProtocol, Ipv6Address, Ipv6Packet, NdiscNeighborFlags, NdiscRepr, RawHardwareAddress,
    };

    use super::*;

    #[test]
    fn garp_parses_as_arp_with_spa_equal_tpa() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let ip = [10, 0, 0, 2];
        let f = gratuitous_arp(mac, ip);
        let eth = EthernetFrame::new_checked(&f[..]).unwrap();
        assert_eq!(eth.dst_addr(), EthernetAddress::BROADCAST);
        assert_eq!(eth.src_addr(), EthernetAddress(mac));
        assert_eq!(eth.ethertype(), EthernetProtocol::Arp);
        let arp = ArpPacket::new_checked(eth.payload()).unwrap();
        assert_eq!(arp.operation(), ArpOperation::Request);
        assert_eq!(arp.source_hardware_addr(), &mac);
        assert_eq!(arp.source_protocol_addr(), &ip);
        assert_eq!(arp.source_protocol_addr(), arp.target_protocol_addr());
    }

    #[test]
    fn neighbor_advert_parses_as_unsolicited_override_na_with_a_valid_checksum() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let ip: Ipv6Address = "fd00:77::10".parse().unwrap();
        let f = unsolicited_neighbor_advert(mac, ip.octets());
        let eth = EthernetFrame::new_checked(&f[..]).unwrap();
        assert_eq!(eth.dst_addr(), EthernetAddress([0x33, 0x33, 0, 0, 0, 1]));
        assert_eq!(eth.src_addr(), EthernetAddress(mac));
        assert_eq!(eth.ethertype(), EthernetProtocol::Ipv6);
        let ip6 = Ipv6Packet::new_checked(eth.payload()).unwrap();
        assert_eq!(ip6.next_header(), IpProtocol::Icmpv6);
        assert_eq!(ip6.hop_limit(), 255);
        assert_eq!(ip6.src_addr(), ip);
        assert_eq!(ip6.dst_addr(), Ipv6Address::new(0xff02, 0, 0, 0, 0, 0, 0, 1));
        let icmp = Icmpv6Packet::new_checked(ip6.payload()).unwrap();
        assert!(icmp.verify_checksum(&ip6.src_addr(), &ip6.dst_addr()), "checksum");
        let repr = Icmpv6Repr::parse(
            &ip6.src_addr(),
            &ip6.dst_addr(),
            &icmp,
            &smoltcp::phy::ChecksumCapabilities::default(),
        )
        .unwrap();
        let Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
            flags,
            target_addr,
            lladdr,
        }) = repr
        else {
            panic!("not a neighbor advertisement: {repr:?}");
        };
        assert_eq!(flags, NdiscNeighborFlags::OVERRIDE);
        assert_eq!(target_addr, ip);
        assert_eq!(lladdr, Some(RawHardwareAddress::from_bytes(&mac)));
    }
}
