//! QEMU as the baseline: `-M microvm` booting our guest ELF through its PVH entry, two processes (the destination
//! with `-incoming`), migrated through QMP.
//!
//! The pause is measured from events, not from QEMU's own `downtime`: the source's `STOP` to the destination's
//! `RESUME`, both stamped by QEMU with the wall clock of the same host.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use testbed::net::wait_until;

use super::observe::Proc;

/// A QMP connection: commands one at a time; events that arrive meanwhile are kept.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    pub events: Vec<Value>,
}

impl Qmp {
    /// Connects (waiting up to `timeout` for the socket), reads the greeting, negotiates capabilities.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self> {
        let mut stream = None;
        wait_until(timeout, || {
            stream = UnixStream::connect(path).ok();
            stream.is_some()
        });
        let stream = stream.with_context(|| format!("cannot connect to QMP at {}", path.display()))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let writer = stream.try_clone()?;
        let mut q = Self {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        let greeting = q.read_value()?;
        if greeting.get("QMP").is_none() {
            bail!("not a QMP greeting: {greeting}");
        }
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    fn read_value(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).context("reading QMP")?;
        if n == 0 {
            bail!("QEMU closed the QMP socket");
        }
        serde_json::from_str(&line).with_context(|| format!("bad QMP line {line:?}"))
    }

    /// Runs a command; returns its `return` value, or fails with QEMU's error.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes()).context("writing QMP")?;
        loop {
            let v = self.read_value()?;
            if v.get("event").is_some() {
                self.events.push(v);
            } else if let Some(r) = v.get("return") {
                return Ok(r.clone());
            } else if let Some(e) = v.get("error") {
                bail!("QMP {command} failed: {e}");
            }
        }
    }

    /// The first event named `name` seen so far, polling QEMU (to pump the socket) until `timeout`.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Option<Value>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.events.iter().find(|e| e["event"] == name) {
                return Ok(Some(e.clone()));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            self.execute("query-status", None)?;
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// A QMP event's timestamp in seconds (wall clock).
pub fn event_time(e: &Value) -> Option<f64> {
    let t = e.get("timestamp")?;
    Some(t["seconds"].as_f64()? + t["microseconds"].as_f64()? / 1e6)
}

/// How QEMU runs the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// One QEMU VM's settings.
#[derive(Clone, Debug)]
pub struct QemuConfig {
    pub guest_elf: PathBuf,
    pub mem_mib: u64,
    pub mac: String,
    pub ip_cidr: String,
    /// `dirty=...` for the guest's command line, e.g. `32M@125M`.
    pub dirty: Option<String>,
    pub accel: Accel,
    /// TLS credentials (`tls-creds-x509` directory): the VM gets a server (`tlssrv`) and a client (`tlscli`)
    /// object, used by [`listen`] and [`migrate`].
    pub tls_dir: Option<PathBuf>,
}

/// The `tls-creds-x509` objects' ids.
const TLS_SERVER: &str = "tlssrv";
const TLS_CLIENT: &str = "tlscli";

/// A running QEMU with its QMP socket.
pub struct Qemu {
    pub proc_: Proc,
    pub qmp_path: PathBuf,
}

impl Qemu {
    /// Starts QEMU in `netns` on `tap`; with `incoming`, it waits for a migration (`-incoming defer`: see
    /// [`listen`]).
    pub fn spawn(
        cfg: &QemuConfig,
        netns: &super::net::Netns,
        tap: &str,
        dir: &Path,
        name: &str,
        incoming: bool,
    ) -> Result<Self> {
        let qmp_path = dir.join(format!("{name}.qmp"));
        let _ = std::fs::remove_file(&qmp_path);
        let mut append = format!("ip={} mac={}", cfg.ip_cidr, cfg.mac);
        if let Some(d) = &cfg.dirty {
            append.push_str(" dirty=");
            append.push_str(d);
        }
        let mut cmd = netns.command(Path::new("qemu-system-x86_64"));
        cmd.args(["-M", "microvm,acpi=off", "-accel", cfg.accel.name()])
            .args(["-m", &format!("{}M", cfg.mem_mib)])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args([
                "-serial",
                &format!("file:{}", dir.join(format!("{name}.serial")).display()),
            ])
            .arg("-kernel")
            .arg(&cfg.guest_elf)
            .args(["-append", &append])
            .args([
                "-netdev",
                &format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
                "-device",
                &format!("virtio-net-device,netdev=n0,mac={}", cfg.mac),
            ])
            .args(["-qmp", &format!("unix:{},server=on,wait=off", qmp_path.display())]);
        if let Some(d) = &cfg.tls_dir {
            let d = d.display();
            cmd.arg("-object")
                .arg(format!(
                    "tls-creds-x509,id={TLS_SERVER},endpoint=server,dir={d},verify-peer=on"
                ))
                .arg("-object")
                .arg(format!("tls-creds-x509,id={TLS_CLIENT},endpoint=client,dir={d}"));
        }
        if incoming {
            cmd.args(["-incoming", "defer"]);
        }
        let proc_ = Proc::spawn(cmd, &dir.join(format!("{name}.log")), &format!("qemu {name}"))?;
        Ok(Self { proc_, qmp_path })
    }

    pub fn qmp(&mut self) -> Result<Qmp> {
        let q = Qmp::connect(&self.qmp_path, Duration::from_secs(20));
        if q.is_err() && !self.proc_.running() {
            bail!("QEMU exited:\n{}", self.proc_.log_tail());
        }
        q
    }
}

/// What one QEMU migration gave.
#[derive(Clone, Debug, Default)]
pub struct QemuMigration {
    pub completed: bool,
    pub total_ms: f64,
    /// QEMU's own `downtime`.
    pub downtime_ms: f64,
    /// Source STOP to destination RESUME.
    pub pause_ms: Option<f64>,
    pub bytes: u64,
    pub rounds: u64,
    pub status: String,
}

/// Makes a QEMU started with `incoming` listen on `uri` (e.g. `tcp:10.0.0.2:7000`), with TLS (client
/// certificates required) when `tls`.
pub fn listen(dst: &mut Qmp, uri: &str, tls: bool) -> Result<()> {
    if tls {
        dst.execute("migrate-set-parameters", Some(json!({ "tls-creds": TLS_SERVER })))?;
    }
    dst.execute("migrate-incoming", Some(json!({ "uri": uri })))?;
    Ok(())
}

/// Migrates `src` to the destination listening on `uri` (whose QMP is `dst`), with `downtime_ms` as the limit and
/// `max_bandwidth` (bytes/s) when given, over TLS when `tls`; gives up (cancels) after `timeout`.
pub fn migrate(
    src: &mut Qmp,
    dst: &mut Qmp,
    uri: &str,
    tls: bool,
    downtime_ms: u64,
    max_bandwidth: Option<u64>,
    timeout: Duration,
) -> Result<QemuMigration> {
    src.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": [{ "capability": "events", "state": true }] })),
    )?;
    let mut params = json!({ "downtime-limit": downtime_ms });
    if let Some(bw) = max_bandwidth {
        params["max-bandwidth"] = json!(bw);
    }
    if tls {
        params["tls-creds"] = json!(TLS_CLIENT);
    }
    src.execute("migrate-set-parameters", Some(params))?;
    src.events.clear();
    dst.events.clear();
    src.execute("migrate", Some(json!({ "uri": uri })))?;
    let deadline = Instant::now() + timeout;
    // The end is taken from the MIGRATION event, not from query-migrate alone: a QEMU that itself came in by
    // migration answers "completed" (its incoming one) until the outgoing migration has started.
    let ended = |q: &Qmp| {
        q.events.iter().any(|e| {
            e["event"] == "MIGRATION"
                && matches!(
                    e["data"]["status"].as_str(),
                    Some("completed" | "failed" | "cancelled")
                )
        })
    };
    let info = loop {
        let info = src.execute("query-migrate", None)?;
        if ended(src) {
            break src.execute("query-migrate", None)?;
        }
        if Instant::now() >= deadline {
            src.execute("migrate_cancel", None)?;
            let _ = wait_until(Duration::from_secs(10), || {
                src.execute("query-migrate", None)
                    .is_ok_and(|i| i["status"] != "cancelling" && i["status"] != "active")
            });
            return Ok(QemuMigration {
                status: format!("not converged in {} s (cancelled)", timeout.as_secs()),
                bytes: info["ram"]["transferred"].as_u64().unwrap_or(0),
                rounds: info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0),
                ..QemuMigration::default()
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let status = info["status"].as_str().unwrap_or("").to_owned();
    if std::env::var_os("BENCH_QMP_DEBUG").is_some() {
        eprintln!("query-migrate: {info}\nevents: {:?}", src.events);
    }
    let mut m = QemuMigration {
        completed: status == "completed",
        total_ms: info["total-time"].as_f64().unwrap_or(f64::NAN),
        downtime_ms: info["downtime"].as_f64().unwrap_or(f64::NAN),
        bytes: info["ram"]["transferred"].as_u64().unwrap_or(0),
        rounds: info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0),
        status,
        pause_ms: None,
    };
    // Total from the events too (setup → completed, QEMU's own stamps): query-migrate's total-time has been seen
    // as 0 for a completed migration.
    let at = |status: &str| {
        src.events
            .iter()
            .find(|e| e["event"] == "MIGRATION" && e["data"]["status"] == status)
            .and_then(event_time)
    };
    if let (Some(a), Some(b)) = (at("setup"), at("completed")) {
        m.total_ms = (b - a) * 1e3;
    }
    if m.completed {
        let stop = src.wait_event("STOP", Duration::from_secs(2))?;
        let resume = dst.wait_event("RESUME", Duration::from_secs(10))?;
        if let (Some(s), Some(r)) = (
            stop.as_ref().and_then(event_time),
            resume.as_ref().and_then(event_time),
        ) {
            m.pause_ms = Some((r - s) * 1e3);
        }
    }
    Ok(m)
}

/// Checks that QMP works on this machine's QEMU without a guest (`-M none`).
pub fn qmp_selftest(dir: &Path) -> Result<String> {
    let qmp_path = dir.join("selftest.qmp");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-M", "none", "-nodefaults", "-display", "none"])
        .args(["-qmp", &format!("unix:{},server=on,wait=off", qmp_path.display())]);
    let mut p = Proc::spawn(cmd, &dir.join("selftest.log"), "qemu -M none")?;
    let mut q = Qmp::connect(&qmp_path, Duration::from_secs(10)).with_context(|| p.log_tail())?;
    let v = q.execute("query-version", None)?;
    q.execute("stop", None)?;
    let stop = q.wait_event("STOP", Duration::from_secs(5))?;
    if stop.as_ref().and_then(event_time).is_none() {
        bail!("QEMU sent no timestamped STOP event");
    }
    let _ = q.execute("quit", None);
    p.wait_exit(Duration::from_secs(5));
    Ok(format!(
        "{}.{}.{}",
        v["qemu"]["major"], v["qemu"]["minor"], v["qemu"]["micro"]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_timestamps() {
        let e: Value = serde_json::from_str(
            r#"{"event":"STOP","timestamp":{"seconds":1700000000,"microseconds":250000}}"#,
        )
        .unwrap();
        assert!((event_time(&e).unwrap() - 1_700_000_000.25).abs() < 1e-6);
        assert!(event_time(&json!({"event":"STOP"})).is_none());
    }
}
