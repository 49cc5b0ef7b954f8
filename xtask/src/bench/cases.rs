//! The cases of a full run and of `--quick`.

use super::Case;

fn case(id: &str, title: &str, cmd: &'static str, args: &[&str], runs: usize) -> Case {
    Case {
        id: id.to_owned(),
        title: title.to_owned(),
        cmd,
        args: args.iter().map(|s| (*s).to_owned()).collect(),
        runs,
    }
}

/// The migration workloads of issue 6: (id, title, dirty setting).
pub const WORKLOADS: [(&str, &str, &str); 3] = [
    ("idle", "idle", ""),
    ("d32", "32 MiB @ 125 MiB/s, 30 ms budget", "32M@125M"),
    ("d64", "64 MiB @ 250 MiB/s", "64M@250M"),
];

pub fn all(quick: bool, runs: usize) -> Vec<Case> {
    let mut v = Vec::new();
    if quick {
        v.push(case("floor", "copy floors", "floor", &["bytes=32M"], 1));
        v.push(case("xdp", "XDP ns/frame", "xdp", &["repeat=100000"], 1));
        v.push(case("events", "collector events/s", "events", &["secs=0.2", "max_rate=200000"], 1));
        v.push(case("tcp", "TCP over veth, probes vs none", "tcp", &["secs=0.3", "pairs=1"], 1));
        v.push(case(
            "migrate.idle.ours",
            "migrator, idle, 64 MiB",
            "migrate",
            &["mem=64M", "clients=2"],
            1,
        ));
        v.push(case(
            "migrate.idle.qemu-default",
            "QEMU defaults, idle, 64 MiB",
            "qemu",
            &["mem=64M", "clients=2", "boot_timeout=20"],
            1,
        ));
        v.push(case("conns.16", "migmon, 16 connections", "conns", &["n=16", "mem=64M"], 1));
        return v;
    }
    v.push(case("floor", "copy floors", "floor", &["bytes=256M"], runs));
    v.push(case("xdp", "XDP ns/frame (repeat 1e6)", "xdp", &["repeat=1000000"], runs));
    v.push(case("events", "collector events/s, zero loss", "events", &["secs=1"], runs));
    v.push(case("tcp", "TCP over veth, all probes vs none", "tcp", &["secs=2", "pairs=2"], runs));
    for (id, title, dirty) in WORKLOADS {
        let dirty = format!("dirty={dirty}");
        v.push(case(
            &format!("migrate.{id}.ours"),
            &format!("migrator, {title}, 256 MiB"),
            "migrate",
            &["mem=256M", &dirty, "downtime=30ms", "clients=16"],
            runs,
        ));
        v.push(case(
            &format!("migrate.{id}.qemu-default"),
            &format!("QEMU defaults, {title}, 256 MiB"),
            "qemu",
            &["mem=256M", &dirty, "downtime=30ms", "clients=16"],
            runs,
        ));
        v.push(case(
            &format!("migrate.{id}.qemu-best"),
            &format!("QEMU max-bandwidth 10 GiB/s, {title}, 256 MiB"),
            "qemu",
            &["mem=256M", &dirty, "downtime=30ms", "clients=16", "max_bw=10G"],
            runs,
        ));
    }
    for mem in ["256M", "1G", "4G"] {
        v.push(case(
            &format!("scale.mem.{mem}"),
            &format!("migrator, {mem} guest, 16 MiB dirty set"),
            "migrate",
            &[&format!("mem={mem}"), "dirty=16M@16M", "clients=4"],
            runs,
        ));
    }
    for n in ["16", "256", "1024"] {
        v.push(case(
            &format!("scale.conns.{n}"),
            &format!("migmon, {n} connections through a migration"),
            "conns",
            &[&format!("n={n}"), "mem=256M"],
            runs.min(3),
        ));
    }
    v
}
