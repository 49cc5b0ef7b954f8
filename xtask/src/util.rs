//! Steps shared by the tasks: running a command, cargo, the release build, the root check.

use std::process::Command;

use anyhow::{Context, Result, bail};

/// Runs a command, streaming its output; fails with the command line if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    eprintln!("\x1b[1mx:\x1b[0m {}", shown.replace('"', ""));
    let status = cmd.status().with_context(|| format!("cannot start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

pub fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// `cargo build --release` of the binaries users run.
pub fn build_release() -> Result<()> {
    run(cargo().args(["build", "--release", "-p", "monitor", "-p", "migrator"]))
}

/// Fails with a remedy unless running as root.
pub fn require_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!("{what} needs root: run it with sudo");
    }
    Ok(())
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}
