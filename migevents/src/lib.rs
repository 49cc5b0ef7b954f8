//! Migration phase events: what `migrator` writes and `migmon` reads.
//!
//! One JSON object per line. Every event carries the time in `CLOCK_MONOTONIC` nanoseconds (the clock of
//! `bpf_ktime_get_ns()`, so the monitor can join it with kernel events without conversion), the migration id, the
//! VM's MAC and the role of the process that wrote it. The schema is documented in `docs/events.md`.
//!
//! ```
//! use migevents::{MigrationEvent, Phase, Role};
//! let ev = MigrationEvent::now("m1", "52:54:00:12:34:56", Role::Source, Phase::Pause);
//! let line = ev.to_line();
//! assert_eq!(MigrationEvent::from_line(&line).unwrap(), ev);
//! ```

use std::{
    fs::OpenOptions,
    io::{self, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// Which side of a migration wrote the event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Source,
    Destination,
}

/// How the VM moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Iterative pre-copy, then a short pause.
    Live,
    /// Suspend, move everything, resume.
    Quick,
}

/// A migration phase, with the figures that belong to it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Phase {
    /// The migration starts. `ram_bytes` is the guest's RAM; `ips` are the VM's addresses.
    Setup {
        mode: Mode,
        ram_bytes: u64,
        #[serde(default)]
        ips: Vec<String>,
        /// Host label of the writer (for example the tap name or the netns).
        #[serde(default)]
        host: String,
        /// Whether the hypervisor carries the frames that reach the source's tap while the VM is paused over to the
        /// destination and delivers them to the guest at resume (our migrator does; QEMU drops them). Decides which
        /// outages a TCP connection survives: carried, any that ends before the client's abort time; dropped, only
        /// those that end before its last retransmission.
        #[serde(default)]
        carries_frames: bool,
    },
    /// One pre-copy round was sent.
    Round {
        n: u32,
        pages: u64,
        bytes: u64,
        bandwidth: u64,
    },
    /// The vCPU stopped.
    Pause,
    /// All device and vCPU state was sent (source) or received (destination).
    StateSent,
    /// The vCPU runs again (on the destination, or on the source after a rollback).
    Resume,
    /// Announcement `n` (RARP burst number, 0-based) went out after resume.
    Announce { n: u32 },
    /// The migration completed.
    Complete {
        total_ms: f64,
        pause_ms: f64,
        bytes: u64,
    },
    /// The migration failed; `reason` says why.
    Failed { reason: String },
    /// The source took the VM back after a failure.
    Rollback,
}

/// One line of the event stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrationEvent {
    /// `CLOCK_MONOTONIC` nanoseconds.
    pub ts_ns: u64,
    pub migration_id: String,
    /// The VM's MAC, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    pub role: Role,
    #[serde(flatten)]
    pub phase: Phase,
}

/// Errors reading or writing the event stream.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("malformed migration event {line:?}")]
    Parse {
        line: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot open the events destination {}: is migmon listening there?", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write a migration event")]
    Write(#[source] io::Error),
}

/// `CLOCK_MONOTONIC` now, in nanoseconds: the clock `bpf_ktime_get_ns()` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec and CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl MigrationEvent {
    /// An event stamped now.
    pub fn now(migration_id: &str, mac: &str, role: Role, phase: Phase) -> Self {
        Self {
            ts_ns: monotonic_ns(),
            migration_id: migration_id.to_owned(),
            mac: mac.to_owned(),
            role,
            phase,
        }
    }

    /// The event as one JSON line, without the newline.
    pub fn to_line(&self) -> String {
        // Serialising a struct of strings and numbers cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses one line.
    pub fn from_line(line: &str) -> Result<Self, EventsError> {
        serde_json::from_str(line.trim()).map_err(|source| EventsError::Parse {
            line: line.to_owned(),
            source,
        })
    }
}

/// Where a migrator sends its events: a unix socket that migmon listens on, or a file (appended).
pub struct EventSink {
    out: Box<dyn Write + Send>,
}

impl EventSink {
    /// Connects to a unix socket if `path` is one, otherwise appends to the file (created if missing).
    pub fn open(path: &Path) -> Result<Self, EventsError> {
        let is_socket =
            std::fs::metadata(path).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()));
        let open_err = |source| EventsError::Open {
            path: path.to_owned(),
            source,
        };
        let out: Box<dyn Write + Send> = if is_socket {
            Box::new(UnixStream::connect(path).map_err(open_err)?)
        } else {
            Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(open_err)?,
            )
        };
        Ok(Self { out })
    }

    /// Writes one event and flushes it, so the reader sees it at once.
    pub fn send(&mut self, ev: &MigrationEvent) -> Result<(), EventsError> {
        let mut line = ev.to_line();
        line.push('\n');
        self.out.write_all(line.as_bytes()).map_err(EventsError::Write)?;
        self.out.flush().map_err(EventsError::Write)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_every_phase() {
        let phases = [
            Phase::Setup {
                mode: Mode::Live,
                ram_bytes: 1 << 28,
                ips: vec!["10.0.0.2".into()],
                host: "a".into(),
                carries_frames: true,
            },
            Phase::Round {
                n: 1,
                pages: 10,
                bytes: 40960,
                bandwidth: 1 << 30,
            },
            Phase::Pause,
            Phase::StateSent,
            Phase::Resume,
            Phase::Announce { n: 2 },
            Phase::Complete {
                total_ms: 120.5,
                pause_ms: 3.25,
                bytes: 1 << 20,
            },
            Phase::Failed {
                reason: "destination closed".into(),
            },
            Phase::Rollback,
        ];
        for phase in phases {
            let ev = MigrationEvent {
                ts_ns: 42,
                migration_id: "m".into(),
                mac: "52:54:00:00:00:01".into(),
                role: Role::Destination,
                phase,
            };
            assert_eq!(MigrationEvent::from_line(&ev.to_line()).unwrap(), ev);
        }
    }

    #[test]
    fn wire_format_is_flat() {
        let ev = MigrationEvent {
            ts_ns: 7,
            migration_id: "m".into(),
            mac: "x".into(),
            role: Role::Source,
            phase: Phase::Announce { n: 3 },
        };
        assert_eq!(
            ev.to_line(),
            r#"{"ts_ns":7,"migration_id":"m","mac":"x","role":"source","event":"announce","n":3}"#
        );
    }

    #[test]
    fn rejects_garbage() {
        assert!(MigrationEvent::from_line("{\"ts_ns\":1}").is_err());
        assert!(MigrationEvent::from_line("not json").is_err());
    }
}
