//! Property-based fuzzing of the pause sources' line parsers: migrator event lines, QMP lines (a whole session of
//! them through one translator, so its state sees the damage too) and the line splitter under them. Inputs are
//! valid lines with bytes overwritten, cut or spliced, and arbitrary bytes. The oracle: no panic, and every event
//! out of a translator carries a time a trace accepts.
//!
//! `cargo test` runs each target with 256 cases from a fixed seed; `MIGMON_FUZZ_CASES` and `MIGMON_FUZZ_SEED`
//! change that (`./x fuzz` runs them longer, with fresh seeds).

use std::path::Path;

use migmon_base::fuzz::runner;
use proptest::{collection::vec, prelude::*};

use super::{LineReader, migrator::parse_line, qmp::QmpTranslator};

const MIGRATOR_LINES: &[&str] = &[
    r#"{"ts_ns":1000,"migration_id":"m1","mac":"52:54:00:00:00:01","role":"source","event":"setup","mode":"live","ram_bytes":268435456,"host":"a","ips":["10.0.0.2"]}"#,
    r#"{"ts_ns":2000,"migration_id":"m1","mac":"52:54:00:00:00:01","role":"source","event":"round","n":0,"pages":100,"bytes":409600,"bandwidth":1000000}"#,
    r#"{"ts_ns":3000,"migration_id":"m1","mac":"52:54:00:00:00:01","role":"source","event":"pause"}"#,
    r#"{"ts_ns":4000,"migration_id":"m1","mac":"52:54:00:00:00:01","role":"destination","event":"resume"}"#,
    r#"{"ts_ns":5000,"migration_id":"m1","mac":"52:54:00:00:00:01","role":"source","event":"complete","total_ms":12.5,"pause_ms":3.25}"#,
    r#"{"ts_ns":6000,"migration_id":"m1","mac":"52:54:00:00:00:01","role":"source","event":"failed","reason":"x"}"#,
];

const QMP_LINES: &[&str] = &[
    r#"{"QMP": {"version": {"qemu": {"major": 9}}, "capabilities": []}}"#,
    r#"{"return": {}, "id": "migmon-caps"}"#,
    r#"{"return": [{"name": "net0", "main-mac": "52:54:00:AA:00:01"}], "id": "migmon-mac"}"#,
    r#"{"event": "MIGRATION", "data": {"status": "setup"}, "timestamp": {"seconds": 2, "microseconds": 0}}"#,
    r#"{"event": "MIGRATION_PASS", "data": {"pass": 1}, "timestamp": {"seconds": 2, "microseconds": 10}}"#,
    r#"{"event": "STOP", "timestamp": {"seconds": 2, "microseconds": 400}}"#,
    r#"{"event": "RESUME", "timestamp": {"seconds": 2, "microseconds": 500}}"#,
    r#"{"event": "MIGRATION", "data": {"status": "completed"}, "timestamp": {"seconds": 3, "microseconds": 0}}"#,
    r#"{"return": {"status": "completed", "total-time": 470, "downtime": 9, "ram": {"transferred": 1234}}, "id": "migmon-done"}"#,
    r#"{"event": "MIGRATION", "data": {"status": "failed"}, "timestamp": {"seconds": 9223372036, "microseconds": 999999}}"#,
];

/// A line from `pool` with bytes overwritten, cut and junk spliced in, or arbitrary bytes.
fn damaged_line(pool: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop_oneof![
        3 => (
            0..pool.len(),
            vec((any::<usize>(), any::<u8>()), 0..4),
            proptest::option::of(any::<usize>()),
            proptest::option::of((any::<usize>(), "[ -~]{0,12}|-?[0-9]{1,24}")),
        )
            .prop_map(move |(i, flips, cut, splice)| {
                let mut b = pool[i].as_bytes().to_vec();
                for (at, v) in flips {
                    let at = at % b.len();
                    b[at] = v;
                }
                if let Some((at, junk)) = splice {
                    let at = at % (b.len() + 1);
                    b.splice(at..at, junk.into_bytes());
                }
                if let Some(cut) = cut {
                    b.truncate(cut % (b.len() + 1));
                }
                String::from_utf8_lossy(&b).into_owned()
            }),
        1 => vec(any::<u8>(), 0..80).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ]
}

#[test]
fn fuzz_migrator_event_lines() {
    runner()
        .run(&damaged_line(MIGRATOR_LINES), |line| {
            if let Some(ev) = parse_line(&line, "fuzz", 1) {
                prop_assert!(ev.check_times().is_ok(), "{ev:?}");
                let _ = serde_json::to_string(&ev).unwrap();
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn fuzz_qmp_sessions() {
    runner()
        .run(
            &(vec(damaged_line(QMP_LINES), 1..12), any::<i64>()),
            |(lines, offset)| {
                // A measured offset is small; an arbitrary one must not break the conversion either.
                let offset = if offset % 2 == 0 { 0 } else { offset };
                let mut t = QmpTranslator::new(Path::new("/run/fuzz.qmp"), offset);
                let _ = t.initial_commands();
                for l in &lines {
                    let (events, _replies) = t.line(l);
                    for e in &events {
                        prop_assert!(e.check_times().is_ok(), "{e:?}");
                        let _ = serde_json::to_string(e).unwrap();
                    }
                }
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn fuzz_line_splitter() {
    runner()
        .run(
            &(vec(any::<u8>(), 0..600), vec(1usize..64, 1..20)),
            |(bytes, chunks)| {
                /// Hands out the input in the given chunk sizes, as a socket would.
                struct Chunked<'a> {
                    data: &'a [u8],
                    sizes: Vec<usize>,
                    i: usize,
                }
                impl std::io::Read for Chunked<'_> {
                    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                        let n = self.sizes[self.i % self.sizes.len()]
                            .min(buf.len())
                            .min(self.data.len());
                        self.i += 1;
                        buf[..n].copy_from_slice(&self.data[..n]);
                        self.data = &self.data[n..];
                        Ok(n)
                    }
                }
                let mut r = LineReader::new(Chunked {
                    data: &bytes,
                    sizes: chunks,
                    i: 0,
                });
                let mut total = 0;
                while let Some(line) = r.next_line().unwrap() {
                    total += 1;
                    prop_assert!(!line.contains('\n'));
                }
                let newlines = bytes.split(|&b| b == b'\n').count() - 1;
                prop_assert_eq!(total, newlines);
                let _ = r.take_partial();
                Ok(())
            },
        )
        .unwrap();
}
