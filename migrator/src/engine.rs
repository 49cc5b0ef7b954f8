//! The transport-generic migration engine's contract: what the engines need from a VM, what they take as options,
//! and what they report.
//!
//! The engines ([`crate::source`] with its live and quick modes, [`crate::receive`]) are written against two small
//! traits, [`MigrationSource`] and [`MigrationTarget`]. The KVM `Vm` implements both ([`crate::vm_migration`]); the
//! unit tests implement them over plain anonymous memory, so the protocol and the switch-over logic are tested
//! without KVM.

use std::{
    error::Error,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use migevents::{EventSink, MigrationEvent, Mode, Phase, Role};
use serde::{Deserialize, Serialize};

use crate::{
    protocol::ProtocolError,
    ram::{DirtyBitmap, RamError},
    ram_io::GuestRam,
    transport::{ClientTls, Endpoint, TransportError},
};

/// An error from the VM behind the traits (the VMM's own error type, boxed).
pub type BoxedVmError = Box<dyn Error + Send + Sync + 'static>;

/// Who the VM is, as the destination needs to recreate it.
#[derive(Clone, Debug, Default)]
pub struct VmIdentity {
    pub mac: [u8; 6],
    /// The VM's addresses, for the events.
    pub ips: Vec<String>,
    /// Host label for the events (tap name or netns).
    pub host: String,
    /// The VM's configuration, serialised by the VMM; the destination's factory parses it.
    pub config: Vec<u8>,
}

/// The source side of a migration: a running VM that can be dirty-tracked, paused and saved.
pub trait MigrationSource {
    fn identity(&self) -> VmIdentity;
    /// Guest RAM; the view stays valid while the VM lives.
    fn guest_ram(&self) -> GuestRam;
    /// Starts dirty tracking (KVM dirty log plus the VMM's own writes) and clears the dirty set.
    fn start_dirty_log(&mut self) -> Result<(), BoxedVmError>;
    /// The pages written since the last call (or since the start), and clears them.
    fn take_dirty_pages(&mut self) -> Result<DirtyBitmap, BoxedVmError>;
    fn stop_dirty_log(&mut self) -> Result<(), BoxedVmError>;
    /// Stops the vCPU and device processing. While paused nothing writes guest RAM; frames arriving at the tap are
    /// queued for [`MigrationSource::take_pending_frames`].
    fn pause(&mut self) -> Result<(), BoxedVmError>;
    fn resume(&mut self) -> Result<(), BoxedVmError>;
    /// All vCPU and device state (the VMM's versioned, checksummed blob). Only while paused.
    fn save_state(&mut self) -> Result<Vec<u8>, BoxedVmError>;
    /// Frames that reached the tap since the pause and that the guest has not seen.
    fn take_pending_frames(&mut self) -> Vec<Vec<u8>>;
    /// Gives frames taken by [`MigrationSource::take_pending_frames`] back to the guest (rollback), ahead of newer
    /// ones.
    fn return_frames(&mut self, frames: Vec<Vec<u8>>);
    /// Announces the VM's MAC from here again (a RARP out of the tap, and a gratuitous ARP asked of the guest):
    /// after a rollback, or when an in-doubt guest is resumed here.
    fn announce(&mut self) -> Result<(), BoxedVmError>;
}

/// The destination side: a VM created for restore, not yet running.
pub trait MigrationTarget {
    fn guest_ram(&self) -> GuestRam;
    /// Restores the blob [`MigrationSource::save_state`] produced.
    fn restore_state(&mut self, state: &[u8]) -> Result<(), BoxedVmError>;
    /// Starts (or resumes) the vCPU.
    fn resume(&mut self) -> Result<(), BoxedVmError>;
    /// Hands frames to the guest's receive queue, after resume.
    fn deliver_frames(&mut self, frames: Vec<Vec<u8>>) -> Result<(), BoxedVmError>;
    /// Writes a raw frame out of the tap (the announce).
    fn send_frame(&mut self, frame: &[u8]) -> Result<(), BoxedVmError>;
    /// Asks the guest for a gratuitous ARP.
    fn request_garp(&mut self) -> Result<(), BoxedVmError>;
}

/// What to do when pre-copy has not converged by `--timeout`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnTimeout {
    /// Pause anyway and move the rest (a longer pause).
    #[default]
    Force,
    /// Give up; the guest keeps running at the source.
    Abort,
}

/// Options of one outgoing migration (`migrator migrate`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrateOptions {
    pub to: Endpoint,
    pub mode: Mode,
    /// Pause budget for the switch-over rule.
    #[serde(with = "duration_ns")]
    pub downtime: Duration,
    /// Bytes per second, `None` for unlimited.
    pub max_bandwidth: Option<u64>,
    /// Pre-copy gives up converging after this long.
    #[serde(with = "duration_ns")]
    pub timeout: Duration,
    pub on_timeout: OnTimeout,
    /// Quick mode: write the suspended state to this file (fsynced) first, then send it.
    pub via_file: Option<PathBuf>,
    /// Quick mode: hold the VM paused this much longer (to reproduce a slow move).
    #[serde(with = "duration_ns")]
    pub extra_pause: Duration,
    /// Hash RAM at both ends and fail on a mismatch.
    pub verify: bool,
    /// Mutual TLS to a `tcp:` destination.
    #[serde(default)]
    pub tls: Option<ClientTls>,
    /// Plain TCP accepted (without it, a `tcp:` destination needs `tls`).
    #[serde(default)]
    pub insecure: bool,
    /// The switch-over's deadline: from the pause, the destination must be ready within it or the guest resumes
    /// here. `None`: the default of [`MigrateOptions::pause_deadline`].
    #[serde(default, with = "opt_duration_ns")]
    pub max_pause: Option<Duration>,
}

impl MigrateOptions {
    pub fn new(to: Endpoint, mode: Mode) -> Self {
        Self {
            to,
            mode,
            downtime: Duration::from_millis(30),
            max_bandwidth: None,
            timeout: Duration::from_secs(60),
            on_timeout: OnTimeout::Force,
            via_file: None,
            extra_pause: Duration::ZERO,
            verify: false,
            tls: None,
            insecure: false,
            max_pause: None,
        }
    }

    /// The pause deadline in force: `--max-pause` when given; else, in live mode, ten times the downtime budget and
    /// at least one second (the budget is an estimate; ten times it means the destination or the link is stuck,
    /// not slow); in quick mode, where the pause is the whole copy, none.
    pub fn pause_deadline(&self) -> Option<Duration> {
        self.max_pause.or(match self.mode {
            Mode::Live => Some((self.downtime * 10).max(Duration::from_secs(1))),
            Mode::Quick => None,
        })
    }
}

mod opt_duration_ns {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    #[expect(clippy::ref_option, reason = "serde's `with` passes a reference to the field")]
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&(d.as_nanos() as u64)),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<u64>::deserialize(d).map(|v| v.map(Duration::from_nanos))
    }
}

mod duration_ns {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_nanos() as u64)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_nanos)
    }
}

/// The source's summary of a migration, printed as the JSON summary of `migrator migrate`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationSummary {
    pub migration_id: String,
    pub mode: String,
    /// Setup to acknowledgement, ms.
    pub total_ms: f64,
    /// vCPU stop at the source to the destination's acknowledgement of its resume, ms (an upper bound on the
    /// frozen time: it includes the ack's one-way latency). Includes `extra_pause_ms`.
    pub pause_ms: f64,
    /// The deliberate extra pause (`--extra-pause`), ms; 0 unless asked for.
    pub extra_pause_ms: f64,
    /// Bytes written to the stream, headers included.
    pub bytes: u64,
    /// Pre-copy rounds sent before the pause (the final, paused round not counted).
    pub rounds: u32,
    /// Pages sent with data / as zero flags, over all rounds.
    pub data_pages: u64,
    pub zero_pages: u64,
    /// Bytes sent while paused (final dirty set, state, frames).
    pub final_bytes: u64,
    pub state_bytes: u64,
    /// Time to save and send the state, ms.
    pub state_ms: f64,
    /// RAM hash time at the source with `--verify`, ms (part of the pause).
    pub hash_ms: f64,
    /// Where the pause went (live mode).
    pub pause_breakdown: PauseBreakdown,
    /// Measured copy bandwidth, bytes/s.
    pub bandwidth: u64,
    /// The physical floor of the pause: `final_bytes / bandwidth + state_ms`.
    pub floor_ms: f64,
    /// The pause the switch-over rule expected.
    pub expected_pause_ms: f64,
    /// `--max-bandwidth`, when set: the figures are those of a deliberately throttled link.
    pub max_bandwidth: Option<u64>,
    /// The RAM hash at pause, when `--verify` was on (hex), matched by the destination.
    pub verified_hash: Option<String>,
    /// Time the destination spent restoring, µs, as it reported.
    pub restore_us: u64,
    pub forwarded_frames: u64,
    /// Whether the timeout forced the switch-over.
    pub forced: bool,
    /// Honest labels of anything artificial in the run.
    pub notes: Vec<String>,
}

/// The steps of the pause, ms, measured at the source.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PauseBreakdown {
    /// Asking the vCPU and the device thread to stop until both hold.
    pub stop_vcpu_ms: f64,
    /// Reading the last dirty set and sending it.
    pub final_round_ms: f64,
    /// Hash (with `--verify`), state save and send, queued frames, complete.
    pub tail_ms: f64,
    /// From complete to the ack: the destination's restore, hash, resume and first announce, plus the wire.
    pub destination_ms: f64,
}

/// Where a VM and its migration stand, as `migrator status` reports it (serialised in snake case: `precopy`, ...).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationState {
    /// Nothing started yet.
    #[default]
    Idle,
    /// A destination service waits for a source to connect.
    Waiting,
    /// The source connected and announced the migration.
    Setup,
    /// Pre-copy rounds: the VM runs while its memory is copied.
    Precopy,
    /// The VM is paused for the final copy (or the whole copy, in quick mode).
    Paused,
    /// The state is sent; waiting for the destination to be ready.
    Completing,
    /// The source sent its commit: the guest no longer resumes here; waiting for the acknowledgement.
    Committed,
    /// A destination holds the whole guest, restored and paused, and waits for the source's commit.
    Prepared,
    /// The stream broke around the commit: the guest is paused here and may run on the other side. The operator
    /// resumes it on one side (`migrator resume --force`) or drops a copy (`migrator cancel`).
    InDoubt,
    /// The VM runs on the destination; this source is done.
    Migrated,
    /// The migration failed (the source VM resumes where it was).
    Failed,
    /// A destination receives a migration.
    Receiving,
    /// The VM runs here.
    Running,
}

impl MigrationState {
    /// A migration out of this VM is under way or finished: another one cannot start.
    pub fn is_migrating_out(self) -> bool {
        matches!(
            self,
            Self::Setup
                | Self::Precopy
                | Self::Paused
                | Self::Completing
                | Self::Committed
                | Self::Migrated
                | Self::InDoubt
        )
    }

    /// A migration out of this VM runs and can still be cancelled (before its commit).
    pub fn is_cancellable(self) -> bool {
        matches!(
            self,
            Self::Setup | Self::Precopy | Self::Paused | Self::Completing
        )
    }
}

impl std::fmt::Display for MigrationState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Self::Idle => "idle",
            Self::Waiting => "waiting",
            Self::Setup => "setup",
            Self::Precopy => "precopy",
            Self::Paused => "paused",
            Self::Completing => "completing",
            Self::Committed => "committed",
            Self::Prepared => "prepared",
            Self::InDoubt => "in_doubt",
            Self::Migrated => "migrated",
            Self::Failed => "failed",
            Self::Receiving => "receiving",
            Self::Running => "running",
        };
        f.pad(name)
    }
}

/// Where a migration stands (`migrator status`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub state: MigrationState,
    pub migration_id: Option<String>,
    pub mode: Option<String>,
    /// Pre-copy round in progress.
    pub iteration: u32,
    /// Pages in the current dirty set.
    pub dirty_pages: u64,
    /// Bytes left to send in the current round.
    pub remaining_bytes: u64,
    /// Measured bandwidth, bytes/s.
    pub bandwidth: u64,
    /// The pause the switch-over rule would give now, ms.
    pub expected_pause_ms: f64,
    pub bytes_sent: u64,
    /// Last error, when `state` is failed.
    pub error: Option<String>,
    /// Connections the destination refused while it waited for its source (scans, failed TLS, bad hellos).
    #[serde(default)]
    pub rejected_peers: u64,
    /// Progress lines the API dropped because a client read too slowly (the migration never waits for one).
    #[serde(default)]
    pub dropped_progress: u64,
    /// With `--verify`, after a rollback from the pause: guest RAM's hash when the source paused, and again just
    /// before it resumed the guest (equal unless something wrote guest RAM while it was paused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_ram_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_ram_hash: Option<String>,
}

/// Shared status plus an optional progress callback (the API streams progress to `migrator migrate`), and the
/// cancel flag `migrator cancel` raises.
#[derive(Clone, Default)]
pub struct Tracker {
    status: Arc<Mutex<Status>>,
    observer: Option<Observer>,
    cancel: Arc<AtomicBool>,
}

/// Called with every status change.
pub type Observer = Arc<dyn Fn(&Status) + Send + Sync>;

impl Tracker {
    pub fn new(status: Arc<Mutex<Status>>) -> Self {
        Self {
            status,
            observer: None,
            cancel: Arc::default(),
        }
    }

    /// A tracker over `status` that shares `cancel` (the API's flag).
    pub fn with_cancel(status: Arc<Mutex<Status>>, cancel: Arc<AtomicBool>) -> Self {
        Self {
            status,
            observer: None,
            cancel,
        }
    }

    /// Asks the running migration to stop (it rolls back, unless it has committed).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// Whether a cancel was asked for; the engines check it between steps.
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Clears the cancel flag (a new migration starts).
    pub fn clear_cancel(&self) {
        self.cancel.store(false, Ordering::SeqCst);
    }

    #[must_use]
    pub fn with_observer(mut self, f: Observer) -> Self {
        self.observer = Some(f);
        self
    }

    pub fn snapshot(&self) -> Status {
        self.status.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Changes the status and tells the observer.
    pub fn update(&self, f: impl FnOnce(&mut Status)) {
        let snap = {
            let mut s = self.status.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut s);
            s.clone()
        };
        if let Some(o) = &self.observer {
            o(&snap);
        }
    }
}

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("migration stream failed")]
    Protocol(#[from] ProtocolError),
    #[error("guest RAM")]
    Ram(#[from] RamError),
    #[error("the VM failed to {op}")]
    Vm {
        op: &'static str,
        #[source]
        source: BoxedVmError,
    },
    #[error("the destination aborted: {reason}")]
    DestinationAborted { reason: String },
    #[error("the source aborted: {reason}")]
    SourceAborted { reason: String },
    #[error(
        "pre-copy did not converge within {timeout:?} (dirty set {dirty_pages} pages, expected pause {expected_ms:.1} ms > budget {budget_ms:.1} ms); retry with a larger --downtime, --timeout, or --on-timeout force"
    )]
    NotConverged {
        timeout: Duration,
        dirty_pages: u64,
        expected_ms: f64,
        budget_ms: f64,
    },
    #[error(
        "RAM hash mismatch: source {source_hash:032x}, destination {destination:032x}; the guest was not resumed"
    )]
    VerifyMismatch { source_hash: u128, destination: u128 },
    #[error("the destination RAM layout {theirs:?} differs from the source's {ours:?}")]
    LayoutMismatch { ours: String, theirs: String },
    #[error("writing the suspend file {}", path.display())]
    SuspendFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the source asks for {} of guest RAM, more than --max-mem {} allows here; raise --max-mem on `migrator receive` if that is expected",
        migmon_base::units::Size(*ram), migmon_base::units::Size(*max_mem)
    )]
    TooLarge { ram: u64, max_mem: u64 },
    #[error(
        "no authenticated source arrived within --idle-timeout {idle_timeout:?} ({rejected} connections refused)"
    )]
    NoSource { idle_timeout: Duration, rejected: u64 },
    #[error(
        "the destination was not ready within the pause deadline {0:?} (--max-pause); the guest resumed here"
    )]
    PauseDeadline(Duration),
    #[error("cancelled (migrator cancel)")]
    Cancelled,
    #[error(
        "IN DOUBT: {reason}. The guest is paused on this side ({side}) and may run on the other; check the other side with `migrator status`, then on exactly one side run `migrator resume --force --api SOCKET` (the other side: `migrator cancel --api SOCKET` drops its copy)"
    )]
    InDoubt { side: &'static str, reason: String },
    #[error("no acknowledgement from the destination within {0:?}")]
    AckTimeout(Duration),
    #[error("{0}")]
    Usage(String),
}

impl MigrationError {
    pub fn vm(op: &'static str) -> impl FnOnce(BoxedVmError) -> Self {
        move |source| Self::Vm { op, source }
    }
}

/// A fresh migration id: pid and monotonic time, unique on a host.
pub fn new_migration_id() -> String {
    format!("mig-{}-{:x}", std::process::id(), migevents::monotonic_ns())
}

/// Writes phase events for one migration; a broken sink is reported once and then ignored (the migration matters
/// more than its monitor).
pub struct Events {
    sink: Option<EventSink>,
    pub migration_id: String,
    pub mac: String,
    pub role: Role,
}

impl Events {
    /// Opens `path` (unix socket or file) if given. An unreachable monitor is a warning, not a failure.
    pub fn open(path: Option<&Path>, migration_id: &str, mac: &str, role: Role) -> Self {
        let sink = path.and_then(|p| match EventSink::open(p) {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("migrator: warning: {e}; continuing without events");
                None
            }
        });
        Self {
            sink,
            migration_id: migration_id.to_owned(),
            mac: mac.to_owned(),
            role,
        }
    }

    /// Emits one event stamped now; returns its timestamp.
    pub fn emit(&mut self, phase: Phase) -> u64 {
        let ev = MigrationEvent::now(&self.migration_id, &self.mac, self.role, phase);
        if let Some(s) = &mut self.sink
            && let Err(e) = s.send(&ev)
        {
            eprintln!("migrator: warning: {e}; no more events for this migration");
            self.sink = None;
        }
        ev.ts_ns
    }
}

/// `Mode` as a lowercase word.
pub fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Live => "live",
        Mode::Quick => "quick",
    }
}

/// The error with its causes, `a: b: c`.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut s = err.to_string();
    let mut src = err.source();
    while let Some(e) = src {
        s.push_str(": ");
        s.push_str(&e.to_string());
        src = e.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_serialise_as_their_words() {
        for s in [
            MigrationState::Idle,
            MigrationState::Waiting,
            MigrationState::Setup,
            MigrationState::Precopy,
            MigrationState::Paused,
            MigrationState::Completing,
            MigrationState::Migrated,
            MigrationState::Failed,
            MigrationState::Receiving,
            MigrationState::Running,
        ] {
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{s}\""));
            assert_eq!(serde_json::from_str::<MigrationState>(&json).unwrap(), s);
        }
        let status = serde_json::to_value(Status {
            state: MigrationState::Precopy,
            ..Status::default()
        })
        .unwrap();
        assert_eq!(status["state"], "precopy");
    }
}
