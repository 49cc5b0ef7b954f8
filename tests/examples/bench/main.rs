//! `bench`: one sample of one benchmark case, for `./x bench` (xtask/src/bench.rs), which runs it several times,
//! takes medians and writes the tables. Run as root.
//!
//! `bench CASE [key=value]... result=PATH`: writes one JSON object of figures to PATH; progress goes to stderr.
//! stdout is left to the watch pipeline under test (the harness points it at /dev/null).
//!
//! Cases: `xdp` (ns per frame by `BPF_PROG_TEST_RUN`), `events` (collector rate from a synthetic storm), `tcp`
//! (stream throughput with and without every probe), `migrate` (our migrator), `qemu` (QEMU on the same guest),
//! `conns` (migmon's cost against live connections), `floor` (memcpy and socket bandwidth).

mod bed;
mod migrate;
mod probes;
mod qemu;

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// `key=value` arguments.
pub struct Args(BTreeMap<String, String>);

impl Args {
    fn parse(items: &[String]) -> Result<Self> {
        let mut m = BTreeMap::new();
        for it in items {
            let (k, v) = it
                .split_once('=')
                .with_context(|| format!("argument {it:?} is not key=value"))?;
            m.insert(k.to_owned(), v.to_owned());
        }
        Ok(Self(m))
    }

    pub fn str(&self, key: &str, default: &str) -> String {
        self.0.get(key).cloned().unwrap_or_else(|| default.to_owned())
    }

    pub fn u64(&self, key: &str, default: u64) -> Result<u64> {
        self.0.get(key).map_or(Ok(default), |v| {
            parse_size(v).with_context(|| format!("{key}={v} is not a number (K/M/G suffixes allowed)"))
        })
    }

    pub fn secs(&self, key: &str, default: f64) -> Result<Duration> {
        let v = self.0.get(key).map_or(Ok(default), |v| {
            v.parse::<f64>()
                .with_context(|| format!("{key}={v} is not a number of seconds"))
        })?;
        Ok(Duration::from_secs_f64(v))
    }
}

/// `123`, `32M`, `1G` (binary multiples).
pub fn parse_size(s: &str) -> Option<u64> {
    let (num, mult) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 1u64 << 10),
        b'M' | b'm' => (&s[..s.len() - 1], 1 << 20),
        b'G' | b'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

/// Progress on stderr.
#[macro_export]
macro_rules! say {
    ($($t:tt)*) => { eprintln!("bench: {}", format!($($t)*)) };
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = real_main(&argv) {
        eprintln!("bench: error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main(argv: &[String]) -> Result<()> {
    let Some((case, rest)) = argv.split_first() else {
        bail!("usage: bench xdp|events|tcp|migrate|qemu|conns|floor [key=value]... result=PATH");
    };
    let args = Args::parse(rest)?;
    let result = args.str("result", "");
    if result.is_empty() {
        bail!("result=PATH is required");
    }
    let v: Value = match case.as_str() {
        "xdp" => probes::xdp(&args)?,
        "events" => probes::events(&args)?,
        "tcp" => probes::tcp(&args)?,
        "floor" => migrate::floor(&args)?,
        "migrate" => migrate::ours(&args)?,
        "qemu" => qemu::run(&args)?,
        "conns" => migrate::conns(&args)?,
        other => bail!("unknown case {other}"),
    };
    std::fs::write(&result, serde_json::to_vec_pretty(&v)?)
        .with_context(|| format!("cannot write {result}"))?;
    Ok(())
}
