//! QEMU on the same guest ELF (its PVH entry), the same testbed and clients: `-M microvm`, two processes, the
//! destination with `-incoming defer`, migration driven through QMP.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use integration_tests::wait_until;
use serde_json::{Value, json};

use crate::{
    bed::{Bed, MAC, Proc, RetransmitCounter, all_progress},
    migrate::{clients, finish_clients, memcpy_bw, socket_bw},
    say,
};

/// The guest ELF the migrator's build script left under target/release/build (the newest one).
fn guest_elf() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("own path")?;
    let build = exe
        .parent()
        .and_then(|d| d.parent())
        .context("target/<profile>")?
        .join("build");
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for e in std::fs::read_dir(&build).with_context(|| format!("cannot list {}", build.display()))? {
        let e = e?;
        if !e.file_name().to_string_lossy().starts_with("migrator-") {
            continue;
        }
        let p = e.path().join("out/guest.elf");
        if let Ok(m) = std::fs::metadata(&p).and_then(|m| m.modified())
            && best.as_ref().is_none_or(|(t, _)| m > *t)
        {
            best = Some((m, p));
        }
    }
    best.map(|(_, p)| p)
        .context("no guest.elf under target/release/build/migrator-*/out: cargo build --release -p migrator")
}

/// A QMP connection: commands in order, events kept with their wall-clock stamps.
struct Qmp {
    w: UnixStream,
    r: BufReader<UnixStream>,
    events: Vec<Value>,
}

impl Qmp {
    fn connect(path: &Path) -> Result<Self> {
        let s = UnixStream::connect(path).with_context(|| format!("cannot connect to QMP {}", path.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut q = Self {
            w: s.try_clone()?,
            r: BufReader::new(s),
            events: Vec::new(),
        };
        q.read_line()?; // greeting
        q.cmd("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read_line(&mut self) -> Result<Value> {
        let mut line = String::new();
        if self.r.read_line(&mut line).context("QMP read")? == 0 {
            bail!("QMP closed");
        }
        serde_json::from_str(&line).with_context(|| format!("QMP sent {line:?}"))
    }

    fn cmd(&mut self, execute: &str, arguments: Value) -> Result<Value> {
        let msg = json!({"execute": execute, "arguments": arguments});
        writeln!(self.w, "{msg}").context("QMP write")?;
        loop {
            let v = self.read_line()?;
            if v.get("event").is_some() {
                self.events.push(v);
            } else if let Some(e) = v.get("error") {
                bail!("QMP {execute}: {e}");
            } else if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
        }
    }

    /// Wall-clock µs of the first event `name`.
    fn event_us(&self, name: &str) -> Option<u64> {
        self.events.iter().find(|e| e["event"] == name).and_then(|e| {
            Some(e["timestamp"]["seconds"].as_u64()? * 1_000_000 + e["timestamp"]["microseconds"].as_u64()?)
        })
    }
}

fn boot(bed: &Bed, elf: &Path, accel: &str, mem: &str, dirty: &str, tap: &str, name: &str, incoming: bool) -> Result<Proc> {
    let mut append = format!("ip={}/24 mac={MAC}", bed.guest_ip);
    if !dirty.is_empty() {
        append.push_str(&format!(" dirty={dirty}"));
    }
    let mut args: Vec<String> = [
        "-M", "microvm,ioapic2=off", "-accel", accel, "-m", mem, "-smp", "1", "-nodefaults", "-no-user-config",
        "-display", "none", "-no-reboot",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.extend([
        "-serial".into(),
        format!("file:{}", bed.path(&format!("{name}.serial")).display()),
        "-kernel".into(),
        elf.display().to_string(),
        "-append".into(),
        append,
        "-netdev".into(),
        format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
        "-device".into(),
        format!("virtio-net-device,netdev=n0,mac={MAC}"),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", bed.path(&format!("{name}.qmp")).display()),
    ]);
    if incoming {
        args.extend(["-incoming".into(), "defer".into()]);
    }
    bed.spawn(Path::new("qemu-system-x86_64"), &args, &format!("{name}.log"))
}

/// One QEMU live migration with the clients and probes of ours.
pub fn run(args: &crate::Args) -> Result<Value> {
    let mem = args.str("mem", "256M");
    let dirty = args.str("dirty", "");
    let downtime_ms: u64 = args
        .str("downtime", "30ms")
        .trim_end_matches("ms")
        .parse()
        .context("downtime=Nms")?;
    let max_bw = args.u64("max_bw", 0)?;
    let nclients = args.u64("clients", 16)?;
    let boot_timeout = args.secs("boot_timeout", 30.0)?;
    let converge_timeout = args.secs("timeout", 30.0)?;
    if std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        return Ok(json!({"not_measured": "qemu-system-x86_64 is not installed (./x setup installs qemu-system-x86)"}));
    }
    let elf = guest_elf()?;
    let memcpy = memcpy_bw(64 << 20);
    let socket = socket_bw(256 << 20)?;
    let bed = Bed::new()?;
    // KVM first, TCG if QEMU cannot run the guest on this machine's KVM.
    let mut why_not_kvm = String::new();
    let mut src = None;
    for accel in ["kvm", "tcg"] {
        if accel == "kvm" && std::fs::metadata("/dev/kvm").is_err() {
            why_not_kvm = "/dev/kvm is missing".into();
            continue;
        }
        let mut p = boot(&bed, &elf, accel, &mem, &dirty, &bed.tap_a, "a", false)?;
        match bed.wait_guest(&mut p, boot_timeout) {
            Ok(()) => {
                src = Some((accel, p));
                break;
            }
            Err(e) => {
                if accel == "kvm" {
                    why_not_kvm = format!("{e:#}").lines().next().unwrap_or_default().to_owned();
                }
                say!("qemu: the guest did not come up under {accel}: {e:#}");
                p.kill();
                let _ = std::fs::remove_file(bed.path("a.qmp"));
            }
        }
    }
    let Some((accel, a)) = src else {
        return Ok(json!({"not_measured": format!("QEMU could not boot the guest under kvm or tcg; see the logs ({why_not_kvm})")}));
    };
    say!("qemu: guest up under {accel} ({mem}, dirty {dirty:?})");
    let b = boot(&bed, &elf, accel, &mem, &dirty, &bed.tap_b, "b", true)?;
    if !wait_until(Duration::from_secs(10), || bed.path("b.qmp").exists() && bed.path("a.qmp").exists()) {
        bail!("QEMU opened no QMP socket:\n{}", b.log_tail());
    }
    let mut qa = Qmp::connect(&bed.path("a.qmp"))?;
    let mut qb = Qmp::connect(&bed.path("b.qmp"))?;
    let mig = bed.path("mig.sock");
    qb.cmd("migrate-incoming", json!({"uri": format!("unix:{}", mig.display())}))?;
    let mut params = json!({"downtime-limit": downtime_ms});
    if max_bw > 0 {
        params["max-bandwidth"] = json!(max_bw);
    }
    qa.cmd("migrate-set-parameters", params)?;
    let counter = RetransmitCounter::start(bed.guest_ip)?;
    let cl = clients(&bed, nclients, 1000)?;
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    qa.cmd("migrate", json!({"uri": format!("unix:{}", mig.display())}))?;
    let mut info;
    loop {
        info = qa.cmd("query-migrate", json!({}))?;
        let st = info["status"].as_str().unwrap_or("");
        if st == "completed" || st == "failed" || st == "cancelled" {
            break;
        }
        if t0.elapsed() > converge_timeout {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let status = info["status"].as_str().unwrap_or("?").to_owned();
    let converged = status == "completed";
    if !converged {
        say!("qemu: migration {status} after {:?}; cancelling", t0.elapsed());
        let _ = qa.cmd("migrate_cancel", json!({}));
    }
    // The destination's RESUME.
    let _ = wait_until(Duration::from_secs(5), || {
        let _ = qb.cmd("query-status", json!({}));
        qb.event_us("RESUME").is_some()
    });
    let moved_on = converged && all_progress(&cl, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(300));
    let (gap, errors) = finish_clients(cl);
    let retransmits = counter.finish()?;
    let pause = match (qa.event_us("STOP"), qb.event_us("RESUME")) {
        (Some(s), Some(r)) if converged => r.saturating_sub(s) as f64 / 1e3,
        _ => f64::NAN,
    };
    let ram = &info["ram"];
    let g = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let downtime = g(&info["downtime"]);
    drop((a, b));
    say!(
        "qemu ({accel}): {status}, total {} ms, pause {pause:.1} ms (events), downtime {downtime} ms, gap {gap:.1} ms, {retransmits} retransmits",
        info["total-time"]
    );
    Ok(json!({
        "accel": if accel == "kvm" { "kvm".to_owned() } else { format!("tcg (kvm: {why_not_kvm})") },
        "status": status,
        "converged": u8::from(converged),
        "total_ms": if converged { g(&info["total-time"]) } else { f64::NAN },
        "pause_events_ms": pause,
        "qemu_downtime_ms": downtime,
        "bytes": g(&ram["transferred"]),
        "rounds": g(&ram["dirty-sync-count"]),
        "ram_mbps": g(&ram["mbps"]),
        "setup_ms": g(&info["setup-time"]),
        "memcpy_mib_s": memcpy / 1_048_576.0,
        "socket_mib_s": socket / 1_048_576.0,
        "client_max_gap_ms": gap,
        "client_errors": errors.len(),
        "clients_moved_on": u8::from(moved_on),
        "retransmits": retransmits,
        "note": if errors.is_empty() { String::new() } else { errors.join("; ") },
    }))
}
