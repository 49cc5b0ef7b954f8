//! Ring buffer records and map samples → typed [`trace::Event`]s.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use monitor_common::{
    AF_INET6, ArpEvent, DIR_EGRESS, EventKind, FLOW_PEER_ACK_KNOWN, FLOW_SEQ_KNOWN, FdbEvent, FlowEvent,
    MacCounters, MacKey, MacSeenEvent, NA_OVERRIDE, NA_ROUTER, NA_SOLICITED, NeighborAdvertEvent, SIDE_VM,
    TcpEvent, UNKNOWN_U8, WireEvent,
};

use migmon_analysis::trace::{
    ArpFrame, Direction, Event, FlowSegment, FlowSide, FourTuple, MacAddr, NeighborAdvertFrame, Port,
    RetransmitKind, TcpCommon, TcpState,
};

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

fn ip(family: u16, addr: &[u8; 16]) -> IpAddr {
    if family == AF_INET6 {
        IpAddr::V6(Ipv6Addr::from(*addr))
    } else {
        IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
    }
}

fn cstr(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(HEX_DIGITS[usize::from(b >> 4)]));
        s.push(char::from(HEX_DIGITS[usize::from(b & 0xf)]));
    }
    s
}

/// The kind of a socket retransmission, from the state the probe read at `tcp:tcp_retransmit_skb`: a SYN in the
/// handshake states; the RTO in congestion state Loss (the timer handler enters it before retransmitting);
/// a fast retransmit in Recovery; and a tail-loss probe outside both, before any timeout (`icsk_retransmits`
/// 0), or while the loss-probe timer is the pending one. `None` when the state could not be read.
pub fn retransmit_kind(e: &TcpEvent) -> Option<RetransmitKind> {
    const SYN_SENT: u32 = 2;
    const SYN_RECV: u32 = 3;
    const CA_RECOVERY: u8 = 3;
    const CA_LOSS: u8 = 4;
    const ICSK_TIME_LOSS_PROBE: u8 = 5;
    if e.state == SYN_SENT || e.state == SYN_RECV {
        return Some(RetransmitKind::Syn);
    }
    match e.ca_state {
        UNKNOWN_U8 => None,
        CA_LOSS => Some(RetransmitKind::Rto),
        CA_RECOVERY => Some(RetransmitKind::Fast),
        _ if e.retransmits == 0 || e.pending == ICSK_TIME_LOSS_PROBE => Some(RetransmitKind::Tlp),
        _ => None,
    }
}

/// Turns wire records into [`Event`]s, naming ports.
pub struct Decoder {
    /// Kernel HZ (for `icsk_rto`); 0 = unknown.
    pub hz: u32,
    /// (instance id, ifindex) → port.
    pub ports: HashMap<(u32, u32), Port>,
    /// Instance id → namespace name, for ports not in `ports`.
    pub netns_of_instance: HashMap<u32, String>,
    /// The namespace each recent 4-tuple's socket was in, to fill `netns` for `tcp_error` (whose tracepoint has
    /// no socket pointer). Bounded: cleared when it grows past [`NETNS_MEMORY`] entries.
    netns_of_tuple: HashMap<FourTuple, u64>,
}

/// How many 4-tuples [`Decoder`] remembers the namespace of.
pub const NETNS_MEMORY: usize = 65_536;

impl Decoder {
    pub fn new(hz: u32) -> Self {
        Self {
            hz,
            ports: HashMap::new(),
            netns_of_instance: HashMap::new(),
            netns_of_tuple: HashMap::new(),
        }
    }

    /// The port behind (instance id, ifindex).
    pub fn port(&self, netns_id: u32, ifindex: u32) -> Port {
        self.ports
            .get(&(netns_id, ifindex))
            .cloned()
            .unwrap_or_else(|| Port {
                ifindex,
                iface: None,
                netns: self.netns_of_instance.get(&netns_id).cloned(),
            })
    }

    /// Decodes one record.
    pub fn event(&mut self, w: &WireEvent) -> Event {
        match w {
            WireEvent::Tcp(kind, e) => self.tcp(*kind, e),
            WireEvent::Arp(e) => self.arp(e),
            WireEvent::Fdb(e) => fdb(e),
            WireEvent::MacSeen(e) => self.mac_seen(e),
            WireEvent::NeighborAdvert(e) => self.neighbor_advert(e),
            WireEvent::Flow(kind, e) => self.flow(*kind, e),
        }
    }

    fn flow(&self, kind: EventKind, e: &FlowEvent) -> Event {
        let ts_ns = e.header.ts_ns;
        let addr = |k: &[u8; 16]| {
            let v6 = Ipv6Addr::from(*k);
            match v6.to_ipv4_mapped() {
                Some(v4) if e.family != AF_INET6 => IpAddr::V4(v4),
                _ => IpAddr::V6(v6),
            }
        };
        let cap = (e.cap_len as usize).min(e.frame.len());
        let seg = FlowSegment {
            vm_addr: addr(&e.key.vm_addr),
            vm_port: e.key.vm_port,
            peer_addr: addr(&e.key.peer_addr),
            peer_port: e.key.peer_port,
            port: self.port(e.netns_id, e.key.ifindex),
            direction: if e.direction == DIR_EGRESS {
                Direction::Egress
            } else {
                Direction::Ingress
            },
            side: if e.side == SIDE_VM {
                FlowSide::Vm
            } else {
                FlowSide::Peer
            },
            tcp_flags: e.tcp_flags,
            seq: e.seq,
            ack: e.ack,
            len: e.len,
            window: e.window,
            seq_end: (e.flags & FLOW_SEQ_KNOWN != 0).then_some(e.seq_end),
            peer_ack: (e.flags & FLOW_PEER_ACK_KNOWN != 0).then_some(e.peer_ack),
            retransmits: e.retransmits,
            gap_ns: e.gap_ns,
            silence_ns: e.silence_ns,
            vlan: e.vlan[..usize::from(e.vlan_count.min(2))].to_vec(),
            frame: hex(&e.frame[..cap]),
            frame_len: e.frame_len,
        };
        match kind {
            EventKind::FlowOpen => Event::FlowOpen { ts_ns, seg },
            EventKind::FlowRetransmit => Event::FlowRetransmit { ts_ns, seg },
            EventKind::FlowReset => Event::FlowReset { ts_ns, seg },
            EventKind::FlowFin => Event::FlowFin { ts_ns, seg },
            EventKind::FlowZeroWindow => Event::FlowZeroWindow { ts_ns, seg },
            // The other kinds never come with a FlowEvent payload; FlowProgress is the last flow kind.
            _ => Event::FlowProgress { ts_ns, seg },
        }
    }

    fn tcp(&mut self, kind: EventKind, e: &TcpEvent) -> Event {
        let ts_ns = e.header.ts_ns;
        let tuple = FourTuple {
            saddr: ip(e.tuple.family, &e.tuple.saddr),
            sport: e.tuple.sport,
            daddr: ip(e.tuple.family, &e.tuple.daddr),
            dport: e.tuple.dport,
        };
        let netns = if e.netns != 0 {
            if self.netns_of_tuple.len() >= NETNS_MEMORY {
                self.netns_of_tuple.clear();
            }
            self.netns_of_tuple.insert(tuple, e.netns);
            e.netns
        } else {
            self.netns_of_tuple.get(&tuple).copied().unwrap_or(0)
        };
        let tcp = TcpCommon { tuple, netns };
        let state = TcpState::from_kernel(e.state);
        match kind {
            EventKind::TcpRetransmit => Event::TcpRetransmit {
                ts_ns,
                tcp,
                state,
                retransmits: e.retransmits,
                backoff: e.backoff,
                rto_us: if self.hz == 0 {
                    0
                } else {
                    u64::from(e.rto_jiffies) * 1_000_000 / u64::from(self.hz)
                },
                srtt_us: u64::from(e.srtt_us8 >> 3),
                retransmit_kind: retransmit_kind(e),
            },
            EventKind::TcpState => Event::TcpState {
                ts_ns,
                tcp,
                old_state: state,
                new_state: TcpState::from_kernel(e.new_state),
            },
            EventKind::TcpError => Event::TcpError {
                ts_ns,
                tcp,
                errno: e.errno,
                state,
            },
            EventKind::TcpResetIn => Event::TcpResetIn { ts_ns, tcp, state },
            // The other kinds never come with a TcpEvent payload; TcpResetOut is the last TCP kind.
            _ => Event::TcpResetOut { ts_ns, tcp, state },
        }
    }

    fn arp(&self, e: &ArpEvent) -> Event {
        let ts_ns = e.header.ts_ns;
        let count = usize::from(e.vlan_count.min(2));
        let cap = (e.cap_len as usize).min(e.frame.len());
        let frame = ArpFrame {
            port: self.port(e.netns_id, e.ifindex),
            mac: MacAddr(e.src_mac),
            vlan: e.vlan[..count].to_vec(),
            op: e.op,
            sha: MacAddr(e.sha),
            spa: Ipv4Addr::from(e.spa).into(),
            tha: MacAddr(e.tha),
            tpa: Ipv4Addr::from(e.tpa).into(),
            frame: hex(&e.frame[..cap]),
            len: e.frame_len,
        };
        if e.ethertype == 0x8035 {
            Event::Rarp { ts_ns, frame }
        } else if e.spa == e.tpa && e.spa != [0; 4] {
            Event::Garp { ts_ns, frame }
        } else {
            Event::Arp { ts_ns, frame }
        }
    }

    fn neighbor_advert(&self, e: &NeighborAdvertEvent) -> Event {
        let count = usize::from(e.vlan_count.min(2));
        let cap = (e.cap_len as usize).min(e.frame.len());
        Event::NeighborAdvert {
            ts_ns: e.header.ts_ns,
            frame: NeighborAdvertFrame {
                port: self.port(e.netns_id, e.ifindex),
                mac: MacAddr(e.src_mac),
                vlan: e.vlan[..count].to_vec(),
                src_ip: Ipv6Addr::from(e.src_ip),
                dst_ip: Ipv6Addr::from(e.dst_ip),
                target: Ipv6Addr::from(e.target),
                router: e.flags & NA_ROUTER != 0,
                solicited: e.flags & NA_SOLICITED != 0,
                override_: e.flags & NA_OVERRIDE != 0,
                tlla: (e.has_tlla != 0).then_some(MacAddr(e.tlla)),
                frame: hex(&e.frame[..cap]),
                len: e.frame_len,
            },
        }
    }

    fn mac_seen(&self, e: &MacSeenEvent) -> Event {
        Event::MacSeen {
            ts_ns: e.header.ts_ns,
            mac: MacAddr(e.mac),
            port: self.port(e.netns_id, e.ifindex),
            direction: direction(e.direction),
            gap_ns: e.gap_ns,
        }
    }

    /// A `mac_stats` event for one map entry.
    pub fn mac_stats(&self, ts_ns: u64, netns_id: u32, key: &MacKey, c: &MacCounters) -> Event {
        Event::MacStats {
            ts_ns,
            mac: MacAddr(key.mac),
            port: self.port(netns_id, key.ifindex),
            direction: direction(key.direction),
            frames: c.frames,
            bytes: c.bytes,
            first_ns: c.first_ns,
            last_ns: c.last_ns,
        }
    }
}

fn direction(d: u8) -> Direction {
    if d == DIR_EGRESS {
        Direction::Egress
    } else {
        Direction::Ingress
    }
}

fn fdb(e: &FdbEvent) -> Event {
    Event::FdbUpdate {
        ts_ns: e.header.ts_ns,
        bridge: cstr(&e.br_dev),
        port: cstr(&e.dev),
        mac: MacAddr(e.mac),
        vlan: e.vid,
        netns: None,
    }
}

/// `CLOCK_MONOTONIC` now, ns: the clock `bpf_ktime_get_ns()` uses.
pub fn mono_now_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map_or(0, |t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
}

#[cfg(test)]
mod tests {
    use monitor_common::{AF_INET, EventHeader, FRAME_CAPTURE, TcpTuple};

    use super::*;

    #[test]
    fn hex_matches_std() {
        for b in 0..=255u8 {
            assert_eq!(hex(&[b, 0xa5]), format!("{b:02x}a5"));
        }
        assert_eq!(hex(&[]), "");
    }

    fn arp_event(ethertype: u16, op: u16, spa: [u8; 4], tpa: [u8; 4]) -> ArpEvent {
        let mut e = ArpEvent {
            header: EventHeader {
                kind: EventKind::Arp as u32,
                cpu: 0,
                ts_ns: 5,
            },
            ifindex: 3,
            netns_id: 1,
            ethertype,
            op,
            vlan: [10, 20],
            vlan_count: 1,
            src_mac: [2, 0, 0, 0, 0, 1],
            sha: [2, 0, 0, 0, 0, 1],
            spa,
            tpa,
            frame_len: 42,
            cap_len: 4,
            ..ArpEvent::default()
        };
        e.frame[..4].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(e.frame.len(), FRAME_CAPTURE);
        e
    }

    #[test]
    fn arp_garp_rarp_classification() {
        let mut d = Decoder::new(250);
        d.ports.insert(
            (1, 3),
            Port {
                ifindex: 3,
                iface: Some("veth0".into()),
                netns: Some("ns1".into()),
            },
        );
        let ev = d.event(&WireEvent::Arp(arp_event(
            0x0806,
            1,
            [10, 0, 0, 1],
            [10, 0, 0, 2],
        )));
        let Event::Arp { frame, .. } = &ev else {
            panic!("{ev:?}")
        };
        assert_eq!(frame.vlan, vec![10]);
        assert_eq!(frame.frame, "deadbeef");
        assert_eq!(frame.port.iface.as_deref(), Some("veth0"));
        assert_eq!(frame.spa.to_string(), "10.0.0.1");
        let ev = d.event(&WireEvent::Arp(arp_event(
            0x0806,
            1,
            [10, 0, 0, 1],
            [10, 0, 0, 1],
        )));
        assert_eq!(ev.kind(), "garp");
        let ev = d.event(&WireEvent::Arp(arp_event(0x8035, 3, [0; 4], [0; 4])));
        assert_eq!(ev.kind(), "rarp");
        // An ARP probe (spa 0.0.0.0) is not gratuitous.
        let ev = d.event(&WireEvent::Arp(arp_event(0x0806, 1, [0; 4], [0; 4])));
        assert_eq!(ev.kind(), "arp");
    }

    #[test]
    fn neighbor_advert_decodes_addresses_flags_and_option() {
        let mut d = Decoder::new(250);
        let addr = |s: &str| s.parse::<Ipv6Addr>().unwrap().octets();
        let mut e = NeighborAdvertEvent {
            header: EventHeader {
                kind: EventKind::NeighborAdvert as u32,
                cpu: 1,
                ts_ns: 77,
            },
            ifindex: 4,
            netns_id: 2,
            vlan: [300, 42],
            vlan_count: 2,
            flags: NA_OVERRIDE,
            has_tlla: 1,
            src_mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            tlla: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            frame_len: 94,
            cap_len: 2,
            src_ip: addr("fe80::5054:ff:fe12:3456"),
            dst_ip: addr("ff02::1"),
            target: addr("fd00:77::10"),
            ..NeighborAdvertEvent::default()
        };
        e.frame[..2].copy_from_slice(&[0x33, 0x33]);
        let ev = d.event(&WireEvent::NeighborAdvert(e));
        let v = serde_json::to_value(&ev).unwrap();
        assert_eq!(v["kind"], "neighbor_advert");
        assert_eq!(v["ts_ns"], 77);
        assert_eq!(v["mac"], "52:54:00:12:34:56");
        assert_eq!(v["vlan"], serde_json::json!([300, 42]));
        assert_eq!(
            (&v["src_ip"], &v["dst_ip"], &v["target"]),
            (
                &serde_json::json!("fe80::5054:ff:fe12:3456"),
                &serde_json::json!("ff02::1"),
                &serde_json::json!("fd00:77::10")
            )
        );
        assert_eq!(
            (&v["router"], &v["solicited"], &v["override"]),
            (
                &serde_json::json!(false),
                &serde_json::json!(false),
                &serde_json::json!(true)
            )
        );
        assert_eq!(v["tlla"], "52:54:00:12:34:56");
        assert_eq!(
            (&v["frame"], &v["len"]),
            (&serde_json::json!("3333"), &serde_json::json!(94))
        );
        let back: Event = serde_json::from_value(v).unwrap();
        assert_eq!(back, ev, "round trip through JSON");

        // Without the option: no `tlla` field.
        let ev = d.event(&WireEvent::NeighborAdvert(NeighborAdvertEvent {
            has_tlla: 0,
            flags: NA_SOLICITED | NA_OVERRIDE | NA_ROUTER,
            ..e
        }));
        let v = serde_json::to_value(&ev).unwrap();
        assert!(v.get("tlla").is_none(), "{v}");
        assert_eq!(
            (&v["router"], &v["solicited"]),
            (&serde_json::json!(true), &serde_json::json!(true))
        );
    }

    #[test]
    fn retransmit_converts_rto_and_srtt() {
        let mut d = Decoder::new(250);
        let mut saddr = [0u8; 16];
        saddr[..4].copy_from_slice(&[10, 1, 2, 3]);
        let e = TcpEvent {
            header: EventHeader {
                kind: 1,
                cpu: 0,
                ts_ns: 9,
            },
            tuple: TcpTuple {
                family: AF_INET,
                sport: 1000,
                dport: 80,
                pad: 0,
                saddr,
                daddr: saddr,
            },
            state: 1,
            retransmits: 2,
            backoff: 2,
            rto_jiffies: 100,
            srtt_us8: 800,
            ..TcpEvent::default()
        };
        let ev = d.event(&WireEvent::Tcp(EventKind::TcpRetransmit, e));
        let v = serde_json::to_value(&ev).unwrap();
        assert_eq!(v["kind"], "tcp_retransmit");
        assert_eq!(v["saddr"], "10.1.2.3");
        assert_eq!(v["state"], "ESTABLISHED");
        assert_eq!(v["rto_us"], 400_000);
        assert_eq!(v["srtt_us"], 100);

        // An error report for the same tuple gets the namespace the retransmit saw.
        let err = TcpEvent {
            header: EventHeader {
                kind: 3,
                cpu: 0,
                ts_ns: 10,
            },
            tuple: e.tuple,
            errno: 110,
            ..TcpEvent::default()
        };
        let with_netns = TcpEvent {
            netns: 4_026_532_000,
            ..e
        };
        d.event(&WireEvent::Tcp(EventKind::TcpRetransmit, with_netns));
        let v = serde_json::to_value(d.event(&WireEvent::Tcp(EventKind::TcpError, err))).unwrap();
        assert_eq!(
            (v["errno"].as_i64(), v["netns"].as_u64()),
            (Some(110), Some(4_026_532_000))
        );
    }
}
