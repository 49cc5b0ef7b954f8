//! `migmon watch`: attach the probes, stream events, record a trace. (Owned by the probes work, issue 2.)

use anyhow::{Result, bail};

#[derive(clap::Args, Debug)]
pub struct WatchArgs {}

/// Runs `migmon watch`; returns the process exit code.
pub fn run(_args: &WatchArgs) -> Result<i32> {
    bail!("watch is not built yet")
}
