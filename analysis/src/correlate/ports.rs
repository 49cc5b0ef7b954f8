//! Which ports were watched when: the `port_attached`, `port_detached` and `port_failed` events of a trace as one
//! span per port, and a warning on a migration whose VM appeared on a port that was not watched yet.

use serde::Serialize;

use super::MigrationReport;
use crate::trace::{Event, Port};

/// One port's watched span.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PortSpan {
    /// `iface@netns`.
    pub port: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// Why it was attached: `iface`, `bridge`, `libvirt`, ...
    pub origin: String,
    /// When the probes were attached.
    pub attached_ns: u64,
    /// From the kernel's notification that the port appeared to the probes attached (ports that came while
    /// watching).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attach_latency_ns: Option<u64>,
    /// When the probes left it (`None`: watched until the end of the trace).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detached_ns: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detach_reason: Option<String>,
}

/// A port that should have been watched and was not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PortFailure {
    pub port: String,
    pub ts_ns: u64,
    pub error: String,
}

/// The ports of a trace (sorted by time).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Ports {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub spans: Vec<PortSpan>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<PortFailure>,
}

impl Ports {
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty() && self.failed.is_empty()
    }

    /// The span covering `port` (`iface@netns`) at `ts`, if one does.
    pub fn watching(&self, port: &str, ts: u64) -> Option<&PortSpan> {
        self.spans
            .iter()
            .find(|s| s.port == port && s.attached_ns <= ts && s.detached_ns.is_none_or(|d| d >= ts))
    }
}

fn name(p: &Port) -> String {
    p.to_string()
}

/// Builds the spans from the port events of `sorted` (time order).
pub fn spans<'a>(sorted: impl IntoIterator<Item = &'a Event>) -> Ports {
    let mut out = Ports::default();
    for e in sorted {
        match e {
            Event::PortAttached {
                ts_ns,
                port,
                bridge,
                origin,
                notified_ns,
                ..
            } => out.spans.push(PortSpan {
                port: name(port),
                bridge: bridge.clone(),
                origin: origin.clone(),
                attached_ns: *ts_ns,
                attach_latency_ns: notified_ns.map(|n| ts_ns.saturating_sub(n)),
                detached_ns: None,
                detach_reason: None,
            }),
            Event::PortDetached {
                ts_ns, port, reason, ..
            } => {
                let n = name(port);
                if let Some(s) = out
                    .spans
                    .iter_mut()
                    .rev()
                    .find(|s| s.port == n && s.detached_ns.is_none())
                {
                    s.detached_ns = Some(*ts_ns);
                    s.detach_reason = Some(reason.clone());
                }
            }
            Event::PortFailed {
                ts_ns, port, error, ..
            } => out.failed.push(PortFailure {
                port: name(port),
                ts_ns: *ts_ns,
                error: error.clone(),
            }),
            _ => {}
        }
    }
    out
}

/// Warns on a migration whose VM first showed up on a port (its first frame, its first RARP) that was attached only
/// after it: the frames before are not in the trace. Traces without port events (older ones) get no warning.
pub fn check_migration(ports: &Ports, m: &mut MigrationReport) {
    if ports.is_empty() {
        return;
    }
    let sightings = [
        ("first frame", m.timeline.first_vm_frame_new_port.as_ref()),
        ("first RARP", m.timeline.first_rarp.as_ref()),
    ];
    let mut late = Vec::new();
    for (what, s) in sightings {
        let Some(s) = s else { continue };
        let attached = ports
            .spans
            .iter()
            .filter(|p| p.port == s.port && p.attached_ns <= s.ts_ns)
            .map(|p| p.attached_ns)
            .max();
        let resume = m.timeline.resume.as_ref().map(|r| r.ts_ns);
        if let (Some(a), Some(r)) = (attached, resume)
            && a > r
        {
            late.push(format!(
                "port {} was attached {} after the VM resumed (before its {what}): frames it sent there before \
                 are not in the trace",
                s.port,
                super::fmt_dur(a - r)
            ));
        }
    }
    late.dedup();
    m.warnings.extend(late);
    for f in &ports.failed {
        let window = m.timeline.pause.as_ref().map(|p| p.ts_ns);
        if window.is_some_and(|p| f.ts_ns <= p.saturating_add(60_000_000_000)) {
            m.warnings
                .push(format!("port {} was not watched: {}", f.port, f.error));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(iface: &str) -> Port {
        Port {
            ifindex: 3,
            iface: Some(iface.into()),
            netns: Some("hb".into()),
        }
    }

    #[test]
    fn spans_from_port_events() {
        let ev = [
            Event::PortAttached {
                ts_ns: 10,
                port: port("tap-a"),
                bridge: Some("br".into()),
                hooks: vec!["tc ingress".into()],
                origin: "bridge".into(),
                notified_ns: None,
            },
            Event::PortAttached {
                ts_ns: 500,
                port: port("tap-b"),
                bridge: Some("br".into()),
                hooks: vec![],
                origin: "bridge".into(),
                notified_ns: Some(480),
            },
            Event::PortDetached {
                ts_ns: 900,
                port: port("tap-a"),
                bridge: Some("br".into()),
                reason: "deleted".into(),
                notified_ns: Some(899),
            },
            Event::PortFailed {
                ts_ns: 950,
                port: port("tap-c"),
                bridge: None,
                error: "no".into(),
            },
        ];
        let p = spans(&ev);
        assert_eq!(p.spans.len(), 2);
        assert_eq!(p.spans[0].detached_ns, Some(900));
        assert_eq!(p.spans[0].detach_reason.as_deref(), Some("deleted"));
        assert_eq!(p.spans[1].attach_latency_ns, Some(20));
        assert_eq!(p.failed[0].port, "tap-c@hb");
        assert!(p.watching("tap-a@hb", 600).is_some());
        assert!(p.watching("tap-a@hb", 901).is_none());
        assert!(p.watching("tap-b@hb", 499).is_none());
    }
}
