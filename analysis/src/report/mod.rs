//! Reports of an [`Analysis`]: text for people at a terminal, JSON for programs, HTML (with the SVG timeline) for a
//! browser. The fields are described in `docs/report.md`.

use std::fmt::Write as _;

use crate::{
    correlate::{
        Analysis, Basis, ConnectionVerdict, Downtime, Fate, Figure, MigrationReport, Sighting, Stamp,
        Timeline, fmt_dur,
    },
    trace::{Event, TcpState, state_text},
};

pub mod compare;
pub mod html;
pub mod svg;

/// A time relative to an anchor, signed: `+5.0 ms`, `−2.0 ms`.
pub fn rel(ts: u64, anchor: u64) -> String {
    if ts >= anchor {
        format!("+{}", fmt_dur(ts - anchor))
    } else {
        format!("−{}", fmt_dur(anchor - ts))
    }
}

/// The JSON report.
pub fn render_json(a: &Analysis) -> String {
    serde_json::to_string_pretty(a).unwrap_or_default()
}

fn line(s: &mut String, label: &str, when: &str, rest: &str) {
    let _ = writeln!(s, "    {label:<24} {when:<12} {rest}");
}

fn stamp_line(s: &mut String, label: &str, st: Option<&Stamp>, anchor: u64) {
    if let Some(st) = st {
        line(s, label, &rel(st.ts_ns, anchor), &format!("[{}]", st.source));
    }
}

fn sight_line(s: &mut String, label: &str, si: Option<&Sighting>, anchor: u64, missing: &str) {
    match si {
        Some(si) => line(
            s,
            label,
            &format!("{}{}", if si.exact { "" } else { "≤" }, rel(si.ts_ns, anchor)),
            &format!("at {}", si.port),
        ),
        None => line(s, label, "–", missing),
    }
}

fn figure_line(s: &mut String, label: &str, f: Option<&Figure>, missing: &str) {
    match f {
        Some(f) => {
            let value = match f.bound_ns {
                Some(b) => format!("{} ± {}", fmt_dur(f.ns), fmt_dur(b)),
                None => fmt_dur(f.ns),
            };
            line(s, label, &value, &format!("[{}] {}", f.source, f.basis));
        }
        None => line(s, label, "–", missing),
    }
}

/// The anchor of a migration's times: its pause, or its first event.
pub fn anchor_of(m: &MigrationReport) -> u64 {
    m.timeline
        .pause
        .as_ref()
        .or(m.timeline.setup.as_ref())
        .or(m.timeline.resume.as_ref())
        .map_or(0, |s| s.ts_ns)
}

/// Short description of what proves an abort.
pub fn proof_summary(c: &ConnectionVerdict) -> String {
    c.proof
        .iter()
        .map(|e| match e {
            Event::TcpError { errno, .. } => format!("tcp_error errno {errno}"),
            Event::TcpState {
                old_state, new_state, ..
            } => format!("tcp_state {}→{}", state_text(*old_state), state_text(*new_state)),
            Event::TcpResetIn { .. } => "tcp_reset_in".to_owned(),
            Event::TcpResetOut { .. } => "tcp_reset_out".to_owned(),
            Event::TcpRetransmit { retransmits, .. } => format!("last tcp_retransmit (#{retransmits})"),
            other => other.kind().to_owned(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The text report: one block per migration, then a table of connections.
pub fn render_text(a: &Analysis, title: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "migmon report: {title}: {} events over {}, {} migration(s)",
        a.events,
        fmt_dur(a.end_ns.saturating_sub(a.start_ns)),
        a.migrations.len()
    );
    if let Some(m) = &a.merge {
        s.push_str(&crate::merge::render_text(m));
    }
    for n in &a.in_progress {
        let _ = writeln!(s, "IN PROGRESS: {n}");
    }
    for w in &a.warnings {
        let _ = writeln!(s, "WARNING: {w}");
    }
    for m in &a.migrations {
        let _ = writeln!(s);
        migration_heading(&mut s, m);
        downtime_lines(&mut s, &m.downtime);
        timeline_lines(&mut s, m);
        for w in &m.warnings {
            let _ = writeln!(s, "  WARNING: {w}");
        }
    }
    ports_lines(&mut s, a);
    connection_table(&mut s, a);
    s
}

/// Which ports were watched when (`port_*` events), relative to the trace's first event.
fn ports_lines(s: &mut String, a: &Analysis) {
    if a.ports.is_empty() {
        return;
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "Ports watched (times from the start of the trace)");
    for p in &a.ports.spans {
        let bridge = p.bridge.as_ref().map_or(String::new(), |b| format!("bridge {b}"));
        let mut from = format!("from {} [{}]", rel(p.attached_ns, a.start_ns), p.origin);
        if let Some(l) = p.attach_latency_ns {
            let _ = write!(from, ", {} after it appeared", fmt_dur(l));
        }
        let until = match (p.detached_ns, &p.detach_reason) {
            (Some(d), Some(r)) => format!("until {} ({r})", rel(d, a.start_ns)),
            (Some(d), None) => format!("until {}", rel(d, a.start_ns)),
            _ => "until the end".to_owned(),
        };
        let _ = writeln!(s, "  {:<28} {bridge:<16} {from}  {until}", p.port);
    }
    for f in &a.ports.failed {
        let _ = writeln!(
            s,
            "  {:<28} NOT WATCHED from {}: {}",
            f.port,
            rel(f.ts_ns, a.start_ns),
            f.error
        );
    }
}

/// A migration's heading and verdict.
fn migration_heading(s: &mut String, m: &MigrationReport) {
    let hosts = match (&m.source_host, &m.destination_host) {
        (Some(a), Some(b)) => format!("  {a} → {b}"),
        (Some(a), None) => format!("  from {a}"),
        (None, Some(b)) => format!("  to {b}"),
        (None, None) => String::new(),
    };
    let _ = writeln!(
        s,
        "Migration {}  VM {}{}  mode {}{}  {}  [pause window from {}]",
        m.id,
        m.mac.map_or_else(|| "?".to_owned(), |m| m.to_string()),
        if m.ips.is_empty() {
            String::new()
        } else {
            let ips: Vec<String> = m.ips.iter().map(ToString::to_string).collect();
            format!(" ({})", ips.join(", "))
        },
        m.mode.as_deref().unwrap_or("?"),
        hosts,
        m.outcome,
        m.source
    );
    let _ = writeln!(
        s,
        "  verdict: {} survived, {} aborted{}, {} retransmits",
        m.survived,
        m.aborted,
        if m.unresolved > 0 {
            format!(", {} unresolved", m.unresolved)
        } else {
            String::new()
        },
        m.retransmits
    );
}

/// The downtime split, one figure a line.
fn downtime_lines(s: &mut String, d: &Downtime) {
    let _ = writeln!(s, "  downtime");
    figure_line(s, "vCPU pause", d.vcpu_pause.as_ref(), "no pause/resume pair");
    figure_line(
        s,
        "network blackout",
        d.blackout.as_ref(),
        "needs the VM's frames on the wire",
    );
    figure_line(
        s,
        "convergence",
        d.convergence.as_ref(),
        "no FDB move or delivered frame after resume",
    );
    figure_line(
        s,
        "longest recovery tail",
        d.max_recovery_tail.as_ref(),
        "no connection needed to recover",
    );
    if d.vmm_reported_pause.is_some() {
        figure_line(
            s,
            "pause as the VMM reported it",
            d.vmm_reported_pause.as_ref(),
            "",
        );
    }
}

/// A migration's timeline, relative to its pause: up to the resume, then the network's side of the move.
fn timeline_lines(s: &mut String, m: &MigrationReport) {
    let anchor = anchor_of(m);
    let tl = &m.timeline;
    let _ = writeln!(s, "  timeline (relative to the pause)");
    stamp_line(s, "setup", tl.setup.as_ref(), anchor);
    if let (Some(first), Some(last)) = (tl.rounds.first(), tl.rounds.last()) {
        let bytes: u64 = tl.rounds.iter().fold(0u64, |sum, r| sum.saturating_add(r.bytes));
        line(
            s,
            "pre-copy rounds",
            &rel(first.ts_ns, anchor),
            &format!(
                "{} round(s), {:.1} MiB, last at {}",
                tl.rounds.len(),
                bytes as f64 / 1_048_576.0,
                rel(last.ts_ns, anchor)
            ),
        );
    }
    sight_line(
        s,
        "last VM frame (old port)",
        tl.last_vm_frame_old_port.as_ref(),
        anchor,
        "not seen",
    );
    if let Some(last) = &tl.last_frame_to_vm_old_port {
        sight_line(s, "last frame to VM (old)", Some(last), anchor, "");
    }
    stamp_line(s, "pause", tl.pause.as_ref(), anchor);
    stamp_line(s, "state sent", tl.state_sent.as_ref(), anchor);
    stamp_line(s, "resume", tl.resume.as_ref(), anchor);
    network_lines(s, tl, anchor);
    stamp_line(s, "complete", tl.complete.as_ref(), anchor);
}

/// Announces, FDB moves, the VM's first frames at its new port and the frames black-holed at its old one.
fn network_lines(s: &mut String, tl: &Timeline, anchor: u64) {
    if let Some(first) = tl.announces.first() {
        line(
            s,
            "announces (migrator)",
            &rel(first.ts_ns, anchor),
            &format!("{} sent [{}]", tl.announces.len(), first.source),
        );
    }
    sight_line(s, "first RARP", tl.first_rarp.as_ref(), anchor, "none seen");
    sight_line(s, "first GARP", tl.first_garp.as_ref(), anchor, "none seen");
    if tl.first_na.is_some() {
        sight_line(s, "first NA", tl.first_na.as_ref(), anchor, "none seen");
    }
    if tl.fdb_moves.is_empty() {
        line(s, "FDB move", "–", "no bridge re-learned the MAC");
    }
    for f in &tl.fdb_moves {
        line(
            s,
            &format!("FDB move {}", f.bridge),
            &rel(f.ts_ns, anchor),
            &format!("{} → {}", f.from_port.as_deref().unwrap_or("(new)"), f.to_port),
        );
    }
    sight_line(
        s,
        "first VM frame (new)",
        tl.first_vm_frame_new_port.as_ref(),
        anchor,
        "not seen",
    );
    sight_line(
        s,
        "first frame to VM (new)",
        tl.first_frame_to_vm_new_port.as_ref(),
        anchor,
        "not seen (needs TC egress on the new port)",
    );
    if tl.black_holed.is_empty() {
        line(
            s,
            "black-holed",
            "–",
            "no frame delivered to the old port after the pause",
        );
    }
    for b in &tl.black_holed {
        line(
            s,
            "black-holed",
            &rel(b.last_ns, anchor),
            &format!(
                "{} frame(s) delivered to {} after the pause, the last at this time",
                b.frames, b.port
            ),
        );
    }
}

/// Every migration's connections, one row each.
fn connection_table(s: &mut String, a: &Analysis) {
    let rows: Vec<(&MigrationReport, &ConnectionVerdict)> = a
        .migrations
        .iter()
        .flat_map(|m| m.connections.iter().map(move |c| (m, c)))
        .collect();
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "Connections (times relative to each migration's pause)");
    let idw = a
        .migrations
        .iter()
        .map(|m| m.id.chars().count())
        .max()
        .unwrap_or(0)
        .max(9);
    let _ = writeln!(
        s,
        "  {:<idw$} {:<46} {:<12} {:>4} {:>7} {:>11}  fate",
        "migration", "connection (client → VM)", "at pause", "rtx", "backoff", "recovery"
    );
    for (m, c) in rows {
        let anchor = anchor_of(m);
        let conn = format!(
            "{}:{} → {}:{}",
            c.tuple.saddr, c.tuple.sport, c.tuple.daddr, c.tuple.dport
        );
        let recovery = c.recovery_tail_ns.map_or_else(|| "–".to_owned(), fmt_dur);
        let _ = writeln!(
            s,
            "  {:<idw$} {:<46} {:<12} {:>4} {:>7} {:>11}  {}{}",
            m.id,
            conn,
            c.state_at_pause.map_or("unknown".into(), TcpState::name),
            c.retransmits,
            c.highest_backoff,
            recovery,
            fate_text(c, anchor),
            if c.opened_during_window {
                "  (opened during the outage; not counted)"
            } else {
                ""
            }
        );
    }
}

/// A connection's fate for the table: an abort with its time and proof, and the RST its peer sent afterwards.
fn fate_text(c: &ConnectionVerdict, anchor: u64) -> String {
    let mut fate = match c.fate {
        Fate::Aborted { at_ns, .. } => {
            format!("{} at {} ({})", c.fate, rel(at_ns, anchor), proof_summary(c))
        }
        _ => c.fate.to_string(),
    };
    if let Some(rst) = c
        .afterwards
        .iter()
        .find(|e| matches!(e, Event::TcpResetOut { .. }))
    {
        let _ = write!(
            fate,
            "; RST sent to the VM at {} (it spoke on the dead connection)",
            rel(rst.ts_ns(), anchor)
        );
    }
    match (c.basis, c.wire_agrees, &c.wire) {
        (Basis::Wire, _, _) => fate.push_str(" [wire]"),
        (Basis::Sockets, Some(true), _) => fate.push_str(" [sockets; the wire agrees]"),
        (Basis::Sockets, Some(false), Some(w)) => {
            let _ = write!(fate, " [sockets; THE WIRE DISAGREES: {}: {}]", w.fate, w.basis);
        }
        _ => {}
    }
    fate
}

/// The one-line summary `migmon watch` prints when a migration settles.
pub fn live_line(m: &MigrationReport) -> String {
    let fig = |f: &Option<Figure>| {
        f.as_ref()
            .map_or_else(|| "–".to_owned(), |f| format!("{} [{}]", fmt_dur(f.ns), f.source))
    };
    let mut reasons: Vec<String> = Vec::new();
    for c in &m.connections {
        if let Fate::Aborted { reason, .. } = c.fate {
            reasons.push(format!("{}:{} {reason}", c.tuple.daddr, c.tuple.dport));
        }
    }
    format!(
        "migmon: migration {} ({}) {}: vCPU pause {}, blackout {}, convergence {}; {} survived, {} aborted{}",
        m.id,
        m.mode.as_deref().unwrap_or("?"),
        m.outcome,
        fig(&m.downtime.vcpu_pause),
        fig(&m.downtime.blackout),
        fig(&m.downtime.convergence),
        m.survived,
        m.aborted,
        if reasons.is_empty() {
            String::new()
        } else {
            format!(" ({})", reasons.join(", "))
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        correlate::correlate,
        fixtures::{live_trace, quick_trace},
    };

    #[test]
    fn text_report_reads_at_a_glance() {
        let a = correlate(&live_trace());
        let text = render_text(&a, "t.trace");
        assert!(
            text.contains("Migration live-1  VM 52:54:00:12:34:56 (10.77.0.2)  mode live"),
            "{text}"
        );
        assert!(text.contains("verdict: 2 survived, 0 aborted"), "{text}");
        assert!(text.contains("vCPU pause               5.0 ms"), "{text}");
        assert!(text.contains("FDB move brS"), "{text}");
        assert!(
            text.contains("3 frame(s) delivered to tapA after the pause"),
            "{text}"
        );
        assert!(text.contains("10.77.0.100:40001 → 10.77.0.2:7"), "{text}");

        let q = correlate(&quick_trace());
        let text = render_text(&q, "q.trace");
        assert!(
            text.contains("aborted: ETIMEDOUT at +6.20 s (tcp_state ESTABLISHED→CLOSE, tcp_error errno 110)"),
            "{text}"
        );
        let page = html::render(&q, "q <trace>");
        assert!(
            page.starts_with("<!DOCTYPE html>") && page.contains("<svg") && page.contains("q &lt;trace&gt;")
        );
        let json: serde_json::Value = serde_json::from_str(&render_json(&q)).unwrap();
        assert_eq!(json["migrations"][0]["aborted"], 4);
        assert_eq!(json["migrations"][0]["connections"][0]["fate"], "aborted");
        assert_eq!(json["migrations"][0]["connections"][0]["reason"], "etimedout");
    }
}
