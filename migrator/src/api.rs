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
//!
//! → {"cmd":"cancel"}                 stops a running migration (it rolls back unless it has committed), or drops
//!                                    this side's copy of an in-doubt guest
//! → {"cmd":"resume","force":true}    resumes an in-doubt guest on this side
//! ← {"type":"ok","message":"..."}
//! ```
//!
//! The socket is created mode 0600 and only a peer with this process's uid, or root, is served (`SO_PEERCRED`).
//! Each client has its own thread (at most [`MAX_CLIENTS`] at once) and a request line is at most [`MAX_LINE`]
//! bytes. Progress goes to a client through a bounded queue: a client that reads slowly loses progress lines
//! (counted in `dropped_progress`), never the migration's time. Status and cancel are answered by the client's
//! thread at any time; migrate and resume are handed to the thread that owns the VM ([`ApiServer::next_command`],
//! see [`crate::service::serve`]).

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    os::{fd::AsRawFd, unix::net::UnixStream},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError},
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::engine::{MigrateOptions, MigrationError, MigrationState, MigrationSummary, Status, Tracker};

/// The longest request line.
pub const MAX_LINE: u64 = 64 << 10;
/// Clients served at once; more are refused.
pub const MAX_CLIENTS: usize = 16;
/// Lines queued for one client before progress lines are dropped.
const CLIENT_QUEUE: usize = 64;
/// A client that takes a line no faster than this is cut off.
const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// A request line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    Migrate(MigrateOptions),
    Cancel,
    Resume {
        #[serde(default)]
        force: bool,
    },
}

/// A response line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Status(Status),
    Progress(Status),
    Done(MigrationSummary),
    Ok { message: String },
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
    #[error("the migrator closed the API connection without an answer (is it running as another user?)")]
    NoAnswer,
    #[error("{0}")]
    Remote(String),
}

/// The writing side of one client: a bounded queue drained by the client's writer thread.
#[derive(Clone)]
pub struct Reply {
    tx: SyncSender<Response>,
    status: Arc<Mutex<Status>>,
    /// Signalled by the writer once a final line is on the socket (or the client is gone).
    written: Arc<Mutex<Receiver<()>>>,
}

impl Reply {
    /// Queues a progress line; drops it (and counts) when the client is behind.
    fn progress(&self, r: Response) {
        if let Err(TrySendError::Full(_)) = self.tx.try_send(r) {
            self.status
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .dropped_progress += 1;
        }
    }

    /// Queues the final line and waits until the writer has put it on the socket, so a process that exits right
    /// after (the source, once its guest runs elsewhere) does not close the connection unanswered. The writer gives
    /// up on a stalled client within [`CLIENT_WRITE_TIMEOUT`], and so does this wait.
    pub fn finish(self, r: Response) {
        if self.tx.send(r).is_err() {
            return;
        }
        let written = self.written.lock().unwrap_or_else(PoisonError::into_inner);
        let _ignored = written.recv_timeout(CLIENT_WRITE_TIMEOUT + Duration::from_secs(1));
    }

    fn ok(self, message: impl Into<String>) {
        self.finish(Response::Ok {
            message: message.into(),
        });
    }

    fn error(self, message: impl Into<String>) {
        self.finish(Response::Error {
            message: message.into(),
        });
    }
}

/// A migrate request waiting for the VM's owner.
pub struct PendingMigrate {
    pub options: MigrateOptions,
    reply: Reply,
}

impl PendingMigrate {
    /// A tracker over the server's status (and cancel flag) that also streams progress to the requesting client.
    pub fn tracker(&self, server: &ApiServer) -> Tracker {
        let reply = self.reply.clone();
        Tracker::with_cancel(server.status(), server.cancel.clone()).with_observer(Arc::new(
            move |s: &Status| {
                reply.progress(Response::Progress(s.clone()));
            },
        ))
    }

    /// Sends the outcome and closes the connection.
    pub fn finish(self, result: &Result<MigrationSummary, MigrationError>) {
        let r = match result {
            Ok(report) => Response::Done(report.clone()),
            Err(e) => Response::Error {
                message: crate::engine::error_chain(e),
            },
        };
        self.reply.finish(r);
    }
}

/// What the VM's owner is asked to do.
pub enum Command {
    Migrate(PendingMigrate),
    /// Resume the in-doubt guest here (`resume --force`).
    Resume(Answer),
    /// Drop this side's in-doubt copy.
    Cancel(Answer),
}

/// The answer to a resume or cancel, once done.
pub struct Answer(Reply);

impl Answer {
    pub fn ok(self, message: impl Into<String>) {
        self.0.ok(message);
    }
    pub fn error(self, message: impl Into<String>) {
        self.0.error(message);
    }
}

/// The listening side, owned by `run` and `receive`.
pub struct ApiServer {
    path: PathBuf,
    status: Arc<Mutex<Status>>,
    cancel: Arc<AtomicBool>,
    rx: Receiver<Command>,
}

impl ApiServer {
    /// Binds `path` (replacing a stale socket) mode 0600 and starts the listener thread.
    pub fn bind(path: &Path, status: Arc<Mutex<Status>>) -> Result<Self, ApiError> {
        if std::fs::metadata(path).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type())) {
            let _ignored = std::fs::remove_file(path);
        }
        let listener = crate::transport::bind_unix_private(path).map_err(|source| ApiError::Bind {
            path: path.to_owned(),
            source,
        })?;
        let (tx, rx) = mpsc::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let shared = Shared {
            status: status.clone(),
            cancel: cancel.clone(),
            tx,
            clients: Arc::new(AtomicUsize::new(0)),
        };
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                for conn in listener.incoming().flatten() {
                    shared.accept(conn);
                }
            })
            .map_err(|source| ApiError::Bind {
                path: path.to_owned(),
                source,
            })?;
        Ok(Self {
            path: path.to_owned(),
            status,
            cancel,
            rx,
        })
    }

    pub fn status(&self) -> Arc<Mutex<Status>> {
        self.status.clone()
    }

    /// A tracker over the status with the API's cancel flag.
    pub fn tracker(&self) -> Tracker {
        Tracker::with_cancel(self.status.clone(), self.cancel.clone())
    }

    /// The next request for the VM's owner, if one comes within `timeout`.
    pub fn next_command(&self, timeout: Duration) -> Option<Command> {
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

/// What the listener thread shares with the client threads.
#[derive(Clone)]
struct Shared {
    status: Arc<Mutex<Status>>,
    cancel: Arc<AtomicBool>,
    tx: mpsc::Sender<Command>,
    clients: Arc<AtomicUsize>,
}

/// The uid of the peer of a unix stream.
fn peer_uid(conn: &UnixStream) -> io::Result<u32> {
    // SAFETY: ucred is plain data; all-zero is valid.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: a connected unix socket; `cred` is writable for `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(cred.uid)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether a peer of uid `uid` may use the API: the same user as this process, or root.
pub fn peer_allowed(uid: u32) -> bool {
    // SAFETY: geteuid cannot fail.
    uid == 0 || uid == unsafe { libc::geteuid() }
}

impl Shared {
    fn accept(&self, conn: UnixStream) {
        match peer_uid(&conn) {
            Ok(uid) if peer_allowed(uid) => {}
            Ok(uid) => {
                eprintln!(
                    "migrator: API: refused a client of uid {uid} (only this user and root are served)"
                );
                return;
            }
            Err(e) => {
                eprintln!("migrator: API: refused a client whose credentials are unknown: {e}");
                return;
            }
        }
        if self.clients.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
            self.clients.fetch_sub(1, Ordering::SeqCst);
            let _ignored = conn.set_write_timeout(Some(Duration::from_millis(100)));
            let _ignored = write_line(
                &mut &conn,
                &Response::Error {
                    message: format!("more than {MAX_CLIENTS} API clients at once; try again"),
                },
            );
            return;
        }
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("api-client".into())
            .spawn(move || {
                me.serve_client(conn);
                me.clients.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            self.clients.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn serve_client(&self, conn: UnixStream) {
        let _ignored = conn.set_read_timeout(Some(Duration::from_secs(5)));
        let _ignored = conn.set_write_timeout(Some(CLIENT_WRITE_TIMEOUT));
        let Ok(read_half) = conn.try_clone() else {
            return;
        };
        let (tx, rx) = mpsc::sync_channel::<Response>(CLIENT_QUEUE);
        let (written_tx, written_rx) = mpsc::channel::<()>();
        let writer = std::thread::Builder::new()
            .name("api-writer".into())
            .spawn(move || {
                let mut conn = conn;
                for r in rx {
                    let last = !matches!(r, Response::Progress(_));
                    let ok = write_line(&mut conn, &r).and_then(|()| conn.flush()).is_ok();
                    if last || !ok {
                        // Done, or gone or stalled (the rest is dropped with the queue): release `finish`.
                        let _ignored = written_tx.send(());
                    }
                    if !ok {
                        break;
                    }
                }
            });
        let Ok(writer) = writer else { return };
        let reply = Reply {
            tx,
            status: self.status.clone(),
            written: Arc::new(Mutex::new(written_rx)),
        };
        let mut line = Vec::new();
        let read = BufReader::new(read_half.take(MAX_LINE)).read_until(b'\n', &mut line);
        match read {
            Ok(_) if line.last() == Some(&b'\n') => self.dispatch(&String::from_utf8_lossy(&line), reply),
            Ok(n) if n as u64 >= MAX_LINE => reply.error(format!("request line over {MAX_LINE} bytes")),
            _ => reply.error("no request line (a JSON object and a newline)"),
        }
        let _ignored = writer.join();
    }

    fn dispatch(&self, line: &str, reply: Reply) {
        let state = || self.status.lock().unwrap_or_else(PoisonError::into_inner).state;
        match serde_json::from_str::<Request>(line.trim()) {
            Ok(Request::Status) => {
                let s = self.status.lock().unwrap_or_else(PoisonError::into_inner).clone();
                reply.finish(Response::Status(s));
            }
            Ok(Request::Migrate(options)) => {
                let st = state();
                if st.is_migrating_out() {
                    reply.error(format!(
                        "a migration is already running or done on this VM (state {st})"
                    ));
                    return;
                }
                if let Err(mpsc::SendError(Command::Migrate(p))) =
                    self.tx.send(Command::Migrate(PendingMigrate { options, reply }))
                {
                    p.reply
                        .error("this migrator no longer accepts migrations (the VM stopped)");
                }
            }
            Ok(Request::Cancel) => {
                let st = state();
                match st {
                    s if s.is_cancellable() => {
                        self.cancel.store(true, Ordering::SeqCst);
                        reply.ok("cancel requested: the migration stops and the guest keeps running here");
                    }
                    MigrationState::InDoubt => self.forward(Command::Cancel(Answer(reply))),
                    _ => reply.error(format!("nothing to cancel (state {st})")),
                }
            }
            Ok(Request::Resume { force }) => {
                let st = state();
                if st != MigrationState::InDoubt {
                    reply.error(format!(
                        "nothing to resume: the guest is not in doubt here (state {st})"
                    ));
                } else if !force {
                    reply.error(
                        "resuming an in-doubt guest runs it here: make sure it runs nowhere else, then add --force",
                    );
                } else {
                    self.forward(Command::Resume(Answer(reply)));
                }
            }
            Err(e) => reply.error(format!("bad request {:?}: {e}", line.trim())),
        }
    }

    fn forward(&self, cmd: Command) {
        if let Err(mpsc::SendError(Command::Resume(a) | Command::Cancel(a))) = self.tx.send(cmd) {
            a.error("this migrator no longer serves its VM");
        }
    }
}

fn write_line(conn: &mut impl Write, r: &Response) -> io::Result<()> {
    let mut line = serde_json::to_string(r).unwrap_or_default();
    line.push('\n');
    conn.write_all(line.as_bytes())
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

/// `migrator cancel` / `migrator resume --force`: one request, an ok or an error.
pub fn request_simple(path: &Path, req: &Request) -> Result<String, ApiError> {
    let mut conn = connect(path)?;
    send_request(&mut conn, req)?;
    let mut line = String::new();
    BufReader::new(conn).read_line(&mut line).map_err(ApiError::Io)?;
    if line.is_empty() {
        return Err(ApiError::NoAnswer);
    }
    match parse(&line)? {
        Response::Ok { message } => Ok(message),
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
            Response::Ok { message } => {
                return Err(ApiError::Remote(format!("unexpected answer {message:?}")));
            }
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
            if let Some(Command::Migrate(p)) = server.next_command(Duration::from_millis(100)) {
                break p;
            }
        };
        assert_eq!(pending.options, opts);
        let tracker = pending.tracker(&server);
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
    fn the_final_answer_is_on_the_socket_when_finish_returns() {
        // The source exits right after `finish`: the answer must already be written, or the client sees a closed
        // connection without one (a CI failure of `./x bench`).
        let path = std::env::temp_dir().join(format!("migrator-api-fin-{}.sock", std::process::id()));
        let status = Arc::new(Mutex::new(Status::default()));
        let server = ApiServer::bind(&path, status).unwrap();
        let mut conn = UnixStream::connect(&path).unwrap();
        let opts = MigrateOptions::new("unix:/nonexistent".parse().unwrap(), Mode::Live);
        send_request(&mut conn, &Request::Migrate(opts)).unwrap();
        for _ in 0..50 {
            let pending = loop {
                if let Some(Command::Migrate(p)) = server.next_command(Duration::from_millis(100)) {
                    break p;
                }
            };
            pending.finish(&Ok(MigrationSummary::default()));
            conn.set_nonblocking(true).unwrap();
            let mut line = String::new();
            let got = BufReader::new(&conn).read_line(&mut line);
            assert!(got.is_ok() && line.contains("\"done\""), "{got:?} {line:?}");
            conn.set_nonblocking(false).unwrap();
            conn = UnixStream::connect(&path).unwrap();
            let opts = MigrateOptions::new("unix:/nonexistent".parse().unwrap(), Mode::Live);
            send_request(&mut conn, &Request::Migrate(opts)).unwrap();
        }
    }

    #[test]
    fn private_socket_bounded_lines_and_slow_clients_block_nobody() {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!("migrator-api-slow-{}.sock", std::process::id()));
        let status = Arc::new(Mutex::new(Status {
            state: MigrationState::Running,
            ..Status::default()
        }));
        let server = ApiServer::bind(&path, status.clone()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(peer_allowed(0));

        // A client that says nothing, and one that sends an endless line: others are still served.
        let _silent = UnixStream::connect(&path).unwrap();
        let mut long = UnixStream::connect(&path).unwrap();
        long.write_all(&vec![b'x'; (MAX_LINE + 10) as usize]).unwrap();
        let mut answer = String::new();
        BufReader::new(&long).read_line(&mut answer).unwrap();
        assert!(answer.contains("over"), "{answer}");
        assert_eq!(request_status(&path).unwrap().state, MigrationState::Running);

        // A migrate client that never reads: progress is dropped and counted, the updates never wait.
        let mut stalled = UnixStream::connect(&path).unwrap();
        let opts = MigrateOptions::new("unix:/nonexistent".parse().unwrap(), Mode::Live);
        send_request(&mut stalled, &Request::Migrate(opts)).unwrap();
        let pending = loop {
            if let Some(Command::Migrate(p)) = server.next_command(Duration::from_millis(100)) {
                break p;
            }
        };
        let tracker = pending.tracker(&server);
        for i in 0..20_000 {
            tracker.update(|s| {
                s.state = MigrationState::Precopy;
                s.bytes_sent = i;
            });
        }
        assert!(status.lock().unwrap().dropped_progress > 0);
        // Cancel reaches the running migration's tracker.
        assert!(request_simple(&path, &Request::Cancel).is_ok());
        assert!(tracker.cancelled());
        let refused = request_simple(&path, &Request::Resume { force: true }).unwrap_err();
        assert!(refused.to_string().contains("not in doubt"), "{refused}");
        status.lock().unwrap().state = MigrationState::InDoubt;
        let unforced = request_simple(&path, &Request::Resume { force: false }).unwrap_err();
        assert!(unforced.to_string().contains("--force"), "{unforced}");
        drop(stalled);
        pending.finish(&Err(MigrationError::Cancelled));
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
