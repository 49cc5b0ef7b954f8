//! `./x demo`: live against quick migration, on the same guest and the same clients, side by side.
//!
//! The scenario itself lives in `testbed::scenario` (the privileged tests run a reduced copy of it); this task
//! builds the binaries, handles Ctrl-C, and prints what migmon found next to what the clients saw.

use std::{
    fmt::Write as _,
    io::IsTerminal as _,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use migmon_base::{Errno, units::parse_duration};
use testbed::{
    clients::{Profile, Verdict},
    scenario::{self, Config, MigrationOutcome, Ui},
};

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Client connections: half sequence-checked streams, half request/response.
    #[arg(long, default_value_t = 16, value_name = "N")]
    clients: usize,
    /// How long the quick migration holds the guest paused beyond the real move (migrator --extra-pause).
    #[arg(long, default_value = "8s", value_parser = parse_duration, value_name = "D")]
    quick_pause: Duration,
    /// The clients' TCP behaviour: windows-2003 (5 retransmissions from an 80 ms RTO), linux (kernel defaults) or
    /// user-timeout=D (`TCP_USER_TIMEOUT`).
    #[arg(long, default_value = "windows-2003", value_name = "PROFILE")]
    client_profile: Profile,
    /// Where the trace, the reports, the SVG timeline, the pcapng and the Perfetto trace go.
    #[arg(long, default_value = "demo-out", value_name = "DIR")]
    out: PathBuf,
    /// The guest's memory dirtier (SIZE@RATE per second), or "off".
    #[arg(long, default_value = "32M@125M", value_name = "SIZE@RATE")]
    dirty: String,
    /// Name prefix of the demo's testbed namespaces.
    #[arg(long, default_value = "mmdemo", value_name = "PREFIX")]
    prefix: String,
    /// Use the release binaries as they are (do not run cargo build first).
    #[arg(long)]
    no_build: bool,
    /// Also run one `migmon watch` per host (its tap and uplink only, its own migrator events), merge the two
    /// traces (`migmon report host-a.trace host-b.trace`) and compare the merge with the one monitor's report.
    #[arg(long)]
    pub monitor_per_host: bool,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: std::ffi::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT/SIGTERM set a flag the scenario polls, so it unwinds and takes the testbed down.
fn catch_signals() -> Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(SigHandler::Handler(on_signal), SaFlags::empty(), SigSet::empty());
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(sig, &action) }.context("cannot install the Ctrl-C handler")?;
    }
    Ok(())
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    )
}

pub fn run(args: &DemoArgs) -> Result<()> {
    crate::util::require_root("the demo (network namespaces, eBPF, KVM)")?;
    if std::fs::metadata("/dev/kvm").is_err() {
        bail!(
            "/dev/kvm is missing: the demo runs a real guest under KVM (load kvm_intel/kvm_amd, or kvm_pvm)"
        );
    }
    if args.clients == 0 || args.clients > 60 {
        bail!("--clients must be between 1 and 60 (the guest serves at most 64 connections)");
    }
    let t0 = Instant::now();
    if !args.no_build {
        crate::util::build_release().context("the release build failed")?;
    }
    let release = target_dir().join("release");
    let (migmon, migrator) = (release.join("migmon"), release.join("migrator"));
    for b in [&migmon, &migrator] {
        if !b.exists() {
            bail!("{} is missing: run `./x build`", b.display());
        }
    }
    catch_signals()?;
    let started = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let say = |msg: &str| {
        let t = started.elapsed().as_secs_f64();
        if tty {
            eprintln!("\x1b[1m[{t:6.1}s]\x1b[0m {msg}");
        } else {
            eprintln!("[{t:6.1}s] {msg}");
        }
    };
    let cfg = Config {
        prefix: args.prefix.clone(),
        clients: args.clients,
        quick_pause: args.quick_pause,
        profile: args.client_profile,
        more_profiles: Vec::new(),
        out: args.out.clone(),
        migmon,
        migrator,
        mem: "256M".into(),
        dirty: (args.dirty != "off").then(|| args.dirty.clone()),
        settle: Duration::from_secs(3),
        migmon_args: Vec::new(),
        monitor_per_host: args.monitor_per_host,
    };
    let ui = Ui {
        say: &say,
        interrupted: &INTERRUPTED,
    };
    let run = match scenario::run(&cfg, &ui) {
        Ok(r) => r,
        Err(scenario::ScenarioError::Interrupted) => bail!("interrupted; the testbed is down again"),
        Err(e) => {
            return Err(e).context(format!(
                "the demo failed (the testbed is down again; logs are in {})",
                args.out.display()
            ));
        }
    };
    println!("{}", summary(&run, args));
    println!(
        "./x demo took {:.0} s ({:.0} s for the scenario itself)",
        t0.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn client_line(m: &MigrationOutcome) -> String {
    let alive = m.clients.iter().filter(|c| c.verdict.is_alive()).count();
    let mut reasons = std::collections::BTreeMap::<String, usize>::new();
    for c in &m.clients {
        match &c.verdict {
            Verdict::Alive => {}
            Verdict::Aborted { errno: Some(e), .. } => {
                *reasons.entry(Errno(*e).to_string()).or_default() += 1;
            }
            other => *reasons.entry(other.to_string()).or_default() += 1,
        }
    }
    let gap = m.clients.iter().map(|c| c.max_gap).max().unwrap_or_default();
    let mut s = format!(
        "{:<6} {alive:>2}/{} alive, {:>2} aborted",
        m.mode,
        m.clients.len(),
        m.aborted()
    );
    if !reasons.is_empty() {
        let r: Vec<String> = reasons.iter().map(|(k, n)| format!("{n} {k}")).collect();
        let _ = write!(s, " ({})", r.join(", "));
    }
    let _ = write!(
        s,
        "; largest gap without progress {:.0} ms",
        gap.as_secs_f64() * 1e3
    );
    s
}

fn summary(run: &scenario::Run, args: &DemoArgs) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n══ migmon: live against quick migration, same guest ({} and {}), same {} client connections ══\n",
        run.guest_ip,
        run.guest_ip6,
        run.live.clients.len()
    );
    s.push_str(&run.compare);
    let _ = writeln!(s, "\nwhat the clients themselves saw (their sockets' errors):");
    for m in [&run.live, &run.quick] {
        let _ = writeln!(s, "  {}", client_line(m));
    }
    let a = &run.arithmetic;
    let quick = &run.quick.summary;
    let pause = quick["pause_ms"].as_f64().unwrap_or(f64::NAN) / 1e3;
    let extra = quick["extra_pause_ms"].as_f64().unwrap_or(f64::NAN) / 1e3;
    let _ = writeln!(s, "\nthe arithmetic:");
    let _ = writeln!(s, "  {a}");
    let _ = writeln!(
        s,
        "  live: the guest was paused {:.1} ms, far below the first retransmission at {:.0} ms: nothing to abort.",
        run.live.pause_ms(),
        a.retransmits.first().copied().unwrap_or_default().as_secs_f64() * 1e3
    );
    let verdict = if pause > a.abort_at.as_secs_f64() {
        format!(
            "it outlasts the abort at {:.2} s, so every connection with data in flight times out while the VM is \
             still paused",
            a.abort_at.as_secs_f64()
        )
    } else if pause > a.last_retransmit().as_secs_f64() {
        format!(
            "it outlasts the last retransmission at {:.2} s, so the connections abort at {:.2} s although the VM is \
             back",
            a.last_retransmit().as_secs_f64(),
            a.abort_at.as_secs_f64()
        )
    } else {
        let heal = a
            .first_retransmit_after(Duration::from_secs_f64(pause.max(0.0)))
            .unwrap_or_default();
        format!(
            "it is shorter than the last retransmission at {:.2} s, so a connection that was sending recovers at its \
             next retransmission, {:.2} s after its segment got stuck",
            a.last_retransmit().as_secs_f64(),
            heal.as_secs_f64()
        )
    };
    let _ = writeln!(
        s,
        "  quick: the guest was paused {pause:.2} s ({:.2} s of real suspend/copy/resume, {extra:.2} s held on purpose \
         by --extra-pause {}): {verdict}.",
        pause - extra,
        humantime(args.quick_pause)
    );
    if let Some(code) = run.watch_exit {
        let _ = writeln!(
            s,
            "  migmon watch --until-migrations 2 exited {code} ({}).",
            if code == 0 {
                "both migrations within the limits"
            } else {
                "a migration exceeded the limits: the CI gate would fail"
            }
        );
    }
    if let Some(merged) = &run.merged_report {
        s.push_str(&per_host_lines(&run.report, merged));
    }
    s.push_str(&files_lines(&run.outputs, args));
    s
}

/// The files the run wrote, one a line.
fn files_lines(o: &scenario::Outputs, args: &DemoArgs) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\nfiles in {}:", args.out.display());
    for (what, p) in [
        ("trace (migmon report/check/whatif/export read it)", &o.trace),
        ("side-by-side report", &o.compare_text),
        ("full text report", &o.report_text),
        ("JSON report", &o.report_json),
        ("SVG timeline", &o.svg),
        ("pcapng (Wireshark, tshark -r)", &o.pcapng),
        ("Perfetto trace (ui.perfetto.dev)", &o.perfetto),
        ("events and verdicts, JSON lines", &o.jsonl),
        ("migmon watch's own output", &o.watch_log),
    ]
    .into_iter()
    .chain(
        o.host_traces
            .iter()
            .map(|t| ("one host's trace (its monitor alone)", t)),
    )
    .chain(
        o.merged_text
            .iter()
            .map(|t| ("the hosts' traces merged: text report", t)),
    )
    .chain(
        o.merged_json
            .iter()
            .map(|t| ("the hosts' traces merged: JSON report", t)),
    ) {
        let name = p
            .file_name()
            .map_or_else(String::new, |f| f.to_string_lossy().into_owned());
        let _ = writeln!(s, "  {name:<26} {what}");
    }
    s
}

/// The merged report of the per-host monitors beside the one monitor's: the clock map, then per migration the
/// verdicts and the figures with the merge's bound.
fn per_host_lines(single: &serde_json::Value, merged: &serde_json::Value) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\none monitor per host, traces merged (migmon report host-a.trace host-b.trace):"
    );
    for h in merged["merge"]["hosts"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "  {:<8} {}: offset {:+.0} ns, drift {:+.2} ppm, ± {} ns ({}; {} frame pairs)",
            h["host"].as_str().unwrap_or("?"),
            h["method"].as_str().unwrap_or("?"),
            h["offset_ns"].as_f64().unwrap_or(f64::NAN),
            h["drift_ppm"].as_f64().unwrap_or(f64::NAN),
            h["bound_ns"],
            if h["reference"].as_bool() == Some(true) {
                "reference"
            } else {
                "aligned"
            },
            h["pairs_sent"].as_u64().unwrap_or(0)
                + h["pairs_received"].as_u64().unwrap_or(0)
                + h["pairs_unknown"].as_u64().unwrap_or(0)
        );
    }
    let ms = |v: &serde_json::Value| {
        v["ns"]
            .as_f64()
            .map_or("–".to_owned(), |n| format!("{:.3} ms", n / 1e6))
    };
    let empty = Vec::new();
    let singles = single["migrations"].as_array().unwrap_or(&empty);
    for m in merged["migrations"].as_array().into_iter().flatten() {
        let one = singles.iter().find(|x| x["id"] == m["id"]);
        let _ = writeln!(
            s,
            "  {} ({}): merged {} survived, {} aborted; one monitor {} survived, {} aborted",
            m["id"].as_str().unwrap_or("?"),
            m["mode"].as_str().unwrap_or("?"),
            m["survived"],
            m["aborted"],
            one.map_or(serde_json::Value::Null, |x| x["survived"].clone()),
            one.map_or(serde_json::Value::Null, |x| x["aborted"].clone())
        );
        for f in ["vcpu_pause", "blackout", "convergence"] {
            let (mf, sf) = (&m["downtime"][f], one.map(|x| &x["downtime"][f]));
            let _ = writeln!(
                s,
                "    {f:<12} merged {} ± {} ns, one monitor {}",
                ms(mf),
                mf["bound_ns"],
                sf.map_or("–".to_owned(), ms)
            );
        }
    }
    s
}

fn humantime(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}
