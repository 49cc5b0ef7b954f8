//! The third pause-window source, from the data plane alone, on the real kernel: a bridge with an old port, a new
//! port and a peer port. A "VM" MAC talks from the old port, falls silent while the peer keeps sending to it (those
//! frames are black-holed on the old port), then announces itself with a RARP in QEMU's format from the new port.
//! `migmon watch --record` with XDP and TC on every port, then `migmon report`, must infer the move (source `wire`)
//! and give its timeline: the first RARP and its port, the FDB move, the first frames at the new port both ways, and
//! the black-holed count at the old port.

use std::{path::Path, process::Command, time::Duration};

use integration_tests::{
    BridgeNetns, TestDir, Watch,
    frames::{RawSender, padded, qemu_rarp},
    migmon_bin, of_kind,
};
use migmon_base::MacAddr;
use serde_json::Value;

const VM: MacAddr = MacAddr([0x52, 0x54, 0x00, 0x77, 0x00, 0x01]);
const PEER: MacAddr = MacAddr([0x52, 0x54, 0x00, 0x77, 0x00, 0x02]);

#[test]
fn a_move_seen_only_on_the_wire_is_inferred_with_its_timeline() {
    let bed = BridgeNetns::create("cw", 3).unwrap();
    let br = &bed.bridge;
    let (old, new) = (&bed.ports[0].port, &bed.ports[1].port);
    let at = |p: &str| bed.at(p);
    let vm_s = VM.to_string();
    let dir = TestDir::new("migmon-wire");
    let trace = dir.join("wire.trace");
    move_on_the_wire(&bed, &trace);

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
}

/// Records the move with `migmon watch`: the VM talks from port 0 while the peer (port 2) sends to it, falls
/// silent while three frames to it are black-holed at port 0, then announces itself with a RARP from port 1 and
/// receives a frame there.
fn move_on_the_wire(bed: &BridgeNetns, trace: &Path) {
    let (old, new) = (&bed.ports[0].port, &bed.ports[1].port);
    let (vm, peer) = (VM, PEER);
    let vm_s = vm.to_string();
    let at = |p: &str| bed.at(p);
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
        trace.to_str().expect("a UTF-8 path"),
    ]);
    let [mut tx_old, mut tx_new, mut tx_peer] = [0, 1, 2].map(|i| RawSender::open(&bed.ports[i].outer));
    let ping = |src: MacAddr, dst: MacAddr| padded(dst, src, 0x88b5, &[0u8; 46]);

    // Before: the VM talks from the old port and the peer talks to it (delivered through the old port).
    tx_old.send(&ping(vm, MacAddr::BROADCAST));
    watch.wait_for("the VM learned on the old port", Duration::from_secs(10), |evs| {
        of_kind(evs, "fdb_update")
            .iter()
            .any(|e| e["port"] == old.as_str())
    });
    for _ in 0..2 {
        tx_peer.send(&ping(peer, vm));
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
    tx_old.send(&ping(vm, MacAddr::BROADCAST));
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
        tx_peer.send(&ping(peer, vm));
    }
    watch.wait_for("the black-holed frames counted", Duration::from_secs(10), |evs| {
        of_kind(evs, "mac_stats")
            .iter()
            .any(|e| e["iface"] == old.as_str() && e["direction"] == "egress" && e["frames"] == 5)
    });
    // It comes back on the new port with a RARP; the bridge moves it; the peer's next frame reaches it there.
    tx_new.send(&qemu_rarp(vm));
    watch.wait_for("the FDB move", Duration::from_secs(10), |evs| {
        of_kind(evs, "fdb_update")
            .iter()
            .any(|e| e["port"] == new.as_str())
    });
    tx_peer.send(&ping(peer, vm));
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
}
