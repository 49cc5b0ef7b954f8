//! A small rtnetlink client: link and bridge-FDB notifications and dumps on a raw `NETLINK_ROUTE` socket.
//!
//! [`RtnlSocket::open`] creates the socket inside a network namespace (a netlink socket stays in the namespace it
//! was created in, whatever thread reads it later) and subscribes it to the link and neighbour groups.
//! [`RtnlSocket::dump_links`] and [`RtnlSocket::dump_fdb`] ask for the current state; the answers and every later
//! notification come back through [`RtnlSocket::recv`] as [`Message`]s, parsed by [`parse`], which checks every
//! length against the buffer and skips what it cannot read.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

use crate::netns;

const NETLINK_ROUTE: libc::c_int = 0;
/// `RTNLGRP_LINK` as a group bit.
const RTMGRP_LINK: u32 = 1;
/// `RTNLGRP_NEIGH` as a group bit.
const RTMGRP_NEIGH: u32 = 4;

const NLMSG_HDRLEN: usize = 16;
const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_OVERRUN: u16 = 4;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTM_NEWNEIGH: u16 = 28;
const RTM_DELNEIGH: u16 = 29;
const RTM_GETNEIGH: u16 = 30;

const IFINFOMSG_LEN: usize = 16;
const NDMSG_LEN: usize = 12;

const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;

const NDA_LLADDR: u16 = 2;
const NDA_VLAN: u16 = 5;
const NDA_MASTER: u16 = 9;

/// The attribute type without the nested and byte-order flags.
const NLA_TYPE_MASK: u16 = 0x3fff;

/// `AF_BRIDGE`: the family of bridge FDB entries.
pub const AF_BRIDGE: u8 = 7;
/// `NUD_PERMANENT`: a static FDB entry (a port's own address, or one an administrator added).
pub const NUD_PERMANENT: u16 = 0x80;
/// `NTF_SELF`: an entry of the port device's own address list, not of the bridge's FDB.
pub const NTF_SELF: u8 = 0x02;

/// Errors of the rtnetlink socket.
#[derive(Debug, thiserror::Error)]
pub enum RtnlError {
    #[error(transparent)]
    Netns(#[from] netns::NetnsError),
    #[error("cannot open a NETLINK_ROUTE socket in {where_}")]
    Socket {
        where_: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot subscribe to link and neighbour notifications in {where_}")]
    Bind {
        where_: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot send an rtnetlink dump request")]
    Send(#[source] io::Error),
    #[error("cannot read rtnetlink messages")]
    Recv(#[source] io::Error),
}

/// An interface, as `RTM_NEWLINK`/`RTM_DELLINK` describe it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Link {
    /// `AF_UNSPEC` for the device itself, `AF_BRIDGE` for its bridge-port side.
    pub family: u8,
    pub ifindex: u32,
    /// `IFF_*` flags.
    pub flags: u32,
    pub name: Option<String>,
    /// The bridge (or other master) the interface is enslaved to.
    pub master: Option<u32>,
    /// `IFLA_INFO_KIND`: `bridge`, `tun`, `veth`, ... (absent for physical devices).
    pub kind: Option<String>,
    pub address: Option<[u8; 6]>,
}

/// A bridge FDB entry (`RTM_NEWNEIGH`/`RTM_DELNEIGH`, family `AF_BRIDGE`), or another neighbour entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Neigh {
    pub family: u8,
    /// The port the address sits behind.
    pub ifindex: u32,
    /// `NUD_*` state.
    pub state: u16,
    /// `NTF_*` flags.
    pub flags: u8,
    pub mac: Option<[u8; 6]>,
    /// The bridge, for an FDB entry.
    pub master: Option<u32>,
    pub vlan: Option<u16>,
}

/// One rtnetlink message, as far as this client cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    NewLink(Link),
    DelLink(Link),
    NewNeigh(Neigh),
    DelNeigh(Neigh),
    /// The end of a dump.
    Done,
    /// An error answer (a negative errno; 0 is an acknowledgement).
    Error(i32),
    /// The kernel dropped messages for this socket (`NLMSG_OVERRUN`).
    Overrun,
    /// A message of another type.
    Other(u16),
}

/// A part of a buffer that could not be read, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("skipped a malformed rtnetlink message (type {msg_type}): {why}")]
pub struct ParseError {
    pub msg_type: u16,
    pub why: &'static str,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// The attributes in `b`: (type, payload). Stops at the first one whose length does not fit.
fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = usize::from(u16_at(b, 0)?);
        let ty = u16_at(b, 2)?;
        if len < 4 || len > b.len() {
            return None;
        }
        let payload = &b[4..len];
        b = b.get(align4(len)..).unwrap_or(&[]);
        Some((ty & NLA_TYPE_MASK, payload))
    })
}

fn mac_of(p: &[u8]) -> Option<[u8; 6]> {
    p.try_into().ok()
}

fn string_of(p: &[u8]) -> Option<String> {
    let end = p.iter().position(|&c| c == 0).unwrap_or(p.len());
    std::str::from_utf8(&p[..end]).ok().map(str::to_owned)
}

fn parse_link(body: &[u8], msg_type: u16) -> Result<Link, ParseError> {
    let bad = |why| ParseError { msg_type, why };
    if body.len() < IFINFOMSG_LEN {
        return Err(bad("shorter than its ifinfomsg"));
    }
    let mut link = Link {
        family: body[0],
        ifindex: u32_at(body, 4).ok_or(bad("no index"))?,
        flags: u32_at(body, 8).ok_or(bad("no flags"))?,
        ..Link::default()
    };
    for (ty, p) in attrs(&body[IFINFOMSG_LEN..]) {
        match ty {
            IFLA_IFNAME => link.name = string_of(p),
            IFLA_MASTER => link.master = u32_at(p, 0).filter(|&m| m != 0),
            IFLA_ADDRESS => link.address = mac_of(p),
            IFLA_LINKINFO => {
                for (ity, ip) in attrs(p) {
                    if ity == IFLA_INFO_KIND {
                        link.kind = string_of(ip);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(link)
}

fn parse_neigh(body: &[u8], msg_type: u16) -> Result<Neigh, ParseError> {
    let bad = |why| ParseError { msg_type, why };
    if body.len() < NDMSG_LEN {
        return Err(bad("shorter than its ndmsg"));
    }
    let mut n = Neigh {
        family: body[0],
        ifindex: u32_at(body, 4).ok_or(bad("no index"))?,
        state: u16_at(body, 8).ok_or(bad("no state"))?,
        flags: body[10],
        ..Neigh::default()
    };
    for (ty, p) in attrs(&body[NDMSG_LEN..]) {
        match ty {
            NDA_LLADDR => n.mac = mac_of(p),
            NDA_MASTER => n.master = u32_at(p, 0).filter(|&m| m != 0),
            NDA_VLAN => n.vlan = u16_at(p, 0),
            _ => {}
        }
    }
    Ok(n)
}

/// Parses the netlink messages in `buf` (one `recv`'s worth). A message that cannot be read is an `Err` and the
/// rest of the buffer is still read when its length is sound; a length that is not ends the parse.
pub fn parse(buf: &[u8]) -> Vec<Result<Message, ParseError>> {
    let mut out = Vec::new();
    let mut rest = buf;
    while rest.len() >= NLMSG_HDRLEN {
        let (Some(len), Some(msg_type)) = (u32_at(rest, 0), u16_at(rest, 4)) else {
            break;
        };
        let len = len as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            out.push(Err(ParseError {
                msg_type,
                why: "its length runs past the buffer",
            }));
            break;
        }
        let body = &rest[NLMSG_HDRLEN..len];
        out.push(match msg_type {
            RTM_NEWLINK => parse_link(body, msg_type).map(Message::NewLink),
            RTM_DELLINK => parse_link(body, msg_type).map(Message::DelLink),
            RTM_NEWNEIGH => parse_neigh(body, msg_type).map(Message::NewNeigh),
            RTM_DELNEIGH => parse_neigh(body, msg_type).map(Message::DelNeigh),
            NLMSG_DONE => Ok(Message::Done),
            NLMSG_ERROR => u32_at(body, 0)
                .map(|e| Message::Error(e as i32))
                .ok_or(ParseError {
                    msg_type,
                    why: "an error message without its errno",
                }),
            NLMSG_OVERRUN => Ok(Message::Overrun),
            NLMSG_NOOP => Ok(Message::Other(msg_type)),
            other => Ok(Message::Other(other)),
        });
        rest = rest.get(align4(len)..).unwrap_or(&[]);
    }
    out
}

/// A `NETLINK_ROUTE` socket subscribed to link and neighbour notifications of one namespace.
#[derive(Debug)]
pub struct RtnlSocket {
    fd: OwnedFd,
    seq: u32,
    netns: Option<String>,
}

/// Receive buffer asked for: a burst of notifications (a bridge with many ports going away) must not overrun it.
const RCVBUF: libc::c_int = 4 << 20;

fn where_(netns: Option<&str>) -> String {
    netns.map_or_else(
        || "the root network namespace".to_owned(),
        |n| format!("network namespace {n}"),
    )
}

impl RtnlSocket {
    /// Opens a nonblocking socket in namespace `netns` (`None`: the current one), subscribed to link and
    /// neighbour notifications.
    pub fn open(netns: Option<&str>) -> Result<Self, RtnlError> {
        let where_ = where_(netns);
        let fd = netns::run_in(netns, || {
            // SAFETY: plain socket call; the result is checked and owned below.
            let raw = unsafe {
                libc::socket(
                    libc::AF_NETLINK,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                    NETLINK_ROUTE,
                )
            };
            if raw < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `raw` is a fresh socket that nothing else owns.
            Ok(unsafe { OwnedFd::from_raw_fd(raw) })
        })?
        .map_err(|source| RtnlError::Socket {
            where_: where_.clone(),
            source,
        })?;
        let rcvbuf: libc::c_int = RCVBUF;
        // SAFETY: `fd` is our socket; the option value is a c_int that lives across the call. Failing is not an
        // error (without CAP_NET_ADMIN the default buffer stays); overruns are then reported as such.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&raw const rcvbuf).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        // SAFETY: an all-zero sockaddr_nl is valid; the fields set below are plain integers.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = RTMGRP_LINK | RTMGRP_NEIGH;
        // SAFETY: `addr` is a valid sockaddr_nl of the size given.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(RtnlError::Bind {
                where_,
                source: io::Error::last_os_error(),
            });
        }
        Ok(Self {
            fd,
            seq: 0,
            netns: netns.map(str::to_owned),
        })
    }

    /// The namespace this socket watches.
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    fn request(&mut self, msg_type: u16, family: u8, body_len: usize) -> Result<(), RtnlError> {
        self.seq = self.seq.wrapping_add(1);
        let len = NLMSG_HDRLEN + body_len;
        let mut msg = vec![0u8; len];
        msg[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
        msg[4..6].copy_from_slice(&msg_type.to_ne_bytes());
        msg[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
        msg[8..12].copy_from_slice(&self.seq.to_ne_bytes());
        msg[NLMSG_HDRLEN] = family;
        // SAFETY: an all-zero sockaddr_nl addresses the kernel.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `msg` and `kernel` are valid for the lengths given and live across the call.
        let rc = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&raw const kernel).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(RtnlError::Send(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Asks for every link of the namespace; the answers end with [`Message::Done`].
    pub fn dump_links(&mut self) -> Result<(), RtnlError> {
        self.request(RTM_GETLINK, libc::AF_UNSPEC as u8, IFINFOMSG_LEN)
    }

    /// Asks for every bridge FDB entry of the namespace; the answers end with [`Message::Done`].
    pub fn dump_fdb(&mut self) -> Result<(), RtnlError> {
        self.request(RTM_GETNEIGH, AF_BRIDGE, NDMSG_LEN)
    }

    /// Reads one datagram into `buf` without blocking; `Ok(None)` when nothing is pending. `ENOBUFS` (the kernel
    /// dropped notifications) comes back as [`Message::Overrun`].
    pub fn recv(&self, buf: &mut [u8]) -> Result<Option<Vec<Result<Message, ParseError>>>, RtnlError> {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN | libc::EINTR) => Ok(None),
                Some(libc::ENOBUFS) => Ok(Some(vec![Ok(Message::Overrun)])),
                _ => Err(RtnlError::Recv(e)),
            };
        }
        Ok(Some(parse(&buf[..n as usize])))
    }

    /// Blocks until a datagram is pending or `timeout_ms` passed (`-1`: no limit); true when one is.
    pub fn wait(&self, timeout_ms: i32) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&raw mut pfd, 1, timeout_ms) };
        rc > 0 && pfd.revents & libc::POLLIN != 0
    }
}

impl AsFd for RtnlSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A buffer large enough for any rtnetlink datagram (the kernel sizes dump datagrams to a page or 32 KiB).
pub const RECV_BUF: usize = 64 << 10;

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(ty: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(payload);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    fn msg(ty: u16, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(&[0; 10]);
        v.extend_from_slice(body);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    fn link_body(ifindex: u32, attrs: &[Vec<u8>]) -> Vec<u8> {
        let mut b = vec![0u8; IFINFOMSG_LEN];
        b[4..8].copy_from_slice(&ifindex.to_ne_bytes());
        b[8..12].copy_from_slice(&1u32.to_ne_bytes());
        for a in attrs {
            b.extend_from_slice(a);
        }
        b
    }

    #[test]
    fn a_tap_joining_a_bridge() {
        let info = attr(IFLA_LINKINFO | 0x8000, &attr(IFLA_INFO_KIND, b"tun\0"));
        let body = link_body(
            7,
            &[
                attr(IFLA_IFNAME, b"tap-b\0"),
                attr(IFLA_MASTER, &3u32.to_ne_bytes()),
                attr(IFLA_ADDRESS, &[0xfe, 0x54, 0, 1, 2, 3]),
                info,
            ],
        );
        let mut buf = msg(RTM_NEWLINK, &body);
        buf.extend(msg(RTM_DELLINK, &link_body(8, &[attr(IFLA_IFNAME, b"old\0")])));
        buf.extend(msg(NLMSG_DONE, &[0; 4]));
        let got = parse(&buf);
        assert_eq!(
            got[0],
            Ok(Message::NewLink(Link {
                family: 0,
                ifindex: 7,
                flags: 1,
                name: Some("tap-b".into()),
                master: Some(3),
                kind: Some("tun".into()),
                address: Some([0xfe, 0x54, 0, 1, 2, 3]),
            }))
        );
        assert!(matches!(&got[1], Ok(Message::DelLink(l)) if l.ifindex == 8 && l.master.is_none()));
        assert_eq!(got[2], Ok(Message::Done));
        assert_eq!(got.len(), 3);
    }

    #[test]
    fn an_fdb_entry() {
        let mut body = vec![0u8; NDMSG_LEN];
        body[0] = AF_BRIDGE;
        body[4..8].copy_from_slice(&7u32.to_ne_bytes());
        body[8..10].copy_from_slice(&2u16.to_ne_bytes());
        body[10] = 0x04;
        body.extend(attr(NDA_LLADDR, &[0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        body.extend(attr(NDA_MASTER, &3u32.to_ne_bytes()));
        let got = parse(&msg(RTM_NEWNEIGH, &body));
        assert_eq!(
            got,
            vec![Ok(Message::NewNeigh(Neigh {
                family: AF_BRIDGE,
                ifindex: 7,
                state: 2,
                flags: 4,
                mac: Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
                master: Some(3),
                vlan: None,
            }))]
        );
    }

    #[test]
    fn damaged_buffers_are_skipped_not_trusted() {
        // A length past the end, a body shorter than its header, attributes with lengths that do not fit.
        let mut buf = msg(RTM_NEWLINK, &[0u8; 4]);
        let got = parse(&buf);
        assert!(matches!(&got[0], Err(e) if e.why.contains("ifinfomsg")));
        buf = msg(RTM_NEWLINK, &link_body(5, &[vec![200, 0, 3, 0, b'x', 0, 0, 0]]));
        assert!(matches!(&parse(&buf)[0], Ok(Message::NewLink(l)) if l.name.is_none() && l.ifindex == 5));
        buf = msg(RTM_NEWLINK, &link_body(5, &[]));
        buf[0] = 200;
        assert!(matches!(&parse(&buf)[0], Err(e) if e.why.contains("past the buffer")));
        assert!(parse(&[1, 2, 3]).is_empty());
    }

    #[test]
    fn random_bytes_never_panic() {
        use proptest::prelude::*;
        proptest!(|(bytes in proptest::collection::vec(any::<u8>(), 0..512))| {
            let _ = parse(&bytes);
            // Also behind a valid header.
            let _ = parse(&msg(RTM_NEWLINK, &bytes));
            let _ = parse(&msg(RTM_NEWNEIGH, &bytes));
        });
    }
}
