//! `./x fuzz`: the property-based fuzz targets, longer than `./x test` runs them, with fresh seeds.
//!
//! Every target is an ordinary test (proptest under the stable toolchain) that takes its case count from
//! `MIGMON_FUZZ_CASES` (frames: `MIGMON_FUZZ_FRAMES`) and its seed from `MIGMON_FUZZ_SEED`; `cargo test` and
//! `./x test` run them with 256 cases (2,000 frames) from a fixed seed. `./x fuzz` runs rounds of every target,
//! each round with a new seed and `--runs` cases, until `--seconds` have passed (at least one round). A failure
//! prints the seed that reproduces it.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

use crate::util::{self, cargo};

/// Options of `./x fuzz`.
#[derive(clap::Args, Debug)]
pub struct FuzzArgs {
    /// Keep starting rounds until this many seconds have passed.
    #[arg(long, default_value_t = 300)]
    pub seconds: u64,
    /// Cases per target and round (frames for the kernel parsers: 10 times as many).
    #[arg(long, default_value_t = 20_000)]
    pub runs: u64,
    /// Only targets whose name contains this.
    #[arg(long)]
    pub only: Option<String>,
    /// Seed of the first round (later rounds add 1); default: from the clock.
    #[arg(long)]
    pub seed: Option<u64>,
}

/// One target: its name and the `cargo test` arguments that select it.
struct Target {
    name: &'static str,
    args: &'static [&'static str],
    privileged: bool,
}

const TARGETS: &[Target] = &[
    Target {
        name: "migration stream reader, message payloads, VM state decoder",
        args: &["-p", "migrator", "--lib", "fuzz::"],
        privileged: false,
    },
    Target {
        name: "migration stream reader's memory against declared payload lengths",
        args: &["-p", "migrator", "--test", "bounded_read", "fuzz_"],
        privileged: false,
    },
    Target {
        name: "trace reader (random lines, fixture numbers at their edges)",
        args: &["-p", "migmon-analysis", "--test", "fuzz_trace"],
        privileged: false,
    },
    Target {
        name: "QMP and migrator event lines, line splitter",
        args: &["-p", "monitor", "--lib", "pause::fuzz::"],
        privileged: false,
    },
    Target {
        name: "L2 and TCP parsers through BPF_PROG_TEST_RUN",
        args: &["-p", "integration-tests", "--test", "flow", "fuzz_"],
        privileged: true,
    },
];

pub fn run(args: &FuzzArgs) -> Result<()> {
    let root = util::is_root();
    let targets: Vec<&Target> = TARGETS
        .iter()
        .filter(|t| args.only.as_deref().is_none_or(|o| t.name.contains(o)))
        .filter(|t| {
            if t.privileged && !root {
                eprintln!("x: skipping `{}`: it needs root (eBPF)", t.name);
            }
            root || !t.privileged
        })
        .collect();
    if targets.is_empty() {
        eprintln!("x: no fuzz target selected");
        return Ok(());
    }
    if targets.iter().any(|t| t.privileged) {
        util::build_release()?;
    }
    let mut seed = args.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_secs())
    });
    let start = Instant::now();
    let budget = Duration::from_secs(args.seconds);
    let mut rounds = 0u32;
    loop {
        for t in &targets {
            let t0 = Instant::now();
            let mut cmd = cargo();
            cmd.arg("test")
                .arg("--release")
                .args(t.args)
                .args(["--", "--test-threads=1"])
                .env("MIGMON_FUZZ_CASES", args.runs.to_string())
                .env("MIGMON_FUZZ_FRAMES", args.runs.saturating_mul(10).to_string())
                .env("MIGMON_FUZZ_SEED", seed.to_string());
            util::run(&mut cmd).with_context(|| {
                format!(
                    "fuzz target `{}` failed with seed {seed}: rerun with `./x fuzz --only '{}' --seed {seed} --runs {}`",
                    t.name, t.name, args.runs
                )
            })?;
            eprintln!(
                "x: fuzz round {rounds}, seed {seed}: `{}`: {} cases in {:.1} s",
                t.name,
                if t.privileged {
                    args.runs.saturating_mul(10)
                } else {
                    args.runs
                },
                t0.elapsed().as_secs_f64()
            );
        }
        rounds += 1;
        seed = seed.wrapping_add(1);
        if start.elapsed() >= budget {
            break;
        }
    }
    eprintln!(
        "x: fuzzing done: {rounds} round(s) of {} target(s) in {:.0} s, no failure",
        targets.len(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
