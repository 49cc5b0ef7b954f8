//! Correlation: joins the pause windows with what the probes saw, and gives every migration a timeline and a
//! downtime split, and every TCP connection alive at the pause a verdict. Pure: a trace in, an [`Analysis`] out.
//!
//! The definitions (what counts as the blackout, convergence, forward progress, an abort) are written down in
//! `docs/report.md`; the code below follows them and names each rule where it applies.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::{self, Write as _},
};

use migevents::{Mode, Phase, Role};
use serde::Serialize;

use std::net::IpAddr;

use crate::trace::{Direction, Event, FourTuple, MacAddr, PauseSource, TcpState, Trace, state_text};

pub mod wire;

/// How long after the network came back a reset or error still counts as caused by the migration, for a
/// connection that did not retransmit (it had nothing in flight, so no retransmission can prove progress).
const RESET_GRACE_NS: u64 = 1_000_000_000;
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
    pub warnings: Vec<String>,
}

impl Analysis {
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
    let mut warnings = Vec::new();
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
    let mut a = correlate(events);
    a.lost_events = events
        .iter()
        .map(|e| {
            if let Event::Loss { count, .. } = e {
                *count
            } else {
                0
            }
        })
        .sum();
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
    let mut sorted: Vec<&Event> = events.iter().collect();
    sorted.sort_by_key(|e| e.ts_ns());
    let start_ns = sorted.first().map_or(0, |e| e.ts_ns());
    let end_ns = sorted.last().map_or(0, |e| e.ts_ns());

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
    let mut migrations = Vec::new();
    for (i, g) in groups.iter().enumerate() {
        // Window end: the next pause of the same VM, or the end of the trace.
        let next_pause = groups[i + 1..]
            .iter()
            .filter(|n| same_vm(n.mac, g.mac))
            .find_map(|n| n.pause.as_ref().map(|p| p.ts_ns).filter(|&t| t > g.anchor_ns()));
        let window_end = next_pause.unwrap_or(end_ns.saturating_add(1));
        migrations.push(build_migration(g, &l2, &conns, window_end, end_ns));
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
        warnings,
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
        self.announces.extend(o.announces);
        self.failed = self.failed.take().or(o.failed);
        self.rollback |= o.rollback;
        self.first_ns = self.first_ns.min(o.first_ns);
    }
}

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
        let g = &mut by_id[idx].1;
        // A pause source that does not know the MAC (QMP) sends an empty one.
        g.mac = g.mac.or_else(|| ev.mac.parse().ok());
        let stamp = || Stamp {
            ts_ns: ev.ts_ns,
            source: *source,
        };
        match &ev.phase {
            Phase::Setup {
                mode,
                ips,
                host,
                carries_frames,
                ..
            } => {
                g.setup.get_or_insert(ev.ts_ns);
                g.mode = Some(*mode);
                g.carries_frames |= *carries_frames;
                for ip in ips.iter().filter_map(|ip| ip.parse().ok()) {
                    if !g.ips.contains(&ip) {
                        g.ips.push(ip);
                    }
                }
                if !host.is_empty() {
                    match ev.role {
                        Role::Source => g.source_host = Some(host.clone()),
                        Role::Destination => g.destination_host = Some(host.clone()),
                    }
                }
            }
            Phase::Round {
                n,
                pages,
                bytes,
                bandwidth,
            } => {
                // Both ends report each round (sent / received): keep the source's, or the destination's when the
                // source's stream is missing.
                let round = Round {
                    n: *n,
                    ts_ns: ev.ts_ns,
                    pages: *pages,
                    bytes: *bytes,
                    bandwidth: *bandwidth,
                };
                match ev.role {
                    Role::Source => {
                        g.rounds.retain(|r| r.n != *n);
                        g.source_rounds = true;
                        g.rounds.push(round);
                    }
                    Role::Destination if !g.source_rounds && g.rounds.iter().all(|r| r.n != *n) => {
                        g.rounds.push(round);
                    }
                    Role::Destination => {}
                }
            }
            Phase::Pause => {
                if g.pause.is_none() {
                    g.pause = Some(stamp());
                }
            }
            Phase::StateSent => {
                g.state_sent.get_or_insert(ev.ts_ns);
            }
            Phase::Resume => {
                // The destination's resume wins over a source's (rollback) resume if both exist.
                if g.resume.is_none() || ev.role == Role::Destination {
                    g.resume = Some(stamp());
                }
            }
            Phase::Announce { .. } => g.announces.push(ev.ts_ns),
            Phase::Complete { .. } => {
                g.complete.get_or_insert(ev.ts_ns);
            }
            Phase::Failed { reason } => g.failed = Some(reason.clone()),
            Phase::Rollback => g.rollback = true,
        }
    }
    let mut groups: Vec<MigrationGroup> = by_id.into_iter().map(|(_, g)| g).collect();

    // A QEMU pair gives two halves: the source's STOP and the destination's RESUME, with different ids. Join a
    // half without resume to the next half without pause of the same VM (same MAC, or unknown MAC), same source.
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
    // A group with neither pause nor resume (only setup/rounds) stays: the migration may have failed early.
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
                Event::Rarp { .. } | Event::Garp { .. } | Event::Arp { .. } => idx.announces.push(e),
                Event::FdbUpdate { .. } => idx.fdb.push(e),
                _ => {}
            }
        }
        idx
    }

    fn ports(&self, mac: MacAddr, dir: Direction) -> Option<&BTreeMap<String, PortActivity>> {
        self.ports.get(&(mac, dir))
    }

    /// IPs the VM announced for itself (ARP/GARP with its MAC as sender), in text order.
    fn ips_of(&self, mac: MacAddr) -> Vec<IpAddr> {
        let mut ips = BTreeSet::new();
        for e in &self.announces {
            if let Event::Arp { frame, .. } | Event::Garp { frame, .. } = e
                && frame.sha == mac
                && !frame.spa.is_unspecified()
            {
                ips.insert(frame.spa.to_string());
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
    closed_ns: Option<u64>,
    /// Events for the 4-tuple after the socket was gone (RSTs the kernel sent for it): shown, never judged.
    epilogue: Vec<&'a Event>,
}

struct ConnectionIndex<'a> {
    lives: Vec<ConnLife<'a>>,
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
        let mut pending_open: HashMap<(std::net::IpAddr, std::net::IpAddr, u16, u64), u64> = HashMap::new();
        for e in sorted {
            let Some((tuple, netns)) = tcp_of(e) else { continue };
            if tuple.sport == 0 {
                if let Event::TcpState { old_state, .. } = e
                    && *old_state == Some(TcpState::Close)
                {
                    pending_open.insert((tuple.saddr, tuple.daddr, tuple.dport, netns), e.ts_ns());
                }
                continue;
            }
            // A new life starts at an opening transition even if the old one was never seen closing.
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
                    .filter(|&t| t + 120_000_000_000 >= e.ts_ns());
                lives.push(ConnLife {
                    tuple: *tuple,
                    netns,
                    events: Vec::new(),
                    opened_ns: if opening { Some(e.ts_ns()) } else { pending },
                    closed_ns: None,
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
        Self { lives }
    }
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

fn verdict(
    life: &ConnLife<'_>,
    pause: u64,
    net: &Network,
    window_end: u64,
    trace_end: u64,
) -> ConnectionVerdict {
    let state_at_pause = state_at(life, pause);
    let ep = episode(life, pause, window_end);
    let in_window: Vec<&Event> = life
        .events
        .iter()
        .copied()
        .filter(|e| e.ts_ns() >= pause && e.ts_ns() < window_end)
        .collect();

    // The first terminal event: an error, a reset, or a CLOSE that does not end an orderly close. An application's
    // close (ESTABLISHED → FIN_WAIT1, CLOSE_WAIT → LAST_ACK) is not terminal by itself: if its FIN is acknowledged
    // after resume the close completed and the connection came through; if the socket dies first, the close is
    // what ended it.
    let terminal = in_window.iter().position(|e| match e {
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
    });
    let resume = net.resume.unwrap_or(pause);
    // Precise progress: a transition that needs a segment from the peer, after resume.
    let precise = in_window.iter().find_map(|e| match e {
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
    });
    let terminal_ts = terminal.map(|i| in_window[i].ts_ns());

    // Progress inferred from the retransmit episode: its last retransmission got through if no abort follows
    // within the time the next one was due.
    let mut progress: Option<(u64, String)> = precise.clone();
    let mut unresolved = false;
    let mut unresolved_basis: Option<String> = None;
    if let Some(last) = ep.last() {
        // The next retransmission was due one doubled RTO later; long timers fire late by the timer wheel's
        // granularity (up to an eighth of the timeout), hence the slack.
        let interval = if last.rto_us > 0 {
            (last.rto_us * 2).min(120_000_000) * 1000
        } else if ep.len() >= 2 {
            2 * (last.ts - ep[ep.len() - 2].ts)
        } else {
            400_000_000
        };
        let next_due = last.ts + interval + (interval / 4).max(300_000_000);
        let aborted_in_episode = terminal_ts.is_some_and(|t| t <= next_due);
        let inferred_ok = !aborted_in_episode && next_due <= trace_end;
        let precise_in_episode = precise.as_ref().is_some_and(|(t, _)| *t <= next_due);
        if inferred_ok && !precise_in_episode {
            progress = Some(if last.ts >= resume {
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
                    "retransmissions stopped before resume and none followed: the segment queued during the pause \
                     was delivered after resume"
                        .to_owned(),
                )
            });
        }
        if !aborted_in_episode && next_due > trace_end && !precise_in_episode {
            unresolved = true;
            unresolved_basis = Some(format!(
                "survived so far: no abort by the trace's end ({} after resume); retransmission #{} came at {}, the \
                 next was due by resume+{}",
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
    }

    // Fate.
    let settle = match &progress {
        Some((t, _)) => *t,
        None if !ep.is_empty() => u64::MAX,
        None => net.restored.unwrap_or(resume).saturating_add(RESET_GRACE_NS),
    };
    let mut proof: Vec<Event> = Vec::new();
    let fate = match terminal {
        Some(i) if in_window[i].ts_ns() <= settle => {
            let t0 = in_window[i].ts_ns();
            // The terminal cluster: from the first terminal event to the socket's CLOSE (or 10 ms).
            let cluster_end = life.closed_ns.unwrap_or(t0).max(t0) + CLOSE_CLUSTER_NS;
            let cluster: Vec<&Event> = in_window[i..]
                .iter()
                .copied()
                .take_while(|e| e.ts_ns() <= cluster_end)
                .collect();
            let reason = if cluster.iter().any(|e| matches!(e, Event::TcpResetIn { .. })) {
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
            };
            proof.extend(cluster.into_iter().cloned());
            progress = None;
            Fate::Aborted { reason, at_ns: t0 }
        }
        _ if unresolved && progress.is_none() => Fate::Unresolved,
        _ => Fate::Survived,
    };
    if fate == Fate::Survived
        && let Some(last) = ep.last()
    {
        // The last retransmission is the proof of recovery.
        if let Some(e) = life.events.iter().find(|e| e.ts_ns() == last.ts) {
            proof.push((*e).clone());
        }
    }
    let (first_progress_ns, progress_basis) = match (&fate, progress) {
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
    };
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
        state_at_pause,
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
    }
}

/// Formats a duration in ns for people: 812 µs, 12.4 ms, 5.30 s.
pub fn fmt_dur(ns: u64) -> String {
    if ns < 1_000_000 {
        format!("{} µs", ns / 1000)
    } else if ns < 1_000_000_000 {
        format!("{:.1} ms", ns as f64 / 1e6)
    } else {
        format!("{:.2} s", ns as f64 / 1e9)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// One migration
// ---------------------------------------------------------------------------------------------------------------

fn build_migration(
    g: &MigrationGroup,
    l2: &L2Index<'_>,
    conns: &ConnectionIndex<'_>,
    window_end: u64,
    trace_end: u64,
) -> MigrationReport {
    let mut warnings = Vec::new();
    let mac = g.mac;
    let mut ips = g.ips.clone();
    if let (true, Some(mac)) = (ips.is_empty(), mac) {
        ips = l2.ips_of(mac);
    }
    let pause = g.pause.as_ref().map(|p| p.ts_ns);
    let resume = g.resume.as_ref().map(|r| r.ts_ns);
    let anchor = g.anchor_ns();

    let mut tl = Timeline {
        setup: g.setup.map(|ts| Stamp {
            ts_ns: ts,
            source: g.source,
        }),
        rounds: g.rounds.clone(),
        pause: g.pause.clone(),
        state_sent: g.state_sent.map(|ts| Stamp {
            ts_ns: ts,
            source: g.source,
        }),
        resume: g.resume.clone(),
        complete: g.complete.map(|ts| Stamp {
            ts_ns: ts,
            source: g.source,
        }),
        announces: g
            .announces
            .iter()
            .map(|&ts| Stamp {
                ts_ns: ts,
                source: g.source,
            })
            .collect(),
        ..Timeline::default()
    };

    // Wire: announces after the pause (or the anchor), by the VM's MAC.
    let after = resume.or(pause).unwrap_or(anchor);
    let l2_from = pause.unwrap_or(anchor);
    // Wire events long after the resume belong to something else (the VM's next life, another migration).
    let l2_end = window_end.min(after.saturating_add(L2_HORIZON_NS));
    for e in &l2.announces {
        let ts = e.ts_ns();
        if ts < l2_from || ts >= l2_end {
            continue;
        }
        match e {
            Event::Rarp { frame, .. } if tl.first_rarp.is_none() && same_vm(mac, Some(frame.mac)) => {
                tl.first_rarp = Some(Sighting {
                    ts_ns: ts,
                    port: frame.port.to_string(),
                    exact: true,
                });
            }
            Event::Garp { frame, .. } if tl.first_garp.is_none() && same_vm(mac, Some(frame.mac)) => {
                tl.first_garp = Some(Sighting {
                    ts_ns: ts,
                    port: frame.port.to_string(),
                    exact: true,
                });
            }
            _ => {}
        }
    }

    // FDB: per bridge, the first update after the pause to a port other than the one before.
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
        if mac != Some(*m) || *ts_ns >= l2_end {
            continue;
        }
        let bridge_key = match netns {
            Some(ns) => format!("{bridge}@{ns}"),
            None => bridge.clone(),
        };
        if *ts_ns >= l2_from && !moved.contains(&bridge_key) {
            let from = last_port.get(&bridge_key).cloned();
            if from.as_deref() != Some(port.as_str()) {
                tl.fdb_moves.push(FdbMove {
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

    // The VM's frames: last before the pause (any port), first after resume (new port).
    let ingress = mac.and_then(|mac| l2.ports(mac, Direction::Ingress));
    if let (Some(ports), Some(p)) = (ingress, pause) {
        tl.last_vm_frame_old_port = last_sighting_before(ports, p);
    }
    if let Some(ports) = ingress {
        // The new port is outside the VM's old path (the ports of its last burst before the pause); only when the
        // VM came back where it was (a stop/cont) is it one of those.
        let p = pause.unwrap_or(anchor);
        let old = old_path(ports, p);
        tl.first_vm_frame_new_port = first_sighting_after(ports, &old, after, l2_end);
    }
    let egress = mac.and_then(|mac| l2.ports(mac, Direction::Egress));
    if let Some(ports) = egress {
        let p = pause.unwrap_or(anchor);
        // Old path: egress ports that were part of the last burst of delivery before the pause.
        tl.last_frame_to_vm_old_port = last_sighting_before(ports, p);
        let old = old_path(ports, p);
        // New port: the first port outside the old path that delivers after resume (or, when the VM came back to
        // the same port, the first old one).
        tl.first_frame_to_vm_new_port = first_sighting_after(ports, &old, after, l2_end);
        let new_first = tl.first_frame_to_vm_new_port.as_ref().map(|s| s.ts_ns);
        let new_label = tl.first_frame_to_vm_new_port.as_ref().map(|s| s.port.clone());
        for label in old {
            if Some(label) == new_label.as_ref() {
                continue;
            }
            let a = &ports[label];
            let (frames, last) = a.between(p, l2_end.min(trace_end.saturating_add(1)));
            let Some(last) = last else { continue };
            // Still delivering well after the new port started: a shared hop, not the old port.
            if new_first.is_some_and(|nf| last > nf + SHARED_PATH_SLACK_NS) {
                continue;
            }
            if frames > 0 {
                tl.black_holed.push(BlackHole {
                    port: label.clone(),
                    frames,
                    last_ns: last,
                });
            }
        }
    }

    // Downtime split.
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
        });
    }
    let blackout_end = tl
        .first_frame_to_vm_new_port
        .as_ref()
        .map(|s| (s.ts_ns, "first frame delivered towards the VM at the new port"))
        .or_else(|| {
            tl.first_vm_frame_new_port.as_ref().map(|s| {
                (
                    s.ts_ns,
                    "first frame from the VM at the new port (no egress counters)",
                )
            })
        });
    // The blackout starts at the last frame exchanged with the VM at its old port, either way: until then the path
    // demonstrably worked.
    let blackout_start = [
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
    if let (Some((start, which)), Some((end, what))) = (blackout_start, blackout_end) {
        dt.blackout = Some(Figure {
            ns: end.saturating_sub(start.ts_ns),
            source: "wire".to_owned(),
            basis: format!("{which} at {} → {what}", start.port),
        });
    } else if let (Some(p), Some((end, what))) = (pause, blackout_end) {
        dt.blackout = Some(Figure {
            ns: end.saturating_sub(p),
            source: format!("{}+wire", g.source),
            basis: format!("pause → {what} (no frame from the VM seen before the pause)"),
        });
    }
    let last_fdb = tl.fdb_moves.iter().map(|m| m.ts_ns).max();
    if let Some(r) = resume {
        let conv = last_fdb
            .map(|t| (t, "resume → the last bridge's FDB move"))
            .or_else(|| blackout_end.map(|(t, _)| (t, "resume → the first frame delivered at the new port")));
        if let Some((t, basis)) = conv {
            dt.convergence = Some(Figure {
                ns: t.saturating_sub(r),
                source: format!("{}+wire", g.source),
                basis: basis.to_owned(),
            });
        }
    }
    let net = Network {
        resume,
        restored: resume.map(|r| last_fdb.map_or(r, |f| f.max(r))),
    };

    // Connections.
    let mut connections = Vec::new();
    if let Some(p) = pause {
        let outage_end = net.restored.unwrap_or(p);
        for life in &conns.lives {
            if !matches_ips(&life.tuple, &ips) {
                continue;
            }
            let first = life.events.first().map_or(u64::MAX, |e| e.ts_ns());
            let closed_before = life.closed_ns.is_some_and(|c| c < p);
            if closed_before || first >= window_end {
                continue;
            }
            let opened_during = life.opened_ns.is_some_and(|o| o >= p);
            if opened_during && life.opened_ns.is_some_and(|o| o > outage_end) {
                continue;
            }
            if !opened_during && first > p && state_at(life, p) == Some(TcpState::SynSent) {
                continue;
            }
            let mut v = verdict(life, p, &net, window_end, trace_end);
            v.opened_during_window = opened_during;
            // Nothing lost: the data plane still tells when traffic towards the VM flowed again (not per connection).
            if v.fate == Fate::Survived
                && v.retransmits == 0
                && let (Some(first), Some(r)) = (&tl.first_frame_to_vm_new_port, resume)
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
    } else {
        warnings.push("no pause seen for this migration: connections were not judged".to_owned());
    }
    connections.sort_by_key(|c| (c.tuple, c.netns));
    let counted = connections.iter().filter(|c| !c.opened_during_window);
    let (mut survived, mut aborted, mut unresolved) = (0, 0, 0);
    for c in counted {
        match c.fate {
            Fate::Survived => survived += 1,
            Fate::Aborted { .. } => aborted += 1,
            Fate::Unresolved => unresolved += 1,
        }
    }
    let retransmits = connections.iter().map(|c| u64::from(c.retransmits)).sum();
    dt.max_recovery_tail = connections
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
        });

    if ips.is_empty() {
        warnings.push(
            "the VM's IPs are unknown: every connection in the trace was judged against this pause"
                .to_owned(),
        );
    }
    if mac.is_none() {
        warnings.push("the VM's MAC is unknown: no wire figures".to_owned());
    }
    if tl.first_rarp.is_none() && tl.first_garp.is_none() && resume.is_some() && mac.is_some() {
        warnings.push("no RARP or GARP from the VM was seen after the pause".to_owned());
    }
    let outcome = if let Some(r) = &g.failed {
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
    };
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
        outcome,
        timeline: tl,
        downtime: dt,
        connections,
        survived,
        aborted,
        unresolved,
        retransmits,
        warnings,
    }
}

#[cfg(test)]
pub(crate) mod tests;
