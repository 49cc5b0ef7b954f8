//! The third pause-window source, from the data plane alone, on the real kernel: a bridge with an old port, a new
//! port and a peer port. A "VM" MAC talks from the old port, falls silent while the peer keeps sending to it (those
//! frames are black-holed on the old port), then announces itself with a RARP in QEMU's format from the new port.
//! `migmon watch --record` with XDP and TC on every port, then `migmon report`, must infer the move (source `wire`)
//! and give its timeline: the first RARP and its port, the FDB move, the first frames at the new port both ways, and
//! the black-holed count at the old port.
#![expect(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

use std::{process::Command, time::Duration};

use integration_tests::{Link, Netns, Watch, ip_in, migmon_bin, of_kind, unique, wait_until};
use pnet::{
    datalink::{self, Channel, DataLinkSender},
    util::MacAddr,
};
use serde_json::Value;

fn sender(iface: &str) -> Box<dyn DataLinkSender> {
    assert!(
        wait_until(Duration::from_secs(5), || datalink::interfaces()
            .iter()
            .any(|i| i.name == iface)),
        "interface {iface} not visible"
    );
    let interface = datalink::interfaces()
        .into_iter()
        .find(|i| i.name == iface)
        .unwrap();
    match datalink::channel(&interface, datalink::Config::default()) {
        Ok(Channel::Ethernet(tx, _rx)) => tx,
        Ok(_) => panic!("unexpected channel type"),
        Err(e) => panic!("cannot open a raw channel on {iface}: {e}"),
    }
}

fn send(tx: &mut Box<dyn DataLinkSender>, frame: &[u8]) {
    tx.send_to(frame, None).unwrap().unwrap();
}

fn frame(dst: MacAddr, src: MacAddr, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f.resize(60, 0);
    f
}

/// QEMU's self-announce: RARP request, sha = tha = the VM's MAC, addresses 0.0.0.0.
fn rarp(vm: MacAddr) -> Vec<u8> {
    let mut body = vec![0, 1, 8, 0, 6, 4, 0, 3];
    body.extend_from_slice(&vm.octets());
    body.extend_from_slice(&[0; 4]);
    body.extend_from_slice(&vm.octets());
    body.extend_from_slice(&[0; 4]);
    frame(MacAddr::broadcast(), vm, 0x8035, &body)
}

#[test]
fn a_move_seen_only_on_the_wire_is_inferred_with_its_timeline() {
    let ns = Netns::new("cw");
    let br = unique("cwb");
    let _bridge = Link::bridge(&br, Some(&ns.name));
    let names: Vec<(String, String)> = (0..3).map(|_| (unique("cwp"), unique("cwq"))).collect();
    let _links: Vec<Link> = names
        .iter()
        .map(|(p, q)| {
            let l = Link::veth(q, None, p, Some(&ns.name));
            ip_in(Some(&ns.name), &["link", "set", p, "master", &br]);
            l
        })
        .collect();
    let (old, new) = (&names[0].0, &names[1].0);
    let vm = MacAddr::new(0x52, 0x54, 0x00, 0x77, 0x00, 0x01);
    let peer = MacAddr::new(0x52, 0x54, 0x00, 0x77, 0x00, 0x02);
    let vm_s = vm.to_string();
    let dir = std::env::temp_dir().join(unique("migmon-wire"));
    std::fs::create_dir_all(&dir).unwrap();
    let trace = dir.join("wire.trace");
    let at = |p: &str| format!("{p}@{}", ns.name);
    let watch = Watch::start(&[
        "--iface",
        &at(old),
        "--iface",
        &at(new),
        "--egress",
        &at(old),
        "--egress",
        &at(new),
        "--vm",
        &vm_s,
        "--port",
        "1",
        "--record",
        trace.to_str().unwrap(),
    ]);
    let (mut tx_old, mut tx_new, mut tx_peer) =
        (sender(&names[0].1), sender(&names[1].1), sender(&names[2].1));
    let ping = |src: MacAddr, dst: MacAddr| frame(dst, src, 0x88b5, &[0u8; 46]);

    // Before: the VM talks from the old port and the peer talks to it (delivered through the old port).
    send(&mut tx_old, &ping(vm, MacAddr::broadcast()));
    watch.wait_for("the VM learned on the old port", Duration::from_secs(10), |evs| {
        of_kind(evs, "fdb_update")
            .iter()
            .any(|e| e["port"] == old.as_str())
    });
    for _ in 0..2 {
        send(&mut tx_peer, &ping(peer, vm));
    }
    watch.wait_for(
        "the peer's frames counted at the old port",
        Duration::from_secs(10),
        |evs| {
            of_kind(evs, "mac_stats")
                .iter()
                .any(|e| e["iface"] == old.as_str() && e["direction"] == "egress" && e["frames"] == 2)
        },
    );
    send(&mut tx_old, &ping(vm, MacAddr::broadcast()));
    watch.wait_for(
        "the VM's last frame at the old port",
        Duration::from_secs(10),
        |evs| {
            of_kind(evs, "mac_stats")
                .iter()
                .any(|e| e["iface"] == old.as_str() && e["direction"] == "ingress" && e["frames"] == 2)
        },
    );
    // The VM is gone: three frames to it still go to the old port.
    for _ in 0..3 {
        send(&mut tx_peer, &ping(peer, vm));
    }
    watch.wait_for("the black-holed frames counted", Duration::from_secs(10), |evs| {
        of_kind(evs, "mac_stats")
            .iter()
            .any(|e| e["iface"] == old.as_str() && e["direction"] == "egress" && e["frames"] == 5)
    });
    // It comes back on the new port with a RARP; the bridge moves it; the peer's next frame reaches it there.
    send(&mut tx_new, &rarp(vm));
    watch.wait_for("the FDB move", Duration::from_secs(10), |evs| {
        of_kind(evs, "fdb_update")
            .iter()
            .any(|e| e["port"] == new.as_str())
    });
    send(&mut tx_peer, &ping(peer, vm));
    watch.wait_for(
        "a frame delivered at the new port",
        Duration::from_secs(10),
        |evs| {
            of_kind(evs, "mac_seen")
                .iter()
                .any(|e| e["iface"] == new.as_str() && e["direction"] == "egress")
        },
    );
    let _ = watch.stop();

    let out = Command::new(migmon_bin())
        .args(["report", trace.to_str().unwrap(), "--format", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ms = report["migrations"].as_array().unwrap();
    assert_eq!(ms.len(), 1, "one inferred move: {report:#}");
    let m = &ms[0];
    let tl = &m["timeline"];
    let port = |v: &Value| v["port"].as_str().unwrap_or_default().to_owned();
    assert_eq!(m["source"], "wire", "{m:#}");
    assert_eq!(m["mac"], vm_s.as_str());
    assert!(
        m["downtime"]["vcpu_pause"]["basis"]
            .as_str()
            .unwrap()
            .contains("inferred")
    );
    assert_eq!(port(&tl["first_rarp"]), at(new));
    assert_eq!(port(&tl["first_vm_frame_new_port"]), at(new));
    assert_eq!(port(&tl["first_frame_to_vm_new_port"]), at(new));
    assert_eq!(port(&tl["last_vm_frame_old_port"]), at(old));
    let fdb = tl["fdb_moves"].as_array().unwrap();
    assert_eq!(fdb.len(), 1, "{tl:#}");
    assert_eq!(fdb[0]["bridge"], br.as_str());
    assert_eq!(fdb[0]["from_port"], old.as_str());
    assert_eq!(fdb[0]["to_port"], new.as_str());
    let holes = tl["black_holed"].as_array().unwrap();
    assert_eq!(holes.len(), 1, "{tl:#}");
    assert_eq!(holes[0]["port"], at(old).as_str());
    assert_eq!(holes[0]["frames"], 3, "{tl:#}");
    // The blackout runs from the VM's last frame at the old port to the first frame delivered at the new one.
    let blackout = m["downtime"]["blackout"]["ns"].as_u64().unwrap();
    let pause = m["downtime"]["vcpu_pause"]["ns"].as_u64().unwrap();
    assert!(blackout >= pause, "blackout {blackout} < inferred window {pause}");
    std::fs::remove_dir_all(&dir).unwrap();
}
