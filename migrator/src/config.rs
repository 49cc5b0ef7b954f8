//! The plain configuration of the migrator's long-running commands, as the library takes it (the binary builds it
//! from its command line).

use std::{path::PathBuf, time::Duration};

use crate::{announce::AnnounceSchedule, transport::Endpoint, vm::VmConfig};

/// `migrator run`: a VM, and optionally a control socket and an events sink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunConfig {
    pub vm: VmConfig,
    /// Control socket for `migrator migrate` and `migrator status`.
    pub api: Option<PathBuf>,
    /// Migration events: a unix socket to connect to (migmon watch --events-listen) or a file to append to.
    pub events: Option<PathBuf>,
}

/// `migrator receive`: where to wait for one incoming migration, and how to run the guest afterwards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceiveConfig {
    /// The tap device the VM uses here (in the current netns); also the host label of the events.
    pub tap: String,
    /// Where to wait for the incoming migration.
    pub listen: Endpoint,
    /// Control socket, as for `run`, once the VM runs here.
    pub api: Option<PathBuf>,
    /// Migration events, as for `run`.
    pub events: Option<PathBuf>,
    /// A source that stays silent this long is given up on.
    pub idle_timeout: Duration,
    /// The RARP announces after resume.
    pub announce: AnnounceSchedule,
    /// Mutual TLS on a `tcp:` listener: a directory in QEMU's `tls-creds-x509` layout.
    pub tls_creds: Option<PathBuf>,
    /// Plain TCP accepted (without it, a `tcp:` listener needs `tls_creds`).
    pub insecure: bool,
    /// The largest guest RAM a source may bring.
    pub max_mem: u64,
}
