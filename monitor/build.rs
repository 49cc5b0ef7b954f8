//! Builds the eBPF programs (monitor-ebpf) with the pinned nightly and bpf-linker, into `$OUT_DIR/monitor`.
//!
//! `AYA_BUILD_SKIP=1` skips the eBPF build and leaves an empty placeholder, so host-only unit tests and clippy run
//! without the eBPF toolchain; a migmon built that way refuses to load probes and says how to rebuild.

use std::{env, fs, path::PathBuf};

/// The eBPF toolchain; keep in step with `RUST_BPF` in `./x`.
const BPF_TOOLCHAIN: &str = "nightly-2026-07-01";

fn main() -> anyhow::Result<()> {
    println!("cargo::rerun-if-env-changed=AYA_BUILD_SKIP");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow::anyhow!("OUT_DIR not set"))?);
    let object = out_dir.join("monitor");
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        if !object.exists() {
            fs::write(&object, [])?;
        }
        println!("cargo::warning=AYA_BUILD_SKIP set: migmon is built without its eBPF programs");
        return Ok(());
    }
    let package = aya_build::Package {
        name: "monitor-ebpf",
        root_dir: "../monitor-ebpf",
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(BPF_TOOLCHAIN)).map_err(|e| {
        anyhow::anyhow!("building the eBPF programs failed ({e:#}); install the toolchains with `./x setup`")
    })
}
