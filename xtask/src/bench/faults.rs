//! `faults`: the fault injection test (`tests/tests/migration_faults.rs`) with the full counts: 50 stream cuts at
//! random points (pre-copy, the paused tail, before the commit), 20 destination stalls, byte flips, a lost commit,
//! a destination killed (in the paused tail, and after its `Ready`), quick-mode stalls and a source killed after
//! the commit. Its figures: cases and outcomes, and the longest pause
//! a stalled destination caused against the `--max-pause` deadline. `--quick`: 3 cuts and 1 stall.

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::{
    Ctx,
    report::{Better, Results},
};
use crate::util::cargo;

pub fn run(ctx: &Ctx, results: &mut Results) -> Result<()> {
    let (cuts, stalls) = if ctx.quick { (3, 1) } else { (50, 20) };
    let _t = ctx.ticker("fault injection (migration_faults)");
    let out = cargo()
        .args([
            "test",
            "--release",
            "-p",
            "integration-tests",
            "--test",
            "migration_faults",
            "--",
            "--test-threads=1",
            "--nocapture",
        ])
        .env("MIGMON_FAULT_CUTS", cuts.to_string())
        .env("MIGMON_FAULT_STALLS", stalls.to_string())
        .output()
        .context("cannot run the fault injection test")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    for l in stderr.lines().filter(|l| l.contains("faults: ")) {
        ctx.progress(l.trim_start_matches("test faults_leave_exactly_one_running_copy ... "));
    }
    if !out.status.success() {
        bail!(
            "the fault injection test failed:\n{}",
            stderr
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let json = stderr
        .lines()
        .find_map(|l| l.split_once("faults-json: ").map(|(_, j)| j))
        .context("the fault injection test printed no figures (skipped: no KVM?)")?;
    let f: Value = serde_json::from_str(json).context("the fault injection figures")?;
    let num = |k: &str| f[k].as_f64().unwrap_or(f64::NAN);
    let g = "faults";
    for (name, key) in [
        ("cases", "cases"),
        ("stream cuts: pre-copy", "cuts_pre_copy"),
        ("stream cuts: paused tail", "cuts_paused_tail"),
        ("stream cuts: before the commit", "cuts_before_commit"),
        ("destination stalls", "stalls"),
        ("rolled back, one running copy", "rolled_back"),
        ("RAM hash at resume = at pause", "hash_checked"),
        (
            "lost commit: in doubt, resolved by the operator",
            "in_doubt_resolved",
        ),
        ("source killed after the commit: moved", "moved"),
    ] {
        results.push(g, name, "cases", Better::Higher, num(key));
    }
    let name = "longest pause of a stalled destination";
    results.push(g, name, "ms", Better::Lower, num("max_stall_pause_ms"));
    results.set_target(g, name, &format!("≤ {} ms (--max-pause)", num("deadline_ms")));
    results.push(
        g,
        "clients alive at the end",
        "bool",
        Better::Higher,
        if f["clients_alive"].as_bool() == Some(true) {
            1.0
        } else {
            0.0
        },
    );
    results.note(
        g,
        "cases",
        &format!(
            "one run of every case in {:.0} s; the test asserts each outcome",
            num("seconds")
        ),
    );
    Ok(())
}
