//! `migmon watch`: attach the probes, stream events, record a trace.
//!
//! The core is a [`Pipeline`]: any thread may push [`Event`]s through a [`std::sync::mpsc::Sender`] from
//! [`Pipeline::sender`], and one consumer prints them (human or `--json`), appends them to the `--record` trace,
//! counts them for the summary and hands them to [`Observer`]s. The kernel probes are one source: a collector thread
//! drains the ring buffers and, every `--sample-interval` or at once when [`Control::request_sample`] is called,
//! samples the per-MAC counters (`mac_stats`), the malformed-frame counters (`malformed`) and the ring buffer
//! losses (`loss`). Other sources (a migrator's event socket, QMP, ...) push into the same sender.
//!
//! ```text
//!  ring buffers ─┐                       ┌─ stdout (human / --json)
//!  map samples ──┼─ Sender<Event> ──► consumer ──┼─ --record trace (flushed per line)
//!  other sources ┘                       └─ observers, summary
//! ```

use std::{
    collections::{BTreeMap, HashMap},
    io::{IsTerminal, Write},
    os::fd::{AsFd, BorrowedFd},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError},
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result, bail};
use monitor_common::{MacCounters, MacKey};
use nix::{
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sys::{
        eventfd::{EfdFlags, EventFd},
        signal::{SigSet, Signal},
    },
};

use crate::{
    events::{Decoder, mono_now_ns, parse_mac},
    netns,
    probes::{Iface, ProbeOptions, Probes, WatchList},
    trace::{Event, TRACE_VERSION, TraceHeader, TraceWriter},
};

/// Options of `migmon watch`. Flat, so other parts add their flags here.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct WatchArgs {
    /// Attach the XDP parser (ARP/RARP/GARP, frames from watched MACs) to this interface; `IF@NETNS` for an
    /// interface in a named network namespace. Repeatable.
    #[arg(long = "iface", value_name = "IF[@NETNS]")]
    pub iface: Vec<String>,
    /// Attach the XDP parser in generic (skb) mode instead of driver mode. On a veth, driver-mode XDP turns off
    /// the peer's segmentation offloads, so a TCP stream across the pair slows down several times; skb mode
    /// keeps them (measured: ~73 % slower in driver mode, ~13 % in skb mode; `./x bench --only probes`).
    #[arg(long)]
    pub xdp_skb: bool,
    /// Run the ingress parser of every --iface as a TC ingress classifier instead of XDP: no offloads lost and
    /// nothing copied, the cheapest on a busy veth. It sees frames after GRO (frame counters count aggregated
    /// packets) and after the kernel took an outer 802.1Q tag into the packet's metadata (such a tag is not
    /// reported).
    #[arg(long, conflicts_with = "xdp_skb")]
    pub tc_ingress: bool,
    /// Attach the TC egress counter (frames towards watched MACs) to this interface. Repeatable.
    #[arg(long = "egress", value_name = "IF[@NETNS]")]
    pub egress: Vec<String>,
    /// Watch a VM: its MAC (L2 counters, first-seen, FDB moves) and optionally its IP (TCP filter). Repeatable.
    #[arg(long = "vm", value_name = "MAC[=IP]")]
    pub vm: Vec<String>,
    /// Report only TCP connections with this local or remote port (with --vm IPs: either matches). Repeatable.
    #[arg(long = "port", value_name = "N")]
    pub port: Vec<u16>,
    /// One JSON object per line (see docs/events.md) instead of human lines.
    #[arg(long)]
    pub json: bool,
    /// Also write every event to this trace file (for `migmon report`/`export`), flushed line by line.
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
    /// Pause-window sources, metrics and the CI gate (the correlation work).
    #[command(flatten)]
    pub live: crate::live::LiveArgs,
}

/// Parses `1.5s`, `500ms`, `100us`, `2m`, `1h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (examples: 30s, 500ms, 2m)"))?;
    let scale = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "ns" => 1e-9,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "unknown duration unit `{other}` (use ns, us, ms, s, m, h)"
            ));
        }
    };
    Duration::try_from_secs_f64(v * scale).map_err(|e| format!("`{s}`: {e}"))
}

/// Parses `IF` or `IF@NETNS`.
pub fn parse_iface(s: &str) -> Result<Iface> {
    let (name, netns) = match s.rsplit_once('@') {
        Some((n, ns)) => (n, Some(ns)),
        None => (s, None),
    };
    if name.is_empty() || name.len() >= 16 || netns.is_some_and(str::is_empty) {
        bail!("`{s}` is not an interface: use IF or IF@NETNS (interface names are 1 to 15 characters)");
    }
    Ok(Iface {
        name: name.to_owned(),
        netns: netns.map(str::to_owned),
    })
}

/// Parses `--vm MAC[=IP]` into the watch list.
pub fn parse_vm(s: &str, watch: &mut WatchList) -> Result<()> {
    let (mac, ip) = match s.split_once('=') {
        Some((m, ip)) => (m, Some(ip)),
        None => (s, None),
    };
    let mac =
        parse_mac(mac).with_context(|| format!("`{s}`: `{mac}` is not a MAC address (aa:bb:cc:dd:ee:ff)"))?;
    watch.macs.push(mac);
    if let Some(ip) = ip {
        watch.ips.push(
            ip.parse()
                .with_context(|| format!("`{s}`: `{ip}` is not an IP address"))?,
        );
    }
    Ok(())
}

/// Shared switches between the pipeline's threads.
#[derive(Clone)]
pub struct Control {
    stop: Arc<AtomicBool>,
    sample: Arc<AtomicBool>,
    wake: Arc<EventFd>,
}

impl Control {
    fn new() -> Result<Self> {
        Ok(Self {
            stop: Arc::new(AtomicBool::new(false)),
            sample: Arc::new(AtomicBool::new(false)),
            wake: Arc::new(
                EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
                    .context("cannot create an eventfd")?,
            ),
        })
    }

    /// Asks the probe collector to sample the MAC counters now (e.g. when a VM pause is announced).
    pub fn request_sample(&self) {
        self.sample.store(true, Ordering::SeqCst);
        let _ = self.wake.write(1);
    }

    /// Asks every part of the pipeline to finish.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.wake.write(1);
    }

    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn wake_fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }

    fn take_sample_request(&self) -> bool {
        let _ = self.wake.read();
        self.sample.swap(false, Ordering::SeqCst)
    }
}

/// What an observer wants after seeing an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Finish the watch with this exit code.
    Stop(i32),
}

/// Sees every event the consumer handles, after it was recorded and printed (on a terminal) or queued for the next
/// batched write (otherwise; see [`Output::flush`]).
pub type Observer = Box<dyn FnMut(&Event) -> Flow + Send>;

/// The event pipeline: many senders, one consumer.
pub struct Pipeline {
    tx: Sender<Event>,
    rx: Receiver<Event>,
    control: Control,
}

/// Counts per kind and losses, printed at the end.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub counts: BTreeMap<&'static str, u64>,
    pub lost: u64,
    pub elapsed: Duration,
}

impl Summary {
    fn add(&mut self, ev: &Event) {
        *self.counts.entry(ev.kind()).or_default() += 1;
        if let Event::Loss { count, .. } = ev {
            self.lost += count;
        }
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let total: u64 = self.counts.values().sum();
        write!(f, "{total} events in {:.1} s", self.elapsed.as_secs_f64())?;
        if !self.counts.is_empty() {
            let parts: Vec<String> = self.counts.iter().map(|(k, n)| format!("{k} {n}")).collect();
            write!(f, " ({})", parts.join(", "))?;
        }
        if self.lost == 0 {
            write!(f, "; no events lost")
        } else {
            write!(
                f,
                "; {} EVENTS LOST (ring buffer full: the figures may be incomplete)",
                self.lost
            )
        }
    }
}

impl Pipeline {
    pub fn new() -> Result<Self> {
        let (tx, rx) = mpsc::channel();
        Ok(Self {
            tx,
            rx,
            control: Control::new()?,
        })
    }

    /// A sender for another source of events.
    pub fn sender(&self) -> Sender<Event> {
        self.tx.clone()
    }

    /// Stop and sample switches.
    pub fn control(&self) -> Control {
        self.control.clone()
    }

    /// Consumes events until stopped (Ctrl-C, `deadline`, an observer, or [`Control::stop`]), then drains what is
    /// left once `until_done` (the probe collector) has finished. Returns the summary and the exit code.
    pub fn consume(
        self,
        out: &mut Output,
        deadline: Option<Instant>,
        observers: &mut [Observer],
        until_done: Option<JoinHandle<()>>,
    ) -> Result<(Summary, i32)> {
        let Pipeline { tx, rx, control } = self;
        drop(tx);
        let start = Instant::now();
        let mut summary = Summary::default();
        let mut code = 0;
        let mut handle = |ev: Event, out: &mut Output, summary: &mut Summary, code: &mut i32| -> Result<()> {
            out.emit(&ev)?;
            summary.add(&ev);
            for o in observers.iter_mut() {
                if let Flow::Stop(c) = o(&ev) {
                    *code = c;
                    control.stop();
                }
            }
            Ok(())
        };
        // Events handled since the deadline was last checked: reading the clock per event was a visible cost of
        // a storm.
        let mut unchecked = 0u32;
        loop {
            if control.stopped() {
                break;
            }
            if unchecked == 0 && deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            // Take what is queued without waiting; print it in one write once the queue is empty.
            match rx.try_recv() {
                Ok(ev) => {
                    handle(ev, out, &mut summary, &mut code)?;
                    unchecked = (unchecked + 1) % 256;
                    continue;
                }
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) => out.flush(),
            }
            unchecked = 0;
            let wait = deadline.map_or(Duration::from_millis(100), |d| {
                d.saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(100))
            });
            match rx.recv_timeout(wait) {
                Ok(ev) => handle(ev, out, &mut summary, &mut code)?,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        control.stop();
        let elapsed = start.elapsed();
        if let Some(h) = until_done {
            // The collector does a last drain and sample before it detaches; take those events too.
            while !h.is_finished() {
                out.flush();
                match rx.recv_timeout(Duration::from_millis(20)) {
                    Ok(ev) => handle(ev, out, &mut summary, &mut code)?,
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            let _ = h.join();
        }
        while let Ok(ev) = rx.try_recv() {
            handle(ev, out, &mut summary, &mut code)?;
        }
        out.flush();
        summary.elapsed = elapsed;
        Ok((summary, code))
    }
}

/// Where events go: stdout (human or JSON) and the optional trace.
pub struct Output {
    json: bool,
    color: bool,
    start_ns: u64,
    record: Option<TraceWriter>,
    netns_names: HashMap<u64, String>,
    /// When `netns_names` was read.
    names_read: Instant,
    /// Inode of the root namespace (not named in human lines).
    root_netns: Option<u64>,
    stdout: std::io::Stdout,
    /// Lines not yet written: [`Pipeline::consume`] writes them in one go whenever its queue runs empty
    /// ([`Output::flush`]), so a storm costs one `write` per batch rather than one per event. On a terminal
    /// every line is written at once, so it keeps its place among stderr lines (live verdicts).
    pending: Vec<u8>,
    tty: bool,
}

/// [`Output`] writes what it holds once it reaches this many bytes, even while events keep coming.
const OUTPUT_BATCH_BYTES: usize = 64 * 1024;

impl Output {
    pub fn new(json: bool, record: Option<TraceWriter>) -> Self {
        let stdout = std::io::stdout();
        Self {
            json,
            color: !json && stdout.is_terminal(),
            tty: stdout.is_terminal(),
            start_ns: mono_now_ns(),
            record,
            netns_names: netns::names_by_inode(),
            names_read: Instant::now(),
            root_netns: std::fs::metadata("/proc/1/ns/net")
                .ok()
                .map(|m| std::os::unix::fs::MetadataExt::ino(&m)),
            stdout,
            pending: Vec::with_capacity(OUTPUT_BATCH_BYTES + 4096),
        }
    }

    /// Prints and records one event.
    pub fn emit(&mut self, ev: &Event) -> Result<()> {
        if let Some(w) = &mut self.record {
            w.write(ev)
                .context("cannot append to the --record trace (disk full?)")?;
        }
        if self.json {
            serde_json::to_writer(&mut self.pending, ev).context("cannot serialise an event")?;
        } else {
            let line = self.human(ev);
            self.pending.extend_from_slice(line.as_bytes());
        }
        self.pending.push(b'\n');
        if self.tty || self.pending.len() >= OUTPUT_BATCH_BYTES {
            self.flush();
        }
        Ok(())
    }

    /// Writes the lines [`Output::emit`] holds to stdout. A closed stdout (e.g. `| head`) must not stop
    /// recording, so write errors are dropped.
    pub fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut out = self.stdout.lock();
        let _ = out.write_all(&self.pending);
        let _ = out.flush();
        self.pending.clear();
    }

    fn netns_name(&mut self, inode: u64) -> String {
        if inode == 0 || Some(inode) == self.root_netns {
            return String::new();
        }
        // Re-read /run/netns for a new namespace, at most once a second (some never get a name there).
        if !self.netns_names.contains_key(&inode) && self.names_read.elapsed() > Duration::from_secs(1) {
            self.netns_names = netns::names_by_inode();
            self.names_read = Instant::now();
        }
        self.netns_names
            .get(&inode)
            .map_or_else(|| format!("netns:{inode}"), |n| format!("netns:{n}"))
    }

    fn human(&mut self, ev: &Event) -> String {
        let rel = i128::from(ev.ts_ns()) - i128::from(self.start_ns);
        let time = format!("{:+12.6}", rel as f64 / 1e9);
        let kind = ev.kind();
        let colour = match ev {
            Event::TcpError { .. }
            | Event::TcpResetIn { .. }
            | Event::TcpResetOut { .. }
            | Event::Loss { .. }
            | Event::FlowReset { .. }
            | Event::FlowZeroWindow { .. } => "31",
            Event::TcpRetransmit { .. } | Event::Malformed { .. } | Event::FlowRetransmit { .. } => "33",
            Event::TcpState { .. }
            | Event::FlowProgress { .. }
            | Event::FlowOpen { .. }
            | Event::FlowFin { .. } => "32",
            Event::Arp { .. } | Event::Garp { .. } | Event::Rarp { .. } | Event::MacSeen { .. } => "36",
            Event::FdbUpdate { .. } => "35",
            _ => "2",
        };
        let kind_col = if self.color {
            format!("\x1b[{colour}m{kind:<14}\x1b[0m")
        } else {
            format!("{kind:<14}")
        };
        let detail = self.detail(ev);
        format!("{time}  {kind_col}  {detail}")
    }

    fn detail(&mut self, ev: &Event) -> String {
        let port = |p: &crate::trace::Port| {
            let name = p.iface.clone().unwrap_or_else(|| format!("if{}", p.ifindex));
            match &p.netns {
                Some(ns) => format!("{name}@{ns}"),
                None => name,
            }
        };
        match ev {
            Event::TcpRetransmit {
                tcp,
                state,
                retransmits,
                backoff,
                rto_us,
                srtt_us,
                ..
            } => format!(
                "{:<44} {state:<12} retransmits={retransmits} backoff={backoff} rto={}ms srtt={:.1}ms {}",
                tuple(&tcp.tuple),
                rto_us / 1000,
                *srtt_us as f64 / 1000.0,
                self.netns_name(tcp.netns)
            ),
            Event::TcpState {
                tcp,
                old_state,
                new_state,
                ..
            } => format!(
                "{:<44} {old_state} -> {new_state} {}",
                tuple(&tcp.tuple),
                self.netns_name(tcp.netns)
            ),
            Event::TcpError {
                tcp, errno, state, ..
            } => format!(
                "{:<44} errno={errno} ({}) {state} {}",
                tuple(&tcp.tuple),
                errno_name(*errno),
                self.netns_name(tcp.netns)
            ),
            Event::TcpResetIn { tcp, state, .. } | Event::TcpResetOut { tcp, state, .. } => {
                format!("{:<44} {state} {}", tuple(&tcp.tuple), self.netns_name(tcp.netns))
            }
            Event::Arp { frame, .. } | Event::Garp { frame, .. } | Event::Rarp { frame, .. } => {
                let vlan = if frame.vlan.is_empty() {
                    String::new()
                } else {
                    format!(
                        " vlan={}",
                        frame
                            .vlan
                            .iter()
                            .map(u16::to_string)
                            .collect::<Vec<_>>()
                            .join(".")
                    )
                };
                format!(
                    "{:<20} {} op={} {} ({}) -> {} ({}){vlan} len={}",
                    port(&frame.port),
                    frame.mac,
                    frame.op,
                    frame.spa,
                    frame.sha,
                    frame.tpa,
                    frame.tha,
                    frame.len
                )
            }
            Event::FdbUpdate {
                bridge,
                port,
                mac,
                vlan,
                ..
            } => format!("{bridge:<20} {mac} now on port {port} vlan={vlan}"),
            Event::MacSeen {
                mac,
                port: p,
                direction,
                gap_ns,
                ..
            } => {
                let when = if *gap_ns == 0 {
                    "first time".to_owned()
                } else {
                    format!("after {:.1} ms of silence", *gap_ns as f64 / 1e6)
                };
                format!("{:<20} {mac} {} {when}", port(p), dir_name(*direction))
            }
            Event::MacStats {
                mac,
                port: p,
                direction,
                frames,
                bytes,
                first_ns,
                last_ns,
                ..
            } => format!(
                "{:<20} {mac} {} frames={frames} bytes={bytes} last={:+.6}s span={:.3}s",
                port(p),
                dir_name(*direction),
                (i128::from(*last_ns) - i128::from(self.start_ns)) as f64 / 1e9,
                last_ns.saturating_sub(*first_ns) as f64 / 1e9
            ),
            Event::Loss { cpu, count, .. } => format!("cpu {cpu}: {count} events lost (ring buffer full)"),
            Event::Malformed { port: p, count, .. } => {
                format!("{:<20} {count} frames passed unread (truncated or odd)", port(p))
            }
            Event::Note { level, message, .. } => format!("{level}: {message}"),
            Event::Migration { .. } | Event::ClockOffset { .. } => crate::live::describe(ev),
            Event::FlowOpen { seg, .. }
            | Event::FlowRetransmit { seg, .. }
            | Event::FlowReset { seg, .. }
            | Event::FlowFin { seg, .. }
            | Event::FlowZeroWindow { seg, .. }
            | Event::FlowProgress { seg, .. } => {
                let (from, to) = match seg.side {
                    crate::trace::FlowSide::Vm => {
                        ((seg.vm_addr, seg.vm_port), (seg.peer_addr, seg.peer_port))
                    }
                    crate::trace::FlowSide::Peer => {
                        ((seg.peer_addr, seg.peer_port), (seg.vm_addr, seg.vm_port))
                    }
                };
                let gap = match ev {
                    Event::FlowRetransmit { .. } => format!(
                        " retransmits={} gap={:.1}ms silence={:.1}ms",
                        seg.retransmits,
                        seg.gap_ns as f64 / 1e6,
                        seg.silence_ns as f64 / 1e6
                    ),
                    Event::FlowProgress { .. } => format!(" after {:.1}ms quiet", seg.gap_ns as f64 / 1e6),
                    _ => String::new(),
                };
                format!(
                    "{:<20} {} {} -> {} [{}] seq={} ack={} len={} win={}{gap}",
                    port(&seg.port),
                    match seg.side {
                        crate::trace::FlowSide::Vm => "vm  ",
                        crate::trace::FlowSide::Peer => "peer",
                    },
                    endpoint(from),
                    endpoint(to),
                    tcp_flag_names(seg.tcp_flags),
                    seg.seq,
                    seg.ack,
                    seg.len,
                    seg.window
                )
            }
            Event::FlowTable {
                inserts,
                entries,
                evictions,
                insert_failed,
                capture_dropped,
                ..
            } => format!(
                "flows: {entries} tracked, {inserts} picked up, {evictions} evicted, {insert_failed} not inserted, \
                 {capture_dropped} records without frame bytes"
            ),
        }
    }
}

/// `1.2.3.4:80` or `[::1]:80`.
fn endpoint((ip, port): (std::net::IpAddr, u16)) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

/// `S.`-style TCP flags, as tcpdump writes them.
fn tcp_flag_names(flags: u8) -> String {
    let mut s = String::new();
    for (bit, c) in [(0x02, 'S'), (0x01, 'F'), (0x04, 'R'), (0x08, 'P'), (0x10, '.')] {
        if flags & bit != 0 {
            s.push(c);
        }
    }
    if s.is_empty() {
        s.push_str("none");
    }
    s
}

fn dir_name(d: crate::trace::Direction) -> &'static str {
    match d {
        crate::trace::Direction::Ingress => "ingress",
        crate::trace::Direction::Egress => "egress",
    }
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
    parts.extend(args.egress.iter().map(|i| format!("tc:{i}")));
    parts.extend(
        args.vm
            .iter()
            .map(|v| format!("vm {}", v.split('=').next().unwrap_or(v))),
    );
    parts.join(" ")
}

impl Drop for Output {
    fn drop(&mut self) {
        self.flush();
    }
}

fn tuple(t: &crate::trace::FourTuple) -> String {
    let ep = |ip: std::net::IpAddr, port: u16| match ip {
        std::net::IpAddr::V4(a) => format!("{a}:{port}"),
        std::net::IpAddr::V6(a) => format!("[{a}]:{port}"),
    };
    format!("{} -> {}", ep(t.saddr, t.sport), ep(t.daddr, t.dport))
}

fn errno_name(errno: i32) -> &'static str {
    match errno {
        110 => "ETIMEDOUT",
        104 => "ECONNRESET",
        111 => "ECONNREFUSED",
        32 => "EPIPE",
        113 => "EHOSTUNREACH",
        101 => "ENETUNREACH",
        _ => "?",
    }
}

/// Previous samples, to emit only what changed.
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

fn sample(probes: &Probes, decoder: &Decoder, prev: &mut Samples, tx: &Sender<Event>) {
    let ts_ns = mono_now_ns();
    match probes.mac_counters() {
        Ok(entries) => {
            for (id, key, c) in entries {
                if prev.mac.get(&(id, key)) != Some(&c) {
                    prev.mac.insert((id, key), c);
                    let _ = tx.send(decoder.mac_stats(ts_ns, id, &key, &c));
                }
            }
        }
        Err(e) => note(tx, "warning", format!("cannot read the MAC counters: {e}")),
    }
    match probes.malformed() {
        Ok(entries) => {
            for (id, ifindex, count) in entries {
                if prev.malformed.get(&(id, ifindex)) != Some(&count) {
                    prev.malformed.insert((id, ifindex), count);
                    let _ = tx.send(Event::Malformed {
                        ts_ns,
                        port: decoder.port(id, ifindex),
                        count,
                    });
                }
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
    if (cheap.inserts, cheap.insert_failed, cheap.capture_dropped)
        == (p.inserts, p.insert_failed, p.capture_dropped)
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
    });
}

fn note(tx: &Sender<Event>, level: &str, message: String) {
    let _ = tx.send(Event::Note {
        ts_ns: mono_now_ns(),
        level: level.to_owned(),
        message,
    });
}

/// Decodes every pending ring buffer record into `tx`.
fn drain(probes: &mut Probes, decoder: &mut Decoder, tx: &Sender<Event>) {
    probes.drain(|r| match r {
        Ok(w) => {
            let _ = tx.send(decoder.event(&w));
        }
        Err(e) => note(tx, "warning", format!("skipped a kernel record: {e}")),
    });
}

/// The probe source: drains the ring buffers as they fill, samples the counters, and detaches on stop.
pub fn spawn_collector(
    mut probes: Probes,
    mut decoder: Decoder,
    tx: Sender<Event>,
    control: Control,
    interval: Duration,
) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("migmon-probes".into())
        .spawn(move || {
            let mut prev = Samples::default();
            let mut next = Instant::now() + interval;
            let ring_fds = probes.ring_fds();
            loop {
                let stopping = control.stopped();
                drain(&mut probes, &mut decoder, &tx);
                let asked = control.take_sample_request();
                if asked || stopping || Instant::now() >= next {
                    if stopping {
                        // The last sample counts the flow tables whatever the pace.
                        prev.flows_walked = None;
                    }
                    sample(&probes, &decoder, &mut prev, &tx);
                    next = Instant::now() + interval;
                }
                if stopping {
                    // Records submitted while sampling.
                    drain(&mut probes, &mut decoder, &tx);
                    break;
                }
                let timeout = next.saturating_duration_since(Instant::now());
                let timeout =
                    PollTimeout::try_from(timeout.as_millis().min(1000) as u32).unwrap_or(PollTimeout::NONE);
                // SAFETY: the ring buffer fds belong to `probes`, which outlives this poll.
                let rings: Vec<BorrowedFd<'_>> = ring_fds
                    .iter()
                    .map(|&fd| unsafe { BorrowedFd::borrow_raw(fd) })
                    .collect();
                let mut fds: Vec<PollFd<'_>> = rings
                    .iter()
                    .map(|fd| PollFd::new(*fd, PollFlags::POLLIN))
                    .collect();
                fds.push(PollFd::new(control.wake_fd(), PollFlags::POLLIN));
                let _ = poll(&mut fds, timeout);
            }
            drop(probes);
        })
        .context("cannot start the probe thread")
}

/// Blocks SIGINT/SIGTERM in this thread (and the threads it starts) and turns them into [`Control::stop`] on a
/// dedicated thread. A second signal exits at once.
pub fn stop_on_signals(control: &Control) -> Result<()> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block().context("cannot block SIGINT/SIGTERM")?;
    let control = control.clone();
    std::thread::Builder::new()
        .name("migmon-signals".into())
        .spawn(move || {
            if set.wait().is_ok() {
                control.stop();
            }
            if set.wait().is_ok() {
                eprintln!("migmon: interrupted twice, exiting without cleanup");
                std::process::exit(130);
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
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
    let mut opts = ProbeOptions {
        watch,
        mac_gap_ns: args.mac_gap.as_nanos() as u64,
        xdp_skb_mode: args.xdp_skb,
        l2_tc_ingress: args.tc_ingress,
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
    for iface in &ifaces {
        let a = probes
            .attach_xdp(iface)
            .with_context(|| format!("cannot watch frames arriving on {iface}"))?;
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

/// The header `--record` writes: now, this host, this command line.
pub fn trace_header() -> TraceHeader {
    let start_unix_ns = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    TraceHeader {
        kind: "trace_header".into(),
        version: TRACE_VERSION,
        migmon: env!("CARGO_PKG_VERSION").into(),
        start_mono_ns: mono_now_ns(),
        start_unix_ns,
        hostname: nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        command: std::env::args().collect(),
    }
}

/// Runs `migmon watch`; returns the process exit code.
pub fn run(args: &WatchArgs) -> Result<i32> {
    let pipeline = Pipeline::new()?;
    let control = pipeline.control();
    stop_on_signals(&control)?;

    let record = args
        .record
        .as_ref()
        .map(|p| TraceWriter::create(p, &trace_header()))
        .transpose()
        .context("cannot create the --record trace")?;
    let tx = pipeline.sender();
    let (probes, decoder) = attach(args, &tx)?;
    let collector = spawn_collector(probes, decoder, tx, control.clone(), args.sample_interval)?;

    // Other sources of events (migrator event socket, QMP, ...) start here, with `pipeline.sender()` and
    // `pipeline.control()`; observers (limits, metrics) go in `observers`.
    let mut observers: Vec<Observer> = Vec::new();
    let live = crate::live::start(&args.live, &pipeline.sender(), &control, &mut observers)?;

    let mut out = Output::new(args.json, record);
    eprintln!("migmon: watching {}; Ctrl-C to stop", describe(args));
    let deadline = args.duration.map(|d| Instant::now() + d);
    let (summary, code) = pipeline.consume(&mut out, deadline, &mut observers, Some(collector))?;
    eprintln!("migmon: {summary}");
    live.finish(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("3 parsecs").is_err());
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
    fn vms() {
        let mut w = WatchList::default();
        parse_vm("52:54:00:12:34:56=10.0.0.5", &mut w).unwrap();
        parse_vm("52:54:00:12:34:57", &mut w).unwrap();
        assert_eq!(w.macs.len(), 2);
        assert_eq!(w.ips, vec!["10.0.0.5".parse::<std::net::IpAddr>().unwrap()]);
        assert!(parse_vm("nonsense=1.2.3.4", &mut w).is_err());
        assert!(parse_vm("52:54:00:12:34:56=not-an-ip", &mut w).is_err());
    }

    #[test]
    fn pipeline_takes_events_from_any_thread() {
        let p = Pipeline::new().unwrap();
        let tx = p.sender();
        let control = p.control();
        let t = std::thread::spawn(move || {
            for i in 0..3 {
                tx.send(Event::Loss {
                    ts_ns: i,
                    cpu: 0,
                    count: 2,
                })
                .unwrap();
            }
        });
        t.join().unwrap();
        let mut seen = 0;
        let mut observers: Vec<Observer> = vec![Box::new(move |_ev: &Event| {
            seen += 1;
            if seen == 3 { Flow::Stop(7) } else { Flow::Continue }
        })];
        let mut out = Output::new(true, None);
        let (summary, code) = p
            .consume(
                &mut out,
                Some(Instant::now() + Duration::from_secs(5)),
                &mut observers,
                None,
            )
            .unwrap();
        assert_eq!(code, 7);
        assert_eq!(summary.counts.get("loss"), Some(&3));
        assert_eq!(summary.lost, 6);
        assert!(control.stopped());
    }
}
