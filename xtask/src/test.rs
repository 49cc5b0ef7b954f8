//! `./x test`: formatting, clippy and the unit tests, then (as root) the bench smoke run and the privileged
//! integration tests, as CI runs them.

use anyhow::{Context, Result, bail};

use crate::{
    bench,
    util::{self, cargo},
};

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

/// The whole test suite, as CI runs it.
pub fn run(args: &TestArgs) -> Result<()> {
    host_checks()?;
    guest_checks()?;
    if args.unit {
        return Ok(());
    }
    if !util::is_root() {
        bail!(
            "the integration tests need root (network namespaces, eBPF, KVM): run `sudo ./x test`, or `./x test --unit`"
        );
    }
    util::build_release()?;
    if args.filter.is_some() {
        eprintln!("x: skipping the bench smoke run (--filter given)");
    } else {
        bench::smoke()?;
    }
    integration_tests(args.filter.as_deref())
}

/// Formatting, clippy and the unit tests of every host crate.
fn host_checks() -> Result<()> {
    util::run(cargo().args(["fmt", "--all", "--check"]))
        .context("formatting differs: run `cargo fmt --all`")?;
    // The migrator checks its own file graph in a test (migrator/tests/import_graph.rs); the other crates here.
    util::run(
        std::process::Command::new("python3")
            .current_dir(testbed::guest::workspace_root())
            .args(["scripts/import-cycles.py", "monitor/src", "analysis/src", "xtask/src", "testbed/src", "base/src"]),
    )
    .context("two files import each other (see the CYCLE lines above): move what both need into a module of its own")?;
    let host_crates = ["--workspace", "--exclude", "monitor-ebpf", "--exclude", "guest"];
    util::run(
        cargo()
            .arg("clippy")
            .args(host_crates)
            .args(["--all-targets", "--", "-D", "warnings"]),
    )?;
    util::run(
        cargo()
            .arg("test")
            .args(host_crates)
            .args(["--exclude", "integration-tests"]),
    )
}

/// The guest: clippy for its real target, and its hardware-independent library's unit tests on the host.
fn guest_checks() -> Result<()> {
    util::run(cargo().args([
        "clippy",
        "-p",
        "guest",
        "--target",
        "x86_64-unknown-none",
        "--",
        "-D",
        "warnings",
    ]))?;
    util::run(cargo().args([
        "clippy", "-p", "guest", "--lib", "--tests", "--", "-D", "warnings",
    ]))?;
    util::run(cargo().args(["test", "-p", "guest", "--lib"]))
}

/// The privileged integration tests: release build, one test at a time.
fn integration_tests(filter: Option<&str>) -> Result<()> {
    let mut cmd = cargo();
    cmd.args(["test", "--release", "-p", "integration-tests", "--"]);
    cmd.arg("--test-threads=1");
    if let Some(f) = filter {
        cmd.arg(f);
    }
    util::run(&mut cmd)
}
