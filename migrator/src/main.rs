//! `migrator`: run a guest; migrate it live or quick (see the crate docs).

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "migrator",
    about = "A small KVM VMM with pre-copy live and quick migration",
    version
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot the embedded guest on a tap and run it until Ctrl-C.
    Run(migrator::runner::RunArgs),
}

fn main() {
    let cli = Cli::parse();
    let result: Result<()> = match cli.cmd {
        Cmd::Run(args) => migrator::runner::run(&args),
    };
    if let Err(e) = result {
        eprintln!("migrator: error: {e:#}");
        std::process::exit(1);
    }
}
