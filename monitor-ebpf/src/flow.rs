//! The TCP flow tracker: the state of every TCP connection of a watched VM, from its frames on the VM's ports.
//!
//! The L2 programs (XDP ingress, TC ingress, TC egress) call [`track`] for IPv4 and IPv6 frames, after their own
//! Ethernet and VLAN parsing, so a port pays for one program and one parse. A flow is watched when one end's
//! address is in `FLOW_IPS` (the VMs' IPs) or, with `CFG_FLOW_MACS`, when the frame's Ethernet source or
//! destination is a watched MAC (that end is then the VM's).
//!
//! Each flow is one entry of the LRU map `FLOWS`, keyed by [`FlowKey`] with the VM's end first, so both
//! directions share it (as ePPing keeps one entry per connection). No SYN is needed: the first segment seen in a
//! direction initialises that direction's state, so flows are picked up mid-stream. Per direction the entry keeps
//! the highest sequence end, the last ACK, the times of the last segment, of the last new data and of the last
//! forward progress, and the segment and retransmission counts ([`FlowDir`]).
//!
//! A busy flow costs a map lookup and a few stores per segment. A record goes to the ring buffer only when a
//! segment matters ([`FlowEvent`], one kind each):
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
//! Evictions: the tracker never deletes entries, so every entry that left the table was evicted by the LRU.
//! `FLOW_COUNTERS.inserts` counts successful inserts; user space counts the entries and reports
//! `inserts - entries` as evictions.
//!
//! Frames cut inside the IP or TCP header, or shorter than the IP length they announce, are counted in
//! `MALFORMED` and not read further. IPv4 fragments and IPv6 packets whose first next header is not TCP are not
//! tracked.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray},
};
use monitor_common::{
    AF_INET, AF_INET6, CFG_FLOW_IPS, CFG_FLOW_MACS, EventKind, FLOW_ACK_KNOWN, FLOW_FIN_SEEN,
    FLOW_INLINE_IPS, FLOW_PEER_ACK_KNOWN, FLOW_SEQ_KNOWN, FLOW_ZERO_WINDOW, FRAME_CAPTURE, FlowCounters,
    FlowDir, FlowEvent, FlowKey, FlowState, IpKey, SIDE_PEER, SIDE_VM, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
};

use crate::{
    EVENTS, atomic_add, config, count_lost, header,
    l2::{Eth, Frame, be16, byte, bytes, count_malformed, mac_watched},
};

/// The flow table. User space sizes it at load time.
#[map]
static FLOWS: LruHashMap<FlowKey, FlowState> = LruHashMap::with_max_entries(16384, 0);

/// Addresses of the watched VMs (IPv6 or IPv4-mapped).
#[map]
static FLOW_IPS: HashMap<IpKey, u8> = HashMap::with_max_entries(1024, 0);

/// A flow's key and a new flow's entry while a segment is tracked (index 0).
#[map]
static WORK: PerCpuArray<Work> = PerCpuArray::with_max_entries(1, 0);

/// 8-byte aligned (map values are), so the key's addresses (at offsets 0 and 16) take aligned 8-byte accesses: the
/// BPF backend splits an unaligned access into single bytes, which cost more than the rest of the parse.
#[repr(C, align(8))]
struct Work {
    key: FlowKey,
    state: FlowState,
}

/// Per-CPU counters and capture budget (index 0).
#[map]
static FLOW_COUNTERS: PerCpuArray<FlowCounters> = PerCpuArray::with_max_entries(1, 0);

const IPPROTO_TCP: u8 = 6;
const IPV6_HLEN: usize = 40;
const TCP_HLEN: usize = 20;

/// Record kinds a segment can raise, as bits, in the order they are emitted.
const EV_OPEN: u32 = 1;
const EV_RETRANSMIT: u32 = 2;
const EV_PROGRESS: u32 = 4;
const EV_ZERO_WINDOW: u32 = 8;
const EV_FIN: u32 = 16;
const EV_RESET: u32 = 32;

/// `a` comes before `b` in sequence space (modulo 2³²).
#[inline(always)]
fn before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// The directly readable bytes, with at least `need` of them: pulls them in when the frame is long enough but
/// they are not direct (TC). `None` when the frame is shorter than `need`.
#[inline(always)]
fn direct(f: &impl Frame, need: usize) -> Option<(usize, usize)> {
    let (data, end) = (f.data(), f.data_end());
    if data + need <= end {
        return Some((data, end));
    }
    if need as u64 > f.wire_len() || !f.pull(need as u32) {
        return None;
    }
    let (data, end) = (f.data(), f.data_end());
    (data + need <= end).then_some((data, end))
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

/// Stores IPv4 address `a` (its bytes in network order) as IPv4-mapped IPv6 at `dst`.
///
/// # Safety
/// `dst` must be valid for writes and 8-byte aligned.
#[inline(always)]
unsafe fn store_v4(dst: *mut IpKey, a: [u8; 4]) {
    let p = dst.cast::<u64>();
    // SAFETY: the caller's contract; `IpKey` is 16 bytes, two aligned u64 words.
    unsafe {
        p.write(0);
        p.add(1)
            .write(u64::from_ne_bytes([0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3]]));
    }
}

/// Copies the 16 bytes at `data + off` to `dst`, bounds-checked against `end`.
///
/// # Safety
/// `dst` must be valid for writes and 8-byte aligned.
#[inline(always)]
unsafe fn copy16(data: usize, end: usize, off: usize, dst: *mut IpKey) -> bool {
    let (Some(hi), Some(lo)) = (bytes::<8>(data, end, off), bytes::<8>(data, end, off + 8)) else {
        return false;
    };
    let dst = dst.cast::<u64>();
    // SAFETY: `dst` by the caller's contract.
    unsafe {
        dst.write(u64::from_ne_bytes(hi));
        dst.add(1).write(u64::from_ne_bytes(lo));
    }
    true
}

/// Parses IPv4 at `off`; the source address goes to `k.vm_addr`, the destination to `k.peer_addr`.
///
/// # Safety
/// `k` must be valid for writes and 8-byte aligned.
#[inline(always)]
unsafe fn ipv4(f: &impl Frame, off: usize, k: *mut FlowKey) -> Parsed<Ip> {
    let Some((data, end)) = direct(f, off + 20) else {
        return Parsed::Malformed;
    };
    let (Some(vihl), Some(tot), Some(frag), Some(proto), Some(s), Some(d)) = (
        byte(data, end, off),
        be16(data, end, off + 2),
        be16(data, end, off + 6),
        byte(data, end, off + 9),
        bytes::<4>(data, end, off + 12),
        bytes::<4>(data, end, off + 16),
    ) else {
        return Parsed::Malformed;
    };
    let ihl = usize::from(vihl & 0x0f) << 2;
    if vihl >> 4 != 4 || ihl < 20 {
        return Parsed::Malformed;
    }
    // More fragments, or a fragment offset: the TCP header is not (all) here.
    if proto != IPPROTO_TCP || frag & 0x3fff != 0 {
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
    // SAFETY: the caller's contract.
    unsafe {
        store_v4(&raw mut (*k).vm_addr, s);
        store_v4(&raw mut (*k).peer_addr, d);
    }
    Parsed::Yes(Ip {
        family: AF_INET,
        l4: off + ihl,
        payload,
    })
}

/// Parses IPv6 at `off`, like [`ipv4`].
///
/// # Safety
/// `k` must be valid for writes and 8-byte aligned.
#[inline(always)]
unsafe fn ipv6(f: &impl Frame, off: usize, k: *mut FlowKey) -> Parsed<Ip> {
    let Some((data, end)) = direct(f, off + IPV6_HLEN) else {
        return Parsed::Malformed;
    };
    let (Some(ver), Some(plen), Some(next)) = (
        byte(data, end, off),
        be16(data, end, off + 4),
        byte(data, end, off + 6),
    ) else {
        return Parsed::Malformed;
    };
    if ver >> 4 != 6 {
        return Parsed::Malformed;
    }
    if next != IPPROTO_TCP {
        return Parsed::Skip;
    }
    let plen = usize::from(plen);
    let wire = f.wire_len() as usize;
    let payload = if plen == 0 {
        wire.saturating_sub(off + IPV6_HLEN)
    } else {
        if off + IPV6_HLEN + plen > wire {
            return Parsed::Malformed;
        }
        plen
    };
    // SAFETY: the caller's contract.
    let copied = unsafe {
        copy16(data, end, off + 8, &raw mut (*k).vm_addr)
            && copy16(data, end, off + 24, &raw mut (*k).peer_addr)
    };
    if !copied {
        return Parsed::Malformed;
    }
    Parsed::Yes(Ip {
        family: AF_INET6,
        l4: off + IPV6_HLEN,
        payload,
    })
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
    // The bytes `ip_filter_bit` hashes: the address's last two.
    let last = a1.to_ne_bytes();
    if config!(ip_filter) & (1u64 << ((last[6] ^ last[7]) & 63)) == 0 {
        return false;
    }
    let count = config!(flow_ip_count) as usize;
    if count <= FLOW_INLINE_IPS {
        for i in 0..FLOW_INLINE_IPS {
            if i >= count {
                return false;
            }
            let w = (&raw const crate::CONFIG.flow_ips[i]).cast::<u64>();
            // SAFETY: CONFIG is a valid static and `flow_ips` sits at an 8-byte aligned offset (asserted in
            // monitor-common); volatile, so the value user space wrote at load time is used.
            let (w0, w1) = unsafe { (w.read_volatile(), w.add(1).read_volatile()) };
            if a0 == w0 && a1 == w1 {
                return true;
            }
        }
        return false;
    }
    // SAFETY: map lookup of a key the caller vouches for; the value is not dereferenced.
    unsafe { FLOW_IPS.get(&*addr) }.is_some()
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
        let silence = if (*d).segments == 0 {
            0
        } else {
            now.saturating_sub((*d).last_ns)
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
                    retransmit_gap = now.saturating_sub((*d).advance_ns);
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
    let mut hdr = header(kind);
    hdr.ts_ns = r.now;
    // SAFETY: `e` points to a reserved, exclusively owned FlowEvent in the ring buffer; every field is written
    // before submit. `c` is this CPU's counter slot.
    unsafe {
        (*e).header = hdr;
        (*e).key = *r.key;
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
    let (Some(a), Some(b)) = (bytes::<2>(data, end, s), bytes::<2>(data, end, d)) else {
        return true;
    };
    let filter = config!(ip_filter);
    let bit = |x: [u8; 2]| 1u64 << ((x[0] ^ x[1]) & 63);
    filter & (bit(a) | bit(b)) != 0
}

/// Tracks one IPv4 or IPv6 frame whose Ethernet header `eth` has been parsed, seen by a hook in `direction`.
///
/// Not inlined, so the L2 parser's stack and the tracker's do not add up in one frame. Returns the bytes of frame
/// captured into records (for [`keep`]).
#[inline(never)]
pub(crate) fn track(f: &impl Frame, eth: &Eth, direction: u8) -> u32 {
    track_segment(f, eth, direction)
}

/// Keeps the result of a call to a BPF function alive. If the result is unused, the compiler drops the function's
/// return value altogether and leaves the return register as it was: the verifier refuses a function that
/// returns a stack pointer that way. A volatile store of a value that is not a constant prevents it.
#[inline(always)]
pub(crate) fn keep(v: u32) {
    let mut sink = 0u32;
    // SAFETY: a store to a local.
    unsafe { core::ptr::write_volatile(&raw mut sink, v) };
}

#[inline(always)]
fn track_segment(f: &impl Frame, eth: &Eth, direction: u8) -> u32 {
    let ifindex = f.ifindex();
    // The key and a new flow's entry are built in a per-CPU scratch slot: the stack has no room for them.
    let Some(w) = WORK.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: `w` is this CPU's scratch slot, valid while the program runs and used by one program at a time on
    // the CPU.
    let k = unsafe { &raw mut (*w).key };
    // SAFETY: `k` is valid for writes.
    let parsed = unsafe {
        if eth.ethertype == 0x0800 {
            ipv4(f, eth.off, k)
        } else {
            ipv6(f, eth.off, k)
        }
    };
    let ip = match parsed {
        Parsed::Yes(ip) => ip,
        Parsed::Skip => return 0,
        Parsed::Malformed => {
            count_malformed(ifindex);
            return 0;
        }
    };

    // Whose flow is it? The VM's end by address, else by MAC. (`vm_addr` holds the source for now.)
    let flags = config!(flags);
    let mut src_vm = false;
    let mut dst_vm = false;
    if flags & CFG_FLOW_IPS != 0 {
        // SAFETY: `k` is the aligned key of the scratch slot.
        unsafe {
            src_vm = ip_watched(&raw const (*k).vm_addr);
            dst_vm = ip_watched(&raw const (*k).peer_addr);
        }
    }
    if !src_vm && !dst_vm && flags & CFG_FLOW_MACS != 0 {
        let (data, end) = (f.data(), f.data_end());
        if let Some(src) = bytes::<6>(data, end, 6) {
            src_vm = mac_watched(&src);
        }
        if !src_vm && let Some(dst) = bytes::<6>(data, end, 0) {
            dst_vm = mac_watched(&dst);
        }
    }
    if !src_vm && !dst_vm {
        return 0;
    }

    let l4 = ip.l4;
    if ip.payload < TCP_HLEN {
        count_malformed(ifindex);
        return 0;
    }
    let Some((data, end)) = direct(f, l4 + TCP_HLEN) else {
        count_malformed(ifindex);
        return 0;
    };
    let p = data + l4;
    if p + TCP_HLEN > end {
        count_malformed(ifindex);
        return 0;
    }
    // SAFETY: checked above that the 20 bytes of the fixed TCP header lie inside the packet.
    let (sport, dport, seq, ack, doff, tcp_flags, window) = unsafe {
        (
            u16::from_be((p as *const u16).read_unaligned()),
            u16::from_be(((p + 2) as *const u16).read_unaligned()),
            u32::from_be(((p + 4) as *const u32).read_unaligned()),
            u32::from_be(((p + 8) as *const u32).read_unaligned()),
            *((p + 12) as *const u8),
            *((p + 13) as *const u8),
            u16::from_be(((p + 14) as *const u16).read_unaligned()),
        )
    };
    let doff = usize::from(doff >> 4) << 2;
    if doff < TCP_HLEN || doff > ip.payload {
        count_malformed(ifindex);
        return 0;
    }
    let seg = Segment {
        seq,
        ack,
        len: (ip.payload - doff) as u32,
        window,
        flags: tcp_flags,
    };

    // SAFETY: `k` is valid for reads and writes.
    let side = unsafe {
        (*k).vm_port = sport;
        (*k).peer_port = dport;
        (*k).ifindex = ifindex;
        // Both ends watched: the lower (address, port) is the VM's end, the same for both directions.
        let src_is_vm = if src_vm && dst_vm {
            lower(&(*k).vm_addr, sport, &(*k).peer_addr, dport)
        } else {
            src_vm
        };
        if src_is_vm {
            SIDE_VM
        } else {
            swap_ends(k);
            SIDE_PEER
        }
    };

    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let quiet = config!(flow_quiet_ns);
    // SAFETY: `k` is valid; the map reads the key from it.
    let found = FLOWS.get_ptr_mut(unsafe { &*k });
    let (out, peer_ack) = if let Some(st) = found {
        // SAFETY: `st` points to the map value, valid while the program runs.
        unsafe { update(st, side, &seg, now, quiet) }
    } else {
        // SAFETY: the scratch slot's entry is valid for writes; the map copies key and value on insert.
        unsafe {
            let st = &raw mut (*w).state;
            st.write(FlowState {
                first_ns: now,
                dir: [FlowDir::default(); 2],
            });
            let (mut out, _) = update(st, side, &seg, now, quiet);
            if FLOWS.insert(&*k, &*st, u64::from(BPF_NOEXIST)).is_ok() {
                out.events |= EV_OPEN;
                if let Some(c) = counters() {
                    atomic_add(&raw mut (*c).inserts, 1);
                }
                (out, 0)
            } else if let Some(st) = FLOWS.get_ptr_mut(&*k) {
                // Another CPU inserted the flow first: the segment goes to its entry.
                update(st, side, &seg, now, quiet)
            } else {
                if let Some(c) = counters() {
                    atomic_add(&raw mut (*c).insert_failed, 1);
                }
                return 0;
            }
        }
    };
    if out.events == 0 {
        return 0;
    }
    let rec = Record {
        // SAFETY: `k` is valid for reads.
        key: unsafe { &*k },
        family: ip.family,
        side,
        direction,
        seg: &seg,
        out: &out,
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
