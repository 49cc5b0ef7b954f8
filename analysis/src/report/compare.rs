//! The side-by-side view (`migmon report --format compare`): one column per migration, the figures that answer the
//! question in rows, then the abort arithmetic of the client's TCP settings. `./x demo` prints it for its live and
//! quick migrations.

use std::{collections::BTreeMap, fmt::Write as _};

use super::rel;
use crate::{
    correlate::{Analysis, Fate, MigrationReport, fmt_dur},
    whatif::{Outage, Prediction, Settings, predict},
};

fn fig(f: Option<&crate::correlate::Figure>) -> String {
    f.map_or_else(|| "–".to_owned(), |f| format!("{} [{}]", fmt_dur(f.ns), f.source))
}

fn rows(m: &MigrationReport) -> Vec<(&'static str, String)> {
    let tl = &m.timeline;
    let anchor = super::anchor_of(m);
    let announce = match (&tl.first_rarp, &tl.first_garp, &tl.first_na) {
        (Some(r), _, _) => format!("RARP {} at {}", rel(r.ts_ns, anchor), r.port),
        (None, Some(g), _) => format!("GARP {} at {}", rel(g.ts_ns, anchor), g.port),
        (None, None, Some(n)) => format!("NA {} at {}", rel(n.ts_ns, anchor), n.port),
        (None, None, None) => "not seen".to_owned(),
    };
    let fdb = if tl.fdb_moves.is_empty() {
        "no".to_owned()
    } else {
        let last = tl.fdb_moves.iter().map(|f| f.ts_ns).max().unwrap_or(anchor);
        format!("{} bridge(s), last {}", tl.fdb_moves.len(), rel(last, anchor))
    };
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for c in m.connections.iter().filter(|c| !c.opened_during_window) {
        if let Fate::Aborted { reason, .. } = c.fate {
            *reasons.entry(reason.to_string()).or_default() += 1;
        }
    }
    let reasons = if reasons.is_empty() {
        "–".to_owned()
    } else {
        reasons
            .iter()
            .map(|(r, n)| format!("{n} {r}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut tails: Vec<u64> = m.connections.iter().filter_map(|c| c.recovery_tail_ns).collect();
    tails.sort_unstable();
    let tails = match tails.last() {
        Some(max) => format!(
            "{} median, {} max",
            fmt_dur(tails[tails.len() / 2]),
            fmt_dur(*max)
        ),
        None => "–".to_owned(),
    };
    vec![
        ("mode", m.mode.clone().unwrap_or_else(|| "?".into())),
        ("outcome", m.outcome.clone()),
        ("vCPU pause", fig(m.downtime.vcpu_pause.as_ref())),
        ("network blackout", fig(m.downtime.blackout.as_ref())),
        ("convergence", fig(m.downtime.convergence.as_ref())),
        ("announce seen", announce),
        ("FDB moved", fdb),
        ("sessions survived", m.survived.to_string()),
        ("sessions aborted", m.aborted.to_string()),
        ("abort reasons", reasons),
        ("recovery tails", tails),
        ("retransmits", m.retransmits.to_string()),
    ]
}

fn outage(restore_ns: u64, s: &Settings, carried: bool) -> Outage {
    Outage {
        t0_ns: 0,
        restore_ns,
        base_rto_ns: s.rto_min_ns,
        carried,
    }
}

/// How long a connection that loses a segment keeps retransmitting before it aborts, under `s` (the segment sent
/// at 0, a base RTO of `rto_min`).
pub fn abort_after_ns(s: &Settings) -> u64 {
    match predict(&outage(u64::MAX, s, false), s, s.rto_min_ns) {
        Prediction::Aborts { at_ns, .. } => at_ns,
        _ => u64::MAX,
    }
}

/// The longest outage a connection survives under `s`: the time of its last retransmission before the abort.
pub fn longest_survivable_ns(s: &Settings) -> u64 {
    let Prediction::Aborts { retransmits, .. } = predict(&outage(u64::MAX, s, false), s, s.rto_min_ns) else {
        return u64::MAX;
    };
    // The k-th retransmission is the first that can get through an outage ending just before it.
    let mut lo = 0u64;
    let mut hi = abort_after_ns(s);
    while lo + 1_000_000 < hi {
        let mid = lo + (hi - lo) / 2;
        match predict(&outage(mid, s, false), s, s.rto_min_ns) {
            Prediction::Survives { retransmits: k, .. } if k <= retransmits => lo = mid,
            _ => hi = mid,
        }
    }
    lo
}

/// Renders the comparison; `settings` (the clients' TCP settings, when known) adds the abort arithmetic.
pub fn render(a: &Analysis, settings: Option<&Settings>) -> String {
    let mut s = String::new();
    for n in &a.in_progress {
        let _ = writeln!(s, "IN PROGRESS: {n}");
    }
    for w in &a.warnings {
        let _ = writeln!(s, "WARNING: {w}");
    }
    if a.migrations.is_empty() {
        s.push_str("no migration in this trace\n");
        return s;
    }
    let cols: Vec<Vec<(&str, String)>> = a.migrations.iter().map(rows).collect();
    let width = cols
        .iter()
        .flat_map(|c| c.iter().map(|(_, v)| v.chars().count()))
        .max()
        .unwrap_or(10)
        .clamp(12, 44);
    let _ = write!(s, "{:<20}", "");
    for m in &a.migrations {
        let _ = write!(s, "  {:<width$}", m.id);
    }
    s.push('\n');
    for (i, (label, _)) in cols[0].iter().enumerate() {
        let _ = write!(s, "{label:<20}");
        for c in &cols {
            let v: String = c[i].1.chars().take(width).collect();
            let _ = write!(s, "  {v:<width$}");
        }
        s.push('\n');
    }
    if let Some(st) = settings {
        let abort = abort_after_ns(st);
        let longest = longest_survivable_ns(st);
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "client TCP: {st}: a connection that loses a segment retransmits for the last time {} after the loss and \
             aborts with ETIMEDOUT at {}; where the hypervisor drops the frames sent during the pause (QEMU) an \
             outage longer than {} kills it, where it carries them to the guest at resume (our migrator) one that \
             ends before {} does not",
            fmt_dur(longest),
            fmt_dur(abort),
            fmt_dur(longest),
            fmt_dur(abort)
        );
        for m in &a.migrations {
            let (Some(p), Some(r)) = (&m.timeline.pause, &m.timeline.resume) else {
                continue;
            };
            // A segment sent as the VM stops: the network is back at resume (and the last FDB move).
            let restore = crate::whatif::restore_ns(m).saturating_sub(p.ts_ns);
            let verdict = match predict(&outage(restore, st, m.carries_frames), st, st.rto_min_ns) {
                Prediction::Aborts { .. } if m.carries_frames => format!(
                    "outage {} ≥ abort at {}: every connection sending during the pause aborts before resume, \
                     although the migrator carries the frames held during the pause",
                    fmt_dur(restore),
                    fmt_dur(abort)
                ),
                Prediction::Aborts { .. } => format!(
                    "outage {} > {}: every connection sending during the pause aborts",
                    fmt_dur(restore),
                    fmt_dur(longest)
                ),
                Prediction::Survives { at_ns, .. } => format!(
                    "outage {} ≤ {}: connections survive; one that lost a segment at the pause heals at its \
                     retransmission {} after the pause ({} after resume)",
                    fmt_dur(restore),
                    fmt_dur(longest),
                    fmt_dur(at_ns),
                    fmt_dur(at_ns.saturating_sub(r.ts_ns.saturating_sub(p.ts_ns)))
                ),
                Prediction::Delivered { .. } => format!(
                    "outage {} < abort at {}: connections survive: the migrator carried the retransmissions held \
                     during the pause to the guest at resume{}",
                    fmt_dur(restore),
                    fmt_dur(abort),
                    if restore > longest {
                        format!(
                            " (with frames dropped, as under QEMU, an outage over {} would kill them)",
                            fmt_dur(longest)
                        )
                    } else {
                        String::new()
                    }
                ),
                Prediction::Unaffected => continue,
            };
            let _ = writeln!(s, "  {}: {verdict}", m.id);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        correlate::correlate,
        fixtures::{live_trace, quick_trace},
    };

    #[test]
    fn side_by_side_with_arithmetic() {
        let mut ev = live_trace();
        ev.extend(quick_trace().into_iter().map(|mut e| {
            if let crate::trace::Event::Migration { ev, .. } = &mut e {
                ev.ts_ns += 100_000_000_000;
            }
            e
        }));
        let a = correlate(&ev);
        let st = Settings {
            tcp_retries2: 3,
            ..Settings::default()
        };
        // 3.0 s counted from the first RTO retransmission (0.2 s), at the next timer: 0.2·(2^5 − 1) = 6.2 s.
        assert_eq!(abort_after_ns(&st), 6_200_000_000);
        let out = render(&a, Some(&st));
        assert!(out.lines().next().unwrap().contains("live-1"), "{out}");
        assert!(out.contains("sessions aborted"), "{out}");
        // Its last retransmission goes out at 0.2·(2^4 − 1) = 3.0 s: a longer outage kills it.
        assert!(longest_survivable_ns(&st).abs_diff(3_000_000_000) <= 1_000_000);
        assert!(
            out.contains("live-1: outage 7.0 ms ≤ 3.00 s: connections survive"),
            "{out}"
        );
        assert!(
            out.contains("heals at its retransmission 200.0 ms after the pause (195.0 ms after resume)"),
            "{out}"
        );
        assert!(
            out.contains("quick-1: outage 8.00 s > 3.00 s: every connection sending during the pause aborts"),
            "{out}"
        );
    }

    /// The same 8 s quick pause under `tcp_retries2=4` (last retransmission 6.2 s, abort 12.6 s): QEMU-style dropped
    /// frames kill every connection, our migrator's carried frames save them, and the Setup event says which.
    #[test]
    fn carried_frames_change_the_verdict() {
        let st = Settings {
            tcp_retries2: 4,
            ..Settings::default()
        };
        let dropped = correlate(&quick_trace());
        assert!(!dropped.migrations[0].carries_frames);
        let out = render(&dropped, Some(&st));
        assert!(
            out.contains("quick-1: outage 8.00 s > 6.20 s: every connection sending during the pause aborts"),
            "{out}"
        );
        let carried: Vec<_> = quick_trace()
            .into_iter()
            .map(|mut e| {
                if let crate::trace::Event::Migration { ev, .. } = &mut e
                    && let migevents::Phase::Setup { carries_frames, .. } = &mut ev.phase
                {
                    *carries_frames = true;
                }
                e
            })
            .collect();
        let carried = correlate(&carried);
        assert!(carried.migrations[0].carries_frames);
        let out = render(&carried, Some(&st));
        assert!(
            out.contains(
                "quick-1: outage 8.00 s < abort at 12.60 s: connections survive: the migrator carried the \
                 retransmissions held during the pause to the guest at resume"
            ),
            "{out}"
        );
        // Under tcp_retries2=3 (abort 6.2 s) carrying is not enough.
        let st3 = Settings {
            tcp_retries2: 3,
            ..Settings::default()
        };
        assert!(
            render(&carried, Some(&st3)).contains("quick-1: outage 8.00 s ≥ abort at 6.20 s"),
            "{out}"
        );
    }
}
