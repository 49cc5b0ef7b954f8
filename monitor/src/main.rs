//! The `migmon` command line.

use clap::{Parser, Subcommand};
use monitor::{cli, watch};

#[derive(Parser)]
#[command(
    name = "migmon",
    version,
    about = "Did every TCP session survive the VM migration, and if not, why?",
    long_about = "migmon watches VM migrations with eBPF probes (TCP retransmits, state changes, errors, resets; ARP/RARP/GARP \
                  and the VM's frames on each port; bridge FDB moves), joins them with the VM pause windows (from migrator, \
                  QEMU's QMP, or inferred from the wire) and gives each TCP connection a verdict: survived, or aborted and why."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Attach the probes and print events live; optionally record a trace.
    Watch(Box<watch::WatchArgs>),
    /// Per-migration, per-connection report of a recorded trace.
    Report(cli::ReportArgs),
    /// Gate CI on a trace: exit 0 within limits, 1 when a limit is exceeded, 2 on bad input.
    Check(cli::CheckArgs),
    /// Replay each connection's observed pause against other TCP settings.
    Whatif(cli::WhatifArgs),
    /// Export a trace as JSONL, pcapng or a Perfetto trace.
    Export(cli::ExportArgs),
}

fn main() {
    let args = Cli::parse();
    let code = match args.cmd {
        Cmd::Watch(a) => watch::run(&a),
        Cmd::Report(a) => cli::report(&a),
        Cmd::Check(a) => cli::check(&a),
        Cmd::Whatif(a) => cli::whatif(&a),
        Cmd::Export(a) => cli::export(&a),
    };
    match code {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("migmon: error: {e:#}");
            std::process::exit(2);
        }
    }
}
