//! How cost grows with the work, and peak memory:
//! - our migrator's pause and total against guest RAM (mostly zero pages plus a fixed dirty set), with the RSS of
//!   both migrator processes beyond the guest's RAM;
//! - migmon's CPU time, event rate and peak RSS against the number of live TCP connections through an outage.
//!
//! The guest holds at most 80 connections (`guest_abi::MAX_CONNECTIONS`), so the connection scale runs between two
//! namespaces on a veth pair, and the "migration" is a blackhole (an nftables drop of everything arriving at the
//! server) of 500 ms: every connection with data in flight retransmits through it, as through a pause.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::{
    Ctx,
    migration::{self, Workload},
    net::{self, VethPair},
    observe::{Watcher, cpu_seconds, peak_rss_kib},
    report::{Better, Results, Stats},
};

pub const GROUP_RAM: &str = "scale: guest RAM";
pub const GROUP_CONNS: &str = "scale: migmon against connections";
const SERVER_PORT: u16 = 5999;

pub fn run(ctx: &Ctx, results: &mut Results) -> Result<()> {
    let mut errors = Vec::new();
    if let Err(e) = ram(ctx, results) {
        ctx.progress(&format!("scale, guest RAM: {e:#}"));
        errors.push(format!("guest RAM: {e:#}"));
    }
    if let Err(e) = connections(ctx, results) {
        ctx.progress(&format!("scale, connections: {e:#}"));
        errors.push(format!("connections: {e:#}"));
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("; "));
    }
    Ok(())
}

fn median(results: &Results, group: &str, name: &str) -> Option<f64> {
    results
        .get(group, name)
        .and_then(|r| Stats::of(&r.values))
        .map(|s| s.median)
}

/// Adds "growth ×" rows: the median at each step over the median at the step before, with the work's own factor.
/// `resolution` is the smallest non-zero reading the metric has (one clock tick for CPU; 0 when any value is
/// exact): a step that read 0 is taken as that resolution, so the ratio is an upper bound and says so, rather than
/// no number at all.
fn growth(
    results: &mut Results,
    group: &str,
    steps: &[(u64, String)],
    (metric, resolution): (&str, f64),
    unit_of_step: &str,
) {
    for w in steps.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        let name = format!("{metric} growth {}→{} {unit_of_step}", a.0, b.0);
        results.declare(group, &name, "×", Better::Lower);
        let Some((x, y)) = median(results, group, &a.1).zip(median(results, group, &b.1)) else {
            continue;
        };
        let below = x <= 0.0 && resolution > 0.0;
        let x = if below { resolution } else { x };
        if x > 0.0 {
            results.push(group, &name, "×", Better::Lower, y / x);
            let work = format!("work grew ×{:.0}", b.0 as f64 / a.0 as f64);
            let note = if below {
                format!(
                    "{work}; {} read 0, below the clock's {resolution} resolution: taken as {resolution} (an upper bound)",
                    a.1
                )
            } else {
                work
            };
            results.note(group, &name, &note);
        }
    }
}

fn ram(ctx: &Ctx, results: &mut Results) -> Result<()> {
    let (sizes, dirty): (&[u64], &str) = if ctx.quick {
        (&[64, 128], "2M@8M")
    } else {
        (&[256, 1024, 4096], "8M@32M")
    };
    let mut errors = Vec::new();
    for (i, &mib) in sizes.iter().enumerate() {
        let w = Workload {
            name: format!("{mib} MiB, dirty {dirty}/s"),
            mem_mib: mib,
            dirty: Some(dirty.to_owned()),
            downtime_ms: 30,
        };
        let g = format!("{GROUP_RAM} {mib} MiB");
        // RSS is sampled at 1 GiB (the target's size), and in the smoke run at its largest size.
        let rss = mib == 1024 || (ctx.quick && i == sizes.len() - 1);
        if rss {
            results.declare(&g, "migrator RSS beyond guest RAM", "MiB", Better::Lower);
            results.set_target(&g, "migrator RSS beyond guest RAM", "≤ 32 MiB at 1 GiB");
            results.note(
                &g,
                "migrator RSS beyond guest RAM",
                "peak over source and destination of VmRSS minus the guest RAM mappings' Rss, sampled every 20 ms",
            );
        }
        results.declare(&g, "migrator total", "ms", Better::Lower);
        results.declare(&g, "migrator pause", "ms", Better::Lower);
        if let Err(e) = migration::ours(ctx, results, &w, 40 + i as u8, &g, rss, migration::Transport::Tls) {
            errors.push(format!("{mib} MiB: {e:#}"));
        }
    }
    for metric in ["total", "pause"] {
        let steps: Vec<(u64, String)> = sizes
            .iter()
            .map(|&m| (m, format!("{GROUP_RAM} {m} MiB")))
            .collect();
        // Growth rows compare rows of different groups: copy the medians into the summary group first.
        for (m, g) in &steps {
            if let Some(v) = median(results, g, &format!("migrator {metric}")) {
                results.push(GROUP_RAM, &format!("{metric} at {m} MiB"), "ms", Better::Lower, v);
            }
        }
        let named: Vec<(u64, String)> = sizes
            .iter()
            .map(|&m| (m, format!("{metric} at {m} MiB")))
            .collect();
        growth(results, GROUP_RAM, &named, (metric, 0.0), "MiB");
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("; "));
    }
    Ok(())
}

/// `n` client connections from namespace b to a server in namespace a that reads and discards.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(pair: &VethPair, n: usize) -> Result<Self> {
        let listener = pair
            .a
            .try_run(|| TcpListener::bind(SocketAddr::new(pair.ip_a, SERVER_PORT)))?
            .context("cannot listen for the scale clients")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        raise_fd_limit(4 * n as u64 + 256);
        // Accept while connecting: the listen backlog is smaller than the largest count.
        let (clients, servers) = std::thread::scope(|s| -> Result<_> {
            let acceptor = s.spawn(|| -> std::io::Result<Vec<TcpStream>> {
                (0..n)
                    .map(|_| {
                        let (c, _) = listener.accept()?;
                        c.set_nonblocking(true)?;
                        Ok(c)
                    })
                    .collect()
            });
            let clients: Vec<TcpStream> = pair.b.try_run(|| {
                (0..n)
                    .map(|_| TcpStream::connect(addr))
                    .collect::<std::io::Result<Vec<_>>>()
            })??;
            let servers = acceptor
                .join()
                .map_err(|_| anyhow::anyhow!("accept thread panicked"))??;
            Ok((clients, servers))
        })?;
        let mut servers = servers;
        let st = stop.clone();
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !st.load(Ordering::Relaxed) {
                for s in &mut servers {
                    while let Ok(k) = s.read(&mut buf) {
                        if k == 0 {
                            break;
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }));
        let st = stop.clone();
        let mut clients = clients;
        for c in &clients {
            c.set_nonblocking(true)?;
        }
        threads.push(std::thread::spawn(move || {
            // Every connection writes 64 bytes every 100 ms, so each has data in flight when the path breaks.
            while !st.load(Ordering::Relaxed) {
                let t = Instant::now();
                for c in &mut clients {
                    let _ = c.write(&[0x42; 64]);
                }
                if let Some(d) = Duration::from_millis(100).checked_sub(t.elapsed()) {
                    std::thread::sleep(d);
                }
            }
        }));
        Ok(Self { stop, threads })
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn nft(netns: &str, script: &str) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("cannot run nft: install nftables (./x setup does)")?;
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(script.as_bytes())?;
    if !child.wait()?.success() {
        bail!("nft failed on: {script}");
    }
    Ok(())
}

fn connections(ctx: &Ctx, results: &mut Results) -> Result<()> {
    let counts: &[u64] = if ctx.quick { &[4, 16] } else { &[16, 256, 1024] };
    let outage = Duration::from_millis(500);
    let after = Duration::from_millis(if ctx.quick { 700 } else { 1500 });
    declare_connection_rows(results, counts);
    for &n in counts {
        connections_at(ctx, results, n, outage, after)?;
    }
    results.note(
        GROUP_CONNS,
        &format!("CPU at {} connections", counts[0]),
        &format!(
            "migmon watch --port {SERVER_PORT} --iface (server side); CPU = user+system (/proc/PID/stat, 10 ms ticks) during the {} ms blackhole \
             and {} ms after",
            outage.as_millis(),
            after.as_millis()
        ),
    );
    // CPU is read in 10 ms ticks (/proc/PID/stat); event counts are exact.
    for (metric, resolution) in [("CPU", 10.0), ("events", 0.0)] {
        let steps: Vec<(u64, String)> = counts
            .iter()
            .map(|&n| (n, format!("{metric} at {n} connections")))
            .collect();
        growth(results, GROUP_CONNS, &steps, (metric, resolution), "connections");
    }
    Ok(())
}

/// The rows of every connection count, and the RSS target at the largest.
fn declare_connection_rows(results: &mut Results, counts: &[u64]) {
    for &n in counts {
        results.declare(
            GROUP_CONNS,
            &format!("CPU at {n} connections"),
            "ms",
            Better::Lower,
        );
        results.declare(
            GROUP_CONNS,
            &format!("events at {n} connections"),
            "events/s",
            Better::Higher,
        );
        results.declare(
            GROUP_CONNS,
            &format!("peak RSS at {n} connections"),
            "MiB",
            Better::Lower,
        );
    }
    let biggest = counts[counts.len() - 1];
    results.set_target(
        GROUP_CONNS,
        &format!("peak RSS at {biggest} connections"),
        "≤ 64 MiB at 1024",
    );
}

/// migmon's CPU, event rate and peak RSS with `n` connections through an `outage`-long blackhole and `after` it.
fn connections_at(ctx: &Ctx, results: &mut Results, n: u64, outage: Duration, after: Duration) -> Result<()> {
    ctx.progress(&format!(
        "scale: migmon with {n} connections through a {} ms blackhole ({} runs)",
        outage.as_millis(),
        ctx.runs
    ));
    let _t = ctx.ticker(&format!("scale: {n} connections"));
    let pair = net::veth_pair(60)?;
    let watch = Watcher::start(
        &ctx.bin("migmon"),
        &[
            "--port".to_owned(),
            SERVER_PORT.to_string(),
            "--iface".to_owned(),
            format!("{}@{}", pair.if_a, pair.a.name),
            "--iface".to_owned(),
            format!("{}@{}", pair.if_b, pair.b.name),
        ],
    )?;
    let load = Load::start(&pair, n as usize)?;
    for _ in 0..ctx.runs {
        let cpu0 = cpu_seconds(watch.pid()).unwrap_or(f64::NAN);
        let ev0 = watch.events();
        let t = Instant::now();
        nft(
            &pair.a.name,
            "table inet bench_blackhole {\n chain input {\n  type filter hook input priority 0; policy drop;\n }\n}\n",
        )?;
        std::thread::sleep(outage);
        nft(&pair.a.name, "delete table inet bench_blackhole\n")?;
        std::thread::sleep(after);
        let secs = t.elapsed().as_secs_f64();
        let cpu = cpu_seconds(watch.pid()).unwrap_or(f64::NAN) - cpu0;
        let events = (watch.events() - ev0) as f64;
        results.push(
            GROUP_CONNS,
            &format!("CPU at {n} connections"),
            "ms",
            Better::Lower,
            cpu * 1e3,
        );
        results.push(
            GROUP_CONNS,
            &format!("events at {n} connections"),
            "events/s",
            Better::Higher,
            events / secs,
        );
        if let Some(kib) = peak_rss_kib(watch.pid()) {
            results.push(
                GROUP_CONNS,
                &format!("peak RSS at {n} connections"),
                "MiB",
                Better::Lower,
                kib as f64 / 1024.0,
            );
        }
    }
    if watch.lost() > 0 {
        results.note(
            GROUP_CONNS,
            &format!("events at {n} connections"),
            &format!("{} events lost", watch.lost()),
        );
    }
    drop(load);
    watch.stop();
    Ok(())
}

/// Raises the soft open-file limit to at least `want` (up to the hard limit).
fn raise_fd_limit(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid, writable rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) == 0 && lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim);
        }
    }
}
