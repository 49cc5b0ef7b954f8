//! The vCPU: its thread running `KVM_RUN`, the exits it handles, pause/resume through messages, and its saved state.
//!
//! The thread owns the `VcpuFd`. Everything else talks to it by [`VcpuRequest`] messages: the sender queues the
//! message, wakes the thread if it waits in `hlt`, and kicks it out of `KVM_RUN` with a signal whose handler sets
//! `kvm_run.immediate_exit` (so a signal that lands just before `KVM_RUN` is not lost), as firecracker and
//! cloud-hypervisor do.
//!
//! Exits handled (there is no in-kernel irqchip, so there are no interrupts):
//! - port I/O: the VMM's own ports ([`PORT_SLEEP_US`], [`PORT_IDLE`], [`PORT_MARK`], [`PORT_EXIT`]) here, every
//!   other port on the port [`Bus`] (COM1);
//! - MMIO: the MMIO [`Bus`] (the virtio-mmio window);
//! - `hlt`: the thread sleeps until the guest's timer is due, a frame was delivered, or a message arrives, then
//!   re-enters the guest, which continues after its `hlt`. An idle guest therefore costs almost nothing.

use std::{
    cell::Cell,
    sync::{
        Arc, Condvar, Mutex,
        mpsc::{Receiver, Sender},
    },
    time::{Duration, Instant},
};

use guest_abi::{GuestMark, PORT_EXIT, PORT_IDLE, PORT_MARK, PORT_SLEEP_US};
use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, Msrs, kvm_fpu, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_run, kvm_sregs,
    kvm_vcpu_events,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};

use crate::bus::Bus;

/// `MSR_IA32_TSC`.
pub const MSR_IA32_TSC: u32 = 0x10;
/// `MSR_MTRRdefType`: bit 11 enables MTRRs, the low byte is the default memory type.
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_TYPE_WRBACK: u64 = 6;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;

/// Errors of the vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("KVM_CREATE_VCPU failed")]
    Create(#[source] kvm_ioctls::Error),
    #[error("KVM_GET_SUPPORTED_CPUID / KVM_SET_CPUID2 failed")]
    Cpuid(#[source] kvm_ioctls::Error),
    #[error("KVM_GET_MSR_INDEX_LIST failed")]
    MsrIndexList(#[source] kvm_ioctls::Error),
    #[error("KVM vCPU ioctl {op} failed")]
    Ioctl {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_SET_MSRS stopped at MSR {index:#x} ({done} of {total} restored)")]
    SetMsrs { index: u32, done: usize, total: usize },
    #[error("the saved vCPU state has MSR {0:#x}, which this host's KVM cannot restore")]
    UnknownMsr(u32),
    #[error("cannot allocate the MSR buffer")]
    MsrBuffer,
    #[error("cannot install the vCPU kick signal handler")]
    SignalHandler(#[source] vmm_sys_util::errno::Error),
    #[error("cannot start the vCPU thread")]
    SpawnThread(#[source] std::io::Error),
    #[error("the vCPU thread is gone")]
    ThreadGone,
}

fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Ioctl { op, source }
}

/// One saved MSR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrEntry {
    pub index: u32,
    pub data: u64,
}

/// The legacy FPU/SSE state (`kvm_fpu`, which kvm-bindings does not serialize).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        Self {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        Self {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// Everything needed to resume the vCPU elsewhere.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: FpuState,
    /// Every MSR this KVM can save and restore, the TSC among them.
    pub msrs: Vec<MsrEntry>,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
    /// Microseconds left of a sleep the guest announced on `PORT_SLEEP_US` but has not started with `hlt` yet.
    pub sleep_us: Option<u32>,
}

/// How the guest stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestExit {
    /// `PORT_EXIT` with this status (0 = clean, otherwise a guest panic).
    Status(u32),
    /// The vCPU died: a triple fault, an entry failure, an emulation error, or a VMM error.
    Crashed(String),
}

/// What the guest reported: milestone counts and how it stopped. Shared by the vCPU thread and waiters.
#[derive(Debug, Default)]
pub struct GuestStatus {
    inner: Mutex<StatusInner>,
    cond: Condvar,
}

#[derive(Debug, Default)]
struct StatusInner {
    ready: u64,
    garp_sent: u64,
    unknown_marks: u64,
    exit: Option<GuestExit>,
    ready_at: Option<Instant>,
}

/// Errors waiting for the guest.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("timed out after {0:?} waiting for the guest")]
    Timeout(Duration),
    #[error("the guest stopped ({0:?}) before it got there")]
    Exited(GuestExit),
}

impl GuestStatus {
    fn lock(&self) -> std::sync::MutexGuard<'_, StatusInner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn record_mark(&self, mark: u32) {
        let mut s = self.lock();
        match GuestMark::try_from(mark) {
            Ok(GuestMark::Ready) => {
                s.ready += 1;
                s.ready_at.get_or_insert_with(Instant::now);
            }
            Ok(GuestMark::GarpSent) => s.garp_sent += 1,
            Err(_) => s.unknown_marks += 1,
        }
        self.cond.notify_all();
    }

    fn record_exit(&self, exit: GuestExit) {
        let mut s = self.lock();
        s.exit.get_or_insert(exit);
        self.cond.notify_all();
    }

    /// How many times the guest reported `mark`.
    pub fn mark_count(&self, mark: GuestMark) -> u64 {
        let s = self.lock();
        match mark {
            GuestMark::Ready => s.ready,
            GuestMark::GarpSent => s.garp_sent,
        }
    }

    /// When the guest first reported [`GuestMark::Ready`].
    pub fn ready_at(&self) -> Option<Instant> {
        self.lock().ready_at
    }

    /// How the guest stopped, if it did.
    pub fn exit(&self) -> Option<GuestExit> {
        self.lock().exit.clone()
    }

    /// Waits until the guest has reported `mark` at least `count` times.
    pub fn wait_mark(&self, mark: GuestMark, count: u64, timeout: Duration) -> Result<(), WaitError> {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        loop {
            let seen = match mark {
                GuestMark::Ready => s.ready,
                GuestMark::GarpSent => s.garp_sent,
            };
            if seen >= count {
                return Ok(());
            }
            if let Some(exit) = &s.exit {
                return Err(WaitError::Exited(exit.clone()));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(WaitError::Timeout(timeout));
            }
            s = self
                .cond
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// Waits until the guest stops; `None` on timeout.
    pub fn wait_exit(&self, timeout: Option<Duration>) -> Option<GuestExit> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut s = self.lock();
        loop {
            if let Some(exit) = &s.exit {
                return Some(exit.clone());
            }
            s = match deadline {
                None => self
                    .cond
                    .wait(s)
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return None;
                    }
                    self.cond
                        .wait_timeout(s, d - now)
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0
                }
            };
        }
    }
}

/// Wakes the vCPU thread from its `hlt` wait.
#[derive(Debug, Default)]
pub struct Waker {
    pending: Mutex<bool>,
    cond: Condvar,
}

impl Waker {
    /// Ends the current (or the next) wait.
    pub fn wake(&self) {
        *self
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = true;
        self.cond.notify_all();
    }

    /// Waits for [`Waker::wake`] or the deadline, then clears the wake-up.
    fn wait(&self, deadline: Option<Instant>) {
        let mut pending = self
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while !*pending {
            match deadline {
                None => {
                    pending = self
                        .cond
                        .wait(pending)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        break;
                    }
                    pending = self
                        .cond
                        .wait_timeout(pending, d - now)
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0;
                }
            }
        }
        *pending = false;
    }
}

/// What the exits reach: the port and MMIO buses with the devices on them, the waker and the guest status.
#[derive(Debug)]
pub struct ExitContext {
    pub pio: Bus,
    pub mmio: Bus,
    pub waker: Arc<Waker>,
    pub status: Arc<GuestStatus>,
}

/// Counters of the vCPU thread.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuStats {
    pub exits: u64,
    pub halts: u64,
    pub mmio: u64,
    pub pio: u64,
}

/// Messages to the vCPU thread.
#[derive(Debug)]
pub enum VcpuRequest {
    /// Leave `KVM_RUN` and stay out until `Resume`; answer once parked, with the vCPU state saved right there (so
    /// that saving it later needs no second round trip to this thread).
    Pause(Sender<Result<VcpuState, VcpuError>>),
    Resume,
    Save(Sender<Result<VcpuState, VcpuError>>),
    Restore(Box<VcpuState>, Sender<Result<(), VcpuError>>),
    Stats(Sender<VcpuStats>),
    /// End the thread.
    Stop,
}

/// A vCPU, before its thread starts.
#[derive(Debug)]
pub struct Vcpu {
    fd: VcpuFd,
    msr_indices: Vec<u32>,
    sleep_deadline: Option<Instant>,
    /// The last exit was port I/O or MMIO: KVM finishes the instruction only on the next `KVM_RUN`.
    pending_io: bool,
    stats: VcpuStats,
}

thread_local! {
    /// This thread's `kvm_run`, for the kick signal handler.
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN_PTR.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's live `kvm_run` mapping (set by the vCPU loop, cleared before the
        // `VcpuFd` is dropped); a volatile byte store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// The real-time signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs the kick handler (idempotent).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    static INSTALLED: std::sync::OnceLock<Result<(), vmm_sys_util::errno::Error>> =
        std::sync::OnceLock::new();
    INSTALLED
        .get_or_init(|| vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler))
        .map_err(VcpuError::SignalHandler)
}

impl Vcpu {
    /// Creates vCPU 0 with the host's supported CPUID and finds the MSRs it can save and restore.
    pub fn new(kvm: &Kvm, vm: &kvm_ioctls::VmFd) -> Result<Self, VcpuError> {
        let fd = vm.create_vcpu(0).map_err(VcpuError::Create)?;
        let cpuid: CpuId = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VcpuError::Cpuid)?;
        fd.set_cpuid2(&cpuid).map_err(VcpuError::Cpuid)?;
        let list = kvm.get_msr_index_list().map_err(VcpuError::MsrIndexList)?;
        let msr_indices = list
            .as_slice()
            .iter()
            .copied()
            .filter(|&index| msr_round_trips(&fd, index))
            .collect();
        Ok(Self {
            fd,
            msr_indices,
            sleep_deadline: None,
            pending_io: false,
            stats: VcpuStats::default(),
        })
    }

    /// The MSRs saved with the state.
    pub fn msr_indices(&self) -> &[u32] {
        &self.msr_indices
    }

    /// The vCPU's TSC frequency, if KVM knows it.
    pub fn tsc_khz(&self) -> Option<u32> {
        self.fd.get_tsc_khz().ok().filter(|&k| k > 0)
    }

    /// Sets the long-mode entry state, and the MSRs firmware would have set: MTRRs on with write-back as the default
    /// memory type (the reset value leaves them off, which would make RAM uncached where KVM honours guest MTRRs)
    /// and fast strings.
    pub fn set_boot_state(
        &self,
        regs: &kvm_regs,
        set_sregs: impl FnOnce(&mut kvm_sregs),
    ) -> Result<(), VcpuError> {
        let mut sregs = self.fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
        set_sregs(&mut sregs);
        self.fd.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS"))?;
        self.fd.set_regs(regs).map_err(ioctl("KVM_SET_REGS"))?;
        let boot_msrs = [
            kvm_msr_entry {
                index: MSR_MTRR_DEF_TYPE,
                data: MTRR_ENABLE | MTRR_TYPE_WRBACK,
                ..Default::default()
            },
            kvm_msr_entry {
                index: MSR_IA32_MISC_ENABLE,
                data: MISC_ENABLE_FAST_STRING,
                ..Default::default()
            },
        ];
        let msrs = Msrs::from_entries(&boot_msrs).map_err(|_| VcpuError::MsrBuffer)?;
        let done = self.fd.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
        if done != boot_msrs.len() {
            return Err(VcpuError::SetMsrs {
                index: boot_msrs[done].index,
                done,
                total: boot_msrs.len(),
            });
        }
        Ok(())
    }

    /// Captures the vCPU state (only consistent outside `KVM_RUN`).
    pub fn save(&self) -> Result<VcpuState, VcpuError> {
        let regs = self.fd.get_regs().map_err(ioctl("KVM_GET_REGS"))?;
        let sregs = self.fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
        let fpu = FpuState::from(&self.fd.get_fpu().map_err(ioctl("KVM_GET_FPU"))?);
        let events = self.fd.get_vcpu_events().map_err(ioctl("KVM_GET_VCPU_EVENTS"))?;
        let mp_state = self.fd.get_mp_state().map_err(ioctl("KVM_GET_MP_STATE"))?;
        let entries: Vec<kvm_msr_entry> = self
            .msr_indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::MsrBuffer)?;
        let n = self.fd.get_msrs(&mut msrs).map_err(ioctl("KVM_GET_MSRS"))?;
        if n != entries.len() {
            return Err(VcpuError::Ioctl {
                op: "KVM_GET_MSRS",
                source: kvm_ioctls::Error::new(libc::EIO),
            });
        }
        let msrs = msrs
            .as_slice()
            .iter()
            .map(|e| MsrEntry {
                index: e.index,
                data: e.data,
            })
            .collect();
        let now = Instant::now();
        let sleep_us = self.sleep_deadline.map(|d| {
            d.saturating_duration_since(now)
                .as_micros()
                .min(u128::from(u32::MAX - 1)) as u32
        });
        Ok(VcpuState {
            regs,
            sregs,
            fpu,
            msrs,
            events,
            mp_state,
            sleep_us,
        })
    }

    /// Loads a saved state (sregs before regs, MSRs after, events last).
    pub fn restore(&mut self, state: &VcpuState) -> Result<(), VcpuError> {
        if let Some(unknown) = state.msrs.iter().find(|m| !self.msr_indices.contains(&m.index)) {
            return Err(VcpuError::UnknownMsr(unknown.index));
        }
        self.fd.set_sregs(&state.sregs).map_err(ioctl("KVM_SET_SREGS"))?;
        self.fd.set_regs(&state.regs).map_err(ioctl("KVM_SET_REGS"))?;
        self.fd
            .set_fpu(&kvm_fpu::from(&state.fpu))
            .map_err(ioctl("KVM_SET_FPU"))?;
        let entries: Vec<kvm_msr_entry> = state
            .msrs
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::MsrBuffer)?;
        let done = self.fd.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
        if done != entries.len() {
            return Err(VcpuError::SetMsrs {
                index: entries[done].index,
                done,
                total: entries.len(),
            });
        }
        self.fd
            .set_mp_state(state.mp_state)
            .map_err(ioctl("KVM_SET_MP_STATE"))?;
        self.fd
            .set_vcpu_events(&state.events)
            .map_err(ioctl("KVM_SET_VCPU_EVENTS"))?;
        self.pending_io = false;
        self.sleep_deadline = state
            .sleep_us
            .map(|us| Instant::now() + Duration::from_micros(u64::from(us)));
        Ok(())
    }

    /// Runs the vCPU loop on a new thread.
    pub fn spawn(
        self,
        ctx: Arc<ExitContext>,
        requests: Receiver<VcpuRequest>,
        start_paused: bool,
    ) -> Result<std::thread::JoinHandle<()>, VcpuError> {
        install_kick_handler()?;
        std::thread::Builder::new()
            .name("vcpu0".into())
            .spawn(move || self.run_loop(&ctx, &requests, start_paused))
            .map_err(VcpuError::SpawnThread)
    }

    fn run_loop(mut self, ctx: &ExitContext, requests: &Receiver<VcpuRequest>, start_paused: bool) {
        KVM_RUN_PTR.with(|p| p.set(std::ptr::from_mut(self.fd.get_kvm_run())));
        let mut paused = start_paused;
        let mut stopped = false;
        'outer: loop {
            // Serve every queued message; block for more while paused or stopped.
            loop {
                let msg = if paused || stopped {
                    match requests.recv() {
                        Ok(m) => m,
                        Err(_) => break 'outer,
                    }
                } else {
                    match requests.try_recv() {
                        Ok(m) => m,
                        Err(std::sync::mpsc::TryRecvError::Empty) => break,
                        Err(std::sync::mpsc::TryRecvError::Disconnected) => break 'outer,
                    }
                };
                match msg {
                    VcpuRequest::Pause(done) => {
                        self.complete_pending_io();
                        paused = true;
                        // The requester may have given up; nothing to do then.
                        let _ = done.send(self.save());
                    }
                    VcpuRequest::Resume => paused = false,
                    VcpuRequest::Save(reply) => {
                        self.complete_pending_io();
                        let _ = reply.send(self.save());
                    }
                    VcpuRequest::Restore(state, reply) => {
                        let result = self.restore(&state);
                        let _ = reply.send(result);
                    }
                    VcpuRequest::Stats(reply) => {
                        let _ = reply.send(self.stats);
                    }
                    VcpuRequest::Stop => break 'outer,
                }
            }
            match self.run_once(ctx) {
                Step::Continue => {}
                Step::Halt => {
                    self.stats.halts += 1;
                    let deadline = self.sleep_deadline.take();
                    ctx.waker.wait(deadline);
                }
                Step::Exit(exit) => {
                    ctx.status.record_exit(exit);
                    stopped = true;
                }
            }
        }
        KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
    }

    /// Lets KVM finish the instruction behind the last I/O exit without running the guest further, so that the saved
    /// state is consistent (KVM's API documentation asks for this before saving state).
    fn complete_pending_io(&mut self) {
        if !self.pending_io {
            return;
        }
        self.fd.set_kvm_immediate_exit(1);
        // With immediate_exit set KVM completes the I/O and returns EINTR before guest entry; an error here would
        // show again on the next real KVM_RUN, where it is reported.
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
        self.pending_io = false;
    }

    fn run_once(&mut self, ctx: &ExitContext) -> Step {
        let result = self.fd.run();
        self.stats.exits += 1;
        let exit = match result {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                return Step::Continue;
            }
            Err(e) => return Step::Exit(GuestExit::Crashed(format!("KVM_RUN failed: {e}"))),
        };
        self.pending_io = matches!(
            exit,
            VcpuExit::IoIn(..) | VcpuExit::IoOut(..) | VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..)
        );
        match exit {
            VcpuExit::IoOut(port, data) => {
                self.stats.pio += 1;
                match control_port(port, le_u32(data)) {
                    Some(Control::Sleep(deadline)) => self.sleep_deadline = deadline,
                    Some(Control::Idle(deadline)) => {
                        self.sleep_deadline = deadline;
                        return Step::Halt;
                    }
                    Some(Control::Mark(mark)) => ctx.status.record_mark(mark),
                    Some(Control::Exit(status)) => return Step::Exit(GuestExit::Status(status)),
                    None => {
                        ctx.pio.write(u64::from(port), data);
                    }
                }
                Step::Continue
            }
            VcpuExit::IoIn(port, data) => {
                self.stats.pio += 1;
                ctx.pio.read(u64::from(port), data);
                Step::Continue
            }
            VcpuExit::MmioRead(addr, data) => {
                self.stats.mmio += 1;
                ctx.mmio.read(addr, data);
                Step::Continue
            }
            VcpuExit::MmioWrite(addr, data) => {
                self.stats.mmio += 1;
                ctx.mmio.write(addr, data);
                Step::Continue
            }
            VcpuExit::Hlt => Step::Halt,
            VcpuExit::Intr => Step::Continue,
            VcpuExit::InternalError => Step::Exit(self.internal_error()),
            other => Step::Exit(GuestExit::Crashed(crash_reason(&other))),
        }
    }

    /// The crash report of `KVM_EXIT_INTERNAL_ERROR`: its suberror and where the guest was.
    fn internal_error(&mut self) -> GuestExit {
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the active union member.
        let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
        let rip = self.fd.get_regs().map_or(0, |r| r.rip);
        GuestExit::Crashed(format!(
            "KVM_EXIT_INTERNAL_ERROR (suberror {suberror}, rip {rip:#x}): the guest used an instruction this KVM cannot emulate"
        ))
    }
}

/// What a write to one of the VMM's own ports asks for (see [`guest_abi`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Control {
    /// [`PORT_SLEEP_US`]: the guest's next timer is due then (`None`: no timer).
    Sleep(Option<Instant>),
    /// [`PORT_IDLE`]: as `Sleep`, and the guest halts until then.
    Idle(Option<Instant>),
    /// [`PORT_MARK`]: a milestone.
    Mark(u32),
    /// [`PORT_EXIT`]: the guest stops with this status.
    Exit(u32),
}

/// Decodes a write of `value` to `port` if it is one of the VMM's own ports; devices get the others.
fn control_port(port: u16, value: u32) -> Option<Control> {
    let deadline = || (value != u32::MAX).then(|| Instant::now() + Duration::from_micros(u64::from(value)));
    Some(match port {
        PORT_SLEEP_US => Control::Sleep(deadline()),
        PORT_IDLE => Control::Idle(deadline()),
        PORT_MARK => Control::Mark(value),
        PORT_EXIT => Control::Exit(value),
        _ => return None,
    })
}

/// Why an exit that ends the guest ended it.
fn crash_reason(exit: &VcpuExit<'_>) -> String {
    match exit {
        VcpuExit::Shutdown => "KVM_EXIT_SHUTDOWN (triple fault)".into(),
        VcpuExit::FailEntry(reason, cpu) => format!("KVM_EXIT_FAIL_ENTRY (reason {reason:#x}, cpu {cpu})"),
        other => format!("unexpected vCPU exit {other:?}"),
    }
}

impl crate::persist::Persist for Vcpu {
    type State = VcpuState;
    type Error = VcpuError;

    fn save(&self) -> Result<VcpuState, VcpuError> {
        Vcpu::save(self)
    }

    fn restore(&mut self, state: &VcpuState) -> Result<(), VcpuError> {
        Vcpu::restore(self, state)
    }
}

enum Step {
    Continue,
    Halt,
    Exit(GuestExit),
}

fn le_u32(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

/// Whether `index` can be read and written back (probed once, before the guest runs).
fn msr_round_trips(fd: &VcpuFd, index: u32) -> bool {
    let Ok(mut msrs) = Msrs::from_entries(&[kvm_msr_entry {
        index,
        ..Default::default()
    }]) else {
        return false;
    };
    if fd.get_msrs(&mut msrs) != Ok(1) {
        return false;
    }
    fd.set_msrs(&msrs) == Ok(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_waits_and_exits() {
        let s = Arc::new(GuestStatus::default());
        assert!(matches!(
            s.wait_mark(GuestMark::Ready, 1, Duration::from_millis(10)),
            Err(WaitError::Timeout(_))
        ));
        let s2 = Arc::clone(&s);
        let t = std::thread::spawn(move || s2.wait_mark(GuestMark::Ready, 1, Duration::from_secs(10)));
        s.record_mark(GuestMark::GarpSent as u32);
        s.record_mark(GuestMark::Ready as u32);
        t.join().unwrap().unwrap();
        assert_eq!(s.mark_count(GuestMark::GarpSent), 1);
        s.record_mark(99);
        s.record_exit(GuestExit::Status(3));
        assert!(matches!(
            s.wait_mark(GuestMark::GarpSent, 2, Duration::from_secs(10)),
            Err(WaitError::Exited(GuestExit::Status(3)))
        ));
        assert_eq!(s.wait_exit(Some(Duration::ZERO)), Some(GuestExit::Status(3)));
    }

    #[test]
    fn waker_wakes_once_and_times_out() {
        let w = Waker::default();
        w.wake();
        w.wait(None);
        let t = Instant::now();
        w.wait(Some(t + Duration::from_millis(20)));
        assert!(t.elapsed() >= Duration::from_millis(20));
    }

    #[test]
    fn port_values_are_little_endian() {
        assert_eq!(le_u32(&[1, 2, 3, 4]), 0x0403_0201);
        assert_eq!(le_u32(&[7]), 7);
        assert_eq!(le_u32(&[]), 0);
    }
}
