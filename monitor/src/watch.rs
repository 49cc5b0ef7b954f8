//! `migmon watch`: attach the probes, stream events, record a trace.
//!
//! The core is a [`Pipeline`]: every source pushes [`Event`]s through a [`std::sync::mpsc::Sender`] from
//! [`Pipeline::sender`], and one consumer prints them (human or `--json`), appends them to the `--record` trace,
//! counts them for the summary and hands them to [`Observer`]s. The sources are tasks on one tokio runtime
//! ([`Sources`]). The kernel probes are one: a collector task wakes when a ring buffer has records (`AsyncFd` on each
//! ring buffer's fd), drains them (then lets the next records gather for 10 ms, so a stream costs a wakeup per batch)
//! and, every `--sample-interval` or at once when [`Control::request_sample`] is
//! called, samples the per-MAC counters (`mac_stats`), the malformed-frame counters (`malformed`) and the ring buffer
//! losses (`loss`); it owns the [`Probes`], which other tasks reach through [`ProbeAccess`]. Other sources (a
//! migrator's event socket, QMP, the clock sampler, ...) push into the same sender.
//!
//! ```text
//!  ring buffers ─┐  tasks on one                        ┌─ stdout (human / --json)
//!  map samples ──┼─ tokio runtime ─ Sender<Event> ──► consumer ──┼─ --record trace (flushed per batch)
//!  other sources ┘                                      └─ observers, summary
//! ```

use std::{
    collections::HashMap,
    os::fd::{BorrowedFd, OwnedFd},
    path::PathBuf,
    sync::mpsc::Sender,
    task::Poll,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use migmon_analysis::trace::{Event, MacAddr, TraceWriter};
use migmon_base::units::parse_duration;
use monitor_common::{DecodeError, MacCounters, MacKey, WireEvent};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};

pub use crate::clocks::trace_header;
use crate::{
    decode::{Decoder, mono_now_ns},
    output::Output,
    pipeline::{Control, Observer, Pipeline, Sources},
    ports::{Applied, PortHandler},
    probes::{FlowOptions, Iface, IngressMode, ProbeOptions, Probes, Rings, WatchList},
};

/// Options of `migmon watch`. Flat, so other parts add their flags here.
#[derive(clap::Args, Debug, Clone, Default)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "command-line switches; --xdp, --xdp-skb and --tc-ingress exclude each other through clap"
)]
pub struct WatchArgs {
    /// Watch the frames on this interface (a VM's tap, a bridge port, an uplink); `IF@NETNS` for an interface in a
    /// named network namespace. Repeatable. The ingress parser (ARP/RARP/GARP, frames from watched MACs, the
    /// TCP flow tracker) runs as a TC classifier on veths and taps and as XDP elsewhere (`--xdp`, `--xdp-skb`,
    /// `--tc-ingress` choose); with the flow tracker on, TC egress is attached too, for the other direction.
    #[arg(long = "iface", value_name = "IF[@NETNS]")]
    pub iface: Vec<String>,
    /// Attach the ingress parser with XDP (driver mode, skb fallback) on every --iface, veths and taps included.
    #[arg(long, conflicts_with_all = ["xdp_skb", "tc_ingress"])]
    pub xdp: bool,
    /// Attach the XDP parser in generic (skb) mode instead of driver mode. On a veth, driver-mode XDP turns off
    /// the peer's segmentation offloads, so a TCP stream across the pair slows down several times; skb mode
    /// keeps them (measured: ~73 % slower in driver mode, ~13 % in skb mode; `./x bench --only probes`).
    #[arg(long)]
    pub xdp_skb: bool,
    /// Run the ingress parser of every --iface as a TC ingress classifier (the default on veths and taps): no
    /// offloads lost and nothing copied. It sees frames after GRO (frame counters count aggregated packets) and
    /// after the kernel took an outer VLAN tag into the packet's metadata (reported from there).
    #[arg(long, conflicts_with = "xdp_skb")]
    pub tc_ingress: bool,
    /// Watch every port of this bridge, as ports join and leave it: a VM's tap that appears when the VM migrates
    /// in is watched from its first frame, and one that vanishes is let go. `BR@NETNS` for a bridge in a named
    /// network namespace. Repeatable. Each port gets the ingress parser (as for --iface) and TC egress; VM MACs
    /// are learned as the bridge learns them on its taps and from migrations' setup events.
    #[arg(long = "bridge", value_name = "BR[@NETNS]")]
    pub bridge: Vec<String>,
    /// Attach the TC egress counter (frames towards watched MACs) to this interface. Repeatable.
    #[arg(long = "egress", value_name = "IF[@NETNS]")]
    pub egress: Vec<String>,
    /// Watch a VM: its MAC (L2 counters, first-seen, FDB moves) and optionally its IP, IPv4 or IPv6 (TCP filter,
    /// and the flow tracker's key; without an IP the tracker follows the MAC). Repeatable, also for one VM's
    /// several addresses.
    #[arg(long = "vm", value_name = "MAC[=IP]")]
    pub vm: Vec<String>,
    /// Where the per-connection TCP facts come from. `sockets`: the host's TCP tracepoints, which see only sockets
    /// of this host (the clients run here, as in CI). `wire`: the flow tracker on the --iface ports, which sees
    /// the VMs' own connections (a hypervisor host); no socket tracepoint is attached. `both`: the two.
    #[arg(long, value_enum, default_value_t = TcpSource::Both)]
    pub tcp: TcpSource,
    /// Flow tracker: a side's first forward progress after this long without is reported (`flow_progress`).
    #[arg(long, value_name = "D", default_value = "50ms", value_parser = parse_duration)]
    pub flow_quiet: Duration,
    /// Flow tracker: entries of the flow table, for IPv4 and again for IPv6 flows (least recently used flows are
    /// evicted, and counted, beyond).
    #[arg(long, value_name = "N", default_value_t = crate::probes::DEFAULT_FLOW_TABLE)]
    pub flow_table: u32,
    /// Flow tracker: frame captures per second and CPU in flow records, for the pcapng export (0 = no limit).
    /// Records over the limit carry no frame bytes and are counted (`flow_table.capture_dropped`).
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub flow_captures: u32,
    /// Report only TCP connections with this local or remote port (with --vm IPs: either matches for the socket
    /// tracepoints; the flow tracker follows only the VMs' connections with this port). Repeatable.
    #[arg(long = "port", value_name = "N")]
    pub port: Vec<u16>,
    /// One JSON object per line (see docs/events.md) instead of human lines.
    #[arg(long)]
    pub json: bool,
    /// Also write every event to this trace file (for `migmon report`/`export`), flushed in batches (at least every
    /// 100 ms, and at the end: Ctrl-C and SIGTERM lose nothing).
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,
    /// Stop after this long (e.g. 30s, 500ms, 2m); default: until Ctrl-C.
    #[arg(long, value_name = "D", value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// A watched MAC silent on a port for longer than this is reported as seen again when it reappears.
    #[arg(long, value_name = "D", default_value = "50ms", value_parser = parse_duration)]
    pub mac_gap: Duration,
    /// How often the MAC, malformed-frame and loss counters are sampled.
    #[arg(long, value_name = "D", default_value = "100ms", value_parser = parse_duration)]
    pub sample_interval: Duration,
    /// Test only: ring buffer size in bytes (a power of two, at least 4096).
    #[arg(long, hide = true, value_name = "BYTES")]
    pub ringbuf_bytes: Option<u32>,
    /// Carry the kernel programs' own diagnostics (why a frame was passed unread, ...) to user space as notes
    /// (level `ebpf-debug`), printed and recorded with the events. Off by default: the programs then skip their log
    /// statements.
    #[arg(long)]
    pub ebpf_log: bool,
    /// Pause-window sources, metrics and the CI gate.
    #[command(flatten)]
    pub live: crate::live::LiveArgs,
}

/// Where TCP facts come from (`--tcp`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TcpSource {
    /// The TCP and socket tracepoints.
    Sockets,
    /// The flow tracker on the watched ports.
    Wire,
    /// Both.
    #[default]
    Both,
}

/// Parses `IF` or `IF@NETNS`.
pub fn parse_iface(s: &str) -> Result<Iface> {
    Iface::parse(s).ok_or_else(|| {
        anyhow::anyhow!(
            "`{s}` is not an interface: use IF or IF@NETNS (interface names are 1 to 15 characters)"
        )
    })
}

/// Parses `--vm MAC[=IP]` into the watch list.
pub fn parse_vm(s: &str, watch: &mut WatchList) -> Result<()> {
    let (mac, ip) = match s.split_once('=') {
        Some((m, ip)) => (m, Some(ip)),
        None => (s, None),
    };
    let mac: MacAddr = mac
        .parse()
        .with_context(|| format!("`{s}`: not a VM (MAC[=IP])"))?;
    watch.macs.push(mac.octets());
    if let Some(ip) = ip {
        watch.ips.push(
            ip.parse()
                .with_context(|| format!("`{s}`: `{ip}` is not an IP address"))?,
        );
    }
    Ok(())
}

/// What a watch covers, for its first line: `TCP (all) and xdp:IF tc:IF vm MAC`.
fn describe(args: &WatchArgs) -> String {
    let ips: Vec<&str> = args
        .vm
        .iter()
        .filter_map(|v| v.split_once('=').map(|(_, ip)| ip))
        .collect();
    let mut filters: Vec<String> = ips.iter().map(|ip| format!("ip {ip}")).collect();
    filters.extend(args.port.iter().map(|p| format!("port {p}")));
    let mut parts = vec![if filters.is_empty() {
        "all TCP".to_owned()
    } else {
        format!("TCP of {}", filters.join(", "))
    }];
    parts.extend(args.iface.iter().map(|i| format!("xdp:{i}")));
    parts.extend(args.bridge.iter().map(|b| format!("bridge:{b}")));
    parts.extend(args.egress.iter().map(|i| format!("tc:{i}")));
    parts.extend(
        args.vm
            .iter()
            .map(|v| format!("vm {}", v.split('=').next().unwrap_or(v))),
    );
    parts.join(" ")
}

/// Previous samples, to emit only what changed. The counter maps hold what the kernel's maps held at the last
/// sample, so the counters of a port that is gone (deleted from the kernel's map once the port is retired) leave them
/// too.
#[derive(Default)]
struct Samples {
    mac: HashMap<(u32, MacKey), MacCounters>,
    malformed: HashMap<(u32, u32), u64>,
    lost: Vec<u64>,
    /// The flow counters last reported (entries and evictions as counted then), and when the tables were last
    /// walked.
    flows: crate::probes::FlowTotals,
    flows_walked: Option<std::time::Instant>,
}

/// The flow tables are walked at most this often to count evictions.
const FLOW_WALK_EVERY: Duration = Duration::from_secs(1);

/// The entries of a counter map read now that differ from the last read (`prev`), which becomes this read: keys
/// gone from the map leave `prev`.
fn changed<K: std::hash::Hash + Eq + Copy, V: PartialEq + Copy>(
    prev: &mut HashMap<K, V>,
    now: impl Iterator<Item = (K, V)>,
) -> Vec<(K, V)> {
    let now: HashMap<K, V> = now.collect();
    let out = now
        .iter()
        .filter(|&(k, v)| prev.get(k) != Some(v))
        .map(|(&k, &v)| (k, v))
        .collect();
    *prev = now;
    out
}

fn sample(probes: &Probes, decoder: &Decoder, prev: &mut Samples, tx: &Sender<Event>) {
    let ts_ns = mono_now_ns();
    match probes.mac_counters() {
        Ok(entries) => {
            let entries = entries.into_iter().map(|(id, key, c)| ((id, key), c));
            for ((id, key), c) in changed(&mut prev.mac, entries) {
                let _ = tx.send(decoder.mac_stats(ts_ns, id, &key, &c));
            }
        }
        Err(e) => note(tx, "warning", format!("cannot read the MAC counters: {e}")),
    }
    match probes.malformed() {
        Ok(entries) => {
            let entries = entries.into_iter().map(|(id, ifindex, n)| ((id, ifindex), n));
            for ((id, ifindex), count) in changed(&mut prev.malformed, entries) {
                let _ = tx.send(Event::Malformed {
                    ts_ns,
                    port: decoder.port(id, ifindex),
                    count,
                });
            }
        }
        Err(e) => note(
            tx,
            "warning",
            format!("cannot read the malformed-frame counters: {e}"),
        ),
    }
    match probes.lost() {
        Ok(lost) => {
            prev.lost.resize(lost.len(), 0);
            for (cpu, (&now, before)) in lost.iter().zip(prev.lost.iter_mut()).enumerate() {
                if now > *before {
                    let _ = tx.send(Event::Loss {
                        ts_ns,
                        cpu: cpu as u32,
                        count: now - *before,
                    });
                    *before = now;
                }
            }
        }
        Err(e) => note(tx, "warning", format!("cannot read the loss counters: {e}")),
    }
    sample_flows(probes, prev, tx, ts_ns);
}

/// Emits `flow_table` when the flow tracker's counters moved (counting the table entries at most once per
/// [`FLOW_WALK_EVERY`]).
fn sample_flows(probes: &Probes, prev: &mut Samples, tx: &Sender<Event>, ts_ns: u64) {
    let cheap = match probes.flow_totals(false) {
        Ok(t) => t,
        Err(e) => {
            note(tx, "warning", format!("cannot read the flow counters: {e}"));
            return;
        }
    };
    let p = &prev.flows;
    if (
        cheap.inserts,
        cheap.insert_failed,
        cheap.capture_dropped,
        cheap.fragments,
    ) == (p.inserts, p.insert_failed, p.capture_dropped, p.fragments)
    {
        return;
    }
    if prev.flows_walked.is_some_and(|t| t.elapsed() < FLOW_WALK_EVERY) {
        return;
    }
    let t = match probes.flow_totals(true) {
        Ok(t) => t,
        Err(e) => {
            note(tx, "warning", format!("cannot count the flow table: {e}"));
            return;
        }
    };
    prev.flows_walked = Some(std::time::Instant::now());
    prev.flows = t;
    let _ = tx.send(Event::FlowTable {
        ts_ns,
        inserts: t.inserts,
        entries: t.entries,
        evictions: t.evictions,
        insert_failed: t.insert_failed,
        capture_dropped: t.capture_dropped,
        fragments: t.fragments,
    });
}

fn note(tx: &Sender<Event>, level: &str, message: String) {
    let _ = tx.send(Event::Note {
        ts_ns: mono_now_ns(),
        level: level.to_owned(),
        message,
    });
}

/// One ring buffer record, decoded, into `tx`.
fn decoded(r: &Result<WireEvent, DecodeError>, decoder: &mut Decoder, tx: &Sender<Event>) {
    match r {
        Ok(w) => {
            let _ = tx.send(decoder.event(w));
        }
        Err(e) => {
            crate::skipped::count("kernel", "undecodable");
            note(tx, "warning", format!("skipped a kernel record: {e}"));
        }
    }
}

/// Decodes every pending ring buffer record into `tx`; returns how many there were.
fn drain(probes: &mut Probes, decoder: &mut Decoder, tx: &Sender<Event>) -> usize {
    let n = probes.drain(|r| decoded(&r, decoder, tx));
    let dropped = probes.drain_logs(|line, netns| {
        let _ = tx.send(line.to_event(netns));
    });
    if dropped > 0 {
        crate::skipped::count("kernel-log", "dropped");
        note(
            tx,
            "info",
            format!("--ebpf-log: {dropped} kernel log line(s) dropped (read too late, or unreadable)"),
        );
    }
    n
}

/// Work handed to the probe collector, which owns the [`Probes`]: attach or detach a port, read a map. It runs
/// between two drains; the collector then watches the ring buffers the probes have now.
pub type ProbeWork = Box<dyn FnOnce(&mut Probes, &mut Decoder) + Send>;

/// The running probe collector: its task (the consumer drains until it ends) and a way to reach its probes.
pub struct Collector {
    pub task: tokio::task::JoinHandle<()>,
    pub probes: ProbeAccess,
}

/// Reaches the [`Probes`] the collector owns, from any task or thread.
#[derive(Clone)]
pub struct ProbeAccess(tokio::sync::mpsc::UnboundedSender<ProbeWork>);

impl ProbeAccess {
    /// Runs `f` on the collector's probes and decoder and returns what it returns; `None` once the collector has
    /// stopped.
    pub async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Probes, &mut Decoder) -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let work: ProbeWork = Box::new(move |p, d| {
            let _ = tx.send(f(p, d));
        });
        self.0.send(work).ok()?;
        rx.await.ok()
    }
}

/// Registers every ring buffer of `probes` (events, and the programs' logs with `--ebpf-log`) with the runtime's
/// reactor, each through a duplicate of its fd (so the registration never outlives the fd it names, whatever the
/// order the probes and the registrations go in).
fn watch_rings(probes: &Probes) -> std::io::Result<Vec<AsyncFd<OwnedFd>>> {
    probes
        .ring_fds()
        .into_iter()
        .chain(probes.log_fds())
        .map(|fd| {
            // SAFETY: `fd` is a ring buffer map of `probes`, open while `probes` is borrowed here.
            watch_fd(unsafe { BorrowedFd::borrow_raw(fd) })
        })
        .collect()
}

/// Completes when any ring buffer has records (never, for an empty set). Readiness is cleared before the caller
/// drains, so a record submitted during the drain wakes it again.
async fn rings_readable(rings: &[AsyncFd<OwnedFd>]) -> std::io::Result<()> {
    std::future::poll_fn(|cx| {
        let mut ready = false;
        for ring in rings {
            match ring.poll_read_ready(cx) {
                Poll::Ready(Ok(mut guard)) => {
                    guard.clear_ready();
                    ready = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
        }
        if ready { Poll::Ready(Ok(())) } else { Poll::Pending }
    })
    .await
}

/// How often the ring buffers are drained when the reactor cannot watch them.
const RING_POLL_FALLBACK: Duration = Duration::from_millis(10);

/// After a drain, the collector waits this long before it waits on the ring buffers again. A ring buffer wakes its
/// reader only for a record submitted when the reader had caught up, so the records of this pause wake nobody and
/// are drained together: a steady stream costs a wakeup of the collector (and of the consumer) per batch rather
/// than per record. A 1 MiB ring buffer holds this long of more than a million records a second.
const RING_BATCH: Duration = Duration::from_millis(10);

/// A drain that found this many records does not wait [`RING_BATCH`]: the ring buffer is filling fast.
const RING_BUSY: usize = 4096;

/// The probe source: a task that drains the ring buffers as they fill, samples the counters every `interval` (and at
/// once on [`Control::request_sample`]), applies the port requests of `ports` (`--bridge`) as they come, and on stop
/// does a last drain and sample and detaches. Port requests take a blocking thread for their kernel work (a TC
/// link takes milliseconds), and the task goes on draining the ring buffers meanwhile.
pub fn spawn_collector(
    sources: &mut Sources,
    probes: Probes,
    decoder: Decoder,
    interval: Duration,
    ports: Option<PortHandler>,
) -> Collector {
    let (work_tx, work_rx) = tokio::sync::mpsc::unbounded_channel();
    let task = sources.spawn_joined(collect(
        Probed {
            rings: probes.rings(),
            probes: Some(probes),
            decoder,
            ports,
        },
        sources.sender(),
        sources.control(),
        interval,
        work_rx,
    ));
    Collector {
        task,
        probes: ProbeAccess(work_tx),
    }
}

/// What the collector owns: the probes (away on a blocking thread while port requests are applied), their ring
/// buffers (which stay), the decoder that names their ports, and the port requests' handler (away with the probes).
struct Probed {
    probes: Option<Probes>,
    rings: Rings,
    decoder: Decoder,
    ports: Option<PortHandler>,
}

/// What a blocking thread that applied port requests hands back.
struct Applying {
    probes: Probes,
    handler: PortHandler,
    applied: Option<Applied>,
    /// The names given ahead of the attaches ([`PortHandler::name_ahead`]).
    ahead: Vec<(u32, u32)>,
}

impl Probed {
    /// Decodes every pending ring buffer record into `tx` (and, with the probes here, the programs' log lines);
    /// returns how many there were.
    fn drain(&mut self, tx: &Sender<Event>) -> usize {
        if let Some(probes) = &mut self.probes {
            drain(probes, &mut self.decoder, tx)
        } else {
            let decoder = &mut self.decoder;
            self.rings.drain(|r| decoded(&r, decoder, tx))
        }
    }

    /// Starts applying the waiting port requests on a blocking thread, the probes and the handler with them; `None`
    /// when there is nothing to do (or the probes are away already).
    fn start_port_requests(&mut self, tx: &Sender<Event>) -> Option<tokio::task::JoinHandle<Applying>> {
        let handler = self.ports.as_mut()?;
        let requests = handler.take();
        if requests.is_empty() {
            return None;
        }
        let probes = self.probes.take()?;
        let mut handler = self.ports.take()?;
        let ahead = PortHandler::name_ahead(&requests, &probes, &mut self.decoder);
        let tx = tx.clone();
        Some(tokio::task::spawn_blocking(move || {
            let mut probes = probes;
            // A panic in the kernel work loses that batch, never the probes.
            let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                handler.apply(requests, &mut probes, &tx)
            }))
            .ok();
            Applying {
                probes,
                handler,
                applied,
                ahead,
            }
        }))
    }

    /// The ring buffers of the probes there are now: drained through `self.rings`, waited on through the result.
    fn refresh_rings(&mut self, tx: &Sender<Event>) -> Option<Vec<AsyncFd<OwnedFd>>> {
        let probes = self.probes.as_ref()?;
        self.rings = probes.rings();
        watched_rings(probes, tx)
    }

    /// Takes the probes and the handler back from a blocking thread; returns whether ports were attached.
    fn finish_port_requests(&mut self, done: Applying, tx: &Sender<Event>) -> bool {
        self.probes = Some(done.probes);
        self.ports = Some(done.handler);
        let applied = done.applied.unwrap_or_else(|| {
            note(
                tx,
                "warning",
                "applying port requests failed (a panic); the ports they named may be unwatched".to_owned(),
            );
            Applied::default()
        });
        applied.settle(done.ahead, &mut self.decoder)
    }
}

/// Completes when `fd` is readable, clearing the readiness first (never, without an fd).
async fn readable(fd: Option<&AsyncFd<OwnedFd>>) -> std::io::Result<()> {
    match fd {
        Some(fd) => {
            fd.readable().await?.clear_ready();
            Ok(())
        }
        None => std::future::pending().await,
    }
}

/// Completes when the blocking thread applying port requests ends (never, when none runs); `None`, with a warning,
/// when the thread failed and the probes are lost with it.
async fn applied(
    job: &mut Option<tokio::task::JoinHandle<Applying>>,
    tx: &Sender<Event>,
) -> Option<Applying> {
    let done = match job {
        Some(j) => j.await,
        None => std::future::pending().await,
    };
    done.map_err(|e| {
        note(
            tx,
            "warning",
            format!("the port requests' thread failed ({e}): the probes are lost; stopping"),
        );
    })
    .ok()
}

/// Registers a duplicate of `fd` with the reactor, for readability.
fn watch_fd(fd: BorrowedFd<'_>) -> std::io::Result<AsyncFd<OwnedFd>> {
    let dup = fd.try_clone_to_owned()?;
    // SAFETY: the AsyncFd owns `dup`, so the fd stays open and the same for the registration's lifetime.
    unsafe { AsyncFd::register_with_interest(dup, Interest::READABLE) }.map_err(std::io::Error::from)
}

async fn collect(
    mut p: Probed,
    tx: Sender<Event>,
    control: Control,
    interval: Duration,
    mut work: tokio::sync::mpsc::UnboundedReceiver<ProbeWork>,
) {
    let mut prev = Samples::default();
    let mut every = tokio::time::interval(interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let Some(probes) = &p.probes else { return };
    let mut rings = watched_rings(probes, &tx);
    let mut fallback = tokio::time::interval(RING_POLL_FALLBACK);
    let port_wake = p.ports.as_ref().and_then(|h| match watch_fd(h.wake_fd()) {
        Ok(fd) => Some(fd),
        Err(e) => {
            note(
                &tx,
                "warning",
                format!("cannot wait for port requests ({e}); they are applied at each sample"),
            );
            None
        }
    });
    // Port requests being applied on a blocking thread; the probes are there meanwhile.
    let mut applying = None;
    // Set after a drain: the ring buffers are waited on again once it has elapsed (see [`RING_BATCH`]).
    let batch = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(batch);
    let mut batching = false;
    loop {
        let here = p.probes.is_some();
        tokio::select! {
            biased;
            () = control.stopping() => break,
            () = &mut batch, if batching => batching = false,
            ready = rings_readable(rings.as_deref().unwrap_or_default()), if rings.is_some() && !batching => {
                if let Err(e) = ready {
                    note(&tx, "warning", format!("cannot wait for the ring buffers ({e}); polling them every {} ms", RING_POLL_FALLBACK.as_millis()));
                    rings = None;
                }
                if p.drain(&tx) < RING_BUSY {
                    batch.as_mut().reset(tokio::time::Instant::now() + RING_BATCH);
                    batching = true;
                }
            }
            _ = fallback.tick(), if rings.is_none() => {
                p.drain(&tx);
            }
            done = applied(&mut applying, &tx), if applying.is_some() => {
                applying = None;
                // Without its probes the watch cannot go on.
                let Some(done) = done else { control.stop(); break };
                if p.finish_port_requests(done, &tx) {
                    rings = p.refresh_rings(&tx);
                }
            }
            _ = readable(port_wake.as_ref()), if port_wake.is_some() && here => {
                // Ports that came and went, MACs learned: the kernel work on a blocking thread, the ring buffers
                // drained here meanwhile (a port's first records are named, see `PortHandler::name_ahead`).
                p.drain(&tx);
                applying = p.start_port_requests(&tx);
            }
            () = control.sample_requested(), if here => {
                p.drain(&tx);
                if let Some(probes) = &p.probes {
                    sample(probes, &p.decoder, &mut prev, &tx);
                }
                every.reset();
            }
            _ = every.tick(), if here => {
                p.drain(&tx);
                if port_wake.is_none()
                    && let (Some(h), Some(probes)) = (&mut p.ports, &mut p.probes)
                    && h.handle(probes, &mut p.decoder, &tx)
                {
                    rings = p.refresh_rings(&tx);
                }
                if let Some(probes) = &p.probes {
                    sample(probes, &p.decoder, &mut prev, &tx);
                }
            }
            Some(job) = work.recv(), if here => {
                p.drain(&tx);
                if let Some(probes) = &mut p.probes {
                    // The job may add or remove ring buffers: watch what is there after.
                    job(probes, &mut p.decoder);
                    rings = p.refresh_rings(&tx);
                }
            }
        }
    }
    if let Some(job) = applying.take()
        && let Ok(done) = job.await
    {
        p.finish_port_requests(done, &tx);
    }
    p.drain(&tx);
    let Some(probes) = &p.probes else { return };
    // The last sample counts the flow tables whatever the pace.
    prev.flows_walked = None;
    sample(probes, &p.decoder, &mut prev, &tx);
    // Records submitted while sampling.
    p.drain(&tx);
}

/// The ring buffers registered with the reactor, or `None` (with a warning) when they cannot be.
fn watched_rings(probes: &Probes, tx: &Sender<Event>) -> Option<Vec<AsyncFd<OwnedFd>>> {
    match watch_rings(probes) {
        Ok(r) => Some(r),
        Err(e) => {
            note(
                tx,
                "warning",
                format!(
                    "cannot watch the ring buffers ({e}); polling them every {} ms",
                    RING_POLL_FALLBACK.as_millis()
                ),
            );
            None
        }
    }
}

/// Turns SIGINT and SIGTERM into [`Control::stop`], on the runtime. A second signal exits at once.
pub fn stop_on_signals(sources: &mut Sources) -> Result<()> {
    let (mut int, mut term) = {
        let _rt = sources.handle().enter();
        (
            signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
        )
    };
    let control = sources.control();
    sources.spawn("signals", async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        control.stop();
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        eprintln!("migmon: interrupted twice, exiting without cleanup");
        std::process::exit(130);
    });
    Ok(())
}

/// Whether the watch list grows while running: with `--bridge` or `--libvirt`.
fn learns_macs(args: &WatchArgs) -> bool {
    !args.bridge.is_empty() || !args.live.libvirt.is_empty()
}

/// The probe options `args` ask for.
pub fn probe_options(args: &WatchArgs) -> Result<ProbeOptions> {
    let mut watch = WatchList {
        ports: args.port.clone(),
        ..WatchList::default()
    };
    for vm in &args.vm {
        parse_vm(vm, &mut watch)?;
    }
    let flows = if args.tcp == TcpSource::Sockets {
        None
    } else {
        // VMs given without an IP are followed by their MAC.
        let mut macs = Vec::new();
        for vm in &args.vm {
            if !vm.contains('=')
                && let Ok(m) = vm.parse::<MacAddr>()
            {
                macs.push(m.octets());
            }
        }
        if watch.ips.is_empty() && macs.is_empty() && !learns_macs(args) {
            if args.tcp == TcpSource::Wire {
                bail!(
                    "--tcp wire needs a VM to follow: add --vm MAC=IP (or --vm MAC), or --bridge BR[@NETNS]"
                );
            }
            None
        } else {
            if args.iface.is_empty() && args.bridge.is_empty() && args.tcp == TcpSource::Wire {
                bail!("--tcp wire needs the VM's ports: add --iface IF[@NETNS] (its tap, or an uplink)");
            }
            Some(FlowOptions {
                ips: watch.ips.clone(),
                macs,
                ports: watch.ports.clone(),
                table_entries: args.flow_table,
                quiet_ns: args.flow_quiet.as_nanos() as u64,
                captures_per_sec: args.flow_captures,
                ..FlowOptions::default()
            })
        }
    };
    let mut opts = ProbeOptions {
        watch,
        mac_gap_ns: args.mac_gap.as_nanos() as u64,
        xdp_skb_mode: args.xdp_skb,
        l2_tc_ingress: args.tc_ingress,
        socket_tracepoints: args.tcp != TcpSource::Wire,
        flows,
        // MACs learned while running (bridge FDBs, setup events, libvirt domains that start later) need the
        // watch list open to additions.
        learn_macs: learns_macs(args),
        ebpf_log: args.ebpf_log,
        ..ProbeOptions::default()
    };
    if let Some(bytes) = args.ringbuf_bytes {
        if bytes < 4096 || !bytes.is_power_of_two() {
            bail!("--ringbuf-bytes must be a power of two of at least 4096");
        }
        opts.ringbuf_bytes = bytes;
    }
    Ok(opts)
}

/// The ingress hook `args` ask for.
fn ingress_mode(args: &WatchArgs) -> IngressMode {
    if args.xdp {
        IngressMode::Xdp
    } else if args.xdp_skb {
        IngressMode::XdpSkb
    } else if args.tc_ingress {
        IngressMode::Tc
    } else {
        IngressMode::Auto
    }
}

/// Loads the probes and attaches them to the interfaces `args` name. Notes (fallbacks) go to `tx`.
pub fn attach(args: &WatchArgs, tx: &Sender<Event>) -> Result<(Probes, Decoder)> {
    let opts = probe_options(args)?;
    let ifaces = args
        .iface
        .iter()
        .map(|s| parse_iface(s))
        .collect::<Result<Vec<_>>>()?;
    let egress = args
        .egress
        .iter()
        .map(|s| parse_iface(s))
        .collect::<Result<Vec<_>>>()?;
    let mut probes = Probes::load(&opts).context("cannot start the kernel probes")?;
    let mode = ingress_mode(args);
    let mut egress = egress;
    for iface in &ifaces {
        let a = probes
            .attach_ingress(iface, mode)
            .with_context(|| format!("cannot watch frames arriving on {iface}"))?;
        // The flow tracker needs both directions of the port.
        if opts.flows.is_some() && !egress.contains(iface) {
            egress.push(iface.clone());
        }
        if let Some(why) = a.fallback {
            let msg =
                format!("XDP driver mode is not available on {iface} ({why}); using skb (generic) mode");
            eprintln!("migmon: warning: {msg}");
            note(tx, "warning", msg);
        }
    }
    for iface in &egress {
        probes
            .attach_tc_egress(iface)
            .with_context(|| format!("cannot watch frames leaving through {iface}"))?;
    }
    let mut decoder = Decoder::new(probes.hz());
    decoder.ports.clone_from(probes.ports());
    for iface in ifaces.iter().chain(&egress) {
        if let Some(ns) = &iface.netns
            && let Some(((id, _), _)) = probes
                .ports()
                .iter()
                .find(|(_, p)| p.netns.as_deref() == Some(ns))
        {
            decoder.netns_of_instance.insert(*id, ns.clone());
        }
    }
    Ok((probes, decoder))
}

/// Runs `migmon watch`; returns the process exit code.
///
/// The sources run as tasks on one tokio runtime ([`Sources`]); this thread is the consumer that prints and records
/// every event in the order it arrived.
pub fn run(args: &WatchArgs) -> Result<i32> {
    let mut pipeline = Pipeline::new();
    let mut sources = Sources::new(&pipeline)?;
    stop_on_signals(&mut sources)?;

    let record = args
        .record
        .as_ref()
        .map(|p| TraceWriter::create(p, &trace_header(args.live.host_name.as_deref())))
        .transpose()
        .context("cannot create the --record trace")?;
    let tx = pipeline.sender();
    // The taps and MACs of the domains libvirt runs now are watched as if given on the command line.
    let mut args = args.clone();
    for w in crate::pause::libvirt::add_running(&args.live.libvirt, &mut args.iface, &mut args.vm) {
        eprintln!("migmon: warning: {w}");
    }
    let args = &args;
    let (mut probes, mut decoder) = attach(args, &tx)?;
    let ports = crate::ports::start(
        &args.bridge,
        !args.live.libvirt.is_empty(),
        ingress_mode(args),
        &mut probes,
        &mut decoder,
        &tx,
        &mut sources,
    )?;
    let mut observers: Vec<Observer> = Vec::new();
    let port_control = ports.as_ref().map(PortHandler::control);
    if let Some(c) = &port_control {
        observers.push(crate::ports::mac_observer(c.clone()));
    }
    if record.is_some() || args.live.record_dir.is_some() {
        sources.spawn("clocks", crate::clocks::sample_clocks(tx.clone()));
    }
    let collector = spawn_collector(&mut sources, probes, decoder, args.sample_interval, ports);

    // Other sources of events (migrator event socket, QMP, libvirt, ...) are tasks on `sources`; observers (limits,
    // metrics) go in `observers`.
    let live = crate::live::start(&args.live, &mut sources, &mut observers, port_control)?;
    pipeline.keep_with(live.keeper());

    let mut out = Output::new(args.json, record);
    eprintln!("migmon: watching {}; Ctrl-C to stop", describe(args));
    let deadline = args.duration.map(|d| Instant::now() + d);
    let (summary, code) = pipeline.consume(&mut out, deadline, &mut observers, Some(collector.task))?;
    out.finish_record()?;
    eprintln!("migmon: {summary}");
    let code = live.finish(code);
    sources.shutdown();
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_samples_report_changes_and_forget_keys_gone_from_the_map() {
        let mut prev = HashMap::new();
        let mut got = changed(&mut prev, [(1, 10u64), (2, 20)].into_iter());
        got.sort_unstable();
        assert_eq!(got, vec![(1, 10), (2, 20)]);
        // Port 2 moved on, port 1 did not, port 3 is new.
        let mut got = changed(&mut prev, [(1, 10), (2, 21), (3, 1)].into_iter());
        got.sort_unstable();
        assert_eq!(got, vec![(2, 21), (3, 1)]);
        // Port 1 is gone from the kernel's map: it leaves the cache, and comes back as new if it reappears.
        assert!(changed(&mut prev, [(2, 21), (3, 1)].into_iter()).is_empty());
        assert_eq!(prev.len(), 2);
        assert_eq!(
            changed(&mut prev, [(1, 10), (2, 21), (3, 1)].into_iter()),
            vec![(1, 10)]
        );
    }

    #[test]
    fn durations_need_their_unit() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            watch: WatchArgs,
        }
        let parse = |args: &[&str]| {
            <Cli as clap::Parser>::try_parse_from(std::iter::once("watch").chain(args.iter().copied()))
        };
        let ok = parse(&["--duration", "30s", "--settle", "30ms", "--mac-gap", "1.5s"]).unwrap();
        assert_eq!(ok.watch.duration, Some(Duration::from_secs(30)));
        assert_eq!(ok.watch.live.settle, 30_000_000);
        assert_eq!(ok.watch.mac_gap, Duration::from_millis(1500));
        // A bare number meant seconds for --duration and milliseconds for --settle: both are refused now, with a
        // message that names the units.
        for flag in ["--duration", "--settle", "--mac-gap", "--max-pause"] {
            let err = parse(&[flag, "30"]).err().unwrap().to_string();
            assert!(
                err.contains("needs a unit") && err.contains("ms"),
                "{flag}: {err}"
            );
        }
    }

    #[test]
    fn ifaces() {
        assert_eq!(
            parse_iface("veth0@ns1").unwrap(),
            Iface {
                name: "veth0".into(),
                netns: Some("ns1".into())
            }
        );
        assert_eq!(parse_iface("tap0").unwrap().netns, None);
        assert!(parse_iface("@ns").is_err());
        assert!(parse_iface("veth0@").is_err());
        assert!(parse_iface("averyveryverylongname").is_err());
    }

    #[test]
    fn the_flow_tracker_follows_the_port_filter() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            watch: WatchArgs,
        }
        let opts = |extra: &[&str]| {
            let args = [
                "watch",
                "--vm",
                "52:54:00:12:34:56=10.0.0.5",
                "--iface",
                "tap0",
                "--tcp",
                "wire",
            ];
            let cli = <Cli as clap::Parser>::try_parse_from(args.iter().chain(extra)).unwrap();
            probe_options(&cli.watch).unwrap().flows.unwrap()
        };
        assert!(opts(&[]).ports.is_empty());
        assert_eq!(opts(&["--port", "5001", "--port", "5002"]).ports, [5001, 5002]);
    }

    #[test]
    fn vms() {
        let mut w = WatchList::default();
        parse_vm("52:54:00:12:34:56=10.0.0.5", &mut w).unwrap();
        parse_vm("52:54:00:12:34:57", &mut w).unwrap();
        assert_eq!(w.macs.len(), 2);
        assert_eq!(w.ips, vec!["10.0.0.5".parse::<std::net::IpAddr>().unwrap()]);
        assert!(parse_vm("nonsense=1.2.3.4", &mut w).is_err());
        assert!(parse_vm("52:54:00:12:34:56=not-an-ip", &mut w).is_err());
    }
}
