//! The TCP flow tracker against the real kernel: crafted segments through `BPF_PROG_TEST_RUN` (every prefix of
//! IPv4, IPv6, VLAN and `QinQ` frames; retransmissions, resets, FINs, zero windows, progress after a quiet
//! period; a full flow table), and live connections over a veth (picked up mid-stream, a retransmission under an
//! nftables drop rule, a RST from each side). The tests use migmon's library API ([`monitor::probes::Probes`])
//! and read the records straight from the ring buffer.
#![expect(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use integration_tests::{Link, Netns, ip_in, unique, wait_until};
use monitor::probes::{FlowOptions, Iface, ProbeOptions, Probes, TcProgram};
use monitor_common::{
    AF_INET, AF_INET6, EventKind, FLOW_PEER_ACK_KNOWN, FLOW_SEQ_KNOWN, FlowEvent, SIDE_PEER, SIDE_VM,
    TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, WireEvent,
};

const XDP_PASS: u32 = 2;
const TC_ACT_UNSPEC: i32 = -1;

const VM_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x0f, 0x10, 0x01];
const PEER_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x0f, 0x10, 0x02];
const VM4: Ipv4Addr = Ipv4Addr::new(10, 99, 1, 10);
const PEER4: Ipv4Addr = Ipv4Addr::new(10, 99, 2, 20);
const VM6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 0x10);
const PEER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 0x20);

/// One TCP segment to craft.
#[derive(Clone, Copy)]
struct Seg {
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    payload: usize,
}

impl Seg {
    /// A data segment from the VM (v4 or v6) to its peer.
    fn from_vm(v6: bool, sport: u16, seq: u32, payload: usize) -> Self {
        let (src, dst) = if v6 {
            (IpAddr::V6(VM6), IpAddr::V6(PEER6))
        } else {
            (IpAddr::V4(VM4), IpAddr::V4(PEER4))
        };
        Self {
            src,
            dst,
            sport,
            dport: 5001,
            seq,
            ack: 1,
            flags: TCP_ACK | TCP_PSH,
            window: 500,
            payload,
        }
    }

    /// The answer direction of `self`'s flow.
    fn reply(self, seq: u32, ack: u32, flags: u8, payload: usize) -> Self {
        Self {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            seq,
            ack,
            flags,
            window: 500,
            payload,
        }
    }
}

/// An Ethernet frame with `tags` (TPID, VLAN id) around the IP packet of `s`. No checksums: test-run and the
/// tracker do not look at them.
fn frame(s: &Seg, tags: &[(u16, u16)]) -> Vec<u8> {
    let from_vm = matches!(s.src, IpAddr::V4(a) if a == VM4) || matches!(s.src, IpAddr::V6(a) if a == VM6);
    let (dmac, smac) = if from_vm {
        (PEER_MAC, VM_MAC)
    } else {
        (VM_MAC, PEER_MAC)
    };
    let mut f = Vec::new();
    f.extend_from_slice(&dmac);
    f.extend_from_slice(&smac);
    for (tpid, vid) in tags {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&vid.to_be_bytes());
    }
    let mut tcp = Vec::new();
    tcp.extend_from_slice(&s.sport.to_be_bytes());
    tcp.extend_from_slice(&s.dport.to_be_bytes());
    tcp.extend_from_slice(&s.seq.to_be_bytes());
    tcp.extend_from_slice(&s.ack.to_be_bytes());
    // Data offset 8 words: 12 bytes of options (NOP NOP timestamp), as Linux sends.
    tcp.extend_from_slice(&[0x80, s.flags]);
    tcp.extend_from_slice(&s.window.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 0]);
    tcp.extend_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
    tcp.extend((0..s.payload).map(|i| i as u8));
    match (s.src, s.dst) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            f.extend_from_slice(&[0x08, 0x00]);
            let tot = (20 + tcp.len()) as u16;
            f.extend_from_slice(&[0x45, 0]);
            f.extend_from_slice(&tot.to_be_bytes());
            f.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0]);
            f.extend_from_slice(&a.octets());
            f.extend_from_slice(&b.octets());
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            f.extend_from_slice(&[0x86, 0xdd]);
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
            f.extend_from_slice(&[6, 64]);
            f.extend_from_slice(&a.octets());
            f.extend_from_slice(&b.octets());
        }
        _ => panic!("mixed address families"),
    }
    f.extend_from_slice(&tcp);
    f
}

fn flow_opts(table_entries: u32, quiet: Duration) -> ProbeOptions {
    ProbeOptions {
        tracepoints: false,
        flows: Some(FlowOptions {
            ips: vec![IpAddr::V4(VM4), IpAddr::V6(VM6)],
            table_entries,
            quiet_ns: quiet.as_nanos() as u64,
            captures_per_sec: 0,
            ..FlowOptions::default()
        }),
        ..ProbeOptions::default()
    }
}

/// The three programs that carry the tracker.
#[derive(Clone, Copy, Debug)]
enum Prog {
    Xdp,
    TcIngress,
    TcEgress,
}

const PROGS: [Prog; 3] = [Prog::Xdp, Prog::TcIngress, Prog::TcEgress];

/// Runs `prog` on `f` once and checks that it let the frame pass. Returns false when the kernel refused to run
/// it: `BPF_PROG_TEST_RUN` of a TC program wants the whole IP header of an untagged IPv4 or IPv6 frame (it
/// reads it to set up the socket buffer), so shorter prefixes never reach the program.
fn run(probes: &mut Probes, prog: Prog, f: &[u8]) -> bool {
    match prog {
        Prog::Xdp => {
            let (ret, _) = probes.xdp_test_run(f, 1).unwrap();
            assert_eq!(ret, XDP_PASS, "{prog:?} on {} bytes", f.len());
            true
        }
        Prog::TcIngress | Prog::TcEgress => {
            let p = if matches!(prog, Prog::TcIngress) {
                TcProgram::Ingress
            } else {
                TcProgram::Egress
            };
            let ip_header = match f.get(12..14) {
                Some([0x08, 0x00]) => 20,
                Some([0x86, 0xdd]) => 40,
                _ => 0,
            };
            match probes.tc_test_run(p, f, 1) {
                Ok((ret, _)) => {
                    assert_eq!(ret, TC_ACT_UNSPEC, "{prog:?} on {} bytes", f.len());
                    true
                }
                Err(e) if f.len() < 14 + ip_header && os_error(&e) == Some(libc::EINVAL) => false,
                Err(e) => panic!("{prog:?} on {} bytes: {e}", f.len()),
            }
        }
    }
}

/// The OS error at the root of `e`'s causes.
fn os_error(e: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return io.raw_os_error();
        }
        cur = c.source();
    }
    None
}

fn flow_records(probes: &mut Probes) -> Vec<(EventKind, FlowEvent)> {
    let mut out = Vec::new();
    probes.drain(|r| {
        // Other records (ARP on a live veth) are not this test's business.
        if let WireEvent::Flow(kind, e) = r.expect("decodable record") {
            out.push((kind, e));
        }
    });
    out
}

fn malformed(probes: &Probes) -> u64 {
    probes.malformed().unwrap().iter().map(|(_, _, n)| n).sum()
}

/// A frame shape: (name, IPv6, VLAN tags outermost first).
type Shape<'a> = (&'a str, bool, &'a [(u16, u16)]);

/// Every prefix of an IPv4, an IPv6, a VLAN-tagged and a `QinQ` TCP frame, through XDP, TC ingress and TC egress:
/// each program passes every one, only the whole frame is tracked (one `flow_open`, its fields right), and every
/// cut one is counted as malformed.
#[test]
fn every_prefix_of_a_tcp_frame_is_counted_and_never_misread() {
    let mut probes = Probes::load(&flow_opts(1024, Duration::from_secs(1))).expect("load the probes");
    every_prefix_of_each_shape(&mut probes);
    odd_headers_are_counted_never_tracked(&mut probes);
    random_bytes_are_passed(&mut probes);
}

/// Each shape's every prefix, through each program: counted when cut, tracked (its fields right) when whole.
fn every_prefix_of_each_shape(probes: &mut Probes) {
    let shapes: [Shape<'_>; 4] = [
        ("IPv4", false, &[]),
        ("IPv6", true, &[]),
        ("VLAN IPv4", false, &[(0x8100, 42)]),
        ("QinQ IPv6", true, &[(0x88a8, 300), (0x8100, 42)]),
    ];
    let mut sport = 40_000;
    for (what, v6, tags) in shapes {
        for prog in PROGS {
            // A port of its own per shape and program: test-run gives every program the same ifindex, so the
            // same segment through two programs would be one flow's retransmission.
            sport += 1;
            let seg = Seg::from_vm(v6, sport, 1_000_000, 48);
            let f = frame(&seg, tags);
            let before = malformed(probes);
            let mut ran = 0;
            for len in 14..f.len() {
                ran += u64::from(run(probes, prog, &f[..len]));
            }
            let cut = malformed(probes) - before;
            assert_eq!(
                cut,
                ran,
                "{what} through {prog:?}: every cut prefix (14..{} bytes) that ran is counted",
                f.len()
            );
            assert!(
                ran >= (f.len() - 14 - 40) as u64,
                "{what} through {prog:?}: only {ran} prefixes ran"
            );
            assert!(
                flow_records(probes).is_empty(),
                "{what} through {prog:?}: no cut prefix is tracked"
            );
            run(probes, prog, &f);
            let recs = flow_records(probes);
            assert_eq!(recs.len(), 1, "{what} through {prog:?}: {recs:?}");
            let (kind, e) = recs[0];
            assert_eq!(kind, EventKind::FlowOpen, "{what} through {prog:?}");
            assert_eq!(e.family, if v6 { AF_INET6 } else { AF_INET });
            let vm = if v6 {
                VM6.octets()
            } else {
                VM4.to_ipv6_mapped().octets()
            };
            assert_eq!(e.key.vm_addr, vm, "{what}: the VM's end comes first");
            assert_eq!((e.key.vm_port, e.key.peer_port), (sport, 5001));
            assert_eq!((e.side, e.seq, e.len), (SIDE_VM, 1_000_000, 48));
            assert_eq!(e.tcp_flags, TCP_ACK | TCP_PSH);
            assert_eq!(usize::from(e.vlan_count), tags.len());
            for (i, (_, vid)) in tags.iter().enumerate() {
                assert_eq!(e.vlan[i], *vid);
            }
            assert_eq!(
                (e.frame_len as usize, e.cap_len as usize),
                (f.len(), f.len().min(128))
            );
            assert_eq!(&e.frame[..e.cap_len as usize], &f[..e.cap_len as usize]);
        }
    }
}

/// Odd headers: an IPv4 header length below 20, a TCP data offset below 5 words and one past the packet, a wrong
/// IP version. Counted, never tracked.
fn odd_headers_are_counted_never_tracked(probes: &mut Probes) {
    let seg = Seg::from_vm(false, 41_000, 1, 10);
    let good = frame(&seg, &[]);
    let mut odd = Vec::new();
    let mut f = good.clone();
    f[14] = 0x44;
    odd.push(f);
    let mut f = good.clone();
    f[14 + 20 + 12] = 0x40;
    odd.push(f);
    let mut f = good.clone();
    f[14 + 20 + 12] = 0xf0;
    odd.push(f);
    let mut f = good.clone();
    f[14] = 0x65;
    odd.push(f);
    for prog in PROGS {
        let before = malformed(probes);
        for f in &odd {
            run(probes, prog, f);
        }
        assert_eq!(malformed(probes) - before, odd.len() as u64, "{prog:?}");
        assert!(flow_records(probes).is_empty(), "{prog:?}");
    }
}

/// Pseudo-random bytes behind an IPv4 or IPv6 ethertype (a fixed LCG, so a failure reproduces): always passed.
fn random_bytes_are_passed(probes: &mut Probes) {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..3000 {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let len = 14 + (x >> 33) as usize % 150;
        let mut f: Vec<u8> = (0..len)
            .map(|j| {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(j as u64);
                (x >> 56) as u8
            })
            .collect();
        let v6 = i % 2 == 0;
        f[12..14].copy_from_slice(if v6 { &[0x86, 0xdd] } else { &[0x08, 0x00] });
        if len > 14 + 9 && !v6 {
            f[14] = 0x45;
            f[14 + 9] = 6;
        } else if len > 14 + 6 && v6 {
            f[14] = 0x60;
            f[14 + 6] = 6;
        }
        run(probes, PROGS[i % 3], &f);
    }
}

/// The tracker's judgement on crafted sequences: a retransmission (with the gap since new data), the other side
/// picked up later, a zero window, progress after a quiet period, a FIN and a RST with the side that sent them.
#[test]
fn retransmission_progress_zero_window_fin_and_reset_are_reported_once() {
    let quiet = Duration::from_millis(20);
    let mut probes = Probes::load(&flow_opts(1024, quiet)).expect("load the probes");
    for v6 in [false, true] {
        let a = Seg::from_vm(v6, if v6 { 42_002 } else { 42_001 }, 5000, 100);
        let send = |probes: &mut Probes, s: &Seg| {
            run(probes, Prog::Xdp, &frame(s, &[]));
            flow_records(probes)
        };
        let kinds = |r: &[(EventKind, FlowEvent)]| r.iter().map(|(k, _)| *k).collect::<Vec<_>>();

        let r = send(&mut probes, &a);
        assert_eq!(kinds(&r), [EventKind::FlowOpen]);
        let r = send(&mut probes, &Seg { seq: 5100, ..a });
        assert!(r.is_empty(), "new data in order is not reported: {r:?}");
        let r = send(&mut probes, &a);
        assert_eq!(kinds(&r), [EventKind::FlowRetransmit], "{r:?}");
        let e = r[0].1;
        assert_eq!(
            (e.side, e.seq, e.seq_end, e.retransmits),
            (SIDE_VM, 5000, 5200, 1)
        );
        assert_ne!(e.flags & FLOW_SEQ_KNOWN, 0);
        assert_eq!(
            e.flags & FLOW_PEER_ACK_KNOWN,
            0,
            "the peer has not acknowledged anything yet"
        );
        assert!(e.silence_ns > 0 && e.gap_ns >= e.silence_ns, "{e:?}");

        // The peer's first segment: no record; then a zero window, reported once.
        let r = send(&mut probes, &a.reply(1, 5200, TCP_ACK, 0));
        assert!(r.is_empty(), "{r:?}");
        let zero = Seg {
            window: 0,
            ..a.reply(1, 5200, TCP_ACK, 0)
        };
        let r = send(&mut probes, &zero);
        assert_eq!(kinds(&r), [EventKind::FlowZeroWindow]);
        assert_eq!(r[0].1.side, SIDE_PEER);
        assert!(
            send(&mut probes, &zero).is_empty(),
            "a zero window is reported when it starts"
        );

        // Quiet, then new data: progress, with the quiet period.
        std::thread::sleep(quiet * 2);
        let r = send(&mut probes, &Seg { seq: 5200, ..a });
        assert_eq!(kinds(&r), [EventKind::FlowProgress], "{r:?}");
        let e = r[0].1;
        assert!(e.gap_ns >= quiet.as_nanos() as u64, "{e:?}");
        assert_ne!(e.flags & FLOW_PEER_ACK_KNOWN, 0);
        assert_eq!(e.peer_ack, 5200);

        // A FIN from the VM, reported once (its retransmission is a retransmission); a RST from the peer.
        let fin = Seg {
            seq: 5300,
            flags: TCP_ACK | TCP_FIN,
            payload: 0,
            ..a
        };
        let r = send(&mut probes, &fin);
        assert_eq!(kinds(&r), [EventKind::FlowFin]);
        assert_eq!(r[0].1.side, SIDE_VM);
        let r = send(&mut probes, &fin);
        assert_eq!(kinds(&r), [EventKind::FlowRetransmit]);
        let r = send(&mut probes, &a.reply(1, 5301, TCP_RST | TCP_ACK, 0));
        assert_eq!(kinds(&r), [EventKind::FlowReset]);
        assert_eq!(r[0].1.side, SIDE_PEER);

        // A SYN from the peer opens a flow whose VM end is still the VM's.
        let syn = Seg {
            seq: 77,
            ack: 0,
            flags: TCP_SYN,
            payload: 0,
            ..a.reply(0, 0, 0, 0)
        };
        let syn = Seg { sport: 50_000, ..syn };
        let r = send(&mut probes, &syn);
        assert_eq!(kinds(&r), [EventKind::FlowOpen]);
        assert_eq!(
            (r[0].1.side, r[0].1.key.peer_port, r[0].1.key.vm_port),
            (SIDE_PEER, 50_000, a.sport)
        );
        let r = send(&mut probes, &syn);
        assert_eq!(
            kinds(&r),
            [EventKind::FlowRetransmit],
            "a repeated SYN is a retransmission"
        );
    }
}

/// With `--port`, the tracker follows only the VM's flows with a watched port at either end, in every program and
/// both families: an echo on port 7 is not tracked.
#[test]
fn with_a_port_filter_only_the_vms_flows_on_those_ports_are_tracked() {
    let mut opts = flow_opts(1024, Duration::from_millis(50));
    if let Some(f) = opts.flows.as_mut() {
        f.ports = vec![5001, 40_000];
    }
    let mut probes = Probes::load(&opts).expect("load the probes");
    let mut i = 0u16;
    for v6 in [false, true] {
        for prog in PROGS {
            // Fresh port pairs in each round, so each round's flows are new to the table.
            i += 1;
            // The VM's segment to the peer's port 5001, and the peer's answer: one flow, picked up.
            let to_5001 = Seg::from_vm(v6, 31_000 + i, 100, 10);
            run(&mut probes, prog, &frame(&to_5001, &[]));
            run(&mut probes, prog, &frame(&to_5001.reply(1, 110, TCP_ACK, 0), &[]));
            // A filtered port at the VM's end (the peer's is not).
            let from_40000 = Seg {
                sport: 40_000,
                dport: 33_000 + i,
                ..Seg::from_vm(v6, 0, 100, 10)
            };
            run(&mut probes, prog, &frame(&from_40000, &[]));
            // Neither port under watch (an echo on port 7): not tracked, in either direction.
            let echo = Seg {
                dport: 7,
                ..Seg::from_vm(v6, 32_000 + i, 100, 10)
            };
            run(&mut probes, prog, &frame(&echo, &[]));
            run(&mut probes, prog, &frame(&echo.reply(1, 110, TCP_ACK, 0), &[]));
            let r = flow_records(&mut probes);
            let opened: Vec<(u16, u16)> = r
                .iter()
                .filter(|(k, _)| *k == EventKind::FlowOpen)
                .map(|(_, e)| (e.key.vm_port, e.key.peer_port))
                .collect();
            assert_eq!(
                opened,
                [(to_5001.sport, 5001), (40_000, from_40000.dport)],
                "v6 {v6}, {prog:?}: {r:?}"
            );
        }
    }
    let t = probes.flow_totals(true).unwrap();
    assert_eq!((t.inserts, t.entries), (12, 12), "{t:?}");
    assert_eq!(malformed(&probes), 0);
}

/// IPv6 extension header kinds.
const HOP_BY_HOP: u8 = 0;
const FRAGMENT: u8 = 44;
const DEST_OPTS: u8 = 60;
/// The 7 bytes after the next-header byte of an 8-byte options header: length 0, then a `PadN` of 4 bytes.
const PAD_OPTIONS: [u8; 7] = [0, 1, 4, 0, 0, 0, 0];

/// The 7 bytes after the next-header byte of a fragment header: reserved, offset (8-byte units) and the
/// more-fragments flag, identification.
fn fragment_header(offset_units: u16, more: bool) -> [u8; 7] {
    let field = (offset_units << 3) | u16::from(more);
    let [hi, lo] = field.to_be_bytes();
    [0, hi, lo, 0, 0, 0x12, 0x34]
}

/// `f`, an untagged IPv6 TCP frame, with 8-byte extension headers `(kind, the bytes after the next-header byte)`
/// inserted in order before the TCP header; the next headers chain and the payload length grows to match.
fn with_ext_headers(f: &[u8], exts: &[(u8, [u8; 7])]) -> Vec<u8> {
    let ip = 14;
    let mut out = f[..ip + 40].to_vec();
    out[ip + 6] = exts[0].0;
    for (i, (_, rest)) in exts.iter().enumerate() {
        out.push(exts.get(i + 1).map_or(6, |e| e.0));
        out.extend_from_slice(rest);
    }
    out.extend_from_slice(&f[ip + 40..]);
    let plen = u16::from_be_bytes([out[ip + 4], out[ip + 5]]) + 8 * exts.len() as u16;
    out[ip + 4..ip + 6].copy_from_slice(&plen.to_be_bytes());
    out
}

/// `f`, an untagged IPv4 frame, as a fragment: `offset_units` (8-byte units) and the more-fragments flag.
fn ipv4_fragment(f: &[u8], offset_units: u16, more: bool) -> Vec<u8> {
    let mut out = f.to_vec();
    let field = offset_units | if more { 0x2000 } else { 0 };
    out[14 + 6..14 + 8].copy_from_slice(&field.to_be_bytes());
    out
}

fn fragments(probes: &Probes) -> u64 {
    probes.flow_totals(false).unwrap().fragments
}

/// TCP behind IPv6 extension headers, and fragments: every prefix of a segment behind hop-by-hop and destination
/// options through each program is counted when cut and tracked when whole; a first fragment (IPv4 or IPv6) is
/// tracked; a later fragment is counted in `fragments`, neither tracked nor malformed.
#[test]
fn tcp_behind_ipv6_extension_headers_is_tracked_and_later_fragments_are_counted() {
    let mut probes = Probes::load(&flow_opts(1024, Duration::from_secs(1))).expect("load the probes");
    let mut sport = 44_000;
    for prog in PROGS {
        sport += 1;
        let seg = Seg::from_vm(true, sport, 2_000_000, 48);
        let f = with_ext_headers(
            &frame(&seg, &[]),
            &[(HOP_BY_HOP, PAD_OPTIONS), (DEST_OPTS, PAD_OPTIONS)],
        );
        let before = malformed(&probes);
        let mut ran = 0;
        for len in 14..f.len() {
            ran += u64::from(run(&mut probes, prog, &f[..len]));
        }
        assert_eq!(
            malformed(&probes) - before,
            ran,
            "{prog:?}: every cut prefix that ran is counted"
        );
        assert!(
            ran >= (f.len() - 14 - 40) as u64,
            "{prog:?}: only {ran} prefixes ran"
        );
        assert!(
            flow_records(&mut probes).is_empty(),
            "{prog:?}: no cut prefix is tracked"
        );
        run(&mut probes, prog, &f);
        let recs = flow_records(&mut probes);
        assert_eq!(recs.len(), 1, "{prog:?}: {recs:?}");
        let (kind, e) = recs[0];
        assert_eq!(kind, EventKind::FlowOpen, "{prog:?}");
        assert_eq!(
            (e.family, e.key.vm_addr, e.key.vm_port),
            (AF_INET6, VM6.octets(), sport)
        );
        assert_eq!((e.side, e.seq, e.len), (SIDE_VM, 2_000_000, 48), "{prog:?}");

        // A first fragment with its TCP header: tracked. A later one: counted, not tracked, not malformed.
        sport += 1;
        let seg = Seg::from_vm(true, sport, 3_000_000, 48);
        let first = with_ext_headers(&frame(&seg, &[]), &[(FRAGMENT, fragment_header(0, true))]);
        run(&mut probes, prog, &first);
        let recs = flow_records(&mut probes);
        assert_eq!(recs.len(), 1, "{prog:?}, first IPv6 fragment: {recs:?}");
        assert_eq!(
            (recs[0].0, recs[0].1.seq, recs[0].1.key.vm_port),
            (EventKind::FlowOpen, 3_000_000, sport)
        );
        sport += 1;
        let seg4 = Seg::from_vm(false, sport, 4_000_000, 48);
        run(&mut probes, prog, &ipv4_fragment(&frame(&seg4, &[]), 0, true));
        let recs = flow_records(&mut probes);
        assert_eq!(recs.len(), 1, "{prog:?}, first IPv4 fragment: {recs:?}");
        assert_eq!((recs[0].0, recs[0].1.key.vm_port), (EventKind::FlowOpen, sport));

        let (frags, bad) = (fragments(&probes), malformed(&probes));
        sport += 1;
        let seg = Seg::from_vm(true, sport, 5_000_000, 48);
        run(
            &mut probes,
            prog,
            &with_ext_headers(
                &frame(&seg, &[]),
                &[(HOP_BY_HOP, PAD_OPTIONS), (FRAGMENT, fragment_header(185, false))],
            ),
        );
        run(&mut probes, prog, &ipv4_fragment(&frame(&seg4, &[]), 185, true));
        assert_eq!(
            fragments(&probes) - frags,
            2,
            "{prog:?}: both later fragments counted"
        );
        assert_eq!(
            malformed(&probes),
            bad,
            "{prog:?}: a later fragment is not malformed"
        );
        assert!(
            flow_records(&mut probes).is_empty(),
            "{prog:?}: a later fragment is not tracked"
        );
    }
}

/// A flow table far smaller than the flows: every insert is counted, the evictions are inserts minus entries,
/// the programs keep passing frames, and an evicted flow is picked up again.
#[test]
fn a_full_flow_table_counts_evictions_and_keeps_working() {
    let mut probes = Probes::load(&flow_opts(64, Duration::from_secs(1))).expect("load the probes");
    let flows = 2000u16;
    for i in 0..flows {
        let s = Seg::from_vm(i % 2 == 1, 10_000 + i, 1, 10);
        run(&mut probes, PROGS[usize::from(i) % 3], &frame(&s, &[]));
    }
    let opened = flow_records(&mut probes)
        .iter()
        .filter(|(k, _)| *k == EventKind::FlowOpen)
        .count();
    assert_eq!(opened, usize::from(flows));
    let t = probes.flow_totals(true).unwrap();
    assert_eq!(t.inserts, u64::from(flows), "{t:?}");
    // Two tables of 64 entries, one per family, half of the flows each.
    assert!(t.entries <= 2 * 64 && t.entries > 0, "{t:?}");
    assert_eq!(t.evictions, t.inserts - t.entries, "{t:?}");
    assert!(t.evictions >= u64::from(flows) - 2 * 64, "{t:?}");
    let v4 = probes
        .flows()
        .unwrap()
        .iter()
        .filter(|(_, k, _)| k.vm_addr[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff])
        .count();
    assert!(v4 > 0 && v4 <= 64, "{v4} IPv4 flows held, {t:?}");
    assert_eq!(t.insert_failed, 0, "{t:?}");

    // An evicted flow (the LRU is approximate: find one that is gone) is picked up again by its next segment, not
    // taken for a retransmission.
    let held: Vec<u16> = probes
        .flows()
        .unwrap()
        .iter()
        .map(|(_, k, _)| k.vm_port)
        .collect();
    let gone = (0..flows)
        .step_by(2)
        .map(|i| 10_000 + i)
        .find(|p| !held.contains(p))
        .expect("an evicted IPv4 flow");
    let s = Seg::from_vm(false, gone, 11, 10);
    run(&mut probes, Prog::Xdp, &frame(&s, &[]));
    let r = flow_records(&mut probes);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].0, EventKind::FlowOpen);
    assert_eq!(probes.flow_totals(false).unwrap().inserts, u64::from(flows) + 1);
}

// ---------------------------------------------------------------------------------------------------------------
// Live connections

/// Two namespaces joined by a veth: the "VM" side (server) and its peer (client).
struct Pair {
    vm: Netns,
    peer: Netns,
    _link: Link,
    vm_dev: String,
    vm_ip: IpAddr,
}

impl Pair {
    fn new(v6: bool) -> Self {
        let vm = Netns::new("fvm");
        let peer = Netns::new("fpe");
        let (vm_dev, peer_dev) = (unique("fvv"), unique("fpv"));
        let link = Link::veth(&vm_dev, Some(&vm.name), &peer_dev, Some(&peer.name));
        let pid = std::process::id();
        let (vm_ip, peer_ip, prefix): (IpAddr, IpAddr, u8) = if v6 {
            let ip = |last: u16| {
                IpAddr::V6(Ipv6Addr::new(
                    0xfd7e,
                    (pid >> 16) as u16,
                    pid as u16,
                    0,
                    0,
                    0,
                    0,
                    last,
                ))
            };
            (ip(1), ip(2), 64)
        } else {
            let net = [10, 150 + (pid % 50) as u8, ((pid / 50) % 250) as u8];
            (
                IpAddr::V4(Ipv4Addr::new(net[0], net[1], net[2], 1)),
                IpAddr::V4(Ipv4Addr::new(net[0], net[1], net[2], 2)),
                24,
            )
        };
        for (ns, dev, addr) in [(&vm, &vm_dev, vm_ip), (&peer, &peer_dev, peer_ip)] {
            let cidr = format!("{addr}/{prefix}");
            let mut args = vec!["addr", "add", cidr.as_str(), "dev", dev.as_str()];
            if v6 {
                args.push("nodad");
            }
            ip_in(Some(&ns.name), &args);
        }
        Self {
            vm,
            peer,
            _link: link,
            vm_dev,
            vm_ip,
        }
    }

    /// A connected (VM-side, peer-side) pair of sockets: the peer connects to the VM.
    fn connect(&self) -> (TcpStream, TcpStream, TcpListener) {
        let ip = self.vm_ip;
        let listener = self.vm.run(|| TcpListener::bind(SocketAddr::new(ip, 0)).unwrap());
        let addr = listener.local_addr().unwrap();
        let client = self
            .peer
            .run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap());
        let (server, _) = listener.accept().unwrap();
        for s in [&client, &server] {
            s.set_nodelay(true).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        }
        (server, client, listener)
    }

    /// The tracker on the VM side's veth, TC ingress and egress, watching the VM's IP.
    fn probes(&self) -> Probes {
        let mut probes = Probes::load(&ProbeOptions {
            tracepoints: false,
            l2_tc_ingress: true,
            flows: Some(FlowOptions {
                ips: vec![self.vm_ip],
                ..FlowOptions::default()
            }),
            ..ProbeOptions::default()
        })
        .expect("load the probes");
        let iface = Iface {
            name: self.vm_dev.clone(),
            netns: Some(self.vm.name.clone()),
        };
        probes.attach_xdp(&iface).expect("attach TC ingress");
        probes.attach_tc_egress(&iface).expect("attach TC egress");
        probes
    }
}

/// An nftables table in a namespace that drops the TCP segments to one port while it exists.
struct DropRule {
    netns: String,
    table: String,
}

impl DropRule {
    fn new(netns: &str, port: u16) -> Self {
        let table = unique("fdrop").replace('-', "_");
        let script = format!(
            "add table inet {table}\nadd chain inet {table} c {{ type filter hook input priority 0; }}\n\
             add rule inet {table} c tcp dport {port} drop\n"
        );
        let path = std::env::temp_dir().join(format!("{table}.nft"));
        std::fs::write(&path, script).unwrap();
        integration_tests::netns_exec(netns, &["nft", "-f", path.to_str().unwrap()]);
        let _ = std::fs::remove_file(path);
        Self {
            netns: netns.to_owned(),
            table,
        }
    }
}

impl Drop for DropRule {
    fn drop(&mut self) {
        let _ =
            integration_tests::try_netns_exec(&self.netns, &["nft", "delete", "table", "inet", &self.table]);
    }
}

/// Waits until a record satisfying `cond` arrives; returns every record seen.
fn wait_record(
    probes: &mut Probes,
    all: &mut Vec<(EventKind, FlowEvent)>,
    what: &str,
    cond: impl Fn(&(EventKind, FlowEvent)) -> bool,
) {
    let ok = wait_until(Duration::from_secs(10), || {
        all.extend(flow_records(probes));
        all.iter().any(&cond)
    });
    assert!(ok, "no {what} within 10 s: {all:#?}");
}

/// The tracker attached after the connection opened picks it up from its next segment, recognises the peer's
/// retransmissions while an nftables rule drops its segments at the VM, and reports the first progress once
/// the rule is gone.
fn mid_stream_pickup(v6: bool) {
    let pair = Pair::new(v6);
    let (mut server, mut client, _l) = pair.connect();
    let mut buf = [0u8; 4096];
    client.write_all(&[1; 1000]).unwrap();
    server.read_exact(&mut buf[..1000]).unwrap();

    let mut probes = pair.probes();
    let mut all = Vec::new();
    client.write_all(&[2; 1000]).unwrap();
    server.read_exact(&mut buf[..1000]).unwrap();
    wait_record(&mut probes, &mut all, "flow_open", |(k, _)| {
        *k == EventKind::FlowOpen
    });
    let open = all.iter().find(|(k, _)| *k == EventKind::FlowOpen).unwrap().1;
    let vm_port = server.local_addr().unwrap().port();
    assert_eq!(open.key.vm_port, vm_port);
    assert_eq!(open.key.peer_port, client.local_addr().unwrap().port());
    assert!(
        all.iter().all(|(k, _)| *k != EventKind::FlowRetransmit),
        "{all:#?}"
    );

    let rule = DropRule::new(&pair.vm.name, vm_port);
    client.write_all(&[3; 1000]).unwrap();
    wait_record(
        &mut probes,
        &mut all,
        "flow_retransmit from the peer",
        |(k, e)| *k == EventKind::FlowRetransmit && e.side == SIDE_PEER,
    );
    let rt = all
        .iter()
        .find(|(k, _)| *k == EventKind::FlowRetransmit)
        .unwrap()
        .1;
    // A tail-loss probe or the RTO: either comes after a silence (the segment was the last one the peer sent).
    assert!(rt.silence_ns >= 1_000_000 && rt.gap_ns >= rt.silence_ns, "{rt:?}");
    assert_eq!(rt.len, 1000);
    drop(rule);
    server.read_exact(&mut buf[..1000]).unwrap();
    wait_record(&mut probes, &mut all, "flow_progress from the VM", |(k, e)| {
        *k == EventKind::FlowProgress && e.side == SIDE_VM
    });
    let t = probes.flow_totals(true).unwrap();
    assert_eq!((t.inserts, t.entries, t.evictions), (1, 1, 0), "{t:?}");
}

#[test]
fn a_flow_is_picked_up_mid_stream_and_its_retransmissions_recognised() {
    mid_stream_pickup(false);
}

#[test]
fn a_flow_is_picked_up_mid_stream_and_its_retransmissions_recognised_ipv6() {
    mid_stream_pickup(true);
}

/// Aborts `s` with a RST (`SO_LINGER` 0, then close).
fn reset(s: TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `s` is an open socket; `linger` is a valid `struct linger` that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER");
    drop(s);
}

/// A RST from the peer, then on a second connection one from the VM: each reported with the side that sent it.
#[test]
fn a_reset_from_each_side_is_reported_with_its_side() {
    let pair = Pair::new(false);
    let mut probes = pair.probes();
    let mut all = Vec::new();
    for (side, who) in [(SIDE_PEER, "peer"), (SIDE_VM, "VM")] {
        let (mut server, mut client, _l) = pair.connect();
        client.write_all(b"ping").unwrap();
        let mut b = [0u8; 4];
        server.read_exact(&mut b).unwrap();
        let vm_port = server.local_addr().unwrap().port();
        let peer_port = client.local_addr().unwrap().port();
        if side == SIDE_PEER {
            reset(client);
            drop(server);
        } else {
            reset(server);
            drop(client);
        }
        wait_record(
            &mut probes,
            &mut all,
            &format!("flow_reset from the {who}"),
            |(k, e)| *k == EventKind::FlowReset && e.key.vm_port == vm_port && e.key.peer_port == peer_port,
        );
        let rst = all
            .iter()
            .find(|(k, e)| *k == EventKind::FlowReset && e.key.peer_port == peer_port)
            .unwrap()
            .1;
        assert_eq!(rst.side, side, "the RST came from the {who}: {rst:?}");
        assert_ne!(rst.tcp_flags & TCP_RST, 0);
    }
}

/// `migmon watch --tcp wire` on the VM's veth: the flow kinds of a connection (open, reset) come out with the
/// port named, and no socket tracepoint event does, although the connection's sockets live on this host.
#[test]
fn watch_with_tcp_wire_reports_flows_and_no_socket_events() {
    let pair = Pair::new(false);
    let iface = format!("{}@{}", pair.vm_dev, pair.vm.name);
    let vm = format!("52:54:00:0f:10:99={}", pair.vm_ip);
    let watch = integration_tests::Watch::start(&["--tcp", "wire", "--iface", &iface, "--vm", &vm]);
    let (mut server, mut client, _l) = pair.connect();
    client.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    server.read_exact(&mut b).unwrap();
    let peer_port = u64::from(client.local_addr().unwrap().port());
    reset(client);
    watch.wait_for("flow_reset", Duration::from_secs(10), |evs| {
        evs.iter()
            .any(|e| e["kind"] == "flow_reset" && e["peer_port"].as_u64() == Some(peer_port))
    });
    let (events, stderr) = watch.stop();
    let open = events
        .iter()
        .find(|e| e["kind"] == "flow_open" && e["peer_port"].as_u64() == Some(peer_port))
        .unwrap_or_else(|| panic!("no flow_open: {}", integration_tests::dump(&events)));
    assert_eq!(open["vm_addr"], pair.vm_ip.to_string());
    assert_eq!(open["iface"], pair.vm_dev.as_str());
    assert_eq!(open["side"], "peer", "the peer's SYN or first segment opened it");
    let rst = events.iter().find(|e| e["kind"] == "flow_reset").unwrap();
    assert_eq!(
        (rst["side"].as_str(), rst["direction"].as_str()),
        (Some("peer"), Some("ingress"))
    );
    let socket: Vec<_> = events
        .iter()
        .filter(|e| e["kind"].as_str().is_some_and(|k| k.starts_with("tcp_")))
        .collect();
    assert!(
        socket.is_empty(),
        "--tcp wire records no socket events: {socket:?}\n{stderr}"
    );
}

/// Fuzzing of the L2 and TCP parsers in the kernel: `MIGMON_FUZZ_FRAMES` frames (2,000 by default; `./x fuzz` runs
/// more) through XDP and both TC programs with `BPF_PROG_TEST_RUN`. The frames are crafted ones (TCP over IPv4 and
/// IPv6 from and to the watched VM, untagged, VLAN and `QinQ`, ARP and RARP) with bytes overwritten, cut or
/// extended, and arbitrary bytes. Every frame must pass (`XDP_PASS`, `TC_ACT_UNSPEC`) and every record the programs
/// send must decode. The seed is `MIGMON_FUZZ_SEED` (fixed by default).
#[test]
fn fuzz_random_frames_through_every_program() {
    use std::cell::RefCell;

    use integration_tests::frames::{arp_body, ethernet};
    use migmon_base::MacAddr;
    use proptest::{
        collection::vec,
        prelude::*,
        test_runner::{Config, RngAlgorithm, TestRng, TestRunner},
    };

    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let frames = env("MIGMON_FUZZ_FRAMES").unwrap_or(2_000);
    let seed = env("MIGMON_FUZZ_SEED").unwrap_or(0x6d69_676d_6f6e);
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases: u32::try_from(frames).unwrap_or(u32::MAX),
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
    );

    let probes =
        RefCell::new(Probes::load(&flow_opts(256, Duration::from_millis(100))).expect("load the probes"));
    let vm = MacAddr::from(VM_MAC);
    let tags: [&[(u16, u16)]; 3] = [&[], &[(0x8100, 42)], &[(0x88a8, 300), (0x8100, 42)]];
    let mut seeds: Vec<Vec<u8>> = Vec::new();
    for t in tags {
        for v6 in [false, true] {
            let s = Seg::from_vm(v6, 41_000, 7, 40);
            seeds.push(frame(&s, t));
            seeds.push(frame(&s.reply(1, 47, TCP_ACK, 0), t));
            seeds.push(frame(&s.reply(1, 47, 0x04, 0), t)); // RST
            seeds.push(frame(&s.reply(1, 0, 0x02, 0), t)); // SYN
        }
        let arp = arp_body(2, vm, VM4, MacAddr::ZERO, VM4);
        seeds.push(ethernet(MacAddr::BROADCAST, vm, t, 0x0806, &arp));
        seeds.push(ethernet(
            MacAddr::BROADCAST,
            vm,
            t,
            0x8035,
            &arp_body(3, vm, Ipv4Addr::UNSPECIFIED, vm, Ipv4Addr::UNSPECIFIED),
        ));
    }
    let n_seeds = seeds.len();
    let strategy = prop_oneof![
        4 => (
            0..n_seeds,
            vec((any::<usize>(), any::<u8>()), 0..6),
            proptest::option::of(any::<usize>()),
            vec(any::<u8>(), 0..24),
            0usize..3,
        )
            .prop_map(move |(i, flips, cut, tail, prog)| {
                let mut f = seeds[i].clone();
                for (at, v) in flips {
                    let at = at % f.len();
                    f[at] = v;
                }
                if let Some(cut) = cut {
                    f.truncate(14 + cut % (f.len() - 13));
                }
                f.extend_from_slice(&tail);
                (f, prog)
            }),
        1 => (vec(any::<u8>(), 14..200), 0usize..3),
    ];
    let ran = std::cell::Cell::new(0u64);
    let result = runner.run(&strategy, |(f, prog)| {
        let mut p = probes.borrow_mut();
        let r = run(&mut p, PROGS[prog], &f);
        ran.set(ran.get() + u64::from(r));
        let mut bad = Vec::new();
        p.drain(|r| {
            if let Err(e) = r {
                bad.push(e.to_string());
            }
        });
        prop_assert!(
            bad.is_empty(),
            "undecodable records after {} bytes: {bad:?}",
            f.len()
        );
        Ok(())
    });
    result.unwrap();
    let ran = ran.get();
    eprintln!(
        "{frames} fuzzed frames (seed {seed:#x}) through XDP, TC ingress and TC egress: all passed, {ran} run by \
         the kernel (the rest too short for a TC test run)"
    );
    assert!(
        ran > frames / 2,
        "most frames must reach a program: {ran} of {frames}"
    );
}

/// The socket side labels its retransmissions: a lone segment dropped at the receiver is first sent again by a
/// tail-loss probe (`tlp`, before any timeout), then by the retransmission timer (`rto`, counted up).
#[test]
fn socket_retransmits_are_labelled_tlp_then_rto() {
    let pair = Pair::new(false);
    let (mut server, mut client, listener) = pair.connect();
    let vm_port = listener.local_addr().unwrap().port().to_string();
    let watch = integration_tests::Watch::start(&["--tcp", "sockets", "--port", &vm_port]);
    client.write_all(&[1; 100]).unwrap();
    let mut b = [0u8; 100];
    server.read_exact(&mut b).unwrap();
    let _rule = DropRule::new(&pair.vm.name, listener.local_addr().unwrap().port());
    client.write_all(&[2; 100]).unwrap();
    let events = watch.wait_for("three retransmissions", Duration::from_secs(15), |evs| {
        evs.iter().filter(|e| e["kind"] == "tcp_retransmit").count() >= 3
    });
    drop(watch);
    let rtx: Vec<_> = events.iter().filter(|e| e["kind"] == "tcp_retransmit").collect();
    let kinds: Vec<_> = rtx
        .iter()
        .map(|e| {
            (
                e["retransmit_kind"].as_str().unwrap_or("?"),
                e["retransmits"].as_u64().unwrap_or(99),
            )
        })
        .collect();
    assert_eq!(kinds[0], ("tlp", 0), "{kinds:?}");
    assert!(kinds[1..].iter().all(|(k, _)| *k == "rto"), "{kinds:?}");
    assert_eq!(kinds[1].1, 1, "{kinds:?}");
}

/// For orientation only (`./x bench --only probes` measures it properly): the kernel's time per segment.
#[test]
fn cost_per_segment_for_orientation() {
    let mut probes = Probes::load(&flow_opts(1024, Duration::from_secs(1))).expect("load the probes");
    let ack = frame(&Seg::from_vm(false, 43_000, 1, 0).reply(1, 1, TCP_ACK, 0), &[]);
    let other = {
        let mut s = Seg::from_vm(false, 43_001, 1, 0);
        // Addresses whose filter bits are not those of the watched ones.
        s.src = IpAddr::V4(Ipv4Addr::new(10, 9, 9, 1));
        s.dst = IpAddr::V4(Ipv4Addr::new(10, 9, 9, 3));
        frame(&s, &[])
    };
    run(&mut probes, Prog::Xdp, &ack);
    for (what, f) in [("tracked flow ACK", &ack), ("unwatched segment", &other)] {
        let (_, d) = probes.xdp_test_run(f, 200_000).unwrap();
        eprintln!("XDP {what}: {} ns", d.as_nanos());
    }
    flow_records(&mut probes);
}
