//! The same guest image boots under QEMU's `microvm` machine through its PVH entry (`-kernel`), and serves
//! echo, stream and request/response to a client namespace over a tap. This is what the benchmarks (`./x bench`)
//! compare the migrator with.
//!
//! TCG always runs; `-accel kvm` runs too when `/dev/kvm` exists (here that is `kvm_pvm`, software
//! virtualization, which the guest supports by running in ring 3).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use guest_abi::{ECHO_PORT, RR_PORT, STREAM_PORT, STREAM_RECORD};
use integration_tests::{Netns, guest_elf, ip, unique, wait_until};

const GUEST_IP: &str = "10.78.0.2";
const HOST_CIDR: &str = "10.78.0.1/24";

/// A QEMU process, killed on drop.
struct Qemu {
    child: Child,
    serial: PathBuf,
}

impl Qemu {
    fn serial(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.serial);
    }
}

fn boot(netns: &Netns, tap: &str, elf: &Path, accel: &str) -> Qemu {
    let serial = std::env::temp_dir().join(format!("{}.serial", unique("gq")));
    let child = Command::new("ip")
        .args(["netns", "exec", &netns.name, "qemu-system-x86_64"])
        .args([
            "-M",
            "microvm,ioapic2=off",
            "-accel",
            accel,
            "-m",
            "128M",
            "-smp",
            "1",
        ])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-kernel")
        .arg(elf)
        .args(["-append", &format!("ip={GUEST_IP}/24")])
        .args([
            "-netdev",
            &format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
        ])
        .args(["-device", "virtio-net-device,netdev=n0,mac=52:54:00:71:65:6d"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("qemu-system-x86_64 is missing: install qemu-system-x86 (./x setup does)");
    Qemu { child, serial }
}

fn connect(port: u16) -> TcpStream {
    let addr: SocketAddr = format!("{GUEST_IP}:{port}").parse().expect("a socket address");
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect to the guest");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("set a read timeout");
    s.set_nodelay(true).expect("set TCP_NODELAY");
    s
}

fn echo_round_trip() {
    let mut s = connect(ECHO_PORT);
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
    let mut writer = s.try_clone().expect("clone the socket");
    let sent = data.clone();
    let send = std::thread::spawn(move || writer.write_all(&sent).expect("send to echo"));
    let mut got = vec![0u8; data.len()];
    s.read_exact(&mut got).expect("read the echo");
    send.join().expect("the sender thread");
    assert!(got == data, "echo returned different bytes");
}

fn stream_is_sequenced(rate: u32, records: u64) {
    let mut s = connect(STREAM_PORT);
    s.write_all(&rate.to_be_bytes()).expect("send the rate");
    let mut rec = [0u8; STREAM_RECORD];
    for n in 0..records {
        s.read_exact(&mut rec).expect("read a stream record");
        let seq = u64::from_be_bytes(rec[..8].try_into().expect("8 bytes"));
        assert_eq!(seq, n, "stream record out of sequence");
        assert!(
            rec[8..].iter().all(|&b| b == n as u8),
            "record {n} has wrong filler"
        );
    }
}

fn request_response() {
    let mut s = connect(RR_PORT);
    for seq in 0..300u32 {
        let len = [0u32, 1, 100, 1460, 9000, guest_abi::RR_MAX_RESPONSE][seq as usize % 6];
        let mut req = [0u8; 8];
        req[..4].copy_from_slice(&seq.to_be_bytes());
        req[4..].copy_from_slice(&len.to_be_bytes());
        s.write_all(&req).expect("send a request");
        let mut resp = vec![0u8; 4 + len as usize];
        s.read_exact(&mut resp).expect("read a response");
        assert_eq!(resp[..4], seq.to_be_bytes(), "response to the wrong request");
        assert!(
            resp[4..].iter().all(|&b| b == seq as u8),
            "response {seq} has wrong filler"
        );
    }
}

/// More than 64 connections at once over the three services, each proven alive.
fn many_connections() {
    let ports = [ECHO_PORT, STREAM_PORT, RR_PORT];
    let mut conns: Vec<(u16, TcpStream)> = (0..72).map(|i| (ports[i % 3], connect(ports[i % 3]))).collect();
    for (i, (port, s)) in conns.iter_mut().enumerate() {
        match *port {
            ECHO_PORT => s.write_all(&[i as u8; 3]).expect("echo write"),
            STREAM_PORT => s.write_all(&1000u32.to_be_bytes()).expect("stream rate"),
            _ => s.write_all(&[0, 0, 0, i as u8, 0, 0, 0, 2]).expect("rr request"),
        }
    }
    for (i, (port, s)) in conns.iter_mut().enumerate() {
        match *port {
            ECHO_PORT => {
                let mut b = [0u8; 3];
                s.read_exact(&mut b).expect("echo read");
                assert_eq!(b, [i as u8; 3]);
            }
            STREAM_PORT => {
                let mut b = [0u8; STREAM_RECORD];
                s.read_exact(&mut b).expect("stream read");
                assert_eq!(u64::from_be_bytes(b[..8].try_into().expect("8 bytes")), 0);
            }
            _ => {
                let mut b = [0u8; 6];
                s.read_exact(&mut b).expect("rr read");
                assert_eq!(b, [0, 0, 0, i as u8, i as u8, i as u8]);
            }
        }
    }
}

fn services_under(accel: &str) {
    let elf = guest_elf();
    let netns = Netns::new("gq");
    let tap = unique("gqt");
    ip(&["-n", &netns.name, "tuntap", "add", &tap, "mode", "tap"]);
    ip(&["-n", &netns.name, "addr", "add", HOST_CIDR, "dev", &tap]);
    ip(&["-n", &netns.name, "link", "set", &tap, "up"]);
    let qemu = boot(&netns, &tap, &elf, accel);
    let ready = wait_until(Duration::from_secs(90), || qemu.serial().contains("guest: ready"));
    assert!(
        ready,
        "the guest did not get ready under QEMU ({accel}); serial:\n{}",
        qemu.serial()
    );
    assert!(
        qemu.serial().contains("PVH boot"),
        "not booted through PVH:\n{}",
        qemu.serial()
    );
    netns.run(|| {
        echo_round_trip();
        stream_is_sequenced(0, 20_000);
        stream_is_sequenced(2000, 200);
        request_response();
        many_connections();
    });
    let log = qemu.serial();
    assert!(
        !log.contains("panic") && !log.contains("exception"),
        "the guest failed:\n{log}"
    );
    eprintln!("guest serial under QEMU ({accel}):\n{log}");
}

#[test]
fn pvh_guest_serves_under_qemu_tcg() {
    services_under("tcg");
}

#[test]
fn pvh_guest_serves_under_qemu_kvm() {
    if std::fs::metadata("/dev/kvm").is_err() {
        eprintln!("SKIP: /dev/kvm is missing; QEMU can only use TCG here");
        return;
    }
    services_under("kvm");
}
