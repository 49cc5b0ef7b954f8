//! The VM: KVM, guest RAM, the vCPU thread, the net device with its I/O thread, and the operations a migration
//! needs (dirty log, pause/resume, state, frames carried across).
//!
//! # Lifecycle
//!
//! ```text
//! Vm::create(cfg)             fresh boot: RAM, KVM, devices, guest image, BootInfo, entry registers
//! Vm::create_for_restore(cfg) RAM, KVM, devices; nothing booted (the migration fills RAM, then restore_state)
//! vm.start()                  vCPU + I/O threads run
//! vm.pause() / vm.resume()    vCPU parked outside KVM_RUN (its state saved as it parks); no VMM write to guest
//!                             RAM while paused
//! vm.save_state()             (paused) -> VmState;   vm.restore_state(&VmState) (before start, or paused)
//! vm.shutdown()               stops and joins the threads (also on drop)
//! ```
//!
//! # Threads
//!
//! - `vcpu0` runs `KVM_RUN` and handles the exits (see [`crate::vcpu`]).
//! - `net-io` polls the tap and moves received frames into the guest's RX buffers, marking the pages it writes in
//!   the VMM dirty bitmap, then wakes the vCPU from `hlt`. While the VM is paused it keeps reading the tap but only
//!   queues the frames in the VMM ([`Vm::take_pending_frames`]).

use std::{
    io::Write,
    net::{Ipv4Addr, Ipv6Addr},
    os::{
        fd::{AsFd, AsRawFd},
        unix::thread::JoinHandleExt,
    },
    path::PathBuf,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, Ordering},
        mpsc::{self, Sender},
    },
    thread::JoinHandle,
    time::Duration,
};

use guest_abi::{BOOT_INFO_ADDR, GuestMark, MMIO_BASE, MMIO_SIZE, PORT_SERIAL};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::{
    boot::{self, BootError, BootParams},
    bus::{Bus, BusError},
    devices::{
        net::{NetCounters, NetDevice, NetError},
        serial::Serial,
        virtio_mmio::{MmioError, MmioTransport},
    },
    memory::{GuestMemoryMmap, Memory, MemoryError},
    persist::Persist,
    ram::{DirtyBitmap, RamRegion},
    ram_io::GuestRam,
    tap::{MAX_FRAME, Tap, TapError},
    vcpu::{
        ExitContext, GuestExit, GuestStatus, Vcpu, VcpuError, VcpuRequest, VcpuState, VcpuStats, WaitError,
        Waker, kick_signal,
    },
    vm_state::VmState,
};

/// The guest image, built by `build.rs` from the `guest` crate and embedded in the binary.
pub static GUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest.elf"));

/// COM1's registers: eight ports from [`PORT_SERIAL`].
const SERIAL_PORTS: u64 = 8;

/// How long `pause` waits for the vCPU thread to park before giving up.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the guest's serial log goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SerialOutput {
    /// Standard error, each line prefixed.
    Stderr { prefix: String },
    /// Appended to a file.
    File(PathBuf),
    /// Nowhere.
    #[default]
    Discard,
}

/// What a VM is made of. Plain data: a migration sends it to the destination, which replaces `tap` and `serial`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// Guest RAM in bytes (a multiple of 2 MiB, at least 16 MiB).
    pub ram_bytes: u64,
    /// The tap to attach to, in the current network namespace.
    pub tap: String,
    pub mac: [u8; 6],
    pub ipv4: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
    /// The VM's global (or unique local) IPv6 address and prefix length; it always has a link-local one too.
    #[serde(default)]
    pub ipv6: Option<(Ipv6Addr, u8)>,
    /// Memory dirtier: working set in bytes (0 = off) and rewrite rate in bytes per second.
    pub dirty_bytes: u64,
    pub dirty_rate: u64,
    #[serde(skip)]
    pub serial: SerialOutput,
}

/// Errors of the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(
        "cannot open /dev/kvm: load the kvm module (here: kvm_pvm) and run as root or as a member of group kvm"
    )]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_VM failed")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("guest memory")]
    Memory(#[from] MemoryError),
    #[error("tap")]
    Tap(#[from] TapError),
    #[error("vCPU")]
    Vcpu(#[from] VcpuError),
    #[error("loading the guest")]
    Boot(#[from] BootError),
    #[error("virtio-mmio transport")]
    Transport(#[from] MmioError),
    #[error("net device")]
    Net(#[from] NetError),
    #[error("cannot place a device on the I/O bus")]
    Bus(#[from] BusError),
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot start the net I/O thread")]
    SpawnIoThread(#[source] std::io::Error),
    #[error("cannot open the serial log {path}")]
    SerialLog {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the VM is already started")]
    AlreadyStarted,
    #[error("the VM must be paused for this")]
    NotPaused,
    #[error("the vCPU did not stop within {0:?}")]
    PauseTimeout(Duration),
    #[error("the saved state is for {saved} bytes of RAM, this VM has {ours}")]
    RamMismatch { saved: u64, ours: u64 },
    #[error("cannot access the guest mailbox")]
    Mailbox(#[source] vm_memory::GuestMemoryError),
    #[error("waiting for the guest")]
    Wait(#[from] WaitError),
}

struct VcpuThread {
    join: JoinHandle<()>,
    requests: Sender<VcpuRequest>,
    /// The vCPU state saved by the vCPU thread when it parked for the current pause (`None` when running, or when
    /// that save failed: `save_state` then asks again and reports the error).
    parked: Option<VcpuState>,
}

struct IoThread {
    join: JoinHandle<()>,
    stop: Arc<AtomicBool>,
}

/// A running (or ready to run) VM.
pub struct Vm {
    config: VmConfig,
    // Field order is drop order: threads stop before the devices, KVM fds close before RAM is unmapped.
    vcpu_thread: Option<VcpuThread>,
    io_thread: Option<IoThread>,
    vcpu: Option<Vcpu>,
    ctx: Arc<ExitContext>,
    serial: Arc<Mutex<Serial>>,
    net: Arc<Mutex<MmioTransport<NetDevice>>>,
    tap: Arc<Tap>,
    io_event: Arc<EventFd>,
    rx_event: Arc<EventFd>,
    paused: bool,
    vmfd: VmFd,
    _kvm: Kvm,
    memory: Memory,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("config", &self.config)
            .field("started", &self.vcpu_thread.is_some())
            .field("paused", &self.paused)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Writes each serial line to stderr behind a prefix.
struct PrefixedStderr(String);

impl Write for PrefixedStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut err = std::io::stderr().lock();
        err.write_all(self.0.as_bytes())?;
        err.write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

fn serial_sink(out: &SerialOutput) -> Result<Box<dyn Write + Send>, VmError> {
    Ok(match out {
        SerialOutput::Stderr { prefix } => Box::new(PrefixedStderr(prefix.clone())),
        SerialOutput::File(path) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| VmError::SerialLog {
                    path: path.clone(),
                    source,
                })?,
        ),
        SerialOutput::Discard => Box::new(std::io::sink()),
    })
}

impl Vm {
    /// Builds a VM and boots the embedded guest into it (the vCPU starts with [`Vm::start`]).
    pub fn create(config: &VmConfig) -> Result<Self, VmError> {
        Self::create_with_image(config, GUEST_ELF)
    }

    /// As [`Vm::create`], with another guest image (tests).
    pub fn create_with_image(config: &VmConfig, elf: &[u8]) -> Result<Self, VmError> {
        let vm = Self::build(config)?;
        let ram_top = vm.memory.regions()[0].size;
        let image = boot::parse_elf(elf, ram_top)?;
        let mem = vm.memory.guest_memory();
        let entry = boot::load_elf(mem, elf, &image)?;
        let vcpu = vm.vcpu.as_ref().ok_or(VmError::AlreadyStarted)?;
        let tsc_khz = vcpu.tsc_khz().map_or_else(measure_tsc_khz, u64::from);
        let info = boot::boot_info(&BootParams {
            ram_bytes: config.ram_bytes,
            tsc_khz,
            mac: config.mac,
            ipv4: config.ipv4.octets(),
            prefix_len: config.prefix_len,
            gateway: config.gateway.unwrap_or(Ipv4Addr::UNSPECIFIED).octets(),
            ipv6: config.ipv6.map_or([0; 16], |(a, _)| a.octets()),
            ipv6_prefix_len: config.ipv6.map_or(0, |(_, p)| p),
            dirty_bytes: config.dirty_bytes,
            dirty_rate: config.dirty_rate,
        });
        boot::write_boot_structures(mem, vm.memory.regions(), &info)?;
        vcpu.set_boot_state(&boot::entry_regs(entry), boot::set_long_mode_sregs)?;
        Ok(vm)
    }

    /// Builds a VM with empty RAM and devices in their reset state, for [`Vm::restore_state`].
    pub fn create_for_restore(config: &VmConfig) -> Result<Self, VmError> {
        Self::build(config)
    }

    fn build(config: &VmConfig) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let vmfd = kvm.create_vm().map_err(VmError::CreateVm)?;
        let mut memory = Memory::new(config.ram_bytes)?;
        memory.register(&vmfd)?;
        let tap = Arc::new(Tap::open(&config.tap)?);
        let rx_event = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(VmError::EventFd)?);
        let io_event = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(VmError::EventFd)?);
        let mut net = NetDevice::new(
            config.mac,
            Arc::clone(&tap) as Arc<dyn crate::devices::net::FrameSink>,
        );
        net.set_rx_posted_event(Arc::clone(&rx_event));
        let transport = MmioTransport::new(net, memory.guest_memory().clone())?;
        let vcpu = Vcpu::new(&kvm, &vmfd)?;
        let serial = Arc::new(Mutex::new(Serial::new(serial_sink(&config.serial)?)));
        let net = Arc::new(Mutex::new(transport));
        let mut pio = Bus::default();
        pio.insert(u64::from(PORT_SERIAL), SERIAL_PORTS, serial.clone())?;
        let mut mmio = Bus::default();
        mmio.insert(MMIO_BASE, MMIO_SIZE, net.clone())?;
        let ctx = Arc::new(ExitContext {
            pio,
            mmio,
            waker: Arc::new(Waker::default()),
            status: Arc::new(GuestStatus::default()),
        });
        Ok(Self {
            config: config.clone(),
            vcpu_thread: None,
            io_thread: None,
            vcpu: Some(vcpu),
            ctx,
            serial,
            net,
            tap,
            io_event,
            rx_event,
            paused: false,
            vmfd,
            _kvm: kvm,
            memory,
        })
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Starts the vCPU and I/O threads. The guest runs.
    pub fn start(&mut self) -> Result<(), VmError> {
        let vcpu = self.vcpu.take().ok_or(VmError::AlreadyStarted)?;
        let stop = Arc::new(AtomicBool::new(false));
        let io = IoLoop {
            tap: Arc::clone(&self.tap),
            net: Arc::clone(&self.net),
            waker: Arc::clone(&self.ctx.waker),
            io_event: Arc::clone(&self.io_event),
            rx_event: Arc::clone(&self.rx_event),
            stop: Arc::clone(&stop),
        };
        let join = std::thread::Builder::new()
            .name("net-io".into())
            .spawn(move || io.run())
            .map_err(VmError::SpawnIoThread)?;
        self.io_thread = Some(IoThread { join, stop });
        let (tx, rx) = mpsc::channel();
        let join = vcpu.spawn(Arc::clone(&self.ctx), rx, false)?;
        self.vcpu_thread = Some(VcpuThread {
            join,
            requests: tx,
            parked: None,
        });
        self.paused = false;
        Ok(())
    }

    /// Guest RAM, for bulk page reads and writes (writes through it are marked in the VMM dirty bitmap).
    pub fn memory(&self) -> &GuestMemoryMmap {
        self.memory.guest_memory()
    }

    /// Guest RAM as flat page runs (the view the migration engines and the RAM hash use).
    pub fn guest_ram(&self) -> Result<GuestRam, VmError> {
        GuestRam::new(self.memory.guest_memory().clone())
            .map_err(|e| VmError::Memory(MemoryError::RamView(e)))
    }

    /// The RAM regions, in guest-physical order.
    pub fn layout(&self) -> Vec<RamRegion> {
        self.memory.regions().to_vec()
    }

    pub fn ram_bytes(&self) -> u64 {
        self.memory.ram_bytes()
    }

    /// Starts KVM dirty logging (and clears the VMM bitmap).
    pub fn start_dirty_log(&mut self) -> Result<(), VmError> {
        Ok(self.memory.start_dirty_log(&self.vmfd)?)
    }

    /// The pages written since the last call (KVM log OR VMM bitmap), clearing both. Flat page index.
    pub fn take_dirty_pages(&self) -> Result<DirtyBitmap, VmError> {
        Ok(self.memory.take_dirty_pages(&self.vmfd)?)
    }

    pub fn stop_dirty_log(&mut self) -> Result<(), VmError> {
        Ok(self.memory.stop_dirty_log(&self.vmfd)?)
    }

    fn send(&self, req: VcpuRequest) -> Result<(), VmError> {
        let t = self
            .vcpu_thread
            .as_ref()
            .ok_or(VmError::Vcpu(VcpuError::ThreadGone))?;
        t.requests
            .send(req)
            .map_err(|_| VmError::Vcpu(VcpuError::ThreadGone))?;
        self.ctx.waker.wake();
        // SAFETY: the thread is alive (we hold its JoinHandle and have not joined it); the kick signal has a
        // handler installed before the thread started, so it only interrupts KVM_RUN.
        unsafe { libc::pthread_kill(t.join.as_pthread_t(), kick_signal()) };
        Ok(())
    }

    fn wake_io(&self) {
        // A full counter still wakes the poller.
        let _ = self.io_event.write(1);
    }

    /// Parks the vCPU outside `KVM_RUN` and stops the I/O thread writing guest RAM (frames from the tap queue in
    /// the VMM). Returns once both hold. The vCPU thread saves its state as it parks, so [`Vm::save_state`] after
    /// this costs no further round trip to it. A no-op before [`Vm::start`].
    pub fn pause(&mut self) -> Result<(), VmError> {
        if self.vcpu_thread.is_some() {
            let (tx, rx) = mpsc::channel();
            self.send(VcpuRequest::Pause(tx))?;
            let saved = rx
                .recv_timeout(PAUSE_TIMEOUT)
                .map_err(|_| VmError::PauseTimeout(PAUSE_TIMEOUT))?;
            if let Some(t) = &mut self.vcpu_thread {
                t.parked = saved.ok();
            }
        }
        // The I/O thread delivers under this lock, so once we hold it and set the flag no delivery is in progress.
        lock(&self.net).device_mut().set_paused(true);
        self.wake_io();
        self.paused = true;
        Ok(())
    }

    /// Lets the guest run again; frames queued meanwhile are delivered first.
    pub fn resume(&mut self) -> Result<(), VmError> {
        lock(&self.net).device_mut().set_paused(false);
        self.wake_io();
        if let Some(t) = &mut self.vcpu_thread {
            t.parked = None;
        }
        if self.vcpu_thread.is_some() {
            self.send(VcpuRequest::Resume)?;
        }
        self.paused = false;
        Ok(())
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Saves vCPU and device state. The VM must be paused (or not started).
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let parked = self.vcpu_thread.as_ref().and_then(|t| t.parked.clone());
        let vcpu = match (&self.vcpu, self.paused, parked) {
            (Some(v), _, _) => v.save()?,
            // Saved by the vCPU thread when it parked: no round trip inside the pause.
            (None, true, Some(saved)) => saved,
            (None, true, None) => {
                let (tx, rx) = mpsc::channel();
                self.send(VcpuRequest::Save(tx))?;
                rx.recv().map_err(|_| VmError::Vcpu(VcpuError::ThreadGone))??
            }
            (None, false, _) => return Err(VmError::NotPaused),
        };
        let net = lock(&self.net);
        let serial = lock(&self.serial).save();
        Ok(VmState {
            ram_bytes: self.ram_bytes(),
            vcpu,
            transport: net.save()?,
            net: net.device().save()?,
            serial: serial.unwrap_or_else(|never| match never {}),
        })
    }

    /// Loads saved vCPU and device state (before [`Vm::start`], or while paused). Guest RAM must already hold the
    /// source's pages.
    pub fn restore_state(&mut self, state: &VmState) -> Result<(), VmError> {
        if state.ram_bytes != self.ram_bytes() {
            return Err(VmError::RamMismatch {
                saved: state.ram_bytes,
                ours: self.ram_bytes(),
            });
        }
        match (&mut self.vcpu, self.paused) {
            (Some(v), _) => v.restore(&state.vcpu)?,
            (None, true) => {
                let (tx, rx) = mpsc::channel();
                self.send(VcpuRequest::Restore(Box::new(state.vcpu.clone()), tx))?;
                rx.recv().map_err(|_| VmError::Vcpu(VcpuError::ThreadGone))??;
                if let Some(t) = &mut self.vcpu_thread {
                    t.parked = None;
                }
            }
            (None, false) => return Err(VmError::NotPaused),
        }
        let mut net = lock(&self.net);
        net.restore(&state.transport)?;
        net.device_mut().restore(&state.net)?;
        lock(&self.serial)
            .restore(&state.serial)
            .unwrap_or_else(|never| match never {});
        Ok(())
    }

    /// Takes the frames read from the tap but not delivered (while paused: every frame that arrived since the
    /// pause). A migration carries them to the destination's [`Vm::deliver_frames`]. On a rollback, hand them back
    /// with [`Vm::deliver_frames`] before resuming.
    pub fn take_pending_frames(&self) -> Vec<Vec<u8>> {
        lock(&self.net).device_mut().take_backlog()
    }

    /// Queues frames for the guest ahead of any newer ones; they are delivered once the VM runs.
    pub fn deliver_frames(&self, frames: Vec<Vec<u8>>) {
        if frames.is_empty() {
            return;
        }
        lock(&self.net).device_mut().prepend_frames(frames);
        self.wake_io();
    }

    /// Writes a raw Ethernet frame to the tap (RARP announces).
    pub fn send_frame(&self, frame: &[u8]) -> Result<(), VmError> {
        Ok(self.tap.write_frame(frame)?)
    }

    /// Asks the guest for a gratuitous ARP: bumps `BootInfo.garp_request` (marking its page dirty) and wakes the
    /// vCPU. Returns the new request number; the guest answers with [`GuestMark::GarpSent`].
    pub fn request_garp(&self) -> Result<u32, VmError> {
        let addr = GuestAddress(BOOT_INFO_ADDR + boot::GARP_REQUEST_OFFSET);
        let mem = self.memory.guest_memory();
        let n = mem
            .read_obj::<u32>(addr)
            .map_err(VmError::Mailbox)?
            .wrapping_add(1);
        mem.write_obj(n, addr).map_err(VmError::Mailbox)?;
        self.ctx.waker.wake();
        Ok(n)
    }

    /// How often the guest reported `mark` so far.
    pub fn mark_count(&self, mark: GuestMark) -> u64 {
        self.ctx.status.mark_count(mark)
    }

    /// Waits until the guest has reported `mark` at least `count` times (fails early if the guest stops).
    pub fn wait_guest_mark(&self, mark: GuestMark, count: u64, timeout: Duration) -> Result<(), VmError> {
        Ok(self.ctx.status.wait_mark(mark, count, timeout)?)
    }

    /// Waits until the guest stops (`PORT_EXIT` or a crash); `None` on timeout.
    pub fn wait_exit(&self, timeout: Option<Duration>) -> Option<GuestExit> {
        self.ctx.status.wait_exit(timeout)
    }

    /// The shared guest status (marks, exit), for waiting from another thread.
    pub fn guest_status(&self) -> Arc<GuestStatus> {
        Arc::clone(&self.ctx.status)
    }

    /// vCPU exit counters (zero before start).
    pub fn vcpu_stats(&self) -> VcpuStats {
        let (tx, rx) = mpsc::channel();
        if self.send(VcpuRequest::Stats(tx)).is_err() {
            return VcpuStats::default();
        }
        rx.recv_timeout(PAUSE_TIMEOUT).unwrap_or_default()
    }

    /// Net device counters.
    pub fn net_counters(&self) -> NetCounters {
        lock(&self.net).device().counters()
    }

    /// Stops the threads and releases KVM, the tap and RAM.
    pub fn shutdown(mut self) {
        self.stop_threads();
    }

    fn stop_threads(&mut self) {
        if let Some(t) = self.vcpu_thread.take() {
            if t.requests.send(VcpuRequest::Stop).is_ok() {
                self.ctx.waker.wake();
                // SAFETY: as in `send`: the thread has not been joined yet.
                unsafe { libc::pthread_kill(t.join.as_pthread_t(), kick_signal()) };
            }
            // A panicking vCPU thread already reported through the panic hook.
            let _ = t.join.join();
        }
        if let Some(t) = self.io_thread.take() {
            t.stop.store(true, Ordering::SeqCst);
            self.wake_io();
            let _ = t.join.join();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

/// The TSC frequency from a short calibration against the monotonic clock (when KVM does not report it).
fn measure_tsc_khz() -> u64 {
    fn rdtsc() -> u64 {
        // SAFETY: rdtsc has no preconditions on x86-64.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    let t0 = std::time::Instant::now();
    let c0 = rdtsc();
    while t0.elapsed() < Duration::from_millis(20) {
        std::hint::spin_loop();
    }
    let c1 = rdtsc();
    let us = t0.elapsed().as_micros().max(1) as u64;
    (c1 - c0) * 1000 / us
}

/// The net I/O thread.
struct IoLoop {
    tap: Arc<Tap>,
    net: Arc<Mutex<MmioTransport<NetDevice>>>,
    waker: Arc<Waker>,
    io_event: Arc<EventFd>,
    rx_event: Arc<EventFd>,
    stop: Arc<AtomicBool>,
}

impl IoLoop {
    /// Most frames read from the tap in one go before delivering.
    const BATCH: usize = 64;

    fn run(self) {
        let mut buf = vec![0u8; MAX_FRAME];
        let mut tap_ok = true;
        while !self.stop.load(Ordering::SeqCst) {
            let want_tap = self.deliver() && tap_ok;
            let mut fds = [
                libc::pollfd {
                    fd: self.io_event.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.rx_event.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.tap.as_fd().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            let nfds = if want_tap { 3 } else { 2 };
            // SAFETY: `fds` holds `nfds` initialised pollfds that live across the call.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), nfds, -1) };
            if rc < 0 {
                continue; // EINTR
            }
            // Reset the eventfds (nonblocking: EAGAIN when already zero).
            let _ = self.io_event.read();
            let _ = self.rx_event.read();
            if want_tap
                && fds[2].revents != 0
                && let Err(e) = self.read_tap(&mut buf)
            {
                // Reading again would fail the same way and spin; the guest stays up without receive.
                eprintln!(
                    "migrator: reading tap {} failed ({e}); the guest receives nothing more",
                    self.tap.name()
                );
                tap_ok = false;
            }
        }
    }

    /// Delivers what the guest has room for; returns whether to read the tap now.
    fn deliver(&self) -> bool {
        let mut t = lock(&self.net);
        if !t.driver_ok() {
            return false;
        }
        let (dev, queues, mem) = t.parts();
        let delivered = dev.deliver_rx(queues, mem);
        if delivered > 0 {
            t.signal_used();
            self.waker.wake();
        }
        t.device().wants_tap_frames()
    }

    /// Reads up to [`IoLoop::BATCH`] frames into the backlog.
    fn read_tap(&self, buf: &mut [u8]) -> std::io::Result<()> {
        let mut frames = Vec::new();
        let mut result = Ok(());
        while frames.len() < Self::BATCH {
            match self.tap.read_frame(buf) {
                Ok(Some(n)) => frames.push(buf[..n].to_vec()),
                Ok(None) => break,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if !frames.is_empty() {
            let mut t = lock(&self.net);
            for f in frames {
                t.device_mut().push_frame(f);
            }
        }
        result
    }
}
