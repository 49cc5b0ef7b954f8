//! The migration testbed of one sample: a host namespace with a bridge and two taps (source, destination), a client
//! namespace on a veth, stream clients, a retransmit counter on the real probes, and memory samplers.
//! Namespaces and links come from the integration tests' guards.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use integration_tests::{Link, Netns, ip_in, unique, wait_until};
use monitor::{
    events::Decoder,
    probes::{ProbeOptions, Probes, WatchList},
    trace::Event,
    watch::{Flow, Observer, Output, Pipeline, spawn_collector},
};
use serde_json::Value;

pub const MAC: &str = "52:54:00:62:6e:63";

pub struct Bed {
    pub host: Netns,
    pub client: Netns,
    pub bridge: String,
    pub tap_a: String,
    pub tap_b: String,
    /// The client side veth's peer on the bridge.
    pub uplink: String,
    pub net: u8,
    pub guest_ip: Ipv4Addr,
    pub dir: PathBuf,
    _links: Vec<Link>,
}

impl Bed {
    pub fn new() -> Result<Self> {
        let host = Netns::new("bnh");
        let client = Netns::new("bnc");
        let net = (std::process::id() % 200 + 20) as u8;
        let bridge = unique("bbr");
        let tap_a = unique("bta");
        let tap_b = unique("btb");
        let mut links = vec![Link::bridge(&bridge, Some(&host.name))];
        for tap in [&tap_a, &tap_b] {
            ip_in(Some(&host.name), &["tuntap", "add", "dev", tap, "mode", "tap"]);
            links.push(Link {
                name: tap.clone(),
                netns: Some(host.name.clone()),
            });
            ip_in(Some(&host.name), &["link", "set", tap, "master", &bridge]);
            ip_in(Some(&host.name), &["link", "set", tap, "up"]);
        }
        let vc = unique("bvc");
        let vh = unique("bvh");
        links.push(Link::veth(&vc, Some(&client.name), &vh, Some(&host.name)));
        ip_in(Some(&host.name), &["link", "set", &vh, "master", &bridge]);
        ip_in(Some(&client.name), &["addr", "add", &format!("10.{net}.7.1/24"), "dev", &vc]);
        let dir = std::env::temp_dir().join(unique("bench"));
        std::fs::create_dir_all(&dir).context("temp dir")?;
        Ok(Self {
            host,
            client,
            bridge,
            tap_a,
            tap_b,
            uplink: vh,
            net,
            guest_ip: Ipv4Addr::new(10, net, 7, 2),
            dir,
            _links: links,
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Runs `program ARGS` in the host namespace, output to `log` in the sample's directory.
    pub fn spawn(&self, program: &Path, args: &[String], log: &str) -> Result<Proc> {
        let log_path = self.path(log);
        let out = std::fs::File::create(&log_path).context("log file")?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.host.name])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        Ok(Proc {
            child: Some(child),
            log: log_path,
        })
    }

    /// Waits until the guest's echo service answers from the client namespace.
    pub fn wait_guest(&self, p: &mut Proc, timeout: Duration) -> Result<()> {
        let addr = SocketAddrV4::new(self.guest_ip, guest_abi::ECHO_PORT);
        let up = wait_until(timeout, || {
            p.running()
                && self
                    .client
                    .run(|| TcpStream::connect_timeout(&addr.into(), Duration::from_millis(300)).is_ok())
        });
        if !up {
            bail!(
                "the guest's echo service never answered within {timeout:?}:\n{}",
                p.log_tail()
            );
        }
        Ok(())
    }

    /// The `CLOCK_MONOTONIC` stamps of `event` by `role` in the migrator events file.
    pub fn event_ts(&self, file: &str, role: &str, event: &str) -> Option<u64> {
        std::fs::read_to_string(self.path(file))
            .ok()?
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|e| e["role"] == role && e["event"] == event)
            .and_then(|e| e["ts_ns"].as_u64())
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A child process, killed on drop.
pub struct Proc {
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    pub fn kill(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A stream client: reads sequence-numbered records, checks them, tracks the longest silence.
pub struct Client {
    stop: Arc<AtomicBool>,
    progress: Arc<AtomicU64>,
    handle: JoinHandle<(Duration, Option<String>)>,
}

impl Client {
    pub fn stream(bed: &Bed, rate: u32) -> Result<Self> {
        let addr = SocketAddrV4::new(bed.guest_ip, guest_abi::STREAM_PORT);
        let mut s = bed
            .client
            .run(|| TcpStream::connect_timeout(&addr.into(), Duration::from_secs(5)))
            .context("connect to the guest's stream service")?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        s.write_all(&rate.to_be_bytes())?;
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(AtomicU64::new(0));
        let (st, pr) = (stop.clone(), progress.clone());
        let handle = std::thread::spawn(move || {
            let mut rec = [0u8; guest_abi::STREAM_RECORD];
            let mut n = 0u64;
            let mut gap = Duration::ZERO;
            let mut last: Option<Instant> = None;
            while !st.load(Ordering::SeqCst) {
                if let Err(e) = s.read_exact(&mut rec) {
                    return (gap, Some(e.to_string()));
                }
                let mut seq = [0u8; 8];
                seq.copy_from_slice(&rec[..8]);
                if u64::from_be_bytes(seq) != n {
                    return (gap, Some(format!("record {} where {n} was due", u64::from_be_bytes(seq))));
                }
                n += 1;
                pr.store(n, Ordering::SeqCst);
                if let Some(l) = last {
                    gap = gap.max(l.elapsed());
                }
                last = Some(Instant::now());
            }
            (gap, None)
        });
        Ok(Self {
            stop,
            progress,
            handle,
        })
    }

    pub fn progress(&self) -> u64 {
        self.progress.load(Ordering::SeqCst)
    }

    pub fn finish(self) -> (Duration, Option<String>) {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .join()
            .unwrap_or((Duration::ZERO, Some("client thread panicked".into())))
    }
}

/// Waits until every client moved on by more than a few records.
pub fn all_progress(clients: &[Client], timeout: Duration) -> bool {
    let base: Vec<u64> = clients.iter().map(Client::progress).collect();
    wait_until(timeout, || {
        clients.iter().zip(&base).all(|(c, b)| c.progress() > b + 3)
    })
}

/// The real probes (tracepoints, watching the guest's IP) counting the retransmits of the clients' flows.
pub struct RetransmitCounter {
    control: monitor::watch::Control,
    count: Arc<AtomicU64>,
    consumer: JoinHandle<Result<()>>,
}

impl RetransmitCounter {
    pub fn start(ip: Ipv4Addr) -> Result<Self> {
        let opts = ProbeOptions {
            watch: WatchList {
                ips: vec![ip.into()],
                ..WatchList::default()
            },
            ..ProbeOptions::default()
        };
        let probes = Probes::load(&opts).context("cannot load the probes")?;
        let pipeline = Pipeline::new()?;
        let control = pipeline.control();
        let decoder = Decoder::new(probes.hz());
        let collector = spawn_collector(
            probes,
            decoder,
            pipeline.sender(),
            control.clone(),
            Duration::from_millis(100),
        )?;
        let count = Arc::new(AtomicU64::new(0));
        let c = count.clone();
        let consumer = std::thread::spawn(move || -> Result<()> {
            let mut out = Output::new(true, None);
            let mut observers: Vec<Observer> = vec![Box::new(move |ev: &Event| {
                if ev.kind() == "tcp_retransmit" {
                    c.fetch_add(1, Ordering::SeqCst);
                }
                Flow::Continue
            })];
            pipeline.consume(&mut out, None, &mut observers, Some(collector))?;
            Ok(())
        });
        Ok(Self {
            control,
            count,
            consumer,
        })
    }

    pub fn finish(self) -> Result<u64> {
        self.control.stop();
        self.consumer
            .join()
            .map_err(|_| anyhow::anyhow!("the probe consumer panicked"))??;
        Ok(self.count.load(Ordering::SeqCst))
    }
}

fn status_kb(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Resident kB of the guest RAM mappings (anonymous mappings of at least half the guest's size).
fn guest_rss_kb(pid: u32, guest_kb: u64) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut total = 0;
    let mut in_guest = false;
    for l in smaps.lines() {
        if let Some(v) = l.strip_prefix("Size:") {
            let size: u64 = v.split_whitespace().next()?.parse().ok()?;
            in_guest = size >= guest_kb / 2;
        } else if let Some(v) = l.strip_prefix("Rss:")
            && in_guest
        {
            total += v.split_whitespace().next()?.parse::<u64>().ok()?;
        }
    }
    Some(total)
}

/// Polls a process's memory every 10 ms: the peak of RSS beyond the guest RAM mappings, and `VmHWM`.
pub struct MemSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<Mutex<(u64, u64)>>,
    handle: JoinHandle<()>,
}

impl MemSampler {
    pub fn start(pid: u32, guest_bytes: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(Mutex::new((0u64, 0u64)));
        let (st, pk) = (stop.clone(), peak.clone());
        let handle = std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                let (Some(rss), Some(hwm)) = (status_kb(pid, "VmRSS:"), status_kb(pid, "VmHWM:")) else {
                    break;
                };
                let guest = guest_rss_kb(pid, guest_bytes / 1024).unwrap_or(0);
                let mut p = pk.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                p.0 = p.0.max(rss.saturating_sub(guest));
                p.1 = p.1.max(hwm);
                drop(p);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Self { stop, peak, handle }
    }

    /// (peak RSS beyond guest RAM, peak VmHWM), MiB.
    pub fn finish(self) -> (f64, f64) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.handle.join();
        let p = *self.peak.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        (p.0 as f64 / 1024.0, p.1 as f64 / 1024.0)
    }
}
