//! The kernel probes against the real kernel: TCP retransmits and aborts, resets, crafted L2 frames, bridge FDB
//! moves, and ring buffer losses. Each test drives the real `migmon watch --json` (see the crate doc).
#![expect(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

use std::{
    io::{ErrorKind, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use integration_tests::{
    BridgeNetns, Netns, VethNetns, VethPair, Watch, dump,
    frames::{RawSender, arp_body, ethernet, test_mac},
    ip_in, netns_exec, of_kind, unique, wait_until,
};
use migmon_base::MacAddr;
use serde_json::Value;
use testbed::clients::set_user_timeout;

/// Two namespaces joined by a veth: client 10.<a>.<b>.1, server .2, in a /24 unique to the test process (or IPv6).
struct Pair {
    client: Netns,
    server: Netns,
    client_ip: IpAddr,
    server_ip: IpAddr,
}

impl Pair {
    /// With `v6`, the pair talks over IPv6 (`fd6d:<pid>::1` and `::2`, no DAD) instead of IPv4.
    fn new(v6: bool) -> Self {
        let pid = std::process::id();
        let (client_ip, server_ip, prefix): (IpAddr, IpAddr, u8) = if v6 {
            let base = [0xfd6d, (pid >> 16) as u16, pid as u16, 0, 0, 0, 0];
            let ip = |last: u16| {
                IpAddr::V6(Ipv6Addr::new(
                    base[0], base[1], base[2], base[3], base[4], base[5], base[6], last,
                ))
            };
            (ip(1), ip(2), 64)
        } else {
            let net = [10, 200 + (pid % 50) as u8, ((pid / 50) % 250) as u8];
            (
                IpAddr::V4(Ipv4Addr::new(net[0], net[1], net[2], 1)),
                IpAddr::V4(Ipv4Addr::new(net[0], net[1], net[2], 2)),
                24,
            )
        };
        let VethPair { a, b, .. } = VethPair::create("p", [client_ip, server_ip], prefix).unwrap();
        Self {
            client: a,
            server: b,
            client_ip,
            server_ip,
        }
    }

    /// A listener in the server namespace on an ephemeral port.
    fn listen(&self) -> TcpListener {
        let addr = SocketAddr::from((self.server_ip, 0));
        self.server
            .run(|| TcpListener::bind(addr))
            .expect("bind in the server netns")
    }

    /// A connection from the client namespace, accepted on the server side.
    fn connect(&self, listener: &TcpListener) -> (TcpStream, TcpStream) {
        let to = listener.local_addr().expect("listener address");
        let client = self
            .client
            .run(|| TcpStream::connect_timeout(&to, Duration::from_secs(5)))
            .expect("connect from the client netns");
        let (server, _) = listener.accept().expect("accept");
        (client, server)
    }

    /// Drops every packet arriving in the server namespace: the server is black-holed.
    fn blackhole_server(&self) {
        netns_exec(
            &self.server.name,
            &[
                "nft",
                "add table inet migmon_test; add chain inet migmon_test input { type filter hook input priority -300; policy drop; }",
            ],
        );
    }
}

fn tuple_of(ev: &Value) -> (String, u64, String, u64) {
    (
        ev["saddr"].as_str().unwrap_or_default().to_owned(),
        ev["sport"].as_u64().unwrap_or_default(),
        ev["daddr"].as_str().unwrap_or_default().to_owned(),
        ev["dport"].as_u64().unwrap_or_default(),
    )
}

fn for_tuple<'a>(events: &'a [Value], kind: &str, t: &(String, u64, String, u64)) -> Vec<&'a Value> {
    of_kind(events, kind)
        .into_iter()
        .filter(|e| tuple_of(e) == *t)
        .collect()
}

/// Blackholes the server, keeps writing from the client until the kernel aborts the connection, and checks the
/// events: retransmits with the exact 4-tuple, then ESTABLISHED -> CLOSE, then errno 110.
fn blackhole_abort(user_timeout_ms: Option<u32>) {
    let pair = Pair::new(false);
    if user_timeout_ms.is_none() {
        netns_exec(&pair.client.name, &["sysctl", "-qw", "net.ipv4.tcp_retries2=3"]);
    }
    let listener = pair.listen();
    let port = listener.local_addr().unwrap().port();
    let watch = Watch::start(&["--port", &port.to_string()]);
    let (mut client, mut server) = pair.connect(&listener);
    if let Some(ms) = user_timeout_ms {
        set_user_timeout(&client, Duration::from_millis(ms.into())).expect("set TCP_USER_TIMEOUT");
    }
    // Some traffic first, so the connection is established and has an RTT.
    client.write_all(b"hello").unwrap();
    let mut buf = [0u8; 5];
    server.read_exact(&mut buf).unwrap();

    let local = client.local_addr().unwrap();
    let want = (
        pair.client_ip.to_string(),
        u64::from(local.port()),
        pair.server_ip.to_string(),
        u64::from(port),
    );

    pair.blackhole_server();
    client.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
    client.write_all(b"into the void").unwrap();
    // The kernel aborts the connection; the application sees ETIMEDOUT.
    client.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let started = Instant::now();
    let err = client
        .read(&mut buf)
        .expect_err("the read must fail when the connection is aborted");
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ETIMEDOUT),
        "{err} after {:?}",
        started.elapsed()
    );

    watch.wait_for("the abort events", Duration::from_secs(10), |evs| {
        !for_tuple(evs, "tcp_error", &want).is_empty()
            && for_tuple(evs, "tcp_state", &want)
                .iter()
                .any(|e| e["new_state"] == "CLOSE")
    });
    let (events, _) = watch.stop();
    let retransmits = for_tuple(&events, "tcp_retransmit", &want);
    assert!(
        retransmits.len() >= 2,
        "want retransmits of {want:?}:\n{}",
        dump(&events)
    );
    for r in &retransmits {
        assert_eq!(r["state"], "ESTABLISHED", "{r}");
        assert!(
            r["rto_us"].as_u64().unwrap() >= 200_000,
            "RTO read from the socket: {r}"
        );
        assert_ne!(r["netns"].as_u64().unwrap(), 0, "netns read from the socket: {r}");
    }
    // The backoff grows with each retransmission of the same segment.
    let backoffs: Vec<u64> = retransmits
        .iter()
        .map(|r| r["backoff"].as_u64().unwrap())
        .collect();
    assert!(backoffs.windows(2).all(|w| w[1] >= w[0]), "backoffs {backoffs:?}");
    assert!(*backoffs.last().unwrap() >= 1, "backoffs {backoffs:?}");

    let close = for_tuple(&events, "tcp_state", &want)
        .into_iter()
        .find(|e| e["new_state"] == "CLOSE")
        .expect("a CLOSE state change");
    assert_eq!(close["old_state"], "ESTABLISHED", "{close}");
    let error = for_tuple(&events, "tcp_error", &want);
    assert_eq!(error.len(), 1, "{}", dump(&events));
    assert_eq!(error[0]["errno"], 110, "{}", error[0]);
    assert_eq!(
        error[0]["netns"], retransmits[0]["netns"],
        "the error is placed in the socket's namespace"
    );

    let ts = |e: &Value| e["ts_ns"].as_u64().unwrap();
    let first_retransmit = retransmits.iter().map(|e| ts(e)).min().unwrap();
    assert!(first_retransmit < ts(close), "retransmits come before the abort");
    assert!(
        ts(close) <= ts(error[0]),
        "the kernel closes the socket, then reports the error"
    );
    // Only the watched port is reported.
    for e in events
        .iter()
        .filter(|e| e["kind"].as_str().unwrap_or_default().starts_with("tcp_"))
    {
        assert!(
            e["sport"] == port || e["dport"] == port,
            "unwatched connection reported: {e}"
        );
    }
}

#[test]
fn blackholed_connection_retransmits_then_times_out() {
    blackhole_abort(None);
}

#[test]
fn blackholed_connection_with_user_timeout() {
    blackhole_abort(Some(1500));
}

#[test]
fn reset_is_seen_on_both_sides() {
    reset_both_sides(false);
}

#[test]
fn reset_is_seen_on_both_sides_ipv6() {
    reset_both_sides(true);
}

fn reset_both_sides(v6: bool) {
    let pair = Pair::new(v6);
    let listener = pair.listen();
    let port = listener.local_addr().unwrap().port();
    let trace = std::env::temp_dir().join(format!("{}.trace", unique("migmon-probes-")));
    let watch = Watch::start(&["--port", &port.to_string(), "--record", trace.to_str().unwrap()]);
    let (mut client, server) = pair.connect(&listener);
    let local = client.local_addr().unwrap();
    let client_side = (
        pair.client_ip.to_string(),
        u64::from(local.port()),
        pair.server_ip.to_string(),
        u64::from(port),
    );
    let server_side = (
        pair.server_ip.to_string(),
        u64::from(port),
        pair.client_ip.to_string(),
        u64::from(local.port()),
    );

    // SO_LINGER 0: close() aborts the connection with a RST.
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a valid socket fd with a pointer to a live linger struct and its size.
    let rc = unsafe {
        libc::setsockopt(
            server.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    drop(server);
    let mut buf = [0u8; 1];
    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let err = client.read(&mut buf).expect_err("the client must see the reset");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");

    watch.wait_for("reset events", Duration::from_secs(10), |evs| {
        !for_tuple(evs, "tcp_reset_out", &server_side).is_empty()
            && !for_tuple(evs, "tcp_reset_in", &client_side).is_empty()
            && !for_tuple(evs, "tcp_error", &client_side).is_empty()
    });
    let (events, _) = watch.stop();
    let out = for_tuple(&events, "tcp_reset_out", &server_side);
    assert_eq!(out.len(), 1, "{}", dump(&events));
    // An abortive close moves the socket to CLOSE before the RST goes out (`__tcp_close`).
    assert!(
        matches!(out[0]["state"].as_str(), Some("CLOSE" | "ESTABLISHED")),
        "{}",
        out[0]
    );
    let inn = for_tuple(&events, "tcp_reset_in", &client_side);
    assert_eq!(inn.len(), 1, "{}", dump(&events));
    assert_eq!(inn[0]["state"], "ESTABLISHED", "{}", inn[0]);
    let error = for_tuple(&events, "tcp_error", &client_side);
    assert_eq!(error[0]["errno"], libc::ECONNRESET, "{}", error[0]);
    let closes = for_tuple(&events, "tcp_state", &client_side);
    assert!(
        closes
            .iter()
            .any(|e| e["old_state"] == "ESTABLISHED" && e["new_state"] == "CLOSE"),
        "{}",
        dump(&events)
    );

    // The trace holds the same events as the JSON stream, after its header.
    let recorded = migmon_analysis::trace::read_trace(&trace).expect("read the --record trace");
    std::fs::remove_file(&trace).ok();
    assert!(recorded.header.is_some() && !recorded.truncated && recorded.skipped.is_empty());
    let as_json: Vec<Value> = recorded
        .events
        .iter()
        .map(|e| serde_json::to_value(e).unwrap())
        .collect();
    assert_eq!(as_json, events, "the trace and the --json stream agree");
}

fn mac(last: u8) -> MacAddr {
    test_mac(0x6d, last)
}

#[test]
fn crafted_frames_are_parsed_once_and_truncated_ones_counted() {
    let net = VethNetns::create("pl").unwrap();
    let (ns, outer, inner) = (&net.ns, &net.outer, &net.inner);
    let watched = mac(0x01);
    // The XDP parser itself (on a veth the default is TC, where the stack has untagged and dropped some of these
    // frames before the program sees them).
    let watch = Watch::start(&[
        "--xdp",
        "--iface",
        &format!("{inner}@{}", ns.name),
        "--vm",
        &watched.to_string(),
        "--port",
        "1",
    ]);
    let mut tx = RawSender::open(outer);
    for f in crafted_frames() {
        tx.send(&f);
    }

    watch.wait_for("the frames", Duration::from_secs(10), |evs| {
        let l2 = ["arp", "garp", "rarp"]
            .iter()
            .map(|k| of_kind(evs, k).len())
            .sum::<usize>();
        let malformed = of_kind(evs, "malformed")
            .last()
            .and_then(|m| m["count"].as_u64())
            .unwrap_or(0);
        l2 >= 5 && malformed >= 3
    });
    let (events, _) = watch.stop();
    let by_mac = |kind: &str, m: MacAddr| -> Vec<&Value> {
        of_kind(&events, kind)
            .into_iter()
            .filter(|e| e["mac"] == m.to_string())
            .collect()
    };
    let one = |kind: &str, m: MacAddr| -> &Value {
        let found = by_mac(kind, m);
        assert_eq!(found.len(), 1, "{kind} from {m}: exactly once\n{}", dump(&events));
        found[0]
    };
    assert_parsed_once(&one, ns, inner);
    for m in [mac(0x06), mac(0x07), mac(0x08)] {
        for kind in ["arp", "garp", "rarp"] {
            assert!(
                by_mac(kind, m).is_empty(),
                "a truncated frame from {m} was read as {kind}"
            );
        }
    }
    let malformed = of_kind(&events, "malformed");
    let last = malformed.last().expect("malformed counts");
    assert_eq!(last["count"], 3, "{}", dump(&events));
    assert_eq!(last["iface"].as_str(), Some(inner.as_str()));
    // The watched MAC: first seen once, and its counters match the one frame it sent.
    let seen = one("mac_seen", watched);
    assert_eq!(
        (seen["direction"].as_str(), seen["gap_ns"].as_u64()),
        (Some("ingress"), Some(0))
    );
    let stats = by_mac("mac_stats", watched);
    let last = stats.last().expect("mac_stats for the watched MAC");
    assert_eq!(
        (last["frames"].as_u64(), last["bytes"].as_u64()),
        (Some(1), Some(42)),
        "{last}"
    );
    // No per-frame event for unwatched MACs.
    assert!(by_mac("mac_seen", mac(0x02)).is_empty());
    // Without --ebpf-log the programs log nothing.
    assert!(
        of_kind(&events, "note")
            .iter()
            .all(|n| !n["level"].as_str().unwrap_or("").starts_with("ebpf")),
        "{}",
        dump(&events)
    );
}

/// `--ebpf-log`: the programs say why each truncated frame was passed unread, as notes in the event stream (and the
/// verifier accepts the programs with their log statements on).
#[test]
fn kernel_log_says_why_a_frame_was_passed_unread() {
    let net = VethNetns::create("plog").unwrap();
    let (ns, outer, inner) = (&net.ns, &net.outer, &net.inner);
    let watch = Watch::start(&[
        "--xdp",
        "--ebpf-log",
        "--iface",
        &format!("{inner}@{}", ns.name),
        "--vm",
        &mac(0x01).to_string(),
    ]);
    let mut tx = RawSender::open(outer);
    for f in crafted_frames() {
        tx.send(&f);
    }
    let kernel_notes = |evs: &[Value]| -> Vec<String> {
        of_kind(evs, "note")
            .into_iter()
            .filter(|n| n["level"] == "ebpf-debug")
            .filter_map(|n| n["message"].as_str().map(str::to_owned))
            .collect()
    };
    watch.wait_for("the kernel's log lines", Duration::from_secs(10), |evs| {
        kernel_notes(evs).len() >= 3
    });
    let (events, _) = watch.stop();
    let notes = kernel_notes(&events);
    let with = |s: &str| notes.iter().filter(|m| m.contains(s)).count();
    // Two ARPs cut short (one inside QinQ) and a VLAN tag cut in half, each logged once by the instance of the
    // frames' namespace.
    assert_eq!(with("ARP cut short"), 2, "{notes:#?}");
    assert_eq!(with("VLAN tags cut short"), 1, "{notes:#?}");
    assert!(
        notes
            .iter()
            .all(|m| m.starts_with(&format!("kernel l2 ({}): ifindex ", ns.name))),
        "{notes:#?}"
    );
}

/// The crafted frames, in the order they are sent: an ARP request from `mac(1)`, a GARP from `mac(2)`, QEMU's RARP
/// from `mac(3)`, an 802.1Q ARP reply from `mac(4)`, a `QinQ` ARP from `mac(5)`; then three truncated ones from
/// `mac(6..=8)`: an ARP cut after 10 bytes of body, a VLAN tag cut in half, an ARP inside `QinQ` cut short.
fn crafted_frames() -> Vec<Vec<u8>> {
    let watched = mac(0x01);
    let bcast = MacAddr::BROADCAST;
    let zero = MacAddr::ZERO;
    let ip = |d: u8| Ipv4Addr::new(10, 9, 8, d);
    let (m_req, m_garp, m_rarp, m_q, m_qinq) = (watched, mac(0x02), mac(0x03), mac(0x04), mac(0x05));

    let arp_request = ethernet(bcast, m_req, &[], 0x0806, &arp_body(1, m_req, ip(1), zero, ip(2)));
    let garp = ethernet(
        bcast,
        m_garp,
        &[],
        0x0806,
        &arp_body(1, m_garp, ip(3), zero, ip(3)),
    );
    // QEMU's self-announce: 60 bytes, op 3, sha = tha = the VM's MAC, addresses 0.0.0.0, zero padding.
    let mut rarp = ethernet(
        bcast,
        m_rarp,
        &[],
        0x8035,
        &arp_body(3, m_rarp, Ipv4Addr::UNSPECIFIED, m_rarp, Ipv4Addr::UNSPECIFIED),
    );
    rarp.resize(60, 0);
    let dot1q = ethernet(
        bcast,
        m_q,
        &[(0x8100, 100)],
        0x0806,
        &arp_body(2, m_q, ip(4), watched, ip(1)),
    );
    let qinq = ethernet(
        bcast,
        m_qinq,
        &[(0x88a8, 200), (0x8100, 100)],
        0x0806,
        &arp_body(1, m_qinq, ip(5), zero, ip(6)),
    );
    // Truncated: an ARP cut after 10 bytes of body; a VLAN tag cut in half; an ARP inside QinQ cut short.
    let short_arp = ethernet(
        bcast,
        mac(0x06),
        &[],
        0x0806,
        &arp_body(1, mac(0x06), ip(7), zero, ip(8))[..10],
    );
    let mut short_vlan = ethernet(bcast, mac(0x07), &[], 0x8100, &[]);
    short_vlan.push(0x00);
    let short_qinq = ethernet(
        bcast,
        mac(0x08),
        &[(0x88a8, 1), (0x8100, 2)],
        0x0806,
        &[0, 1, 8, 0],
    );
    vec![
        arp_request,
        garp,
        rarp,
        dot1q,
        qinq,
        short_arp,
        short_vlan,
        short_qinq,
    ]
}

/// The five well-formed frames of [`crafted_frames`] each came out once, with their fields.
fn assert_parsed_once<'a>(one: &dyn Fn(&str, MacAddr) -> &'a Value, ns: &Netns, inner: &str) {
    let (m_req, m_garp, m_rarp, m_q, m_qinq) = (mac(0x01), mac(0x02), mac(0x03), mac(0x04), mac(0x05));
    let e = one("arp", m_req);
    assert_eq!(
        (e["op"].as_u64(), &e["vlan"]),
        (Some(1), &serde_json::json!([])),
        "{e}"
    );
    assert_eq!(
        (e["spa"].as_str(), e["tpa"].as_str()),
        (Some("10.9.8.1"), Some("10.9.8.2")),
        "{e}"
    );
    assert_eq!(e["len"], 42, "{e}");
    assert_eq!(
        e["frame"].as_str().unwrap().len(),
        84,
        "the whole 42-byte frame, hex: {e}"
    );
    assert_eq!(e["iface"].as_str(), Some(inner), "{e}");
    assert_eq!(e["netns"].as_str(), Some(ns.name.as_str()), "{e}");
    let e = one("garp", m_garp);
    assert_eq!(
        (e["op"].as_u64(), e["spa"].as_str(), e["tpa"].as_str()),
        (Some(1), Some("10.9.8.3"), Some("10.9.8.3"))
    );
    let e = one("rarp", m_rarp);
    assert_eq!(e["op"], 3, "{e}");
    assert_eq!(
        (e["sha"].as_str(), e["tha"].as_str()),
        (
            Some(m_rarp.to_string().as_str()),
            Some(m_rarp.to_string().as_str())
        )
    );
    assert_eq!(
        (e["spa"].as_str(), e["tpa"].as_str(), e["len"].as_u64()),
        (Some("0.0.0.0"), Some("0.0.0.0"), Some(60))
    );
    let e = one("arp", m_q);
    assert_eq!(
        (e["op"].as_u64(), &e["vlan"]),
        (Some(2), &serde_json::json!([100])),
        "{e}"
    );
    let e = one("arp", m_qinq);
    assert_eq!(
        (e["op"].as_u64(), &e["vlan"]),
        (Some(1), &serde_json::json!([200, 100])),
        "{e}"
    );
}

#[test]
fn bridge_fdb_move_and_per_port_stats() {
    let bed = BridgeNetns::create("pb", 2).unwrap();
    let (ns, br) = (&bed.ns, &bed.bridge);
    let (p1, p2) = (&bed.ports[0].port, &bed.ports[1].port);
    let vm = mac(0x10);
    let peer = mac(0x11);
    let watch = Watch::start(&[
        "--iface",
        &format!("{p1}@{}", ns.name),
        "--iface",
        &format!("{p2}@{}", ns.name),
        "--egress",
        &format!("{p1}@{}", ns.name),
        "--egress",
        &format!("{p2}@{}", ns.name),
        "--vm",
        &vm.to_string(),
        "--port",
        "1",
    ]);
    let p1_last = move_there_and_back(&bed, &watch, vm, peer);
    let (events, _) = watch.stop();

    let fdb: Vec<&Value> = of_kind(&events, "fdb_update");
    assert!(
        fdb.iter().all(|e| e["mac"] == vm.to_string()),
        "only the watched MAC: {}",
        dump(&events)
    );
    let ports: Vec<&str> = fdb.iter().map(|e| e["port"].as_str().unwrap()).collect();
    assert_eq!(
        ports,
        vec![p1.as_str(), p2.as_str(), p1.as_str()],
        "learned on port 1, moved to port 2, and back"
    );
    assert!(fdb.iter().all(|e| e["bridge"] == br.as_str() && e["vlan"] == 0));

    let last_stats = |iface: &str, dir: &str| -> (u64, u64) {
        let s = of_kind(&events, "mac_stats")
            .into_iter()
            .rfind(|e| e["iface"] == iface && e["direction"] == dir && e["mac"] == vm.to_string())
            .unwrap_or_else(|| panic!("no mac_stats for {iface} {dir}:\n{}", dump(&events)));
        (s["frames"].as_u64().unwrap(), s["bytes"].as_u64().unwrap())
    };
    assert_eq!(last_stats(p1, "ingress"), (4, 4 * 60));
    assert_eq!(last_stats(p2, "ingress"), (2, 2 * 60));
    assert_eq!(last_stats(p1, "egress"), (2, 2 * 60));
    let seen: Vec<(&str, &str)> = of_kind(&events, "mac_seen")
        .iter()
        .map(|e| (e["iface"].as_str().unwrap(), e["direction"].as_str().unwrap()))
        .collect();
    for (want, times) in [
        ((p1.as_str(), "ingress"), 2),
        ((p2.as_str(), "ingress"), 1),
        ((p1.as_str(), "egress"), 1),
    ] {
        assert_eq!(
            seen.iter().filter(|s| **s == want).count(),
            times,
            "seen {times} times on {want:?}: {seen:?}"
        );
    }
    let back = of_kind(&events, "mac_seen")
        .into_iter()
        .rfind(|e| e["iface"] == p1.as_str() && e["direction"] == "ingress")
        .unwrap();
    let gap = back["gap_ns"].as_u64().unwrap();
    assert!(gap > 60_000_000, "the return reports the silence: {back}");
    assert_eq!(
        back["ts_ns"].as_u64().unwrap() - gap,
        p1_last,
        "the gap runs from the last frame: {back}"
    );
    // The first-seen instants line up with the frames: port 1 before port 2.
    let seen_ts = |iface: &str| {
        of_kind(&events, "mac_seen")
            .iter()
            .find(|e| e["iface"] == iface && e["direction"] == "ingress")
            .and_then(|e| e["ts_ns"].as_u64())
            .unwrap()
    };
    assert!(seen_ts(p1) < seen_ts(p2));
}

/// The VM talks from port 1, a peer on port 2 sends it frames, the VM moves to port 2, then back to port 1 after
/// more than 50 ms of silence there. Returns when the VM's last frame on port 1 before it came back was counted.
fn move_there_and_back(bed: &BridgeNetns, watch: &Watch, vm: MacAddr, peer: MacAddr) -> u64 {
    let (p1, q1) = (&bed.ports[0].port, &bed.ports[0].outer);
    let (p2, q2) = (&bed.ports[1].port, &bed.ports[1].outer);
    let (mut tx1, mut tx2) = (RawSender::open(q1), RawSender::open(q2));
    // The VM talks from port 1 three times; a peer on port 2 sends it two frames, which the bridge delivers
    // through port 1. Then the VM "migrates": it talks from port 2 twice.
    let ping = |src: MacAddr, dst: MacAddr| ethernet(dst, src, &[], 0x88b5, &[0u8; 46]);
    for _ in 0..3 {
        tx1.send(&ping(vm, MacAddr::BROADCAST));
    }
    watch.wait_for("the VM learned on port 1", Duration::from_secs(10), |evs| {
        of_kind(evs, "fdb_update")
            .iter()
            .any(|e| e["port"] == p1.as_str())
    });
    for _ in 0..2 {
        tx2.send(&ping(peer, vm));
    }
    watch.wait_for(
        "frames towards the VM on port 1",
        Duration::from_secs(10),
        |evs| {
            of_kind(evs, "mac_stats")
                .iter()
                .any(|e| e["iface"] == p1.as_str() && e["direction"] == "egress" && e["frames"] == 2)
        },
    );
    for _ in 0..2 {
        tx2.send(&ping(vm, MacAddr::BROADCAST));
    }
    watch.wait_for("the move to port 2", Duration::from_secs(10), |evs| {
        of_kind(evs, "fdb_update")
            .iter()
            .any(|e| e["port"] == p2.as_str())
            && of_kind(evs, "mac_stats")
                .iter()
                .any(|e| e["iface"] == p2.as_str() && e["direction"] == "ingress" && e["frames"] == 2)
    });
    // Back-to-back migration: the VM returns to port 1 after more than the 50 ms default gap of silence there,
    // and shows up as seen again.
    let events = watch.events();
    let p1_last = of_kind(&events, "mac_stats")
        .into_iter()
        .rfind(|e| e["iface"] == p1.as_str() && e["direction"] == "ingress")
        .and_then(|e| e["last_ns"].as_u64())
        .expect("the VM's frames counted on port 1");
    assert!(wait_until(Duration::from_secs(5), || {
        monitor::decode::mono_now_ns() > p1_last + 60_000_000
    }));
    tx1.send(&ping(vm, MacAddr::BROADCAST));
    watch.wait_for("the move back to port 1", Duration::from_secs(10), |evs| {
        of_kind(evs, "fdb_update").len() == 3
            && of_kind(evs, "mac_stats")
                .iter()
                .any(|e| e["iface"] == p1.as_str() && e["direction"] == "ingress" && e["frames"] == 4)
    });
    p1_last
}

#[test]
fn tiny_ring_buffer_counts_every_lost_event() {
    const N: u64 = 20_000;
    let net = VethNetns::create("pr").unwrap();
    let (ns, outer, inner) = (&net.ns, &net.outer, &net.inner);
    let src = mac(0x20);
    // --port 1 and --vm keep other TCP and bridge traffic on this machine out of the ring buffers, so every
    // record is one of ours; --mac-gap 1h makes mac_seen fire exactly once.
    let watch = Watch::start(&[
        "--iface",
        &format!("{inner}@{}", ns.name),
        "--vm",
        &src.to_string(),
        "--port",
        "1",
        "--mac-gap",
        "1h",
        "--ringbuf-bytes",
        "4096",
    ]);
    let mut tx = RawSender::open(outer);
    let frame = ethernet(
        MacAddr::BROADCAST,
        src,
        &[],
        0x0806,
        &arp_body(
            1,
            src,
            Ipv4Addr::new(10, 7, 0, 1),
            MacAddr::ZERO,
            Ipv4Addr::new(10, 7, 0, 2),
        ),
    );
    // The veth drops a frame (and counts it as a tx drop of the sender) when its receive ring is full, which can
    // happen under load; such frames never reach XDP.
    let dropped = || -> u64 {
        std::fs::read_to_string(format!("/sys/class/net/{outer}/statistics/tx_dropped"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    let dropped_before = dropped();
    for _ in 0..N {
        tx.send(&frame);
    }
    // XDP counted every frame it saw in the MAC counters (a map, never lost); wait until it saw them all.
    let frames_seen = |evs: &[Value]| -> u64 {
        of_kind(evs, "mac_stats")
            .iter()
            .filter(|e| e["mac"] == src.to_string())
            .filter_map(|e| e["frames"].as_u64())
            .max()
            .unwrap_or(0)
    };
    watch.wait_for("XDP to see every frame", Duration::from_secs(30), |evs| {
        frames_seen(evs) + (dropped() - dropped_before) == N
    });
    let (events, stderr) = watch.stop();
    let arps = of_kind(&events, "arp")
        .iter()
        .filter(|e| e["mac"] == src.to_string())
        .count() as u64;
    let seen = of_kind(&events, "mac_seen").len() as u64;
    let lost: u64 = of_kind(&events, "loss")
        .iter()
        .map(|e| e["count"].as_u64().unwrap())
        .sum();
    assert_eq!(
        of_kind(&events, "fdb_update").len() as u64 + tcp_events(&events),
        0,
        "only our records"
    );
    let frames = frames_seen(&events);
    eprintln!("{N} frames sent, {frames} through XDP: {arps} arp events delivered, {lost} lost");
    assert!(
        lost > 0,
        "a 4 KiB ring buffer must overflow under {N} frames (got {arps} events)"
    );
    assert_eq!(
        arps + seen + lost,
        frames + 1,
        "every record is either delivered or counted as lost"
    );
    assert!(
        stderr.contains(&format!("{lost} EVENTS LOST")),
        "the summary names the loss: {stderr}"
    );
}

fn tcp_events(events: &[Value]) -> u64 {
    events
        .iter()
        .filter(|e| e["kind"].as_str().unwrap_or_default().starts_with("tcp_"))
        .count() as u64
}

/// The XDP parser through `BPF_PROG_TEST_RUN` (library API): every prefix of a `QinQ` ARP frame and a run of
/// pseudo-random frames all pass (`XDP_PASS`), only the complete frame is reported, and every cut one is counted.
#[test]
fn xdp_always_passes_and_never_misreads_a_cut_frame() {
    use monitor::probes::{ProbeOptions, Probes};
    const XDP_PASS: u32 = 2;
    let opts = ProbeOptions {
        tracepoints: false,
        ..ProbeOptions::default()
    };
    let mut probes = Probes::load(&opts).expect("load the probes");
    let src = mac(0x30);
    let frame = ethernet(
        MacAddr::BROADCAST,
        src,
        &[(0x88a8, 300), (0x8100, 42)],
        0x0806,
        &arp_body(
            2,
            src,
            Ipv4Addr::new(10, 6, 0, 1),
            MacAddr::ZERO,
            Ipv4Addr::new(10, 6, 0, 2),
        ),
    );
    assert_eq!(frame.len(), 50);
    // BPF_PROG_TEST_RUN wants at least an Ethernet header.
    for len in 14..frame.len() {
        let (ret, _) = probes.xdp_test_run(&frame[..len], 1).unwrap();
        assert_eq!(ret, XDP_PASS, "prefix of {len} bytes");
    }
    let (ret, _) = probes.xdp_test_run(&frame, 1).unwrap();
    assert_eq!(ret, XDP_PASS);
    let mut records = Vec::new();
    probes.drain(|r| records.push(r.expect("decodable record")));
    assert_eq!(
        records.len(),
        1,
        "only the complete frame is reported: {records:?}"
    );
    let monitor_common::WireEvent::Arp(arp) = records[0] else {
        panic!("not an ARP record: {:?}", records[0]);
    };
    assert_eq!(
        (arp.op, arp.vlan, arp.vlan_count, arp.frame_len, arp.cap_len),
        (2, [300, 42], 2, 50, 50)
    );
    assert_eq!(&arp.frame[..50], &frame[..]);
    let malformed: u64 = probes.malformed().unwrap().iter().map(|(_, _, n)| n).sum();
    assert_eq!(malformed, 36, "every cut prefix (14..50 bytes) is counted");

    // For orientation only (benchmarks measure it properly): the kernel's time per frame.
    let ipv4 = ethernet(MacAddr::BROADCAST, src, &[], 0x0800, &[0x45; 46]);
    for (what, f) in [("non-ARP frame", &ipv4), ("QinQ ARP frame", &frame)] {
        let (ret, per_run) = probes.xdp_test_run(f, 100_000).unwrap();
        assert_eq!(ret, XDP_PASS);
        eprintln!(
            "XDP {what}: {} ns per frame (BPF_PROG_TEST_RUN, 100k runs)",
            per_run.as_nanos()
        );
    }
    probes.drain(|_| {});

    // The runner works from another thread while the ring buffer is drained here: a storm of 2000 ARP records
    // (which fit in the 1 MiB ring) all arrive.
    let lost_before: u64 = probes.lost().unwrap().iter().sum();
    let runner = probes.xdp_test_runner().unwrap();
    let storm = frame.clone();
    let t = std::thread::spawn(move || runner.run(&storm, 2000).unwrap());
    let mut arps = 0;
    let ok = wait_until(Duration::from_secs(10), || {
        probes.drain(|r| {
            if matches!(r, Ok(monitor_common::WireEvent::Arp(_))) {
                arps += 1;
            }
        });
        arps >= 2000 && t.is_finished()
    });
    assert!(ok, "{arps} of 2000 storm records");
    assert_eq!(t.join().unwrap().0, XDP_PASS);
    let lost: u64 = probes.lost().unwrap().iter().sum();
    assert_eq!(
        (arps, lost),
        (2000, lost_before),
        "every storm record arrives, none lost"
    );

    // Pseudo-random frames (a fixed LCG, so a failure reproduces): always passed.
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for _ in 0..2000 {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let len = 14 + (x >> 33) as usize % 180;
        let mut f: Vec<u8> = (0..len)
            .map(|i| {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(i as u64);
                (x >> 56) as u8
            })
            .collect();
        // Steer a third of them into the VLAN/ARP paths.
        match (x >> 20) % 6 {
            0 => f[12..14].copy_from_slice(&[0x08, 0x06]),
            1 => f[12..14].copy_from_slice(&[0x81, 0x00]),
            _ => {}
        }
        let (ret, _) = probes.xdp_test_run(&f, 1).unwrap();
        assert_eq!(ret, XDP_PASS, "frame {f:02x?}");
    }
}

/// Opens a tap device `name` (no packet information header) on the calling thread's namespace.
fn open_tap(name: &str) -> std::fs::File {
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        pad: [u8; 22],
    }
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("open /dev/net/tun");
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
        pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF on a freshly opened /dev/net/tun fd with a pointer to a live, correctly sized ifreq.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &raw mut req) };
    assert_eq!(rc, 0, "TUNSETIFF {name}: {}", std::io::Error::last_os_error());
    file
}

/// The VM side of a tap, as a VMM sees it: frames the VMM writes into the tap (a RARP announce) are seen by XDP
/// on the tap, and frames the bridge delivers towards the VM are counted by TC egress on the tap before the VMM
/// reads them.
#[test]
fn tap_sees_the_vmm_announce_and_counts_frames_towards_the_vm() {
    let bed = BridgeNetns::create("pt", 1).unwrap();
    let (ns, br) = (&bed.ns, &bed.bridge);
    let tap_name = unique("ptt");
    let mut tap = ns.run(|| open_tap(&tap_name));
    ip_in(Some(&ns.name), &["link", "set", &tap_name, "master", br, "up"]);
    let q = &bed.ports[0].outer;
    let vm = mac(0x40);
    let client = mac(0x41);
    let watch = Watch::start(&[
        "--iface",
        &format!("{tap_name}@{}", ns.name),
        "--egress",
        &format!("{tap_name}@{}", ns.name),
        "--vm",
        &vm.to_string(),
        "--port",
        "1",
    ]);
    // QEMU's self-announce, written by "the VMM" into the tap.
    let mut rarp = ethernet(
        MacAddr::BROADCAST,
        vm,
        &[],
        0x8035,
        &arp_body(3, vm, Ipv4Addr::UNSPECIFIED, vm, Ipv4Addr::UNSPECIFIED),
    );
    rarp.resize(60, 0);
    tap.write_all(&rarp).expect("write the announce into the tap");
    watch.wait_for("the announce and the FDB entry", Duration::from_secs(10), |evs| {
        !of_kind(evs, "rarp").is_empty()
            && of_kind(evs, "fdb_update")
                .iter()
                .any(|e| e["port"] == tap_name.as_str())
    });
    // A client frame towards the VM: the bridge delivers it through the tap.
    let mut tx = RawSender::open(q);
    let to_vm = ethernet(vm, client, &[], 0x88b5, &[7u8; 46]);
    tx.send(&to_vm);
    // "The VMM" reads it from the tap (skipping anything else the kernel sends, such as IPv6 neighbour traffic).
    // SAFETY: fcntl on a valid fd.
    unsafe { libc::fcntl(tap.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    let mut buf = [0u8; 2048];
    let delivered = wait_until(
        Duration::from_secs(10),
        || matches!(tap.read(&mut buf), Ok(n) if n == to_vm.len() && buf[..n] == to_vm[..]),
    );
    assert!(delivered, "the frame towards the VM came out of the tap");
    watch.wait_for("the egress counter", Duration::from_secs(10), |evs| {
        of_kind(evs, "mac_stats")
            .iter()
            .any(|e| e["direction"] == "egress" && e["frames"] == 1)
    });
    let (events, _) = watch.stop();
    assert!(
        !of_kind(&events, "note").iter().any(|n| n["message"]
            .as_str()
            .unwrap_or_default()
            .contains("XDP driver mode")),
        "XDP attaches to a tap in driver mode: {}",
        dump(&events)
    );
    let rarp_ev = of_kind(&events, "rarp");
    assert_eq!(rarp_ev.len(), 1, "{}", dump(&events));
    assert_eq!(rarp_ev[0]["iface"].as_str(), Some(tap_name.as_str()));
    assert_eq!(rarp_ev[0]["len"], 60);
    let fdb = of_kind(&events, "fdb_update");
    assert_eq!(fdb.len(), 1, "{}", dump(&events));
    assert_eq!(
        (fdb[0]["bridge"].as_str(), fdb[0]["mac"].as_str()),
        (Some(br.as_str()), Some(vm.to_string().as_str()))
    );
    let stats = |dir: &str| {
        of_kind(&events, "mac_stats")
            .into_iter()
            .rfind(|e| e["direction"] == dir && e["iface"] == tap_name.as_str())
            .map(|e| (e["frames"].as_u64().unwrap(), e["bytes"].as_u64().unwrap()))
    };
    assert_eq!(stats("ingress"), Some((1, 60)), "{}", dump(&events));
    assert_eq!(stats("egress"), Some((1, 60)), "{}", dump(&events));
}
