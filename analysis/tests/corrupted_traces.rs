//! The gate fails closed on damaged traces: 1,000 mutated copies (byte flips, truncations, dropped and duplicated
//! lines, from a fixed seed) of a recorded run whose gate fails. None may pass the check, and nothing that reads a
//! trace (correlation, every report, what-if, every export) may panic on them.

#![expect(clippy::unwrap_used, reason = "a test: a failed setup step should panic")]

mod common;

use std::path::{Path, PathBuf};

use common::gate;

/// A run whose gate fails: a quick migration that aborted two connections.
const FAILING_RUN: &str = "kernel_quick_5s_retries3.trace";
const COPIES: usize = 1_000;
const SEED: u64 = 0x6d69_676d_6f6e_0013;

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// splitmix64: a small deterministic generator, so a failure names the copy that caused it.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(n.max(1)).unwrap()).unwrap()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mutation {
    FlipBits,
    Truncate,
    DropLine,
    DuplicateLine,
}

const MUTATIONS: [Mutation; 4] = [
    Mutation::FlipBits,
    Mutation::Truncate,
    Mutation::DropLine,
    Mutation::DuplicateLine,
];

fn line_spans(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'\n' {
            spans.push((start, i + 1));
            start = i + 1;
        }
    }
    if start < bytes.len() {
        spans.push((start, bytes.len()));
    }
    spans
}

fn mutate(bytes: &mut Vec<u8>, m: Mutation, rng: &mut Rng) {
    match m {
        Mutation::FlipBits => {
            // One to four bytes, each XORed with a non-zero mask (usually one bit).
            for _ in 0..=rng.below(4) {
                let at = rng.below(bytes.len());
                let mask = if rng.below(2) == 0 {
                    1u8 << rng.below(8)
                } else {
                    u8::try_from(1 + rng.below(255)).unwrap()
                };
                bytes[at] ^= mask;
            }
        }
        Mutation::Truncate => {
            let at = rng.below(bytes.len());
            bytes.truncate(at);
        }
        Mutation::DropLine => {
            let spans = line_spans(bytes);
            let (a, b) = spans[rng.below(spans.len())];
            bytes.drain(a..b);
        }
        Mutation::DuplicateLine => {
            let spans = line_spans(bytes);
            let (a, b) = spans[rng.below(spans.len())];
            let line = bytes[a..b].to_vec();
            let to = spans[rng.below(spans.len())].0;
            bytes.splice(to..to, line);
        }
    }
}

#[test]
fn no_mutated_copy_of_a_failing_run_passes_the_gate() {
    let clean = std::fs::read(data(FAILING_RUN)).unwrap();
    let scratch = std::env::temp_dir().join(format!("migmon-corrupted-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    assert_eq!(
        gate(&clean, &scratch),
        Some((false, false)),
        "{FAILING_RUN} must fail the gate unmutated"
    );

    let mut rng = Rng(SEED);
    let mut refused = 0usize;
    let mut failed = 0usize;
    let mut only_damage = 0usize;
    let mut passed = Vec::new();
    let mut by_kind = [0usize; 4];
    for copy in 0..COPIES {
        let mut bytes = clean.clone();
        // One to three mutations; the first cycles through the kinds so each gets a quarter of the copies.
        let kinds = 1 + rng.below(3);
        let mut applied = Vec::new();
        for k in 0..kinds {
            let m = if k == 0 {
                MUTATIONS[copy % MUTATIONS.len()]
            } else {
                MUTATIONS[rng.below(MUTATIONS.len())]
            };
            if bytes.is_empty() {
                break;
            }
            mutate(&mut bytes, m, &mut rng);
            applied.push(m);
        }
        by_kind[copy % MUTATIONS.len()] += 1;
        match gate(&bytes, &scratch) {
            None => refused += 1,
            Some((false, lenient)) => {
                failed += 1;
                only_damage += usize::from(lenient);
            }
            Some((true, _)) => passed.push((copy, applied)),
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    eprintln!(
        "{COPIES} mutated copies of {FAILING_RUN} (seed {SEED:#x}; first mutation flip/truncate/drop/duplicate: \
         {by_kind:?}): {failed} failed the gate ({only_damage} of them would pass with --allow-damaged), {refused} \
         refused as not a trace, {} passed",
        passed.len()
    );
    assert!(
        passed.is_empty(),
        "mutated copies passed the gate (copy index, mutations): {passed:?}"
    );
}
