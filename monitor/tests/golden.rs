//! Golden outputs: every recorded trace in `tests/data` run through the `migmon` binary's offline commands
//! (`report` in each format, `whatif`, `check`, `export`), compared byte for byte with the outputs kept beside it.
//!
//! `NAME.report.json` is `migmon report --format json NAME.trace`; the other formats are under `golden/`. A change
//! that moves any of them changes what users and their scripts read, so it must be deliberate: rerun with
//! `MIGMON_BLESS=1` to rewrite the expected files, and review the diff.

#![expect(clippy::unwrap_used, reason = "a test: a failed setup step should panic")]

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../analysis/tests/data")
}

fn traces() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(data_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "trace"))
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no traces in {}", data_dir().display());
    out
}

/// Runs `migmon ARGS` and returns its stdout, with the exit code when it is not 0.
fn migmon(args: &[&str]) -> Vec<u8> {
    // Run from the data directory with bare file names: the text and HTML reports print the trace's path.
    let out = Command::new(env!("CARGO_BIN_EXE_migmon"))
        .current_dir(data_dir())
        .args(args)
        .output()
        .unwrap();
    let mut stdout = out.stdout;
    let code = out.status.code().unwrap_or(-1);
    if code != 0 {
        stdout.extend_from_slice(format!("[exit {code}]\n").as_bytes());
    }
    assert!(
        matches!(code, 0 | 1),
        "migmon {args:?} failed ({code}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Compares `actual` with the file `expected` (or rewrites it under `MIGMON_BLESS=1`). Returns a failure line.
fn compare(expected: &Path, actual: &[u8]) -> Option<String> {
    if std::env::var_os("MIGMON_BLESS").is_some() {
        fs::write(expected, actual).unwrap();
        return None;
    }
    let want = fs::read(expected).unwrap_or_default();
    if want == actual {
        return None;
    }
    let first_diff = want
        .iter()
        .zip(actual)
        .position(|(a, b)| a != b)
        .unwrap_or(want.len().min(actual.len()));
    Some(format!(
        "{}: differs at byte {first_diff} (expected {} bytes, got {})",
        expected.display(),
        want.len(),
        actual.len()
    ))
}

#[test]
fn offline_outputs_match_the_golden_files() {
    let tmp = std::env::temp_dir().join(format!("migmon-golden-{}", std::process::id()));
    fs::create_dir_all(&tmp).unwrap();
    let golden = data_dir().join("golden");
    let mut failures = Vec::new();
    for trace in traces() {
        let name = trace.file_stem().unwrap().to_str().unwrap().to_owned();
        let file = trace.file_name().unwrap().to_str().unwrap().to_owned();
        let t = file.as_str();
        let mut check = |file: PathBuf, actual: Vec<u8>| failures.extend(compare(&file, &actual));

        check(
            data_dir().join(format!("{name}.report.json")),
            migmon(&["report", "--format", "json", t]),
        );
        check(
            golden.join(format!("{name}.txt")),
            migmon(&["report", "--format", "text", t]),
        );
        check(
            golden.join(format!("{name}.compare.txt")),
            migmon(&["report", "--format", "compare", t]),
        );
        check(
            golden.join(format!("{name}.html")),
            migmon(&["report", "--format", "html", t]),
        );
        check(
            golden.join(format!("{name}.whatif.txt")),
            migmon(&["whatif", "--tcp-retries2", "5", t]),
        );
        check(golden.join(format!("{name}.check.txt")), migmon(&["check", t]));

        let svg = tmp.join(format!("{name}.svg"));
        migmon(&["report", "--format", "text", "--svg", svg.to_str().unwrap(), t]);
        check(golden.join(format!("{name}.svg")), fs::read(&svg).unwrap());
        for (flag, ext) in [
            ("--jsonl", "jsonl"),
            ("--pcapng", "pcapng"),
            ("--perfetto", "perfetto"),
        ] {
            let out = tmp.join(format!("{name}.{ext}"));
            migmon(&["export", flag, out.to_str().unwrap(), t]);
            check(golden.join(format!("{name}.{ext}")), fs::read(&out).unwrap());
        }
    }
    let _ = fs::remove_dir_all(&tmp);
    assert!(
        failures.is_empty(),
        "golden outputs changed:\n{}",
        failures.join("\n")
    );
}
