//! The guest's TCP services (echo, stream, request/response) over a pool of smoltcp sockets.
//!
//! Every port keeps [`SPARE_LISTENERS`] listening sockets. smoltcp answers a SYN with RST when no socket listens,
//! so [`Services::replenish`] runs after every received frame that changed a socket's state: a burst of SYNs
//! finds a fresh listener each, as long as the pool has room ([`MAX_SOCKETS`]). Closed sockets keep their buffers
//! and are recycled as listeners for any port.

use alloc::{vec, vec::Vec};

use guest_abi::{ECHO_PORT, MAX_CONNECTIONS, RR_PORT, STREAM_PORT, STREAM_RECORD};
use smoltcp::{
    iface::{Interface, PollIngressSingleResult, PollResult, SocketHandle, SocketSet},
    phy::Device,
    socket::tcp::{self, State},
    time::Instant,
};

use crate::{
    pace::Pacer,
    proto::{RrRequest, fill_stream},
};

/// The ports served, in the order listeners are opened.
pub const PORTS: [u16; 3] = [ECHO_PORT, STREAM_PORT, RR_PORT];
/// Listening sockets kept ready per port.
pub const SPARE_LISTENERS: usize = 4;
/// Upper bound on sockets: every connection, the spare listeners, and some closing sockets.
pub const MAX_SOCKETS: usize = MAX_CONNECTIONS + PORTS.len() * SPARE_LISTENERS + 16;
/// Receive buffer per socket.
pub const RX_BUFFER: usize = 16 * 1024;
/// Transmit buffer per socket.
pub const TX_BUFFER: usize = 64 * 1024;
/// A stream paced at a rate may owe at most this many records at once (after a long pause).
const STREAM_MAX_BACKLOG: u64 = 4096;

/// Counters for the log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections that reached ESTABLISHED (or at least left LISTEN).
    pub opened: u64,
    /// Connections that ended (closed or reset).
    pub closed: u64,
    /// Sockets currently serving a connection.
    pub active: usize,
    /// Sockets currently listening.
    pub listening: usize,
    /// SYNs that found no listener because the pool was full.
    pub pool_full: u64,
    /// Request/response connections aborted for a malformed request.
    pub bad_requests: u64,
}

#[derive(Debug)]
enum Role {
    /// Not in use; buffers kept for reuse.
    Free,
    Listening,
    Echo,
    Stream(StreamConn),
    Rr(RrConn),
}

/// How a stream connection sends.
#[derive(Debug, Default)]
enum Pace {
    /// The client's rate header has not arrived yet.
    #[default]
    AwaitingHeader,
    /// As fast as the window allows.
    Unlimited,
    /// At a fixed number of records per second.
    Rate(Pacer),
}

#[derive(Debug, Default)]
struct StreamConn {
    header: [u8; 4],
    header_len: usize,
    pace: Pace,
    /// Bytes of the stream queued so far.
    sent: u64,
}

#[derive(Debug, Default)]
struct RrConn {
    request: [u8; RrRequest::SIZE],
    request_len: usize,
    /// The response being sent and how many of its bytes are queued.
    pending: Option<(RrRequest, usize)>,
}

#[derive(Debug)]
struct Slot {
    handle: SocketHandle,
    port: u16,
    role: Role,
}

/// The connection pool and the per-connection service state.
#[derive(Debug, Default)]
pub struct Services {
    slots: Vec<Slot>,
    stats: Stats,
}

impl Services {
    /// Opens the initial listeners.
    pub fn new(sockets: &mut SocketSet<'_>) -> Self {
        let mut services = Self::default();
        services.replenish(sockets);
        services
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Notices listeners that took a connection, gives the connection its role, recycles closed sockets and opens
    /// listeners so each port has [`SPARE_LISTENERS`] again. Cheap; call it whenever sockets changed state.
    pub fn replenish(&mut self, sockets: &mut SocketSet<'_>) {
        let mut listening = [0usize; PORTS.len()];
        for slot in &mut self.slots {
            let socket = sockets.get_mut::<tcp::Socket>(slot.handle);
            match (&slot.role, socket.state()) {
                (Role::Free, _) => {}
                (Role::Listening, State::Listen) => {
                    if let Some(i) = PORTS.iter().position(|&p| p == slot.port) {
                        listening[i] += 1;
                    }
                }
                (Role::Listening, State::Closed) => slot.role = Role::Free,
                (Role::Listening, _) => {
                    self.stats.opened += 1;
                    slot.role = match slot.port {
                        ECHO_PORT => Role::Echo,
                        STREAM_PORT => Role::Stream(StreamConn::default()),
                        _ => Role::Rr(RrConn::default()),
                    };
                }
                (_, State::Closed) => {
                    self.stats.closed += 1;
                    slot.role = Role::Free;
                }
                _ => {}
            }
        }
        for (i, &port) in PORTS.iter().enumerate() {
            while listening[i] < SPARE_LISTENERS {
                if !self.open_listener(sockets, port) {
                    break;
                }
                listening[i] += 1;
            }
        }
        self.stats.listening = listening.iter().sum();
        self.stats.active = self
            .slots
            .iter()
            .filter(|s| !matches!(s.role, Role::Free | Role::Listening))
            .count();
    }

    fn open_listener(&mut self, sockets: &mut SocketSet<'_>, port: u16) -> bool {
        let index = if let Some(i) = self.slots.iter().position(|s| matches!(s.role, Role::Free)) {
            i
        } else if self.slots.len() < MAX_SOCKETS {
            let socket = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0u8; RX_BUFFER]),
                tcp::SocketBuffer::new(vec![0u8; TX_BUFFER]),
            );
            let handle = sockets.add(socket);
            self.slots.push(Slot {
                handle,
                port,
                role: Role::Free,
            });
            self.slots.len() - 1
        } else {
            self.stats.pool_full += 1;
            return false;
        };
        let slot = &mut self.slots[index];
        let socket = sockets.get_mut::<tcp::Socket>(slot.handle);
        // A recycled socket is Closed, so listen() cannot fail; if it did, leave the slot free.
        if socket.listen(port).is_err() {
            return false;
        }
        socket.set_nagle_enabled(false);
        slot.port = port;
        slot.role = Role::Listening;
        true
    }

    /// Moves data for every connection. Returns whether anything was queued or consumed.
    pub fn serve(&mut self, sockets: &mut SocketSet<'_>, now: Instant) -> bool {
        let mut progress = false;
        let now_us = now.total_micros() as u64;
        for slot in &mut self.slots {
            let socket = sockets.get_mut::<tcp::Socket>(slot.handle);
            progress |= match &mut slot.role {
                Role::Free | Role::Listening => false,
                Role::Echo => serve_echo(socket),
                Role::Stream(conn) => serve_stream(socket, conn, now_us),
                Role::Rr(conn) => {
                    let (p, bad) = serve_rr(socket, conn);
                    self.stats.bad_requests += u64::from(bad);
                    p
                }
            };
            close_when_peer_done(socket);
        }
        progress
    }

    /// The earliest time a paced stream has its next record due, if any stream waits for time rather than for the
    /// window.
    pub fn next_deadline(&self, sockets: &SocketSet<'_>) -> Option<Instant> {
        self.slots
            .iter()
            .filter_map(|slot| match &slot.role {
                Role::Stream(StreamConn {
                    pace: Pace::Rate(pacer),
                    ..
                }) => {
                    let socket = sockets.get::<tcp::Socket>(slot.handle);
                    socket
                        .can_send()
                        .then(|| Instant::from_micros(pacer.next_due_us(1) as i64))
                }
                _ => None,
            })
            .min()
    }
}

/// Most frames handled by one [`poll`] call, so other work (the dirtier) still gets its slices under load.
pub const MAX_FRAMES_PER_POLL: usize = 64;

/// One round of networking: received frames one at a time (replenishing listeners whenever a socket changed
/// state, so a burst of SYNs is accepted), the services, then everything queued for transmission.
/// Returns whether anything happened; `true` means: call again before sleeping.
pub fn poll(
    iface: &mut Interface,
    device: &mut (impl Device + ?Sized),
    sockets: &mut SocketSet<'_>,
    services: &mut Services,
    now: Instant,
) -> bool {
    let mut activity = false;
    iface.poll_maintenance(now);
    for _ in 0..MAX_FRAMES_PER_POLL {
        match iface.poll_ingress_single(now, device, sockets) {
            PollIngressSingleResult::None => break,
            PollIngressSingleResult::PacketProcessed => activity = true,
            PollIngressSingleResult::SocketStateChanged => {
                activity = true;
                services.replenish(sockets);
            }
        }
    }
    services.replenish(sockets);
    activity |= services.serve(sockets, now);
    while iface.poll_egress(now, device, sockets) == PollResult::SocketStateChanged {
        activity = true;
    }
    services.replenish(sockets);
    activity
}

/// Closes our side once the peer has closed and everything it sent was consumed (FIN follows queued data).
fn close_when_peer_done(socket: &mut tcp::Socket<'_>) {
    if socket.state() == State::CloseWait && !socket.can_recv() {
        socket.close();
    }
}

fn free_tx(socket: &tcp::Socket<'_>) -> usize {
    socket.send_capacity() - socket.send_queue()
}

fn serve_echo(socket: &mut tcp::Socket<'_>) -> bool {
    let mut buf = [0u8; 2048];
    let mut progress = false;
    while socket.can_recv() && socket.may_send() {
        let room = free_tx(socket).min(buf.len());
        if room == 0 {
            break;
        }
        let Ok(n) = socket.recv_slice(&mut buf[..room]) else {
            break;
        };
        if n == 0 {
            break;
        }
        // Fits: at most `room` bytes were read and `room` bytes are free.
        let _sent = socket.send_slice(&buf[..n]);
        progress = true;
    }
    progress
}

fn discard_input(socket: &mut tcp::Socket<'_>) -> bool {
    let mut any = false;
    while let Ok(n) = socket.recv(|data| (data.len(), data.len())) {
        if n == 0 {
            break;
        }
        any = true;
    }
    any
}

fn serve_stream(socket: &mut tcp::Socket<'_>, conn: &mut StreamConn, now_us: u64) -> bool {
    let mut progress = false;
    if matches!(conn.pace, Pace::AwaitingHeader) {
        while conn.header_len < conn.header.len() {
            let Ok(n) = socket.recv_slice(&mut conn.header[conn.header_len..]) else {
                break;
            };
            if n == 0 {
                break;
            }
            conn.header_len += n;
            progress = true;
        }
        if conn.header_len < conn.header.len() {
            return progress;
        }
        let rate = u32::from_be_bytes(conn.header);
        conn.pace = if rate == 0 {
            Pace::Unlimited
        } else {
            Pace::Rate(Pacer::new(u64::from(rate), now_us, STREAM_MAX_BACKLOG))
        };
    }
    progress |= discard_input(socket);
    if !socket.may_send() {
        return progress;
    }
    let record = STREAM_RECORD as u64;
    // Bytes the pacing allows beyond what is queued (whole records only).
    let mut allowed = match conn.pace {
        Pace::Rate(ref mut pacer) => {
            let due = pacer.due(now_us);
            let target = (pacer.done() + due) * record;
            target.saturating_sub(conn.sent)
        }
        _ => u64::MAX,
    };
    while allowed > 0 {
        let sent = conn.sent;
        let queued = socket.send(|buf| {
            let n = (buf.len() as u64).min(allowed) as usize;
            fill_stream(&mut buf[..n], sent);
            (n, n)
        });
        match queued {
            Ok(n) if n > 0 => {
                conn.sent += n as u64;
                allowed -= n as u64;
                progress = true;
            }
            _ => break,
        }
    }
    if let Pace::Rate(ref mut pacer) = conn.pace {
        let records = conn.sent / record;
        let recorded = pacer.done();
        if records > recorded {
            pacer.record(records - recorded);
        }
    }
    progress
}

/// Returns (progress, whether the connection was aborted for a bad request).
fn serve_rr(socket: &mut tcp::Socket<'_>, conn: &mut RrConn) -> (bool, bool) {
    let mut progress = false;
    loop {
        if let Some((request, done)) = conn.pending {
            let total = request.response_len();
            let queued = socket.send(|buf| {
                let n = buf.len().min(total - done);
                request.fill_response(&mut buf[..n], done);
                (n, n)
            });
            match queued {
                Ok(n) if n > 0 => {
                    progress = true;
                    conn.pending = (done + n < total).then_some((request, done + n));
                    continue;
                }
                _ => return (progress, false),
            }
        }
        while conn.request_len < RrRequest::SIZE {
            let Ok(n) = socket.recv_slice(&mut conn.request[conn.request_len..]) else {
                break;
            };
            if n == 0 {
                break;
            }
            conn.request_len += n;
            progress = true;
        }
        if conn.request_len < RrRequest::SIZE {
            return (progress, false);
        }
        conn.request_len = 0;
        let Ok(request) = RrRequest::parse(conn.request) else {
            socket.abort();
            return (true, true);
        };
        conn.pending = Some((request, 0));
    }
}

#[cfg(test)]
mod tests {
    //! The services end to end over smoltcp's loopback device: a client socket in the same interface.

    use smoltcp::{
        iface::{Config, Interface},
        phy::{Loopback, Medium},
        wire::{EthernetAddress, IpAddress, IpCidr},
    };
    use std::vec::Vec as StdVec;

    use super::*;
    use crate::proto::fill_stream;

    struct Net {
        iface: Interface,
        dev: Loopback,
        sockets: SocketSet<'static>,
        services: Services,
        now: Instant,
    }

    impl Net {
        fn new() -> Self {
            let mut dev = Loopback::new(Medium::Ethernet);
            let config = Config::new(EthernetAddress([2, 0, 0, 0, 0, 1]).into());
            let now = Instant::from_millis(1000);
            let mut iface = Interface::new(config, &mut dev, now);
            iface.update_ip_addrs(|a| a.push(IpCidr::new(IpAddress::v4(127, 0, 0, 1), 8)).unwrap());
            let mut sockets = SocketSet::new(StdVec::new());
            let services = Services::new(&mut sockets);
            Self {
                iface,
                dev,
                sockets,
                services,
                now,
            }
        }

        fn step(&mut self) {
            self.now += smoltcp::time::Duration::from_millis(1);
            while poll(
                &mut self.iface,
                &mut self.dev,
                &mut self.sockets,
                &mut self.services,
                self.now,
            ) {}
        }

        fn client(&mut self, port: u16, local: u16) -> SocketHandle {
            let mut s = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0u8; 256 * 1024]),
                tcp::SocketBuffer::new(vec![0u8; 16 * 1024]),
            );
            s.connect(self.iface.context(), (IpAddress::v4(127, 0, 0, 1), port), local)
                .unwrap();
            self.sockets.add(s)
        }

        fn run_until(&mut self, mut done: impl FnMut(&mut Self) -> bool) {
            for _ in 0..20_000 {
                self.step();
                if done(self) {
                    return;
                }
            }
            panic!("condition not reached");
        }
    }

    fn received(net: &mut Net, h: SocketHandle, out: &mut StdVec<u8>) {
        let s = net.sockets.get_mut::<tcp::Socket>(h);
        while let Ok(n) = s.recv(|d| {
            out.extend_from_slice(d);
            (d.len(), d.len())
        }) {
            if n == 0 {
                break;
            }
        }
    }

    #[test]
    fn echo_returns_bytes() {
        let mut net = Net::new();
        let c = net.client(ECHO_PORT, 40000);
        net.run_until(|n| n.sockets.get::<tcp::Socket>(c).may_send());
        let msg: StdVec<u8> = (0..50_000u32).map(|i| i as u8).collect();
        let mut sent = 0;
        let mut got = StdVec::new();
        net.run_until(|n| {
            let s = n.sockets.get_mut::<tcp::Socket>(c);
            sent += s.send_slice(&msg[sent..]).unwrap();
            received(n, c, &mut got);
            got.len() == msg.len()
        });
        assert_eq!(got, msg);
        assert_eq!(net.services.stats().opened, 1);
    }

    #[test]
    fn stream_is_sequenced_and_paced() {
        let mut net = Net::new();
        let c = net.client(STREAM_PORT, 40001);
        net.run_until(|n| n.sockets.get::<tcp::Socket>(c).may_send());
        // 1000 records per second; the test clock advances 1 ms per step.
        net.sockets
            .get_mut::<tcp::Socket>(c)
            .send_slice(&1000u32.to_be_bytes())
            .unwrap();
        let mut got = StdVec::new();
        net.run_until(|n| {
            received(n, c, &mut got);
            got.len() >= 200 * STREAM_RECORD
        });
        let mut want = vec![0u8; got.len()];
        fill_stream(&mut want, 0);
        assert_eq!(got, want);
        // Paced: never far ahead of the clock (1 record per ms, the client started a few ms earlier).
        assert!(
            got.len() <= 220 * STREAM_RECORD,
            "{} bytes is ahead of the pace",
            got.len()
        );
    }

    #[test]
    fn request_response_and_bad_request() {
        let mut net = Net::new();
        let c = net.client(RR_PORT, 40002);
        net.run_until(|n| n.sockets.get::<tcp::Socket>(c).may_send());
        let mut got = StdVec::new();
        for (seq, len) in [(1u32, 0u32), (2, 3), (0x1ff, guest_abi::RR_MAX_RESPONSE)] {
            let mut req = [0u8; 8];
            req[..4].copy_from_slice(&seq.to_be_bytes());
            req[4..].copy_from_slice(&len.to_be_bytes());
            net.sockets.get_mut::<tcp::Socket>(c).send_slice(&req).unwrap();
            got.clear();
            net.run_until(|n| {
                received(n, c, &mut got);
                got.len() >= 4 + len as usize
            });
            assert_eq!(got.len(), 4 + len as usize);
            assert_eq!(got[..4], seq.to_be_bytes());
            assert!(got[4..].iter().all(|&b| b == seq as u8));
        }
        let mut bad = [0u8; 8];
        bad[4..].copy_from_slice(&u32::MAX.to_be_bytes());
        net.sockets.get_mut::<tcp::Socket>(c).send_slice(&bad).unwrap();
        net.run_until(|n| !n.sockets.get::<tcp::Socket>(c).is_open());
        assert_eq!(net.services.stats().bad_requests, 1);
    }

    #[test]
    fn many_simultaneous_connections_and_recycling() {
        let mut net = Net::new();
        let clients: StdVec<_> = (0..MAX_CONNECTIONS as u16)
            .map(|i| net.client(PORTS[i as usize % 3], 41000 + i))
            .collect();
        net.run_until(|n| {
            clients
                .iter()
                .all(|&c| n.sockets.get::<tcp::Socket>(c).state() == State::Established)
        });
        assert_eq!(net.services.stats().active, MAX_CONNECTIONS);
        for &c in &clients {
            net.sockets.get_mut::<tcp::Socket>(c).close();
        }
        net.run_until(|n| n.services.stats().closed == MAX_CONNECTIONS as u64);
        let sockets_before = net.sockets.iter().count();
        let again: StdVec<_> = (0..16u16).map(|i| net.client(ECHO_PORT, 42000 + i)).collect();
        net.run_until(|n| {
            again
                .iter()
                .all(|&c| n.sockets.get::<tcp::Socket>(c).state() == State::Established)
        });
        // Recycled: only the 16 client sockets are new.
        assert_eq!(net.sockets.iter().count(), sockets_before + 16);
    }
}
