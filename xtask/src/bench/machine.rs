//! The machine the figures come from.

use std::process::Command;

use serde_json::{Value, json};

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// KVM's mode: hardware (vmx/svm) or the software `kvm_pvm` module, or absent.
fn kvm_mode() -> String {
    let cpuinfo = read("/proc/cpuinfo");
    let flags = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap_or_default();
    let hw = flags.split_whitespace().find(|f| *f == "vmx" || *f == "svm");
    let module = |m: &str| std::path::Path::new(&format!("/sys/module/{m}")).exists();
    if !std::path::Path::new("/dev/kvm").exists() {
        "none (/dev/kvm missing)".into()
    } else if module("kvm_pvm") {
        format!(
            "software (kvm_pvm, no VMX/SVM{})",
            hw.map_or(String::new(), |f| format!("; CPU flag {f} present"))
        )
    } else if module("kvm_intel") || module("kvm_amd") {
        format!("hardware ({})", hw.unwrap_or("vmx/svm"))
    } else {
        "unknown".into()
    }
}

pub fn facts() -> Value {
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim()))
        .unwrap_or("unknown")
        .to_owned();
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_owned();
    let load = read("/proc/loadavg");
    let loads: Vec<f64> = load.split_whitespace().take(3).filter_map(|s| s.parse().ok()).collect();
    let mem_mib = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()))
        .map_or(0, |kb| kb / 1024);
    let qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_else(|| "not installed".into());
    let utc = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    json!({
        "cpu": model, "cores": cores, "kernel": kernel, "kvm": kvm_mode(), "mem_mib": mem_mib,
        "loadavg": loads, "qemu": qemu, "time": utc,
    })
}

pub fn one_line(f: &Value) -> String {
    format!(
        "{} × {} cores, kernel {}, KVM {}, load {}",
        f["cpu"].as_str().unwrap_or("?"),
        f["cores"],
        f["kernel"].as_str().unwrap_or("?"),
        f["kvm"].as_str().unwrap_or("?"),
        f["loadavg"]
    )
}
