//! Pause windows from QEMU's QMP (`migmon watch --qmp PATH`, repeatable).
//!
//! The follower connects to a QMP unix socket, negotiates capabilities, turns on the `events` migration capability
//! (so QEMU reports MIGRATION status changes), asks for the VM's MAC (`query-rx-filter`) and state
//! (`query-status`), and then turns events into migration phases:
//!
//! | QMP | phase |
//! |---|---|
//! | `MIGRATION` status `setup` | `setup` (mode live) |
//! | `MIGRATION_PASS` | `round {n}` |
//! | `STOP` | `pause` |
//! | `RESUME` | `resume` |
//! | `MIGRATION` status `completed` | `complete` (figures from `query-migrate`) |
//! | `MIGRATION` status `failed` / `cancelled` | `failed` |
//!
//! QMP stamps events with the wall clock. The follower measures `wall - CLOCK_MONOTONIC` once at connect, emits it
//! as a `clock_offset` event (so the trace records it), and converts every timestamp with it.
//!
//! Ids: a STOP opens window `qmp:NAME:N` (NAME is the socket's file name); a RESUME on the same QEMU closes it. A
//! RESUME on a QEMU that never stopped (a migration destination) gets its own id with role `destination`; the
//! correlation joins it to the source's pause by MAC.

use std::{
    collections::HashMap,
    io::{self, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use migevents::{MigrationEvent, Mode, Phase, Role, monotonic_ns};
use serde_json::{Value, json};

use super::{Emit, LineReader, SourceHandle, warn_note};
use migmon_analysis::trace::{Event, PauseSource};

const POLL: Duration = Duration::from_millis(100);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors connecting to QMP.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to the QMP socket {}: is QEMU running with `-qmp unix:{},server=on,wait=off`?", path.display(), path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("QMP on {}: {what}", path.display())]
    Handshake { path: PathBuf, what: String },
    #[error("QMP on {}: I/O error during the handshake", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the QMP thread")]
    Spawn(#[source] io::Error),
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

/// Turns QMP lines into events. Pure, so it is tested without a QEMU.
pub struct QmpTranslator {
    name: String,
    origin: String,
    wall_minus_mono: i64,
    mac: String,
    windows: u32,
    current: Option<String>,
    /// A migration `setup` opened an id that the coming STOP uses.
    setup_open: bool,
    incoming: u32,
    lineno: usize,
    /// Outstanding commands by id.
    pending: HashMap<String, &'static str>,
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
            setup_open: false,
            incoming: 0,
            lineno: 0,
            pending: HashMap::new(),
        }
    }

    /// The commands to send after capabilities negotiation (each a JSON line), recorded as pending.
    pub fn initial_commands(&mut self) -> Vec<String> {
        let cmds = [
            (
                "migmon-caps",
                "caps",
                json!({"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability": "events", "state": true}]}}),
            ),
            ("migmon-mac", "mac", json!({"execute": "query-rx-filter"})),
            ("migmon-status", "status", json!({"execute": "query-status"})),
        ];
        cmds.into_iter()
            .map(|(id, kind, mut v)| {
                v["id"] = json!(id);
                self.pending.insert(id.to_owned(), kind);
                v.to_string()
            })
            .collect()
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

    fn open_window(&mut self) -> String {
        self.windows += 1;
        let id = format!("qmp:{}:{}", self.name, self.windows);
        self.current = Some(id.clone());
        id
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
        let kind = self.pending.remove(id).unwrap_or("command");
        let desc = v["error"].get("desc").and_then(Value::as_str).unwrap_or("error");
        let note = if kind == "caps" {
            format!(
                "QMP {}: cannot enable migration events ({desc}); MIGRATION phases will be missing",
                self.origin
            )
        } else {
            format!("QMP {}: {kind} failed: {desc}", self.origin)
        };
        warn_note(note)
    }

    /// One QMP event at `ts`: the pause-window events it gives and the commands to send.
    fn event(&mut self, event: &str, ts: u64, data: &Value) -> (Vec<Event>, Vec<String>) {
        let mut out = Vec::new();
        let mut cmds = Vec::new();
        match event {
            "STOP" => {
                let id = if self.setup_open {
                    self.setup_open = false;
                    self.current.clone().unwrap_or_else(|| self.open_window())
                } else {
                    self.open_window()
                };
                out.push(self.migration(ts, &id, Role::Source, Phase::Pause));
            }
            "RESUME" => {
                if let Some(id) = self.current.take() {
                    out.push(self.migration(ts, &id, Role::Source, Phase::Resume));
                } else {
                    self.incoming += 1;
                    let id = format!("qmp:{}:in{}", self.name, self.incoming);
                    out.push(self.migration(ts, &id, Role::Destination, Phase::Resume));
                }
            }
            "MIGRATION_PASS" => {
                let n = data.get("pass").and_then(Value::as_u64).unwrap_or(0) as u32;
                if let Some(id) = self.current.clone() {
                    out.push(self.migration(
                        ts,
                        &id,
                        Role::Source,
                        Phase::Round {
                            n,
                            pages: 0,
                            bytes: 0,
                            bandwidth: 0,
                        },
                    ));
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

    /// A `MIGRATION` event's status: setup opens a window, completed asks for the figures, failed ends it.
    fn migration_status(&mut self, status: &str, ts: u64, out: &mut Vec<Event>, cmds: &mut Vec<String>) {
        match status {
            "setup" => {
                let id = self.open_window();
                self.setup_open = true;
                out.push(self.migration(
                    ts,
                    &id,
                    Role::Source,
                    Phase::Setup {
                        mode: Mode::Live,
                        ram_bytes: 0,
                        ips: Vec::new(),
                        host: self.name.clone(),
                        // QEMU drops the frames that reach the old tap during the pause.
                        carries_frames: false,
                    },
                ));
            }
            "completed" => {
                self.pending.insert("migmon-done".into(), "done");
                cmds.push(json!({"execute": "query-migrate", "id": "migmon-done"}).to_string());
            }
            status @ ("failed" | "cancelled") => {
                let id = self
                    .current
                    .clone()
                    .unwrap_or_else(|| format!("qmp:{}:{}", self.name, self.windows));
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
            Some("mac") => {
                if let Some(mac) = ret.as_array().and_then(|a| {
                    a.iter()
                        .find_map(|nic| nic.get("main-mac").and_then(Value::as_str))
                }) {
                    self.mac = mac.to_ascii_lowercase();
                }
                (Vec::new(), Vec::new())
            }
            Some("done") => {
                // The source stays stopped after completing: its window has no resume of its own.
                let id = self
                    .current
                    .clone()
                    .unwrap_or_else(|| format!("qmp:{}:{}", self.name, self.windows.max(1)));
                let bytes = ret
                    .pointer("/ram/transferred")
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
                let total_ms = ret.get("total-time").and_then(Value::as_f64).unwrap_or(0.0);
                let pause_ms = ret.get("downtime").and_then(Value::as_f64).unwrap_or(0.0);
                let ev = self.migration(
                    monotonic_ns(),
                    &id,
                    Role::Source,
                    Phase::Complete {
                        total_ms,
                        pause_ms,
                        bytes,
                    },
                );
                self.current = None;
                (vec![ev], Vec::new())
            }
            _ => (Vec::new(), Vec::new()),
        }
    }

    fn skip(&self, why: &str) -> Event {
        warn_note(format!(
            "skipped malformed QMP line from {} line {}: {why}",
            self.origin, self.lineno
        ))
    }
}

/// The QMP greeting, then the capabilities negotiation, within [`HANDSHAKE_TIMEOUT`].
fn handshake(
    path: &Path,
    reader: &mut LineReader<UnixStream>,
    writer: &mut UnixStream,
) -> Result<(), QmpError> {
    let io_err = |source| QmpError::Io {
        path: path.to_owned(),
        source,
    };
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let read_json = |reader: &mut LineReader<UnixStream>| -> Result<Value, QmpError> {
        loop {
            if Instant::now() > deadline {
                return Err(QmpError::Handshake {
                    path: path.to_owned(),
                    what: "no answer within 5 s: is this a QMP socket?".into(),
                });
            }
            match reader.next_line() {
                Ok(Some(l)) => {
                    return serde_json::from_str(&l).map_err(|e| QmpError::Handshake {
                        path: path.to_owned(),
                        what: format!("not QMP ({e})"),
                    });
                }
                Ok(None) => {
                    return Err(QmpError::Handshake {
                        path: path.to_owned(),
                        what: "closed during the handshake (another client may hold it: QMP serves one at a time)"
                            .into(),
                    });
                }
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(e) => return Err(io_err(e)),
            }
        }
    };
    let greeting = read_json(reader)?;
    if greeting.get("QMP").is_none() {
        return Err(QmpError::Handshake {
            path: path.to_owned(),
            what: "no QMP greeting".into(),
        });
    }
    writer
        .write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
        .map_err(io_err)?;
    let ack = read_json(reader)?;
    if ack.get("return").is_none() {
        return Err(QmpError::Handshake {
            path: path.to_owned(),
            what: format!("capabilities negotiation refused: {ack}"),
        });
    }

    Ok(())
}

/// Connects to a QMP socket and follows it on a thread until stopped or until QEMU closes the socket.
pub fn follow(path: &Path, emit: impl Emit) -> Result<SourceHandle, QmpError> {
    let stream = UnixStream::connect(path).map_err(|source| QmpError::Connect {
        path: path.to_owned(),
        source,
    })?;
    let io_err = |source| QmpError::Io {
        path: path.to_owned(),
        source,
    };
    stream.set_read_timeout(Some(POLL)).map_err(io_err)?;
    let mut writer = stream.try_clone().map_err(io_err)?;
    let mut reader = LineReader::new(stream);

    handshake(path, &mut reader, &mut writer)?;

    let offset = measure_wall_minus_mono();
    let mut tr = QmpTranslator::new(path, offset);
    let source_name = format!("qmp:{}", path.display());
    for c in tr.initial_commands() {
        writer.write_all(format!("{c}\n").as_bytes()).map_err(io_err)?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let stop_t = stop.clone();
    let origin = path.display().to_string();
    let thread = thread::Builder::new()
        .name("migmon-qmp".into())
        .spawn(move || {
            if !emit.emit(Event::ClockOffset {
                ts_ns: monotonic_ns(),
                source: source_name,
                wall_minus_mono_ns: offset,
            }) {
                return;
            }
            while !stop_t.load(Ordering::Relaxed) {
                match reader.next_line() {
                    Ok(Some(line)) => {
                        let (events, cmds) = tr.line(&line);
                        for ev in events {
                            if !emit.emit(ev) {
                                return;
                            }
                        }
                        for c in cmds {
                            if writer.write_all(format!("{c}\n").as_bytes()).is_err() {
                                emit.emit(warn_note(format!("QMP {origin}: cannot send a query")));
                            }
                        }
                    }
                    Ok(None) => {
                        emit.emit(warn_note(format!("QMP {origin}: QEMU closed the socket")));
                        return;
                    }
                    Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                    Err(e) => {
                        emit.emit(warn_note(format!("QMP {origin}: read failed: {e}")));
                        return;
                    }
                }
            }
        })
        .map_err(QmpError::Spawn)?;
    Ok(SourceHandle::new(stop, thread))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(secs: i64, us: i64) -> String {
        format!("{{\"seconds\": {secs}, \"microseconds\": {us}}}")
    }

    #[test]
    fn converts_wall_to_monotonic() {
        let v: Value = serde_json::from_str(&ts(100, 250)).unwrap();
        assert_eq!(qmp_timestamp_to_mono(&v, 40_000_000_000), Some(60_000_250_000));
        assert_eq!(
            qmp_timestamp_to_mono(&serde_json::json!({"seconds": -1, "microseconds": 0}), 0),
            None
        );
    }

    #[test]
    #[expect(clippy::many_single_char_names, reason = "short names for one event each")]
    fn stop_resume_and_a_migration_pair() {
        let mut src = QmpTranslator::new(Path::new("/run/a.qmp"), 1_000_000_000);
        src.initial_commands();
        let (e, _) = src
            .line(r#"{"return": [{"name": "net0", "main-mac": "52:54:00:AA:00:01"}], "id": "migmon-mac"}"#);
        assert!(e.is_empty());
        // stop/cont on one QEMU: one window.
        let (p, _) = src.line(&format!(r#"{{"event": "STOP", "timestamp": {}}}"#, ts(2, 0)));
        let (r, _) = src.line(&format!(r#"{{"event": "RESUME", "timestamp": {}}}"#, ts(2, 500)));
        let (Event::Migration { ev: pe, source }, Event::Migration { ev: re, .. }) = (&p[0], &r[0]) else {
            panic!("{p:?} {r:?}")
        };
        assert_eq!(*source, PauseSource::Qmp);
        assert_eq!(pe.phase, Phase::Pause);
        assert_eq!(pe.ts_ns, 1_000_000_000);
        assert_eq!(re.ts_ns, 1_000_500_000);
        assert_eq!(pe.migration_id, re.migration_id);
        assert_eq!(pe.mac, "52:54:00:aa:00:01");

        // A migration: setup, STOP, completed (query-migrate).
        let (s, _) = src.line(&format!(
            r#"{{"event": "MIGRATION", "data": {{"status": "setup"}}, "timestamp": {}}}"#,
            ts(3, 0)
        ));
        let (p2, _) = src.line(&format!(
            r#"{{"event": "STOP", "timestamp": {}}}"#,
            ts(3, 400_000)
        ));
        let (_, cmds) = src.line(&format!(
            r#"{{"event": "MIGRATION", "data": {{"status": "completed"}}, "timestamp": {}}}"#,
            ts(3, 500_000)
        ));
        assert_eq!(cmds.len(), 1);
        let (c, _) = src.line(r#"{"return": {"status": "completed", "total-time": 470, "downtime": 9, "ram": {"transferred": 1234}}, "id": "migmon-done"}"#);
        let id = |e: &Event| match e {
            Event::Migration { ev, .. } => ev.migration_id.clone(),
            _ => String::new(),
        };
        assert_eq!(id(&s[0]), id(&p2[0]));
        assert_eq!(id(&c[0]), id(&p2[0]));
        assert!(
            matches!(&c[0], Event::Migration { ev, .. } if matches!(ev.phase, Phase::Complete { bytes: 1234, .. }))
        );

        // The destination only resumes: its own id, role destination.
        let mut dst = QmpTranslator::new(Path::new("/run/b.qmp"), 1_000_000_000);
        let (r2, _) = dst.line(&format!(
            r#"{{"event": "RESUME", "timestamp": {}}}"#,
            ts(3, 450_000)
        ));
        assert!(
            matches!(&r2[0], Event::Migration { ev, .. } if ev.role == Role::Destination && ev.migration_id == "qmp:b.qmp:in1")
        );
    }

    #[test]
    fn malformed_lines_are_warnings_naming_source_and_line() {
        let mut t = QmpTranslator::new(Path::new("/run/a.qmp"), 0);
        t.line(r#"{"QMP": {}}"#);
        let (e, _) = t.line("{\"event\": \"STOP\", ");
        let Event::Note { level, message, .. } = &e[0] else {
            panic!()
        };
        assert_eq!(level, "warn");
        assert!(message.contains("/run/a.qmp line 2"), "{message}");
        let (e, _) = t.line("[1,2]");
        assert!(matches!(&e[0], Event::Note { message, .. } if message.contains("line 3")));
    }
}
