//! The TCP flow tracker: the state of every TCP connection of a watched VM, from its frames on the VM's ports.
//!
//! The L2 programs (XDP ingress, TC ingress, TC egress) hand IPv4 and IPv6 frames to the flow programs
//! (`flow_xdp`, `flow_tc`) by a tail call ([`hand_over`]), with their own Ethernet and VLAN parse in the per-CPU
//! scratch slot, so a port pays for one parse, and the verifier walks the tracker once per program, not once per
//! path of the L2 parser. A flow is watched when one end's address is in `FLOW_IPS` (the VMs' IPs) or, with
//! `CFG_FLOW_MACS`, when the frame's Ethernet source or destination is a watched MAC (that end is then the VM's).
//!
//! Each flow is one entry, keyed by [`FlowKey4`] (16 bytes) for IPv4 and [`FlowKey`] for IPv6, with the VM's end
//! first, so both directions share it (as ePPing keeps one entry per connection). The entry is a way of an
//! array-backed cache of 4-way sets (`FLOW_CACHE4`, `FLOW_CACHE6`; the set is a hash of the key), or of the LRU map
//! behind it (`FLOWS4`, `FLOWS`) that takes the flows the cache evicts. No SYN is needed: the first segment seen in a
//! direction initialises that direction's state, so flows are picked up mid-stream. Per direction the entry keeps
//! the highest sequence end, the last ACK, the times of the last segment, of the last new data and of the last
//! forward progress, and the segment and retransmission counts ([`FlowDir`]).
//!
//! A busy flow in the cache costs an inlined array index, a few word comparisons and stores into the way per
//! segment (a flow in the LRU map, a hash map lookup), and a tick clock ([`tick_clock`]: jiffies times the tick
//! length, read inline): the per-flow times, and so `gap_ns` and `silence_ns`, are accurate to a tick; a record's
//! own time is the precise clock's. A record goes to the ring
//! buffer only when a segment matters ([`FlowEvent`], one kind each):
//! - `FlowOpen`: the first segment of a flow the table did not hold;
//! - `FlowRetransmit`: data (or SYN/FIN) starting inside sequence space the same side already sent, with the time
//!   since that side's highest sequence end last advanced (`gap_ns`) and since its previous segment
//!   (`silence_ns`): an RTO retransmission comes after a silence of about the RTO, a fast retransmit or a
//!   tail-loss probe within a few RTTs of new data;
//! - `FlowReset` (every RST) and `FlowFin` (the first FIN of a side), with the side that sent it;
//! - `FlowZeroWindow`: a side starts advertising a zero window;
//! - `FlowProgress`: a side's first new data, or ACK of new data, after more than `CONFIG.flow_quiet_ns` without
//!   (a RST is never progress).
//!
//! Records carry the frame's first bytes for the pcapng export. A per-CPU budget (`CONFIG.flow_capture_ns` per
//! capture, `flow_capture_burst` at most) limits them; a record over it goes out without the bytes and is counted
//! in `FLOW_COUNTERS.capture_dropped`.
//!
//! Evictions: the tracker never deletes entries, and a flow is in the cache or in the LRU map, never both (a
//! flow the cache evicts moves to the LRU map), so every flow that left was evicted by the LRU map, or dropped
//! by it when it had no room. `FLOW_COUNTERS.inserts` counts new flows; user space counts the entries of both and
//! reports `inserts - entries` as evictions. Two CPUs opening the same flow at the same instant may both insert
//! it; one copy then ages out, counted as an eviction.
//!
//! With `CFG_FLOW_PORTS` (`migmon watch --port`), only the watched VMs' flows with a port in `FLOW_PORTS` (at
//! either end) are tracked.
//!
//! Frames cut inside the IP or TCP header (or an IPv6 extension header), or shorter than the IP length they
//! announce, are counted in `MALFORMED` and not read further. TCP behind IPv6 extension headers (hop-by-hop,
//! routing, destination options, fragment; at most [`MAX_EXT_HEADERS`]) is tracked. A first fragment, IPv4 or
//! IPv6, is tracked when its TCP header is there; later fragments are counted in `FLOW_COUNTERS.fragments` and
//! skipped.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    bindings::{TC_ACT_UNSPEC, xdp_action},
    helpers::{bpf_get_smp_processor_id, bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    macros::{classifier, map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray},
    programs::{TcContext, XdpContext},
};
use monitor_common::{
    AF_INET, AF_INET6, CFG_FLOW_IPS, CFG_FLOW_MACS, CFG_FLOW_PORTS, EventHeader, EventKind, FLOW_ACK_KNOWN,
    FLOW_CACHE_WAYS, FLOW_FIN_SEEN, FLOW_INLINE_IPS, FLOW_PEER_ACK_KNOWN, FLOW_PORT_WORDS, FLOW_SEQ_KNOWN,
    FLOW_ZERO_WINDOW, FRAME_CAPTURE, FlowCounters, FlowDir, FlowEvent, FlowKey, FlowKey4, FlowSet, FlowSet4,
    FlowSet6, FlowSlot, FlowState, IpKey, SIDE_PEER, SIDE_VM, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
};

use crate::{
    EVENTS, atomic_add, config, count_lost,
    l2::{Eth, Frame, TcFrame, XdpFrame, count_malformed, load16, load32, mac_at, mac_watched},
};

/// The IPv6 flow table behind the cache: flows the cache evicted (and all flows without a cache). User space
/// sizes it at load time.
#[map]
static FLOWS: LruHashMap<FlowKey, FlowState> = LruHashMap::with_max_entries(16384, 0);

/// The IPv4 flow table, with the smaller key; sized as `FLOWS`.
#[map]
static FLOWS4: LruHashMap<FlowKey4, FlowState> = LruHashMap::with_max_entries(16384, 0);

/// The IPv4 flow cache: `CONFIG.flow_cache_sets` sets of [`FLOW_CACHE_WAYS`] flows, in front of `FLOWS4`. An
/// array, so finding a flow costs an inlined index, a hash computed here and a few word comparisons, where a
/// hash map lookup costs a kernel call (the key's hash and compare there were a third of a segment's cost).
#[map]
static FLOW_CACHE4: Array<FlowSet4> = Array::with_max_entries(1, 0);

/// The IPv6 flow cache, in front of `FLOWS`.
#[map]
static FLOW_CACHE6: Array<FlowSet6> = Array::with_max_entries(1, 0);

/// Addresses of the watched VMs (IPv6 or IPv4-mapped).
#[map]
static FLOW_IPS: HashMap<IpKey, u8> = HashMap::with_max_entries(1024, 0);

/// The ports under watch (`--port`) as a bitmap, with `CFG_FLOW_PORTS`: a flow is tracked only when one of its
/// ports is set. An array, so the test is an inlined index and a bit, not a hash lookup.
#[map]
static FLOW_PORTS: Array<u64> = Array::with_max_entries(FLOW_PORT_WORDS, 0);

/// The flow program the XDP program hands a TCP frame to, by a tail call (index 0: `flow_xdp`). User space fills
/// it when the tracker is on. A tail-called program is verified on its own, once, not once per path of the L2
/// parser that reaches it. (A program array serves one program type, hence one for XDP and one for TC.)
#[map]
pub(crate) static FLOW_PROG_XDP: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// The flow program the TC programs (ingress and egress) hand a TCP frame to (index 0: `flow_tc`).
#[map]
pub(crate) static FLOW_PROG_TC: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// A flow's key and a new flow's entry while a segment is tracked (index 0).
#[map]
static WORK: PerCpuArray<Work> = PerCpuArray::with_max_entries(1, 0);

/// 8-byte aligned (map values are), so the key's addresses (at offsets 0 and 16) take aligned 8-byte accesses: the
/// BPF backend splits an unaligned access into single bytes, which cost more than the rest of the parse.
#[repr(C, align(8))]
struct Work {
    key: FlowKey,
    key4: FlowKey4,
    state: FlowState,
    /// A cache way's index, passed through memory so that the verifier sees one unknown value in place of each
    /// constant the search found (and walks what follows once, not once per way).
    way: u32,
    pad: u32,
    /// What the L2 program parsed, for the flow program it tail-calls.
    handoff: Handoff,
    /// A segment that raises records, and what it did.
    pending: Pending,
}

/// What a segment's records say besides the flow's key.
#[derive(Clone, Copy)]
struct Pending {
    seg: Segment,
    out: Outcome,
    peer_ack: u32,
    side: u8,
    family: u16,
}

/// The L2 program's parse of a frame, handed to the flow program.
#[repr(C)]
struct Handoff {
    ethertype: u16,
    /// Offset of the IP header.
    off: u16,
    vlan: [u16; 2],
    vlan_count: u16,
    direction: u8,
    pad: u8,
    /// The interface the L2 program runs on.
    ifindex: u32,
}

/// The largest offset of an IP header after the Ethernet header and two VLAN tags.
const MAX_L3_OFF: u16 = 22;

/// Per-CPU counters and capture budget (index 0).
#[map]
static FLOW_COUNTERS: PerCpuArray<FlowCounters> = PerCpuArray::with_max_entries(1, 0);

const IPPROTO_TCP: u8 = 6;
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_DSTOPTS: u8 = 60;
/// IPv6 extension headers the tracker walks at most before TCP.
const MAX_EXT_HEADERS: usize = 6;
const IPV6_HLEN: usize = 40;
const TCP_HLEN: usize = 20;

/// Record kinds a segment can raise, as bits, in the order they are emitted.
const EV_OPEN: u32 = 1;
const EV_RETRANSMIT: u32 = 2;
const EV_PROGRESS: u32 = 4;
const EV_ZERO_WINDOW: u32 = 8;
const EV_FIN: u32 = 16;
const EV_RESET: u32 = 32;

/// The flow tracker's per-flow clock in ns, as of the last tick: jiffies times the tick length (the verifier
/// inlines the jiffies read: no call), or, when user space did not know the tick, the coarse monotonic clock (a
/// helper call, about 3 ns here; the precise clock costs about 28).
#[inline(always)]
fn tick_clock() -> u64 {
    let tick = config!(flow_tick_ns);
    if tick != 0 {
        // SAFETY: helper without preconditions.
        unsafe { bpf_jiffies64() }.wrapping_mul(u64::from(tick))
    } else {
        // SAFETY: helper without preconditions.
        unsafe { bpf_ktime_get_coarse_ns() }
    }
}

/// `a` comes before `b` in sequence space (modulo 2³²).
#[inline(always)]
fn before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// A pointer to offset `off` of the frame with at least `len` directly readable bytes from it, and the end of
/// those bytes; pulls them in when the frame is long enough but they are not direct (TC). `None` when the frame
/// is shorter than `off + len`. The bounds check is made on the returned pointer itself: reads at constant offsets
/// below `len` from it are what the verifier follows, even when `off` is not a constant.
#[inline(always)]
fn direct_at(f: &impl Frame, off: usize, len: usize) -> Option<(usize, usize)> {
    let p = f.data() + off;
    let end = f.data_end();
    if p + len <= end {
        return Some((p, end));
    }
    if (off + len) as u64 > f.wire_len() || !f.pull((off + len) as u32) {
        return None;
    }
    let p = f.data() + off;
    let end = f.data_end();
    (p + len <= end).then_some((p, end))
}

/// The IP layer of a TCP frame (the addresses go straight into the scratch key).
struct Ip {
    family: u16,
    /// Offset of the TCP header.
    l4: usize,
    /// Bytes after the IP header(s) that belong to the packet (TCP header and payload).
    payload: usize,
}

enum Parsed<T> {
    Yes(T),
    /// Not for the tracker (not TCP, a fragment).
    Skip,
    /// Cut or odd: counted, not read further.
    Malformed,
}

/// Parses IPv4 at `off`: the IP layer, the source and the destination address.
#[inline(always)]
fn ipv4(f: &impl Frame, off: usize) -> Parsed<(Ip, [u8; 4], [u8; 4])> {
    let Some((p, _)) = direct_at(f, off, 20) else {
        return Parsed::Malformed;
    };
    // SAFETY: `direct_at` checked that the 20 bytes of the fixed header lie inside the packet; each field is
    // read with one load of its width.
    let (vihl, tot, frag, proto, s, d) = unsafe {
        (
            *(p as *const u8),
            u16::from_be(load16(p + 2)),
            u16::from_be(load16(p + 6)),
            *((p + 9) as *const u8),
            load32(p + 12).to_ne_bytes(),
            load32(p + 16).to_ne_bytes(),
        )
    };
    let ihl = usize::from(vihl & 0x0f) << 2;
    if vihl >> 4 != 4 || ihl < 20 {
        return Parsed::Malformed;
    }
    if proto != IPPROTO_TCP {
        return Parsed::Skip;
    }
    // A fragment offset: a later fragment, without the TCP header. A first fragment (more fragments, offset 0)
    // is tracked when its TCP header is there.
    if frag & 0x1fff != 0 {
        count_fragment();
        return Parsed::Skip;
    }
    let tot = usize::from(tot);
    let wire = f.wire_len() as usize;
    // A total length of 0 is a TSO/BIG TCP packet: the frame's length is the packet's.
    let payload = if tot == 0 {
        wire.saturating_sub(off + ihl)
    } else {
        if tot < ihl || off + tot > wire {
            return Parsed::Malformed;
        }
        tot - ihl
    };
    Parsed::Yes((
        Ip {
            family: AF_INET,
            l4: off + ihl,
            payload,
        },
        s,
        d,
    ))
}

/// Parses IPv6 at `off`, like [`ipv4`]; the source address goes to `k.vm_addr`, the destination to `k.peer_addr`.
///
/// TCP is found behind up to [`MAX_EXT_HEADERS`] extension headers (hop-by-hop options, routing, destination
/// options, fragment), each bounds-checked and within the payload length: a first fragment (offset 0) is
/// tracked when its TCP header is there, a later one is counted (`FLOW_COUNTERS.fragments`) and skipped. Any
/// other next header, or more extension headers than that, is not TCP to the tracker.
///
/// # Safety
/// `k` must be valid for writes and 8-byte aligned.
#[inline(always)]
unsafe fn ipv6(f: &impl Frame, off: usize, k: *mut FlowKey) -> Parsed<Ip> {
    let Some((p, _)) = direct_at(f, off, IPV6_HLEN) else {
        return Parsed::Malformed;
    };
    // SAFETY: `direct_at` checked that the fixed header lies inside the packet.
    let (ver, plen, next) = unsafe {
        (
            *(p as *const u8),
            u16::from_be(load16(p + 4)),
            *((p + 6) as *const u8),
        )
    };
    if ver >> 4 != 6 {
        return Parsed::Malformed;
    }
    let plen = usize::from(plen);
    let wire = f.wire_len() as usize;
    let mut payload = if plen == 0 {
        wire.saturating_sub(off + IPV6_HLEN)
    } else {
        if off + IPV6_HLEN + plen > wire {
            return Parsed::Malformed;
        }
        plen
    };
    // SAFETY: as above: the addresses are bytes 8..40 of the checked header; `k`'s addresses are 8-byte aligned.
    unsafe {
        let dst = (&raw mut (*k).vm_addr).cast::<u32>();
        for i in 0..8 {
            dst.add(i).write(load32(p + 8 + 4 * i));
        }
    }
    let mut l4 = off + IPV6_HLEN;
    let mut next = next;
    for _ in 0..MAX_EXT_HEADERS {
        if next == IPPROTO_TCP {
            break;
        }
        if next != IPPROTO_HOPOPTS
            && next != IPPROTO_ROUTING
            && next != IPPROTO_DSTOPTS
            && next != IPPROTO_FRAGMENT
        {
            return Parsed::Skip;
        }
        // Every extension header has at least 8 bytes: the next header, then its length or the fragment's fields.
        let Some((h, _)) = direct_at(f, l4, 8) else {
            return Parsed::Malformed;
        };
        // SAFETY: `direct_at` checked the 8 bytes.
        let (after, units, frag) = unsafe {
            (
                *(h as *const u8),
                *((h + 1) as *const u8),
                u16::from_be(load16(h + 2)),
            )
        };
        let len = if next == IPPROTO_FRAGMENT {
            // The offset (in 8-byte units) is the top 13 bits: a later fragment has no TCP header.
            if frag & 0xfff8 != 0 {
                count_fragment();
                return Parsed::Skip;
            }
            8
        } else {
            (usize::from(units) + 1) * 8
        };
        if len > payload {
            return Parsed::Malformed;
        }
        payload -= len;
        l4 += len;
        next = after;
    }
    if next != IPPROTO_TCP {
        return Parsed::Skip;
    }
    Parsed::Yes(Ip {
        family: AF_INET6,
        l4,
        payload,
    })
}

/// Counts a later fragment (one without the TCP header) the tracker skipped.
#[inline(always)]
fn count_fragment() {
    if let Some(c) = counters() {
        // SAFETY: this CPU's counter slot, valid while the program runs.
        unsafe { atomic_add(&raw mut (*c).fragments, 1) };
    }
}

/// Whether the address whose two 8-byte words (in memory order) are `a0` and `a1` is a watched VM's: `Some`
/// when the filter word or the addresses compared in place tell, `None` when the `FLOW_IPS` map must (more VMs
/// than [`FLOW_INLINE_IPS`]).
#[inline(always)]
fn ip_watched_inline(a0: u64, a1: u64) -> Option<bool> {
    // The bytes `ip_filter_bit` hashes: the address's last two.
    let last = a1.to_ne_bytes();
    if config!(ip_filter) & (1u64 << ((last[6] ^ last[7]) & 63)) == 0 {
        return Some(false);
    }
    let count = config!(flow_ip_count) as usize;
    if count > FLOW_INLINE_IPS {
        return None;
    }
    for i in 0..FLOW_INLINE_IPS {
        if i >= count {
            return Some(false);
        }
        let w = (&raw const crate::CONFIG.flow_ips[i]).cast::<u64>();
        // SAFETY: CONFIG is a valid static and `flow_ips` sits at an 8-byte aligned offset (asserted in
        // monitor-common); volatile, so the value user space wrote at load time is used.
        let (w0, w1) = unsafe { (w.read_volatile(), w.add(1).read_volatile()) };
        if a0 == w0 && a1 == w1 {
            return Some(true);
        }
    }
    Some(false)
}

/// `addr` is a watched VM's address.
///
/// # Safety
/// `addr` must be valid for reads and 8-byte aligned (an address in the scratch slot's key).
#[inline(always)]
unsafe fn ip_watched(addr: *const IpKey) -> bool {
    let a = addr.cast::<u64>();
    // SAFETY: the caller's contract: two aligned u64 words.
    let (a0, a1) = unsafe { (a.read(), a.add(1).read()) };
    match ip_watched_inline(a0, a1) {
        Some(w) => w,
        // SAFETY: map lookup of a key the caller vouches for; the value is not dereferenced.
        None => unsafe { FLOW_IPS.get(&*addr) }.is_some(),
    }
}

/// IPv4 address `a` is a watched VM's address.
#[inline(always)]
fn ip4_watched(a: [u8; 4]) -> bool {
    let a1 = u64::from_ne_bytes([0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3]]);
    match ip_watched_inline(0, a1) {
        Some(w) => w,
        // SAFETY: map lookup of a plain key; the value is not dereferenced.
        None => unsafe { FLOW_IPS.get(&monitor_common::v4_mapped(a)) }.is_some(),
    }
}

/// (a, ap) < (b, bp), addresses compared as big-endian numbers.
#[inline(always)]
fn lower(a: &IpKey, ap: u16, b: &IpKey, bp: u16) -> bool {
    for i in 0..16 {
        if a[i] != b[i] {
            return a[i] < b[i];
        }
    }
    ap < bp
}

/// Swaps the two addresses of `k` and its ports.
///
/// # Safety
/// `k` must be valid for reads and writes and 8-byte aligned.
#[inline(always)]
unsafe fn swap_ends(k: *mut FlowKey) {
    // SAFETY: the caller's contract; the two addresses are disjoint fields.
    unsafe {
        let a = (&raw mut (*k).vm_addr).cast::<u64>();
        let b = (&raw mut (*k).peer_addr).cast::<u64>();
        for i in 0..2 {
            let t = a.add(i).read();
            a.add(i).write(b.add(i).read());
            b.add(i).write(t);
        }
        let p = (*k).vm_port;
        (*k).vm_port = (*k).peer_port;
        (*k).peer_port = p;
    }
}

/// A TCP segment's header fields.
#[derive(Clone, Copy)]
struct Segment {
    seq: u32,
    ack: u32,
    /// Payload bytes.
    len: u32,
    window: u16,
    flags: u8,
}

/// What a segment did to its sender's direction.
#[derive(Clone, Copy)]
struct Outcome {
    events: u32,
    retransmit_gap: u64,
    progress_gap: u64,
    silence: u64,
    /// The direction's `seq_end` and `flags` before the segment.
    prev_end: u32,
    prev_flags: u32,
    retransmits: u32,
}

/// Applies one segment to its sender's direction `d` (a map value or a local).
///
/// # Safety
/// `d` must be valid for reads and writes.
#[inline(always)]
unsafe fn apply(d: *mut FlowDir, seg: &Segment, now: u64, quiet: u64) -> Outcome {
    // SAFETY: the caller guarantees `d` is valid. Another CPU may update the same direction at the same time
    // (plain stores, as for any per-flow state shared by CPUs): at worst a count or a time is off by one segment.
    unsafe {
        let prev_flags = (*d).flags;
        let prev_end = (*d).seq_end;
        let mut flags = prev_flags;
        let mut events = 0;
        let mut retransmit_gap = 0;
        let mut progress_gap = 0;
        let mut progress = false;
        // At least 1 once the direction has a previous segment: 0 means "no previous segment", and two segments
        // within one tick of the coarse clock are 0 ns apart by it.
        let silence = if (*d).segments == 0 {
            0
        } else {
            now.saturating_sub((*d).last_ns).max(1)
        };

        // SYN and FIN each take one sequence number.
        let seg_len = seg.len + u32::from(seg.flags & TCP_SYN != 0) + u32::from(seg.flags & TCP_FIN != 0);
        if seg_len > 0 {
            let end = seg.seq.wrapping_add(seg_len);
            if prev_flags & FLOW_SEQ_KNOWN == 0 {
                (*d).seq_end = end;
                (*d).advance_ns = now;
                flags |= FLOW_SEQ_KNOWN;
            } else {
                if before(seg.seq, prev_end) {
                    events |= EV_RETRANSMIT;
                    (*d).retransmits += 1;
                    retransmit_gap = now.saturating_sub((*d).advance_ns).max(1);
                }
                if before(prev_end, end) {
                    (*d).seq_end = end;
                    (*d).advance_ns = now;
                    progress = true;
                }
            }
        }
        if seg.flags & TCP_ACK != 0 {
            if prev_flags & FLOW_ACK_KNOWN == 0 {
                (*d).ack = seg.ack;
                flags |= FLOW_ACK_KNOWN;
            } else if before((*d).ack, seg.ack) {
                (*d).ack = seg.ack;
                progress = true;
            }
        }
        // A RST acknowledging new data ends the flow: it is not progress.
        if progress && seg.flags & TCP_RST == 0 {
            let last = (*d).progress_ns;
            if last != 0 && now.saturating_sub(last) > quiet {
                events |= EV_PROGRESS;
                progress_gap = now - last;
            }
            (*d).progress_ns = now;
        } else if (*d).progress_ns == 0 {
            // The first segment of a direction starts its clock.
            (*d).progress_ns = now;
        }
        if seg.flags & TCP_RST != 0 {
            events |= EV_RESET;
        } else if seg.window == 0 && seg.flags & TCP_SYN == 0 {
            if prev_flags & FLOW_ZERO_WINDOW == 0 {
                events |= EV_ZERO_WINDOW;
            }
            flags |= FLOW_ZERO_WINDOW;
        } else {
            flags &= !FLOW_ZERO_WINDOW;
        }
        if seg.flags & TCP_FIN != 0 && prev_flags & FLOW_FIN_SEEN == 0 {
            events |= EV_FIN;
            flags |= FLOW_FIN_SEEN;
        }
        (*d).flags = flags;
        (*d).last_ns = now;
        (*d).segments += 1;
        Outcome {
            events,
            retransmit_gap,
            progress_gap,
            silence,
            prev_end,
            prev_flags,
            retransmits: (*d).retransmits,
        }
    }
}

/// Applies a segment from `side` to the flow `st`; returns the outcome and the other side's last ACK (with
/// [`FLOW_PEER_ACK_KNOWN`] in the outcome's flags when it has one).
///
/// # Safety
/// `st` must be valid for reads and writes.
#[inline(always)]
unsafe fn update(st: *mut FlowState, side: u8, seg: &Segment, now: u64, quiet: u64) -> (Outcome, u32) {
    // SAFETY: the caller guarantees `st` is valid; the two directions are disjoint fields of it.
    unsafe {
        let (me, other) = if side == SIDE_VM {
            (&raw mut (*st).dir[0], &raw const (*st).dir[1])
        } else {
            (&raw mut (*st).dir[1], &raw const (*st).dir[0])
        };
        let peer_ack = (*other).ack;
        let mut out = apply(me, seg, now, quiet);
        if (*other).flags & FLOW_ACK_KNOWN != 0 {
            out.prev_flags |= FLOW_PEER_ACK_KNOWN;
        }
        (out, peer_ack)
    }
}

/// This CPU's counters.
#[inline(always)]
fn counters() -> Option<*mut FlowCounters> {
    FLOW_COUNTERS.get_ptr_mut(0)
}

/// Takes one capture from this CPU's budget; false (and counted) when it is spent.
#[inline(always)]
fn may_capture(c: *mut FlowCounters, now: u64) -> bool {
    let per = config!(flow_capture_ns);
    if per == 0 {
        return true;
    }
    // User space keeps `per * burst` far below 2⁶⁴ (both are bounded there).
    let cap = per.wrapping_mul(u64::from(config!(flow_capture_burst)));
    // SAFETY: `c` is this CPU's slot of a per-CPU array, valid while the program runs; programs on one CPU do not
    // nest here (XDP and TC run in softirq, one at a time).
    unsafe {
        let credit = (*c)
            .credit_ns
            .saturating_add(now.saturating_sub((*c).refill_ns))
            .min(cap);
        (*c).refill_ns = now;
        if credit >= per {
            (*c).credit_ns = credit - per;
            true
        } else {
            (*c).credit_ns = credit;
            atomic_add(&raw mut (*c).capture_dropped, 1);
            false
        }
    }
}

/// Everything a record says besides its kind.
struct Record<'a> {
    key: &'a FlowKey,
    family: u16,
    side: u8,
    direction: u8,
    seg: &'a Segment,
    out: &'a Outcome,
    peer_ack: u32,
    eth: &'a Eth,
    now: u64,
}

/// Not inlined: `track` calls it from one place for every kind, and the record's stack stays out of `track`'s.
/// Returns the frame bytes it captured.
#[inline(never)]
fn emit(f: &impl Frame, kind: EventKind, gap_ns: u64, r: &Record<'_>) -> u32 {
    let Some(mut entry) = EVENTS.reserve::<FlowEvent>(0) else {
        count_lost();
        return 0;
    };
    let mut captured = 0;
    let c = counters();
    let e = entry.as_mut_ptr();
    let hdr = EventHeader {
        kind: kind as u32,
        // SAFETY: helper without preconditions.
        cpu: unsafe { bpf_get_smp_processor_id() },
        ts_ns: r.now,
    };
    // SAFETY: `e` points to a reserved, exclusively owned FlowEvent in the ring buffer; every field is written
    // before submit. `c` is this CPU's counter slot.
    unsafe {
        (*e).header = hdr;
        // In 4-byte words: a plain assignment becomes a byte loop, which the verifier walks on every path.
        let (src, dst) = (
            core::ptr::from_ref(r.key).cast::<u32>(),
            (&raw mut (*e).key).cast::<u32>(),
        );
        for i in 0..size_of::<FlowKey>() / 4 {
            dst.add(i).write(src.add(i).read());
        }
        (*e).netns_id = config!(netns_id);
        (*e).family = r.family;
        (*e).side = r.side;
        (*e).direction = r.direction;
        (*e).tcp_flags = r.seg.flags;
        (*e).pad0 = 0;
        (*e).window = r.seg.window;
        (*e).seq = r.seg.seq;
        (*e).ack = r.seg.ack;
        (*e).len = r.seg.len;
        (*e).seq_end = r.out.prev_end;
        (*e).peer_ack = r.peer_ack;
        (*e).retransmits = r.out.retransmits;
        (*e).vlan = r.eth.vlan;
        (*e).vlan_count = r.eth.vlan_count;
        (*e).pad1 = 0;
        (*e).flags = r.out.prev_flags;
        (*e).gap_ns = gap_ns;
        (*e).silence_ns = r.out.silence;
        (*e).frame_len = f.wire_len() as u32;
        // Zeroed in aligned words (ring buffer records are 8-byte aligned and `frame` sits at offset 128): a
        // `[0; N]` literal would be built on the stack first.
        let words = (&raw mut (*e).frame).cast::<u64>();
        for i in 0..FRAME_CAPTURE / 8 {
            words.add(i).write(0);
        }
        (*e).cap_len = 0;
        if let Some(c) = c {
            atomic_add(&raw mut (*c).records, 1);
            if may_capture(c, r.now) {
                captured = f.copy((&raw mut (*e).frame).cast::<u8>());
                (*e).cap_len = captured;
            }
        }
    }
    entry.submit(0);
    captured
}

/// A cheap test before [`track`], inlined in the L2 programs: false when neither IP address of the frame can be a
/// watched one (their bits in `CONFIG.ip_filter` are clear), so most frames of other hosts cost no call. True
/// when it cannot tell (VMs followed by MAC, addresses not directly readable): [`track`] then decides, and counts
/// a cut frame.
#[inline(always)]
pub(crate) fn worth_tracking(f: &impl Frame, eth: &Eth) -> bool {
    if config!(flags) & CFG_FLOW_MACS != 0 {
        return true;
    }
    let (data, end) = (f.data(), f.data_end());
    // The last two bytes of each address: what `ip_filter_bit` hashes.
    let (s, d) = if eth.ethertype == 0x0800 {
        (eth.off + 14, eth.off + 18)
    } else {
        (eth.off + 22, eth.off + 38)
    };
    if data + d + 2 > end {
        return true;
    }
    // SAFETY: checked above that both pairs of bytes lie inside the packet (`s < d`).
    let (a, b) = unsafe { (load16(data + s).to_ne_bytes(), load16(data + d).to_ne_bytes()) };
    let filter = config!(ip_filter);
    let bit = |x: [u8; 2]| 1u64 << ((x[0] ^ x[1]) & 63);
    filter & (bit(a) | bit(b)) != 0
}

/// Hands an IPv4 or IPv6 frame whose Ethernet header `eth` has been parsed, seen by a hook in `direction`, to
/// the flow program of the frame's type (a tail call: it does not return when it succeeds). The parse goes along
/// in the per-CPU scratch slot; the flow program runs next on this CPU.
#[inline(always)]
pub(crate) fn hand_over(f: &impl Frame, eth: &Eth, direction: u8) {
    let Some(w) = WORK.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch slot, valid while the program runs; the tail-called program reads it next.
    unsafe {
        (&raw mut (*w).handoff).write(Handoff {
            ethertype: eth.ethertype,
            off: eth.off as u16,
            vlan: eth.vlan,
            vlan_count: eth.vlan_count,
            direction,
            pad: 0,
            ifindex: f.ifindex(),
        });
    }
    f.tail_call_flow();
}

/// The flow tracker for XDP: the frame `l2_ingress` handed over.
#[xdp]
#[inline(always)]
pub fn flow_xdp(ctx: XdpContext) -> u32 {
    flow(&XdpFrame::new(&ctx));
    xdp_action::XDP_PASS
}

/// The flow tracker for TC ingress and egress: the frame `l2_ingress_tc` or `l2_egress` handed over.
#[classifier]
#[inline(always)]
pub fn flow_tc(ctx: TcContext) -> i32 {
    flow(&TcFrame::new(&ctx));
    TC_ACT_UNSPEC
}

/// Tracks the frame an L2 program handed over ([`hand_over`]).
#[inline(always)]
fn flow(f: &impl Frame) {
    let Some(w) = WORK.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch slot, written by the L2 program that tail-called this one.
    let h = unsafe { (&raw const (*w).handoff).read() };
    if h.off > MAX_L3_OFF {
        return;
    }
    let eth = |ethertype| Eth {
        ethertype,
        off: usize::from(h.off),
        vlan: h.vlan,
        vlan_count: h.vlan_count,
    };
    // A constant ethertype in each call: the family is decided once, and the verifier (which cannot keep "not
    // IPv4" for a value it read from memory) never walks an IPv6 parse into the IPv4 path.
    match h.ethertype {
        ETH_P_IP => track_segment(f, w, &eth(ETH_P_IP), h.direction, h.ifindex),
        ETH_P_IPV6 => track_segment(f, w, &eth(ETH_P_IPV6), h.direction, h.ifindex),
        _ => 0,
    };
}

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

/// The fixed TCP header at `l4` of a packet whose IP layer leaves `payload` bytes: source port, destination port
/// and the segment. `None` when it is cut or odd (the caller counts it).
#[inline(always)]
fn tcp_header(f: &impl Frame, l4: usize, payload: usize) -> Option<(u16, u16, Segment)> {
    if payload < TCP_HLEN {
        return None;
    }
    let (p, _) = direct_at(f, l4, TCP_HLEN)?;
    // SAFETY: `direct_at` checked that the 20 bytes of the fixed TCP header lie inside the packet.
    let (sport, dport, seq, ack, doff, tcp_flags, window) = unsafe {
        let ports = load32(p);
        (
            u16::from_be(ports as u16),
            u16::from_be((ports >> 16) as u16),
            u32::from_be(load32(p + 4)),
            u32::from_be(load32(p + 8)),
            *((p + 12) as *const u8),
            *((p + 13) as *const u8),
            u16::from_be(load16(p + 14)),
        )
    };
    let doff = usize::from(doff >> 4) << 2;
    if doff < TCP_HLEN || doff > payload {
        return None;
    }
    Some((
        sport,
        dport,
        Segment {
            seq,
            ack,
            len: (payload - doff) as u32,
            window,
            flags: tcp_flags,
        },
    ))
}

/// A flow table key the cache compares and hashes in 8-byte words.
///
/// # Safety
/// `WORDS * 8` must be the type's size, and its values must sit at 8-byte aligned addresses wherever the
/// tracker reads them (the scratch slot, cache ways).
unsafe trait CacheKey: Sized {
    const WORDS: usize;
    /// The key's set index bits, from all its words.
    #[inline(always)]
    fn hash(words: *const u64) -> u32 {
        let mut x = 0u64;
        for i in 0..Self::WORDS {
            // SAFETY: the trait's contract: `WORDS` aligned words.
            x ^= unsafe { words.add(i).read() }.rotate_left(i as u32 * 13);
        }
        // Fold the halves, then multiply (Fibonacci hashing): the high half of the product depends on every bit.
        ((x ^ (x >> 32)) & 0xffff_ffff)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_shr(32) as u32
    }
}

// SAFETY: 16 bytes; the scratch slot and cache ways hold it 8-byte aligned.
unsafe impl CacheKey for FlowKey4 {
    const WORDS: usize = 2;
}

// SAFETY: 40 bytes; the scratch slot and cache ways hold it 8-byte aligned.
unsafe impl CacheKey for FlowKey {
    const WORDS: usize = 5;
}

const _: () = assert!(size_of::<FlowKey4>() == FlowKey4::WORDS * 8);
// The field offsets `apply_segment` writes the key's two words by.
const _: () = assert!(
    core::mem::offset_of!(FlowKey4, peer_addr) == 4
        && core::mem::offset_of!(FlowKey4, vm_port) == 8
        && core::mem::offset_of!(FlowKey4, peer_port) == 10
        && core::mem::offset_of!(FlowKey4, ifindex) == 12
);
const _: () = assert!(size_of::<FlowKey>() == FlowKey::WORDS * 8);

/// `a` and `b` hold the same key.
///
/// # Safety
/// Both must be valid for reads of `K::WORDS` aligned words.
#[inline(always)]
unsafe fn same_key<K: CacheKey>(a: *const K, b: *const K) -> bool {
    let (a, b) = (a.cast::<u64>(), b.cast::<u64>());
    let mut diff = 0;
    for i in 0..K::WORDS {
        // SAFETY: the caller's contract.
        diff |= unsafe { a.add(i).read() ^ b.add(i).read() };
    }
    diff == 0
}

/// When the flow in a cache way last saw a segment; 0 for an empty way.
///
/// # Safety
/// `st` must be valid for reads.
#[inline(always)]
unsafe fn last_seen(st: *const FlowState) -> u64 {
    // SAFETY: the caller's contract.
    unsafe {
        if (*st).first_ns == 0 {
            return 0;
        }
        (*st).dir[0].last_ns.max((*st).dir[1].last_ns).max(1)
    }
}

/// Marks a way index in [`Work::way`] as a new flow's.
const WAY_NEW: u32 = 8;

/// Applies a segment from `side` to the flow `key`: in its cache set (when there is a cache), else in `table`; a
/// flow in neither is new and goes into the set (`EV_OPEN` in the outcome). A busy flow in the cache costs no map
/// call: the set's index, a few word comparisons, then stores into the way in place. A new flow takes an empty way
/// or the one that saw a segment longest ago, whose flow moves to `table` (which may evict its own least recently
/// used flow for it). `None` when the flow could neither be found nor inserted (counted).
///
/// # Safety
/// `w` must be this CPU's scratch slot and `key` point into it (8-byte aligned).
#[inline(always)]
unsafe fn apply_to_table<K: CacheKey>(
    cache: &Array<FlowSet<K>>,
    table: &LruHashMap<K, FlowState>,
    key: *const K,
    w: *mut Work,
    side: u8,
    seg: &Segment,
    now: u64,
) -> Option<(Outcome, u32)> {
    let quiet = config!(flow_quiet_ns);
    let sets = config!(flow_cache_sets);
    let set = if sets == 0 {
        None
    } else {
        cache.get_ptr_mut(K::hash(key.cast()) & (sets - 1))
    };
    // SAFETY: `set` points to a map value, valid while the program runs; `key` and `w` by the caller's contract;
    // way indices are masked below FLOW_CACHE_WAYS.
    unsafe {
        let Some(set) = set else {
            if let Some(st) = table.get_ptr_mut(&*key) {
                return Some(update(st, side, seg, now, quiet));
            }
            return insert_into_table(table, key, w, side, seg, now, quiet);
        };
        let mut found = FLOW_CACHE_WAYS as u32;
        for i in 0..FLOW_CACHE_WAYS {
            if same_key(&raw const (*set).ways[i].key, key) {
                found = i as u32;
                break;
            }
        }
        if found == FLOW_CACHE_WAYS as u32 {
            if let Some(st) = table.get_ptr_mut(&*key) {
                return Some(update(st, side, seg, now, quiet));
            }
            found = victim(set) | WAY_NEW;
        }
        let slot = &raw mut (*w).way;
        slot.write_volatile(found);
        let found = slot.read_volatile();
        let way = (&raw mut (*set).ways)
            .cast::<FlowSlot<K>>()
            .add((found & (FLOW_CACHE_WAYS as u32 - 1)) as usize);
        if found & WAY_NEW != 0 {
            if (*way).state.first_ns != 0 {
                // The flow leaves the cache for the table; if the table has no room for it, it is evicted, and
                // counted as such (inserts minus entries).
                let _ = table.insert(&(*way).key, &(*way).state, u64::from(BPF_ANY));
            }
            let (src, dst) = (key.cast::<u64>(), (&raw mut (*way).key).cast::<u64>());
            for i in 0..K::WORDS {
                dst.add(i).write(src.add(i).read());
            }
            (&raw mut (*way).state).write(FlowState {
                first_ns: now,
                dir: [FlowDir::default(); 2],
            });
            if let Some(c) = counters() {
                atomic_add(&raw mut (*c).inserts, 1);
            }
        }
        let (mut out, peer_ack) = update(&raw mut (*way).state, side, seg, now, quiet);
        if slot.read_volatile() & WAY_NEW != 0 {
            out.events |= EV_OPEN;
        }
        Some((out, peer_ack))
    }
}

/// The way of `set` a new flow takes: an empty one, else the one that saw a segment longest ago.
///
/// # Safety
/// `set` must point to a map value valid while the program runs.
#[inline(always)]
unsafe fn victim<K>(set: *const FlowSet<K>) -> u32 {
    // SAFETY: the caller's contract.
    unsafe {
        let mut victim = 0;
        let mut oldest = last_seen(&raw const (*set).ways[0].state);
        for i in 1..FLOW_CACHE_WAYS {
            let seen = last_seen(&raw const (*set).ways[i].state);
            if seen < oldest {
                oldest = seen;
                victim = i as u32;
            }
        }
        victim
    }
}

/// A new flow into `table` itself (no cache): built in the scratch slot, then inserted.
///
/// # Safety
/// `w` must be this CPU's scratch slot and `key` an aligned key.
#[inline(always)]
unsafe fn insert_into_table<K: CacheKey>(
    table: &LruHashMap<K, FlowState>,
    key: *const K,
    w: *mut Work,
    side: u8,
    seg: &Segment,
    now: u64,
    quiet: u64,
) -> Option<(Outcome, u32)> {
    // SAFETY: the scratch slot's entry is valid for writes; the map copies key and value on insert.
    unsafe {
        let st = &raw mut (*w).state;
        st.write(FlowState {
            first_ns: now,
            dir: [FlowDir::default(); 2],
        });
        let (mut out, _) = update(st, side, seg, now, quiet);
        if table.insert(&*key, &*st, u64::from(BPF_NOEXIST)).is_ok() {
            out.events |= EV_OPEN;
            if let Some(c) = counters() {
                atomic_add(&raw mut (*c).inserts, 1);
            }
            Some((out, 0))
        } else if let Some(st) = table.get_ptr_mut(&*key) {
            // Another CPU inserted the flow first: the segment goes to its entry.
            Some(update(st, side, seg, now, quiet))
        } else {
            if let Some(c) = counters() {
                atomic_add(&raw mut (*c).insert_failed, 1);
            }
            None
        }
    }
}

/// TCP port `p` is in the port bitmap.
#[inline(always)]
fn port_watched(p: u16) -> bool {
    FLOW_PORTS
        .get(u32::from(p >> 6))
        .is_some_and(|w| w & (1u64 << (p & 63)) != 0)
}

/// The VM's end of a segment between `src_vm` and `dst_vm` (at least one watched): `SIDE_VM` when the source is
/// the VM's end. With both ends watched, the lower (address, port) is the VM's end, the same for both directions.
#[inline(always)]
fn sender_side(src_vm: bool, dst_vm: bool, src_lower: impl FnOnce() -> bool) -> u8 {
    let src_is_vm = if src_vm && dst_vm { src_lower() } else { src_vm };
    if src_is_vm { SIDE_VM } else { SIDE_PEER }
}

/// Whether the frame's Ethernet source (`Some(true)`) or destination (`Some(false)`) is a watched MAC.
#[inline(always)]
fn mac_end(f: &impl Frame) -> (bool, bool) {
    let (data, end) = (f.data(), f.data_end());
    let mut src_vm = false;
    let mut dst_vm = false;
    if let Some(src) = mac_at(data, end, 6) {
        src_vm = mac_watched(&src);
    }
    if !src_vm && let Some(dst) = mac_at(data, end, 0) {
        dst_vm = mac_watched(&dst);
    }
    (src_vm, dst_vm)
}

/// What the IP layer of a tracked frame says, for either family.
struct Tracked {
    ip: Ip,
    src_vm: bool,
    dst_vm: bool,
}

/// IPv4: parses the IP layer; the addresses stay in registers.
#[inline(always)]
fn ip_layer4(f: &impl Frame, off: usize) -> Parsed<(Tracked, [u8; 4], [u8; 4])> {
    let (ip, src, dst) = match ipv4(f, off) {
        Parsed::Yes(p) => p,
        Parsed::Skip => return Parsed::Skip,
        Parsed::Malformed => return Parsed::Malformed,
    };
    let flags = config!(flags);
    let (mut src_vm, mut dst_vm) = (false, false);
    if flags & CFG_FLOW_IPS != 0 {
        src_vm = ip4_watched(src);
        dst_vm = ip4_watched(dst);
    }
    if !src_vm && !dst_vm && flags & CFG_FLOW_MACS != 0 {
        (src_vm, dst_vm) = mac_end(f);
    }
    Parsed::Yes((Tracked { ip, src_vm, dst_vm }, src, dst))
}

/// IPv6: parses the IP layer; the addresses go to the scratch key `k` (source first).
///
/// # Safety
/// `k` must be valid for reads and writes and 8-byte aligned.
#[inline(always)]
unsafe fn ip_layer6(f: &impl Frame, off: usize, k: *mut FlowKey) -> Parsed<Tracked> {
    // SAFETY: the caller's contract.
    let ip = match unsafe { ipv6(f, off, k) } {
        Parsed::Yes(ip) => ip,
        Parsed::Skip => return Parsed::Skip,
        Parsed::Malformed => return Parsed::Malformed,
    };
    let flags = config!(flags);
    let (mut src_vm, mut dst_vm) = (false, false);
    if flags & CFG_FLOW_IPS != 0 {
        // SAFETY: `k` is aligned and valid for reads.
        unsafe {
            src_vm = ip_watched(&raw const (*k).vm_addr);
            dst_vm = ip_watched(&raw const (*k).peer_addr);
        }
    }
    if !src_vm && !dst_vm && flags & CFG_FLOW_MACS != 0 {
        (src_vm, dst_vm) = mac_end(f);
    }
    Parsed::Yes(Tracked { ip, src_vm, dst_vm })
}

/// The flow's entry for one segment, in either table, and what the segment did to it.
///
/// IPv4 flows live in `FLOWS4` under a [`FlowKey4`] (the addresses `v4`), IPv6 flows in `FLOWS` under the
/// scratch slot's [`FlowKey`]. When the segment raises a record, the slot's `key` holds the flow's key after
/// this, for either family. The family decides here and nowhere after: the verifier then walks the record path
/// once for both.
///
/// # Safety
/// `w` must be this CPU's scratch slot; for IPv6, its `key` must hold the segment's addresses.
#[expect(clippy::too_many_arguments, reason = "one segment's parts, each used once")]
#[inline(always)]
unsafe fn apply_segment(
    w: *mut Work,
    v4: Option<([u8; 4], [u8; 4])>,
    ifindex: u32,
    src_vm: bool,
    dst_vm: bool,
    sport: u16,
    dport: u16,
    seg: &Segment,
) -> Option<(u8, Outcome, u32)> {
    // The flow's own times are on a tick clock; records take the precise time.
    let now = tick_clock();
    if let Some((src, dst)) = v4 {
        let side = sender_side(src_vm, dst_vm, || {
            (u32::from_be_bytes(src), sport) < (u32::from_be_bytes(dst), dport)
        });
        let (vm, peer) = if side == SIDE_VM {
            ((src, sport), (dst, dport))
        } else {
            ((dst, dport), (src, sport))
        };
        // SAFETY: the caller's contract: the slot is valid for writes.
        unsafe {
            let k = &raw mut (*w).key4;
            // The key as its two 8-byte words, each written with one store: the cache hashes and compares it in
            // 8-byte loads right after, and a load the CPU cannot forward from one store of the same width and
            // address (field stores of 2 and 4 bytes) waits until they reach the cache, a stall of several ns
            // per segment. The layout is `FlowKey4`'s: addresses, then ports and ifindex (little-endian).
            let words = k.cast::<u64>();
            words.write(u64::from(u32::from_ne_bytes(vm.0)) | u64::from(u32::from_ne_bytes(peer.0)) << 32);
            words
                .add(1)
                .write(u64::from(vm.1) | u64::from(peer.1) << 16 | u64::from(ifindex) << 32);
            let (out, peer_ack) = apply_to_table(&FLOW_CACHE4, &FLOWS4, k, w, side, seg, now)?;
            if out.events != 0 {
                (&raw mut (*w).key).write((*k).widen());
            }
            Some((side, out, peer_ack))
        }
    } else {
        // SAFETY: the caller's contract: the slot's key holds the addresses, source first.
        unsafe {
            let k = &raw mut (*w).key;
            (*k).vm_port = sport;
            (*k).peer_port = dport;
            (*k).ifindex = ifindex;
            let side = sender_side(src_vm, dst_vm, || {
                lower(&(*k).vm_addr, sport, &(*k).peer_addr, dport)
            });
            if side == SIDE_PEER {
                swap_ends(k);
            }
            let (out, peer_ack) = apply_to_table(&FLOW_CACHE6, &FLOWS, k, w, side, seg, now)?;
            Some((side, out, peer_ack))
        }
    }
}

#[inline(always)]
fn track_segment(f: &impl Frame, w: *mut Work, eth: &Eth, direction: u8, ifindex: u32) -> u32 {
    let parsed = if eth.ethertype == 0x0800 {
        match ip_layer4(f, eth.off) {
            Parsed::Yes((t, src, dst)) => Parsed::Yes((t, Some((src, dst)))),
            Parsed::Skip => Parsed::Skip,
            Parsed::Malformed => Parsed::Malformed,
        }
    } else {
        // SAFETY: `w` is this CPU's scratch slot, valid while the program runs and used by one program at a time
        // on the CPU; its key is 8-byte aligned.
        match unsafe { ip_layer6(f, eth.off, &raw mut (*w).key) } {
            Parsed::Yes(t) => Parsed::Yes((t, None)),
            Parsed::Skip => Parsed::Skip,
            Parsed::Malformed => Parsed::Malformed,
        }
    };
    let (t, v4) = match parsed {
        Parsed::Yes(p) => p,
        Parsed::Skip => return 0,
        Parsed::Malformed => {
            count_malformed(ifindex);
            return 0;
        }
    };
    if !t.src_vm && !t.dst_vm {
        return 0;
    }
    let Some((sport, dport, seg)) = tcp_header(f, t.ip.l4, t.ip.payload) else {
        count_malformed(ifindex);
        return 0;
    };
    if config!(flags) & CFG_FLOW_PORTS != 0 && !port_watched(sport) && !port_watched(dport) {
        return 0;
    }
    // SAFETY: `w` is this CPU's scratch slot; for IPv6 its key holds the addresses (`ip_layer6`).
    let Some((side, out, peer_ack)) =
        (unsafe { apply_segment(w, v4, ifindex, t.src_vm, t.dst_vm, sport, dport, &seg) })
    else {
        return 0;
    };
    if out.events == 0 {
        return 0;
    }
    // What the record says goes through the scratch slot: read back, it is one unknown value to the verifier
    // wherever the segment came from (which table, which flags), so it walks the record path once, not once per
    // combination of what the tracker found.
    // SAFETY: `w` is this CPU's scratch slot; its key holds the flow's key (`apply_segment`).
    unsafe {
        let pending = &raw mut (*w).pending;
        pending.write_volatile(Pending {
            seg,
            out,
            peer_ack,
            side,
            family: t.ip.family,
        });
        let p = pending.read_volatile();
        let key = &*(&raw const (*w).key);
        report(
            f, eth, key, p.family, p.side, direction, &p.seg, &p.out, p.peer_ack,
        )
    }
}

/// Emits a record for each kind `out.events` holds, stamped with the precise clock; returns the frame bytes
/// captured.
#[expect(
    clippy::too_many_arguments,
    reason = "the parts of one record, each used once"
)]
#[inline(always)]
fn report(
    f: &impl Frame,
    eth: &Eth,
    key: &FlowKey,
    family: u16,
    side: u8,
    direction: u8,
    seg: &Segment,
    out: &Outcome,
    peer_ack: u32,
) -> u32 {
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let rec = Record {
        key,
        family,
        side,
        direction,
        seg,
        out,
        peer_ack,
        eth,
        now,
    };
    let mut captured = 0;
    let mut pending = out.events;
    for _ in 0..6 {
        if pending == 0 {
            break;
        }
        let bit = pending & pending.wrapping_neg();
        pending &= !bit;
        let (kind, gap) = match bit {
            EV_OPEN => (EventKind::FlowOpen, 0),
            EV_RETRANSMIT => (EventKind::FlowRetransmit, out.retransmit_gap),
            EV_PROGRESS => (EventKind::FlowProgress, out.progress_gap),
            EV_ZERO_WINDOW => (EventKind::FlowZeroWindow, 0),
            EV_FIN => (EventKind::FlowFin, 0),
            _ => (EventKind::FlowReset, 0),
        };
        captured += emit(f, kind, gap, &rec);
    }
    captured
}
