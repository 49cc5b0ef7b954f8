//! The glue that migrates a real KVM [`Vm`]: the VM as a [`MigrationSource`] and (as [`IncomingVm`]) a
//! [`MigrationTarget`] of the engines in [`crate::engine`], and the bodies of `migrator run` ([`run`]) and
//! `migrator receive` ([`run_destination`]).

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    api::ApiServer,
    config::{ReceiveConfig, RunConfig},
    engine::{BoxedVmError, MigrationSource, MigrationState, MigrationTarget, Status, VmIdentity},
    protocol::Hello,
    ram::DirtyBitmap,
    ram_io::GuestRam,
    runner::{EndReason, RunError, Shutdown},
    service::{Served, receive_and_serve, serve},
    transport::Endpoint,
    vcpu::GuestStatus,
    vm::{SerialOutput, Vm, VmConfig},
    vm_state::VmState,
};

/// How long the destination waits for its tap to run before it accepts pages.
const LINK_UP_TIMEOUT: Duration = Duration::from_secs(3);

/// Waits until interface `name` (in this netns) is `IFF_RUNNING`: up with its carrier applied.
fn wait_link_running(name: &str, timeout: Duration) -> bool {
    // SAFETY: plain socket(2); the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 || name.len() >= libc::IFNAMSIZ {
        return false;
    }
    let deadline = Instant::now() + timeout;
    let running = loop {
        // SAFETY: ifreq is plain data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, b) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *d = b as libc::c_char;
        }
        // SAFETY: `fd` is a socket and `req` a valid ifreq naming the interface; the kernel fills ifru_flags.
        let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &raw mut req) };
        // SAFETY: after a successful SIOCGIFFLAGS the flags member is the one written.
        if rc == 0 && i32::from(unsafe { req.ifr_ifru.ifru_flags }) & libc::IFF_RUNNING != 0 {
            break true;
        }
        if Instant::now() >= deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // SAFETY: our fd, closed once.
    unsafe { libc::close(fd) };
    running
}

fn boxed<E: std::error::Error + Send + Sync + 'static>(e: E) -> BoxedVmError {
    Box::new(e)
}

impl MigrationSource for Vm {
    fn identity(&self) -> VmIdentity {
        let c = self.config();
        VmIdentity {
            mac: c.mac,
            ips: std::iter::once(c.ipv4.to_string())
                .chain(c.ipv6.map(|(a, _)| a.to_string()))
                .collect(),
            host: c.tap.clone(),
            // Plain data: serialising it cannot fail.
            config: serde_json::to_vec(c).unwrap_or_default(),
        }
    }

    fn guest_ram(&self) -> GuestRam {
        // The view is made of the VM's live regions; it can only fail on a layout bug in the VMM.
        Vm::guest_ram(self).unwrap_or_else(|e| panic!("guest RAM view of a live VM: {e}"))
    }

    fn start_dirty_log(&mut self) -> Result<(), BoxedVmError> {
        Vm::start_dirty_log(self).map_err(boxed)
    }

    fn take_dirty_pages(&mut self) -> Result<DirtyBitmap, BoxedVmError> {
        Vm::take_dirty_pages(self).map_err(boxed)
    }

    fn stop_dirty_log(&mut self) -> Result<(), BoxedVmError> {
        Vm::stop_dirty_log(self).map_err(boxed)
    }

    fn pause(&mut self) -> Result<(), BoxedVmError> {
        Vm::pause(self).map_err(boxed)
    }

    fn resume(&mut self) -> Result<(), BoxedVmError> {
        Vm::resume(self).map_err(boxed)
    }

    fn save_state(&mut self) -> Result<Vec<u8>, BoxedVmError> {
        Vm::save_state(self).map_err(boxed)?.encode().map_err(boxed)
    }

    fn take_pending_frames(&mut self) -> Vec<Vec<u8>> {
        Vm::take_pending_frames(self)
    }

    fn return_frames(&mut self, frames: Vec<Vec<u8>>) {
        Vm::deliver_frames(self, frames);
    }

    fn announce(&mut self) -> Result<(), BoxedVmError> {
        let mac = self.config().mac;
        self.send_frame(&crate::announce::rarp_frame(mac))
            .map_err(boxed)?;
        self.request_garp().map(|_| ()).map_err(boxed)
    }
}

/// A VM created for restore; it starts at the migration's resume.
pub struct IncomingVm {
    pub vm: Vm,
    started: bool,
}

impl MigrationTarget for IncomingVm {
    fn guest_ram(&self) -> GuestRam {
        MigrationSource::guest_ram(&self.vm)
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), BoxedVmError> {
        let state = VmState::decode(state).map_err(boxed)?;
        self.vm.restore_state(&state).map_err(boxed)
    }

    fn resume(&mut self) -> Result<(), BoxedVmError> {
        if self.started {
            return self.vm.resume().map_err(boxed);
        }
        self.vm.start().map_err(boxed)?;
        self.started = true;
        Ok(())
    }

    fn deliver_frames(&mut self, frames: Vec<Vec<u8>>) -> Result<(), BoxedVmError> {
        self.vm.deliver_frames(frames);
        Ok(())
    }

    fn send_frame(&mut self, frame: &[u8]) -> Result<(), BoxedVmError> {
        self.vm.send_frame(frame).map_err(boxed)
    }

    fn request_garp(&mut self) -> Result<(), BoxedVmError> {
        self.vm.request_garp().map(|_| ()).map_err(boxed)
    }
}

/// Once received, the VM can be migrated on.
impl MigrationSource for IncomingVm {
    fn identity(&self) -> VmIdentity {
        self.vm.identity()
    }
    fn guest_ram(&self) -> GuestRam {
        MigrationSource::guest_ram(&self.vm)
    }
    fn start_dirty_log(&mut self) -> Result<(), BoxedVmError> {
        MigrationSource::start_dirty_log(&mut self.vm)
    }
    fn take_dirty_pages(&mut self) -> Result<DirtyBitmap, BoxedVmError> {
        MigrationSource::take_dirty_pages(&mut self.vm)
    }
    fn stop_dirty_log(&mut self) -> Result<(), BoxedVmError> {
        MigrationSource::stop_dirty_log(&mut self.vm)
    }
    fn pause(&mut self) -> Result<(), BoxedVmError> {
        MigrationSource::pause(&mut self.vm)
    }
    fn resume(&mut self) -> Result<(), BoxedVmError> {
        MigrationSource::resume(&mut self.vm)
    }
    fn save_state(&mut self) -> Result<Vec<u8>, BoxedVmError> {
        MigrationSource::save_state(&mut self.vm)
    }
    fn take_pending_frames(&mut self) -> Vec<Vec<u8>> {
        MigrationSource::take_pending_frames(&mut self.vm)
    }
    fn return_frames(&mut self, frames: Vec<Vec<u8>>) {
        MigrationSource::return_frames(&mut self.vm, frames);
    }
    fn announce(&mut self) -> Result<(), BoxedVmError> {
        MigrationSource::announce(&mut self.vm)
    }
}

/// The end of a run (signal or guest exit), watched on a helper thread so the control loop can poll it.
#[derive(Clone, Default)]
struct EndWatch {
    ended: Arc<AtomicBool>,
    reason: Arc<Mutex<Option<EndReason>>>,
}

impl EndWatch {
    fn start(shutdown: &Shutdown, vm: &Vm) -> Self {
        let w = Self::default();
        let (w2, s, g) = (w.clone(), shutdown.clone(), vm.guest_status());
        // If the thread cannot start, the run simply never ends on its own (Ctrl-C still kills the process).
        let _spawned = std::thread::Builder::new()
            .name("end-watch".into())
            .spawn(move || {
                let why = s.wait(&g);
                *w2.reason.lock().unwrap_or_else(PoisonError::into_inner) = Some(why);
                w2.ended.store(true, Ordering::SeqCst);
            });
        w
    }

    fn ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }

    fn result(&self) -> Result<(), RunError> {
        let reason = self.reason.lock().unwrap_or_else(PoisonError::into_inner).clone();
        reason.map_or(Ok(()), EndReason::into_result)
    }
}

/// `migrator run`: boots the guest; with an API or events, serves `status` and `migrate` until the guest was
/// migrated away (exit 0), stops, or a signal comes.
pub fn run(config: &RunConfig) -> Result<(), RunError> {
    if config.api.is_none() && config.events.is_none() {
        return crate::runner::run(&config.vm);
    }
    let shutdown = Shutdown::install()?;
    let status = Arc::new(Mutex::new(Status {
        state: MigrationState::Running,
        ..Status::default()
    }));
    let server = config
        .api
        .as_deref()
        .map(|p| ApiServer::bind(p, status))
        .transpose()?;
    let mut vm = crate::runner::boot(&config.vm)?;
    let end = EndWatch::start(&shutdown, &vm);
    let served = serve(&mut vm, server.as_ref(), config.events.as_deref(), |_| {
        end.ended()
    });
    vm.shutdown();
    match served {
        Served::Migrated(_) => {
            eprintln!("migrator: the guest runs at the destination now; exiting");
            Ok(())
        }
        Served::Dropped => Err(RunError::Dropped),
        Served::Stopped => end.result(),
    }
}

/// `migrator receive`: waits for one migration, then runs the guest like `run --api` (so it can move on).
pub fn run_destination(config: &ReceiveConfig) -> Result<(), RunError> {
    let shutdown = Shutdown::install()?;
    let tap = config.tap.clone();
    let create = move |hello: &Hello| -> Result<IncomingVm, BoxedVmError> {
        let mut config: VmConfig = serde_json::from_slice(&hello.config).map_err(boxed)?;
        config.tap = tap;
        config.serial = SerialOutput::Stderr {
            prefix: "guest: ".into(),
        };
        let vm = Vm::create_for_restore(&config).map_err(boxed)?;
        // Attaching to the tap raises its carrier, but the kernel applies that (operstate, and with it the bridge
        // port state) only at its next link-watch run, up to a second later. Until then the bridge drops the
        // announce and the guest's frames, so wait here, while the source still runs, not after resume.
        if !wait_link_running(&config.tap, LINK_UP_TIMEOUT) {
            eprintln!(
                "migrator: warning: tap {} is not running after {LINK_UP_TIMEOUT:?} (is it up?); frames may be lost",
                config.tap
            );
        }
        Ok(IncomingVm { vm, started: false })
    };
    // Ctrl-C before a VM runs here: nothing to clean up (an incoming source rolls back on the closed stream).
    let received = Arc::new(AtomicBool::new(false));
    {
        let (s, r) = (shutdown.clone(), received.clone());
        let mut sockets: Vec<PathBuf> = config.api.iter().cloned().collect();
        if let Endpoint::Unix(p) = &config.listen {
            sockets.push(p.clone());
        }
        let _spawned = std::thread::Builder::new()
            .name("early-signal".into())
            .spawn(move || {
                let _why = s.wait(&Arc::new(GuestStatus::default()));
                if !r.load(Ordering::SeqCst) {
                    eprintln!("migrator: interrupted before a migration came in");
                    for p in sockets {
                        let _ignored = std::fs::remove_file(p);
                    }
                    std::process::exit(130);
                }
            });
    }
    let mut end: Option<EndWatch> = None;
    let (migrated, _received) = receive_and_serve(config, create, |vm: &mut IncomingVm| {
        end.get_or_insert_with(|| {
            received.store(true, Ordering::SeqCst);
            EndWatch::start(&shutdown, &vm.vm)
        })
        .ended()
    })?;
    if migrated.is_some() {
        eprintln!("migrator: the guest runs at the next destination now; exiting");
        return Ok(());
    }
    end.map_or(Ok(()), |e| e.result())
}
