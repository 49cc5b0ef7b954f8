//! A tap device opened in the current network namespace (`/dev/net/tun`, `IFF_TAP | IFF_NO_PI`, nonblocking).
//!
//! The tap must already exist (`ip tuntap add dev NAME mode tap`): the VMM never creates interfaces, so a typo
//! cannot leave a stray device behind. Frames are whole Ethernet frames, one per `read`/`write`.

use std::{
    ffi::CString,
    fs::{File, OpenOptions},
    io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd},
        unix::fs::OpenOptionsExt,
    },
};

/// Largest frame a tap hands us (64 KiB of GSO-free payload plus headers).
pub const MAX_FRAME: usize = 65_536 + 64;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

/// Errors opening or using a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap name {0:?} is invalid (1 to 15 bytes, no NUL)")]
    InvalidName(String),
    #[error(
        "tap device {0:?} does not exist in this network namespace: create it first with `ip tuntap add dev {0} mode tap` (and `ip link set {0} up`)"
    )]
    Missing(String),
    #[error("cannot open /dev/net/tun (load the tun module and run as root or with CAP_NET_ADMIN)")]
    OpenTun(#[source] io::Error),
    #[error("tap device {0:?} is busy: another process (a running migrator?) has it open")]
    Busy(String),
    #[error("cannot attach to tap device {name:?} (is it a tap, not a tun, and are we allowed?)")]
    Attach {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot write a frame to tap {name:?}")]
    Write {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// An open tap queue.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    pad: [u8; 22],
}

impl Tap {
    /// Attaches to the existing tap `name` in the current network namespace.
    pub fn open(name: &str) -> Result<Self, TapError> {
        let invalid = || TapError::InvalidName(name.to_owned());
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(invalid());
        }
        let cname = CString::new(name).map_err(|_| invalid())?;
        // SAFETY: `cname` is a valid NUL-terminated string; if_nametoindex only reads it.
        if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
            return Err(TapError::Missing(name.to_owned()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI,
            pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `IfReq` matches in size and layout (name, then a
        // short in the union, padded to 40 bytes); the fd is a freshly opened /dev/net/tun.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &raw mut req) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            return Err(match err.raw_os_error() {
                Some(libc::EBUSY) => TapError::Busy(name.to_owned()),
                _ => TapError::Attach {
                    name: name.to_owned(),
                    source: err,
                },
            });
        }
        Ok(Self {
            file,
            name: name.to_owned(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame; `Ok(None)` when none is waiting.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes and the fd is ours.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(err),
            };
        }
        Ok(Some(n as usize))
    }

    /// Writes one frame (all of it or nothing).
    pub fn write_frame(&self, frame: &[u8]) -> Result<(), TapError> {
        let err = |source| TapError::Write {
            name: self.name.clone(),
            source,
        };
        loop {
            // SAFETY: `frame` is valid for reads of its length and the fd is ours.
            let n = unsafe { libc::write(self.file.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
            if n >= 0 {
                return if n as usize == frame.len() {
                    Ok(())
                } else {
                    Err(err(io::Error::from(io::ErrorKind::WriteZero)))
                };
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(err(e));
            }
        }
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_anything_is_opened() {
        assert!(matches!(Tap::open(""), Err(TapError::InvalidName(_))));
        assert!(matches!(
            Tap::open("a-name-that-is-too-long"),
            Err(TapError::InvalidName(_))
        ));
        assert!(matches!(Tap::open("nul\0x"), Err(TapError::InvalidName(_))));
        let missing = Tap::open("mgnotap0").unwrap_err();
        assert!(matches!(missing, TapError::Missing(_)));
        assert!(
            missing
                .to_string()
                .contains("ip tuntap add dev mgnotap0 mode tap")
        );
    }
}
