//! `migrator`: run a guest; migrate it live or quick (see the library's crate docs). This binary owns the command
//! line (clap, in `args`) and the client side of `migrate` and `status`; everything else is the library.

mod args;

use std::{
    io::{IsTerminal, Write},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use migevents::Mode;
use migrator::{api, engine::Status};

use crate::args::{MigrateArgs, ReceiveArgs, ResumeArgs, RunArgs, StatusArgs, TlsInitArgs};

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
    Run(RunArgs),
    /// Wait for one incoming migration, then run the guest (it can be migrated on).
    Receive(ReceiveArgs),
    /// Ask a running migrator (--api) to migrate its guest; prints a JSON summary.
    Migrate(MigrateArgs),
    /// Print a running migrator's status as JSON.
    Status(StatusArgs),
    /// Stop a running migration (it rolls back unless it has committed), or drop an in-doubt guest's copy here.
    Cancel(StatusArgs),
    /// Resume an in-doubt guest on this side (with --force, once it is sure the guest runs nowhere else).
    Resume(ResumeArgs),
    /// Make a test CA and server and client certificates in DIR (QEMU's tls-creds-x509 layout).
    TlsInit(TlsInitArgs),
}

fn main() {
    let cli = Cli::parse();
    let result: Result<()> = match cli.cmd {
        Cmd::Run(args) => migrator::vm_migration::run(&args.config()).map_err(Into::into),
        Cmd::Receive(args) => migrator::vm_migration::run_destination(&args.config()).map_err(Into::into),
        Cmd::Migrate(args) => migrate(&args),
        Cmd::Status(args) => status(&args),
        Cmd::TlsInit(args) => tls_init(&args),
        Cmd::Cancel(args) => api::request_simple(&args.api, &api::Request::Cancel)
            .map(|m| eprintln!("migrator: {m}"))
            .map_err(Into::into),
        Cmd::Resume(args) => api::request_simple(&args.api, &api::Request::Resume { force: args.force })
            .map(|m| eprintln!("migrator: {m}"))
            .map_err(Into::into),
    };
    if let Err(e) = result {
        eprintln!("migrator: error: {e:#}");
        std::process::exit(1);
    }
}

/// `migrator tls-init DIR`.
fn tls_init(args: &TlsInitArgs) -> Result<()> {
    let init = migrator::tls::TlsInit {
        server_names: args.names.clone(),
    };
    migrator::tls::tls_init(&args.dir, &init)
        .with_context(|| format!("cannot make TLS credentials in {}", args.dir.display()))?;
    eprintln!(
        "migrator: test CA and certificates written to {} (use --tls-creds {} on both ends)",
        args.dir.display(),
        args.dir.display()
    );
    Ok(())
}

/// `migrator status --api PATH`: prints the status JSON.
fn status(args: &StatusArgs) -> Result<()> {
    let s = api::request_status(&args.api)?;
    print_json(&serde_json::to_string_pretty(&s)?)
}

/// Prints a JSON document on stdout; a reader that went away (`| head`) is not an error.
fn print_json(doc: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{doc}").and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("cannot write to stdout"),
        _ => Ok(()),
    }
}

const MIB: f64 = 1024.0 * 1024.0;

fn progress_line(s: &Status) -> String {
    format!(
        "{:<10} round {:>3}  remaining {:>8.1} MiB  rate {:>8.1} MiB/s  expected pause {:>6.1} ms",
        s.state,
        s.iteration,
        s.remaining_bytes as f64 / MIB,
        s.bandwidth as f64 / MIB,
        s.expected_pause_ms
    )
}

/// `migrator migrate`: progress on a TTY, then the JSON summary on stdout.
fn migrate(args: &MigrateArgs) -> Result<()> {
    let opts = args.options();
    if opts.mode == Mode::Live && (opts.via_file.is_some() || !opts.extra_pause.is_zero()) {
        bail!("--via-file and --extra-pause only apply to --mode quick");
    }
    migrator::transport::check_security(&opts.to, opts.tls.is_some(), opts.insecure)?;
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new_spinner();
        b.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        b.enable_steady_tick(Duration::from_millis(100));
        b
    });
    let result = api::request_migrate(&args.api, &opts, |s| {
        if let Some(b) = &bar {
            b.set_message(progress_line(s));
        }
    });
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let summary = result.with_context(|| {
        format!(
            "migration to {} failed; the guest keeps running at the source",
            args.to
        )
    })?;
    print_json(&serde_json::to_string_pretty(&summary)?)
}
