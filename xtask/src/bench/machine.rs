//! What machine the numbers come from: CPU, cores, kernel, memory, the KVM mode, QEMU's version, the load.

use std::process::Command;

use serde::Serialize;

#[derive(Clone, Debug, Default, Serialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub kernel: String,
    pub mem_mib: u64,
    /// `hardware (kvm_intel, vmx)`, `hardware (kvm_amd, svm)`, `software (kvm_pvm ...)`, or `none ...`.
    pub kvm: String,
    pub qemu: String,
    pub load_start: String,
    pub load_end: String,
}

impl Machine {
    pub fn probe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Self {
            cpu_model: cpu_model(&cpuinfo),
            cores: cpuinfo
                .lines()
                .filter(|l| l.starts_with("processor"))
                .count()
                .max(std::thread::available_parallelism().map_or(0, std::num::NonZero::get)),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            mem_mib: meminfo
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .map_or(0, |kib| kib / 1024),
            kvm: kvm_mode(&cpuinfo, |m| {
                std::path::Path::new(&format!("/sys/module/{m}")).exists()
            }),
            qemu: qemu_version().unwrap_or_else(|| "not installed".to_owned()),
            load_start: load_average(),
            load_end: String::new(),
        }
    }
}

fn cpu_model(cpuinfo: &str) -> String {
    cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|v| v.split_once(':'))
        .map_or_else(|| "unknown".to_owned(), |(_, v)| v.trim().to_owned())
}

/// The KVM mode from the CPU flags and the loaded modules.
pub fn kvm_mode(cpuinfo: &str, module_loaded: impl Fn(&str) -> bool) -> String {
    if std::fs::metadata("/dev/kvm").is_err() {
        return "none (/dev/kvm missing)".to_owned();
    }
    let flags = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("flags"))
        .unwrap_or_default();
    let has_flag = |f: &str| flags.split_whitespace().any(|x| x == f);
    for (module, flag) in [("kvm_intel", "vmx"), ("kvm_amd", "svm")] {
        if module_loaded(module) && has_flag(flag) {
            return format!("hardware ({module}, {flag})");
        }
    }
    if module_loaded("kvm_pvm") {
        return "software (kvm_pvm: page-table-based, no VMX/SVM)".to_owned();
    }
    "unknown (/dev/kvm present, no kvm_intel/kvm_amd/kvm_pvm module)".to_owned()
}

fn qemu_version() -> Option<String> {
    let out = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next()?;
    Some(
        line.strip_prefix("QEMU emulator version ")
            .unwrap_or(line)
            .to_owned(),
    )
}

/// `/proc/loadavg`'s first three fields.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_and_mode_from_cpuinfo() {
        let intel = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R)\nflags\t\t: fpu vmx sse\n";
        assert_eq!(cpu_model(intel), "Intel(R) Xeon(R)");
        if std::fs::metadata("/dev/kvm").is_ok() {
            assert!(kvm_mode(intel, |m| m == "kvm_intel").starts_with("hardware (kvm_intel"));
            // The module without the flag is not hardware virtualisation.
            assert!(!kvm_mode("flags\t: fpu\n", |m| m == "kvm_intel").starts_with("hardware"));
            assert!(kvm_mode("flags\t: fpu\n", |m| m == "kvm_pvm").starts_with("software"));
        }
        assert_eq!(cpu_model(""), "unknown");
    }
}
