//! Probe costs, measured on the real kernel (root): XDP ns per frame by `BPF_PROG_TEST_RUN`, events per second
//! through the whole watch pipeline from a synthetic storm, and TCP stream throughput over a veth with and without
//! the probes. A measuring tool for the probe targets of issue 6 §2; the benchmarks own the published figures.
//!
//! ```text
//! cargo build --release -p integration-tests --example probe_costs
//! target/release/examples/probe_costs xdp|events|tcp|userspace|all [repeat=N] [secs=S] [pairs=N] [max_rate=N] >/dev/null
//! ```
//!
//! Results go to stderr (and as JSON, last). stdout carries the pipeline's own JSON lines, as `migmon watch --json`
//! prints them: point it at /dev/null (or a file, to include that cost).

use std::{
    io::{Read, Write},
    net::{SocketAddrV4, TcpListener, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use integration_tests::{Link, Netns, ip_in, unique};
use monitor::{
    events::Decoder,
    probes::{Iface, ProbeOptions, Probes, WatchList},
    trace::Event,
    watch::{Flow, Observer, Output, Pipeline, spawn_collector},
};
use serde_json::{Value, json};

macro_rules! say {
    ($($t:tt)*) => { eprintln!("probe_costs: {}", format!($($t)*)) };
}

/// `key=value` arguments.
struct Args(std::collections::BTreeMap<String, String>);

impl Args {
    fn parse(items: &[String]) -> Result<Self> {
        let mut m = std::collections::BTreeMap::new();
        for it in items {
            let (k, v) = it
                .split_once('=')
                .with_context(|| format!("argument {it:?} is not key=value"))?;
            m.insert(k.to_owned(), v.to_owned());
        }
        Ok(Self(m))
    }

    fn u64(&self, key: &str, default: u64) -> Result<u64> {
        self.0.get(key).map_or(Ok(default), |v| {
            v.parse()
                .with_context(|| format!("{key}={v} is not a whole number"))
        })
    }

    fn secs(&self, key: &str, default: f64) -> Result<Duration> {
        let v = self.0.get(key).map_or(Ok(default), |v| {
            v.parse::<f64>()
                .with_context(|| format!("{key}={v} is not a number of seconds"))
        })?;
        Ok(Duration::from_secs_f64(v))
    }
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = real_main(&argv) {
        eprintln!("probe_costs: error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main(argv: &[String]) -> Result<()> {
    let Some((case, rest)) = argv.split_first() else {
        bail!("usage: probe_costs xdp|events|tcp|userspace|all [key=value]... >/dev/null");
    };
    let args = Args::parse(rest)?;
    let mut out = serde_json::Map::new();
    let cases: &[&str] = if case == "all" {
        &["xdp", "events", "tcp", "userspace"]
    } else {
        &[case.as_str()]
    };
    for c in cases {
        let v = match *c {
            "xdp" => xdp(&args)?,
            "events" => events(&args)?,
            "tcp" => tcp(&args)?,
            "userspace" => userspace(&args)?,
            other => bail!("unknown case {other}: xdp, events, tcp or all"),
        };
        if let Value::Object(m) = v {
            out.extend(m);
        }
    }
    eprintln!("{}", serde_json::to_string_pretty(&Value::Object(out))?);
    Ok(())
}

const WATCHED: [u8; 6] = [0x52, 0x54, 0x00, 0x62, 0x65, 0x6e];
const OTHER: [u8; 6] = [0x52, 0x54, 0x00, 0x11, 0x22, 0x33];

fn eth(src: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// A 60-byte IPv4/TCP-looking frame (the parser only reads the ethertype).
fn ipv4_frame(src: [u8; 6]) -> Vec<u8> {
    let mut f = eth(src, 0x0800);
    f.extend_from_slice(&[
        0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
    ]);
    f.resize(60, 0);
    f
}

fn arp_body(src: [u8; 6]) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[..8].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    b[8..14].copy_from_slice(&src);
    b[14..18].copy_from_slice(&[10, 0, 0, 1]);
    b[24..28].copy_from_slice(&[10, 0, 0, 2]);
    b
}

fn arp_frame(src: [u8; 6]) -> Vec<u8> {
    let mut f = eth(src, 0x0806);
    f.extend_from_slice(&arp_body(src));
    f.resize(60, 0);
    f
}

/// An ARP inside an 802.1ad outer tag and an 802.1Q inner tag.
fn qinq_arp_frame(src: [u8; 6]) -> Vec<u8> {
    let mut f = eth(src, 0x88a8);
    f.extend_from_slice(&[0x00, 100, 0x81, 0x00, 0x00, 200, 0x08, 0x06]);
    f.extend_from_slice(&arp_body(src));
    f.resize(64, 0);
    f
}

/// An XDP program that only returns `XDP_PASS`: the cost of `BPF_PROG_TEST_RUN` itself.
struct EmptyXdp {
    fd: OwnedFd,
}

/// The `test` member of `union bpf_attr`, up to `batch_size`.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    pad: u32,
}

/// The `prog_load` member of `union bpf_attr`, up to `expected_attach_type`.
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
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;

impl EmptyXdp {
    fn load() -> Result<Self> {
        // r0 = 2 (XDP_PASS); exit
        let insns: [u64; 2] = [
            u64::from(0xb7u8) | (2u64 << 32), // BPF_ALU64 | BPF_MOV | BPF_K, imm 2
            0x95,                             // BPF_JMP | BPF_EXIT
        ];
        let license = c"GPL";
        let mut attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_XDP,
            insn_cnt: 2,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            expected_attach_type: BPF_XDP,
            ..ProgLoadAttr::default()
        };
        attr.prog_name[..9].copy_from_slice(b"bench_nop");
        // SAFETY: `attr` is a valid `bpf_attr.prog_load` prefix; `insns` and `license` outlive the call.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_LOAD,
                &raw mut attr,
                size_of::<ProgLoadAttr>() as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("cannot load the empty XDP program");
        }
        // SAFETY: the kernel returned a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(Self { fd })
    }

    /// Mean ns per run over `repeat` runs.
    fn run(&self, frame: &[u8], repeat: u32) -> Result<u32> {
        let mut attr = TestRunAttr {
            prog_fd: self.fd.as_raw_fd() as u32,
            data_size_in: frame.len() as u32,
            data_in: frame.as_ptr() as u64,
            repeat,
            ..TestRunAttr::default()
        };
        // SAFETY: a valid `bpf_attr.test` prefix; `frame` outlives the call and is only read.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_TEST_RUN,
                &raw mut attr,
                size_of::<TestRunAttr>() as libc::c_uint,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error()).context("BPF_PROG_TEST_RUN on the empty program");
        }
        Ok(attr.duration)
    }
}

/// XDP ns per frame: `repeat` runs of each frame kind, in chunks that fit the ring buffer, drained in between.
fn xdp(args: &Args) -> Result<Value> {
    let repeat = args.u64("repeat", 1_000_000)?;
    let chunk: u64 = 4096;
    let opts = ProbeOptions {
        watch: WatchList {
            macs: vec![WATCHED],
            ..WatchList::default()
        },
        tracepoints: false,
        ..ProbeOptions::default()
    };
    let mut probes = Probes::load(&opts).context("cannot load the probes (root? ./x build?)")?;
    let runner = probes.xdp_test_runner()?;
    let empty = EmptyXdp::load()?;
    let frames = [
        ("non_arp", ipv4_frame(OTHER)),
        ("watched_mac", ipv4_frame(WATCHED)),
        ("arp", arp_frame(OTHER)),
        ("qinq_arp", qinq_arp_frame(OTHER)),
    ];
    let mut out = serde_json::Map::new();
    let base = {
        let mut total = 0u64;
        let mut done = 0u64;
        while done < repeat {
            let n = chunk.min(repeat - done);
            total += u64::from(empty.run(&frames[0].1, n as u32)?) * n;
            done += n;
        }
        total as f64 / repeat as f64
    };
    out.insert("xdp_empty_ns".into(), json!(base));
    say!("xdp: empty program {base:.1} ns/run over {repeat} runs");
    for (name, frame) in &frames {
        let mut total = 0u64;
        let mut done = 0u64;
        let mut events = 0u64;
        while done < repeat {
            let n = chunk.min(repeat - done);
            let (rc, d) = runner.run(frame, n as u32).context("BPF_PROG_TEST_RUN")?;
            if rc != 2 {
                bail!("the XDP parser returned {rc} for the {name} frame, not XDP_PASS");
            }
            total += d.as_nanos() as u64 * n;
            done += n;
            events += probes.drain(|_| {}) as u64;
        }
        let ns = total as f64 / repeat as f64;
        say!("xdp: {name} {ns:.1} ns/frame ({events} events)");
        out.insert(format!("xdp_{name}_ns"), json!(ns));
        out.insert(format!("xdp_{name}_over_empty_ns"), json!(ns - base));
    }
    let lost: u64 = probes.lost()?.iter().sum();
    out.insert("xdp_ring_lost".into(), json!(lost));
    // The same non-ARP frame with no MAC under watch: the parser alone, without the watch-list lookup.
    drop(probes);
    let mut bare = Probes::load(&ProbeOptions {
        tracepoints: false,
        ..ProbeOptions::default()
    })?;
    let runner = bare.xdp_test_runner()?;
    let mut total = 0u64;
    let mut done = 0u64;
    while done < repeat {
        let n = chunk.min(repeat - done);
        total += runner.run(&frames[0].1, n as u32)?.1.as_nanos() as u64 * n;
        done += n;
    }
    let ns = total as f64 / repeat as f64;
    say!("xdp: non_arp without a watch list {ns:.1} ns/frame");
    out.insert("xdp_non_arp_nowatch_ns".into(), json!(ns));
    out.insert("xdp_non_arp_nowatch_over_empty_ns".into(), json!(ns - base));
    Ok(Value::Object(out))
}

/// One storm step: `rate` ARP frames/s for `secs` through the whole watch pipeline (collector thread, channel,
/// consumer writing JSON lines to stdout). Returns (sent, offered rate, received, lost, seconds until the last
/// event was handled, and how long that was after the last frame).
fn storm_step(rate: u64, secs: Duration, burst: u64, ring: u32) -> Result<(u64, f64, u64, u64, f64, f64)> {
    let opts = ProbeOptions {
        tracepoints: false,
        ringbuf_bytes: ring,
        ..ProbeOptions::default()
    };
    let mut probes = Probes::load(&opts).context("cannot load the probes")?;
    let runner = probes.xdp_test_runner()?;
    let pipeline = Pipeline::new()?;
    let control = pipeline.control();
    let decoder = Decoder::new(probes.hz());
    let collector = spawn_collector(
        probes,
        decoder,
        pipeline.sender(),
        control.clone(),
        Duration::from_millis(100),
    )?;
    let received = Arc::new(AtomicU64::new(0));
    let lost = Arc::new(AtomicU64::new(0));
    let sent_final = Arc::new(AtomicU64::new(u64::MAX));
    let start = Instant::now();
    let last = Arc::new(Mutex::new(start));
    let mut observers: Vec<Observer> = {
        let (received, lost, sent_final, last) =
            (received.clone(), lost.clone(), sent_final.clone(), last.clone());
        let mut n = 0u64;
        vec![Box::new(move |ev: &Event| {
            match ev {
                Event::Loss { count, .. } => {
                    lost.fetch_add(*count, Ordering::SeqCst);
                }
                e if e.kind() == "arp" => {
                    n += 1;
                    received.store(n, Ordering::SeqCst);
                    if n.is_multiple_of(1024) || n >= sent_final.load(Ordering::SeqCst) {
                        *last.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Instant::now();
                    }
                    if n >= sent_final.load(Ordering::SeqCst) {
                        return Flow::Stop(0);
                    }
                }
                _ => {}
            }
            Flow::Continue
        })]
    };
    let frame = arp_frame(OTHER);
    let gen_sent = sent_final.clone();
    let generator = std::thread::spawn(move || -> std::io::Result<(u64, f64, Duration)> {
        // Bursts of at most `burst` events at kernel speed, paced to the asked rate: ahead of schedule it sleeps,
        // behind it goes on at once. The offered rate is what was really sent. (Each BPF_PROG_TEST_RUN call of an
        // XDP program re-points the XDP dispatcher, a fixed cost of milliseconds here: small bursts cannot reach
        // high rates.)
        let total = (rate as f64 * secs.as_secs_f64()) as u64;
        let t0 = Instant::now();
        let mut sent = 0u64;
        while sent < total && t0.elapsed() < secs + secs / 2 {
            let due = ((rate as f64 * t0.elapsed().as_secs_f64()) as u64).min(total);
            if due > sent {
                let n = (due - sent).min(burst);
                runner.run(&frame, n as u32)?;
                sent += n;
            } else {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        gen_sent.store(sent, Ordering::SeqCst);
        Ok((sent, sent as f64 / t0.elapsed().as_secs_f64(), t0.elapsed()))
    });
    let mut out = Output::new(true, None);
    let deadline = Instant::now() + secs + Duration::from_secs(5);
    let (_summary, _code) = pipeline.consume(&mut out, Some(deadline), &mut observers, Some(collector))?;
    let (sent, offered, gen_took) = generator
        .join()
        .map_err(|_| anyhow::anyhow!("the storm thread panicked"))?
        .context("BPF_PROG_TEST_RUN in the storm")?;
    let got = received.load(Ordering::SeqCst);
    let took = last
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .duration_since(start)
        .as_secs_f64();
    // How long after the storm's last frame the pipeline handled its last event.
    let lag = took - gen_took.as_secs_f64();
    Ok((sent, offered, got, lost.load(Ordering::SeqCst), took, lag))
}

/// Raises the storm rate until events are lost or the pipeline falls behind; reports the highest clean rate.
fn events(args: &Args) -> Result<Value> {
    let secs = args.secs("secs", 1.0)?;
    let max = args.u64("max_rate", 4_000_000)?;
    let rates: Vec<u64> = [
        50_000u64, 100_000, 200_000, 300_000, 400_000, 500_000, 750_000, 1_000_000, 1_500_000, 2_000_000,
        3_000_000, 4_000_000,
    ]
    .into_iter()
    .filter(|&r| r <= max)
    .collect();
    let burst = args.u64("burst", 1024)?;
    let ring = u32::try_from(args.u64("ring", u64::from(monitor::probes::DEFAULT_RINGBUF_BYTES))?)
        .context("ring= is too large")?;
    // The fixed cost of one BPF_PROG_TEST_RUN call (one frame), which bounds the storm at small bursts.
    let call_cost = {
        let mut probes = Probes::load(&ProbeOptions {
            tracepoints: false,
            ..ProbeOptions::default()
        })?;
        let runner = probes.xdp_test_runner()?;
        let frame = ipv4_frame(OTHER);
        let t = Instant::now();
        for _ in 0..20 {
            runner.run(&frame, 1)?;
        }
        t.elapsed().as_secs_f64() / 20.0
    };
    say!(
        "events: one BPF_PROG_TEST_RUN call costs {:.2} ms; bursts of {burst}, ring {ring} bytes",
        call_cost * 1e3
    );
    let mut best = 0u64;
    let mut best_handled = 0f64;
    let mut above = json!(null);
    for rate in rates {
        let (sent, offered, got, lost, took, lag) = storm_step(rate, secs, burst, ring)?;
        // Kept up: everything arrived, the last event within 100 ms of the last frame.
        let in_time = lag <= 0.1;
        let handled = got as f64 / took;
        say!(
            "events: asked {rate}/s, offered {offered:.0}/s: sent {sent}, handled {got}, lost {lost}, last handled {:.0} ms after the last frame ({handled:.0}/s)",
            lag * 1e3
        );
        if lost == 0 && got == sent && in_time {
            best = best.max(offered as u64);
            best_handled = handled;
        } else {
            above = json!({"asked_per_s": rate, "offered_per_s": offered, "sent": sent, "handled": got,
                           "lost": lost, "handled_per_s": handled, "lag_ms": lag * 1e3});
            break;
        }
    }
    Ok(json!({
        "events_max_zero_loss_per_s": best,
        "events_handled_per_s_at_max": best_handled,
        "events_lost_above": above.get("lost").cloned().unwrap_or(json!(0)),
        "events_first_failing_step": above,
        "ringbuf_bytes": ring,
        "storm_burst": burst,
        "test_run_call_ms": call_cost * 1e3,
    }))
}

/// Bytes a receiver got from one TCP stream in `secs` over the veth.
fn stream(a: &Netns, server: &TcpListener, addr: SocketAddrV4, secs: Duration) -> Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut client = a
        .run(|| TcpStream::connect_timeout(&addr.into(), Duration::from_secs(5)))
        .context("connect over the veth")?;
    let (mut conn, _) = server.accept().context("accept")?;
    let s2 = stop.clone();
    let sender = std::thread::spawn(move || {
        let buf = vec![0x5au8; 256 * 1024];
        while !s2.load(Ordering::SeqCst) {
            if client.write_all(&buf).is_err() {
                break;
            }
        }
    });
    let mut buf = vec![0u8; 256 * 1024];
    // Warm-up: let the window open.
    let warm = Instant::now() + Duration::from_millis(200);
    while Instant::now() < warm {
        conn.read(&mut buf).context("read")?;
    }
    let t0 = Instant::now();
    let mut bytes = 0u64;
    while t0.elapsed() < secs {
        bytes += conn.read(&mut buf).context("read")? as u64;
    }
    let rate = bytes as f64 / t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    drop(conn);
    let _ = sender.join();
    Ok(rate)
}

/// TCP stream throughput over a veth between two namespaces: no probes, then every probe (tracepoints on all TCP,
/// XDP and TC egress on both ends, the collector and consumer running), alternating.
fn tcp(args: &Args) -> Result<Value> {
    let secs = args.secs("secs", 2.0)?;
    let pairs = args.u64("pairs", 3)?;
    let a = Netns::new("bta");
    let b = Netns::new("btb");
    let (va, vb) = (unique("bva"), unique("bvb"));
    let _link = Link::veth(&va, Some(&a.name), &vb, Some(&b.name));
    let n = std::process::id() % 200 + 20;
    ip_in(
        Some(&a.name),
        &["addr", "add", &format!("10.{n}.9.1/24"), "dev", &va],
    );
    ip_in(
        Some(&b.name),
        &["addr", "add", &format!("10.{n}.9.2/24"), "dev", &vb],
    );
    let addr = SocketAddrV4::new(std::net::Ipv4Addr::new(10, n as u8, 9, 2), 5201);
    let server = b
        .run(|| TcpListener::bind(addr))
        .context("listen in the server namespace")?;
    // Modes: none; tp = the tracepoints only; xdp = XDP on both ends only; tc = TC egress on both ends only;
    // all = everything migmon watch attaches. Interleaved, so load changes hit every mode alike.
    // allskb = all, with XDP in generic (skb) mode; alltc = all, with the ingress parser as a TC classifier.
    let modes = ["none", "all", "tp", "xdp", "tc", "allskb", "alltc"];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let mut events = 0u64;
    let mut xdp_mode = String::new();
    for _ in 0..pairs {
        for (i, mode) in modes.iter().enumerate() {
            if *mode == "none" {
                rates[i].push(stream(&a, &server, addr, secs)?);
                continue;
            }
            let opts = ProbeOptions {
                tracepoints: matches!(*mode, "all" | "tp" | "allskb" | "alltc"),
                xdp_skb_mode: *mode == "allskb",
                l2_tc_ingress: *mode == "alltc",
                ..ProbeOptions::default()
            };
            let mut probes = Probes::load(&opts).context("cannot load the probes")?;
            for (name, ns) in [(&va, &a.name), (&vb, &b.name)] {
                let iface = Iface {
                    name: name.clone(),
                    netns: Some(ns.clone()),
                };
                if matches!(*mode, "all" | "xdp" | "allskb" | "alltc") {
                    let m = probes.attach_xdp(&iface)?.mode;
                    if *mode == "xdp" {
                        m.clone_into(&mut xdp_mode);
                    }
                }
                if matches!(*mode, "all" | "tc" | "allskb" | "alltc") {
                    probes.attach_tc_egress(&iface)?;
                }
            }
            let pipeline = Pipeline::new()?;
            let control = pipeline.control();
            let decoder = Decoder::new(probes.hz());
            let collector = spawn_collector(
                probes,
                decoder,
                pipeline.sender(),
                control.clone(),
                Duration::from_millis(100),
            )?;
            let consumer = std::thread::spawn(move || {
                let mut out = Output::new(true, None);
                pipeline.consume(&mut out, None, &mut [], Some(collector))
            });
            rates[i].push(stream(&a, &server, addr, secs)?);
            control.stop();
            let (summary, _) = consumer
                .join()
                .map_err(|_| anyhow::anyhow!("consumer panicked"))??;
            events += summary.counts.values().sum::<u64>();
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let meds: Vec<f64> = rates.iter_mut().map(med).collect();
    let (n_med, a_med) = (meds[0], meds[1]);
    let overhead = (1.0 - a_med / n_med) * 100.0;
    say!(
        "tcp: none {:.0} MB/s, all probes {:.0} MB/s, overhead {overhead:.2} % (tracepoints only {:.0}, XDP ({xdp_mode}) only {:.0}, TC only {:.0}, all with XDP in skb mode {:.0}, all with TC ingress {:.0} MB/s; {events} events)",
        n_med / 1e6,
        a_med / 1e6,
        meds[2] / 1e6,
        meds[3] / 1e6,
        meds[4] / 1e6,
        meds[5] / 1e6,
        meds[6] / 1e6
    );
    Ok(json!({
        "tcp_none_mb_s": n_med / 1e6,
        "tcp_probes_mb_s": a_med / 1e6,
        "tcp_overhead_pct": overhead,
        "tcp_probe_events": events,
        "tcp_tracepoints_only_overhead_pct": (1.0 - meds[2] / n_med) * 100.0,
        "tcp_xdp_only_overhead_pct": (1.0 - meds[3] / n_med) * 100.0,
        "tcp_tc_only_overhead_pct": (1.0 - meds[4] / n_med) * 100.0,
        "tcp_all_xdp_skb_overhead_pct": (1.0 - meds[5] / n_med) * 100.0,
        "tcp_all_tc_ingress_overhead_pct": (1.0 - meds[6] / n_med) * 100.0,
        "xdp_attach_mode": xdp_mode,
    }))
}

/// The wire bytes of one ARP record as the XDP program emits it.
fn arp_record() -> Vec<u8> {
    use monitor_common::{ArpEvent, EventKind};
    let frame = arp_frame(OTHER);
    let mut e = ArpEvent::default();
    e.header.kind = EventKind::Arp as u32;
    e.header.ts_ns = 1_000_000_000;
    e.ifindex = 2;
    e.ethertype = 0x0806;
    e.op = 1;
    e.src_mac = OTHER;
    e.sha = OTHER;
    e.spa = [10, 0, 0, 1];
    e.tpa = [10, 0, 0, 2];
    e.frame_len = frame.len() as u32;
    e.cap_len = frame.len() as u32;
    e.frame[..frame.len()].copy_from_slice(&frame);
    // SAFETY: `ArpEvent` is `#[repr(C)]` plain data with explicit padding fields (all initialised); reading its
    // bytes is what the ring buffer hands user space.
    unsafe { std::slice::from_raw_parts((&raw const e).cast::<u8>(), size_of::<ArpEvent>()) }.to_vec()
}

/// ns per event of each user-space stage, without the kernel: decode, `Decoder::event`, the consumer's `emit`
/// (JSON line to stdout), and the whole pipeline (a sender thread, the channel, the consumer) in events/s.
fn userspace(args: &Args) -> Result<Value> {
    let n = args.u64("events", 1_000_000)?;
    let bytes = arp_record();
    let time = |f: &mut dyn FnMut()| {
        let t = Instant::now();
        for _ in 0..n {
            f();
        }
        t.elapsed().as_nanos() as f64 / n as f64
    };
    let decode_ns = time(&mut || {
        std::hint::black_box(monitor_common::decode(std::hint::black_box(&bytes)).ok());
    });
    let wire = monitor_common::decode(&bytes).map_err(|e| anyhow::anyhow!("decode: {e:?}"))?;
    let mut decoder = Decoder::new(100);
    let event_ns = time(&mut || {
        std::hint::black_box(decoder.event(std::hint::black_box(&wire)));
    });
    let ev = decoder.event(&wire);
    let json_ns = time(&mut || {
        std::hint::black_box(serde_json::to_string(std::hint::black_box(&ev)).ok());
    });
    let mut out = Output::new(true, None);
    let mut emit_err = None;
    let emit_ns = time(&mut || {
        if let Err(e) = out.emit(&ev) {
            emit_err = Some(e);
        }
    });
    if let Some(e) = emit_err {
        return Err(e);
    }
    // The pipeline: one thread decodes and sends (as the collector does), the consumer prints.
    let pipeline = Pipeline::new()?;
    let tx = pipeline.sender();
    let control = pipeline.control();
    let done = Arc::new(AtomicU64::new(0));
    let d2 = done.clone();
    let mut observers: Vec<Observer> = vec![Box::new(move |_ev: &Event| {
        if d2.fetch_add(1, Ordering::Relaxed) + 1 >= n {
            Flow::Stop(0)
        } else {
            Flow::Continue
        }
    })];
    let t0 = Instant::now();
    let sender = std::thread::spawn(move || {
        let mut decoder = Decoder::new(100);
        for _ in 0..n {
            if let Ok(w) = monitor_common::decode(&bytes) {
                let _ = tx.send(decoder.event(&w));
            }
        }
    });
    let mut out = Output::new(true, None);
    pipeline.consume(
        &mut out,
        Some(Instant::now() + Duration::from_secs(120)),
        &mut observers,
        None,
    )?;
    let pipe_rate = done.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64();
    control.stop();
    let _ = sender.join();
    say!(
        "userspace (ARP): decode {decode_ns:.0} ns, Decoder::event {event_ns:.0} ns, JSON {json_ns:.0} ns, emit {emit_ns:.0} ns; pipeline {pipe_rate:.0} events/s"
    );
    Ok(json!({
        "us_decode_ns": decode_ns,
        "us_decoder_event_ns": event_ns,
        "us_json_ns": json_ns,
        "us_emit_ns": emit_ns,
        "us_pipeline_per_s": pipe_rate,
    }))
}
