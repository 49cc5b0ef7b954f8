//! The offline subcommands: report, check, whatif, export. (Owned by the correlation work, issue 4.)

use anyhow::{Result, bail};

#[derive(clap::Args, Debug)]
pub struct ReportArgs {}
#[derive(clap::Args, Debug)]
pub struct CheckArgs {}
#[derive(clap::Args, Debug)]
pub struct WhatifArgs {}
#[derive(clap::Args, Debug)]
pub struct ExportArgs {}

pub fn report(_a: &ReportArgs) -> Result<i32> {
    bail!("report is not built yet")
}
pub fn check(_a: &CheckArgs) -> Result<i32> {
    bail!("check is not built yet")
}
pub fn whatif(_a: &WhatifArgs) -> Result<i32> {
    bail!("whatif is not built yet")
}
pub fn export(_a: &ExportArgs) -> Result<i32> {
    bail!("export is not built yet")
}
