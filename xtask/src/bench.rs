//! `./x bench`: migrator against QEMU, probe costs, scale. (Issue 6.)

use anyhow::{Result, bail};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// A one-minute smoke run that only checks each number is produced.
    #[arg(long)]
    pub quick: bool,
}

pub fn run(_args: &BenchArgs) -> Result<()> {
    bail!("the benchmarks are not built yet")
}
