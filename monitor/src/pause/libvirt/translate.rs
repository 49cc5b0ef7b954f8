//! libvirt's domain events as migration phases. Pure: the driver ([`super::driver`]) feeds it what the daemons
//! said, with the facts it looked up (job statistics, domain XML), and emits what it returns; the tests feed it the
//! sequences libvirt 9.0 sends.
//!
//! One translator serves every followed daemon, so a live migration between two daemons this monitor follows is
//! one migration id (the domain's UUID ties the two sides together); with a monitor per host, the correlation joins
//! the two halves by MAC, as it does for QMP.

use std::collections::HashMap;

use migevents::{MigrationEvent, Mode, Phase, Role};
use migmon_analysis::trace::{Event, PauseSource};
use migmon_base::mac::MacAddr;

use super::domain::DomainXml;

/// libvirt's `virDomainEventType` and its detail, as far as a pause window cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifecycle {
    Started(Started),
    Suspended(Suspended),
    Resumed(Resumed),
    Stopped(Stopped),
    /// Defined, undefined, shut down (guest side), PM-suspended, crashed: no pause-window meaning.
    Other {
        event: i32,
        detail: i32,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Started {
    Booted,
    /// An incoming migration: the destination's QEMU started, paused.
    Migrated,
    /// `virsh restore`: the domain came back from a save file.
    Restored,
    FromSnapshot,
    Other(i32),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Suspended {
    /// `virsh suspend`, or the first step of `virsh save`.
    Paused,
    /// The source stopped for a live migration's switch-over.
    Migrated,
    /// Restored into a paused state (`virsh restore --paused`, a snapshot).
    Restored,
    /// Post-copy: the source stopped and the destination runs.
    Postcopy,
    /// I/O error, watchdog, API error, ...
    Other(i32),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resumed {
    /// `virsh resume`.
    Unpaused,
    /// A live migration's destination runs (or a failed migration's source runs again).
    Migrated,
    /// libvirt 9.0 reports a restore's resume so.
    FromSnapshot,
    Postcopy,
    Other(i32),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// The source's side of a migration is over: the domain runs elsewhere.
    Migrated,
    /// `virsh save` wrote the domain to a file.
    Saved,
    /// Shut down, destroyed, crashed, failed, ...
    Other(i32),
}

impl Lifecycle {
    /// From `virDomainEventType` and its detail code.
    pub fn from_codes(event: i32, detail: i32) -> Self {
        match event {
            2 => Self::Started(match detail {
                0 => Started::Booted,
                1 => Started::Migrated,
                2 => Started::Restored,
                3 => Started::FromSnapshot,
                d => Started::Other(d),
            }),
            3 => Self::Suspended(match detail {
                0 => Suspended::Paused,
                1 => Suspended::Migrated,
                4 | 5 => Suspended::Restored,
                7 => Suspended::Postcopy,
                d => Suspended::Other(d),
            }),
            4 => Self::Resumed(match detail {
                0 => Resumed::Unpaused,
                1 => Resumed::Migrated,
                2 => Resumed::FromSnapshot,
                3 => Resumed::Postcopy,
                d => Resumed::Other(d),
            }),
            5 => Self::Stopped(match detail {
                3 => Stopped::Migrated,
                4 => Stopped::Saved,
                d => Stopped::Other(d),
            }),
            event => Self::Other { event, detail },
        }
    }
}

/// Why a domain stopped, for the failure note (`virDomainEventStoppedDetailType`).
fn stopped_reason(detail: i32) -> &'static str {
    match detail {
        0 => "shut down",
        1 => "destroyed",
        2 => "crashed",
        5 => "failed",
        6 => "reverted to a snapshot",
        _ => "stopped",
    }
}

/// `virDomainJobOperation` values the translator distinguishes.
pub mod operation {
    pub const SAVE: i64 = 2;
    pub const MIGRATION_OUT: i64 = 5;
}

/// A job's figures, from a `job-completed` event or `virDomainGetJobStats` (the fields libvirt names so).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JobFigures {
    /// `operation` (`virDomainJobOperation`).
    pub operation: Option<i64>,
    /// `time_elapsed`, ms.
    pub time_elapsed_ms: Option<u64>,
    /// `downtime`, ms: the pause QEMU measured.
    pub downtime_ms: Option<u64>,
    /// `data_processed`, bytes (memory and disk).
    pub data_processed: Option<u64>,
    /// `memory_processed`, bytes.
    pub memory_processed: Option<u64>,
    /// `memory_normal`, pages sent in full.
    pub memory_normal: Option<u64>,
    /// `memory_bps`, bytes per second.
    pub memory_bps: Option<u64>,
    /// `memory_total`, bytes: the guest's RAM.
    pub memory_total: Option<u64>,
    /// `memory_iteration`: pre-copy passes.
    pub memory_iteration: Option<u64>,
}

impl JobFigures {
    /// From typed parameters (name, value).
    pub fn from_params<'a>(params: impl IntoIterator<Item = (&'a str, i128)>) -> Self {
        let mut f = Self::default();
        for (name, v) in params {
            let u = u64::try_from(v).ok();
            match name {
                "operation" => f.operation = i64::try_from(v).ok(),
                "time_elapsed" => f.time_elapsed_ms = u,
                "downtime" => f.downtime_ms = u,
                "data_processed" => f.data_processed = u,
                "memory_processed" => f.memory_processed = u,
                "memory_normal" => f.memory_normal = u,
                "memory_bps" => f.memory_bps = u,
                "memory_total" => f.memory_total = u,
                "memory_iteration" => f.memory_iteration = u,
                _ => {}
            }
        }
        f
    }
}

/// A window open on one daemon for one domain: a pause, a migration, or both.
#[derive(Clone, Debug, Default)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "four independent facts about a window, each set by its own event"
)]
struct Window {
    id: String,
    /// The domain is paused.
    stopped: bool,
    /// A migration (or save) job runs.
    migrating: bool,
    mode: Option<Mode>,
    /// Its job completed (the domain left this daemon, or was saved).
    completed: bool,
    /// A destination (another daemon, or a restore) resumed the domain.
    resumed: bool,
    rounds: u32,
    /// `memory_processed` and `memory_normal` at the last statistics.
    processed: u64,
    normal: u64,
}

/// A migration whose source side ended (`Stopped Migrated` / `Stopped Saved`): the domain resumes elsewhere (another
/// daemon, or a restore), and the job's figures may still come.
#[derive(Clone, Debug)]
struct Away {
    conn: usize,
    window: Window,
}

/// What one daemon said about one domain.
#[derive(Clone, Debug, Default)]
struct Domain {
    name: String,
    mac: Option<MacAddr>,
    ram_bytes: u64,
    ips: Vec<String>,
    /// The host label of this domain's events, when it differs from the daemon's (the namespace of its tap).
    host: Option<String>,
    window: Option<Window>,
    /// Started as a migration's destination or from a save file, and not resumed yet (when).
    incoming: Option<u64>,
    /// QEMU's own STOP / RESUME times (monotonic), waiting for libvirt's lifecycle event that they time.
    qemu_stop: Option<u64>,
    qemu_resume: Option<u64>,
}

/// One followed daemon.
#[derive(Clone, Debug, Default)]
struct Daemon {
    /// The host label its events carry (`Setup.host`).
    host: String,
    domains: HashMap<String, Domain>,
}

/// A lifecycle stamp from QEMU is used if it is at most this much older than libvirt's event (it is QEMU's time of
/// the same STOP or RESUME, passed through before libvirt's own event).
const QEMU_STAMP_WINDOW_NS: u64 = 2_000_000_000;

/// Turns the events of every followed daemon into migration phases.
#[derive(Debug, Default)]
pub struct Translator {
    daemons: Vec<Daemon>,
    windows: u32,
    incoming: u32,
    away: HashMap<String, Away>,
}

impl Translator {
    pub fn new() -> Self {
        Self::default()
    }

    fn daemon(&mut self, conn: usize) -> &mut Daemon {
        if self.daemons.len() <= conn {
            self.daemons.resize_with(conn + 1, Daemon::default);
        }
        &mut self.daemons[conn]
    }

    fn domain(&mut self, conn: usize, uuid: &str, name: &str) -> &mut Domain {
        let d = self.daemon(conn).domains.entry(uuid.to_owned()).or_default();
        if d.name.is_empty() {
            name.clone_into(&mut d.name);
        }
        d
    }

    /// Names daemon `conn`'s host (the label its Setup events carry).
    pub fn set_host(&mut self, conn: usize, host: &str) {
        host.clone_into(&mut self.daemon(conn).host);
    }

    /// What a domain's XML says (its MAC names it in the events; RAM and addresses go into the Setup).
    pub fn domain_xml(&mut self, conn: usize, xml: &DomainXml) {
        let d = self.domain(conn, &xml.uuid, &xml.name);
        d.mac = xml.mac().or(d.mac);
        if xml.memory_bytes > 0 {
            d.ram_bytes = xml.memory_bytes;
        }
        for ip in xml.ips() {
            let ip = ip.to_string();
            if !d.ips.contains(&ip) {
                d.ips.push(ip);
            }
        }
    }

    /// Labels domain `uuid`'s host on daemon `conn` (the named network namespace its tap is in).
    pub fn domain_host(&mut self, conn: usize, uuid: &str, host: &str) {
        if let Some(d) = self.daemon(conn).domains.get_mut(uuid) {
            d.host = Some(host.to_owned());
        }
    }

    /// An address learnt elsewhere (the daemon's ARP or lease table).
    pub fn domain_ip(&mut self, conn: usize, uuid: &str, ip: &str) {
        if let Some(d) = self.daemon(conn).domains.get_mut(uuid)
            && !d.ips.iter().any(|i| i == ip)
        {
            d.ips.push(ip.to_owned());
        }
    }

    /// The daemon's connection was lost and made again. `running` lists the domains that run now: a window this
    /// daemon had paused whose domain runs again resumed while nobody listened; it is closed at `ts` (an upper
    /// bound), with a warning.
    pub fn reconnected(&mut self, conn: usize, ts: u64, running: &[String]) -> Vec<Event> {
        let mut out = Vec::new();
        let mut closed = Vec::new();
        for (uuid, d) in &mut self.daemon(conn).domains {
            d.qemu_stop = None;
            d.qemu_resume = None;
            if running.contains(uuid)
                && let Some(w) = d.window.take_if(|w| w.stopped && !w.completed)
            {
                closed.push((w.id, d.name.clone(), d.mac));
            }
        }
        for (id, name, mac) in closed {
            out.push(super::super::warn_note(format!(
                "libvirt: domain {name} resumed while the connection was down: its pause window {id} ends at the \
                 reconnect (an upper bound)"
            )));
            out.push(event(ts, &id, mac, Role::Source, Phase::Resume));
        }
        out
    }

    /// QEMU's own STOP or RESUME of a domain (passed through by libvirt, with QEMU's timestamp): it times the
    /// lifecycle event that follows.
    pub fn qemu_event(&mut self, conn: usize, uuid: &str, name: &str, event: &str, ts: u64) {
        let d = self.domain(conn, uuid, name);
        match event {
            "STOP" => d.qemu_stop = Some(ts),
            "RESUME" => d.qemu_resume = Some(ts),
            _ => {}
        }
    }

    /// The next window id.
    fn open(&mut self, conn: usize, uuid: &str) -> Window {
        self.windows += 1;
        let name = self.daemons[conn]
            .domains
            .get(uuid)
            .map_or("?", |d| d.name.as_str());
        Window {
            id: format!("libvirt:{name}:{}", self.windows),
            ..Window::default()
        }
    }

    fn setup(&self, conn: usize, uuid: &str, mode: Mode, role: Role, ts: u64) -> Event {
        let daemon = &self.daemons[conn];
        let d = daemon.domains.get(uuid);
        let id = d
            .and_then(|d| d.window.as_ref().map(|w| w.id.clone()))
            .unwrap_or_default();
        event(
            ts,
            &id,
            d.and_then(|d| d.mac),
            role,
            Phase::Setup {
                mode,
                ram_bytes: d.map_or(0, |d| d.ram_bytes),
                ips: d.map(|d| d.ips.clone()).unwrap_or_default(),
                host: d
                    .and_then(|d| d.host.clone())
                    .unwrap_or_else(|| daemon.host.clone()),
                // QEMU drops the frames that reach the old tap during the pause.
                carries_frames: false,
            },
        )
    }

    /// One lifecycle event of domain `uuid` on daemon `conn`, received at `ts`.
    pub fn lifecycle(&mut self, conn: usize, ts: u64, uuid: &str, name: &str, ev: Lifecycle) -> Vec<Event> {
        let mut out = Vec::new();
        self.domain(conn, uuid, name);
        match ev {
            Lifecycle::Suspended(
                Suspended::Paused | Suspended::Migrated | Suspended::Postcopy | Suspended::Other(_),
            ) => {
                let ts = self.stamp(conn, uuid, ts, true);
                self.pause(conn, uuid, ts, ev, &mut out);
            }
            Lifecycle::Resumed(how) => {
                let ts = self.stamp(conn, uuid, ts, false);
                self.resume(conn, uuid, ts, how, &mut out);
            }
            Lifecycle::Started(Started::Migrated | Started::Restored) => {
                let d = self.domain(conn, uuid, name);
                d.incoming = Some(ts);
                d.window = None;
            }
            Lifecycle::Started(_) => {
                let d = self.domain(conn, uuid, name);
                d.incoming = None;
                d.window = None;
            }
            Lifecycle::Stopped(Stopped::Migrated | Stopped::Saved) => {
                let d = self.domain(conn, uuid, name);
                d.incoming = None;
                if let Some(w) = d.window.take()
                    && !(w.resumed && w.completed)
                {
                    self.away.insert(uuid.to_owned(), Away { conn, window: w });
                }
            }
            Lifecycle::Stopped(Stopped::Other(detail)) => {
                let d = self.domain(conn, uuid, name);
                d.incoming = None;
                let mac = d.mac;
                if let Some(w) = d.window.take() {
                    out.push(event(
                        ts,
                        &w.id,
                        mac,
                        Role::Source,
                        Phase::Failed {
                            reason: format!("the domain was {} while paused", stopped_reason(detail)),
                        },
                    ));
                }
            }
            Lifecycle::Suspended(Suspended::Restored) | Lifecycle::Other { .. } => {}
        }
        out
    }

    /// The time of a pause (`stop`) or resume: QEMU's own stamp when it came just before, else `ts`.
    fn stamp(&mut self, conn: usize, uuid: &str, ts: u64, stop: bool) -> u64 {
        let Some(d) = self.daemon(conn).domains.get_mut(uuid) else {
            return ts;
        };
        let q = if stop {
            d.qemu_stop.take()
        } else {
            d.qemu_resume.take()
        };
        q.filter(|&q| q <= ts && ts - q <= QEMU_STAMP_WINDOW_NS)
            .unwrap_or(ts)
    }

    fn pause(&mut self, conn: usize, uuid: &str, ts: u64, ev: Lifecycle, out: &mut Vec<Event>) {
        let has_window = self.daemons[conn]
            .domains
            .get(uuid)
            .is_some_and(|d| d.window.is_some());
        if !has_window {
            let mut w = self.open(conn, uuid);
            // A switch-over without a migration-iteration before it (a daemon that sends none): the migration
            // starts here.
            let live = matches!(
                ev,
                Lifecycle::Suspended(Suspended::Migrated | Suspended::Postcopy)
            );
            if live {
                w.migrating = true;
                w.mode = Some(Mode::Live);
            }
            if let Some(d) = self.daemon(conn).domains.get_mut(uuid) {
                d.window = Some(w);
            }
            if live {
                out.push(self.setup(conn, uuid, Mode::Live, Role::Source, ts));
            }
        }
        let d = self.daemon(conn).domains.get_mut(uuid);
        if let Some(d) = d
            && let Some(w) = d.window.as_mut()
            && !w.stopped
        {
            w.stopped = true;
            out.push(event(ts, &w.id, d.mac, Role::Source, Phase::Pause));
        }
    }

    fn resume(&mut self, conn: usize, uuid: &str, ts: u64, how: Resumed, out: &mut Vec<Event>) {
        let Some(d) = self.daemon(conn).domains.get_mut(uuid) else {
            return;
        };
        let mac = d.mac;
        // The source runs again: a plain resume, or a migration that did not complete.
        if let Some(w) = d.window.take_if(|w| w.stopped) {
            if w.migrating && !w.completed {
                out.push(event(ts, &w.id, mac, Role::Source, Phase::Rollback));
            }
            out.push(event(ts, &w.id, mac, Role::Source, Phase::Resume));
            return;
        }
        let incoming = d.incoming.take();
        if incoming.is_none() && !matches!(how, Resumed::Migrated | Resumed::Postcopy) {
            return;
        }
        // A destination: the source's window if this monitor saw it, or one of its own (joined by MAC).
        let (host, ram_bytes, ips) = {
            let d = &self.daemons[conn];
            let dom = d.domains.get(uuid);
            (
                dom.and_then(|d| d.host.clone()).unwrap_or_else(|| d.host.clone()),
                dom.map_or(0, |d| d.ram_bytes),
                dom.map(|d| d.ips.clone()).unwrap_or_default(),
            )
        };
        if let Some(w) = self.source_window(conn, uuid) {
            w.resumed = true;
            let (id, mode) = (w.id.clone(), w.mode.unwrap_or(Mode::Quick));
            if w.completed {
                self.away.remove(uuid);
            }
            out.push(event(
                incoming.unwrap_or(ts),
                &id,
                mac,
                Role::Destination,
                Phase::Setup {
                    mode,
                    ram_bytes,
                    ips,
                    host,
                    carries_frames: false,
                },
            ));
            out.push(event(ts, &id, mac, Role::Destination, Phase::Resume));
        } else {
            self.incoming += 1;
            let name = self.daemons[conn]
                .domains
                .get(uuid)
                .map_or("?", |d| d.name.as_str());
            let id = format!("libvirt:{name}:in{}", self.incoming);
            out.push(event(ts, &id, mac, Role::Destination, Phase::Resume));
        }
    }

    /// The source side of a migration of `uuid` that a destination on daemon `conn` resumes: a paused migration on
    /// another daemon, or one whose source side has ended (a save, or a migration whose source stopped).
    fn source_window(&mut self, conn: usize, uuid: &str) -> Option<&mut Window> {
        if self.away.contains_key(uuid) {
            return self.away.get_mut(uuid).map(|a| &mut a.window);
        }
        self.daemons
            .iter_mut()
            .enumerate()
            .filter(|(c, _)| *c != conn)
            .find_map(|(_, d)| {
                d.domains
                    .get_mut(uuid)
                    .and_then(|d| d.window.as_mut())
                    .filter(|w| w.stopped && w.migrating)
            })
    }

    /// `migration-iteration` number `n` of a job on domain `uuid`, with the job's statistics if they could be read.
    /// The first opens (or joins) the migration: live if the domain runs, quick if it was paused first (a save).
    /// Iteration `n > 1` ends pre-copy round `n - 2`, counted from the statistics (from zero at the first).
    pub fn iteration(
        &mut self,
        conn: usize,
        ts: u64,
        uuid: &str,
        name: &str,
        n: u64,
        stats: Option<&JobFigures>,
    ) -> Vec<Event> {
        let mut out = Vec::new();
        self.domain(conn, uuid, name);
        let needs_window = self.daemons[conn]
            .domains
            .get(uuid)
            .is_some_and(|d| d.window.is_none());
        if needs_window {
            let w = self.open(conn, uuid);
            if let Some(d) = self.daemon(conn).domains.get_mut(uuid) {
                d.window = Some(w);
            }
        }
        let Some(w) = self
            .daemon(conn)
            .domains
            .get_mut(uuid)
            .and_then(|d| d.window.as_mut())
        else {
            return out;
        };
        if !w.migrating {
            w.migrating = true;
            let mode = if w.stopped { Mode::Quick } else { Mode::Live };
            w.mode = Some(mode);
            out.push(self.setup(conn, uuid, mode, Role::Source, ts));
        }
        let mac = self.daemons[conn].domains.get(uuid).and_then(|d| d.mac);
        // The counters start at zero: nothing is sent before the first pass, and statistics read after a pass may
        // already count the next one's bytes (a small save completes within milliseconds).
        if n > 1
            && let Some(s) = stats
            && let Some(w) = self
                .daemon(conn)
                .domains
                .get_mut(uuid)
                .and_then(|d| d.window.as_mut())
        {
            out.extend(round(w, mac, ts, s));
        }
        out
    }

    /// `job-completed` on domain `uuid`: for a save or an outgoing migration, the last round (what was sent since
    /// the last statistics) and the job's figures.
    pub fn job_completed(
        &mut self,
        conn: usize,
        ts: u64,
        uuid: &str,
        name: &str,
        f: &JobFigures,
    ) -> Vec<Event> {
        let mut out = Vec::new();
        if !matches!(f.operation, Some(operation::SAVE | operation::MIGRATION_OUT)) {
            return out;
        }
        self.domain(conn, uuid, name);
        if f.memory_total.is_some_and(|t| t > 0)
            && let Some(d) = self.daemon(conn).domains.get_mut(uuid)
            && d.ram_bytes == 0
        {
            d.ram_bytes = f.memory_total.unwrap_or(0);
        }
        let mac = self.daemons[conn].domains.get(uuid).and_then(|d| d.mac);
        let away_here = self.away.get(uuid).is_some_and(|a| a.conn == conn);
        let Some(w) = (match self
            .daemon(conn)
            .domains
            .get_mut(uuid)
            .and_then(|d| d.window.as_mut())
        {
            Some(w) => Some(w),
            None if away_here => self.away.get_mut(uuid).map(|a| &mut a.window),
            None => None,
        }) else {
            return out;
        };
        if !w.migrating || w.completed {
            return out;
        }
        // What was sent since the last statistics.
        out.extend(round(w, mac, ts, f));
        w.completed = true;
        out.push(event(
            ts,
            &w.id,
            mac,
            Role::Source,
            Phase::Complete {
                total_ms: f.time_elapsed_ms.unwrap_or(0) as f64,
                pause_ms: f.downtime_ms.unwrap_or(0) as f64,
                bytes: f.data_processed.or(f.memory_processed).unwrap_or(0),
            },
        ));
        if away_here && w.resumed {
            self.away.remove(uuid);
        }
        out
    }
}

/// Records a statistics sample's counters in `w`; returns (bytes, pages) since the previous one.
fn counters(w: &mut Window, s: &JobFigures) -> Option<(u64, u64)> {
    let processed = s.memory_processed?;
    let normal = s.memory_normal.unwrap_or(w.normal);
    let delta = (
        processed.saturating_sub(w.processed),
        normal.saturating_sub(w.normal),
    );
    w.processed = processed;
    w.normal = normal;
    Some(delta)
}

/// The pre-copy round that ended at `ts`, from a statistics sample.
fn round(w: &mut Window, mac: Option<MacAddr>, ts: u64, s: &JobFigures) -> Option<Event> {
    let (bytes, pages) = counters(w, s)?;
    // Statistics read at a pass's edge may show nothing sent yet: no round, the next one counts it.
    if bytes == 0 && pages == 0 {
        return None;
    }
    let n = w.rounds;
    w.rounds += 1;
    Some(event(
        ts,
        &w.id,
        mac,
        Role::Source,
        Phase::Round {
            n,
            pages,
            bytes,
            bandwidth: s.memory_bps.unwrap_or(0),
        },
    ))
}

fn event(ts: u64, id: &str, mac: Option<MacAddr>, role: Role, phase: Phase) -> Event {
    Event::Migration {
        ev: MigrationEvent {
            ts_ns: ts,
            migration_id: id.to_owned(),
            mac: mac.map(|m| m.to_string()).unwrap_or_default(),
            role,
            phase,
        },
        source: PauseSource::Libvirt,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const UUID: &str = "6b1c3e0a-8d55-4c9e-9a8b-0e1f2a3b4c5d";

    fn xml() -> DomainXml {
        super::super::domain::parse(
            "<domain><name>g1</name><uuid>6b1c3e0a-8d55-4c9e-9a8b-0e1f2a3b4c5d</uuid>\
             <memory unit='MiB'>64</memory><devices><interface type='bridge'>\
             <mac address='52:54:00:79:00:02'/><source bridge='br'/><target dev='vnet0'/></interface></devices></domain>",
        )
        .unwrap()
    }

    fn lc(event: i32, detail: i32) -> Lifecycle {
        Lifecycle::from_codes(event, detail)
    }

    fn phases(events: &[Event]) -> Vec<(String, Role, Phase, u64)> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Migration { ev, .. } => {
                    Some((ev.migration_id.clone(), ev.role, ev.phase.clone(), ev.ts_ns))
                }
                _ => None,
            })
            .collect()
    }

    fn stats(processed: u64, normal: u64) -> JobFigures {
        JobFigures {
            memory_processed: Some(processed),
            memory_normal: Some(normal),
            memory_bps: Some(118_523_833),
            ..JobFigures::default()
        }
    }

    /// The `job-completed` figures libvirt 9.0 sent for a save of a 64 MiB guest.
    fn completed(operation: i64) -> JobFigures {
        JobFigures::from_params([
            ("operation", i128::from(operation)),
            ("time_elapsed", 37),
            ("downtime", 29),
            ("data_processed", 692_263),
            ("memory_processed", 692_263),
            ("memory_normal", 133),
            ("memory_bps", 118_523_833),
            ("memory_total", 67_174_400),
            ("memory_iteration", 2),
        ])
    }

    fn translator(daemons: usize) -> Translator {
        let mut t = Translator::new();
        for c in 0..daemons {
            t.set_host(c, &format!("host{c}"));
            t.domain_xml(c, &xml());
        }
        t
    }

    #[test]
    fn suspend_and_resume_is_a_plain_pause_timed_by_qemu() {
        let mut t = translator(1);
        t.qemu_event(0, UUID, "g1", "STOP", 1000 * MS);
        let mut ev = t.lifecycle(0, 1013 * MS, UUID, "g1", lc(3, 0));
        t.qemu_event(0, UUID, "g1", "RESUME", 1039 * MS);
        ev.extend(t.lifecycle(0, 1041 * MS, UUID, "g1", lc(4, 0)));
        let p = phases(&ev);
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!(
            (&p[0].2, p[0].3),
            (&Phase::Pause, 1000 * MS),
            "QEMU's STOP times the pause"
        );
        assert_eq!((&p[1].2, p[1].3), (&Phase::Resume, 1039 * MS));
        assert_eq!(p[0].0, p[1].0);
        assert!(p.iter().all(|x| x.1 == Role::Source));
        let a = migmon_analysis::correlate::correlate(&ev);
        assert_eq!(a.migrations.len(), 1);
        assert_eq!(a.migrations[0].mode, None, "no migration: a plain pause");
        assert_eq!(a.migrations[0].downtime.vcpu_pause.as_ref().unwrap().ns, 39 * MS);
    }

    #[test]
    fn a_stale_qemu_stamp_is_not_used() {
        let mut t = translator(1);
        t.qemu_event(0, UUID, "g1", "STOP", 1000 * MS);
        let p = phases(&t.lifecycle(0, 4000 * MS, UUID, "g1", lc(3, 0)));
        assert_eq!(p[0].3, 4000 * MS);
    }

    /// `virsh save` then `virsh restore`, as libvirt 9.0 reports them: one quick migration through storage, paused
    /// from the save's STOP to the restore's RESUME.
    #[test]
    fn save_and_restore_is_one_quick_migration() {
        let mut t = translator(1);
        let mut ev = t.lifecycle(0, 1000 * MS, UUID, "g1", lc(3, 0));
        ev.extend(t.iteration(0, 1031 * MS, UUID, "g1", 1, None));
        ev.extend(t.iteration(0, 1032 * MS, UUID, "g1", 2, None));
        ev.extend(t.job_completed(0, 1032 * MS, UUID, "g1", &completed(operation::SAVE)));
        ev.extend(t.lifecycle(0, 2850 * MS, UUID, "g1", lc(5, 4)));
        ev.extend(t.lifecycle(0, 3844 * MS, UUID, "g1", lc(2, 2)));
        ev.extend(t.lifecycle(0, 3853 * MS, UUID, "g1", lc(4, 2)));
        let p = phases(&ev);
        let names: Vec<&Phase> = p.iter().map(|x| &x.2).collect();
        assert!(matches!(names[0], Phase::Pause), "{p:?}");
        assert!(
            matches!(
                names[1],
                Phase::Setup {
                    mode: Mode::Quick,
                    ram_bytes: 67_108_864,
                    ..
                }
            ),
            "{p:?}"
        );
        assert!(
            matches!(
                names[2],
                Phase::Round {
                    n: 0,
                    bytes: 692_263,
                    pages: 133,
                    ..
                }
            ),
            "{p:?}"
        );
        assert!(
            matches!(names[3], Phase::Complete { bytes: 692_263, .. }),
            "{p:?}"
        );
        assert!(matches!(names[5], Phase::Resume), "{p:?}");
        assert!(p.iter().all(|x| x.0 == "libvirt:g1:1"), "one id: {p:?}");
        let a = migmon_analysis::correlate::correlate(&ev);
        assert_eq!(a.migrations.len(), 1, "{:?}", a.migrations);
        let m = &a.migrations[0];
        assert_eq!(m.mode.as_deref(), Some("quick"));
        assert_eq!(m.downtime.vcpu_pause.as_ref().unwrap().ns, 2853 * MS);
        assert_eq!(m.outcome, "completed");
    }

    /// A live migration between two daemons this monitor follows, as libvirt 9.0 reports it on each side.
    #[test]
    fn a_live_migration_between_two_followed_daemons_is_one_migration() {
        let mut t = translator(2);
        // Destination: the incoming QEMU starts paused.
        let mut ev = t.lifecycle(1, 400 * MS, UUID, "g1", lc(2, 1));
        ev.extend(t.iteration(0, 423 * MS, UUID, "g1", 1, Some(&stats(1000, 0))));
        t.qemu_event(0, UUID, "g1", "STOP", 467 * MS);
        ev.extend(t.lifecycle(0, 475 * MS, UUID, "g1", lc(3, 1)));
        ev.extend(t.iteration(0, 483 * MS, UUID, "g1", 2, Some(&stats(600_000, 100))));
        t.qemu_event(1, UUID, "g1", "RESUME", 544 * MS);
        ev.extend(t.lifecycle(1, 547 * MS, UUID, "g1", lc(4, 1)));
        ev.extend(t.lifecycle(0, 2386 * MS, UUID, "g1", lc(5, 3)));
        ev.extend(t.job_completed(0, 2386 * MS, UUID, "g1", &completed(operation::MIGRATION_OUT)));
        let p = phases(&ev);
        assert!(p.iter().all(|x| x.0 == "libvirt:g1:1"), "one id: {p:?}");
        let a = migmon_analysis::correlate::correlate(&ev);
        assert_eq!(a.migrations.len(), 1, "{:?}", a.migrations);
        let m = &a.migrations[0];
        assert_eq!(m.mode.as_deref(), Some("live"));
        assert_eq!(
            m.downtime.vcpu_pause.as_ref().unwrap().ns,
            77 * MS,
            "QEMU's STOP to QEMU's RESUME"
        );
        let bytes: Vec<u64> = m.timeline.rounds.iter().map(|r| r.bytes).collect();
        assert_eq!(bytes, [600_000, 92_263], "pre-copy, then the paused tail");
        assert_eq!(
            (m.source_host.as_deref(), m.destination_host.as_deref()),
            (Some("host0"), Some("host1"))
        );
    }

    /// With a monitor per host, each sees one side; the correlation joins them by MAC.
    #[test]
    fn the_two_sides_seen_by_two_monitors_join_by_mac() {
        let (mut a, mut b) = (translator(1), translator(1));
        let mut ev = b.lifecycle(0, 400 * MS, UUID, "g1", lc(2, 1));
        ev.extend(a.iteration(0, 423 * MS, UUID, "g1", 1, None));
        ev.extend(a.lifecycle(0, 475 * MS, UUID, "g1", lc(3, 1)));
        ev.extend(b.lifecycle(0, 547 * MS, UUID, "g1", lc(4, 1)));
        ev.extend(a.lifecycle(0, 2386 * MS, UUID, "g1", lc(5, 3)));
        let p = phases(&ev);
        assert_eq!(p.iter().filter(|x| x.1 == Role::Destination).count(), 1, "{p:?}");
        let m = migmon_analysis::correlate::correlate(&ev);
        assert_eq!(m.migrations.len(), 1, "{:?}", m.migrations);
        assert_eq!(m.migrations[0].downtime.vcpu_pause.as_ref().unwrap().ns, 72 * MS);
    }

    #[test]
    fn a_migration_that_fails_after_the_pause_rolls_back_on_the_source() {
        let mut t = translator(1);
        let mut ev = t.iteration(0, 100 * MS, UUID, "g1", 1, None);
        ev.extend(t.lifecycle(0, 200 * MS, UUID, "g1", lc(3, 1)));
        ev.extend(t.lifecycle(0, 260 * MS, UUID, "g1", lc(4, 1)));
        let p = phases(&ev);
        let names: Vec<&Phase> = p.iter().map(|x| &x.2).collect();
        assert_eq!(
            names[1..],
            [&Phase::Pause, &Phase::Rollback, &Phase::Resume],
            "{p:?}"
        );
    }

    #[test]
    fn a_paused_domain_that_is_destroyed_ends_its_window_failed() {
        let mut t = translator(1);
        let mut ev = t.lifecycle(0, 100 * MS, UUID, "g1", lc(3, 0));
        ev.extend(t.lifecycle(0, 200 * MS, UUID, "g1", lc(5, 1)));
        let p = phases(&ev);
        assert!(
            matches!(&p[1].2, Phase::Failed { reason } if reason.contains("destroyed")),
            "{p:?}"
        );
        // A later pause is a window of its own.
        let p = phases(&t.lifecycle(0, 300 * MS, UUID, "g1", lc(3, 0)));
        assert_eq!(p[0].0, "libvirt:g1:2");
    }

    #[test]
    fn a_resume_missed_while_disconnected_closes_the_window_with_a_warning() {
        let mut t = translator(1);
        t.lifecycle(0, 100 * MS, UUID, "g1", lc(3, 0));
        let ev = t.reconnected(0, 900 * MS, &[UUID.to_owned()]);
        assert!(
            matches!(&ev[0], Event::Note { level, message, .. } if level == "warning" && message.contains("upper bound"))
        );
        assert_eq!(phases(&ev)[0].2, Phase::Resume);
        // Still paused: the window stays.
        t.lifecycle(0, 1000 * MS, UUID, "g1", lc(3, 0));
        assert!(t.reconnected(0, 1100 * MS, &[]).is_empty());
    }

    #[test]
    fn codes_outside_the_known_ones_are_kept_apart() {
        assert_eq!(lc(9, 0), Lifecycle::Other { event: 9, detail: 0 });
        assert_eq!(lc(3, 2), Lifecycle::Suspended(Suspended::Other(2)));
        assert_eq!(lc(4, 2), Lifecycle::Resumed(Resumed::FromSnapshot));
        let mut t = translator(1);
        assert!(t.lifecycle(0, 1, UUID, "g1", lc(9, 0)).is_empty());
        assert!(
            t.lifecycle(0, 2, UUID, "g1", lc(4, 0)).is_empty(),
            "a resume without a pause says nothing"
        );
        assert!(t.job_completed(0, 3, UUID, "g1", &completed(8)).is_empty());
    }
}
