//! The guest image is something this machine's software KVM can run: a static ELF linked at
//! `guest_abi::IMAGE_ADDR` whose code contains none of the instructions KVM's emulator cannot handle
//! (`xsave*`, `xrstor*`, `fxsave`/`fxrstor`, `cmpxchg16b`, `int3`, `int n`) and never touches SSE/AVX registers.
//!
//! Needs no privilege and no VMM: it builds the guest with cargo and disassembles it with `objdump`.

use std::process::Command;

use integration_tests::guest_elf as build_guest;

const IMAGE_ADDR: u64 = 0x20_0000;

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[test]
fn guest_is_a_static_elf_at_the_image_address() {
    let elf = std::fs::read(build_guest()).expect("read the guest ELF");
    assert_eq!(&elf[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(elf[4], 2, "not ELF64");
    assert_eq!(
        u16_at(&elf, 16),
        2,
        "e_type is not ET_EXEC: a PIE would need relocating, which the VMM does not do"
    );
    assert_eq!(u16_at(&elf, 18), 62, "not x86-64");
    let entry = u64_at(&elf, 24);
    let phoff = usize::try_from(u64_at(&elf, 32)).expect("phoff fits");
    let phentsize = usize::from(u16_at(&elf, 54));
    let phnum = usize::from(u16_at(&elf, 56));
    let mut loads = 0;
    let mut lowest = u64::MAX;
    let mut highest = 0;
    for i in 0..phnum {
        let ph = &elf[phoff + i * phentsize..phoff + (i + 1) * phentsize];
        let p_type = u32_at(ph, 0);
        assert!(
            p_type != 2 && p_type != 3,
            "program header {i} is PT_DYNAMIC/PT_INTERP: the guest must be static"
        );
        if p_type == 1 {
            loads += 1;
            let paddr = u64_at(ph, 24);
            let memsz = u64_at(ph, 40);
            assert_eq!(
                u64_at(ph, 16),
                paddr,
                "PT_LOAD {i}: virtual != physical address (identity map)"
            );
            lowest = lowest.min(paddr);
            highest = highest.max(paddr + memsz);
        }
    }
    assert!(loads > 0, "no PT_LOAD segment");
    assert_eq!(lowest, IMAGE_ADDR, "the image must start at IMAGE_ADDR");
    assert!(
        (lowest..highest).contains(&entry),
        "entry {entry:#x} outside the image {lowest:#x}..{highest:#x}"
    );
    assert!(
        highest < 0x0400_0000,
        "the image (with stack and bss) should stay small, ends at {highest:#x}"
    );
}

#[test]
fn guest_uses_only_instructions_the_software_kvm_emulates() {
    let elf = build_guest();
    let out = Command::new("objdump")
        .args(["-d", "--no-show-raw-insn", "-M", "att"])
        .arg(&elf)
        .output()
        .expect("objdump is missing: install binutils (./x setup does)");
    assert!(
        out.status.success(),
        "objdump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("objdump prints UTF-8");
    let forbidden_mnemonics = [
        "xsave",
        "xrstor",
        "fxsave",
        "fxrstor",
        "cmpxchg16b",
        "int", // int3 and `int n`: kvm_pvm cannot emulate either outside real mode
        "vzeroupper",
        "ldmxcsr",
        "stmxcsr",
    ];
    let forbidden_registers = ["%xmm", "%ymm", "%zmm", "%st(", "%mm"];
    let mut instructions = 0;
    let mut bad = Vec::new();
    for line in text.lines() {
        // Instruction lines: "  2034ce:\tlock orl $0x0,(%rsp)".
        let Some((addr, insn)) = line.split_once(":\t") else {
            continue;
        };
        if !addr.trim().chars().all(|c| c.is_ascii_hexdigit()) {
            continue;
        }
        instructions += 1;
        let insn = insn.trim();
        let mnemonic_words: Vec<&str> = insn.split_whitespace().take(2).collect();
        let hit_mnemonic = forbidden_mnemonics
            .iter()
            .any(|f| mnemonic_words.iter().any(|w| w.starts_with(f)));
        let hit_register = forbidden_registers.iter().any(|r| insn.contains(r));
        if hit_mnemonic || hit_register {
            bad.push(line.to_string());
        }
    }
    assert!(
        instructions > 1000,
        "objdump printed only {instructions} instructions: is this the guest?"
    );
    assert!(
        bad.is_empty(),
        "{} forbidden instruction(s) in the guest (software KVM cannot emulate them, see guest's crate doc):\n{}",
        bad.len(),
        bad.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
}
