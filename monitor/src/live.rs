//! The correlation inside `migmon watch`: the pause-window sources (`--events-listen`, `--events`, `--qmp`), the
//! Prometheus endpoint (`--metrics`), a live line per migration once it settles, and the CI gate
//! (`--until-migrations N` with the `check` limits).
//!
//! A migration is settled when every connection judged against it has a final fate (aborted, or forward progress
//! seen), or `--settle` after its resume (event time), whichever comes first.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError, mpsc::Sender},
    time::Duration,
};

use anyhow::{Context, Result};

use migmon_analysis::{
    check,
    correlate::{Analysis, analyse_events},
    report::live_line,
    trace::Event,
};

use crate::{
    cli::{LimitArgs, duration_ns, run_check},
    metrics::{self, Metrics},
    pause,
    pipeline::{Control, Flow, Observer, Sources},
};

/// The `migmon watch` flags of the correlation work.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct LiveArgs {
    /// Listen on this unix socket (mode 0600) for migrator phase events (`migrator ... --events PATH`).
    #[arg(long, value_name = "PATH")]
    pub events_listen: Option<PathBuf>,
    /// Follow this file of migrator phase events as it grows. Repeatable (one file per migrator).
    #[arg(long = "events", value_name = "FILE")]
    pub events: Vec<PathBuf>,
    /// Follow a QEMU QMP socket for STOP/RESUME/MIGRATION events. Repeatable (source and destination).
    #[arg(long = "qmp", value_name = "PATH")]
    pub qmp: Vec<PathBuf>,
    /// The host name this monitor reports under: the `host` label of its metrics and the host of its --record trace
    /// (default: this machine's). A merge of traces (`migmon report A.trace B.trace`) tells hosts apart by it and
    /// the kernel's boot id: give each monitor sharing one kernel its own name, as the testbed's one monitor per host
    /// namespace does.
    #[arg(long, value_name = "NAME")]
    pub host_name: Option<String>,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Stop after N migrations have settled, check them against the limits and exit 0 (within) or 1 (exceeded).
    #[arg(long, value_name = "N")]
    pub until_migrations: Option<usize>,
    /// How long after a resume to wait for connections to show their fate before a migration counts as settled.
    #[arg(long, value_name = "D", default_value = "5s", value_parser = duration_ns)]
    pub settle: u64,
    #[command(flatten)]
    pub limits: LimitArgs,
}

/// Events handed from the consumer to the gate thread, and the gate's verdict.
#[derive(Default)]
struct Gate {
    incoming: Vec<Event>,
    done: Option<i32>,
}

/// What the gate thread saw, handed back when it ends.
#[derive(Default)]
struct Seen {
    events: Vec<Event>,
    printed: Vec<String>,
    /// A migration has started and not resumed yet.
    in_flight: bool,
}

/// How often the gate correlates when no migration is going on.
const IDLE_CORRELATION: Duration = Duration::from_secs(3);

/// The running parts; [`Live::finish`] stops them and gives the final exit code.
pub struct Live {
    gate: Arc<Mutex<Gate>>,
    thread: std::thread::JoinHandle<Seen>,
    args: LiveArgs,
}

/// Starts the sources (tasks on `sources`) and observers the flags ask for.
pub fn start(args: &LiveArgs, sources: &mut Sources, observers: &mut Vec<Observer>) -> Result<Live> {
    start_sources(args, sources)?;
    let tx = &sources.sender();
    let control = &sources.control();
    if let Some(addr) = &args.metrics {
        let m = Arc::new(match &args.host_name {
            Some(h) => Metrics::for_host(h),
            None => Metrics::new(),
        });
        let (bound, server) = metrics::serve(m.clone(), addr)?;
        sources.spawn("metrics", server);
        eprintln!("migmon: metrics on http://{bound}/metrics");
        observers.push(Box::new(move |ev| {
            m.observe(ev);
            Flow::Continue
        }));
    }
    // The observer only collects; the gate thread correlates (see [`spawn_gate`]).
    let gate = Arc::new(Mutex::new(Gate::default()));
    let g = gate.clone();
    observers.push(Box::new(move |ev| {
        g.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .incoming
            .push(ev.clone());
        Flow::Continue
    }));
    let thread = spawn_gate(args, gate.clone(), tx.clone(), control.clone())?;
    Ok(Live {
        gate,
        thread,
        args: args.clone(),
    })
}

/// Starts the pause-window sources as tasks on `sources`. Every source's events go into the pipeline; a pause also
/// triggers an immediate MAC-stats sample, so the frames black-holed after it are counted from that instant.
fn start_sources(args: &LiveArgs, sources: &mut Sources) -> Result<()> {
    let control = sources.control();
    let emit = |tx: Sender<Event>| {
        let control = control.clone();
        move |ev: Event| {
            if pause::is_pause(&ev) {
                control.request_sample();
            }
            tx.send(ev).is_ok()
        }
    };
    if let Some(p) = &args.events_listen {
        let listener = pause::migrator::listen(p, emit(sources.sender()))
            .with_context(|| format!("cannot listen for migrator events on {}", p.display()))?;
        sources.spawn("events-listen", listener);
        eprintln!("migmon: migrator events on {} (mode 0600)", p.display());
    }
    for f in &args.events {
        sources.spawn(
            "events-file",
            pause::migrator::follow_file(f.clone(), emit(sources.sender())),
        );
    }
    for q in &args.qmp {
        // A QEMU already there is connected to before the watch starts, so its events from now on are seen.
        let follower = sources.block_on(pause::qmp::Follower::start(q.clone(), emit(sources.sender())));
        sources.spawn("qmp", follower.run());
        eprintln!("migmon: following QMP {}", q.display());
    }
    Ok(())
}

/// The gate thread: correlates five times a second while a migration is in flight or settling (every few seconds
/// otherwise), prints a line per settled migration and, with `--until-migrations`, runs the check and stops the
/// watch. It runs on the monotonic clock, so a migration settles even when no more events arrive.
fn spawn_gate(
    args: &LiveArgs,
    g: Arc<Mutex<Gate>>,
    tx: Sender<Event>,
    control: Control,
) -> Result<std::thread::JoinHandle<Seen>> {
    let until = args.until_migrations;
    let settle = args.settle;
    let limits = args.limits.clone();
    // The last event of a trace marks the end of observation: a connection whose next retransmission was due after
    // it is unresolved. Record when the watch really ended.
    let end_note = move |why: &str| {
        let _ = tx.send(Event::Note {
            ts_ns: migevents::monotonic_ns(),
            level: "info".to_owned(),
            message: format!("migmon watch: end of observation ({why})"),
        });
    };
    std::thread::Builder::new()
        .name("migmon-gate".into())
        .spawn(move || {
            let mut seen = Seen::default();
            let mut resumed = 0;
            let mut last_run = std::time::Instant::now();
            let mut last_full = std::time::Instant::now();
            loop {
                if control.stopped() {
                    end_note("stopped");
                    return seen;
                }
                std::thread::sleep(Duration::from_millis(20));
                if last_run.elapsed() < Duration::from_millis(200) {
                    continue;
                }
                last_run = std::time::Instant::now();
                // Take what arrived; correlate without holding the lock, so the consumer never waits.
                let new = std::mem::take(&mut g.lock().unwrap_or_else(PoisonError::into_inner).incoming);
                // Correlating costs a pass over everything seen: do it five times a second while a migration is in
                // flight or settling, and every few seconds otherwise (a move seen only on the wire).
                let migrating = new.iter().any(|e| matches!(e, Event::Migration { .. }));
                seen.events.extend(new);
                let pending = seen.printed.len() < resumed || migrating || seen.in_flight;
                if !pending && last_full.elapsed() < IDLE_CORRELATION {
                    continue;
                }
                last_full = std::time::Instant::now();
                let a = analyse_events(&seen.events);
                resumed = seen.update(&a, settle);
                if let Some(n) = until
                    && seen.printed.len() >= n
                {
                    let code = run_check(&a, &limits, true).unwrap_or_else(|e| {
                        eprintln!("migmon: error: {e:#}");
                        2
                    });
                    g.lock().unwrap_or_else(PoisonError::into_inner).done = Some(code);
                    end_note(&format!("{n} migration(s) checked"));
                    control.stop();
                    return seen;
                }
            }
        })
        .context("cannot start the migration gate thread")
}

impl Seen {
    /// Takes a fresh correlation: whether a migration is in flight, and a line for each migration that settled
    /// since. Returns how many migrations have resumed.
    fn update(&mut self, a: &Analysis, settle: u64) -> usize {
        self.in_flight = a.migrations.iter().any(|m| m.timeline.resume.is_none());
        let now = a.end_ns.max(migevents::monotonic_ns());
        for m in &a.migrations {
            if !self.printed.contains(&m.id) && check::settled(m, now, settle) {
                eprintln!("{}", live_line(m));
                self.printed.push(m.id.clone());
            }
        }
        a.migrations
            .iter()
            .filter(|m| m.timeline.resume.is_some())
            .count()
    }
}

impl Live {
    /// Waits for the gate. With `--until-migrations` not reached, checks what was seen (and fails: fewer
    /// migrations than asked). Returns the exit code.
    pub fn finish(self, code: i32) -> Result<i32> {
        let mut seen = self.thread.join().unwrap_or_default();
        let Some(n) = self.args.until_migrations else {
            return Ok(code);
        };
        let mut g = self.gate.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(done) = g.done {
            return Ok(done);
        }
        seen.events.append(&mut g.incoming);
        let a = analyse_events(&seen.events);
        run_check(&a, &self.args.limits, true)?;
        eprintln!(
            "migmon: stopped after {} of {n} migrations settled: the check fails",
            seen.printed.len()
        );
        Ok(1)
    }
}
