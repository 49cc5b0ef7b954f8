//! Pause windows from QEMU's QMP (`migmon watch --qmp PATH`, repeatable).
//!
//! The follower waits for the QMP unix socket to appear (polling with a backoff up to 2 s), negotiates capabilities,
//! turns on the `events` migration capability (so QEMU reports MIGRATION status changes and passes), asks for the
//! VM's MAC (`query-rx-filter`) and state (`query-status`), and then turns events into migration phases. When the
//! socket goes away (QEMU exits, restarts, or a destination QEMU is started at migration time) it connects again;
//! each connection records its own clock offset, and the reconnects are counted in the trace's notes.
//!
//! On a source QEMU:
//!
//! | QMP | phase |
//! |---|---|
//! | `MIGRATION` status `setup` while running | `setup` (mode `live`), on a new window |
//! | `STOP` with no window open | `pause`, on a new window (a plain stop, or the start of a quick migration) |
//! | `MIGRATION` status `setup` while stopped | `setup` (mode `quick`) on the stopped window: paused, then moved |
//! | `STOP` in a live migration | `pause` |
//! | `MIGRATION_PASS` | `round` (pages, bytes, bandwidth from `query-migrate`) |
//! | `MIGRATION` status `completed` | the final `round` and `complete` (QEMU's total time, downtime, bytes from `query-migrate`) |
//! | `MIGRATION` status `failed` / `cancelled` | `failed` |
//! | `RESUME` with a window open | `resume` (a `cont` after a stop, or the source taking the VM back) |
//!
//! A destination (`query-status` says `inmigrate`) opens no window of its own from its MIGRATION events: its only
//! phase is the `RESUME` after the incoming migration (QEMU's autostart, or a `cont` after a quick migration), on an
//! id of its own with role `destination`; the correlation joins it to the source's pause by MAC.
//!
//! QMP stamps events with the wall clock. The follower measures `wall - CLOCK_MONOTONIC` at each connect, emits it
//! as a `clock_offset` event (so the trace records it), and converts every timestamp with it.
//!
//! Bad input never stops the follower: a malformed line is a counted warning, and a line longer than
//! [`MAX_LINE`](super::MAX_LINE), a read error or a closed socket drops that connection with a warning and connects
//! again.

use std::{
    collections::HashMap,
    io,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::{
    io::AsyncWriteExt,
    net::{
        UnixStream,
        unix::{OwnedReadHalf, OwnedWriteHalf},
    },
};

use migevents::{MigrationEvent, Mode, Phase, Role, monotonic_ns};
use serde_json::{Value, json};

use super::{Emit, LineReader, warn_note};
use migmon_analysis::trace::{Event, PauseSource};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The first wait before connecting again; it doubles up to [`MAX_BACKOFF`] while the socket stays unreachable.
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Errors connecting to QMP.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to the QMP socket {}: is QEMU running with `-qmp unix:{},server=on,wait=off`?", path.display(), path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot connect to the QMP socket {}: permission denied: it belongs to another user; run migmon as root \
         (under systemd, with CAP_DAC_OVERRIDE as contrib/migmon.service has) or as the socket's owner",
        path.display()
    )]
    Denied { path: PathBuf },
    #[error("QMP on {}: {what}", path.display())]
    Handshake { path: PathBuf, what: String },
    #[error("QMP on {}: I/O error during the handshake", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// `wall - CLOCK_MONOTONIC`, in ns, measured now (midpoint of two monotonic reads around one wall read).
pub fn measure_wall_minus_mono() -> i64 {
    let m1 = monotonic_ns();
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64);
    let m2 = monotonic_ns();
    wall - ((m1 / 2 + m2 / 2) as i64)
}

/// Converts a QMP `timestamp` object to `CLOCK_MONOTONIC` ns with the measured offset.
pub fn qmp_timestamp_to_mono(ts: &Value, wall_minus_mono: i64) -> Option<u64> {
    let secs = ts.get("seconds")?.as_i64()?;
    let us = ts.get("microseconds")?.as_i64()?;
    if secs < 0 || us < 0 {
        return None;
    }
    let wall = secs
        .checked_mul(1_000_000_000)?
        .checked_add(us.checked_mul(1000)?)?;
    u64::try_from(wall.checked_sub(wall_minus_mono)?)
        .ok()
        .filter(|&mono| mono <= migmon_analysis::trace::MAX_TRACE_NS)
}

/// A command of ours waiting for its reply.
#[derive(Clone, Copy, Debug)]
enum Pending {
    Caps,
    Mac,
    Status,
    /// `query-migrate` after `MIGRATION_PASS` `pass`, stamped `ts`.
    Pass {
        pass: u64,
        ts: u64,
    },
    /// `query-migrate` after `MIGRATION` `completed`, stamped `ts`.
    Done {
        ts: u64,
    },
}

impl Pending {
    fn what(self) -> &'static str {
        match self {
            Self::Caps => "migrate-set-capabilities",
            Self::Mac => "query-rx-filter",
            Self::Status => "query-status",
            Self::Pass { .. } | Self::Done { .. } => "query-migrate",
        }
    }
}

/// The window open on a source QEMU: a stop, a migration, or both.
#[derive(Clone, Debug, Default)]
struct Window {
    id: String,
    /// A STOP was seen (the VM is paused).
    stopped: bool,
    /// A migration runs (a `setup` was seen and no end yet).
    migrating: bool,
    /// Rounds emitted so far (the next round's number).
    rounds: u32,
    /// `ram.transferred` and `ram.normal` at the last `query-migrate`.
    transferred: u64,
    normal: u64,
}

/// Turns QMP lines into events. Pure, so it is tested without a QEMU; one translator lives across the
/// connections of one socket path, so window ids are never reused when QEMU restarts.
pub struct QmpTranslator {
    name: String,
    origin: String,
    wall_minus_mono: i64,
    mac: String,
    windows: u32,
    current: Option<Window>,
    /// `query-status` said `inmigrate`: this QEMU is a migration's destination until the incoming migration ends.
    incoming: bool,
    incoming_resumes: u32,
    lineno: usize,
    /// Lines skipped since the follower started (malformed, not an object, neither event nor reply).
    skipped: u64,
    next_cmd: u64,
    /// Outstanding commands by id.
    pending: HashMap<String, Pending>,
}

impl QmpTranslator {
    pub fn new(path: &Path, wall_minus_mono: i64) -> Self {
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        Self {
            name,
            origin: path.display().to_string(),
            wall_minus_mono,
            mac: String::new(),
            windows: 0,
            current: None,
            incoming: false,
            incoming_resumes: 0,
            lineno: 0,
            skipped: 0,
            next_cmd: 0,
            pending: HashMap::new(),
        }
    }

    /// Lines skipped so far.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// A new connection (the first, or after QEMU restarted): a new clock offset, and whatever the old QEMU had
    /// open is gone with it. Returns the commands to send after capabilities negotiation (each a JSON line).
    pub fn connected(&mut self, wall_minus_mono: i64) -> Vec<String> {
        self.wall_minus_mono = wall_minus_mono;
        self.current = None;
        self.incoming = false;
        self.lineno = 0;
        self.pending.clear();
        self.initial_commands()
    }

    /// The commands to send after capabilities negotiation (each a JSON line), recorded as pending.
    pub fn initial_commands(&mut self) -> Vec<String> {
        vec![
            self.command(
                Pending::Caps,
                json!({"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability": "events", "state": true}]}}),
            ),
            self.command(Pending::Mac, json!({"execute": "query-rx-filter"})),
            self.command(Pending::Status, json!({"execute": "query-status"})),
        ]
    }

    /// A command line with a fresh id, recorded as pending.
    fn command(&mut self, kind: Pending, mut v: Value) -> String {
        self.next_cmd += 1;
        let id = format!("migmon-{}", self.next_cmd);
        v["id"] = json!(id);
        self.pending.insert(id, kind);
        v.to_string()
    }

    fn migration(&self, ts_ns: u64, id: &str, role: Role, phase: Phase) -> Event {
        Event::Migration {
            ev: MigrationEvent {
                ts_ns,
                migration_id: id.to_owned(),
                mac: self.mac.clone(),
                role,
                phase,
            },
            source: PauseSource::Qmp,
        }
    }

    /// Opens a new window and returns it.
    fn open_window(&mut self) -> &mut Window {
        self.windows += 1;
        let id = format!("qmp:{}:{}", self.name, self.windows);
        self.current.insert(Window {
            id,
            ..Window::default()
        })
    }

    /// Handles one line: returns events to emit and commands to send.
    pub fn line(&mut self, line: &str) -> (Vec<Event>, Vec<String>) {
        self.lineno += 1;
        let line = line.trim();
        if line.is_empty() {
            return (Vec::new(), Vec::new());
        }
        let v: Value = match serde_json::from_str(line) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => {
                return (vec![self.skip("not a JSON object")], Vec::new());
            }
            Err(e) => return (vec![self.skip(&e.to_string())], Vec::new()),
        };
        if let Some(ret) = v.get("return") {
            let id = v.get("id").and_then(Value::as_str).unwrap_or_default().to_owned();
            return self.reply(&id, ret);
        }
        if v.get("error").is_some() {
            return (vec![self.error_reply(&v)], Vec::new());
        }
        let Some(event) = v.get("event").and_then(Value::as_str) else {
            if v.get("QMP").is_some() {
                return (Vec::new(), Vec::new());
            }
            return (vec![self.skip("neither an event nor a reply")], Vec::new());
        };
        let ts = v
            .get("timestamp")
            .and_then(|t| qmp_timestamp_to_mono(t, self.wall_minus_mono))
            .unwrap_or_else(monotonic_ns);
        let data = v.get("data").cloned().unwrap_or(Value::Null);
        self.event(event, ts, &data)
    }

    /// A QMP error reply to one of our commands, as a warning.
    fn error_reply(&mut self, v: &Value) -> Event {
        let id = v.get("id").and_then(Value::as_str).unwrap_or_default();
        let kind = self.pending.remove(id);
        let desc = v["error"].get("desc").and_then(Value::as_str).unwrap_or("error");
        let note = match kind {
            Some(Pending::Caps) => format!(
                "QMP {}: cannot enable migration events ({desc}); MIGRATION phases will be missing",
                self.origin
            ),
            Some(k) => format!("QMP {}: {} failed: {desc}", self.origin, k.what()),
            None => format!("QMP {}: a command failed: {desc}", self.origin),
        };
        warn_note(note)
    }

    /// One QMP event at `ts`: the pause-window events it gives and the commands to send.
    fn event(&mut self, event: &str, ts: u64, data: &Value) -> (Vec<Event>, Vec<String>) {
        let mut out = Vec::new();
        let mut cmds = Vec::new();
        match event {
            "STOP" => match &mut self.current {
                // The stop of a live migration's final phase.
                Some(w) if !w.stopped => {
                    w.stopped = true;
                    let id = w.id.clone();
                    out.push(self.migration(ts, &id, Role::Source, Phase::Pause));
                }
                // Already stopped: nothing new.
                Some(_) => {}
                None => {
                    let w = self.open_window();
                    w.stopped = true;
                    let id = w.id.clone();
                    out.push(self.migration(ts, &id, Role::Source, Phase::Pause));
                }
            },
            "RESUME" => {
                if let Some(w) = self.current.take_if(|w| w.stopped) {
                    out.push(self.migration(ts, &w.id, Role::Source, Phase::Resume));
                } else if self.current.is_none() {
                    self.incoming = false;
                    self.incoming_resumes += 1;
                    let id = format!("qmp:{}:in{}", self.name, self.incoming_resumes);
                    out.push(self.migration(ts, &id, Role::Destination, Phase::Resume));
                }
            }
            "MIGRATION_PASS" => {
                let pass = data.get("pass").and_then(Value::as_u64).unwrap_or(0);
                if self.current.as_ref().is_some_and(|w| w.migrating) && !self.incoming {
                    cmds.push(self.command(Pending::Pass { pass, ts }, json!({"execute": "query-migrate"})));
                }
            }
            "MIGRATION" => {
                let status = data.get("status").and_then(Value::as_str).unwrap_or_default();
                self.migration_status(status, ts, &mut out, &mut cmds);
            }
            _ => {}
        }
        (out, cmds)
    }

    /// A `MIGRATION` event's status on a source: setup opens (or joins) a window, completed asks for the figures,
    /// failed ends it. A destination's statuses open nothing.
    fn migration_status(&mut self, status: &str, ts: u64, out: &mut Vec<Event>, cmds: &mut Vec<String>) {
        if self.incoming {
            if matches!(status, "completed" | "failed" | "cancelled") {
                self.incoming = false;
            }
            return;
        }
        match status {
            "setup" => {
                let (id, mode) = match &mut self.current {
                    Some(w) if w.migrating => return,
                    // Stopped first, then migrated: one migration, paused before it moved.
                    Some(w) => {
                        w.migrating = true;
                        (w.id.clone(), Mode::Quick)
                    }
                    None => {
                        let w = self.open_window();
                        w.migrating = true;
                        (w.id.clone(), Mode::Live)
                    }
                };
                out.push(self.migration(
                    ts,
                    &id,
                    Role::Source,
                    Phase::Setup {
                        mode,
                        ram_bytes: 0,
                        ips: Vec::new(),
                        host: self.name.clone(),
                        // QEMU drops the frames that reach the old tap during the pause.
                        carries_frames: false,
                    },
                ));
            }
            "completed" if self.current.as_ref().is_some_and(|w| w.migrating) => {
                cmds.push(self.command(Pending::Done { ts }, json!({"execute": "query-migrate"})));
            }
            status @ ("failed" | "cancelled") => {
                let Some(w) = self.current.as_mut().filter(|w| w.migrating) else {
                    return;
                };
                w.migrating = false;
                let id = w.id.clone();
                // A live migration that failed before its stop is over; a stopped VM stays paused until a `cont`.
                if !w.stopped {
                    self.current = None;
                }
                out.push(self.migration(
                    ts,
                    &id,
                    Role::Source,
                    Phase::Failed {
                        reason: format!("QEMU migration {status}"),
                    },
                ));
            }
            _ => {}
        }
    }

    fn reply(&mut self, id: &str, ret: &Value) -> (Vec<Event>, Vec<String>) {
        match self.pending.remove(id) {
            Some(Pending::Mac) => {
                if let Some(mac) = ret.as_array().and_then(|a| {
                    a.iter()
                        .find_map(|nic| nic.get("main-mac").and_then(Value::as_str))
                }) {
                    self.mac = mac.to_ascii_lowercase();
                }
            }
            Some(Pending::Status) => {
                if ret.get("status").and_then(Value::as_str) == Some("inmigrate") {
                    self.incoming = true;
                }
            }
            Some(Pending::Pass { pass, ts }) => {
                // Pass 1 is the first sync, before any page is sent; pass k > 1 ends round k - 2.
                if pass > 1 {
                    return (self.round(ts, ret).into_iter().collect(), Vec::new());
                }
                self.stats(ret);
            }
            Some(Pending::Done { ts }) => return (self.completed(ts, ret), Vec::new()),
            Some(Pending::Caps) | None => {}
        }
        (Vec::new(), Vec::new())
    }

    /// Records a `query-migrate` reply's counters; returns (bytes, pages) since the previous one.
    fn stats(&mut self, ret: &Value) -> Option<(u64, u64)> {
        let w = self.current.as_mut()?;
        let transferred = ret.pointer("/ram/transferred").and_then(Value::as_u64)?;
        let normal = ret
            .pointer("/ram/normal")
            .and_then(Value::as_u64)
            .unwrap_or(w.normal);
        let delta = (
            transferred.saturating_sub(w.transferred),
            normal.saturating_sub(w.normal),
        );
        w.transferred = transferred;
        w.normal = normal;
        Some(delta)
    }

    /// The round that ended at `ts`, from a `query-migrate` reply.
    fn round(&mut self, ts: u64, ret: &Value) -> Option<Event> {
        let (bytes, pages) = self.stats(ret)?;
        let w = self.current.as_mut()?;
        let n = w.rounds;
        w.rounds += 1;
        let id = w.id.clone();
        // QEMU reports megabits per second.
        let mbps = ret.pointer("/ram/mbps").and_then(Value::as_f64).unwrap_or(0.0);
        Some(self.migration(
            ts,
            &id,
            Role::Source,
            Phase::Round {
                n,
                pages,
                bytes,
                bandwidth: (mbps * 1e6 / 8.0) as u64,
            },
        ))
    }

    /// The completed migration's final round (the bytes since the last pass, sent while paused) and QEMU's figures.
    fn completed(&mut self, ts: u64, ret: &Value) -> Vec<Event> {
        let mut out: Vec<Event> = self.round(ts, ret).into_iter().collect();
        // The source stays stopped after completing: its window has no resume of its own.
        let Some(w) = self.current.take() else {
            return out;
        };
        let bytes = ret
            .pointer("/ram/transferred")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let total_ms = ret.get("total-time").and_then(Value::as_f64).unwrap_or(0.0);
        let pause_ms = ret.get("downtime").and_then(Value::as_f64).unwrap_or(0.0);
        out.push(self.migration(
            ts,
            &w.id,
            Role::Source,
            Phase::Complete {
                total_ms,
                pause_ms,
                bytes,
            },
        ));
        out
    }

    fn skip(&mut self, why: &str) -> Event {
        self.skipped += 1;
        crate::skipped::count("qmp", "malformed");
        warn_note(format!(
            "skipped malformed QMP line from {} line {}: {why} ({} skipped so far)",
            self.origin, self.lineno, self.skipped
        ))
    }
}

/// The reading half of a QMP session, split into lines.
type QmpReader = LineReader<OwnedReadHalf>;

/// The QMP greeting, then the capabilities negotiation, within [`HANDSHAKE_TIMEOUT`].
async fn handshake(path: &Path, reader: &mut QmpReader, writer: &mut OwnedWriteHalf) -> Result<(), QmpError> {
    let negotiate = async {
        let greeting = read_json(path, reader).await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Handshake {
                path: path.to_owned(),
                what: "no QMP greeting".into(),
            });
        }
        writer
            .write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
            .await
            .map_err(|source| QmpError::Io {
                path: path.to_owned(),
                source,
            })?;
        let ack = read_json(path, reader).await?;
        if ack.get("return").is_none() {
            return Err(QmpError::Handshake {
                path: path.to_owned(),
                what: format!("capabilities negotiation refused: {ack}"),
            });
        }
        Ok(())
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, negotiate)
        .await
        .unwrap_or_else(|_| {
            Err(QmpError::Handshake {
                path: path.to_owned(),
                what: "no answer within 5 s: is this a QMP socket?".into(),
            })
        })
}

/// One JSON line of the handshake.
async fn read_json(path: &Path, reader: &mut QmpReader) -> Result<Value, QmpError> {
    match reader.next_line_async().await {
        Ok(Some(l)) => serde_json::from_str(&l).map_err(|e| QmpError::Handshake {
            path: path.to_owned(),
            what: format!("not QMP ({e})"),
        }),
        Ok(None) => Err(QmpError::Handshake {
            path: path.to_owned(),
            what: "closed during the handshake (another client may hold it: QMP serves one at a time)".into(),
        }),
        Err(source) => Err(QmpError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Connects and negotiates: a reader and a writer on a QMP session ready for commands.
async fn connect(path: &Path) -> Result<(QmpReader, OwnedWriteHalf), QmpError> {
    let stream = UnixStream::connect(path).await.map_err(|source| {
        if source.kind() == io::ErrorKind::PermissionDenied {
            QmpError::Denied {
                path: path.to_owned(),
            }
        } else {
            QmpError::Connect {
                path: path.to_owned(),
                source,
            }
        }
    })?;
    let (reader, mut writer) = stream.into_split();
    let mut reader = LineReader::new(reader);
    handshake(path, &mut reader, &mut writer).await?;
    Ok((reader, writer))
}

/// How a session ended.
enum Ended {
    /// The receiver is gone.
    Stop,
    /// The connection is lost: the warning says why.
    Lost(String),
}

/// A QMP follower: one socket path, followed across QEMU restarts. [`Follower::start`] makes the first attempt,
/// [`Follower::run`] follows until the receiver is gone (or its task is dropped).
pub struct Follower<E> {
    path: PathBuf,
    origin: String,
    emit: E,
    tr: QmpTranslator,
    connections: u64,
    /// The last unreachable state warned about (so a socket that stays missing costs one note).
    unreachable: Option<String>,
    /// A session negotiated by [`Follower::start`], not yet read.
    first: Option<(QmpReader, OwnedWriteHalf)>,
}

impl<E: Emit> Follower<E> {
    /// Connects to `path` once, so that with a QEMU already there its events from now on are seen; a socket that
    /// is not there (yet) is waited for by [`Follower::run`].
    pub async fn start(path: PathBuf, emit: E) -> Self {
        let first = connect(&path).await.ok();
        Self {
            origin: path.display().to_string(),
            tr: QmpTranslator::new(&path, 0),
            path,
            emit,
            connections: 0,
            unreachable: None,
            first,
        }
    }

    /// Follows until the receiver is gone: waits for the socket to appear, and connects again whenever it goes away.
    pub async fn run(mut self) {
        let mut backoff = MIN_BACKOFF;
        loop {
            let attempt = match self.first.take() {
                Some(session) => Ok(session),
                None => connect(&self.path).await,
            };
            match attempt {
                Ok((reader, writer)) => {
                    backoff = MIN_BACKOFF;
                    self.unreachable = None;
                    match self.session(reader, writer).await {
                        Ended::Stop => return,
                        Ended::Lost(why) => {
                            // Events QEMU sends until the reconnect are lost: counted with the skipped input.
                            crate::skipped::count("qmp", "connection_lost");
                            if !self.emit.emit(warn_note(format!(
                                "QMP {}: {why}; connecting again (reconnects so far: {})",
                                self.origin, self.connections
                            ))) {
                                return;
                            }
                        }
                    }
                }
                Err(e) => {
                    // Something answered that is not QEMU's QMP (no greeting within the bound, not JSON, closed
                    // mid-handshake): skipped input, counted at every attempt. A socket that is not there (yet) is
                    // no input.
                    if matches!(e, QmpError::Handshake { .. } | QmpError::Io { .. }) {
                        crate::skipped::count("qmp", "handshake");
                    }
                    // The kind of failure, without the OS detail that may vary between attempts.
                    let state = match &e {
                        QmpError::Connect { source, .. } => format!("{:?}", source.kind()),
                        other => other.to_string(),
                    };
                    if self.unreachable.as_deref() != Some(state.as_str()) {
                        let msg = format!(
                            "{e}; waiting for it (retrying every {} s at most)",
                            MAX_BACKOFF.as_secs()
                        );
                        self.unreachable = Some(state);
                        if !self.emit.emit(warn_note(msg)) {
                            return;
                        }
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// One connection, from the clock offset to its end.
    async fn session(&mut self, mut reader: QmpReader, mut writer: OwnedWriteHalf) -> Ended {
        let offset = measure_wall_minus_mono();
        let reconnect = self.connections > 0;
        self.connections += 1;
        if !self.emit.emit(Event::ClockOffset {
            ts_ns: monotonic_ns(),
            source: format!("qmp:{}", self.path.display()),
            wall_minus_mono_ns: offset,
        }) {
            return Ended::Stop;
        }
        if reconnect {
            let note = Event::Note {
                ts_ns: monotonic_ns(),
                level: "info".to_owned(),
                message: format!(
                    "QMP {}: connected again (reconnect {})",
                    self.origin,
                    self.connections - 1
                ),
            };
            if !self.emit.emit(note) {
                return Ended::Stop;
            }
        }
        for c in self.tr.connected(offset) {
            if let Err(e) = writer.write_all(format!("{c}\n").as_bytes()).await {
                return Ended::Lost(format!("cannot send the first queries ({e})"));
            }
        }
        loop {
            match reader.next_line_async().await {
                Ok(Some(line)) => {
                    let (events, cmds) = self.tr.line(&line);
                    for ev in events {
                        if !self.emit.emit(ev) {
                            return Ended::Stop;
                        }
                    }
                    for c in cmds {
                        if let Err(e) = writer.write_all(format!("{c}\n").as_bytes()).await {
                            return Ended::Lost(format!("cannot send a query ({e})"));
                        }
                    }
                }
                Ok(None) => return Ended::Lost("QEMU closed the socket".into()),
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    self.tr.skipped += 1;
                    crate::skipped::count("qmp", "too_long");
                    return Ended::Lost(format!(
                        "dropped the connection: {e} ({} skipped so far)",
                        self.tr.skipped()
                    ));
                }
                Err(e) => return Ended::Lost(format!("read failed: {e}")),
            }
        }
    }
}

/// Follows a QMP socket until the receiver is gone or the task is dropped: waits for the socket to appear, and
/// connects again whenever it goes away (QEMU restarted, or a destination started at migration time). A socket that is
/// there already is connected to first. Spawn it on the watch's runtime (`Sources::spawn`).
pub async fn follow(path: PathBuf, emit: impl Emit) {
    Follower::start(path, emit).await.run().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A QMP event line at `ms` milliseconds of wall time.
    fn qev(name: &str, ms: i64, data: &str) -> String {
        let data = if data.is_empty() {
            String::new()
        } else {
            format!(r#", "data": {data}"#)
        };
        format!(
            r#"{{"event": "{name}"{data}, "timestamp": {{"seconds": {}, "microseconds": {}}}}}"#,
            ms / 1000,
            ms % 1000 * 1000
        )
    }

    /// Feeds lines to a translator, answering its commands: `query-migrate` with the next of `migrate` replies,
    /// `query-status` with `status`, `query-rx-filter` with `mac`. Returns the events.
    struct Qemu {
        tr: QmpTranslator,
        status: &'static str,
        migrate: Vec<String>,
        events: Vec<Event>,
    }

    impl Qemu {
        fn new(name: &str, status: &'static str) -> Self {
            let mut q = Self {
                tr: QmpTranslator::new(Path::new(name), 0),
                status,
                migrate: Vec::new(),
                events: Vec::new(),
            };
            let cmds = q.tr.connected(0);
            q.answer(cmds);
            q
        }

        fn answer(&mut self, cmds: Vec<String>) {
            for c in cmds {
                let v: Value = serde_json::from_str(&c).unwrap();
                let id = v["id"].as_str().unwrap().to_owned();
                let ret = match v["execute"].as_str().unwrap() {
                    "query-status" => format!(r#"{{"status": "{}", "running": false}}"#, self.status),
                    "query-rx-filter" => r#"[{"name": "net0", "main-mac": "52:54:00:AA:00:01"}]"#.to_owned(),
                    "query-migrate" => self.migrate.remove(0),
                    _ => "{}".to_owned(),
                };
                self.feed(&format!(r#"{{"return": {ret}, "id": "{id}"}}"#));
            }
        }

        fn feed(&mut self, line: &str) {
            let (events, cmds) = self.tr.line(line);
            self.events.extend(events);
            self.answer(cmds);
        }

        fn phases(&self) -> Vec<(String, Role, Phase, u64)> {
            self.events
                .iter()
                .filter_map(|e| match e {
                    Event::Migration { ev, .. } => {
                        Some((ev.migration_id.clone(), ev.role, ev.phase.clone(), ev.ts_ns))
                    }
                    _ => None,
                })
                .collect()
        }
    }

    fn migrate_reply(transferred: u64, normal: u64) -> String {
        format!(
            r#"{{"status": "active", "ram": {{"transferred": {transferred}, "normal": {normal}, "mbps": 800}}}}"#
        )
    }

    fn done_reply(transferred: u64, normal: u64) -> String {
        format!(
            r#"{{"status": "completed", "total-time": 470, "downtime": 9, "ram": {{"transferred": {transferred}, "normal": {normal}, "mbps": 800}}}}"#
        )
    }

    /// The destination's side of one migration: its MIGRATION statuses, then its RESUME at `resume_ms`.
    fn destination(resume_ms: i64) -> Qemu {
        let mut dst = Qemu::new("/run/b.qmp", "inmigrate");
        dst.feed(&qev("MIGRATION", 1000, r#"{"status": "active"}"#));
        dst.feed(&qev("MIGRATION", resume_ms - 5, r#"{"status": "completed"}"#));
        dst.feed(&qev("RESUME", resume_ms, ""));
        dst
    }

    fn correlate(a: &Qemu, b: &Qemu) -> migmon_analysis::correlate::Analysis {
        let all: Vec<Event> = a.events.iter().chain(&b.events).cloned().collect();
        migmon_analysis::correlate::correlate(&all)
    }

    #[test]
    fn converts_wall_to_monotonic() {
        let v: Value = serde_json::from_str(r#"{"seconds": 100, "microseconds": 250}"#).unwrap();
        assert_eq!(qmp_timestamp_to_mono(&v, 40_000_000_000), Some(60_000_250_000));
        assert_eq!(
            qmp_timestamp_to_mono(&serde_json::json!({"seconds": -1, "microseconds": 0}), 0),
            None
        );
    }

    #[test]
    fn stop_and_cont_is_one_window() {
        let mut src = Qemu::new("/run/a.qmp", "running");
        src.feed(&qev("STOP", 2000, ""));
        src.feed(&qev("RESUME", 2500, ""));
        let p = src.phases();
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!((p[0].2.clone(), p[1].2.clone()), (Phase::Pause, Phase::Resume));
        assert_eq!(p[0].0, p[1].0);
        assert_eq!(p[1].3 - p[0].3, 500_000_000);
        assert!(
            matches!(&src.events[0], Event::Migration { ev, source: PauseSource::Qmp } if ev.mac == "52:54:00:aa:00:01")
        );
    }

    #[test]
    fn live_migration_is_one_migration_with_rounds_from_query_migrate() {
        let mut src = Qemu::new("/run/a.qmp", "running");
        src.migrate = vec![
            migrate_reply(1000, 0),
            migrate_reply(40_000_000, 9000),
            migrate_reply(41_000_000, 9200),
            done_reply(41_500_000, 9300),
        ];
        src.feed(&qev("MIGRATION", 1000, r#"{"status": "setup"}"#));
        src.feed(&qev("MIGRATION_PASS", 1001, r#"{"pass": 1}"#));
        src.feed(&qev("MIGRATION", 1002, r#"{"status": "active"}"#));
        src.feed(&qev("MIGRATION_PASS", 1400, r#"{"pass": 2}"#));
        src.feed(&qev("MIGRATION_PASS", 1420, r#"{"pass": 3}"#));
        src.feed(&qev("STOP", 1425, ""));
        src.feed(&qev("MIGRATION", 1430, r#"{"status": "completed"}"#));
        let p = src.phases();
        let names: Vec<&Phase> = p.iter().map(|x| &x.2).collect();
        assert!(matches!(names[0], Phase::Setup { mode: Mode::Live, .. }), "{p:?}");
        assert_eq!(
            *names[1],
            Phase::Round {
                n: 0,
                pages: 9000,
                bytes: 39_999_000,
                bandwidth: 100_000_000
            }
        );
        assert!(matches!(
            names[2],
            Phase::Round {
                n: 1,
                bytes: 1_000_000,
                ..
            }
        ));
        assert_eq!(*names[3], Phase::Pause);
        assert!(matches!(
            names[4],
            Phase::Round {
                n: 2,
                bytes: 500_000,
                pages: 100,
                ..
            }
        ));
        assert!(matches!(
            names[5],
            Phase::Complete {
                bytes: 41_500_000,
                ..
            }
        ));
        assert!(p.iter().all(|x| x.0 == "qmp:a.qmp:1" && x.1 == Role::Source));

        let dst = destination(1450);
        let dp = dst.phases();
        assert_eq!(
            dp.len(),
            1,
            "the destination's MIGRATION events open nothing: {dp:?}"
        );
        assert_eq!((dp[0].1, &dp[0].2), (Role::Destination, &Phase::Resume));

        let a = correlate(&src, &dst);
        assert_eq!(a.migrations.len(), 1, "{:?}", a.migrations);
        let m = &a.migrations[0];
        assert_eq!(m.mode.as_deref(), Some("live"));
        assert_eq!(m.timeline.rounds.len(), 3);
        assert_eq!(m.downtime.vcpu_pause.as_ref().unwrap().ns, 25_000_000);
    }

    #[test]
    fn stop_then_migrate_then_cont_is_one_quick_migration() {
        let mut src = Qemu::new("/run/a.qmp", "running");
        src.migrate = vec![migrate_reply(10, 0), done_reply(2_000_000, 300)];
        src.feed(&qev("STOP", 1000, ""));
        // A hold, then the migration.
        src.feed(&qev("MIGRATION", 3000, r#"{"status": "setup"}"#));
        src.feed(&qev("MIGRATION_PASS", 3001, r#"{"pass": 1}"#));
        src.feed(&qev("MIGRATION", 3002, r#"{"status": "active"}"#));
        src.feed(&qev("MIGRATION", 3300, r#"{"status": "completed"}"#));
        let p = src.phases();
        assert!(
            matches!(
                p[1].2,
                Phase::Setup {
                    mode: Mode::Quick,
                    ..
                }
            ),
            "{p:?}"
        );
        assert!(p.iter().all(|x| x.0 == "qmp:a.qmp:1"), "one window: {p:?}");
        assert!(
            matches!(
                p[2].2,
                Phase::Round {
                    n: 0,
                    bytes: 1_999_990,
                    ..
                }
            ),
            "{p:?}"
        );

        // The destination stays paused after the incoming migration; `cont` there resumes it.
        let dst = destination(3800);
        let a = correlate(&src, &dst);
        assert_eq!(a.migrations.len(), 1, "{:?}", a.migrations);
        let m = &a.migrations[0];
        assert_eq!(m.mode.as_deref(), Some("quick"));
        assert_eq!(m.timeline.rounds.len(), 1);
        assert_eq!(
            m.downtime.vcpu_pause.as_ref().unwrap().ns,
            2_800_000_000,
            "STOP to the destination's RESUME"
        );
    }

    #[test]
    fn a_failed_live_migration_ends_its_window() {
        let mut src = Qemu::new("/run/a.qmp", "running");
        src.feed(&qev("MIGRATION", 1000, r#"{"status": "setup"}"#));
        src.feed(&qev("MIGRATION", 1100, r#"{"status": "failed"}"#));
        src.feed(&qev("STOP", 2000, ""));
        src.feed(&qev("RESUME", 2100, ""));
        let p = src.phases();
        assert!(matches!(p[1].2, Phase::Failed { .. }));
        assert_eq!(
            p[2].0, "qmp:a.qmp:2",
            "a later stop is a window of its own: {p:?}"
        );
        assert_eq!(p[3].0, "qmp:a.qmp:2");
        assert_eq!(p[3].1, Role::Source);
    }

    #[test]
    fn a_restarted_qemu_never_reuses_an_id() {
        let mut q = Qemu::new("/run/a.qmp", "running");
        q.feed(&qev("STOP", 1000, ""));
        // QEMU dies while stopped and comes back as a migration's destination.
        q.status = "inmigrate";
        let cmds = q.tr.connected(0);
        q.answer(cmds);
        q.feed(&qev("MIGRATION", 2000, r#"{"status": "setup"}"#));
        q.feed(&qev("MIGRATION", 2100, r#"{"status": "completed"}"#));
        q.feed(&qev("RESUME", 2200, ""));
        let p = q.phases();
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!((p[1].0.as_str(), p[1].1), ("qmp:a.qmp:in1", Role::Destination));
    }

    /// A QMP server that sends a line over the bound, then garbage and dies, then a STOP: each bad connection costs
    /// a warning and a reconnect, and the follower reads the last connection's events.
    #[test]
    fn an_overlong_line_a_dying_connection_or_a_bad_greeting_costs_a_reconnect() {
        use std::{
            io::{BufRead, Write},
            os::unix::net::UnixListener,
            sync::mpsc,
            thread,
            time::Instant,
        };
        let dir = std::env::temp_dir().join(format!("migmon-qmp-bad-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("bad.qmp");
        let (tx, rx) = mpsc::channel();
        // The socket does not exist yet: the follower says it waits for it.
        let before = crate::skipped::snapshot();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let handle = rt.spawn(follow(sock.clone(), tx));
        let mut got: Vec<Event> = Vec::new();
        let recv_until = |got: &mut Vec<Event>, done: &dyn Fn(&[Event]) -> bool| {
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline && !done(got) {
                if let Ok(ev) = rx.recv_timeout(Duration::from_millis(100)) {
                    got.push(ev);
                }
            }
        };
        let note_has = |got: &[Event], s: &str| {
            got.iter()
                .any(|e| matches!(e, Event::Note { message, .. } if message.contains(s)))
        };
        recv_until(&mut got, &|g| note_has(g, "waiting for it"));
        let listener = UnixListener::bind(&sock).unwrap();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let server = thread::spawn(move || {
            // Handshake, then read the follower's three first queries, then the test's lines.
            let serve = |lines: &[u8]| {
                let (mut s, _) = listener.accept().unwrap();
                s.write_all(b"{\"QMP\": {\"version\": {}}}\n").unwrap();
                let mut r = std::io::BufReader::new(s.try_clone().unwrap());
                let mut l = String::new();
                r.read_line(&mut l).unwrap();
                s.write_all(b"{\"return\": {}}\n").unwrap();
                for _ in 0..3 {
                    r.read_line(&mut l).unwrap();
                }
                // The follower may drop the connection in the middle of an overlong line.
                let _ = s.write_all(lines);
                s
            };
            drop(serve(&vec![b'x'; 2 << 20]));
            drop(serve(b"garbage\n"));
            // Greetings that are not QMP: bytes that are not UTF-8, a line over the bound, none at all (the
            // follower gives up after its handshake bound and closes).
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"\xff\xfe\x00garbage\n").unwrap();
            drop(s);
            let (mut s, _) = listener.accept().unwrap();
            let _ = s.write_all(&vec![b'{'; 2 << 20]);
            drop(s);
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let _ = std::io::Read::read(&mut s, &mut [0u8; 64]);
            drop(s);
            let _keep =
                serve(b"{\"event\": \"STOP\", \"timestamp\": {\"seconds\": 1, \"microseconds\": 0}}\n");
            let _ = done_rx.recv_timeout(Duration::from_secs(20));
        });
        recv_until(&mut got, &|g| {
            g.iter().any(|e| matches!(e, Event::Migration { .. }))
        });
        let after = crate::skipped::snapshot();
        handle.abort();
        let _ = done_tx.send(());
        server.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        for want in [
            "a line longer than 1048576 bytes",
            "skipped malformed QMP line",
            "QEMU closed the socket",
            "not QMP",
            "I/O error during the handshake",
            "no answer within 5 s",
            "reconnect 2",
        ] {
            assert!(note_has(&got, want), "{want}: {got:#?}");
        }
        // Each connection lost and each failed handshake is counted (other tests of this process count too).
        let grew = |reason| {
            after.get(&("qmp", reason)).copied().unwrap_or(0)
                - before.get(&("qmp", reason)).copied().unwrap_or(0)
        };
        assert!(grew("connection_lost") >= 2, "{before:?} → {after:?}");
        assert!(grew("handshake") >= 3, "{before:?} → {after:?}");
        assert!(grew("too_long") >= 1, "{before:?} → {after:?}");
        assert!(
            got.iter()
                .any(|e| matches!(e, Event::Migration { ev, .. } if ev.phase == Phase::Pause))
        );
        assert_eq!(
            got.iter()
                .filter(|e| matches!(e, Event::ClockOffset { .. }))
                .count(),
            3,
            "one offset per connection"
        );
    }

    #[test]
    fn malformed_lines_are_counted_warnings_naming_source_and_line() {
        let mut t = QmpTranslator::new(Path::new("/run/a.qmp"), 0);
        t.line(r#"{"QMP": {}}"#);
        let (e, _) = t.line("{\"event\": \"STOP\", ");
        let Event::Note { level, message, .. } = &e[0] else {
            panic!()
        };
        assert_eq!(level, "warning");
        assert!(message.contains("/run/a.qmp line 2"), "{message}");
        assert!(message.contains("1 skipped so far"), "{message}");
        let (e, _) = t.line("[1,2]");
        assert!(matches!(&e[0], Event::Note { message, .. } if message.contains("line 3")));
        t.line(r#"{"neither": 1}"#);
        assert_eq!(t.skipped(), 3);
    }
}
