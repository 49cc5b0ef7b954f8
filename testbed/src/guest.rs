//! Building our guest image outside the migrator's build script: the privileged tests and the benchmarks hand the
//! ELF to QEMU (`-kernel`, PVH entry), so they build it exactly as `migrator/build.rs` does.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// The cargo arguments that build the release guest image.
pub const BUILD_ARGS: [&str; 6] = [
    "build",
    "-p",
    "guest",
    "--release",
    "--target",
    "x86_64-unknown-none",
];

/// A guest build that did not produce an image.
#[derive(Debug, thiserror::Error)]
pub enum GuestBuildError {
    #[error("cannot run cargo to build the guest (is cargo on PATH, or $CARGO set?): {0}")]
    Spawn(#[source] std::io::Error),
    #[error(
        "building the guest failed ({0}); see cargo's output above (`./x setup` installs the x86_64-unknown-none target)"
    )]
    Failed(std::process::ExitStatus),
}

/// The workspace root (this crate lives in `testbed/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Where [`BUILD_ARGS`] leave the ELF under `target_dir`.
pub fn elf_in(target_dir: &Path) -> PathBuf {
    target_dir.join("x86_64-unknown-none/release/guest")
}

/// Builds the guest image (cargo from `$CARGO`, target dir from `$CARGO_TARGET_DIR` or the workspace's) and returns
/// the ELF's path.
pub fn build() -> Result<PathBuf, GuestBuildError> {
    let root = workspace_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&root)
        .args(BUILD_ARGS)
        .status()
        .map_err(GuestBuildError::Spawn)?;
    if !status.success() {
        return Err(GuestBuildError::Failed(status));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    Ok(elf_in(&target))
}
