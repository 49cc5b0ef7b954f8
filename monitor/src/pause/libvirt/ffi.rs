//! The libvirt calls the `virt` crate does not wrap: domain event registration (lifecycle, migration iteration, job
//! completed), QEMU monitor events, the connection's close callback, and job statistics read without handing
//! libvirt's memory to Rust's allocator. Each callback copies what it needs into a [`Raw`] record on the shared
//! queue and returns: the driver handles the records outside libvirt's callbacks.

use std::{
    ffi::{CStr, CString, c_char, c_int, c_longlong, c_uint, c_void},
    ptr,
    sync::{Arc, Mutex, PoisonError},
};

use virt::sys;

use super::translate::JobFigures;

/// What a callback saw.
#[derive(Debug)]
pub enum RawKind {
    Lifecycle {
        event: i32,
        detail: i32,
    },
    Iteration(i32),
    JobCompleted(JobFigures),
    /// A QEMU monitor event (STOP or RESUME) with QEMU's wall-clock timestamp.
    Qemu {
        event: String,
        seconds: i64,
        micros: u32,
    },
    /// The connection closed (`virConnectCloseReason`).
    Closed(i32),
}

/// One callback's record: which connection (and which of its incarnations), when, which domain, what.
#[derive(Debug)]
pub struct Raw {
    pub conn: usize,
    pub generation: u64,
    /// `CLOCK_MONOTONIC` when the callback ran.
    pub ts: u64,
    pub uuid: String,
    pub name: String,
    pub kind: RawKind,
}

pub type Queue = Arc<Mutex<Vec<Raw>>>;

/// The opaque pointer of every registration: where to put records, and whose they are.
struct Ctx {
    conn: usize,
    generation: u64,
    queue: Queue,
}

impl Ctx {
    fn push(&self, uuid: String, name: String, kind: RawKind) {
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Raw {
                conn: self.conn,
                generation: self.generation,
                ts: migevents::monotonic_ns(),
                uuid,
                name,
                kind,
            });
    }
}

/// Frees a [`Ctx`] (libvirt calls it when the registration ends).
unsafe extern "C" fn free_ctx(opaque: *mut c_void) {
    if !opaque.is_null() {
        // SAFETY: every opaque pointer handed to libvirt is a `Box<Ctx>` leaked by `ctx()`, freed only here, once.
        drop(unsafe { Box::from_raw(opaque.cast::<Ctx>()) });
    }
}

fn ctx(conn: usize, generation: u64, queue: &Queue) -> *mut c_void {
    Box::into_raw(Box::new(Ctx {
        conn,
        generation,
        queue: queue.clone(),
    }))
    .cast()
}

/// The domain's UUID (lower case) and name.
///
/// # Safety
/// `dom` is a valid domain pointer for the duration of the call (libvirt guarantees it inside a callback).
unsafe fn identity(dom: sys::virDomainPtr) -> (String, String) {
    let mut buf = [0 as c_char; sys::VIR_UUID_STRING_BUFLEN as usize];
    // SAFETY: `buf` has the length libvirt requires (VIR_UUID_STRING_BUFLEN); `dom` is valid (caller).
    let uuid = if unsafe { sys::virDomainGetUUIDString(dom, buf.as_mut_ptr()) } == 0 {
        // SAFETY: libvirt wrote a NUL-terminated string into `buf`.
        unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .to_ascii_lowercase()
    } else {
        String::new()
    };
    // SAFETY: `dom` is valid; the name belongs to it and is only read here.
    let name = unsafe { sys::virDomainGetName(dom) };
    let name = if name.is_null() {
        String::new()
    } else {
        // SAFETY: a non-null name is a NUL-terminated string owned by `dom`.
        unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned()
    };
    (uuid, name)
}

/// # Safety
/// Called by libvirt with a valid domain and the [`Ctx`] registered with it.
unsafe extern "C" fn on_lifecycle(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: c_int,
    detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    // SAFETY: `opaque` is the live `Ctx` of this registration; `dom` is valid during the callback.
    let (ctx, (uuid, name)) = unsafe { (&*opaque.cast::<Ctx>(), identity(dom)) };
    ctx.push(uuid, name, RawKind::Lifecycle { event, detail });
    0
}

/// # Safety
/// As [`on_lifecycle`].
unsafe extern "C" fn on_iteration(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    iteration: c_int,
    opaque: *mut c_void,
) {
    // SAFETY: as in `on_lifecycle`.
    let (ctx, (uuid, name)) = unsafe { (&*opaque.cast::<Ctx>(), identity(dom)) };
    ctx.push(uuid, name, RawKind::Iteration(iteration));
}

/// Reads typed parameters as (name, integer value); strings are skipped and doubles truncated.
///
/// # Safety
/// `params` points to `n` initialised parameters (or is null with `n == 0`).
unsafe fn read_params(params: sys::virTypedParameterPtr, n: c_int) -> Vec<(String, i128)> {
    let n = usize::try_from(n).unwrap_or(0);
    if params.is_null() || n == 0 {
        return Vec::new();
    }
    // SAFETY: libvirt passes `n` initialised parameters at `params` (caller).
    let params = unsafe { std::slice::from_raw_parts(params, n) };
    params
        .iter()
        .filter_map(|p| {
            // SAFETY: `field` is a NUL-terminated name within its fixed-size array (libvirt's contract).
            let field = unsafe { CStr::from_ptr(p.field.as_ptr()) }
                .to_string_lossy()
                .into_owned();
            let t = u32::try_from(p.type_).ok()?;
            // SAFETY: the union member read is the one `type_` says is set.
            let v = unsafe {
                match t {
                    sys::VIR_TYPED_PARAM_INT => i128::from(p.value.i),
                    sys::VIR_TYPED_PARAM_UINT => i128::from(p.value.ui),
                    sys::VIR_TYPED_PARAM_LLONG => i128::from(p.value.l),
                    sys::VIR_TYPED_PARAM_ULLONG => i128::from(p.value.ul),
                    sys::VIR_TYPED_PARAM_DOUBLE => p.value.d as i128,
                    sys::VIR_TYPED_PARAM_BOOLEAN => i128::from(p.value.b),
                    _ => return None,
                }
            };
            Some((field, v))
        })
        .collect()
}

fn figures(params: &[(String, i128)]) -> JobFigures {
    JobFigures::from_params(params.iter().map(|(k, v)| (k.as_str(), *v)))
}

/// # Safety
/// As [`on_lifecycle`]; `params` holds `nparams` parameters.
unsafe extern "C" fn on_job_completed(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    params: sys::virTypedParameterPtr,
    nparams: c_int,
    opaque: *mut c_void,
) {
    // SAFETY: as in `on_lifecycle`; libvirt owns `params` for the duration of the callback.
    let (ctx, (uuid, name), params) = unsafe {
        (
            &*opaque.cast::<Ctx>(),
            identity(dom),
            read_params(params, nparams),
        )
    };
    ctx.push(uuid, name, RawKind::JobCompleted(figures(&params)));
}

/// # Safety
/// As [`on_lifecycle`]; `event` is a NUL-terminated string.
unsafe extern "C" fn on_qemu_event(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: *const c_char,
    seconds: c_longlong,
    micros: c_uint,
    _details: *const c_char,
    opaque: *mut c_void,
) {
    if event.is_null() {
        return;
    }
    // SAFETY: as in `on_lifecycle`; `event` is non-null and NUL-terminated (libvirt's contract).
    let (ctx, (uuid, name), event) = unsafe {
        (
            &*opaque.cast::<Ctx>(),
            identity(dom),
            CStr::from_ptr(event).to_string_lossy().into_owned(),
        )
    };
    ctx.push(
        uuid,
        name,
        RawKind::Qemu {
            event,
            seconds,
            micros,
        },
    );
}

/// # Safety
/// Called by libvirt with the [`Ctx`] registered with the close callback.
unsafe extern "C" fn on_close(_conn: sys::virConnectPtr, reason: c_int, opaque: *mut c_void) {
    // SAFETY: `opaque` is the live `Ctx` of the close callback.
    let ctx = unsafe { &*opaque.cast::<Ctx>() };
    ctx.push(String::new(), String::new(), RawKind::Closed(reason));
}

type LifecycleCb =
    unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, c_int, c_int, *mut c_void) -> c_int;
type IterationCb = unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, c_int, *mut c_void);
type JobCompletedCb = unsafe extern "C" fn(
    sys::virConnectPtr,
    sys::virDomainPtr,
    sys::virTypedParameterPtr,
    c_int,
    *mut c_void,
);
type GenericCb = unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void);

/// The registrations of one connection, to undo before closing it.
#[derive(Debug, Default)]
pub struct Registrations {
    domain_events: Vec<c_int>,
    qemu_events: Option<c_int>,
    close: bool,
}

/// Errors registering for events.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("libvirt refused the {what} event registration: {message}")]
    Refused { what: &'static str, message: String },
}

fn last_error() -> String {
    virt::error::Error::last_error().to_string()
}

/// Registers the close callback and the lifecycle, migration-iteration and job-completed events of every domain.
/// QEMU's STOP/RESUME pass-through is optional (`Ok(false)` when the driver has none).
pub fn register(
    conn: &virt::connect::Connect,
    index: usize,
    generation: u64,
    queue: &Queue,
    regs: &mut Registrations,
) -> Result<bool, RegisterError> {
    let c = conn.as_ptr();
    // SAFETY: `c` is an open connection; the opaque pointer is a leaked `Ctx` that libvirt frees with `free_ctx`.
    if unsafe {
        sys::virConnectRegisterCloseCallback(c, Some(on_close), ctx(index, generation, queue), Some(free_ctx))
    } < 0
    {
        return Err(RegisterError::Refused {
            what: "close",
            message: last_error(),
        });
    }
    regs.close = true;
    // SAFETY: libvirt calls a domain event callback through the generic type and casts it back by event id
    // (`VIR_DOMAIN_EVENT_CALLBACK`); each callback below matches the signature of its id.
    let cbs: [(c_int, GenericCb, &'static str); 3] = unsafe {
        [
            (
                sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE as c_int,
                std::mem::transmute::<LifecycleCb, GenericCb>(on_lifecycle),
                "lifecycle",
            ),
            (
                sys::VIR_DOMAIN_EVENT_ID_MIGRATION_ITERATION as c_int,
                std::mem::transmute::<IterationCb, GenericCb>(on_iteration),
                "migration-iteration",
            ),
            (
                sys::VIR_DOMAIN_EVENT_ID_JOB_COMPLETED as c_int,
                std::mem::transmute::<JobCompletedCb, GenericCb>(on_job_completed),
                "job-completed",
            ),
        ]
    };
    for (id, cb, what) in cbs {
        // SAFETY: `c` is open; a null domain means every domain; the opaque `Ctx` is freed by `free_ctx`.
        let r = unsafe {
            sys::virConnectDomainEventRegisterAny(
                c,
                ptr::null_mut(),
                id,
                Some(cb),
                ctx(index, generation, queue),
                Some(free_ctx),
            )
        };
        if r < 0 {
            return Err(RegisterError::Refused {
                what,
                message: last_error(),
            });
        }
        regs.domain_events.push(r);
    }
    let pattern = CString::from(c"^(STOP|RESUME)$");
    // SAFETY: as above; the pattern is a valid C string that libvirt copies.
    let r = unsafe {
        sys::virConnectDomainQemuMonitorEventRegister(
            c,
            ptr::null_mut(),
            pattern.as_ptr(),
            Some(on_qemu_event),
            ctx(index, generation, queue),
            Some(free_ctx),
            sys::VIR_CONNECT_DOMAIN_QEMU_MONITOR_EVENT_REGISTER_REGEX,
        )
    };
    if r >= 0 {
        regs.qemu_events = Some(r);
    }
    Ok(r >= 0)
}

/// Undoes the registrations (errors ignored: a dead connection has none left to undo).
pub fn deregister(conn: &virt::connect::Connect, regs: &mut Registrations) {
    let c = conn.as_ptr();
    for id in regs.domain_events.drain(..) {
        // SAFETY: `c` is the connection the id was registered on.
        unsafe { sys::virConnectDomainEventDeregisterAny(c, id) };
    }
    if let Some(id) = regs.qemu_events.take() {
        // SAFETY: as above.
        unsafe { sys::virConnectDomainQemuMonitorEventDeregister(c, id) };
    }
    if std::mem::take(&mut regs.close) {
        // SAFETY: as above; the callback is the one registered.
        unsafe { sys::virConnectUnregisterCloseCallback(c, Some(on_close)) };
    }
}

/// The statistics of the job running on `dom` (`virDomainGetJobStats`), if one runs.
pub fn job_stats(dom: &virt::domain::Domain) -> Option<JobFigures> {
    let mut kind: c_int = 0;
    let mut params: sys::virTypedParameterPtr = ptr::null_mut();
    let mut n: c_int = 0;
    // SAFETY: `dom` is valid; libvirt allocates `params` and we free it with `virTypedParamsFree` below.
    let r = unsafe { sys::virDomainGetJobStats(dom.as_ptr(), &raw mut kind, &raw mut params, &raw mut n, 0) };
    if r < 0 {
        return None;
    }
    // SAFETY: on success `params` holds `n` parameters.
    let read = unsafe { read_params(params, n) };
    // SAFETY: `params` and `n` are what `virDomainGetJobStats` returned; freed once.
    unsafe { sys::virTypedParamsFree(params, n) };
    // VIR_DOMAIN_JOB_NONE: no job runs.
    (kind != 0).then(|| figures(&read))
}

/// Keeps libvirt from printing its errors on stderr: they come back as `Err` values and are reported once.
pub fn quiet_errors() {
    virt::error::clear_error_callback();
}

/// The wake-up timer's callback: nothing to do, the loop iteration returning is the point.
unsafe extern "C" fn tick(_timer: c_int, _opaque: *mut c_void) {}

/// Registers libvirt's default event loop (once per process) and a timer that wakes it every `ms`, so the thread
/// that runs it notices a stop and its reconnects.
pub fn event_loop(ms: i32) -> Result<(), RegisterError> {
    static INIT: std::sync::Once = std::sync::Once::new();
    let mut failed = None;
    INIT.call_once(|| {
        if let Err(e) = virt::event::event_register_default_impl() {
            failed = Some(e.to_string());
            return;
        }
        // SAFETY: a timer with no opaque data and no free function; it lives as long as the process.
        if unsafe { sys::virEventAddTimeout(ms, Some(tick), ptr::null_mut(), None) } < 0 {
            failed = Some(last_error());
        }
    });
    match failed {
        Some(message) => Err(RegisterError::Refused {
            what: "event loop",
            message,
        }),
        None => Ok(()),
    }
}

/// Runs one iteration of libvirt's event loop (dispatching callbacks), waking within the timer's period.
pub fn run_once() -> Result<(), String> {
    virt::event::event_run_default_impl().map_err(|e| e.to_string())
}
