//! Ports that come and go: `migmon watch --bridge BR[@NETNS]`, and the VM MACs learned while running.
//!
//! A destination's tap is created when a migration starts and a source's tap vanishes when it ends. For each
//! `--bridge`, a [`BridgeWatcher`] reads the link and bridge-FDB notifications of the bridge's namespace (its
//! rtnetlink socket is created there; the monitor itself stays in the root namespace, where tracefs is) and turns
//! them into [`PortRequest`]s: attach a port that joined the bridge, detach one that left or was deleted, watch a
//! MAC the bridge learned on a tap. Other parts add requests through a [`PortControl`]: the MACs of migrator
//! setup events ([`mac_observer`]), QMP's `query-rx-filter`, libvirt's domain XML
//! ([`PortControl::register_vm_interface`]).
//!
//! The probe collector owns the [`Probes`], so it owns the [`PortHandler`] too: a request wakes it through an
//! eventfd, and it hands the probes and the handler to a blocking thread that attaches, detaches and adds MACs
//! (a TC link takes milliseconds of kernel work) and reports each change in the trace (`port_attached`,
//! `port_detached`, `port_failed`, `mac_learned`; docs/events.md). The collector keeps draining the ring buffers
//! meanwhile ([`crate::probes::Rings`]); a port about to be attached is named in the decoder first
//! ([`PortHandler::name_ahead`]), so its first frames carry its name whenever they are drained.
//!
//! ```text
//!  BridgeWatcher (thread per --bridge; socket in the bridge's netns)
//!    RTM_NEWLINK master = BR ───► Attach ─┐
//!    RTM_DELLINK, master ≠ BR ──► Detach ─┼─► channel + eventfd ─► PortHandler, in the probe collector:
//!    RTM_NEWNEIGH on a tap ─────► Learn ──┤                        attach / detach / watch the MAC (on a
//!  migrator setup events, QMP, libvirt ───┘ (PortControl)          blocking thread), then port_attached, ...
//! ```
//!
//! A port that cannot be attached is a `port_failed` event and a warning, counted, never the end of the watch.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    sync::{
        Arc,
        mpsc::{self, Receiver, Sender, TryRecvError},
    },
    time::{Duration, Instant},
};

use migmon_analysis::trace::{Event, MacAddr, PauseSource, Port};
use nix::sys::eventfd::{EfdFlags, EventFd};
use tokio::io::{Interest, unix::AsyncFd};

use crate::{
    decode::{Decoder, mono_now_ns},
    netns,
    pipeline::{Control, Flow, Observer, Sources},
    probes::{Iface, IngressMode, Probes},
    rtnl::{self, Link, Message, Neigh, RtnlError, RtnlSocket},
};

/// A bridge to follow: `BR` or `BR@NETNS` (the same shape as an `--iface`).
pub type BridgeSpec = Iface;

/// Parses `--bridge BR` or `BR@NETNS`.
pub fn parse_bridge(s: &str) -> Result<BridgeSpec, PortsError> {
    Iface::parse(s).ok_or_else(|| PortsError::Syntax { given: s.to_owned() })
}

/// Errors starting to follow a bridge. Each names the flag and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum PortsError {
    #[error("--bridge {given}: not a bridge: use BR or BR@NETNS (interface names are 1 to 15 characters)")]
    Syntax { given: String },
    #[error(
        "--bridge {spec}: there is no network namespace {netns}: list them with `ip netns list` (a namespace \
         that is not named under /run/netns can be given as a path: BR@/proc/PID/ns/net)"
    )]
    NoNetns {
        spec: String,
        netns: String,
        #[source]
        source: Box<netns::NetnsError>,
    },
    #[error("--bridge {spec}: cannot read the interfaces of {where_}")]
    Rtnl {
        spec: String,
        where_: String,
        #[source]
        source: Box<RtnlError>,
    },
    #[error("--bridge {spec}: the kernel did not list the interfaces of {where_} within {timeout:?}")]
    DumpTimeout {
        spec: String,
        where_: String,
        timeout: Duration,
    },
    #[error(
        "--bridge {spec}: there is no interface {bridge} in {where_}: create the bridge first, or check the name \
         with `ip{ns_flag} link show type bridge`"
    )]
    NoBridge {
        spec: String,
        bridge: String,
        where_: String,
        ns_flag: String,
    },
    #[error(
        "--bridge {spec}: {bridge} in {where_} is not a bridge (it is {kind}): give a bridge, or watch this \
         interface with --iface {spec}"
    )]
    NotABridge {
        spec: String,
        bridge: String,
        where_: String,
        kind: String,
    },
    #[error("cannot create an eventfd for the port requests")]
    EventFd(#[source] nix::Error),
}

fn ns_flag(netns: Option<&str>) -> String {
    netns.map_or_else(String::new, |n| format!(" -n {n}"))
}

fn where_(netns: Option<&str>) -> String {
    netns.map_or_else(
        || "the root network namespace".to_owned(),
        |n| format!("network namespace {n}"),
    )
}

/// Where a MAC was learned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MacSource {
    /// The bridge learned it on a tap (an FDB entry).
    Fdb,
    /// QEMU's `query-rx-filter`.
    Qmp,
    /// A libvirt domain's XML.
    Libvirt,
    /// A migration's setup event.
    Migrator,
}

impl MacSource {
    pub fn as_str(self) -> &'static str {
        match self {
            MacSource::Fdb => "fdb",
            MacSource::Qmp => "qmp",
            MacSource::Libvirt => "libvirt",
            MacSource::Migrator => "migrator",
        }
    }
}

/// A change to the watched ports or MACs, for the [`PortHandler`].
#[derive(Clone, Debug)]
pub enum PortRequest {
    /// Attach the probes to `iface` (nothing happens when it is attached already).
    Attach {
        iface: Iface,
        /// The interface index the notification named (the attach checks that the name still means it).
        ifindex: Option<u32>,
        bridge: Option<String>,
        origin: &'static str,
        notified_ns: Option<u64>,
    },
    /// Detach the probes from interface `ifindex` of `netns`.
    Detach {
        netns: Option<String>,
        ifindex: u32,
        reason: &'static str,
        notified_ns: Option<u64>,
    },
    /// Watch `mac` from now on.
    Learn {
        mac: MacAddr,
        source: MacSource,
        on: Option<Iface>,
    },
}

/// The sending side of the port requests: cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct PortControl {
    tx: Sender<PortRequest>,
    wake: Arc<EventFd>,
}

impl PortControl {
    /// Queues a request and wakes the collector. A request sent after the watch ended is dropped.
    pub fn send(&self, req: PortRequest) {
        if self.tx.send(req).is_ok() {
            let _ = self.wake.write(1);
        }
    }

    /// Watches `mac` from now on, learned from `source` (on port `on`, when there is one).
    pub fn learn_mac(&self, mac: MacAddr, source: MacSource, on: Option<Iface>) {
        self.send(PortRequest::Learn { mac, source, on });
    }

    /// A VM's interface, as a hypervisor's configuration names it (libvirt's domain XML, say): watches its MAC and
    /// attaches the probes to its tap, unless they are attached already.
    pub fn register_vm_interface(&self, mac: MacAddr, tap: Iface, source: MacSource) {
        self.send(PortRequest::Learn {
            mac,
            source,
            on: Some(tap.clone()),
        });
        self.send(PortRequest::Attach {
            iface: tap,
            ifindex: None,
            bridge: None,
            origin: source.as_str(),
            notified_ns: None,
        });
    }
}

/// How long the names and counters of a detached port are kept (records still in the ring buffer need its
/// name; the last counter sample needs its counters).
const RETIRE_AFTER: Duration = Duration::from_secs(30);

/// One attached port.
#[derive(Clone, Debug)]
struct Watched {
    port: Port,
    instance: u32,
    bridge: Option<String>,
}

/// A change to the names the decoder gives ports, from [`PortHandler::apply`] (which may run away from the decoder).
#[derive(Debug)]
pub enum NameChange {
    /// A port was attached: its name (and its instance's namespace).
    Port { instance: u32, port: Port },
    /// A port detached long ago: forget its name.
    Forget { instance: u32, ifindex: u32 },
}

/// What [`PortHandler::apply`] did.
#[derive(Debug, Default)]
pub struct Applied {
    /// Ports were attached: the ring buffer fds to poll may have changed.
    pub attached: bool,
    pub names: Vec<NameChange>,
}

impl Applied {
    /// Gives the decoder the names `apply` found and takes back those [`PortHandler::name_ahead`] added for ports
    /// that were not attached after all. Returns whether ports were attached.
    pub fn settle(self, ahead: Vec<(u32, u32)>, decoder: &mut Decoder) -> bool {
        let mut confirmed = HashSet::new();
        for change in self.names {
            match change {
                NameChange::Port { instance, port } => {
                    confirmed.insert((instance, port.ifindex));
                    if let Some(ns) = &port.netns {
                        decoder.netns_of_instance.insert(instance, ns.clone());
                    }
                    decoder.ports.insert((instance, port.ifindex), port);
                }
                NameChange::Forget { instance, ifindex } => {
                    decoder.ports.remove(&(instance, ifindex));
                }
            }
        }
        for key in ahead {
            if !confirmed.contains(&key) {
                decoder.ports.remove(&key);
            }
        }
        self.attached
    }
}

/// The receiving side, owned by the probe collector: applies requests to the [`Probes`].
pub struct PortHandler {
    rx: Receiver<PortRequest>,
    wake: Arc<EventFd>,
    control: PortControl,
    mode: IngressMode,
    egress: bool,
    /// Attached ports by (namespace, ifindex).
    watched: HashMap<(Option<String>, u32), Watched>,
    /// Detached ports whose names and counters are still kept: (when, instance, ifindex).
    retired: VecDeque<(Instant, u32, u32)>,
    /// Ports that could not be attached.
    pub failed: u64,
}

impl PortHandler {
    /// A handler that attaches ingress as `mode` says, and TC egress too when `egress`.
    pub fn new(mode: IngressMode, egress: bool) -> Result<Self, PortsError> {
        let (tx, rx) = mpsc::channel();
        let wake = Arc::new(
            EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
                .map_err(PortsError::EventFd)?,
        );
        Ok(Self {
            rx,
            control: PortControl {
                tx,
                wake: Arc::clone(&wake),
            },
            wake,
            mode,
            egress,
            watched: HashMap::new(),
            retired: VecDeque::new(),
            failed: 0,
        })
    }

    /// A sender of requests.
    pub fn control(&self) -> PortControl {
        self.control.clone()
    }

    /// Readable when requests are waiting.
    pub fn wake_fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }

    /// Records ports attached outside the handler (`--iface` at start), so that requests for them are no-ops.
    pub fn adopt(&mut self, port: Port, instance: u32) {
        self.watched.insert(
            (port.netns.clone(), port.ifindex),
            Watched {
                port,
                instance,
                bridge: None,
            },
        );
    }

    /// The ports attached now.
    pub fn ports(&self) -> impl Iterator<Item = &Port> {
        self.watched.values().map(|w| &w.port)
    }

    /// Applies every waiting request at once (kernel work and names); returns true when ports were attached (the
    /// caller refreshes the ring buffer fds it polls: a port in a new namespace brings a new instance). The probe
    /// collector does the same in three steps, so that its ring buffers drain during the kernel work: [`Self::take`]
    /// and [`Self::name_ahead`] on its task, [`Self::apply`] on a blocking thread, [`Applied::settle`] on its task.
    pub fn handle(&mut self, probes: &mut Probes, decoder: &mut Decoder, tx: &Sender<Event>) -> bool {
        let requests = self.take();
        let ahead = Self::name_ahead(&requests, probes, decoder);
        let applied = self.apply(requests, probes, tx);
        applied.settle(ahead, decoder)
    }

    /// The waiting requests (clears the wake-up).
    pub fn take(&mut self) -> Vec<PortRequest> {
        let _ = self.wake.read();
        let mut out = Vec::new();
        loop {
            match self.rx.try_recv() {
                Ok(r) => out.push(r),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => return out,
            }
        }
    }

    /// Names the ports about to be attached in the decoder before their programs run, so that their first records
    /// (a destination VM's first frame, its announce) are decoded with the port's name even when they are drained
    /// while the attach is still under way. Only ports whose notification gave the interface index, in a namespace
    /// that has its instance already (the bridges' namespaces, loaded at start). Returns the names added.
    pub fn name_ahead(requests: &[PortRequest], probes: &Probes, decoder: &mut Decoder) -> Vec<(u32, u32)> {
        let mut added = Vec::new();
        for r in requests {
            if let PortRequest::Attach {
                iface,
                ifindex: Some(ifindex),
                ..
            } = r
                && let Some(instance) = probes.instance_id(iface.netns.as_deref())
                && !decoder.ports.contains_key(&(instance, *ifindex))
            {
                decoder.ports.insert(
                    (instance, *ifindex),
                    Port {
                        ifindex: *ifindex,
                        iface: Some(iface.name.clone()),
                        netns: iface.netns.clone(),
                    },
                );
                added.push((instance, *ifindex));
            }
        }
        added
    }

    /// Applies `requests` to the probes: the kernel work (attach, detach, watch a MAC, forget old counters) and the
    /// trace events. The names the decoder needs are in the result, for [`Applied::settle`].
    pub fn apply(&mut self, requests: Vec<PortRequest>, probes: &mut Probes, tx: &Sender<Event>) -> Applied {
        let mut out = Applied::default();
        for r in requests {
            match r {
                PortRequest::Attach {
                    iface,
                    ifindex,
                    bridge,
                    origin,
                    notified_ns,
                } => {
                    out.attached |= self.attach(
                        probes,
                        &mut out.names,
                        tx,
                        &iface,
                        ifindex,
                        bridge,
                        origin,
                        notified_ns,
                    );
                }
                PortRequest::Detach {
                    netns,
                    ifindex,
                    reason,
                    notified_ns,
                } => self.detach(probes, tx, netns.as_deref(), ifindex, reason, notified_ns),
                PortRequest::Learn { mac, source, on } => learn(probes, tx, mac, source, on.as_ref()),
            }
        }
        self.prune(probes, &mut out.names);
        out
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "the fields of one request, and the three things it touches"
    )]
    fn attach(
        &mut self,
        probes: &mut Probes,
        names: &mut Vec<NameChange>,
        tx: &Sender<Event>,
        iface: &Iface,
        ifindex: Option<u32>,
        bridge: Option<String>,
        origin: &'static str,
        notified_ns: Option<u64>,
    ) -> bool {
        if let Some(i) = ifindex
            && self.watched.contains_key(&(iface.netns.clone(), i))
        {
            return false;
        }
        if ifindex.is_none()
            && self
                .watched
                .values()
                .any(|w| w.port.netns == iface.netns && w.port.iface.as_deref() == Some(&iface.name))
        {
            return false;
        }
        match probes.attach_port(iface, self.mode, self.egress) {
            Ok(a) if ifindex.is_some_and(|i| i != a.port.ifindex) => {
                // The name now belongs to another interface: the one notified is gone already.
                let _ = probes.detach_port(iface.netns.as_deref(), a.port.ifindex);
                false
            }
            Ok(a) => {
                if let Some(why) = &a.fallback {
                    warn(
                        tx,
                        format!(
                            "XDP driver mode is not available on {iface} ({why}); using skb (generic) mode"
                        ),
                    );
                }
                names.push(NameChange::Port {
                    instance: a.instance,
                    port: a.port.clone(),
                });
                self.watched.insert(
                    (iface.netns.clone(), a.port.ifindex),
                    Watched {
                        port: a.port.clone(),
                        instance: a.instance,
                        bridge: bridge.clone(),
                    },
                );
                let _ = tx.send(Event::PortAttached {
                    ts_ns: mono_now_ns(),
                    port: a.port,
                    bridge,
                    hooks: a.hooks,
                    origin: origin.to_owned(),
                    notified_ns,
                });
                true
            }
            Err(e) => {
                // A port deleted before the attach came to it is no failure: its DELLINK follows.
                if ifindex.is_some_and(|i| !interface_exists(iface.netns.as_deref(), i)) {
                    return false;
                }
                self.failed += 1;
                let error = error_chain(&e);
                eprintln!("migmon: warning: cannot watch port {iface}: {error}");
                let _ = tx.send(Event::PortFailed {
                    ts_ns: mono_now_ns(),
                    port: Port {
                        ifindex: ifindex.unwrap_or(0),
                        iface: Some(iface.name.clone()),
                        netns: iface.netns.clone(),
                    },
                    bridge,
                    error,
                });
                false
            }
        }
    }

    fn detach(
        &mut self,
        probes: &mut Probes,
        tx: &Sender<Event>,
        netns: Option<&str>,
        ifindex: u32,
        reason: &'static str,
        notified_ns: Option<u64>,
    ) {
        let Some(w) = self.watched.remove(&(netns.map(str::to_owned), ifindex)) else {
            return;
        };
        if let Err(e) = probes.detach_port(netns, ifindex) {
            warn(
                tx,
                format!("cannot detach from port {}: {}", w.port, error_chain(&e)),
            );
        }
        self.retired.push_back((Instant::now(), w.instance, ifindex));
        let _ = tx.send(Event::PortDetached {
            ts_ns: mono_now_ns(),
            port: w.port,
            bridge: w.bridge,
            reason: reason.to_owned(),
            notified_ns,
        });
    }

    /// Forgets the names and counters of ports detached more than [`RETIRE_AFTER`] ago.
    fn prune(&mut self, probes: &mut Probes, names: &mut Vec<NameChange>) {
        while let Some(&(when, instance, ifindex)) = self.retired.front() {
            if when.elapsed() < RETIRE_AFTER {
                break;
            }
            self.retired.pop_front();
            let reattached = self
                .watched
                .values()
                .any(|w| w.instance == instance && w.port.ifindex == ifindex);
            if !reattached {
                names.push(NameChange::Forget { instance, ifindex });
                let _ = probes.forget_port_counters(instance, ifindex);
            }
        }
    }
}

fn learn(probes: &mut Probes, tx: &Sender<Event>, mac: MacAddr, source: MacSource, on: Option<&Iface>) {
    match probes.watch_mac(mac.octets()) {
        Ok(true) => {
            let _ = tx.send(Event::MacLearned {
                ts_ns: mono_now_ns(),
                mac,
                source: source.as_str().to_owned(),
                iface: on.map(|i| i.name.clone()),
                netns: on.and_then(|i| i.netns.clone()),
            });
        }
        Ok(false) => {}
        Err(e) => warn(tx, format!("cannot watch MAC {mac}: {}", error_chain(&e))),
    }
}

/// A warning note (the consumer also puts it on stderr when stdout is not a terminal).
fn warn(tx: &Sender<Event>, message: String) {
    let _ = tx.send(Event::Note {
        ts_ns: mono_now_ns(),
        level: "warning".to_owned(),
        message,
    });
}

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

/// Whether interface `ifindex` exists in `netns` now.
fn interface_exists(netns: Option<&str>, ifindex: u32) -> bool {
    netns::run_in(netns, || {
        let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
        // SAFETY: `name` has room for IF_NAMESIZE bytes, as if_indextoname needs.
        !unsafe { libc::if_indextoname(ifindex, name.as_mut_ptr()) }.is_null()
    })
    .unwrap_or(false)
}

/// A MAC worth watching: unicast and not zero.
fn vm_mac(mac: [u8; 6]) -> bool {
    mac[0] & 1 == 0 && mac != [0; 6]
}

/// A port of the bridge, as far as the watcher knows.
#[derive(Clone, Debug)]
struct BridgePort {
    name: String,
    /// A tap (`IFLA_INFO_KIND` `tun`): a VM's own port, whose FDB entries are VM MACs.
    tap: bool,
}

/// Which dump the socket is answering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dump {
    Links,
    Fdb,
}

/// Follows one bridge's ports through its namespace's link and FDB notifications.
pub struct BridgeWatcher {
    spec: BridgeSpec,
    sock: RtnlSocket,
    /// The bridge's interface index (`None` while it is deleted).
    bridge: Option<u32>,
    ports: HashMap<u32, BridgePort>,
    learned: HashSet<[u8; 6]>,
    dump: Option<Dump>,
    /// Ports seen in a link dump that resynchronises after lost notifications.
    seen_in_dump: Option<HashSet<u32>>,
    control: PortControl,
    tx: Sender<Event>,
    buf: Vec<u8>,
}

/// How long the first dump of a namespace's links may take.
const DUMP_TIMEOUT: Duration = Duration::from_secs(5);

impl BridgeWatcher {
    /// Opens the namespace's rtnetlink socket, finds the bridge and queues an attach for each of its ports; the
    /// FDB dump and the notifications are read by [`BridgeWatcher::spawn`]'s thread.
    pub fn start(spec: BridgeSpec, control: PortControl, tx: Sender<Event>) -> Result<Self, PortsError> {
        let where_ = where_(spec.netns.as_deref());
        let mut sock = RtnlSocket::open(spec.netns.as_deref()).map_err(|source| match source {
            RtnlError::Netns(source @ netns::NetnsError::Open { .. }) => PortsError::NoNetns {
                netns: spec.netns.clone().unwrap_or_default(),
                spec: spec.to_string(),
                source: Box::new(source),
            },
            source => PortsError::Rtnl {
                spec: spec.to_string(),
                where_: where_.clone(),
                source: Box::new(source),
            },
        })?;
        let rtnl_err = |source| PortsError::Rtnl {
            spec: spec.to_string(),
            where_: where_.clone(),
            source: Box::new(source),
        };
        sock.dump_links().map_err(rtnl_err)?;
        let mut buf = vec![0u8; rtnl::RECV_BUF];
        let mut first = Vec::new();
        let deadline = Instant::now() + DUMP_TIMEOUT;
        'dump: loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(PortsError::DumpTimeout {
                    spec: spec.to_string(),
                    where_,
                    timeout: DUMP_TIMEOUT,
                });
            }
            sock.wait(left.as_millis().min(1000) as i32);
            while let Some(msgs) = sock.recv(&mut buf).map_err(rtnl_err)? {
                for m in msgs.into_iter().flatten() {
                    if m == Message::Done {
                        break 'dump;
                    }
                    first.push(m);
                }
            }
        }
        let bridge = first.iter().find_map(|m| match m {
            Message::NewLink(l) if l.family == 0 && l.name.as_deref() == Some(&spec.name) => Some(l.clone()),
            _ => None,
        });
        let Some(bridge) = bridge else {
            return Err(PortsError::NoBridge {
                ns_flag: ns_flag(spec.netns.as_deref()),
                bridge: spec.name.clone(),
                spec: spec.to_string(),
                where_,
            });
        };
        if bridge.kind.as_deref() != Some("bridge") {
            return Err(PortsError::NotABridge {
                bridge: spec.name.clone(),
                kind: bridge
                    .kind
                    .map_or_else(|| "a physical or unknown device".to_owned(), |k| format!("a {k}")),
                spec: spec.to_string(),
                where_,
            });
        }
        let mut w = Self {
            spec,
            sock,
            bridge: Some(bridge.ifindex),
            ports: HashMap::new(),
            learned: HashSet::new(),
            dump: None,
            seen_in_dump: None,
            control,
            tx,
            buf,
        };
        // Ports there at start: no notification to time the attach from.
        for m in first {
            w.on_message(m, None);
        }
        w.start_dump(Dump::Fdb);
        Ok(w)
    }

    /// The bridge followed.
    pub fn spec(&self) -> &BridgeSpec {
        &self.spec
    }

    fn start_dump(&mut self, which: Dump) {
        let r = match which {
            Dump::Links => self.sock.dump_links(),
            Dump::Fdb => self.sock.dump_fdb(),
        };
        match r {
            Ok(()) => self.dump = Some(which),
            Err(e) => self.note(&format!(
                "cannot ask for the {which:?} of {}: {}",
                self.spec,
                error_chain(&e)
            )),
        }
    }

    fn note(&self, message: &str) {
        warn(&self.tx, format!("--bridge {}: {message}", self.spec));
    }

    fn iface(&self, name: &str) -> Iface {
        Iface {
            name: name.to_owned(),
            netns: self.spec.netns.clone(),
        }
    }

    /// Reads and applies every pending notification; false when the socket failed for good.
    pub fn poll(&mut self) -> bool {
        loop {
            let mut buf = std::mem::take(&mut self.buf);
            let r = self.sock.recv(&mut buf);
            self.buf = buf;
            let now = Some(mono_now_ns());
            match r {
                Ok(None) => return true,
                Ok(Some(msgs)) => {
                    for m in msgs {
                        match m {
                            Ok(m) => self.on_message(m, now),
                            Err(e) => self.note(&e.to_string()),
                        }
                    }
                }
                Err(e) => {
                    self.note(&format!("stopped following the bridge: {}", error_chain(&e)));
                    return false;
                }
            }
        }
    }

    fn on_message(&mut self, m: Message, now: Option<u64>) {
        match m {
            Message::NewLink(l) => self.on_new_link(&l, now),
            Message::DelLink(l) => self.on_del_link(&l, now),
            Message::NewNeigh(n) => self.on_neigh(&n),
            Message::Done => self.on_dump_done(now),
            Message::Overrun => {
                self.note(
                    "the kernel dropped link notifications (socket buffer full): listing the ports again",
                );
                self.seen_in_dump = Some(HashSet::new());
                if self.dump.is_none() {
                    self.start_dump(Dump::Links);
                }
            }
            Message::Error(errno) if errno < 0 => {
                self.note(&format!("rtnetlink answered error {}", -errno));
                self.dump = None;
            }
            Message::DelNeigh(_) | Message::Error(_) | Message::Other(_) => {}
        }
    }

    fn on_dump_done(&mut self, now: Option<u64>) {
        match self.dump.take() {
            Some(Dump::Links) => {
                // Ports that vanished while notifications were lost.
                if let Some(seen) = self.seen_in_dump.take() {
                    let gone: Vec<u32> = self.ports.keys().filter(|i| !seen.contains(i)).copied().collect();
                    for ifindex in gone {
                        self.ports.remove(&ifindex);
                        self.control.send(PortRequest::Detach {
                            netns: self.spec.netns.clone(),
                            ifindex,
                            reason: "deleted",
                            notified_ns: now,
                        });
                    }
                }
                self.start_dump(Dump::Fdb);
            }
            Some(Dump::Fdb) | None => {}
        }
    }

    fn on_new_link(&mut self, l: &Link, now: Option<u64>) {
        if l.family == 0 && l.name.as_deref() == Some(&self.spec.name) && l.kind.as_deref() == Some("bridge")
        {
            if self.bridge != Some(l.ifindex) {
                if self.bridge.is_none() {
                    self.note(&format!(
                        "the bridge is back (index {}): following its ports again",
                        l.ifindex
                    ));
                }
                self.bridge = Some(l.ifindex);
            }
            return;
        }
        let Some(bridge) = self.bridge else {
            return;
        };
        if l.master == Some(bridge) {
            if let Some(seen) = &mut self.seen_in_dump {
                seen.insert(l.ifindex);
            }
            let tap = l.kind.as_deref().map(|k| k == "tun");
            if let Some(p) = self.ports.get_mut(&l.ifindex) {
                if let Some(tap) = tap {
                    p.tap = tap;
                }
                return;
            }
            let Some(name) = l.name.clone() else {
                return;
            };
            self.ports.insert(
                l.ifindex,
                BridgePort {
                    name: name.clone(),
                    tap: tap.unwrap_or(false),
                },
            );
            self.control.send(PortRequest::Attach {
                iface: self.iface(&name),
                ifindex: Some(l.ifindex),
                bridge: Some(self.spec.name.clone()),
                origin: "bridge",
                notified_ns: now,
            });
        } else if l.family == 0 && self.ports.remove(&l.ifindex).is_some() {
            // The device's own notification names its master (or none): it left the bridge.
            self.control.send(PortRequest::Detach {
                netns: self.spec.netns.clone(),
                ifindex: l.ifindex,
                reason: "left the bridge",
                notified_ns: now,
            });
        }
    }

    fn on_del_link(&mut self, l: &Link, now: Option<u64>) {
        if self.bridge == Some(l.ifindex) && l.family == 0 {
            self.note("the bridge was deleted: its ports are no longer followed until it comes back");
            self.bridge = None;
            for ifindex in self.ports.drain().map(|(i, _)| i).collect::<Vec<_>>() {
                self.control.send(PortRequest::Detach {
                    netns: self.spec.netns.clone(),
                    ifindex,
                    reason: "bridge deleted",
                    notified_ns: now,
                });
            }
            return;
        }
        if self.ports.remove(&l.ifindex).is_none() {
            return;
        }
        // A deleted port first leaves the bridge (an AF_BRIDGE DELLINK), then goes (AF_UNSPEC): tell the two apart
        // by whether the interface still exists.
        let reason = if l.family == 0 || !interface_exists(self.spec.netns.as_deref(), l.ifindex) {
            "deleted"
        } else {
            "left the bridge"
        };
        self.control.send(PortRequest::Detach {
            netns: self.spec.netns.clone(),
            ifindex: l.ifindex,
            reason,
            notified_ns: now,
        });
    }

    fn on_neigh(&mut self, n: &Neigh) {
        if n.family != rtnl::AF_BRIDGE || n.flags & rtnl::NTF_SELF != 0 || n.state & rtnl::NUD_PERMANENT != 0
        {
            return;
        }
        let Some(mac) = n.mac.filter(|m| vm_mac(*m)) else {
            return;
        };
        let Some(port) = self.ports.get(&n.ifindex) else {
            return;
        };
        if !port.tap || !self.learned.insert(mac) {
            return;
        }
        self.control
            .learn_mac(MacAddr::from(mac), MacSource::Fdb, Some(self.iface(&port.name)));
    }

    /// Follows the bridge until `control` stops: a task on the watch's runtime, woken when the socket is readable.
    pub async fn follow(mut self, control: Control) {
        let register = |dup: OwnedFd| {
            // SAFETY: the AsyncFd owns the duplicate, so the fd stays open and the same while it is registered.
            unsafe { AsyncFd::register_with_interest(dup, Interest::READABLE) }.map_err(std::io::Error::from)
        };
        let fd = match self.sock.as_fd().try_clone_to_owned().and_then(register) {
            Ok(fd) => fd,
            Err(e) => {
                self.note(&format!(
                    "stopped following the bridge: cannot wait on its socket: {e}"
                ));
                return;
            }
        };
        loop {
            tokio::select! {
                () = control.stopping() => return,
                ready = fd.readable() => match ready {
                    Ok(mut guard) => {
                        // Cleared before reading: whatever arrives after the read that ends in EAGAIN wakes us.
                        guard.clear_ready();
                        if !self.poll() {
                            return;
                        }
                    }
                    Err(e) => {
                        self.note(&format!("stopped following the bridge: {e}"));
                        return;
                    }
                },
            }
        }
    }
}

/// Starts following `bridges` (the `--bridge` values): checks each one, queues an attach for each of its ports
/// and applies those before returning (so the ports that exist at start are watched when the watch says so),
/// then follows it in a task on `sources` until the watch stops. Also records the ports attached so far (`--iface`) as
/// `port_attached`. `None` when there is no bridge to follow and no other part (`registrations`: libvirt) registers
/// interfaces.
pub fn start(
    bridges: &[String],
    registrations: bool,
    mode: IngressMode,
    probes: &mut Probes,
    decoder: &mut Decoder,
    tx: &Sender<Event>,
    sources: &mut Sources,
) -> Result<Option<PortHandler>, PortsError> {
    let ts_ns = mono_now_ns();
    let mut at_start: Vec<(u32, Port)> = probes.ports().iter().map(|((i, _), p)| (*i, p.clone())).collect();
    at_start.sort_by(|a, b| (&a.1.netns, a.1.ifindex).cmp(&(&b.1.netns, b.1.ifindex)));
    for (instance, port) in &at_start {
        let _ = tx.send(Event::PortAttached {
            ts_ns,
            hooks: probes.port_hooks(*instance, port.ifindex),
            port: port.clone(),
            bridge: None,
            origin: "iface".to_owned(),
            notified_ns: None,
        });
    }
    if bridges.is_empty() && !registrations {
        return Ok(None);
    }
    let specs = bridges
        .iter()
        .map(|b| parse_bridge(b))
        .collect::<Result<Vec<_>, _>>()?;
    let mut handler = PortHandler::new(mode, true)?;
    if registrations && let Err(e) = probes.preload(None, mode, true) {
        warn(
            tx,
            format!(
                "cannot load the probes for registered interfaces: {}",
                error_chain(&e)
            ),
        );
    }
    for (instance, port) in at_start {
        handler.adopt(port, instance);
    }
    let mut watchers = Vec::new();
    for spec in specs {
        let w = BridgeWatcher::start(spec, handler.control(), tx.clone())?;
        // The namespace's instance exists before the collector polls its ring buffers, and its programs are
        // verified now: the collector attaches new ports between two drains, so it must not wait for the verifier.
        if let Err(e) = probes.preload(w.spec.netns.as_deref(), mode, true) {
            warn(
                tx,
                format!(
                    "--bridge {}: cannot load the probes for its namespace: {}",
                    w.spec,
                    error_chain(&e)
                ),
            );
        }
        watchers.push(w);
    }
    handler.handle(probes, decoder, tx);
    for w in watchers {
        let control = sources.control();
        sources.spawn(&format!("--bridge {}", w.spec), w.follow(control));
    }
    Ok(Some(handler))
}

/// Learns the VM MAC of every migration the pause sources report, from the first event that names it: a
/// migrator's setup event (`migrator`), QEMU's `query-rx-filter` answer that the QMP source puts in each of its
/// events (`qmp`), a libvirt domain's (`libvirt`). Windows inferred from the wire are about MACs watched already.
pub fn mac_observer(control: PortControl) -> Observer {
    let mut seen: HashSet<String> = HashSet::new();
    Box::new(move |ev| {
        if let Event::Migration { ev, source } = ev
            && !seen.contains(&ev.mac)
        {
            let from = match source {
                PauseSource::Migrator => Some(MacSource::Migrator),
                PauseSource::Qmp => Some(MacSource::Qmp),
                PauseSource::Libvirt => Some(MacSource::Libvirt),
                PauseSource::Wire => None,
            };
            if let (Some(from), Ok(mac)) = (from, ev.mac.parse::<MacAddr>()) {
                seen.insert(ev.mac.clone());
                if vm_mac(mac.octets()) {
                    control.learn_mac(mac, from, None);
                }
            }
        }
        Flow::Continue
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_given_ahead_stay_only_for_ports_attached() {
        let mut decoder = Decoder::new(0);
        let port = |ifindex, name: &str| Port {
            ifindex,
            iface: Some(name.to_owned()),
            netns: Some("h".to_owned()),
        };
        // An older port, detached long ago: the batch forgets it.
        decoder.ports.insert((1, 3), port(3, "old"));
        let ahead = vec![(1, 7), (1, 8)];
        for &(i, x) in &ahead {
            decoder.ports.insert((i, x), port(x, "new"));
        }
        let applied = Applied {
            attached: true,
            names: vec![
                NameChange::Port {
                    instance: 1,
                    port: port(7, "tap7"),
                },
                NameChange::Forget {
                    instance: 1,
                    ifindex: 3,
                },
            ],
        };
        assert!(applied.settle(ahead, &mut decoder));
        // 7 attached (its name from the attach), 8 not (its name taken back), 3 forgotten as asked.
        assert_eq!(decoder.ports.get(&(1, 7)), Some(&port(7, "tap7")));
        assert!(!decoder.ports.contains_key(&(1, 8)));
        assert!(!decoder.ports.contains_key(&(1, 3)));
        assert_eq!(decoder.netns_of_instance.get(&1).map(String::as_str), Some("h"));
    }

    #[test]
    fn bridge_specs() {
        assert_eq!(
            parse_bridge("br0@host-a").unwrap(),
            BridgeSpec {
                name: "br0".into(),
                netns: Some("host-a".into())
            }
        );
        assert_eq!(parse_bridge("br0").unwrap().netns, None);
        for bad in ["", "@ns", "br0@", "averyveryverylongname"] {
            let e = parse_bridge(bad).unwrap_err().to_string();
            assert!(e.starts_with("--bridge") && e.contains("BR@NETNS"), "{e}");
        }
        assert_eq!(parse_bridge("br0@ns").unwrap().to_string(), "br0@ns");
    }

    #[test]
    fn only_unicast_macs_are_learned() {
        assert!(vm_mac([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        assert!(!vm_mac([0x33, 0x33, 0, 0, 0, 1]));
        assert!(!vm_mac([1, 0x80, 0xc2, 0, 0, 0]));
        assert!(!vm_mac([0; 6]));
    }

    #[test]
    fn setup_events_teach_their_mac_once() {
        let mut h = PortHandler::new(IngressMode::Auto, true).unwrap();
        let mut obs = mac_observer(h.control());
        let setup = migmon_analysis::fixtures::mig(
            1,
            "m1",
            "52:54:00:00:00:01",
            migevents::Role::Source,
            migevents::Phase::Setup {
                mode: migevents::Mode::Live,
                ram_bytes: 1,
                ips: vec![],
                host: String::new(),
                carries_frames: true,
            },
            "migrator",
        );
        assert_eq!(obs(&setup), Flow::Continue);
        assert_eq!(obs(&setup), Flow::Continue);
        let qmp = |mac: &str| {
            migmon_analysis::fixtures::mig(
                2,
                "q1",
                mac,
                migevents::Role::Source,
                migevents::Phase::Pause,
                "qmp",
            )
        };
        obs(&qmp("?"));
        obs(&qmp("52:54:00:00:00:02"));
        let got: Vec<PortRequest> = h.rx.try_iter().collect();
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(matches!(
            &got[1],
            PortRequest::Learn { mac, source: MacSource::Qmp, .. } if mac.to_string() == "52:54:00:00:00:02"
        ));
        assert!(matches!(
            &got[0],
            PortRequest::Learn { mac, source: MacSource::Migrator, on: None } if mac.to_string() == "52:54:00:00:00:01"
        ));
        h.failed = 0;
    }
}
