//! A TCP client load generator for the guest's services: sequence-checked streams and request/response, each
//! connection on its own thread in a client namespace, with a verdict per connection (alive, or aborted with its
//! errno) and the longest time it went without progress.
//!
//! Socket profiles ([`Profile`]) set how quickly a client gives up on a silent peer, which is what decides whether a
//! migration's pause kills a session:
//! - `linux`: the kernel defaults (`tcp_retries2` = 15, RTO min 200 ms: about 15 minutes before an abort);
//! - `user-timeout=D`: `TCP_USER_TIMEOUT` D on every socket;
//! - `windows-2003`: an imitation of a Windows Server 2003 client (`TcpMaxDataRetransmissions` = 5, the RTO doubling
//!   from a small SRTT-based start): `tcp_retries2` = 3 in the client namespace and a route `rto_min` of 80 ms
//!   towards the VM. See [`Profile::arithmetic`] for why those two settings give exactly 5 retransmissions and an
//!   abort 63 × 80 ms = 5.04 s after the segment that got stuck.

use std::{
    fmt,
    io::{ErrorKind, Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    os::fd::AsRawFd,
    str::FromStr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use migmon_base::{
    Errno,
    units::{fmt_duration, parse_duration},
};

use crate::net::{NetError, in_netns, try_ip_in, try_netns_exec};

/// Errors of the load generator.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {addr} from namespace {netns}")]
    Connect {
        addr: SocketAddr,
        netns: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up the client socket to {addr}")]
    Socket {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start a client thread")]
    Thread(#[source] std::io::Error),
    #[error("cannot apply the client profile in namespace {netns}")]
    Profile {
        netns: String,
        #[source]
        source: NetError,
    },
    #[error(transparent)]
    Net(#[from] NetError),
}

/// Linux's minimum RTO and the 120 s cap (`TCP_RTO_MIN`, `TCP_RTO_MAX`).
const RTO_MIN_DEFAULT: Duration = Duration::from_millis(200);
const RTO_MAX: Duration = Duration::from_secs(120);

/// How a client socket reacts to a silent peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// Kernel defaults.
    Linux,
    /// `TCP_USER_TIMEOUT` on every socket.
    UserTimeout(Duration),
    /// 5 data retransmissions from an 80 ms base: `tcp_retries2` = 3 and route `rto_min` 80 ms.
    Windows2003,
}

impl Profile {
    /// `net.ipv4.tcp_retries2` in the client namespace.
    pub fn tcp_retries2(self) -> u32 {
        match self {
            Self::Windows2003 => 3,
            _ => 15,
        }
    }

    /// The route `rto_min` towards the VM, when not the kernel's 200 ms.
    pub fn rto_min(self) -> Option<Duration> {
        match self {
            Self::Windows2003 => Some(Duration::from_millis(80)),
            _ => None,
        }
    }

    /// `TCP_USER_TIMEOUT` on each socket.
    pub fn user_timeout(self) -> Option<Duration> {
        match self {
            Self::UserTimeout(d) => Some(d),
            _ => None,
        }
    }

    /// Sets the namespace-wide part of the profile in `netns`: `tcp_retries2` (which IPv6 TCP shares), and a host
    /// route to `vm` (IPv4 or IPv6) over `dev` with the profile's `rto_min` (or without one, for the defaults).
    /// Idempotent.
    pub fn apply(self, netns: &str, dev: &str, vm: IpAddr) -> Result<(), ClientError> {
        let err = |source| ClientError::Profile {
            netns: netns.to_owned(),
            source,
        };
        let sysctl = format!("net.ipv4.tcp_retries2={}", self.tcp_retries2());
        try_netns_exec(netns, &["sysctl", "-qw", &sysctl]).map_err(err)?;
        let dst = if vm.is_ipv4() {
            format!("{vm}/32")
        } else {
            format!("{vm}/128")
        };
        let family = if vm.is_ipv4() { "-4" } else { "-6" };
        let mut args = vec![family, "route", "replace", dst.as_str(), "dev", dev];
        let rto;
        if let Some(r) = self.rto_min() {
            rto = format!("{}ms", r.as_millis());
            args.extend(["rto_min", rto.as_str()]);
        }
        try_ip_in(Some(netns), &args).map_err(err)?;
        Ok(())
    }

    /// When a connection that stops getting answers retransmits, and when it aborts, counted from the moment the
    /// stuck segment was first sent, as this kernel's retransmission timer does it (`net/ipv4/tcp_timer.c`):
    /// - the timer fires at `base·(2^k − 1)`, each interval capped at 120 s, where `base` is the RTO (about
    ///   `rto_min` on a LAN);
    /// - at each firing after the first, the kernel aborts with ETIMEDOUT when the time since the first
    ///   retransmission has reached `TCP_USER_TIMEOUT` (the timer is clamped to fire exactly then), or else the
    ///   `tcp_retries2` budget, which is computed from a 200 ms base whatever the real RTO:
    ///   `200 ms·(2^(n+1) − 1)`, plus 120 s per retry beyond 9;
    /// - otherwise it retransmits.
    ///
    /// The stuck segment is assumed sent with an RTT near 0, so `base` = `rto_min` (or 200 ms).
    pub fn arithmetic(self) -> Arithmetic {
        let base = self.rto_min().unwrap_or(RTO_MIN_DEFAULT);
        let budget = self
            .user_timeout()
            .unwrap_or_else(|| retries2_budget(self.tcp_retries2()));
        let mut retransmits = Vec::new();
        let mut now = Duration::ZERO;
        let mut interval = base;
        loop {
            let mut next = now + interval;
            if let Some(first) = retransmits.first().copied() {
                if self.user_timeout().is_some() {
                    next = next.min(first + budget);
                }
                if next.saturating_sub(first) >= budget {
                    return Arithmetic {
                        profile: self,
                        base,
                        retransmits,
                        abort_at: next,
                    };
                }
            }
            retransmits.push(next);
            now = next;
            interval = (interval * 2).min(RTO_MAX);
        }
    }
}

/// Linux's `tcp_model_timeout`: the time `tcp_retries2` = n allows, from a 200 ms base.
fn retries2_budget(n: u32) -> Duration {
    let thresh = 9; // ilog2(TCP_RTO_MAX / TCP_RTO_MIN)
    if n <= thresh {
        RTO_MIN_DEFAULT * ((2u32 << n) - 1)
    } else {
        RTO_MIN_DEFAULT * ((2u32 << thresh) - 1) + RTO_MAX * (n - thresh)
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Linux => f.write_str("linux"),
            Self::UserTimeout(d) => write!(f, "user-timeout={}", fmt_duration(*d)),
            Self::Windows2003 => f.write_str("windows-2003"),
        }
    }
}

impl FromStr for Profile {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "linux" => Ok(Self::Linux),
            "windows-2003" => Ok(Self::Windows2003),
            _ => {
                let Some(d) = s.strip_prefix("user-timeout=") else {
                    return Err(format!(
                        "unknown client profile {s:?}: use windows-2003, linux or user-timeout=D (e.g. 5s)"
                    ));
                };
                parse_duration(d)
                    .map(Self::UserTimeout)
                    .map_err(|e| format!("client profile {s:?}: {e}"))
            }
        }
    }
}

/// The retransmission schedule a profile implies (see [`Profile::arithmetic`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Arithmetic {
    pub profile: Profile,
    /// The RTO the schedule starts from.
    pub base: Duration,
    /// When each retransmission goes out, after the stuck segment was first sent.
    pub retransmits: Vec<Duration>,
    /// When the connection aborts with ETIMEDOUT.
    pub abort_at: Duration,
}

impl Arithmetic {
    /// The first retransmission after an outage of `d` (a connection that lost a segment as the outage began
    /// heals then), or `None` when it aborts first.
    pub fn first_retransmit_after(&self, d: Duration) -> Option<Duration> {
        self.retransmits.iter().copied().find(|t| *t >= d)
    }

    /// The last retransmission: an outage ending before it is survived, one lasting past it is not.
    pub fn last_retransmit(&self) -> Duration {
        self.retransmits.last().copied().unwrap_or_default()
    }
}

impl fmt::Display for Arithmetic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let settings = match self.profile {
            Profile::Linux => "tcp_retries2=15, RTO min 200 ms (kernel defaults)".to_owned(),
            Profile::UserTimeout(d) => format!("TCP_USER_TIMEOUT={}, RTO min 200 ms", fmt_duration(d)),
            Profile::Windows2003 => "tcp_retries2=3 and route rto_min 80ms (imitating Windows 2003: \
                                     TcpMaxDataRetransmissions=5 from an SRTT-based RTO)"
                .to_owned(),
        };
        let shown: Vec<String> = self
            .retransmits
            .iter()
            .take(8)
            .map(|t| format!("{:.2}", t.as_secs_f64()))
            .collect();
        let more = if self.retransmits.len() > 8 { ", ..." } else { "" };
        write!(
            f,
            "client profile {}: {settings}. A segment that gets no answer is retransmitted {} times (at {}{more} s) \
             and the connection aborts with ETIMEDOUT {:.2} s after it was sent; an outage that outlasts the last \
             retransmission ({:.2} s) kills every connection that was sending.",
            self.profile,
            self.retransmits.len(),
            shown.join(", "),
            self.abort_at.as_secs_f64(),
            self.last_retransmit().as_secs_f64(),
        )
    }
}

/// What a client does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Reads the guest's sequence-numbered stream at `rate` records/s (0: as fast as it comes), checking every
    /// record. With `acks`, it also writes an 8-byte count of records received every 100 ms, as a player's
    /// receiver report does: the guest discards it, but it gives the client's TCP outstanding data, so a dead peer
    /// is noticed by the retransmission timer as for a sending client.
    Stream { rate: u32, acks: bool },
    /// One request at a time for `len`-byte answers, `interval` apart.
    RequestResponse { len: u32, interval: Duration },
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Self::Stream { .. } => "stream",
            Self::RequestResponse { .. } => "rr",
        }
    }
}

/// How one connection ended (or has not).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Still making progress (or stopped by us).
    Alive,
    /// The socket failed: the kernel's error and its errno.
    Aborted { errno: Option<i32>, error: String },
    /// Data came back wrong: a record out of sequence, a bad response.
    Broken { reason: String },
    /// No progress for longer than the client's stall limit.
    Stalled { after: Duration },
}

impl Verdict {
    pub fn is_alive(&self) -> bool {
        matches!(self, Self::Alive)
    }

    /// The errno of an abort.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Aborted { errno, .. } => *errno,
            _ => None,
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Alive => f.write_str("alive"),
            Self::Aborted { errno: Some(e), .. } => write!(f, "aborted ({})", Errno(*e)),
            Self::Aborted { errno: None, error } => write!(f, "aborted ({error})"),
            Self::Broken { reason } => write!(f, "broken ({reason})"),
            Self::Stalled { after } => write!(f, "stalled ({:.1} s without progress)", after.as_secs_f64()),
        }
    }
}

/// What a client has seen so far.
#[derive(Clone, Debug)]
pub struct ClientReport {
    pub kind: Kind,
    /// The client's end of the connection (its port identifies it in migmon's report).
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Records or responses received.
    pub count: u64,
    /// The longest time without progress (since the start, or since the last [`Client::take_max_gap`]).
    pub max_gap: Duration,
    pub verdict: Verdict,
    /// The socket profile the client runs with.
    pub profile: Profile,
}

/// Shared between a client thread and its handle.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    count: AtomicU64,
    /// Longest gap in ns, reset by `take_max_gap`.
    max_gap_ns: AtomicU64,
    ended: AtomicBool,
    /// The verdict, once the thread has ended.
    verdict: Mutex<Option<Verdict>>,
}

/// A running client connection.
pub struct Client {
    kind: Kind,
    profile: Profile,
    local: SocketAddr,
    remote: SocketAddr,
    shared: Arc<Shared>,
    handle: Option<JoinHandle<Verdict>>,
}

/// Options common to every client.
#[derive(Clone, Copy, Debug)]
pub struct ClientOptions {
    pub profile: Profile,
    /// No progress for this long ends the client with [`Verdict::Stalled`].
    pub stall_limit: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            profile: Profile::Linux,
            stall_limit: Duration::from_secs(60),
        }
    }
}

/// Sets `TCP_USER_TIMEOUT` on a socket: how long sent data may stay unacknowledged before the kernel aborts the
/// connection with `ETIMEDOUT` (whole milliseconds; longer than `u32::MAX` ms is clamped).
pub fn set_user_timeout(s: &TcpStream, d: Duration) -> std::io::Result<()> {
    let v = libc::c_uint::try_from(d.as_millis()).unwrap_or(libc::c_uint::MAX);
    // SAFETY: a valid socket fd and a c_uint option value of the right size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            (&raw const v).cast(),
            size_of::<libc::c_uint>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The slice a blocked read waits before the thread checks its stop flag and sends acks.
const SLICE: Duration = Duration::from_millis(100);

impl Client {
    /// Connects from namespace `netns` to `remote` and starts the client's thread.
    pub fn start(
        netns: &str,
        remote: SocketAddr,
        kind: Kind,
        opts: ClientOptions,
    ) -> Result<Self, ClientError> {
        let s = in_netns(netns, || {
            TcpStream::connect_timeout(&remote, Duration::from_secs(5))
        })?
        .map_err(|source| ClientError::Connect {
            addr: remote,
            netns: netns.to_owned(),
            source,
        })?;
        let sock_err = |source| ClientError::Socket { addr: remote, source };
        if let Some(d) = opts.profile.user_timeout() {
            set_user_timeout(&s, d).map_err(sock_err)?;
        }
        s.set_read_timeout(Some(SLICE)).map_err(sock_err)?;
        s.set_nodelay(true).map_err(sock_err)?;
        let local = s.local_addr().map_err(sock_err)?;
        let shared = Arc::new(Shared::default());
        let sh = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name(format!("{}-{}", kind.label(), local.port()))
            .spawn(move || {
                let v = match kind {
                    Kind::Stream { rate, acks } => stream(s, rate, acks, &sh, opts.stall_limit),
                    Kind::RequestResponse { len, interval } => rr(s, len, interval, &sh, opts.stall_limit),
                };
                *sh.verdict.lock().unwrap_or_else(PoisonError::into_inner) = Some(v.clone());
                sh.ended.store(true, Ordering::SeqCst);
                v
            })
            .map_err(ClientError::Thread)?;
        Ok(Self {
            kind,
            profile: opts.profile,
            local,
            remote,
            shared,
            handle: Some(handle),
        })
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn local(&self) -> SocketAddr {
        self.local
    }

    /// Records or responses received so far.
    pub fn progress(&self) -> u64 {
        self.shared.count.load(Ordering::SeqCst)
    }

    /// Whether the client's thread has ended (its verdict is final).
    pub fn ended(&self) -> bool {
        self.shared.ended.load(Ordering::SeqCst)
    }

    /// The longest gap since the start or the previous call, and resets it.
    pub fn take_max_gap(&self) -> Duration {
        Duration::from_nanos(self.shared.max_gap_ns.swap(0, Ordering::SeqCst))
    }

    /// What the client has seen so far, without stopping it. The max gap is taken (and reset) as by
    /// [`Client::take_max_gap`].
    pub fn snapshot(&self) -> ClientReport {
        self.report(self.verdict())
    }

    /// The verdict so far (alive while the thread runs).
    pub fn verdict(&self) -> Verdict {
        self.shared
            .verdict
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or(Verdict::Alive)
    }

    /// Stops the client and returns what it saw.
    pub fn finish(mut self) -> ClientReport {
        self.shared.stop.store(true, Ordering::SeqCst);
        let verdict = self.handle.take().map_or(Verdict::Alive, |h| {
            h.join().unwrap_or_else(|_| Verdict::Broken {
                reason: "the client thread panicked".into(),
            })
        });
        self.report(verdict)
    }

    /// The report with `verdict`; takes (and resets) the max gap.
    fn report(&self, verdict: Verdict) -> ClientReport {
        ClientReport {
            kind: self.kind,
            local: self.local,
            remote: self.remote,
            count: self.progress(),
            max_gap: self.take_max_gap(),
            verdict,
            profile: self.profile,
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Progress bookkeeping of a client thread.
struct Tracker<'a> {
    shared: &'a Shared,
    last: Instant,
    stall_limit: Duration,
}

impl<'a> Tracker<'a> {
    fn new(shared: &'a Shared, stall_limit: Duration) -> Self {
        Self {
            shared,
            last: Instant::now(),
            stall_limit,
        }
    }

    fn progress(&mut self) {
        self.shared.count.fetch_add(1, Ordering::SeqCst);
        self.note_gap();
        self.last = Instant::now();
    }

    fn note_gap(&self) {
        let gap = self.last.elapsed().as_nanos() as u64;
        self.shared.max_gap_ns.fetch_max(gap, Ordering::SeqCst);
    }

    fn stopped(&self) -> bool {
        self.shared.stop.load(Ordering::SeqCst)
    }

    /// A read failed: a timeout slice (keep waiting, unless stalled or stopped) or a real error.
    fn on_error(&self, e: &std::io::Error) -> Option<Verdict> {
        if matches!(
            e.kind(),
            ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
        ) && e.raw_os_error() != Some(libc::ETIMEDOUT)
        {
            let idle = self.last.elapsed();
            return (idle >= self.stall_limit).then_some(Verdict::Stalled { after: idle });
        }
        self.note_gap();
        Some(Verdict::Aborted {
            errno: e.raw_os_error(),
            error: e.to_string(),
        })
    }

    /// Reads what is there into `buf`: the byte count (0 after a read timeout the connection survives), or the
    /// verdict that ends the connection (`closed` names what the peer closed, for an orderly close).
    fn read(&self, s: &mut TcpStream, buf: &mut [u8], closed: &str) -> Result<usize, Verdict> {
        match s.read(buf) {
            Ok(0) => Err(Verdict::Aborted {
                errno: None,
                error: format!("the guest closed the {closed}"),
            }),
            Ok(n) => Ok(n),
            Err(e) => self.on_error(&e).map_or(Ok(0), Err),
        }
    }
}

/// Reads the stream; see [`Kind::Stream`].
fn stream(mut s: TcpStream, rate: u32, acks: bool, shared: &Shared, stall_limit: Duration) -> Verdict {
    let mut t = Tracker::new(shared, stall_limit);
    if let Err(e) = s.write_all(&rate.to_be_bytes()) {
        return t.on_error(&e).unwrap_or(Verdict::Alive);
    }
    let rec_len = guest_abi::STREAM_RECORD;
    let mut buf = vec![0u8; rec_len * 64];
    let mut have = 0usize;
    let mut next = 0u64;
    let mut last_ack = Instant::now();
    while !t.stopped() {
        if acks && last_ack.elapsed() >= SLICE {
            last_ack = Instant::now();
            if let Err(e) = s.write_all(&next.to_be_bytes())
                && let Some(v) = t.on_error(&e)
            {
                return v;
            }
        }
        match t.read(&mut s, &mut buf[have..], "stream") {
            Ok(n) => have += n,
            Err(v) => return v,
        }
        let whole = have / rec_len * rec_len;
        for rec in buf[..whole].chunks_exact(rec_len) {
            let mut n = [0u8; 8];
            n.copy_from_slice(&rec[..8]);
            let n = u64::from_be_bytes(n);
            if n != next || rec[8..].iter().any(|&b| b != n as u8) {
                return Verdict::Broken {
                    reason: format!("record {n} where {next} was due"),
                };
            }
            next += 1;
            t.progress();
        }
        buf.copy_within(whole..have, 0);
        have -= whole;
    }
    Verdict::Alive
}

/// Request/response; see [`Kind::RequestResponse`].
fn rr(mut s: TcpStream, len: u32, interval: Duration, shared: &Shared, stall_limit: Duration) -> Verdict {
    let mut t = Tracker::new(shared, stall_limit);
    let mut seq = 0u32;
    let mut resp = vec![0u8; 4 + len as usize];
    while !t.stopped() {
        let mut req = seq.to_be_bytes().to_vec();
        req.extend_from_slice(&len.to_be_bytes());
        if let Err(e) = s.write_all(&req)
            && let Some(v) = t.on_error(&e)
        {
            return v;
        }
        let mut got = 0;
        while got < resp.len() {
            if t.stopped() {
                return Verdict::Alive;
            }
            match t.read(&mut s, &mut resp[got..], "connection") {
                Ok(n) => got += n,
                Err(v) => return v,
            }
        }
        if resp[..4] != seq.to_be_bytes() || resp[4..].iter().any(|&b| b != seq as u8) {
            return Verdict::Broken {
                reason: format!("bad response to request {seq}"),
            };
        }
        seq = seq.wrapping_add(1);
        t.progress();
        // Pacing the load generator, not synchronisation.
        std::thread::sleep(interval);
    }
    Verdict::Alive
}

/// Starts `n` clients towards `vm`, alternating streams (200 records/s, with acks) and request/response (64-byte
/// answers every 5 ms), the mix of the demo and the migration tests.
pub fn start_mix(netns: &str, vm: IpAddr, n: usize, opts: ClientOptions) -> Result<Vec<Client>, ClientError> {
    (0..n)
        .map(|i| {
            let (port, kind) = if i % 2 == 0 {
                (
                    guest_abi::STREAM_PORT,
                    Kind::Stream {
                        rate: 200,
                        acks: true,
                    },
                )
            } else {
                (
                    guest_abi::RR_PORT,
                    Kind::RequestResponse {
                        len: 64,
                        interval: Duration::from_millis(5),
                    },
                )
            };
            Client::start(netns, SocketAddr::new(vm, port), kind, opts)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn windows_2003_is_five_retransmissions_and_63_times_the_base() {
        let a = Profile::Windows2003.arithmetic();
        assert_eq!(a.retransmits, vec![ms(80), ms(240), ms(560), ms(1200), ms(2480)]);
        assert_eq!(a.abort_at, ms(80 * 63));
    }

    #[test]
    fn linux_defaults_take_about_fifteen_minutes() {
        let a = Profile::Linux.arithmetic();
        assert_eq!(retries2_budget(15), ms(924_600));
        assert!(a.retransmits.len() >= 15, "{a:?}");
        assert!(a.abort_at > ms(924_600) && a.abort_at < ms(1_100_000), "{a:?}");
    }

    #[test]
    fn user_timeout_aborts_one_base_after_the_timeout() {
        // Counted from the first retransmission (0.2 s), clamped: 5.2 s.
        let a = Profile::UserTimeout(Duration::from_secs(5)).arithmetic();
        assert_eq!(a.abort_at, ms(5200));
        assert_eq!(a.last_retransmit(), ms(3000));
    }

    #[test]
    fn heal_time_after_an_outage() {
        let a = Profile::Linux.arithmetic();
        assert_eq!(a.first_retransmit_after(Duration::from_secs(8)), Some(ms(12_600)));
        let w = Profile::Windows2003.arithmetic();
        assert_eq!(w.first_retransmit_after(Duration::from_secs(8)), None);
    }

    #[test]
    fn profiles_parse_and_print() {
        for s in ["linux", "windows-2003", "user-timeout=5s", "user-timeout=500ms"] {
            let p: Profile = s.parse().unwrap();
            assert_eq!(p.to_string(), s);
        }
        assert!("windows-xp".parse::<Profile>().is_err());
        assert!("user-timeout=5x".parse::<Profile>().is_err());
        assert!(Profile::Windows2003.arithmetic().to_string().contains("5 times"));
    }
}
