//! `./x bench`: migrator against QEMU, probe costs, scale. (Issue 6.)
//!
//! The measuring code is the `bench` example of the integration-tests package (tests/examples/bench/): one process
//! per sample, so every sample starts clean (probes loaded afresh, namespaces created and removed by their guards).
//! This module builds it, runs each case `--runs` times, and writes the medians, minima and maxima with the
//! machine's facts, the ratios to the same run's baselines and the targets, as markdown and JSON into `--out`.

mod cases;
mod machine;
mod table;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context, Result, bail};
use serde_json::{Map, Value, json};

use crate::util;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// A one-minute smoke run that only checks each number is produced (one run, small sizes).
    #[arg(long)]
    pub quick: bool,
    /// Samples per case (medians, minima and maxima over them).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Where bench.md and bench.json go.
    #[arg(long, default_value = "bench-out")]
    pub out: PathBuf,
    /// Only the cases whose id contains one of these (comma separated), e.g. `xdp,events`.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
}

/// One benchmark case: a `bench` subcommand with its arguments.
pub struct Case {
    /// Stable id, e.g. `migrate.idle.ours`.
    pub id: String,
    /// What it measures, for the table.
    pub title: String,
    pub cmd: &'static str,
    pub args: Vec<String>,
    pub runs: usize,
}

/// The samples of one case.
pub struct Samples {
    pub case: Case,
    pub runs: Vec<Map<String, Value>>,
    pub errors: Vec<String>,
}

impl Samples {
    /// Every numeric key seen in any run, in first-seen order.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = Vec::new();
        for r in &self.runs {
            for (k, v) in r {
                if v.is_number() && !keys.contains(k) {
                    keys.push(k.clone());
                }
            }
        }
        keys
    }

    pub fn values(&self, key: &str) -> Vec<f64> {
        self.runs
            .iter()
            .filter_map(|r| r.get(key).and_then(Value::as_f64))
            .filter(|v| v.is_finite())
            .collect()
    }

    /// (median, min, max) of `key`.
    pub fn stats(&self, key: &str) -> Option<(f64, f64, f64)> {
        let mut v = self.values(key);
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        let median = if v.len() % 2 == 1 {
            v[mid]
        } else {
            f64::midpoint(v[mid - 1], v[mid])
        };
        Some((median, v[0], v[v.len() - 1]))
    }

    /// The last run's value of a non-numeric field (e.g. which accelerator QEMU used).
    pub fn text(&self, key: &str) -> Option<String> {
        self.runs
            .iter()
            .rev()
            .find_map(|r| r.get(key).and_then(Value::as_str).map(str::to_owned))
    }
}

fn example_path() -> Result<PathBuf> {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("cannot run cargo metadata")?;
    let v: Value = serde_json::from_slice(&out.stdout).context("cargo metadata output")?;
    let target = v["target_directory"]
        .as_str()
        .context("cargo metadata has no target_directory")?;
    Ok(Path::new(target).join("release/examples/bench"))
}

/// Runs one sample; returns its figures.
fn sample(bin: &Path, case: &Case, out_dir: &Path, i: usize) -> Result<Map<String, Value>> {
    let result = out_dir.join(format!("raw/{}-{i}.json", case.id));
    let _ = std::fs::remove_file(&result);
    let mut cmd = Command::new(bin);
    cmd.arg(case.cmd)
        .args(&case.args)
        .arg(format!("result={}", result.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    if !status.success() {
        bail!("{} {} failed ({status})", case.cmd, case.args.join(" "));
    }
    let text = std::fs::read_to_string(&result)
        .with_context(|| format!("{} wrote no result", case.id))?;
    match serde_json::from_str(&text).context("result JSON")? {
        Value::Object(m) => Ok(m),
        _ => bail!("{}: the result is not a JSON object", case.id),
    }
}

pub fn run(args: &BenchArgs) -> Result<()> {
    if !std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
    {
        bail!("the benchmarks load eBPF programs, create namespaces and use KVM: run `sudo ./x bench`");
    }
    let started = Instant::now();
    let before = machine::facts();
    eprintln!("bench: {}", machine::one_line(&before));
    util::run(util::cargo().args([
        "build",
        "--release",
        "-p",
        "monitor",
        "-p",
        "migrator",
        "-p",
        "integration-tests",
        "--example",
        "bench",
    ]))
    .context("cannot build the benchmark binaries")?;
    let bin = example_path()?;
    std::fs::create_dir_all(args.out.join("raw"))
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let runs = if args.quick { 1 } else { args.runs.max(1) };
    let all = cases::all(args.quick, runs);
    let selected: Vec<Case> = all
        .into_iter()
        .filter(|c| args.only.is_empty() || args.only.iter().any(|o| c.id.contains(o.as_str())))
        .collect();
    if selected.is_empty() {
        bail!("no case matches --only {}", args.only.join(","));
    }
    let total: usize = selected.iter().map(|c| c.runs).sum();
    let mut done = 0;
    let mut results = Vec::new();
    for case in selected {
        let mut s = Samples {
            runs: Vec::new(),
            errors: Vec::new(),
            case,
        };
        for i in 0..s.case.runs {
            done += 1;
            eprintln!(
                "bench: [{done}/{total}] {} (run {}/{}, {:.0} s so far)",
                s.case.id,
                i + 1,
                s.case.runs,
                started.elapsed().as_secs_f64()
            );
            match sample(&bin, &s.case, &args.out, i) {
                Ok(m) => s.runs.push(m),
                Err(e) => {
                    eprintln!("bench: {} run {} failed: {e:#}", s.case.id, i + 1);
                    s.errors.push(format!("{e:#}"));
                }
            }
        }
        results.push(s);
    }
    let after = machine::facts();
    let md = table::markdown(&results, &before, &after, args.quick, started.elapsed());
    let json = table::json(&results, &before, &after, args.quick);
    std::fs::write(args.out.join("bench.md"), &md).context("cannot write bench.md")?;
    std::fs::write(args.out.join("bench.json"), serde_json::to_vec_pretty(&json)?)
        .context("cannot write bench.json")?;
    println!("{md}");
    eprintln!(
        "bench: wrote {} and {}",
        args.out.join("bench.md").display(),
        args.out.join("bench.json").display()
    );
    if args.quick {
        // The smoke run's only assertion: every case produced its numbers.
        let missing: Vec<String> = results
            .iter()
            .filter(|s| s.runs.is_empty() || s.keys().is_empty())
            .map(|s| format!("{} ({})", s.case.id, s.errors.join("; ")))
            .collect();
        if !missing.is_empty() {
            bail!("cases produced no figures: {}", missing.join(", "));
        }
    }
    let _ = json!(null);
    Ok(())
}
