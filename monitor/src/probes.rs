//! Loading, configuring and attaching the kernel programs: every aya call lives here.
//!
//! [`Probes::load`] reads the tracepoint layouts from tracefs and the socket member offsets from BTF, fills the
//! programs' `CONFIG` global and the watch-list maps, loads the object and attaches the TCP, socket and bridge
//! tracepoints. [`Probes::attach_xdp`] and [`Probes::attach_tc_egress`] attach the L2 programs to interfaces,
//! in other network namespaces from a `setns` thread.
//!
//! XDP and TC only know an interface by its index, and indexes repeat across namespaces. So each namespace with
//! watched interfaces gets its own instance of the object (its own maps and ring buffer) whose `CONFIG.netns_id`
//! tells the events apart; the root namespace's instance also carries the tracepoints.
//!
//! The same type serves benchmarks: [`Probes::xdp_program`] gives the loaded XDP program for
//! `BPF_PROG_TEST_RUN`.

use std::{
    collections::{BTreeMap, HashMap},
    ffi::CString,
    net::IpAddr,
    os::fd::{AsFd, AsRawFd, OwnedFd, RawFd},
    sync::{Arc, Mutex, PoisonError},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap as BpfHashMap, MapData, MapError, PerCpuArray, PerCpuHashMap, ProgramArray, RingBuf,
    },
    programs::{
        ProgramError, SchedClassifier, TracePoint, Xdp,
        tc::{SchedClassifierLinkId, TcAttachType},
        xdp::{XdpLinkId, XdpMode},
    },
};
use aya_log::EbpfLogger;
use monitor_common::{
    CFG_FILTER_FDB, CFG_FILTER_IPS, CFG_FILTER_PORTS, CFG_FLOW_IPS, CFG_FLOW_MACS, CFG_FLOW_PORTS,
    CFG_WATCH_MACS, FLOW_CACHE_WAYS, FlowCounters, FlowKey, FlowKey4, FlowSet, FlowState, IpKey, MacCounters,
    MacKey, MacKey8, ProbeConfig, WireEvent,
};

use migmon_analysis::trace::Port;

use crate::{
    btf::Btf,
    ebpf_log::{KernelLine, KernelLog},
    netns, tracefs,
};

/// The compiled kernel programs (empty when built with `AYA_BUILD_SKIP=1`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/monitor"));

/// Default ring buffer size per instance.
pub const DEFAULT_RINGBUF_BYTES: u32 = 1 << 20;

/// The tracepoints, by program name: (program, category, event).
pub const TRACEPOINTS: [(&str, &str, &str); 6] = [
    ("tcp_retransmit_skb", "tcp", "tcp_retransmit_skb"),
    ("inet_sock_set_state", "sock", "inet_sock_set_state"),
    ("inet_sk_error_report", "sock", "inet_sk_error_report"),
    ("tcp_receive_reset", "tcp", "tcp_receive_reset"),
    ("tcp_send_reset", "tcp", "tcp_send_reset"),
    ("br_fdb_update", "bridge", "br_fdb_update"),
];

/// Errors loading or attaching the probes. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(
        "this migmon was built without its eBPF programs (AYA_BUILD_SKIP=1): rebuild it with `./x build`"
    )]
    NoObject,
    #[error(
        "loading eBPF programs needs root, or CAP_BPF + CAP_PERFMON + CAP_NET_ADMIN: run migmon with sudo \
         (or `setcap cap_bpf,cap_perfmon,cap_net_admin,cap_sys_admin+ep migmon`)"
    )]
    Permission,
    #[error(transparent)]
    Tracefs(#[from] tracefs::TracefsError),
    #[error(transparent)]
    Btf(#[from] crate::btf::BtfError),
    #[error(transparent)]
    Netns(#[from] netns::NetnsError),
    #[error("cannot load the eBPF object")]
    LoadObject(#[source] Box<aya::EbpfError>),
    #[error(
        "the eBPF object has no program {0}: migmon and its programs are out of step, rebuild with `./x build`"
    )]
    NoProgram(String),
    #[error("the kernel rejected eBPF program {program}; last lines of the verifier log:\n{log_tail}")]
    Verifier {
        program: String,
        log_tail: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("cannot load eBPF program {program}")]
    LoadProgram {
        program: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("cannot attach {program} to {target}")]
    Attach {
        program: String,
        target: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("cannot detach {program}")]
    Detach {
        program: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("no interface {iface} in {}: check `ip{} link`", where_(.netns.as_deref()), ns_flag(.netns.as_deref()))]
    NoInterface { iface: String, netns: Option<String> },
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<MapError>,
    },
    #[error("the eBPF object has no map {0}: rebuild with `./x build`")]
    NoMap(&'static str),
    #[error(
        "cannot read the programs' log (--ebpf-log): rebuild with `./x build`, or run without --ebpf-log"
    )]
    Log(#[source] Box<aya_log::Error>),
}

fn where_(netns: Option<&str>) -> String {
    netns.map_or_else(
        || "the root network namespace".to_owned(),
        |n| format!("network namespace {n}"),
    )
}

fn ns_flag(netns: Option<&str>) -> String {
    netns.map_or_else(String::new, |n| format!(" -n {n}"))
}

/// What to watch. With no IPs and no ports, every TCP connection is reported.
#[derive(Clone, Debug, Default)]
pub struct WatchList {
    pub ips: Vec<IpAddr>,
    pub ports: Vec<u16>,
    pub macs: Vec<[u8; 6]>,
}

/// How to load the probes.
#[derive(Clone, Debug)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent switches of one load, each documented; a builder would say the same at more length"
)]
pub struct ProbeOptions {
    pub watch: WatchList,
    /// Ring buffer bytes per instance (a power of two, at least a page).
    pub ringbuf_bytes: u32,
    /// Silence after which a watched MAC is reported as seen again.
    pub mac_gap_ns: u64,
    /// Attach the TCP/socket/bridge tracepoints (benchmarks of XDP alone turn this off).
    pub tracepoints: bool,
    /// Attach XDP in generic (skb) mode only, never in driver mode. On a veth, driver-mode XDP turns off the
    /// peer's segmentation offloads (every TCP segment then crosses the pair MTU-sized); skb mode leaves them on.
    pub xdp_skb_mode: bool,
    /// Run the ingress parser as a TC ingress classifier instead of XDP (`attach_xdp` then attaches that). It
    /// sees the same frames after GRO, costs no offloads and copies nothing: the cheapest on a busy veth.
    pub l2_tc_ingress: bool,
    /// With `tracepoints`: attach the TCP and socket tracepoints too (off: only `bridge:br_fdb_update`).
    pub socket_tracepoints: bool,
    /// The TCP flow tracker in the L2 programs (`None`: off).
    pub flows: Option<FlowOptions>,
    /// MACs are added while running ([`Probes::watch_mac`]): the MAC counters, the FDB filter and (with the flow
    /// tracker) flows by MAC are on from the start, and the one-word prefilter in front of the watch list passes
    /// every frame to the map lookup.
    pub learn_macs: bool,
    /// Carry the programs' own diagnostics (aya-log) to user space ([`Probes::drain_logs`]); off, the programs skip
    /// their log statements.
    pub ebpf_log: bool,
}

/// The TCP flow tracker's settings.
#[derive(Clone, Debug)]
pub struct FlowOptions {
    /// Track flows with one end at these addresses (the VMs' IPs).
    pub ips: Vec<IpAddr>,
    /// Track flows whose frames come from or go to these MACs (VMs whose IP is not known).
    pub macs: Vec<[u8; 6]>,
    /// Track only flows with one of these ports at either end (empty: every port).
    pub ports: Vec<u16>,
    /// Flows each family's table holds, IPv4 and IPv6 ([`flow_table_split`]: an array cache in front, an LRU
    /// map behind it; the least recently used flow is evicted when both are full).
    pub table_entries: u32,
    /// A side's first forward progress after this long without is reported.
    pub quiet_ns: u64,
    /// Frame captures per second and CPU in flow records (0 = no limit); records over it carry no frame bytes.
    pub captures_per_sec: u32,
    /// Captures allowed in a burst above that rate.
    pub capture_burst: u32,
}

impl Default for FlowOptions {
    fn default() -> Self {
        Self {
            ips: Vec::new(),
            macs: Vec::new(),
            ports: Vec::new(),
            table_entries: DEFAULT_FLOW_TABLE,
            quiet_ns: 50_000_000,
            captures_per_sec: 1000,
            capture_burst: 256,
        }
    }
}

/// Default entries of the flow table.
pub const DEFAULT_FLOW_TABLE: u32 = 16_384;

/// Flow table entries when the tracker is off (the map must exist; it stays empty).
const FLOW_TABLE_OFF: u32 = 64;

/// How a flow table of `entries` flows (per family) is split: the sets of the array cache in front of it (a
/// power of two of [`FLOW_CACHE_WAYS`]-way sets, at most half the entries) and the entries of the LRU map behind
/// it (the rest), which takes the flows the cache evicts.
#[must_use]
pub fn flow_table_split(entries: u32) -> (u32, u32) {
    let entries = entries.max(FLOW_TABLE_OFF);
    let ways = FLOW_CACHE_WAYS as u32;
    let sets = 1u32 << (entries / 2 / ways).max(1).ilog2();
    (sets, entries - sets * ways)
}

/// The flow tracker's counters, summed over CPUs and instances.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowTotals {
    /// Flows inserted into the tables.
    pub inserts: u64,
    /// Flows in the tables now.
    pub entries: u64,
    /// Flows the LRU evicted: the tables never delete, so `inserts - entries`.
    pub evictions: u64,
    /// Inserts the kernel refused (those flows were not tracked).
    pub insert_failed: u64,
    /// Flow records handed to the ring buffer.
    pub records: u64,
    /// Flow records sent without their frame bytes (capture budget spent).
    pub capture_dropped: u64,
    /// Later IP fragments skipped (no TCP header in them).
    pub fragments: u64,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        Self {
            watch: WatchList::default(),
            ringbuf_bytes: DEFAULT_RINGBUF_BYTES,
            mac_gap_ns: 50_000_000,
            tracepoints: true,
            xdp_skb_mode: false,
            l2_tc_ingress: false,
            socket_tracepoints: true,
            flows: None,
            learn_macs: false,
            ebpf_log: false,
        }
    }
}

/// An interface, optionally in a named network namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Iface {
    pub name: String,
    pub netns: Option<String>,
}

impl Iface {
    /// `IF` or `IF@NETNS` (an interface name is 1 to 15 characters; a namespace is not empty); `None` otherwise.
    pub fn parse(s: &str) -> Option<Self> {
        let (name, netns) = match s.rsplit_once('@') {
            Some((n, ns)) => (n, Some(ns)),
            None => (s, None),
        };
        if name.is_empty() || name.len() >= 16 || netns.is_some_and(str::is_empty) {
            return None;
        }
        Some(Self {
            name: name.to_owned(),
            netns: netns.map(str::to_owned),
        })
    }
}

impl std::fmt::Display for Iface {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.netns {
            Some(ns) => write!(f, "{}@{ns}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// How [`Probes::attach_ingress`] attaches the ingress parser.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IngressMode {
    /// TC on veths and taps, XDP elsewhere.
    #[default]
    Auto,
    /// XDP, driver mode, falling back to skb mode.
    Xdp,
    /// XDP, skb (generic) mode only.
    XdpSkb,
    /// A TC ingress classifier.
    Tc,
}

/// `iface` is a veth or a tap/tun (its driver, as ethtool reports it, is `veth` or `tun`).
pub fn is_virtual(iface: &Iface) -> Result<bool, ProbeError> {
    let driver = netns::run_in(iface.netns.as_deref(), || {
        ifindex(iface)?;
        Ok::<_, ProbeError>(driver_name(&iface.name))
    })??;
    Ok(matches!(driver.as_deref(), Some("veth" | "tun")))
}

/// `struct ethtool_drvinfo` (`include/uapi/linux/ethtool.h`).
#[repr(C)]
struct EthtoolDrvinfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

/// `struct ifreq` with the `ifr_data` member.
#[repr(C)]
struct IfreqData {
    name: [u8; 16],
    data: *mut EthtoolDrvinfo,
    pad: [u8; 16],
}

const ETHTOOL_GDRVINFO: u32 = 3;
const SIOCETHTOOL: libc::c_ulong = 0x8946;

/// The driver of interface `name` in the calling thread's namespace (`ETHTOOL_GDRVINFO`), when it says.
fn driver_name(name: &str) -> Option<String> {
    let mut info = EthtoolDrvinfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        version: [0; 32],
        fw_version: [0; 32],
        bus_info: [0; 32],
        erom_version: [0; 32],
        reserved2: [0; 12],
        n_priv_flags: 0,
        n_stats: 0,
        testinfo_len: 0,
        eedump_len: 0,
        regdump_len: 0,
    };
    let mut req = IfreqData {
        name: [0; 16],
        data: &raw mut info,
        pad: [0; 16],
    };
    let bytes = name.as_bytes();
    if bytes.len() >= req.name.len() {
        return None;
    }
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: plain socket call; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is our own socket; `req` is a valid `ifreq` whose `ifr_data` points to `info`, both live
    // across the call, and the kernel writes at most `size_of::<EthtoolDrvinfo>()` bytes there.
    let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL as _, &raw mut req) };
    // SAFETY: `fd` is open and closed once.
    unsafe { libc::close(fd) };
    if rc < 0 {
        return None;
    }
    let end = info
        .driver
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(info.driver.len());
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// The TC programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcProgram {
    /// `l2_ingress_tc`: the ingress parser as a classifier.
    Ingress,
    /// `l2_egress`: frames leaving through the interface.
    Egress,
}

impl TcProgram {
    /// The program's name in the object.
    pub fn name(self) -> &'static str {
        match self {
            TcProgram::Ingress => "l2_ingress_tc",
            TcProgram::Egress => "l2_egress",
        }
    }
}

/// What an attach did.
#[derive(Clone, Debug)]
pub struct Attached {
    pub port: Port,
    /// "driver", "skb" or "tc egress".
    pub mode: &'static str,
    /// Set when XDP fell back from driver mode: why.
    pub fallback: Option<String>,
}

struct Instance {
    netns: Option<String>,
    id: u32,
    ebpf: Ebpf,
    /// Shared with [`Rings`], which drains it while the probes are busy elsewhere (attaching a port).
    ring: Arc<Mutex<RingBuf<MapData>>>,
    /// The programs' log ring buffer, read with `--ebpf-log`.
    logger: Option<EbpfLogger<KernelLog>>,
    log: KernelLog,
    /// The flow tracker is on: the L2 programs tail-call the flow programs.
    flows: bool,
}

/// The loaded kernel programs and their maps.
pub struct Probes {
    instances: Vec<Instance>,
    config: ProbeConfig,
    opts: ProbeOptions,
    ports: HashMap<(u32, u32), Port>,
    /// The links of each attached port, keyed like `ports`, so that a port can be detached alone.
    links: HashMap<(u32, u32), Vec<PortLink>>,
    /// The hooks attached to each port, keyed like `ports`.
    hooks: HashMap<(u32, u32), Vec<String>>,
    hz: u32,
}

/// The event ring buffers of the instances, apart from the programs: [`Probes::rings`].
#[derive(Clone)]
pub struct Rings(Vec<Arc<Mutex<RingBuf<MapData>>>>);

impl Rings {
    /// Hands every pending record to `f`, decoded (or the decode error); returns how many.
    pub fn drain(&self, mut f: impl FnMut(Result<WireEvent, monitor_common::DecodeError>)) -> usize {
        self.0.iter().map(|r| drain_ring(r, &mut f)).sum()
    }
}

/// Hands every pending record of one ring buffer to `f`; returns how many.
fn drain_ring(
    ring: &Mutex<RingBuf<MapData>>,
    f: &mut impl FnMut(Result<WireEvent, monitor_common::DecodeError>),
) -> usize {
    let mut ring = ring.lock().unwrap_or_else(PoisonError::into_inner);
    let mut n = 0;
    while let Some(item) = ring.next() {
        f(monitor_common::decode(&item));
        n += 1;
    }
    n
}

/// One program attached to a port.
#[derive(Debug)]
enum PortLink {
    Xdp(XdpLinkId),
    Tc(TcProgram, SchedClassifierLinkId),
}

/// What [`Probes::attach_port`] did.
#[derive(Clone, Debug)]
pub struct PortAttachment {
    pub port: Port,
    /// The instance (one per namespace) whose programs run there.
    pub instance: u32,
    /// The hooks attached: `tc ingress`, `tc egress`, `xdp driver`, `xdp skb`.
    pub hooks: Vec<String>,
    /// Set when XDP fell back from driver mode: why.
    pub fallback: Option<String>,
}

/// Runs the loaded XDP parser through `BPF_PROG_TEST_RUN`; see [`Probes::xdp_test_runner`].
pub struct XdpTestRunner {
    fd: OwnedFd,
}

/// The `test` member of `union bpf_attr` (`include/uapi/linux/bpf.h`), up to `batch_size`.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    pad: u32,
}

const BPF_PROG_TEST_RUN: libc::c_long = 10;

impl XdpTestRunner {
    /// A runner for any loaded XDP program, e.g. an empty baseline program a benchmark loaded itself.
    pub fn from_fd(fd: OwnedFd) -> Self {
        Self { fd }
    }

    /// Runs the program on `frame` `repeat` times (at least once); returns its return value (2 = `XDP_PASS`)
    /// and the kernel's mean time per run.
    pub fn run(&self, frame: &[u8], repeat: u32) -> std::io::Result<(u32, std::time::Duration)> {
        let mut attr = TestRunAttr {
            prog_fd: self.fd.as_raw_fd() as u32,
            data_size_in: u32::try_from(frame.len())
                .map_err(|_| std::io::Error::from_raw_os_error(libc::E2BIG))?,
            data_in: frame.as_ptr() as u64,
            repeat: repeat.max(1),
            ..TestRunAttr::default()
        };
        // SAFETY: `attr` is a valid, initialised `bpf_attr.test` prefix that lives across the call; `data_in`
        // points to `frame`, which outlives it, and the kernel only reads `data_size_in` bytes from it; no output
        // buffers are given.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_TEST_RUN,
                &raw mut attr,
                size_of::<TestRunAttr>() as libc::c_uint,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok((
            attr.retval,
            std::time::Duration::from_nanos(u64::from(attr.duration)),
        ))
    }
}

/// Effective capabilities allow loading (`CAP_SYS_ADMIN`, or `CAP_BPF` with `CAP_PERFMON`).
fn capable() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return true;
    };
    let Some(eff) = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
    else {
        return true;
    };
    let has = |bit: u32| eff & (1 << bit) != 0;
    has(21) || (has(39) && has(38))
}

/// The kernel's HZ (for `icsk_rto`, which is in jiffies): from the kernel config, else measured from
/// `/proc/timer_list`. 0 when unknown.
pub fn kernel_hz() -> u32 {
    let from_config = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("CONFIG_HZ="))
            .and_then(|v| v.trim().parse::<u32>().ok())
    };
    if let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        && let Ok(text) = std::fs::read_to_string(format!("/boot/config-{}", release.trim()))
        && let Some(hz) = from_config(&text)
    {
        return hz;
    }
    if let Ok(out) = std::process::Command::new("gzip")
        .args(["-dc", "/proc/config.gz"])
        .output()
        && let Some(hz) = from_config(&String::from_utf8_lossy(&out.stdout))
    {
        return hz;
    }
    measure_hz().unwrap_or(0)
}

fn measure_hz() -> Option<u32> {
    let sample = || -> Option<(u64, u64)> {
        let text = std::fs::read_to_string("/proc/timer_list").ok()?;
        let now = text
            .lines()
            .find_map(|l| l.strip_prefix("now at "))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        let jiffies = text
            .lines()
            .find_map(|l| l.strip_prefix("jiffies: "))?
            .trim()
            .parse()
            .ok()?;
        Some((now, jiffies))
    };
    let (t0, j0) = sample()?;
    std::thread::sleep(std::time::Duration::from_millis(100));
    let (t1, j1) = sample()?;
    let hz = (j1 - j0) as f64 * 1e9 / (t1.checked_sub(t0)? as f64);
    [100u32, 250, 300, 1000]
        .into_iter()
        .min_by_key(|&c| (f64::from(c) - hz).abs() as u64)
}

/// Reads every tracepoint layout and socket offset this kernel offers.
fn base_config(opts: &ProbeOptions) -> Result<ProbeConfig, ProbeError> {
    let mut c = ProbeConfig::EMPTY;
    if opts.tracepoints && opts.socket_tracepoints {
        let root = tracefs::root()?;
        c.retransmit =
            tracefs::retransmit_layout(&tracefs::read_format(&root, "tcp", "tcp_retransmit_skb")?)?;
        c.set_state =
            tracefs::set_state_layout(&tracefs::read_format(&root, "sock", "inet_sock_set_state")?)?;
        c.error_report =
            tracefs::error_report_layout(&tracefs::read_format(&root, "sock", "inet_sk_error_report")?)?;
        c.receive_reset = tracefs::reset_layout(&tracefs::read_format(&root, "tcp", "tcp_receive_reset")?)?;
        c.send_reset = tracefs::reset_layout(&tracefs::read_format(&root, "tcp", "tcp_send_reset")?)?;

        let btf = Btf::from_sys_fs()?;
        let off = |s: &str, path: &[&str]| btf.member_offset(s, path).unwrap_or(monitor_common::NO_OFFSET);
        c.off_sk_state = off("sock", &["__sk_common", "skc_state"]);
        c.off_sk_net = off("sock", &["__sk_common", "skc_net", "net"]);
        c.off_net_inum = off("net", &["ns", "inum"]);
        c.off_icsk_retransmits = off("inet_connection_sock", &["icsk_retransmits"]);
        c.off_icsk_backoff = off("inet_connection_sock", &["icsk_backoff"]);
        c.off_icsk_rto = off("inet_connection_sock", &["icsk_rto"]);
        c.off_srtt_us = off("tcp_sock", &["srtt_us"]);
        c.off_icsk_pending = off("inet_connection_sock", &["icsk_pending"]);
        c.off_tlp_high_seq = off("tcp_sock", &["tlp_high_seq"]);
        if let Some((bit, width)) = btf.bitfield("inet_connection_sock", &["icsk_ca_state"]) {
            c.off_icsk_ca_state = bit / 8;
            // A plain u8 member (width 0 in BTF) is 8 bits wide; a bitfield must fit in its byte.
            let width = if width == 0 { 8 } else { width };
            if (bit % 8) + width <= 8 {
                c.ca_state_bits = (bit % 8) | (width.min(7) << 8);
            }
        }
    }
    if opts.tracepoints {
        let root = tracefs::root()?;
        c.fdb = tracefs::fdb_layout(&tracefs::read_format(&root, "bridge", "br_fdb_update")?)?;
    }
    if let Some(f) = &opts.flows {
        if !f.ips.is_empty() {
            c.flags |= CFG_FLOW_IPS;
        }
        if !f.ports.is_empty() {
            c.flags |= CFG_FLOW_PORTS;
        }
        if !f.macs.is_empty() {
            c.flags |= CFG_FLOW_MACS;
            for mac in &f.macs {
                c.mac_filter |= monitor_common::mac_filter_bit(mac);
            }
        }
        for (i, ip) in f.ips.iter().enumerate() {
            let key = ip_key(*ip);
            c.ip_filter |= monitor_common::ip_filter_bit(&key);
            if let Some(slot) = c.flow_ips.get_mut(i) {
                *slot = key;
            }
        }
        c.flow_ip_count = u32::try_from(f.ips.len()).unwrap_or(u32::MAX);
        c.flow_cache_sets = flow_table_split(f.table_entries).0;
        c.flow_quiet_ns = f.quiet_ns;
        // Burst and interval are bounded so that their product (the bucket's size in ns) cannot overflow.
        c.flow_capture_ns = if f.captures_per_sec == 0 {
            0
        } else {
            1_000_000_000 / u64::from(f.captures_per_sec.min(1_000_000_000))
        };
        c.flow_capture_burst = f.capture_burst.clamp(1, 1 << 20);
        c.flow_tick_ns = match kernel_hz() {
            0 => 0,
            hz => 1_000_000_000 / hz,
        };
    }
    let w = &opts.watch;
    if !w.ips.is_empty() {
        c.flags |= CFG_FILTER_IPS;
    }
    if !w.ports.is_empty() {
        c.flags |= CFG_FILTER_PORTS;
    }
    if !w.macs.is_empty() {
        c.flags |= CFG_WATCH_MACS | CFG_FILTER_FDB;
    }
    for mac in &w.macs {
        c.mac_filter |= monitor_common::mac_filter_bit(mac);
    }
    if opts.learn_macs {
        c.flags |= CFG_WATCH_MACS | CFG_FILTER_FDB;
        if opts.flows.is_some() {
            c.flags |= CFG_FLOW_MACS;
        }
        c.mac_filter = u32::MAX;
    }
    c.mac_gap_ns = opts.mac_gap_ns;
    Ok(c)
}

/// IPv6, or IPv4-mapped IPv6, as the programs key their IP watch list.
pub fn ip_key(ip: IpAddr) -> IpKey {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// An error and its causes, `: `-separated.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn verifier_tail(e: &ProgramError) -> Option<String> {
    if let ProgramError::LoadError { verifier_log, .. } = e {
        let log = verifier_log.to_string();
        let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        return Some(tail);
    }
    None
}

fn is_eperm(e: &ProgramError) -> bool {
    match e {
        ProgramError::LoadError { io_error, .. } => io_error.raw_os_error() == Some(libc::EPERM),
        ProgramError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::EPERM),
        _ => false,
    }
}

fn load_error(program: &str, source: ProgramError) -> ProbeError {
    if is_eperm(&source) {
        return ProbeError::Permission;
    }
    match verifier_tail(&source) {
        Some(log_tail) if !log_tail.is_empty() => ProbeError::Verifier {
            program: program.to_owned(),
            log_tail,
            source: Box::new(source),
        },
        _ => ProbeError::LoadProgram {
            program: program.to_owned(),
            source: Box::new(source),
        },
    }
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> ProbeError {
    move |source| ProbeError::Map {
        name,
        source: Box::new(source),
    }
}

impl Instance {
    /// The flows in this instance's flow caches (IPv4 keys widened), one syscall per set.
    fn cached_flows(&self) -> Result<Vec<(FlowKey, FlowState)>, ProbeError> {
        let mut out = Vec::new();
        self.cached_ways::<FlowKey4>("FLOW_CACHE4", FlowKey4::widen, &mut out)?;
        self.cached_ways::<FlowKey>("FLOW_CACHE6", |k| *k, &mut out)?;
        Ok(out)
    }

    /// Appends the occupied ways of the flow cache array `name` to `out`, keys made [`FlowKey`]s by `key`.
    fn cached_ways<K: Copy>(
        &self,
        name: &'static str,
        key: impl Fn(&K) -> FlowKey,
        out: &mut Vec<(FlowKey, FlowState)>,
    ) -> Result<(), ProbeError>
    where
        FlowSet<K>: aya::Pod,
    {
        let cache: Array<_, FlowSet<K>> =
            Array::try_from(self.ebpf.map(name).ok_or(ProbeError::NoMap(name))?).map_err(map_err(name))?;
        for set in cache.iter() {
            let set = set.map_err(map_err(name))?;
            out.extend(
                set.ways
                    .iter()
                    .filter(|w| w.state.first_ns != 0)
                    .map(|w| (key(&w.key), w.state)),
            );
        }
        Ok(())
    }

    fn load(
        netns: Option<String>,
        id: u32,
        config: &ProbeConfig,
        opts: &ProbeOptions,
    ) -> Result<Self, ProbeError> {
        if OBJECT.is_empty() {
            return Err(ProbeError::NoObject);
        }
        let mut cfg = *config;
        cfg.netns_id = id;
        let (cache_sets, flow_table) =
            flow_table_split(opts.flows.as_ref().map_or(FLOW_TABLE_OFF, |f| f.table_entries));
        let log_level = crate::ebpf_log::level(opts.ebpf_log);
        let mut ebpf = EbpfLoader::new()
            .override_global("CONFIG", &cfg, true)
            .override_global(aya_log::LEVEL, &log_level, false)
            .map_max_entries("EVENTS", opts.ringbuf_bytes)
            .map_max_entries("FLOWS", flow_table)
            .map_max_entries("FLOWS4", flow_table)
            .map_max_entries("FLOW_CACHE4", cache_sets)
            .map_max_entries("FLOW_CACHE6", cache_sets)
            .load(OBJECT)
            .map_err(|e| match &e {
                aya::EbpfError::MapError(MapError::CreateError { io_error, .. })
                    if io_error.raw_os_error() == Some(libc::EPERM) =>
                {
                    ProbeError::Permission
                }
                _ => ProbeError::LoadObject(Box::new(e)),
            })?;
        fill_watch_maps(&mut ebpf, &opts.watch)?;
        if let Some(f) = &opts.flows {
            fill_flow_maps(&mut ebpf, f)?;
        }
        let ring = RingBuf::try_from(ebpf.take_map("EVENTS").ok_or(ProbeError::NoMap("EVENTS"))?)
            .map_err(map_err("EVENTS"))?;
        let log = KernelLog::default();
        let logger = if opts.ebpf_log {
            Some(
                EbpfLogger::init_with_logger(&mut ebpf, log.clone())
                    .map_err(|e| ProbeError::Log(Box::new(e)))?,
            )
        } else {
            None
        };
        Ok(Self {
            netns,
            id,
            ebpf,
            ring: Arc::new(Mutex::new(ring)),
            logger,
            log,
            flows: opts.flows.is_some(),
        })
    }

    /// With the flow tracker on, loads the flow program of the XDP or the TC programs (once) and puts it into the
    /// program array (`FLOW_PROG_XDP`, `FLOW_PROG_TC`) the L2 programs of that type tail-call.
    fn link_flow_program(&mut self, xdp: bool) -> Result<(), ProbeError> {
        if !self.flows {
            return Ok(());
        }
        let (name, array) = if xdp {
            ("flow_xdp", "FLOW_PROG_XDP")
        } else {
            ("flow_tc", "FLOW_PROG_TC")
        };
        // `Xdp` and `SchedClassifier` share no trait for `load` and `fd`: the same steps for either type.
        macro_rules! loaded_fd {
            ($ty:ty) => {{
                let p: &mut $ty = self.program(name)?;
                if p.fd().is_ok() {
                    return Ok(());
                }
                p.load().map_err(|e| load_error(name, e))?;
                p.fd()
                    .and_then(|fd| fd.try_clone().map_err(ProgramError::IOError))
                    .map_err(|e| load_error(name, e))?
            }};
        }
        let fd = if xdp {
            loaded_fd!(Xdp)
        } else {
            loaded_fd!(SchedClassifier)
        };
        let mut progs = ProgramArray::try_from(self.ebpf.map_mut(array).ok_or(ProbeError::NoMap(array))?)
            .map_err(map_err(array))?;
        progs.set(0, &fd, 0).map_err(map_err(array))
    }

    fn program<'a, T>(&'a mut self, name: &str) -> Result<&'a mut T, ProbeError>
    where
        &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
    {
        let p = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| ProbeError::NoProgram(name.to_owned()))?;
        <&mut T>::try_from(p).map_err(|source| ProbeError::LoadProgram {
            program: name.to_owned(),
            source: Box::new(source),
        })
    }

    fn xdp_loaded(&mut self) -> Result<&mut Xdp, ProbeError> {
        self.link_flow_program(true)?;
        let p: &mut Xdp = self.program("l2_ingress")?;
        if p.fd().is_err() {
            p.load().map_err(|e| load_error("l2_ingress", e))?;
        }
        Ok(p)
    }

    fn tc_ingress_loaded(&mut self) -> Result<&mut SchedClassifier, ProbeError> {
        self.link_flow_program(false)?;
        let p: &mut SchedClassifier = self.program("l2_ingress_tc")?;
        if p.fd().is_err() {
            p.load().map_err(|e| load_error("l2_ingress_tc", e))?;
        }
        Ok(p)
    }

    fn tc_program(&mut self, program: TcProgram) -> Result<&mut SchedClassifier, ProbeError> {
        match program {
            TcProgram::Ingress => self.tc_ingress_loaded(),
            TcProgram::Egress => self.tc_loaded(),
        }
    }

    fn tc_loaded(&mut self) -> Result<&mut SchedClassifier, ProbeError> {
        self.link_flow_program(false)?;
        let p: &mut SchedClassifier = self.program("l2_egress")?;
        if p.fd().is_err() {
            p.load().map_err(|e| load_error("l2_egress", e))?;
        }
        Ok(p)
    }
}

fn fill_watch_maps(ebpf: &mut Ebpf, w: &WatchList) -> Result<(), ProbeError> {
    {
        let mut ips: BpfHashMap<_, IpKey, u8> =
            BpfHashMap::try_from(ebpf.map_mut("WATCH_IPS").ok_or(ProbeError::NoMap("WATCH_IPS"))?)
                .map_err(map_err("WATCH_IPS"))?;
        for ip in &w.ips {
            ips.insert(&ip_key(*ip), &1, 0).map_err(map_err("WATCH_IPS"))?;
        }
    }
    {
        let mut ports: BpfHashMap<_, u16, u8> = BpfHashMap::try_from(
            ebpf.map_mut("WATCH_PORTS")
                .ok_or(ProbeError::NoMap("WATCH_PORTS"))?,
        )
        .map_err(map_err("WATCH_PORTS"))?;
        for p in &w.ports {
            ports.insert(p, &1, 0).map_err(map_err("WATCH_PORTS"))?;
        }
    }
    let mut macs: BpfHashMap<_, MacKey8, u8> = BpfHashMap::try_from(
        ebpf.map_mut("WATCH_MACS")
            .ok_or(ProbeError::NoMap("WATCH_MACS"))?,
    )
    .map_err(map_err("WATCH_MACS"))?;
    for m in &w.macs {
        let key = [m[0], m[1], m[2], m[3], m[4], m[5], 0, 0];
        macs.insert(&key, &1, 0).map_err(map_err("WATCH_MACS"))?;
    }
    Ok(())
}

fn fill_flow_maps(ebpf: &mut Ebpf, f: &FlowOptions) -> Result<(), ProbeError> {
    let mut ips: BpfHashMap<_, IpKey, u8> =
        BpfHashMap::try_from(ebpf.map_mut("FLOW_IPS").ok_or(ProbeError::NoMap("FLOW_IPS"))?)
            .map_err(map_err("FLOW_IPS"))?;
    for ip in &f.ips {
        ips.insert(&ip_key(*ip), &1, 0).map_err(map_err("FLOW_IPS"))?;
    }
    let mut ports: Array<_, u64> = Array::try_from(
        ebpf.map_mut("FLOW_PORTS")
            .ok_or(ProbeError::NoMap("FLOW_PORTS"))?,
    )
    .map_err(map_err("FLOW_PORTS"))?;
    for (i, word) in port_bitmap(&f.ports) {
        ports.set(i, &word, 0).map_err(map_err("FLOW_PORTS"))?;
    }
    // MACs go to WATCH_MACS, which `fill_watch_maps` filled with the watch list's; add the others.
    let mut macs: BpfHashMap<_, MacKey8, u8> = BpfHashMap::try_from(
        ebpf.map_mut("WATCH_MACS")
            .ok_or(ProbeError::NoMap("WATCH_MACS"))?,
    )
    .map_err(map_err("WATCH_MACS"))?;
    for m in &f.macs {
        let key = [m[0], m[1], m[2], m[3], m[4], m[5], 0, 0];
        macs.insert(&key, &1, 0).map_err(map_err("WATCH_MACS"))?;
    }
    Ok(())
}

/// The flow tracker's port bitmap (`FLOW_PORTS`) for `ports`: its non-zero words, by index.
fn port_bitmap(ports: &[u16]) -> BTreeMap<u32, u64> {
    let mut words = BTreeMap::new();
    for &p in ports {
        *words.entry(u32::from(p >> 6)).or_insert(0) |= 1u64 << (p & 63);
    }
    words
}

fn detach_error(program: &str, source: ProgramError) -> ProbeError {
    ProbeError::Detach {
        program: program.to_owned(),
        source: Box::new(source),
    }
}

/// Whether interface `ifindex` still exists in `netns` (a detach error on a vanished one is no error).
fn port_still_there(netns: Option<&str>, ifindex: u32) -> bool {
    netns::run_in(netns, || nix::net::if_::if_indextoname(ifindex).is_ok()).unwrap_or(false)
}

/// Resolves `iface` in the calling thread's namespace.
fn ifindex(iface: &Iface) -> Result<u32, ProbeError> {
    let no_iface = || ProbeError::NoInterface {
        iface: iface.name.clone(),
        netns: iface.netns.clone(),
    };
    let name = CString::new(iface.name.as_str()).map_err(|_| no_iface())?;
    nix::net::if_::if_nametoindex(name.as_c_str()).map_err(|_| no_iface())
}

impl Probes {
    /// Loads the programs for the root namespace and, unless `opts.tracepoints` is off, attaches the TCP, socket
    /// and bridge tracepoints.
    pub fn load(opts: &ProbeOptions) -> Result<Self, ProbeError> {
        if OBJECT.is_empty() {
            return Err(ProbeError::NoObject);
        }
        if !capable() {
            return Err(ProbeError::Permission);
        }
        let config = base_config(opts)?;
        let mut root = Instance::load(None, 0, &config, opts)?;
        if opts.tracepoints {
            for (program, category, event) in TRACEPOINTS {
                if !opts.socket_tracepoints && category != "bridge" {
                    continue;
                }
                let p: &mut TracePoint = root.program(program)?;
                p.load().map_err(|e| load_error(program, e))?;
                p.attach(category, event).map_err(|source| ProbeError::Attach {
                    program: program.to_owned(),
                    target: format!("tracepoint {category}:{event}"),
                    source: Box::new(source),
                })?;
            }
        }
        Ok(Self {
            instances: vec![root],
            config,
            opts: opts.clone(),
            ports: HashMap::new(),
            links: HashMap::new(),
            hooks: HashMap::new(),
            hz: kernel_hz(),
        })
    }

    /// The kernel's HZ, used to turn `icsk_rto` jiffies into microseconds (0 = unknown).
    pub fn hz(&self) -> u32 {
        self.hz
    }

    fn instance(&mut self, netns: Option<&str>) -> Result<&mut Instance, ProbeError> {
        let pos = self.instances.iter().position(|i| i.netns.as_deref() == netns);
        let pos = if let Some(p) = pos {
            p
        } else {
            // Fail early, with the right message, when the namespace does not exist.
            if let Some(n) = netns {
                let path = netns::path_of(n);
                std::fs::metadata(&path).map_err(|source| netns::NetnsError::Open {
                    name: n.to_owned(),
                    path,
                    source,
                })?;
            }
            let id = self.instances.len() as u32;
            let inst = Instance::load(netns.map(str::to_owned), id, &self.config, &self.opts)?;
            self.instances.push(inst);
            self.instances.len() - 1
        };
        Ok(&mut self.instances[pos])
    }

    /// Attaches the XDP parser to `iface`: driver mode first, skb (generic) mode as a fallback; or as
    /// [`ProbeOptions::l2_tc_ingress`] and [`ProbeOptions::xdp_skb_mode`] say.
    pub fn attach_xdp(&mut self, iface: &Iface) -> Result<Attached, ProbeError> {
        if self.opts.l2_tc_ingress {
            return self.attach_tc_ingress(iface);
        }
        self.attach_xdp_mode(iface, self.opts.xdp_skb_mode)
    }

    fn attach_xdp_mode(&mut self, iface: &Iface, skb_only: bool) -> Result<Attached, ProbeError> {
        let inst = self.instance(iface.netns.as_deref())?;
        let id = inst.id;
        let prog = inst.xdp_loaded()?;
        let (ifindex, mode, fallback, link) = netns::run_in(iface.netns.as_deref(), || {
            let ifindex = ifindex(iface)?;
            if skb_only {
                return prog
                    .attach(ifindex, XdpMode::Skb)
                    .map(|l| (ifindex, "skb", None, l))
                    .map_err(|source| ProbeError::Attach {
                        program: "l2_ingress (XDP)".to_owned(),
                        target: iface.to_string(),
                        source: Box::new(source),
                    });
            }
            match prog.attach(ifindex, XdpMode::Driver) {
                Ok(l) => Ok((ifindex, "driver", None, l)),
                Err(driver_err) => {
                    let why = error_chain(&driver_err);
                    prog.attach(ifindex, XdpMode::Skb)
                        .map(|l| (ifindex, "skb", Some(why), l))
                        .map_err(|source| ProbeError::Attach {
                            program: "l2_ingress (XDP)".to_owned(),
                            target: iface.to_string(),
                            source: Box::new(source),
                        })
                }
            }
        })??;
        self.keep_link(id, ifindex, PortLink::Xdp(link));
        Ok(self.add_port(id, ifindex, iface, mode, fallback))
    }

    /// Attaches the ingress parser to `iface` as `mode` says. [`IngressMode::Auto`] picks TC on veths and taps
    /// (driver-mode XDP on a veth turns its peer's offloads off; skb-mode XDP copies every large skb) and XDP on
    /// anything else (a physical NIC, where XDP runs before the stack allocates anything).
    pub fn attach_ingress(&mut self, iface: &Iface, mode: IngressMode) -> Result<Attached, ProbeError> {
        let mode = match mode {
            IngressMode::Auto => {
                if is_virtual(iface)? {
                    IngressMode::Tc
                } else {
                    IngressMode::Xdp
                }
            }
            m => m,
        };
        match mode {
            IngressMode::Tc => self.attach_tc_ingress(iface),
            IngressMode::XdpSkb => self.attach_xdp_mode(iface, true),
            _ => self.attach_xdp_mode(iface, false),
        }
    }

    /// Attaches the ingress parser as a TC ingress classifier (see [`ProbeOptions::l2_tc_ingress`]).
    fn attach_tc_ingress(&mut self, iface: &Iface) -> Result<Attached, ProbeError> {
        let inst = self.instance(iface.netns.as_deref())?;
        let id = inst.id;
        let prog = inst.tc_ingress_loaded()?;
        let (ifindex, link) = attach_classifier(prog, iface, TcAttachType::Ingress, "l2_ingress_tc (TC)")?;
        self.keep_link(id, ifindex, PortLink::Tc(TcProgram::Ingress, link));
        Ok(self.add_port(id, ifindex, iface, "tc ingress", None))
    }

    /// Attaches the TC egress counter to `iface` (TCX on kernels that have it, clsact otherwise).
    pub fn attach_tc_egress(&mut self, iface: &Iface) -> Result<Attached, ProbeError> {
        let inst = self.instance(iface.netns.as_deref())?;
        let id = inst.id;
        let prog = inst.tc_loaded()?;
        let (ifindex, link) = attach_classifier(prog, iface, TcAttachType::Egress, "l2_egress (TC)")?;
        self.keep_link(id, ifindex, PortLink::Tc(TcProgram::Egress, link));
        Ok(self.add_port(id, ifindex, iface, "tc egress", None))
    }

    fn keep_link(&mut self, instance: u32, ifindex: u32, link: PortLink) {
        self.links.entry((instance, ifindex)).or_default().push(link);
    }

    /// Makes sure namespace `netns` has its instance (its maps and ring buffer), so that ports attached there
    /// later need no new ring buffer. Returns the instance id.
    pub fn ensure_instance(&mut self, netns: Option<&str>) -> Result<u32, ProbeError> {
        Ok(self.instance(netns)?.id)
    }

    /// Loads (verifies) the programs a port of namespace `netns` gets with `mode` (and TC egress with `egress`), so
    /// that the first port that comes later is attached in milliseconds instead of after the verifier's seconds.
    /// With [`IngressMode::Auto`], the TC parser (taps and veths, the ports that come and go); XDP for a physical
    /// port is loaded when one comes. Returns the instance id.
    pub fn preload(
        &mut self,
        netns: Option<&str>,
        mode: IngressMode,
        egress: bool,
    ) -> Result<u32, ProbeError> {
        let tc_ingress = self.opts.l2_tc_ingress || matches!(mode, IngressMode::Auto | IngressMode::Tc);
        let inst = self.instance(netns)?;
        if tc_ingress {
            inst.tc_ingress_loaded()?;
        } else {
            inst.xdp_loaded()?;
        }
        if egress {
            inst.tc_loaded()?;
        }
        Ok(inst.id)
    }

    /// Attaches the ingress parser (as `mode` says) and, with `egress`, the TC egress program to one port that
    /// came while running; [`Probes::detach_port`] takes them off again. On failure nothing stays attached.
    pub fn attach_port(
        &mut self,
        iface: &Iface,
        mode: IngressMode,
        egress: bool,
    ) -> Result<PortAttachment, ProbeError> {
        let ingress = self.attach_ingress(iface, mode)?;
        let instance = self.ensure_instance(iface.netns.as_deref())?;
        if egress {
            match self.attach_tc_egress(iface) {
                Ok(a) if a.port.ifindex == ingress.port.ifindex => {}
                Ok(a) => {
                    // The name moved to another interface between the two attaches.
                    let _ = self.detach_port(iface.netns.as_deref(), a.port.ifindex);
                    let _ = self.detach_port(iface.netns.as_deref(), ingress.port.ifindex);
                    return Err(ProbeError::NoInterface {
                        iface: iface.name.clone(),
                        netns: iface.netns.clone(),
                    });
                }
                Err(e) => {
                    let _ = self.detach_port(iface.netns.as_deref(), ingress.port.ifindex);
                    return Err(e);
                }
            }
        }
        Ok(PortAttachment {
            hooks: self.port_hooks(instance, ingress.port.ifindex),
            port: ingress.port,
            instance,
            fallback: ingress.fallback,
        })
    }

    /// The hooks attached to interface `ifindex` of instance `instance`: `tc ingress`, `tc egress`, `xdp driver`,
    /// `xdp skb`.
    pub fn port_hooks(&self, instance: u32, ifindex: u32) -> Vec<String> {
        self.hooks.get(&(instance, ifindex)).cloned().unwrap_or_default()
    }

    /// Detaches every program attached to interface `ifindex` of namespace `netns` and forgets the port. An
    /// interface that is already gone took its programs with it; that is not an error. Returns how many programs
    /// were detached.
    pub fn detach_port(&mut self, netns: Option<&str>, ifindex: u32) -> Result<usize, ProbeError> {
        let Some(pos) = self.instances.iter().position(|i| i.netns.as_deref() == netns) else {
            return Ok(0);
        };
        let id = self.instances[pos].id;
        self.ports.remove(&(id, ifindex));
        self.hooks.remove(&(id, ifindex));
        let links = self.links.remove(&(id, ifindex)).unwrap_or_default();
        let n = links.len();
        let inst = &mut self.instances[pos];
        let mut first_err = None;
        for link in links {
            let (program, r) = match link {
                PortLink::Xdp(l) => (
                    "l2_ingress (XDP)",
                    inst.xdp_loaded()
                        .and_then(|p| p.detach(l).map_err(|e| detach_error("l2_ingress (XDP)", e))),
                ),
                PortLink::Tc(which, l) => (
                    which.name(),
                    inst.tc_program(which)
                        .and_then(|p| p.detach(l).map_err(|e| detach_error(which.name(), e))),
                ),
            };
            if let Err(e) = r
                && first_err.is_none()
                && port_still_there(netns, ifindex)
            {
                first_err = Some((program, e));
            }
        }
        match first_err {
            Some((_, e)) => Err(e),
            None => Ok(n),
        }
    }

    /// Adds `mac` to the watch list of every instance (and of those made later). Returns false when it was
    /// already watched. Takes effect for frames only with [`ProbeOptions::learn_macs`] (or a MAC that the
    /// start-up watch list's prefilter happens to pass).
    pub fn watch_mac(&mut self, mac: [u8; 6]) -> Result<bool, ProbeError> {
        if self.opts.watch.macs.contains(&mac) {
            return Ok(false);
        }
        self.opts.watch.macs.push(mac);
        let key = [mac[0], mac[1], mac[2], mac[3], mac[4], mac[5], 0, 0];
        for inst in &mut self.instances {
            let mut macs: BpfHashMap<_, MacKey8, u8> = BpfHashMap::try_from(
                inst.ebpf
                    .map_mut("WATCH_MACS")
                    .ok_or(ProbeError::NoMap("WATCH_MACS"))?,
            )
            .map_err(map_err("WATCH_MACS"))?;
            macs.insert(&key, &1, 0).map_err(map_err("WATCH_MACS"))?;
        }
        Ok(true)
    }

    /// Deletes the per-MAC counters of a port that is gone (they would otherwise fill `MAC_STATS` as ports come
    /// and go). Returns how many entries were deleted.
    pub fn forget_port_counters(&mut self, instance: u32, ifindex: u32) -> Result<usize, ProbeError> {
        let Some(inst) = self.instances.iter_mut().find(|i| i.id == instance) else {
            return Ok(0);
        };
        let mut map: BpfHashMap<_, MacKey, MacCounters> = BpfHashMap::try_from(
            inst.ebpf
                .map_mut("MAC_STATS")
                .ok_or(ProbeError::NoMap("MAC_STATS"))?,
        )
        .map_err(map_err("MAC_STATS"))?;
        let gone: Vec<MacKey> = map.keys().flatten().filter(|k| k.ifindex == ifindex).collect();
        for k in &gone {
            let _ = map.remove(k);
        }
        Ok(gone.len())
    }

    fn add_port(
        &mut self,
        netns_id: u32,
        ifindex: u32,
        iface: &Iface,
        mode: &'static str,
        fallback: Option<String>,
    ) -> Attached {
        let port = Port {
            ifindex,
            iface: Some(iface.name.clone()),
            netns: iface.netns.clone(),
        };
        self.ports.insert((netns_id, ifindex), port.clone());
        let hook = match mode {
            "driver" => "xdp driver",
            "skb" => "xdp skb",
            m => m,
        };
        let hooks = self.hooks.entry((netns_id, ifindex)).or_default();
        if !hooks.iter().any(|h| h == hook) {
            hooks.push(hook.to_owned());
        }
        Attached { port, mode, fallback }
    }

    /// The port an L2 event came from.
    pub fn port(&self, netns_id: u32, ifindex: u32) -> Port {
        self.ports
            .get(&(netns_id, ifindex))
            .cloned()
            .unwrap_or_else(|| Port {
                ifindex,
                iface: None,
                netns: self
                    .instances
                    .iter()
                    .find(|i| i.id == netns_id)
                    .and_then(|i| i.netns.clone()),
            })
    }

    /// All attached ports, keyed by (instance id, ifindex).
    pub fn ports(&self) -> &HashMap<(u32, u32), Port> {
        &self.ports
    }

    /// The ring buffer fds, to poll for readiness.
    pub fn ring_fds(&self) -> Vec<RawFd> {
        self.instances
            .iter()
            .map(|i| i.ring.lock().unwrap_or_else(PoisonError::into_inner).as_raw_fd())
            .collect()
    }

    /// The event ring buffers of every instance there is now, to drain while the probes themselves are busy (a
    /// port attach on a blocking thread).
    pub fn rings(&self) -> Rings {
        Rings(self.instances.iter().map(|i| Arc::clone(&i.ring)).collect())
    }

    /// The id of namespace `netns`'s instance, if it has one (nothing is loaded).
    pub fn instance_id(&self, netns: Option<&str>) -> Option<u32> {
        self.instances
            .iter()
            .find(|i| i.netns.as_deref() == netns)
            .map(|i| i.id)
    }

    /// The log ring buffers' fds (with `ebpf_log`; they stay owned by the probes).
    pub fn log_fds(&self) -> Vec<RawFd> {
        self.instances
            .iter()
            .filter_map(|i| i.logger.as_ref().map(AsRawFd::as_raw_fd))
            .collect()
    }

    /// Hands every pending kernel log line to `f` with the namespace of the instance that logged it; returns how
    /// many were dropped (held too long, or a record aya-log could not read).
    pub fn drain_logs(&mut self, mut f: impl FnMut(&KernelLine, Option<&str>)) -> u64 {
        let mut dropped = 0;
        for inst in &mut self.instances {
            let Some(logger) = &mut inst.logger else {
                continue;
            };
            // aya-log panics on a record it cannot parse: that record's loss is counted, the watch goes on.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| logger.flush())).is_err() {
                dropped += 1;
            }
            let (lines, lost) = inst.log.take();
            dropped += lost;
            for l in &lines {
                f(l, inst.netns.as_deref());
            }
        }
        dropped
    }

    /// Hands every pending ring buffer record to `f`, decoded (or the decode error).
    pub fn drain(&mut self, mut f: impl FnMut(Result<WireEvent, monitor_common::DecodeError>)) -> usize {
        self.instances.iter().map(|i| drain_ring(&i.ring, &mut f)).sum()
    }

    /// Current per-(MAC, port, direction) counters: (instance id, key, counters).
    pub fn mac_counters(&self) -> Result<Vec<(u32, MacKey, MacCounters)>, ProbeError> {
        let mut out = Vec::new();
        for inst in &self.instances {
            let map: BpfHashMap<_, MacKey, MacCounters> =
                BpfHashMap::try_from(inst.ebpf.map("MAC_STATS").ok_or(ProbeError::NoMap("MAC_STATS"))?)
                    .map_err(map_err("MAC_STATS"))?;
            for entry in &map {
                let (k, v) = entry.map_err(map_err("MAC_STATS"))?;
                out.push((inst.id, k, v));
            }
        }
        Ok(out)
    }

    /// Frames passed unread, summed over CPUs: (instance id, ifindex, count).
    pub fn malformed(&self) -> Result<Vec<(u32, u32, u64)>, ProbeError> {
        let mut out = Vec::new();
        for inst in &self.instances {
            let map: PerCpuHashMap<_, u32, u64> =
                PerCpuHashMap::try_from(inst.ebpf.map("MALFORMED").ok_or(ProbeError::NoMap("MALFORMED"))?)
                    .map_err(map_err("MALFORMED"))?;
            for entry in &map {
                let (k, v) = entry.map_err(map_err("MALFORMED"))?;
                out.push((inst.id, k, v.iter().sum()));
            }
        }
        Ok(out)
    }

    /// Ring buffer reservations that failed, per CPU, summed over instances (index = CPU).
    pub fn lost(&self) -> Result<Vec<u64>, ProbeError> {
        let mut out: Vec<u64> = Vec::new();
        for inst in &self.instances {
            let map: PerCpuArray<_, u64> =
                PerCpuArray::try_from(inst.ebpf.map("LOST").ok_or(ProbeError::NoMap("LOST"))?)
                    .map_err(map_err("LOST"))?;
            let values = map.get(&0, 0).map_err(map_err("LOST"))?;
            if out.len() < values.len() {
                out.resize(values.len(), 0);
            }
            for (cpu, v) in values.iter().enumerate() {
                out[cpu] += v;
            }
        }
        Ok(out)
    }

    /// The flow tracker's counters, summed over CPUs and instances. With `count_entries`, also the tables'
    /// occupancy and so the evictions: that walks the tables (one syscall per entry), so do it at a sampling
    /// pace, not per event. Without it, `entries` and `evictions` are 0.
    pub fn flow_totals(&self, count_entries: bool) -> Result<FlowTotals, ProbeError> {
        let mut t = FlowTotals::default();
        for inst in &self.instances {
            let counters: PerCpuArray<_, FlowCounters> = PerCpuArray::try_from(
                inst.ebpf
                    .map("FLOW_COUNTERS")
                    .ok_or(ProbeError::NoMap("FLOW_COUNTERS"))?,
            )
            .map_err(map_err("FLOW_COUNTERS"))?;
            let mut inserts = 0;
            for c in counters.get(&0, 0).map_err(map_err("FLOW_COUNTERS"))?.iter() {
                inserts += c.inserts;
                t.insert_failed += c.insert_failed;
                t.records += c.records;
                t.capture_dropped += c.capture_dropped;
                t.fragments += c.fragments;
            }
            let mut entries = 0u64;
            if count_entries && inserts > 0 {
                let flows: BpfHashMap<_, FlowKey, FlowState> =
                    BpfHashMap::try_from(inst.ebpf.map("FLOWS").ok_or(ProbeError::NoMap("FLOWS"))?)
                        .map_err(map_err("FLOWS"))?;
                let flows4: BpfHashMap<_, FlowKey4, FlowState> =
                    BpfHashMap::try_from(inst.ebpf.map("FLOWS4").ok_or(ProbeError::NoMap("FLOWS4"))?)
                        .map_err(map_err("FLOWS4"))?;
                entries = (flows.keys().flatten().count() + flows4.keys().flatten().count()) as u64;
                entries += inst.cached_flows()?.len() as u64;
            }
            t.inserts += inserts;
            t.entries += entries;
            if count_entries {
                t.evictions += inserts.saturating_sub(entries);
            }
        }
        Ok(t)
    }

    /// Every tracked flow of every instance: (instance id, key, state).
    pub fn flows(&self) -> Result<Vec<(u32, FlowKey, FlowState)>, ProbeError> {
        let mut out = Vec::new();
        for inst in &self.instances {
            let flows: BpfHashMap<_, FlowKey, FlowState> =
                BpfHashMap::try_from(inst.ebpf.map("FLOWS").ok_or(ProbeError::NoMap("FLOWS"))?)
                    .map_err(map_err("FLOWS"))?;
            let flows4: BpfHashMap<_, FlowKey4, FlowState> =
                BpfHashMap::try_from(inst.ebpf.map("FLOWS4").ok_or(ProbeError::NoMap("FLOWS4"))?)
                    .map_err(map_err("FLOWS4"))?;
            out.extend(inst.cached_flows()?.into_iter().map(|(k, v)| (inst.id, k, v)));
            // An entry evicted between two steps of the walk is skipped.
            for (k, v) in flows4.iter().flatten() {
                out.push((inst.id, k.widen(), v));
            }
            for (k, v) in flows.iter().flatten() {
                out.push((inst.id, k, v));
            }
        }
        Ok(out)
    }

    /// Runs one of the root instance's TC programs on `frame` with `BPF_PROG_TEST_RUN`, like
    /// [`Probes::xdp_test_run`]. Returns the program's return value (-1 = `TC_ACT_UNSPEC`) and the mean time per
    /// run.
    pub fn tc_test_run(
        &mut self,
        program: TcProgram,
        frame: &[u8],
        repeat: u32,
    ) -> Result<(i32, std::time::Duration), ProbeError> {
        use aya::programs::{TestRun, TestRunOptions};
        let prog = self.instances[0].tc_program(program)?;
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.repeat = repeat.max(1);
        let r = prog.test_run(opts).map_err(|source| ProbeError::Attach {
            program: program.name().to_owned(),
            target: "BPF_PROG_TEST_RUN".to_owned(),
            source: Box::new(source),
        })?;
        Ok((r.return_value as i32, r.duration))
    }

    /// A [`XdpTestRunner`] for one of the root instance's TC programs (the runner works for any program type).
    pub fn tc_test_runner(&mut self, program: TcProgram) -> Result<XdpTestRunner, ProbeError> {
        let prog = self.instances[0].tc_program(program)?;
        let fd = prog.fd().map_err(|source| ProbeError::LoadProgram {
            program: program.name().to_owned(),
            source: Box::new(source),
        })?;
        let fd = fd
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| ProbeError::LoadProgram {
                program: program.name().to_owned(),
                source: Box::new(ProgramError::IOError(e)),
            })?;
        Ok(XdpTestRunner { fd })
    }

    /// The XDP program of the root instance, loaded but not attached: for `BPF_PROG_TEST_RUN` benchmarks.
    pub fn xdp_program(&mut self) -> Result<&mut Xdp, ProbeError> {
        self.instances[0].xdp_loaded()
    }

    /// Runs the XDP parser on `frame` with `BPF_PROG_TEST_RUN`, `repeat` times (at least once). Returns the
    /// program's return value (2 = `XDP_PASS`) and the kernel's mean time per run. Records the program emits land
    /// in the root instance's ring buffer and maps like live ones ([`Probes::drain`], [`Probes::malformed`]).
    pub fn xdp_test_run(
        &mut self,
        frame: &[u8],
        repeat: u32,
    ) -> Result<(u32, std::time::Duration), ProbeError> {
        use aya::programs::{TestRun, TestRunOptions};
        let prog = self.xdp_program()?;
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.repeat = repeat.max(1);
        let r = prog.test_run(opts).map_err(|source| ProbeError::Attach {
            program: "l2_ingress (XDP)".to_owned(),
            target: "BPF_PROG_TEST_RUN".to_owned(),
            source: Box::new(source),
        })?;
        Ok((r.return_value, r.duration))
    }

    /// A handle that runs the root instance's XDP parser with `BPF_PROG_TEST_RUN` from any thread, while
    /// `Probes` itself drains the ring buffer elsewhere (e.g. moved into the watch collector): an event storm at
    /// kernel speed for event-rate benchmarks.
    pub fn xdp_test_runner(&mut self) -> Result<XdpTestRunner, ProbeError> {
        let prog = self.xdp_program()?;
        let fd = prog.fd().map_err(|source| ProbeError::LoadProgram {
            program: "l2_ingress".to_owned(),
            source: Box::new(source),
        })?;
        let fd = fd
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| ProbeError::LoadProgram {
                program: "l2_ingress".to_owned(),
                source: Box::new(ProgramError::IOError(e)),
            })?;
        Ok(XdpTestRunner { fd })
    }

    /// The root instance's aya object, for callers that need a map or program this type does not wrap.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.instances[0].ebpf
    }

    /// The configuration handed to the programs (tracepoint layouts, BTF offsets, flags).
    pub fn config(&self) -> &ProbeConfig {
        &self.config
    }
}

/// Attaches a TC classifier to `iface` in its namespace (TCX where the kernel has it, else through a clsact qdisc);
/// returns the interface index.
fn attach_classifier(
    prog: &mut SchedClassifier,
    iface: &Iface,
    direction: TcAttachType,
    program: &str,
) -> Result<(u32, SchedClassifierLinkId), ProbeError> {
    netns::run_in(iface.netns.as_deref(), || {
        let ifindex = ifindex(iface)?;
        let attach = |p: &mut SchedClassifier| p.attach(ifindex, direction);
        match attach(prog) {
            Ok(l) => Ok((ifindex, l)),
            Err(first) => {
                // Older kernels without TCX need the clsact qdisc first.
                if let Ok(name) = CString::new(iface.name.as_str()) {
                    let _ = aya::programs::tc::qdisc_add_clsact(&name);
                }
                attach(prog)
                    .map(|l| (ifindex, l))
                    .map_err(|_| ProbeError::Attach {
                        program: program.to_owned(),
                        target: iface.to_string(),
                        source: Box::new(first),
                    })
            }
        }
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_filter_reaches_the_flow_tracker() {
        let words = port_bitmap(&[7, 63, 64, 5001, 65535]);
        assert_eq!(
            words.into_iter().collect::<Vec<_>>(),
            [
                (0, (1 << 7) | (1 << 63)),
                (1, 1),
                (78, 1 << (5001 - 78 * 64)),
                (1023, 1 << 63)
            ]
        );
        let cfg = |ports: Vec<u16>| {
            base_config(&ProbeOptions {
                tracepoints: false,
                flows: Some(FlowOptions {
                    ips: vec!["10.0.0.1".parse().unwrap()],
                    ports,
                    ..FlowOptions::default()
                }),
                ..ProbeOptions::default()
            })
            .unwrap()
        };
        assert_eq!(cfg(vec![]).flags & CFG_FLOW_PORTS, 0, "no --port: every port");
        assert_ne!(cfg(vec![5001]).flags & CFG_FLOW_PORTS, 0);
    }
}
