//! The libvirt thread: connects to each daemon (again after it dies or restarts), runs libvirt's blocking event loop,
//! and hands the callbacks' records to the [`Translator`], looking up what they need (domain XML, job statistics)
//! outside the callbacks.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use migevents::monotonic_ns;
use migmon_analysis::trace::Event;
use migmon_base::mac::MacAddr;
use virt::{connect::Connect, domain::Domain};

use super::{
    LibvirtError, Netns, VmIface,
    domain::{self, DomainXml},
    ffi::{self, Queue, Raw, RawKind, Registrations},
    locate_tap,
    translate::{Lifecycle, Resumed, Translator},
};
use crate::pause::{Emit, SourceHandle, qmp, warn_note};

/// The event loop wakes at least this often (ms).
const TICK_MS: i32 = 100;
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How long `follow` waits for the first connection to every daemon before it returns (a daemon that is slower is
/// followed when it answers).
const FIRST_CONNECT: Duration = Duration::from_secs(10);
/// Keepalive: a daemon that answers none of 3 probes 2 s apart is gone.
const KEEPALIVE_INTERVAL: i32 = 2;
const KEEPALIVE_COUNT: u32 = 3;

/// One followed daemon.
struct Daemon {
    uri: String,
    /// Whether its QEMU timestamps are on this machine's clock (a local URI).
    local: bool,
    /// The daemon's network namespace (where its taps are), when known.
    netns: Option<Netns>,
    conn: Option<Connect>,
    regs: Registrations,
    /// Bumped at each connection, so records from an old one are dropped.
    generation: u64,
    /// `wall - monotonic` at the connection, for QEMU's timestamps.
    wall_minus_mono: i64,
    /// Connections made so far.
    connections: u64,
    /// An open in progress on a helper thread (`virConnectOpen` can block for a long time on a remote URI).
    opening: Option<mpsc::Receiver<Result<Connect, String>>>,
    next_try: Instant,
    backoff: Duration,
    /// The last failure warned about (a daemon that stays away costs one warning).
    unreachable: Option<String>,
}

/// A URI names this machine: no host part, or localhost.
fn is_local(uri: &str) -> bool {
    let Some((_, rest)) = uri.split_once("://") else {
        return true;
    };
    let host = rest.split(['/', '?']).next().unwrap_or("");
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    let host = host.split(':').next().unwrap_or("");
    matches!(host, "" | "localhost" | "127.0.0.1" | "[::1]")
}

struct Follower<E, I> {
    daemons: Vec<Daemon>,
    queue: Queue,
    tr: Translator,
    emit: E,
    ifaces: I,
    stop: Arc<AtomicBool>,
    /// Interfaces already reported, by (domain UUID, tap): reported again only when they change.
    known: HashMap<(String, String), VmIface>,
    /// Told once every daemon has had its first connection attempt.
    first_round: Option<mpsc::Sender<()>>,
}

/// Ended by a stop or a gone receiver.
struct Stopped;

impl<E: Emit, I: Fn(&VmIface) + Send + 'static> Follower<E, I> {
    fn send(&self, ev: Event) -> Result<(), Stopped> {
        if self.emit.emit(ev) { Ok(()) } else { Err(Stopped) }
    }

    fn note(&self, level: &str, message: String) -> Result<(), Stopped> {
        self.send(Event::Note {
            ts_ns: monotonic_ns(),
            level: level.to_owned(),
            message,
        })
    }

    fn run(mut self) {
        while !self.stop.load(Ordering::Relaxed) {
            if self.step().is_err() {
                break;
            }
        }
        for d in &mut self.daemons {
            if let Some(mut c) = d.conn.take() {
                ffi::deregister(&c, &mut d.regs);
                let _ = c.close();
            }
        }
    }

    fn step(&mut self) -> Result<(), Stopped> {
        for i in 0..self.daemons.len() {
            self.try_connect(i)?;
        }
        // Every daemon has had its first attempt: `follow` may return.
        if self
            .daemons
            .iter()
            .all(|d| d.conn.is_some() || d.unreachable.is_some())
            && let Some(tx) = self.first_round.take()
        {
            let _ = tx.send(());
        }
        if let Err(e) = ffi::run_once() {
            self.note("warning", format!("libvirt: the event loop failed: {e}"))?;
            thread::sleep(Duration::from_millis(TICK_MS as u64));
        }
        let raws = std::mem::take(&mut *self.queue.lock().unwrap_or_else(PoisonError::into_inner));
        for raw in raws {
            self.handle(raw)?;
        }
        Ok(())
    }

    /// Starts an open when one is due, or finishes one that completed.
    fn try_connect(&mut self, i: usize) -> Result<(), Stopped> {
        let d = &mut self.daemons[i];
        if d.conn.is_some() {
            return Ok(());
        }
        if d.opening.is_none() {
            if Instant::now() < d.next_try {
                return Ok(());
            }
            let (tx, rx) = mpsc::channel();
            let uri = d.uri.clone();
            let spawned = thread::Builder::new()
                .name("migmon-libvirt-open".into())
                .spawn(move || {
                    let _ = tx.send(Connect::open(Some(&uri)).map_err(|e| e.to_string()));
                });
            if spawned.is_ok() {
                d.opening = Some(rx);
            }
            return Ok(());
        }
        let result = match d.opening.as_ref().map(mpsc::Receiver::try_recv) {
            Some(Ok(r)) => r,
            Some(Err(mpsc::TryRecvError::Empty)) | None => return Ok(()),
            Some(Err(mpsc::TryRecvError::Disconnected)) => Err("the open thread ended".to_owned()),
        };
        d.opening = None;
        match result {
            Ok(conn) => self.connected(i, conn),
            Err(e) => self.unreachable(i, &e),
        }
    }

    fn unreachable(&mut self, i: usize, why: &str) -> Result<(), Stopped> {
        let d = &mut self.daemons[i];
        d.next_try = Instant::now() + d.backoff;
        d.backoff = (d.backoff * 2).min(MAX_BACKOFF);
        // The message without details that vary between attempts.
        let state = why.split('[').next().unwrap_or(why).trim().to_owned();
        if d.unreachable.as_deref() == Some(state.as_str()) {
            return Ok(());
        }
        d.unreachable = Some(state);
        let msg = format!(
            "{}; waiting for it (retrying every {} s at most)",
            LibvirtError::Connect {
                uri: d.uri.clone(),
                message: why.to_owned(),
            },
            MAX_BACKOFF.as_secs()
        );
        self.note("warning", msg)
    }

    fn connected(&mut self, i: usize, conn: Connect) -> Result<(), Stopped> {
        let d = &mut self.daemons[i];
        d.generation += 1;
        let generation = d.generation;
        let _ = conn.set_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT);
        let qemu_events = match ffi::register(&conn, i, generation, &self.queue, &mut d.regs) {
            Ok(q) => q,
            Err(e) => {
                ffi::deregister(&conn, &mut d.regs);
                let mut conn = conn;
                let _ = conn.close();
                return self.unreachable(i, &e.to_string());
            }
        };
        d.backoff = MIN_BACKOFF;
        d.unreachable = None;
        d.netns = super::daemon_netns(&d.uri);
        d.wall_minus_mono = qmp::measure_wall_minus_mono();
        d.connections += 1;
        let reconnect = d.connections > 1;
        let uri = d.uri.clone();
        let host = conn.get_hostname().unwrap_or_else(|_| uri.clone());
        let offset = d.wall_minus_mono;
        let timed_by_qemu = qemu_events && d.local;
        d.conn = Some(conn);
        if timed_by_qemu {
            self.send(Event::ClockOffset {
                ts_ns: monotonic_ns(),
                source: format!("libvirt:{uri}"),
                wall_minus_mono_ns: offset,
            })?;
        }
        self.tr.set_host(i, &host);
        let how = if timed_by_qemu {
            "pauses timed by QEMU's own STOP/RESUME"
        } else if qemu_events {
            "a remote daemon: pauses timed on arrival"
        } else {
            "no QEMU monitor events: pauses timed on arrival"
        };
        if reconnect {
            self.note(
                "info",
                format!(
                    "libvirt {uri}: connected again (reconnect {}; {how})",
                    self.daemons[i].connections - 1
                ),
            )?;
        } else {
            self.note("info", format!("libvirt {uri}: following host {host} ({how})"))?;
        }
        let running = self.discover(i)?;
        let ts = monotonic_ns();
        for ev in self.tr.reconnected(i, ts, &running) {
            self.send(ev)?;
        }
        Ok(())
    }

    /// Reads every running domain of daemon `i` (XML, interfaces, state); returns the UUIDs of those running.
    fn discover(&mut self, i: usize) -> Result<Vec<String>, Stopped> {
        let Some(conn) = self.daemons[i].conn.as_ref() else {
            return Ok(Vec::new());
        };
        let domains = match conn.list_all_domains(virt::sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE) {
            Ok(d) => d,
            Err(e) => {
                let uri = self.daemons[i].uri.clone();
                self.note("warning", format!("libvirt {uri}: cannot list the domains: {e}"))?;
                return Ok(Vec::new());
            }
        };
        let mut running = Vec::new();
        let mut paused = Vec::new();
        for dom in &domains {
            let Some(xml) = self.read_xml(i, dom)? else {
                continue;
            };
            match dom.get_state() {
                Ok((s, _)) if s == virt::sys::VIR_DOMAIN_RUNNING => running.push(xml.uuid.clone()),
                Ok((s, _)) if s == virt::sys::VIR_DOMAIN_PAUSED => paused.push(xml.name.clone()),
                _ => {}
            }
        }
        if !paused.is_empty() {
            let uri = self.daemons[i].uri.clone();
            self.note(
                "info",
                format!(
                    "libvirt {uri}: paused when followed (their pause began earlier; no window): {}",
                    paused.join(", ")
                ),
            )?;
        }
        Ok(running)
    }

    /// Reads a domain's XML, tells the translator, and reports its interfaces.
    fn read_xml(&mut self, i: usize, dom: &Domain) -> Result<Option<DomainXml>, Stopped> {
        let uri = self.daemons[i].uri.clone();
        let text = match dom.get_xml_desc(0) {
            Ok(t) => t,
            Err(e) => {
                self.note(
                    "warning",
                    format!("libvirt {uri}: cannot read a domain's XML: {e}"),
                )?;
                return Ok(None);
            }
        };
        let xml = match domain::parse(&text) {
            Ok(x) => x,
            Err(e) => {
                crate::skipped::count("libvirt", "malformed");
                self.note("warning", format!("libvirt {uri}: skipped a domain's XML: {e}"))?;
                return Ok(None);
            }
        };
        self.tr.domain_xml(i, &xml);
        for iface in &xml.interfaces {
            let Some(tap) = iface.tap.clone() else { continue };
            let vm = VmIface {
                domain: xml.name.clone(),
                uuid: xml.uuid.clone(),
                mac: iface.mac,
                netns: tap_netns(self.daemons[i].netns.as_ref(), &tap, iface.mac),
                tap,
                bridge: iface.bridge.clone(),
                ips: iface.ips.clone(),
            };
            if let Some(ns) = &vm.netns {
                // Daemons in namespaces of one machine: the namespace names the host.
                self.tr.domain_host(i, &xml.uuid, ns);
            }
            let key = (xml.uuid.clone(), vm.tap.clone());
            if self.known.get(&key) == Some(&vm) {
                continue;
            }
            self.note("info", format!("libvirt {uri}: {vm}"))?;
            (self.ifaces)(&vm);
            self.known.insert(key, vm);
        }
        Ok(Some(xml))
    }

    fn domain(&self, i: usize, uuid: &str) -> Option<Domain> {
        let conn = self.daemons[i].conn.as_ref()?;
        Domain::lookup_by_uuid_string(conn, uuid).ok()
    }

    fn handle(&mut self, raw: Raw) -> Result<(), Stopped> {
        let i = raw.conn;
        let Some(d) = self.daemons.get(i) else {
            return Ok(());
        };
        if raw.generation != d.generation || d.conn.is_none() {
            return Ok(());
        }
        let events = match raw.kind {
            RawKind::Closed(reason) => return self.lost(i, reason),
            RawKind::Lifecycle { event, detail } => {
                let lc = Lifecycle::from_codes(event, detail);
                if matches!(lc, Lifecycle::Started(_)) {
                    self.known.retain(|(u, _), _| *u != raw.uuid);
                }
                // A domain that starts or arrives: its (new) taps.
                if matches!(
                    lc,
                    Lifecycle::Started(_) | Lifecycle::Resumed(Resumed::Migrated | Resumed::FromSnapshot)
                ) && let Some(dom) = self.domain(i, &raw.uuid)
                {
                    self.read_xml(i, &dom)?;
                }
                self.tr.lifecycle(i, raw.ts, &raw.uuid, &raw.name, lc)
            }
            RawKind::Iteration(n) => {
                let stats = self.domain(i, &raw.uuid).and_then(|dom| ffi::job_stats(&dom));
                let n = u64::try_from(n).unwrap_or(0);
                self.tr
                    .iteration(i, raw.ts, &raw.uuid, &raw.name, n, stats.as_ref())
            }
            RawKind::JobCompleted(f) => self.tr.job_completed(i, raw.ts, &raw.uuid, &raw.name, &f),
            RawKind::Qemu {
                event,
                seconds,
                micros,
            } => {
                let d = &self.daemons[i];
                if d.local {
                    let wall = serde_json::json!({"seconds": seconds, "microseconds": micros});
                    if let Some(ts) = qmp::qmp_timestamp_to_mono(&wall, d.wall_minus_mono) {
                        self.tr.qemu_event(i, &raw.uuid, &raw.name, &event, ts);
                    }
                }
                Vec::new()
            }
        };
        for ev in events {
            self.send(ev)?;
        }
        Ok(())
    }

    /// The connection closed: a warning, and a reconnect.
    fn lost(&mut self, i: usize, reason: i32) -> Result<(), Stopped> {
        let d = &mut self.daemons[i];
        if let Some(mut c) = d.conn.take() {
            ffi::deregister(&c, &mut d.regs);
            let _ = c.close();
        }
        d.next_try = Instant::now() + MIN_BACKOFF;
        d.backoff = MIN_BACKOFF;
        // Events while it is down are lost: counted with the skipped input.
        crate::skipped::count("libvirt", "connection_lost");
        let why = match u32::try_from(reason).unwrap_or(u32::MAX) {
            virt::sys::VIR_CONNECT_CLOSE_REASON_EOF => "the daemon closed the connection",
            virt::sys::VIR_CONNECT_CLOSE_REASON_KEEPALIVE => "the daemon stopped answering keepalives",
            virt::sys::VIR_CONNECT_CLOSE_REASON_ERROR => "a connection error",
            _ => "the connection closed",
        };
        let msg = format!(
            "libvirt {}: {why}; connecting again (reconnects so far: {})",
            d.uri,
            d.connections.saturating_sub(1)
        );
        self.send(warn_note(msg))
    }
}

/// The namespace of a domain's tap: the daemon's, when known and the tap is there; else found by name and MAC.
fn tap_netns(daemon: Option<&Netns>, tap: &str, mac: Option<MacAddr>) -> Option<String> {
    match daemon {
        Some(ns) if super::has_link(ns.name(), tap) => ns.name().map(str::to_owned),
        _ => locate_tap(tap, mac),
    }
}

/// Starts the libvirt thread for `uris`. `ifaces` is told every interface a domain has (at connection, when a
/// domain starts or arrives). One call per process: libvirt's event loop is process-wide.
pub fn follow(
    uris: &[String],
    emit: impl Emit,
    ifaces: impl Fn(&VmIface) + Send + 'static,
) -> Result<SourceHandle, LibvirtError> {
    static STARTED: AtomicBool = AtomicBool::new(false);
    if STARTED.swap(true, Ordering::SeqCst) {
        return Err(LibvirtError::AlreadyFollowing);
    }
    ffi::quiet_errors();
    ffi::event_loop(TICK_MS).map_err(|e| LibvirtError::EventLoop(e.to_string()))?;
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::channel();
    let follower = Follower {
        daemons: uris
            .iter()
            .map(|u| Daemon {
                uri: u.clone(),
                local: is_local(u),
                netns: None,
                conn: None,
                regs: Registrations::default(),
                generation: 0,
                wall_minus_mono: 0,
                connections: 0,
                opening: None,
                next_try: Instant::now(),
                backoff: MIN_BACKOFF,
                unreachable: None,
            })
            .collect(),
        queue: Arc::new(Mutex::new(Vec::new())),
        tr: Translator::new(),
        emit,
        ifaces,
        stop: stop.clone(),
        known: HashMap::new(),
        first_round: Some(ready_tx),
    };
    let thread = thread::Builder::new()
        .name("migmon-libvirt".into())
        .spawn(move || follower.run())
        .map_err(LibvirtError::Spawn)?;
    // Daemons that answer are followed before this returns, so their events from then on are seen.
    let _ = ready_rx.recv_timeout(FIRST_CONNECT);
    Ok(SourceHandle::new(stop, thread))
}

/// Reads the interfaces of every running domain of `uri` once (for the probes to attach at start-up).
pub fn interfaces(uri: &str) -> Result<Vec<VmIface>, LibvirtError> {
    ffi::quiet_errors();
    let mut conn = Connect::open(Some(uri)).map_err(|e| LibvirtError::Connect {
        uri: uri.to_owned(),
        message: e.to_string(),
    })?;
    let mut out = Vec::new();
    let domains = conn
        .list_all_domains(virt::sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        .unwrap_or_default();
    let netns = super::daemon_netns(uri);
    for dom in &domains {
        let Ok(xml) = dom
            .get_xml_desc(0)
            .map_err(|e| e.to_string())
            .and_then(|t| domain::parse(&t).map_err(|e| e.to_string()))
        else {
            continue;
        };
        for iface in xml.interfaces {
            let Some(tap) = iface.tap else { continue };
            out.push(VmIface {
                domain: xml.name.clone(),
                uuid: xml.uuid.clone(),
                mac: iface.mac,
                netns: tap_netns(netns.as_ref(), &tap, iface.mac),
                tap,
                bridge: iface.bridge,
                ips: iface.ips,
            });
        }
    }
    drop(domains);
    let _ = conn.close();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_uris() {
        for u in [
            "qemu:///system",
            "qemu+unix:///system?socket=/tmp/a/libvirt-sock",
            "qemu+tcp://localhost/system",
            "qemu+ssh://root@127.0.0.1:22/system",
        ] {
            assert!(is_local(u), "{u}");
        }
        for u in ["qemu+tcp://10.0.0.2/system", "qemu+ssh://root@hv7/system"] {
            assert!(!is_local(u), "{u}");
        }
    }
}
