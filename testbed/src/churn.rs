//! Loopback connection churn: a steady load for the monitor's TCP probes (the soak and ports benchmarks, the soak
//! test). One thread connects, writes a byte and closes, at a set rate; another accepts each connection and reads
//! it. Both stop when the [`Churn`] is dropped.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// A running churn.
pub struct Churn {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    connections: Arc<AtomicU64>,
    /// The kernel thread ids of the accepting and the connecting thread (0 until each has started).
    tids: Arc<[AtomicI32; 2]>,
}

impl Churn {
    /// Connects to `listener`'s address `per_s` times a second until dropped.
    pub fn start(listener: TcpListener, per_s: u64) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicU64::new(0));
        let tids: Arc<[AtomicI32; 2]> = Arc::new([AtomicI32::new(0), AtomicI32::new(0)]);
        let (st, t) = (stop.clone(), tids.clone());
        let server = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            t[0].store(unsafe { libc::gettid() }, Ordering::Relaxed);
            let mut buf = [0u8; 16];
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_millis(20)));
                        let _ = s.read(&mut buf);
                    }
                    // Paces the polling of a non-blocking listener; nothing waits on it.
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        let (st, n, t) = (stop.clone(), connections.clone(), tids.clone());
        let client = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            t[1].store(unsafe { libc::gettid() }, Ordering::Relaxed);
            let start = Instant::now();
            let mut done = 0u64;
            while !st.load(Ordering::Relaxed) {
                let due = (start.elapsed().as_secs_f64() * per_s as f64) as u64;
                if done >= due {
                    // Paces the rate; nothing waits on it.
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                if let Ok(mut c) = TcpStream::connect(addr) {
                    let _ = c.write_all(b"x");
                }
                done += 1;
                n.fetch_add(1, Ordering::Relaxed);
            }
        });
        Ok(Self {
            stop,
            threads: vec![server, client],
            connections,
            tids,
        })
    }

    /// Connections made so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// The kernel thread ids of the accepting and the connecting thread (for their CPU time).
    pub fn thread_ids(&self) -> [i32; 2] {
        [
            self.tids[0].load(Ordering::Relaxed),
            self.tids[1].load(Ordering::Relaxed),
        ]
    }
}

impl Drop for Churn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
