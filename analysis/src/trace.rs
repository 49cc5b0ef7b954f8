//! The typed event model and the trace file.
//!
//! Everything migmon knows about a run is an [`Event`]: kernel events decoded from the ring buffer, per-port MAC
//! counters sampled from maps, migration phases from migrators or QMP. `migmon watch --json` prints them, `--record`
//! appends them to a trace, and `report`, `check`, `whatif` and `export` read the trace back.
//!
//! A trace is JSON lines: a [`TraceHeader`] line, then one event per line, each written whole (`migmon watch` writes
//! them in batches: whenever its queue runs empty, at least every 100 ms, and at the end), then a [`TraceEnd`] line
//! when the monitor finished its observation. A killed monitor therefore leaves a trace that is readable up to its
//! last complete line, without an end record; [`read_trace`] says when the last line was cut.
//! The end record counts the lines before it and carries a hash of them (FNV-1a, 64 bits), so a line dropped,
//! duplicated or altered after recording is noticed ([`Trace::damage`]). The hash guards against corruption, not
//! against someone editing the file on purpose. Traces written before the end record existed are still read; they
//! count as damaged (no end record). A trace without its end record whose writer still holds the file's lock
//! (`watch --record-dir` locks each file it writes, [`lock_for_writing`]) is in progress, not damaged
//! ([`Trace::in_progress`]). All times are `CLOCK_MONOTONIC` nanoseconds (`ts_ns`).

use std::{
    fmt,
    fs::File,
    io::{self, BufRead, BufReader, BufWriter, Write},
    net::{IpAddr, Ipv6Addr},
    path::{Path, PathBuf},
    str::FromStr,
};

pub use migmon_base::MacAddr;
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// Current trace format version.
pub const TRACE_VERSION: u32 = 1;

/// A TCP connection's 4-tuple, as the kernel socket saw it (`saddr` is the local side).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FourTuple {
    pub saddr: IpAddr,
    pub sport: u16,
    pub daddr: IpAddr,
    pub dport: u16,
}

/// Where on the L2 path a frame was seen.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Port {
    pub ifindex: u32,
    /// Interface name, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iface: Option<String>,
    /// Network namespace name (`None` = the root namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
}

impl fmt::Display for Port {
    /// `iface@netns`, or `if#N` when the name is unknown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.iface {
            Some(name) => f.write_str(name)?,
            None => write!(f, "if#{}", self.ifindex)?,
        }
        match &self.netns {
            Some(ns) => write!(f, "@{ns}"),
            None => Ok(()),
        }
    }
}

/// Direction of frames on a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Arriving on the interface (XDP): for a tap, frames the VM sent.
    Ingress,
    /// Leaving through the interface (TC egress): for a tap, frames delivered towards the VM.
    Egress,
}

/// A TCP socket state, as the kernel names it (`include/net/tcp_states.h`). Traces write the kernel's name
/// (`ESTABLISHED`, `SYN_SENT`, ...); a number the kernel may add later is kept as `UNKNOWN(n)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TcpState {
    Established,
    SynSent,
    SynRecv,
    FinWait1,
    FinWait2,
    TimeWait,
    Close,
    CloseWait,
    LastAck,
    Listen,
    Closing,
    NewSynRecv,
    Unknown(u32),
}

impl TcpState {
    const NAMED: [(TcpState, &'static str); 12] = [
        (TcpState::Established, "ESTABLISHED"),
        (TcpState::SynSent, "SYN_SENT"),
        (TcpState::SynRecv, "SYN_RECV"),
        (TcpState::FinWait1, "FIN_WAIT1"),
        (TcpState::FinWait2, "FIN_WAIT2"),
        (TcpState::TimeWait, "TIME_WAIT"),
        (TcpState::Close, "CLOSE"),
        (TcpState::CloseWait, "CLOSE_WAIT"),
        (TcpState::LastAck, "LAST_ACK"),
        (TcpState::Listen, "LISTEN"),
        (TcpState::Closing, "CLOSING"),
        (TcpState::NewSynRecv, "NEW_SYN_RECV"),
    ];

    /// The state of the kernel's number (`TCP_ESTABLISHED` = 1, ...); `None` for 0, which the probes report when
    /// they could not read the socket's state.
    pub fn from_kernel(n: u32) -> Option<Self> {
        match n {
            0 => None,
            1..=12 => Some(Self::NAMED[n as usize - 1].0),
            other => Some(Self::Unknown(other)),
        }
    }

    /// The kernel's name.
    pub fn name(self) -> std::borrow::Cow<'static, str> {
        match self {
            Self::Unknown(n) => format!("UNKNOWN({n})").into(),
            named => Self::NAMED
                .iter()
                .find(|(s, _)| *s == named)
                .map_or("UNKNOWN".into(), |(_, name)| (*name).into()),
        }
    }
}

impl fmt::Display for TcpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.name())
    }
}

/// A text that is not a TCP state name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a TCP state (ESTABLISHED, SYN_SENT, ..., CLOSE, or UNKNOWN(n))")]
pub struct TcpStateParseError(String);

impl FromStr for TcpState {
    type Err = TcpStateParseError;

    fn from_str(s: &str) -> Result<Self, TcpStateParseError> {
        if let Some((state, _)) = Self::NAMED.iter().find(|(_, name)| *name == s) {
            return Ok(*state);
        }
        s.strip_prefix("UNKNOWN(")
            .and_then(|r| r.strip_suffix(')'))
            .and_then(|n| n.parse().ok())
            .map(Self::Unknown)
            .ok_or_else(|| TcpStateParseError(s.to_owned()))
    }
}

impl Serialize for TcpState {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.name())
    }
}

impl<'de> Deserialize<'de> for TcpState {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<str>::deserialize(deserializer)?;
        s.parse().map_err(de::Error::custom)
    }
}

/// `Option<TcpState>` as a trace writes it: the state's name, or `""` when the probe could not read it.
pub mod state_or_empty {
    use super::{Deserialize, Deserializer, Serializer, TcpState, de};

    pub fn serialize<S: Serializer>(state: &Option<TcpState>, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&super::state_text(*state))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<TcpState>, D::Error> {
        let s = std::borrow::Cow::<str>::deserialize(deserializer)?;
        if s.is_empty() {
            Ok(None)
        } else {
            s.parse().map(Some).map_err(de::Error::custom)
        }
    }
}

/// A state as traces write it: its name, or `""` for `None`.
pub fn state_text(state: Option<TcpState>) -> std::borrow::Cow<'static, str> {
    state.map_or("".into(), TcpState::name)
}

/// Where a migration's pause window came from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PauseSource {
    /// A migrator's phase events (`--events-listen`, `--events`).
    #[default]
    Migrator,
    /// QEMU's QMP events (`--qmp`).
    Qmp,
    /// libvirt's domain events (`--libvirt`).
    Libvirt,
    /// Inferred from the data plane (the VM's MAC moving between ports).
    Wire,
}

impl PauseSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Migrator => "migrator",
            Self::Qmp => "qmp",
            Self::Libvirt => "libvirt",
            Self::Wire => "wire",
        }
    }
}

impl fmt::Display for PauseSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// An ARP-family frame (ARP, GARP or RARP) as XDP saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArpFrame {
    #[serde(flatten)]
    pub port: Port,
    /// Ethernet source MAC.
    pub mac: MacAddr,
    /// VLAN tags, outermost first (empty when untagged).
    #[serde(default)]
    pub vlan: Vec<u16>,
    /// ARP operation: 1 request, 2 reply, 3 RARP request, 4 RARP reply.
    pub op: u16,
    pub sha: MacAddr,
    pub spa: IpAddr,
    pub tha: MacAddr,
    pub tpa: IpAddr,
    /// The frame's first bytes (up to 128), hex, for pcapng export.
    #[serde(default)]
    pub frame: String,
    /// Original frame length in bytes.
    #[serde(default)]
    pub len: u32,
}

/// An ICMPv6 Neighbor Advertisement that announces an address (unsolicited, or with the override flag: the IPv6
/// counterpart of a gratuitous ARP), as the ingress parser saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NeighborAdvertFrame {
    #[serde(flatten)]
    pub port: Port,
    /// Ethernet source MAC.
    pub mac: MacAddr,
    /// VLAN tags, outermost first (empty when untagged).
    #[serde(default)]
    pub vlan: Vec<u16>,
    /// IPv6 source address.
    pub src_ip: Ipv6Addr,
    /// IPv6 destination address (`ff02::1` when unsolicited).
    pub dst_ip: Ipv6Addr,
    /// The address the advertisement is about.
    pub target: Ipv6Addr,
    /// R: the sender is a router.
    #[serde(default)]
    pub router: bool,
    /// S: a reply to a solicitation.
    #[serde(default)]
    pub solicited: bool,
    /// O: receivers replace the link-layer address they have cached.
    #[serde(default, rename = "override")]
    pub override_: bool,
    /// The target link-layer address option, when the advertisement carries one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tlla: Option<MacAddr>,
    /// The frame's first bytes (up to 128), hex, for pcapng export.
    #[serde(default)]
    pub frame: String,
    /// Original frame length in bytes.
    #[serde(default)]
    pub len: u32,
}

/// TCP fields common to the socket tracepoints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpCommon {
    #[serde(flatten)]
    pub tuple: FourTuple,
    /// Network namespace inode of the socket, when the probe could read it (0 = unknown).
    #[serde(default)]
    pub netns: u64,
}

/// Why a socket retransmitted, from its congestion state at `tcp:tcp_retransmit_skb`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetransmitKind {
    /// The retransmission timer expired (congestion state Loss).
    Rto,
    /// Fast retransmit or SACK/RACK recovery (congestion state Recovery).
    Fast,
    /// A tail-loss probe: a retransmission outside recovery, before any timeout (`retransmits` is 0).
    Tlp,
    /// A SYN or SYN-ACK sent again.
    Syn,
}

/// Which end of a tracked flow sent a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowSide {
    /// The watched VM.
    Vm,
    /// The VM's peer.
    Peer,
}

/// A TCP segment of a watched VM's flow, as the flow tracker saw it on a port, with the sender's state before it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowSegment {
    /// The VM's end of the connection.
    pub vm_addr: IpAddr,
    pub vm_port: u16,
    /// The other end.
    pub peer_addr: IpAddr,
    pub peer_port: u16,
    /// Where it was seen.
    #[serde(flatten)]
    pub port: Port,
    /// The hook that saw it: ingress (arriving on the interface) or egress (leaving through it).
    pub direction: Direction,
    /// Who sent the segment.
    pub side: FlowSide,
    /// TCP flags, as in the header (FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10).
    pub tcp_flags: u8,
    pub seq: u32,
    pub ack: u32,
    /// Payload bytes.
    pub len: u32,
    /// Advertised window, unscaled.
    pub window: u16,
    /// The sender's highest sequence end before this segment (`None` before its first segment with data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq_end: Option<u32>,
    /// The receiver's last ACK (`None` when the tracker has not seen one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_ack: Option<u32>,
    /// Retransmissions the sender made so far on this port, this one included.
    pub retransmits: u32,
    /// `flow_retransmit`: time since the sender last sent new data (its highest sequence end advanced).
    /// `flow_progress`: the quiet period that ended. Otherwise 0.
    #[serde(default)]
    pub gap_ns: u64,
    /// Time since the sender's previous segment on this port (0 = its first).
    #[serde(default)]
    pub silence_ns: u64,
    /// VLAN tags, outermost first (empty when untagged).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vlan: Vec<u16>,
    /// The frame's first bytes (up to 128), hex, for pcapng export; empty when the capture budget was spent.
    #[serde(default)]
    pub frame: String,
    /// Original frame length in bytes.
    #[serde(default)]
    pub frame_len: u32,
}

/// One event. Serialised with a `kind` tag; see `docs/events.md` for the schema.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// `tcp:tcp_retransmit_skb` (plus the socket's retransmit state from `tp_btf` where available).
    TcpRetransmit {
        ts_ns: u64,
        #[serde(flatten)]
        tcp: TcpCommon,
        #[serde(with = "state_or_empty")]
        state: Option<TcpState>,
        /// `icsk_retransmits`: retransmissions of the current segment so far.
        #[serde(default)]
        retransmits: u32,
        /// `icsk_backoff`: exponential backoff shift.
        #[serde(default)]
        backoff: u32,
        /// `icsk_rto` in microseconds (0 = unknown).
        #[serde(default)]
        rto_us: u64,
        /// Smoothed RTT (`srtt_us >> 3`) in microseconds (0 = unknown).
        #[serde(default)]
        srtt_us: u64,
        /// What kind of retransmission the socket's state says this is (absent when it could not be read).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retransmit_kind: Option<RetransmitKind>,
    },
    /// `sock:inet_sock_set_state` for TCP.
    TcpState {
        ts_ns: u64,
        #[serde(flatten)]
        tcp: TcpCommon,
        #[serde(with = "state_or_empty")]
        old_state: Option<TcpState>,
        #[serde(with = "state_or_empty")]
        new_state: Option<TcpState>,
    },
    /// `sock:inet_sk_error_report`: `errno` 110 is ETIMEDOUT (retransmit or user-timeout abort).
    TcpError {
        ts_ns: u64,
        #[serde(flatten)]
        tcp: TcpCommon,
        errno: i32,
        #[serde(default, with = "state_or_empty")]
        state: Option<TcpState>,
    },
    /// `tcp:tcp_receive_reset`: this socket received a RST.
    TcpResetIn {
        ts_ns: u64,
        #[serde(flatten)]
        tcp: TcpCommon,
        #[serde(default, with = "state_or_empty")]
        state: Option<TcpState>,
    },
    /// `tcp:tcp_send_reset`: this socket sent a RST.
    TcpResetOut {
        ts_ns: u64,
        #[serde(flatten)]
        tcp: TcpCommon,
        #[serde(default, with = "state_or_empty")]
        state: Option<TcpState>,
    },
    /// ARP request or reply that is not gratuitous.
    Arp {
        ts_ns: u64,
        #[serde(flatten)]
        frame: ArpFrame,
    },
    /// Gratuitous ARP (spa == tpa).
    Garp {
        ts_ns: u64,
        #[serde(flatten)]
        frame: ArpFrame,
    },
    /// Reverse ARP (ethertype 0x8035), as hypervisors send after a migration.
    Rarp {
        ts_ns: u64,
        #[serde(flatten)]
        frame: ArpFrame,
    },
    /// ICMPv6 Neighbor Advertisement that announces (unsolicited, or with the override flag).
    NeighborAdvert {
        ts_ns: u64,
        #[serde(flatten)]
        frame: NeighborAdvertFrame,
    },
    /// `bridge:br_fdb_update`: `mac` was (re)learned on `port` of `bridge`.
    FdbUpdate {
        ts_ns: u64,
        bridge: String,
        port: String,
        mac: MacAddr,
        #[serde(default)]
        vlan: u16,
        /// Network namespace of the bridge, when known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        netns: Option<String>,
    },
    /// A watched MAC was seen on a port for the first time, or again after a silence (`gap_ns` since its last
    /// frame there; 0 = first time).
    MacSeen {
        ts_ns: u64,
        mac: MacAddr,
        #[serde(flatten)]
        port: Port,
        direction: Direction,
        #[serde(default)]
        gap_ns: u64,
    },
    /// Cumulative per-(MAC, port, direction) counters sampled from the maps. Emitted when they changed.
    MacStats {
        ts_ns: u64,
        mac: MacAddr,
        #[serde(flatten)]
        port: Port,
        direction: Direction,
        frames: u64,
        bytes: u64,
        first_ns: u64,
        last_ns: u64,
    },
    /// Events the kernel could not hand over (ring buffer full), per CPU. Never silent.
    Loss { ts_ns: u64, cpu: u32, count: u64 },
    /// Frames the parser passed without reading (truncated or odd), per port, cumulative.
    Malformed {
        ts_ns: u64,
        #[serde(flatten)]
        port: Port,
        count: u64,
    },
    /// The flow tracker picked up a watched flow (its first segment on this port, mid-stream or a SYN).
    FlowOpen {
        ts_ns: u64,
        #[serde(flatten)]
        seg: FlowSegment,
    },
    /// A segment with data inside sequence space its sender already sent: a retransmission.
    FlowRetransmit {
        ts_ns: u64,
        #[serde(flatten)]
        seg: FlowSegment,
    },
    /// A RST (`side` sent it).
    FlowReset {
        ts_ns: u64,
        #[serde(flatten)]
        seg: FlowSegment,
    },
    /// The first FIN of a side.
    FlowFin {
        ts_ns: u64,
        #[serde(flatten)]
        seg: FlowSegment,
    },
    /// A side started advertising a zero window.
    FlowZeroWindow {
        ts_ns: u64,
        #[serde(flatten)]
        seg: FlowSegment,
    },
    /// A side's first forward progress (new data, or an ACK of new data) after a quiet period (`gap_ns`).
    FlowProgress {
        ts_ns: u64,
        #[serde(flatten)]
        seg: FlowSegment,
    },
    /// The flow tracker's counters, cumulative, sampled when they change.
    FlowTable {
        ts_ns: u64,
        /// Flows inserted into the tables.
        inserts: u64,
        /// Flows in the tables at the sample.
        entries: u64,
        /// Flows the tables evicted to make room (least recently used first): their state was lost.
        evictions: u64,
        /// Flows the kernel could not insert (not tracked).
        insert_failed: u64,
        /// Flow records sent without their frame bytes (capture rate limit).
        capture_dropped: u64,
        /// Later IP fragments skipped (no TCP header in them). Absent in traces written before it was counted.
        #[serde(default)]
        fragments: u64,
    },
    /// A migration phase, from a migrator's event stream, QMP, or inferred from the wire.
    Migration {
        #[serde(flatten)]
        ev: migevents::MigrationEvent,
        /// Where the figure came from: `migrator`, `qmp` or `wire`.
        #[serde(default)]
        source: PauseSource,
    },
    /// Offset measured once between a wall clock source (QMP) and `CLOCK_MONOTONIC`: mono = wall - offset.
    ClockOffset {
        ts_ns: u64,
        source: String,
        wall_minus_mono_ns: i64,
    },
    /// The host's clocks read together (see [`ClockTriple`]), every 10 s while recording: with the header's
    /// triple, they let a merge of traces from several hosts see each clock's drift and any realtime step.
    ClockSample {
        /// `CLOCK_MONOTONIC` ns, the middle of the read.
        ts_ns: u64,
        /// `CLOCK_REALTIME`, Unix ns.
        realtime_ns: u64,
        /// `CLOCK_BOOTTIME` ns (monotonic plus the time spent suspended).
        boottime_ns: u64,
        /// Half the width of the monotonic reads around the other two: the realtime and boottime readings lie
        /// within `ts_ns ± uncertainty_ns`.
        uncertainty_ns: u64,
    },
    /// The probes were attached to a port: at start (`--iface`), when it joined a watched bridge (`--bridge`), or
    /// when a VM's interface was registered (libvirt). From then until its `port_detached`, its frames are seen.
    PortAttached {
        ts_ns: u64,
        #[serde(flatten)]
        port: Port,
        /// The watched bridge the port belongs to (`--bridge`), when it came from one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bridge: Option<String>,
        /// The hooks attached: `tc ingress`, `tc egress`, `xdp driver`, `xdp skb`.
        #[serde(default)]
        hooks: Vec<String>,
        /// Why it was attached: `iface`, `bridge`, `libvirt`, ...
        #[serde(default)]
        origin: String,
        /// When the monitor read the kernel's notification that the port appeared (`RTM_NEWLINK`), for ports that
        /// come and go: `ts_ns - notified_ns` is the attach latency.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        notified_ns: Option<u64>,
    },
    /// The probes left a port: it was deleted, left its bridge, or its bridge went away.
    PortDetached {
        ts_ns: u64,
        #[serde(flatten)]
        port: Port,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bridge: Option<String>,
        /// `deleted`, `left the bridge`, `bridge deleted`.
        #[serde(default)]
        reason: String,
        /// When the notification was read (`RTM_DELLINK`, or `RTM_NEWLINK` with another master).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        notified_ns: Option<u64>,
    },
    /// A port that should have been watched could not be attached: its frames are not seen. Counted.
    PortFailed {
        ts_ns: u64,
        #[serde(flatten)]
        port: Port,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bridge: Option<String>,
        error: String,
    },
    /// A VM's MAC was learned and is watched from now on (counters, first-seen, FDB moves, flows by MAC).
    MacLearned {
        ts_ns: u64,
        mac: MacAddr,
        /// Where it was learned: `fdb` (the bridge learned it on a tap), `qmp` (`query-rx-filter`), `libvirt`
        /// (domain XML), `migrator` (a migration's setup event).
        source: String,
        /// The port it was learned on, when there is one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        iface: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        netns: Option<String>,
    },
    /// Input the monitor skipped (a line that did not parse, a kernel record it could not decode, a line too long),
    /// counted per source and reason since the watch started: cumulative, written when the count changes and at
    /// the end.
    Skipped {
        ts_ns: u64,
        /// Where the input came from: `kernel`, `migrator`, `qmp`, `trace`, ...
        source: String,
        /// Why it was skipped: `undecodable`, `malformed`, `too_long`, ...
        reason: String,
        count: u64,
    },
    /// A note from the monitor itself (warnings about skipped input, attach fallbacks).
    Note {
        ts_ns: u64,
        level: String,
        message: String,
    },
}

/// What a report says of a trace still being written.
pub const IN_PROGRESS: &str = "still being written by a running migmon watch: read up to its last complete line; migrations in it may \
     not have settled yet";

/// Writes `Event::ts_ns` and `Event::ts_ns_mut` from one list of the variants that carry `ts_ns` themselves, so the
/// two cannot drift apart when a kind is added. `Migration` keeps its time in its inner event.
macro_rules! event_times {
    ($($variant:ident),+ $(,)?) => {
        impl Event {
            /// The event's time, `CLOCK_MONOTONIC` ns.
            pub fn ts_ns(&self) -> u64 {
                match self {
                    $(Event::$variant { ts_ns, .. })|+ => *ts_ns,
                    Event::Migration { ev, .. } => ev.ts_ns,
                }
            }

            /// The event's time, to be rewritten (for example into another host's clock).
            pub fn ts_ns_mut(&mut self) -> &mut u64 {
                match self {
                    $(Event::$variant { ts_ns, .. })|+ => ts_ns,
                    Event::Migration { ev, .. } => &mut ev.ts_ns,
                }
            }
        }
    };
}

event_times!(
    TcpRetransmit,
    TcpState,
    TcpError,
    TcpResetIn,
    TcpResetOut,
    Arp,
    Garp,
    Rarp,
    NeighborAdvert,
    FdbUpdate,
    MacSeen,
    MacStats,
    Loss,
    Malformed,
    ClockOffset,
    ClockSample,
    FlowOpen,
    FlowRetransmit,
    FlowReset,
    FlowFin,
    FlowZeroWindow,
    FlowProgress,
    FlowTable,
    PortAttached,
    PortDetached,
    PortFailed,
    MacLearned,
    Skipped,
    Note,
);

impl Event {
    /// The `kind` tag, as in the JSON.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::TcpRetransmit { .. } => "tcp_retransmit",
            Event::TcpState { .. } => "tcp_state",
            Event::TcpError { .. } => "tcp_error",
            Event::TcpResetIn { .. } => "tcp_reset_in",
            Event::TcpResetOut { .. } => "tcp_reset_out",
            Event::Arp { .. } => "arp",
            Event::Garp { .. } => "garp",
            Event::Rarp { .. } => "rarp",
            Event::NeighborAdvert { .. } => "neighbor_advert",
            Event::FdbUpdate { .. } => "fdb_update",
            Event::MacSeen { .. } => "mac_seen",
            Event::MacStats { .. } => "mac_stats",
            Event::Loss { .. } => "loss",
            Event::Malformed { .. } => "malformed",
            Event::Migration { .. } => "migration",
            Event::ClockOffset { .. } => "clock_offset",
            Event::ClockSample { .. } => "clock_sample",
            Event::Note { .. } => "note",
            Event::FlowOpen { .. } => "flow_open",
            Event::FlowRetransmit { .. } => "flow_retransmit",
            Event::FlowReset { .. } => "flow_reset",
            Event::FlowFin { .. } => "flow_fin",
            Event::FlowZeroWindow { .. } => "flow_zero_window",
            Event::FlowProgress { .. } => "flow_progress",
            Event::FlowTable { .. } => "flow_table",
            Event::PortAttached { .. } => "port_attached",
            Event::PortDetached { .. } => "port_detached",
            Event::PortFailed { .. } => "port_failed",
            Event::MacLearned { .. } => "mac_learned",
            Event::Skipped { .. } => "skipped",
        }
    }

    /// The flow segment of a `flow_*` event.
    pub fn flow_segment(&self) -> Option<&FlowSegment> {
        match self {
            Event::FlowOpen { seg, .. }
            | Event::FlowRetransmit { seg, .. }
            | Event::FlowReset { seg, .. }
            | Event::FlowFin { seg, .. }
            | Event::FlowZeroWindow { seg, .. }
            | Event::FlowProgress { seg, .. } => Some(seg),
            _ => None,
        }
    }
}

/// `CLOCK_MONOTONIC`, `CLOCK_REALTIME` and `CLOCK_BOOTTIME` read together: the realtime and boottime reads sit
/// between two monotonic reads, and the narrowest of a few tries is kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockTriple {
    /// `CLOCK_MONOTONIC` ns, the middle of the two monotonic reads.
    pub mono_ns: u64,
    /// `CLOCK_REALTIME`, Unix ns.
    pub realtime_ns: u64,
    /// `CLOCK_BOOTTIME` ns.
    pub boottime_ns: u64,
    /// Half the distance between the two monotonic reads.
    pub uncertainty_ns: u64,
}

impl ClockTriple {
    /// The triple as a `clock_sample` event.
    pub fn to_event(self) -> Event {
        Event::ClockSample {
            ts_ns: self.mono_ns,
            realtime_ns: self.realtime_ns,
            boottime_ns: self.boottime_ns,
            uncertainty_ns: self.uncertainty_ns,
        }
    }
}

/// The latest time a trace may hold, ns (2^62: 146 years of uptime). A later one can only come from a damaged line:
/// the reader skips it, so that the analysis never computes with times near `u64::MAX`.
pub const MAX_TRACE_NS: u64 = 1 << 62;

impl Event {
    /// Checks the times an event carries against [`MAX_TRACE_NS`].
    pub fn check_times(&self) -> Result<(), String> {
        let mut times = vec![("ts_ns", self.ts_ns())];
        match self {
            Event::MacStats {
                first_ns, last_ns, ..
            } => times.extend([("first_ns", *first_ns), ("last_ns", *last_ns)]),
            Event::MacSeen { gap_ns, .. } => times.push(("gap_ns", *gap_ns)),
            Event::PortAttached {
                notified_ns: Some(n), ..
            }
            | Event::PortDetached {
                notified_ns: Some(n), ..
            } => times.push(("notified_ns", *n)),
            _ => {}
        }
        if let Some(seg) = self.flow_segment() {
            times.extend([("gap_ns", seg.gap_ns), ("silence_ns", seg.silence_ns)]);
        }
        match times.iter().find(|(_, t)| *t > MAX_TRACE_NS) {
            Some((name, t)) => Err(format!(
                "{name} {t} is beyond any monotonic clock ({MAX_TRACE_NS} ns at most)"
            )),
            None => Ok(()),
        }
    }
}

/// The first line of a trace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceHeader {
    /// Always `"trace_header"`.
    pub kind: String,
    pub version: u32,
    /// migmon's version.
    pub migmon: String,
    /// `CLOCK_MONOTONIC` ns when recording started.
    pub start_mono_ns: u64,
    /// Wall clock (Unix ns) at the same instant, so reports can print dates.
    pub start_unix_ns: u64,
    pub hostname: String,
    /// The command line that recorded it.
    #[serde(default)]
    pub command: Vec<String>,
    /// The kernel's boot id (`/proc/sys/kernel/random/boot_id`): with the host name, which clock the trace's
    /// monotonic times are on. Empty in traces from before it was recorded.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub boot_id: String,
    /// The three clocks read together when recording started (absent in older traces).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clocks: Option<ClockTriple>,
}

/// The last line of a trace that the monitor finished writing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceEnd {
    /// Always `"trace_end"`.
    pub kind: String,
    /// `CLOCK_MONOTONIC` ns when recording ended.
    pub ts_ns: u64,
    /// Lines written between the header and this record.
    pub lines: u64,
    /// FNV-1a (64 bits) of every line before this record, the header included, each without its newline and
    /// followed by one `\n` byte; 16 hex digits.
    pub hash: String,
}

/// FNV-1a, 64 bits, over a trace's lines.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LineHash(u64);

impl LineHash {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    fn new() -> Self {
        Self(Self::OFFSET)
    }

    /// Adds one line (without its newline); the newline is hashed as one `\n` byte.
    fn line(&mut self, bytes: &[u8]) {
        for &b in bytes.iter().chain(b"\n") {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(Self::PRIME);
        }
    }

    fn hex(self) -> String {
        format!("{:016x}", self.0)
    }
}

/// Errors reading or writing traces.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("cannot create trace {}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open trace {}: check the path (traces come from `migmon watch --record FILE`)", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read trace {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write to trace")]
    Write(#[source] io::Error),
    #[error("{} is not a migmon trace: its first line is not a trace header", path.display())]
    NoHeader { path: PathBuf },
    #[error("{} is trace version {found}, this migmon reads version {TRACE_VERSION}", path.display())]
    Version { path: PathBuf, found: u32 },
}

/// Appends events to a trace file: [`TraceWriter::write`] one flushed line at a time, [`TraceWriter::write_line`]
/// buffered until [`TraceWriter::flush`].
pub struct TraceWriter {
    out: BufWriter<File>,
    /// Lines written after the header.
    lines: u64,
    hash: LineHash,
    /// Bytes written, header included.
    bytes: u64,
}

/// How much [`TraceWriter::write_line`] buffers before it writes to the file on its own.
const TRACE_BUFFER: usize = 64 * 1024;

impl TraceWriter {
    /// Creates (truncates) `path` and writes the header.
    pub fn create(path: &Path, header: &TraceHeader) -> Result<Self, TraceError> {
        let file = File::create(path).map_err(|source| TraceError::Create {
            path: path.to_owned(),
            source,
        })?;
        let mut w = Self {
            out: BufWriter::with_capacity(TRACE_BUFFER, file),
            lines: 0,
            hash: LineHash::new(),
            bytes: 0,
        };
        w.write_json(header)?;
        w.lines = 0;
        Ok(w)
    }

    /// Writes the end record: the trace is complete. `ts_ns` is the time recording ended.
    pub fn finish(mut self, ts_ns: u64) -> Result<(), TraceError> {
        let end = TraceEnd {
            kind: "trace_end".to_owned(),
            ts_ns,
            lines: self.lines,
            hash: self.hash.hex(),
        };
        let line = serde_json::to_vec(&end).map_err(|e| TraceError::Write(e.into()))?;
        self.out.write_all(&line).map_err(TraceError::Write)?;
        self.out.write_all(b"\n").map_err(TraceError::Write)?;
        self.out.flush().map_err(TraceError::Write)
    }

    /// Appends one event and flushes it to the file.
    pub fn write(&mut self, ev: &Event) -> Result<(), TraceError> {
        self.write_json(ev)
    }

    fn write_json<T: Serialize>(&mut self, v: &T) -> Result<(), TraceError> {
        let line = serde_json::to_vec(v).map_err(|e| TraceError::Write(e.into()))?;
        self.write_line(&line)?;
        self.flush()
    }

    /// Appends one line that is an event already serialised (no newline), without flushing: [`TraceWriter::flush`]
    /// when a batch is done.
    pub fn write_line(&mut self, line: &[u8]) -> Result<(), TraceError> {
        self.out.write_all(line).map_err(TraceError::Write)?;
        self.out.write_all(b"\n").map_err(TraceError::Write)?;
        self.hash.line(line);
        self.lines = self.lines.saturating_add(1);
        self.bytes = self.bytes.saturating_add(line.len() as u64 + 1);
        Ok(())
    }

    /// Writes what [`TraceWriter::write_line`] buffered to the file.
    pub fn flush(&mut self) -> Result<(), TraceError> {
        self.out.flush().map_err(TraceError::Write)
    }

    /// Bytes written so far, the header included: the file's size once flushed.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// A trace read back.
#[derive(Clone, Debug, Default)]
pub struct Trace {
    pub header: Option<TraceHeader>,
    pub events: Vec<Event>,
    /// The last line was cut short (the monitor was killed mid-write).
    pub truncated: bool,
    /// Lines that did not parse, with their 1-based line number and the error. Reported, never fatal.
    pub skipped: Vec<(usize, String)>,
    /// The end record, when the monitor finished the trace.
    pub end: Option<TraceEnd>,
    /// No end record yet, and a running monitor still writes the file (it holds the file's lock): what is there was
    /// read, a last line being written was left for later, and the missing end record is not damage.
    pub in_progress: bool,
    /// Lines read between the header and the end record (or the end of the file), and their hash.
    pub(crate) lines_read: u64,
    pub(crate) hash_read: Option<LineHash>,
    /// Non-empty lines after the end record, and end records after the first.
    pub(crate) lines_after_end: usize,
}

impl Trace {
    /// Total events lost in the kernel (sum of `loss` events; saturates rather than wrapping).
    pub fn lost_events(&self) -> u64 {
        lost_events(&self.events)
    }

    /// What is wrong with the file itself, beyond lines that did not parse ([`Trace::skipped`]) and a cut last line
    /// ([`Trace::truncated`]): no header, no end record, an end record that does not match the lines before it,
    /// lines after it. Empty for a trace the monitor wrote whole and nobody changed.
    pub fn damage(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.header.is_none() {
            out.push("the trace has no header line".to_owned());
        }
        match &self.end {
            None if self.in_progress => {}
            None => out.push(
                "the trace has no end record and no running migmon is writing it: the monitor was killed or crashed, \
                 the file was cut, or it was written by `watch --record` (which does not lock its file) of a watch \
                 still running or by a migmon older than the end record"
                    .to_owned(),
            ),
            Some(end) => {
                if end.lines != self.lines_read {
                    out.push(format!(
                        "the end record counts {} line(s), the file has {}: lines were dropped or duplicated",
                        end.lines, self.lines_read
                    ));
                } else if self.hash_read.map(LineHash::hex).as_deref() != Some(end.hash.as_str()) {
                    out.push(
                        "the lines do not match the end record's hash: the file was altered after recording"
                            .to_owned(),
                    );
                }
            }
        }
        if self.lines_after_end > 0 {
            out.push(format!("{} line(s) after the end record", self.lines_after_end));
        }
        out
    }
}

/// Sum of the `loss` events' counts, saturating at `u64::MAX`.
pub fn lost_events(events: &[Event]) -> u64 {
    events.iter().fold(0u64, |sum, e| match e {
        Event::Loss { count, .. } => sum.saturating_add(*count),
        _ => sum,
    })
}

/// Reads a trace. Unknown or malformed lines are skipped and listed; a cut last line sets `truncated`. A trace
/// whose writer holds its lock ([`lock_for_writing`]) and that has no end record yet is `in_progress`: its cut last
/// line is one being written, not damage.
pub fn read_trace(path: &Path) -> Result<Trace, TraceError> {
    let file = File::open(path).map_err(|source| TraceError::Open {
        path: path.to_owned(),
        source,
    })?;
    // Asked before reading: a writer that finishes meanwhile has written its end record by the time it unlocks.
    let locked = matches!(file.try_lock_shared(), Err(std::fs::TryLockError::WouldBlock));
    let mut trace = read_trace_from(BufReader::new(&file), path)?;
    if locked && trace.end.is_none() {
        trace.in_progress = true;
        trace.truncated = false;
    }
    Ok(trace)
}

/// Marks the trace at `path` as being written until the returned file is dropped (an exclusive `flock`), so a
/// reader tells a trace in progress from one whose writer died ([`Trace::in_progress`]). Take it before the first
/// write and drop it after the end record.
pub fn lock_for_writing(path: &Path) -> io::Result<File> {
    let f = File::options().create(true).append(true).open(path)?;
    f.lock()?;
    Ok(f)
}

/// Reads a trace from any reader; `path` names it in errors. Lines that are not UTF-8 or not JSON are skipped and
/// listed, never fatal; only a first line that is not a trace header is.
pub fn read_trace_from<R: BufRead>(mut reader: R, path: &Path) -> Result<Trace, TraceError> {
    let mut trace = Trace::default();
    let mut hash = LineHash::new();
    let mut buf = Vec::new();
    let mut lineno = 0usize;
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|source| TraceError::Read {
                path: path.to_owned(),
                source,
            })?;
        if n == 0 {
            break;
        }
        lineno = lineno.saturating_add(1);
        let complete = buf.ends_with(b"\n");
        let raw = buf.strip_suffix(b"\n").unwrap_or(&buf);
        if trace.end.is_some() {
            if !raw.iter().all(u8::is_ascii_whitespace) {
                trace.lines_after_end = trace.lines_after_end.saturating_add(1);
            }
            continue;
        }
        let text = std::str::from_utf8(raw);
        let line = text.map(str::trim).unwrap_or_default();
        if lineno == 1 {
            let header: TraceHeader = serde_json::from_str(line).map_err(|_| TraceError::NoHeader {
                path: path.to_owned(),
            })?;
            if header.kind != "trace_header" {
                return Err(TraceError::NoHeader {
                    path: path.to_owned(),
                });
            }
            if header.version != TRACE_VERSION {
                return Err(TraceError::Version {
                    path: path.to_owned(),
                    found: header.version,
                });
            }
            trace.header = Some(header);
            hash.line(raw);
            continue;
        }
        if complete
            && line.starts_with(r#"{"kind":"trace_end""#)
            && let Ok(end) = serde_json::from_str::<TraceEnd>(line)
        {
            trace.hash_read = Some(hash);
            trace.end = Some(end);
            continue;
        }
        hash.line(raw);
        trace.lines_read = trace.lines_read.saturating_add(1);
        if line.is_empty() && text.is_ok() {
            continue;
        }
        match text
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str::<Event>(t.trim()).map_err(|e| e.to_string()))
            .and_then(|ev| ev.check_times().map(|()| ev))
        {
            Ok(ev) => trace.events.push(ev),
            Err(_) if !complete => trace.truncated = true,
            Err(e) => trace.skipped.push((lineno, e)),
        }
    }
    Ok(trace)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn header() -> TraceHeader {
        TraceHeader {
            kind: "trace_header".into(),
            version: TRACE_VERSION,
            migmon: "test".into(),
            start_mono_ns: 1,
            start_unix_ns: 2,
            hostname: "h".into(),
            command: vec![],
            ..TraceHeader::default()
        }
    }

    fn retransmit(ts: u64) -> Event {
        Event::TcpRetransmit {
            ts_ns: ts,
            tcp: TcpCommon {
                tuple: FourTuple {
                    saddr: Ipv4Addr::new(10, 0, 0, 1).into(),
                    sport: 40000,
                    daddr: Ipv4Addr::new(10, 0, 0, 2).into(),
                    dport: 7,
                },
                netns: 0,
            },
            state: Some(TcpState::Established),
            retransmits: 1,
            backoff: 1,
            rto_us: 400_000,
            srtt_us: 0,
            retransmit_kind: None,
        }
    }

    #[test]
    fn round_trip_and_truncation() {
        let dir = std::env::temp_dir().join(format!("migmon-trace-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.trace");
        let mut w = TraceWriter::create(&path, &header()).unwrap();
        w.write(&retransmit(10)).unwrap();
        w.write(&Event::Loss {
            ts_ns: 11,
            cpu: 1,
            count: 5,
        })
        .unwrap();
        drop(w);
        let t = read_trace(&path).unwrap();
        assert_eq!(
            t.events,
            vec![
                retransmit(10),
                Event::Loss {
                    ts_ns: 11,
                    cpu: 1,
                    count: 5
                }
            ]
        );
        assert!(!t.truncated);
        assert_eq!(t.lost_events(), 5);

        // Cut the last line in half: the first event survives and the trace says it was truncated.
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, &text[..text.len() - 8]).unwrap();
        let t = read_trace(&path).unwrap();
        assert_eq!(t.events, vec![retransmit(10)]);
        assert!(t.truncated);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_end_record_notices_dropped_duplicated_and_altered_lines() {
        let dir = std::env::temp_dir().join(format!("migmon-trace-end-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.trace");
        let mut w = TraceWriter::create(&path, &header()).unwrap();
        for ts in [10, 20, 30] {
            w.write(&retransmit(ts)).unwrap();
        }
        w.finish(40).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let read = |text: &str| read_trace_from(text.as_bytes(), Path::new("t.trace")).unwrap();
        let t = read(&text);
        assert_eq!(t.events.len(), 3);
        assert_eq!(t.end.as_ref().map(|e| (e.ts_ns, e.lines)), Some((40, 3)));
        assert!(t.damage().is_empty(), "{:?}", t.damage());

        let lines: Vec<&str> = text.lines().collect();
        let join = |ls: &[&str]| ls.iter().flat_map(|l| [*l, "\n"]).collect::<String>();
        let dropped = join(&[lines[0], lines[1], lines[3], lines[4]]);
        assert!(read(&dropped).damage()[0].contains("dropped or duplicated"));
        let duplicated = join(&[lines[0], lines[1], lines[2], lines[2], lines[3], lines[4]]);
        assert!(read(&duplicated).damage()[0].contains("dropped or duplicated"));
        let altered = text.replacen("40000", "40001", 1);
        assert!(read(&altered).damage()[0].contains("hash"));
        let after = format!("{text}{}\n", lines[1]);
        assert!(read(&after).damage()[0].contains("after the end record"));
        let unfinished = join(&lines[..4]);
        let t = read(&unfinished);
        assert!(t.damage()[0].contains("no end record"));
        assert_eq!(t.events.len(), 3, "a trace without its end record is still read");
        // The same file, cut mid-line, while its writer holds the lock: in progress, not damaged.
        let cut = dir.join("cut.trace");
        std::fs::write(&cut, &unfinished[..unfinished.len() - 5]).unwrap();
        let dead = read_trace(&cut).unwrap();
        assert!(!dead.in_progress && dead.truncated);
        assert!(
            dead.damage()[0].contains("no running migmon"),
            "{:?}",
            dead.damage()
        );
        let lock = lock_for_writing(&cut).unwrap();
        let live = read_trace(&cut).unwrap();
        assert!(live.in_progress && !live.truncated, "{live:?}");
        assert!(live.damage().is_empty(), "{:?}", live.damage());
        assert_eq!(live.events.len(), 2, "the line being written is left for later");
        drop(lock);
        assert!(
            !read_trace(&cut).unwrap().in_progress,
            "the lock goes with its writer"
        );
        // Bytes that are not UTF-8 skip their line rather than failing the read.
        let mut bytes = text.clone().into_bytes();
        let at = lines[0].len() + 5;
        bytes[at] = 0xff;
        let t = read_trace_from(bytes.as_slice(), Path::new("t.trace")).unwrap();
        assert_eq!((t.events.len(), t.skipped.len()), (2, 1));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn loss_sums_saturate() {
        let loss = |count| Event::Loss {
            ts_ns: 1,
            cpu: 0,
            count,
        };
        assert_eq!(lost_events(&[loss(u64::MAX - 1), loss(5)]), u64::MAX);
    }

    #[test]
    fn json_shape_is_flat_with_kind() {
        let v: serde_json::Value = serde_json::to_value(retransmit(10)).unwrap();
        assert_eq!(v["kind"], "tcp_retransmit");
        assert_eq!(v["saddr"], "10.0.0.1");
        assert_eq!(v["dport"], 7);
        assert_eq!(v["ts_ns"], 10);
    }
}
