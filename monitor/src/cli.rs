//! The offline subcommands: report, check, whatif, export.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use migmon_base::{
    UnitError,
    units::{Quantity, parse_duration},
};

use migmon_analysis::{
    check::{self, Limits},
    correlate::{self, Analysis},
    export, merge, report,
    trace::{self, Trace},
    whatif::{self, Settings},
};

/// Reads a duration with its unit (`250ms`, `8s`, `1.5s`, `500us`, `2m`; a bare number is refused) as nanoseconds.
pub fn duration_ns(s: &str) -> Result<u64, UnitError> {
    let d = parse_duration(s)?;
    u64::try_from(d.as_nanos()).map_err(|_| UnitError::TooLarge {
        input: s.to_owned(),
        quantity: Quantity::Duration,
    })
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
    Html,
    /// One column per migration, side by side, with the abort arithmetic of the client settings.
    Compare,
}

#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// The trace (from `migmon watch --record FILE`). Several traces, or directories of `*.trace` files, from the
    /// hosts of one migration are merged onto one timeline (docs/report.md, "Several hosts").
    #[arg(required = true, value_name = "TRACE")]
    pub trace: Vec<PathBuf>,
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
    /// Also write the SVG timeline to this file.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
    /// With --format compare: the clients' `tcp_retries2`, for the abort arithmetic.
    #[arg(long, value_name = "N")]
    pub tcp_retries2: Option<u32>,
    /// With --format compare: the clients' route `rto_min`.
    #[arg(long, value_parser = duration_ns, value_name = "D")]
    pub rto_min: Option<u64>,
    /// With --format compare: the clients' `TCP_USER_TIMEOUT`.
    #[arg(long, value_parser = duration_ns, value_name = "D")]
    pub user_timeout: Option<u64>,
    /// With --format compare: the clients are Windows (5 retransmissions).
    #[arg(long)]
    pub windows: bool,
    /// With --format compare: other TCP settings for some clients, `CLIENTS=SETTINGS` (repeatable; the first that
    /// matches a connection applies, the options above to the rest). CLIENTS: comma-separated client addresses
    /// (10.0.0.2), prefixes (10.0.0.0/24) or sockets (10.0.0.2:40000, `[fd00::2]:40000`). SETTINGS: comma-separated
    /// tcp-retries2=N, rto-min=D, user-timeout=D, windows, over Linux's defaults.
    #[arg(long, value_name = "CLIENTS=SETTINGS")]
    pub client_tcp: Vec<report::compare::ClientTcp>,
}

#[derive(clap::Args, Debug, Clone, Default)]
pub struct LimitArgs {
    /// Most aborted connections allowed per migration.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub max_aborted: usize,
    /// Longest vCPU pause allowed (e.g. 100ms).
    #[arg(long, value_parser = duration_ns, value_name = "D")]
    pub max_pause: Option<u64>,
    /// Longest network blackout allowed.
    #[arg(long, value_parser = duration_ns, value_name = "D")]
    pub max_blackout: Option<u64>,
    /// Longest convergence (resume → FDB move) allowed.
    #[arg(long, value_parser = duration_ns, value_name = "D")]
    pub max_convergence: Option<u64>,
    #[arg(
        long,
        value_name = "FILE",
        help = "Write a JUnit XML file with one test case per check"
    )]
    pub junit: Option<PathBuf>,
    /// Do not fail when the kernel lost events.
    #[arg(long)]
    pub allow_loss: bool,
    /// Do not fail on a damaged trace (skipped or corrupted lines, truncated, no end record, altered), lost events,
    /// or connections alive at a pause without a verdict; they are still listed.
    #[arg(long)]
    pub allow_damaged: bool,
}

impl LimitArgs {
    pub fn limits(&self) -> Limits {
        Limits {
            max_aborted: Some(self.max_aborted),
            max_pause_ns: self.max_pause,
            max_blackout_ns: self.max_blackout,
            max_convergence_ns: self.max_convergence,
            allow_loss: self.allow_loss,
            allow_damaged: self.allow_damaged,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// The trace (from `migmon watch --record FILE`). Several traces, or directories of `*.trace` files, from the
    /// hosts of one migration are merged onto one timeline (docs/report.md, "Several hosts").
    #[arg(required = true, value_name = "TRACE")]
    pub trace: Vec<PathBuf>,
    #[command(flatten)]
    pub limits: LimitArgs,
}

#[derive(clap::Args, Debug)]
pub struct WhatifArgs {
    /// The trace (from `migmon watch --record FILE`). Several traces, or directories of `*.trace` files, from the
    /// hosts of one migration are merged onto one timeline (docs/report.md, "Several hosts").
    #[arg(required = true, value_name = "TRACE")]
    pub trace: Vec<PathBuf>,
    /// `net.ipv4.tcp_retries2` to model.
    #[arg(long, value_name = "N")]
    pub tcp_retries2: Option<u32>,
    /// Route `rto_min` to model.
    #[arg(long, value_parser = duration_ns, value_name = "D")]
    pub rto_min: Option<u64>,
    /// `TCP_USER_TIMEOUT` to model.
    #[arg(long, value_parser = duration_ns, value_name = "D")]
    pub user_timeout: Option<u64>,
    /// Model a Windows client: 5 retransmissions doubling from the SRTT-based RTO.
    #[arg(long)]
    pub windows: bool,
    /// `tcp_retries2` that was in force when the trace was recorded.
    #[arg(long, default_value_t = 15, value_name = "N")]
    pub in_force_tcp_retries2: u32,
    /// Route `rto_min` in force when the trace was recorded.
    #[arg(long, value_parser = duration_ns, default_value = "200ms", value_name = "D")]
    pub in_force_rto_min: u64,
    /// `TCP_USER_TIMEOUT` in force when the trace was recorded.
    #[arg(long, value_parser = duration_ns, value_name = "D")]
    pub in_force_user_timeout: Option<u64>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("out").required(true).multiple(true)))]
pub struct ExportArgs {
    /// The trace (from `migmon watch --record FILE`). Several traces, or directories of `*.trace` files, from the
    /// hosts of one migration are merged onto one timeline (docs/report.md, "Several hosts").
    #[arg(required = true, value_name = "TRACE")]
    pub trace: Vec<PathBuf>,
    /// The events, time-sorted, then one verdict line per migration and connection.
    #[arg(long, value_name = "FILE", group = "out")]
    pub jsonl: Option<PathBuf>,
    /// ARP/GARP/RARP frames with their real bytes, and TCP events as annotated records.
    #[arg(long, value_name = "FILE", group = "out")]
    pub pcapng: Option<PathBuf>,
    /// A Perfetto trace: tracks for migration phases, connections and L2 events.
    #[arg(long, value_name = "FILE", group = "out")]
    pub perfetto: Option<PathBuf>,
}

/// Reads and correlates a trace; prints what was skipped.
pub fn load(path: &Path) -> Result<(Trace, Analysis)> {
    let t = trace::read_trace(path).with_context(|| format!("cannot read the trace {}", path.display()))?;
    let a = correlate::analyse(&t);
    Ok((t, a))
}

/// The trace files named: files as given, directories as their `*.trace` files (sorted by name).
pub fn trace_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("cannot list the directory {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "trace") && f.is_file())
                .collect();
            if found.is_empty() {
                bail!("{} holds no *.trace file", p.display());
            }
            found.sort();
            out.append(&mut found);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// Reads and correlates one trace, or merges several (from several hosts) onto the first one's clock.
pub fn load_all(paths: &[PathBuf]) -> Result<(Trace, Analysis)> {
    let files = trace_files(paths)?;
    if let [one] = files.as_slice() {
        return load(one);
    }
    let mut inputs = Vec::new();
    for f in &files {
        let t = trace::read_trace(f).with_context(|| format!("cannot read the trace {}", f.display()))?;
        inputs.push(merge::Input {
            name: f.display().to_string(),
            trace: t,
        });
    }
    let merged = merge::merge(&inputs).context("cannot merge the traces")?;
    let mut a = correlate::analyse(&merged.trace);
    a.annotate_merge(&merged.info);
    Ok((merged.trace, a))
}

fn title(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(" + ")
}

pub fn report(a: &ReportArgs) -> Result<i32> {
    let (_, an) = load_all(&a.trace)?;
    let out = match a.format {
        Format::Text => report::render_text(&an, &title(&a.trace)),
        Format::Json => report::render_json(&an),
        Format::Html => report::html::render(&an, &title(&a.trace)),
        Format::Compare => {
            let given = a.tcp_retries2.is_some()
                || a.rto_min.is_some()
                || a.user_timeout.is_some()
                || a.windows
                || !a.client_tcp.is_empty();
            let d = Settings::default();
            let tcp = report::compare::ClientSettings {
                default: Settings {
                    tcp_retries2: a.tcp_retries2.unwrap_or(d.tcp_retries2),
                    rto_min_ns: a.rto_min.unwrap_or(d.rto_min_ns),
                    user_timeout_ns: a.user_timeout,
                    windows: a.windows,
                },
                groups: a.client_tcp.clone(),
            };
            report::compare::render(&an, given.then_some(&tcp))
        }
    };
    print!("{out}");
    if let Some(svg) = &a.svg {
        std::fs::write(svg, report::svg::render(&an))
            .with_context(|| format!("cannot write the SVG to {}", svg.display()))?;
    }
    Ok(0)
}

/// Runs the check on an analysis, prints it (on stderr with `to_stderr`: `watch --json` owns stdout), writes the
/// `JUnit` file; returns the exit code.
pub fn run_check(an: &Analysis, limits: &LimitArgs, to_stderr: bool) -> Result<i32> {
    let verdict = check::evaluate(an, &limits.limits());
    if to_stderr {
        eprint!("{}", verdict.render_text());
    } else {
        print!("{}", verdict.render_text());
    }
    if let Some(j) = &limits.junit {
        verdict
            .write_junit(j)
            .with_context(|| format!("cannot write the JUnit file {}", j.display()))?;
    }
    Ok(verdict.exit_code())
}

pub fn check(a: &CheckArgs) -> Result<i32> {
    let (_, an) = load_all(&a.trace)?;
    run_check(&an, &a.limits, false)
}

pub fn whatif(a: &WhatifArgs) -> Result<i32> {
    let (_, an) = load_all(&a.trace)?;
    let in_force = Settings {
        tcp_retries2: a.in_force_tcp_retries2,
        rto_min_ns: a.in_force_rto_min,
        user_timeout_ns: a.in_force_user_timeout,
        windows: false,
    };
    let scenario = Settings {
        tcp_retries2: a.tcp_retries2.unwrap_or(in_force.tcp_retries2),
        rto_min_ns: a.rto_min.unwrap_or(in_force.rto_min_ns),
        user_timeout_ns: a.user_timeout.or(if a.tcp_retries2.is_some() {
            None
        } else {
            in_force.user_timeout_ns
        }),
        windows: a.windows,
    };
    let w = whatif::whatif(&an, &in_force, &scenario);
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&w).context("cannot encode the what-if report")?
        );
    } else {
        print!("{}", whatif::render_text(&w));
    }
    Ok(0)
}

pub fn export(a: &ExportArgs) -> Result<i32> {
    let (t, an) = load_all(&a.trace)?;
    if a.jsonl.is_none() && a.pcapng.is_none() && a.perfetto.is_none() {
        bail!("say what to export: --jsonl FILE, --pcapng FILE or --perfetto FILE");
    }
    if let Some(p) = &a.jsonl {
        export::jsonl::write(p, &t, &an).with_context(|| format!("cannot write {}", p.display()))?;
        eprintln!("wrote {}", p.display());
    }
    if let Some(p) = &a.pcapng {
        let n = export::pcapng::write(p, &t, &an).with_context(|| format!("cannot write {}", p.display()))?;
        eprintln!("wrote {} ({n} packets)", p.display());
    }
    if let Some(p) = &a.perfetto {
        export::perfetto::write(p, &t, &an).with_context(|| format!("cannot write {}", p.display()))?;
        eprintln!("wrote {}", p.display());
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use migmon_analysis::{
        fixtures::{live_trace, quick_trace},
        trace::{Event, TRACE_VERSION, TraceHeader, TraceWriter},
    };

    fn write_trace(dir: &Path, name: &str, events: &[Event]) -> PathBuf {
        let path = dir.join(name);
        let header = TraceHeader {
            kind: "trace_header".into(),
            version: TRACE_VERSION,
            migmon: "test".into(),
            start_mono_ns: 0,
            start_unix_ns: 1_790_000_000_000_000_000,
            hostname: "h".into(),
            command: vec![],
            ..TraceHeader::default()
        };
        let mut w = TraceWriter::create(&path, &header).unwrap();
        for e in events {
            w.write(e).unwrap();
        }
        w.finish(u64::MAX).unwrap();
        path
    }

    fn limits(junit: Option<PathBuf>) -> LimitArgs {
        LimitArgs {
            max_aborted: 0,
            max_pause: None,
            max_blackout: None,
            max_convergence: None,
            junit,
            allow_loss: false,
            allow_damaged: false,
        }
    }

    #[test]
    fn check_exit_codes_junit_and_truncated_traces() {
        let dir = std::env::temp_dir().join(format!("migmon-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let live = write_trace(&dir, "live.trace", &live_trace());
        let quick = write_trace(&dir, "quick.trace", &quick_trace());
        let junit = dir.join("junit.xml");
        let code = check(&CheckArgs {
            trace: vec![live.clone()],
            limits: limits(Some(junit.clone())),
        })
        .unwrap();
        assert_eq!(code, 0);
        assert!(
            std::fs::read_to_string(&junit)
                .unwrap()
                .contains("failures=\"0\"")
        );
        let code = check(&CheckArgs {
            trace: vec![quick.clone()],
            limits: limits(Some(junit.clone())),
        })
        .unwrap();
        assert_eq!(code, 1);
        assert!(std::fs::read_to_string(&junit).unwrap().contains("ETIMEDOUT"));
        // A missing trace is an input error (main turns it into exit 2).
        assert!(
            check(&CheckArgs {
                trace: vec![dir.join("missing.trace")],
                limits: limits(None),
            })
            .is_err()
        );

        // Cut the quick trace in the middle of a line: the report covers what is there and says so.
        let text = std::fs::read_to_string(&quick).unwrap();
        let cut = text.len() * 2 / 3;
        let cut = (cut..text.len())
            .find(|&i| text.is_char_boundary(i) && text.as_bytes()[i - 1] != b'\n')
            .unwrap();
        std::fs::write(&quick, &text[..cut]).unwrap();
        let (t, a) = load(&quick).unwrap();
        assert!(t.truncated);
        let out = report::render_text(&a, "q");
        assert!(out.contains("WARNING: the trace is truncated"), "{out}");
        assert!(out.contains("Migration quick-1"), "{out}");
        // The gate fails closed on it, naming the damage, and passes it only with --allow-damaged (the live trace
        // cut the same way).
        let text = std::fs::read_to_string(&live).unwrap();
        std::fs::write(&live, &text[..text.len() - 10]).unwrap();
        assert_eq!(
            check(&CheckArgs {
                trace: vec![live.clone()],
                limits: limits(None),
            })
            .unwrap(),
            1
        );
        let mut lenient = limits(None);
        lenient.allow_damaged = true;
        assert_eq!(
            check(&CheckArgs {
                trace: vec![live.clone()],
                limits: lenient,
            })
            .unwrap(),
            0
        );
        std::fs::write(&live, &text).unwrap();

        for (flag, path) in [
            ("jsonl", "e.jsonl"),
            ("pcapng", "e.pcapng"),
            ("perfetto", "e.pftrace"),
        ] {
            let p = dir.join(path);
            let args = ExportArgs {
                trace: vec![live.clone()],
                jsonl: (flag == "jsonl").then(|| p.clone()),
                pcapng: (flag == "pcapng").then(|| p.clone()),
                perfetto: (flag == "perfetto").then(|| p.clone()),
            };
            assert_eq!(export(&args).unwrap(), 0);
            assert!(std::fs::metadata(&p).unwrap().len() > 0);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn durations() {
        assert_eq!(duration_ns("250ms"), Ok(250_000_000));
        assert_eq!(duration_ns("1.5s"), Ok(1_500_000_000));
        assert_eq!(duration_ns("500us"), Ok(500_000));
        assert_eq!(duration_ns("1h"), Ok(3_600_000_000_000));
        assert!(duration_ns("8").is_err(), "a bare number is refused");
        assert!(duration_ns("fast").is_err());
    }
}
