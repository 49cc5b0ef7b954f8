//! TCP and socket tracepoints. Field offsets come from [`crate::CONFIG`] (read from tracefs by user space), struct
//! member offsets for the socket (state, netns, retransmit state, RTT) from BTF.

use aya_ebpf::{helpers::bpf_probe_read_kernel, macros::tracepoint, programs::TracePointContext};
use monitor_common::{
    AF_INET, AF_INET6, CFG_FILTER_IPS, CFG_FILTER_PORTS, EventKind, IpKey, NO_FIELD, NO_OFFSET, TP_SOCKADDR,
    TcpEvent, TcpTuple, TpLayout, UNKNOWN_U8,
};

use crate::{CONFIG, EVENTS, WATCH_IPS, WATCH_PORTS, config, count_lost, header};

const IPPROTO_TCP: u16 = 6;

#[tracepoint]
pub fn tcp_retransmit_skb(ctx: TracePointContext) -> u32 {
    let _ = emit(&ctx, EventKind::TcpRetransmit, &raw const CONFIG.retransmit);
    0
}

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let _ = emit(&ctx, EventKind::TcpState, &raw const CONFIG.set_state);
    0
}

#[tracepoint]
pub fn inet_sk_error_report(ctx: TracePointContext) -> u32 {
    let _ = emit(&ctx, EventKind::TcpError, &raw const CONFIG.error_report);
    0
}

#[tracepoint]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    let _ = emit(&ctx, EventKind::TcpResetIn, &raw const CONFIG.receive_reset);
    0
}

#[tracepoint]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    let _ = emit(&ctx, EventKind::TcpResetOut, &raw const CONFIG.send_reset);
    0
}

/// Reads a `u16` offset out of a layout in CONFIG.
macro_rules! off {
    ($l:expr, $field:ident) => {
        // SAFETY: `$l` points into the CONFIG static; volatile so the load-time value is used.
        unsafe { core::ptr::read_volatile(&raw const (*$l).$field) }
    };
}

/// Reads a `T` at `offset` of the tracepoint record.
#[inline(always)]
fn at<T>(ctx: &TracePointContext, offset: u16) -> Result<T, i32> {
    if offset == NO_FIELD {
        return Err(-1);
    }
    // SAFETY: bpf_probe_read_kernel checks the address; a bad offset gives an error, not a fault.
    unsafe { ctx.read_at::<T>(usize::from(offset)) }
}

/// Reads a `T` from kernel memory at `base + offset`.
#[inline(always)]
fn kread<T>(base: u64, offset: u32) -> Result<T, i32> {
    if base == 0 || offset == NO_OFFSET {
        return Err(-1);
    }
    // SAFETY: bpf_probe_read_kernel checks the address; a stale pointer gives an error, not a fault.
    unsafe { bpf_probe_read_kernel((base + u64::from(offset)) as *const T) }
}

#[inline(always)]
fn ip_key(family: u16, addr: &[u8; 16]) -> IpKey {
    if family == AF_INET {
        let mut k = [0u8; 16];
        k[10] = 0xff;
        k[11] = 0xff;
        k[12] = addr[0];
        k[13] = addr[1];
        k[14] = addr[2];
        k[15] = addr[3];
        k
    } else {
        *addr
    }
}

/// The watch lists: with none, everything passes; otherwise the tuple must match an IP or a port under watch.
#[inline(always)]
fn watched(t: &TcpTuple) -> bool {
    let flags = config!(flags);
    if flags & (CFG_FILTER_IPS | CFG_FILTER_PORTS) == 0 {
        return true;
    }
    if flags & CFG_FILTER_IPS != 0 {
        // SAFETY: map lookups of plain keys; the values are not dereferenced.
        if unsafe { WATCH_IPS.get(&ip_key(t.family, &t.saddr)) }.is_some()
            || unsafe { WATCH_IPS.get(&ip_key(t.family, &t.daddr)) }.is_some()
        {
            return true;
        }
    }
    if flags & CFG_FILTER_PORTS != 0 {
        // SAFETY: as above.
        if unsafe { WATCH_PORTS.get(&t.sport) }.is_some() || unsafe { WATCH_PORTS.get(&t.dport) }.is_some() {
            return true;
        }
    }
    false
}

/// Reads the 4-tuple: either `family`/`sport`/`dport`/`saddr*`/`daddr*` fields, or two `sockaddr_in{,6}`.
#[inline(always)]
fn tuple(ctx: &TracePointContext, l: *const TpLayout) -> Result<TcpTuple, i32> {
    let mut t = TcpTuple::default();
    if off!(l, flags) & TP_SOCKADDR != 0 {
        let s = off!(l, saddr);
        let d = off!(l, daddr);
        t.family = at::<u16>(ctx, s)?;
        t.sport = u16::from_be(at::<u16>(ctx, s + 2)?);
        t.dport = u16::from_be(at::<u16>(ctx, d + 2)?);
        if t.family == AF_INET {
            let sa: [u8; 4] = at(ctx, s + 4)?;
            let da: [u8; 4] = at(ctx, d + 4)?;
            t.saddr[..4].copy_from_slice(&sa);
            t.daddr[..4].copy_from_slice(&da);
        } else if t.family == AF_INET6 {
            t.saddr = at(ctx, s + 8)?;
            t.daddr = at(ctx, d + 8)?;
        }
        return Ok(t);
    }
    t.family = at::<u16>(ctx, off!(l, family))?;
    t.sport = at::<u16>(ctx, off!(l, sport))?;
    t.dport = at::<u16>(ctx, off!(l, dport))?;
    if t.family == AF_INET {
        let sa: [u8; 4] = at(ctx, off!(l, saddr))?;
        let da: [u8; 4] = at(ctx, off!(l, daddr))?;
        t.saddr[..4].copy_from_slice(&sa);
        t.daddr[..4].copy_from_slice(&da);
    } else if t.family == AF_INET6 {
        t.saddr = at(ctx, off!(l, saddr_v6))?;
        t.daddr = at(ctx, off!(l, daddr_v6))?;
    } else {
        return Err(-1);
    }
    Ok(t)
}

#[inline(always)]
fn emit(ctx: &TracePointContext, kind: EventKind, l: *const TpLayout) -> Result<(), i32> {
    let protocol = off!(l, protocol);
    if protocol != NO_FIELD && at::<u16>(ctx, protocol)? != IPPROTO_TCP {
        return Ok(());
    }
    let tuple = tuple(ctx, l)?;
    if !watched(&tuple) {
        return Ok(());
    }
    let sk: u64 = at(ctx, off!(l, skaddr)).unwrap_or(0);

    let mut new_state: u32 = 0;
    let state_off = off!(l, state);
    let old_off = off!(l, oldstate);
    let state = if state_off != NO_FIELD {
        at::<i32>(ctx, state_off).unwrap_or(0) as u32
    } else if old_off != NO_FIELD {
        new_state = at::<i32>(ctx, off!(l, newstate)).unwrap_or(0) as u32;
        at::<i32>(ctx, old_off).unwrap_or(0) as u32
    } else {
        u32::from(kread::<u8>(sk, config!(off_sk_state)).unwrap_or(0))
    };
    let errno = at::<i32>(ctx, off!(l, error)).unwrap_or(0);
    let reason = at::<u32>(ctx, off!(l, reason)).unwrap_or(0);

    let netns = kread::<u64>(sk, config!(off_sk_net))
        .and_then(|net| kread::<u32>(net, config!(off_net_inum)))
        .map_or(0, u64::from);
    let (mut retransmits, mut backoff, mut rto_jiffies, mut srtt_us8) = (0u32, 0u32, 0u32, 0u32);
    let (mut ca_state, mut pending, mut tlp_high_seq) = (UNKNOWN_U8, UNKNOWN_U8, 0u32);
    if matches!(kind, EventKind::TcpRetransmit) {
        let bits = config!(ca_state_bits);
        let width = (bits >> 8) & 0xff;
        if width != 0 && width < 8 {
            if let Ok(b) = kread::<u8>(sk, config!(off_icsk_ca_state)) {
                ca_state = (b >> (bits & 7)) & ((1u8 << width) - 1);
            }
        }
        pending = kread::<u8>(sk, config!(off_icsk_pending)).unwrap_or(UNKNOWN_U8);
        tlp_high_seq = kread::<u32>(sk, config!(off_tlp_high_seq)).unwrap_or(0);
        retransmits = u32::from(kread::<u8>(sk, config!(off_icsk_retransmits)).unwrap_or(0));
        backoff = u32::from(kread::<u8>(sk, config!(off_icsk_backoff)).unwrap_or(0));
        rto_jiffies = kread::<u32>(sk, config!(off_icsk_rto)).unwrap_or(0);
        srtt_us8 = kread::<u32>(sk, config!(off_srtt_us)).unwrap_or(0);
    }

    let Some(mut entry) = EVENTS.reserve::<TcpEvent>(0) else {
        count_lost();
        return Ok(());
    };
    entry.write(TcpEvent {
        header: header(kind),
        tuple,
        netns,
        state,
        new_state,
        errno,
        retransmits,
        backoff,
        rto_jiffies,
        srtt_us8,
        reason,
        ca_state,
        pending,
        pad2: 0,
        tlp_high_seq,
    });
    entry.submit(0);
    Ok(())
}
