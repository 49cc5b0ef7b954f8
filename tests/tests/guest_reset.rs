//! A reset sent by the guest itself. The real guest runs on host A of the testbed; a client in the client namespace
//! asks its request/response service for more than it serves, and the guest aborts the connection (smoltcp sends a
//! RST). `migmon watch --tcp both` on the guest's tap must report:
//! - the wire's `flow_reset`, sent by the VM, seen coming out of the guest (the tap's ingress);
//! - the client socket's own view from the tracepoints: the RST received and ECONNRESET;
//!
//! and the client's socket itself must have seen ECONNRESET: the ground truth both bases are checked against.
#![expect(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddrV4, TcpStream},
    time::Duration,
};

use integration_tests::{TestDir, Watch, boot_guest, dump, in_netns, kvm_available, unique};
use serde_json::Value;
use testbed::topology::{Host, Testbed};

const MAC: &str = "52:54:00:72:73:74";

/// What the client saw: its local port, the error its read got after the bad request, and whether the good
/// request before it was answered.
struct Seen {
    port: u16,
    error: std::io::Error,
    answered: bool,
}

/// Connects to the guest's request/response service, makes one good request, then one asking for 4 GiB.
fn good_then_bad_request(bed: &Testbed) -> Seen {
    let addr = SocketAddrV4::new(bed.vm_ip(0), guest_abi::RR_PORT);
    in_netns(&bed.client_ns(), || {
        let mut s = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let port = s.local_addr().unwrap().port();
        // Big-endian sequence number, then the response's filler length.
        s.write_all(&[0, 0, 0, 1, 0, 0, 0, 16]).unwrap();
        let mut answer = [0u8; 20];
        let answered = s.read_exact(&mut answer).is_ok() && answer[..4] == [0, 0, 0, 1];
        s.write_all(&[0, 0, 0, 2, 0xff, 0xff, 0xff, 0xff]).unwrap();
        let mut b = [0u8; 1];
        let error = match s.read(&mut b) {
            Ok(n) => panic!("the guest answered {n} bytes to a request it cannot serve"),
            Err(e) => e,
        };
        Seen {
            port,
            error,
            answered,
        }
    })
    .unwrap()
}

fn of_port<'a>(events: &'a [Value], kind: &str, field: &str, port: u16) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["kind"] == kind && e[field].as_u64() == Some(u64::from(port)))
        .collect()
}

#[test]
fn a_reset_sent_by_the_guest_is_the_vms_on_the_wire_and_the_clients_socket_saw_it() {
    if !kvm_available("the guest reset test") {
        return;
    }
    let dir = TestDir::new("migmon-guest-reset");
    let bed = Testbed::up(&unique("tgr")).expect("bring the testbed up");
    let ns_a = bed.host_ns(Host::A);
    let iface = format!("{}@{ns_a}", Host::A.tap());
    let vm = format!("{MAC}={}", bed.vm_ip(0));
    let rr = guest_abi::RR_PORT.to_string();
    let watch = Watch::start(&["--tcp", "both", "--iface", &iface, "--vm", &vm, "--port", &rr]);
    let api = dir.join("a.api").display().to_string();
    let _guest = boot_guest(&bed, MAC, &api, None, &dir.join("run.log"));

    let seen = good_then_bad_request(&bed);
    assert!(seen.answered, "the guest answered the good request");
    assert_eq!(
        seen.error.kind(),
        ErrorKind::ConnectionReset,
        "the client's socket saw the guest's reset: {}",
        seen.error
    );

    watch.wait_for(
        "the wire's and the socket's view of the reset",
        Duration::from_secs(10),
        |evs| {
            !of_port(evs, "flow_reset", "peer_port", seen.port).is_empty()
                && !of_port(evs, "tcp_error", "sport", seen.port).is_empty()
        },
    );
    let (events, stderr) = watch.stop();
    assert!(!stderr.contains("warning"), "{stderr}");

    let resets = of_port(&events, "flow_reset", "peer_port", seen.port);
    assert_eq!(resets.len(), 1, "one RST on the tap: {}", dump(&events));
    let rst = resets[0];
    assert_eq!(rst["side"], "vm", "the VM sent it: {rst}");
    assert_eq!(
        rst["direction"], "ingress",
        "out of the guest, into the tap: {rst}"
    );
    assert_eq!(rst["iface"], Host::A.tap());
    assert_eq!(rst["vm_addr"], bed.vm_ip(0).to_string());
    assert_eq!(
        of_port(&events, "flow_open", "peer_port", seen.port).len(),
        1,
        "the connection was opened on the wire first: {}",
        dump(&events)
    );

    let reset_in = of_port(&events, "tcp_reset_in", "sport", seen.port);
    assert_eq!(reset_in.len(), 1, "{}", dump(&events));
    let error = of_port(&events, "tcp_error", "sport", seen.port);
    assert_eq!(error[0]["errno"], libc::ECONNRESET, "{}", error[0]);
}
