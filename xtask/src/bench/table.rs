//! Markdown and JSON output: per-case medians, minima and maxima, then the comparisons against the same run's
//! baselines, the floors and the targets.

use std::{fmt::Write as _, time::Duration};

use serde_json::{Map, Value, json};

use super::{Samples, cases::WORKLOADS};

fn num(v: f64) -> String {
    if !v.is_finite() {
        "—".into()
    } else if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn median(results: &[Samples], case: &str, key: &str) -> Option<f64> {
    results
        .iter()
        .find(|s| s.case.id == case)
        .and_then(|s| s.stats(key))
        .map(|(m, _, _)| m)
}

/// A comparison row: what, the value, and the target or baseline it is read against.
struct Row {
    what: String,
    value: String,
    against: String,
    verdict: &'static str,
}

fn check(what: &str, v: Option<f64>, unit: &str, target: &str, ok: impl Fn(f64) -> bool) -> Row {
    Row {
        what: what.to_owned(),
        value: v.map_or("not measured".into(), |v| format!("{} {unit}", num(v))),
        against: target.to_owned(),
        verdict: match v {
            None => "—",
            Some(v) if ok(v) => "met",
            Some(_) => "MISSED",
        },
    }
}

fn ratio(what: &str, a: Option<f64>, b: Option<f64>, against: &str) -> Row {
    let value = match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{}×", num(a / b)),
        _ => "not measured".into(),
    };
    Row {
        what: what.to_owned(),
        value,
        against: against.to_owned(),
        verdict: "",
    }
}

fn growth(results: &[Samples], ids: &[&str], key: &str, label: &str, step: &str) -> Row {
    let vals: Vec<Option<f64>> = ids.iter().map(|id| median(results, id, key)).collect();
    let mut parts = Vec::new();
    for w in vals.windows(2) {
        parts.push(match (w[0], w[1]) {
            (Some(a), Some(b)) if a > 0.0 => format!("×{}", num(b / a)),
            _ => "—".into(),
        });
    }
    Row {
        what: format!("{label}: growth per step ({step})"),
        value: parts.join(", "),
        against: format!(
            "values {}",
            vals.iter()
                .map(|v| v.map_or("—".into(), num))
                .collect::<Vec<_>>()
                .join(" / ")
        ),
        verdict: "",
    }
}

fn rows(r: &[Samples]) -> Vec<Row> {
    let m = |c: &str, k: &str| median(r, c, k);
    let mut v = vec![
        check(
            "XDP non-ARP frame, above the empty program",
            m("xdp", "xdp_non_arp_over_empty_ns"),
            "ns",
            "≤ 30 ns",
            |x| x <= 30.0,
        ),
        check(
            "collector: highest storm rate with 0 loss",
            m("events", "events_max_zero_loss_per_s"),
            "events/s",
            "≥ 500000/s",
            |x| x >= 500_000.0,
        ),
        check(
            "TCP stream over veth, all probes vs none",
            m("tcp", "tcp_overhead_pct"),
            "% slower",
            "≤ 2 %",
            |x| x <= 2.0,
        ),
        check(
            "idle 256 MiB: total",
            m("migrate.idle.ours", "total_ms"),
            "ms",
            "≤ 150 ms",
            |x| x <= 150.0,
        ),
        check(
            "idle 256 MiB: pause (events)",
            m("migrate.idle.ours", "pause_events_ms"),
            "ms",
            "≤ 5 ms",
            |x| x <= 5.0,
        ),
        check(
            "idle: client max gap",
            m("migrate.idle.ours", "client_max_gap_ms"),
            "ms",
            "≤ 20 ms",
            |x| x <= 20.0,
        ),
        check(
            "idle: retransmits seen by the probes",
            m("migrate.idle.ours", "retransmits"),
            "",
            "0",
            |x| x == 0.0,
        ),
        check(
            "32 MiB @ 125 MiB/s: pause (events)",
            m("migrate.d32.ours", "pause_events_ms"),
            "ms",
            "≤ 30 ms (converged within budget)",
            |x| x <= 30.0,
        ),
        check(
            "32 MiB @ 125 MiB/s: total",
            m("migrate.d32.ours", "total_ms"),
            "ms",
            "≤ 600 ms",
            |x| x <= 600.0,
        ),
        check(
            "migmon peak RSS, 1024 connections",
            m("scale.conns.1024", "migmon_hwm_mib"),
            "MiB",
            "≤ 64 MiB",
            |x| x <= 64.0,
        ),
        check(
            "migrator beyond guest RAM, 1 GiB guest (source, peak)",
            m("scale.mem.1G", "src_overhead_mib"),
            "MiB",
            "≤ 32 MiB",
            |x| x <= 32.0,
        ),
        check(
            "migrator beyond guest RAM, 1 GiB guest (destination, peak)",
            m("scale.mem.1G", "dst_overhead_mib"),
            "MiB",
            "≤ 32 MiB",
            |x| x <= 32.0,
        ),
    ];
    for (id, title, _) in WORKLOADS {
        let ours = format!("migrate.{id}.ours");
        for q in ["qemu-default", "qemu-best"] {
            let qid = format!("migrate.{id}.{q}");
            for (k, label) in [("total_ms", "total"), ("pause_events_ms", "pause"), ("client_max_gap_ms", "client gap")] {
                v.push(ratio(
                    &format!("{title}: {q} {label} / migrator {label}"),
                    m(&qid, k),
                    m(&ours, k),
                    "QEMU ÷ ours, same run (> 1: ours is faster)",
                ));
            }
        }
        v.push(ratio(
            &format!("{title}: migrator pause / its floor"),
            m(&ours, "pause_events_ms"),
            m(&ours, "floor_bench_ms"),
            "floor = final bytes / min(memcpy, socket bandwidth) + state time",
        ));
    }
    v.push(growth(
        r,
        &["scale.mem.256M", "scale.mem.1G", "scale.mem.4G"],
        "total_ms",
        "total vs guest RAM",
        "×4 RAM per step",
    ));
    v.push(growth(
        r,
        &["scale.mem.256M", "scale.mem.1G", "scale.mem.4G"],
        "pause_events_ms",
        "pause vs guest RAM",
        "×4 RAM per step",
    ));
    v.push(growth(
        r,
        &["scale.mem.256M", "scale.mem.1G", "scale.mem.4G"],
        "src_overhead_mib",
        "source memory beyond guest RAM",
        "×4 RAM per step",
    ));
    for (k, label) in [
        ("migmon_cpu_ms", "migmon CPU"),
        ("migmon_events", "migmon events"),
        ("migmon_hwm_mib", "migmon peak RSS"),
    ] {
        v.push(growth(
            r,
            &["scale.conns.16", "scale.conns.256", "scale.conns.1024"],
            k,
            label,
            "×16 then ×4 connections",
        ));
    }
    v
}

pub fn markdown(results: &[Samples], before: &Value, after: &Value, quick: bool, took: Duration) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# migmon benchmarks{}\n",
        if quick { " (--quick smoke run: one run, small sizes; not figures)" } else { "" }
    );
    let _ = writeln!(
        s,
        "- machine: {} × {} cores, {} MiB RAM, kernel {}\n- KVM: {}\n- QEMU: {}\n- started {}, took {:.0} s; load average (1/5/15 min) before {}, after {}\n",
        before["cpu"].as_str().unwrap_or("?"),
        before["cores"],
        before["mem_mib"],
        before["kernel"].as_str().unwrap_or("?"),
        before["kvm"].as_str().unwrap_or("?"),
        before["qemu"].as_str().unwrap_or("?"),
        before["time"].as_str().unwrap_or("?"),
        took.as_secs_f64(),
        before["loadavg"],
        after["loadavg"],
    );
    let _ = writeln!(s, "## Against the targets, the floor and QEMU (medians)\n");
    let _ = writeln!(s, "| what | value | against | |\n|---|---|---|---|");
    for r in rows(results) {
        let _ = writeln!(s, "| {} | {} | {} | {} |", r.what, r.value, r.against, r.verdict);
    }
    let _ = writeln!(s, "\n## Every figure: median (min – max) over the runs\n");
    for smp in results {
        let _ = writeln!(
            s,
            "### {} — {} ({} of {} runs ok)\n",
            smp.case.id,
            smp.case.title,
            smp.runs.len(),
            smp.case.runs
        );
        for k in ["accel", "note", "not_measured"] {
            if let Some(t) = smp.text(k) {
                let _ = writeln!(s, "- {k}: {t}");
            }
        }
        for e in &smp.errors {
            let _ = writeln!(s, "- failed run: {}", e.replace('\n', " "));
        }
        let keys = smp.keys();
        if keys.is_empty() {
            let _ = writeln!(s);
            continue;
        }
        let _ = writeln!(s, "\n| figure | median | min | max |\n|---|---|---|---|");
        for k in keys {
            if let Some((med, lo, hi)) = smp.stats(&k) {
                let _ = writeln!(s, "| {k} | {} | {} | {} |", num(med), num(lo), num(hi));
            }
        }
        let _ = writeln!(s);
    }
    s
}

pub fn json(results: &[Samples], before: &Value, after: &Value, quick: bool) -> Value {
    let cases: Vec<Value> = results
        .iter()
        .map(|smp| {
            let mut stats = Map::new();
            for k in smp.keys() {
                if let Some((med, lo, hi)) = smp.stats(&k) {
                    stats.insert(k, json!({"median": med, "min": lo, "max": hi, "n": smp.values(&k).len()}));
                }
            }
            json!({
                "id": smp.case.id, "title": smp.case.title, "cmd": smp.case.cmd, "args": smp.case.args,
                "runs": smp.runs, "errors": smp.errors, "stats": stats,
            })
        })
        .collect();
    let comparisons: Vec<Value> = rows(results)
        .into_iter()
        .map(|r| json!({"what": r.what, "value": r.value, "against": r.against, "verdict": r.verdict}))
        .collect();
    json!({"quick": quick, "machine_before": before, "machine_after": after, "cases": cases,
           "comparisons": comparisons})
}
