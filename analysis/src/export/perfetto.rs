//! Perfetto export: a `perfetto.protos.Trace` of track events, encoded by hand (a few dozen bytes of protobuf
//! wire format do not need a code generator).
//!
//! Tracks: per migration, a parent track with children for the phases (pre-copy, stop-and-copy, convergence as
//! slices; rounds and announces as instants), the L2 events of the VM (RARP, GARP, FDB moves, first frames,
//! black-holed frames), and one track per judged connection (a "recovering" slice from its first retransmission to
//! its recovery or abort, retransmit instants, the abort). A global "L2 events" track holds every ARP/RARP/FDB event
//! of the trace. Timestamps are the trace's `CLOCK_MONOTONIC` ns.
//!
//! Field numbers (from perfetto's protos): `Trace.packet` = 1; `TracePacket`: `timestamp` = 8,
//! `trusted_packet_sequence_id` = 10, `track_event` = 11, `sequence_flags` = 13, `track_descriptor` = 60;
//! `TrackDescriptor`: `uuid` = 1, `name` = 2, `parent_uuid` = 5; `TrackEvent`: `debug_annotations` = 4, `type` = 9,
//! `track_uuid` = 11, `categories` = 22, `name` = 23; `DebugAnnotation`: `string_value` = 6, `name` = 10.

use std::{
    fs,
    io::{self},
    path::Path,
};

use crate::{
    correlate::{Analysis, ConnectionVerdict, Fate, MigrationReport, Timeline, fmt_dur},
    trace::{Event, Trace},
};

const SEQ: u64 = 0x6d69_676d; // "migm"
const TYPE_SLICE_BEGIN: u64 = 1;
const TYPE_SLICE_END: u64 = 2;
const TYPE_INSTANT: u64 = 3;

fn varint(buf: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            buf.push(b);
            return;
        }
        buf.push(b | 0x80);
    }
}

fn field_varint(buf: &mut Vec<u8>, field: u32, v: u64) {
    varint(buf, u64::from(field) << 3);
    varint(buf, v);
}

fn field_bytes(buf: &mut Vec<u8>, field: u32, data: &[u8]) {
    varint(buf, (u64::from(field) << 3) | 2);
    varint(buf, data.len() as u64);
    buf.extend_from_slice(data);
}

#[derive(Default)]
struct Builder {
    out: Vec<u8>,
    next_uuid: u64,
    first: bool,
}

impl Builder {
    fn packet(&mut self, body: &[u8]) {
        field_bytes(&mut self.out, 1, body);
    }

    fn track(&mut self, name: &str, parent: Option<u64>) -> u64 {
        self.next_uuid += 1;
        let uuid = 0x4d49_0000_0000 + self.next_uuid;
        let mut td = Vec::new();
        field_varint(&mut td, 1, uuid);
        field_bytes(&mut td, 2, name.as_bytes());
        if let Some(p) = parent {
            field_varint(&mut td, 5, p);
        }
        let mut pkt = Vec::new();
        field_bytes(&mut pkt, 60, &td);
        field_varint(&mut pkt, 10, SEQ);
        if !self.first {
            // SEQ_INCREMENTAL_STATE_CLEARED on the first packet of the sequence.
            field_varint(&mut pkt, 13, 1);
            self.first = true;
        }
        self.packet(&pkt);
        uuid
    }

    fn event(
        &mut self,
        ts: u64,
        track: u64,
        kind: u64,
        name: Option<&str>,
        cat: &str,
        args: &[(&str, String)],
    ) {
        let mut te = Vec::new();
        for (k, v) in args {
            let mut da = Vec::new();
            field_bytes(&mut da, 10, k.as_bytes());
            field_bytes(&mut da, 6, v.as_bytes());
            field_bytes(&mut te, 4, &da);
        }
        field_varint(&mut te, 9, kind);
        field_varint(&mut te, 11, track);
        field_bytes(&mut te, 22, cat.as_bytes());
        if let Some(n) = name {
            field_bytes(&mut te, 23, n.as_bytes());
        }
        let mut pkt = Vec::new();
        field_varint(&mut pkt, 8, ts);
        field_varint(&mut pkt, 10, SEQ);
        field_bytes(&mut pkt, 11, &te);
        self.packet(&pkt);
    }

    fn slice(&mut self, track: u64, from: u64, to: u64, name: &str, cat: &str, args: &[(&str, String)]) {
        self.event(from, track, TYPE_SLICE_BEGIN, Some(name), cat, args);
        self.event(to.max(from), track, TYPE_SLICE_END, None, cat, &[]);
    }

    fn instant(&mut self, track: u64, ts: u64, name: &str, cat: &str, args: &[(&str, String)]) {
        self.event(ts, track, TYPE_INSTANT, Some(name), cat, args);
    }
}

/// Encodes the trace: a track per migration with its phases, its L2 sightings and a track per connection, then
/// every L2 event.
pub fn encode(t: &Trace, a: &Analysis) -> Vec<u8> {
    let mut b = Builder::default();
    if !a.warnings.is_empty() {
        let track = b.track("WARNINGS", None);
        for w in &a.warnings {
            b.instant(track, a.start_ns, w, "warning", &[]);
        }
    }
    for m in &a.migrations {
        let root = b.track(
            &format!(
                "migration {} ({}) VM {}",
                m.id,
                m.mode.as_deref().unwrap_or("?"),
                m.mac_text()
            ),
            None,
        );
        let phases = b.track("phases", Some(root));
        phase_events(&mut b, phases, m);
        let l2 = b.track("L2 (VM's MAC)", Some(root));
        l2_events(&mut b, l2, &m.timeline);
        for c in &m.connections {
            connection_track(&mut b, root, c);
        }
    }
    let all = b.track("L2 events (all)", None);
    all_l2_events(&mut b, all, t);
    b.out
}

/// Pre-copy, the pause, the convergence, the rounds and the announces.
fn phase_events(b: &mut Builder, phases: u64, m: &MigrationReport) {
    let tl = &m.timeline;
    let pause = tl.pause.as_ref().map(|p| p.ts_ns);
    let resume = tl.resume.as_ref().map(|r| r.ts_ns);
    if let (Some(s), Some(p)) = (tl.setup.as_ref().map(|s| s.ts_ns), pause) {
        b.slice(
            phases,
            s,
            p,
            "pre-copy",
            "migration",
            &[("rounds", tl.rounds.len().to_string())],
        );
    }
    if let (Some(p), Some(r)) = (pause, resume) {
        let src = tl
            .pause
            .as_ref()
            .map(|s| s.source.to_string())
            .unwrap_or_default();
        b.slice(
            phases,
            p,
            r,
            "vCPU paused",
            "migration",
            &[("source", src), ("duration", fmt_dur(r.saturating_sub(p)))],
        );
    }
    if let (Some(r), Some(c)) = (resume, &m.downtime.convergence) {
        b.slice(
            phases,
            r,
            r + c.ns,
            "convergence",
            "migration",
            &[("basis", c.basis.clone())],
        );
    }
    for r in &tl.rounds {
        b.instant(
            phases,
            r.ts_ns,
            &format!("round {}", r.n),
            "migration",
            &[("pages", r.pages.to_string()), ("bytes", r.bytes.to_string())],
        );
    }
    for an in &tl.announces {
        b.instant(phases, an.ts_ns, "announce", "migration", &[]);
    }
}

/// The VM's sightings around the move, the FDB moves and the black-holed frames.
fn l2_events(b: &mut Builder, l2: u64, tl: &Timeline) {
    for (name, s) in [
        ("last VM frame (old port)", &tl.last_vm_frame_old_port),
        ("last frame to VM (old port)", &tl.last_frame_to_vm_old_port),
        ("first RARP", &tl.first_rarp),
        ("first GARP", &tl.first_garp),
        ("first NA", &tl.first_na),
        ("first VM frame (new port)", &tl.first_vm_frame_new_port),
        ("first frame to VM (new port)", &tl.first_frame_to_vm_new_port),
    ] {
        if let Some(s) = s {
            b.instant(l2, s.ts_ns, name, "l2", &[("port", s.port.clone())]);
        }
    }
    for f in &tl.fdb_moves {
        b.instant(
            l2,
            f.ts_ns,
            &format!("FDB move {}", f.bridge),
            "l2",
            &[
                ("from", f.from_port.clone().unwrap_or_default()),
                ("to", f.to_port.clone()),
            ],
        );
    }
    for h in &tl.black_holed {
        b.instant(
            l2,
            h.last_ns,
            &format!("{} frames black-holed", h.frames),
            "l2",
            &[("port", h.port.clone())],
        );
    }
}

/// A connection's track: its recovery, retransmissions and fate.
fn connection_track(b: &mut Builder, root: u64, c: &ConnectionVerdict) {
    let name = format!(
        "{}:{} → {}:{}",
        c.tuple.saddr, c.tuple.sport, c.tuple.daddr, c.tuple.dport
    );
    let tr = b.track(&name, Some(root));
    let end = match c.fate {
        Fate::Aborted { at_ns, .. } => Some(at_ns),
        _ => c.first_progress_ns,
    };
    if let (Some(first), Some(end)) = (c.first_retransmit_ns, end) {
        b.slice(
            tr,
            first,
            end,
            "recovering",
            "tcp",
            &[("fate", c.fate.to_string()), ("basis", c.progress_basis.clone())],
        );
    }
    for (i, &t) in c.retransmit_ns.iter().enumerate() {
        b.instant(tr, t, &format!("retransmit #{}", i + 1), "tcp", &[]);
    }
    match c.fate {
        Fate::Aborted { at_ns, reason } => {
            b.instant(tr, at_ns, &format!("aborted: {reason}"), "tcp", &[]);
        }
        Fate::Survived => {
            if let Some(p) = c.first_progress_ns {
                b.instant(
                    tr,
                    p,
                    "forward progress",
                    "tcp",
                    &[("basis", c.progress_basis.clone())],
                );
            }
        }
        Fate::Unresolved => {}
    }
}

/// Every ARP-family frame and FDB update in the trace, in time order.
fn all_l2_events(b: &mut Builder, all: u64, t: &Trace) {
    let mut events: Vec<&Event> = t.events.iter().collect();
    events.sort_by_key(|e| e.ts_ns());
    for e in events {
        match e {
            Event::Arp { ts_ns, frame } | Event::Garp { ts_ns, frame } | Event::Rarp { ts_ns, frame } => {
                b.instant(
                    all,
                    *ts_ns,
                    &format!("{} {}", e.kind(), frame.mac),
                    "l2",
                    &[("port", frame.port.to_string()), ("spa", frame.spa.to_string())],
                );
            }
            Event::NeighborAdvert { ts_ns, frame } => {
                b.instant(
                    all,
                    *ts_ns,
                    &format!("{} {}", e.kind(), frame.mac),
                    "l2",
                    &[
                        ("port", frame.port.to_string()),
                        ("target", frame.target.to_string()),
                    ],
                );
            }
            Event::FdbUpdate {
                ts_ns,
                bridge,
                port,
                mac,
                ..
            } => b.instant(
                all,
                *ts_ns,
                &format!("fdb {mac} → {port}"),
                "l2",
                &[("bridge", bridge.clone())],
            ),
            _ => {}
        }
    }
}

/// Writes the file.
pub fn write(path: &Path, t: &Trace, a: &Analysis) -> io::Result<()> {
    fs::write(path, encode(t, a))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{correlate::correlate, fixtures::quick_trace};

    /// A tiny protobuf reader: (field, wire type, varint value or bytes).
    fn fields(mut b: &[u8]) -> Vec<(u32, u64, Vec<u8>)> {
        fn read_varint(b: &mut &[u8]) -> u64 {
            let mut v = 0u64;
            let mut shift = 0;
            loop {
                let byte = b[0];
                *b = &b[1..];
                v |= u64::from(byte & 0x7f) << shift;
                if byte & 0x80 == 0 {
                    return v;
                }
                shift += 7;
            }
        }
        let mut out = Vec::new();
        while !b.is_empty() {
            let key = read_varint(&mut b);
            let (field, wt) = ((key >> 3) as u32, key & 7);
            match wt {
                0 => out.push((field, read_varint(&mut b), Vec::new())),
                2 => {
                    let len = read_varint(&mut b) as usize;
                    out.push((field, 0, b[..len].to_vec()));
                    b = &b[len..];
                }
                _ => panic!("unexpected wire type {wt}"),
            }
        }
        out
    }

    fn string(fs: &[(u32, u64, Vec<u8>)], f: u32) -> Option<String> {
        fs.iter()
            .find(|x| x.0 == f)
            .map(|x| String::from_utf8(x.2.clone()).unwrap())
    }

    #[test]
    fn parses_back_into_tracks_and_events() {
        let ev = quick_trace();
        let t = Trace {
            events: ev.clone(),
            ..Trace::default()
        };
        let bytes = encode(&t, &correlate(&ev));
        let packets: Vec<Vec<(u32, u64, Vec<u8>)>> = fields(&bytes)
            .into_iter()
            .map(|(f, _, body)| {
                assert_eq!(f, 1, "Trace has only packets");
                fields(&body)
            })
            .collect();
        let mut tracks = std::collections::HashMap::new();
        let mut names = Vec::new();
        let mut depth: std::collections::HashMap<u64, i32> = std::collections::HashMap::new();
        for p in &packets {
            assert!(p.iter().any(|f| f.0 == 10 && f.1 == SEQ));
            if let Some(td) = p.iter().find(|f| f.0 == 60) {
                let td = fields(&td.2);
                tracks.insert(td.iter().find(|f| f.0 == 1).unwrap().1, string(&td, 2).unwrap());
            }
            if let Some(te) = p.iter().find(|f| f.0 == 11) {
                let te = fields(&te.2);
                let track = te.iter().find(|f| f.0 == 11).unwrap().1;
                assert!(tracks.contains_key(&track), "event on an undeclared track");
                assert!(p.iter().any(|f| f.0 == 8), "event without a timestamp");
                let kind = te.iter().find(|f| f.0 == 9).unwrap().1;
                *depth.entry(track).or_default() += match kind {
                    1 => 1,
                    2 => -1,
                    _ => 0,
                };
                if let Some(n) = string(&te, 23) {
                    names.push(n);
                }
            }
        }
        assert!(depth.values().all(|d| *d == 0), "every slice ends");
        let tn: Vec<&String> = tracks.values().collect();
        assert!(tn.iter().any(|n| n.starts_with("migration quick-1 (quick)")));
        assert!(tn.iter().any(|n| *n == "phases"));
        assert!(tn.iter().any(|n| n.contains(":41001 → 10.77.0.2:7")));
        for n in [
            "vCPU paused",
            "pre-copy",
            "retransmit #3",
            "aborted: ETIMEDOUT",
            "aborted: RST received",
            "forward progress",
        ] {
            assert!(names.iter().any(|x| x == n), "missing event {n}: {names:?}");
        }
    }
}
