//! `migrator run`: boot the embedded guest on a tap and serve it until Ctrl-C or until the guest stops.
//!
//! The pieces are public so that other commands (and the API server) can compose them: [`Shutdown::install`]
//! (before any thread starts), [`boot`], then [`Shutdown::wait`] and [`EndReason::into_result`].

use std::{
    sync::{Arc, Condvar, Mutex, PoisonError},
    time::{Duration, Instant},
};

use guest_abi::GuestMark;
use migmon_base::MacAddr;

use crate::{
    api::ApiError,
    engine::MigrationError,
    transport::TransportError,
    vcpu::{GuestExit, GuestStatus},
    vm::{Vm, VmConfig, VmError},
};

/// Why running a guest (`migrator run`, `migrator receive`) failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot block SIGINT/SIGTERM (error {0})")]
    BlockSignals(i32),
    #[error("cannot start the signal thread")]
    SignalThread(#[source] std::io::Error),
    #[error("cannot create the VM ({ram_mib} MiB RAM, tap {tap})")]
    CreateVm {
        ram_mib: u64,
        tap: String,
        #[source]
        source: VmError,
    },
    #[error("cannot start the VM")]
    StartVm(#[source] VmError),
    #[error("the guest stopped with status {0} (a guest panic: see its log)")]
    GuestFailed(u32),
    #[error("the guest crashed: {0}")]
    GuestCrashed(String),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("incoming migration failed; the source keeps the guest")]
    Receive(#[source] MigrationError),
    #[error(
        "the guest is in doubt and this receiver has no --api to resolve it: this copy is dropped; if the guest runs nowhere, resume the source with `migrator resume --force`"
    )]
    InDoubtWithoutApi,
    #[error("the in-doubt guest's copy here was dropped (migrator cancel)")]
    Dropped,
}

/// Why `run` ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndReason {
    /// SIGINT or SIGTERM.
    Signal(i32),
    /// The guest stopped.
    Guest(GuestExit),
    /// Another part of the program asked to stop.
    Requested,
}

impl EndReason {
    /// Success for a signal, a request or a guest that stopped with status 0; the guest's failure otherwise.
    pub fn into_result(self) -> Result<(), RunError> {
        match self {
            Self::Signal(_) | Self::Requested | Self::Guest(GuestExit::Status(0)) => Ok(()),
            Self::Guest(GuestExit::Status(n)) => Err(RunError::GuestFailed(n)),
            Self::Guest(GuestExit::Crashed(why)) => Err(RunError::GuestCrashed(why)),
        }
    }
}

/// Ctrl-C / SIGTERM handling and the wait for the end of a run.
#[derive(Clone, Debug)]
pub struct Shutdown {
    inner: Arc<(Mutex<Option<EndReason>>, Condvar)>,
}

impl Shutdown {
    /// Blocks SIGINT and SIGTERM in this thread (and so in every thread started after) and turns them into an end
    /// reason on a dedicated thread. Call it before starting the VM.
    pub fn install() -> Result<Self, RunError> {
        let shutdown = Self {
            inner: Arc::new((Mutex::new(None), Condvar::new())),
        };
        // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it before use.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t owned by this frame.
        unsafe {
            libc::sigemptyset(&raw mut set);
            libc::sigaddset(&raw mut set, libc::SIGINT);
            libc::sigaddset(&raw mut set, libc::SIGTERM);
        }
        // SAFETY: `set` is initialised; the old mask is not needed.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(RunError::BlockSignals(rc));
        }
        let s = shutdown.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let mut sig: libc::c_int = 0;
                // SAFETY: `set` is initialised and blocked in this thread (inherited); `sig` is a valid out pointer.
                if unsafe { libc::sigwait(&raw const set, &raw mut sig) } == 0 {
                    s.end(EndReason::Signal(sig));
                }
            })
            .map_err(RunError::SignalThread)?;
        Ok(shutdown)
    }

    /// Records the end reason (the first one wins) and wakes [`Shutdown::wait`].
    pub fn end(&self, reason: EndReason) {
        let (m, c) = &*self.inner;
        m.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(reason);
        c.notify_all();
    }

    /// Waits for a signal, [`Shutdown::end`], or the guest to stop.
    pub fn wait(&self, guest: &Arc<GuestStatus>) -> EndReason {
        let me = self.clone();
        let status = Arc::clone(guest);
        // The watcher ends with the process; a guest that never stops leaves it parked, which costs nothing.
        let _ = std::thread::Builder::new()
            .name("guest-exit".into())
            .spawn(move || {
                if let Some(exit) = status.wait_exit(None) {
                    me.end(EndReason::Guest(exit));
                }
            });
        let (m, c) = &*self.inner;
        let mut r = m.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(reason) = r.clone() {
                return reason;
            }
            r = c.wait(r).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// Creates and starts the VM, and reports on stderr when the guest is ready.
pub fn boot(config: &VmConfig) -> Result<Vm, RunError> {
    let t0 = Instant::now();
    let mut vm = Vm::create(config).map_err(|source| RunError::CreateVm {
        ram_mib: config.ram_bytes >> 20,
        tap: config.tap.clone(),
        source,
    })?;
    vm.start().map_err(RunError::StartVm)?;
    let status = vm.guest_status();
    let mac = MacAddr(config.mac);
    let ip = config.ipv4;
    let _ = std::thread::Builder::new().name("ready".into()).spawn(move || {
        if status
            .wait_mark(GuestMark::Ready, 1, Duration::from_secs(120))
            .is_ok()
        {
            eprintln!(
                "migrator: guest {mac} {ip} ready after {} ms",
                t0.elapsed().as_millis()
            );
        }
    });
    Ok(vm)
}

/// `migrator run` without an API or events: boots the guest and runs it until Ctrl-C or until it stops.
pub fn run(config: &VmConfig) -> Result<(), RunError> {
    let shutdown = Shutdown::install()?;
    let vm = boot(config)?;
    eprintln!(
        "migrator: running guest {} {}/{} on tap {} with {} MiB; Ctrl-C stops it",
        MacAddr(config.mac),
        config.ipv4,
        config.prefix_len,
        config.tap,
        config.ram_bytes >> 20
    );
    let reason = shutdown.wait(&vm.guest_status());
    vm.shutdown();
    reason.into_result()
}
