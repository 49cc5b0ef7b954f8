//! Correlation of a live watch in bounded memory.
//!
//! A watch that runs for weeks cannot keep every event. [`LiveCorrelation`] keeps:
//!
//! - the **look-back**: every event of the last `lookback_ns` (30 s by default), except the TCP events of
//!   connections that closed: those are condensed after [`TCP_HORIZON_NS`] (a connection closed before a pause is
//!   never judged against it), unless a held migration paused earlier or a VM's last frame is earlier (a move the
//!   wire infers later pauses at that frame);
//! - every event of a **migration window** until the migration is final, and the look-back before its first phase
//!   event;
//! - the **residue** of everything older ([`crate::correlate::residue`]): the few events that still shape later
//!   verdicts (connections still open, each port's last counters, each bridge's last FDB entry, ...);
//! - the **verdicts** of the last `keep` final migrations (their whole [`MigrationReport`]s).
//!
//! Events older than all of that are released. A migration is **final** once no later event can change its verdict
//! as the correlation reads it: `settle_ns` after its resume (announces, FDB moves and black-holed frames come
//! within it) with every connection's fate decided (aborted, or forward progress seen), or [`HOLD_MAX_NS`] after
//! its resume (or after its last phase event, when it never resumed) whatever the connections say. Its report is
//! then the one the offline `migmon report` of the whole trace gives, except for what only later events can say
//! (the module test checks this): a connection's first retransmission long after the resume but before the VM's
//! next pause (the offline report still reads it into this window), RSTs for a closed connection's 4-tuple after
//! it, IPs the VM announces for the first time later, and connections of VMs that migrate only later (they are
//! listed as unjudged here).
//!
//! Memory is bounded by the event rate times (look-back + the longest held window) — for TCP churn, its rate times
//! the 2 s horizon and the held windows, or the look-back while a watched VM is silent — plus one residue entry per
//! open connection, port and bridge, plus `keep` reports. One correlation costs a pass over what is held, whatever
//! the watch's age.

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    net::IpAddr,
};

use crate::{
    check,
    correlate::{Analysis, Fate, MigrationReport, correlate_until, residue::residue_until},
    trace::{Direction, Event, MacAddr},
};

/// The longest a migration's events are held when its connections' fates stay open (a retransmission series
/// that lasts), counted from its resume (or its last phase event when it never resumed).
pub const HOLD_MAX_NS: u64 = 120_000_000_000;

/// TCP events of connections that closed this long ago are condensed (unless a held migration or a silent VM
/// needs them longer, see [`LiveCorrelation`]).
pub const TCP_HORIZON_NS: u64 = 2_000_000_000;

/// Ids of migrations released (or printed) are remembered until their events are this far behind the cutoff.
const FORGET_IDS_NS: u64 = 2 * crate::correlate::residue::MIGRATION_MARGIN_NS;

/// At most this many IPs of released migrations are remembered (to keep their connections out of later
/// migrations' unjudged lists).
const MAX_KNOWN_IPS: usize = 4096;

/// How much a live correlation keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveConfig {
    /// Events outside migration windows are kept this long.
    pub lookback_ns: u64,
    /// How long after a resume a migration counts as settled (`watch --settle`).
    pub settle_ns: u64,
    /// How many final migrations' reports are kept.
    pub keep: usize,
}

impl Default for LiveConfig {
    fn default() -> Self {
        Self {
            lookback_ns: 30_000_000_000,
            settle_ns: 5_000_000_000,
            keep: 32,
        }
    }
}

/// What one [`LiveCorrelation::update`] found.
#[derive(Debug, Default)]
pub struct LiveUpdate {
    /// The correlation of what is held.
    pub analysis: Analysis,
    /// Migrations that settled since the last update (the `check::settled` rule), to print and gate on.
    pub settled: Vec<MigrationReport>,
    /// Migrations that became final since the last update: their verdicts are kept and their events released.
    pub released: Vec<MigrationReport>,
    /// A migration is held: in flight, or resumed and not final yet.
    pub pending: bool,
    /// A migration has started and not resumed.
    pub in_flight: bool,
}

/// What a live correlation holds, for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LiveStatus {
    /// Events held (look-back and migration windows).
    pub held: usize,
    /// Older events kept for their state.
    pub residue: usize,
    /// Time of the oldest event held, or 0.
    pub oldest_held_ns: u64,
    /// Events before this time have been released (or went into the residue).
    pub cutoff_ns: u64,
    /// Events pushed, and released, since the start.
    pub pushed: u64,
    pub released_events: u64,
    /// Migrations made final since the start, and how many of them with a connection still unresolved.
    pub released_migrations: u64,
    pub released_unresolved: u64,
    /// Migrations whose events all lay before the cutoff when the correlation first saw them: echoes of released
    /// evidence, ignored.
    pub stale: u64,
    /// Reports kept.
    pub kept: usize,
}

/// The bounded correlation of a live watch: push events, call [`LiveCorrelation::update`] now and then.
#[derive(Debug, Default)]
pub struct LiveCorrelation {
    cfg: LiveConfig,
    recent: VecDeque<Event>,
    residue: Vec<Event>,
    cutoff_ns: u64,
    /// Component ids (a report's id is its groups' ids joined by `+`) of migrations printed / released, with the
    /// time of their last phase event.
    printed: HashMap<String, u64>,
    released: HashMap<String, u64>,
    kept: VecDeque<MigrationReport>,
    known_ips: BTreeSet<IpAddr>,
    lost: u64,
    status: LiveStatus,
    /// A migration was held at the last correlation.
    pending: bool,
    /// An event that can start or move a migration (a phase event, a frame sighting of a MAC) came since the last
    /// correlation.
    dirty: bool,
    /// TCP events before this time have gone into the residue (never before `cutoff_ns`).
    tcp_cutoff_ns: u64,
    /// Each MAC's last frame (as the wire inference reads it: the pause of a move it infers).
    last_seen: HashMap<MacAddr, u64>,
    /// While every held migration has resumed with each connection's fate decided, nothing but the settle time
    /// can change what a correlation finds until this time, unless an event that can start or move a migration
    /// comes: [`LiveCorrelation::update`] only moves the look-back until then. 0: correlate at every update.
    quiet_until_ns: u64,
    /// What the held migrations keep, as the last correlation found: events from this time, TCP events from the
    /// earliest held pause.
    hold_from_ns: u64,
    held_pause_ns: u64,
}

fn is_tcp(e: &Event) -> bool {
    matches!(
        e,
        Event::TcpRetransmit { .. }
            | Event::TcpState { .. }
            | Event::TcpError { .. }
            | Event::TcpResetIn { .. }
            | Event::TcpResetOut { .. }
    )
}

/// The first and the last phase event of a migration.
fn phase_span(m: &MigrationReport) -> (u64, u64) {
    let tl = &m.timeline;
    let times: Vec<u64> = [&tl.setup, &tl.pause, &tl.state_sent, &tl.resume, &tl.complete]
        .into_iter()
        .flatten()
        .map(|s| s.ts_ns)
        .chain(tl.rounds.iter().map(|r| r.ts_ns))
        .chain(tl.announces.iter().map(|s| s.ts_ns))
        .collect();
    (
        times.iter().copied().min().unwrap_or(0),
        times.iter().copied().max().unwrap_or(0),
    )
}

fn components(id: &str) -> impl Iterator<Item = &str> {
    id.split('+')
}

impl LiveCorrelation {
    pub fn new(cfg: LiveConfig) -> Self {
        Self {
            cfg,
            ..Self::default()
        }
    }

    /// Takes one event.
    pub fn push(&mut self, ev: Event) {
        if let Event::Loss { count, .. } = &ev {
            self.lost = self.lost.saturating_add(*count);
        }
        self.status.pushed += 1;
        let seen = match &ev {
            Event::MacSeen {
                ts_ns,
                mac,
                direction: Direction::Ingress,
                ..
            } => Some((*mac, *ts_ns)),
            Event::MacStats {
                mac,
                direction: Direction::Ingress,
                last_ns,
                ..
            } if *last_ns > 0 => Some((*mac, *last_ns)),
            Event::Rarp { ts_ns, frame } | Event::Garp { ts_ns, frame } => Some((frame.mac, *ts_ns)),
            Event::NeighborAdvert { ts_ns, frame } => Some((frame.mac, *ts_ns)),
            _ => None,
        };
        if let Some((mac, t)) = seen {
            let last = self.last_seen.entry(mac).or_default();
            *last = (*last).max(t);
        }
        self.dirty |= matches!(
            ev,
            Event::Migration { .. }
                | Event::MacSeen { .. }
                | Event::MacStats { .. }
                | Event::Rarp { .. }
                | Event::Garp { .. }
                | Event::NeighborAdvert { .. }
        );
        self.recent.push_back(ev);
    }

    /// Kernel events lost since the start (the `loss` events' counts).
    pub fn lost_events(&self) -> u64 {
        self.lost
    }

    /// The reports of the last final migrations, oldest first.
    pub fn kept(&self) -> &VecDeque<MigrationReport> {
        &self.kept
    }

    pub fn status(&self) -> LiveStatus {
        LiveStatus {
            held: self.recent.len(),
            residue: self.residue.len(),
            oldest_held_ns: self.recent.iter().map(Event::ts_ns).min().unwrap_or(0),
            cutoff_ns: self.cutoff_ns,
            kept: self.kept.len(),
            ..self.status
        }
    }

    fn is_released(&self, m: &MigrationReport) -> bool {
        components(&m.id).any(|c| self.released.contains_key(c))
    }

    fn is_printed(&self, m: &MigrationReport) -> bool {
        components(&m.id).any(|c| self.printed.contains_key(c))
    }

    /// Correlates what is held as of `now_ns`; returns what settled and what became final, and releases what no
    /// held migration needs. When no migration is held and no event that could start one came since the last
    /// update, a correlation could find nothing new: only the look-back moves on (its analysis is then empty).
    pub fn update(&mut self, now_ns: u64) -> LiveUpdate {
        if !self.pending && !self.dirty {
            let cutoff = now_ns.saturating_sub(self.cfg.lookback_ns).max(self.cutoff_ns);
            let tcp = self.tcp_cutoff(now_ns, cutoff, u64::MAX);
            self.release(cutoff, tcp);
            return LiveUpdate::default();
        }
        if !self.dirty && now_ns < self.quiet_until_ns {
            // Held migrations waiting only for their settle time: keep what they hold, move the rest on.
            let cutoff = now_ns
                .saturating_sub(self.cfg.lookback_ns)
                .min(self.hold_from_ns)
                .max(self.cutoff_ns);
            let tcp = self.tcp_cutoff(now_ns, cutoff, self.held_pause_ns);
            self.release(cutoff, tcp);
            return LiveUpdate {
                pending: true,
                ..LiveUpdate::default()
            };
        }
        self.dirty = false;
        let mut a = correlate_until(self.residue.iter().chain(self.recent.iter()), now_ns);
        a.lost_events = self.lost;
        let mut up = LiveUpdate::default();
        let mut fresh = Vec::new();
        for m in std::mem::take(&mut a.migrations) {
            if self.is_released(&m) {
                continue;
            }
            let (_, last) = phase_span(&m);
            if !self.is_printed(&m) && last < self.cutoff_ns {
                self.status.stale += 1;
                continue;
            }
            fresh.push(m);
        }
        for m in &mut fresh {
            m.unjudged
                .retain(|t| !self.known_ips.contains(&t.saddr) && !self.known_ips.contains(&t.daddr));
        }
        let mut floor = now_ns.saturating_sub(self.cfg.lookback_ns);
        // The earliest pause of a migration still held: connections closed before it are never judged.
        let mut held_pause = u64::MAX;
        // When the next held migration can become final with no new event (0: at any update).
        let mut quiet_until = u64::MAX;
        for m in &fresh {
            let (first, last) = phase_span(m);
            let resume = m.timeline.resume.as_ref().map(|r| r.ts_ns);
            if !self.is_printed(m) && check::settled(m, now_ns, self.cfg.settle_ns) {
                for c in components(&m.id) {
                    self.printed.insert(c.to_owned(), last);
                }
                up.settled.push(m.clone());
            }
            let decided = m.connections.iter().all(|c| c.fate != Fate::Unresolved);
            let fin = match resume {
                Some(r) => {
                    (decided && now_ns >= r.saturating_add(self.cfg.settle_ns))
                        || now_ns >= r.saturating_add(HOLD_MAX_NS)
                }
                None => now_ns >= last.saturating_add(HOLD_MAX_NS),
            };
            if fin {
                for c in components(&m.id) {
                    self.released.insert(c.to_owned(), last);
                }
                self.status.released_migrations += 1;
                if !decided {
                    self.status.released_unresolved += 1;
                }
                if self.known_ips.len() < MAX_KNOWN_IPS {
                    self.known_ips.extend(m.ips.iter().copied());
                }
                self.kept.push_back(m.clone());
                while self.kept.len() > self.cfg.keep.max(1) {
                    self.kept.pop_front();
                }
                up.released.push(m.clone());
            } else {
                up.pending = true;
                up.in_flight |= resume.is_none();
                quiet_until = match resume {
                    Some(r) if decided => quiet_until.min(r.saturating_add(self.cfg.settle_ns)),
                    _ => 0,
                };
                floor = floor.min(first.saturating_sub(self.cfg.lookback_ns));
                if let Some(p) = &m.timeline.pause {
                    held_pause = held_pause.min(p.ts_ns);
                }
            }
        }
        a.migrations = fresh;
        self.pending = up.pending;
        self.quiet_until_ns = if up.pending { quiet_until } else { 0 };
        self.hold_from_ns = floor;
        self.held_pause_ns = held_pause;
        let cutoff = floor.max(self.cutoff_ns);
        let tcp = self.tcp_cutoff(now_ns, cutoff, held_pause);
        self.release(cutoff, tcp);
        up.analysis = a;
        up
    }

    /// Where TCP events can be condensed: [`TCP_HORIZON_NS`] ago, but not after the earliest pause of a held
    /// migration (`held_pause`), nor after the last frame of a VM (a move the wire infers later pauses there), and
    /// not before `cutoff`.
    fn tcp_cutoff(&mut self, now_ns: u64, cutoff: u64, held_pause: u64) -> u64 {
        self.last_seen.retain(|_, t| *t >= cutoff);
        let vm_last = self.last_seen.values().copied().min().unwrap_or(u64::MAX);
        now_ns
            .saturating_sub(TCP_HORIZON_NS)
            .min(held_pause)
            .min(vm_last)
            .max(cutoff)
            .max(self.tcp_cutoff_ns)
    }

    /// Moves the cutoff to `cutoff_ns` (`tcp_cutoff_ns` for TCP events): events before it leave the look-back, and
    /// only their residue stays.
    fn release(&mut self, cutoff_ns: u64, tcp_cutoff_ns: u64) {
        self.cutoff_ns = cutoff_ns;
        let mut aged = Vec::new();
        while self.recent.front().is_some_and(|e| e.ts_ns() < cutoff_ns) {
            aged.extend(self.recent.pop_front());
        }
        if tcp_cutoff_ns > self.tcp_cutoff_ns.max(cutoff_ns) || !aged.is_empty() {
            // In place: a TCP event is a plain copy, and the look-back is not allocated again.
            self.recent.retain(|e| {
                let old = e.ts_ns() < tcp_cutoff_ns && is_tcp(e);
                if old {
                    aged.push(e.clone());
                }
                !old
            });
            // What a held window needed goes back once it is released.
            if self.recent.capacity() > 4 * self.recent.len().max(4096) {
                self.recent.shrink_to(2 * self.recent.len());
            }
        }
        self.tcp_cutoff_ns = tcp_cutoff_ns;
        if !aged.is_empty() {
            aged.append(&mut self.residue);
            self.residue = residue_until(&aged, tcp_cutoff_ns, cutoff_ns);
            self.status.released_events += (aged.len() - self.residue.len()) as u64;
        }
        let forget = |m: &mut HashMap<String, u64>| {
            m.retain(|_, last| last.saturating_add(FORGET_IDS_NS) >= cutoff_ns);
        };
        forget(&mut self.printed);
        forget(&mut self.released);
    }

    /// An analysis for the check (`--until-migrations`): the kept final migrations, then those still held, with
    /// every loss since the start.
    pub fn analysis_for_check(&self, held: &Analysis) -> Analysis {
        let mut a = held.clone();
        let mut ms: Vec<MigrationReport> = self.kept.iter().cloned().collect();
        ms.extend(held.migrations.iter().filter(|m| !self.is_released(m)).cloned());
        a.migrations = ms;
        a.lost_events = self.lost;
        a
    }
}

#[cfg(test)]
mod tests;
