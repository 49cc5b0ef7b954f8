//! The control socket of a running migrator (`--api PATH`): JSON lines over a unix socket.
//!
//! A client connects, writes one request line and reads response lines:
//!
//! ```text
//! → {"cmd":"status"}
//! ← {"type":"status","state":"running","iteration":0,...}
//!
//! → {"cmd":"migrate","to":"tcp:10.9.0.2:7000","mode":"live","downtime":30000000,...}
//! ← {"type":"progress","state":"precopy","iteration":1,"dirty_pages":812,...}     (repeated)
//! ← {"type":"done","total_ms":121.4,"pause_ms":2.9,...}                           (or {"type":"error",...})
//! ```
//!
//! Status requests are answered by the listener thread at any time, also during a migration. Migrate requests are
//! handed to the thread that owns the VM ([`ApiServer::next_migrate`], see [`crate::service::serve`]), which runs the
//! migration and streams its progress back.

use std::{
    io::{self, BufRead, BufReader, Write},
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        mpsc::{self, Receiver, RecvTimeoutError},
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::engine::{MigrateOptions, MigrationError, MigrationSummary, Status, Tracker};

/// A request line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    Migrate(MigrateOptions),
}

/// A response line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Status(Status),
    Progress(Status),
    Done(MigrationSummary),
    Error { message: String },
}

/// Errors of the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot listen on the API socket {}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot reach the migrator API at {}: is `migrator run --api {}` running?", path.display(), path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the migrator API connection failed")]
    Io(#[source] io::Error),
    #[error("malformed API message {line:?}")]
    Parse {
        line: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the migrator closed the API connection without an answer")]
    NoAnswer,
    #[error("{0}")]
    Remote(String),
}

/// A migrate request waiting for the VM's owner.
pub struct PendingMigrate {
    pub options: MigrateOptions,
    conn: Arc<Mutex<UnixStream>>,
}

fn write_line(conn: &Mutex<UnixStream>, r: &Response) {
    let mut line = serde_json::to_string(r).unwrap_or_default();
    line.push('\n');
    let mut c = conn.lock().unwrap_or_else(PoisonError::into_inner);
    // The client may have gone away (Ctrl-C); the migration goes on regardless.
    let _ignored = c.write_all(line.as_bytes());
}

impl PendingMigrate {
    /// A tracker over the server's status that also streams progress to the requesting client.
    pub fn tracker(&self, status: Arc<Mutex<Status>>) -> Tracker {
        let conn = self.conn.clone();
        Tracker::new(status).with_observer(Arc::new(move |s: &Status| {
            write_line(&conn, &Response::Progress(s.clone()));
        }))
    }

    /// Sends the outcome and closes the connection.
    pub fn finish(self, result: &Result<MigrationSummary, MigrationError>) {
        let r = match result {
            Ok(report) => Response::Done(report.clone()),
            Err(e) => Response::Error {
                message: crate::engine::error_chain(e),
            },
        };
        write_line(&self.conn, &r);
    }
}

/// The listening side, owned by `run` and `receive`.
pub struct ApiServer {
    path: PathBuf,
    status: Arc<Mutex<Status>>,
    rx: Receiver<PendingMigrate>,
}

impl ApiServer {
    /// Binds `path` (replacing a stale socket) and starts the listener thread.
    pub fn bind(path: &Path, status: Arc<Mutex<Status>>) -> Result<Self, ApiError> {
        if std::fs::metadata(path).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type())) {
            let _ignored = std::fs::remove_file(path);
        }
        let listener = UnixListener::bind(path).map_err(|source| ApiError::Bind {
            path: path.to_owned(),
            source,
        })?;
        let (tx, rx) = mpsc::channel();
        let st = status.clone();
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                for conn in listener.incoming().flatten() {
                    handle(conn, &st, &tx);
                }
            })
            .map_err(|source| ApiError::Bind {
                path: path.to_owned(),
                source,
            })?;
        Ok(Self {
            path: path.to_owned(),
            status,
            rx,
        })
    }

    pub fn status(&self) -> Arc<Mutex<Status>> {
        self.status.clone()
    }

    /// The next migrate request, if one comes within `timeout`.
    pub fn next_migrate(&self, timeout: Duration) -> Option<PendingMigrate> {
        match self.rx.recv_timeout(timeout) {
            Ok(p) => Some(p),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                // The listener thread is gone; behave like an API that never gets a request.
                std::thread::sleep(timeout);
                None
            }
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ignored = std::fs::remove_file(&self.path);
    }
}

fn handle(conn: UnixStream, status: &Arc<Mutex<Status>>, tx: &mpsc::Sender<PendingMigrate>) {
    let _ignored = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let Ok(read_half) = conn.try_clone() else {
        return;
    };
    let conn = Arc::new(Mutex::new(conn));
    let mut line = String::new();
    if BufReader::new(read_half).read_line(&mut line).is_err() {
        return;
    }
    match serde_json::from_str::<Request>(line.trim()) {
        Ok(Request::Status) => {
            let s = status.lock().unwrap_or_else(PoisonError::into_inner).clone();
            write_line(&conn, &Response::Status(s));
        }
        Ok(Request::Migrate(options)) => {
            let busy = {
                let s = status.lock().unwrap_or_else(PoisonError::into_inner);
                s.state.is_migrating_out()
            };
            if busy {
                write_line(
                    &conn,
                    &Response::Error {
                        message: "a migration is already running or done on this VM".into(),
                    },
                );
                return;
            }
            if tx
                .send(PendingMigrate {
                    options,
                    conn: conn.clone(),
                })
                .is_err()
            {
                write_line(
                    &conn,
                    &Response::Error {
                        message: "this migrator no longer accepts migrations (the VM stopped)".into(),
                    },
                );
            }
        }
        Err(e) => write_line(
            &conn,
            &Response::Error {
                message: format!("bad request {:?}: {e}", line.trim()),
            },
        ),
    }
}

fn connect(path: &Path) -> Result<UnixStream, ApiError> {
    UnixStream::connect(path).map_err(|source| ApiError::Connect {
        path: path.to_owned(),
        source,
    })
}

fn send_request(conn: &mut UnixStream, req: &Request) -> Result<(), ApiError> {
    let mut line = serde_json::to_string(req).unwrap_or_default();
    line.push('\n');
    conn.write_all(line.as_bytes()).map_err(ApiError::Io)
}

fn parse(line: &str) -> Result<Response, ApiError> {
    serde_json::from_str(line.trim()).map_err(|source| ApiError::Parse {
        line: line.to_owned(),
        source,
    })
}

/// `migrator status`: one request, one answer.
pub fn request_status(path: &Path) -> Result<Status, ApiError> {
    let mut conn = connect(path)?;
    send_request(&mut conn, &Request::Status)?;
    let mut line = String::new();
    BufReader::new(conn).read_line(&mut line).map_err(ApiError::Io)?;
    if line.is_empty() {
        return Err(ApiError::NoAnswer);
    }
    match parse(&line)? {
        Response::Status(s) => Ok(s),
        Response::Error { message } => Err(ApiError::Remote(message)),
        other => Err(ApiError::Remote(format!("unexpected answer {other:?}"))),
    }
}

/// `migrator migrate`: sends the request, reports progress, returns the summary.
pub fn request_migrate(
    path: &Path,
    options: &MigrateOptions,
    mut on_progress: impl FnMut(&Status),
) -> Result<MigrationSummary, ApiError> {
    let mut conn = connect(path)?;
    send_request(&mut conn, &Request::Migrate(options.clone()))?;
    for line in BufReader::new(conn).lines() {
        let line = line.map_err(ApiError::Io)?;
        if line.trim().is_empty() {
            continue;
        }
        match parse(&line)? {
            Response::Progress(s) | Response::Status(s) => on_progress(&s),
            Response::Done(r) => return Ok(r),
            Response::Error { message } => return Err(ApiError::Remote(message)),
        }
    }
    Err(ApiError::NoAnswer)
}

#[cfg(test)]
mod tests {
    use migevents::Mode;

    use super::*;
    use crate::engine::MigrationState;

    #[test]
    fn status_and_migrate_round_trip() {
        let path = std::env::temp_dir().join(format!("migrator-api-{}.sock", std::process::id()));
        let status = Arc::new(Mutex::new(Status {
            state: MigrationState::Running,
            ..Status::default()
        }));
        let server = ApiServer::bind(&path, status.clone()).unwrap();
        assert_eq!(request_status(&path).unwrap().state, MigrationState::Running);

        let opts = MigrateOptions::new("unix:/nonexistent".parse().unwrap(), Mode::Live);
        let client = {
            let path = path.clone();
            let opts = opts.clone();
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                let r = request_migrate(&path, &opts, |s| seen.push(s.iteration));
                (r, seen)
            })
        };
        let pending = loop {
            if let Some(p) = server.next_migrate(Duration::from_millis(100)) {
                break p;
            }
        };
        assert_eq!(pending.options, opts);
        let tracker = pending.tracker(server.status());
        tracker.update(|s| {
            s.state = MigrationState::Precopy;
            s.iteration = 3;
        });
        // A second migrate while one runs is refused.
        let busy = request_migrate(&path, &opts, |_| {}).unwrap_err();
        assert!(busy.to_string().contains("already running"), "{busy}");
        assert_eq!(request_status(&path).unwrap().iteration, 3);
        pending.finish(&Ok(MigrationSummary {
            pause_ms: 2.5,
            ..MigrationSummary::default()
        }));
        let (r, seen) = client.join().unwrap();
        assert!((r.unwrap().pause_ms - 2.5).abs() < 1e-9);
        assert_eq!(seen, vec![3]);
        drop(server);
        assert!(!path.exists());
        assert!(matches!(request_status(&path), Err(ApiError::Connect { .. })));
    }

    #[test]
    fn request_wire_format() {
        let opts = MigrateOptions::new("tcp:10.0.0.1:7000".parse().unwrap(), Mode::Quick);
        let line = serde_json::to_string(&Request::Migrate(opts)).unwrap();
        assert!(
            line.starts_with(r#"{"cmd":"migrate","to":"tcp:10.0.0.1:7000","mode":"quick""#),
            "{line}"
        );
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"cmd":"status"}"#
        );
    }
}
