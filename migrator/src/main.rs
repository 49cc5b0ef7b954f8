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
    /// Boot the embedded guest on a tap and run it until Ctrl-C (or until it is migrated away).
    Run(RunCmd),
    /// Wait for one incoming migration, then run the guest (it can be migrated on).
    Receive(migrator::cli::ReceiveArgs),
    /// Ask a running migrator (--api) to migrate its guest; prints a JSON summary.
    Migrate(migrator::cli::MigrateArgs),
    /// Print a running migrator's status as JSON.
    Status(migrator::cli::StatusArgs),
}

#[derive(clap::Args)]
struct RunCmd {
    #[command(flatten)]
    vm: migrator::runner::RunArgs,
    /// Control socket for `migrator migrate` and `migrator status`.
    #[arg(long)]
    api: Option<std::path::PathBuf>,
    /// Migration events: a unix socket to connect to (migmon watch --events-listen) or a file to append to.
    #[arg(long)]
    events: Option<std::path::PathBuf>,
}

fn main() {
    let cli = Cli::parse();
    let result: Result<()> = match cli.cmd {
        Cmd::Run(RunCmd {
            vm,
            api: None,
            events: None,
        }) => migrator::runner::run(&vm),
        Cmd::Run(RunCmd { vm, api, events }) => {
            migrator::vm_migration::run_with_api(&vm.vm_config(), api.as_deref(), events.as_deref())
        }
        Cmd::Receive(args) => migrator::vm_migration::receive(&args),
        Cmd::Migrate(args) => migrator::cli::migrate_main(&args),
        Cmd::Status(args) => migrator::cli::status_main(&args),
    };
    if let Err(e) = result {
        eprintln!("migrator: error: {e:#}");
        std::process::exit(1);
    }
}
