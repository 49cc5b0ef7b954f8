//! ICMPv6 Neighbor Advertisements as announces: the ingress parser reports the unsolicited ones and the ones with
//! the override flag (untagged, 802.1Q, `QinQ`), passes a solicited NA without override and other ICMPv6 unread,
//! and counts a cut or odd NA as malformed. Through `BPF_PROG_TEST_RUN` (every prefix of a frame), and over a real
//! veth with the parser in XDP and as a TC ingress classifier.
#![expect(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

use std::{net::Ipv6Addr, time::Duration};

use integration_tests::{Link, Netns, Watch, dump, of_kind, unique, wait_until};
use monitor_common::{NA_OVERRIDE, NA_ROUTER, NA_SOLICITED, WireEvent};
use pnet::{
    datalink::{self, Channel, DataLinkSender},
    util::MacAddr,
};
use serde_json::Value;

const XDP_PASS: u32 = 2;
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

fn mac(last: u8) -> MacAddr {
    let pid = std::process::id();
    MacAddr::new(0x02, 0x76, (pid >> 8) as u8, pid as u8, 0x00, last)
}

fn link_local(m: MacAddr) -> Ipv6Addr {
    let o = m.octets();
    Ipv6Addr::new(
        0xfe80,
        0,
        0,
        0,
        u16::from_be_bytes([o[0] ^ 2, o[1]]),
        u16::from_be_bytes([o[2], 0xff]),
        u16::from_be_bytes([0xfe, o[3]]),
        u16::from_be_bytes([o[4], o[5]]),
    )
}

fn ula(host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x76, std::process::id() as u16, 0, 0, 0, 0, host)
}

/// The Ethernet destination of an IPv6 packet: 33:33 + the low 32 bits for multicast, else `unicast`.
fn eth_dst(ip: Ipv6Addr, unicast: MacAddr) -> MacAddr {
    if ip.is_multicast() {
        let o = ip.octets();
        MacAddr::new(0x33, 0x33, o[12], o[13], o[14], o[15])
    } else {
        unicast
    }
}

/// The ICMPv6 checksum over the pseudo-header and `body`.
fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, body: &[u8]) -> u16 {
    let mut data = Vec::with_capacity(40 + body.len());
    data.extend_from_slice(&src.octets());
    data.extend_from_slice(&dst.octets());
    data.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
    data.extend_from_slice(&[0, 0, 0, 58]);
    data.extend_from_slice(body);
    if data.len() % 2 == 1 {
        data.push(0);
    }
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// One crafted ICMPv6 frame.
struct Icmp6 {
    src: MacAddr,
    tags: Vec<(u16, u16)>,
    src_ip: Ipv6Addr,
    dst_ip: Ipv6Addr,
    /// ICMPv6 type: 136 NA, 135 NS.
    icmp_type: u8,
    code: u8,
    hop_limit: u8,
    flags: u8,
    target: Ipv6Addr,
    /// A target (NA) or source (NS) link-layer address option.
    lladdr: Option<MacAddr>,
}

impl Icmp6 {
    /// An unsolicited NA to all nodes, with override and the target link-layer address option, as Linux sends one.
    fn announce(src: MacAddr, target: Ipv6Addr) -> Self {
        Self {
            src,
            tags: Vec::new(),
            src_ip: link_local(src),
            dst_ip: ALL_NODES,
            icmp_type: 136,
            code: 0,
            hop_limit: 255,
            flags: NA_OVERRIDE,
            target,
            lladdr: Some(src),
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut body = vec![self.icmp_type, self.code, 0, 0, self.flags, 0, 0, 0];
        if self.icmp_type != 136 {
            body[4] = 0;
        }
        body.extend_from_slice(&self.target.octets());
        if let Some(m) = self.lladdr {
            body.extend_from_slice(&[if self.icmp_type == 136 { 2 } else { 1 }, 1]);
            body.extend_from_slice(&m.octets());
        }
        let sum = icmpv6_checksum(self.src_ip, self.dst_ip, &body);
        body[2..4].copy_from_slice(&sum.to_be_bytes());
        let mut f = Vec::new();
        f.extend_from_slice(&eth_dst(self.dst_ip, mac(0xee)).octets());
        f.extend_from_slice(&self.src.octets());
        for (tpid, vid) in &self.tags {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&vid.to_be_bytes());
        }
        f.extend_from_slice(&0x86ddu16.to_be_bytes());
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        f.extend_from_slice(&[58, self.hop_limit]);
        f.extend_from_slice(&self.src_ip.octets());
        f.extend_from_slice(&self.dst_ip.octets());
        f.extend_from_slice(&body);
        f
    }
}

/// The frames both tests send, by name, with whether the parser reports them.
struct Frames {
    /// (name, frame, reported)
    all: Vec<(&'static str, Vec<u8>, bool)>,
    /// Frames that are cut or odd: each counts once as malformed.
    malformed: Vec<Vec<u8>>,
}

fn frames() -> Frames {
    let announce = Icmp6::announce(mac(1), ula(0x10));
    let unsolicited_no_override = Icmp6 {
        flags: 0,
        lladdr: None,
        ..Icmp6::announce(mac(2), ula(0x20))
    };
    let solicited_override = Icmp6 {
        dst_ip: ula(0x99),
        flags: NA_SOLICITED | NA_OVERRIDE,
        ..Icmp6::announce(mac(3), ula(0x30))
    };
    let solicited_only = Icmp6 {
        dst_ip: ula(0x99),
        flags: NA_SOLICITED | NA_ROUTER,
        ..Icmp6::announce(mac(4), ula(0x40))
    };
    let dot1q = Icmp6 {
        tags: vec![(0x8100, 100)],
        ..Icmp6::announce(mac(5), ula(0x50))
    };
    let qinq = Icmp6 {
        tags: vec![(0x88a8, 200), (0x8100, 100)],
        ..Icmp6::announce(mac(6), ula(0x60))
    };
    let solicitation = Icmp6 {
        icmp_type: 135,
        dst_ip: "ff02::1:ff00:70".parse().unwrap(),
        ..Icmp6::announce(mac(7), ula(0x70))
    };
    let forwarded = Icmp6 {
        hop_limit: 64,
        ..Icmp6::announce(mac(8), ula(0x80))
    };
    let odd_code = Icmp6 {
        code: 1,
        ..Icmp6::announce(mac(9), ula(0x90))
    };
    // An announce cut inside its option (the IPv6 payload length says 32 bytes, 28 are there).
    let mut cut_option = Icmp6::announce(mac(10), ula(0xa0)).bytes();
    cut_option.truncate(cut_option.len() - 4);
    // Cut in the IPv6 header, behind a tag.
    let mut cut_header = Icmp6 {
        tags: vec![(0x8100, 7)],
        ..Icmp6::announce(mac(11), ula(0xb0))
    }
    .bytes();
    cut_header.truncate(18 + 20);
    Frames {
        all: vec![
            ("unsolicited, override", announce.bytes(), true),
            ("unsolicited", unsolicited_no_override.bytes(), true),
            ("solicited, override", solicited_override.bytes(), true),
            ("solicited without override", solicited_only.bytes(), false),
            ("802.1Q", dot1q.bytes(), true),
            ("QinQ", qinq.bytes(), true),
            ("neighbor solicitation", solicitation.bytes(), false),
        ],
        malformed: vec![forwarded.bytes(), odd_code.bytes(), cut_option, cut_header],
    }
}

/// Every frame through `BPF_PROG_TEST_RUN`: the announces are reported with their fields, the rest is not; every
/// prefix of a `QinQ` announce passes, is not reported, and is counted malformed.
#[test]
fn neighbor_adverts_through_test_run() {
    use monitor::probes::{ProbeOptions, Probes};
    let opts = ProbeOptions {
        tracepoints: false,
        ..ProbeOptions::default()
    };
    let mut probes = Probes::load(&opts).expect("load the probes");
    let f = frames();
    for (name, frame, reported) in &f.all {
        let (ret, _) = probes.xdp_test_run(frame, 1).unwrap();
        assert_eq!(ret, XDP_PASS, "{name}");
        let mut records = Vec::new();
        probes.drain(|r| records.push(r.expect("decodable record")));
        if !reported {
            assert!(
                records.is_empty(),
                "{name}: not an announce, yet reported: {records:?}"
            );
            continue;
        }
        assert_eq!(records.len(), 1, "{name}: one record: {records:?}");
        let WireEvent::NeighborAdvert(na) = records[0] else {
            panic!("{name}: not a neighbor advert: {:?}", records[0]);
        };
        assert_eq!(&na.frame[..frame.len()], &frame[..], "{name}: frame bytes");
        assert_eq!(
            (na.frame_len as usize, na.cap_len as usize),
            (frame.len(), frame.len()),
            "{name}"
        );
        let src = mac_of(frame);
        assert_eq!(na.src_mac, src.octets(), "{name}");
        assert_eq!(Ipv6Addr::from(na.src_ip), link_local(src), "{name}");
        assert_eq!(Ipv6Addr::from(na.target).segments()[0], 0xfd00, "{name}");
        let tags = usize::from(na.vlan_count);
        match *name {
            "unsolicited, override" => {
                assert_eq!((na.flags, na.has_tlla, na.tlla), (NA_OVERRIDE, 1, src.octets()));
                assert_eq!(Ipv6Addr::from(na.dst_ip), ALL_NODES);
                assert_eq!(Ipv6Addr::from(na.target), ula(0x10));
                assert_eq!(tags, 0);
            }
            "unsolicited" => assert_eq!((na.flags, na.has_tlla, na.tlla), (0, 0, [0; 6])),
            "solicited, override" => {
                assert_eq!(na.flags, NA_SOLICITED | NA_OVERRIDE);
                assert_eq!(Ipv6Addr::from(na.dst_ip), ula(0x99));
            }
            "802.1Q" => assert_eq!((&na.vlan[..tags], na.has_tlla), (&[100][..], 1)),
            "QinQ" => assert_eq!((&na.vlan[..tags], na.has_tlla), (&[200, 100][..], 1)),
            other => panic!("{other} was reported"),
        }
    }
    let malformed = |probes: &Probes| -> u64 { probes.malformed().unwrap().iter().map(|(_, _, n)| n).sum() };
    assert_eq!(malformed(&probes), 0, "well-formed frames are not counted");

    for frame in &f.malformed {
        let (ret, _) = probes.xdp_test_run(frame, 1).unwrap();
        assert_eq!(ret, XDP_PASS);
    }
    let mut records = Vec::new();
    probes.drain(|r| records.push(r.expect("decodable record")));
    assert!(
        records.is_empty(),
        "odd or cut frames are not reported: {records:?}"
    );
    assert_eq!(
        malformed(&probes),
        f.malformed.len() as u64,
        "each odd or cut frame counted once"
    );

    // Every prefix of a QinQ announce (14 + 8 + 40 + 32 = 94 bytes).
    let qinq = f.all.iter().find(|(n, ..)| *n == "QinQ").unwrap().1.clone();
    assert_eq!(qinq.len(), 94);
    let before = malformed(&probes);
    // BPF_PROG_TEST_RUN wants at least an Ethernet header.
    for len in 14..qinq.len() {
        let (ret, _) = probes.xdp_test_run(&qinq[..len], 1).unwrap();
        assert_eq!(ret, XDP_PASS, "prefix of {len} bytes");
    }
    probes.drain(|r| records.push(r.expect("decodable record")));
    assert!(
        records.is_empty(),
        "a cut announce is never reported: {records:?}"
    );
    // Counted: cut inside the tags (14..22 bytes), and cut once the IPv6 next header says ICMPv6 (29..94). A
    // prefix that ends before the next header (22..29) is IPv6 the parser does not read without the flow tracker.
    assert_eq!(
        malformed(&probes) - before,
        8 + 65,
        "every cut prefix from the next header on is counted"
    );

    // For orientation only (benchmarks measure it properly): an IPv6 frame that is not ICMPv6 costs one more load.
    let mut tcp6 = Icmp6::announce(mac(12), ula(1)).bytes();
    tcp6[14 + 6] = 6;
    let (ret, per_run) = probes.xdp_test_run(&tcp6, 100_000).unwrap();
    assert_eq!(ret, XDP_PASS);
    eprintln!(
        "XDP IPv6 non-ICMPv6 frame: {} ns per frame (BPF_PROG_TEST_RUN, 100k runs)",
        per_run.as_nanos()
    );
    probes.drain(|r| records.push(r.expect("decodable record")));
    assert!(records.is_empty(), "{records:?}");
}

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

/// The Ethernet source of a frame.
fn mac_of(frame: &[u8]) -> MacAddr {
    MacAddr::new(frame[6], frame[7], frame[8], frame[9], frame[10], frame[11])
}

fn hex(b: &[u8]) -> String {
    use std::fmt::Write;
    b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

/// The same frames over a real veth into `migmon watch`, the parser in XDP or as a TC ingress classifier.
fn over_veth(tc: bool) {
    let ns = Netns::new(if tc { "n6t" } else { "n6x" });
    let (outer, inner) = (unique("n6o"), unique("n6i"));
    let _link = Link::veth(&outer, None, &inner, Some(&ns.name));
    let iface = format!("{inner}@{}", ns.name);
    let mode = if tc { "--tc-ingress" } else { "--xdp" };
    let args = [mode, "--iface", iface.as_str(), "--port", "1"];
    let watch = Watch::start(&args);
    let mut tx = sender(&outer);
    let f = frames();
    for (_, frame, _) in &f.all {
        tx.send_to(frame, None).unwrap().unwrap();
    }
    for frame in &f.malformed {
        tx.send_to(frame, None).unwrap().unwrap();
    }
    let ours = |evs: &[Value]| -> Vec<Value> {
        of_kind(evs, "neighbor_advert")
            .into_iter()
            .filter(|e| {
                e["mac"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(&mac(0).to_string()[..14]))
            })
            .cloned()
            .collect()
    };
    let expected = f.all.iter().filter(|(.., r)| *r).count();
    let malformed_count = |evs: &[Value]| {
        of_kind(evs, "malformed")
            .iter()
            .filter(|m| m["iface"] == inner.as_str())
            .filter_map(|m| m["count"].as_u64())
            .max()
            .unwrap_or(0)
    };
    watch.wait_for(
        "the announces and the malformed count",
        Duration::from_secs(10),
        |evs| ours(evs).len() >= expected && malformed_count(evs) >= f.malformed.len() as u64,
    );
    let (events, _) = watch.stop();
    let got = ours(&events);
    assert_eq!(got.len(), expected, "{}", dump(&events));
    for (name, frame, reported) in &f.all {
        let src = mac_of(frame).to_string();
        let found: Vec<&Value> = got.iter().filter(|e| e["mac"] == src.as_str()).collect();
        if !reported {
            assert!(found.is_empty(), "{name} was reported: {}", dump(&events));
            continue;
        }
        assert_eq!(found.len(), 1, "{name} once: {}", dump(&events));
        let e = found[0];
        // Before TC ingress the kernel has taken the outermost VLAN tag out of the frame (into the socket buffer).
        let mut seen = frame.clone();
        if tc && matches!(u16::from_be_bytes([frame[12], frame[13]]), 0x8100 | 0x88a8) {
            seen.drain(12..16);
        }
        assert_eq!(e["frame"], hex(&seen), "{name}: {e}");
        assert_eq!(e["iface"], inner.as_str(), "{e}");
        assert_eq!(e["netns"], ns.name.as_str(), "{e}");
        assert_eq!(e["len"].as_u64(), Some(seen.len() as u64), "{e}");
        if *name == "unsolicited, override" {
            assert_eq!(e["target"], ula(0x10).to_string(), "{e}");
            assert_eq!(e["dst_ip"], "ff02::1", "{e}");
            assert_eq!(e["src_ip"], link_local(mac(1)).to_string(), "{e}");
            assert_eq!(
                (&e["override"], &e["solicited"], &e["router"]),
                (&Value::Bool(true), &Value::Bool(false), &Value::Bool(false)),
                "{e}"
            );
            assert_eq!(e["tlla"], mac(1).to_string(), "{e}");
            assert_eq!(e["vlan"], serde_json::json!([]), "{e}");
        }
        match *name {
            "QinQ" => assert_eq!(e["vlan"], serde_json::json!([200, 100]), "{e}"),
            "802.1Q" => assert_eq!(e["vlan"], serde_json::json!([100]), "{e}"),
            _ => {}
        }
    }
    assert_eq!(
        malformed_count(&events),
        f.malformed.len() as u64,
        "each odd or cut frame counted once: {}",
        dump(&events)
    );
}

#[test]
fn neighbor_adverts_over_a_veth_xdp() {
    over_veth(false);
}

#[test]
fn neighbor_adverts_over_a_veth_tc_ingress() {
    over_veth(true);
}
