//! Our migrator against QEMU: the same guest ELF, the same workloads, the same client and the same probes.
//!
//! Each workload boots the guest once and then migrates it back and forth between the two hosts of a testbed,
//! `runs` times (a fresh destination process each time), over TCP across the hosts' migration link as between
//! real hosts, while an echo client in its own namespace measures the largest gap between replies and `migmon
//! watch` counts the retransmits of the guest's connections. Our migrator runs with mutual TLS ("migrator", the
//! way it is meant to run) and over plain TCP ("migrator plain", `--insecure`); QEMU runs with TLS
//! (`tls-creds-x509` on the same credentials directory, made by `migrator tls-init`) and the same downtime budget;
//! "defaults" keeps QEMU's bandwidth cap, "max-bw" raises it to 10 GiB/s.

use std::{
    net::SocketAddrV4,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use migevents::{MigrationEvent, Phase, Role};
use serde_json::Value;
use testbed::net::wait_until;

use super::{
    Ctx, floors,
    net::MigrationBed,
    observe::{EchoClient, Proc, Watcher, wait_echo},
    qemu::{self, Accel, Qemu, QemuConfig},
    report::{Better, Results},
};

pub const MAC: &str = "52:54:00:be:4c:01";
const ECHO_PORT: u16 = 7;
const MIB: f64 = 1024.0 * 1024.0;
/// QEMU's "best setting": the bandwidth cap raised far above what the link can do.
const QEMU_RAISED_BW: u64 = 10 << 30;
/// The port destinations listen on, on their host's migration address.
const MIG_PORT: u16 = 7300;

/// How our migrator's stream travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Mutual TLS (`--tls-creds`).
    Tls,
    /// Plain TCP (`--insecure`).
    Plain,
}

impl Transport {
    /// The name its rows carry.
    pub fn who(self) -> &'static str {
        match self {
            Self::Tls => "migrator",
            Self::Plain => "migrator plain",
        }
    }
}

/// A guest workload.
#[derive(Clone, Debug)]
pub struct Workload {
    pub name: String,
    pub mem_mib: u64,
    /// `--dirty` / `dirty=`: `SIZE@RATE`.
    pub dirty: Option<String>,
    pub downtime_ms: u64,
}

impl Workload {
    fn new(mem_mib: u64, dirty: Option<&str>, downtime_ms: u64) -> Self {
        let name = match dirty {
            None => format!("idle {mem_mib} MiB"),
            Some(d) => format!("{mem_mib} MiB, dirty {d}/s, {downtime_ms} ms budget"),
        };
        Self {
            name,
            mem_mib,
            dirty: dirty.map(str::to_owned),
            downtime_ms,
        }
    }
}

/// Whether `--workload` selects `w` (no `--workload`: every workload).
fn selected(ctx: &Ctx, w: &Workload) -> bool {
    ctx.workloads.is_empty()
        || ctx.workloads.iter().any(|sel| match &w.dirty {
            None => sel == "idle",
            Some(d) => sel == d,
        })
}

pub fn workloads(quick: bool) -> Vec<Workload> {
    if quick {
        vec![Workload::new(64, None, 30), Workload::new(64, Some("4M@16M"), 30)]
    } else {
        vec![
            Workload::new(256, None, 30),
            Workload::new(256, Some("32M@125M"), 30),
            Workload::new(256, Some("64M@250M"), 30),
        ]
    }
}

fn group(w: &Workload) -> String {
    format!("migration: {}", w.name)
}

pub fn run(ctx: &Ctx, results: &mut Results) -> Result<()> {
    let mut errors = Vec::new();
    let accel = match qemu_accel(ctx) {
        Ok(a) => Some(a),
        Err(e) => {
            ctx.progress(&format!("QEMU cannot run the guest: {e:#}"));
            errors.push(format!("QEMU: {e:#}"));
            None
        }
    };
    let all = workloads(ctx.quick);
    if !all.iter().any(|w| selected(ctx, w)) {
        bail!(
            "--workload {}: no such workload (use idle, {})",
            ctx.workloads.join(", "),
            all.iter()
                .filter_map(|w| w.dirty.clone())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for (i, w) in all.iter().enumerate() {
        if !selected(ctx, w) {
            continue;
        }
        let net = 10 + i as u8;
        declare(results, w, ctx.quick);
        for t in [Transport::Tls, Transport::Plain] {
            if let Err(e) = ours(ctx, results, w, net, &group(w), false, t) {
                ctx.progress(&format!("{}, {}: {e:#}", t.who(), w.name));
                errors.push(format!("{}, {}: {e:#}", t.who(), w.name));
            }
        }
        if let Some(accel) = accel {
            let variants: &[(&str, Option<u64>)] = if ctx.quick {
                &[("QEMU max-bw", Some(QEMU_RAISED_BW))]
            } else {
                &[("QEMU defaults", None), ("QEMU max-bw", Some(QEMU_RAISED_BW))]
            };
            for &(label, bw) in variants {
                if let Err(e) = theirs(ctx, results, w, net + 100, accel, label, bw) {
                    ctx.progress(&format!("{label}, {}: {e:#}", w.name));
                    errors.push(format!("{label}, {}: {e:#}", w.name));
                }
            }
        }
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("; "));
    }
    Ok(())
}

fn declare(results: &mut Results, w: &Workload, quick: bool) {
    let g = group(w);
    let who_all: &[&str] = if quick {
        &["migrator", "migrator plain", "QEMU max-bw"]
    } else {
        &["migrator", "migrator plain", "QEMU defaults", "QEMU max-bw"]
    };
    for &who in who_all {
        let ours = who.starts_with("migrator");
        for (m, unit, better) in metrics() {
            if ours || !m.contains("floor") {
                results.declare(&g, &format!("{who} {m}"), unit, better);
            }
        }
        if ours {
            for (m, unit) in pause_parts() {
                results.declare(&g, &format!("{who} {m}"), unit, Better::Lower);
            }
        } else {
            results.declare(&g, &format!("{who} own downtime"), "ms", Better::Lower);
        }
    }
    results.set_baseline(&g, "migrator total", &g, "QEMU max-bw total");
    results.set_baseline(&g, "migrator pause", &g, "QEMU max-bw pause");
    results.set_baseline(&g, "migrator client max gap", &g, "QEMU max-bw client max gap");
    results.set_baseline(&g, "migrator plain total", &g, "migrator total");
    results.set_baseline(&g, "migrator plain pause", &g, "migrator pause");
    results.set_floor(&g, "migrator pause", &g, "migrator pause floor");
    results.set_floor(&g, "migrator plain pause", &g, "migrator plain pause floor");
    if w.dirty.is_none() && w.mem_mib == 256 {
        results.set_target(&g, "migrator total", "≤ 150 ms");
        results.set_target(&g, "migrator pause", "≤ 5 ms");
        results.set_target(&g, "migrator client max gap", "≤ 20 ms");
        results.set_target(&g, "migrator retransmits", "0");
    }
    if w.dirty.as_deref() == Some("32M@125M") {
        results.set_target(&g, "migrator total", "≤ 600 ms");
        results.set_target(&g, "migrator pause", "≤ 30 ms");
    }
}

fn metrics() -> [(&'static str, &'static str, Better); 8] {
    [
        ("total", "ms", Better::Lower),
        ("pause", "ms", Better::Lower),
        ("pause floor", "ms", Better::Lower),
        ("MiB sent", "MiB", Better::Lower),
        ("rounds", "count", Better::Lower),
        ("client max gap", "ms", Better::Lower),
        ("client max gap, no migration", "ms", Better::Lower),
        ("retransmits", "count", Better::Lower),
    ]
}

/// Where our pause goes (row, unit): the rule's estimate, the bytes, and the pause split at its landmarks.
const PAUSE_PARTS: [(&str, &str); 7] = [
    ("pause expected", "ms"),
    ("KiB sent paused", "KiB"),
    ("pause: stop vCPU", "ms"),
    ("pause: final pages and state sent", "ms"),
    ("pause: complete reaches the destination", "ms"),
    ("pause: restore and resume", "ms"),
    ("pause: ready → commit round trip", "ms"),
];

fn pause_parts() -> impl Iterator<Item = (&'static str, &'static str)> {
    PAUSE_PARTS.iter().copied()
}

/// Which accelerator QEMU runs our guest with here: KVM if the guest's echo answers under it, else TCG.
fn qemu_accel(ctx: &Ctx) -> Result<Accel> {
    if !ctx.guest_elf.exists() {
        bail!(
            "{} is missing: run `./x bench` (it builds the guest)",
            ctx.guest_elf.display()
        );
    }
    let bed = MigrationBed::new(9)?;
    tls_init(ctx, &bed)?;
    ctx.progress(&format!(
        "QMP self-test (qemu -M none): QEMU {}",
        qemu::qmp_selftest(&bed.dir)?
    ));
    let mut last = None;
    for accel in [Accel::Kvm, Accel::Tcg] {
        let cfg = qemu_config(ctx, &bed, &Workload::new(64, None, 30), accel);
        let mut q = Qemu::spawn(
            &cfg,
            &bed.hosts[0],
            &bed.taps[0],
            &bed.dir,
            &format!("probe-{}", accel.name()),
            false,
        )?;
        let addr = SocketAddrV4::new(bed.guest_ip, ECHO_PORT);
        match wait_echo(&bed.client, addr, Duration::from_secs(20), &mut q.proc_) {
            Ok(()) => {
                ctx.progress(&format!("QEMU runs the guest with {}", accel.name()));
                return Ok(accel);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no accelerator worked")))
}

fn qemu_config(ctx: &Ctx, bed: &MigrationBed, w: &Workload, accel: Accel) -> QemuConfig {
    QemuConfig {
        guest_elf: ctx.guest_elf.clone(),
        mem_mib: w.mem_mib,
        mac: MAC.to_owned(),
        ip_cidr: format!("{}/{}", bed.guest_ip, bed.prefix_len),
        dirty: w.dirty.clone(),
        accel,
        tls_dir: Some(tls_dir(bed)),
    }
}

/// The bed's TLS credentials (QEMU's tls-creds-x509 layout), shared by our migrator and QEMU.
fn tls_dir(bed: &MigrationBed) -> PathBuf {
    bed.path("tls")
}

/// `migrator tls-init` for the bed: the server certificate names both hosts' migration addresses.
fn tls_init(ctx: &Ctx, bed: &MigrationBed) -> Result<()> {
    let out = std::process::Command::new(ctx.bin("migrator"))
        .arg("tls-init")
        .arg(tls_dir(bed))
        .args([
            "--name",
            &bed.mig_ips[0].to_string(),
            "--name",
            &bed.mig_ips[1].to_string(),
        ])
        .output()
        .context("cannot run migrator tls-init")?;
    if !out.status.success() {
        bail!(
            "migrator tls-init failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `migmon watch` on the guest's address, for the retransmits.
fn watcher(ctx: &Ctx, bed: &MigrationBed) -> Result<Watcher> {
    Watcher::start(
        &ctx.bin("migmon"),
        &[
            "--vm".to_owned(),
            format!("{MAC}={}", bed.guest_ip),
            "--sample-interval".to_owned(),
            "1s".to_owned(),
        ],
    )
}

/// Waits until the client has flowed again for a while after a migration, then returns its max gap (ms).
fn client_gap(client: &EchoClient) -> Result<f64> {
    client.wait_replies(20, Duration::from_secs(10));
    Ok(client.max_gap()?.as_secs_f64() * 1e3)
}

/// The client's max gap over windows of the length of a migration's, with no migration: the guest's own
/// responsiveness under the workload, to read the migration gaps against.
fn quiet_gaps(ctx: &Ctx, results: &mut Results, g: &str, who: &str, client: &EchoClient) -> Result<()> {
    let window = Duration::from_millis(if ctx.quick { 200 } else { 500 });
    for _ in 0..ctx.runs {
        client.reset();
        let until = Instant::now() + window;
        // Not a synchronisation: the window is the measurement.
        std::thread::sleep(until.saturating_duration_since(Instant::now()));
        let gap = client_gap(client)?;
        results.push(
            g,
            &format!("{who} client max gap, no migration"),
            "ms",
            Better::Lower,
            gap,
        );
    }
    results.note(
        g,
        &format!("{who} client max gap, no migration"),
        &format!("{} ms windows plus 20 replies, no migration", window.as_millis()),
    );
    Ok(())
}

/// One migrator process and its API socket.
struct MigratorVm {
    proc_: Proc,
    api: std::path::PathBuf,
}

/// The landmarks of one migration in the migrators' phase events (`CLOCK_MONOTONIC` ns, both ends on this host).
#[derive(Clone, Copy, Debug, Default)]
struct PauseMarks {
    /// The source's vCPU stopped.
    paused: Option<u64>,
    /// The source sent `Complete` (everything of the pause is on the stream).
    complete_sent: Option<u64>,
    /// The destination read `Complete`.
    complete_received: Option<u64>,
    /// The destination's vCPU runs.
    resumed: Option<u64>,
}

impl PauseMarks {
    fn read(events: &Path, migration_id: &str) -> Self {
        let mut m = Self::default();
        let text = std::fs::read_to_string(events).unwrap_or_default();
        for line in text.lines() {
            let Ok(e) = MigrationEvent::from_line(line) else {
                continue;
            };
            if e.migration_id != migration_id {
                continue;
            }
            let at = Some(e.ts_ns);
            match (&e.phase, e.role) {
                (Phase::Pause, Role::Source) => m.paused = at,
                (Phase::StateSent, Role::Source) => m.complete_sent = at,
                (Phase::StateSent, Role::Destination) => m.complete_received = at,
                (Phase::Resume, Role::Destination) => m.resumed = at,
                _ => {}
            }
        }
        m
    }

    /// `to - from`, ms; 0 when `to` came first (the two ends stamp their own events: the destination may read a
    /// message before the source has stamped sending it).
    fn span(from: Option<u64>, to: Option<u64>) -> f64 {
        from.zip(to)
            .map_or(f64::NAN, |(f, t)| t.saturating_sub(f) as f64 / 1e6)
    }

    /// Source pause → destination resume, ms.
    fn pause_ms(&self) -> f64 {
        Self::span(self.paused, self.resumed)
    }
}

/// Runs our migrator on `w` over `transport`, rows in group `g`; with `rss`, also samples both processes' RSS
/// beyond guest RAM.
pub fn ours(
    ctx: &Ctx,
    results: &mut Results,
    w: &Workload,
    net: u8,
    g: &str,
    rss: bool,
    transport: Transport,
) -> Result<()> {
    let g = g.to_owned();
    let who = transport.who();
    ctx.progress(&format!("{who}: {} ({} runs)", w.name, ctx.runs));
    let ticker = ctx.ticker(&format!("{who} {}: booting", w.name));
    let bed = MigrationBed::new(net)?;
    tls_init(ctx, &bed)?;
    let events = bed.path("events.jsonl");
    let mut vm = boot_ours(ctx, &bed, w, &events)?;
    let addr = SocketAddrV4::new(bed.guest_ip, ECHO_PORT);
    wait_echo(&bed.client, addr, Duration::from_secs(30), &mut vm.proc_)?;
    let watch = watcher(ctx, &bed)?;
    let client = EchoClient::start(&bed.client, addr, Duration::from_millis(2))?;
    client.wait_replies(20, Duration::from_secs(10));
    quiet_gaps(ctx, results, &g, who, &client)?;
    let link_bw = link_floor(ctx, results, &bed, &g, who)?;
    for i in 0..ctx.runs {
        ticker.set(&format!("{who} {}: run {}/{}", w.name, i + 1, ctx.runs));
        let (dest, to) = receive_ours(ctx, &bed, i, &events, transport)?;
        client.reset();
        let sampler = rss.then(|| RssSampler::start(&[vm.proc_.pid(), dest.proc_.pid()], w.mem_mib));
        let t0 = migevents::monotonic_ns();
        let report = migrate_ours(ctx, &bed, &vm, &dest, &to, w, transport)?;
        if let Some(s) = sampler {
            results.push(
                &g,
                &format!("{who} RSS beyond guest RAM"),
                "MiB",
                Better::Lower,
                s.stop() as f64 / 1024.0,
            );
        }
        let gap = client_gap(&client)?;
        let retransmits = watch.retransmits_between(t0, migevents::monotonic_ns());
        let run = OursRun {
            who,
            report: &report,
            events: &events,
            link_bw,
            gap,
            retransmits,
        };
        run.push(results, &g);
        vm.proc_.wait_exit(Duration::from_secs(10));
        vm = dest;
    }
    results.note(
        &g,
        &format!("{who} pause"),
        "source pause → destination resume, from the migrator's events",
    );
    results.note(
        &g,
        &format!("{who} pause: stop vCPU"),
        "before the pause starts (the vCPU runs until it takes the request); the next rows split the pause at the \
         phase events: the last dirty set, state and frames sent; `Complete` read at the destination; its restore \
         and resume (from its ack); the rest, the wait from `Ready` to the source's `Commit`",
    );
    results.note(
        &g,
        &format!("{who} pause floor"),
        "bytes sent while paused / the best rate seen (the link's TCP floor or the migrator's own stream rate); \
         a lower bound: the pause also holds the state, the commit and the resume",
    );
    drop(client);
    watch.stop();
    Ok(())
}

/// The TCP floor of the bed's migration link (host A to host B, plain TCP, 1 MiB writes): the best of `runs`
/// streams, bytes/s; also a row of the group.
fn link_floor(ctx: &Ctx, results: &mut Results, bed: &MigrationBed, g: &str, who: &str) -> Result<f64> {
    let total: u64 = if ctx.quick { 32 << 20 } else { 256 << 20 };
    let mut best = 0.0f64;
    for _ in 0..ctx.runs {
        let addr = std::net::SocketAddr::from((bed.mig_ips[1], 0));
        let listener = bed.hosts[1]
            .try_run(|| std::net::TcpListener::bind(addr))?
            .context("cannot listen on the migration link")?;
        let at = listener.local_addr()?;
        let tx = bed.hosts[0]
            .try_run(|| std::net::TcpStream::connect(at))?
            .context("cannot connect across the migration link")?;
        let (rx, _) = listener.accept()?;
        let mib_s = floors::stream(tx, rx, total)?;
        results.push(
            g,
            &format!("{who} link TCP floor"),
            "MiB/s",
            Better::Higher,
            mib_s,
        );
        best = best.max(mib_s);
    }
    results.note(
        g,
        &format!("{who} link TCP floor"),
        &format!(
            "{} MiB per stream across the hosts' migration link, plain TCP",
            total >> 20
        ),
    );
    Ok(best * MIB)
}

/// `migrator run` of workload `w` on host A's tap.
fn boot_ours(ctx: &Ctx, bed: &MigrationBed, w: &Workload, events: &Path) -> Result<MigratorVm> {
    let ip = format!("{}/{}", bed.guest_ip, bed.prefix_len);
    let mem = format!("{}M", w.mem_mib);
    let api = bed.path("vm0.api");
    let mut cmd = bed.hosts[0].command(ctx.bin("migrator"));
    cmd.args([
        "run",
        "--tap",
        &bed.taps[0],
        "--mac",
        MAC,
        "--ip",
        &ip,
        "--mem",
        &mem,
    ])
    .arg("--api")
    .arg(&api)
    .arg("--events")
    .arg(events);
    if let Some(d) = &w.dirty {
        cmd.args(["--dirty", d]);
    }
    Ok(MigratorVm {
        proc_: Proc::spawn(cmd, &bed.path("vm0.log"), "migrator run")?,
        api,
    })
}

/// `migrator receive` for run `i`, on the host the guest is not on, listening on that host's migration address;
/// waits until it listens. Returns it and the endpoint to migrate to.
fn receive_ours(
    ctx: &Ctx,
    bed: &MigrationBed,
    i: usize,
    events: &Path,
    transport: Transport,
) -> Result<(MigratorVm, String)> {
    let side = (i + 1) % 2;
    let to = format!("tcp:{}:{}", bed.mig_ips[side], MIG_PORT + i as u16);
    let api = bed.path(&format!("vm{}.api", i + 1));
    let mut cmd = bed.hosts[side].command(ctx.bin("migrator"));
    cmd.args(["receive", "--tap", &bed.taps[side], "--listen", &to])
        .args(security_args(bed, transport))
        .arg("--api")
        .arg(&api)
        .arg("--events")
        .arg(events);
    let mut dest = Proc::spawn(cmd, &bed.path(&format!("vm{}.log", i + 1)), "migrator receive")?;
    // The API comes up once the listener is bound.
    if !wait_until(Duration::from_secs(10), || api.exists() || !dest.running()) || !dest.running() {
        bail!("migrator receive never listened:\n{}", dest.log_tail());
    }
    Ok((MigratorVm { proc_: dest, api }, to))
}

/// `--tls-creds DIR` or `--insecure`.
fn security_args(bed: &MigrationBed, transport: Transport) -> Vec<std::ffi::OsString> {
    match transport {
        Transport::Tls => vec!["--tls-creds".into(), tls_dir(bed).into()],
        Transport::Plain => vec!["--insecure".into()],
    }
}

/// `migrator migrate --mode live` from `vm` to `dest` (at `to`); returns its JSON report.
fn migrate_ours(
    ctx: &Ctx,
    bed: &MigrationBed,
    vm: &MigratorVm,
    dest: &MigratorVm,
    to: &str,
    w: &Workload,
    transport: Transport,
) -> Result<Value> {
    let out = std::process::Command::new(ctx.bin("migrator"))
        .arg("migrate")
        .arg("--api")
        .arg(&vm.api)
        .args(["--to", to])
        .args(security_args(bed, transport))
        .args(["--mode", "live", "--downtime", &format!("{}ms", w.downtime_ms)])
        .output()
        .context("cannot run migrator migrate")?;
    if !out.status.success() {
        bail!(
            "migrator migrate failed: {}\nsource log:\n{}\ndestination log:\n{}",
            String::from_utf8_lossy(&out.stderr).trim(),
            vm.proc_.log_tail(),
            dest.proc_.log_tail()
        );
    }
    serde_json::from_slice(&out.stdout).context("migrator migrate printed no JSON")
}

/// What one run of our migrator measured.
struct OursRun<'a> {
    /// The rows' name: `migrator` or `migrator plain`.
    who: &'a str,
    /// `migrator migrate`'s JSON report.
    report: &'a Value,
    /// The migrator's phase events (for the pause).
    events: &'a Path,
    /// The best TCP rate measured on this bed's migration link, bytes/s.
    link_bw: f64,
    /// The echo client's largest gap, ms.
    gap: f64,
    retransmits: usize,
}

impl OursRun<'_> {
    fn push(&self, results: &mut Results, g: &str) {
        let (report, who) = (self.report, self.who);
        let f = |k: &str| report[k].as_f64().unwrap_or(f64::NAN);
        let row = |m: &str| format!("{who} {m}");
        let id = report["migration_id"].as_str().unwrap_or_default();
        results.push(g, &row("total"), "ms", Better::Lower, f("total_ms"));
        let marks = PauseMarks::read(self.events, id);
        results.push(g, &row("pause"), "ms", Better::Lower, marks.pause_ms());
        // The floor: the bytes sent while paused at the best rate seen, the migration link's TCP floor or the
        // migrator's own measured stream rate, whichever is higher. Nothing else is counted (the state, the
        // commit round trip, the resume), so a pause can never be below it.
        let best = self.link_bw.max(f("bandwidth"));
        let floor = if best > 0.0 {
            f("final_bytes") / best * 1e3
        } else {
            f64::NAN
        };
        results.push(g, &row("pause floor"), "ms", Better::Lower, floor);
        results.push(g, &row("MiB sent"), "MiB", Better::Lower, f("bytes") / MIB);
        results.push(g, &row("rounds"), "count", Better::Lower, f("rounds"));
        results.push(g, &row("client max gap"), "ms", Better::Lower, self.gap);
        results.push(
            g,
            &row("retransmits"),
            "count",
            Better::Lower,
            self.retransmits as f64,
        );
        // Where the pause went: the source's split, then the landmarks in the events (the destination's restore
        // and resume as it reported them in its ack; the rest of its wait is the ready → commit round trip).
        let restore_ms = f("restore_us") / 1e3;
        let to_destination = PauseMarks::span(marks.complete_sent, marks.complete_received);
        let destination = PauseMarks::span(marks.complete_received, marks.resumed);
        let parts = [
            f("expected_pause_ms"),
            f("final_bytes") / 1024.0,
            report["pause_breakdown"]["stop_vcpu_ms"]
                .as_f64()
                .unwrap_or(f64::NAN),
            PauseMarks::span(marks.paused, marks.complete_sent),
            to_destination,
            restore_ms,
            destination - restore_ms,
        ];
        for ((m, unit), v) in pause_parts().zip(parts) {
            results.push(g, &row(m), unit, Better::Lower, v);
        }
        if report["forced"].as_bool() == Some(true) {
            results.note(g, &row("pause"), "some runs were forced by the timeout");
        }
    }
}

fn theirs(
    ctx: &Ctx,
    results: &mut Results,
    w: &Workload,
    net: u8,
    accel: Accel,
    label: &str,
    max_bandwidth: Option<u64>,
) -> Result<()> {
    let g = group(w);
    ctx.progress(&format!(
        "{label} ({}): {} ({} runs)",
        accel.name(),
        w.name,
        ctx.runs
    ));
    let ticker = ctx.ticker(&format!("{label} {}: booting", w.name));
    let bed = MigrationBed::new(net)?;
    tls_init(ctx, &bed)?;
    let cfg = qemu_config(ctx, &bed, w, accel);
    let mut vm = Qemu::spawn(&cfg, &bed.hosts[0], &bed.taps[0], &bed.dir, "q0", false)?;
    let addr = SocketAddrV4::new(bed.guest_ip, ECHO_PORT);
    wait_echo(&bed.client, addr, Duration::from_secs(30), &mut vm.proc_)?;
    let mut vm_qmp = vm.qmp()?;
    let watch = watcher(ctx, &bed)?;
    let client = EchoClient::start(&bed.client, addr, Duration::from_millis(2))?;
    client.wait_replies(20, Duration::from_secs(10));
    quiet_gaps(ctx, results, &g, label, &client)?;
    let timeout = Duration::from_secs(if ctx.quick { 10 } else { 20 });
    let mut not_converged = 0;
    let params = vm_qmp.execute("query-migrate-parameters", None)?;
    let default_bw = params["max-bandwidth"].as_u64().unwrap_or(0);
    // The tap the guest is on now; a run that does not converge leaves it where it was.
    let mut on = 0usize;
    for i in 0..ctx.runs {
        ticker.set(&format!("{label} {}: run {}/{}", w.name, i + 1, ctx.runs));
        let side = 1 - on;
        let uri = format!("tcp:{}:{}", bed.mig_ips[side], MIG_PORT + i as u16);
        let mut dest = Qemu::spawn(
            &cfg,
            &bed.hosts[side],
            &bed.taps[side],
            &bed.dir,
            &format!("q{}", i + 1),
            true,
        )?;
        let mut dest_qmp = dest.qmp()?;
        qemu::listen(&mut dest_qmp, &uri, true)?;
        client.reset();
        let t0 = migevents::monotonic_ns();
        let started = Instant::now();
        let m = qemu::migrate(
            &mut vm_qmp,
            &mut dest_qmp,
            &uri,
            true,
            w.downtime_ms,
            max_bandwidth,
            timeout,
        )?;
        if !m.completed {
            not_converged += 1;
            ctx.progress(&format!(
                "{label} {}: {} after {:.1} s",
                w.name,
                m.status,
                started.elapsed().as_secs_f64()
            ));
            // The source keeps the guest; a fresh destination is started for the next run.
            continue;
        }
        let gap = client_gap(&client)?;
        let retransmits = watch.retransmits_between(t0, migevents::monotonic_ns());
        push_theirs_run(results, &g, label, &m, gap, retransmits);
        let _ = vm_qmp.execute("quit", None);
        vm.proc_.wait_exit(Duration::from_secs(10));
        vm = dest;
        vm_qmp = dest_qmp;
        on = side;
    }
    let settings = TheirSettings {
        accel,
        label,
        max_bandwidth,
        default_bw,
        timeout,
    };
    settings.note(results, &g, w, not_converged, ctx.runs);
    drop(client);
    watch.stop();
    Ok(())
}

/// The rows of one completed QEMU run.
fn push_theirs_run(
    results: &mut Results,
    g: &str,
    label: &str,
    m: &qemu::QemuMigration,
    gap: f64,
    retransmits: usize,
) {
    results.push(g, &format!("{label} total"), "ms", Better::Lower, m.total_ms);
    results.push(
        g,
        &format!("{label} pause"),
        "ms",
        Better::Lower,
        m.pause_ms.unwrap_or(f64::NAN),
    );
    results.push(
        g,
        &format!("{label} own downtime"),
        "ms",
        Better::Lower,
        m.downtime_ms,
    );
    results.push(
        g,
        &format!("{label} MiB sent"),
        "MiB",
        Better::Lower,
        m.bytes as f64 / MIB,
    );
    results.push(
        g,
        &format!("{label} rounds"),
        "count",
        Better::Lower,
        m.rounds as f64,
    );
    results.push(g, &format!("{label} client max gap"), "ms", Better::Lower, gap);
    results.push(
        g,
        &format!("{label} retransmits"),
        "count",
        Better::Lower,
        retransmits as f64,
    );
}

/// How QEMU was run, for the notes under its rows.
struct TheirSettings<'a> {
    accel: Accel,
    label: &'a str,
    max_bandwidth: Option<u64>,
    /// QEMU's own max-bandwidth, bytes/s.
    default_bw: u64,
    timeout: Duration,
}

impl TheirSettings<'_> {
    fn note(&self, results: &mut Results, g: &str, w: &Workload, not_converged: usize, runs: usize) {
        let Self {
            accel,
            label,
            max_bandwidth,
            default_bw,
            timeout,
        } = *self;
        let bw_note = max_bandwidth.map_or_else(
            || {
                format!(
                    "QEMU's default max-bandwidth {:.0} MiB/s",
                    default_bw as f64 / MIB
                )
            },
            |b| format!("max-bandwidth {:.0} MiB/s", b as f64 / MIB),
        );
        let note = format!(
            "{}; TLS (tls-creds-x509, client certificates verified); downtime-limit {} ms; {}",
            accel.name(),
            w.downtime_ms,
            bw_note
        );
        results.note(g, &format!("{label} total"), &note);
        results.note(
            g,
            &format!("{label} pause"),
            "source STOP → destination RESUME (QMP events)",
        );
        if not_converged > 0 {
            results.note(
                g,
                &format!("{label} total"),
                &format!(
                    "{not_converged} of {} runs did not converge within {} s",
                    runs,
                    timeout.as_secs()
                ),
            );
        }
    }
}

/// Samples processes' resident memory outside their guest RAM mappings every 20 ms; the peak, in KiB.
struct RssSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<u64>,
}

impl RssSampler {
    fn start(pids: &[u32], mem_mib: u64) -> Self {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let pids = pids.to_vec();
        // The migrator maps RAM below the MMIO hole and the rest above 4 GiB (migrator/src/memory.rs).
        let ram = mem_mib << 10;
        let low = ram.min(guest_abi_mmio_base_kib());
        let sizes: Vec<u64> = [low, ram - low].into_iter().filter(|&x| x > 0).collect();
        let handle = std::thread::spawn(move || {
            let mut peak = 0;
            loop {
                for &pid in &pids {
                    let Some(total) = super::observe::rss_kib(pid) else {
                        continue;
                    };
                    let guest: u64 = sizes
                        .iter()
                        .filter_map(|&sz| super::observe::rss_of_mappings_sized(pid, sz))
                        .sum();
                    peak = peak.max(total.saturating_sub(guest));
                }
                if s.load(Ordering::Relaxed) {
                    return peak;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Self { stop, handle }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.join().unwrap_or(0)
    }
}

/// `guest_abi::MMIO_BASE` in KiB (kept here so xtask does not depend on guest-abi for one constant).
const fn guest_abi_mmio_base_kib() -> u64 {
    0xd000_0000 >> 10
}
