//! `migmon watch --metrics` stays bounded: 40 s of loopback TCP churn (all TCP reported, some thousands of events a
//! second) with a simulated migration every 8 s on the events socket. Every migration is released once final (the
//! `migmon_live_released_migrations` gauge), the events held never exceed what the look-back and a held window
//! can hold at the measured rate, the oldest held event is never much older than the look-back, the residue of
//! older events stays what open connections need (the churn's closed connections leave it), and RSS grows by less
//! than 16 MiB between the 10th second and the end. No timing is asserted: the long version with the CPU and
//! scrape targets is `./x bench --only soak`.

#![expect(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use integration_tests::{TestDir, migmon_bin, wait_until};
use migevents::{EventSink, MigrationEvent, Mode, Phase, Role};
use testbed::churn::Churn;

const LOOKBACK_S: f64 = 5.0;
const SETTLE_S: f64 = 1.0;

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn scrape(addr: &str) -> String {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn metric(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split([' ', '{']).next() == Some(name))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))?
                .split_whitespace()
                .next()?
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |k| k / 1024.0)
}

fn migrate(sock: &std::path::Path, n: u32) {
    let id = format!("soak-test-{}-{n}", std::process::id());
    let mac = "52:54:00:5a:00:02";
    let mut sink = EventSink::open(sock).expect("events socket");
    let setup = Phase::Setup {
        mode: Mode::Live,
        ram_bytes: 64 << 20,
        ips: vec!["10.99.0.2".to_owned()],
        host: "t".to_owned(),
        carries_frames: true,
    };
    for (role, phase) in [(Role::Source, setup), (Role::Source, Phase::Pause)] {
        sink.send(&MigrationEvent::now(&id, mac, role, phase)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(10));
    sink.send(&MigrationEvent::now(&id, mac, Role::Destination, Phase::Resume))
        .unwrap();
}

/// `migmon watch` with all TCP, metrics, a 5 s look-back and a 1 s settle; returns it and its metrics address.
fn start_watch(dir: &TestDir) -> (Child, String) {
    let log = dir.join("watch.log");
    let child = Command::new(migmon_bin())
        .args(["watch", "--tcp", "sockets", "--json", "--metrics", "127.0.0.1:0"])
        .args(["--lookback", "5s", "--settle", "1s", "--events-listen"])
        .arg(dir.join("events.sock"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start migmon");
    let child = Child(child);
    let mut addr = String::new();
    let up = wait_until(Duration::from_secs(60), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(a) = text
            .lines()
            .find_map(|l| l.strip_prefix("migmon: metrics on http://"))
            .and_then(|l| l.strip_suffix("/metrics"))
            && text.contains("migmon: watching")
        {
            a.clone_into(&mut addr);
            return true;
        }
        false
    });
    assert!(
        up,
        "migmon did not start: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    (child, addr)
}

#[test]
fn memory_stays_bounded_under_churn_and_windows_are_released() {
    let dir = TestDir::new("migmon-soak");
    let sock = dir.join("events.sock");
    let (child, addr) = start_watch(&dir);
    let pid = child.0.id();
    let churn = Churn::start(TcpListener::bind("127.0.0.1:0").unwrap(), 500).unwrap();

    let start = Instant::now();
    let mut sent = 0;
    let mut rss_at_10s = None;
    let mut worst_held: (f64, f64) = (0.0, 0.0);
    let mut worst_age: f64 = 0.0;
    let mut last_events = (0.0, Instant::now());
    while start.elapsed() < Duration::from_secs(40) {
        if start.elapsed() >= Duration::from_secs(2 + 8 * u64::from(sent)) {
            migrate(&sock, sent);
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(500));
        let body = scrape(&addr);
        let events = metric(&body, "migmon_events_total");
        let rate = (events - last_events.0) / last_events.1.elapsed().as_secs_f64();
        last_events = (events, Instant::now());
        let held = metric(&body, "migmon_live_held_events");
        // What the look-back, a held window (settle + the gate's pace) and the gate's intake can hold at this rate.
        let bound = rate.max(1000.0) * (LOOKBACK_S + SETTLE_S + 5.0);
        if start.elapsed() > Duration::from_secs(10) && held / bound > worst_held.0 / worst_held.1.max(1.0) {
            worst_held = (held, bound);
        }
        worst_age = worst_age.max(metric(&body, "migmon_live_oldest_held_seconds"));
        if rss_at_10s.is_none() && start.elapsed() >= Duration::from_secs(10) {
            rss_at_10s = Some(rss_mib(pid));
        }
    }
    let rss_end = rss_mib(pid);
    let events = last_events.0;
    drop(churn);

    // Every migration is released: settled, verdict kept, events gone (polled on the gauge, with a deadline).
    let released = wait_until(Duration::from_secs(20), || {
        metric(&scrape(&addr), "migmon_live_released_migrations") >= f64::from(sent)
    });
    let body = scrape(&addr);
    assert!(
        released,
        "not every migration was released ({sent} sent):\n{body}"
    );
    assert!(
        metric(&body, "migmon_migrations_total") >= f64::from(sent),
        "{body}"
    );
    assert!(
        events > 40_000.0,
        "too little churn to measure: {events} events\n{body}"
    );
    assert!(
        worst_held.0 <= worst_held.1,
        "held {} events, more than the bound {}",
        worst_held.0,
        worst_held.1
    );
    assert!(
        worst_age <= LOOKBACK_S + SETTLE_S + 10.0,
        "oldest held event {worst_age} s old"
    );
    // The listening sockets, the connections open now, and the few open between two condensations: never the
    // thousands of connections the churn closed.
    let residue = metric(&body, "migmon_live_residue_events");
    assert!(residue <= 500.0, "residue of {residue} events\n{body}");
    let growth = rss_end - rss_at_10s.unwrap_or(rss_end);
    eprintln!(
        "soak test: {events} events, {sent} migrations, RSS {:.1} → {rss_end:.1} MiB, held at most {:.0} (bound {:.0}), oldest {worst_age:.1} s",
        rss_at_10s.unwrap_or(0.0),
        worst_held.0,
        worst_held.1
    );
    assert!(growth < 16.0, "RSS grew by {growth:.1} MiB");
    drop(child);
}
