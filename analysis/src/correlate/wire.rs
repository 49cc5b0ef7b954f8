//! Pause windows inferred from the data plane, when neither a migrator nor QMP says when the VM stopped.
//!
//! For a watched MAC, a move is: the MAC falls silent on every port for at least [`MIN_SILENCE_NS`], then shows up
//! on a port that was not part of its last burst of activity (a port it never used, or one it left more than
//! [`STALE_PORT_NS`] earlier). The inferred window runs from the last frame before the silence to the first frame at
//! the new port; it is emitted as a `pause` / `resume` pair with `source: "wire"`, so the report can say that the
//! figure is an inference, not a vCPU measurement.

use std::collections::HashMap;

use migevents::{MigrationEvent, Phase, Role};

use crate::trace::{Direction, Event, MacAddr, PauseSource};

/// The MAC must have been silent this long before a new port counts as a move.
pub const MIN_SILENCE_NS: u64 = 50_000_000;
/// A port whose last frame is this much older than the MAC's last frame anywhere is not part of the current path.
pub const STALE_PORT_NS: u64 = 1_000_000_000;

#[derive(Default)]
struct MacState {
    /// Last frame per port.
    ports: HashMap<String, u64>,
    /// Last frame anywhere, and where.
    last: Option<(u64, String)>,
}

/// Incremental inference: feed events in time order, get `migration` events (source `wire`) back.
#[derive(Default)]
pub struct WireInference {
    macs: HashMap<MacAddr, MacState>,
    /// The MAC and old port of each inferred move, by migration id.
    old_ports: HashMap<String, (MacAddr, String)>,
}

impl WireInference {
    pub fn new() -> Self {
        Self::default()
    }

    /// Observes one event. `covered(mac, ts)` says whether another source already has a window for that move.
    pub fn observe(&mut self, ev: &Event, covered: &dyn Fn(MacAddr, u64) -> bool) -> Vec<Event> {
        match ev {
            Event::MacStats {
                mac,
                port,
                direction: Direction::Ingress,
                last_ns,
                ..
            } if *last_ns > 0 => {
                let st = self.macs.entry(*mac).or_default();
                let label = port.to_string();
                let slot = st.ports.entry(label.clone()).or_insert(0);
                *slot = (*slot).max(*last_ns);
                if st.last.as_ref().is_none_or(|(t, _)| *last_ns > *t) {
                    st.last = Some((*last_ns, label));
                }
                Vec::new()
            }
            Event::MacSeen {
                ts_ns,
                mac,
                port,
                direction: Direction::Ingress,
                ..
            }
            | Event::Rarp {
                ts_ns,
                frame: crate::trace::ArpFrame { mac, port, .. },
            }
            | Event::Garp {
                ts_ns,
                frame: crate::trace::ArpFrame { mac, port, .. },
            }
            | Event::NeighborAdvert {
                ts_ns,
                frame: crate::trace::NeighborAdvertFrame { mac, port, .. },
            } => {
                let st = self.macs.entry(*mac).or_default();
                let label = port.to_string();
                let mut out = Vec::new();
                if let Some((last_ts, last_port)) = st.last.clone() {
                    let silence = ts_ns.saturating_sub(last_ts);
                    let port_last = st.ports.get(&label).copied();
                    let new_port = port_last.is_none_or(|p| p + STALE_PORT_NS < last_ts);
                    if silence >= MIN_SILENCE_NS && new_port && last_port != label && !covered(*mac, *ts_ns) {
                        // Named after the time of the first frame at the new port (ms of the monotonic clock), so
                        // that a move has the same name in any stretch of the trace that shows it.
                        let id = format!("wire:{mac}:{}", ts_ns / 1_000_000);
                        self.old_ports.insert(id.clone(), (*mac, last_port.clone()));
                        for (ts, role, phase) in [
                            (last_ts, Role::Source, Phase::Pause),
                            (*ts_ns, Role::Destination, Phase::Resume),
                        ] {
                            out.push(Event::Migration {
                                ev: MigrationEvent {
                                    ts_ns: ts,
                                    migration_id: id.clone(),
                                    mac: mac.to_string(),
                                    role,
                                    phase,
                                },
                                source: PauseSource::Wire,
                            });
                        }
                    }
                }
                st.ports.insert(label.clone(), *ts_ns);
                if st.last.as_ref().is_none_or(|(t, _)| *ts_ns >= *t) {
                    st.last = Some((*ts_ns, label));
                }
                out
            }
            _ => Vec::new(),
        }
    }
}

/// A move is confirmed only if the old port stays silent this long after the new port's first frame (a VM still
/// talking on its old port while one of its broadcasts shows up on a port it rarely uses has not moved).
pub const CONFIRM_NS: u64 = 1_000_000_000;

/// Infers moves from time-sorted events, looking ahead to confirm each one.
pub fn infer(sorted: &[&Event], covered: impl Fn(MacAddr, u64) -> bool) -> Vec<Event> {
    let mut w = WireInference::new();
    let mut candidates = Vec::new();
    for e in sorted {
        candidates.extend(w.observe(e, &covered));
    }
    // Ingress activity per (MAC, port): frame times from mac_seen and the last frame of each mac_stats sample.
    let mut activity: HashMap<(MacAddr, String), Vec<u64>> = HashMap::new();
    for e in sorted {
        match e {
            Event::MacSeen {
                ts_ns,
                mac,
                port,
                direction: Direction::Ingress,
                ..
            } => activity.entry((*mac, port.to_string())).or_default().push(*ts_ns),
            Event::MacStats {
                mac,
                port,
                direction: Direction::Ingress,
                last_ns,
                ..
            } => activity
                .entry((*mac, port.to_string()))
                .or_default()
                .push(*last_ns),
            _ => {}
        }
    }
    let mut out = Vec::new();
    for pair in candidates.chunks(2) {
        let [
            Event::Migration { ev: pause, .. },
            Event::Migration { ev: resume, .. },
        ] = pair
        else {
            continue;
        };
        let old_port = w.old_ports.get(&pause.migration_id);
        let still_there = old_port.is_some_and(|key| {
            activity.get(key).is_some_and(|ts| {
                ts.iter()
                    .any(|&t| t > resume.ts_ns && t <= resume.ts_ns + CONFIRM_NS)
            })
        });
        if !still_there {
            out.extend(pair.iter().cloned());
        }
    }
    out
}
