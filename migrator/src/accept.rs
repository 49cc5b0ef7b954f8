//! The destination's wait for its source: it keeps listening through port scans, failed TLS handshakes, peers that
//! send garbage and sources that ask for too much, each logged and counted, until an authenticated source with an
//! acceptable hello arrives or the idle timeout ends the wait.
//!
//! Each connection is checked on its own thread (TLS handshake, then the hello, each bounded in time), at most
//! [`MAX_PENDING`] at once, so one peer that stalls does not hold up the real source.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use crate::{
    engine::{MigrationError, Tracker, error_chain},
    receive::{Arrival, ReceiveOptions, greet},
    transport::{Listener, Stream},
};

/// Connections checked at once; more are closed at once (and counted).
pub const MAX_PENDING: usize = 8;
/// How long a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Waits on `listener` for a source that passes TLS (when `tls` is given) and whose hello fits `opts`, for at most
/// `opts.idle_timeout`. Every refused peer is logged and counted in the status (`rejected_peers`).
pub fn wait_for_source(
    listener: &Listener,
    tls: Option<&Arc<rustls::ServerConfig>>,
    opts: &ReceiveOptions,
    tracker: &Tracker,
) -> Result<Arrival, MigrationError> {
    let deadline = Instant::now() + opts.idle_timeout;
    let (tx, rx) = mpsc::channel::<Arrival>();
    let pending = Arc::new(AtomicUsize::new(0));
    let reject = |peer: &str, why: &str| refuse(tracker, peer, why);
    loop {
        if let Ok(arrival) = rx.try_recv() {
            eprintln!(
                "migrator: source {} ({}) arrived",
                arrival.peer,
                if arrival.reader.get_ref().get_ref().is_tls() {
                    "mutual TLS"
                } else {
                    "plain"
                }
            );
            return Ok(arrival);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(MigrationError::NoSource {
                idle_timeout: opts.idle_timeout,
                rejected: tracker.snapshot().rejected_peers,
            });
        }
        if !listener
            .wait_pending(left.min(Duration::from_millis(50)))
            .map_err(|e| MigrationError::Protocol(crate::protocol::ProtocolError::Io(e)))?
        {
            continue;
        }
        let stream = match listener.accept() {
            Ok(s) => s,
            Err(e) => {
                reject("a peer", &error_chain(&e));
                continue;
            }
        };
        if pending.load(Ordering::SeqCst) >= MAX_PENDING {
            reject(&stream.peer(), "too many connections being checked at once");
            continue;
        }
        pending.fetch_add(1, Ordering::SeqCst);
        let (tx, in_flight, tls, opts, tracker) = (
            tx.clone(),
            pending.clone(),
            tls.cloned(),
            opts.clone(),
            tracker.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("accept-check".into())
            .spawn(move || {
                // A refused peer is logged and counted here, as soon as it fails, whether or not the waiter is
                // still there to hear of it (another source may have won meanwhile).
                match check(stream, tls, &opts) {
                    Ok(arrival) => {
                        // The waiter may have gone (another source won): this one is then dropped and closed.
                        let _ignored = tx.send(arrival);
                    }
                    Err((peer, why)) => refuse(&tracker, &peer, &why),
                }
                in_flight.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            pending.fetch_sub(1, Ordering::SeqCst);
            reject("a peer", &format!("cannot start a thread to check it: {e}"));
        }
    }
}

/// Logs and counts a refused peer.
fn refuse(tracker: &Tracker, peer: &str, why: &str) {
    eprintln!("migrator: refused a connection from {peer}: {why}; still listening");
    tracker.update(|s| s.rejected_peers += 1);
}

/// TLS handshake (when configured), then the hello.
fn check(
    stream: Stream,
    tls: Option<Arc<rustls::ServerConfig>>,
    opts: &ReceiveOptions,
) -> Result<Arrival, (String, String)> {
    let peer = stream.peer();
    let stream = match tls {
        Some(config) => stream
            .accept_tls(config, HANDSHAKE_TIMEOUT)
            .map_err(|e| (peer.clone(), error_chain(&e)))?,
        None => stream,
    };
    greet(stream, opts).map_err(|e| (peer, error_chain(&e)))
}
