//! Probe costs, through migmon's own loader ([`monitor::probes::Probes`]):
//! - XDP ns per frame with `BPF_PROG_TEST_RUN` (10⁶ repeats) for a non-ARP frame, a frame from a watched MAC, an
//!   ARP and a `QinQ` ARP, against an empty XDP program (`r0 = XDP_PASS; exit`) as the baseline;
//! - events per second through the collector (ring buffer drain, decode to typed events, JSON encoding) from a
//!   synthetic storm: ARP frames fed to the loaded parser by `BPF_PROG_TEST_RUN` from another thread, at paced
//!   offered rates; the highest rate with zero loss, and the loss above it;
//! - the flow tracker's ns per TCP segment of a tracked flow, in XDP and TC, against empty programs of the same
//!   run;
//! - a TCP stream over a veth pair with the probes in several attach modes against none, in turn, as throughput
//!   ratios; and the target's figure (part `paired`), the default attach (TC, the flow tracker following the
//!   stream) against none as the median of interleaved pairs' ratios, with the median's confidence interval and
//!   whether it decides.

use std::{
    net::{IpAddr, Ipv4Addr},
    os::fd::{FromRawFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use monitor::{
    decode::Decoder,
    probes::{FlowOptions, Iface, ProbeOptions, Probes, TcProgram, WatchList, XdpTestRunner},
};

use super::{
    Ctx, floors,
    net::{self, VethPair},
    report::{Better, Results},
};

pub const GROUP_XDP: &str = "probes: XDP cost per frame (BPF_PROG_TEST_RUN)";
pub const GROUP_EVENTS: &str = "probes: events through the collector";
pub const GROUP_TCP: &str = "probes: TCP stream over veth";
pub const GROUP_FLOW: &str = "probes: flow tracker cost per TCP segment (BPF_PROG_TEST_RUN)";
/// The throughput target's row: paired ratios of the default attach against none.
const DEFAULT_PAIRED: &str = "default (TC, flow tracker on the stream), paired with no probes";

const WATCHED: [u8; 6] = [0x52, 0x54, 0x00, 0xbe, 0x4c, 0x02];
const OTHER: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
const PEER: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];

pub fn run(ctx: &Ctx, results: &mut Results) -> Result<()> {
    type Part = fn(&Ctx, &mut Results) -> Result<()>;
    let mut errors = Vec::new();
    let parts: [(&str, &str, Part); 5] = [
        ("xdp", "XDP cost", xdp_cost),
        ("flow", "flow tracker cost", flow_cost),
        ("events", "event rate", event_rate),
        ("tcp", "TCP overhead", tcp_overhead),
        ("paired", "TCP throughput target, paired", tcp_paired),
    ];
    for (part, what, f) in parts {
        if !ctx.part("probes", part) {
            continue;
        }
        if let Err(e) = f(ctx, results) {
            ctx.progress(&format!("probes, {what}: {e:#}"));
            errors.push(format!("{what}: {e:#}"));
        }
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("; "));
    }
    Ok(())
}

fn opts(tracepoints: bool) -> ProbeOptions {
    ProbeOptions {
        watch: WatchList {
            macs: vec![WATCHED],
            ..WatchList::default()
        },
        tracepoints,
        ..ProbeOptions::default()
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Frames

fn eth(dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(64);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f
}

fn pad(mut f: Vec<u8>) -> Vec<u8> {
    if f.len() < 60 {
        f.resize(60, 0);
    }
    f
}

/// An IPv4/UDP frame from `src`.
pub fn ipv4_frame(src: [u8; 6]) -> Vec<u8> {
    let mut f = eth(PEER, src);
    f.extend_from_slice(&[0x08, 0x00]);
    // IPv4: version/IHL, TOS, total length 46, id, flags, TTL 64, UDP, checksum 0, 10.0.0.1 → 10.0.0.2
    f.extend_from_slice(&[0x45, 0, 0, 46, 0, 1, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
    // UDP 9 → 9, length 26, checksum 0, 18 bytes payload
    f.extend_from_slice(&[0, 9, 0, 9, 0, 26, 0, 0]);
    f.extend_from_slice(&[0xab; 18]);
    f
}

fn arp_body(sha: [u8; 6]) -> Vec<u8> {
    let mut b = vec![0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01];
    b.extend_from_slice(&sha);
    b.extend_from_slice(&[10, 0, 0, 1]);
    b.extend_from_slice(&[0; 6]);
    b.extend_from_slice(&[10, 0, 0, 2]);
    b
}

/// An ARP request from `src`.
pub fn arp_frame(src: [u8; 6]) -> Vec<u8> {
    let mut f = eth([0xff; 6], src);
    f.extend_from_slice(&[0x08, 0x06]);
    f.extend_from_slice(&arp_body(src));
    pad(f)
}

/// An ARP request inside `QinQ`: 802.1ad (VLAN 100) around 802.1Q (VLAN 200).
pub fn qinq_arp_frame(src: [u8; 6]) -> Vec<u8> {
    let mut f = eth([0xff; 6], src);
    f.extend_from_slice(&[0x88, 0xa8, 0x00, 100, 0x81, 0x00, 0x00, 200, 0x08, 0x06]);
    f.extend_from_slice(&arp_body(src));
    pad(f)
}

// ---------------------------------------------------------------------------------------------------------------
// The empty XDP program (baseline); monitor's XdpTestRunner runs it

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_PROG_TYPE_XDP: u32 = 6;

/// The first fields of `union bpf_attr` for `BPF_PROG_LOAD` (the rest stays zero).
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    pad: [u64; 8],
}

/// Loads `r0 = XDP_PASS; exit`.
fn load_empty_xdp() -> Result<OwnedFd> {
    load_empty(BPF_PROG_TYPE_XDP, 2)
}

/// Loads a TC classifier `r0 = TC_ACT_UNSPEC; exit`.
fn load_empty_tc() -> Result<OwnedFd> {
    load_empty(BPF_PROG_TYPE_SCHED_CLS, -1)
}

/// Loads `r0 = ret; exit` as a program of type `prog_type`.
fn load_empty(prog_type: u32, ret: i32) -> Result<OwnedFd> {
    // mov64 r0, ret ; exit
    let imm = ret.to_le_bytes();
    let insns: [u64; 2] = [
        u64::from_le_bytes([0xb7, 0, 0, 0, imm[0], imm[1], imm[2], imm[3]]),
        u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
    ];
    let license = c"GPL";
    let mut name = [0u8; 16];
    name[..9].copy_from_slice(b"bench_nop");
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: 2,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name: name,
        ..ProgLoadAttr::default()
    };
    // SAFETY: `attr` is a valid, zero-padded `bpf_attr` prefix; `insns` and `license` outlive the call and the
    // kernel only reads them.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &raw mut attr,
            size_of::<ProgLoadAttr>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("cannot load the empty program (needs root)");
    }
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

// ---------------------------------------------------------------------------------------------------------------
// XDP cost

fn xdp_cost(ctx: &Ctx, results: &mut Results) -> Result<()> {
    // 10⁶ repeats per run, in chunks that fit the ring buffer, drained in between, so frames that emit an event
    // never meet a full ring buffer (which would time the loss path instead).
    // Each call with repeat > 1 swaps the XDP dispatcher (milliseconds of wall time here, not counted in the
    // kernel's per-run figure), so the chunks are large and the ring buffer big enough for a chunk of events.
    let (chunk, chunks): (u32, u32) = if ctx.quick { (5000, 2) } else { (50_000, 20) };
    let frames: [(&str, Vec<u8>); 4] = [
        ("non-ARP frame", ipv4_frame(OTHER)),
        ("watched-MAC frame", ipv4_frame(WATCHED)),
        ("ARP", arp_frame(OTHER)),
        ("QinQ ARP", qinq_arp_frame(OTHER)),
    ];
    results.declare(GROUP_XDP, "empty XDP program", "ns/frame", Better::Lower);
    for (name, _) in &frames {
        results.declare(GROUP_XDP, name, "ns/frame", Better::Lower);
        results.set_baseline(GROUP_XDP, name, GROUP_XDP, "empty XDP program");
    }
    results.declare(
        GROUP_XDP,
        "non-ARP frame minus empty program",
        "ns/frame",
        Better::Lower,
    );
    results.set_target(GROUP_XDP, "non-ARP frame", "≤ 30 ns");
    ctx.progress(&format!(
        "probes: XDP ns per frame, {} repeats per frame per run",
        u64::from(chunk) * u64::from(chunks)
    ));
    let _t = ctx.ticker("probes: XDP ns per frame");
    let empty = XdpTestRunner::from_fd(load_empty_xdp()?);
    let mut probes = Probes::load(&ProbeOptions {
        ringbuf_bytes: 32 << 20,
        ..opts(false)
    })
    .context("cannot load migmon's probes")?;
    let mut drained = 0usize;
    for _ in 0..ctx.runs {
        let mut total = 0.0;
        for _ in 0..chunks {
            let (_, per_run) = empty
                .run(&frames[0].1, chunk)
                .context("BPF_PROG_TEST_RUN of the empty program failed")?;
            total += per_run.as_nanos() as f64;
        }
        results.push(
            GROUP_XDP,
            "empty XDP program",
            "ns/frame",
            Better::Lower,
            total / f64::from(chunks),
        );
        for (name, frame) in &frames {
            let mut total = 0.0;
            for _ in 0..chunks {
                let (ret, d) = probes.xdp_test_run(frame, chunk)?;
                if ret != 2 {
                    bail!("the XDP parser returned {ret} for the {name}, not XDP_PASS");
                }
                total += d.as_nanos() as f64;
                drained += probes.drain(|_| {});
            }
            results.push(
                GROUP_XDP,
                name,
                "ns/frame",
                Better::Lower,
                total / f64::from(chunks),
            );
        }
        // The parser's own cost on the fast path: what it adds to the empty program in the same run.
        if let (Some(a), Some(b)) = (
            results
                .get(GROUP_XDP, "non-ARP frame")
                .and_then(|r| r.values.last().copied()),
            results
                .get(GROUP_XDP, "empty XDP program")
                .and_then(|r| r.values.last().copied()),
        ) {
            results.push(
                GROUP_XDP,
                "non-ARP frame minus empty program",
                "ns/frame",
                Better::Lower,
                a - b,
            );
        }
    }
    let lost: u64 = probes.lost()?.iter().sum();
    let note = format!(
        "{chunks} × {chunk} repeats per run, 32 MiB ring drained between chunks ({drained} events drained, {lost} lost)"
    );
    for (name, _) in &frames {
        results.note(GROUP_XDP, name, &note);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// Flow tracker cost

/// The watched VM's address in the flow benches, and its peer.
const VM_IP: [u8; 4] = [10, 0, 0, 1];
const PEER_IP: [u8; 4] = [10, 0, 0, 2];

/// An IPv4/TCP frame from `src` to `dst` (ports 40000 → 5001) with `flags` and `payload` bytes, and the 12 bytes of
/// timestamp options Linux sends.
pub fn tcp_frame(src: [u8; 4], dst: [u8; 4], seq: u32, flags: u8, payload: usize) -> Vec<u8> {
    // Neither MAC is watched: the MAC counters (timed in the XDP group) stay out of these figures.
    let mut f = eth(PEER, OTHER);
    f.extend_from_slice(&[0x08, 0x00]);
    let tot = (20 + 32 + payload) as u16;
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&tot.to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&40_000u16.to_be_bytes());
    f.extend_from_slice(&5001u16.to_be_bytes());
    f.extend_from_slice(&seq.to_be_bytes());
    f.extend_from_slice(&1u32.to_be_bytes());
    f.extend_from_slice(&[0x80, flags, 0x01, 0xf4, 0, 0, 0, 0]);
    f.extend_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
    f.resize(f.len() + payload, 0xab);
    pad(f)
}

/// ns per frame of `run`, averaged over `chunks` runs of `chunk` repeats.
fn per_frame(chunks: u32, mut run: impl FnMut() -> Result<std::time::Duration>) -> Result<f64> {
    let mut total = 0.0;
    for _ in 0..chunks {
        total += run()?.as_nanos() as f64;
    }
    Ok(total / f64::from(chunks))
}

/// What the flow tracker adds per TCP segment, in XDP and in TC (the default on veths and taps), against an empty
/// program of the same type in the same run. The segment is a pure ACK of a tracked flow, repeated: the steady
/// state of a busy flow (a lookup and a few stores in the flow table, no record). A data segment repeated would
/// be a retransmission each time and time the record path instead (shown apart, for orientation).
fn flow_cost(ctx: &Ctx, results: &mut Results) -> Result<()> {
    const XDP_EMPTY: &str = "empty XDP program";
    const XDP_ACK: &str = "tracked flow ACK, XDP";
    const XDP_ADD: &str = "tracked flow ACK, XDP, minus empty program";
    const TC_EMPTY: &str = "empty TC program";
    const TC_ACK: &str = "tracked flow ACK, TC ingress";
    const TC_ADD: &str = "tracked flow ACK, TC ingress, minus empty program";
    const UNWATCHED: &str = "unwatched TCP segment, XDP, minus empty program";
    const UNWATCHED_TC: &str = "unwatched TCP segment, TC ingress, minus empty program";
    const RETRANSMIT: &str = "retransmission (record + 128-byte capture), XDP, minus empty program";
    let (chunk, chunks): (u32, u32) = if ctx.quick { (5000, 2) } else { (50_000, 20) };
    for name in [
        XDP_EMPTY,
        XDP_ACK,
        XDP_ADD,
        TC_EMPTY,
        TC_ACK,
        TC_ADD,
        UNWATCHED,
        UNWATCHED_TC,
        RETRANSMIT,
    ] {
        results.declare(GROUP_FLOW, name, "ns/segment", Better::Lower);
    }
    results.set_baseline(GROUP_FLOW, XDP_ACK, GROUP_FLOW, XDP_EMPTY);
    results.set_baseline(GROUP_FLOW, TC_ACK, GROUP_FLOW, TC_EMPTY);
    results.set_target(GROUP_FLOW, XDP_ADD, "≤ 40 ns");
    results.set_target(GROUP_FLOW, TC_ADD, "≤ 40 ns");
    results.set_target(GROUP_FLOW, XDP_ACK, "≤ empty + 40 ns");
    results.set_target(GROUP_FLOW, TC_ACK, "≤ empty + 40 ns");
    ctx.progress(&format!(
        "probes: flow tracker ns per TCP segment, {} repeats per frame per run",
        u64::from(chunk) * u64::from(chunks)
    ));
    let _t = ctx.ticker("probes: flow tracker ns per segment");
    let empty_xdp = XdpTestRunner::from_fd(load_empty_xdp()?);
    let empty_tc = XdpTestRunner::from_fd(load_empty_tc()?);
    let mut probes = Probes::load(&ProbeOptions {
        ringbuf_bytes: 32 << 20,
        flows: Some(FlowOptions {
            ips: vec![IpAddr::V4(Ipv4Addr::from(VM_IP))],
            captures_per_sec: 0,
            ..FlowOptions::default()
        }),
        ..opts(false)
    })
    .context("cannot load migmon's probes")?;
    let tc = probes.tc_test_runner(TcProgram::Ingress)?;
    let ack = tcp_frame(PEER_IP, VM_IP, 1, 0x10, 0);
    let data = tcp_frame(VM_IP, PEER_IP, 1000, 0x18, 100);
    let unwatched = tcp_frame([10, 9, 9, 1], [10, 9, 9, 2], 1, 0x10, 0);
    // The flows exist before the timing: the first run of each frame opens its flow.
    probes.xdp_test_run(&ack, 1)?;
    probes.xdp_test_run(&data, 1)?;
    tc.run(&ack, 1)
        .context("BPF_PROG_TEST_RUN of the TC parser failed")?;
    probes.drain(|_| {});
    let lost_before: u64 = probes.lost()?.iter().sum();
    let mut drained = 0usize;
    for _ in 0..ctx.runs {
        let xdp_empty = per_frame(chunks, || Ok(empty_xdp.run(&ack, chunk)?.1))?;
        let tc_empty = per_frame(chunks, || Ok(empty_tc.run(&ack, chunk)?.1))?;
        let xdp_ack = per_frame(chunks, || Ok(probes.xdp_test_run(&ack, chunk)?.1))?;
        let tc_ack = per_frame(chunks, || Ok(tc.run(&ack, chunk)?.1))?;
        let unwatched_ns = per_frame(chunks, || Ok(probes.xdp_test_run(&unwatched, chunk)?.1))?;
        let unwatched_tc = per_frame(chunks, || Ok(tc.run(&unwatched, chunk)?.1))?;
        let retransmit = per_frame(chunks, || {
            let d = probes.xdp_test_run(&data, chunk)?.1;
            drained += probes.drain(|_| {});
            Ok(d)
        })?;
        for (name, v) in [
            (XDP_EMPTY, xdp_empty),
            (XDP_ACK, xdp_ack),
            (XDP_ADD, xdp_ack - xdp_empty),
            (TC_EMPTY, tc_empty),
            (TC_ACK, tc_ack),
            (TC_ADD, tc_ack - tc_empty),
            (UNWATCHED, unwatched_ns - xdp_empty),
            (UNWATCHED_TC, unwatched_tc - tc_empty),
            (RETRANSMIT, retransmit - xdp_empty),
        ] {
            results.push(GROUP_FLOW, name, "ns/segment", Better::Lower, v);
        }
    }
    let lost = probes.lost()?.iter().sum::<u64>() - lost_before;
    results.note(
        GROUP_FLOW,
        XDP_ADD,
        &format!(
            "{chunks} × {chunk} repeats per run; a 66-byte pure ACK of a flow in the table (IPv4, timestamps), the \
             VM's address in the flow IP list; the empty programs run the same frame in the same run"
        ),
    );
    results.note(
        GROUP_FLOW,
        RETRANSMIT,
        &format!(
            "every run of the same data segment is a retransmission; {drained} records drained, {lost} lost"
        ),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// Event rate

/// What one storm did.
struct Storm {
    offered: u64,
    delivered: u64,
    lost: u64,
    secs: f64,
    /// Wall time spent inside `BPF_PROG_TEST_RUN` by the feeder, ns.
    feed_ns: u64,
}

/// One paced storm (`rate` events/s; None: as fast as the feeder goes) for `secs`.
fn storm(
    probes: &mut Probes,
    runner: &monitor::probes::XdpTestRunner,
    rate: Option<f64>,
    secs: f64,
) -> Result<Storm> {
    let frame = arp_frame(OTHER);
    let batch: u32 = 256;
    let lost0: u64 = probes.lost()?.iter().sum();
    let stop = Arc::new(AtomicBool::new(false));
    let offered = Arc::new(AtomicU64::new(0));
    let feed_ns = Arc::new(AtomicU64::new(0));
    let mut delivered = 0u64;
    let mut decoder = Decoder::new(probes.hz());
    let start = Instant::now();
    let storm_result = std::thread::scope(|s| {
        let (stop2, offered2, feed_ns2) = (stop.clone(), offered.clone(), feed_ns.clone());
        let frame = &frame;
        let feeder = s.spawn(move || -> Result<()> {
            let mut sent = 0u64;
            while start.elapsed().as_secs_f64() < secs {
                // One frame per call: with repeat > 1 the kernel swaps the XDP dispatcher around the run, which
                // costs milliseconds per call here and would make the feeder, not the collector, the bottleneck.
                let t = Instant::now();
                for _ in 0..batch {
                    runner.run(frame, 1).context("BPF_PROG_TEST_RUN")?;
                }
                feed_ns2.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                sent += u64::from(batch);
                offered2.store(sent, Ordering::Relaxed);
                if let Some(r) = rate {
                    let due = Duration::from_secs_f64(sent as f64 / r);
                    if let Some(d) = due.checked_sub(start.elapsed()) {
                        std::thread::sleep(d);
                    }
                }
            }
            stop2.store(true, Ordering::Relaxed);
            Ok(())
        });
        // The collector: drain, decode, encode as migmon's --json does.
        let mut buf = Vec::with_capacity(1 << 16);
        loop {
            let done = stop.load(Ordering::Relaxed);
            let n = probes.drain(|r| {
                if let Ok(w) = r {
                    let ev = decoder.event(&w);
                    buf.clear();
                    let _ = serde_json::to_writer(&mut buf, &ev);
                }
            });
            delivered += n as u64;
            if done {
                break;
            }
            if n == 0 {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        feeder
            .join()
            .map_err(|_| anyhow::anyhow!("storm thread panicked"))?
    });
    storm_result?;
    let secs = start.elapsed().as_secs_f64();
    delivered += probes.drain(|_| {}) as u64;
    let lost: u64 = probes.lost()?.iter().sum::<u64>() - lost0;
    Ok(Storm {
        offered: offered.load(Ordering::Relaxed),
        delivered,
        lost,
        secs,
        feed_ns: feed_ns.load(Ordering::Relaxed),
    })
}

fn event_rate(ctx: &Ctx, results: &mut Results) -> Result<()> {
    let secs = if ctx.quick { 0.2 } else { 1.0 };
    let rates: &[f64] = if ctx.quick {
        &[100e3]
    } else {
        &[100e3, 150e3, 200e3, 250e3, 300e3, 400e3, 500e3, 750e3, 1e6]
    };
    results.declare(
        GROUP_EVENTS,
        "highest offered rate with zero loss",
        "events/s",
        Better::Higher,
    );
    results.declare(
        GROUP_EVENTS,
        "unpaced storm: delivered",
        "events/s",
        Better::Higher,
    );
    results.declare(GROUP_EVENTS, "unpaced storm: lost", "% of offered", Better::Lower);
    results.declare(
        GROUP_EVENTS,
        "unpaced storm: feeder wall time per event",
        "ns",
        Better::Lower,
    );
    results.set_target(GROUP_EVENTS, "highest offered rate with zero loss", "≥ 500k/s");
    ctx.progress("probes: event storm through the collector (ARP frames via BPF_PROG_TEST_RUN)");
    let _t = ctx.ticker("probes: event storm");
    let mut probes = Probes::load(&opts(false)).context("cannot load migmon's probes")?;
    let runner = probes.xdp_test_runner()?;
    for _ in 0..ctx.runs {
        let mut best = 0.0f64;
        for &r in rates {
            let st = storm(&mut probes, &runner, Some(r), secs)?;
            if st.lost == 0 && st.delivered == st.offered {
                best = best.max(st.offered as f64 / st.secs);
            } else {
                break;
            }
        }
        results.push(
            GROUP_EVENTS,
            "highest offered rate with zero loss",
            "events/s",
            Better::Higher,
            best,
        );
        let st = storm(&mut probes, &runner, None, secs)?;
        results.push(
            GROUP_EVENTS,
            "unpaced storm: delivered",
            "events/s",
            Better::Higher,
            st.delivered as f64 / st.secs,
        );
        results.push(
            GROUP_EVENTS,
            "unpaced storm: lost",
            "% of offered",
            Better::Lower,
            if st.offered == 0 {
                0.0
            } else {
                st.lost as f64 * 100.0 / st.offered as f64
            },
        );
        results.push(
            GROUP_EVENTS,
            "unpaced storm: feeder wall time per event",
            "ns",
            Better::Lower,
            st.feed_ns as f64 / (st.offered.max(1)) as f64,
        );
    }
    results.note(
        GROUP_EVENTS,
        "highest offered rate with zero loss",
        &format!(
            "target rates, in turn up to the first loss: {} k/s, {secs} s each (the figure is the rate the feeder achieved); the collector drains, decodes and JSON-encodes each event \
             (no stdout write)",
            rates.iter().map(|r| format!("{:.0}", r / 1e3)).collect::<Vec<_>>().join(", ")
        ),
    );
    results.note(
        GROUP_EVENTS,
        "unpaced storm: delivered",
        "one feeder thread, one BPF_PROG_TEST_RUN call per ARP frame, as fast as it can (its wall time per \
         event is the next row: the most it can offer); ring buffer 1 MiB",
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// TCP overhead

/// Which probes a TCP run has attached.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Attach {
    Tracepoints,
    TracepointsXdp,
    All,
    /// All, the ingress parser as XDP in generic (skb) mode.
    AllXdpSkb,
    /// All, the ingress parser as a TC ingress classifier.
    AllTcIngress,
    /// What `migmon watch --iface A --iface B --vm MAC=IP` attaches by default on a veth (`--tcp both`): the
    /// tracepoints, TC ingress and egress on both ends, the flow tracker following the stream itself.
    Default,
}

impl Attach {
    fn name(self) -> &'static str {
        match self {
            Attach::Tracepoints => "tracepoints only",
            Attach::TracepointsXdp => "tracepoints + XDP",
            Attach::All => "all probes",
            Attach::AllXdpSkb => "all probes, XDP in skb mode",
            Attach::AllTcIngress => "all probes, parser on TC ingress",
            Attach::Default => "default (TC, flow tracker on the stream)",
        }
    }
}

/// One TCP run with `attach` (None: no probes): MiB/s, and the XDP mode used. With `pin`, the stream's sending
/// and receiving threads run on those two CPUs ([`tcp_pinned`]).
fn tcp_run(
    pair: &VethPair,
    bytes: u64,
    attach: Option<Attach>,
    pin: Option<(usize, usize)>,
) -> Result<(f64, String)> {
    let stream = || match pin {
        Some(cpus) => tcp_pinned(pair, bytes, cpus),
        None => floors::tcp_over(pair, bytes),
    };
    let Some(attach) = attach else {
        return Ok((stream()?, String::new()));
    };
    let flows = (attach == Attach::Default).then(|| FlowOptions {
        // The listening end: the stream's receiver plays the VM.
        ips: vec![pair.ip_a],
        ..FlowOptions::default()
    });
    let mut probes = Probes::load(&ProbeOptions {
        xdp_skb_mode: attach == Attach::AllXdpSkb,
        l2_tc_ingress: matches!(attach, Attach::AllTcIngress | Attach::Default),
        flows,
        ..opts(true)
    })
    .context("cannot load migmon's probes")?;
    let mut mode = String::new();
    for (ns, ifname) in [(&pair.a, &pair.if_a), (&pair.b, &pair.if_b)] {
        let iface = Iface {
            name: ifname.clone(),
            netns: Some(ns.name.clone()),
        };
        if attach != Attach::Tracepoints {
            probes.attach_xdp(&iface)?.mode.clone_into(&mut mode);
        }
        if attach != Attach::Tracepoints && attach != Attach::TracepointsXdp {
            probes.attach_tc_egress(&iface)?;
        }
    }
    // A collector drains while the stream runs, as in `migmon watch`.
    let stop = AtomicBool::new(false);
    let mbps = std::thread::scope(|s| {
        let stop = &stop;
        let probes = &mut probes;
        s.spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                probes.drain(|_| {});
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let r = stream();
        stop.store(true, Ordering::Relaxed);
        r
    })?;
    Ok((mbps, mode))
}

/// The first two CPUs this process may run on, when it may run on two.
fn two_cpus() -> Option<(usize, usize)> {
    // SAFETY: `set` is a plain bit set the kernel fills; sched_getaffinity on the calling thread (pid 0).
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &raw mut set) != 0 {
            return None;
        }
        set
    };
    // SAFETY: CPU_ISSET reads the set.
    let mut cpus = (0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) });
    Some((cpus.next()?, cpus.next()?))
}

/// The calling thread runs on one CPU until dropped, then where it could before.
struct Pin(Option<libc::cpu_set_t>);

impl Pin {
    fn to(cpu: usize) -> Self {
        // SAFETY: plain bit sets; sched_{get,set}affinity on the calling thread (pid 0).
        unsafe {
            let mut before: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &raw mut before) != 0 {
                return Self(None);
            }
            let mut one: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut one);
            if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const one) != 0 {
                return Self(None);
            }
            Self(Some(before))
        }
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        if let Some(before) = &self.0 {
            // SAFETY: as in `to`.
            unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), before) };
        }
    }
}

/// [`floors::tcp_over`] with the sending thread on `cpus.0` and the receiving thread on `cpus.1`, so that the
/// scheduler's placement does not vary from one stream to the next: MiB/s.
fn tcp_pinned(pair: &VethPair, total: u64, cpus: (usize, usize)) -> Result<f64> {
    let (tx, rx) = floors::connected(pair)?;
    let _sender = Pin::to(cpus.0);
    floors::stream(
        tx,
        PinnedReader {
            inner: rx,
            cpu: cpus.1,
            pin: None,
        },
        total,
    )
}

/// A reader that pins the thread reading it to `cpu` on its first read (the stream's reader thread).
struct PinnedReader<R> {
    inner: R,
    cpu: usize,
    pin: Option<Pin>,
}

impl<R: std::io::Read> std::io::Read for PinnedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pin.is_none() {
            self.pin = Some(Pin::to(self.cpu));
        }
        self.inner.read(buf)
    }
}

fn tcp_overhead(ctx: &Ctx, results: &mut Results) -> Result<()> {
    let bytes: u64 = if ctx.quick { 32 << 20 } else { 256 << 20 };
    let variants = [
        None,
        Some(Attach::Tracepoints),
        Some(Attach::TracepointsXdp),
        Some(Attach::All),
        Some(Attach::AllXdpSkb),
        Some(Attach::AllTcIngress),
        Some(Attach::Default),
    ];
    for v in variants {
        let name = v.map_or("no probes", Attach::name);
        results.declare(GROUP_TCP, name, "MiB/s", Better::Higher);
        if v.is_some() {
            results.set_baseline(GROUP_TCP, name, GROUP_TCP, "no probes");
        }
    }
    for name in [
        "all probes",
        "all probes, XDP in skb mode",
        "all probes, parser on TC ingress",
    ] {
        results.set_target(GROUP_TCP, name, "≥ 0.98× no probes");
    }
    ctx.progress(&format!(
        "probes: TCP stream over veth, {} MiB per run, probes off and on in turn",
        bytes >> 20
    ));
    let t = ctx.ticker("probes: TCP stream with and without probes");
    let pair = net::veth_pair(2)?;
    let mut xdp_mode = String::new();
    for i in 0..ctx.runs {
        t.set(&format!("probes: TCP stream, run {}/{}", i + 1, ctx.runs));
        for v in variants {
            let (mbps, mode) = tcp_run(&pair, bytes, v, None)?;
            if !mode.is_empty() && v == Some(Attach::All) {
                xdp_mode = mode;
            }
            results.push(
                GROUP_TCP,
                v.map_or("no probes", Attach::name),
                "MiB/s",
                Better::Higher,
                mbps,
            );
        }
    }
    results.note(
        GROUP_TCP,
        "all probes",
        &format!(
            "6 tracepoints, XDP ({xdp_mode} mode) and TC egress on both veth ends, a watched MAC not in the stream; \
             the variants run in turn within each run"
        ),
    );
    results.note(
        GROUP_TCP,
        "default (TC, flow tracker on the stream)",
        "6 tracepoints, TC ingress and egress on both veth ends, the receiver's IP under watch: every segment \
         of the stream goes through the flow tracker (twice: egress at the sender's end, ingress at the receiver's); \
         its target is judged on the paired row (part `paired`)",
    );
    Ok(())
}

/// The throughput target's row on a veth pair of its own (`--only probes:paired`).
fn tcp_paired(ctx: &Ctx, results: &mut Results) -> Result<()> {
    let pair = net::veth_pair(3)?;
    default_paired(ctx, results, &pair)
}

/// The target row: the default attach against no probes as the median of paired ratios. Each pair is two short
/// streams back to back, one with and one without, the order alternating (ABBA), so that load that comes and goes
/// on the machine weighs on both halves of a pair alike; the stream's sender and receiver are pinned to one CPU
/// each and run at nice -20, so that the scheduler's placement and other work vary little between the halves. The
/// note gives the median's 95% confidence interval (distribution-free, from the order statistics) and decides
/// only when the interval lies on one side of the target.
fn default_paired(ctx: &Ctx, results: &mut Results, pair: &VethPair) -> Result<()> {
    let (bytes, pairs): (u64, usize) = if ctx.quick {
        (8 << 20, 2)
    } else {
        (32 << 20, (ctx.runs * 8).max(48))
    };
    results.declare(GROUP_TCP, DEFAULT_PAIRED, "× no probes", Better::Higher);
    results.set_target(GROUP_TCP, DEFAULT_PAIRED, "≥ 0.98×");
    let cpus = two_cpus();
    ctx.progress(&format!(
        "probes: TCP stream, default attach against none: {pairs} interleaved pairs of {} MiB streams",
        bytes >> 20
    ));
    let t = ctx.ticker("probes: TCP stream pairs");
    let load_start = super::machine::load_average();
    let _nice = Nice::raise();
    let (mut with, mut without, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..pairs {
        t.set(&format!("probes: TCP stream pairs, {}/{pairs}", i + 1));
        let (a, b) = if i % 4 == 0 || i % 4 == 3 {
            let a = tcp_run(pair, bytes, None, cpus)?.0;
            (a, tcp_run(pair, bytes, Some(Attach::Default), cpus)?.0)
        } else {
            let b = tcp_run(pair, bytes, Some(Attach::Default), cpus)?.0;
            (tcp_run(pair, bytes, None, cpus)?.0, b)
        };
        without.push(a);
        with.push(b);
        ratios.push(b / a);
        results.push(GROUP_TCP, DEFAULT_PAIRED, "× no probes", Better::Higher, b / a);
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let (lo, hi) = median_interval(&mut ratios);
    let verdict = if ratios.len() < 6 {
        // Below 6 values even the whole sample's range covers the median less than 95% of the time.
        "undecided (too few pairs for a 95% interval)"
    } else {
        paired_verdict(lo, hi, 0.98)
    };
    results.note(
        GROUP_TCP,
        DEFAULT_PAIRED,
        &format!(
            "{verdict}: the median's 95% confidence interval is {lo:.3}–{hi:.3}×; {pairs} pairs of {} MiB streams, \
             with and without the default probes back to back, the order alternating (ABBA); the figure is the \
             median of the pairs' ratios; medians {:.0} MiB/s with, {:.0} without; sender and receiver {}, at \
             nice -20; load average {load_start} before, {} after",
            bytes >> 20,
            med(&mut with),
            med(&mut without),
            cpus.map_or_else(
                || "not pinned (one CPU)".to_owned(),
                |(s, r)| format!("pinned to CPUs {s} and {r}")
            ),
            super::machine::load_average()
        ),
    );
    Ok(())
}

/// The distribution-free 95% confidence interval of the median of `v` (sorted in place): the order statistics
/// of ranks ⌊n/2 − 0.98·√n⌋ and ⌈1 + n/2 + 0.98·√n⌉ (1-based, clamped to the sample).
fn median_interval(v: &mut [f64]) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let half = n as f64 / 2.0;
    let w = 0.98 * (n as f64).sqrt();
    let lo = ((half - w).floor() as usize).clamp(1, n);
    let hi = ((1.0 + half + w).ceil() as usize).clamp(1, n);
    (v[lo - 1], v[hi - 1])
}

/// What a ratio's confidence interval `lo`–`hi` says of the target `≥ target`.
fn paired_verdict(lo: f64, hi: f64, target: f64) -> &'static str {
    if lo >= target {
        "meets the target"
    } else if hi < target {
        "misses the target"
    } else {
        "undecided (the interval straddles the target: too spread to decide)"
    }
}

/// The calling thread's nice value at -20 until dropped (threads it starts meanwhile inherit it); unchanged when
/// the kernel refuses.
struct Nice(Option<i32>);

impl Nice {
    fn raise() -> Self {
        // SAFETY: getpriority/setpriority on the calling thread (who = 0), plain integers.
        unsafe {
            *libc::__errno_location() = 0;
            let before = libc::getpriority(libc::PRIO_PROCESS, 0);
            if *libc::__errno_location() != 0 || libc::setpriority(libc::PRIO_PROCESS, 0, -20) != 0 {
                return Self(None);
            }
            Self(Some(before))
        }
    }
}

impl Drop for Nice {
    fn drop(&mut self) {
        if let Some(before) = self.0 {
            // SAFETY: as in `raise`.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, before) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_interval_and_the_verdict() {
        let mut v: Vec<f64> = (0..48).map(|i| 0.95 + f64::from(i) * 0.002).collect();
        let (lo, hi) = median_interval(&mut v);
        assert!(lo < hi && lo >= 0.95 && hi <= 0.95 + 47.0 * 0.002, "{lo} {hi}");
        // Ranks 17 and 32 of 48.
        assert!((lo - (0.95 + 16.0 * 0.002)).abs() < 1e-9 && (hi - (0.95 + 31.0 * 0.002)).abs() < 1e-9);
        assert_eq!(paired_verdict(0.99, 1.01, 0.98), "meets the target");
        assert_eq!(paired_verdict(0.95, 0.97, 0.98), "misses the target");
        assert!(paired_verdict(0.97, 0.99, 0.98).starts_with("undecided"));
        assert_eq!(median_interval(&mut [1.0]), (1.0, 1.0));
    }

    #[test]
    fn frames_have_the_right_shape() {
        let f = ipv4_frame(OTHER);
        assert_eq!(f.len(), 60, "14 + 20 (IPv4) + 8 (UDP) + 18");
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        let a = arp_frame(OTHER);
        assert_eq!(a.len(), 60);
        assert_eq!(&a[12..14], &[0x08, 0x06]);
        assert_eq!(&a[20..22], &[0, 1], "op = request");
        let q = qinq_arp_frame(OTHER);
        assert_eq!(&q[12..14], &[0x88, 0xa8]);
        assert_eq!(&q[16..18], &[0x81, 0x00]);
        assert_eq!(&q[20..22], &[0x08, 0x06]);
        assert_eq!(&q[22..24], &[0x00, 0x01], "ARP htype after the two tags");
    }
}
