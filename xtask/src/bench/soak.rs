//! The soak: `migmon watch --metrics` with all TCP reported, under TCP churn on loopback (about 5 k events/s), with a
//! migration every 30 s, for 10 minutes (`--quick`: 40 s, two migrations). Its memory must stay flat and its scrapes cheap.
//!
//! - Churn: a client thread opens a connection to a local server, writes a byte and closes it, 650 times a second
//!   (each connection gives about 8 socket events: both ends' state changes).
//! - Migrations: a simulated pause source, not a VM: migrator phase events (setup, round, pause, resume, complete)
//!   sent on the watch's `--events-listen` socket every 30 s, for a VM whose IP has no connection, with a 20 ms pause.
//!   The live correlation holds each migration's window, settles it and releases it, as it does for a real one.
//! - Samples every second: the watch's RSS (`VmRSS`), CPU time (`/proc/PID/stat`), and one scrape of `/metrics`,
//!   timed from connect to the last byte.
//!
//! Rows: RSS in the first and the last minute (medians), its growth, the slowest scrape, CPU % of one core after the
//! first window, the event rate achieved, and how many migrations the live correlation released (all of them must
//! be). Each is read against what the same run measured: RSS against the watch's RSS before any load (its floor),
//! the slowest scrape against a scrape of the idle watch, the watch's CPU against the CPU of the churn it watches
//! (whose kernel time includes the probes' tracepoints). The targets are absolute and shown beside them.
//! `--quick` (which `./x test` runs) compares the first and last 15 s instead of minutes.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use migevents::{EventSink, MigrationEvent, Mode, Phase, Role};
use testbed::churn::Churn;

use super::{
    Ctx,
    observe::{cpu_seconds, rss_kib, stat_cpu_seconds},
    report::{Better, Results},
};
use crate::bench::report::Stats;

pub const GROUP: &str = "soak: migmon watch --metrics under churn";

/// Connections per second of churn.
const CHURN_PER_S: u64 = 650;
/// A migration this often.
const MIGRATE_EVERY: Duration = Duration::from_secs(30);
/// Samples (one a second) of the watch before the load starts.
const IDLE_SAMPLES: usize = 3;

/// CPU time (user + system) of the churn's two threads so far, in seconds: the load the watch observes, its kernel
/// part (the probes' tracepoints run in these threads) included.
fn churn_cpu_seconds(churn: &Churn) -> f64 {
    churn
        .thread_ids()
        .iter()
        .map(|&tid| stat_cpu_seconds(&format!("/proc/self/task/{tid}/stat")).unwrap_or(0.0))
        .sum()
}

/// One simulated migration on the events socket: setup, a round, a 20 ms pause, resume, complete.
fn migrate(sock: &Path, n: u32) -> Result<()> {
    let id = format!("soak-{}-{n}", std::process::id());
    let mac = "52:54:00:5a:00:01";
    let mut sink = EventSink::open(sock).context("cannot connect to the watch's events socket")?;
    let phases = [
        (
            Role::Source,
            Phase::Setup {
                mode: Mode::Live,
                ram_bytes: 256 << 20,
                ips: vec!["10.99.0.1".to_owned()],
                host: "soak".to_owned(),
                carries_frames: true,
            },
        ),
        (
            Role::Source,
            Phase::Round {
                n: 0,
                pages: 1000,
                bytes: 4 << 20,
                bandwidth: 1 << 30,
            },
        ),
        (Role::Source, Phase::Pause),
    ];
    for (role, phase) in phases {
        sink.send(&MigrationEvent::now(&id, mac, role, phase))?;
    }
    std::thread::sleep(Duration::from_millis(20));
    sink.send(&MigrationEvent::now(&id, mac, Role::Destination, Phase::Resume))?;
    sink.send(&MigrationEvent::now(
        &id,
        mac,
        Role::Source,
        Phase::Complete {
            total_ms: 100.0,
            pause_ms: 20.0,
            bytes: 4 << 20,
        },
    ))?;
    Ok(())
}

/// One scrape: the body and how long it took.
fn scrape(addr: &str) -> Option<(String, Duration)> {
    let t = Instant::now();
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some((out, t.elapsed()))
}

/// A metric's value in a scrape (the first series of that name).
fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (n, v) = l.rsplit_once(' ')?;
        (n == name || n.starts_with(&format!("{name}{{"))).then(|| v.parse().ok())?
    })
}

/// The sum of every series of a metric.
fn metric_sum(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

struct Sample {
    at: Duration,
    rss_kib: u64,
    cpu_s: f64,
    /// The churn's CPU time.
    load_cpu_s: f64,
    scrape: Duration,
    events: f64,
    held: f64,
    residue: f64,
}

/// The rows, their targets, and what each is read against.
fn declare_rows(results: &mut Results) {
    let rows = [
        ("RSS first window", "MiB", "≤ 64 MiB"),
        ("RSS last window", "MiB", "≤ 64 MiB"),
        ("RSS growth", "MiB", "≤ 8 MiB"),
        ("slowest scrape", "ms", "≤ 20 ms"),
        ("CPU", "% of a core", "≤ 5 %"),
    ];
    for (name, unit, target) in rows {
        results.declare(GROUP, name, unit, Better::Lower);
        results.set_target(GROUP, name, target);
    }
    results.declare(GROUP, "RSS idle", "MiB", Better::Lower);
    results.declare(GROUP, "scrape, idle", "ms", Better::Lower);
    results.declare(GROUP, "load generator CPU", "% of a core", Better::Lower);
    // The verdicts as ratios to what this run measured: the watch's RSS before any load (the floor), its scrape
    // before any load, and the CPU of the load it watches (whose kernel time includes the probes).
    results.set_floor(GROUP, "RSS first window", GROUP, "RSS idle");
    results.set_floor(GROUP, "RSS last window", GROUP, "RSS idle");
    results.set_baseline(GROUP, "slowest scrape", GROUP, "scrape, idle");
    results.set_baseline(GROUP, "CPU", GROUP, "load generator CPU");
    results.declare(GROUP, "event rate", "events/s", Better::Higher);
    results.declare(GROUP, "migrations released", "of sent", Better::Higher);
    results.declare(GROUP, "events held, largest", "events", Better::Lower);
    results.declare(GROUP, "median scrape", "ms", Better::Lower);
    results.declare(GROUP, "residue at the end", "events", Better::Lower);
}

/// The watch before any load: its RSS and scrape time (the same-run floor and baseline of the rows under load).
fn measure_idle(addr: &str, pid: u32, results: &mut Results) -> Result<()> {
    let mut idle_rss = Vec::new();
    let mut idle_scrape = Vec::new();
    for _ in 0..IDLE_SAMPLES {
        std::thread::sleep(Duration::from_secs(1));
        let (_, took) = scrape(addr).context("a scrape of the idle watch failed")?;
        idle_scrape.push(took.as_secs_f64() * 1e3);
        idle_rss.push(rss_kib(pid).unwrap_or(0) as f64 / 1024.0);
    }
    if let (Some(r), Some(t)) = (Stats::of(&idle_rss), Stats::of(&idle_scrape)) {
        results.push(GROUP, "RSS idle", "MiB", Better::Lower, r.median);
        results.push(GROUP, "scrape, idle", "ms", Better::Lower, t.median);
    }
    Ok(())
}

pub fn run(ctx: &Ctx, results: &mut Results) -> Result<()> {
    let (duration, window) = if ctx.quick {
        (Duration::from_secs(40), Duration::from_secs(15))
    } else {
        (Duration::from_secs(600), Duration::from_secs(60))
    };
    declare_rows(results);

    let dir = ctx.out.join("soak");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let sock = dir.join("events.sock");
    let log = dir.join("watch.log");
    let mut child = Command::new(ctx.bin("migmon"))
        .args(["watch", "--tcp", "sockets", "--json", "--metrics", "127.0.0.1:0"])
        .arg("--events-listen")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("cannot start migmon watch")?;
    let pid = child.id();
    let guard = KillOnDrop(pid);
    let addr = {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(a) = text
                .lines()
                .find_map(|l| l.strip_prefix("migmon: metrics on http://"))
                .and_then(|l| l.strip_suffix("/metrics"))
                && text.contains("migmon: watching")
            {
                break a.to_owned();
            }
            if Instant::now() > deadline || child.try_wait()?.is_some() {
                bail!("migmon watch did not start: {text}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    measure_idle(&addr, pid, results)?;
    ctx.progress(&format!(
        "soak: {} s of {CHURN_PER_S} connections/s on loopback, a simulated migration every {} s",
        duration.as_secs(),
        MIGRATE_EVERY.as_secs()
    ));
    let _ticker = ctx.ticker("soak");
    let churn = Churn::start(
        TcpListener::bind("127.0.0.1:0").context("cannot listen for the churn")?,
        CHURN_PER_S,
    )?;
    let start = Instant::now();
    let mut samples = Vec::new();
    let mut sent = 0u32;
    let mut next_migration = start + Duration::from_secs(5);
    let mut next_sample = start;
    while start.elapsed() < duration {
        if Instant::now() >= next_migration {
            migrate(&sock, sent)?;
            sent += 1;
            next_migration += MIGRATE_EVERY;
        }
        if Instant::now() >= next_sample {
            next_sample += Duration::from_secs(1);
            let (body, took) = scrape(&addr).context("a scrape failed")?;
            samples.push(Sample {
                at: start.elapsed(),
                rss_kib: rss_kib(pid).unwrap_or(0),
                cpu_s: cpu_seconds(pid).unwrap_or(0.0),
                load_cpu_s: churn_cpu_seconds(&churn),
                scrape: took,
                events: metric_sum(&body, "migmon_events_total"),
                held: metric(&body, "migmon_live_held_events").unwrap_or(0.0),
                residue: metric(&body, "migmon_live_residue_events").unwrap_or(0.0),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    write_csv(&dir.join("samples.csv"), &samples);
    let connections = churn.connections();
    drop(churn);
    // The last migration settles `--settle` (5 s) after its resume.
    let settled = wait_released(&addr, f64::from(sent), Duration::from_secs(20));
    drop(guard);
    let _ = child.wait();

    push_rows(
        results,
        &samples,
        (duration, window),
        (settled, sent, connections),
    );
    Ok(())
}

/// The rows from the samples.
fn push_rows(
    results: &mut Results,
    samples: &[Sample],
    (duration, window): (Duration, Duration),
    (settled, sent, connections): (f64, u32, u64),
) {
    let mib = |k: u64| k as f64 / 1024.0;
    let median_rss = |from: Duration, to: Duration| {
        let v: Vec<f64> = samples
            .iter()
            .filter(|s| s.at >= from && s.at < to)
            .map(|s| mib(s.rss_kib))
            .collect();
        Stats::of(&v).map(|s| s.median)
    };
    let first = median_rss(Duration::ZERO, window);
    let last = median_rss(duration.saturating_sub(window), duration);
    if let (Some(f), Some(l)) = (first, last) {
        results.push(GROUP, "RSS first window", "MiB", Better::Lower, f);
        results.push(GROUP, "RSS last window", "MiB", Better::Lower, l);
        results.push(GROUP, "RSS growth", "MiB", Better::Lower, l - f);
    }
    if let Some(max) = samples.iter().map(|s| s.scrape).max() {
        results.push(
            GROUP,
            "slowest scrape",
            "ms",
            Better::Lower,
            max.as_secs_f64() * 1e3,
        );
    }
    let scrapes: Vec<f64> = samples.iter().map(|s| s.scrape.as_secs_f64() * 1e3).collect();
    if let Some(st) = Stats::of(&scrapes) {
        results.push(GROUP, "median scrape", "ms", Better::Lower, st.median);
    }
    if let Some(last) = samples.last() {
        results.push(GROUP, "residue at the end", "events", Better::Lower, last.residue);
    }
    let after = samples.iter().find(|s| s.at >= window);
    if let (Some(a), Some(b)) = (after, samples.last()) {
        let secs = b.at.saturating_sub(a.at).as_secs_f64();
        if secs > 0.0 {
            results.push(
                GROUP,
                "CPU",
                "% of a core",
                Better::Lower,
                100.0 * (b.cpu_s - a.cpu_s) / secs,
            );
            results.push(
                GROUP,
                "load generator CPU",
                "% of a core",
                Better::Lower,
                100.0 * (b.load_cpu_s - a.load_cpu_s) / secs,
            );
            results.push(
                GROUP,
                "event rate",
                "events/s",
                Better::Higher,
                (b.events - a.events) / secs,
            );
        }
    }
    results.push(
        GROUP,
        "migrations released",
        "of sent",
        Better::Higher,
        settled / f64::from(sent.max(1)),
    );
    results.push(
        GROUP,
        "events held, largest",
        "events",
        Better::Lower,
        samples.iter().map(|s| s.held).fold(0.0, f64::max),
    );
    let note = format!(
        "migmon watch --tcp sockets --json (stdout to /dev/null) --metrics --events-listen; {connections} loopback \
         connections in {} s; {sent} simulated migrations (migrator phase events on the socket, 20 ms pause); RSS \
         medians of 1 s samples in the first and last {} s; CPU after the first {} s; a scrape every second (every sample in soak/samples.csv)",
        duration.as_secs(),
        window.as_secs(),
        window.as_secs()
    );
    results.note(GROUP, "RSS growth", &note);
}

/// Every sample, for a look at the curves.
fn write_csv(path: &Path, samples: &[Sample]) {
    let csv: String = std::iter::once("s,rss_kib,cpu_s,scrape_ms,events,held,residue\n".to_owned())
        .chain(samples.iter().map(|s| {
            format!(
                "{:.1},{},{:.2},{:.3},{},{},{}\n",
                s.at.as_secs_f64(),
                s.rss_kib,
                s.cpu_s,
                s.scrape.as_secs_f64() * 1e3,
                s.events,
                s.held,
                s.residue
            )
        }))
        .collect();
    let _ = std::fs::write(path, csv);
}

/// Waits until the watch has released `n` migrations; returns how many it had.
fn wait_released(addr: &str, n: f64, timeout: Duration) -> f64 {
    let deadline = Instant::now() + timeout;
    loop {
        let got = scrape(addr)
            .and_then(|(b, _)| metric(&b, "migmon_live_released_migrations"))
            .unwrap_or(0.0);
        if got >= n || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Stops the watch (SIGINT, then SIGKILL after 10 s) when dropped.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let pid = self.0 as libc::pid_t;
        // SAFETY: kill(2) on the pid of a child this bench started and has not reaped yet.
        unsafe {
            libc::kill(pid, libc::SIGINT);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // A zombie waits for our wait(): it has exited.
            if stat
                .rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: as above.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}
