//! `./x bench`: migrator against QEMU, probe costs, scale and memory, each beside a baseline and a physical floor
//! measured in the same run.
//!
//! `./x bench` builds the release binaries (migmon, migrator, the guest ELF for QEMU, and this task runner with the
//! `probes` feature, which loads migmon's eBPF programs in-process) and runs the release build of itself, so that
//! user-space figures are not those of a debug build. Every scenario runs `--runs` times (at least 5; `--quick`: once,
//! with tiny sizes, under about a minute) and reports median, min and max. The results go to `--out`
//! (default `./bench-out/`) as `bench.md` and `bench.json`.
//!
//! Sections (select with `--only SECTION`, or one part of a section with `--only SECTION:PART`):
//! - `floors`: memory copy bandwidth, unix socket and TCP-over-veth bandwidth (the floors of the others);
//! - `probes`: XDP ns per frame (`BPF_PROG_TEST_RUN`, part `xdp`), the flow tracker's ns per TCP segment (`flow`),
//!   events/s through the collector (`events`), TCP stream overhead (`tcp`), the throughput target as paired
//!   streams (`paired`);
//! - `ports`: taps joining a watched bridge (`migmon watch --bridge`): notification → programs attached against the
//!   same attach in-process, and the event latency while they attach against at rest;
//! - `migration`: our migrator against QEMU (`-M microvm`, same guest ELF) on the same workloads and clients;
//! - `scale`: pause/total against guest RAM, migmon against connection count, peak RSS;
//! - `faults`: the fault injection test with its full counts (stream cuts, stalls, flips, lost commit, kills): cases,
//!   outcomes, and the longest pause of a stalled destination against `--max-pause`;
//! - `soak`: `migmon watch --metrics` for 10 minutes (`--quick`: 40 s) under loopback TCP churn (about 5 k events/s)
//!   with a simulated migration every 30 s: RSS first and last minute, growth, slowest scrape, CPU.

pub mod faults;
pub mod floors;
pub mod machine;
pub mod migration;
pub mod net;
pub mod observe;
#[cfg(feature = "probes")]
pub mod ports;
#[cfg(feature = "probes")]
pub mod probes;
pub mod qemu;
pub mod report;
pub mod scale;
pub mod soak;

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::util;

/// The sections, in the order they run.
pub const SECTIONS: [&str; 7] = [
    "floors",
    "probes",
    "ports",
    "migration",
    "scale",
    "faults",
    "soak",
];

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// A one-minute smoke run (1 run, tiny sizes) that only checks each number is produced.
    #[arg(long)]
    pub quick: bool,
    /// Runs per scenario (at least 5 unless --quick).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Where bench.md and bench.json go.
    #[arg(long, default_value = "bench-out")]
    pub out: PathBuf,
    /// Run only these sections (floors, probes, ports, migration, scale, faults, soak), or one part of a section
    /// (`probes:xdp`, `probes:flow`, `probes:events`, `probes:tcp`, `probes:paired`). Repeatable.
    #[arg(long, value_name = "SECTION[:PART]")]
    pub only: Vec<String>,
    /// Run only these migration workloads: `idle`, or a dirtier's `SIZE@RATE` as the workload names it
    /// (`32M@125M`, `64M@250M`). Repeatable; default: all.
    #[arg(long, value_name = "WORKLOAD")]
    pub workload: Vec<String>,
    /// Skip the release build (the binaries must already be there).
    #[arg(long)]
    pub no_build: bool,
}

/// What every section needs: sizes, run count, where the binaries are, and progress output.
pub struct Ctx {
    pub quick: bool,
    pub runs: usize,
    pub start: Instant,
    /// target/release
    pub bin_dir: PathBuf,
    /// The guest ELF QEMU boots (the same source the migrator embeds).
    pub guest_elf: PathBuf,
    pub out: PathBuf,
    /// `--only` as given.
    pub only: Vec<String>,
    /// `--workload`: the migration workloads to run (empty: all).
    pub workloads: Vec<String>,
}

impl Ctx {
    /// Whether `--only` selects part `part` of `section` (a section selected whole runs every part).
    #[cfg_attr(
        not(feature = "probes"),
        expect(dead_code, reason = "only the probes section has parts so far")
    )]
    pub fn part(&self, section: &str, part: &str) -> bool {
        let whole = |o: &String| o == section;
        let this = |o: &String| o.split_once(':') == Some((section, part));
        let any_of_section =
            |o: &String| o == section || o.split_once(':').is_some_and(|(s, _)| s == section);
        !self.only.iter().any(any_of_section) || self.only.iter().any(|o| whole(o) || this(o))
    }

    /// One progress line on stderr, with the time since the start.
    pub fn progress(&self, msg: &str) {
        eprintln!(
            "\x1b[1mbench\x1b[0m [{:>6.1}s] {msg}",
            self.start.elapsed().as_secs_f64()
        );
    }

    /// Prints "still running: LABEL" every 2 s until the guard is dropped, so a long step is never silent.
    pub fn ticker(&self, label: &str) -> Ticker {
        let done = Arc::new(AtomicBool::new(false));
        let label = Arc::new(Mutex::new(label.to_owned()));
        let (d, l, start) = (done.clone(), label.clone(), self.start);
        let handle = std::thread::spawn(move || {
            let mut last = Instant::now();
            while !d.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                if last.elapsed() >= Duration::from_secs(2) {
                    last = Instant::now();
                    let what = l.lock().map(|s| s.clone()).unwrap_or_default();
                    eprintln!(
                        "\x1b[1mbench\x1b[0m [{:>6.1}s]   ... {what}",
                        start.elapsed().as_secs_f64()
                    );
                }
            }
        });
        Ticker {
            done,
            label,
            handle: Some(handle),
        }
    }

    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }
}

/// See [`Ctx::ticker`].
pub struct Ticker {
    done: Arc<AtomicBool>,
    label: Arc<Mutex<String>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Ticker {
    pub fn set(&self, label: &str) {
        if let Ok(mut l) = self.label.lock() {
            label.clone_into(&mut l);
        }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace_root().join("target"), PathBuf::from)
}

/// Builds what the benchmarks run: release migmon, migrator, this runner with `probes`, and the guest ELF.
fn build() -> Result<()> {
    util::run(util::cargo().current_dir(workspace_root()).args([
        "build",
        "--release",
        "-p",
        "monitor",
        "-p",
        "migrator",
        "-p",
        "xtask",
        "--features",
        "xtask/probes",
    ]))
    .context("building the benchmark binaries failed")?;
    util::run(
        util::cargo()
            .current_dir(workspace_root())
            .args(testbed::guest::BUILD_ARGS),
    )
    .context("building the guest ELF (for QEMU) failed")
}

/// `./x bench`: builds, then runs the release runner (or, in the release runner, the benchmarks).
pub fn run(args: &BenchArgs) -> Result<()> {
    if cfg!(feature = "probes") {
        return run_here(args);
    }
    if !args.no_build {
        build()?;
    }
    let runner = target_dir().join("release/xtask");
    let mut cmd = Command::new(&runner);
    cmd.arg("bench").arg("--no-build");
    if args.quick {
        cmd.arg("--quick");
    }
    cmd.args(["--runs", &args.runs.to_string()])
        .arg("--out")
        .arg(&args.out);
    for s in &args.only {
        cmd.args(["--only", s]);
    }
    for w in &args.workload {
        cmd.args(["--workload", w]);
    }
    util::run(&mut cmd)
}

/// The smoke bench (`./x test` runs it after the unit tests, so the bench code cannot rot).
pub fn smoke() -> Result<()> {
    run(&BenchArgs {
        quick: true,
        runs: 1,
        out: target_dir().join("bench-smoke"),
        only: Vec::new(),
        workload: Vec::new(),
        no_build: false,
    })
}

fn run_here(args: &BenchArgs) -> Result<()> {
    for s in &args.only {
        let section = s.split_once(':').map_or(s.as_str(), |(section, _)| section);
        if !SECTIONS.contains(&section) {
            bail!("unknown section `{s}`: use one of {}", SECTIONS.join(", "));
        }
    }
    if !args.quick && args.runs < 5 {
        bail!("--runs must be at least 5 for medians worth reading (use --quick for a smoke run)");
    }
    let runs = if args.quick { 1 } else { args.runs };
    let ctx = Ctx {
        quick: args.quick,
        runs,
        start: Instant::now(),
        bin_dir: target_dir().join("release"),
        guest_elf: testbed::guest::elf_in(&target_dir()),
        out: args.out.clone(),
        only: args.only.clone(),
        workloads: args.workload.clone(),
    };
    for bin in ["migmon", "migrator"] {
        if !ctx.bin(bin).exists() {
            bail!(
                "{} is missing: run `./x bench` (it builds it)",
                ctx.bin(bin).display()
            );
        }
    }
    let mut info = report::RunInfo {
        command: std::iter::once("./x".to_owned())
            .chain(std::env::args().skip(1).filter(|a| a != "--no-build"))
            .collect::<Vec<_>>()
            .join(" "),
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        quick: args.quick,
        runs,
        machine: machine::Machine::probe(),
    };
    ctx.progress(&format!(
        "{} run(s) per scenario on {} ({} cores), KVM {}, load {}",
        runs, info.machine.cpu_model, info.machine.cores, info.machine.kvm, info.machine.load_start
    ));
    let selected = |s: &str| {
        ctx.only.is_empty()
            || ctx
                .only
                .iter()
                .any(|o| o.split_once(':').map_or(o.as_str(), |(section, _)| section) == s)
    };
    let mut results = report::Results::default();
    let mut failures = Vec::new();
    for section in SECTIONS {
        if !selected(section) {
            continue;
        }
        ctx.progress(&format!("== {section}"));
        let r = match section {
            "floors" => floors::run(&ctx, &mut results),
            "probes" | "ports" => run_loaded(section, &ctx, &mut results),
            "migration" => migration::run(&ctx, &mut results),
            "scale" => scale::run(&ctx, &mut results),
            "faults" => faults::run(&ctx, &mut results),
            "soak" => soak::run(&ctx, &mut results),
            _ => Ok(()),
        };
        if let Err(e) = r {
            ctx.progress(&format!("{section} failed: {e:#}"));
            failures.push(format!("{section}: {e:#}"));
        }
    }
    info.machine.load_end = machine::load_average();
    std::fs::create_dir_all(&ctx.out).with_context(|| format!("cannot create {}", ctx.out.display()))?;
    let md = report::markdown(&info, &results);
    let md_path = ctx.out.join("bench.md");
    let json_path = ctx.out.join("bench.json");
    std::fs::write(&md_path, &md).with_context(|| format!("cannot write {}", md_path.display()))?;
    std::fs::write(&json_path, report::json(&info, &results)?)
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    println!("{md}");
    ctx.progress(&format!(
        "wrote {} and {}",
        md_path.display(),
        json_path.display()
    ));
    let missing = results.missing();
    if !failures.is_empty() {
        bail!("some sections failed:\n  {}", failures.join("\n  "));
    }
    if args.quick && !missing.is_empty() {
        bail!(
            "the smoke run produced no number for:\n  {}",
            missing.join("\n  ")
        );
    }
    if !missing.is_empty() {
        eprintln!("bench: no number for: {}", missing.join(", "));
    }
    Ok(())
}

/// The sections that load migmon's programs in this process (`probes`, `ports`).
#[cfg(feature = "probes")]
fn run_loaded(section: &str, ctx: &Ctx, results: &mut report::Results) -> Result<()> {
    if section == "ports" {
        ports::run(ctx, results)
    } else {
        probes::run(ctx, results)
    }
}

#[cfg(not(feature = "probes"))]
fn run_loaded(_section: &str, _ctx: &Ctx, _results: &mut report::Results) -> Result<()> {
    bail!("this runner was built without the `probes` feature: run `./x bench`")
}
