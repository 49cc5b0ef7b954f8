//! migmon's kernel programs. One file per kernel surface:
//! - [`tcp`]: `tcp:tcp_retransmit_skb`, `sock:inet_sock_set_state`, `sock:inet_sk_error_report`,
//!   `tcp:tcp_receive_reset`, `tcp:tcp_send_reset`;
//! - [`l2`]: the XDP ingress parser (ARP/RARP events, watched-MAC counters) and the TC egress counter;
//! - [`flow`]: the TCP flow tracker the L2 programs call for IP frames;
//! - [`bridge`]: `bridge:br_fdb_update`.
//!
//! Shared here: the ring buffer, the loss counter, the watch lists and the [`CONFIG`] global that user space fills
//! in at load time (tracepoint field offsets from tracefs, struct member offsets from BTF, flags).
#![no_std]
#![no_main]
// The BPF target has no `AtomicU64::fetch_add`; the intrinsic lowers to the BPF atomic add instruction.
#![feature(core_intrinsics)]
#![allow(internal_features)]
// Packet loads of one instruction at any alignment (`l2::load16`, `l2::load32`).
#![feature(asm_experimental_arch)]

mod bridge;
mod flow;
mod l2;
mod tcp;

use aya_ebpf::{
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns},
    macros::map,
    maps::{HashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use monitor_common::{EventHeader, EventKind, IpKey, MacCounters, MacKey, MacKey8, ProbeConfig};

/// Every event goes through this ring buffer. User space may resize it at load time.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Ring buffer reservations that failed, per CPU (index 0).
#[map]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// IP watch list (IPv6 or IPv4-mapped).
#[map]
static WATCH_IPS: HashMap<IpKey, u8> = HashMap::with_max_entries(1024, 0);

/// Port watch list (host byte order).
#[map]
static WATCH_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(1024, 0);

/// MAC watch list.
#[map]
static WATCH_MACS: HashMap<MacKey8, u8> = HashMap::with_max_entries(1024, 0);

/// Per-(MAC, ifindex, direction) counters of watched MACs.
#[map]
static MAC_STATS: HashMap<MacKey, MacCounters> = HashMap::with_max_entries(4096, 0);

/// Frames passed without being read (truncated or odd), per ifindex.
#[map]
static MALFORMED: PerCpuHashMap<u32, u64> = PerCpuHashMap::with_max_entries(1024, 0);

/// Filled in by user space at load time.
#[unsafe(no_mangle)]
static CONFIG: ProbeConfig = ProbeConfig::EMPTY;

/// Reads a field of [`CONFIG`] so that the compiler cannot fold the load-time value into the initial one.
macro_rules! config {
    ($($field:tt)+) => {
        // SAFETY: CONFIG is a valid, aligned static; the read is volatile so the value user space wrote at load
        // time is used, not the initializer.
        {
            #[allow(unused_unsafe)]
            let v = unsafe { core::ptr::read_volatile(&raw const $crate::CONFIG.$($field)+) };
            v
        }
    };
}
pub(crate) use config;

#[inline(always)]
fn header(kind: EventKind) -> EventHeader {
    EventHeader {
        kind: kind as u32,
        // SAFETY: helper without preconditions.
        cpu: unsafe { bpf_get_smp_processor_id() },
        // SAFETY: helper without preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
    }
}

/// Counts one failed ring buffer reservation on this CPU.
#[inline(always)]
fn count_lost() {
    if let Some(p) = LOST.get_ptr_mut(0) {
        // SAFETY: `p` points to this CPU's u64 slot of the map, valid and aligned while the program runs.
        unsafe { atomic_add(p, 1) };
    }
}

/// Atomically adds `v` to `*p` (a BPF atomic add, so concurrent CPUs or contexts never lose a count).
///
/// # Safety
/// `p` must be valid and 8-byte aligned.
#[inline(always)]
unsafe fn atomic_add(p: *mut u64, v: u64) {
    // SAFETY: the caller guarantees `p` is valid and aligned.
    unsafe { core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(p, v) };
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
