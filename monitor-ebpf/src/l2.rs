//! L2: the XDP ingress parser (also as a TC ingress classifier, `l2_ingress_tc`) and the TC egress counter.
//!
//! XDP parses Ethernet with up to two VLAN tags (802.1Q 0x8100, 802.1ad 0x88a8), reports ARP and RARP frames and
//! the ICMPv6 Neighbor Advertisements that announce (unsolicited, or with the override flag: the IPv6 gratuitous
//! ARP) with their first bytes, and counts frames *from* watched MACs per (MAC, ifindex). TC egress counts frames *towards*
//! watched MACs. Both emit `MacSeen` the first time a watched MAC shows on a port, and again after a silence longer
//! than `CONFIG.mac_gap_ns`. Frames too short for what their headers announce, or with odd ARP parameters, are
//! counted in `MALFORMED` and passed unread. XDP always returns `XDP_PASS`; TC always lets the frame go on.
//! Before TC ingress the kernel takes the outermost VLAN tag out of the frame into the socket buffer: the TC parser
//! reports it first among the tags, but the frame bytes it captures lack it.

use aya_ebpf::{
    EbpfContext,
    bindings::{__sk_buff, BPF_NOEXIST, TC_ACT_UNSPEC, xdp_action, xdp_md},
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_skb_load_bytes, bpf_xdp_load_bytes},
    },
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use monitor_common::{
    ArpEvent, CFG_WATCH_MACS, DIR_EGRESS, DIR_INGRESS, EventKind, FRAME_CAPTURE, MacCounters, MacKey,
    MacSeenEvent, NeighborAdvertEvent, na_announces,
};

use crate::{EVENTS, MAC_STATS, MALFORMED, WATCH_MACS, atomic_add, config, count_lost, header};

const ETH_HLEN: usize = 14;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_RARP: u16 = 0x8035;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const ETH_P_IPV6: u16 = 0x86dd;
/// ARP for Ethernet/IPv4: 8 bytes of header, then 6+4+6+4 bytes of addresses.
const ARP_LEN: usize = 28;
/// The fixed IPv6 header.
const IPV6_HLEN: usize = 40;
const IPPROTO_ICMPV6: u8 = 58;
const ICMPV6_NEIGHBOR_ADVERT: u8 = 136;
/// A Neighbor Advertisement without options: type, code, checksum, flags and reserved (4 bytes), target (16).
const NA_LEN: usize = 24;
/// One option of 8 bytes: type, length (in 8-byte units), and a MAC for the link-layer address options.
const ND_OPT_LEN: usize = 8;
const ND_OPT_TARGET_LLADDR: u8 = 2;
/// Neighbor Discovery messages are sent with hop limit 255; anything else was forwarded and is odd.
const ND_HOP_LIMIT: u8 = 255;

#[xdp]
pub fn l2_ingress(ctx: XdpContext) -> u32 {
    ingress(&ctx);
    xdp_action::XDP_PASS
}

/// The same parser as `l2_ingress`, as a TC ingress classifier: for interfaces where XDP costs too much (on a
/// veth, driver-mode XDP turns the peer's segmentation offloads off, and skb-mode XDP copies every large skb).
#[classifier]
pub fn l2_ingress_tc(ctx: TcContext) -> i32 {
    let sk = ctx.as_ptr().cast::<__sk_buff>();
    // SAFETY: the context of a classifier program is a `__sk_buff`; reading these fields is allowed.
    let (ifindex, vlan_present, vlan_tci) = unsafe { ((*sk).ifindex, (*sk).vlan_present, (*sk).vlan_tci) };
    // The kernel takes the outermost VLAN tag out of the frame into the socket buffer before TC ingress runs.
    let outer_tag = (vlan_present != 0).then_some(vlan_tci as u16);
    let skb = ctx.as_ptr();
    parse(
        ctx.data(),
        ctx.data_end(),
        ifindex,
        outer_tag,
        u64::from(ctx.len()),
        // SAFETY: `dst` points to `FRAME_CAPTURE` writable bytes (the caller's contract).
        |dst, len| unsafe { copy_frame_skb(skb, dst, len) },
    );
    TC_ACT_UNSPEC
}

#[classifier]
pub fn l2_egress(ctx: TcContext) -> i32 {
    egress(&ctx);
    TC_ACT_UNSPEC
}

/// A byte at `data + off`, bounds-checked against `end`.
#[inline(always)]
fn byte(data: usize, end: usize, off: usize) -> Option<u8> {
    if data + off + 1 > end {
        return None;
    }
    // SAFETY: checked above that the byte lies inside the packet.
    Some(unsafe { *((data + off) as *const u8) })
}

/// A big-endian u16 at `data + off`.
#[inline(always)]
fn be16(data: usize, end: usize, off: usize) -> Option<u16> {
    if data + off + 2 > end {
        return None;
    }
    // SAFETY: checked above that both bytes lie inside the packet.
    let v = unsafe { ((data + off) as *const u16).read_unaligned() };
    Some(u16::from_be(v))
}

/// `N` bytes at `data + off`.
#[inline(always)]
fn bytes<const N: usize>(data: usize, end: usize, off: usize) -> Option<[u8; N]> {
    if data + off + N > end {
        return None;
    }
    // SAFETY: checked above that all N bytes lie inside the packet.
    Some(unsafe { ((data + off) as *const [u8; N]).read_unaligned() })
}

#[inline(always)]
fn count_malformed(ifindex: u32) {
    match MALFORMED.get_ptr_mut(&ifindex) {
        // SAFETY: this CPU's slot of a per-CPU map value; the add is atomic against other contexts on the CPU.
        Some(p) => unsafe { atomic_add(p, 1) },
        None => {
            let _ = MALFORMED.insert(&ifindex, &1, u64::from(BPF_NOEXIST));
        }
    }
}

fn ingress(ctx: &XdpContext) {
    let data = ctx.data();
    let end = ctx.data_end();
    let ifindex = ctx.ingress_ifindex() as u32;
    let len = (end - data) as u64;
    // SAFETY: `dst` points to `FRAME_CAPTURE` writable bytes (the caller's contract).
    parse(data, end, ifindex, None, len, |dst, len| unsafe {
        copy_frame(ctx, dst, len)
    });
}

/// Parses one frame at `data..end` (`len` bytes on the wire) that arrived on `ifindex`. `outer_tag` is the TCI of a
/// VLAN tag the kernel already took out of the frame (TC), outside the tags still in it. `copy(dst, len)` copies
/// the frame's first bytes into `dst` (`FRAME_CAPTURE` writable bytes) and returns how many it copied.
#[inline(always)]
fn parse(
    data: usize,
    end: usize,
    ifindex: u32,
    outer_tag: Option<u16>,
    len: u64,
    copy: impl FnOnce(*mut u8, u64) -> u32,
) {
    let Some(src) = bytes::<6>(data, end, 6) else {
        count_malformed(ifindex);
        return;
    };
    let Some(mut ethertype) = be16(data, end, 12) else {
        count_malformed(ifindex);
        return;
    };
    if config!(flags) & CFG_WATCH_MACS != 0 {
        count_mac(src, ifindex, DIR_INGRESS, len);
    }

    let mut off = ETH_HLEN;
    let mut vlan = [0u16; 2];
    let mut vlan_count = 0u16;
    // Up to two tags (QinQ); a third is odd.
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        let (Some(tci), Some(inner)) = (be16(data, end, off), be16(data, end, off + 2)) else {
            count_malformed(ifindex);
            return;
        };
        vlan[0] = tci & 0x0fff;
        vlan_count = 1;
        ethertype = inner;
        off += 4;
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            let (Some(tci), Some(inner)) = (be16(data, end, off), be16(data, end, off + 2)) else {
                count_malformed(ifindex);
                return;
            };
            vlan[1] = tci & 0x0fff;
            vlan_count = 2;
            ethertype = inner;
            off += 4;
            if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
                count_malformed(ifindex);
                return;
            }
        }
    }
    if let Some(tci) = outer_tag {
        if vlan_count == 2 {
            count_malformed(ifindex);
            return;
        }
        vlan = [tci & 0x0fff, vlan[0]];
        vlan_count += 1;
    }
    let tags = Tags {
        vlan,
        count: vlan_count,
    };
    match ethertype {
        ETH_P_ARP | ETH_P_RARP => arp(data, end, off, ethertype, src, tags, ifindex, len, copy),
        ETH_P_IPV6 => neighbor_advert(data, end, off, src, tags, ifindex, len, copy),
        _ => {}
    }
}

/// The VLAN tags in front of the payload, outermost first.
#[derive(Clone, Copy)]
struct Tags {
    vlan: [u16; 2],
    count: u16,
}

/// An ARP or RARP frame whose payload starts at `off`.
#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "the parser state, passed by value so it stays in registers"
)]
fn arp(
    data: usize,
    end: usize,
    off: usize,
    ethertype: u16,
    src: [u8; 6],
    tags: Tags,
    ifindex: u32,
    len: u64,
    copy: impl FnOnce(*mut u8, u64) -> u32,
) {
    if data + off + ARP_LEN > end {
        count_malformed(ifindex);
        return;
    }
    // Ethernet/IPv4 ARP only: htype 1, ptype 0x0800, hlen 6, plen 4. Anything else is odd.
    if be16(data, end, off) != Some(1)
        || be16(data, end, off + 2) != Some(0x0800)
        || byte(data, end, off + 4) != Some(6)
        || byte(data, end, off + 5) != Some(4)
    {
        count_malformed(ifindex);
        return;
    }
    let (Some(op), Some(sha), Some(spa), Some(tha), Some(tpa)) = (
        be16(data, end, off + 6),
        bytes::<6>(data, end, off + 8),
        bytes::<4>(data, end, off + 14),
        bytes::<6>(data, end, off + 18),
        bytes::<4>(data, end, off + 24),
    ) else {
        count_malformed(ifindex);
        return;
    };

    let Some(mut entry) = EVENTS.reserve::<ArpEvent>(0) else {
        count_lost();
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points to a reserved, exclusively owned ArpEvent in the ring buffer; every field is written
    // before submit.
    unsafe {
        (*e).header = header(EventKind::Arp);
        (*e).ifindex = ifindex;
        (*e).netns_id = config!(netns_id);
        (*e).ethertype = ethertype;
        (*e).op = op;
        (*e).vlan = tags.vlan;
        (*e).vlan_count = tags.count;
        (*e).pad0 = 0;
        (*e).src_mac = src;
        (*e).pad1 = [0; 2];
        (*e).sha = sha;
        (*e).tha = tha;
        (*e).spa = spa;
        (*e).tpa = tpa;
        (*e).frame_len = len as u32;
        (*e).frame = [0; FRAME_CAPTURE];
        (*e).cap_len = copy((&raw mut (*e).frame).cast::<u8>(), len);
    }
    entry.submit(0);
}

/// An IPv6 packet whose header starts at `off`: reports it when it is a Neighbor Advertisement that announces. Other
/// IPv6 packets, and solicited NAs without the override flag (they answer a question and move no cache entry), are
/// passed unread. An NA cut shorter than its payload length, or with a hop limit other than 255 or a code other
/// than 0, counts as malformed. Only the first option is read, for the target link-layer address (Linux sends it
/// alone); extension headers in front of the ICMPv6 header are not followed.
#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "the parser state, passed by value so it stays in registers"
)]
fn neighbor_advert(
    data: usize,
    end: usize,
    off: usize,
    src: [u8; 6],
    tags: Tags,
    ifindex: u32,
    len: u64,
    copy: impl FnOnce(*mut u8, u64) -> u32,
) {
    let Some(next_header) = byte(data, end, off + 6) else {
        count_malformed(ifindex);
        return;
    };
    if next_header != IPPROTO_ICMPV6 {
        return;
    }
    let icmp = off + IPV6_HLEN;
    let Some(icmp_type) = byte(data, end, icmp) else {
        count_malformed(ifindex);
        return;
    };
    if icmp_type != ICMPV6_NEIGHBOR_ADVERT {
        return;
    }
    let (Some(version), Some(payload_len), Some(hop_limit), Some(code), Some(flags)) = (
        byte(data, end, off),
        be16(data, end, off + 4),
        byte(data, end, off + 7),
        byte(data, end, icmp + 1),
        byte(data, end, icmp + 4),
    ) else {
        count_malformed(ifindex);
        return;
    };
    let payload_len = usize::from(payload_len);
    // The verifier follows packet bounds only through comparisons of packet pointers. In XDP `len` is
    // `data_end - data`, and from `len >= icmp + payload_len >= icmp + NA_LEN` the compiler would drop the pointer
    // checks of the reads below; the volatile read hides where `len` came from.
    // SAFETY: a read of a local variable.
    let frame_len = unsafe { core::ptr::read_volatile(&raw const len) } as usize;
    if version >> 4 != 6
        || hop_limit != ND_HOP_LIMIT
        || code != 0
        || payload_len < NA_LEN
        || frame_len < icmp + payload_len
    {
        count_malformed(ifindex);
        return;
    }
    if !na_announces(flags) {
        return;
    }
    let (Some(src_ip), Some(dst_ip), Some(target)) = (
        bytes::<16>(data, end, off + 8),
        bytes::<16>(data, end, off + 24),
        bytes::<16>(data, end, icmp + 8),
    ) else {
        count_malformed(ifindex);
        return;
    };
    let opt = icmp + NA_LEN;
    let mut tlla = [0u8; 6];
    let mut has_tlla = 0u8;
    if payload_len >= NA_LEN + ND_OPT_LEN
        && byte(data, end, opt) == Some(ND_OPT_TARGET_LLADDR)
        && byte(data, end, opt + 1) == Some(1)
        && let Some(mac) = bytes::<6>(data, end, opt + 2)
    {
        tlla = mac;
        has_tlla = 1;
    }

    let Some(mut entry) = EVENTS.reserve::<NeighborAdvertEvent>(0) else {
        count_lost();
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points to a reserved, exclusively owned NeighborAdvertEvent in the ring buffer; every field is
    // written before submit.
    unsafe {
        (*e).header = header(EventKind::NeighborAdvert);
        (*e).ifindex = ifindex;
        (*e).netns_id = config!(netns_id);
        (*e).vlan = tags.vlan;
        (*e).vlan_count = tags.count;
        (*e).flags = flags;
        (*e).has_tlla = has_tlla;
        (*e).src_mac = src;
        (*e).tlla = tlla;
        (*e).frame_len = len as u32;
        (*e).pad0 = 0;
        (*e).src_ip = src_ip;
        (*e).dst_ip = dst_ip;
        (*e).target = target;
        (*e).frame = [0; FRAME_CAPTURE];
        (*e).cap_len = copy((&raw mut (*e).frame).cast::<u8>(), len);
    }
    entry.submit(0);
}

/// Copies the first `min(len, FRAME_CAPTURE)` bytes of the frame to `dst` in constant-size pieces (the verifier
/// wants constant lengths). Returns how many bytes were copied.
///
/// # Safety
/// `dst` must point to `FRAME_CAPTURE` writable bytes.
#[inline(always)]
unsafe fn copy_frame(ctx: &XdpContext, dst: *mut u8, len: u64) -> u32 {
    let md = ctx.as_ptr().cast::<xdp_md>();
    let want = if len > FRAME_CAPTURE as u64 {
        FRAME_CAPTURE as u32
    } else {
        len as u32
    };
    let mut done: u32 = 0;
    macro_rules! piece {
        ($n:literal) => {
            if want & $n != 0 && done <= FRAME_CAPTURE as u32 - $n {
                // SAFETY: `done + $n <= FRAME_CAPTURE`, so the destination range lies inside `dst`'s buffer; the
                // helper checks the source range against the packet.
                if unsafe { bpf_xdp_load_bytes(md, done, dst.add(done as usize).cast(), $n) } != 0 {
                    return done;
                }
                done += $n;
            }
        };
    }
    piece!(128);
    piece!(64);
    piece!(32);
    piece!(16);
    piece!(8);
    piece!(4);
    piece!(2);
    piece!(1);
    done
}

/// [`copy_frame`] for a socket buffer.
///
/// # Safety
/// `dst` must point to `FRAME_CAPTURE` writable bytes; `skb` must be the program's context.
#[inline(always)]
unsafe fn copy_frame_skb(skb: *mut core::ffi::c_void, dst: *mut u8, len: u64) -> u32 {
    let want = if len > FRAME_CAPTURE as u64 {
        FRAME_CAPTURE as u32
    } else {
        len as u32
    };
    let mut done: u32 = 0;
    macro_rules! piece {
        ($n:literal) => {
            if want & $n != 0 && done <= FRAME_CAPTURE as u32 - $n {
                // SAFETY: `done + $n <= FRAME_CAPTURE`, so the destination range lies inside `dst`'s buffer; the
                // helper checks the source range against the packet.
                if unsafe { bpf_skb_load_bytes(skb, done, dst.add(done as usize).cast(), $n) } != 0 {
                    return done;
                }
                done += $n;
            }
        };
    }
    piece!(128);
    piece!(64);
    piece!(32);
    piece!(16);
    piece!(8);
    piece!(4);
    piece!(2);
    piece!(1);
    done
}

fn egress(ctx: &TcContext) {
    if config!(flags) & CFG_WATCH_MACS == 0 {
        return;
    }
    // SAFETY: the context of a classifier program is a `__sk_buff`; reading `ifindex` is allowed.
    let ifindex = unsafe { (*ctx.as_ptr().cast::<__sk_buff>()).ifindex };
    let Some(dst) = bytes::<6>(ctx.data(), ctx.data_end(), 0) else {
        return;
    };
    count_mac(dst, ifindex, DIR_EGRESS, u64::from(ctx.len()));
}

/// Counts a frame of a watched MAC and emits `MacSeen` on its first frame on the port or after a silence.
#[inline(always)]
fn count_mac(mac: [u8; 6], ifindex: u32, direction: u8, len: u64) {
    // Most frames are from MACs nobody watches: one word tells, before the hash lookup.
    if config!(mac_filter) & monitor_common::mac_filter_bit(&mac) == 0 {
        return;
    }
    let key8 = [mac[0], mac[1], mac[2], mac[3], mac[4], mac[5], 0, 0];
    // SAFETY: map lookup of a plain key; the value is not dereferenced.
    if unsafe { WATCH_MACS.get(&key8) }.is_none() {
        return;
    }
    let key = MacKey {
        mac,
        direction,
        pad: 0,
        ifindex,
    };
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let gap = match MAC_STATS.get_ptr_mut(&key) {
        Some(p) => {
            // SAFETY: `p` points to the map value, valid while the program runs; counters are updated atomically,
            // the timestamps with plain stores (a racing CPU may win `last_ns`, which is harmless).
            unsafe {
                atomic_add(&raw mut (*p).frames, 1);
                atomic_add(&raw mut (*p).bytes, len);
                let last = (*p).last_ns;
                (*p).last_ns = now;
                let gap = now.saturating_sub(last);
                if gap <= config!(mac_gap_ns) {
                    return;
                }
                gap
            }
        }
        None => {
            let first = MacCounters {
                frames: 1,
                bytes: len,
                first_ns: now,
                last_ns: now,
            };
            if MAC_STATS.insert(&key, &first, u64::from(BPF_NOEXIST)).is_err() {
                // Another CPU inserted it first and reports it; count this frame there. If it is not there either,
                // the map is full: this port's first-seen event cannot be told, so it counts as lost.
                if let Some(p) = MAC_STATS.get_ptr_mut(&key) {
                    // SAFETY: as above.
                    unsafe {
                        atomic_add(&raw mut (*p).frames, 1);
                        atomic_add(&raw mut (*p).bytes, len);
                    }
                } else {
                    count_lost();
                }
                return;
            }
            0
        }
    };
    let Some(mut entry) = EVENTS.reserve::<MacSeenEvent>(0) else {
        count_lost();
        return;
    };
    let mut hdr = header(EventKind::MacSeen);
    // The same instant the counters recorded, so `ts_ns - gap_ns` is exactly the previous frame's `last_ns`.
    hdr.ts_ns = now;
    entry.write(MacSeenEvent {
        header: hdr,
        mac,
        direction,
        pad0: 0,
        ifindex,
        netns_id: config!(netns_id),
        gap_ns: gap,
    });
    entry.submit(0);
}
