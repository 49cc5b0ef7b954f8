//! The demo's scenario, shared by `./x demo` and the reduced demo in the privileged tests: one guest, one set of
//! clients, a live migration A → B and then a quick migration B → A, all watched by `migmon watch`.
//!
//! 1. The testbed comes up ([`Testbed`]); it goes down again when the run ends, however it ends.
//! 2. `migmon watch` starts in the root namespace, on every bridge port of the testbed (XDP on the taps, uplinks and
//!    switch ports, TC egress on the taps), recording a trace and listening for the migrators' phase events on a
//!    unix socket, with `--until-migrations 2`, so it ends by itself once both migrations have settled.
//! 3. `migrator run` boots the guest on host A (in A's namespace, on A's tap) with the memory dirtier on.
//! 4. The clients connect from the client namespace with the chosen socket profile, half of them over IPv4 and
//!    half over IPv6 (the guest's unique local address on the testbed LAN).
//! 5. `migrator migrate --mode live` moves the guest to a `migrator receive` on host B over the migration link,
//!    then `--mode quick --extra-pause D` moves it back to a new `migrator receive` on A. The quick pause is the
//!    real suspend/copy/resume (a few hundred ms here) plus D held on purpose, reproducing a 2008-era Quick
//!    Migration that saved the VM to shared storage; the migrator's report and migmon's label it as such.
//! 6. The trace is turned into the reports and exports with migmon's own `report` and `export` commands.
//!
//! Progress goes to a callback at least once a second while anything is waited for.

use std::{
    fmt::Write as _,
    fs::File,
    io::Read as _,
    net::{SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use serde_json::Value;

use migmon_base::units::fmt_duration;

use crate::{
    clients::{Arithmetic, Client, ClientError, ClientOptions, ClientReport, Profile, start_mix},
    net::in_netns,
    topology::{CLIENT_IF, Host, Testbed, TopologyError},
};

/// The VM's MAC in the demo.
pub const VM_MAC: &str = "52:54:00:de:e0:01";
/// The TCP port `migrator receive` listens on, on the migration link.
const MIG_PORT: u16 = 7700;

/// Errors of a demo run.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Net(#[from] crate::net::NetError),
    #[error("cannot start {what} ({})", bin.display())]
    Spawn {
        what: String,
        bin: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("timed out after {:.0} s waiting for {what}{}", timeout.as_secs_f64(), detail(log))]
    Timeout {
        what: String,
        timeout: Duration,
        log: String,
    },
    #[error("{what} failed{}", detail(log))]
    Failed { what: String, log: String },
    #[error("interrupted")]
    Interrupted,
}

fn detail(log: &str) -> String {
    if log.is_empty() {
        String::new()
    } else {
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!(":\n{}", tail.join("\n"))
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct Config {
    /// Testbed prefix (namespaces `PREFIX-client`, `PREFIX-a`, ...).
    pub prefix: String,
    /// Client connections (half streams, half request/response).
    pub clients: usize,
    /// How long the quick migration holds the guest paused beyond the real move (`--extra-pause`).
    pub quick_pause: Duration,
    pub profile: Profile,
    /// More client groups beside `profile`'s, `clients` connections each (half of them over IPv6), each group with
    /// its own profile. A group whose namespace-wide settings (`tcp_retries2`, the route's `rto_min`) differ from
    /// `profile`'s connects from the testbed's second client namespace; those groups must agree on them.
    pub more_profiles: Vec<Profile>,
    /// Where the trace, reports and exports go.
    pub out: PathBuf,
    pub migmon: PathBuf,
    pub migrator: PathBuf,
    /// Guest RAM, as `migrator run --mem`.
    pub mem: String,
    /// The dirtier, as `migrator run --dirty` (`SIZE@RATE`).
    pub dirty: Option<String>,
    /// migmon's `--settle`.
    pub settle: Duration,
    /// More `migmon watch` arguments (for example `--tcp wire`).
    pub migmon_args: Vec<String>,
    /// Beside the one monitor of every port, one `migmon watch` per host, attached only to that host's tap and
    /// uplink, each with its own migrator events (`--host-name PREFIX-a`, `PREFIX-b`); their two traces are merged
    /// by `migmon report a.trace b.trace`.
    pub monitor_per_host: bool,
}

/// What the clients saw across one migration.
#[derive(Clone, Debug)]
pub struct MigrationOutcome {
    pub mode: &'static str,
    /// `migrator migrate`'s JSON summary.
    pub summary: Value,
    /// Each client's state once the migration was over (after the quick one: its final verdict).
    pub clients: Vec<ClientReport>,
    /// Wall time of `migrator migrate`.
    pub wall: Duration,
}

impl MigrationOutcome {
    pub fn aborted(&self) -> usize {
        self.clients.iter().filter(|c| !c.verdict.is_alive()).count()
    }

    /// `pause_ms` from the migrator's summary.
    pub fn pause_ms(&self) -> f64 {
        self.summary["pause_ms"].as_f64().unwrap_or(f64::NAN)
    }
}

/// Files the run wrote.
#[derive(Clone, Debug)]
pub struct Outputs {
    pub trace: PathBuf,
    pub report_json: PathBuf,
    pub report_text: PathBuf,
    pub compare_text: PathBuf,
    pub svg: PathBuf,
    pub pcapng: PathBuf,
    pub perfetto: PathBuf,
    pub jsonl: PathBuf,
    pub watch_log: PathBuf,
    /// With `monitor_per_host`: host A's and host B's traces, and their merged report (text and JSON).
    pub host_traces: Vec<PathBuf>,
    pub merged_text: Option<PathBuf>,
    pub merged_json: Option<PathBuf>,
}

/// The result of a run.
#[derive(Clone, Debug)]
pub struct Run {
    pub live: MigrationOutcome,
    pub quick: MigrationOutcome,
    pub arithmetic: Arithmetic,
    /// migmon's side-by-side report (`migmon report --format compare`).
    pub compare: String,
    /// migmon's JSON report.
    pub report: Value,
    /// With `monitor_per_host`: the JSON report of the two hosts' traces merged.
    pub merged_report: Option<Value>,
    /// migmon watch's exit code (`--until-migrations` gate: 1 when a migration exceeded the limits).
    pub watch_exit: Option<i32>,
    pub outputs: Outputs,
    pub guest_ip: std::net::Ipv4Addr,
    /// The guest's IPv6 address (half of the clients connect to it).
    pub guest_ip6: std::net::Ipv6Addr,
}

/// The caller's view of a run in progress: a progress line sink and an interrupt flag.
pub struct Ui<'a> {
    pub say: &'a dyn Fn(&str),
    pub interrupted: &'a AtomicBool,
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A child process (a migrator, migmon), killed on drop; its output goes to a log file.
struct Proc {
    what: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(what: &str, cmd: &mut Command, log: &Path) -> Result<Self, ScenarioError> {
        let file = File::create(log).map_err(|source| ScenarioError::Write {
            path: log.to_owned(),
            source,
        })?;
        let err = file.try_clone().map_err(|source| ScenarioError::Write {
            path: log.to_owned(),
            source,
        })?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .map_err(|source| ScenarioError::Spawn {
                what: what.to_owned(),
                bin: PathBuf::from(cmd.get_program()),
                source,
            })?;
        Ok(Self {
            what: what.to_owned(),
            child,
            log: log.to_owned(),
        })
    }

    fn log(&self) -> String {
        read_log(&self.log)
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
        }
    }

    fn failed(&self, why: &str) -> ScenarioError {
        ScenarioError::Failed {
            what: format!("{} ({why})", self.what),
            log: self.log(),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited().is_none() {
            // `ip netns exec` execs the program: the pid is the migrator's (or migmon's) own.
            self.signal(nix::sys::signal::Signal::SIGTERM);
            // migmon flushes its trace on SIGTERM; a migrator has nothing to save.
            let grace = if self.what.starts_with("migmon") {
                3000
            } else {
                500
            };
            let deadline = Instant::now() + Duration::from_millis(grace);
            while self.exited().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A private directory for sockets (unix socket paths must stay short), removed on drop.
struct RunDir(PathBuf);

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Scenario<'a> {
    cfg: &'a Config,
    ui: &'a Ui<'a>,
    bed: Testbed,
    run_dir: RunDir,
    start: Instant,
}

impl Scenario<'_> {
    fn say(&self, msg: &str) {
        (self.ui.say)(msg);
    }

    fn sock(&self, name: &str) -> String {
        self.run_dir.0.join(name).display().to_string()
    }

    fn out(&self, name: &str) -> PathBuf {
        self.cfg.out.join(name)
    }

    /// Polls `cond` every 20 ms until it holds; prints `tick()` about once a second; fails on timeout or Ctrl-C.
    fn wait(
        &self,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut() -> Result<bool, ScenarioError>,
        mut tick: impl FnMut(Duration) -> String,
        log: Option<&Path>,
    ) -> Result<(), ScenarioError> {
        let start = Instant::now();
        let mut next_tick = start + Duration::from_secs(1);
        loop {
            if self.ui.interrupted.load(Ordering::SeqCst) {
                self.say("interrupted: stopping the migrators, the clients and migmon, then the testbed");
                return Err(ScenarioError::Interrupted);
            }
            if cond()? {
                return Ok(());
            }
            let now = Instant::now();
            if now - start >= timeout {
                return Err(ScenarioError::Timeout {
                    what: what.to_owned(),
                    timeout,
                    log: log.map(read_log).unwrap_or_default(),
                });
            }
            if now >= next_tick {
                next_tick = now + Duration::from_secs(1);
                self.say(&tick(now - start));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn migrator(&self, host: Host, args: &[&str], log: &str) -> Result<Proc, ScenarioError> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.bed.host_ns(host)])
            .arg(&self.cfg.migrator)
            .args(args);
        Proc::spawn(
            &format!("migrator {} on host {host:?}", args[0]),
            &mut cmd,
            &self.out(log),
        )
    }

    /// Where a migrator on `host` sends its phase events: the one monitor's socket, or with `monitor_per_host` a file
    /// per host that the one monitor and that host's monitor both follow.
    fn events_for(&self, host: Host, sock: &str) -> String {
        if self.cfg.monitor_per_host {
            self.sock(&format!("events-{}.jsonl", host_label(host)))
        } else {
            sock.to_owned()
        }
    }

    /// `migmon watch` for one host: its tap and uplink only, its migrators' events, its own host name and trace.
    fn start_host_watch(&self, host: Host, trace: &Path) -> Result<Proc, ScenarioError> {
        let vm = format!("{VM_MAC}={}", self.bed.vm_ip(0));
        let vm6 = format!("{VM_MAC}={}", self.bed.vm_ip6(0));
        let ns = self.bed.host_ns(host);
        let mut cmd = Command::new(&self.cfg.migmon);
        cmd.args(["watch", "--vm", &vm, "--vm", &vm6, "--host-name", &ns])
            .args(["--iface", &self.bed.tap_at(host)])
            .args(["--iface", &format!("{}@{ns}", host.uplink())])
            .args(["--egress", &self.bed.tap_at(host)])
            .args(["--events", &self.events_for(host, "")]);
        for port in [guest_abi::STREAM_PORT, guest_abi::RR_PORT] {
            cmd.args(["--port", &port.to_string()]);
        }
        let backstop = format!("{}s", 300 + self.cfg.quick_pause.as_secs());
        cmd.args(["--duration", &backstop])
            .arg("--record")
            .arg(trace)
            .args(&self.cfg.migmon_args);
        let log = self.out(&format!("watch-{}.log", host_label(host)));
        let mut p = Proc::spawn(&format!("migmon watch on host {host:?}"), &mut cmd, &log)?;
        self.say(&format!(
            "migmon watch for host {host:?} alone: {} and {}@{ns}, trace {}",
            self.bed.tap_at(host),
            host.uplink(),
            trace.display()
        ));
        self.wait(
            &format!("migmon watch on host {host:?} to attach its probes"),
            Duration::from_secs(90),
            || {
                if let Some(st) = p.exited() {
                    return Err(p.failed(&format!("exited with {st}")));
                }
                Ok(p.log().contains("migmon: watching"))
            },
            |t| {
                format!(
                    "migmon watch on host {host:?}: still attaching ({:.0} s)",
                    t.as_secs_f64()
                )
            },
            Some(&log),
        )?;
        Ok(p)
    }

    /// Stops a `migmon watch` (SIGTERM: it flushes its trace) and waits for it to exit.
    fn stop_watch(&self, p: &mut Proc) -> Result<(), ScenarioError> {
        p.signal(nix::sys::signal::Signal::SIGTERM);
        let log = p.log.clone();
        let what = p.what.clone();
        self.wait(
            &format!("{what} to stop"),
            Duration::from_secs(20),
            || Ok(p.exited().is_some()),
            |_| format!("{what}: stopping"),
            Some(&log),
        )
    }

    fn start_watch(&self, sock: &str, trace: &Path) -> Result<Proc, ScenarioError> {
        let vm = format!("{VM_MAC}={}", self.bed.vm_ip(0));
        let vm6 = format!("{VM_MAC}={}", self.bed.vm_ip6(0));
        let mut cmd = Command::new(&self.cfg.migmon);
        cmd.args(["watch", "--vm", &vm, "--vm", &vm6]);
        for p in self.bed.ports() {
            cmd.args(["--iface", &p]);
        }
        for h in [Host::A, Host::B] {
            cmd.args(["--egress", &self.bed.tap_at(h)]);
        }
        for port in [guest_abi::STREAM_PORT, guest_abi::RR_PORT] {
            cmd.args(["--port", &port.to_string()]);
        }
        // A connection that survives the quick pause shows it at its first retransmission after the VM is back
        // (due at the profile's schedule, a little later with the real RTO above rto_min): migmon must still be
        // watching then.
        let heal = std::iter::once(self.cfg.profile)
            .chain(self.cfg.more_profiles.iter().copied())
            .filter_map(|p| p.arithmetic().first_retransmit_after(self.cfg.quick_pause))
            .map(|t| {
                ((t * 11 / 10).saturating_sub(self.cfg.quick_pause) + Duration::from_secs(2))
                    .min(Duration::from_secs(60))
            })
            .max()
            .unwrap_or(Duration::ZERO);
        let settle = format!("{}ms", self.cfg.settle.max(heal).as_millis());
        // A backstop: if this process is killed outright, migmon still ends by itself.
        let backstop = format!("{}s", 300 + self.cfg.quick_pause.as_secs());
        cmd.args(["--duration", &backstop]);
        if self.cfg.monitor_per_host {
            for h in [Host::A, Host::B] {
                cmd.args(["--events", &self.events_for(h, sock)]);
            }
        } else {
            cmd.args(["--events-listen", sock]);
        }
        cmd.args(["--until-migrations", "2", "--settle", &settle])
            .arg("--record")
            .arg(trace)
            .args(&self.cfg.migmon_args);
        let log = self.out("watch.log");
        let mut p = Proc::spawn("migmon watch", &mut cmd, &log)?;
        self.say("migmon watch: loading the probes and attaching to 7 ports in 3 namespaces");
        self.wait(
            "migmon watch to attach its probes",
            Duration::from_secs(90),
            || {
                if let Some(st) = p.exited() {
                    return Err(p.failed(&format!("exited with {st}")));
                }
                Ok(p.log().contains("migmon: watching"))
            },
            |t| format!("migmon watch: still attaching ({:.0} s)", t.as_secs_f64()),
            Some(&log),
        )?;
        Ok(p)
    }

    fn boot(&self, api: &str, events: &str) -> Result<Proc, ScenarioError> {
        let ip = format!("{}/{}", self.bed.vm_ip(0), self.bed.lan_prefix_len());
        let ip6 = format!("{}/64", self.bed.vm_ip6(0));
        let serial = self.out("guest-serial.log").display().to_string();
        let mut args = vec![
            "run",
            "--tap",
            Host::A.tap(),
            "--mac",
            VM_MAC,
            "--ip",
            &ip,
            "--ip6",
            &ip6,
            "--mem",
            &self.cfg.mem,
            "--api",
            api,
            "--events",
            events,
            "--serial-log",
            &serial,
        ];
        if let Some(d) = &self.cfg.dirty {
            args.extend(["--dirty", d]);
        }
        let log = self.out("migrator-a-run.log");
        let mut p = self.migrator(Host::A, &args, "migrator-a-run.log")?;
        let echo = SocketAddrV4::new(self.bed.vm_ip(0), guest_abi::ECHO_PORT);
        let client_ns = self.bed.client_ns();
        self.wait(
            "the guest's echo service on host A",
            Duration::from_secs(60),
            || {
                if let Some(st) = p.exited() {
                    return Err(p.failed(&format!("exited with {st}")));
                }
                Ok(in_netns(&client_ns, || {
                    TcpStream::connect_timeout(&echo.into(), Duration::from_millis(300)).is_ok()
                })?)
            },
            |t| format!("guest: booting on host A ({:.0} s)", t.as_secs_f64()),
            Some(&log),
        )?;
        Ok(p)
    }

    /// The mutual-TLS credentials of the migration link (made by [`Scenario::tls_init`]).
    fn tls_dir(&self) -> String {
        self.sock("tls")
    }

    /// `migrator tls-init`: a test CA and certificates, the destination's valid for both hosts' migration addresses.
    fn tls_init(&self) -> Result<(), ScenarioError> {
        let dir = self.tls_dir();
        let (a, b) = (
            self.bed.mig_ip(Host::A).to_string(),
            self.bed.mig_ip(Host::B).to_string(),
        );
        let out = Command::new(&self.cfg.migrator)
            .args(["tls-init", &dir, "--name", &a, "--name", &b])
            .output()
            .map_err(|source| ScenarioError::Spawn {
                what: "migrator tls-init".into(),
                bin: self.cfg.migrator.clone(),
                source,
            })?;
        if !out.status.success() {
            return Err(ScenarioError::Failed {
                what: "migrator tls-init".into(),
                log: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(())
    }

    fn receive(&self, host: Host, api: &str, events: &str, log: &str) -> Result<Proc, ScenarioError> {
        let listen = format!("tcp:{}:{MIG_PORT}", self.bed.mig_ip(host));
        let tls = self.tls_dir();
        let mut p = self.migrator(
            host,
            &[
                "receive",
                "--tap",
                host.tap(),
                "--listen",
                &listen,
                "--tls-creds",
                &tls,
                "--api",
                api,
                "--events",
                events,
            ],
            log,
        )?;
        let log = p.log.clone();
        self.wait(
            &format!("migrator receive on host {host:?}"),
            Duration::from_secs(15),
            || {
                if let Some(st) = p.exited() {
                    return Err(p.failed(&format!("exited with {st}")));
                }
                Ok(Path::new(api).exists())
            },
            |_| format!("migrator receive on host {host:?}: starting"),
            Some(&log),
        )?;
        Ok(p)
    }

    /// `migrator migrate` from the VM behind `api` to `to`; returns its JSON summary and wall time.
    fn migrate(
        &self,
        mode: &'static str,
        api: &str,
        to: Host,
        extra: &[&str],
        clients: &[Client],
    ) -> Result<(Value, Duration), ScenarioError> {
        let dest = format!("tcp:{}:{MIG_PORT}", self.bed.mig_ip(to));
        let mut cmd = Command::new(&self.cfg.migrator);
        let tls = self.tls_dir();
        cmd.args(["migrate", "--api", api, "--to", &dest, "--mode", mode, "--verify"])
            .args(["--tls-creds", &tls])
            .args(extra);
        let log = self.out(&format!("migrate-{mode}.log"));
        let summary_path = self.out(&format!("migrate-{mode}.json"));
        let summary = File::create(&summary_path).map_err(|source| ScenarioError::Write {
            path: summary_path.clone(),
            source,
        })?;
        let errlog = File::create(&log).map_err(|source| ScenarioError::Write {
            path: log.clone(),
            source,
        })?;
        let started = Instant::now();
        let mut child = Proc {
            what: format!("migrator migrate --mode {mode}"),
            child: cmd
                .stdin(Stdio::null())
                .stdout(summary)
                .stderr(errlog)
                .spawn()
                .map_err(|source| ScenarioError::Spawn {
                    what: "migrator migrate".into(),
                    bin: self.cfg.migrator.clone(),
                    source,
                })?,
            log: log.clone(),
        };
        let mut status = None;
        self.wait(
            &format!("the {mode} migration"),
            Duration::from_secs(120) + self.cfg.quick_pause,
            || {
                status = child.exited();
                Ok(status.is_some())
            },
            |t| {
                let st = self.status(api);
                let aborted = clients.iter().filter(|c| c.ended()).count();
                let state = st["state"].as_str().unwrap_or("?").to_owned();
                let mut line = format!("{mode} migration → {to:?}: {:.0} s, {state}", t.as_secs_f64());
                if state == "precopy" {
                    let _ = write!(
                        line,
                        ", round {}, {:.1} MiB left",
                        st["iteration"],
                        st["remaining_bytes"].as_f64().unwrap_or(0.0) / 1_048_576.0
                    );
                }
                line + &format!("; clients aborted so far: {aborted}/{}", clients.len())
            },
            Some(&log),
        )?;
        let ok = status.is_some_and(|s| s.success());
        let mut out = String::new();
        let _ = File::open(&summary_path).and_then(|mut f| f.read_to_string(&mut out));
        if !ok {
            return Err(ScenarioError::Failed {
                what: format!("migrator migrate --mode {mode}"),
                log: format!("{}{out}", child.log()),
            });
        }
        let summary = serde_json::from_str(&out).map_err(|e| ScenarioError::Failed {
            what: format!("reading the {mode} migration's summary"),
            log: format!("{e}: {out}"),
        })?;
        Ok((summary, started.elapsed()))
    }

    /// `migrator status --api` (JSON; Null when it does not answer).
    fn status(&self, api: &str) -> Value {
        Command::new(&self.cfg.migrator)
            .args(["status", "--api", api])
            .stderr(Stdio::null())
            .output()
            .ok()
            .and_then(|o| serde_json::from_slice(&o.stdout).ok())
            .unwrap_or(Value::Null)
    }

    /// `migmon ARGS`, stdout returned; fails with its stderr.
    fn migmon(&self, args: &[&str]) -> Result<String, ScenarioError> {
        let out = Command::new(&self.cfg.migmon)
            .args(args)
            .output()
            .map_err(|source| ScenarioError::Spawn {
                what: "migmon".into(),
                bin: self.cfg.migmon.clone(),
                source,
            })?;
        if !out.status.success() {
            return Err(ScenarioError::Failed {
                what: format!("migmon {}", args.join(" ")),
                log: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn write(path: &Path, text: &str) -> Result<(), ScenarioError> {
        std::fs::write(path, text).map_err(|source| ScenarioError::Write {
            path: path.to_owned(),
            source,
        })
    }

    fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

/// Runs the scenario (see the module doc). The testbed is down again when this returns, whatever happened.
pub fn run(cfg: &Config, ui: &Ui<'_>) -> Result<Run, ScenarioError> {
    std::fs::create_dir_all(&cfg.out).map_err(|source| ScenarioError::Write {
        path: cfg.out.clone(),
        source,
    })?;
    let run_dir = std::env::temp_dir().join(format!("migmon-{}-{}", cfg.prefix, std::process::id()));
    std::fs::create_dir_all(&run_dir).map_err(|source| ScenarioError::Write {
        path: run_dir.clone(),
        source,
    })?;
    let run_dir = RunDir(run_dir);
    (ui.say)(&format!(
        "testbed {}: namespaces for a client, a switch and hosts A and B; one bridge per host, a migration link",
        cfg.prefix
    ));
    let bed = Testbed::up(&cfg.prefix)?;
    let s = Scenario {
        cfg,
        ui,
        bed,
        run_dir,
        start: Instant::now(),
    };
    let r = scenario(&s);
    (ui.say)(&format!("testbed {}: taking it down", cfg.prefix));
    drop(s);
    r
}

fn scenario(s: &Scenario<'_>) -> Result<Run, ScenarioError> {
    let (cfg, bed) = (s.cfg, &s.bed);
    let events = s.sock("events.sock");
    let trace = s.out("migration.trace");
    let _ = std::fs::remove_file(&trace);
    let mut watch = s.start_watch(&events, &trace)?;
    let host_traces: Vec<PathBuf> = if cfg.monitor_per_host {
        [Host::A, Host::B]
            .iter()
            .map(|h| s.out(&format!("host-{}.trace", host_label(*h))))
            .collect()
    } else {
        Vec::new()
    };
    let mut host_watches = Vec::new();
    for (h, t) in [Host::A, Host::B].into_iter().zip(&host_traces) {
        let _ = std::fs::remove_file(t);
        host_watches.push(s.start_host_watch(h, t)?);
    }
    s.say("migration link: mutual TLS with a test CA (migrator tls-init)");
    s.tls_init()?;

    let (api_a, api_b, api_a2) = (s.sock("a.api"), s.sock("b.api"), s.sock("a2.api"));
    s.say(&format!(
        "guest: booting on host A ({}, {} RAM, dirtier {}), MAC {VM_MAC}, {}",
        bed.tap_at(Host::A),
        cfg.mem,
        cfg.dirty.as_deref().unwrap_or("off"),
        bed.vm_ip(0)
    ));
    let mut run_a = s.boot(&api_a, &s.events_for(Host::A, &events))?;
    let recv_b = s.receive(
        Host::B,
        &api_b,
        &s.events_for(Host::B, &events),
        "migrator-b-receive.log",
    )?;
    let (arithmetic, clients) = start_clients(s)?;
    let live = live_a_to_b(s, &api_a, &mut run_a, &clients)?;
    let recv_a = s.receive(
        Host::A,
        &api_a2,
        &s.events_for(Host::A, &events),
        "migrator-a-receive.log",
    )?;
    let (quick_summary, quick_wall) = quick_b_to_a(s, &api_b, &clients)?;
    let watch_exit = settle(s, &mut watch)?;
    for w in &mut host_watches {
        s.stop_watch(w)?;
    }
    let quick = MigrationOutcome {
        mode: "quick",
        summary: quick_summary,
        clients: clients.into_iter().map(Client::finish).collect(),
        wall: quick_wall,
    };
    drop((recv_a, recv_b, run_a));
    let (mut outputs, compare, report) = reports(s, &trace, &quick.clients)?;
    let merged_report = if host_traces.is_empty() {
        None
    } else {
        Some(merged_reports(s, &host_traces, &mut outputs)?)
    };
    s.say(&format!(
        "scenario finished after {:.0} s",
        s.elapsed().as_secs_f64()
    ));
    Ok(Run {
        live,
        quick,
        arithmetic,
        compare,
        report,
        merged_report,
        watch_exit,
        outputs,
        guest_ip: bed.vm_ip(0),
        guest_ip6: bed.vm_ip6(0),
    })
}

/// Whether every client made more than 3 steps of progress since `since`.
fn all_progress(clients: &[Client], since: &[u64]) -> bool {
    clients.iter().zip(since).all(|(c, m)| c.progress() > m + 3)
}

/// The namespace-wide part of a profile: clients that differ in it cannot share a namespace.
fn namespace_settings(p: Profile) -> (u32, Option<Duration>) {
    (p.tcp_retries2(), p.rto_min())
}

/// Applies the client profiles, starts the clients (each group of `profile` and `more_profiles`, half over IPv4
/// and half over IPv6) and waits until every one makes progress.
fn start_clients(s: &Scenario<'_>) -> Result<(Arithmetic, Vec<Client>), ScenarioError> {
    let (cfg, bed) = (s.cfg, &s.bed);
    let arithmetic = cfg.profile.arithmetic();
    let mut groups = vec![(cfg.profile, bed.client_ns())];
    let mut second: Option<Profile> = None;
    for &p in &cfg.more_profiles {
        if namespace_settings(p) == namespace_settings(cfg.profile) {
            groups.push((p, bed.client_ns()));
            continue;
        }
        if let Some(q) = second
            && namespace_settings(q) != namespace_settings(p)
        {
            return Err(ScenarioError::Failed {
                what: "choosing the client namespaces".into(),
                log: format!(
                    "profiles {cfg_p}, {q} and {p} need three different namespace settings (tcp_retries2, rto_min); \
                     the testbed has two client namespaces",
                    cfg_p = cfg.profile
                ),
            });
        }
        if second.is_none() {
            bed.add_second_client()?;
        }
        second = Some(p);
        groups.push((p, bed.client2_ns()));
    }
    for (p, ns) in &groups {
        p.apply(ns, CLIENT_IF, bed.vm_ip(0).into())?;
        p.apply(ns, CLIENT_IF, bed.vm_ip6(0).into())?;
        if *p != cfg.profile {
            s.say(&p.arithmetic().to_string());
        }
    }
    s.say(&arithmetic.to_string());
    let mut clients = Vec::new();
    let mut lines = Vec::new();
    for (profile, ns) in &groups {
        let opts = ClientOptions {
            profile: *profile,
            stall_limit: Duration::from_secs(60) + cfg.quick_pause,
        };
        // Half of the connections over IPv6 (each family gets streams and request/response).
        let v6 = cfg.clients / 2;
        clients.extend(start_mix(ns, bed.vm_ip(0).into(), cfg.clients - v6, opts)?);
        clients.extend(start_mix(ns, bed.vm_ip6(0).into(), v6, opts)?);
        lines.push(format!(
            "{} connections from {ns} with profile {profile} ({} over IPv4 to {}, {v6} over IPv6 to {})",
            cfg.clients,
            cfg.clients - v6,
            bed.vm_ip(0),
            bed.vm_ip6(0)
        ));
    }
    s.say(&format!(
        "clients: {}; streams with sequence checks and request/response",
        lines.join("; ")
    ));
    let zero = vec![0; clients.len()];
    s.wait(
        "every client to make progress",
        Duration::from_secs(20),
        || Ok(all_progress(&clients, &zero)),
        |_| "clients: getting going".into(),
        None,
    )?;
    for c in &clients {
        c.take_max_gap();
    }
    Ok((arithmetic, clients))
}

/// Live migration A → B, then waits for the source to hand over and every client to move on.
fn live_a_to_b(
    s: &Scenario<'_>,
    api_a: &str,
    run_a: &mut Proc,
    clients: &[Client],
) -> Result<MigrationOutcome, ScenarioError> {
    s.say("live migration A → B: pre-copy over the migration link, pause within a 30 ms budget");
    let (summary, wall) = s.migrate("live", api_a, Host::B, &["--downtime", "30ms"], clients)?;
    s.say(&format!(
        "live migration done in {:.0} ms: pause {:.1} ms, {} rounds",
        wall.as_secs_f64() * 1e3,
        summary["pause_ms"].as_f64().unwrap_or(f64::NAN),
        summary["rounds"]
    ));
    let run_a_log = run_a.log.clone();
    s.wait(
        "the source migrator on A to exit",
        Duration::from_secs(15),
        || Ok(run_a.exited().is_some()),
        |_| "live migration: waiting for host A's migrator to hand over".into(),
        Some(&run_a_log),
    )?;
    let base: Vec<u64> = clients.iter().map(Client::progress).collect();
    s.wait(
        "every client to make progress after the live migration",
        Duration::from_secs(20),
        || Ok(all_progress(clients, &base) || clients.iter().any(Client::ended)),
        |_| "clients: waiting for every connection to move on".into(),
        None,
    )?;
    let live = MigrationOutcome {
        mode: "live",
        summary,
        clients: clients.iter().map(Client::snapshot).collect(),
        wall,
    };
    s.say(&format!(
        "after live: {} of {} connections alive, largest client gap {:.0} ms",
        live.clients.len() - live.aborted(),
        live.clients.len(),
        live.clients
            .iter()
            .map(|c| c.max_gap)
            .max()
            .unwrap_or_default()
            .as_secs_f64()
            * 1e3
    ));
    Ok(live)
}

/// Quick migration B → A with the extra pause, then waits until every client recovered or aborted.
fn quick_b_to_a(
    s: &Scenario<'_>,
    api_b: &str,
    clients: &[Client],
) -> Result<(Value, Duration), ScenarioError> {
    let cfg = s.cfg;
    let pause = format!("{}ms", cfg.quick_pause.as_millis());
    s.say(&format!(
        "quick migration B → A: suspend, copy, resume, with the guest held paused {:.1} s longer (--extra-pause {pause}) \
         to reproduce a Quick Migration through shared storage",
        cfg.quick_pause.as_secs_f64()
    ));
    let (summary, wall) = s.migrate("quick", api_b, Host::A, &["--extra-pause", &pause], clients)?;
    s.say(&format!(
        "quick migration done: pause {:.2} s, of which {:.2} s held by --extra-pause",
        summary["pause_ms"].as_f64().unwrap_or(f64::NAN) / 1e3,
        summary["extra_pause_ms"].as_f64().unwrap_or(f64::NAN) / 1e3
    ));
    let base: Vec<u64> = clients.iter().map(Client::progress).collect();
    let recovering = || {
        clients
            .iter()
            .zip(&base)
            .filter(|(c, b)| !c.ended() && c.progress() <= *b + 3)
            .count()
    };
    s.wait(
        "every client to recover or abort after the quick migration",
        Duration::from_secs(60),
        || Ok(recovering() == 0),
        |t| {
            let ended = clients.iter().filter(|c| c.ended()).count();
            format!(
                "clients: {ended} aborted, {} still recovering ({:.0} s after resume)",
                recovering(),
                t.as_secs_f64()
            )
        },
        None,
    )?;
    Ok((summary, wall))
}

/// `a` for host A, `b` for host B: the suffix of the per-host files.
fn host_label(h: Host) -> &'static str {
    match h {
        Host::A => "a",
        Host::B => "b",
    }
}

/// `migmon report A.trace B.trace` (text and JSON): the two hosts' traces merged; returns the JSON report.
fn merged_reports(
    s: &Scenario<'_>,
    traces: &[PathBuf],
    outputs: &mut Outputs,
) -> Result<Value, ScenarioError> {
    s.say("reports: migmon report host-a.trace host-b.trace (the two hosts' traces merged)");
    let mut args: Vec<String> = vec!["report".into()];
    args.extend(traces.iter().map(|t| t.display().to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let text = s.migmon(&refs)?;
    let text_path = s.out("merged-report.txt");
    Scenario::write(&text_path, &text)?;
    let mut json_args = refs.clone();
    json_args.extend(["--format", "json"]);
    let json = s.migmon(&json_args)?;
    let json_path = s.out("merged-report.json");
    Scenario::write(&json_path, &json)?;
    outputs.host_traces = traces.to_vec();
    outputs.merged_text = Some(text_path);
    outputs.merged_json = Some(json_path);
    serde_json::from_str(&json).map_err(|e| ScenarioError::Failed {
        what: "reading migmon's merged JSON report".into(),
        log: e.to_string(),
    })
}

/// Waits for migmon to end by itself once both migrations have settled; returns its exit code.
fn settle(s: &Scenario<'_>, watch: &mut Proc) -> Result<Option<i32>, ScenarioError> {
    let watch_log = watch.log.clone();
    let mut watch_exit = None;
    s.wait(
        "migmon watch to settle both migrations (--until-migrations 2)",
        s.cfg.settle + Duration::from_secs(60),
        || {
            watch_exit = watch.exited().map(|st| st.code());
            Ok(watch_exit.is_some())
        },
        |_| "migmon: settling the migrations".into(),
        Some(&watch_log),
    )?;
    Ok(watch_exit.flatten())
}

/// The TCP settings of `p` as `migmon report --format compare` reads them after `--client-tcp CLIENTS=`.
fn client_tcp_settings(p: Profile) -> String {
    let mut out = vec![format!("tcp-retries2={}", p.tcp_retries2())];
    out.extend(p.rto_min().map(|r| format!("rto-min={}", fmt_duration(r))));
    out.extend(
        p.user_timeout()
            .map(|u| format!("user-timeout={}", fmt_duration(u))),
    );
    out.join(",")
}

/// `migmon report` (compare, JSON, text, SVG) and `migmon export` on the trace; returns the files, the compare
/// text and the JSON report. The compare report's arithmetic takes `cfg.profile`'s settings, and those of each
/// other profile for its `clients`.
fn reports(
    s: &Scenario<'_>,
    trace: &Path,
    clients: &[ClientReport],
) -> Result<(Outputs, String, Value), ScenarioError> {
    let cfg = s.cfg;
    s.say("reports: migmon report and export on the trace");
    let trace_s = trace.display().to_string();
    let outputs = Outputs {
        trace: trace.to_owned(),
        report_json: s.out("report.json"),
        report_text: s.out("report.txt"),
        compare_text: s.out("compare.txt"),
        svg: s.out("timeline.svg"),
        pcapng: s.out("migration.pcapng"),
        perfetto: s.out("migration.perfetto-trace"),
        jsonl: s.out("migration.jsonl"),
        watch_log: s.out("watch.log"),
        host_traces: Vec::new(),
        merged_text: None,
        merged_json: None,
    };
    let p = |p: &Path| p.display().to_string();
    let mut compare_args = vec![
        "report".to_owned(),
        trace_s.clone(),
        "--format".into(),
        "compare".into(),
        "--svg".into(),
        p(&outputs.svg),
        "--tcp-retries2".into(),
        cfg.profile.tcp_retries2().to_string(),
    ];
    if let Some(r) = cfg.profile.rto_min() {
        compare_args.extend(["--rto-min".into(), fmt_duration(r)]);
    }
    if let Some(u) = cfg.profile.user_timeout() {
        compare_args.extend(["--user-timeout".into(), fmt_duration(u)]);
    }
    for &p in cfg.more_profiles.iter().filter(|&&p| p != cfg.profile) {
        let socks: Vec<String> = clients
            .iter()
            .filter(|c| c.profile == p)
            .map(|c| c.local.to_string())
            .collect();
        if !socks.is_empty() {
            compare_args.extend([
                "--client-tcp".into(),
                format!("{}={}", socks.join(","), client_tcp_settings(p)),
            ]);
        }
    }
    let compare_refs: Vec<&str> = compare_args.iter().map(String::as_str).collect();
    let compare = s.migmon(&compare_refs)?;
    Scenario::write(&outputs.compare_text, &compare)?;
    let json = s.migmon(&["report", &trace_s, "--format", "json"])?;
    Scenario::write(&outputs.report_json, &json)?;
    let text = s.migmon(&["report", &trace_s, "--format", "text"])?;
    Scenario::write(&outputs.report_text, &text)?;
    s.migmon(&[
        "export",
        &trace_s,
        "--pcapng",
        &p(&outputs.pcapng),
        "--perfetto",
        &p(&outputs.perfetto),
        "--jsonl",
        &p(&outputs.jsonl),
    ])?;
    let report = serde_json::from_str(&json).map_err(|e| ScenarioError::Failed {
        what: "reading migmon's JSON report".into(),
        log: e.to_string(),
    })?;
    Ok((outputs, compare, report))
}
