//! pcapng export, written block by block (Section Header, Interface Description, Enhanced Packet blocks).
//!
//! - One Ethernet interface per port: the real bytes of the ARP, GARP and RARP frames the XDP program captured
//!   (rebuilt from the decoded fields when a probe did not keep them), each with a comment saying what it is and how
//!   it relates to the migration.
//! - One raw-IP interface, `migmon-tcp-events`: one TCP/IP header per kernel TCP event (retransmit, error, reset),
//!   addressed with the connection's 4-tuple, with the event as the packet comment. These are annotations, not
//!   captured packets: the comment says so.
//! - The section comment carries the report's summary per migration.
//!
//! Times are converted to Unix time with the trace header's anchor, at nanosecond resolution.

use std::{
    collections::HashMap,
    fs::File,
    io::{self, BufWriter, Write},
    net::IpAddr,
    path::Path,
};

use super::mono_to_unix;
use crate::{
    correlate::Analysis,
    report::rel,
    trace::{
        ArpFrame, Event, FlowSegment, FlowSide, FourTuple, MacAddr, NeighborAdvertFrame, Trace, state_text,
    },
};

const LINKTYPE_ETHERNET: u16 = 1;
const LINKTYPE_RAW: u16 = 101;
const OPT_ENDOFOPT: u16 = 0;
const OPT_COMMENT: u16 = 1;
const IF_NAME: u16 = 2;
const IF_TSRESOL: u16 = 9;
const SHB_USERAPPL: u16 = 4;

fn pad4(n: usize) -> usize {
    (4 - n % 4) % 4
}

/// The longest option value written: an option's length is 16 bits, and its padding must not wrap it.
const MAX_OPTION_LEN: usize = 65_532;
/// The snapshot length the interface blocks declare: longer frames are cut to it.
const SNAPLEN: usize = 262_144;

/// Writes one option; a value longer than [`MAX_OPTION_LEN`] is cut there (at a character boundary when it is
/// text: callers pass UTF-8).
fn option(buf: &mut Vec<u8>, code: u16, value: &[u8]) {
    let value = match std::str::from_utf8(value) {
        Ok(text) if text.len() > MAX_OPTION_LEN => {
            let mut end = MAX_OPTION_LEN;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            &value[..end]
        }
        _ => &value[..value.len().min(MAX_OPTION_LEN)],
    };
    let len = u16::try_from(value.len()).unwrap_or(u16::MAX);
    buf.extend_from_slice(&code.to_le_bytes());
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(value);
    buf.extend(std::iter::repeat_n(0u8, pad4(value.len())));
}

fn end_options(buf: &mut Vec<u8>) {
    buf.extend_from_slice(&OPT_ENDOFOPT.to_le_bytes());
    buf.extend_from_slice(&0u16.to_le_bytes());
}

fn block(out: &mut impl Write, block_type: u32, body: &[u8]) -> io::Result<()> {
    let total = body
        .len()
        .checked_add(12)
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| io::Error::other("a pcapng block would exceed 4 GiB"))?;
    out.write_all(&block_type.to_le_bytes())?;
    out.write_all(&total.to_le_bytes())?;
    out.write_all(body)?;
    out.write_all(&total.to_le_bytes())
}

/// An ARP protocol address: IPv4 octets (zeros for anything else).
fn ip4_octets(ip: std::net::IpAddr) -> [u8; 4] {
    match ip {
        std::net::IpAddr::V4(v4) => v4.octets(),
        std::net::IpAddr::V6(_) => [0; 4],
    }
}

fn hex_bytes(s: &str) -> Option<Vec<u8>> {
    if s.is_empty() || !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The frame's bytes: as captured, or rebuilt from the decoded fields (Ethernet + ARP, padded to 60 bytes).
pub fn frame_bytes(f: &ArpFrame, rarp: bool) -> Vec<u8> {
    if let Some(b) = hex_bytes(&f.frame) {
        return b;
    }
    let mut b = Vec::with_capacity(60);
    let dst = if f.op == 2 || f.op == 4 {
        f.tha.octets()
    } else {
        [0xff; 6]
    };
    b.extend_from_slice(&dst);
    b.extend_from_slice(&f.mac.octets());
    for v in &f.vlan {
        b.extend_from_slice(&0x8100u16.to_be_bytes());
        b.extend_from_slice(&v.to_be_bytes());
    }
    b.extend_from_slice(&(if rarp { 0x8035u16 } else { 0x0806 }).to_be_bytes());
    b.extend_from_slice(&1u16.to_be_bytes());
    b.extend_from_slice(&0x0800u16.to_be_bytes());
    b.extend_from_slice(&[6, 4]);
    b.extend_from_slice(&f.op.to_be_bytes());
    b.extend_from_slice(&f.sha.octets());
    b.extend_from_slice(&ip4_octets(f.spa));
    b.extend_from_slice(&f.tha.octets());
    b.extend_from_slice(&ip4_octets(f.tpa));
    b.resize(b.len().max(60), 0);
    b
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let w = u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]);
        sum += u32::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A TCP/IP header (no payload) for a 4-tuple, with `flags` (0x10 ACK, 0x04 RST, 0x08 PSH).
pub fn tcp_packet(t: &FourTuple, flags: u8) -> Vec<u8> {
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&t.sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&t.dport.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
    match (t.saddr, t.daddr) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut ip = vec![0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&40u16.to_be_bytes());
            ip[8] = 64;
            ip[9] = 6;
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            let c = checksum(&ip);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            let mut pseudo = Vec::with_capacity(32);
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, 6, 0, 20]);
            pseudo.extend_from_slice(&tcp);
            let c = checksum(&pseudo);
            tcp[16..18].copy_from_slice(&c.to_be_bytes());
            ip.extend_from_slice(&tcp);
            ip
        }
        (s, d) => {
            let to6 = |a: IpAddr| match a {
                IpAddr::V6(a) => a,
                IpAddr::V4(a) => a.to_ipv6_mapped(),
            };
            let (s, d) = (to6(s), to6(d));
            let mut ip = vec![0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&20u16.to_be_bytes());
            ip[6] = 6;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&s.octets());
            ip[24..40].copy_from_slice(&d.octets());
            let mut pseudo = Vec::with_capacity(60);
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, 0, 0, 20, 0, 0, 0, 6]);
            pseudo.extend_from_slice(&tcp);
            let c = checksum(&pseudo);
            tcp[16..18].copy_from_slice(&c.to_be_bytes());
            ip.extend_from_slice(&tcp);
            ip
        }
    }
}

/// Where a time falls relative to the migrations: "migration m1 pause+1.2 s", or "".
fn context(a: &Analysis, mac: Option<MacAddr>, ts: u64) -> String {
    let m = a
        .migrations
        .iter()
        .filter(|m| mac.is_none_or(|mac| m.mac.is_none_or(|m| m == mac)))
        .filter_map(|m| m.timeline.pause.as_ref().map(|p| (m, p.ts_ns)))
        .filter(|(_, p)| *p <= ts + 1_000_000_000)
        .max_by_key(|(_, p)| *p);
    m.map(|(m, p)| format!(" [migration {}: pause{}]", m.id, rel(ts, p)))
        .unwrap_or_default()
}

struct Writer<W: Write> {
    out: W,
    ifaces: HashMap<String, u32>,
    next_if: u32,
    packets: usize,
}

impl<W: Write> Writer<W> {
    fn iface(&mut self, name: &str, linktype: u16) -> io::Result<u32> {
        if let Some(&i) = self.ifaces.get(name) {
            return Ok(i);
        }
        let mut body = Vec::new();
        body.extend_from_slice(&linktype.to_le_bytes());
        body.extend_from_slice(&0u16.to_le_bytes());
        body.extend_from_slice(&(SNAPLEN as u32).to_le_bytes());
        option(&mut body, IF_NAME, name.as_bytes());
        option(&mut body, IF_TSRESOL, &[9]);
        end_options(&mut body);
        block(&mut self.out, 1, &body)?;
        let id = self.next_if;
        self.next_if += 1;
        self.ifaces.insert(name.to_owned(), id);
        Ok(id)
    }

    fn packet(
        &mut self,
        iface: u32,
        unix_ns: u64,
        data: &[u8],
        orig_len: u32,
        comment: &str,
    ) -> io::Result<()> {
        let data = &data[..data.len().min(SNAPLEN)];
        let captured = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let mut body = Vec::new();
        body.extend_from_slice(&iface.to_le_bytes());
        body.extend_from_slice(&((unix_ns >> 32) as u32).to_le_bytes());
        body.extend_from_slice(&(unix_ns as u32).to_le_bytes());
        body.extend_from_slice(&captured.to_le_bytes());
        body.extend_from_slice(&orig_len.max(captured).to_le_bytes());
        body.extend_from_slice(data);
        body.extend(std::iter::repeat_n(0u8, pad4(data.len())));
        option(&mut body, OPT_COMMENT, comment.as_bytes());
        end_options(&mut body);
        self.packets += 1;
        block(&mut self.out, 6, &body)
    }
}

/// Writes the pcapng file; returns the number of packets.
pub fn write(path: &Path, t: &Trace, a: &Analysis) -> io::Result<usize> {
    let mut w = Writer {
        out: BufWriter::new(File::create(path)?),
        ifaces: HashMap::new(),
        next_if: 0,
        packets: 0,
    };
    let mut events: Vec<&Event> = t.events.iter().collect();
    events.sort_by_key(|e| e.ts_ns());
    let segments = ProofSegments::pick(a, &events);
    block(&mut w.out, 0x0A0D_0D0A, &section_header(a, &segments))?;
    for e in events {
        let unix = mono_to_unix(t, e.ts_ns());
        match e {
            Event::Arp { frame, .. } | Event::Garp { frame, .. } | Event::Rarp { frame, .. } => {
                arp_packet(&mut w, a, e, frame, unix)?;
            }
            Event::NeighborAdvert { frame, .. } => neighbor_advert_packet(&mut w, a, e, frame, unix)?,
            Event::TcpRetransmit { .. }
            | Event::TcpError { .. }
            | Event::TcpResetIn { .. }
            | Event::TcpResetOut { .. } => tcp_annotation(&mut w, a, e, unix)?,
            _ if segments.contains(e) => {
                if let Some(seg) = e.flow_segment() {
                    flow_packet(&mut w, a, e, seg, unix)?;
                }
            }
            _ => {}
        }
    }
    w.out.flush()?;
    Ok(w.packets)
}

/// The section header block, with the report's summary as its comment.
fn section_header(a: &Analysis, segments: &ProofSegments) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&0x1A2B_3C4Du32.to_le_bytes());
    body.extend_from_slice(&1u16.to_le_bytes());
    body.extend_from_slice(&0u16.to_le_bytes());
    body.extend_from_slice(&(-1i64).to_le_bytes());
    let summary: Vec<String> = a
        .migrations
        .iter()
        .map(|m| {
            format!(
                "migration {} ({}) VM {}: {} survived, {} aborted; vCPU pause {}",
                m.id,
                m.mode.as_deref().unwrap_or("?"),
                m.mac_text(),
                m.survived,
                m.aborted,
                m.downtime
                    .vcpu_pause
                    .as_ref()
                    .map_or("?".into(), |f| crate::correlate::fmt_dur(f.ns))
            )
        })
        .collect();
    let warnings: String = a.warnings.iter().fold(String::new(), |mut acc, w| {
        acc.push_str(" WARNING: ");
        acc.push_str(w);
        acc.push('.');
        acc
    });
    option(
        &mut body,
        OPT_COMMENT,
        format!(
            "migmon export.{warnings} {}{}",
            summary.join(". "),
            segments.summary()
        )
        .as_bytes(),
    );
    option(
        &mut body,
        SHB_USERAPPL,
        format!("migmon {}", env!("CARGO_PKG_VERSION")).as_bytes(),
    );
    end_options(&mut body);
    body
}

/// An ARP-family frame with its real bytes, on an interface named after its port.
fn arp_packet<W: Write>(
    w: &mut Writer<W>,
    a: &Analysis,
    e: &Event,
    frame: &ArpFrame,
    unix: u64,
) -> io::Result<()> {
    let rarp = matches!(e, Event::Rarp { .. });
    let what = match e {
        Event::Rarp { .. } => "RARP self-announce".to_owned(),
        Event::Garp { .. } => format!("gratuitous ARP for {}", frame.spa),
        _ => format!("ARP op {} {} → {}", frame.op, frame.spa, frame.tpa),
    };
    let id = w.iface(&frame.port.to_string(), LINKTYPE_ETHERNET)?;
    let bytes = frame_bytes(frame, rarp);
    let comment = format!(
        "migmon: {what} from {} seen by XDP on {}{}",
        frame.mac,
        frame.port,
        context(a, Some(frame.mac), e.ts_ns())
    );
    w.packet(id, unix, &bytes, frame.len, &comment)
}

/// An announcing neighbor advertisement with its real bytes (when captured), on an interface named after its port.
fn neighbor_advert_packet<W: Write>(
    w: &mut Writer<W>,
    a: &Analysis,
    e: &Event,
    frame: &NeighborAdvertFrame,
    unix: u64,
) -> io::Result<()> {
    let Some(bytes) = hex_bytes(&frame.frame) else {
        return Ok(());
    };
    let kind = if frame.solicited {
        "solicited neighbor advertisement (override)"
    } else {
        "unsolicited neighbor advertisement"
    };
    let id = w.iface(&frame.port.to_string(), LINKTYPE_ETHERNET)?;
    let comment = format!(
        "migmon: {kind} for {} from {} seen on {}{}",
        frame.target,
        frame.mac,
        frame.port,
        context(a, Some(frame.mac), e.ts_ns())
    );
    w.packet(id, unix, &bytes, frame.len, &comment)
}

/// Flow segments written at most, each port's copy one packet; the rest are counted in the section header.
const MAX_FLOW_PACKETS: usize = 10_000;

/// The flow segments that prove wire verdicts, as every port saw them: the packets the export carries.
struct ProofSegments<'a> {
    picked: Vec<&'a Event>,
    /// Proving segments over [`MAX_FLOW_PACKETS`].
    over_limit: usize,
    /// Picked segments whose bytes the kernel did not capture (its capture budget was spent): written as
    /// header-only annotations.
    without_bytes: usize,
    /// Records the kernel sent without frame bytes, from its counters (`flow_table`).
    kernel_dropped: u64,
}

impl<'a> ProofSegments<'a> {
    fn pick(a: &Analysis, events: &[&'a Event]) -> Self {
        let proof: Vec<&Event> = a
            .migrations
            .iter()
            .flat_map(|m| &m.connections)
            .flat_map(|c| &c.proof)
            .filter(|e| e.flow_segment().is_some())
            .collect();
        let proves = |e: &Event| {
            let Some(s) = e.flow_segment() else { return false };
            proof.iter().any(|p| {
                p.kind() == e.kind()
                    && p.ts_ns().abs_diff(e.ts_ns()) <= 2_000_000
                    && p.flow_segment().is_some_and(|q| {
                        (q.side, q.seq, q.len, q.tcp_flags, q.peer_port)
                            == (s.side, s.seq, s.len, s.tcp_flags, s.peer_port)
                    })
            })
        };
        let all: Vec<&Event> = events.iter().copied().filter(|e| proves(e)).collect();
        let over_limit = all.len().saturating_sub(MAX_FLOW_PACKETS);
        let picked: Vec<&Event> = all.into_iter().take(MAX_FLOW_PACKETS).collect();
        let without_bytes = picked
            .iter()
            .filter(|e| e.flow_segment().is_some_and(|s| s.frame.is_empty()))
            .count();
        let kernel_dropped = events
            .iter()
            .filter_map(|e| match e {
                Event::FlowTable { capture_dropped, .. } => Some(*capture_dropped),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        Self {
            picked,
            over_limit,
            without_bytes,
            kernel_dropped,
        }
    }

    fn contains(&self, e: &Event) -> bool {
        self.picked.iter().any(|p| std::ptr::eq(*p, e))
    }

    /// The section header's account of them (empty when the trace has no flow segments).
    fn summary(&self) -> String {
        if self.picked.is_empty() && self.kernel_dropped == 0 {
            return String::new();
        }
        format!(
            ". {} flow segment(s) proving wire verdicts ({} without captured bytes, {} over the export's limit of \
             {MAX_FLOW_PACKETS}); the kernel sent {} flow record(s) without bytes (capture rate limit)",
            self.picked.len(),
            self.without_bytes,
            self.over_limit,
            self.kernel_dropped
        )
    }
}

/// A flow segment that proves a verdict: its captured bytes (the first 128) on an interface named after its port,
/// or, when none were captured, a header-only annotation of its 4-tuple.
fn flow_packet<W: Write>(
    w: &mut Writer<W>,
    a: &Analysis,
    e: &Event,
    seg: &FlowSegment,
    unix: u64,
) -> io::Result<()> {
    let who = match seg.side {
        FlowSide::Vm => "the VM",
        FlowSide::Peer => "the client",
    };
    let comment = format!(
        "migmon: {} by {who} seq {} len {} seen on {}{}",
        e.kind(),
        seg.seq,
        seg.len,
        seg.port,
        context(a, None, e.ts_ns())
    );
    if let Some(bytes) = hex_bytes(&seg.frame) {
        let id = w.iface(&seg.port.to_string(), LINKTYPE_ETHERNET)?;
        return w.packet(id, unix, &bytes, seg.frame_len.max(bytes.len() as u32), &comment);
    }
    let id = w.iface("migmon-tcp-events", LINKTYPE_RAW)?;
    let (from, to) = match seg.side {
        FlowSide::Vm => ((seg.vm_addr, seg.vm_port), (seg.peer_addr, seg.peer_port)),
        FlowSide::Peer => ((seg.peer_addr, seg.peer_port), (seg.vm_addr, seg.vm_port)),
    };
    let tuple = FourTuple {
        saddr: from.0,
        sport: from.1,
        daddr: to.0,
        dport: to.1,
    };
    let comment = format!("migmon annotation (not a captured packet, bytes not captured): {comment}");
    w.packet(id, unix, &tcp_packet(&tuple, seg.tcp_flags), 40, &comment)
}

/// A socket event as an annotated header-only TCP packet of its 4-tuple on the `migmon-tcp-events` interface.
fn tcp_annotation<W: Write>(w: &mut Writer<W>, a: &Analysis, e: &Event, unix: u64) -> io::Result<()> {
    let ctx = context(a, None, e.ts_ns());
    let (tcp, flags, what) = match e {
        Event::TcpRetransmit {
            tcp,
            state,
            retransmits,
            backoff,
            rto_us,
            ..
        } => {
            let what = if *retransmits == 0 {
                "tcp_retransmit (tail loss probe or fast retransmit)".to_owned()
            } else {
                format!("tcp_retransmit #{retransmits} (RTO)")
            };
            let what = format!(
                "{what} backoff {backoff} rto {} state {}{ctx}",
                crate::correlate::fmt_dur(rto_us.saturating_mul(1000)),
                state_text(*state),
            );
            (tcp, 0x18, what)
        }
        Event::TcpError { tcp, errno, .. } => {
            let name = if *errno == 110 { " (ETIMEDOUT)" } else { "" };
            (
                tcp,
                0x10,
                format!("socket error {errno}{name}: the connection aborted{ctx}"),
            )
        }
        Event::TcpResetIn { tcp, .. } => (tcp, 0x04, format!("RST received{ctx}")),
        Event::TcpResetOut { tcp, .. } => (tcp, 0x04, format!("RST sent{ctx}")),
        _ => return Ok(()),
    };
    let id = w.iface("migmon-tcp-events", LINKTYPE_RAW)?;
    let comment = format!("migmon annotation (not a captured packet): {what}");
    w.packet(id, unix, &tcp_packet(&tcp.tuple, flags), 40, &comment)
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;
    use crate::{
        correlate::correlate,
        fixtures::{live_trace, quick_trace},
        trace::TraceHeader,
    };

    fn trace(ev: Vec<Event>) -> Trace {
        Trace {
            header: Some(TraceHeader {
                kind: "trace_header".into(),
                version: crate::trace::TRACE_VERSION,
                migmon: "test".into(),
                start_mono_ns: 0,
                start_unix_ns: 1_790_000_000_000_000_000,
                hostname: "h".into(),
                command: vec![],
                ..TraceHeader::default()
            }),
            events: ev,
            ..Trace::default()
        }
    }

    #[test]
    fn rebuilt_rarp_matches_qemu_format() {
        let Event::Rarp { mut frame, .. } = crate::fixtures::rarp(0, "52:54:00:12:34:56", "tapB") else {
            unreachable!()
        };
        let captured = frame_bytes(&frame, true);
        frame.frame.clear();
        assert_eq!(
            frame_bytes(&frame, true),
            captured,
            "rebuilt bytes equal the captured ones"
        );
        assert_eq!(captured.len(), 60);
        assert_eq!(&captured[12..14], &[0x80, 0x35]);
    }

    #[test]
    fn tshark_reads_frames_comments_and_annotations() {
        let mut ev = live_trace();
        ev.extend(
            quick_trace()
                .into_iter()
                .filter(|e| !matches!(e, Event::Migration { .. })),
        );
        let t = trace(ev);
        let a = correlate(&t.events);
        let path = std::env::temp_dir().join(format!("migmon-{}.pcapng", std::process::id()));
        let n = write(&path, &t, &a).unwrap();
        assert!(n > 10);
        let out = match Command::new("tshark")
            .args(["-r"])
            .arg(&path)
            .args([
                "-T",
                "fields",
                "-e",
                "frame.interface_name",
                "-e",
                "arp.opcode",
                "-e",
                "tcp.srcport",
                "-e",
                "frame.comment",
            ])
            .output()
        {
            Ok(o) => o,
            Err(e) => {
                eprintln!("skipping: tshark is not installed ({e}); ./x setup installs it");
                return;
            }
        };
        assert!(
            out.status.success(),
            "tshark failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), n, "{text}");
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("tapB\t3\t") && l.contains("RARP self-announce")),
            "{text}"
        );
        assert!(
            lines.iter().any(|l| l.contains("gratuitous ARP for 10.77.0.2")),
            "{text}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("migmon-tcp-events\t\t41001\t") && l.contains("ETIMEDOUT")),
            "{text}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains("tcp_retransmit #3 (RTO) backoff 2")),
            "{text}"
        );
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn segments_proving_wire_verdicts_carry_their_bytes_and_the_rest_is_counted() {
        use crate::fixtures::{FlowSeg, VM_IP, VM_MAC, flow_open, flow_rst, flow_rtx, migration, note};
        let head = |silence| FlowSeg::data(FlowSide::Peer, 41000, 1000, 100).silence(silence);
        let mut captured = flow_rtx(1200, &head(200), "uplink");
        if let Event::FlowRetransmit { seg, .. } = &mut captured {
            // A 60-byte frame: Ethernet, IPv4, TCP, as the tracker hands over its first bytes.
            seg.frame = "00".repeat(60);
            seg.frame_len = 1514;
        }
        let mut ev = migration("q1", VM_MAC, VM_IP, migevents::Mode::Quick, 1000, 8000);
        ev.extend([
            flow_open(100, &FlowSeg::data(FlowSide::Peer, 41000, 900, 100), "uplink"),
            captured,
            // The same retransmission on a second port: a second packet, on that port's interface.
            flow_rtx(1200, &head(200), "tapA"),
            flow_rtx(1600, &head(400), "uplink"),
            flow_rtx(2400, &head(800), "uplink"),
            flow_rst(
                8010,
                &FlowSeg::data(FlowSide::Peer, 41000, 1000, 0).flags(0x04),
                "uplink",
            ),
            Event::FlowTable {
                ts_ns: 9_000_000_000,
                inserts: 1,
                entries: 1,
                evictions: 0,
                insert_failed: 0,
                capture_dropped: 3,
                fragments: 0,
            },
            note(20_000),
        ]);
        let t = trace(ev);
        let a = correlate(&t.events);
        assert!(a.migrations[0].connections[0].fate.is_aborted());
        let path = std::env::temp_dir().join(format!("migmon-flows-{}.pcapng", std::process::id()));
        // The flow_open is not proof: 5 segments (the first retransmission twice), one with bytes.
        assert_eq!(write(&path, &t, &a).unwrap(), 5);
        let bytes = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            text.contains(
                "5 flow segment(s) proving wire verdicts (4 without captured bytes, 0 over the export's limit"
            ),
            "{text}"
        );
        assert!(text.contains("the kernel sent 3 flow record(s) without bytes"));
        assert!(text.contains("flow_retransmit by the client seq 1000 len 100 seen on uplink"));
    }
}
