//! `migmon watch --metrics ADDR`: Prometheus metrics over a tiny HTTP server.
//!
//! Counters move as events arrive (retransmits, losses, events per kind, skipped input). Figures that need the
//! correlation (migrations, pause, blackout, convergence, connection fates) are published once per migration, when
//! the live correlation has made it final ([`Metrics::publish`]); a scrape only renders what is there, so it costs
//! the same after a week as after a minute. The live correlation's own size is published too
//! ([`Metrics::set_live_status`]).
//!
//! The per-migration figures carry the labels `host` (this monitor's host name, `watch --host-name` or the machine's)
//! and `vm` (the VM's MAC), never a migration id: ids are unbounded, and a fleet's Prometheus aggregates by host and
//! VM (docs/fleet.md).

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError, atomic::AtomicU64, mpsc::Sender},
    time::Duration,
};

use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use migmon_analysis::{
    correlate::{Fate, MigrationReport},
    live::LiveStatus,
    trace::Event,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinSet,
};

type Labels = Vec<(String, String)>;
type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

/// The live correlation's size.
#[derive(Default)]
struct LiveGauges {
    held: Gauge,
    residue: Gauge,
    oldest_held: Gauge<f64, AtomicU64>,
    released_events: Gauge,
    released_migrations: Gauge,
    released_unresolved: Gauge,
}

/// The metrics.
pub struct Metrics {
    registry: Registry,
    host: String,
    migrations: Family<Labels, Counter>,
    pause: Histograms,
    blackout: Histograms,
    convergence: Histograms,
    connections: Family<Labels, Counter>,
    retransmits: Counter,
    lost: Counter,
    events: Family<Labels, Counter>,
    /// The `events` counter of each kind, looked up once (a label set costs allocations per lookup).
    events_by_kind: Mutex<HashMap<&'static str, Counter>>,
    skipped: Family<Labels, Counter>,
    /// The last cumulative count of each (source, reason) `skipped` record.
    skipped_seen: Mutex<HashMap<(String, String), u64>>,
    live: LiveGauges,
}

fn seconds_histogram() -> Histogram {
    // 1 ms … ~33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Metrics labelled with this machine's host name.
    pub fn new() -> Self {
        let host = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default();
        Self::for_host(&host)
    }

    /// Metrics labelled `host="HOST"`.
    pub fn for_host(host: &str) -> Self {
        let mut registry = Registry::with_prefix("migmon");
        let migrations = Family::<Labels, Counter>::default();
        let pause = Histograms::new_with_constructor(seconds_histogram);
        let blackout = Histograms::new_with_constructor(seconds_histogram);
        let convergence = Histograms::new_with_constructor(seconds_histogram);
        let connections = Family::<Labels, Counter>::default();
        let retransmits = Counter::default();
        let lost = Counter::default();
        let events = Family::<Labels, Counter>::default();
        let skipped = Family::<Labels, Counter>::default();
        let live = LiveGauges::default();
        registry.register("migrations", "Migrations that resumed", migrations.clone());
        registry.register("pause_seconds", "vCPU pause per migration", pause.clone());
        registry.register(
            "blackout_seconds",
            "Network blackout per migration",
            blackout.clone(),
        );
        registry.register(
            "convergence_seconds",
            "Resume to the last FDB move",
            convergence.clone(),
        );
        registry.register(
            "connections",
            "Connections alive at a pause, by fate (survived, aborted) and abort reason",
            connections.clone(),
        );
        registry.register(
            "tcp_retransmits",
            "TCP retransmissions seen by the probes",
            retransmits.clone(),
        );
        registry.register(
            "lost_events",
            "Events the kernel could not hand over",
            lost.clone(),
        );
        registry.register("events", "Events by kind", events.clone());
        registry.register(
            "skipped_input",
            "Input skipped (undecodable kernel records, malformed or too long lines), by source and reason",
            skipped.clone(),
        );
        registry.register(
            "live_held_events",
            "Events the live correlation holds (the look-back and unsettled migration windows)",
            live.held.clone(),
        );
        registry.register(
            "live_residue_events",
            "Older events the live correlation keeps for their state (open connections, last counters per port)",
            live.residue.clone(),
        );
        registry.register(
            "live_oldest_held_seconds",
            "Age of the oldest event the live correlation holds",
            live.oldest_held.clone(),
        );
        registry.register(
            "live_released_events",
            "Events the live correlation has released since the start",
            live.released_events.clone(),
        );
        registry.register(
            "live_released_migrations",
            "Migrations made final since the start (their verdicts kept, their events released)",
            live.released_migrations.clone(),
        );
        registry.register(
            "live_released_unresolved",
            "Migrations released with a connection's fate still open after the longest hold",
            live.released_unresolved.clone(),
        );
        Self {
            registry,
            host: host.to_owned(),
            migrations,
            pause,
            blackout,
            convergence,
            connections,
            retransmits,
            lost,
            events,
            events_by_kind: Mutex::new(HashMap::new()),
            skipped,
            skipped_seen: Mutex::new(HashMap::new()),
            live,
        }
    }

    /// Takes one event: the per-event counters.
    pub fn observe(&self, ev: &Event) {
        self.events_by_kind
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(ev.kind())
            .or_insert_with(|| {
                self.events
                    .get_or_create(&vec![("kind".to_owned(), ev.kind().to_owned())])
                    .clone()
            })
            .inc();
        match ev {
            Event::TcpRetransmit { .. } => {
                self.retransmits.inc();
            }
            Event::Loss { count, .. } => {
                self.lost.inc_by(*count);
            }
            Event::Skipped {
                source,
                reason,
                count,
                ..
            } => {
                let mut seen = self.skipped_seen.lock().unwrap_or_else(PoisonError::into_inner);
                let last = seen.entry((source.clone(), reason.clone())).or_default();
                if *count > *last {
                    self.skipped
                        .get_or_create(&vec![
                            ("source".to_owned(), source.clone()),
                            ("reason".to_owned(), reason.clone()),
                        ])
                        .inc_by(*count - *last);
                    *last = *count;
                }
            }
            _ => {}
        }
    }

    /// Publishes a final migration: counted if it resumed, its pause, blackout and convergence, and the fate of each
    /// connection alive at its pause (unresolved ones are not counted).
    pub fn publish(&self, m: &MigrationReport) {
        if m.timeline.resume.is_none() {
            return;
        }
        let labels = vec![
            ("host".to_owned(), self.host.clone()),
            ("vm".to_owned(), m.mac_text()),
        ];
        self.migrations.get_or_create(&labels).inc();
        let figures = [
            (&m.downtime.vcpu_pause, &self.pause),
            (&m.downtime.blackout, &self.blackout),
            (&m.downtime.convergence, &self.convergence),
        ];
        for (figure, histogram) in figures {
            if let Some(f) = figure {
                histogram.get_or_create(&labels).observe(f.ns as f64 / 1e9);
            }
        }
        for c in m.connections.iter().filter(|c| !c.opened_during_window) {
            let mut labels = labels.clone();
            match c.fate {
                Fate::Aborted { reason, .. } => {
                    labels.push(("fate".to_owned(), "aborted".to_owned()));
                    labels.push(("reason".to_owned(), reason.to_string()));
                }
                Fate::Survived => labels.push(("fate".to_owned(), "survived".to_owned())),
                Fate::Unresolved => continue,
            }
            self.connections.get_or_create(&labels).inc();
        }
    }

    /// Publishes the live correlation's size; `now_ns` dates the oldest held event.
    pub fn set_live_status(&self, st: &LiveStatus, now_ns: u64) {
        let g = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.live.held.set(g(st.held as u64));
        self.live.residue.set(g(st.residue as u64));
        self.live.oldest_held.set(if st.oldest_held_ns == 0 {
            0.0
        } else {
            now_ns.saturating_sub(st.oldest_held_ns) as f64 / 1e9
        });
        self.live.released_events.set(g(st.released_events));
        self.live.released_migrations.set(g(st.released_migrations));
        self.live.released_unresolved.set(g(st.released_unresolved));
    }

    /// Renders the metrics in the Prometheus/OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        let _ = encode(&mut s, &self.registry);
        s
    }
}

/// Errors serving metrics.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen for metrics on {addr}: is the address free and local?")]
    Bind {
        addr: String,
        #[source]
        source: io::Error,
    },
}

/// How long a scraper may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest request head read; a longer one is refused.
const MAX_HEAD: usize = 16 * 1024;
/// Scrapes served at once; more wait for their turn in the listen backlog.
const MAX_CLIENTS: usize = 16;

/// Why a client's request was refused: the `reason` label of `migmon_skipped_input_total{source="metrics"}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refused {
    /// Not an HTTP/1 request line, not UTF-8, or cut before the head ended.
    BadRequest,
    /// No end of the head within [`MAX_HEAD`] bytes.
    TooLong,
    /// No end of the head within [`REQUEST_TIMEOUT`].
    Timeout,
}

impl Refused {
    fn reason(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::TooLong => "too_long",
            Self::Timeout => "timeout",
        }
    }

    fn status(self) -> &'static str {
        match self {
            Self::BadRequest => "400 Bad Request",
            Self::TooLong => "431 Request Header Fields Too Large",
            Self::Timeout => "408 Request Timeout",
        }
    }
}

/// A request worth an answer.
struct Request {
    method: String,
    path: String,
}

/// Counts refused clients (`skipped` records, `migmon_skipped_input_total`) and warns about them: on stderr and as a
/// note in the trace, for the 1st, 2nd, 4th, 8th ... of each reason, so a port scanner cannot flood the journal.
struct Refusals {
    warn: Mutex<Sender<Event>>,
    counts: Mutex<HashMap<&'static str, u64>>,
}

impl Refusals {
    fn refused(&self, why: Refused, peer: SocketAddr) {
        crate::skipped::count("metrics", why.reason());
        let n = {
            let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
            let n = counts.entry(why.reason()).or_default();
            *n += 1;
            *n
        };
        if n.is_power_of_two() {
            let message = format!(
                "metrics: refused a client at {peer}: {} ({n} so far; counted in \
                 migmon_skipped_input_total{{source=\"metrics\",reason=\"{}\"}}, warned at powers of two)",
                match why {
                    Refused::BadRequest => "not an HTTP request",
                    Refused::TooLong => "request head over 16 KiB",
                    Refused::Timeout => "no complete request within 2 s",
                },
                why.reason()
            );
            let _ = self
                .warn
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .send(Event::Note {
                    ts_ns: migevents::monotonic_ns(),
                    level: "warning".to_owned(),
                    message,
                });
        }
    }
}

/// Binds `addr` and returns the bound address and the task that serves `GET /metrics` there (spawn it on the watch's
/// runtime). A slow or broken client costs its own connection only; it is counted as skipped input and warned about
/// through `warn` (the watch's pipeline).
pub fn serve(
    metrics: Arc<Metrics>,
    addr: &str,
    warn: Sender<Event>,
) -> Result<(SocketAddr, impl Future<Output = ()> + Send + 'static), MetricsError> {
    let bind_err = |source| MetricsError::Bind {
        addr: addr.to_owned(),
        source,
    };
    let listener = std::net::TcpListener::bind(addr).map_err(bind_err)?;
    let bound = listener.local_addr().map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    let refusals = Arc::new(Refusals {
        warn: Mutex::new(warn),
        counts: Mutex::new(HashMap::new()),
    });
    Ok((bound, accept(listener, metrics, refusals)))
}

async fn accept(listener: std::net::TcpListener, metrics: Arc<Metrics>, refusals: Arc<Refusals>) {
    let Ok(listener) = TcpListener::from_std(listener) else {
        return;
    };
    let mut clients = JoinSet::new();
    loop {
        while clients.len() >= MAX_CLIENTS {
            clients.join_next().await;
        }
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    clients.spawn(answer(stream, peer, metrics.clone(), refusals.clone()));
                }
                // Out of file descriptors, typically: try again shortly.
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            },
            Some(_) = clients.join_next(), if !clients.is_empty() => {}
        }
    }
}

/// Reads the request head (within [`REQUEST_TIMEOUT`], at most [`MAX_HEAD`] bytes). `Ok(None)`: the client closed
/// without sending anything (a connect probe), which is not input.
async fn read_request(s: &mut TcpStream) -> Result<Option<Request>, Refused> {
    let mut req = Vec::new();
    let read_head = async {
        let mut buf = [0u8; 1024];
        loop {
            let end = req.windows(4).position(|w| w == b"\r\n\r\n");
            if let Some(end) = end.filter(|&e| e <= MAX_HEAD) {
                return Ok(Some(end));
            }
            if req.len() > MAX_HEAD {
                return Err(Refused::TooLong);
            }
            match s.read(&mut buf).await {
                Ok(0) if req.is_empty() => return Ok(None),
                Ok(0) | Err(_) => return Err(Refused::BadRequest),
                Ok(n) => req.extend_from_slice(&buf[..n]),
            }
        }
    };
    let Some(end) = tokio::time::timeout(REQUEST_TIMEOUT, read_head)
        .await
        .map_err(|_| Refused::Timeout)??
    else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&req[..end]).map_err(|_| Refused::BadRequest)?;
    let line = head.lines().next().unwrap_or_default();
    let mut words = line.split(' ');
    match (words.next(), words.next(), words.next(), words.next()) {
        (Some(method), Some(path), Some(version), None)
            if !method.is_empty()
                && method.bytes().all(|b| b.is_ascii_uppercase())
                && path.starts_with('/')
                && version.starts_with("HTTP/1.") =>
        {
            Ok(Some(Request {
                method: method.to_owned(),
                path: path.to_owned(),
            }))
        }
        _ => Err(Refused::BadRequest),
    }
}

/// Answers one client and closes. A refused request is counted and warned about ([`Refusals`]).
async fn answer(
    mut s: TcpStream,
    peer: SocketAddr,
    m: Arc<Metrics>,
    refusals: Arc<Refusals>,
) -> io::Result<()> {
    let request = read_request(&mut s).await;
    let (status, ctype, body) = match &request {
        Ok(None) => return Ok(()),
        Err(why) => {
            refusals.refused(*why, peer);
            (why.status(), "text/plain", format!("{}\n", why.reason()))
        }
        Ok(Some(req)) if req.method != "GET" => (
            "405 Method Not Allowed",
            "text/plain",
            "GET /metrics\n".to_owned(),
        ),
        Ok(Some(req)) if req.path == "/metrics" || req.path == "/" => {
            // Rendering takes the registry's locks: off the I/O threads.
            let body = tokio::task::spawn_blocking(move || m.encode())
                .await
                .map_err(io::Error::other)?;
            (
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                body,
            )
        }
        Ok(Some(_)) => ("404 Not Found", "text/plain", "try /metrics\n".to_owned()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(response.as_bytes()).await?;
    s.shutdown().await?;
    if request.is_err() {
        // Closing with unread input would reset the connection and lose the answer: read on (bounded) until the
        // client closes.
        let mut buf = [0u8; 1024];
        let drain = async {
            let mut left = MAX_HEAD;
            while left > 0 {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        };
        let _ = tokio::time::timeout(REQUEST_TIMEOUT, drain).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;
    use migmon_analysis::fixtures::{live_trace, quick_trace};

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn metrics_over_http_after_a_quick_and_a_live_migration() {
        let m = Arc::new(Metrics::for_host("hv1"));
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (addr, server) = serve(m.clone(), "127.0.0.1:0", std::sync::mpsc::channel().0).unwrap();
        rt.spawn(server);
        let mut ev = quick_trace();
        ev.extend(live_trace().into_iter().map(|mut e| {
            // The live migration happens 60 s later.
            match &mut e {
                Event::Migration { ev, .. } => ev.ts_ns += 60_000_000_000,
                Event::MacStats {
                    ts_ns,
                    first_ns,
                    last_ns,
                    ..
                } => {
                    *ts_ns += 60_000_000_000;
                    *first_ns += 60_000_000_000;
                    *last_ns += 60_000_000_000;
                }
                Event::TcpRetransmit { ts_ns, .. }
                | Event::TcpState { ts_ns, .. }
                | Event::MacSeen { ts_ns, .. }
                | Event::Rarp { ts_ns, .. }
                | Event::Garp { ts_ns, .. }
                | Event::FdbUpdate { ts_ns, .. } => *ts_ns += 60_000_000_000,
                _ => {}
            }
            e
        }));
        ev.push(Event::Loss {
            ts_ns: 75_000_000_000,
            cpu: 1,
            count: 2,
        });
        ev.sort_by_key(Event::ts_ns);
        ev.push(Event::Skipped {
            ts_ns: 76_000_000_000,
            source: "qmp".into(),
            reason: "malformed".into(),
            count: 3,
        });
        for e in &ev {
            m.observe(e);
        }
        for r in &migmon_analysis::correlate::correlate(&ev).migrations {
            m.publish(r);
        }
        let body = get(addr, "/metrics");
        assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
        for needle in [
            "migmon_migrations_total{host=\"hv1\",vm=\"52:54:00:12:34:56\"} 2",
            "migmon_pause_seconds_count{host=\"hv1\",vm=\"52:54:00:12:34:56\"} 2",
            "migmon_blackout_seconds_count{host=\"hv1\",vm=\"52:54:00:12:34:56\"} 1",
            "migmon_connections_total{host=\"hv1\",vm=\"52:54:00:12:34:56\",fate=\"aborted\",reason=\"ETIMEDOUT\"} 1",
            // The quick migration's survivor is alive at the live migration's pause too (same VM): 1 + 1 + 2.
            "migmon_connections_total{host=\"hv1\",vm=\"52:54:00:12:34:56\",fate=\"survived\"} 4",
            "migmon_convergence_seconds_count{host=\"hv1\",vm=\"52:54:00:12:34:56\"} 1",
            "migmon_lost_events_total 2",
            "migmon_tcp_retransmits_total 19",
            "migmon_skipped_input_total{source=\"qmp\",reason=\"malformed\"} 3",
        ] {
            assert!(body.contains(needle), "missing {needle}:\n{body}");
        }
        assert!(
            !body.contains("migration_id") && !body.contains("quick-1"),
            "{body}"
        );
        assert!(get(addr, "/nope").starts_with("HTTP/1.1 404"));
    }

    #[test]
    fn a_silent_or_garbage_client_does_not_hold_up_a_scrape() {
        let m = Arc::new(Metrics::for_host("hv1"));
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (addr, server) = serve(m, "127.0.0.1:0", std::sync::mpsc::channel().0).unwrap();
        rt.spawn(server);
        // A client that connects and says nothing, and one that sends garbage without an end.
        let _silent = std::net::TcpStream::connect(addr).unwrap();
        let mut garbage = std::net::TcpStream::connect(addr).unwrap();
        garbage.write_all(&[0xff; 4096]).unwrap();
        let t = std::time::Instant::now();
        assert!(get(addr, "/metrics").starts_with("HTTP/1.1 200 OK"));
        assert!(t.elapsed() < REQUEST_TIMEOUT, "{:?}", t.elapsed());
    }

    /// Sends `bytes`, half-closes, and returns the answer.
    fn send(addr: SocketAddr, bytes: &[u8]) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(bytes).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn refused_clients_are_answered_counted_and_warned_about() {
        let m = Arc::new(Metrics::for_host("hv1"));
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (tx, notes) = std::sync::mpsc::channel();
        let (addr, server) = serve(m.clone(), "127.0.0.1:0", tx).unwrap();
        rt.spawn(server);
        assert!(send(addr, b"\xff\xfe garbage\r\n\r\n").starts_with("HTTP/1.1 400"));
        assert!(send(addr, b"HELLO\r\n\r\n").starts_with("HTTP/1.1 400"));
        assert!(
            send(addr, b"GET /metr").starts_with("HTTP/1.1 400"),
            "a head cut short"
        );
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_HEAD + 10));
        assert!(send(addr, long.as_bytes()).starts_with("HTTP/1.1 431"));
        assert!(send(addr, b"POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
        assert!(send(addr, b"").is_empty(), "a connect probe is not answered");
        // Warned at the 1st and 2nd bad request, the 1st too long; the 405 and the probe are not refusals.
        let notes: Vec<String> = notes
            .try_iter()
            .map(|e| match e {
                Event::Note { message, .. } => message,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(notes.len(), 3, "{notes:#?}");
        assert!(notes[1].contains("not an HTTP request (2 so far"), "{notes:#?}");
        assert!(notes[2].contains("reason=\"too_long\""), "{notes:#?}");
        // The gate turns the process's counts into `skipped` records; the metrics count them.
        let mut prev = std::collections::BTreeMap::new();
        for ev in crate::skipped::changed(&mut prev, 1) {
            m.observe(&ev);
        }
        let body = get(addr, "/metrics");
        assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
        for reason in ["bad_request", "too_long"] {
            let needle = format!("migmon_skipped_input_total{{source=\"metrics\",reason=\"{reason}\"}} ");
            assert!(body.contains(&needle), "missing {needle}:\n{body}");
        }
    }
}
