//! Our migrator: migrations, floors, scale.

use std::{
    io::{Read, Write},
    net::{SocketAddrV4, TcpListener, TcpStream},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use integration_tests::{ip_in, migmon_bin, wait_until};
use serde_json::{Value, json};

use crate::{
    bed::{Bed, Client, MAC, MemSampler, Proc, RetransmitCounter, all_progress},
    say,
};

/// memcpy bandwidth (bytes/s) over a `bytes` buffer, best of 3.
pub fn memcpy_bw(bytes: usize) -> f64 {
    let src = vec![0x5au8; bytes];
    let mut dst = vec![0u8; bytes];
    dst.copy_from_slice(&src);
    let mut best = 0f64;
    for _ in 0..3 {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        std::hint::black_box(&mut dst);
        best = best.max(bytes as f64 / t.elapsed().as_secs_f64());
    }
    best
}

/// Unix stream socket bandwidth (bytes/s): `bytes` in 1 MiB writes through a socketpair to a reading thread.
pub fn socket_bw(bytes: usize) -> Result<f64> {
    let (mut a, mut b) = std::os::unix::net::UnixStream::pair().context("socketpair")?;
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0usize;
        while got < bytes {
            match b.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        got
    });
    let buf = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        a.write_all(&buf).context("socket write")?;
        sent += buf.len();
    }
    let got = reader.join().map_err(|_| anyhow::anyhow!("reader panicked"))?;
    if got < bytes {
        bail!("the socket reader got {got} of {bytes} bytes");
    }
    Ok(bytes as f64 / t.elapsed().as_secs_f64())
}

pub fn floor(args: &crate::Args) -> Result<Value> {
    let bytes = args.u64("bytes", 256 << 20)? as usize;
    let m = memcpy_bw(bytes);
    let s = socket_bw(bytes)?;
    say!("floor: memcpy {:.0} MiB/s, unix socket {:.0} MiB/s", m / 1048576.0, s / 1048576.0);
    Ok(json!({"memcpy_mib_s": m / 1048576.0, "socket_mib_s": s / 1048576.0}))
}

/// The release `migrator` next to this example's profile directory.
pub fn migrator_bin() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("own path")?;
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .context("target/<profile>")?
        .join("migrator");
    if !bin.exists() {
        bail!("{} is missing: cargo build --release -p migrator", bin.display());
    }
    Ok(bin)
}

/// Boots the guest under `migrator run` on tap A and starts `migrator receive` on tap B.
pub fn boot_pair(bed: &Bed, mem: &str, dirty: &str) -> Result<(Proc, Proc)> {
    let bin = migrator_bin()?;
    let s = |x: &str| x.to_owned();
    let path = |n: &str| bed.path(n).display().to_string();
    let mut args = vec![
        s("run"),
        s("--tap"),
        bed.tap_a.clone(),
        s("--mac"),
        s(MAC),
        s("--ip"),
        format!("{}/24", bed.guest_ip),
        s("--mem"),
        s(mem),
        s("--api"),
        path("a.api"),
        s("--events"),
        path("events"),
    ];
    if !dirty.is_empty() {
        args.extend([s("--dirty"), s(dirty)]);
    }
    let mut a = bed.spawn(&bin, &args, "a.log")?;
    bed.wait_guest(&mut a, Duration::from_secs(30))?;
    let b = bed.spawn(
        &bin,
        &[
            s("receive"),
            s("--tap"),
            bed.tap_b.clone(),
            s("--listen"),
            format!("unix:{}", path("b.sock")),
            s("--api"),
            path("b.api"),
            s("--events"),
            path("events"),
        ],
        "b.log",
    )?;
    if !wait_until(Duration::from_secs(10), || bed.path("b.api").exists()) {
        bail!("migrator receive never opened its API:\n{}", b.log_tail());
    }
    Ok((a, b))
}

/// `migrator migrate` from A to B; the JSON summary.
fn migrate(bed: &Bed, downtime: &str, extra: &[&str]) -> Result<Value> {
    let out = Command::new("ip")
        .args(["netns", "exec", &bed.host.name])
        .arg(migrator_bin()?)
        .args(["migrate", "--api"])
        .arg(bed.path("a.api"))
        .arg("--to")
        .arg(format!("unix:{}", bed.path("b.sock").display()))
        .args(["--mode", "live", "--downtime", downtime, "--timeout", "30s"])
        .args(extra)
        .output()
        .context("cannot run migrator migrate")?;
    if !out.status.success() {
        bail!(
            "migrator migrate failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    serde_json::from_slice(&out.stdout).context("migrator migrate printed no JSON summary")
}

/// Starts `n` stream clients at `rate` records/s and waits until they all flow.
pub fn clients(bed: &Bed, n: u64, rate: u32) -> Result<Vec<Client>> {
    let v = (0..n)
        .map(|_| Client::stream(bed, rate))
        .collect::<Result<Vec<_>>>()?;
    if !wait_until(Duration::from_secs(10), || v.iter().all(|c| c.progress() > 5)) {
        bail!("not every client got going");
    }
    Ok(v)
}

/// Stops the clients: (largest silence ms, errors).
pub fn finish_clients(v: Vec<Client>) -> (f64, Vec<String>) {
    let mut gap = Duration::ZERO;
    let mut errors = Vec::new();
    for c in v {
        let (g, e) = c.finish();
        gap = gap.max(g);
        errors.extend(e);
    }
    (gap.as_secs_f64() * 1e3, errors)
}

/// One live migration by our migrator, with clients, probes and memory samplers.
pub fn ours(args: &crate::Args) -> Result<Value> {
    let mem = args.str("mem", "256M");
    let mem_bytes = crate::parse_size(&mem).context("mem=")?;
    let dirty = args.str("dirty", "");
    let downtime = args.str("downtime", "30ms");
    let nclients = args.u64("clients", 16)?;
    // The floors of this run: copy and socket bandwidth, measured now.
    let memcpy = memcpy_bw(64 << 20);
    let socket = socket_bw(256 << 20)?;
    let bed = Bed::new()?;
    let (a, b) = boot_pair(&bed, &mem, &dirty)?;
    say!("migrate: guest up ({mem}, dirty {dirty:?})");
    let counter = RetransmitCounter::start(bed.guest_ip)?;
    let cl = clients(&bed, nclients, 1000)?;
    // Let the dirtier and the clients settle.
    std::thread::sleep(Duration::from_millis(500));
    let sa = MemSampler::start(a.pid(), mem_bytes);
    let sb = MemSampler::start(b.pid(), mem_bytes);
    let s = migrate(&bed, &downtime, &[])?;
    let moved_on = all_progress(&cl, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(300));
    let (gap, errors) = finish_clients(cl);
    let retransmits = counter.finish()?;
    let (src_over, src_hwm) = sa.finish();
    let (dst_over, dst_hwm) = sb.finish();
    drop((a, b));
    let pause_ev = match (
        bed.event_ts("events", "source", "pause"),
        bed.event_ts("events", "destination", "resume"),
    ) {
        (Some(p), Some(r)) => (r.saturating_sub(p)) as f64 / 1e6,
        _ => f64::NAN,
    };
    let f = |k: &str| s[k].as_f64().unwrap_or(f64::NAN);
    let bw = memcpy.min(socket);
    let floor = f("final_bytes") / bw * 1e3 + f("state_ms");
    say!(
        "migrate: total {:.1} ms, pause {pause_ev:.2} ms (events), floor {floor:.2} ms, gap {gap:.1} ms, {retransmits} retransmits",
        f("total_ms")
    );
    Ok(json!({
        "total_ms": f("total_ms"),
        "pause_events_ms": pause_ev,
        "pause_migrator_ms": f("pause_ms"),
        "bytes": f("bytes"),
        "rounds": f("rounds"),
        "final_bytes": f("final_bytes"),
        "state_ms": f("state_ms"),
        "floor_migrator_ms": f("floor_ms"),
        "floor_bench_ms": floor,
        "memcpy_mib_s": memcpy / 1_048_576.0,
        "socket_mib_s": socket / 1_048_576.0,
        "converged": if s["forced"] == false { 1 } else { 0 },
        "client_max_gap_ms": gap,
        "client_errors": errors.len(),
        "clients_moved_on": u8::from(moved_on),
        "retransmits": retransmits,
        "src_overhead_mib": src_over,
        "src_hwm_mib": src_hwm,
        "dst_overhead_mib": dst_over,
        "dst_hwm_mib": dst_hwm,
        "note": if errors.is_empty() { String::new() } else { errors.join("; ") },
    }))
}

fn proc_cpu_ms(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // Fields after the command (which may hold spaces): state is field 3; utime 14, stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz * 1e3
}

fn raise_nofile() {
    let lim = libc::rlimit {
        rlim_cur: 65536,
        rlim_max: 65536,
    };
    // SAFETY: a valid rlimit; failure leaves the old limit, and the connects fail loudly later.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) };
}

/// migmon's CPU, event rate and peak RSS while `n` connections live through a migration. The guest serves at most
/// `guest_abi::MAX_CONNECTIONS`; connections beyond 64 go to a server in the host namespace behind the same
/// bridge (the monitor tracks them the same way, but they do not cross the migration).
pub fn conns(args: &crate::Args) -> Result<Value> {
    raise_nofile();
    let n = args.u64("n", 16)?;
    let mem = args.str("mem", "256M");
    let bed = Bed::new()?;
    let (a, b) = boot_pair(&bed, &mem, "")?;
    let host_ip = std::net::Ipv4Addr::new(10, bed.net, 7, 3);
    ip_in(Some(&bed.host.name), &["addr", "add", &format!("{host_ip}/24"), "dev", &bed.bridge]);
    let to_guest = n.min(64);
    let to_host = n - to_guest;
    // migmon watch on every bridge port, all TCP (no IP list), the VM's MAC watched.
    let ns = &bed.host.name;
    let watch_args: Vec<String> = vec![
        "watch".into(),
        "--json".into(),
        "--iface".into(),
        format!("{}@{ns}", bed.tap_a),
        "--iface".into(),
        format!("{}@{ns}", bed.tap_b),
        "--iface".into(),
        format!("{}@{ns}", bed.uplink),
        "--egress".into(),
        format!("{}@{ns}", bed.tap_a),
        "--egress".into(),
        format!("{}@{ns}", bed.tap_b),
        "--vm".into(),
        MAC.into(),
    ];
    let events_path = bed.path("migmon.jsonl");
    let mut migmon = Command::new(migmon_bin())
        .args(&watch_args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&events_path)?)
        .stderr(std::fs::File::create(bed.path("migmon.log"))?)
        .spawn()
        .context("cannot start migmon watch")?;
    let pid = migmon.id();
    let log = bed.path("migmon.log");
    if !wait_until(Duration::from_secs(20), || {
        std::fs::read_to_string(&log).is_ok_and(|s| s.contains("watching"))
    }) {
        let _ = migmon.kill();
        bail!("migmon watch did not start: {}", std::fs::read_to_string(&log).unwrap_or_default());
    }
    let cpu0 = proc_cpu_ms(pid);
    let t0 = Instant::now();
    // Host-side sink for the connections beyond the guest's capacity.
    let listener = bed
        .host
        .run(|| TcpListener::bind(SocketAddrV4::new(host_ip, 6000)))
        .context("listen in the host namespace")?;
    let cl = clients(&bed, to_guest, 200)?;
    let mut host_conns = Vec::new();
    let mut accepted = Vec::new();
    for _ in 0..to_host {
        let c = bed
            .client
            .run(|| TcpStream::connect_timeout(&SocketAddrV4::new(host_ip, 6000).into(), Duration::from_secs(5)))
            .context("connect to the host-side sink")?;
        accepted.push(listener.accept().context("accept")?.0);
        host_conns.push(c);
    }
    // Keep the host-side connections live: 16 bytes each every 100 ms, read back on the sink side.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let st = stop.clone();
    let ticker = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        for s in &accepted {
            let _ = s.set_nonblocking(true);
        }
        while !st.load(std::sync::atomic::Ordering::SeqCst) {
            for c in &mut host_conns {
                let _ = c.write_all(&[7u8; 16]);
            }
            for s in &mut accepted {
                while matches!(s.read(&mut buf), Ok(k) if k > 0) {}
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let s = migrate(&bed, "30ms", &[])?;
    let moved_on = all_progress(&cl, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = ticker.join();
    let (gap, errors) = finish_clients(cl);
    let cpu = proc_cpu_ms(pid) - cpu0;
    let secs = t0.elapsed().as_secs_f64();
    let hwm = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0);
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let _ = wait_until(Duration::from_secs(10), || matches!(migmon.try_wait(), Ok(Some(_))));
    let _ = migmon.kill();
    let _ = migmon.wait();
    drop((a, b));
    let events = std::fs::read_to_string(&events_path)
        .map(|s| s.lines().count())
        .unwrap_or(0);
    say!(
        "conns {n}: migmon {cpu:.0} ms CPU over {secs:.1} s, {events} events, peak RSS {hwm:.1} MiB; migration total {} ms",
        s["total_ms"]
    );
    Ok(json!({
        "connections": n,
        "to_guest": to_guest,
        "to_host": to_host,
        "migmon_cpu_ms": cpu,
        "migmon_cpu_pct": cpu / (secs * 1e3) * 100.0,
        "migmon_events": events,
        "migmon_events_per_s": events as f64 / secs,
        "migmon_hwm_mib": hwm,
        "window_s": secs,
        "total_ms": s["total_ms"],
        "client_max_gap_ms": gap,
        "client_errors": errors.len(),
        "clients_moved_on": u8::from(moved_on),
    }))
}
