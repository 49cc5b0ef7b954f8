//! Network namespaces: run a closure inside one, and map namespace inodes to names.
//!
//! migmon runs in the root namespace (where tracefs is visible; `ip netns exec` remounts /sys and hides it) and
//! attaches XDP/TC to interfaces in other namespaces from a short-lived thread that has called
//! `setns(CLONE_NEWNET)`. Only that thread changes namespace; the rest of the process stays where it was.

use std::{
    collections::HashMap,
    fs::File,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use nix::sched::{CloneFlags, setns};

/// Errors entering a namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("no network namespace {name} ({}): list them with `ip netns list`", path.display())]
    Open {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {name}: migmon needs root (CAP_SYS_ADMIN)")]
    Enter {
        name: String,
        #[source]
        source: nix::Error,
    },
    #[error("the thread working in network namespace {name} panicked")]
    Panicked { name: String },
}

/// The file of a named namespace: `/run/netns/NAME`, or NAME itself when it is a path.
pub fn path_of(name: &str) -> PathBuf {
    if name.contains('/') {
        PathBuf::from(name)
    } else {
        Path::new("/run/netns").join(name)
    }
}

/// Runs `f` on a thread inside namespace `name` (`None`: the current one, still on a separate thread).
pub fn run_in<T: Send>(name: Option<&str>, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
    let file = name
        .map(|n| {
            let path = path_of(n);
            File::open(&path).map_err(|source| NetnsError::Open {
                name: n.to_owned(),
                path,
                source,
            })
        })
        .transpose()?;
    let label = name.unwrap_or("(root)").to_owned();
    std::thread::scope(|s| {
        let handle = s.spawn(|| {
            if let Some(file) = &file {
                setns(file, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
                    name: label.clone(),
                    source,
                })?;
            }
            Ok(f())
        });
        handle
            .join()
            .map_err(|_| NetnsError::Panicked { name: label.clone() })?
    })
}

/// Inode of a namespace file (what the kernel reports as the netns "inum").
pub fn inode_of(name: Option<&str>) -> Option<u64> {
    let path = name.map_or_else(|| PathBuf::from("/proc/self/ns/net"), path_of);
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// Names of the namespaces under /run/netns, by inode. The root namespace is not listed.
pub fn names_by_inode() -> HashMap<u64, String> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return out;
    };
    for entry in dir.flatten() {
        if let (Ok(meta), Some(name)) = (std::fs::metadata(entry.path()), entry.file_name().to_str()) {
            out.insert(meta.ino(), name.to_owned());
        }
    }
    out
}
