//! `migmon watch --tc-ingress`: the ingress parser as a TC classifier sees the same ARP, GARP and RARP frames as
//! the XDP parser, once each, with the frame's first bytes, and counts the frames of a watched MAC.
#![expect(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

use std::time::Duration;

use integration_tests::{Link, Netns, Watch, dump, of_kind, unique, wait_until};
use pnet::{
    datalink::{self, Channel, DataLinkSender},
    util::MacAddr,
};

fn sender(iface: &str) -> Box<dyn DataLinkSender> {
    assert!(
        wait_until(Duration::from_secs(5), || datalink::interfaces()
            .iter()
            .any(|i| i.name == iface)),
        "interface {iface} not visible to pnet"
    );
    let interface = datalink::interfaces()
        .into_iter()
        .find(|i| i.name == iface)
        .unwrap();
    match datalink::channel(&interface, datalink::Config::default()) {
        Ok(Channel::Ethernet(tx, _rx)) => tx,
        Ok(_) => panic!("unexpected channel type"),
        Err(e) => panic!("cannot open a raw channel on {iface}: {e}"),
    }
}

/// A 60-byte Ethernet/IPv4 ARP frame (zero padded), broadcast.
fn arp(ethertype: u16, op: u16, src: MacAddr, spa: [u8; 4], tha: MacAddr, tpa: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&spa);
    f.extend_from_slice(&tha.octets());
    f.extend_from_slice(&tpa);
    f.resize(60, 0);
    f
}

fn mac(last: u8) -> MacAddr {
    let pid = std::process::id();
    MacAddr::new(0x02, 0x74, (pid >> 8) as u8, pid as u8, 0x00, last)
}

fn hex(b: &[u8]) -> String {
    use std::fmt::Write;
    b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

#[test]
fn tc_ingress_parser_reports_arp_garp_rarp_and_counts_a_watched_mac() {
    let ns = Netns::new("ti");
    let (outer, inner) = (unique("tio"), unique("tii"));
    let _link = Link::veth(&outer, None, &inner, Some(&ns.name));
    let watched = mac(1);
    let watch = Watch::start(&[
        "--tc-ingress",
        "--iface",
        &format!("{inner}@{}", ns.name),
        "--vm",
        &watched.to_string(),
        "--port",
        "1",
    ]);
    let mut tx = sender(&outer);
    let zero = MacAddr::zero();
    let request = arp(0x0806, 1, watched, [10, 9, 8, 1], zero, [10, 9, 8, 2]);
    let garp = arp(0x0806, 1, mac(2), [10, 9, 8, 3], zero, [10, 9, 8, 3]);
    let rarp = arp(0x8035, 3, mac(3), [0; 4], mac(3), [0; 4]);
    for f in [&request, &garp, &rarp] {
        tx.send_to(f, None).unwrap().unwrap();
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
        assert_eq!(got[0]["iface"], inner.as_str());
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
