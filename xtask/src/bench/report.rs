//! The results of one bench run: rows of repeated measurements, their statistics, ratios to a baseline and to a
//! floor measured in the same run, and the markdown and JSON renderings.

use std::{collections::BTreeMap, fmt::Write as _};

use serde::Serialize;

/// Median, minimum and maximum of a set of measurements.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Stats {
    /// `None` for an empty set. NaN values are ignored.
    pub fn of(values: &[f64]) -> Option<Self> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            f64::midpoint(v[n / 2 - 1], v[n / 2])
        };
        Some(Self {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }
}

/// Which way is better, for reading ratios.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Better {
    Lower,
    Higher,
}

/// A row refers to another row by group and name.
pub type RowRef = (String, String);

/// One measured quantity, repeated.
#[derive(Clone, Debug)]
pub struct Row {
    pub group: String,
    pub name: String,
    pub unit: String,
    pub better: Better,
    pub values: Vec<f64>,
    /// Measured in the same run: the ratio median / baseline median is reported.
    pub baseline: Option<RowRef>,
    /// The physical floor measured in the same run: the ratio median / floor median is reported.
    pub floor: Option<RowRef>,
    /// The target from the issue, as text (e.g. "≤ 30 ns").
    pub target: Option<String>,
    /// Anything the reader must know (software KVM, throttled link, runs that did not converge, ...).
    pub notes: Vec<String>,
}

/// All rows of a run, in the order they were first recorded.
#[derive(Debug, Default)]
pub struct Results {
    rows: Vec<Row>,
    index: BTreeMap<RowRef, usize>,
}

impl Results {
    fn row_mut(&mut self, group: &str, name: &str, unit: &str, better: Better) -> &mut Row {
        let key = (group.to_owned(), name.to_owned());
        let i = if let Some(&i) = self.index.get(&key) {
            i
        } else {
            self.rows.push(Row {
                group: group.to_owned(),
                name: name.to_owned(),
                unit: unit.to_owned(),
                better,
                values: Vec::new(),
                baseline: None,
                floor: None,
                target: None,
                notes: Vec::new(),
            });
            self.index.insert(key, self.rows.len() - 1);
            self.rows.len() - 1
        };
        &mut self.rows[i]
    }

    /// Adds one measurement (creating the row on first use).
    pub fn push(&mut self, group: &str, name: &str, unit: &str, better: Better, value: f64) {
        self.row_mut(group, name, unit, better).values.push(value);
    }

    /// Declares a row without a value yet (so a scenario that produced nothing still shows up).
    pub fn declare(&mut self, group: &str, name: &str, unit: &str, better: Better) {
        self.row_mut(group, name, unit, better);
    }

    fn get_mut(&mut self, group: &str, name: &str) -> Option<&mut Row> {
        let i = *self.index.get(&(group.to_owned(), name.to_owned()))?;
        Some(&mut self.rows[i])
    }

    pub fn set_baseline(&mut self, group: &str, name: &str, base_group: &str, base_name: &str) {
        if let Some(r) = self.get_mut(group, name) {
            r.baseline = Some((base_group.to_owned(), base_name.to_owned()));
        }
    }

    pub fn set_floor(&mut self, group: &str, name: &str, floor_group: &str, floor_name: &str) {
        if let Some(r) = self.get_mut(group, name) {
            r.floor = Some((floor_group.to_owned(), floor_name.to_owned()));
        }
    }

    pub fn set_target(&mut self, group: &str, name: &str, target: &str) {
        if let Some(r) = self.get_mut(group, name) {
            r.target = Some(target.to_owned());
        }
    }

    pub fn note(&mut self, group: &str, name: &str, note: &str) {
        if let Some(r) = self.get_mut(group, name)
            && !r.notes.iter().any(|n| n == note)
        {
            r.notes.push(note.to_owned());
        }
    }

    pub fn get(&self, group: &str, name: &str) -> Option<&Row> {
        self.index
            .get(&(group.to_owned(), name.to_owned()))
            .map(|&i| &self.rows[i])
    }

    fn median_of(&self, r: &RowRef) -> Option<f64> {
        self.get(&r.0, &r.1)
            .and_then(|row| Stats::of(&row.values))
            .map(|s| s.median)
    }

    /// median / baseline median.
    pub fn baseline_ratio(&self, row: &Row) -> Option<f64> {
        ratio(
            Stats::of(&row.values)?.median,
            self.median_of(row.baseline.as_ref()?)?,
        )
    }

    /// median / floor median.
    pub fn floor_ratio(&self, row: &Row) -> Option<f64> {
        ratio(
            Stats::of(&row.values)?.median,
            self.median_of(row.floor.as_ref()?)?,
        )
    }

    /// Rows with no value at all: what `--quick` fails on.
    pub fn missing(&self) -> Vec<String> {
        self.rows
            .iter()
            .filter(|r| Stats::of(&r.values).is_none())
            .map(|r| format!("{} / {}", r.group, r.name))
            .collect()
    }
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (b != 0.0 && a.is_finite() && b.is_finite()).then(|| a / b)
}

/// A number with a sensible number of digits.
pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if v == 0.0 {
        "0".to_owned()
    } else if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn fmt_ratio(r: Option<f64>, name: &str) -> String {
    r.map_or_else(String::new, |r| format!("{r:.2}× {name}"))
}

/// The machine and the run, for the header of both outputs.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RunInfo {
    pub command: String,
    pub started_unix: u64,
    pub quick: bool,
    pub runs: usize,
    pub machine: crate::bench::machine::Machine,
}

/// Markdown: a header, then one table per group.
pub fn markdown(info: &RunInfo, results: &Results) -> String {
    let m = &info.machine;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "`{}`{}",
        info.command,
        if info.quick {
            " (smoke run: tiny sizes, 1 run; the numbers only show that each one is produced)"
        } else {
            ""
        }
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "Machine: {} ({} cores), kernel {}, {} MiB RAM; KVM: {}; QEMU: {}; load average at start {}, at end {}.",
        m.cpu_model, m.cores, m.kernel, m.mem_mib, m.kvm, m.qemu, m.load_start, m.load_end
    );
    let mut groups: Vec<&str> = Vec::new();
    for r in &results.rows {
        if !groups.contains(&r.group.as_str()) {
            groups.push(&r.group);
        }
    }
    for g in groups {
        let _ = writeln!(s);
        let _ = writeln!(s, "### {g}");
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "| metric | median | min | max | n | vs baseline | vs floor | target | notes |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---|---|---|---|");
        for r in results.rows.iter().filter(|r| r.group == g) {
            let (med, min, max, n) = Stats::of(&r.values).map_or_else(
                || ("—".to_owned(), "—".to_owned(), "—".to_owned(), 0),
                |st| (fmt_num(st.median), fmt_num(st.min), fmt_num(st.max), st.n),
            );
            let base = fmt_ratio(
                results.baseline_ratio(r),
                r.baseline.as_ref().map_or("", |b| b.1.as_str()),
            );
            let floor = fmt_ratio(results.floor_ratio(r), "floor");
            let _ = writeln!(
                s,
                "| {} ({}) | {med} | {min} | {max} | {n} | {base} | {floor} | {} | {} |",
                r.name,
                r.unit,
                r.target.as_deref().unwrap_or(""),
                r.notes.join("; ").replace('|', "/")
            );
        }
    }
    s
}

#[derive(Serialize)]
struct JsonRow<'a> {
    group: &'a str,
    name: &'a str,
    unit: &'a str,
    better: Better,
    #[serde(flatten)]
    stats: Option<Stats>,
    values: &'a [f64],
    baseline: Option<String>,
    vs_baseline: Option<f64>,
    vs_floor: Option<f64>,
    floor: Option<String>,
    target: Option<&'a str>,
    notes: &'a [String],
}

#[derive(Serialize)]
struct JsonReport<'a> {
    run: &'a RunInfo,
    rows: Vec<JsonRow<'a>>,
}

/// The JSON document: the run, then every row with its values and statistics.
pub fn json(info: &RunInfo, results: &Results) -> serde_json::Result<String> {
    let rows = results
        .rows
        .iter()
        .map(|r| JsonRow {
            group: &r.group,
            name: &r.name,
            unit: &r.unit,
            better: r.better,
            stats: Stats::of(&r.values),
            values: &r.values,
            baseline: r.baseline.as_ref().map(|b| format!("{} / {}", b.0, b.1)),
            vs_baseline: results.baseline_ratio(r),
            vs_floor: results.floor_ratio(r),
            floor: r.floor.as_ref().map(|b| format!("{} / {}", b.0, b.1)),
            target: r.target.as_deref(),
            notes: &r.notes,
        })
        .collect();
    serde_json::to_string_pretty(&JsonReport { run: info, rows })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_odd_even_empty_nan() {
        let s = Stats::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        let s = Stats::of(&[4.0, 1.0, 2.0, 3.0]).unwrap();
        assert!((s.median - 2.5).abs() < 1e-12);
        assert!(Stats::of(&[]).is_none());
        assert!(Stats::of(&[f64::NAN]).is_none());
        assert_eq!(Stats::of(&[f64::NAN, 5.0]).unwrap().n, 1);
    }

    #[test]
    fn ratios_refer_to_rows_of_the_same_run() {
        let mut r = Results::default();
        for v in [10.0, 12.0, 11.0] {
            r.push("mig", "ours", "ms", Better::Lower, v);
        }
        for v in [40.0, 44.0, 42.0] {
            r.push("mig", "qemu", "ms", Better::Lower, v);
        }
        r.push("floor", "copy", "ms", Better::Lower, 5.5);
        r.set_baseline("mig", "ours", "mig", "qemu");
        r.set_floor("mig", "ours", "floor", "copy");
        let row = r.get("mig", "ours").unwrap();
        assert!((r.baseline_ratio(row).unwrap() - 11.0 / 42.0).abs() < 1e-12);
        assert!((r.floor_ratio(row).unwrap() - 2.0).abs() < 1e-12);
        // A reference to a row that never got a value gives no ratio rather than a made-up one.
        r.declare("mig", "never", "ms", Better::Lower);
        r.set_baseline("mig", "qemu", "mig", "never");
        assert!(r.baseline_ratio(r.get("mig", "qemu").unwrap()).is_none());
        assert_eq!(r.missing(), vec!["mig / never".to_owned()]);
    }

    #[test]
    fn markdown_and_json_show_every_row() {
        let mut r = Results::default();
        r.push("g", "a", "ns", Better::Lower, 1.5);
        r.declare("g", "b", "ns", Better::Lower);
        r.note("g", "b", "did not run: reason");
        r.set_target("g", "a", "≤ 30 ns");
        let info = RunInfo::default();
        let md = markdown(&info, &r);
        assert!(md.contains("| a (ns) | 1.50 | 1.50 | 1.50 | 1 |"), "{md}");
        assert!(md.contains("| b (ns) | — |"), "{md}");
        assert!(md.contains("did not run: reason"));
        let j: serde_json::Value = serde_json::from_str(&json(&info, &r).unwrap()).unwrap();
        assert_eq!(j["rows"][0]["median"], 1.5);
        assert_eq!(j["rows"][0]["target"], "≤ 30 ns");
        assert!(j["rows"][1]["median"].is_null());
    }

    #[test]
    fn numbers_keep_useful_digits() {
        assert_eq!(fmt_num(0.0), "0");
        assert_eq!(fmt_num(12_345.6), "12346");
        assert_eq!(fmt_num(123.45), "123.5");
        assert_eq!(fmt_num(1.234), "1.23");
        assert_eq!(fmt_num(0.01234), "0.012");
    }
}
