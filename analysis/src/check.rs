//! `migmon check`: a CI gate on a correlated trace. Each limit becomes a named check per migration; the verdict is
//! the list of checks, with a `JUnit` rendering for CI systems.

use std::{io, path::Path};

use quick_junit::{NonSuccessKind, Report, TestCase, TestCaseStatus, TestSuite};
use serde::Serialize;

use crate::correlate::{Analysis, Fate, Figure, MigrationReport, fmt_dur};

/// The limits. `None` = not checked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Limits {
    pub max_aborted: Option<usize>,
    pub max_pause_ns: Option<u64>,
    pub max_blackout_ns: Option<u64>,
    pub max_convergence_ns: Option<u64>,
    /// Lost kernel events do not fail the check.
    pub allow_loss: bool,
    /// A damaged trace (skipped or corrupted lines, truncated, altered, lost events) and missing verdicts do not
    /// fail the check; they are still listed.
    pub allow_damaged: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_aborted: Some(0),
            max_pause_ns: None,
            max_blackout_ns: None,
            max_convergence_ns: None,
            allow_loss: false,
            allow_damaged: false,
        }
    }
}

/// One named check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CheckCase {
    pub name: String,
    pub migration: Option<String>,
    pub passed: bool,
    pub message: String,
}

/// The verdict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub cases: Vec<CheckCase>,
}

impl Verdict {
    pub fn passed(&self) -> bool {
        self.cases.iter().all(|c| c.passed)
    }

    pub fn violations(&self) -> impl Iterator<Item = &CheckCase> {
        self.cases.iter().filter(|c| !c.passed)
    }

    /// 0 when every check passed, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        i32::from(!self.passed())
    }

    /// One line per check.
    pub fn render_text(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        for c in &self.cases {
            let where_ = c
                .migration
                .as_deref()
                .map(|m| format!(" [{m}]"))
                .unwrap_or_default();
            let _ = writeln!(
                s,
                "{} {}{}: {}",
                if c.passed { "ok  " } else { "FAIL" },
                c.name,
                where_,
                c.message
            );
        }
        let n = self.violations().count();
        let _ = writeln!(
            s,
            "{}",
            if n == 0 {
                "check passed".to_owned()
            } else {
                format!("check FAILED: {n} violation(s)")
            }
        );
        s
    }

    /// The `JUnit` XML report: one test case per check, in one suite.
    pub fn junit(&self) -> Result<String, quick_junit::SerializeError> {
        let mut report = Report::new("migmon check");
        let mut suite = TestSuite::new("migmon check");
        for c in &self.cases {
            let status = if c.passed {
                TestCaseStatus::success()
            } else {
                let mut st = TestCaseStatus::non_success(NonSuccessKind::Failure);
                st.set_message(c.message.clone());
                st.set_type(if c.message.contains("--allow-damaged") {
                    "damaged trace"
                } else {
                    "limit exceeded"
                });
                st
            };
            let mut tc = TestCase::new(c.name.clone(), status);
            tc.set_classname(c.migration.clone().unwrap_or_else(|| "trace".to_owned()));
            if c.passed {
                tc.set_system_out(c.message.clone());
            }
            suite.add_test_case(tc);
        }
        report.add_test_suite(suite);
        report.to_string()
    }

    pub fn write_junit(&self, path: &Path) -> io::Result<()> {
        let xml = self.junit().map_err(io::Error::other)?;
        std::fs::write(path, xml)
    }
}

fn limit_case(name: &str, mig: &str, fig: Option<&Figure>, limit: u64) -> CheckCase {
    let (passed, message) = match fig {
        Some(f) if f.ns <= limit => (
            true,
            format!("{} ≤ {} ({})", fmt_dur(f.ns), fmt_dur(limit), f.source),
        ),
        Some(f) => (
            false,
            format!(
                "{} exceeds the limit of {} ({}: {})",
                fmt_dur(f.ns),
                fmt_dur(limit),
                f.source,
                f.basis
            ),
        ),
        None => (
            false,
            format!(
                "could not be measured, so the limit of {} cannot be verified",
                fmt_dur(limit)
            ),
        ),
    };
    CheckCase {
        name: name.to_owned(),
        migration: Some(mig.to_owned()),
        passed,
        message,
    }
}

/// A case that fails unless `--allow-damaged`.
fn damage_case(name: &str, migration: Option<&str>, what: &str, allowed: bool) -> CheckCase {
    CheckCase {
        name: name.to_owned(),
        migration: migration.map(str::to_owned),
        passed: allowed,
        message: if allowed {
            format!("{what} (allowed by --allow-damaged)")
        } else {
            format!("{what}: the verdict cannot be trusted (pass --allow-damaged to accept)")
        },
    }
}

/// The trace's own damage: skipped lines, a cut last line, no end record, lines that do not match it. Listed only
/// when there is some. A trace a running watch is still writing passes, said as such.
fn trace_cases(a: &Analysis, l: &Limits) -> Vec<CheckCase> {
    let mut cases = Vec::new();
    if !a.skipped_lines.is_empty() {
        let shown: Vec<String> = a
            .skipped_lines
            .iter()
            .take(5)
            .map(|(n, e)| format!("line {n}: {e}"))
            .collect();
        let more = a.skipped_lines.len().saturating_sub(shown.len());
        cases.push(damage_case(
            "corrupted lines",
            None,
            &format!(
                "{} line(s) skipped ({}{})",
                a.skipped_lines.len(),
                shown.join("; "),
                if more > 0 {
                    format!("; {more} more")
                } else {
                    String::new()
                }
            ),
            l.allow_damaged,
        ));
    }
    if a.truncated {
        cases.push(damage_case(
            "truncated trace",
            None,
            "the last line was cut",
            l.allow_damaged,
        ));
    }
    for n in &a.in_progress {
        cases.push(CheckCase {
            name: "trace in progress".to_owned(),
            migration: None,
            passed: true,
            message: n.clone(),
        });
    }
    for d in &a.damage {
        let name = if d.contains("no end record") {
            "truncated trace"
        } else {
            "damaged trace"
        };
        cases.push(damage_case(name, None, d, l.allow_damaged));
    }
    cases
}

fn tuple_text(t: &crate::trace::FourTuple) -> String {
    format!("{}:{} → {}:{}", t.saddr, t.sport, t.daddr, t.dport)
}

/// Missing verdicts of one migration: none at all, or connections alive at the pause left unresolved (both fail);
/// connections alive at the pause that involve no migrated VM are listed and pass. Listed only when there are some.
fn verdict_cases(m: &MigrationReport, l: &Limits) -> Vec<CheckCase> {
    let mut cases = Vec::new();
    if m.connections.is_empty() {
        let why = if m.timeline.pause.is_none() {
            "no pause seen, so no connection was judged"
        } else {
            "no connection was alive at the pause"
        };
        cases.push(damage_case(
            "migration without verdicts",
            Some(&m.id),
            &format!("{why}: nothing shows that clients survived"),
            l.allow_damaged,
        ));
    }
    let unresolved: Vec<String> = m
        .connections
        .iter()
        .filter(|c| !c.opened_during_window && c.fate == Fate::Unresolved)
        .map(|c| tuple_text(&c.tuple))
        .collect();
    if !unresolved.is_empty() {
        cases.push(damage_case(
            "connections without verdict",
            Some(&m.id),
            &format!(
                "connections alive at the pause without a verdict: {} unresolved when the trace ended: {}",
                unresolved.len(),
                unresolved.join("; ")
            ),
            l.allow_damaged,
        ));
    }
    // Connections of other hosts that the watch's filters let through (tracepoints see every namespace): no
    // migration was theirs to judge, so they are listed and do not fail the gate.
    if !m.unjudged.is_empty() {
        let unjudged: Vec<String> = m.unjudged.iter().map(tuple_text).collect();
        cases.push(CheckCase {
            name: "connections of no migrated VM".into(),
            migration: Some(m.id.clone()),
            passed: true,
            message: format!(
                "{} connection(s) alive at the pause match no migrated VM's address and were not judged \
                 (narrow the watch with --ip or --vm to leave them out): {}",
                unjudged.len(),
                unjudged.join("; ")
            ),
        });
    }
    cases
}

/// Evaluates the limits. Fails closed: a damaged trace, lost events and missing verdicts fail unless allowed.
pub fn evaluate(a: &Analysis, l: &Limits) -> Verdict {
    let mut cases = trace_cases(a, l);
    let loss_ok = a.lost_events == 0 || l.allow_loss || l.allow_damaged;
    cases.push(CheckCase {
        name: "no events lost".into(),
        migration: None,
        passed: loss_ok,
        message: if a.lost_events == 0 {
            "0 events lost".into()
        } else if loss_ok {
            format!(
                "{} events lost (allowed by {})",
                a.lost_events,
                if l.allow_loss {
                    "--allow-loss"
                } else {
                    "--allow-damaged"
                }
            )
        } else {
            format!(
                "{} events lost in the kernel: the verdict may be wrong (pass --allow-loss to accept)",
                a.lost_events
            )
        },
    });
    cases.push(CheckCase {
        name: "migrations found".into(),
        migration: None,
        passed: !a.migrations.is_empty(),
        message: format!("{} migration(s) in the trace", a.migrations.len()),
    });
    for m in &a.migrations {
        let ok = !(m.outcome.starts_with("failed") || m.outcome.starts_with("in progress"));
        cases.push(CheckCase {
            name: "migration completed".into(),
            migration: Some(m.id.clone()),
            passed: ok,
            message: m.outcome.clone(),
        });
        cases.extend(verdict_cases(m, l));
        if let Some(max) = l.max_aborted {
            let names: Vec<String> = m
                .connections
                .iter()
                .filter(|c| c.fate.is_aborted() && !c.opened_during_window)
                .map(|c| {
                    format!(
                        "{}:{} → {}:{} {}",
                        c.tuple.saddr, c.tuple.sport, c.tuple.daddr, c.tuple.dport, c.fate
                    )
                })
                .collect();
            cases.push(CheckCase {
                name: "aborted connections".into(),
                migration: Some(m.id.clone()),
                passed: m.aborted <= max,
                message: if m.aborted <= max {
                    format!("{} aborted ≤ {max} ({} survived)", m.aborted, m.survived)
                } else {
                    format!("{} aborted > {max}: {}", m.aborted, names.join("; "))
                },
            });
        }
        if let Some(max) = l.max_pause_ns {
            cases.push(limit_case(
                "vCPU pause",
                &m.id,
                m.downtime.vcpu_pause.as_ref(),
                max,
            ));
        }
        if let Some(max) = l.max_blackout_ns {
            cases.push(limit_case(
                "network blackout",
                &m.id,
                m.downtime.blackout.as_ref(),
                max,
            ));
        }
        if let Some(max) = l.max_convergence_ns {
            cases.push(limit_case(
                "convergence",
                &m.id,
                m.downtime.convergence.as_ref(),
                max,
            ));
        }
    }
    Verdict { cases }
}

/// Whether a migration has settled at `now`: every connection judged against it has a final fate (aborted, or
/// forward progress seen), or `settle` ns have passed since its resume. A migration not resumed has not settled.
pub fn settled(m: &MigrationReport, now: u64, settle: u64) -> bool {
    let Some(resume) = m.timeline.resume.as_ref().map(|r| r.ts_ns) else {
        return false;
    };
    if now >= resume.saturating_add(settle) {
        return true;
    }
    !m.connections.is_empty()
        && m.connections
            .iter()
            .all(|c| c.fate.is_aborted() || (c.fate == Fate::Survived && c.first_progress_ns.is_some()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        correlate::correlate,
        fixtures::{live_trace, quick_trace},
        trace::Event,
    };

    const MS: u64 = 1_000_000;

    #[test]
    fn live_passes_quick_fails_with_named_violations() {
        let live = correlate(&live_trace());
        let v = evaluate(&live, &Limits::default());
        assert!(v.passed(), "{}", v.render_text());
        assert_eq!(v.exit_code(), 0);

        let quick = correlate(&quick_trace());
        let v = evaluate(
            &quick,
            &Limits {
                max_pause_ns: Some(100 * MS),
                ..Limits::default()
            },
        );
        assert_eq!(v.exit_code(), 1);
        let names: Vec<&str> = v.violations().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["aborted connections", "vCPU pause"]);
        let text = v.render_text();
        assert!(text.contains("4 aborted > 0"), "{text}");
        assert!(text.contains("10.77.0.2:7 aborted: ETIMEDOUT"), "{text}");
        assert!(text.contains("8.00 s exceeds the limit of 100.0 ms"), "{text}");
    }

    #[test]
    fn limits_on_figures_and_unmeasurable_ones() {
        let live = correlate(&live_trace());
        let tight = Limits {
            max_blackout_ns: Some(9 * MS),
            max_convergence_ns: Some(10 * MS),
            ..Limits::default()
        };
        let v = evaluate(&live, &tight);
        let failed: Vec<&str> = v.violations().map(|c| c.name.as_str()).collect();
        assert_eq!(failed, ["network blackout"]); // 10 ms > 9 ms; convergence 2 ms passes
        // Without wire events the blackout cannot be measured: a limit on it fails rather than passing silently.
        let no_wire: Vec<Event> = live_trace()
            .into_iter()
            .filter(|e| !matches!(e, Event::MacStats { .. } | Event::MacSeen { .. }))
            .collect();
        let v = evaluate(&correlate(&no_wire), &tight);
        assert!(
            v.violations()
                .any(|c| c.message.contains("could not be measured"))
        );
    }

    #[test]
    fn losses_fail_unless_allowed() {
        let mut a = correlate(&live_trace());
        a.lost_events = 3;
        assert_eq!(evaluate(&a, &Limits::default()).exit_code(), 1);
        let allow = Limits {
            allow_loss: true,
            ..Limits::default()
        };
        assert_eq!(evaluate(&a, &allow).exit_code(), 0);
        assert_eq!(evaluate(&correlate(&[]), &Limits::default()).exit_code(), 1);
    }

    #[test]
    fn a_damaged_trace_fails_closed_with_each_problem_named() {
        let mut a = correlate(&live_trace());
        assert!(evaluate(&a, &Limits::default()).passed());
        a.skipped_lines = vec![(4, "expected value".into())];
        a.truncated = true;
        a.damage = vec!["the trace has no end record: ...".into()];
        a.lost_events = 2;
        let v = evaluate(&a, &Limits::default());
        let names: Vec<&str> = v.violations().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "corrupted lines",
                "truncated trace",
                "truncated trace",
                "no events lost"
            ]
        );
        let text = v.render_text();
        assert!(
            text.contains("1 line(s) skipped (line 4: expected value)"),
            "{text}"
        );
        assert!(text.contains("pass --allow-damaged"), "{text}");
        let xml = v.junit().unwrap();
        assert!(xml.contains("type=\"damaged trace\""), "{xml}");
        let lenient = Limits {
            allow_damaged: true,
            ..Limits::default()
        };
        let v = evaluate(&a, &lenient);
        assert!(v.passed(), "{}", v.render_text());
        assert!(v.render_text().contains("allowed by --allow-damaged"));
    }

    #[test]
    fn missing_verdicts_fail() {
        // No connection alive at the pause: no verdict says the clients survived.
        let mut a = correlate(&live_trace());
        a.migrations[0].connections.clear();
        let v = evaluate(&a, &Limits::default());
        assert_eq!(
            v.violations().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            ["migration without verdicts"]
        );
        // A connection left unresolved fails; one that involves no migrated VM is listed and passes.
        let mut a = correlate(&quick_trace());
        let t = a.migrations[0].connections[0].tuple;
        a.migrations[0].connections[0].fate = Fate::Unresolved;
        a.migrations[0].unjudged = vec![t];
        let v = evaluate(&a, &Limits::default());
        let c = v
            .violations()
            .find(|c| c.name == "connections without verdict")
            .unwrap();
        assert!(
            c.message.contains("1 unresolved when the trace ended"),
            "{}",
            c.message
        );
        let other = v
            .cases
            .iter()
            .find(|c| c.name == "connections of no migrated VM")
            .unwrap();
        assert!(other.passed, "{}", other.message);
        assert!(other.message.starts_with("1 connection(s)"), "{}", other.message);
    }

    #[test]
    fn junit_names_each_violation() {
        let v = evaluate(&correlate(&quick_trace()), &Limits::default());
        let xml = v.junit().unwrap();
        assert!(
            xml.contains("<testsuite name=\"migmon check\" tests=\"4\""),
            "{xml}"
        );
        assert!(xml.contains("failures=\"1\""), "{xml}");
        assert!(xml.contains("<failure message=\"4 aborted &gt; 0"), "{xml}");
    }

    #[test]
    fn settling_and_the_live_line() {
        let a = correlate(&quick_trace());
        let m = &a.migrations[0];
        let resume = m.timeline.resume.as_ref().unwrap().ts_ns;
        // Every connection is final (4 aborted, one with progress): settled at once.
        assert!(settled(m, resume, 5_000_000_000));
        let line = crate::report::live_line(m);
        assert!(line.contains("1 survived, 4 aborted"), "{line}");
        assert!(line.contains("10.77.0.2:7 ETIMEDOUT"), "{line}");
        assert!(line.contains("vCPU pause 8.00 s [migrator]"), "{line}");

        // The live migration's idle connection has no final sign: it settles after the settle time.
        let a = correlate(&live_trace());
        let m = &a.migrations[0];
        let resume = m.timeline.resume.as_ref().unwrap().ts_ns;
        assert!(!settled(m, resume + 1, 5_000_000_000));
        assert!(settled(m, resume + 5_000_000_000, 5_000_000_000));
    }
}
