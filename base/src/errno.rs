//! Symbolic names of the errnos a TCP connection ends with. The numbers are Linux's: traces record them as the
//! kernel reported them, so a trace read on another system still names them right.

use std::fmt;

/// The symbolic name of `errno` (`110` → `ETIMEDOUT`), or `?` for one a TCP connection does not meet.
pub fn errno_name(errno: i32) -> &'static str {
    known_errno_name(errno).unwrap_or("?")
}

/// The symbolic name of `errno`, if it is one a TCP connection meets.
pub fn known_errno_name(errno: i32) -> Option<&'static str> {
    Some(match errno {
        4 => "EINTR",
        11 => "EAGAIN",
        32 => "EPIPE",
        100 => "ENETDOWN",
        101 => "ENETUNREACH",
        103 => "ECONNABORTED",
        104 => "ECONNRESET",
        110 => "ETIMEDOUT",
        111 => "ECONNREFUSED",
        112 => "EHOSTDOWN",
        113 => "EHOSTUNREACH",
        _ => return None,
    })
}

/// An errno that displays as its symbolic name, or as `errno N` when it has none here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match known_errno_name(self.0) {
            Some(name) => f.write_str(name),
            None => write!(f, "errno {}", self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_the_earlier_tables() {
        for (n, name) in [
            (110, "ETIMEDOUT"),
            (104, "ECONNRESET"),
            (111, "ECONNREFUSED"),
            (32, "EPIPE"),
            (113, "EHOSTUNREACH"),
            (101, "ENETUNREACH"),
        ] {
            assert_eq!(errno_name(n), name);
            assert_eq!(Errno(n).to_string(), name);
        }
        assert_eq!(errno_name(9999), "?");
        assert_eq!(errno_name(-1), "?");
        assert_eq!(Errno(9999).to_string(), "errno 9999");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn numbers_are_linux_errnos() {
        for (n, want) in [
            (libc::EINTR, "EINTR"),
            (libc::EAGAIN, "EAGAIN"),
            (libc::EPIPE, "EPIPE"),
            (libc::ENETDOWN, "ENETDOWN"),
            (libc::ENETUNREACH, "ENETUNREACH"),
            (libc::ECONNABORTED, "ECONNABORTED"),
            (libc::ECONNRESET, "ECONNRESET"),
            (libc::ETIMEDOUT, "ETIMEDOUT"),
            (libc::ECONNREFUSED, "ECONNREFUSED"),
            (libc::EHOSTDOWN, "EHOSTDOWN"),
            (libc::EHOSTUNREACH, "EHOSTUNREACH"),
        ] {
            assert_eq!(errno_name(n), want);
        }
    }
}
