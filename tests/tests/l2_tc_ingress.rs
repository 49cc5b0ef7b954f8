//! `migmon watch --tc-ingress`: the ingress parser as a TC classifier sees the same ARP, GARP and RARP frames as
//! the XDP parser, once each, with the frame's first bytes, and counts the frames of a watched MAC.

use std::{net::Ipv4Addr, time::Duration};

use integration_tests::{
    VethNetns, Watch, dump,
    frames::{RawSender, arp_body, hex, padded, test_mac},
    of_kind,
};
use migmon_base::MacAddr;

/// A 60-byte Ethernet/IPv4 ARP frame (zero padded), broadcast.
fn arp(ethertype: u16, op: u16, src: MacAddr, spa: [u8; 4], tha: MacAddr, tpa: [u8; 4]) -> Vec<u8> {
    let body = arp_body(op, src, Ipv4Addr::from(spa), tha, Ipv4Addr::from(tpa));
    padded(MacAddr::BROADCAST, src, ethertype, &body)
}

fn mac(last: u8) -> MacAddr {
    test_mac(0x74, last)
}

#[test]
fn tc_ingress_parser_reports_arp_garp_rarp_and_counts_a_watched_mac() {
    let net = VethNetns::create("ti").unwrap();
    let watched = mac(1);
    let watch = Watch::start(&[
        "--tc-ingress",
        "--iface",
        &net.inner_at(),
        "--vm",
        &watched.to_string(),
        "--port",
        "1",
    ]);
    let mut tx = RawSender::open(&net.outer);
    let zero = MacAddr::ZERO;
    let request = arp(0x0806, 1, watched, [10, 9, 8, 1], zero, [10, 9, 8, 2]);
    let garp = arp(0x0806, 1, mac(2), [10, 9, 8, 3], zero, [10, 9, 8, 3]);
    let rarp = arp(0x8035, 3, mac(3), [0; 4], mac(3), [0; 4]);
    for f in [&request, &garp, &rarp] {
        tx.send(f);
    }
    let evs = watch.wait_for(
        "arp, garp, rarp and the watched MAC",
        Duration::from_secs(10),
        |evs| {
            !of_kind(evs, "arp").is_empty()
                && !of_kind(evs, "garp").is_empty()
                && !of_kind(evs, "rarp").is_empty()
                && !of_kind(evs, "mac_seen").is_empty()
        },
    );
    let (events, _) = watch.stop();
    for (kind, frame, src) in [
        ("arp", &request, watched),
        ("garp", &garp, mac(2)),
        ("rarp", &rarp, mac(3)),
    ] {
        let got = of_kind(&events, kind);
        assert_eq!(got.len(), 1, "one {kind}: {}", dump(&evs));
        assert_eq!(got[0]["mac"], src.to_string(), "{kind} source MAC");
        assert_eq!(got[0]["frame"], hex(frame), "{kind} frame bytes");
        assert_eq!(got[0]["iface"], net.inner.as_str());
    }
    let seen = of_kind(&events, "mac_seen");
    assert!(
        seen.iter()
            .all(|e| e["mac"] == watched.to_string() && e["direction"] == "ingress"),
        "only the watched MAC is counted: {}",
        dump(&events)
    );
    assert!(
        of_kind(&events, "mac_stats")
            .iter()
            .any(|e| e["mac"] == watched.to_string() && e["frames"].as_u64() >= Some(1)),
        "the watched MAC's frames are counted: {}",
        dump(&events)
    );
}
