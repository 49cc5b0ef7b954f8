//! L2: the XDP ingress parser (also as a TC ingress classifier, `l2_ingress_tc`) and the TC egress counter.
//!
//! XDP parses Ethernet with up to two VLAN tags (802.1Q 0x8100, 802.1ad 0x88a8), reports ARP and RARP frames and
//! the ICMPv6 Neighbor Advertisements that announce (unsolicited, or with the override flag: the IPv6 gratuitous
//! ARP) with their first bytes, and counts frames *from* watched MACs per (MAC, ifindex). TC egress counts frames
//! *towards* watched MACs. Both emit `MacSeen` the first time a watched MAC shows on a port, and again after a
//! silence longer than `CONFIG.mac_gap_ns`. Frames too short for what their headers announce, or with odd ARP or
//! Neighbor Discovery parameters, are counted in `MALFORMED` and passed unread. XDP always returns `XDP_PASS`; TC
//! always lets the frame go on. Before TC ingress the kernel takes the outermost VLAN tag out of the frame into the
//! socket buffer: the TC parser reports it first among the tags, but the frame bytes it captures lack it.

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
use aya_log_ebpf::debug;
use monitor_common::{
    ArpEvent, CFG_FLOW_IPS, CFG_FLOW_MACS, CFG_WATCH_MACS, DIR_EGRESS, DIR_INGRESS, EventKind, FRAME_CAPTURE,
    MacCounters, MacKey, MacSeenEvent, NeighborAdvertEvent, na_announces,
};

use crate::{EVENTS, MAC_STATS, MALFORMED, WATCH_MACS, atomic_add, config, count_lost, header};

const ETH_HLEN: usize = 14;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_RARP: u16 = 0x8035;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const ETH_P_IP: u16 = 0x0800;
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
    ingress(&XdpFrame(&ctx));
    xdp_action::XDP_PASS
}

/// The same parser as `l2_ingress`, as a TC ingress classifier: for interfaces where XDP costs too much (on a
/// veth, driver-mode XDP turns the peer's segmentation offloads off, and skb-mode XDP copies every large skb).
#[classifier]
pub fn l2_ingress_tc(ctx: TcContext) -> i32 {
    ingress(&TcFrame::new(&ctx));
    TC_ACT_UNSPEC
}

#[classifier]
pub fn l2_egress(ctx: TcContext) -> i32 {
    egress(&TcFrame::new(&ctx));
    TC_ACT_UNSPEC
}

/// What the parsers need from a frame, the same for XDP and TC.
pub(crate) trait Frame {
    /// Start of the directly readable bytes.
    fn data(&self) -> usize;
    /// End of the directly readable bytes.
    fn data_end(&self) -> usize;
    /// The interface the program runs on.
    fn ifindex(&self) -> u32;
    /// Length of the whole frame (for TC the skb's length, which may exceed the directly readable part).
    fn wire_len(&self) -> u64;
    /// The byte at `off`, read through the kernel (`bpf_xdp_load_bytes`, `bpf_skb_load_bytes`), 0 past the end.
    /// Unlike a direct read it leaves the verifier's packet bounds as they were, so a test on it does not split
    /// the paths that reach the flow tracker (which the verifier walks once per distinct path).
    fn load_byte(&self, off: usize) -> u8;
    /// Makes at least the first `n` bytes directly readable (TC: `bpf_skb_pull_data`); false when it cannot.
    /// Afterwards `data()` and `data_end()` must be read again.
    fn pull(&self, n: u32) -> bool;
    /// An outer VLAN tag the kernel took out of the frame into the packet's metadata (TC sees frames after the
    /// stack untagged them); `None` for XDP.
    fn outer_vlan(&self) -> Option<u16>;
    /// Copies the first `min(wire_len, FRAME_CAPTURE)` bytes to `dst`; returns how many it copied.
    ///
    /// # Safety
    /// `dst` must point to `FRAME_CAPTURE` writable bytes.
    unsafe fn copy(&self, dst: *mut u8) -> u32;
    /// Tail-calls the flow program of this program type; returns only when that fails (the tracker is off).
    fn tail_call_flow(&self);
}

pub(crate) struct XdpFrame<'a>(&'a XdpContext);

impl<'a> XdpFrame<'a> {
    #[inline(always)]
    pub(crate) fn new(ctx: &'a XdpContext) -> Self {
        Self(ctx)
    }
}

impl Frame for XdpFrame<'_> {
    #[inline(always)]
    fn data(&self) -> usize {
        self.0.data()
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        self.0.data_end()
    }
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        self.0.ingress_ifindex() as u32
    }
    #[inline(always)]
    fn wire_len(&self) -> u64 {
        (self.0.data_end() - self.0.data()) as u64
    }
    #[inline(always)]
    fn load_byte(&self, off: usize) -> u8 {
        let mut b = 0u8;
        // SAFETY: the context is the program's own; the helper writes at most 1 byte into `b`, and leaves it as
        // it was when `off` is past the end.
        unsafe {
            bpf_xdp_load_bytes(
                self.0.as_ptr().cast::<xdp_md>(),
                off as u32,
                (&raw mut b).cast(),
                1,
            )
        };
        b
    }
    #[inline(always)]
    fn pull(&self, _n: u32) -> bool {
        // Without multi-buffer support (which these programs do not declare) the whole frame is direct.
        false
    }
    #[inline(always)]
    fn outer_vlan(&self) -> Option<u16> {
        None
    }
    #[inline(always)]
    unsafe fn copy(&self, dst: *mut u8) -> u32 {
        // SAFETY: the caller's contract.
        unsafe { copy_frame(self.0, dst, self.wire_len()) }
    }
    #[inline(always)]
    fn tail_call_flow(&self) {
        // SAFETY: a tail call from the program's own context; control never comes back when it succeeds.
        let _ = unsafe { crate::flow::FLOW_PROG_XDP.tail_call(self.0, 0) };
    }
}

pub(crate) struct TcFrame<'a> {
    ctx: &'a TcContext,
    ifindex: u32,
}

impl<'a> TcFrame<'a> {
    #[inline(always)]
    pub(crate) fn new(ctx: &'a TcContext) -> Self {
        // SAFETY: the context of a classifier program is a `__sk_buff`; reading `ifindex` is allowed.
        let ifindex = unsafe { (*ctx.as_ptr().cast::<__sk_buff>()).ifindex };
        Self { ctx, ifindex }
    }
}

impl Frame for TcFrame<'_> {
    #[inline(always)]
    fn data(&self) -> usize {
        self.ctx.data()
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        self.ctx.data_end()
    }
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        self.ifindex
    }
    #[inline(always)]
    fn wire_len(&self) -> u64 {
        u64::from(self.ctx.len())
    }
    #[inline(always)]
    fn load_byte(&self, off: usize) -> u8 {
        let mut b = 0u8;
        // SAFETY: the context is the program's own; the helper writes at most 1 byte into `b`, and leaves it as
        // it was when `off` is past the end.
        unsafe { bpf_skb_load_bytes(self.ctx.as_ptr(), off as u32, (&raw mut b).cast(), 1) };
        b
    }
    #[inline(always)]
    fn pull(&self, n: u32) -> bool {
        self.ctx.pull_data(n).is_ok()
    }
    #[inline(always)]
    fn outer_vlan(&self) -> Option<u16> {
        let skb = self.ctx.as_ptr().cast::<__sk_buff>();
        // SAFETY: the context of a classifier program is a `__sk_buff`; its VLAN fields may be read.
        unsafe { ((*skb).vlan_present != 0).then(|| ((*skb).vlan_tci & 0x0fff) as u16) }
    }
    #[inline(always)]
    unsafe fn copy(&self, dst: *mut u8) -> u32 {
        // SAFETY: the caller's contract; the context is the program's own.
        unsafe { copy_frame_skb(self.ctx.as_ptr(), dst, self.wire_len()) }
    }
    #[inline(always)]
    fn tail_call_flow(&self) {
        // SAFETY: a tail call from the program's own context; control never comes back when it succeeds.
        let _ = unsafe { crate::flow::FLOW_PROG_TC.tail_call(self.ctx, 0) };
    }
}

/// The `u16` at packet address `p`, in network byte order as stored, with one load whatever its alignment.
///
/// The compiler splits a load it cannot prove aligned into single bytes (a packet field's alignment is not known
/// at compile time), each with its shift and or; the kernel's verifier accepts misaligned packet loads where the
/// CPU does them (x86-64, arm64). Not `pure`: the load must stay after the bounds check that guards it.
///
/// # Safety
/// `p..p + 2` must lie inside the packet, checked against its end before the call.
#[inline(always)]
pub(crate) unsafe fn load16(p: usize) -> u16 {
    let v: u64;
    // SAFETY: the caller's contract; the instruction reads 2 bytes at `p` and writes only the output register.
    unsafe {
        core::arch::asm!("{0} = *(u16 *)({1} + 0)", lateout(reg) v, in(reg) p, options(nostack, readonly, preserves_flags));
    }
    v as u16
}

/// The `u32` at packet address `p`, as stored, with one load whatever its alignment ([`load16`]).
///
/// # Safety
/// `p..p + 4` must lie inside the packet, checked against its end before the call.
#[inline(always)]
pub(crate) unsafe fn load32(p: usize) -> u32 {
    let v: u64;
    // SAFETY: the caller's contract; the instruction reads 4 bytes at `p` and writes only the output register.
    unsafe {
        core::arch::asm!("{0} = *(u32 *)({1} + 0)", lateout(reg) v, in(reg) p, options(nostack, readonly, preserves_flags));
    }
    v as u32
}

/// A byte at `data + off`, bounds-checked against `end`.
#[inline(always)]
pub(crate) fn byte(data: usize, end: usize, off: usize) -> Option<u8> {
    if data + off + 1 > end {
        return None;
    }
    // SAFETY: checked above that the byte lies inside the packet.
    Some(unsafe { *((data + off) as *const u8) })
}

/// A big-endian u16 at `data + off`.
#[inline(always)]
pub(crate) fn be16(data: usize, end: usize, off: usize) -> Option<u16> {
    if data + off + 2 > end {
        return None;
    }
    // SAFETY: checked above that both bytes lie inside the packet.
    Some(u16::from_be(unsafe { load16(data + off) }))
}

/// The 6 bytes of a MAC address at `data + off`, in two loads.
#[inline(always)]
pub(crate) fn mac_at(data: usize, end: usize, off: usize) -> Option<[u8; 6]> {
    if data + off + 6 > end {
        return None;
    }
    // SAFETY: checked above that the 6 bytes lie inside the packet.
    let (a, b) = unsafe {
        (
            load32(data + off).to_ne_bytes(),
            load16(data + off + 4).to_ne_bytes(),
        )
    };
    Some([a[0], a[1], a[2], a[3], b[0], b[1]])
}

/// `N` bytes at `data + off`.
#[inline(always)]
pub(crate) fn bytes<const N: usize>(data: usize, end: usize, off: usize) -> Option<[u8; N]> {
    if data + off + N > end {
        return None;
    }
    // SAFETY: checked above that all N bytes lie inside the packet.
    Some(unsafe { ((data + off) as *const [u8; N]).read_unaligned() })
}

/// Why a frame was passed unread, for the kernel log.
#[derive(Clone, Copy)]
#[repr(u32)]
enum Malformed {
    EthernetCut,
    VlanTags,
    ArpCut,
    ArpNotEthernetIpv4,
    NeighborAdvertCut,
    NeighborAdvertOdd,
}

/// Counts a frame passed unread (`MALFORMED`) and says why in the kernel log (`migmon watch --ebpf-log`). A call,
/// not inlined, so the log's code is there once: malformed frames are rare, and with logging off the log costs a load
/// of the level and a branch.
#[inline(never)]
fn malformed(ifindex: u32, why: Malformed) {
    count_malformed(ifindex);
    // One log statement: its record is built once, in a frame small enough to sit under the parser's.
    let why = match why {
        Malformed::EthernetCut => "frame cut inside its Ethernet header",
        Malformed::VlanTags => "VLAN tags cut short, or more than two",
        Malformed::ArpCut => "ARP cut short",
        Malformed::ArpNotEthernetIpv4 => "ARP not for Ethernet and IPv4",
        Malformed::NeighborAdvertCut => "neighbor advertisement cut short",
        Malformed::NeighborAdvertOdd => {
            "neighbor advertisement with an odd version, hop limit, code or length"
        }
    };
    debug!(&(), "ifindex {}: {}", ifindex, why);
}

#[inline(always)]
pub(crate) fn count_malformed(ifindex: u32) {
    match MALFORMED.get_ptr_mut(&ifindex) {
        // SAFETY: this CPU's slot of a per-CPU map value; the add is atomic against other contexts on the CPU.
        Some(p) => unsafe { atomic_add(p, 1) },
        None => {
            let _ = MALFORMED.insert(&ifindex, &1, u64::from(BPF_NOEXIST));
        }
    }
}

/// An Ethernet header with up to two VLAN tags, parsed.
pub(crate) struct Eth {
    /// The ethertype after the tags.
    pub ethertype: u16,
    /// Offset of the payload after the tags.
    pub off: usize,
    pub vlan: [u16; 2],
    pub vlan_count: u16,
}

/// Parses the Ethernet header and its tags (up to two: 802.1Q 0x8100, 802.1ad 0x88a8, counting an `outer` one
/// the kernel already took into the packet's metadata). `None` when the frame is cut inside them or has a third
/// tag (the caller counts it as malformed).
#[inline(always)]
pub(crate) fn parse_eth(data: usize, end: usize, outer: Option<u16>) -> Option<Eth> {
    let mut ethertype = be16(data, end, 12)?;
    let mut off = ETH_HLEN;
    let mut vlan = [0u16; 2];
    let mut vlan_count = 0u16;
    if let Some(tag) = outer {
        vlan[0] = tag;
        vlan_count = 1;
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            vlan[1] = be16(data, end, off)? & 0x0fff;
            ethertype = be16(data, end, off + 2)?;
            vlan_count = 2;
            off += 4;
            if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
                return None;
            }
        }
    } else if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        vlan[0] = be16(data, end, off)? & 0x0fff;
        ethertype = be16(data, end, off + 2)?;
        vlan_count = 1;
        off += 4;
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            vlan[1] = be16(data, end, off)? & 0x0fff;
            ethertype = be16(data, end, off + 2)?;
            vlan_count = 2;
            off += 4;
            if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
                return None;
            }
        }
    }
    Some(Eth {
        ethertype,
        off,
        vlan,
        vlan_count,
    })
}

/// Parses one frame arriving on the interface: counts it for a watched source MAC, reports ARP, RARP and announcing
/// neighbor advertisements, and hands TCP to the flow tracker when it is on.
#[inline(always)]
fn ingress(f: &impl Frame) {
    let data = f.data();
    let end = f.data_end();
    let ifindex = f.ifindex();
    let len = f.wire_len();
    let (Some(src), Some(_)) = (mac_at(data, end, 6), be16(data, end, 12)) else {
        malformed(ifindex, Malformed::EthernetCut);
        return;
    };
    let flags = config!(flags);
    if flags & CFG_WATCH_MACS != 0 {
        count_mac(src, ifindex, DIR_INGRESS, len);
    }
    let Some(eth) = parse_eth(data, end, f.outer_vlan()) else {
        malformed(ifindex, Malformed::VlanTags);
        return;
    };
    if eth.ethertype == ETH_P_IPV6 && f.load_byte(eth.off + 6) == IPPROTO_ICMPV6 {
        // ICMPv6 is never for the flow tracker. Every path through the NA parser ends here, and the test reads
        // through the kernel, so the verifier walks the tracker below no more often than before.
        neighbor_advert(f, &eth, &src);
        return;
    }
    if eth.ethertype == ETH_P_IP || eth.ethertype == ETH_P_IPV6 {
        if flags & (CFG_FLOW_IPS | CFG_FLOW_MACS) != 0 && crate::flow::worth_tracking(f, &eth) {
            crate::flow::hand_over(f, &eth, DIR_INGRESS);
        }
        return;
    }
    if eth.ethertype != ETH_P_ARP && eth.ethertype != ETH_P_RARP {
        return;
    }
    arp(f, &eth, src);
}

/// Reports an ARP or RARP frame whose Ethernet header `eth` has been parsed.
#[inline(always)]
fn arp(f: &impl Frame, eth: &Eth, src: [u8; 6]) {
    let data = f.data();
    let end = f.data_end();
    let ifindex = f.ifindex();
    let off = eth.off;
    if data + off + ARP_LEN > end {
        malformed(ifindex, Malformed::ArpCut);
        return;
    }
    // Ethernet/IPv4 ARP only: htype 1, ptype 0x0800, hlen 6, plen 4. Anything else is odd.
    if be16(data, end, off) != Some(1)
        || be16(data, end, off + 2) != Some(0x0800)
        || byte(data, end, off + 4) != Some(6)
        || byte(data, end, off + 5) != Some(4)
    {
        malformed(ifindex, Malformed::ArpNotEthernetIpv4);
        return;
    }
    let (Some(op), Some(sha), Some(spa), Some(tha), Some(tpa)) = (
        be16(data, end, off + 6),
        bytes::<6>(data, end, off + 8),
        bytes::<4>(data, end, off + 14),
        bytes::<6>(data, end, off + 18),
        bytes::<4>(data, end, off + 24),
    ) else {
        malformed(ifindex, Malformed::ArpCut);
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
        (*e).ethertype = eth.ethertype;
        (*e).op = op;
        (*e).vlan = eth.vlan;
        (*e).vlan_count = eth.vlan_count;
        (*e).pad0 = 0;
        (*e).src_mac = src;
        (*e).pad1 = [0; 2];
        (*e).sha = sha;
        (*e).tha = tha;
        (*e).spa = spa;
        (*e).tpa = tpa;
        (*e).frame_len = f.wire_len() as u32;
        (*e).frame = [0; FRAME_CAPTURE];
        (*e).cap_len = f.copy((&raw mut (*e).frame).cast::<u8>());
    }
    entry.submit(0);
}

/// An ICMPv6 packet whose Ethernet header `eth` has been parsed: reports it when it is a Neighbor Advertisement
/// that announces. Solicited NAs without the override flag (they answer a question and move no cache entry) and
/// other ICMPv6 messages are passed unread. An NA cut shorter than its payload length, or with a hop limit other
/// than 255 or a code other than 0, counts as malformed. Only the first option is read, for the target link-layer
/// address (Linux sends it alone); extension headers in front of the ICMPv6 header are not followed.
#[inline(always)]
fn neighbor_advert(f: &impl Frame, eth: &Eth, src: &[u8; 6]) {
    let ifindex = f.ifindex();
    let len = f.wire_len();
    // TC: the headers may lie outside the directly readable part; pull them in (XDP frames are direct).
    let want = (eth.off + IPV6_HLEN + NA_LEN + ND_OPT_LEN).min(len as usize);
    if f.data() + want > f.data_end() {
        f.pull(want as u32);
    }
    let (data, end) = (f.data(), f.data_end());
    // Plain checks, each followed by reads at constant offsets from `p`: the shape the verifier follows.
    let p = data + eth.off;
    if p + IPV6_HLEN + 1 > end {
        malformed(ifindex, Malformed::NeighborAdvertCut);
        return;
    }
    // SAFETY: checked above that the byte lies inside the packet.
    if unsafe { *((p + IPV6_HLEN) as *const u8) } != ICMPV6_NEIGHBOR_ADVERT {
        return;
    }
    if p + IPV6_HLEN + NA_LEN > end {
        malformed(ifindex, Malformed::NeighborAdvertCut);
        return;
    }
    // SAFETY: checked above that the IPv6 header and the NA's fixed part lie inside the packet.
    let (version, payload_len, hop_limit, code, flags) = unsafe {
        (
            *(p as *const u8),
            u16::from_be(((p + 4) as *const u16).read_unaligned()),
            *((p + 7) as *const u8),
            *((p + IPV6_HLEN + 1) as *const u8),
            *((p + IPV6_HLEN + 4) as *const u8),
        )
    };
    let payload_len = usize::from(payload_len);
    // In XDP the wire length is `data_end - data`; from `len >= off + IPV6_HLEN + payload_len` the compiler could
    // drop the pointer checks that follow, which the verifier needs. The volatile read hides where it came from.
    // SAFETY: a read of a local variable.
    let frame_len = unsafe { core::ptr::read_volatile(&raw const len) } as usize;
    if version >> 4 != 6
        || hop_limit != ND_HOP_LIMIT
        || code != 0
        || payload_len < NA_LEN
        || frame_len < eth.off + IPV6_HLEN + payload_len
    {
        malformed(ifindex, Malformed::NeighborAdvertOdd);
        return;
    }
    if !na_announces(flags) {
        return;
    }
    let mut tlla = [0u8; 6];
    let mut has_tlla = 0u8;
    if payload_len >= NA_LEN + ND_OPT_LEN && p + IPV6_HLEN + NA_LEN + ND_OPT_LEN <= end {
        let opt = p + IPV6_HLEN + NA_LEN;
        // SAFETY: checked above that the option's 8 bytes lie inside the packet.
        let (kind, units, mac) = unsafe {
            (
                *(opt as *const u8),
                *((opt + 1) as *const u8),
                ((opt + 2) as *const [u8; 6]).read_unaligned(),
            )
        };
        if kind == ND_OPT_TARGET_LLADDR && units == 1 {
            tlla = mac;
            has_tlla = 1;
        }
    }

    let Some(mut entry) = EVENTS.reserve::<NeighborAdvertEvent>(0) else {
        count_lost();
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points to a reserved, exclusively owned NeighborAdvertEvent in the ring buffer; every field is
    // written before submit. The addresses are copied straight from the packet (checked above to hold the IPv6
    // header and the NA's fixed part), so they take no room on the stack the flow tracker's calls share.
    unsafe {
        (*e).header = header(EventKind::NeighborAdvert);
        (*e).ifindex = ifindex;
        (*e).netns_id = config!(netns_id);
        (*e).vlan = eth.vlan;
        (*e).vlan_count = eth.vlan_count;
        (*e).flags = flags;
        (*e).has_tlla = has_tlla;
        (*e).src_mac = *src;
        (*e).tlla = tlla;
        (*e).frame_len = len as u32;
        (*e).pad0 = 0;
        (*e).src_ip = ((p + 8) as *const [u8; 16]).read_unaligned();
        (*e).dst_ip = ((p + 24) as *const [u8; 16]).read_unaligned();
        (*e).target = ((p + IPV6_HLEN + 8) as *const [u8; 16]).read_unaligned();
        (*e).frame = [0; FRAME_CAPTURE];
        (*e).cap_len = f.copy((&raw mut (*e).frame).cast::<u8>());
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

/// Counts a frame leaving towards a watched destination MAC and hands TCP to the flow tracker when it is on.
#[inline(always)]
fn egress(f: &impl Frame) {
    let flags = config!(flags);
    if flags & (CFG_WATCH_MACS | CFG_FLOW_IPS | CFG_FLOW_MACS) == 0 {
        return;
    }
    let data = f.data();
    let end = f.data_end();
    if flags & CFG_WATCH_MACS != 0 {
        let Some(dst) = mac_at(data, end, 0) else {
            return;
        };
        count_mac(dst, f.ifindex(), DIR_EGRESS, f.wire_len());
    }
    if flags & (CFG_FLOW_IPS | CFG_FLOW_MACS) == 0 {
        return;
    }
    let Some(eth) = parse_eth(data, end, f.outer_vlan()) else {
        count_malformed(f.ifindex());
        return;
    };
    if (eth.ethertype == ETH_P_IP || eth.ethertype == ETH_P_IPV6) && crate::flow::worth_tracking(f, &eth) {
        crate::flow::hand_over(f, &eth, DIR_EGRESS);
    }
}

/// `mac` is on the watch list.
#[inline(always)]
pub(crate) fn mac_watched(mac: &[u8; 6]) -> bool {
    // Most frames are from MACs nobody watches: one word tells, before the hash lookup.
    if config!(mac_filter) & monitor_common::mac_filter_bit(mac) == 0 {
        return false;
    }
    let key8 = [mac[0], mac[1], mac[2], mac[3], mac[4], mac[5], 0, 0];
    // SAFETY: map lookup of a plain key; the value is not dereferenced.
    unsafe { WATCH_MACS.get(&key8) }.is_some()
}

/// Counts a frame of a watched MAC and emits `MacSeen` on its first frame on the port or after a silence.
#[inline(always)]
fn count_mac(mac: [u8; 6], ifindex: u32, direction: u8, len: u64) {
    if !mac_watched(&mac) {
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
