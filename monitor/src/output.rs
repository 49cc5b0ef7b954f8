//! Where the pipeline's events go: stdout, as human lines or JSON (`--json`), and the `--record` trace.

use std::{
    collections::HashMap,
    io::{IsTerminal, Write},
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use migmon_analysis::trace::{
    ArpFrame, Event, FlowSegment, FlowSide, NeighborAdvertFrame, TraceWriter, state_text,
};
use migmon_base::errno_name;

use crate::{decode::mono_now_ns, netns};

/// Where events go: stdout (human or JSON) and the optional trace.
pub struct Output {
    json: bool,
    color: bool,
    start_ns: u64,
    record: Option<TraceWriter>,
    netns_names: HashMap<u64, String>,
    /// When `netns_names` was read.
    names_read: Instant,
    /// Inode of the root namespace (not named in human lines).
    root_netns: Option<u64>,
    stdout: std::io::Stdout,
    /// Lines not yet written: [`Pipeline::consume`] writes them in one go whenever its queue runs empty, and at
    /// least every [`crate::pipeline::FLUSH_EVERY`] ([`Output::flush`]), so a storm costs one `write` per batch
    /// rather than one per event. On a terminal every line is written at once, so it keeps its place among stderr
    /// lines (live verdicts). The `--record` trace is written and flushed with the same batches.
    pending: Vec<u8>,
    tty: bool,
    /// The JSON line of the event being emitted: serialised once for the trace and `--json`.
    line: Vec<u8>,
}

/// [`Output`] writes what it holds once it reaches this many bytes, even while events keep coming.
const OUTPUT_BATCH_BYTES: usize = 64 * 1024;

impl Output {
    pub fn new(json: bool, record: Option<TraceWriter>) -> Self {
        let stdout = std::io::stdout();
        Self {
            json,
            color: !json && stdout.is_terminal(),
            tty: stdout.is_terminal(),
            start_ns: mono_now_ns(),
            record,
            netns_names: netns::names_by_inode(),
            names_read: Instant::now(),
            root_netns: std::fs::metadata("/proc/1/ns/net")
                .ok()
                .map(|m| std::os::unix::fs::MetadataExt::ino(&m)),
            stdout,
            pending: Vec::with_capacity(OUTPUT_BATCH_BYTES + 4096),
            line: Vec::with_capacity(512),
        }
    }

    /// Prints and records one event (into the batch that [`Output::flush`] writes).
    pub fn emit(&mut self, ev: &Event) -> Result<()> {
        if self.json || self.record.is_some() {
            self.line.clear();
            serde_json::to_writer(&mut self.line, ev).context("cannot serialise an event")?;
        }
        if let Some(w) = &mut self.record {
            w.write_line(&self.line)
                .context("cannot append to the --record trace (disk full?)")?;
        }
        // A warning also goes to stderr when stdout is not a terminal (piped, or discarded by the service unit), so
        // the journal or whoever runs the watch sees it; on a terminal its line on stdout is already in view.
        if !self.tty
            && let Event::Note { level, message, .. } = ev
            && level == "warning"
        {
            eprintln!("migmon: warning: {message}");
        }
        if self.json {
            self.pending.extend_from_slice(&self.line);
        } else {
            let line = self.human(ev);
            self.pending.extend_from_slice(line.as_bytes());
        }
        self.pending.push(b'\n');
        if self.tty || self.pending.len() >= OUTPUT_BATCH_BYTES {
            self.write_stdout();
        }
        Ok(())
    }

    /// Ends the `--record` trace with its end record: the observation finished normally. A trace without one reads
    /// as truncated.
    pub fn finish_record(&mut self) -> Result<()> {
        self.flush()?;
        if let Some(w) = self.record.take() {
            w.finish(mono_now_ns())
                .context("cannot write the end record of the --record trace (disk full?)")?;
        }
        Ok(())
    }

    /// Writes the lines [`Output::emit`] holds to stdout and the trace lines to the `--record` file. A closed
    /// stdout (e.g. `| head`) must not stop recording, so stdout's write errors are dropped; the trace's are not.
    pub fn flush(&mut self) -> Result<()> {
        self.write_stdout();
        if let Some(w) = &mut self.record {
            w.flush()
                .context("cannot append to the --record trace (disk full?)")?;
        }
        Ok(())
    }

    fn write_stdout(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut out = self.stdout.lock();
        let _ = out.write_all(&self.pending);
        let _ = out.flush();
        self.pending.clear();
    }

    fn netns_name(&mut self, inode: u64) -> String {
        if inode == 0 || Some(inode) == self.root_netns {
            return String::new();
        }
        // Re-read /run/netns for a new namespace, at most once a second (some never get a name there).
        if !self.netns_names.contains_key(&inode) && self.names_read.elapsed() > Duration::from_secs(1) {
            self.netns_names = netns::names_by_inode();
            self.names_read = Instant::now();
        }
        self.netns_names
            .get(&inode)
            .map_or_else(|| format!("netns:{inode}"), |n| format!("netns:{n}"))
    }

    fn human(&mut self, ev: &Event) -> String {
        let rel = i128::from(ev.ts_ns()) - i128::from(self.start_ns);
        let time = format!("{:+12.6}", rel as f64 / 1e9);
        let kind = ev.kind();
        let colour = match ev {
            Event::TcpError { .. }
            | Event::TcpResetIn { .. }
            | Event::TcpResetOut { .. }
            | Event::Loss { .. }
            | Event::FlowReset { .. }
            | Event::FlowZeroWindow { .. }
            | Event::PortFailed { .. } => "31",
            Event::TcpRetransmit { .. } | Event::Malformed { .. } | Event::FlowRetransmit { .. } => "33",
            Event::TcpState { .. }
            | Event::FlowProgress { .. }
            | Event::FlowOpen { .. }
            | Event::FlowFin { .. } => "32",
            Event::Arp { .. }
            | Event::Garp { .. }
            | Event::Rarp { .. }
            | Event::NeighborAdvert { .. }
            | Event::MacSeen { .. } => "36",
            Event::FdbUpdate { .. } => "35",
            Event::PortAttached { .. } | Event::PortDetached { .. } | Event::MacLearned { .. } => "34",
            _ => "2",
        };
        let kind_col = if self.color {
            format!("\x1b[{colour}m{kind:<14}\x1b[0m")
        } else {
            format!("{kind:<14}")
        };
        let detail = self.detail(ev);
        format!("{time}  {kind_col}  {detail}")
    }

    fn detail(&mut self, ev: &Event) -> String {
        match ev {
            Event::TcpRetransmit { .. }
            | Event::TcpState { .. }
            | Event::TcpError { .. }
            | Event::TcpResetIn { .. }
            | Event::TcpResetOut { .. } => self.tcp_detail(ev),
            Event::Arp { frame, .. } | Event::Garp { frame, .. } | Event::Rarp { frame, .. } => {
                arp_detail(frame)
            }
            Event::NeighborAdvert { frame, .. } => neighbor_advert_detail(frame),
            Event::FdbUpdate {
                bridge,
                port,
                mac,
                vlan,
                ..
            } => format!("{bridge:<20} {mac} now on port {port} vlan={vlan}"),
            Event::MacSeen {
                mac,
                port: p,
                direction,
                gap_ns,
                ..
            } => {
                let when = if *gap_ns == 0 {
                    "first time".to_owned()
                } else {
                    format!("after {:.1} ms of silence", *gap_ns as f64 / 1e6)
                };
                format!("{:<20} {mac} {} {when}", port_name(p), dir_name(*direction))
            }
            Event::MacStats {
                mac,
                port: p,
                direction,
                frames,
                bytes,
                first_ns,
                last_ns,
                ..
            } => format!(
                "{:<20} {mac} {} frames={frames} bytes={bytes} last={:+.6}s span={:.3}s",
                port_name(p),
                dir_name(*direction),
                (i128::from(*last_ns) - i128::from(self.start_ns)) as f64 / 1e9,
                last_ns.saturating_sub(*first_ns) as f64 / 1e9
            ),
            Event::Loss { cpu, count, .. } => format!("cpu {cpu}: {count} events lost (ring buffer full)"),
            Event::Malformed { port: p, count, .. } => {
                format!(
                    "{:<20} {count} frames passed unread (truncated or odd)",
                    port_name(p)
                )
            }
            Event::Note { level, message, .. } => format!("{level}: {message}"),
            Event::Skipped {
                source,
                reason,
                count,
                ..
            } => format!("{source:<20} {count} inputs skipped so far ({reason})"),
            Event::Migration { .. } | Event::ClockOffset { .. } => describe_source(ev),
            Event::ClockSample {
                realtime_ns,
                uncertainty_ns,
                ..
            } => format!(
                "clocks               realtime {:.6} s (± {} ns)",
                *realtime_ns as f64 / 1e9,
                uncertainty_ns
            ),
            Event::FlowOpen { seg, .. }
            | Event::FlowRetransmit { seg, .. }
            | Event::FlowReset { seg, .. }
            | Event::FlowFin { seg, .. }
            | Event::FlowZeroWindow { seg, .. }
            | Event::FlowProgress { seg, .. } => flow_detail(ev, seg),
            Event::FlowTable {
                inserts,
                entries,
                evictions,
                insert_failed,
                capture_dropped,
                fragments,
                ..
            } => format!(
                "flows: {entries} tracked, {inserts} picked up, {evictions} evicted, {insert_failed} not inserted, \
                 {capture_dropped} records without frame bytes, {fragments} later fragments skipped"
            ),
            Event::PortAttached { .. }
            | Event::PortDetached { .. }
            | Event::PortFailed { .. }
            | Event::MacLearned { .. } => port_detail(ev),
        }
    }

    /// A socket event: the 4-tuple, what happened, the socket's namespace.
    fn tcp_detail(&mut self, ev: &Event) -> String {
        match ev {
            Event::TcpRetransmit {
                tcp,
                state,
                retransmits,
                backoff,
                rto_us,
                srtt_us,
                retransmit_kind,
                ..
            } => format!(
                "{:<44} {:<12} {}retransmits={retransmits} backoff={backoff} rto={}ms srtt={:.1}ms {}",
                tuple(&tcp.tuple),
                state_text(*state),
                retransmit_kind.map_or(String::new(), |k| format!("{k:?} ").to_lowercase()),
                rto_us / 1000,
                *srtt_us as f64 / 1000.0,
                self.netns_name(tcp.netns)
            ),
            Event::TcpState {
                tcp,
                old_state,
                new_state,
                ..
            } => format!(
                "{:<44} {} -> {} {}",
                tuple(&tcp.tuple),
                state_text(*old_state),
                state_text(*new_state),
                self.netns_name(tcp.netns)
            ),
            Event::TcpError {
                tcp, errno, state, ..
            } => format!(
                "{:<44} errno={errno} ({}) {} {}",
                tuple(&tcp.tuple),
                errno_name(*errno),
                state_text(*state),
                self.netns_name(tcp.netns)
            ),
            Event::TcpResetIn { tcp, state, .. } | Event::TcpResetOut { tcp, state, .. } => {
                format!(
                    "{:<44} {} {}",
                    tuple(&tcp.tuple),
                    state_text(*state),
                    self.netns_name(tcp.netns)
                )
            }
            _ => String::new(),
        }
    }
}

/// ` vlan=OUTER.INNER` for a tagged frame, nothing for an untagged one.
fn vlan_text(vlan: &[u16]) -> String {
    if vlan.is_empty() {
        return String::new();
    }
    let tags: Vec<String> = vlan.iter().map(u16::to_string).collect();
    format!(" vlan={}", tags.join("."))
}

/// An ARP-family frame: where, from whom, who-has/is-at, VLAN tags, length.
fn arp_detail(frame: &ArpFrame) -> String {
    let vlan = vlan_text(&frame.vlan);
    format!(
        "{:<20} {} op={} {} ({}) -> {} ({}){vlan} len={}",
        port_name(&frame.port),
        frame.mac,
        frame.op,
        frame.spa,
        frame.sha,
        frame.tpa,
        frame.tha,
        frame.len
    )
}

/// An announcing neighbor advertisement: port, source MAC, target (and its link-layer address), addresses, flags.
fn neighbor_advert_detail(frame: &NeighborAdvertFrame) -> String {
    let vlan = vlan_text(&frame.vlan);
    let flags: String = [
        (frame.router, 'R'),
        (frame.solicited, 'S'),
        (frame.override_, 'O'),
    ]
    .iter()
    .filter_map(|&(on, c)| on.then_some(c))
    .collect();
    format!(
        "{:<20} {} target {} ({}) {} -> {} flags={}{vlan} len={}",
        port_name(&frame.port),
        frame.mac,
        frame.target,
        frame
            .tlla
            .map_or_else(|| "no lladdr".to_owned(), |m| m.to_string()),
        frame.src_ip,
        frame.dst_ip,
        if flags.is_empty() { "-" } else { &flags },
        frame.len
    )
}

/// A segment the flow tracker reported: the port, which side sent it, its flags, sequence numbers and window.
fn flow_detail(ev: &Event, seg: &FlowSegment) -> String {
    let (from, to, who) = match seg.side {
        FlowSide::Vm => ((seg.vm_addr, seg.vm_port), (seg.peer_addr, seg.peer_port), "vm  "),
        FlowSide::Peer => ((seg.peer_addr, seg.peer_port), (seg.vm_addr, seg.vm_port), "peer"),
    };
    let extra = match ev {
        Event::FlowRetransmit { .. } => format!(
            " retransmits={} gap={:.1}ms silence={:.1}ms",
            seg.retransmits,
            seg.gap_ns as f64 / 1e6,
            seg.silence_ns as f64 / 1e6
        ),
        Event::FlowProgress { .. } => format!(" after {:.1}ms quiet", seg.gap_ns as f64 / 1e6),
        _ => String::new(),
    };
    format!(
        "{:<20} {who} {} -> {} [{}] seq={} ack={} len={} win={}{extra}",
        port_name(&seg.port),
        SocketAddr::new(from.0, from.1),
        SocketAddr::new(to.0, to.1),
        tcp_flag_names(seg.tcp_flags),
        seg.seq,
        seg.ack,
        seg.len,
        seg.window
    )
}

/// `S.`-style TCP flags, as tcpdump writes them.
fn tcp_flag_names(flags: u8) -> String {
    let mut s = String::new();
    for (bit, c) in [(0x02, 'S'), (0x01, 'F'), (0x04, 'R'), (0x08, 'P'), (0x10, '.')] {
        if flags & bit != 0 {
            s.push(c);
        }
    }
    if s.is_empty() {
        s.push_str("none");
    }
    s
}

/// A port as human lines print it: `iface@netns`, or `ifN`.
fn port_name(p: &migmon_analysis::trace::Port) -> String {
    let name = p.iface.clone().unwrap_or_else(|| format!("if{}", p.ifindex));
    match &p.netns {
        Some(ns) => format!("{name}@{ns}"),
        None => name,
    }
}

fn dir_name(d: migmon_analysis::trace::Direction) -> &'static str {
    match d {
        migmon_analysis::trace::Direction::Ingress => "ingress",
        migmon_analysis::trace::Direction::Egress => "egress",
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            eprintln!("migmon: warning: {e:#}");
        }
    }
}

fn tuple(t: &migmon_analysis::trace::FourTuple) -> String {
    let ep = |ip: std::net::IpAddr, port: u16| match ip {
        std::net::IpAddr::V4(a) => format!("{a}:{port}"),
        std::net::IpAddr::V6(a) => format!("[{a}]:{port}"),
    };
    format!("{} -> {}", ep(t.saddr, t.sport), ep(t.daddr, t.dport))
}

/// A human line for the events of the pause sources (`migmon watch` without `--json`).
fn describe_source(ev: &Event) -> String {
    match ev {
        Event::Migration { ev, source } => {
            let what = match &ev.phase {
                migevents::Phase::Setup {
                    mode,
                    ram_bytes,
                    host,
                    ..
                } => format!("setup {mode:?} {} MiB {host}", ram_bytes >> 20).to_lowercase(),
                migevents::Phase::Round { n, pages, bytes, .. } => {
                    format!("round {n}: {pages} pages, {:.1} MiB", *bytes as f64 / 1_048_576.0)
                }
                migevents::Phase::Pause => "PAUSE".to_owned(),
                migevents::Phase::StateSent => "state sent".to_owned(),
                migevents::Phase::Resume => "RESUME".to_owned(),
                migevents::Phase::Announce { n } => format!("announce {n}"),
                migevents::Phase::Complete {
                    total_ms, pause_ms, ..
                } => format!("complete: total {total_ms:.1} ms, pause {pause_ms:.1} ms"),
                migevents::Phase::Failed { reason } => format!("FAILED: {reason}"),
                migevents::Phase::Rollback => "ROLLBACK".to_owned(),
            };
            format!(
                "{:<20} {} {:?} {what} [{source}]",
                ev.migration_id, ev.mac, ev.role
            )
            .to_owned()
        }
        Event::ClockOffset {
            source,
            wall_minus_mono_ns,
            ..
        } => format!(
            "{source:<20} wall − monotonic = {:.6} s",
            *wall_minus_mono_ns as f64 / 1e9
        ),
        Event::Note { level, message, .. } => format!("{level:<20} {message}"),
        other => serde_json::to_string(other).unwrap_or_default(),
    }
}

/// A port coming or going, or a MAC learned.
fn port_detail(ev: &Event) -> String {
    let on = |bridge: &Option<String>| {
        bridge
            .as_ref()
            .map_or(String::new(), |b| format!(" (bridge {b})"))
    };
    match ev {
        Event::PortAttached {
            ts_ns,
            port,
            bridge,
            hooks,
            origin,
            notified_ns,
        } => {
            let after = notified_ns.map_or(String::new(), |n| {
                format!(
                    ", {:.3} ms after it appeared",
                    ts_ns.saturating_sub(n) as f64 / 1e6
                )
            });
            format!(
                "{:<20} attached: {} [{origin}]{}{after}",
                port_name(port),
                hooks.join(", "),
                on(bridge)
            )
        }
        Event::PortDetached {
            port, bridge, reason, ..
        } => format!("{:<20} detached: {reason}{}", port_name(port), on(bridge)),
        Event::PortFailed {
            port, bridge, error, ..
        } => format!("{:<20} NOT WATCHED: {error}{}", port_name(port), on(bridge)),
        Event::MacLearned {
            mac,
            source,
            iface,
            netns,
            ..
        } => {
            let at = match (iface, netns) {
                (Some(i), Some(n)) => format!(" on {i}@{n}"),
                (Some(i), None) => format!(" on {i}"),
                _ => String::new(),
            };
            format!("{mac} watched from now on (learned from {source}{at})")
        }
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trace_is_written_per_batch_and_whole_at_the_end() {
        let path = std::env::temp_dir().join(format!("migmon-output-{}.trace", std::process::id()));
        let record = TraceWriter::create(&path, &crate::clocks::trace_header(Some("t"))).unwrap();
        let header_len = std::fs::metadata(&path).unwrap().len();
        let mut out = Output::new(true, Some(record));
        let events: Vec<Event> = (0..100)
            .map(|i| Event::Loss {
                ts_ns: i,
                cpu: 0,
                count: 1,
            })
            .collect();
        for e in &events {
            out.emit(e).unwrap();
        }
        // Held until the batch is written.
        assert_eq!(std::fs::metadata(&path).unwrap().len(), header_len);
        out.flush().unwrap();
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert_eq!(lines, 101, "the header and every event");
        out.finish_record().unwrap();
        let trace = migmon_analysis::trace::read_trace(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(trace.events, events);
        assert!(trace.damage().is_empty(), "{:?}", trace.damage());
    }

    #[test]
    fn human_lines_for_pause_sources() {
        let ev = migmon_analysis::fixtures::mig(
            1,
            "m1",
            "52:54:00:00:00:01",
            migevents::Role::Source,
            migevents::Phase::Pause,
            "qmp",
        );
        assert_eq!(
            describe_source(&ev),
            "m1                   52:54:00:00:00:01 Source PAUSE [qmp]"
        );
        let off = Event::ClockOffset {
            ts_ns: 0,
            source: "qmp:/run/a".into(),
            wall_minus_mono_ns: 1_500_000_000,
        };
        assert!(describe_source(&off).ends_with("wall − monotonic = 1.500000 s"));
    }
}
