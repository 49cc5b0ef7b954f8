//! Mutual TLS on the migration channel (rustls with the *ring* provider), with credentials in QEMU's
//! `tls-creds-x509` layout, and `migrator tls-init`, which makes a test CA and certificates in that layout.
//!
//! A credentials directory holds (PEM):
//!
//! ```text
//!  ca-cert.pem                    the CA both ends trust
//!  server-cert.pem, server-key.pem   the destination's (receive) certificate and key
//!  client-cert.pem, client-key.pem   the source's (migrate) certificate and key
//! ```
//!
//! The destination requires a client certificate signed by the CA; the source checks the destination's
//! certificate against the CA and the name it connected to (the host of `tcp:HOST:PORT`, an IP address or a DNS
//! name), or the name given with `--tls-hostname` (as QEMU's `tls-hostname`), useful when the address is an IP the
//! certificate does not list.
//!
//! [`TlsStream`] shares one rustls connection between the reading and the writing half of a migration stream (the
//! engines read and write from different places): reads wait for the socket without holding the connection's lock,
//! so a reader never blocks a writer.

use std::{
    fs,
    io::{self, Read, Write},
    net::TcpStream,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use rustls::{
    ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig, ServerConnection,
    crypto::{CryptoProvider, ring},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
    server::WebPkiClientVerifier,
};

/// The file names of QEMU's `tls-creds-x509` directory layout.
pub const CA_CERT: &str = "ca-cert.pem";
pub const SERVER_CERT: &str = "server-cert.pem";
pub const SERVER_KEY: &str = "server-key.pem";
pub const CLIENT_CERT: &str = "client-cert.pem";
pub const CLIENT_KEY: &str = "client-key.pem";

/// Plaintext rustls may buffer before it must write to the socket (the engines write 4 MiB batches).
const TLS_BUFFER: usize = 1 << 20;

/// Errors of the TLS layer.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: make the credentials with `migrator tls-init DIR` or point --tls-creds at a QEMU tls-creds-x509 directory", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{} holds no certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("the TLS credentials in {} are not usable", dir.display())]
    Config {
        dir: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("the CA in {} is not usable to verify peers", dir.display())]
    Verifier {
        dir: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error("{name:?} is not a valid TLS server name (an IP address or a DNS name); set --tls-hostname")]
    ServerName { name: String },
    #[error("TLS handshake with {peer} failed")]
    Handshake {
        peer: String,
        #[source]
        source: io::Error,
    },
    #[error("TLS handshake with {peer} did not finish within {timeout:?}")]
    HandshakeTimeout { peer: String, timeout: Duration },
    #[error("cannot write the credentials to {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot make the test certificates")]
    Generate(#[from] rcgen::Error),
}

/// The *ring* provider (AES-GCM and ChaCha20-Poly1305, X25519 and the NIST curves). rustls marks it deprecated for
/// lacking post-quantum key exchange; the aws-lc-rs provider would bring that, at the cost of a C/CMake build.
#[expect(
    deprecated,
    reason = "ring builds without CMake; its lack of post-quantum key exchange is known"
)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

fn certs(dir: &Path, name: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let path = dir.join(name);
    let certs = CertificateDer::pem_file_iter(&path)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|source| TlsError::Read {
            path: path.clone(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path });
    }
    Ok(certs)
}

fn key(dir: &Path, name: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    let path = dir.join(name);
    PrivateKeyDer::from_pem_file(&path).map_err(|source| TlsError::Read { path, source })
}

fn roots(dir: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs(dir, CA_CERT)? {
        roots.add(c).map_err(|source| TlsError::Config {
            dir: dir.to_owned(),
            source,
        })?;
    }
    Ok(Arc::new(roots))
}

/// The destination's TLS configuration from a credentials directory: its certificate, and client certificates
/// required and checked against the CA.
pub fn server_config(dir: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let cfg_err = |source| TlsError::Config {
        dir: dir.to_owned(),
        source,
    };
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(dir)?, provider())
        .build()
        .map_err(|source| TlsError::Verifier {
            dir: dir.to_owned(),
            source,
        })?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(cfg_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(dir, SERVER_CERT)?, key(dir, SERVER_KEY)?)
        .map_err(cfg_err)?;
    // One connection per migration: no resumption tickets to issue.
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The source's TLS configuration: the CA to check the destination with and the client certificate to show.
pub fn client_config(dir: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let cfg_err = |source| TlsError::Config {
        dir: dir.to_owned(),
        source,
    };
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(cfg_err)?
        .with_root_certificates(roots(dir)?)
        .with_client_auth_cert(certs(dir, CLIENT_CERT)?, key(dir, CLIENT_KEY)?)
        .map_err(cfg_err)?;
    Ok(Arc::new(config))
}

/// The name the destination's certificate must carry: `hostname` when given, else the host part of `HOST:PORT`
/// (brackets of an IPv6 address removed).
pub fn server_name(addr: &str, hostname: Option<&str>) -> Result<ServerName<'static>, TlsError> {
    let name = hostname.map_or_else(
        || {
            let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
            host.trim_start_matches('[').trim_end_matches(']').to_owned()
        },
        str::to_owned,
    );
    ServerName::try_from(name.clone()).map_err(|_| TlsError::ServerName { name })
}

struct Shared {
    sock: TcpStream,
    conn: Mutex<Connection>,
    read_timeout: Mutex<Option<Duration>>,
}

/// A TLS connection over a TCP stream, cloneable into a reading and a writing handle.
#[derive(Clone)]
pub struct TlsStream {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("sock", &self.shared.sock)
            .finish()
    }
}

fn to_io(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl TlsStream {
    /// The destination's side: runs the handshake on an accepted connection; fails unless the peer shows a
    /// certificate signed by the CA, or when the handshake takes longer than `timeout`.
    pub fn accept(sock: TcpStream, config: Arc<ServerConfig>, timeout: Duration) -> Result<Self, TlsError> {
        let peer = peer_name(&sock);
        let mut conn = ServerConnection::new(config).map_err(|e| TlsError::Handshake {
            peer: peer.clone(),
            source: to_io(e),
        })?;
        conn.set_buffer_limit(Some(TLS_BUFFER));
        Self::handshake(sock, conn.into(), peer, timeout)
    }

    /// The source's side: runs the handshake on a connected socket; fails unless the destination's certificate is
    /// signed by the CA and names `name`.
    pub fn connect(
        sock: TcpStream,
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
        timeout: Duration,
    ) -> Result<Self, TlsError> {
        let peer = peer_name(&sock);
        let mut conn = ClientConnection::new(config, name).map_err(|e| TlsError::Handshake {
            peer: peer.clone(),
            source: to_io(e),
        })?;
        conn.set_buffer_limit(Some(TLS_BUFFER));
        Self::handshake(sock, conn.into(), peer, timeout)
    }

    fn handshake(
        mut sock: TcpStream,
        mut conn: Connection,
        peer: String,
        timeout: Duration,
    ) -> Result<Self, TlsError> {
        let deadline = Instant::now() + timeout;
        let timed_out = || TlsError::HandshakeTimeout {
            peer: peer.clone(),
            timeout,
        };
        while conn.is_handshaking() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timed_out());
            }
            let set = sock
                .set_read_timeout(Some(left))
                .and_then(|()| sock.set_write_timeout(Some(left)));
            let res = set.and_then(|()| conn.complete_io(&mut sock));
            match res {
                Ok((0, 0)) if conn.is_handshaking() => {
                    return Err(TlsError::Handshake {
                        peer,
                        source: io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the peer closed the connection",
                        ),
                    });
                }
                Ok(_) => {}
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    return Err(timed_out());
                }
                Err(source) => {
                    // Tell the peer why (an alert), best effort.
                    let _ignored = conn.write_tls(&mut sock);
                    return Err(TlsError::Handshake { peer, source });
                }
            }
        }
        Ok(Self {
            shared: Arc::new(Shared {
                sock,
                conn: Mutex::new(conn),
                read_timeout: Mutex::new(None),
            }),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.shared.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The TCP socket underneath (for socket options and shutdown).
    pub fn socket(&self) -> &TcpStream {
        &self.shared.sock
    }

    /// The timeout of a read that waits for the peer.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        *self
            .shared
            .read_timeout
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = t;
        self.shared.sock.set_read_timeout(t)
    }

    /// Whether decrypted data is waiting, or else whether the socket becomes readable within `timeout`.
    pub fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        {
            let mut conn = self.conn();
            let state = conn.process_new_packets().map_err(to_io)?;
            if state.plaintext_bytes_to_read() > 0 || state.peer_has_closed() {
                return Ok(true);
            }
        }
        crate::poll::wait_readable(self.shared.sock.as_raw_fd(), timeout)
    }

    /// Sends the TLS close alert (best effort) and shuts the socket down both ways.
    pub fn shutdown(&self) {
        {
            let mut conn = self.conn();
            conn.send_close_notify();
            let _ignored = self
                .shared
                .sock
                .set_write_timeout(Some(Duration::from_millis(100)));
            let _ignored = conn.write_tls(&mut &self.shared.sock);
        }
        let _ignored = self.shared.sock.shutdown(std::net::Shutdown::Both);
    }

    /// Writes every pending TLS record to the socket (bounded by the socket's write timeout).
    fn flush_tls(conn: &mut Connection, mut sock: &TcpStream) -> io::Result<()> {
        while conn.wants_write() {
            conn.write_tls(&mut sock)?;
        }
        Ok(())
    }
}

fn peer_name(sock: &TcpStream) -> String {
    sock.peer_addr()
        .map_or_else(|_| "an unknown peer".into(), |a| a.to_string())
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            {
                let mut conn = self.conn();
                match conn.reader().read(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    other => return other,
                }
            }
            // Wait for the socket without holding the connection, so writers go on meanwhile.
            let timeout = *self
                .shared
                .read_timeout
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let fd = self.shared.sock.as_raw_fd();
            let readable = match timeout {
                Some(t) => crate::poll::wait_readable(fd, t)?,
                None => loop {
                    if crate::poll::wait_readable(fd, Duration::from_secs(3600))? {
                        break true;
                    }
                },
            };
            if !readable {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no data from the peer within the read timeout",
                ));
            }
            let mut conn = self.conn();
            conn.read_tls(&mut &self.shared.sock)?;
            if let Err(e) = conn.process_new_packets() {
                let _ignored = Self::flush_tls(&mut conn, &self.shared.sock);
                return Err(to_io(e));
            }
            Self::flush_tls(&mut conn, &self.shared.sock)?;
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut conn = self.conn();
        let n = conn.writer().write(buf)?;
        Self::flush_tls(&mut conn, &self.shared.sock)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut conn = self.conn();
        Self::flush_tls(&mut conn, &self.shared.sock)
    }
}

/// What `migrator tls-init` makes.
#[derive(Clone, Debug, Default)]
pub struct TlsInit {
    /// Names and addresses the destination's certificate is valid for (besides `localhost` and `127.0.0.1`).
    pub server_names: Vec<String>,
}

/// Writes a fresh test CA and server and client certificates into `dir` (created if missing), in QEMU's
/// `tls-creds-x509` layout. Keys are written mode 0600. Existing files are replaced.
pub fn tls_init(dir: &Path, init: &TlsInit) -> Result<(), TlsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        KeyUsagePurpose,
    };
    let write_err = |path: &Path| {
        let path = path.to_owned();
        move |source| TlsError::Write { path, source }
    };
    fs::create_dir_all(dir).map_err(write_err(dir))?;

    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name.push(DnType::CommonName, "migmon test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let leaf = |cn: &str, names: Vec<String>, purpose: ExtendedKeyUsagePurpose| {
        let mut p = CertificateParams::new(names)?;
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![purpose];
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &issuer)?;
        Ok::<_, rcgen::Error>((cert.pem(), key.serialize_pem()))
    };
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    for n in &init.server_names {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    let (server_cert, server_key) = leaf(
        "migmon migration destination",
        names,
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let (client_cert, client_key) = leaf(
        "migmon migration source",
        Vec::new(),
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    for (name, pem, secret) in [
        (CA_CERT, ca_cert.pem(), false),
        (SERVER_CERT, server_cert, false),
        (SERVER_KEY, server_key, true),
        (CLIENT_CERT, client_cert, false),
        (CLIENT_KEY, client_key, true),
    ] {
        write_file(
            &dir.join(name),
            pem.as_bytes(),
            if secret { 0o600 } else { 0o644 },
        )
        .map_err(write_err(&dir.join(name)))?;
    }
    Ok(())
}

/// Replaces `path` with `bytes`, created with `mode` (not widened by the umask, and never through a link).
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use std::{net::TcpListener, os::unix::fs::PermissionsExt};

    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("migrator-tls-{tag}-{}", std::process::id()));
        let _ignored = fs::remove_dir_all(&d);
        d
    }

    /// A handshake over loopback; returns the server's and the client's results.
    fn pair(
        server_dir: &Path,
        client_dir: &Path,
        hostname: Option<&str>,
    ) -> (Result<TlsStream, TlsError>, Result<TlsStream, TlsError>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let sc = server_config(server_dir).unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            TlsStream::accept(s, sc, Duration::from_secs(5))
        });
        let cc = client_config(client_dir).unwrap();
        let name = server_name(&addr, hostname).unwrap();
        let c = TlsStream::connect(
            TcpStream::connect(&addr).unwrap(),
            cc,
            name,
            Duration::from_secs(5),
        );
        (t.join().unwrap(), c)
    }

    #[test]
    fn mutual_tls_round_trip_and_refusals() {
        let dir = tmpdir("a");
        tls_init(&dir, &TlsInit::default()).unwrap();
        let mode = fs::metadata(dir.join(SERVER_KEY)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "keys are private");

        let (server, client) = pair(&dir, &dir, None);
        let (mut server, mut client) = (server.unwrap(), client.unwrap());
        let mut reader = server.clone();
        let receiving = std::thread::spawn(move || {
            let mut got = vec![0u8; 3 << 20];
            reader.read_exact(&mut got).unwrap();
            got
        });
        let data: Vec<u8> = (0..3u32 << 20).map(|i| i as u8).collect();
        client.write_all(&data).unwrap();
        assert_eq!(receiving.join().unwrap(), data);
        server.write_all(b"ok").unwrap();
        let mut answer = [0u8; 2];
        client.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, b"ok");
        client.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let err = client.read(&mut answer).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);

        // Another CA: both directions refuse.
        let other = tmpdir("b");
        tls_init(&other, &TlsInit::default()).unwrap();
        let (s, c) = pair(&dir, &other, None);
        assert!(s.is_err() && c.is_err(), "a client of another CA is refused");
        // A name the certificate does not carry.
        let (_s, c) = pair(&dir, &dir, Some("elsewhere.example"));
        assert!(matches!(c, Err(TlsError::Handshake { .. })), "{c:?}");
        let _ignored = fs::remove_dir_all(&dir);
        let _ignored = fs::remove_dir_all(&other);
    }

    #[test]
    fn server_names() {
        assert_eq!(
            format!("{:?}", server_name("10.0.0.1:7000", None).unwrap()),
            format!("{:?}", ServerName::try_from("10.0.0.1").unwrap())
        );
        assert!(server_name("[::1]:7000", None).is_ok());
        assert!(server_name("10.0.0.1:7000", Some("dest.example")).is_ok());
        assert!(server_name("10.0.0.1:7000", Some("bad name!")).is_err());
    }

    #[test]
    fn missing_credentials_name_the_file() {
        let e = server_config(Path::new("/nonexistent-migmon"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ca-cert.pem") && e.contains("tls-init"), "{e}");
    }
}
