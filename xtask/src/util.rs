//! Build and test steps shared by the tasks.

use std::process::Command;

use anyhow::{Context, Result, bail};

/// Options of `./x test`.
#[derive(clap::Args, Debug)]
pub struct TestArgs {
    /// Only fmt, clippy and the unit tests: skip the privileged integration tests.
    #[arg(long)]
    pub unit: bool,
    /// Run only integration tests whose name contains this.
    #[arg(long)]
    pub filter: Option<String>,
}

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

/// The whole test suite, as CI runs it.
pub fn test(args: &TestArgs) -> Result<()> {
    run(cargo().args(["fmt", "--all", "--check"])).context("formatting differs: run `cargo fmt --all`")?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "monitor-ebpf",
        "--exclude",
        "guest",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(cargo().args([
        "test",
        "--workspace",
        "--exclude",
        "monitor-ebpf",
        "--exclude",
        "guest",
        "--exclude",
        "integration-tests",
    ]))?;
    // The guest: clippy for its real target, and its hardware-independent library's unit tests on the host.
    run(cargo().args([
        "clippy",
        "-p",
        "guest",
        "--target",
        "x86_64-unknown-none",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(cargo().args([
        "clippy", "-p", "guest", "--lib", "--tests", "--", "-D", "warnings",
    ]))?;
    run(cargo().args(["test", "-p", "guest", "--lib"]))?;
    if args.unit {
        return Ok(());
    }
    if !nix_is_root() {
        bail!(
            "the integration tests need root (network namespaces, eBPF, KVM): run `sudo ./x test`, or `./x test --unit`"
        );
    }
    build_release()?;
    crate::bench::smoke(args)?;
    let mut cmd = cargo();
    cmd.args(["test", "--release", "-p", "integration-tests", "--"]);
    cmd.arg("--test-threads=1");
    if let Some(f) = &args.filter {
        cmd.arg(f);
    }
    run(&mut cmd)
}

/// Fails with a remedy unless running as root.
pub fn require_root(what: &str) -> Result<()> {
    if !nix_is_root() {
        bail!("{what} needs root: run it with sudo");
    }
    Ok(())
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}
