//! Wire types shared by migmon's kernel programs (monitor-ebpf) and user space (monitor).
//!
//! Every record the kernel programs put in the ring buffer starts with an [`EventHeader`] (`kind`, `cpu`, `ts_ns`)
//! and is one of the fixed `#[repr(C)]` layouts below, chosen by [`EventKind`]. There is no `bool`, Rust enum or
//! `Option` on the wire: only integers and byte arrays, with explicit padding, and every layout is asserted at
//! compile time. Kinds are decoded with `TryFrom<u32>`, which rejects unknown values.
//!
//! The programs also read a [`ProbeConfig`] global, filled in by user space at load time with the tracepoint field
//! offsets (read from tracefs `format` files) and the kernel struct member offsets (read from BTF), and they keep
//! counters in maps keyed by [`MacKey`] with [`MacCounters`] values.
//!
//! With the `user` feature, the types implement `aya::Pod` and [`decode`] turns ring buffer bytes into a
//! [`WireEvent`].
#![no_std]

use core::mem::size_of;

/// Record kinds in the ring buffer.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// `tcp:tcp_retransmit_skb`, payload [`TcpEvent`].
    TcpRetransmit = 1,
    /// `sock:inet_sock_set_state` (TCP only), payload [`TcpEvent`].
    TcpState = 2,
    /// `sock:inet_sk_error_report` (TCP only), payload [`TcpEvent`].
    TcpError = 3,
    /// `tcp:tcp_receive_reset`, payload [`TcpEvent`].
    TcpResetIn = 4,
    /// `tcp:tcp_send_reset`, payload [`TcpEvent`].
    TcpResetOut = 5,
    /// An ARP or RARP frame seen by XDP, payload [`ArpEvent`].
    Arp = 6,
    /// `bridge:br_fdb_update`, payload [`FdbEvent`].
    FdbUpdate = 7,
    /// A watched MAC seen on a port for the first time or after a silence, payload [`MacSeenEvent`].
    MacSeen = 8,
    /// The flow tracker saw a watched flow for the first time (picked up mid-stream or at its SYN), payload
    /// [`FlowEvent`].
    FlowOpen = 9,
    /// A segment with data inside sequence space already seen in its direction, payload [`FlowEvent`].
    FlowRetransmit = 10,
    /// A segment with RST, payload [`FlowEvent`] (`side` says who sent it).
    FlowReset = 11,
    /// The first FIN in a direction, payload [`FlowEvent`].
    FlowFin = 12,
    /// A side started advertising a zero receive window, payload [`FlowEvent`].
    FlowZeroWindow = 13,
    /// A side's first forward progress (new data, or an ACK of new data) after a quiet period longer than
    /// `ProbeConfig::flow_quiet_ns`, payload [`FlowEvent`].
    FlowProgress = 14,
    /// An ICMPv6 Neighbor Advertisement that announces (unsolicited, or with the override flag), payload
    /// [`NeighborAdvertEvent`].
    NeighborAdvert = 15,
}

/// An unknown record kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownKind(pub u32);

impl TryFrom<u32> for EventKind {
    type Error = UnknownKind;

    fn try_from(v: u32) -> Result<Self, Self::Error> {
        Ok(match v {
            1 => Self::TcpRetransmit,
            2 => Self::TcpState,
            3 => Self::TcpError,
            4 => Self::TcpResetIn,
            5 => Self::TcpResetOut,
            6 => Self::Arp,
            7 => Self::FdbUpdate,
            8 => Self::MacSeen,
            9 => Self::FlowOpen,
            10 => Self::FlowRetransmit,
            11 => Self::FlowReset,
            12 => Self::FlowFin,
            13 => Self::FlowZeroWindow,
            14 => Self::FlowProgress,
            15 => Self::NeighborAdvert,
            other => return Err(UnknownKind(other)),
        })
    }
}

/// The header every ring buffer record starts with.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    /// An [`EventKind`] value.
    pub kind: u32,
    /// CPU the program ran on.
    pub cpu: u32,
    /// `bpf_ktime_get_ns()`: `CLOCK_MONOTONIC` nanoseconds.
    pub ts_ns: u64,
}

/// Address family values as the kernel uses them.
pub const AF_INET: u16 = 2;
/// IPv6 address family.
pub const AF_INET6: u16 = 10;

/// A TCP 4-tuple. Addresses are in network byte order; an IPv4 address fills the first 4 bytes and the rest is
/// zero. Ports are in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpTuple {
    /// [`AF_INET`] or [`AF_INET6`] (0 = unknown).
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    pub pad: u16,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

/// Any of the TCP records. Which fields mean something depends on the kind (see docs/events.md).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpEvent {
    pub header: EventHeader,
    pub tuple: TcpTuple,
    /// Network namespace inode of the socket (0 = unknown).
    pub netns: u64,
    /// TCP state (kernel numbering, 1 = ESTABLISHED); for `TcpState` the old state.
    pub state: u32,
    /// For `TcpState`: the new state.
    pub new_state: u32,
    /// For `TcpError`: the positive errno.
    pub errno: i32,
    /// `icsk_retransmits` (`TcpRetransmit`).
    pub retransmits: u32,
    /// `icsk_backoff` (`TcpRetransmit`).
    pub backoff: u32,
    /// `icsk_rto` in jiffies (`TcpRetransmit`; 0 = unknown).
    pub rto_jiffies: u32,
    /// `srtt_us` (8 times the smoothed RTT in microseconds, as the kernel keeps it; 0 = unknown).
    pub srtt_us8: u32,
    /// For `TcpResetOut`: the kernel's `sk_rst_reason` (0 = unknown).
    pub reason: u32,
    /// `TcpRetransmit`: the congestion state (`icsk_ca_state`: 0 Open, 1 Disorder, 2 CWR, 3 Recovery, 4 Loss), or
    /// [`UNKNOWN_U8`].
    pub ca_state: u8,
    /// `TcpRetransmit`: the pending timer (`icsk_pending`: 1 retransmit, 3 zero-window probe, 5 loss probe), or
    /// [`UNKNOWN_U8`].
    pub pending: u8,
    pub pad2: u16,
    /// `TcpRetransmit`: `tlp_high_seq` (non-zero while a tail-loss probe is outstanding).
    pub tlp_high_seq: u32,
}

/// A socket byte field the probe could not read.
pub const UNKNOWN_U8: u8 = 0xff;

/// Maximum frame bytes an [`ArpEvent`] carries.
pub const FRAME_CAPTURE: usize = 128;

/// An ARP (0x0806) or RARP (0x8035) frame seen by XDP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArpEvent {
    pub header: EventHeader,
    /// Interface the frame arrived on.
    pub ifindex: u32,
    /// User-space id of the network namespace the program instance is attached in.
    pub netns_id: u32,
    /// 0x0806 (ARP) or 0x8035 (RARP).
    pub ethertype: u16,
    /// ARP operation (1 request, 2 reply, 3 RARP request, 4 RARP reply).
    pub op: u16,
    /// VLAN ids, outermost first; `vlan_count` of them are valid.
    pub vlan: [u16; 2],
    pub vlan_count: u16,
    pub pad0: u16,
    /// Ethernet source MAC.
    pub src_mac: [u8; 6],
    pub pad1: [u8; 2],
    pub sha: [u8; 6],
    pub tha: [u8; 6],
    pub spa: [u8; 4],
    pub tpa: [u8; 4],
    /// Length of the whole frame.
    pub frame_len: u32,
    /// Bytes of the frame copied into `frame` (at most [`FRAME_CAPTURE`]).
    pub cap_len: u32,
    pub frame: [u8; FRAME_CAPTURE],
}

impl Default for ArpEvent {
    fn default() -> Self {
        Self {
            header: EventHeader::default(),
            ifindex: 0,
            netns_id: 0,
            ethertype: 0,
            op: 0,
            vlan: [0; 2],
            vlan_count: 0,
            pad0: 0,
            src_mac: [0; 6],
            pad1: [0; 2],
            sha: [0; 6],
            tha: [0; 6],
            spa: [0; 4],
            tpa: [0; 4],
            frame_len: 0,
            cap_len: 0,
            frame: [0; FRAME_CAPTURE],
        }
    }
}

/// [`NeighborAdvertEvent::flags`]: the sender is a router (R).
pub const NA_ROUTER: u8 = 0x80;
/// [`NeighborAdvertEvent::flags`]: sent in reply to a Neighbor Solicitation (S).
pub const NA_SOLICITED: u8 = 0x40;
/// [`NeighborAdvertEvent::flags`]: receivers replace the link-layer address they have cached (O).
pub const NA_OVERRIDE: u8 = 0x20;

/// Whether a Neighbor Advertisement with these flags announces an address, as a gratuitous ARP does: an
/// unsolicited one (S clear; every NA sent to a multicast address has S clear), or one that overrides caches (O).
/// A solicited NA without override only answers a question and moves nothing.
#[inline]
pub const fn na_announces(flags: u8) -> bool {
    flags & NA_SOLICITED == 0 || flags & NA_OVERRIDE != 0
}

/// An ICMPv6 Neighbor Advertisement (type 136) that announces (see [`na_announces`]), seen by the ingress parser.
/// Addresses are in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NeighborAdvertEvent {
    pub header: EventHeader,
    /// Interface the frame arrived on.
    pub ifindex: u32,
    /// User-space id of the network namespace the program instance is attached in.
    pub netns_id: u32,
    /// VLAN ids, outermost first; `vlan_count` of them are valid.
    pub vlan: [u16; 2],
    pub vlan_count: u16,
    /// The NA's flag byte: [`NA_ROUTER`], [`NA_SOLICITED`], [`NA_OVERRIDE`].
    pub flags: u8,
    /// 1 when the NA's first option is a target link-layer address (then in `tlla`), else 0.
    pub has_tlla: u8,
    /// Ethernet source MAC.
    pub src_mac: [u8; 6],
    /// Target link-layer address option (zero when absent).
    pub tlla: [u8; 6],
    /// Length of the whole frame.
    pub frame_len: u32,
    /// Bytes of the frame copied into `frame` (at most [`FRAME_CAPTURE`]).
    pub cap_len: u32,
    pub pad0: u32,
    /// IPv6 source address.
    pub src_ip: [u8; 16],
    /// IPv6 destination address (`ff02::1` for an unsolicited NA).
    pub dst_ip: [u8; 16],
    /// The address the NA is about.
    pub target: [u8; 16],
    pub frame: [u8; FRAME_CAPTURE],
}

impl Default for NeighborAdvertEvent {
    fn default() -> Self {
        Self {
            header: EventHeader::default(),
            ifindex: 0,
            netns_id: 0,
            vlan: [0; 2],
            vlan_count: 0,
            flags: 0,
            has_tlla: 0,
            src_mac: [0; 6],
            tlla: [0; 6],
            frame_len: 0,
            cap_len: 0,
            pad0: 0,
            src_ip: [0; 16],
            dst_ip: [0; 16],
            target: [0; 16],
            frame: [0; FRAME_CAPTURE],
        }
    }
}

/// Interface name length in the kernel (`IFNAMSIZ`).
pub const IFNAMSIZ: usize = 16;

/// `bridge:br_fdb_update`: `mac` (re)learned on port `dev` of bridge `br_dev`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FdbEvent {
    pub header: EventHeader,
    /// NUL-terminated bridge name.
    pub br_dev: [u8; IFNAMSIZ],
    /// NUL-terminated port name.
    pub dev: [u8; IFNAMSIZ],
    pub mac: [u8; 6],
    pub vid: u16,
}

/// Direction values on the wire.
pub const DIR_INGRESS: u8 = 0;
/// Frames leaving through the interface (TC egress).
pub const DIR_EGRESS: u8 = 1;

/// A watched MAC on a port: first frame, or first frame after a silence longer than the configured gap.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MacSeenEvent {
    pub header: EventHeader,
    pub mac: [u8; 6],
    /// [`DIR_INGRESS`] or [`DIR_EGRESS`].
    pub direction: u8,
    pub pad0: u8,
    pub ifindex: u32,
    pub netns_id: u32,
    /// Silence since the previous frame on this port, ns (0 = first time).
    pub gap_ns: u64,
}

/// Key of the per-(MAC, port, direction) counter map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MacKey {
    pub mac: [u8; 6],
    /// [`DIR_INGRESS`] or [`DIR_EGRESS`].
    pub direction: u8,
    pub pad: u8,
    pub ifindex: u32,
}

/// Value of the per-(MAC, port, direction) counter map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MacCounters {
    pub frames: u64,
    pub bytes: u64,
    pub first_ns: u64,
    pub last_ns: u64,
}

/// A MAC address as a map key (6 bytes, 2 zero bytes of padding).
pub type MacKey8 = [u8; 8];

/// An IP address as a map key: IPv6, or IPv4-mapped IPv6 (`::ffff:a.b.c.d`).
pub type IpKey = [u8; 16];

/// Which end of a tracked flow sent a segment: the watched VM's side.
pub const SIDE_VM: u8 = 0;
/// The other end (the VM's peer).
pub const SIDE_PEER: u8 = 1;

/// TCP header flag bits, as in the header's 13th byte.
pub const TCP_FIN: u8 = 0x01;
/// SYN.
pub const TCP_SYN: u8 = 0x02;
/// RST.
pub const TCP_RST: u8 = 0x04;
/// PSH.
pub const TCP_PSH: u8 = 0x08;
/// ACK.
pub const TCP_ACK: u8 = 0x10;

/// Key of the flow table: one entry per TCP connection of a watched VM and port, both directions together.
///
/// The key is oriented, not sorted: the VM's end comes first, whichever direction the segment goes, so a segment
/// and its answer find the same entry, and the entry knows which half is the VM's. When both ends are watched
/// VMs, the end with the lower (address, port) is the "VM" end. Addresses are IPv6 or IPv4-mapped IPv6 (as
/// [`IpKey`]); ports in host byte order. The interface is part of the key: the same connection seen on a tap and
/// on an uplink is two entries, so a segment seen at both places never looks like its own retransmission.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub vm_addr: IpKey,
    pub peer_addr: IpKey,
    pub vm_port: u16,
    pub peer_port: u16,
    pub ifindex: u32,
}

/// Key of the IPv4 flow table: [`FlowKey`] with plain IPv4 addresses (network byte order), 16 bytes against 40,
/// which the table hashes and compares for every segment. Records and user space see the flow as a [`FlowKey`]
/// ([`FlowKey4::widen`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey4 {
    pub vm_addr: [u8; 4],
    pub peer_addr: [u8; 4],
    pub vm_port: u16,
    pub peer_port: u16,
    pub ifindex: u32,
}

impl FlowKey4 {
    /// The same flow as a [`FlowKey`], its addresses IPv4-mapped.
    #[must_use]
    pub const fn widen(&self) -> FlowKey {
        FlowKey {
            vm_addr: v4_mapped(self.vm_addr),
            peer_addr: v4_mapped(self.peer_addr),
            vm_port: self.vm_port,
            peer_port: self.peer_port,
            ifindex: self.ifindex,
        }
    }
}

/// `a` as an IPv4-mapped IPv6 [`IpKey`] (`::ffff:a.b.c.d`).
#[must_use]
pub const fn v4_mapped(a: [u8; 4]) -> IpKey {
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3]]
}

/// Ways of each set of a flow cache: a flow's set is picked by a hash of its key, and it may sit in any of the
/// set's ways.
pub const FLOW_CACHE_WAYS: usize = 4;

/// One way of a flow cache: a flow's key and state. An empty way has `state.first_ns == 0`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowSlot<K> {
    pub key: K,
    pub state: FlowState,
}

/// One set of a flow cache (a value of `FLOW_CACHE4` or `FLOW_CACHE6`), 8-byte aligned so that the programs
/// compare keys in 8-byte words.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowSet<K> {
    pub ways: [FlowSlot<K>; FLOW_CACHE_WAYS],
}

/// A set of the IPv4 flow cache.
pub type FlowSet4 = FlowSet<FlowKey4>;
/// A set of the IPv6 flow cache.
pub type FlowSet6 = FlowSet<FlowKey>;

/// `FlowDir::flags`: `seq_end` holds a value (the direction has sent a segment).
pub const FLOW_SEQ_KNOWN: u32 = 1;
/// `FlowDir::flags`: `ack` holds a value.
pub const FLOW_ACK_KNOWN: u32 = 2;
/// `FlowDir::flags`: a FIN was seen in this direction.
pub const FLOW_FIN_SEEN: u32 = 4;
/// `FlowDir::flags`: the last segment advertised a zero window.
pub const FLOW_ZERO_WINDOW: u32 = 8;
/// `FlowEvent::flags` only: `peer_ack` holds a value (the other side has sent an ACK).
pub const FLOW_PEER_ACK_KNOWN: u32 = 0x100;

/// One direction of a tracked flow (what one side sent).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowDir {
    /// Highest sequence end (`seq + len`, SYN and FIN count one) this side sent.
    pub seq_end: u32,
    /// Last acknowledgement number this side sent.
    pub ack: u32,
    /// Time of the last segment from this side.
    pub last_ns: u64,
    /// Time `seq_end` last moved forward (new data last sent).
    pub advance_ns: u64,
    /// Time of this side's last forward progress (new data, or an ACK of new data).
    pub progress_ns: u64,
    /// Segments seen from this side.
    pub segments: u32,
    /// Retransmissions seen from this side.
    pub retransmits: u32,
    /// `FLOW_*` bits.
    pub flags: u32,
    pub pad: u32,
}

/// Value of the flow table: both directions, indexed by [`SIDE_VM`] / [`SIDE_PEER`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    /// When the tracker first saw the flow.
    pub first_ns: u64,
    pub dir: [FlowDir; 2],
}

/// Per-CPU counters and the capture token bucket of the flow tracker (one slot of a per-CPU array).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCounters {
    /// Flows inserted into the flow table. The table never deletes, so `inserts - entries` is how many flows
    /// the LRU evicted.
    pub inserts: u64,
    /// Inserts the kernel refused (out of memory): those flows were not tracked.
    pub insert_failed: u64,
    /// Records emitted without their frame bytes because the capture budget was spent.
    pub capture_dropped: u64,
    /// Flow records handed to the ring buffer.
    pub records: u64,
    /// Capture credit left, ns: a capture costs `ProbeConfig::flow_capture_ns`; the credit grows with time, up
    /// to `flow_capture_burst` captures.
    pub credit_ns: u64,
    /// When the bucket was last refilled.
    pub refill_ns: u64,
    /// Later IP fragments (IPv4 or IPv6, offset above 0) the tracker skipped: they carry no TCP header.
    pub fragments: u64,
}

/// A flow tracker record: one TCP segment that matters, with the flow's state before it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowEvent {
    pub header: EventHeader,
    pub key: FlowKey,
    /// User-space id of the network namespace the program instance is attached in.
    pub netns_id: u32,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u16,
    /// [`SIDE_VM`] or [`SIDE_PEER`]: who sent the segment.
    pub side: u8,
    /// [`DIR_INGRESS`] or [`DIR_EGRESS`]: the hook that saw it.
    pub direction: u8,
    /// TCP flags (`TCP_*`).
    pub tcp_flags: u8,
    pub pad0: u8,
    /// Advertised window, unscaled.
    pub window: u16,
    pub seq: u32,
    pub ack: u32,
    /// TCP payload bytes.
    pub len: u32,
    /// The sender's highest sequence end before this segment (0 with `FLOW_SEQ_KNOWN` clear in `flags`).
    pub seq_end: u32,
    /// The other side's last ACK (what the receiver had acknowledged).
    pub peer_ack: u32,
    /// Retransmissions from this side so far, this one included.
    pub retransmits: u32,
    /// VLAN ids, outermost first; `vlan_count` of them are valid.
    pub vlan: [u16; 2],
    pub vlan_count: u16,
    pub pad1: u16,
    /// The sender's `FlowDir::flags` before this segment, plus [`FLOW_PEER_ACK_KNOWN`].
    pub flags: u32,
    /// `FlowRetransmit`: time since the sender's highest sequence end last advanced (since new data was last
    /// sent). `FlowProgress`: the quiet period that ended. Otherwise 0.
    pub gap_ns: u64,
    /// Time since the previous segment from the same side (0 = its first).
    pub silence_ns: u64,
    /// Length of the whole frame.
    pub frame_len: u32,
    /// Bytes of the frame copied into `frame` (0 when the capture budget was spent).
    pub cap_len: u32,
    pub frame: [u8; FRAME_CAPTURE],
}

impl Default for FlowEvent {
    fn default() -> Self {
        Self {
            header: EventHeader::default(),
            key: FlowKey::default(),
            netns_id: 0,
            family: 0,
            side: 0,
            direction: 0,
            tcp_flags: 0,
            pad0: 0,
            window: 0,
            seq: 0,
            ack: 0,
            len: 0,
            seq_end: 0,
            peer_ack: 0,
            retransmits: 0,
            vlan: [0; 2],
            vlan_count: 0,
            pad1: 0,
            flags: 0,
            gap_ns: 0,
            silence_ns: 0,
            frame_len: 0,
            cap_len: 0,
            frame: [0; FRAME_CAPTURE],
        }
    }
}

/// "Field absent" in a [`TpLayout`].
pub const NO_FIELD: u16 = 0xffff;

/// `TpLayout::flags`: `saddr`/`daddr` are `struct sockaddr_in{,6}` (28 bytes) holding family, port and address
/// (`tcp:tcp_send_reset` since 6.10).
pub const TP_SOCKADDR: u16 = 1;

/// Field offsets of one TCP/sock tracepoint record, from its tracefs `format` file. [`NO_FIELD`] = absent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TpLayout {
    pub skaddr: u16,
    pub state: u16,
    pub oldstate: u16,
    pub newstate: u16,
    pub error: u16,
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    pub protocol: u16,
    pub saddr: u16,
    pub daddr: u16,
    pub saddr_v6: u16,
    pub daddr_v6: u16,
    pub reason: u16,
    pub flags: u16,
    pub pad: u16,
}

impl TpLayout {
    /// A layout with every field absent.
    pub const EMPTY: Self = Self {
        skaddr: NO_FIELD,
        state: NO_FIELD,
        oldstate: NO_FIELD,
        newstate: NO_FIELD,
        error: NO_FIELD,
        sport: NO_FIELD,
        dport: NO_FIELD,
        family: NO_FIELD,
        protocol: NO_FIELD,
        saddr: NO_FIELD,
        daddr: NO_FIELD,
        saddr_v6: NO_FIELD,
        daddr_v6: NO_FIELD,
        reason: NO_FIELD,
        flags: 0,
        pad: 0,
    };
}

/// Field offsets of `bridge:br_fdb_update`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdbLayout {
    /// `__data_loc char[] br_dev`.
    pub br_dev: u16,
    /// `__data_loc char[] dev`.
    pub dev: u16,
    pub addr: u16,
    pub vid: u16,
}

/// "Unknown" in the BTF offsets of [`ProbeConfig`].
pub const NO_OFFSET: u32 = u32::MAX;

/// `ProbeConfig::flags`: filter TCP events by the IP watch list.
pub const CFG_FILTER_IPS: u32 = 1;
/// `ProbeConfig::flags`: filter TCP events by the port watch list.
pub const CFG_FILTER_PORTS: u32 = 2;
/// `ProbeConfig::flags`: at least one MAC is watched (otherwise XDP/TC skip the lookup).
pub const CFG_WATCH_MACS: u32 = 4;
/// `ProbeConfig::flags`: report only FDB updates of watched MACs.
pub const CFG_FILTER_FDB: u32 = 8;
/// `ProbeConfig::flags`: track TCP flows whose address is in the flow IP list (`FLOW_IPS`).
pub const CFG_FLOW_IPS: u32 = 16;
/// `ProbeConfig::flags`: track TCP flows whose Ethernet source or destination is a watched MAC.
pub const CFG_FLOW_MACS: u32 = 32;
/// `ProbeConfig::flags`: track only TCP flows with a port in the port bitmap (`FLOW_PORTS`, `--port`).
pub const CFG_FLOW_PORTS: u32 = 64;

/// Words of the flow tracker's port bitmap: one bit per TCP port, port `p` at bit `p % 64` of word `p / 64`.
pub const FLOW_PORT_WORDS: u32 = 1024;

/// The global the programs read (symbol `CONFIG`), written by user space before loading.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeConfig {
    pub retransmit: TpLayout,
    pub set_state: TpLayout,
    pub error_report: TpLayout,
    pub receive_reset: TpLayout,
    pub send_reset: TpLayout,
    pub fdb: FdbLayout,
    /// `CFG_*` bits.
    pub flags: u32,
    /// User-space id of the network namespace the L2 programs of this instance are attached in.
    pub netns_id: u32,
    /// Silence after which a watched MAC counts as "seen" again, ns.
    pub mac_gap_ns: u64,
    /// Offset of `skc_state` (u8) in `struct sock`.
    pub off_sk_state: u32,
    /// Offset of `skc_net` (a `struct net *`) in `struct sock`.
    pub off_sk_net: u32,
    /// Offset of `ns.inum` (u32) in `struct net`.
    pub off_net_inum: u32,
    /// Offset of `icsk_retransmits` (u8) in `struct sock` (through `inet_connection_sock`).
    pub off_icsk_retransmits: u32,
    /// Offset of `icsk_backoff` (u8).
    pub off_icsk_backoff: u32,
    /// Offset of `icsk_rto` (u32, jiffies).
    pub off_icsk_rto: u32,
    /// Offset of `srtt_us` (u32) in `struct tcp_sock`.
    pub off_srtt_us: u32,
    /// A one-word filter in front of the `WATCH_MACS` lookup: bit [`mac_filter_bit`] of every watched MAC is set.
    /// A frame whose bit is clear is not from a watched MAC, so the per-frame hash lookup is skipped (it was most
    /// of the XDP parser's cost for non-ARP frames). 0 with no MAC under watch.
    pub mac_filter: u32,
    /// The flow tracker's quiet period: a side's first progress after this much time without progress is
    /// reported (`FlowProgress`).
    pub flow_quiet_ns: u64,
    /// The rate limit of frame captures in flow records, per CPU: one capture per `flow_capture_ns` on average
    /// (0 = no limit). A record over the limit goes out without its frame bytes, counted.
    pub flow_capture_ns: u64,
    /// Captures the bucket holds at most (a burst).
    pub flow_capture_burst: u32,
    /// Nanoseconds per jiffy (10⁹ / HZ): the flow tracker's per-flow clock is `jiffies × flow_tick_ns`, an
    /// inlined read where a clock helper is a kernel call; both are `CLOCK_MONOTONIC` as of the last tick, apart
    /// from a constant offset. 0 (HZ unknown): the coarse monotonic clock.
    pub flow_tick_ns: u32,
    /// A one-word filter in front of the `FLOW_IPS` lookups: bit [`ip_filter_bit`] of every flow IP is set.
    pub ip_filter: u64,
    /// Offset of the byte holding the `icsk_ca_state` bitfield in `struct sock`.
    pub off_icsk_ca_state: u32,
    /// `icsk_ca_state`'s bit position in that byte (low 8 bits) and width (next 8 bits; 0 = unknown).
    pub ca_state_bits: u32,
    /// Offset of `icsk_pending` (u8).
    pub off_icsk_pending: u32,
    /// Offset of `tlp_high_seq` (u32) in `struct tcp_sock`.
    pub off_tlp_high_seq: u32,
    /// The first [`FLOW_INLINE_IPS`] flow IPs, compared in place (a hash lookup costs more than the comparisons);
    /// with more than that, `FLOW_IPS` holds them all and is looked up instead.
    pub flow_ips: [IpKey; FLOW_INLINE_IPS],
    /// How many flow IPs there are (all in `flow_ips` when at most [`FLOW_INLINE_IPS`]).
    pub flow_ip_count: u32,
    /// Sets of each flow cache (`FLOW_CACHE4`, `FLOW_CACHE6`): a power of two, 0 = no cache (every flow in the
    /// LRU tables).
    pub flow_cache_sets: u32,
}

/// Flow IPs the programs compare in place.
pub const FLOW_INLINE_IPS: usize = 4;

/// The bit of an address (IPv6 or IPv4-mapped) in [`ProbeConfig::ip_filter`].
#[inline]
pub const fn ip_filter_bit(addr: &IpKey) -> u64 {
    1 << ((addr[15] ^ addr[14]) & 63)
}

/// The bit of `mac` in [`ProbeConfig::mac_filter`].
#[inline]
pub const fn mac_filter_bit(mac: &[u8; 6]) -> u32 {
    1 << ((mac[3] ^ mac[4] ^ mac[5]) & 31)
}

impl ProbeConfig {
    /// Everything absent/unknown; nothing filtered.
    pub const EMPTY: Self = Self {
        retransmit: TpLayout::EMPTY,
        set_state: TpLayout::EMPTY,
        error_report: TpLayout::EMPTY,
        receive_reset: TpLayout::EMPTY,
        send_reset: TpLayout::EMPTY,
        fdb: FdbLayout {
            br_dev: NO_FIELD,
            dev: NO_FIELD,
            addr: NO_FIELD,
            vid: NO_FIELD,
        },
        flags: 0,
        netns_id: 0,
        mac_gap_ns: 50_000_000,
        off_sk_state: NO_OFFSET,
        off_sk_net: NO_OFFSET,
        off_net_inum: NO_OFFSET,
        off_icsk_retransmits: NO_OFFSET,
        off_icsk_backoff: NO_OFFSET,
        off_icsk_rto: NO_OFFSET,
        off_srtt_us: NO_OFFSET,
        mac_filter: 0,
        flow_quiet_ns: 50_000_000,
        flow_capture_ns: 1_000_000,
        flow_capture_burst: 256,
        flow_tick_ns: 0,
        ip_filter: 0,
        off_icsk_ca_state: NO_OFFSET,
        ca_state_bits: 0,
        off_icsk_pending: NO_OFFSET,
        off_tlp_high_seq: NO_OFFSET,
        flow_ips: [[0; 16]; FLOW_INLINE_IPS],
        flow_ip_count: 0,
        flow_cache_sets: 0,
    };
}

const _: () = assert!(size_of::<EventHeader>() == 16);
const _: () = assert!(size_of::<TcpTuple>() == 40);
const _: () = assert!(size_of::<TcpEvent>() == 104);
const _: () = assert!(size_of::<ArpEvent>() == 200);
const _: () = assert!(size_of::<NeighborAdvertEvent>() == 232);
const _: () = assert!(size_of::<FdbEvent>() == 56);
const _: () = assert!(size_of::<MacSeenEvent>() == 40);
const _: () = assert!(size_of::<MacKey>() == 12);
const _: () = assert!(size_of::<MacCounters>() == 32);
const _: () = assert!(size_of::<TpLayout>() == 32);
const _: () = assert!(size_of::<FdbLayout>() == 8);
const _: () =
    assert!(size_of::<ProbeConfig>() == 5 * 32 + 8 + 8 + 8 + 8 * 4 + 32 + 16 + 16 * FLOW_INLINE_IPS + 8);
const _: () = assert!(core::mem::offset_of!(ProbeConfig, flow_ips) % 8 == 0);
const _: () = assert!(size_of::<FlowKey>() == 40);
const _: () = assert!(size_of::<FlowKey4>() == 16);
const _: () = assert!(size_of::<FlowDir>() == 48);
const _: () = assert!(size_of::<FlowState>() == 104);
const _: () = assert!(size_of::<FlowCounters>() == 56);
const _: () = assert!(size_of::<FlowSlot<FlowKey4>>() == 120);
const _: () = assert!(size_of::<FlowSlot<FlowKey>>() == 144);
const _: () = assert!(size_of::<FlowSet4>() == 480);
const _: () = assert!(size_of::<FlowSet6>() == 576);
const _: () = assert!(size_of::<FlowEvent>() == 256);
const _: () = assert!(core::mem::offset_of!(FlowEvent, key) == 16);
const _: () = assert!(core::mem::offset_of!(FlowEvent, seq) == 68);
const _: () = assert!(core::mem::offset_of!(FlowEvent, gap_ns) == 104);
const _: () = assert!(core::mem::offset_of!(FlowEvent, frame) == 128);
const _: () = assert!(core::mem::offset_of!(TcpEvent, tuple) == 16);
const _: () = assert!(core::mem::offset_of!(ArpEvent, frame) == 72);
const _: () = assert!(core::mem::offset_of!(MacSeenEvent, gap_ns) == 32);
const _: () = assert!(core::mem::offset_of!(NeighborAdvertEvent, src_mac) == 32);
const _: () = assert!(core::mem::offset_of!(NeighborAdvertEvent, src_ip) == 56);
const _: () = assert!(core::mem::offset_of!(NeighborAdvertEvent, target) == 88);
const _: () = assert!(core::mem::offset_of!(NeighborAdvertEvent, frame) == 104);

#[cfg(feature = "user")]
mod user;
#[cfg(feature = "user")]
pub use user::{DecodeError, WireEvent, decode};
