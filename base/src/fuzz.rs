//! The proptest runner of every migmon fuzz target: `MIGMON_FUZZ_CASES` cases (256 by default), from
//! `MIGMON_FUZZ_SEED` (a fixed seed by default, so `cargo test` is repeatable; `./x fuzz` passes fresh ones), and no
//! persistence files.

use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

/// A runner configured from `MIGMON_FUZZ_CASES` and `MIGMON_FUZZ_SEED`.
pub fn runner() -> TestRunner {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let cases = env("MIGMON_FUZZ_CASES").map_or(256, |n| u32::try_from(n).unwrap_or(u32::MAX));
    let seed = env("MIGMON_FUZZ_SEED").unwrap_or(0x6d69_676d_6f6e);
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    TestRunner::new_with_rng(
        Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
    )
}
