//! Correlation: joins the pause windows with what the probes saw, and gives every migration a timeline and a
//! downtime split, and every TCP connection alive at the pause a verdict. Pure: a trace in, an [`Analysis`] out.
//!
//! The definitions (what counts as the blackout, convergence, forward progress, an abort) are written down in
//! `docs/report.md`; the code below follows them and names each rule where it applies.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::{self, Write as _},
};

use migevents::{MigrationEvent, Mode, Phase, Role};
use serde::Serialize;

use std::net::IpAddr;

use crate::trace::{Direction, Event, FourTuple, MacAddr, PauseSource, TcpState, Trace, state_text};

pub mod flows;
pub mod ports;
pub mod residue;
pub mod wire;

use flows::{FlowIndex, WireView};

/// How long after the network came back a reset or error still counts as caused by the migration, for a
/// connection that did not retransmit (it had nothing in flight, so no retransmission can prove progress).
const RESET_GRACE_NS: u64 = 1_000_000_000;
/// A `connect()` transition opens the life of its 4-tuple that shows up within this long.
const PENDING_OPEN_NS: u64 = 120_000_000_000;
/// Errors and resets this close after a connection's CLOSE belong to it (the kernel reports the error after the
/// state change).
const CLOSE_CLUSTER_NS: u64 = 10_000_000;
/// Wire events count for a migration up to this long after its resume.
const L2_HORIZON_NS: u64 = 30_000_000_000;
/// Ports whose last delivery to the VM before the pause is within this of the latest one form its old path.
const OLD_PATH_SLACK_NS: u64 = 1_000_000_000;
/// A port still receiving frames for the VM this long after the new port got its first one is a shared part of the
/// path (not black-holed).
const SHARED_PATH_SLACK_NS: u64 = 1_000_000_000;

/// A time with the source it came from (`migrator`, `qmp`, `wire`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Stamp {
    pub ts_ns: u64,
    pub source: PauseSource,
}

/// A frame sighting on a port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Sighting {
    pub ts_ns: u64,
    pub port: String,
    /// False when the time is bounded by a counter sample rather than stamped per frame.
    pub exact: bool,
}

/// One pre-copy round.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Round {
    pub n: u32,
    pub ts_ns: u64,
    pub pages: u64,
    pub bytes: u64,
    pub bandwidth: u64,
}

/// A bridge re-learning the VM's MAC on a new port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FdbMove {
    pub bridge: String,
    pub from_port: Option<String>,
    pub to_port: String,
    pub ts_ns: u64,
}

/// Frames delivered towards the VM at a port it had left (after the pause).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BlackHole {
    pub port: String,
    pub frames: u64,
    pub last_ns: u64,
}

/// What happened on the wire and in the migrator, in order.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Timeline {
    pub setup: Option<Stamp>,
    pub rounds: Vec<Round>,
    pub pause: Option<Stamp>,
    pub state_sent: Option<Stamp>,
    pub resume: Option<Stamp>,
    pub complete: Option<Stamp>,
    /// Announcements the migrator reported sending.
    pub announces: Vec<Stamp>,
    /// The VM's last frame before the pause (on its old port).
    pub last_vm_frame_old_port: Option<Sighting>,
    /// The last frame delivered towards the VM before the pause (on its old port).
    pub last_frame_to_vm_old_port: Option<Sighting>,
    pub first_rarp: Option<Sighting>,
    pub first_garp: Option<Sighting>,
    /// The VM's first ICMPv6 Neighbor Advertisement that announces (the IPv6 gratuitous ARP).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_na: Option<Sighting>,
    pub fdb_moves: Vec<FdbMove>,
    /// The first frame from the VM after resume (on its new port).
    pub first_vm_frame_new_port: Option<Sighting>,
    /// The first frame delivered towards the VM at its new port.
    pub first_frame_to_vm_new_port: Option<Sighting>,
    pub black_holed: Vec<BlackHole>,
}

/// A duration with its source and how it was computed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Figure {
    pub ns: u64,
    pub source: String,
    pub basis: String,
    /// In a merge of traces from several hosts: the figure's error bound from aligning their clocks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bound_ns: Option<u64>,
}

/// The downtime split of one migration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Downtime {
    /// vCPU pause: pause → resume.
    pub vcpu_pause: Option<Figure>,
    /// Network blackout: the VM's last frame at the old port → the first frame delivered towards it at the new port.
    pub blackout: Option<Figure>,
    /// Convergence: resume → the last bridge's FDB move (or the first frame delivered at the new port).
    pub convergence: Option<Figure>,
    /// The longest per-connection recovery tail (resume → first forward progress).
    pub max_recovery_tail: Option<Figure>,
    /// The pause as the VMM itself reported it when the migration completed (QEMU's `query-migrate` downtime,
    /// the migrator's own pause), beside migmon's measure from the events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vmm_reported_pause: Option<Figure>,
}

/// Why a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AbortReason {
    /// The retransmission limit or `TCP_USER_TIMEOUT` ran out (errno 110).
    Etimedout,
    RstReceived,
    RstSent,
    ClosedByApplication,
    /// Another socket error.
    Error {
        errno: i32,
    },
}

impl fmt::Display for AbortReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AbortReason::Etimedout => f.write_str("ETIMEDOUT"),
            AbortReason::RstReceived => f.write_str("RST received"),
            AbortReason::RstSent => f.write_str("RST sent"),
            AbortReason::ClosedByApplication => f.write_str("closed by application"),
            AbortReason::Error { errno } => write!(f, "error {errno}"),
        }
    }
}

/// A connection's fate across one migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "fate", rename_all = "snake_case")]
pub enum Fate {
    Survived,
    Aborted {
        reason: AbortReason,
        at_ns: u64,
    },
    /// The trace ended while the connection was still recovering.
    Unresolved,
}

impl Fate {
    pub fn is_aborted(&self) -> bool {
        matches!(self, Fate::Aborted { .. })
    }
}

impl fmt::Display for Fate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fate::Survived => f.write_str("survived"),
            Fate::Aborted { reason, .. } => write!(f, "aborted: {reason}"),
            Fate::Unresolved => f.write_str("unresolved (trace ended)"),
        }
    }
}

/// One connection's verdict for one migration.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ConnectionVerdict {
    #[serde(flatten)]
    pub tuple: FourTuple,
    pub netns: u64,
    /// The socket's state at the pause (`unknown` when no event told it).
    #[serde(serialize_with = "state_or_unknown")]
    pub state_at_pause: Option<TcpState>,
    /// Retransmissions between the pause and the recovery (or the abort).
    pub retransmits: u32,
    pub highest_backoff: u32,
    pub first_retransmit_ns: Option<u64>,
    pub last_retransmit_ns: Option<u64>,
    /// The first retransmission by the retransmission timer (`retransmits` ≥ 1; a tail loss probe or a fast
    /// retransmit has 0): the kernel measures `tcp_retries2` and `TCP_USER_TIMEOUT` from it.
    pub first_rto_ns: Option<u64>,
    /// Every counted retransmission, for timelines.
    pub retransmit_ns: Vec<u64>,
    /// The RTO before backoff, from the probes (`rto_us >> backoff`) or the retransmit spacing.
    pub base_rto_us: Option<u64>,
    /// When the connection first moved forward after resume, and what proves it.
    pub first_progress_ns: Option<u64>,
    pub progress_basis: String,
    /// resume → first progress.
    pub recovery_tail_ns: Option<u64>,
    #[serde(flatten)]
    pub fate: Fate,
    /// The events that prove the fate.
    pub proof: Vec<Event>,
    /// Events for the 4-tuple after its socket was gone, within the window: typically the RST the client's kernel
    /// sent when the resumed VM spoke on a connection that had already been aborted.
    pub afterwards: Vec<Event>,
    /// The connection was opened during the outage (not alive at the pause; not counted in the totals).
    pub opened_during_window: bool,
    /// Which basis gave the verdict: `sockets` (the client socket's tracepoints) or `wire` (the flow tracker).
    pub basis: Basis,
    /// What the flow tracker saw of the connection in the window, with the wire's own fate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wire: Option<WireView>,
    /// With both bases: whether the wire's fate tells the same story as the sockets'.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wire_agrees: Option<bool>,
}

/// What a connection's verdict rests on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Basis {
    /// The client socket's tracepoints (`tcp_*` events): the clients run on the monitoring host.
    Sockets,
    /// The segments the flow tracker saw on the VM's ports (`flow_*` events).
    Wire,
}

impl fmt::Display for Basis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Basis::Sockets => "sockets",
            Basis::Wire => "wire",
        })
    }
}

/// One migration, correlated.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MigrationReport {
    pub id: String,
    /// The VM's MAC (`""` when the pause source did not say and the wire could not tell).
    #[serde(serialize_with = "mac_or_empty")]
    pub mac: Option<MacAddr>,
    pub mode: Option<String>,
    pub ips: Vec<IpAddr>,
    /// Where the pause window came from.
    pub source: PauseSource,
    pub source_host: Option<String>,
    pub destination_host: Option<String>,
    /// The hypervisor carries the frames that reach the source during the pause to the guest at resume (from the
    /// Setup event; false for QMP-sourced and wire-inferred migrations, whose frames are dropped).
    pub carries_frames: bool,
    /// completed, failed: …, rolled back, in progress.
    pub outcome: String,
    pub timeline: Timeline,
    pub downtime: Downtime,
    pub connections: Vec<ConnectionVerdict>,
    pub survived: usize,
    pub aborted: usize,
    pub unresolved: usize,
    pub retransmits: u64,
    /// Connections alive at the pause that no migration judged: their addresses match neither this VM's IPs nor
    /// another migrated VM's (the gate fails on them: a verdict is missing).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unjudged: Vec<FourTuple>,
    pub warnings: Vec<String>,
}

impl MigrationReport {
    /// The VM's MAC as reports print it: `""` when unknown.
    pub fn mac_text(&self) -> String {
        self.mac.map(|m| m.to_string()).unwrap_or_default()
    }
}

#[expect(
    clippy::ref_option,
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's serialize_with hands the field by reference"
)]
fn state_or_unknown<S: serde::Serializer>(state: &Option<TcpState>, s: S) -> Result<S::Ok, S::Error> {
    match state {
        Some(st) => st.serialize(s),
        None => s.serialize_str("unknown"),
    }
}

#[expect(
    clippy::ref_option,
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's serialize_with hands the field by reference"
)]
fn mac_or_empty<S: serde::Serializer>(mac: &Option<MacAddr>, s: S) -> Result<S::Ok, S::Error> {
    match mac {
        Some(m) => m.serialize(s),
        None => s.serialize_str(""),
    }
}

/// Whether two MACs may be the same VM's: equal, or one of them unknown.
fn same_vm(a: Option<MacAddr>, b: Option<MacAddr>) -> bool {
    a.is_none() || b.is_none() || a == b
}

/// Everything a report says about a trace.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Analysis {
    /// First event time: text reports print times relative to each migration's pause, this anchors the rest.
    pub start_ns: u64,
    pub end_ns: u64,
    pub events: usize,
    pub migrations: Vec<MigrationReport>,
    pub lost_events: u64,
    pub truncated: bool,
    pub skipped_lines: Vec<(usize, String)>,
    /// What is wrong with the trace file beyond skipped lines and a cut last line ([`Trace::damage`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub damage: Vec<String>,
    /// Traces still being written by a running watch ([`Trace::in_progress`]): read up to their last complete line.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub in_progress: Vec<String>,
    pub warnings: Vec<String>,
    /// How the traces of several hosts were merged (absent for one trace).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merge: Option<crate::merge::MergeInfo>,
    /// Which ports were watched when (from the port events; absent when the trace has none).
    #[serde(skip_serializing_if = "ports::Ports::is_empty")]
    pub ports: ports::Ports,
}

impl Analysis {
    /// Attaches the merge to an analysis of the merged trace: every figure that spans hosts gets the bound.
    pub fn annotate_merge(&mut self, info: &crate::merge::MergeInfo) {
        let groups = info.hosts.iter().filter(|h| h.method != "same clock").count();
        if groups > 1 {
            for m in &mut self.migrations {
                let d = &mut m.downtime;
                for f in [
                    &mut d.vcpu_pause,
                    &mut d.blackout,
                    &mut d.convergence,
                    &mut d.max_recovery_tail,
                ]
                .into_iter()
                .flatten()
                {
                    f.bound_ns = Some(info.bound_ns);
                }
            }
        }
        for (i, d) in info.damage.iter().enumerate() {
            self.damage.push(d.clone());
            self.warnings.insert(i, d.clone());
        }
        self.in_progress.clone_from(&info.in_progress);
        self.merge = Some(info.clone());
    }

    pub fn aborted(&self) -> usize {
        self.migrations.iter().map(|m| m.aborted).sum()
    }
}

/// Correlates a trace read back from disk.
pub fn analyse(trace: &Trace) -> Analysis {
    let mut a = correlate(&trace.events);
    a.lost_events = trace.lost_events();
    a.truncated = trace.truncated;
    a.skipped_lines.clone_from(&trace.skipped);
    a.damage = trace.damage();
    if trace.in_progress {
        a.in_progress.push(crate::trace::IN_PROGRESS.to_owned());
    }
    let mut warnings = a.damage.clone();
    if a.lost_events > 0 {
        warnings.push(format!(
            "{} events were lost in the kernel (ring buffer full): figures may miss retransmits or state changes",
            a.lost_events
        ));
    }
    if trace.truncated {
        warnings.push(format!(
            "the trace is truncated (its last line was cut): this report covers events up to {}",
            fmt_abs(a.end_ns, a.start_ns)
        ));
    }
    for (line, err) in &trace.skipped {
        warnings.push(format!("trace line {line} skipped: {err}"));
    }
    warnings.append(&mut a.warnings);
    a.warnings = warnings;
    a
}

/// Correlates events collected live (no trace file): [`correlate`], plus the kernel's losses counted and warned
/// about first.
pub fn analyse_events(events: &[Event]) -> Analysis {
    analyse_events_until(events, 0)
}

/// [`analyse_events`] for a watch that was observing until `observed_until` (monotonic ns), which may be later
/// than its last event: a connection whose next retransmission was due before then and did not come has recovered,
/// not "survived so far". The trace of such a watch ends with its end-of-observation note, so the offline
/// correlation of the recorded trace reads the same.
pub fn analyse_events_until(events: &[Event], observed_until: u64) -> Analysis {
    let mut a = correlate_until(events, observed_until);
    a.lost_events = crate::trace::lost_events(events);
    if a.lost_events > 0 {
        a.warnings.insert(
            0,
            format!(
                "{} events were lost in the kernel (ring buffer full)",
                a.lost_events
            ),
        );
    }
    a
}

fn fmt_abs(ts: u64, start: u64) -> String {
    format!("+{:.3} s", ts.saturating_sub(start) as f64 / 1e9)
}

/// Correlates events (any order; they are sorted by time, stably).
pub fn correlate(events: &[Event]) -> Analysis {
    correlate_until(events, 0)
}

/// [`correlate`], with the observation known to have lasted until at least `observed_until` (0: the last event). A
/// live watch passes the present: the observation goes on when no event comes.
pub fn correlate_until<'a>(events: impl IntoIterator<Item = &'a Event>, observed_until: u64) -> Analysis {
    let mut sorted: Vec<&Event> = events.into_iter().collect();
    sorted.sort_by_key(|e| e.ts_ns());
    let start_ns = sorted.first().map_or(0, |e| e.ts_ns());
    let end_ns = sorted.last().map_or(0, |e| e.ts_ns()).max(observed_until);

    let mut warnings: Vec<String> = Vec::new();
    for e in &sorted {
        if let Event::Note { level, message, .. } = e
            && (level == "warn" || level == "warning" || level == "error")
        {
            warnings.push(message.clone());
        }
    }

    let l2 = L2Index::build(&sorted);
    let mut groups = group_migrations(&sorted);
    // The data plane fills in where no migrator or QMP window covers a move.
    let inferred = wire::infer(&sorted, |mac, ts| {
        groups.iter().any(|g| same_vm(g.mac, Some(mac)) && g.covers(ts))
    });
    if !inferred.is_empty() {
        let refs: Vec<&Event> = inferred.iter().collect();
        groups.extend(group_migrations(&refs));
    }
    groups.sort_by_key(MigrationGroup::anchor_ns);

    let conns = ConnectionIndex::build(&sorted);
    let flows = FlowIndex::build(&sorted);
    let mut migrations = Vec::new();
    for (i, g) in groups.iter().enumerate() {
        // Window end: the next pause of the same VM, or the end of the trace.
        let next_pause = groups[i + 1..]
            .iter()
            .filter(|n| same_vm(n.mac, g.mac))
            .find_map(|n| n.pause.as_ref().map(|p| p.ts_ns).filter(|&t| t > g.anchor_ns()));
        let window_end = next_pause.unwrap_or(end_ns.saturating_add(1));
        migrations.push(build_migration(g, &l2, (&conns, &flows), window_end, end_ns));
    }
    let known_ips: Vec<Vec<IpAddr>> = migrations.iter().map(|m| m.ips.clone()).collect();
    for m in &mut migrations {
        if let Some(p) = m.timeline.pause.as_ref().map(|s| s.ts_ns) {
            m.unjudged = unjudged_at(&conns, m, p, &known_ips);
        }
    }
    let ports = ports::spans(sorted.iter().copied());
    for m in &mut migrations {
        ports::check_migration(&ports, m);
    }
    if migrations.is_empty() {
        warnings.push(
            "no migration found: no migrator or QMP events and no move of a watched MAC on the wire"
                .to_owned(),
        );
    }
    Analysis {
        start_ns,
        end_ns,
        events: sorted.len(),
        migrations,
        lost_events: 0,
        truncated: false,
        skipped_lines: Vec::new(),
        damage: Vec::new(),
        in_progress: Vec::new(),
        warnings,
        merge: None,
        ports,
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Migration groups
// ---------------------------------------------------------------------------------------------------------------

#[derive(Clone, Debug, Default)]
struct MigrationGroup {
    ids: Vec<String>,
    source: PauseSource,
    mac: Option<MacAddr>,
    mode: Option<Mode>,
    carries_frames: bool,
    ips: Vec<IpAddr>,
    source_host: Option<String>,
    destination_host: Option<String>,
    setup: Option<u64>,
    rounds: Vec<Round>,
    /// The rounds came from the source (preferred over the destination's copy).
    source_rounds: bool,
    pause: Option<Stamp>,
    state_sent: Option<u64>,
    resume: Option<Stamp>,
    complete: Option<u64>,
    /// The VMM's own pause figure from its completion (ns).
    vmm_pause_ns: Option<u64>,
    announces: Vec<u64>,
    failed: Option<String>,
    rollback: bool,
    first_ns: u64,
}

impl MigrationGroup {
    fn anchor_ns(&self) -> u64 {
        self.pause.as_ref().map_or(self.first_ns, |p| p.ts_ns)
    }

    /// Whether `ts` falls in this migration's outage (with slack for announces and re-learning).
    fn covers(&self, ts: u64) -> bool {
        let start = self.pause.as_ref().map_or(self.first_ns, |p| p.ts_ns);
        let end = self.resume.as_ref().map_or(start, |r| r.ts_ns);
        ts + 1_000_000_000 >= start && ts <= end + 5_000_000_000
    }

    fn absorb(&mut self, o: MigrationGroup) {
        self.ids.extend(o.ids);
        self.mac = self.mac.or(o.mac);
        self.mode = self.mode.or(o.mode);
        for ip in o.ips {
            if !self.ips.contains(&ip) {
                self.ips.push(ip);
            }
        }
        self.source_host = self.source_host.take().or(o.source_host);
        self.destination_host = self.destination_host.take().or(o.destination_host);
        self.setup = self.setup.or(o.setup);
        if self.rounds.is_empty() {
            self.rounds = o.rounds;
        }
        self.pause = self.pause.take().or(o.pause);
        self.state_sent = self.state_sent.or(o.state_sent);
        self.resume = self.resume.take().or(o.resume);
        self.complete = self.complete.or(o.complete);
        self.vmm_pause_ns = self.vmm_pause_ns.or(o.vmm_pause_ns);
        self.announces.extend(o.announces);
        self.failed = self.failed.take().or(o.failed);
        self.rollback |= o.rollback;
        self.first_ns = self.first_ns.min(o.first_ns);
    }
}

/// The migrations in a trace: its phase events grouped by (pause source, migration id), and a QEMU pair's two
/// halves joined.
fn group_migrations(sorted: &[&Event]) -> Vec<MigrationGroup> {
    let mut by_id: Vec<((PauseSource, String), MigrationGroup)> = Vec::new();
    for e in sorted {
        let Event::Migration { ev, source } = e else {
            continue;
        };
        let key = (*source, ev.migration_id.clone());
        let idx = if let Some(i) = by_id.iter().position(|(k, _)| *k == key) {
            i
        } else {
            by_id.push((
                key,
                MigrationGroup {
                    ids: vec![ev.migration_id.clone()],
                    source: *source,
                    first_ns: ev.ts_ns,
                    ..MigrationGroup::default()
                },
            ));
            by_id.len() - 1
        };
        by_id[idx].1.take(ev);
    }
    // A group with neither pause nor resume (only setup/rounds) stays: the migration may have failed early.
    join_halves(join_stopped_then_migrated(
        by_id.into_iter().map(|(_, g)| g).collect(),
    ))
}

/// A `stop` and then a `migrate` on one QEMU is one migration, paused before it moved. Traces written before the
/// QMP source said so split it in two: the STOP's window (a pause and nothing else yet), and a migration without a
/// pause or resume of its own that set up while that window was open. Joins the second into the first, as one quick
/// migration. (The QMP source now writes both on one id, which needs no join.)
fn join_stopped_then_migrated(mut groups: Vec<MigrationGroup>) -> Vec<MigrationGroup> {
    let mut j = 0;
    while j < groups.len() {
        let g = &groups[j];
        let setup = g
            .setup
            .filter(|_| g.source == PauseSource::Qmp && g.pause.is_none() && g.resume.is_none());
        let host = setup.and_then(|setup| {
            (0..groups.len()).find(|&i| {
                let h = &groups[i];
                i != j
                    && h.source == PauseSource::Qmp
                    && h.setup.is_none()
                    && h.pause.as_ref().is_some_and(|p| p.ts_ns <= setup)
                    && h.resume.as_ref().is_none_or(|r| r.ts_ns >= setup)
                    && same_vm(h.mac, g.mac)
            })
        });
        if let Some(i) = host {
            let other = groups.remove(j);
            let i = if j < i { i - 1 } else { i };
            groups[i].absorb(other);
            groups[i].mode = Some(Mode::Quick);
            continue;
        }
        j += 1;
    }
    groups
}

impl MigrationGroup {
    /// Takes one of this migration's phase events.
    fn take(&mut self, ev: &MigrationEvent) {
        // A pause source that does not know the MAC (QMP) sends an empty one.
        self.mac = self.mac.or_else(|| ev.mac.parse().ok());
        let stamp = Stamp {
            ts_ns: ev.ts_ns,
            source: self.source,
        };
        match &ev.phase {
            Phase::Setup {
                mode,
                ips,
                host,
                carries_frames,
                ..
            } => {
                self.setup.get_or_insert(ev.ts_ns);
                self.mode = Some(*mode);
                self.carries_frames |= *carries_frames;
                for ip in ips.iter().filter_map(|ip| ip.parse().ok()) {
                    if !self.ips.contains(&ip) {
                        self.ips.push(ip);
                    }
                }
                if !host.is_empty() {
                    match ev.role {
                        Role::Source => self.source_host = Some(host.clone()),
                        Role::Destination => self.destination_host = Some(host.clone()),
                    }
                }
            }
            Phase::Round {
                n,
                pages,
                bytes,
                bandwidth,
            } => self.take_round(
                ev.role,
                Round {
                    n: *n,
                    ts_ns: ev.ts_ns,
                    pages: *pages,
                    bytes: *bytes,
                    bandwidth: *bandwidth,
                },
            ),
            Phase::Pause => {
                self.pause.get_or_insert(stamp);
            }
            Phase::StateSent => {
                self.state_sent.get_or_insert(ev.ts_ns);
            }
            Phase::Resume => {
                // The destination's resume wins over a source's (rollback) resume if both exist.
                if self.resume.is_none() || ev.role == Role::Destination {
                    self.resume = Some(stamp);
                }
            }
            Phase::Announce { .. } => self.announces.push(ev.ts_ns),
            Phase::Complete { pause_ms, .. } => {
                self.complete.get_or_insert(ev.ts_ns);
                if pause_ms.is_finite() && *pause_ms > 0.0 {
                    // Whole nanoseconds of a figure given in ms: the cast saturates and cannot wrap.
                    self.vmm_pause_ns.get_or_insert((pause_ms * 1e6).round() as u64);
                }
            }
            Phase::Failed { reason } => self.failed = Some(reason.clone()),
            Phase::Rollback => self.rollback = true,
        }
    }

    /// Both ends report each round (sent / received): keep the source's, or the destination's when the source's
    /// stream is missing.
    fn take_round(&mut self, role: Role, round: Round) {
        match role {
            Role::Source => {
                self.rounds.retain(|r| r.n != round.n);
                self.source_rounds = true;
                self.rounds.push(round);
            }
            Role::Destination if !self.source_rounds && self.rounds.iter().all(|r| r.n != round.n) => {
                self.rounds.push(round);
            }
            Role::Destination => {}
        }
    }
}

/// A QEMU pair gives two halves: the source's STOP and the destination's RESUME, with different ids. Joins a half
/// without resume to the next half without pause of the same VM (same MAC, or unknown MAC), same source.
fn join_halves(mut groups: Vec<MigrationGroup>) -> Vec<MigrationGroup> {
    let mut i = 0;
    while i < groups.len() {
        if groups[i].pause.is_some() && groups[i].resume.is_none() {
            let pause_ts = groups[i].anchor_ns();
            let partner = (0..groups.len()).find(|&j| {
                j != i
                    && groups[j].source == groups[i].source
                    && groups[j].pause.is_none()
                    && groups[j].resume.as_ref().is_some_and(|r| r.ts_ns >= pause_ts)
                    && same_vm(groups[j].mac, groups[i].mac)
            });
            if let Some(j) = partner {
                let other = groups.remove(j);
                let i = if j < i { i - 1 } else { i };
                groups[i].absorb(other);
                continue;
            }
        }
        i += 1;
    }
    groups
}

// ---------------------------------------------------------------------------------------------------------------
// L2 index: per (MAC, port, direction) sightings and counters
// ---------------------------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct Sample {
    ts: u64,
    frames: u64,
    first_ns: u64,
    last_ns: u64,
}

#[derive(Default, Debug)]
struct PortActivity {
    samples: Vec<Sample>,
    seen: Vec<u64>,
}

impl PortActivity {
    fn frames_at(&self, t: u64) -> u64 {
        self.samples
            .iter()
            .rev()
            .find(|s| s.ts <= t)
            .map_or(0, |s| s.frames)
    }

    /// The last frame at or before `t`.
    fn last_before(&self, t: u64) -> Option<u64> {
        let from_samples = self
            .samples
            .iter()
            .map(|s| s.last_ns)
            .filter(|&l| l > 0 && l <= t)
            .max();
        let from_seen = self.seen.iter().copied().filter(|&s| s <= t).max();
        from_samples.max(from_seen)
    }

    /// The first frame at or after `t`: (time, exact).
    fn first_after(&self, t: u64) -> Option<(u64, bool)> {
        let seen = self.seen.iter().copied().find(|&s| s >= t).map(|s| (s, true));
        let base = self.frames_at(t);
        let mut prev_ts = t;
        let mut from_samples = None;
        for s in self.samples.iter().filter(|s| s.ts >= t) {
            if s.frames > base {
                from_samples = Some(if s.first_ns >= t {
                    (s.first_ns, true)
                } else {
                    (prev_ts.max(t), false)
                });
                break;
            }
            prev_ts = s.ts;
        }
        match (seen, from_samples) {
            (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
            (a, b) => a.or(b),
        }
    }

    /// Frames counted in (t1, t2], and the last of them.
    fn between(&self, t1: u64, t2: u64) -> (u64, Option<u64>) {
        let n = self.frames_at(t2).saturating_sub(self.frames_at(t1));
        let last = self
            .samples
            .iter()
            .rev()
            .find(|s| s.ts <= t2)
            .map(|s| s.last_ns)
            .filter(|&l| l > t1);
        let last = last.or_else(|| self.seen.iter().copied().filter(|&s| s > t1 && s <= t2).max());
        (if n == 0 && last.is_some() { 1 } else { n }, last)
    }
}

/// The latest frame on any of `ports` before `p`.
fn last_sighting_before(ports: &BTreeMap<String, PortActivity>, p: u64) -> Option<Sighting> {
    ports
        .iter()
        .filter_map(|(label, a)| a.last_before(p).map(|t| (t, label)))
        .max_by_key(|(t, _)| *t)
        .map(|(t, label)| Sighting {
            ts_ns: t,
            port: label.clone(),
            exact: true,
        })
}

/// The VM's old path: the ports that took part in its last burst of frames before `p`.
fn old_path(ports: &BTreeMap<String, PortActivity>, p: u64) -> Vec<&String> {
    let latest = ports.values().filter_map(|a| a.last_before(p)).max();
    ports
        .iter()
        .filter(|(_, a)| {
            a.last_before(p)
                .is_some_and(|t| latest.is_some_and(|l| t + OLD_PATH_SLACK_NS >= l))
        })
        .map(|(l, _)| l)
        .collect()
}

/// The first frame after `after` (and before `l2_end`) on a port outside the old path or, when the VM came back
/// to where it was (a stop/cont), on any port.
fn first_sighting_after(
    ports: &BTreeMap<String, PortActivity>,
    old: &[&String],
    after: u64,
    l2_end: u64,
) -> Option<Sighting> {
    let first_on = |only_new: bool| {
        ports
            .iter()
            .filter(|(label, _)| !only_new || !old.contains(label))
            .filter_map(|(label, a)| {
                a.first_after(after)
                    .filter(|(t, _)| *t < l2_end)
                    .map(|(t, exact)| (t, exact, label))
            })
            .min_by_key(|(t, _, _)| *t)
            .map(|(t, exact, label)| Sighting {
                ts_ns: t,
                port: label.clone(),
                exact,
            })
    };
    first_on(true).or_else(|| first_on(false))
}

#[derive(Default)]
struct L2Index<'a> {
    /// (MAC, direction) → port label → activity.
    ports: HashMap<(MacAddr, Direction), BTreeMap<String, PortActivity>>,
    announces: Vec<&'a Event>,
    fdb: Vec<&'a Event>,
}

impl<'a> L2Index<'a> {
    fn build(sorted: &[&'a Event]) -> Self {
        let mut idx = L2Index::default();
        for e in sorted {
            match e {
                Event::MacSeen {
                    ts_ns,
                    mac,
                    port,
                    direction,
                    ..
                } => idx
                    .ports
                    .entry((*mac, *direction))
                    .or_default()
                    .entry(port.to_string())
                    .or_default()
                    .seen
                    .push(*ts_ns),
                Event::MacStats {
                    ts_ns,
                    mac,
                    port,
                    direction,
                    frames,
                    first_ns,
                    last_ns,
                    ..
                } => idx
                    .ports
                    .entry((*mac, *direction))
                    .or_default()
                    .entry(port.to_string())
                    .or_default()
                    .samples
                    .push(Sample {
                        ts: *ts_ns,
                        frames: *frames,
                        first_ns: *first_ns,
                        last_ns: *last_ns,
                    }),
                Event::Rarp { .. }
                | Event::Garp { .. }
                | Event::Arp { .. }
                | Event::NeighborAdvert { .. } => {
                    idx.announces.push(e);
                }
                Event::FdbUpdate { .. } => idx.fdb.push(e),
                _ => {}
            }
        }
        idx
    }

    fn ports(&self, mac: MacAddr, dir: Direction) -> Option<&BTreeMap<String, PortActivity>> {
        self.ports.get(&(mac, dir))
    }

    /// IPs the VM announced for itself (ARP/GARP with its MAC as sender, the targets of its neighbor
    /// advertisements), in text order.
    fn ips_of(&self, mac: MacAddr) -> Vec<IpAddr> {
        let mut ips = BTreeSet::new();
        for e in &self.announces {
            match e {
                Event::Arp { frame, .. } | Event::Garp { frame, .. }
                    if frame.sha == mac && !frame.spa.is_unspecified() =>
                {
                    ips.insert(frame.spa.to_string());
                }
                Event::NeighborAdvert { frame, .. } if frame.mac == mac && !frame.target.is_unspecified() => {
                    ips.insert(frame.target.to_string());
                }
                _ => {}
            }
        }
        ips.into_iter().filter_map(|ip| ip.parse().ok()).collect()
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Connections
// ---------------------------------------------------------------------------------------------------------------

/// One incarnation of a 4-tuple: from its first event to its transition to CLOSE.
#[derive(Debug)]
struct ConnLife<'a> {
    tuple: FourTuple,
    netns: u64,
    events: Vec<&'a Event>,
    opened_ns: Option<u64>,
    /// The `connect()` transition (without a source port yet) that opened this life, when one did.
    opened_by: Option<&'a Event>,
    closed_ns: Option<u64>,
    /// A later opening of the same 4-tuple in the same namespace, when this life's CLOSE was never seen: its socket
    /// was gone by then (a 4-tuple names one socket of a namespace at a time).
    superseded_ns: Option<u64>,
    /// Events for the 4-tuple after the socket was gone (RSTs the kernel sent for it): shown, never judged.
    epilogue: Vec<&'a Event>,
}

impl ConnLife<'_> {
    /// When the connection was over at the latest: its CLOSE, or the opening that took its 4-tuple.
    fn ended_ns(&self) -> Option<u64> {
        self.closed_ns.or(self.superseded_ns)
    }
}

struct ConnectionIndex<'a> {
    lives: Vec<ConnLife<'a>>,
    /// `connect()` transitions no life has claimed yet.
    pending: Vec<&'a Event>,
}

fn tcp_of(e: &Event) -> Option<(&FourTuple, u64)> {
    match e {
        Event::TcpRetransmit { tcp, .. }
        | Event::TcpState { tcp, .. }
        | Event::TcpError { tcp, .. }
        | Event::TcpResetIn { tcp, .. }
        | Event::TcpResetOut { tcp, .. } => Some((&tcp.tuple, tcp.netns)),
        _ => None,
    }
}

impl<'a> ConnectionIndex<'a> {
    /// Splits TCP events into connection lives. `tcp_error` carries no namespace (netns 0), and the kernel reports
    /// an error after the transition to CLOSE (`tcp_done_with_error`): an error or reset right after a close joins
    /// the life that just closed.
    fn build(sorted: &[&'a Event]) -> Self {
        let mut open: HashMap<FourTuple, Vec<usize>> = HashMap::new();
        let mut last_closed: HashMap<FourTuple, usize> = HashMap::new();
        let mut lives: Vec<ConnLife<'a>> = Vec::new();
        // `connect()` moves the socket to SYN_SENT before it has a source port: remember that opening and give it to
        // the life that shows up with the same addresses and destination port.
        let mut pending_open: HashMap<(std::net::IpAddr, std::net::IpAddr, u16, u64), &'a Event> =
            HashMap::new();
        for e in sorted {
            let Some((tuple, netns)) = tcp_of(e) else { continue };
            if tuple.sport == 0 {
                if let Event::TcpState { old_state, .. } = e
                    && *old_state == Some(TcpState::Close)
                {
                    pending_open.insert((tuple.saddr, tuple.daddr, tuple.dport, netns), *e);
                }
                continue;
            }
            // A new life starts at an opening transition even if the old one was never seen closing (it ends there).
            let opening = matches!(
                e,
                Event::TcpState {
                    old_state: Some(TcpState::Close | TcpState::Listen),
                    ..
                }
            );
            let ending = matches!(
                e,
                Event::TcpError { .. } | Event::TcpResetIn { .. } | Event::TcpResetOut { .. }
            );
            let candidates = open.entry(*tuple).or_default();
            if opening {
                supersede(&mut lives, candidates, e, netns);
            }
            let found = if opening {
                None
            } else if netns == 0 {
                candidates.last().copied()
            } else {
                candidates
                    .iter()
                    .rev()
                    .copied()
                    .find(|&i| lives[i].netns == netns || lives[i].netns == 0)
            };
            let after_close = (found.is_none() && ending && !opening)
                .then(|| last_closed.get(tuple).copied())
                .flatten()
                .filter(|&i| {
                    lives[i]
                        .closed_ns
                        .is_some_and(|c| e.ts_ns() <= c + CLOSE_CLUSTER_NS)
                        && (netns == 0 || lives[i].netns == netns)
                });
            // Events that do not prove a socket exists (an error report, a RST sent without a socket: the kernel
            // answering a segment for a connection it no longer has) never start a connection; after a close they
            // are that connection's epilogue (not part of its fate), otherwise they are dropped.
            let socketless =
                matches!(e, Event::TcpError { .. }) || matches!(e, Event::TcpResetOut { state: None, .. });
            if found.is_none() && after_close.is_none() && socketless {
                if let Some(&i) = last_closed.get(tuple) {
                    lives[i].epilogue.push(e);
                }
                continue;
            }
            let idx = if let Some(i) = found.or(after_close) {
                i
            } else {
                let pending = pending_open
                    .remove(&(tuple.saddr, tuple.daddr, tuple.dport, netns))
                    .filter(|p| p.ts_ns() + PENDING_OPEN_NS >= e.ts_ns());
                lives.push(ConnLife {
                    tuple: *tuple,
                    netns,
                    events: Vec::new(),
                    opened_ns: if opening {
                        Some(e.ts_ns())
                    } else {
                        pending.map(Event::ts_ns)
                    },
                    opened_by: if opening { None } else { pending },
                    closed_ns: None,
                    superseded_ns: None,
                    epilogue: Vec::new(),
                });
                candidates.push(lives.len() - 1);
                lives.len() - 1
            };
            if lives[idx].netns == 0 {
                lives[idx].netns = netns;
            }
            lives[idx].events.push(e);
            if let Event::TcpState { new_state, ts_ns, .. } = e
                && *new_state == Some(TcpState::Close)
                && lives[idx].closed_ns.is_none()
            {
                lives[idx].closed_ns = Some(*ts_ns);
                if let Some(v) = open.get_mut(tuple) {
                    v.retain(|&i| i != idx);
                }
                last_closed.insert(*tuple, idx);
            }
        }
        let mut pending: Vec<&'a Event> = pending_open.into_values().collect();
        pending.sort_by_key(|e| e.ts_ns());
        Self { lives, pending }
    }
}

/// An opening transition `e` (other than a listener's) in namespace `netns` ends the open lives of its 4-tuple there
/// (`open`, indices into `lives`): their CLOSE was never seen.
fn supersede(lives: &mut [ConnLife<'_>], open: &mut Vec<usize>, e: &Event, netns: u64) {
    if let Event::TcpState {
        new_state: Some(TcpState::Listen),
        ..
    } = e
    {
        return;
    }
    let ts = e.ts_ns();
    open.retain(|&i| {
        let same = lives[i].netns == netns;
        if same {
            lives[i].superseded_ns = Some(ts);
        }
        !same
    });
}

fn matches_ips(t: &FourTuple, ips: &[IpAddr]) -> bool {
    ips.is_empty() || ips.iter().any(|&ip| ip == t.daddr || ip == t.saddr)
}

/// The state a life was in at `t`: the last transition before it, or what the first event after it says.
fn state_at(life: &ConnLife<'_>, t: u64) -> Option<TcpState> {
    let mut before = None;
    for e in &life.events {
        if e.ts_ns() > t {
            break;
        }
        if let Event::TcpState { new_state, .. } = e {
            before = Some(*new_state);
        }
    }
    if let Some(s) = before {
        return s;
    }
    life.events
        .iter()
        .filter(|e| e.ts_ns() > t)
        .find_map(|e| match e {
            Event::TcpState { old_state, .. } => Some(*old_state),
            Event::TcpRetransmit { state, .. }
            | Event::TcpError { state, .. }
            | Event::TcpResetIn { state, .. }
            | Event::TcpResetOut { state, .. } => state.map(Some),
            _ => None,
        })?
}

/// Transitions that prove the peer answered (a segment came in).
fn is_progress_transition(old: Option<TcpState>, new: Option<TcpState>) -> bool {
    use TcpState::{
        Close, CloseWait, Closing, Established, FinWait1, FinWait2, LastAck, SynRecv, SynSent, TimeWait,
    };
    let (Some(old), Some(new)) = (old, new) else {
        return false;
    };
    matches!(
        (old, new),
        (SynSent | SynRecv, Established)
            | (FinWait1, FinWait2 | Closing | TimeWait)
            | (FinWait2, TimeWait)
            | (Established, CloseWait)
            | (LastAck | Closing, Close | TimeWait)
    )
}

struct Rtx {
    ts: u64,
    retransmits: u32,
    backoff: u32,
    rto_us: u64,
}

/// The retransmission episode that starts at or after `from`: consecutive retransmits of one outage.
fn episode(life: &ConnLife<'_>, from: u64, until: u64) -> Vec<Rtx> {
    let all: Vec<Rtx> = life
        .events
        .iter()
        .filter_map(|e| match e {
            Event::TcpRetransmit {
                ts_ns,
                retransmits,
                backoff,
                rto_us,
                ..
            } if *ts_ns >= from && *ts_ns < until => Some(Rtx {
                ts: *ts_ns,
                retransmits: *retransmits,
                backoff: *backoff,
                rto_us: *rto_us,
            }),
            _ => None,
        })
        .collect();
    let mut out: Vec<Rtx> = Vec::new();
    for r in all {
        if let Some(last) = out.last() {
            let counters_known = last.retransmits > 0 || r.retransmits > 0;
            let continues = if counters_known {
                r.retransmits > last.retransmits
            } else {
                let prev_gap = out
                    .len()
                    .checked_sub(2)
                    .map_or(u64::MAX / 4, |i| last.ts - out[i].ts);
                r.ts - last.ts <= prev_gap.saturating_mul(3).max(2_000_000_000)
            };
            if !continues {
                break;
            }
        }
        out.push(r);
    }
    out
}

fn base_rto_us(ep: &[Rtx]) -> Option<u64> {
    let first = ep.first()?;
    if first.rto_us > 0 {
        return Some(first.rto_us >> first.backoff.min(20));
    }
    // Without the socket fields: the first gap is 2 × base.
    ep.get(1).map(|second| (second.ts - first.ts) / 2 / 1000)
}

struct Network {
    resume: Option<u64>,
    /// When frames could reach the VM again (resume, or the last FDB move after it).
    restored: Option<u64>,
}

/// One connection's verdict across the pause at `pause`, from its socket's events before `window_end`.
fn verdict(
    life: &ConnLife<'_>,
    pause: u64,
    net: &Network,
    window_end: u64,
    trace_end: u64,
) -> ConnectionVerdict {
    let ep = episode(life, pause, window_end);
    let in_window: Vec<&Event> = life
        .events
        .iter()
        .copied()
        .filter(|e| e.ts_ns() >= pause && e.ts_ns() < window_end)
        .collect();
    let terminal = first_terminal(&in_window);
    let resume = net.resume.unwrap_or(pause);
    let precise = precise_progress(&in_window, resume);
    let reading = read_episode(
        &ep,
        terminal.map(|i| in_window[i].ts_ns()),
        precise.as_ref(),
        resume,
        trace_end,
    );
    let unresolved = reading.unresolved_basis.is_some();
    let progress = reading.progress.or(precise);

    // The fate: an abort if the terminal event came before the connection showed progress (or, without a
    // retransmission to judge, within the grace after the network came back).
    let settle = match &progress {
        Some((t, _)) => *t,
        None if !ep.is_empty() => u64::MAX,
        None => net.restored.unwrap_or(resume).saturating_add(RESET_GRACE_NS),
    };
    let (fate, mut proof) = match terminal {
        Some(i) if in_window[i].ts_ns() <= settle => abort(life, &in_window[i..]),
        _ if unresolved && progress.is_none() => (Fate::Unresolved, Vec::new()),
        _ => (Fate::Survived, Vec::new()),
    };
    if fate == Fate::Survived
        && let Some(last) = ep.last()
        && let Some(e) = life.events.iter().find(|e| e.ts_ns() == last.ts)
    {
        // The last retransmission is the proof of recovery.
        proof.push((*e).clone());
    }
    let progress = if fate.is_aborted() { None } else { progress };
    let (first_progress_ns, progress_basis) = progress_of(&fate, progress, reading.unresolved_basis);
    let counted: Vec<&Rtx> = ep
        .iter()
        .filter(|r| match (&fate, first_progress_ns) {
            (Fate::Aborted { at_ns, .. }, _) => r.ts <= *at_ns,
            (_, Some(p)) => r.ts <= p,
            _ => true,
        })
        .collect();
    ConnectionVerdict {
        tuple: life.tuple,
        netns: life.netns,
        state_at_pause: state_at(life, pause),
        retransmits: counted.len() as u32,
        highest_backoff: counted.iter().map(|r| r.backoff).max().unwrap_or(0),
        first_retransmit_ns: counted.first().map(|r| r.ts),
        first_rto_ns: counted.iter().find(|r| r.retransmits >= 1).map(|r| r.ts),
        retransmit_ns: counted.iter().map(|r| r.ts).collect(),
        last_retransmit_ns: counted.last().map(|r| r.ts),
        base_rto_us: base_rto_us(&ep),
        first_progress_ns,
        progress_basis,
        recovery_tail_ns: first_progress_ns.map(|p| p.saturating_sub(resume)),
        fate,
        proof,
        afterwards: life
            .epilogue
            .iter()
            .filter(|e| e.ts_ns() >= pause && e.ts_ns() < window_end)
            .map(|e| (*e).clone())
            .collect(),
        opened_during_window: false,
        basis: Basis::Sockets,
        wire: None,
        wire_agrees: None,
    }
}

/// The first terminal event: an error, a reset, or a CLOSE that does not end an orderly close. An application's
/// close (`ESTABLISHED` → `FIN_WAIT1`, `CLOSE_WAIT` → `LAST_ACK`) is not terminal by itself: if its FIN is acknowledged
/// after resume the close completed and the connection came through; if the socket dies first, the close is what
/// ended it.
fn first_terminal(in_window: &[&Event]) -> Option<usize> {
    in_window.iter().position(|e| match e {
        Event::TcpError { .. } | Event::TcpResetIn { .. } | Event::TcpResetOut { .. } => true,
        Event::TcpState {
            old_state, new_state, ..
        } => {
            *new_state == Some(TcpState::Close)
                && !matches!(
                    old_state,
                    Some(TcpState::LastAck | TcpState::Closing | TcpState::TimeWait | TcpState::FinWait2)
                )
        }
        _ => false,
    })
}

/// Precise progress: the first transition after `resume` that needs a segment from the peer.
fn precise_progress(in_window: &[&Event], resume: u64) -> Option<(u64, String)> {
    in_window.iter().find_map(|e| match e {
        Event::TcpState {
            ts_ns,
            old_state,
            new_state,
            ..
        } if *ts_ns >= resume && is_progress_transition(*old_state, *new_state) => Some((
            *ts_ns,
            format!("{} → {}", state_text(*old_state), state_text(*new_state)),
        )),
        _ => None,
    })
}

/// What a retransmission episode says about progress.
struct EpisodeReading {
    /// Progress inferred from the episode: its last retransmission got through (no abort followed within the time
    /// the next one was due), and when.
    progress: Option<(u64, String)>,
    /// Set when the trace ends before the next retransmission was due: why the fate is still open.
    unresolved_basis: Option<String>,
}

/// Reads the episode `ep` against the first terminal event and the precise progress.
fn read_episode(
    ep: &[Rtx],
    terminal_ts: Option<u64>,
    precise: Option<&(u64, String)>,
    resume: u64,
    trace_end: u64,
) -> EpisodeReading {
    let mut reading = EpisodeReading {
        progress: None,
        unresolved_basis: None,
    };
    let Some(last) = ep.last() else {
        return reading;
    };
    let next_due = next_retransmission_due(ep);
    let aborted_in_episode = terminal_ts.is_some_and(|t| t <= next_due);
    let precise_in_episode = precise.is_some_and(|(t, _)| *t <= next_due);
    if aborted_in_episode || precise_in_episode {
        return reading;
    }
    if next_due <= trace_end {
        reading.progress = Some(if last.ts >= resume {
            (
                last.ts,
                format!(
                    "retransmission #{} at resume+{} was the last: no further retransmission or abort",
                    ep.len(),
                    fmt_dur(last.ts - resume)
                ),
            )
        } else {
            (
                resume,
                "retransmissions stopped before resume and none followed: the segment queued during the pause was \
                 delivered after resume"
                    .to_owned(),
            )
        });
    } else {
        reading.unresolved_basis = Some(format!(
            "survived so far: no abort by the trace's end ({} after resume); retransmission #{} came at {}, the next \
             was due by resume+{}",
            fmt_dur(trace_end.saturating_sub(resume)),
            ep.len(),
            if last.ts >= resume {
                format!("resume+{}", fmt_dur(last.ts - resume))
            } else {
                format!("resume−{}", fmt_dur(resume - last.ts))
            },
            fmt_dur(next_due.saturating_sub(resume))
        ));
    }
    reading
}

/// When the retransmission after the episode's last was due at the latest: one doubled RTO later, plus the timer
/// wheel's granularity (long timers fire up to an eighth of the timeout late).
fn next_retransmission_due(ep: &[Rtx]) -> u64 {
    let Some(last) = ep.last() else {
        return 0;
    };
    let interval = if last.rto_us > 0 {
        last.rto_us.saturating_mul(2).min(120_000_000) * 1000
    } else if ep.len() >= 2 {
        2 * (last.ts - ep[ep.len() - 2].ts)
    } else {
        400_000_000
    };
    last.ts + interval + (interval / 4).max(300_000_000)
}

/// The abort that starts with `terminal[0]`: its reason from the terminal cluster (the first terminal event to the
/// socket's CLOSE, or 10 ms), and that cluster as proof.
fn abort(life: &ConnLife<'_>, terminal: &[&Event]) -> (Fate, Vec<Event>) {
    let t0 = terminal[0].ts_ns();
    let cluster_end = life.closed_ns.unwrap_or(t0).max(t0) + CLOSE_CLUSTER_NS;
    let cluster: Vec<&Event> = terminal
        .iter()
        .copied()
        .take_while(|e| e.ts_ns() <= cluster_end)
        .collect();
    let reason = abort_reason(&cluster);
    (
        Fate::Aborted { reason, at_ns: t0 },
        cluster.into_iter().cloned().collect(),
    )
}

/// Why a connection ended, from the events that ended it: a RST received, a timeout, a RST sent, another error, or
/// its application's close.
fn abort_reason(cluster: &[&Event]) -> AbortReason {
    if cluster.iter().any(|e| matches!(e, Event::TcpResetIn { .. })) {
        AbortReason::RstReceived
    } else if cluster
        .iter()
        .any(|e| matches!(e, Event::TcpError { errno: 110, .. }))
    {
        AbortReason::Etimedout
    } else if cluster.iter().any(|e| matches!(e, Event::TcpResetOut { .. })) {
        AbortReason::RstSent
    } else if let Some(errno) = cluster.iter().find_map(|e| match e {
        Event::TcpError { errno, .. } => Some(*errno),
        _ => None,
    }) {
        AbortReason::Error { errno }
    } else {
        AbortReason::ClosedByApplication
    }
}

/// The first forward progress and what it rests on, for the verdict.
fn progress_of(
    fate: &Fate,
    progress: Option<(u64, String)>,
    unresolved_basis: Option<String>,
) -> (Option<u64>, String) {
    match (fate, progress) {
        (Fate::Survived, Some((t, b))) => (Some(t), b),
        (Fate::Survived, None) => (
            None,
            "no retransmission in the window: nothing was lost".to_owned(),
        ),
        (Fate::Aborted { .. }, _) => (None, "aborted before any forward progress".to_owned()),
        (Fate::Unresolved, _) => (
            None,
            unresolved_basis
                .unwrap_or_else(|| "the trace ends before the next retransmission was due".to_owned()),
        ),
    }
}

/// Formats a duration in ns for people: 812 µs, 12.4 ms, 5.30 s.
pub use migmon_base::units::fmt_ns as fmt_dur;

// ---------------------------------------------------------------------------------------------------------------
// One migration
// ---------------------------------------------------------------------------------------------------------------

/// The times a migration's evidence is read within.
struct Window {
    pause: Option<u64>,
    resume: Option<u64>,
    /// Wire events from here on are the VM's arrival: the resume, or the pause when there is none.
    after: u64,
    /// Wire evidence of the move is read from the pause (or the anchor) ...
    l2_from: u64,
    /// ... up to the next pause of the VM, or [`L2_HORIZON_NS`] after the resume, whichever comes first.
    l2_end: u64,
    /// The next pause of the same VM, or the end of the trace.
    end: u64,
    trace_end: u64,
}

impl Window {
    fn of(g: &MigrationGroup, window_end: u64, trace_end: u64) -> Self {
        let pause = g.pause.as_ref().map(|p| p.ts_ns);
        let resume = g.resume.as_ref().map(|r| r.ts_ns);
        let anchor = g.anchor_ns();
        let after = resume.or(pause).unwrap_or(anchor);
        Self {
            pause,
            resume,
            after,
            l2_from: pause.unwrap_or(anchor),
            // Wire events long after the resume belong to something else (the VM's next life, another migration).
            l2_end: window_end.min(after.saturating_add(L2_HORIZON_NS)),
            end: window_end,
            trace_end,
        }
    }
}

fn build_migration(
    g: &MigrationGroup,
    l2: &L2Index<'_>,
    (conns, flows): (&ConnectionIndex<'_>, &FlowIndex<'_>),
    window_end: u64,
    trace_end: u64,
) -> MigrationReport {
    let w = Window::of(g, window_end, trace_end);
    let mac = g.mac;
    let mut ips = g.ips.clone();
    if let (true, Some(mac)) = (ips.is_empty(), mac) {
        ips = l2.ips_of(mac);
    }
    let mut tl = group_timeline(g);
    (tl.first_rarp, tl.first_garp) = first_announces(l2, mac, &w);
    tl.first_na = first_neighbor_advert(l2, mac, &w);
    tl.fdb_moves = mac.map(|mac| fdb_moves(l2, mac, &w)).unwrap_or_default();
    if let Some(ports) = mac.and_then(|mac| l2.ports(mac, Direction::Ingress)) {
        (tl.last_vm_frame_old_port, tl.first_vm_frame_new_port) = frames_from_vm(ports, &w);
    }
    if let Some(ports) = mac.and_then(|mac| l2.ports(mac, Direction::Egress)) {
        let to_vm = frames_to_vm(ports, &w);
        tl.last_frame_to_vm_old_port = to_vm.last_old;
        tl.first_frame_to_vm_new_port = to_vm.first_new;
        tl.black_holed = to_vm.black_holed;
    }
    let (mut dt, net) = downtime_split(g, &tl, &w);

    let mut warnings = Vec::new();
    let connections = if let Some(p) = w.pause {
        let sockets = judge_connections(conns, &ips, p, &net, &tl, &w);
        let wire = flows::judge_flows(flows, &ips, p, &net, w.end, w.trace_end);
        let (connections, disagreements) = join_bases(sockets, wire);
        warnings.extend(disagreements);
        connections
    } else {
        warnings.push("no pause seen for this migration: connections were not judged".to_owned());
        Vec::new()
    };
    let tally = Tally::of(&connections);
    dt.max_recovery_tail = max_recovery_tail(&connections);
    dt.vmm_reported_pause = g.vmm_pause_ns.map(|ns| Figure {
        ns,
        source: g.source.to_string(),
        basis: match g.source {
            PauseSource::Qmp => "QEMU's own downtime (query-migrate, whole ms)".to_owned(),
            _ => "the VMM's own pause, reported when the migration completed".to_owned(),
        },
        bound_ns: None,
    });
    warnings.extend(migration_warnings(&ips, mac, &tl, w.resume));
    MigrationReport {
        id: g.ids.join("+"),
        mac,
        mode: g.mode.map(|m| match m {
            Mode::Live => "live".to_owned(),
            Mode::Quick => "quick".to_owned(),
        }),
        ips,
        source: g.source,
        source_host: g.source_host.clone(),
        destination_host: g.destination_host.clone(),
        carries_frames: g.carries_frames,
        outcome: outcome(g, w.resume),
        timeline: tl,
        downtime: dt,
        retransmits: connections.iter().map(|c| u64::from(c.retransmits)).sum(),
        connections,
        survived: tally.survived,
        aborted: tally.aborted,
        unresolved: tally.unresolved,
        unjudged: Vec::new(),
        warnings,
    }
}

/// The migration's own phases, stamped with its pause source.
fn group_timeline(g: &MigrationGroup) -> Timeline {
    let stamp = |ts_ns: u64| Stamp {
        ts_ns,
        source: g.source,
    };
    Timeline {
        setup: g.setup.map(stamp),
        rounds: g.rounds.clone(),
        pause: g.pause.clone(),
        state_sent: g.state_sent.map(stamp),
        resume: g.resume.clone(),
        complete: g.complete.map(stamp),
        announces: g.announces.iter().copied().map(stamp).collect(),
        ..Timeline::default()
    }
}

/// The first RARP and the first GARP from the VM's MAC after the pause (any MAC when it is unknown).
fn first_announces(
    l2: &L2Index<'_>,
    mac: Option<MacAddr>,
    w: &Window,
) -> (Option<Sighting>, Option<Sighting>) {
    let first = |rarp: bool| {
        l2.announces.iter().find_map(|e| {
            let ts = e.ts_ns();
            let frame = match e {
                Event::Rarp { frame, .. } if rarp => frame,
                Event::Garp { frame, .. } if !rarp => frame,
                _ => return None,
            };
            (ts >= w.l2_from && ts < w.l2_end && same_vm(mac, Some(frame.mac))).then(|| Sighting {
                ts_ns: ts,
                port: frame.port.to_string(),
                exact: true,
            })
        })
    };
    (first(true), first(false))
}

/// The first announcing neighbor advertisement from the VM's MAC after the pause (any MAC when it is unknown).
fn first_neighbor_advert(l2: &L2Index<'_>, mac: Option<MacAddr>, w: &Window) -> Option<Sighting> {
    l2.announces.iter().find_map(|e| {
        let Event::NeighborAdvert { ts_ns, frame } = e else {
            return None;
        };
        (*ts_ns >= w.l2_from && *ts_ns < w.l2_end && same_vm(mac, Some(frame.mac))).then(|| Sighting {
            ts_ns: *ts_ns,
            port: frame.port.to_string(),
            exact: true,
        })
    })
}

/// Per bridge, the first update after the pause that puts the VM's MAC on a port other than the one before.
fn fdb_moves(l2: &L2Index<'_>, mac: MacAddr, w: &Window) -> Vec<FdbMove> {
    let mut moves = Vec::new();
    let mut last_port: BTreeMap<String, String> = BTreeMap::new();
    let mut moved: BTreeSet<String> = BTreeSet::new();
    for e in &l2.fdb {
        let Event::FdbUpdate {
            ts_ns,
            bridge,
            port,
            mac: m,
            netns,
            ..
        } = e
        else {
            continue;
        };
        if *m != mac || *ts_ns >= w.l2_end {
            continue;
        }
        let bridge_key = match netns {
            Some(ns) => format!("{bridge}@{ns}"),
            None => bridge.clone(),
        };
        if *ts_ns >= w.l2_from && !moved.contains(&bridge_key) {
            let from = last_port.get(&bridge_key).cloned();
            if from.as_deref() != Some(port.as_str()) {
                moves.push(FdbMove {
                    bridge: bridge_key.clone(),
                    from_port: from,
                    to_port: port.clone(),
                    ts_ns: *ts_ns,
                });
                moved.insert(bridge_key.clone());
            }
        }
        last_port.insert(bridge_key, port.clone());
    }
    moves
}

/// The VM's own frames: its last before the pause (any port) and its first after the resume at its new port.
fn frames_from_vm(
    ports: &BTreeMap<String, PortActivity>,
    w: &Window,
) -> (Option<Sighting>, Option<Sighting>) {
    let last_old = w.pause.and_then(|p| last_sighting_before(ports, p));
    // The new port is outside the VM's old path (the ports of its last burst before the pause); only when the VM
    // came back where it was (a stop/cont) is it one of those.
    let old = old_path(ports, w.l2_from);
    let first_new = first_sighting_after(ports, &old, w.after, w.l2_end);
    (last_old, first_new)
}

/// Frames delivered towards the VM, around the move.
struct FramesToVm {
    last_old: Option<Sighting>,
    first_new: Option<Sighting>,
    black_holed: Vec<BlackHole>,
}

/// The last frame delivered towards the VM before the pause, the first at its new port, and the frames delivered
/// after the pause at old ports it had left (black-holed).
fn frames_to_vm(ports: &BTreeMap<String, PortActivity>, w: &Window) -> FramesToVm {
    let p = w.l2_from;
    let last_old = last_sighting_before(ports, p);
    let old = old_path(ports, p);
    // New port: the first port outside the old path that delivers after resume (or, when the VM came back to the
    // same port, the first old one).
    let first_new = first_sighting_after(ports, &old, w.after, w.l2_end);
    let new_first = first_new.as_ref().map(|s| s.ts_ns);
    let new_label = first_new.as_ref().map(|s| s.port.clone());
    let mut black_holed = Vec::new();
    for label in old {
        if Some(label) == new_label.as_ref() {
            continue;
        }
        let (frames, last) = ports[label].between(p, w.l2_end.min(w.trace_end.saturating_add(1)));
        let Some(last) = last else { continue };
        // Still delivering well after the new port started: a shared hop, not the old port.
        if new_first.is_some_and(|nf| last > nf + SHARED_PATH_SLACK_NS) {
            continue;
        }
        if frames > 0 {
            black_holed.push(BlackHole {
                port: label.clone(),
                frames,
                last_ns: last,
            });
        }
    }
    FramesToVm {
        last_old,
        first_new,
        black_holed,
    }
}

/// The vCPU pause, the network blackout and the convergence, and when the network let frames reach the VM again.
fn downtime_split(g: &MigrationGroup, tl: &Timeline, w: &Window) -> (Downtime, Network) {
    let mut dt = Downtime::default();
    if let (Some(p), Some(r)) = (&g.pause, &g.resume) {
        dt.vcpu_pause = Some(Figure {
            ns: r.ts_ns.saturating_sub(p.ts_ns),
            source: r.source.to_string(),
            basis: if g.source == PauseSource::Wire {
                "inferred: the VM's last frame at the old port → its first frame at the new port".to_owned()
            } else {
                format!("{} pause → resume events", g.source)
            },
            bound_ns: None,
        });
    }
    let arrival = network_arrival(tl);
    dt.blackout = blackout(g.source, tl, w.pause, arrival);
    let last_fdb = tl.fdb_moves.iter().map(|m| m.ts_ns).max();
    if let Some(r) = w.resume {
        let conv = last_fdb
            .map(|t| (t, "resume → the last bridge's FDB move"))
            .or_else(|| arrival.map(|(t, _)| (t, "resume → the first frame delivered at the new port")));
        dt.convergence = conv.map(|(t, basis)| Figure {
            ns: t.saturating_sub(r),
            source: format!("{}+wire", g.source),
            basis: basis.to_owned(),
            bound_ns: None,
        });
    }
    let net = Network {
        resume: w.resume,
        restored: w.resume.map(|r| last_fdb.map_or(r, |f| f.max(r))),
    };
    (dt, net)
}

/// When traffic reached the VM at its new port, and what shows it.
fn network_arrival(tl: &Timeline) -> Option<(u64, &'static str)> {
    tl.first_frame_to_vm_new_port
        .as_ref()
        .map(|s| (s.ts_ns, "first frame delivered towards the VM at the new port"))
        .or_else(|| {
            tl.first_vm_frame_new_port.as_ref().map(|s| {
                (
                    s.ts_ns,
                    "first frame from the VM at the new port (no egress counters)",
                )
            })
        })
}

/// The blackout: from the last frame exchanged with the VM at its old port (either way: until then the path
/// demonstrably worked), or from the pause when none was seen, to its arrival at the new port.
fn blackout(
    source: PauseSource,
    tl: &Timeline,
    pause: Option<u64>,
    arrival: Option<(u64, &'static str)>,
) -> Option<Figure> {
    let (end, what) = arrival?;
    let start = [
        tl.last_vm_frame_old_port
            .as_ref()
            .map(|s| (s, "the VM's last frame")),
        tl.last_frame_to_vm_old_port
            .as_ref()
            .map(|s| (s, "the last frame delivered to the VM")),
    ]
    .into_iter()
    .flatten()
    .max_by_key(|(s, _)| s.ts_ns);
    match (start, pause) {
        (Some((start, which)), _) => Some(Figure {
            ns: end.saturating_sub(start.ts_ns),
            source: "wire".to_owned(),
            basis: format!("{which} at {} → {what}", start.port),
            bound_ns: None,
        }),
        (None, Some(p)) => Some(Figure {
            ns: end.saturating_sub(p),
            source: format!("{source}+wire"),
            basis: format!("pause → {what} (no frame from the VM seen before the pause)"),
            bound_ns: None,
        }),
        (None, None) => None,
    }
}

/// A verdict for every connection of the VM alive at the pause `p` (or opened during the outage).
fn judge_connections(
    conns: &ConnectionIndex<'_>,
    ips: &[IpAddr],
    p: u64,
    net: &Network,
    tl: &Timeline,
    w: &Window,
) -> Vec<ConnectionVerdict> {
    let outage_end = net.restored.unwrap_or(p);
    let mut connections = Vec::new();
    for life in &conns.lives {
        if !matches_ips(&life.tuple, ips) {
            continue;
        }
        let first = life.events.first().map_or(u64::MAX, |e| e.ts_ns());
        let closed_before = life.ended_ns().is_some_and(|c| c < p);
        if closed_before || first >= w.end {
            continue;
        }
        let opened_during = life.opened_ns.is_some_and(|o| o >= p);
        if opened_during && life.opened_ns.is_some_and(|o| o > outage_end) {
            continue;
        }
        if !opened_during && first > p && state_at(life, p) == Some(TcpState::SynSent) {
            continue;
        }
        let mut v = verdict(life, p, net, w.end, w.trace_end);
        v.opened_during_window = opened_during;
        // Nothing lost: the data plane still tells when traffic towards the VM flowed again (not per connection).
        if v.fate == Fate::Survived
            && v.retransmits == 0
            && let (Some(first), Some(r)) = (&tl.first_frame_to_vm_new_port, w.resume)
        {
            let _ = write!(
                v.progress_basis,
                "; traffic towards the VM flowed again at resume+{} ({})",
                fmt_dur(first.ts_ns.saturating_sub(r)),
                first.port
            );
        }
        connections.push(v);
    }
    connections.sort_by_key(|c| (c.tuple, c.netns));
    connections
}

/// The verdicts of both bases, one per connection: the socket's where the client socket was seen (with the wire's
/// view and whether it agrees), the wire's for the others. Returns them with a warning per disagreement.
fn join_bases(
    sockets: Vec<ConnectionVerdict>,
    wire: Vec<ConnectionVerdict>,
) -> (Vec<ConnectionVerdict>, Vec<String>) {
    let mut warnings = Vec::new();
    let mut out = sockets;
    for w in wire {
        let Some(s) = out
            .iter_mut()
            .find(|s| s.basis == Basis::Sockets && s.tuple == w.tuple && s.wire.is_none())
        else {
            out.push(w);
            continue;
        };
        let agrees = flows::agree(&s.fate, &w.fate);
        if !agrees {
            warnings.push(format!(
                "{}:{} → {}:{}: the sockets say {}, the wire says {} ({})",
                s.tuple.saddr,
                s.tuple.sport,
                s.tuple.daddr,
                s.tuple.dport,
                s.fate,
                w.fate,
                w.wire.as_ref().map_or("", |v| v.basis.as_str())
            ));
        }
        s.wire = w.wire;
        s.wire_agrees = Some(agrees);
    }
    out.sort_by_key(|c| (c.tuple, c.netns));
    (out, warnings)
}

/// Connections alive at the pause `p` (an event before it, not closed before it) that `m` did not judge and whose
/// addresses no other migration's VM has. A migration with unknown IPs judges every connection.
fn unjudged_at(
    conns: &ConnectionIndex<'_>,
    m: &MigrationReport,
    p: u64,
    known_ips: &[Vec<IpAddr>],
) -> Vec<FourTuple> {
    if m.ips.is_empty() {
        return Vec::new();
    }
    let mut out: Vec<FourTuple> = conns
        .lives
        .iter()
        .filter(|life| {
            life.events.first().is_some_and(|e| e.ts_ns() < p) && life.ended_ns().is_none_or(|c| c >= p)
        })
        .filter(|life| !m.connections.iter().any(|c| c.tuple == life.tuple))
        .filter(|life| {
            !known_ips
                .iter()
                .any(|ips| !ips.is_empty() && matches_ips(&life.tuple, ips))
        })
        .map(|life| life.tuple)
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Fates counted over the connections alive at the pause.
#[derive(Default)]
struct Tally {
    survived: usize,
    aborted: usize,
    unresolved: usize,
}

impl Tally {
    fn of(connections: &[ConnectionVerdict]) -> Self {
        let mut t = Self::default();
        for c in connections.iter().filter(|c| !c.opened_during_window) {
            match c.fate {
                Fate::Survived => t.survived += 1,
                Fate::Aborted { .. } => t.aborted += 1,
                Fate::Unresolved => t.unresolved += 1,
            }
        }
        t
    }
}

/// The longest resume → first progress among the connections alive at the pause.
fn max_recovery_tail(connections: &[ConnectionVerdict]) -> Option<Figure> {
    connections
        .iter()
        .filter(|c| !c.opened_during_window)
        .filter_map(|c| c.recovery_tail_ns.map(|t| (t, c)))
        .max_by_key(|(t, _)| *t)
        .map(|(t, c)| Figure {
            ns: t,
            source: "probes".to_owned(),
            basis: format!(
                "{}:{} → {}:{}: {}",
                c.tuple.saddr, c.tuple.sport, c.tuple.daddr, c.tuple.dport, c.progress_basis
            ),
            bound_ns: None,
        })
}

/// What the report cannot tell, and why.
fn migration_warnings(
    ips: &[IpAddr],
    mac: Option<MacAddr>,
    tl: &Timeline,
    resume: Option<u64>,
) -> Vec<String> {
    let mut warnings = Vec::new();
    if ips.is_empty() {
        warnings.push(
            "the VM's IPs are unknown: every connection in the trace was judged against this pause"
                .to_owned(),
        );
    }
    if mac.is_none() {
        warnings.push("the VM's MAC is unknown: no wire figures".to_owned());
    }
    if tl.first_rarp.is_none()
        && tl.first_garp.is_none()
        && tl.first_na.is_none()
        && resume.is_some()
        && mac.is_some()
    {
        warnings.push("no RARP or GARP from the VM was seen after the pause".to_owned());
    }
    warnings
}

/// completed, failed: …, rolled back, in progress.
fn outcome(g: &MigrationGroup, resume: Option<u64>) -> String {
    if let Some(r) = &g.failed {
        if g.rollback {
            format!("failed ({r}), rolled back")
        } else {
            format!("failed ({r})")
        }
    } else if g.rollback {
        "rolled back".to_owned()
    } else if g.complete.is_some() || (g.source != PauseSource::Migrator && resume.is_some()) {
        "completed".to_owned()
    } else if resume.is_some() {
        "resumed (no completion event)".to_owned()
    } else {
        "in progress when the trace ended".to_owned()
    }
}

#[cfg(test)]
pub(crate) mod tests;
