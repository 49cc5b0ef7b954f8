//! Migration transports: `tcp:HOST:PORT` (mutual TLS, see [`crate::tls`], or plain with `--insecure`) and
//! `unix:PATH` (plain: local, the socket file created mode 0600).
//!
//! [`check_security`] is the rule both ends apply before any byte moves: TCP needs `--tls-creds DIR` or an explicit
//! `--insecure`; a unix socket takes neither credentials nor TLS. The sender writes large vectored batches; socket buffers are raised to 4 MiB so a
//! batch is rarely split by the kernel.

use std::{
    fmt,
    io::{self, Read, Write},
    net::{TcpListener, TcpStream, ToSocketAddrs},
    os::{
        fd::{AsRawFd, RawFd},
        unix::net::{UnixListener, UnixStream},
    },
    path::PathBuf,
    str::FromStr,
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// Socket buffer size asked for on both ends.
const SOCKET_BUFFER: libc::c_int = 4 << 20;

/// Where a migration stream goes: `tcp:HOST:PORT` or `unix:PATH`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Endpoint {
    Tcp(String),
    Unix(PathBuf),
}

/// Errors of the transports.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("bad endpoint {0:?}: use tcp:HOST:PORT or unix:PATH")]
    Parse(String),
    #[error("cannot connect to {endpoint}: is `migrator receive --listen {endpoint}` running there?")]
    Connect {
        endpoint: Endpoint,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on {endpoint}: is the address in use or the directory missing?")]
    Listen {
        endpoint: Endpoint,
        #[source]
        source: io::Error,
    },
    #[error("accepting a migration connection on {endpoint} failed")]
    Accept {
        endpoint: Endpoint,
        #[source]
        source: io::Error,
    },
    #[error(
        "{endpoint} would carry guest memory unauthenticated and unencrypted: give --tls-creds DIR (make one with `migrator tls-init DIR`), or --insecure to accept plain TCP, on both ends"
    )]
    NeedsTls { endpoint: Endpoint },
    #[error("--tls-creds and --insecure exclude each other")]
    TlsAndInsecure,
    #[error(
        "{endpoint} is a unix socket: it stays plain (local, mode 0600); --tls-creds applies to tcp: endpoints"
    )]
    TlsOnUnix { endpoint: Endpoint },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("socket option {option} failed")]
    SocketOption {
        option: &'static str,
        #[source]
        source: io::Error,
    },
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "tcp:{a}"),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl FromStr for Endpoint {
    type Err = TransportError;
    fn from_str(s: &str) -> Result<Self, TransportError> {
        if let Some(a) = s.strip_prefix("tcp:") {
            let ok = a
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if ok {
                return Ok(Self::Tcp(a.to_owned()));
            }
        } else if let Some(p) = s.strip_prefix("unix:")
            && !p.is_empty()
        {
            return Ok(Self::Unix(PathBuf::from(p)));
        }
        Err(TransportError::Parse(s.to_owned()))
    }
}

impl TryFrom<String> for Endpoint {
    type Error = TransportError;
    fn try_from(s: String) -> Result<Self, TransportError> {
        s.parse()
    }
}

impl From<Endpoint> for String {
    fn from(e: Endpoint) -> String {
        e.to_string()
    }
}

/// Checks the transport rule: TCP needs TLS credentials or `--insecure` (not both); a unix socket takes no TLS.
pub fn check_security(endpoint: &Endpoint, tls: bool, insecure: bool) -> Result<(), TransportError> {
    match endpoint {
        _ if tls && insecure => Err(TransportError::TlsAndInsecure),
        Endpoint::Tcp(_) if !tls && !insecure => Err(TransportError::NeedsTls {
            endpoint: endpoint.clone(),
        }),
        Endpoint::Unix(_) if tls => Err(TransportError::TlsOnUnix {
            endpoint: endpoint.clone(),
        }),
        _ => Ok(()),
    }
}

/// The source's TLS settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientTls {
    /// A directory in QEMU's `tls-creds-x509` layout (the CA and `client-*.pem` are used).
    pub creds: PathBuf,
    /// The name the destination's certificate must carry, instead of the host of the endpoint.
    pub hostname: Option<String>,
}

/// A connected migration stream.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(crate::tls::TlsStream),
}

fn setsockopt(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
    option: &'static str,
) -> Result<(), TransportError> {
    // SAFETY: `value` is a live c_int and its size is passed; the kernel only reads it.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(TransportError::SocketOption {
            option,
            source: io::Error::last_os_error(),
        })
    }
}

impl Stream {
    /// Connects, with a connect timeout for TCP.
    pub fn connect(endpoint: &Endpoint, timeout: Duration) -> Result<Self, TransportError> {
        let err = |source| TransportError::Connect {
            endpoint: endpoint.clone(),
            source,
        };
        let s = match endpoint {
            Endpoint::Tcp(a) => {
                let mut last = io::Error::new(io::ErrorKind::NotFound, "the name resolved to no address");
                let mut found = None;
                for addr in a.to_socket_addrs().map_err(err)? {
                    match TcpStream::connect_timeout(&addr, timeout) {
                        Ok(s) => {
                            found = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                Self::Tcp(found.ok_or_else(|| err(last))?)
            }
            Endpoint::Unix(p) => Self::Unix(UnixStream::connect(p).map_err(err)?),
        };
        s.tune()?;
        Ok(s)
    }

    /// Connects and, when `tls` is given, runs the TLS handshake (the whole within `timeout` each).
    pub fn connect_secure(
        endpoint: &Endpoint,
        tls: Option<&ClientTls>,
        timeout: Duration,
    ) -> Result<Self, TransportError> {
        let Some(tls) = tls else {
            return Self::connect(endpoint, timeout);
        };
        let Endpoint::Tcp(addr) = endpoint else {
            return Err(TransportError::TlsOnUnix {
                endpoint: endpoint.clone(),
            });
        };
        let config = crate::tls::client_config(&tls.creds)?;
        let name = crate::tls::server_name(addr, tls.hostname.as_deref())?;
        let Self::Tcp(sock) = Self::connect(endpoint, timeout)? else {
            unreachable!("a tcp: endpoint connects over TCP");
        };
        Ok(Self::Tls(crate::tls::TlsStream::connect(
            sock, config, name, timeout,
        )?))
    }

    /// The destination's side of TLS on an accepted TCP stream: the handshake, within `timeout`.
    pub fn accept_tls(
        self,
        config: std::sync::Arc<rustls::ServerConfig>,
        timeout: Duration,
    ) -> Result<Self, TransportError> {
        match self {
            Self::Tcp(sock) => Ok(Self::Tls(crate::tls::TlsStream::accept(sock, config, timeout)?)),
            other => Ok(other),
        }
    }

    /// The peer, for log lines.
    pub fn peer(&self) -> String {
        let tcp = match self {
            Self::Tcp(s) => s,
            Self::Tls(t) => t.socket(),
            Self::Unix(_) => return "a local peer".into(),
        };
        tcp.peer_addr()
            .map_or_else(|_| "an unknown peer".into(), |a| a.to_string())
    }

    fn tune(&self) -> Result<(), TransportError> {
        let fd = self.as_raw_fd();
        if let Some(t) = self.tcp() {
            t.set_nodelay(true)
                .map_err(|source| TransportError::SocketOption {
                    option: "TCP_NODELAY",
                    source,
                })?;
        }
        // Best effort: the kernel caps these at net.core.{w,r}mem_max.
        let _ignored = setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, SOCKET_BUFFER, "SO_SNDBUF");
        let _ignored = setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, SOCKET_BUFFER, "SO_RCVBUF");
        Ok(())
    }

    /// The TCP socket, plain or under TLS.
    fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Self::Tcp(s) => Some(s),
            Self::Tls(t) => Some(t.socket()),
            Self::Unix(_) => None,
        }
    }

    /// Whether the stream is encrypted and authenticated.
    pub fn is_tls(&self) -> bool {
        matches!(self, Self::Tls(_))
    }

    /// A second handle on the same stream (one reads, the other writes).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Self::Tcp(s) => Self::Tcp(s.try_clone()?),
            Self::Unix(s) => Self::Unix(s.try_clone()?),
            Self::Tls(t) => Self::Tls(t.clone()),
        })
    }

    /// The timeout of every read (for TLS: of every wait for the peer's records).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_read_timeout(t),
            Self::Unix(s) => s.set_read_timeout(t),
            Self::Tls(s) => s.set_read_timeout(t),
        }
    }

    /// The timeout of every write.
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_write_timeout(t),
            Self::Unix(s) => s.set_write_timeout(t),
            Self::Tls(s) => s.socket().set_write_timeout(t),
        }
    }

    /// Closes both directions, waking a peer blocked on us.
    pub fn shutdown(&self) {
        let _ignored = match self {
            Self::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Self::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Self::Tls(s) => {
                s.shutdown();
                Ok(())
            }
        };
    }

    /// Waits up to `timeout` for the stream to be readable (data or EOF; for TLS, data already decrypted counts).
    pub fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        match self {
            Self::Tls(t) => t.wait_readable(timeout),
            _ => wait_readable(self.as_raw_fd(), timeout),
        }
    }
}

pub use crate::poll::wait_readable;

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Self::Tcp(s) => s.as_raw_fd(),
            Self::Unix(s) => s.as_raw_fd(),
            Self::Tls(s) => s.socket().as_raw_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            Self::Unix(s) => s.read(buf),
            Self::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Unix(s) => s.write(buf),
            Self::Tls(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write_vectored(bufs),
            Self::Unix(s) => s.write_vectored(bufs),
            Self::Tls(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Tls(s) => s.flush(),
            _ => Ok(()),
        }
    }
}

/// Binds a unix stream socket at `path` whose file is mode 0600 from the moment it exists, whatever the umask: the
/// socket's inode is `fchmod`ed before `bind`, which creates the file with that mode (less the umask), and the file
/// is set to exactly 0600 after.
pub fn bind_unix_private(path: &std::path::Path) -> io::Result<UnixListener> {
    use std::os::{fd::FromRawFd, unix::ffi::OsStrExt};
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all-zero is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the socket path is too long (over 107 bytes) or holds a NUL",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, b) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *b as libc::c_char;
    }
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket we own; the listener takes it over and closes it on drop.
    let listener = unsafe { UnixListener::from_raw_fd(fd) };
    let len = (std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: `fd` is open; `addr` is a valid sockaddr_un of `len` bytes.
    let ok = unsafe {
        libc::fchmod(fd, 0o600) == 0
            && libc::bind(fd, (&raw const addr).cast(), len) == 0
            && libc::listen(fd, 128) == 0
    };
    if !ok {
        return Err(io::Error::last_os_error());
    }
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(listener)
}

/// A bound listener; a unix socket file is removed on drop.
#[derive(Debug)]
pub struct Listener {
    endpoint: Endpoint,
    inner: ListenerInner,
}

#[derive(Debug)]
enum ListenerInner {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// Binds; a stale unix socket file at the path is replaced.
    pub fn bind(endpoint: &Endpoint) -> Result<Self, TransportError> {
        let err = |source| TransportError::Listen {
            endpoint: endpoint.clone(),
            source,
        };
        let inner = match endpoint {
            Endpoint::Tcp(a) => ListenerInner::Tcp(TcpListener::bind(a.as_str()).map_err(err)?),
            Endpoint::Unix(p) => {
                if std::fs::metadata(p)
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                {
                    let _ignored = std::fs::remove_file(p);
                }
                ListenerInner::Unix(bind_unix_private(p).map_err(err)?)
            }
        };
        Ok(Self {
            endpoint: endpoint.clone(),
            inner,
        })
    }

    /// The endpoint actually bound (with the real port when 0 was asked for).
    pub fn local_endpoint(&self) -> Endpoint {
        match &self.inner {
            ListenerInner::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| self.endpoint.clone(), |a| Endpoint::Tcp(a.to_string())),
            ListenerInner::Unix(_) => self.endpoint.clone(),
        }
    }

    /// Waits up to `timeout` for a connection to accept.
    pub fn wait_pending(&self, timeout: Duration) -> io::Result<bool> {
        let fd = match &self.inner {
            ListenerInner::Tcp(l) => l.as_raw_fd(),
            ListenerInner::Unix(l) => l.as_raw_fd(),
        };
        wait_readable(fd, timeout)
    }

    /// Waits for one connection.
    pub fn accept(&self) -> Result<Stream, TransportError> {
        let err = |source| TransportError::Accept {
            endpoint: self.endpoint.clone(),
            source,
        };
        let s = match &self.inner {
            ListenerInner::Tcp(l) => Stream::Tcp(l.accept().map_err(err)?.0),
            ListenerInner::Unix(l) => Stream::Unix(l.accept().map_err(err)?.0),
        };
        s.tune()?;
        Ok(s)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let (ListenerInner::Unix(_), Endpoint::Unix(p)) = (&self.inner, &self.endpoint) {
            let _ignored = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_endpoints() {
        assert_eq!(
            "tcp:10.0.0.1:4444".parse::<Endpoint>().unwrap(),
            Endpoint::Tcp("10.0.0.1:4444".into())
        );
        assert_eq!(
            "tcp:[::1]:4444".parse::<Endpoint>().unwrap(),
            Endpoint::Tcp("[::1]:4444".into())
        );
        assert_eq!(
            "unix:/tmp/x".parse::<Endpoint>().unwrap(),
            Endpoint::Unix("/tmp/x".into())
        );
        let tcp: Endpoint = "tcp:10.0.0.1:4444".parse().unwrap();
        let unix: Endpoint = "unix:/tmp/x".parse().unwrap();
        let e = check_security(&tcp, false, false).unwrap_err().to_string();
        assert!(e.contains("--tls-creds") && e.contains("--insecure"), "{e}");
        assert!(check_security(&tcp, true, false).is_ok());
        assert!(check_security(&tcp, false, true).is_ok());
        assert!(check_security(&tcp, true, true).is_err());
        assert!(check_security(&unix, false, false).is_ok());
        assert!(check_security(&unix, true, false).is_err());
        for bad in ["tcp:host", "tcp::1", "tcp:h:99999", "unix:", "udp:1:2", ""] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
        let e: Endpoint = "tcp:a:1".parse().unwrap();
        assert_eq!(e.to_string(), "tcp:a:1");
    }

    #[test]
    fn tcp_and_unix_connect() {
        let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
        let ep = l.local_endpoint();
        let t = std::thread::spawn(move || {
            let mut s = l.accept().unwrap();
            let mut b = [0u8; 3];
            s.read_exact(&mut b).unwrap();
            b
        });
        let mut c = Stream::connect(&ep, Duration::from_secs(5)).unwrap();
        c.write_all(b"abc").unwrap();
        assert_eq!(&t.join().unwrap(), b"abc");

        let path = std::env::temp_dir().join(format!("migrator-test-{}.sock", std::process::id()));
        let ep = Endpoint::Unix(path.clone());
        let l = Listener::bind(&ep).unwrap();
        let c = Stream::connect(&ep, Duration::from_secs(5)).unwrap();
        let s = l.accept().unwrap();
        assert!(!s.wait_readable(Duration::from_millis(1)).unwrap());
        drop(c);
        assert!(
            s.wait_readable(Duration::from_secs(5)).unwrap(),
            "EOF is readable"
        );
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions()) & 0o777;
        assert_eq!(mode, 0o600, "the socket is private");
        drop(l);
        assert!(!path.exists(), "the socket file is removed");
    }
}
