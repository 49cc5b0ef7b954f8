//! The migration subcommands' arguments and their bodies (`migrate`, `status`, `receive`), so `main.rs` stays a
//! dispatcher. `receive` needs the VMM to build the VM; it gets it as a factory.

use std::{
    io::{IsTerminal, Write},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use migevents::Mode;

use crate::{
    announce::AnnounceSchedule,
    api::{self, ApiServer, Served},
    migration::{
        MigrateOptions, MigrationReport, MigrationSource, MigrationTarget, OnTimeout, Status, Tracker,
        VmError,
    },
    protocol::Hello,
    receive::{ReceiveOptions, ReceiveReport, receive},
    transport::{Endpoint, Listener},
    units::{parse_duration, parse_rate},
};

/// `--mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    Live,
    Quick,
}

/// `--on-timeout`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnTimeoutArg {
    Force,
    Abort,
}

/// `migrator migrate`: ask a running migrator to move its VM.
#[derive(Args, Debug, Clone)]
pub struct MigrateArgs {
    /// The API socket of the source migrator (`run --api` / `receive --api`).
    #[arg(long)]
    pub api: PathBuf,
    /// The destination: tcp:HOST:PORT or unix:PATH (where `migrator receive --listen` waits).
    #[arg(long)]
    pub to: Endpoint,
    #[arg(long, value_enum, default_value = "live")]
    pub mode: ModeArg,
    /// Pause budget of the live switch-over rule.
    #[arg(long, default_value = "30ms", value_parser = parse_duration)]
    pub downtime: Duration,
    /// Cap the stream at this rate (bytes/s; K/M/G = KiB/MiB/GiB), e.g. 125M.
    #[arg(long, value_parser = parse_rate)]
    pub max_bandwidth: Option<u64>,
    /// Pre-copy gives up converging after this long.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// What to do when pre-copy has not converged by --timeout.
    #[arg(long, value_enum, default_value = "force")]
    pub on_timeout: OnTimeoutArg,
    /// Quick mode: write the suspended state to this file (fsynced) first, then send it.
    #[arg(long)]
    pub via_file: Option<PathBuf>,
    /// Quick mode: hold the guest paused this much longer (reproduces a slow move; the report says so).
    #[arg(long, value_parser = parse_duration)]
    pub extra_pause: Option<Duration>,
    /// Hash all guest RAM at both ends; a mismatch fails the migration.
    #[arg(long)]
    pub verify: bool,
}

impl MigrateArgs {
    pub fn options(&self) -> MigrateOptions {
        let mode = match self.mode {
            ModeArg::Live => Mode::Live,
            ModeArg::Quick => Mode::Quick,
        };
        MigrateOptions {
            downtime: self.downtime,
            max_bandwidth: self.max_bandwidth,
            timeout: self.timeout,
            on_timeout: match self.on_timeout {
                OnTimeoutArg::Force => OnTimeout::Force,
                OnTimeoutArg::Abort => OnTimeout::Abort,
            },
            via_file: self.via_file.clone(),
            extra_pause: self.extra_pause.unwrap_or_default(),
            verify: self.verify,
            ..MigrateOptions::new(self.to.clone(), mode)
        }
    }
}

/// `migrator status`.
#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    /// The API socket of a running migrator.
    #[arg(long)]
    pub api: PathBuf,
}

/// The announce schedule options shared by `receive`.
#[derive(Args, Debug, Clone)]
pub struct AnnounceArgs {
    /// RARP frames sent after resume.
    #[arg(long, default_value_t = 5)]
    pub announce_rounds: u32,
    /// First gap between RARP frames.
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    pub announce_initial: Duration,
    /// Each later gap grows by this much ...
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    pub announce_step: Duration,
    /// ... up to this.
    #[arg(long, default_value = "550ms", value_parser = parse_duration)]
    pub announce_max: Duration,
}

impl AnnounceArgs {
    pub fn schedule(&self) -> AnnounceSchedule {
        AnnounceSchedule {
            initial: self.announce_initial,
            max: self.announce_max,
            rounds: self.announce_rounds,
            step: self.announce_step,
        }
    }
}

/// `migrator receive`.
#[derive(Args, Debug, Clone)]
pub struct ReceiveArgs {
    /// The tap device the VM uses here (in the current netns).
    #[arg(long)]
    pub tap: String,
    /// Where to wait for the incoming migration: tcp:HOST:PORT or unix:PATH.
    #[arg(long)]
    pub listen: Endpoint,
    /// Control socket, as for `run`, once the VM runs here.
    #[arg(long)]
    pub api: Option<PathBuf>,
    /// Migration events: a unix socket to connect to (migmon --events-listen) or a file to append to.
    #[arg(long)]
    pub events: Option<PathBuf>,
    /// Give up on a source that stays silent this long.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    #[command(flatten)]
    pub announce: AnnounceArgs,
}

/// `migrator status --api PATH`: prints the status JSON.
pub fn status_main(args: &StatusArgs) -> Result<()> {
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
pub fn migrate_main(args: &MigrateArgs) -> Result<()> {
    let opts = args.options();
    if opts.mode == Mode::Live && (opts.via_file.is_some() || !opts.extra_pause.is_zero()) {
        bail!("--via-file and --extra-pause only apply to --mode quick");
    }
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
    let report = result.with_context(|| {
        format!(
            "migration to {} failed; the guest keeps running at the source",
            args.to
        )
    })?;
    print_json(&serde_json::to_string_pretty(&report)?)
}

/// `migrator receive`: waits for one migration, builds the VM with `create`, restores it, then runs it like `run`
/// (serving `--api`, so it can be migrated again) until it is migrated away or stops.
///
/// `stopped` is polled by the control loop and reports whether the VM has ended on its own.
pub fn receive_main<T, F>(
    args: &ReceiveArgs,
    create: F,
    stopped: impl FnMut(&mut T) -> bool,
) -> Result<(Option<MigrationReport>, ReceiveReport)>
where
    T: MigrationTarget + MigrationSource,
    F: FnOnce(&Hello) -> Result<T, VmError>,
{
    let listener = Listener::bind(&args.listen)?;
    // The API comes up at once so that `status` works while receiving.
    let status = Arc::new(Mutex::new(Status {
        state: "waiting".into(),
        ..Status::default()
    }));
    let server = args
        .api
        .as_deref()
        .map(|p| ApiServer::bind(p, status.clone()))
        .transpose()?;
    eprintln!(
        "migrator: waiting for an incoming migration on {}",
        listener.local_endpoint()
    );
    let stream = listener.accept()?;
    drop(listener);
    let opts = ReceiveOptions {
        announce: args.announce.schedule(),
        idle_timeout: args.idle_timeout,
        events: args.events.clone(),
        host: args.tap.clone(),
    };
    let (mut vm, report) = receive(stream, create, &opts, &Tracker::new(status.clone()))
        .map_err(|e| anyhow::anyhow!(crate::migration::error_chain(&e)))
        .context("incoming migration failed; the source keeps the guest")?;
    eprintln!(
        "migrator: guest {} received ({} data pages, {} rounds), running here",
        report.mac, report.data_pages, report.rounds
    );
    let served = serve_vm(&mut vm, server.as_ref(), args.events.as_deref(), stopped);
    Ok((served, report))
}

/// The control loop of `run` and of `receive` after the migration: returns the report when the VM was migrated
/// away, `None` when it stopped.
pub fn serve_vm<S: MigrationSource>(
    vm: &mut S,
    server: Option<&ApiServer>,
    events: Option<&Path>,
    stopped: impl FnMut(&mut S) -> bool,
) -> Option<MigrationReport> {
    if let Some(s) = server {
        s.status()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .state = "running".into();
    }
    match api::serve(vm, server, events, stopped) {
        Served::Migrated(r) => Some(*r),
        Served::Stopped => None,
    }
}
