//! `./x testbed up|down|status`. (Issue 5.)

use anyhow::{Result, bail};

#[derive(clap::Args, Debug)]
pub struct TestbedArgs {}

pub fn run(_args: &TestbedArgs) -> Result<()> {
    bail!("the testbed is not built yet")
}
