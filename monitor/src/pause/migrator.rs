//! Pause windows from our migrator's event stream (`migevents` JSON lines), over a unix socket that migrators
//! connect to (`migmon watch --events-listen PATH`) or from a file that is followed as it grows
//! (`migmon watch --events FILE`).
//!
//! A line that does not parse is skipped with a warning note naming the source and the line number; the source keeps
//! running.

use std::{
    fs::{self, File},
    future::Future,
    io::{self, BufRead, BufReader},
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use migevents::MigrationEvent;
use tokio::{
    net::{UnixListener, UnixStream},
    task::JoinSet,
};

use super::{Emit, LineReader, warn_note};
use migmon_analysis::trace::{Event, PauseSource};

/// How often a followed file is read again at its end (and looked for before it exists).
const POLL: Duration = Duration::from_millis(100);

/// Errors starting a migrator event source.
#[derive(Debug, thiserror::Error)]
pub enum MigratorSourceError {
    #[error("{} exists and is not a socket: remove it or choose another --events-listen path", path.display())]
    NotASocket { path: PathBuf },
    #[error("cannot remove the stale socket {}", path.display())]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on {}: check the directory exists and is writable", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot set mode 0600 on {}", path.display())]
    Chmod {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Turns one line into an event, or a warning note naming where it came from.
pub(crate) fn parse_line(line: &str, origin: &str, lineno: usize) -> Option<Event> {
    let line = line.trim();
    if line.is_empty() {
        return None;
    }
    Some(match MigrationEvent::from_line(line) {
        Ok(ev) if ev.ts_ns > migmon_analysis::trace::MAX_TRACE_NS => {
            crate::skipped::count("migrator", "bad_time");
            warn_note(format!(
                "skipped migration event from {origin} line {lineno}: its time {} ns is beyond any monotonic clock",
                ev.ts_ns
            ))
        }
        Ok(ev) => Event::Migration {
            ev,
            source: PauseSource::Migrator,
        },
        Err(e) => {
            crate::skipped::count("migrator", "malformed");
            let cause = std::error::Error::source(&e).map_or_else(|| e.to_string(), ToString::to_string);
            warn_note(format!(
                "skipped malformed migration event from {origin} line {lineno}: {cause}"
            ))
        }
    })
}

/// Binds a unix socket (mode 0600) for migrators and returns the task that serves it: each connection sends JSON
/// lines. The socket file is removed when the task ends or is dropped.
pub fn listen(
    path: &Path,
    emit: impl Emit,
) -> Result<impl Future<Output = ()> + Send + 'static, MigratorSourceError> {
    if let Ok(meta) = fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(MigratorSourceError::NotASocket {
                path: path.to_owned(),
            });
        }
        fs::remove_file(path).map_err(|source| MigratorSourceError::RemoveStale {
            path: path.to_owned(),
            source,
        })?;
    }
    let bind_err = |source| MigratorSourceError::Bind {
        path: path.to_owned(),
        source,
    };
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(bind_err)?;
    let socket = SocketFile(path.to_owned());
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(|source| {
        MigratorSourceError::Chmod {
            path: path.to_owned(),
            source,
        }
    })?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    Ok(serve(listener, socket, Arc::new(emit)))
}

/// Removes the socket file when the listening task is dropped.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Accepts migrators until dropped; every connection is a task of its own, dropped with this one.
async fn serve(listener: std::os::unix::net::UnixListener, socket: SocketFile, emit: Arc<impl Emit>) {
    let listener = match UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            emit.emit(warn_note(format!(
                "cannot serve migrator events on {}: {e}",
                socket.0.display()
            )));
            return;
        }
    };
    let mut connections = JoinSet::new();
    let mut conn_no = 0usize;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    conn_no += 1;
                    let origin = format!("{} connection {conn_no}", socket.0.display());
                    connections.spawn(read_connection(stream, origin, emit.clone()));
                }
                Err(e) => {
                    // Out of file descriptors, typically: say so and keep serving after a pause.
                    if !emit.emit(warn_note(format!("accept on {} failed: {e}", socket.0.display()))) {
                        return;
                    }
                    tokio::time::sleep(POLL).await;
                }
            },
            // Reap the connections that ended.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// One migrator's connection: a malformed line is a warning note; a line over the bound or a read error ends the
/// connection with a warning (the migrator connects again).
async fn read_connection(stream: UnixStream, origin: String, emit: Arc<impl Emit>) {
    let mut reader = LineReader::new(stream);
    let mut lineno = 0;
    loop {
        match reader.next_line_async().await {
            Ok(Some(line)) => {
                lineno += 1;
                if let Some(ev) = parse_line(&line, &origin, lineno)
                    && !emit.emit(ev)
                {
                    return;
                }
            }
            Ok(None) => {
                // EOF: a last line without a newline still counts.
                if let Some(line) = reader.take_partial() {
                    lineno += 1;
                    if let Some(ev) = parse_line(&line, &origin, lineno) {
                        emit.emit(ev);
                    }
                }
                return;
            }
            Err(e) => {
                crate::skipped::count(
                    "migrator",
                    if e.kind() == io::ErrorKind::InvalidData {
                        "too_long"
                    } else {
                        "connection_lost"
                    },
                );
                emit.emit(warn_note(format!(
                    "reading {origin} failed after line {lineno}: {e}; the connection is dropped"
                )));
                return;
            }
        }
    }
}

/// Follows a file of JSON lines as it grows (waiting for it to appear), until dropped. A line over the bound is
/// skipped (counted, with a warning) and the lines after it are read; a read error is counted, warned about once
/// per run of failures, and the read tried again.
pub async fn follow_file(path: PathBuf, emit: impl Emit) {
    let origin = path.display().to_string();
    let file = loop {
        match tokio::fs::File::open(&path).await {
            Ok(f) => break f,
            Err(_) => tokio::time::sleep(POLL).await,
        }
    };
    let mut reader = LineReader::new(file);
    let mut lineno = 0;
    let mut failing = false;
    loop {
        let read = reader.next_line_async().await;
        if read.is_ok() {
            failing = false;
        }
        match read {
            Ok(Some(line)) => {
                lineno += 1;
                if let Some(ev) = parse_line(&line, &origin, lineno)
                    && !emit.emit(ev)
                {
                    return;
                }
            }
            // At the end for now: the writer may append more (the partial line stays buffered).
            Ok(None) => tokio::time::sleep(POLL).await,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                lineno += 1;
                crate::skipped::count("migrator", "too_long");
                if !emit.emit(warn_note(format!(
                    "skipped line {lineno} of {origin}: {e}; the lines after it are read"
                ))) {
                    return;
                }
            }
            Err(e) => {
                crate::skipped::count("migrator", "read_error");
                if !failing
                    && !emit.emit(warn_note(format!(
                        "reading {origin} failed after line {lineno}: {e}; trying again"
                    )))
                {
                    return;
                }
                failing = true;
                tokio::time::sleep(POLL).await;
            }
        }
    }
}

/// Reads a whole file of JSON lines at once (for offline use and tests).
pub fn read_file(path: &Path) -> io::Result<Vec<Event>> {
    let origin = path.display().to_string();
    let reader = BufReader::new(File::open(path)?);
    let mut out = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        if let Some(ev) = parse_line(&line?, &origin, i + 1) {
            out.push(ev);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::{io::Write, os::unix::net::UnixStream, sync::mpsc, time::Instant};

    use migevents::{EventSink, Phase, Role};

    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("migmon-src-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn recv_until(rx: &mpsc::Receiver<Event>, n: usize) -> Vec<Event> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut out = Vec::new();
        while out.len() < n && Instant::now() < deadline {
            if let Ok(ev) = rx.recv_timeout(Duration::from_millis(200)) {
                out.push(ev);
            }
        }
        out
    }

    #[test]
    fn socket_is_0600_and_carries_events_and_warnings() {
        let dir = tmp("sock");
        let path = dir.join("events.sock");
        let (tx, rx) = mpsc::channel();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let h = rt.spawn(listen(&path, tx).unwrap());
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        let mut sink = EventSink::open(&path).unwrap();
        sink.send(&MigrationEvent::now(
            "m1",
            "52:54:00:00:00:01",
            Role::Source,
            Phase::Pause,
        ))
        .unwrap();
        let mut raw = UnixStream::connect(&path).unwrap();
        raw.write_all(b"{not json}\n").unwrap();
        drop(raw);
        sink.send(&MigrationEvent::now(
            "m1",
            "52:54:00:00:00:01",
            Role::Destination,
            Phase::Resume,
        ))
        .unwrap();
        let got = recv_until(&rx, 3);
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(got.iter().any(|e| matches!(e, Event::Migration { ev, source } if ev.phase == Phase::Pause && *source == PauseSource::Migrator)));
        assert!(
            got.iter()
                .any(|e| matches!(e, Event::Migration { ev, .. } if ev.phase == Phase::Resume))
        );
        let warn = got
            .iter()
            .find_map(|e| match e {
                Event::Note { message, .. } => Some(message.clone()),
                _ => None,
            })
            .unwrap();
        assert!(warn.contains("events.sock connection 2 line 1"), "{warn}");
        h.abort();
        rt.block_on(async { assert!(h.await.unwrap_err().is_cancelled()) });
        assert!(!path.exists(), "the socket is removed on stop");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_overlong_line_drops_its_connection_only() {
        let dir = tmp("long");
        let path = dir.join("events.sock");
        let (tx, rx) = mpsc::channel();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let _h = rt.spawn(listen(&path, tx).unwrap());
        let mut long = UnixStream::connect(&path).unwrap();
        // The reader drops the connection in the middle of it.
        let _ = long.write_all(&vec![b'x'; 2 * super::super::MAX_LINE]);
        let got = recv_until(&rx, 1);
        assert!(
            matches!(&got[..], [Event::Note { message, .. }] if message.contains("connection 1") && message.contains("longer than")),
            "{got:?}"
        );
        let mut sink = EventSink::open(&path).unwrap();
        sink.send(&MigrationEvent::now(
            "m3",
            "52:54:00:00:00:03",
            Role::Source,
            Phase::Pause,
        ))
        .unwrap();
        let got = recv_until(&rx, 1);
        assert!(matches!(&got[..], [Event::Migration { .. }]), "{got:?}");
        drop(rt);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn follows_a_growing_file_with_a_partial_line() {
        let dir = tmp("file");
        let path = dir.join("events.jsonl");
        let (tx, rx) = mpsc::channel();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let h = rt.spawn(follow_file(path.clone(), tx));
        let line = MigrationEvent::now("m2", "52:54:00:00:00:02", Role::Source, Phase::Pause).to_line();
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(&line.as_bytes()[..10]).unwrap();
        f.flush().unwrap();
        // Half a line is not an event yet; the rest completes it.
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
        f.write_all(format!("{}\ngarbage\n", &line[10..]).as_bytes())
            .unwrap();
        f.flush().unwrap();
        let got = recv_until(&rx, 2);
        assert!(matches!(&got[0], Event::Migration { ev, .. } if ev.migration_id == "m2"));
        assert!(matches!(&got[1], Event::Note { message, .. } if message.contains("events.jsonl line 2")));
        h.abort();
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_followed_file_goes_on_after_an_overlong_line() {
        let dir = tmp("file-long");
        let path = dir.join("events.jsonl");
        let line = MigrationEvent::now("m4", "52:54:00:00:00:04", Role::Source, Phase::Pause).to_line();
        let mut text = vec![b'x'; 3 * super::super::MAX_LINE];
        text.push(b'\n');
        text.extend_from_slice(line.as_bytes());
        text.push(b'\n');
        fs::write(&path, text).unwrap();
        let (tx, rx) = mpsc::channel();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let _h = rt.spawn(follow_file(path.clone(), tx));
        let got = recv_until(&rx, 2);
        assert!(
            matches!(&got[0], Event::Note { message, .. } if message.contains("skipped line 1") && message.contains("longer than")),
            "{got:?}"
        );
        assert!(
            matches!(&got[1], Event::Migration { ev, .. } if ev.migration_id == "m4"),
            "{got:?}"
        );
        drop(rt);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_to_replace_a_regular_file() {
        let dir = tmp("notsock");
        let path = dir.join("x");
        fs::write(&path, "data").unwrap();
        let (tx, _rx) = mpsc::channel();
        assert!(matches!(
            listen(&path, tx),
            Err(MigratorSourceError::NotASocket { .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}
