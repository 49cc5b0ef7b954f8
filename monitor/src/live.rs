//! The correlation inside `migmon watch`: the pause-window sources (`--events-listen`, `--events`, `--qmp`), the
//! Prometheus endpoint (`--metrics`), a live line per migration once it settles, and the CI gate
//! (`--until-migrations N` with the `check` limits).
//!
//! A migration is settled when every connection judged against it has a final fate (aborted, or forward progress
//! seen), or `--settle` after its resume (event time), whichever comes first.
//!
//! The correlation runs in bounded memory ([`migmon_analysis::live`]): events outside migration windows age out of
//! a `--lookback` buffer; a migration window holds its events (and the look-back before it) until the migration is
//! final, then its verdict is kept (the last few, for the gate) and published to the metrics, and its events are
//! released. Its verdict is the one `migmon report` gives for the whole trace.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError, mpsc::Sender},
    time::Duration,
};

use anyhow::{Context, Result};

use migmon_analysis::{
    live::{LiveConfig, LiveCorrelation},
    report::live_line,
    trace::Event,
};

use crate::{
    cli::{LimitArgs, duration_ns, run_check},
    metrics::{self, Metrics},
    pause,
    pipeline::{Control, Flow, Keeper, Observer, Sources},
    ports::{MacSource, PortControl},
    probes::Iface,
    record_dir::{RecordDir, RecordDirConfig},
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
    /// Follow a libvirt daemon's domain events (suspend/resume, save/restore, migrations with their statistics),
    /// e.g. `qemu:///system`. Repeatable (one per daemon; a live migration between two followed daemons is one
    /// migration). The taps of the domains running at start are watched as if given with --iface, with their MACs
    /// as --vm. A daemon that dies or restarts costs a warning and a reconnect.
    #[arg(long = "libvirt", value_name = "URI")]
    pub libvirt: Vec<String>,
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
    /// How long the live correlation keeps events outside migration windows (a migration window also keeps this
    /// much before its first phase event). Older events are released; the few that still carry state (open
    /// connections, each port's last counters, each bridge's last FDB entry) are kept.
    #[arg(long, value_name = "D", default_value = "30s", value_parser = duration_ns)]
    pub lookback: u64,
    /// Record into this directory: a trace per migration (its `--lookback` before, until it is final) and a
    /// background trace of every event, rotated by size. `migmon report DIR` reads it.
    #[arg(long, value_name = "DIR")]
    pub record_dir: Option<PathBuf>,
    /// With --record-dir: the size at which a background trace is rotated (e.g. 64MiB).
    #[arg(long, value_name = "SIZE", default_value = "64MiB", value_parser = migmon_base::units::parse_size)]
    pub record_max_size: u64,
    /// With --record-dir: how many background traces to keep (the oldest are deleted).
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub record_keep: usize,
    /// With --record-dir: how many migration traces to keep (the oldest are deleted).
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub record_keep_migrations: usize,
    #[command(flatten)]
    pub limits: LimitArgs,
}

/// Events handed from the consumer to the gate thread, and the gate's verdict.
#[derive(Default)]
struct Gate {
    incoming: Vec<Event>,
    done: Option<i32>,
}

/// What the gate thread holds, handed back when it ends.
struct Seen {
    live: LiveCorrelation,
    /// Migrations printed (settled) so far.
    printed: usize,
}

/// How often the gate correlates while a migration is held, and otherwise (a move seen only on the wire).
const BUSY_CORRELATION: Duration = Duration::from_secs(1);
const IDLE_CORRELATION: Duration = Duration::from_secs(3);

/// How far behind the monotonic clock the gate may still be missing events (ring buffer → collector → consumer;
/// the collector drains within about 10 ms of a record, so this is a generous bound). The gate counts the watch as observing until
/// now minus this, so a retransmission that was due and never came judges its connection recovered.
const PIPELINE_LAG_NS: u64 = 100_000_000;

/// The end of what the gate has certainly seen.
fn observed_until() -> u64 {
    migevents::monotonic_ns().saturating_sub(PIPELINE_LAG_NS)
}

/// The running parts; [`Live::finish`] stops them and gives the final exit code.
pub struct Live {
    gate: Arc<Mutex<Gate>>,
    thread: std::thread::JoinHandle<Seen>,
    args: LiveArgs,
}

/// Starts the sources (tasks on `sources`) and observers the flags ask for.
pub fn start(
    args: &LiveArgs,
    sources: &mut Sources,
    observers: &mut Vec<Observer>,
    ports: Option<PortControl>,
) -> Result<Live> {
    map_large_buffers();
    start_sources(args, sources, ports)?;
    let tx = &sources.sender();
    let control = &sources.control();
    let released = Arc::new(Mutex::new(Vec::new()));
    if let Some(dir) = &args.record_dir {
        let host = args.host_name.clone();
        let r = RecordDir::create(
            RecordDirConfig {
                dir: dir.clone(),
                max_size: args.record_max_size,
                keep: args.record_keep,
                keep_migrations: args.record_keep_migrations,
                lookback_ns: args.lookback,
            },
            move || crate::clocks::trace_header(host.as_deref()),
            released.clone(),
        )?;
        eprintln!("migmon: recording into {}", dir.display());
        let mut r = Recorder(Some(r));
        observers.push(Box::new(move |ev| {
            if let Some(r) = &mut r.0 {
                r.observe(ev);
            }
            Flow::Continue
        }));
    }
    let mut published = None;
    if let Some(addr) = &args.metrics {
        let m = Arc::new(match &args.host_name {
            Some(h) => Metrics::for_host(h),
            None => Metrics::new(),
        });
        let (bound, server) = metrics::serve(m.clone(), addr, sources.sender())?;
        sources.spawn("metrics", server);
        eprintln!("migmon: metrics on http://{bound}/metrics");
        published = Some(m.clone());
        observers.push(Box::new(move |ev| {
            m.observe(ev);
            Flow::Continue
        }));
    }
    // The pipeline's keeper ([`Live::keeper`]) only collects; the gate thread correlates (see [`spawn_gate`]).
    let gate = Arc::new(Mutex::new(Gate::default()));
    let thread = spawn_gate(
        args,
        gate.clone(),
        tx.clone(),
        control.clone(),
        (published, released),
    )?;
    Ok(Live {
        gate,
        thread,
        args: args.clone(),
    })
}

/// Buffers at least this large get a mapping of their own from the allocator (see [`map_large_buffers`]).
const OWN_MAPPING_BYTES: i32 = 256 * 1024;

/// Large buffers come and go with each migration (the look-back while a window is held, the indices of a
/// correlation). glibc's malloc raises its mmap threshold to the size of the first such buffer freed and serves the
/// next ones from its heaps, where they leave holes that stay in the watch's RSS; a fixed threshold keeps every
/// buffer of [`OWN_MAPPING_BYTES`] or more in a mapping of its own, handed back to the kernel when it is freed.
fn map_large_buffers() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter, under the allocator's own lock; it takes no pointer.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, OWN_MAPPING_BYTES);
    }
}

/// Hands the pages of freed events back to the kernel. The allocator keeps what the pipeline's threads freed in
/// their arenas, scattered among live allocations, so a watch's RSS would ratchet up to its busiest moment and stay
/// there; trimming after each release keeps it near what is held.
fn return_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap memory to the kernel; it takes no pointer and the allocator's own
    // locks make it safe to call while other threads allocate.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The `--record-dir` recorder, finished (end records written) when the watch drops its observers.
struct Recorder(Option<RecordDir>);

impl Drop for Recorder {
    fn drop(&mut self) {
        if let Some(r) = self.0.take()
            && let Err(e) = r.finish()
        {
            eprintln!("migmon: warning: --record-dir: {e:#}");
        }
    }
}

/// Starts the pause-window sources as tasks on `sources`. Every source's events go into the pipeline; a pause also
/// triggers an immediate MAC-stats sample, so the frames black-holed after it are counted from that instant.
fn start_sources(args: &LiveArgs, sources: &mut Sources, ports: Option<PortControl>) -> Result<()> {
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
    if !args.libvirt.is_empty() {
        // libvirt is a blocking library with its own event loop: it runs on a thread of its own, stopped with the
        // watch.
        let thread = pause::libvirt::follow(&args.libvirt, emit(sources.sender()), move |vm| {
            // The probes attach to each domain's tap as it appears (a migration's destination, a restore).
            if let (Some(ports), Some(mac)) = (&ports, vm.mac) {
                let tap = Iface {
                    name: vm.tap.clone(),
                    netns: vm.netns.clone(),
                };
                ports.register_vm_interface(mac, tap, MacSource::Libvirt);
            }
        })
        .context("cannot follow libvirt (--libvirt)")?;
        let control = sources.control();
        sources.spawn("libvirt", async move {
            control.stopping().await;
            let _ = tokio::task::spawn_blocking(move || thread.stop()).await;
        });
        eprintln!("migmon: following libvirt {}", args.libvirt.join(", "));
    }
    Ok(())
}

/// The gate thread: feeds the live correlation, correlates once a second while a migration is held (every few
/// seconds otherwise), prints a line per settled migration, publishes final ones to the metrics, writes the skipped
/// input counts into the pipeline and, with `--until-migrations`, runs the check and stops the watch. It runs on the
/// monotonic clock, so a migration settles even when no more events arrive.
fn spawn_gate(
    args: &LiveArgs,
    g: Arc<Mutex<Gate>>,
    tx: Sender<Event>,
    control: Control,
    (metrics, released): (Option<Arc<Metrics>>, Arc<Mutex<Vec<String>>>),
) -> Result<std::thread::JoinHandle<Seen>> {
    let until = args.until_migrations;
    let limits = args.limits.clone();
    let cfg = LiveConfig {
        lookback_ns: args.lookback,
        settle_ns: args.settle,
        keep: until.unwrap_or(0).max(LiveConfig::default().keep),
    };
    let mut skipped = std::collections::BTreeMap::new();
    let tx_skipped = tx.clone();
    // The skipped-input counts that changed, as `skipped` records.
    let mut send_skipped = move || {
        for ev in crate::skipped::changed(&mut skipped, migevents::monotonic_ns()) {
            let _ = tx_skipped.send(ev);
        }
    };
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
            let mut seen = Seen {
                live: LiveCorrelation::new(cfg),
                printed: 0,
            };
            let mut pending = false;
            // The intake is swapped with this buffer, so neither reallocates once grown.
            let mut batch: Vec<Event> = Vec::new();
            let mut last_run = std::time::Instant::now();
            let mut last_full = std::time::Instant::now();
            loop {
                if control.stopped() {
                    send_skipped();
                    end_note("stopped");
                    return seen;
                }
                std::thread::sleep(Duration::from_millis(20));
                if last_run.elapsed() < Duration::from_millis(200) {
                    continue;
                }
                last_run = std::time::Instant::now();
                send_skipped();
                // Take what arrived; correlate without holding the lock, so the consumer never waits.
                std::mem::swap(
                    &mut g.lock().unwrap_or_else(PoisonError::into_inner).incoming,
                    &mut batch,
                );
                let migrating = batch.iter().any(|e| matches!(e, Event::Migration { .. }));
                for ev in batch.drain(..) {
                    seen.live.push(ev);
                }
                let pace = if pending || migrating {
                    BUSY_CORRELATION
                } else {
                    IDLE_CORRELATION
                };
                if last_full.elapsed() < pace {
                    continue;
                }
                last_full = std::time::Instant::now();
                let now = observed_until();
                let released_before = seen.live.status().released_events;
                let up = seen.live.update(now);
                pending = up.pending;
                if seen.live.status().released_events > released_before {
                    return_freed_memory();
                }
                for m in &up.settled {
                    eprintln!("{}", live_line(m));
                }
                seen.printed += up.settled.len();
                released
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .extend(up.released.iter().map(|m| m.id.clone()));
                if let Some(metrics) = &metrics {
                    for m in &up.released {
                        metrics.publish(m);
                    }
                    metrics.set_live_status(&seen.live.status(), now);
                }
                if let Some(n) = until
                    && seen.printed >= n
                {
                    let a = seen.live.analysis_for_check(&up.analysis);
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

impl Live {
    /// The pipeline's keeper: every event, by value, into the gate's intake.
    pub fn keeper(&self) -> Keeper {
        let g = self.gate.clone();
        Box::new(move |ev| {
            g.lock().unwrap_or_else(PoisonError::into_inner).incoming.push(ev);
        })
    }

    /// Waits for the gate. With `--until-migrations` not reached, checks what was seen (and fails: fewer
    /// migrations than asked). Returns the exit code.
    pub fn finish(self, code: i32) -> Result<i32> {
        let seen = self.thread.join();
        let Some(n) = self.args.until_migrations else {
            return Ok(code);
        };
        let mut g = self.gate.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(done) = g.done {
            return Ok(done);
        }
        let Ok(mut seen) = seen else {
            anyhow::bail!("the migration gate thread panicked: no check was run");
        };
        for ev in g.incoming.drain(..) {
            seen.live.push(ev);
        }
        let up = seen.live.update(observed_until());
        seen.printed += up.settled.len();
        let a = seen.live.analysis_for_check(&up.analysis);
        run_check(&a, &self.args.limits, true)?;
        eprintln!(
            "migmon: stopped after {} of {n} migrations settled: the check fails",
            seen.printed
        );
        Ok(1)
    }
}
