//! Raw Ethernet frames the guest sends itself, outside smoltcp.

/// Length of a minimum Ethernet frame without FCS: what the gratuitous ARP is padded to.
pub const MIN_FRAME: usize = 60;

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

#[cfg(test)]
mod tests {
    use smoltcp::wire::{ArpOperation, ArpPacket, EthernetAddress, EthernetFrame, EthernetProtocol};

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
}
