//! What the clients and the probes see during a migration: an echo client that measures the largest gap between
//! replies, and a `migmon watch --json` child whose retransmit events are counted per time window.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddrV4, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use testbed::net::wait_until;

use super::net::Netns;

#[derive(Default)]
struct GapState {
    last: Option<Instant>,
    max_gap: Duration,
    replies: u64,
    error: Option<String>,
}

/// A client in its namespace that sends a 16-byte echo request every `interval` and tracks the largest gap
/// between two replies since the last [`EchoClient::reset`].
pub struct EchoClient {
    state: Arc<Mutex<GapState>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<()>>>,
}

impl EchoClient {
    pub fn start(ns: &Netns, addr: SocketAddrV4, interval: Duration) -> Result<Self> {
        let mut stream = ns
            .try_run(|| TcpStream::connect_timeout(&addr.into(), Duration::from_secs(3)))?
            .with_context(|| format!("the echo client cannot connect to {addr}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let state = Arc::new(Mutex::new(GapState::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let handle = std::thread::Builder::new()
            .name("bench-echo".into())
            .spawn(move || {
                let msg = *b"migmon-bench-echo";
                let mut buf = [0u8; 17];
                let mut n = 0u64;
                while !sp.load(Ordering::Relaxed) {
                    let next = Instant::now() + interval;
                    let r = stream.write_all(&msg).and_then(|()| stream.read_exact(&mut buf));
                    if let Err(e) = r {
                        st.lock().unwrap_or_else(PoisonError::into_inner).error = Some(e.to_string());
                        return Err(e.into());
                    }
                    n += 1;
                    let now = Instant::now();
                    {
                        let mut s = st.lock().unwrap_or_else(PoisonError::into_inner);
                        if let Some(last) = s.last {
                            s.max_gap = s.max_gap.max(now - last);
                        }
                        s.last = Some(now);
                        s.replies = n;
                    }
                    if let Some(d) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(d);
                    }
                }
                Ok(())
            })
            .context("cannot start the echo client")?;
        Ok(Self {
            state,
            stop,
            handle: Some(handle),
        })
    }

    /// Starts a new window: the max gap counts from the next reply on.
    pub fn reset(&self) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.max_gap = Duration::ZERO;
    }

    pub fn replies(&self) -> u64 {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).replies
    }

    /// The largest gap since the last reset; an error if the connection broke.
    pub fn max_gap(&self) -> Result<Duration> {
        let s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = &s.error {
            bail!("the echo client's connection broke: {e}");
        }
        Ok(s.max_gap)
    }

    /// Waits until `n` more replies came in (the connection flows again after a migration).
    pub fn wait_replies(&self, n: u64, timeout: Duration) -> bool {
        let start = self.replies();
        wait_until(timeout, || {
            self.replies() >= start + n
                || self
                    .state
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .error
                    .is_some()
        })
    }
}

impl Drop for EchoClient {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A running `migmon watch --json ...`: retransmit timestamps (`CLOCK_MONOTONIC` ns) and the event count.
pub struct Watcher {
    child: Child,
    retransmits: Arc<Mutex<Vec<u64>>>,
    events: Arc<AtomicU64>,
    lost: Arc<AtomicU64>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

impl Watcher {
    /// Starts migmon with `args` after `watch --json` and waits until it says it is watching.
    pub fn start(migmon: &Path, args: &[String]) -> Result<Self> {
        let mut child = Command::new(migmon)
            .args(["watch", "--json"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", migmon.display()))?;
        let out = child.stdout.take().context("migmon stdout")?;
        let err = child.stderr.take().context("migmon stderr")?;
        let retransmits = Arc::new(Mutex::new(Vec::new()));
        let events = Arc::new(AtomicU64::new(0));
        let lost = Arc::new(AtomicU64::new(0));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (r, e, l) = (retransmits.clone(), events.clone(), lost.clone());
        let r1 = std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                e.fetch_add(1, Ordering::Relaxed);
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                match v["kind"].as_str() {
                    Some("tcp_retransmit") => {
                        if let Some(ts) = v["ts_ns"].as_u64() {
                            r.lock().unwrap_or_else(PoisonError::into_inner).push(ts);
                        }
                    }
                    Some("loss") => {
                        l.fetch_add(v["count"].as_u64().unwrap_or(0), Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
        });
        let se = stderr.clone();
        let r2 = std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut s = se.lock().unwrap_or_else(PoisonError::into_inner);
                s.push_str(&line);
                s.push('\n');
            }
        });
        let mut w = Self {
            child,
            retransmits,
            events,
            lost,
            stderr,
            readers: vec![r1, r2],
        };
        let ready = wait_until(Duration::from_secs(60), || {
            w.stderr().contains("migmon: watching") || w.child.try_wait().ok().flatten().is_some()
        });
        if !ready || !w.stderr().contains("migmon: watching") {
            bail!("migmon did not start: {}", w.stderr());
        }
        Ok(w)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Retransmits stamped within [from, to] (`CLOCK_MONOTONIC` ns).
    pub fn retransmits_between(&self, from: u64, to: u64) -> usize {
        self.retransmits
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|&&t| t >= from && t <= to)
            .count()
    }

    /// Lines (events) printed so far.
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }

    /// Events lost in the kernel so far (from `loss` events).
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }

    /// Stops migmon (SIGINT) and waits for it.
    pub fn stop(mut self) -> String {
        // SAFETY: kill(2) with a pid we started and have not reaped yet.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGINT);
        }
        let exited = wait_until(Duration::from_secs(20), || {
            self.child.try_wait().ok().flatten().is_some()
        });
        if !exited {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        self.stderr()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A child process killed and reaped on drop, its output in a log file.
pub struct Proc {
    pub child: Child,
    pub log: std::path::PathBuf,
    pub name: String,
}

impl Proc {
    pub fn spawn(mut cmd: Command, log: &Path, name: &str) -> Result<Self> {
        let out = std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Self {
            child,
            log: log.to_path_buf(),
            name: name.to_owned(),
        })
    }

    pub fn running(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_none()
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        wait_until(timeout, || !self.running())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.running() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Waits until the guest's echo port answers from `ns`.
pub fn wait_echo(ns: &Netns, addr: SocketAddrV4, timeout: Duration, proc_: &mut Proc) -> Result<()> {
    let up = wait_until(timeout, || {
        proc_.running()
            && ns
                .try_run(|| TcpStream::connect_timeout(&addr.into(), Duration::from_millis(300)).is_ok())
                .unwrap_or(false)
    });
    if !up {
        bail!(
            "the guest's echo service never answered at {addr} ({}):\n{}",
            proc_.name,
            proc_.log_tail()
        );
    }
    Ok(())
}

/// Peak RSS (`VmHWM`) of a process, in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_field_kib(pid, "VmHWM:")
}

/// Current RSS of a process in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_field_kib(pid, "VmRSS:")
}

fn status_field_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// User + system CPU time of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    stat_cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// User + system CPU time from a `stat` file of procfs (a process's, or a thread's under `task/`), in seconds.
pub fn stat_cpu_seconds(path: &str) -> Option<f64> {
    let s = std::fs::read_to_string(path).ok()?;
    // Fields after the command name (which may hold spaces), counted from field 3.
    let rest = s.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) / hz.max(1.0))
}

/// Resident KiB of the mappings of exactly `size_kib` (the guest RAM) in a process, from `/proc/PID/smaps`.
pub fn rss_of_mappings_sized(pid: u32, size_kib: u64) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut total = 0;
    let mut in_match = false;
    for l in s.lines() {
        if let Some(v) = l.strip_prefix("Size:") {
            in_match = v.split_whitespace().next().and_then(|x| x.parse::<u64>().ok()) == Some(size_kib);
        } else if let Some(v) = l.strip_prefix("Rss:")
            && in_match
        {
            total += v.split_whitespace().next()?.parse::<u64>().ok()?;
        }
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_figures() {
        let pid = std::process::id();
        assert!(peak_rss_kib(pid).unwrap() >= rss_kib(pid).unwrap() / 2);
        assert!(cpu_seconds(pid).is_some());
        assert_eq!(rss_of_mappings_sized(pid, u64::MAX), Some(0));
    }
}
