//! `cargo xtask`: the project's task runner. Run it through `./x`, which installs the pinned toolchains first.

mod bench;
mod demo;
mod fuzz;
mod test;
mod testbed_cmd;
mod util;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "./x",
    about = "migmon's tasks: build, test, demo, bench, fuzz, testbed",
    version
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the pinned toolchains and packages (done by ./x itself; nothing else to do here).
    Setup,
    /// Build release binaries (migmon with its eBPF programs, migrator with its embedded guest).
    Build,
    /// fmt check, clippy -D warnings, unit tests, then the privileged integration tests (needs root).
    Test(test::TestArgs),
    /// Live migration, then quick migration, under the monitor; prints which sessions survived.
    Demo(demo::DemoArgs),
    /// Benchmarks: migrator against QEMU, probe costs, scale; ratios against baselines from the same run.
    Bench(bench::BenchArgs),
    /// The fuzz targets (stream reader, state decoder, trace reader, QMP/event lines, kernel parsers), longer than
    /// `./x test` runs them: rounds with fresh seeds for --seconds, --runs cases each.
    Fuzz(fuzz::FuzzArgs),
    /// Bring the two-host testbed up or down, or show it.
    Testbed(testbed_cmd::TestbedArgs),
}

fn main() {
    let cli = Cli::parse();
    let result: Result<()> = match cli.cmd {
        Cmd::Setup => Ok(()),
        Cmd::Build => util::build_release(),
        Cmd::Test(args) => test::run(&args),
        Cmd::Demo(args) => demo::run(&args),
        Cmd::Bench(args) => bench::run(&args),
        Cmd::Fuzz(args) => fuzz::run(&args),
        Cmd::Testbed(args) => testbed_cmd::run(&args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
