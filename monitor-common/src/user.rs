//! User-space side: `aya::Pod` impls and decoding of ring buffer records.

use core::{fmt, mem::size_of};

use crate::{
    ArpEvent, EventHeader, EventKind, FdbEvent, FlowCounters, FlowDir, FlowEvent, FlowKey, FlowKey4,
    FlowSet4, FlowSet6, FlowState, MacCounters, MacKey, MacSeenEvent, NeighborAdvertEvent, ProbeConfig,
    TcpEvent, UnknownKind,
};

/// Plain data: every bit pattern is valid, no padding the compiler adds (asserted by the size checks in lib.rs).
macro_rules! pod {
    ($($t:ty),*) => {$(
        // SAFETY: the type is #[repr(C)], made only of integers and byte arrays with explicit padding fields, so
        // any bit pattern is a valid value and it has no implicit padding.
        unsafe impl aya::Pod for $t {}
        impl PlainData for $t {}
    )*};
}

/// Types that may be read from any bytes of the right length.
trait PlainData: Copy {}

pod!(
    EventHeader,
    TcpEvent,
    ArpEvent,
    FdbEvent,
    MacSeenEvent,
    NeighborAdvertEvent,
    MacKey,
    MacCounters,
    ProbeConfig,
    FlowKey,
    FlowKey4,
    FlowSet4,
    FlowSet6,
    FlowDir,
    FlowState,
    FlowCounters,
    FlowEvent
);

/// A ring buffer record, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireEvent {
    /// One of the five TCP kinds (see `kind`).
    Tcp(EventKind, TcpEvent),
    Arp(ArpEvent),
    Fdb(FdbEvent),
    MacSeen(MacSeenEvent),
    /// One of the six flow tracker kinds (see `kind`).
    Flow(EventKind, FlowEvent),
    NeighborAdvert(NeighborAdvertEvent),
}

impl WireEvent {
    /// The common header.
    pub fn header(&self) -> &EventHeader {
        match self {
            WireEvent::Tcp(_, e) => &e.header,
            WireEvent::Arp(e) => &e.header,
            WireEvent::Fdb(e) => &e.header,
            WireEvent::MacSeen(e) => &e.header,
            WireEvent::Flow(_, e) => &e.header,
            WireEvent::NeighborAdvert(e) => &e.header,
        }
    }
}

/// Why a record could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Shorter than the header or than its kind's layout.
    Short { kind: u32, need: usize, got: usize },
    /// A kind this version does not know.
    UnknownKind(u32),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Short { kind, need, got } => {
                write!(f, "record of kind {kind} is {got} bytes, its layout needs {need}")
            }
            DecodeError::UnknownKind(k) => write!(f, "unknown record kind {k}"),
        }
    }
}

impl core::error::Error for DecodeError {}

impl From<UnknownKind> for DecodeError {
    fn from(e: UnknownKind) -> Self {
        DecodeError::UnknownKind(e.0)
    }
}

fn read<T: PlainData>(kind: u32, bytes: &[u8]) -> Result<T, DecodeError> {
    let need = size_of::<T>();
    if bytes.len() < need {
        return Err(DecodeError::Short {
            kind,
            need,
            got: bytes.len(),
        });
    }
    // SAFETY: `bytes` holds at least size_of::<T>() bytes (checked above), `read_unaligned` has no alignment
    // requirement, and T is plain data for which every bit pattern is valid (PlainData is only implemented by
    // the `pod!` types).
    Ok(unsafe { bytes.as_ptr().cast::<T>().read_unaligned() })
}

/// Decodes one ring buffer record. Extra trailing bytes are ignored (a newer kernel side may append fields).
pub fn decode(bytes: &[u8]) -> Result<WireEvent, DecodeError> {
    let header: EventHeader = read(0, bytes)?;
    let kind = EventKind::try_from(header.kind)?;
    Ok(match kind {
        EventKind::TcpRetransmit
        | EventKind::TcpState
        | EventKind::TcpError
        | EventKind::TcpResetIn
        | EventKind::TcpResetOut => WireEvent::Tcp(kind, read(header.kind, bytes)?),
        EventKind::Arp => WireEvent::Arp(read(header.kind, bytes)?),
        EventKind::FdbUpdate => WireEvent::Fdb(read(header.kind, bytes)?),
        EventKind::MacSeen => WireEvent::MacSeen(read(header.kind, bytes)?),
        EventKind::FlowOpen
        | EventKind::FlowRetransmit
        | EventKind::FlowReset
        | EventKind::FlowFin
        | EventKind::FlowZeroWindow
        | EventKind::FlowProgress => WireEvent::Flow(kind, read(header.kind, bytes)?),
        EventKind::NeighborAdvert => WireEvent::NeighborAdvert(read(header.kind, bytes)?),
    })
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;
    use crate::{
        AF_INET, AF_INET6, DIR_EGRESS, FLOW_ACK_KNOWN, FLOW_SEQ_KNOWN, FRAME_CAPTURE, SIDE_PEER, TCP_ACK,
        TCP_PSH,
    };

    #[test]
    fn mac_filter_keeps_every_watched_mac_and_drops_most_others() {
        let watched = [[0x52, 0x54, 0, 0x12, 0x34, 0x56], [2, 0, 0, 0, 0, 1]];
        let filter = watched.iter().fold(0u32, |f, m| f | crate::mac_filter_bit(m));
        for m in &watched {
            assert_ne!(filter & crate::mac_filter_bit(m), 0);
        }
        let passed = (0..=255u8)
            .filter(|&b| filter & crate::mac_filter_bit(&[0x52, 0x54, 0, 0x77, 0x01, b]) != 0)
            .count();
        assert!(passed <= 256 * 2 / 32 + 1, "{passed} of 256 other MACs pass");
    }

    /// Little-endian byte builder for fixtures written field by field, independently of the Rust layout.
    #[derive(Default)]
    struct Bytes(Vec<u8>);
    impl Bytes {
        fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        fn u16(mut self, v: u16) -> Self {
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn u32(mut self, v: u32) -> Self {
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn u64(mut self, v: u64) -> Self {
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn raw(mut self, v: &[u8]) -> Self {
            self.0.extend_from_slice(v);
            self
        }
        fn header(self, kind: u32, cpu: u32, ts: u64) -> Self {
            self.u32(kind).u32(cpu).u64(ts)
        }
    }

    fn v4(a: [u8; 4]) -> [u8; 16] {
        let mut out = [0; 16];
        out[..4].copy_from_slice(&a);
        out
    }

    #[test]
    fn tcp_retransmit_fixture() {
        let b = Bytes::default()
            .header(1, 3, 123_456)
            .u16(AF_INET)
            .u16(40000)
            .u16(7)
            .u16(0)
            .raw(&v4([10, 0, 0, 1]))
            .raw(&v4([10, 0, 0, 2]))
            .u64(4_026_531_840)
            .u32(1) // state ESTABLISHED
            .u32(0)
            .u32(0)
            .u32(2) // retransmits
            .u32(2) // backoff
            .u32(200) // rto jiffies
            .u32(8000) // srtt_us << 3
            .u32(0)
            .u8(4) // ca_state Loss
            .u8(1) // pending: retransmit timer
            .u16(0)
            .u32(0);
        assert_eq!(b.0.len(), size_of::<TcpEvent>());
        let WireEvent::Tcp(kind, e) = decode(&b.0).unwrap() else {
            panic!("not tcp")
        };
        assert_eq!(kind, EventKind::TcpRetransmit);
        assert_eq!(e.header.cpu, 3);
        assert_eq!(e.header.ts_ns, 123_456);
        assert_eq!(e.tuple.family, AF_INET);
        assert_eq!((e.tuple.sport, e.tuple.dport), (40000, 7));
        assert_eq!(&e.tuple.saddr[..4], &[10, 0, 0, 1]);
        assert_eq!(&e.tuple.daddr[..4], &[10, 0, 0, 2]);
        assert_eq!(e.netns, 4_026_531_840);
        assert_eq!(
            (e.state, e.retransmits, e.backoff, e.rto_jiffies, e.srtt_us8),
            (1, 2, 2, 200, 8000)
        );
        assert_eq!((e.ca_state, e.pending, e.tlp_high_seq), (4, 1, 0));
    }

    #[test]
    fn every_tcp_kind_decodes_v6() {
        for kind in 1..=5u32 {
            let mut saddr = [0u8; 16];
            saddr[15] = 1;
            let b = Bytes::default()
                .header(kind, 0, 9)
                .u16(AF_INET6)
                .u16(1)
                .u16(2)
                .u16(0)
                .raw(&saddr)
                .raw(&saddr)
                .u64(0)
                .u32(1)
                .u32(7)
                .u32(110)
                .u32(0)
                .u32(0)
                .u32(0)
                .u32(0)
                .u32(6)
                .raw(&[0; 8]);
            let WireEvent::Tcp(k, e) = decode(&b.0).unwrap() else {
                panic!("not tcp")
            };
            assert_eq!(k as u32, kind);
            assert_eq!(e.tuple.family, AF_INET6);
            assert_eq!(e.tuple.saddr[15], 1);
            assert_eq!((e.state, e.new_state, e.errno, e.reason), (1, 7, 110, 6));
        }
    }

    #[test]
    fn arp_fixture() {
        let mut frame = [0u8; FRAME_CAPTURE];
        frame[..6].copy_from_slice(&[0xff; 6]);
        let b = Bytes::default()
            .header(6, 1, 5)
            .u32(7) // ifindex
            .u32(2) // netns id
            .u16(0x8035)
            .u16(3)
            .u16(100)
            .u16(200)
            .u16(2)
            .u16(0)
            .raw(&[0x52, 0x54, 0, 0x12, 0x34, 0x56])
            .raw(&[0, 0])
            .raw(&[0x52, 0x54, 0, 0x12, 0x34, 0x56])
            .raw(&[0x52, 0x54, 0, 0x12, 0x34, 0x56])
            .raw(&[0; 4])
            .raw(&[0; 4])
            .u32(60)
            .u32(60)
            .raw(&frame);
        assert_eq!(b.0.len(), size_of::<ArpEvent>());
        let WireEvent::Arp(e) = decode(&b.0).unwrap() else {
            panic!("not arp")
        };
        assert_eq!((e.ifindex, e.netns_id, e.ethertype, e.op), (7, 2, 0x8035, 3));
        assert_eq!((e.vlan, e.vlan_count), ([100, 200], 2));
        assert_eq!(e.src_mac, [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        assert_eq!(e.tha, e.sha);
        assert_eq!((e.frame_len, e.cap_len), (60, 60));
        assert_eq!(&e.frame[..6], &[0xff; 6]);
    }

    #[test]
    fn fdb_fixture() {
        let mut br = [0u8; 16];
        br[..3].copy_from_slice(b"br0");
        let mut dev = [0u8; 16];
        dev[..5].copy_from_slice(b"veth1");
        let b = Bytes::default()
            .header(7, 0, 77)
            .raw(&br)
            .raw(&dev)
            .raw(&[2, 0, 0, 0, 0, 1])
            .u16(10);
        let WireEvent::Fdb(e) = decode(&b.0).unwrap() else {
            panic!("not fdb")
        };
        assert_eq!(&e.br_dev[..4], b"br0\0");
        assert_eq!(&e.dev[..6], b"veth1\0");
        assert_eq!(e.mac, [2, 0, 0, 0, 0, 1]);
        assert_eq!(e.vid, 10);
    }

    #[test]
    fn mac_seen_fixture() {
        let b = Bytes::default()
            .header(8, 0, 1000)
            .raw(&[2, 0, 0, 0, 0, 9])
            .u8(DIR_EGRESS)
            .u8(0)
            .u32(12)
            .u32(1)
            .u64(60_000_000);
        let WireEvent::MacSeen(e) = decode(&b.0).unwrap() else {
            panic!("not mac_seen")
        };
        assert_eq!(e.mac, [2, 0, 0, 0, 0, 9]);
        assert_eq!(
            (e.direction, e.ifindex, e.netns_id, e.gap_ns),
            (DIR_EGRESS, 12, 1, 60_000_000)
        );
    }

    fn mapped(a: [u8; 4]) -> [u8; 16] {
        let mut out = [0; 16];
        out[10] = 0xff;
        out[11] = 0xff;
        out[12..].copy_from_slice(&a);
        out
    }

    /// A flow record written field by field.
    fn flow_fixture(kind: u32) -> Bytes {
        let mut frame = [0u8; FRAME_CAPTURE];
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        Bytes::default()
            .header(kind, 1, 5_000_000_000)
            .raw(&mapped([10, 77, 1, 10]))
            .raw(&mapped([10, 77, 2, 20]))
            .u16(7) // vm port
            .u16(40_000) // peer port
            .u32(9) // ifindex
            .u32(2) // netns id
            .u16(AF_INET)
            .u8(SIDE_PEER)
            .u8(DIR_EGRESS)
            .u8(TCP_ACK | TCP_PSH)
            .u8(0)
            .u16(502)
            .u32(1000) // seq
            .u32(77) // ack
            .u32(100) // len
            .u32(1100) // seq_end before
            .u32(1050) // peer ack
            .u32(3) // retransmits
            .u16(100)
            .u16(200)
            .u16(2)
            .u16(0)
            .u32(FLOW_SEQ_KNOWN | FLOW_ACK_KNOWN)
            .u64(210_000_000) // gap
            .u64(200_000_000) // silence
            .u32(162)
            .u32(128)
            .raw(&frame)
    }

    #[test]
    fn flow_retransmit_fixture() {
        let b = flow_fixture(10);
        assert_eq!(b.0.len(), size_of::<FlowEvent>());
        let WireEvent::Flow(kind, e) = decode(&b.0).unwrap() else {
            panic!("not a flow record")
        };
        assert_eq!(kind, EventKind::FlowRetransmit);
        assert_eq!(e.header.ts_ns, 5_000_000_000);
        assert_eq!(e.key.vm_addr, mapped([10, 77, 1, 10]));
        assert_eq!(e.key.peer_addr, mapped([10, 77, 2, 20]));
        assert_eq!((e.key.vm_port, e.key.peer_port, e.key.ifindex), (7, 40_000, 9));
        assert_eq!(
            (e.netns_id, e.family, e.side, e.direction),
            (2, AF_INET, SIDE_PEER, DIR_EGRESS)
        );
        assert_eq!((e.tcp_flags, e.window), (TCP_ACK | TCP_PSH, 502));
        assert_eq!(
            (e.seq, e.ack, e.len, e.seq_end, e.peer_ack),
            (1000, 77, 100, 1100, 1050)
        );
        assert_eq!((e.retransmits, e.vlan, e.vlan_count), (3, [100, 200], 2));
        assert_eq!(e.flags, FLOW_SEQ_KNOWN | FLOW_ACK_KNOWN);
        assert_eq!((e.gap_ns, e.silence_ns), (210_000_000, 200_000_000));
        assert_eq!((e.frame_len, e.cap_len), (162, 128));
        assert_eq!(&e.frame[12..14], &[0x08, 0x00]);
    }

    #[test]
    fn every_flow_kind_decodes() {
        for (n, kind) in [
            (9, EventKind::FlowOpen),
            (10, EventKind::FlowRetransmit),
            (11, EventKind::FlowReset),
            (12, EventKind::FlowFin),
            (13, EventKind::FlowZeroWindow),
            (14, EventKind::FlowProgress),
        ] {
            assert_eq!(EventKind::try_from(n), Ok(kind));
            let WireEvent::Flow(k, e) = decode(&flow_fixture(n).0).unwrap() else {
                panic!("kind {n} is not a flow record")
            };
            assert_eq!((k, e.header.kind), (kind, n));
        }
        let short = flow_fixture(11);
        assert_eq!(
            decode(&short.0[..200]),
            Err(DecodeError::Short {
                kind: 11,
                need: 256,
                got: 200
            })
        );
    }

    #[test]
    fn ip_filter_keeps_every_flow_ip() {
        let ips = [mapped([10, 77, 1, 10]), mapped([192, 168, 0, 1]), [0xfd; 16]];
        let filter = ips.iter().fold(0u64, |f, a| f | crate::ip_filter_bit(a));
        for a in &ips {
            assert_ne!(filter & crate::ip_filter_bit(a), 0);
        }
    }

    #[test]
    fn neighbor_advert_fixture() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let mut src_ip = [0u8; 16];
        src_ip[..2].copy_from_slice(&[0xfe, 0x80]);
        src_ip[15] = 0x10;
        let mut dst_ip = [0u8; 16];
        dst_ip[..2].copy_from_slice(&[0xff, 0x02]);
        dst_ip[15] = 1;
        let mut target = [0u8; 16];
        target[..2].copy_from_slice(&[0xfd, 0x00]);
        target[15] = 0x10;
        let mut frame = [0u8; FRAME_CAPTURE];
        frame[..6].copy_from_slice(&[0x33, 0x33, 0, 0, 0, 1]);
        let b = Bytes::default()
            .header(15, 1, 42)
            .u32(5) // ifindex
            .u32(3) // netns id
            .u16(100)
            .u16(0)
            .u16(1) // one tag
            .u8(crate::NA_OVERRIDE)
            .u8(1) // has tlla
            .raw(&mac)
            .raw(&mac)
            .u32(86)
            .u32(86)
            .u32(0)
            .raw(&src_ip)
            .raw(&dst_ip)
            .raw(&target)
            .raw(&frame);
        assert_eq!(b.0.len(), size_of::<NeighborAdvertEvent>());
        let WireEvent::NeighborAdvert(e) = decode(&b.0).unwrap() else {
            panic!("not a neighbor advert")
        };
        assert_eq!(e.header.ts_ns, 42);
        assert_eq!((e.ifindex, e.netns_id), (5, 3));
        assert_eq!((e.vlan, e.vlan_count), ([100, 0], 1));
        assert_eq!((e.flags, e.has_tlla), (crate::NA_OVERRIDE, 1));
        assert_eq!((e.src_mac, e.tlla), (mac, mac));
        assert_eq!((e.frame_len, e.cap_len), (86, 86));
        assert_eq!((e.src_ip, e.dst_ip, e.target), (src_ip, dst_ip, target));
        assert_eq!(&e.frame[..6], &[0x33, 0x33, 0, 0, 0, 1]);
        let short = &b.0[..100];
        assert_eq!(
            decode(short),
            Err(DecodeError::Short {
                kind: 15,
                need: 232,
                got: 100
            })
        );
    }

    #[test]
    fn which_neighbor_adverts_announce() {
        use crate::{NA_OVERRIDE, NA_ROUTER, NA_SOLICITED, na_announces};
        assert!(na_announces(0), "unsolicited");
        assert!(na_announces(NA_OVERRIDE), "unsolicited, override");
        assert!(na_announces(NA_ROUTER), "unsolicited, from a router");
        assert!(na_announces(NA_SOLICITED | NA_OVERRIDE), "solicited, override");
        assert!(!na_announces(NA_SOLICITED), "solicited without override");
        assert!(
            !na_announces(NA_SOLICITED | NA_ROUTER),
            "solicited without override"
        );
    }

    #[test]
    fn rejects_unknown_kinds_and_short_records() {
        for kind in [0u32, 0x7fff, 0xdead_beef] {
            let b = Bytes::default().header(kind, 0, 0).raw(&[0; 200]);
            assert_eq!(decode(&b.0), Err(DecodeError::UnknownKind(kind)));
            assert!(EventKind::try_from(kind).is_err());
        }
        assert!(matches!(decode(&[1, 0, 0]), Err(DecodeError::Short { .. })));
        let b = Bytes::default().header(6, 0, 0).raw(&[0; 10]);
        assert_eq!(
            decode(&b.0),
            Err(DecodeError::Short {
                kind: 6,
                need: 200,
                got: 26
            })
        );
    }
}
