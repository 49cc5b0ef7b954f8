//! Property-based fuzzing of the trace reader and of everything that reads a trace (correlation, reports, what-if,
//! exports, the check): random lines after a valid header, and the recorded fixtures with their numbers replaced by
//! arbitrary ones (0, `u64::MAX`, anything between), so that arithmetic on values read from traces is exercised at
//! its edges. The oracle: no panic.
//!
//! `cargo test` runs each target with 256 cases from a fixed seed; `MIGMON_FUZZ_CASES` and `MIGMON_FUZZ_SEED`
//! change that (`./x fuzz` runs them longer, with fresh seeds).

#![expect(clippy::unwrap_used, reason = "a test: a failed setup step should panic")]

mod common;

use std::path::{Path, PathBuf};

use migmon_base::fuzz::runner;
use proptest::{collection::vec, prelude::*};
use serde_json::Value;

fn fixtures() -> Vec<Vec<String>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "trace"))
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|p| {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect()
        })
        .collect()
}

fn scratch(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("migmon-fuzz-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn fuzz_random_lines_after_a_header() {
    let header = fixtures()[0][0].clone();
    let dir = scratch("lines");
    let line = prop_oneof![
        vec(any::<u8>(), 0..120),
        "\\{\"kind\":\"[a-z_]{2,16}\"(,\"[a-z_]{2,10}\":(-?[0-9]{1,22}|\"[ -~]{0,20}\"|null|\\[\\]|\\{\\}))*\\}"
            .prop_map(String::into_bytes),
    ];
    runner()
        .run(&vec(line, 0..12), |lines| {
            let mut bytes = header.clone().into_bytes();
            for l in &lines {
                bytes.push(b'\n');
                bytes.extend_from_slice(l);
            }
            let _ = common::gate(&bytes, &dir);
            Ok(())
        })
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Replaces the `n`th number of `v` (depth first) with `with`; returns how many numbers it saw.
fn replace_number(v: &mut Value, n: &mut usize, with: &Value) -> bool {
    match v {
        Value::Number(_) => {
            if *n == 0 {
                *v = with.clone();
                return true;
            }
            *n -= 1;
            false
        }
        Value::Array(a) => a.iter_mut().any(|x| replace_number(x, n, with)),
        Value::Object(o) => o.values_mut().any(|x| replace_number(x, n, with)),
        _ => false,
    }
}

fn edge_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::from(0u64)),
        Just(Value::from(u64::MAX)),
        Just(Value::from(u64::MAX - 1)),
        Just(Value::from(i64::MIN)),
        Just(Value::from(i64::MAX)),
        Just(Value::from(u32::MAX)),
        Just(Value::from(-1i64)),
        any::<u64>().prop_map(Value::from),
        any::<u32>().prop_map(Value::from),
        (0u64..1_000_000_000).prop_map(Value::from),
    ]
}

#[test]
fn fuzz_fixture_numbers_at_their_edges() {
    let traces = fixtures();
    let dir = scratch("numbers");
    runner()
        .run(
            &(
                0..traces.len(),
                vec((any::<usize>(), any::<usize>(), edge_number()), 1..8),
            ),
            |(t, edits)| {
                let mut lines: Vec<String> = traces[t].clone();
                // The end record is left alone: it would only say the lines changed.
                let body = 1..lines.len() - 1;
                for (li, ni, with) in &edits {
                    let li = body.start + li % body.len();
                    let mut v: Value = serde_json::from_str(&lines[li]).unwrap();
                    let mut n = ni % 16;
                    replace_number(&mut v, &mut n, with);
                    lines[li] = serde_json::to_string(&v).unwrap();
                }
                let bytes = lines.join("\n").into_bytes();
                let _ = common::gate(&bytes, &dir);
                Ok(())
            },
        )
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
