//! `./x demo`: live against quick migration, side by side. (Issue 5.)

use anyhow::{Result, bail};

#[derive(clap::Args, Debug)]
pub struct DemoArgs {}

pub fn run(_args: &DemoArgs) -> Result<()> {
    bail!("the demo is not built yet")
}
