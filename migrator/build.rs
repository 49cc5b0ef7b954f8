//! Builds the `guest` crate for `x86_64-unknown-none` and leaves its ELF at `$OUT_DIR/guest.elf`, which the
//! migrator embeds (`migrator run` needs no file beside itself).
//!
//! The guest is built by a nested `cargo build` with its own target directory under `OUT_DIR`, so it never waits on
//! the outer build's lock. `MIGRATOR_GUEST_ELF=/path` uses a prebuilt image instead.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let workspace = manifest_dir
        .parent()
        .expect("migrator lives inside the workspace");
    let dest = out_dir.join("guest.elf");

    println!("cargo:rerun-if-env-changed=MIGRATOR_GUEST_ELF");
    if let Some(prebuilt) = env::var_os("MIGRATOR_GUEST_ELF") {
        println!("cargo:rerun-if-changed={}", Path::new(&prebuilt).display());
        std::fs::copy(&prebuilt, &dest).expect("copy MIGRATOR_GUEST_ELF");
        return;
    }
    for dir in ["guest", "guest-abi"] {
        println!("cargo:rerun-if-changed={}", workspace.join(dir).display());
    }
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("Cargo.lock").display()
    );

    let target_dir = out_dir.join("guest-target");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args([
            "build",
            "-p",
            "guest",
            "--release",
            "--target",
            "x86_64-unknown-none",
            "--target-dir",
        ])
        .arg(&target_dir);
    // The outer build's settings are for the host; the guest has its own target and flags.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("cannot run cargo to build the guest");
    assert!(
        status.success(),
        "building the guest failed ({status}); see the cargo output above"
    );
    let elf = target_dir.join("x86_64-unknown-none/release/guest");
    std::fs::copy(&elf, &dest).unwrap_or_else(|e| panic!("cannot copy {}: {e}", elf.display()));
}
