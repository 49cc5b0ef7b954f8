//! Ports that come and go (`migmon watch --bridge`): how long a new tap waits for its programs, and whether the ring
//! buffers keep draining meanwhile.
//!
//! Each run starts `migmon watch --json --bridge BR@NS` on a bridge of its own namespace, with a load of loopback TCP
//! connections opened, written to and closed about 1,000 times a second on a port it watches (socket tracepoint events: each
//! carries its kernel time, and the bench notes when its line arrived). It first measures the event latency (line
//! arrival minus kernel time) at rest for [`REST`], then creates [`TAPS`] taps in the bridge, one after the other,
//! and waits for their `port_attached` events:
//! - attach latency: `port_attached` time minus the link notification's (`notified_ns`), median and max per run,
//!   against a baseline: [`Probes::attach_port`] in the bench's own process on taps created first and put in a
//!   bridge of their own (the same loader and hooks with nothing else around), measured before the runs. It is
//!   not a floor: on this project's machine it takes longer than the watch's own attach (28 ms against 21 ms
//!   median, whether the taps are up or not), for a reason not found yet;
//! - event latency while the taps are attached (from the first notification to the last attach) against the same
//!   run's at rest: the 99th percentile and the maximum.

use std::{
    io::{BufRead, BufReader},
    net::TcpListener,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use monitor::probes::{Iface, IngressMode, ProbeOptions, Probes};
use serde_json::Value;
use testbed::{
    churn::Churn,
    net::{Link, Netns, try_ip_in, unique, wait_until},
};

use super::{
    Ctx,
    report::{Better, Results},
};

pub const GROUP: &str = "ports: taps joining a watched bridge";
/// Taps created per run.
const TAPS: usize = 20;
/// How long the event latency is measured before the taps come.
const REST: Duration = Duration::from_secs(2);
const BRIDGE: &str = "br-bench";
/// Loopback connections per second, the event load ([`Churn`]).
const CHURN_PER_S: u64 = 1000;

const ATTACH_MEDIAN: &str = "attach latency (notification → attached), median";
const ATTACH_MAX: &str = "attach latency (notification → attached), max";
const BASELINE: &str = "baseline: attach_port in the bench's process, median";
const LAT_REST_P99: &str = "event latency at rest, p99";
const LAT_BUSY_P99: &str = "event latency while taps are attached, p99";
const LAT_REST_MAX: &str = "event latency at rest, max";
const LAT_BUSY_MAX: &str = "event latency while taps are attached, max";

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

pub fn run(ctx: &Ctx, results: &mut Results) -> Result<()> {
    for name in [
        ATTACH_MEDIAN,
        ATTACH_MAX,
        BASELINE,
        LAT_REST_P99,
        LAT_BUSY_P99,
        LAT_REST_MAX,
        LAT_BUSY_MAX,
    ] {
        results.declare(GROUP, name, "ms", Better::Lower);
    }
    let taps = if ctx.quick { 5 } else { TAPS };
    baseline(ctx, results, taps).context("the in-process attach baseline")?;
    for run in 0..ctx.runs {
        ctx.progress(&format!("ports: run {}/{}: {taps} taps", run + 1, ctx.runs));
        one_run(ctx, results, taps)?;
    }
    results.set_baseline(GROUP, ATTACH_MEDIAN, GROUP, BASELINE);
    results.set_baseline(GROUP, ATTACH_MAX, GROUP, BASELINE);
    results.set_baseline(GROUP, LAT_BUSY_P99, GROUP, LAT_REST_P99);
    results.set_baseline(GROUP, LAT_BUSY_MAX, GROUP, LAT_REST_MAX);
    results.note(
        GROUP,
        ATTACH_MEDIAN,
        &format!("{taps} taps created in a loop in a watched bridge, TC ingress and egress each (TCX)"),
    );
    results.note(
        GROUP,
        BASELINE,
        "the same two hooks attached by migmon's loader in this process to taps created first, programs verified \
         beforehand; not a floor (it takes longer than the watch's attach here)",
    );
    results.note(
        GROUP,
        LAT_BUSY_P99,
        "tcp_state events of ~1,000 loopback connections/s: line read by the bench minus kernel time",
    );
    Ok(())
}

/// The hooks a bridge port gets, attached by migmon's loader in this process to taps created first.
fn baseline(ctx: &Ctx, results: &mut Results, taps: usize) -> Result<()> {
    let ns = Netns::create(&unique("bpf"))
        .context("creating network namespaces needs root: run `sudo ./x bench`")?;
    let _br = Link::try_bridge(BRIDGE, Some(&ns.name))?;
    let mut probes = Probes::load(&ProbeOptions {
        tracepoints: false,
        flows: Some(monitor::probes::FlowOptions::default()),
        ..ProbeOptions::default()
    })
    .context("cannot load migmon's probes")?;
    probes.preload(Some(&ns.name), IngressMode::Auto, true)?;
    for run in 0..ctx.runs {
        // The taps first (in the bridge, not up: as the watch finds them at their notification), then the attaches.
        let names: Vec<String> = (0..taps).map(|i| format!("bf{run}t{i}")).collect();
        let mut guards = Vec::new();
        for n in &names {
            try_ip_in(Some(&ns.name), &["tuntap", "add", "dev", n, "mode", "tap"])?;
            guards.push(Link {
                name: n.clone(),
                netns: Some(ns.name.clone()),
            });
            try_ip_in(Some(&ns.name), &["link", "set", n, "master", BRIDGE])?;
        }
        let mut times = Vec::new();
        for name in names {
            let iface = Iface {
                name,
                netns: Some(ns.name.clone()),
            };
            let t = Instant::now();
            let a = probes
                .attach_port(&iface, IngressMode::Auto, true)
                .with_context(|| format!("cannot attach to {iface}"))?;
            times.push(t.elapsed().as_nanos() as f64 / 1e6);
            probes.detach_port(iface.netns.as_deref(), a.port.ifindex)?;
        }
        times.sort_by(f64::total_cmp);
        results.push(GROUP, BASELINE, "ms", Better::Lower, times[times.len() / 2]);
    }
    Ok(())
}

/// The watch's stdout lines, each with the monotonic time it was read.
type Lines = Arc<Mutex<Vec<(u64, String)>>>;

/// A `migmon watch --json` child whose lines are collected as they come; killed on drop.
struct Watch {
    child: Child,
    lines: Lines,
    reader: Option<JoinHandle<()>>,
}

impl Watch {
    fn start(ctx: &Ctx, ns: &str, port: u16) -> Result<Self> {
        let mut child = Command::new(ctx.bin("migmon"))
            .args(["watch", "--json", "--bridge", &format!("{BRIDGE}@{ns}")])
            .args(["--port", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start migmon watch")?;
        let out = child.stdout.take().context("migmon's stdout")?;
        let err = child.stderr.take().context("migmon's stderr")?;
        let lines: Lines = Arc::default();
        let l = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let now = migevents::monotonic_ns();
                l.lock().unwrap_or_else(PoisonError::into_inner).push((now, line));
            }
        });
        let started = Arc::new(AtomicBool::new(false));
        let s = started.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if line.contains("migmon: watching") {
                    s.store(true, Ordering::Relaxed);
                }
            }
        });
        let mut w = Self {
            child,
            lines,
            reader: Some(reader),
        };
        let up = wait_until(Duration::from_secs(60), || {
            started.load(Ordering::Relaxed) || w.child.try_wait().ok().flatten().is_some()
        });
        if !up || !started.load(Ordering::Relaxed) {
            bail!("migmon watch --bridge did not start");
        }
        Ok(w)
    }

    /// The events so far with their arrival times.
    fn events(&self) -> Vec<(u64, Value)> {
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter_map(|(t, l)| serde_json::from_str(l).ok().map(|v| (*t, v)))
            .collect()
    }

    fn attached(&self) -> usize {
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(_, l)| l.contains("\"port_attached\""))
            .count()
    }

    fn stop(mut self) -> Vec<(u64, Value)> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        wait_until(Duration::from_secs(30), || {
            self.child.try_wait().ok().flatten().is_some()
        });
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        self.events()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `q` quantile of `v` (sorted here).
fn quantile(v: &mut [u64], q: f64) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    Some(v[i.min(v.len() - 1)])
}

fn one_run(ctx: &Ctx, results: &mut Results, taps: usize) -> Result<()> {
    let ns = Netns::create(&unique("bpt"))
        .context("creating network namespaces needs root: run `sudo ./x bench`")?;
    let _br = Link::try_bridge(BRIDGE, Some(&ns.name))?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let watch = Watch::start(ctx, &ns.name, port)?;
    let churn = Churn::start(listener, CHURN_PER_S)?;
    // At rest: the window is measured, the sleep is its length.
    std::thread::sleep(REST);
    let storm_from = migevents::monotonic_ns();
    let mut guards = Vec::new();
    for i in 0..taps {
        guards.push(Link::try_tap(&format!("bt{i}"), Some(&ns.name), Some(BRIDGE))?);
    }
    let all = wait_until(Duration::from_secs(60), || watch.attached() >= taps);
    drop(churn);
    let events = watch.stop();
    drop(guards);
    if !all {
        bail!("only some of the {taps} taps were attached within 60 s");
    }
    let mut attach = Vec::new();
    let mut storm = (u64::MAX, 0u64);
    for (_, e) in events.iter().filter(|(_, e)| e["kind"] == "port_attached") {
        let (Some(at), Some(notified)) = (e["ts_ns"].as_u64(), e["notified_ns"].as_u64()) else {
            continue;
        };
        attach.push(at.saturating_sub(notified));
        storm = (storm.0.min(notified), storm.1.max(at));
    }
    let (mut rest, mut busy) = (Vec::new(), Vec::new());
    for (arrived, e) in events.iter().filter(|(_, e)| e["kind"] == "tcp_state") {
        let Some(ts) = e["ts_ns"].as_u64() else { continue };
        let latency = arrived.saturating_sub(ts);
        if ts < storm_from {
            rest.push(latency);
        } else if (storm.0..=storm.1).contains(&ts) {
            busy.push(latency);
        }
    }
    let mut put = |name: &str, v: Option<u64>| {
        if let Some(v) = v {
            results.push(GROUP, name, "ms", Better::Lower, ms(v));
        }
    };
    put(ATTACH_MEDIAN, quantile(&mut attach, 0.5));
    put(ATTACH_MAX, attach.iter().copied().max());
    put(LAT_REST_P99, quantile(&mut rest, 0.99));
    put(LAT_REST_MAX, rest.iter().copied().max());
    put(LAT_BUSY_P99, quantile(&mut busy, 0.99));
    put(LAT_BUSY_MAX, busy.iter().copied().max());
    if busy.is_empty() || rest.is_empty() {
        bail!(
            "no socket events to time ({} at rest, {} during the attaches): is the loopback load seen?",
            rest.len(),
            busy.len()
        );
    }
    Ok(())
}
