//! Synthetic traces for unit tests: event builders (times in ms) and two scenarios, a live migration
//! ([`live_trace`]) and a quick one with every way a connection can die ([`quick_trace`]). Built with the crate's own
//! tests, and for other crates' tests with the `fixtures` feature.

use std::net::{IpAddr, Ipv4Addr};

use migevents::{MigrationEvent, Mode, Phase, Role};

use crate::trace::{
    ArpFrame, Direction, Event, FlowSegment, FlowSide, FourTuple, MacAddr, PauseSource, Port, TcpCommon,
    TcpState,
};

pub const MS: u64 = 1_000_000;
pub const VM_MAC: &str = "52:54:00:12:34:56";
pub const VM_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);

pub fn port(name: &str) -> Port {
    Port {
        ifindex: name.bytes().map(u32::from).sum(),
        iface: Some(name.to_owned()),
        netns: None,
    }
}

pub fn mig(ts_ms: u64, id: &str, mac: &str, role: Role, phase: Phase, source: &str) -> Event {
    Event::Migration {
        ev: MigrationEvent {
            ts_ns: ts_ms * MS,
            migration_id: id.to_owned(),
            mac: mac.to_owned(),
            role,
            phase,
        },
        source: match source {
            "qmp" => PauseSource::Qmp,
            "libvirt" => PauseSource::Libvirt,
            "wire" => PauseSource::Wire,
            _ => PauseSource::Migrator,
        },
    }
}

/// A MAC written in a test.
pub fn mac_of(s: &str) -> MacAddr {
    s.parse().expect("a fixture's MAC is well formed")
}

/// A TCP state named in a test (`""` for none).
pub fn state_of(s: &str) -> Option<TcpState> {
    (!s.is_empty()).then(|| s.parse().expect("a fixture's TCP state is a kernel name"))
}

pub fn setup(ts_ms: u64, id: &str, mac: &str, ip: Ipv4Addr, mode: Mode) -> Event {
    setup_with(ts_ms, id, mac, ip, mode, false)
}

/// A Setup event whose hypervisor does (`carries_frames`) or does not carry the frames held during the pause.
pub fn setup_with(ts_ms: u64, id: &str, mac: &str, ip: Ipv4Addr, mode: Mode, carries_frames: bool) -> Event {
    mig(
        ts_ms,
        id,
        mac,
        Role::Source,
        Phase::Setup {
            mode,
            ram_bytes: 256 << 20,
            ips: vec![ip.to_string()],
            host: "hostA".into(),
            carries_frames,
        },
        "migrator",
    )
}

/// setup, pause, resume, complete from our migrator.
pub fn migration(id: &str, mac: &str, ip: Ipv4Addr, mode: Mode, pause_ms: u64, resume_ms: u64) -> Vec<Event> {
    vec![
        setup(pause_ms.saturating_sub(500), id, mac, ip, mode),
        mig(
            pause_ms.saturating_sub(300),
            id,
            mac,
            Role::Source,
            Phase::Round {
                n: 0,
                pages: 1000,
                bytes: 4_096_000,
                bandwidth: 1 << 30,
            },
            "migrator",
        ),
        mig(pause_ms, id, mac, Role::Source, Phase::Pause, "migrator"),
        mig(resume_ms, id, mac, Role::Destination, Phase::Resume, "migrator"),
        mig(
            resume_ms + 1,
            id,
            mac,
            Role::Source,
            Phase::Complete {
                total_ms: 600.0,
                pause_ms: (resume_ms - pause_ms) as f64,
                bytes: 1 << 20,
            },
            "migrator",
        ),
    ]
}

pub fn tuple(sport: u16, daddr: Ipv4Addr) -> FourTuple {
    FourTuple {
        saddr: IpAddr::V4(Ipv4Addr::new(10, 77, 0, 100)),
        sport,
        daddr: IpAddr::V4(daddr),
        dport: 7,
    }
}

fn tcp(t: FourTuple) -> TcpCommon {
    TcpCommon {
        tuple: t,
        netns: 4026,
    }
}

pub fn state(ts_ms: u64, t: FourTuple, old: &str, new: &str) -> Event {
    Event::TcpState {
        ts_ns: ts_ms * MS,
        tcp: tcp(t),
        old_state: state_of(old),
        new_state: state_of(new),
    }
}

/// RTO retransmission number `k` (1-based) with a base RTO, as the probes report it on a real kernel:
/// `retransmits` = k (incremented before the retransmission), `backoff` = k − 1, `rto_us` = the RTO of this timer.
pub fn rtx(ts_ms: u64, t: FourTuple, k: u32, base_rto_ms: u64) -> Event {
    Event::TcpRetransmit {
        ts_ns: ts_ms * MS,
        tcp: tcp(t),
        state: Some(TcpState::Established),
        retransmits: k,
        backoff: k - 1,
        rto_us: (base_rto_ms * 1000) << (k - 1),
        srtt_us: 0,
        retransmit_kind: None,
    }
}

/// `inet_sk_error_report`: no namespace and no state, as the probes report it.
pub fn err(ts_ms: u64, t: FourTuple, errno: i32) -> Event {
    Event::TcpError {
        ts_ns: ts_ms * MS,
        tcp: TcpCommon { tuple: t, netns: 0 },
        errno,
        state: None,
    }
}

pub fn rst_in(ts_ms: u64, t: FourTuple) -> Event {
    Event::TcpResetIn {
        ts_ns: ts_ms * MS,
        tcp: tcp(t),
        state: Some(TcpState::Established),
    }
}

pub fn rst_out(ts_ms: u64, t: FourTuple) -> Event {
    Event::TcpResetOut {
        ts_ns: ts_ms * MS,
        tcp: tcp(t),
        state: Some(TcpState::Established),
    }
}

pub fn seen(ts_ms: u64, mac: &str, p: &str, dir: Direction) -> Event {
    Event::MacSeen {
        ts_ns: ts_ms * MS,
        mac: mac_of(mac),
        port: port(p),
        direction: dir,
        gap_ns: 0,
    }
}

pub fn stats(
    ts_ms: u64,
    mac: &str,
    p: &str,
    dir: Direction,
    frames: u64,
    first_ms: u64,
    last_ms: u64,
) -> Event {
    Event::MacStats {
        ts_ns: ts_ms * MS,
        mac: mac_of(mac),
        port: port(p),
        direction: dir,
        frames,
        bytes: frames * 100,
        first_ns: first_ms * MS,
        last_ns: last_ms * MS,
    }
}

/// An info note: moves the end of the trace.
pub fn note(ts_ms: u64) -> Event {
    Event::Note {
        ts_ns: ts_ms * MS,
        level: "info".into(),
        message: "end".into(),
    }
}

pub fn rarp(ts_ms: u64, mac: &str, p: &str) -> Event {
    Event::Rarp {
        ts_ns: ts_ms * MS,
        frame: ArpFrame {
            port: port(p),
            mac: mac_of(mac),
            vlan: vec![],
            op: 3,
            sha: mac_of(mac),
            spa: Ipv4Addr::UNSPECIFIED.into(),
            tha: mac_of(mac),
            tpa: Ipv4Addr::UNSPECIFIED.into(),
            frame: format!(
                "ffffffffffff{m}80350001080006040003{m}00000000{m}00000000{pad}",
                m = mac.replace(':', ""),
                pad = "00".repeat(18)
            ),
            len: 60,
        },
    }
}

pub fn garp(ts_ms: u64, mac: &str, ip: Ipv4Addr, p: &str) -> Event {
    Event::Garp {
        ts_ns: ts_ms * MS,
        frame: ArpFrame {
            port: port(p),
            mac: mac_of(mac),
            vlan: vec![],
            op: 1,
            sha: mac_of(mac),
            spa: ip.into(),
            tha: MacAddr::default(),
            tpa: ip.into(),
            frame: String::new(),
            len: 42,
        },
    }
}

/// An unsolicited neighbor advertisement (override) of `target` from `mac`, to all nodes.
pub fn neighbor_advert(ts_ms: u64, mac: &str, target: std::net::Ipv6Addr, p: &str) -> Event {
    Event::NeighborAdvert {
        ts_ns: ts_ms * MS,
        frame: crate::trace::NeighborAdvertFrame {
            port: port(p),
            mac: mac_of(mac),
            vlan: vec![],
            src_ip: target,
            dst_ip: std::net::Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1),
            target,
            router: false,
            solicited: false,
            override_: true,
            tlla: Some(mac_of(mac)),
            frame: String::new(),
            len: 86,
        },
    }
}

pub fn fdb(ts_ms: u64, bridge: &str, p: &str, mac: &str) -> Event {
    Event::FdbUpdate {
        ts_ns: ts_ms * MS,
        bridge: bridge.into(),
        port: p.into(),
        mac: mac_of(mac),
        vlan: 0,
        netns: None,
    }
}

/// A live migration of `VM_MAC` from tapA to tapB: pause 1000 ms, resume 1005 ms, with wire events and two
/// connections (one retransmits once after resume, one is idle).
pub fn live_trace() -> Vec<Event> {
    let c1 = tuple(40001, VM_IP);
    let c2 = tuple(40002, VM_IP);
    let mut ev = migration("live-1", VM_MAC, VM_IP, Mode::Live, 1000, 1005);
    ev.extend([
        state(10, c1, "SYN_SENT", "ESTABLISHED"),
        state(11, c2, "SYN_SENT", "ESTABLISHED"),
        fdb(5, "brA", "tapA", VM_MAC),
        fdb(5, "brS", "upA", VM_MAC),
        seen(5, VM_MAC, "tapA", Direction::Ingress),
        seen(6, VM_MAC, "tapA", Direction::Egress),
        stats(900, VM_MAC, "tapA", Direction::Ingress, 50, 5, 899),
        stats(1000, VM_MAC, "tapA", Direction::Ingress, 52, 5, 998),
        stats(1000, VM_MAC, "tapA", Direction::Egress, 40, 6, 999),
        // After the pause frames still reach tapA until the FDB moves: 3 black-holed frames.
        stats(1100, VM_MAC, "tapA", Direction::Egress, 43, 6, 1007),
        rarp(1006, VM_MAC, "tapB"),
        seen(1006, VM_MAC, "tapB", Direction::Ingress),
        fdb(1007, "brS", "upB", VM_MAC),
        fdb(1007, "brB", "tapB", VM_MAC),
        garp(1008, VM_MAC, VM_IP, "tapB"),
        seen(1009, VM_MAC, "tapB", Direction::Egress),
        stats(1100, VM_MAC, "tapB", Direction::Egress, 5, 1009, 1090),
        rtx(1200, c1, 1, 200),
        state(5000, c1, "ESTABLISHED", "FIN_WAIT1"),
        state(5001, c1, "FIN_WAIT1", "FIN_WAIT2"),
    ]);
    ev
}

/// A quick migration with an 8 s pause: every way of dying, each proved by its events.
pub fn quick_trace() -> Vec<Event> {
    let (c1, c2, c3, c4, c5) = (
        tuple(41001, VM_IP),
        tuple(41002, VM_IP),
        tuple(41003, VM_IP),
        tuple(41004, VM_IP),
        tuple(41005, VM_IP),
    );
    let mut ev = migration("quick-1", VM_MAC, VM_IP, Mode::Quick, 1000, 9000);
    for c in [c1, c2, c3, c4, c5] {
        ev.push(state(100, c, "SYN_SENT", "ESTABLISHED"));
    }
    // c1: tcp_retries2=3 at a 200 ms base: the limit (3.0 s) counts from the first RTO retransmission (1200), so
    // the 4th retransmission (4000, 2.8 s) still goes out and the abort comes at the 5th timer (7200).
    ev.extend([
        rtx(1200, c1, 1, 200),
        rtx(1600, c1, 2, 200),
        rtx(2400, c1, 3, 200),
        rtx(4000, c1, 4, 200),
        // The kernel's order: the state change, then the error report.
        state(7200, c1, "ESTABLISHED", "CLOSE"),
        err(7200, c1, 110),
    ]);
    // c2: survives the pause by retransmitting, then the VM answers with a RST (it lost the socket).
    ev.extend([
        rtx(1200, c2, 1, 200),
        rtx(1600, c2, 2, 200),
        rtx(2400, c2, 3, 200),
        rtx(4000, c2, 4, 200),
        rtx(7200, c2, 5, 200),
        rtx(13600, c2, 6, 200),
        rst_in(13601, c2),
        state(13601, c2, "ESTABLISHED", "CLOSE"),
        err(13601, c2, 104),
    ]);
    // c3: the client sends a RST (application abort with SO_LINGER 0).
    ev.extend([
        rtx(1200, c3, 1, 200),
        rst_out(1500, c3),
        state(1500, c3, "ESTABLISHED", "CLOSE"),
    ]);
    // c4: the application closes during the pause; the FIN is retransmitted, then the socket dies.
    ev.extend([
        state(1300, c4, "ESTABLISHED", "FIN_WAIT1"),
        rtx(1500, c4, 1, 200),
        state(2000, c4, "FIN_WAIT1", "CLOSE"),
    ]);
    // c5: survives: its sixth retransmission after resume gets through.
    ev.extend([
        rtx(1200, c5, 1, 200),
        rtx(1600, c5, 2, 200),
        rtx(2400, c5, 3, 200),
        rtx(4000, c5, 4, 200),
        rtx(7200, c5, 5, 200),
        rtx(13600, c5, 6, 200),
        Event::Note {
            ts_ns: 40_000 * MS,
            level: "info".into(),
            message: "end".into(),
        },
    ]);
    ev
}

/// A client (the VM's peer) at 10.77.0.100:`client_port` talking to the VM's port 7 (the [`tuple`] of the socket
/// fixtures), as the flow tracker reports
/// its segments: `seq`, `len`, the sender's highest sequence end and the receiver's last ACK before it, and the
/// sender's silence before it (ms).
pub struct FlowSeg {
    pub side: FlowSide,
    pub client_port: u16,
    pub seq: u32,
    pub len: u32,
    pub seq_end: Option<u32>,
    pub peer_ack: Option<u32>,
    pub silence_ms: u64,
    /// `gap_ns` in ms; `None`: the same as the silence.
    pub gap_ms: Option<u64>,
    pub flags: u8,
}

impl FlowSeg {
    /// A data segment (PSH|ACK) from `side`.
    pub fn data(side: FlowSide, client_port: u16, seq: u32, len: u32) -> Self {
        Self {
            side,
            client_port,
            seq,
            len,
            seq_end: Some(seq.wrapping_add(len)),
            peer_ack: Some(seq),
            silence_ms: 0,
            gap_ms: None,
            flags: 0x18,
        }
    }

    #[must_use]
    pub fn silence(mut self, ms: u64) -> Self {
        self.silence_ms = ms;
        self
    }

    /// The time since the sender last sent new data, when it differs from the silence.
    #[must_use]
    pub fn gap(mut self, ms: u64) -> Self {
        self.gap_ms = Some(ms);
        self
    }

    #[must_use]
    pub fn seq_end(mut self, e: u32) -> Self {
        self.seq_end = Some(e);
        self
    }

    #[must_use]
    pub fn peer_ack(mut self, a: u32) -> Self {
        self.peer_ack = Some(a);
        self
    }

    #[must_use]
    pub fn flags(mut self, f: u8) -> Self {
        self.flags = f;
        self
    }

    /// The segment as seen on `port`.
    pub fn on(&self, p: &str) -> FlowSegment {
        FlowSegment {
            vm_addr: VM_IP.into(),
            vm_port: 7,
            peer_addr: Ipv4Addr::new(10, 77, 0, 100).into(),
            peer_port: self.client_port,
            port: port(p),
            direction: Direction::Ingress,
            side: self.side,
            tcp_flags: self.flags,
            seq: self.seq,
            ack: 1,
            len: self.len,
            window: 512,
            seq_end: self.seq_end,
            peer_ack: self.peer_ack,
            retransmits: 0,
            gap_ns: self.gap_ms.unwrap_or(self.silence_ms) * MS,
            silence_ns: self.silence_ms * MS,
            vlan: Vec::new(),
            frame: String::new(),
            frame_len: 0,
        }
    }
}

/// `flow_open`, `flow_retransmit`, `flow_reset`, `flow_fin` and `flow_progress` at `ts_ms` on port `p`.
pub fn flow_open(ts_ms: u64, s: &FlowSeg, p: &str) -> Event {
    Event::FlowOpen {
        ts_ns: ts_ms * MS,
        seg: s.on(p),
    }
}

pub fn flow_rtx(ts_ms: u64, s: &FlowSeg, p: &str) -> Event {
    Event::FlowRetransmit {
        ts_ns: ts_ms * MS,
        seg: s.on(p),
    }
}

pub fn flow_rst(ts_ms: u64, s: &FlowSeg, p: &str) -> Event {
    Event::FlowReset {
        ts_ns: ts_ms * MS,
        seg: s.on(p),
    }
}

pub fn flow_fin(ts_ms: u64, s: &FlowSeg, p: &str) -> Event {
    Event::FlowFin {
        ts_ns: ts_ms * MS,
        seg: s.on(p),
    }
}

pub fn flow_progress(ts_ms: u64, s: &FlowSeg, p: &str) -> Event {
    Event::FlowProgress {
        ts_ns: ts_ms * MS,
        seg: s.on(p),
    }
}
