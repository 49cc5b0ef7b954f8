//! The PVH boot path, so QEMU (`-M microvm -kernel guest`) can boot the same image.
//!
//! QEMU finds the `XEN_ELFNOTE_PHYS32_ENTRY` note, loads the `PT_LOAD` segments and enters `_start_pvh` in 32-bit
//! protected mode, paging off, with `ebx` = the `hvm_start_info`. The entry loads static page tables that
//! identity-map 4 GiB with 2 MiB pages, enables long mode and jumps to 64-bit code, which builds a
//! [`BootInfo`] from the start info and the kernel command line ([`guest::cmdline`]) and calls `guest_main`.
//!
//! QEMU has no sleep port: `hlt` with interrupts off would stop the vCPU for good. So this path programs the 8259
//! PICs (through the local APIC's LINT0 in virtual-wire mode) and the PIT (1 kHz tick), unmasks the NIC's IRQ,
//! and idles with `sti; hlt` (the IDT is cpu.rs's). `idle=poll` spins instead.
//!
//! A working invocation (TCG, or `-accel kvm`: both tested by `tests/tests/guest_qemu.rs`):
//!
//! ```text
//! qemu-system-x86_64 -M microvm,ioapic2=off -accel tcg -m 256M -smp 1 -nodefaults -no-user-config \
//!     -display none -serial stdio -kernel guest -append "ip=10.0.0.2/24 ip6=fd00::2/64 dirty=32M@125M" \
//!     -netdev tap,id=n0,ifname=TAP,script=no,downscript=no -device virtio-net-device,netdev=n0,mac=MAC
//! ```
//!
//! `ioapic2=off` keeps the virtio-mmio IRQs on GSIs 5-12, which the 8259 reaches (with the second IO-APIC the
//! guest still works, on its timer tick alone). QEMU 7.2 does not put `virtio_mmio.device=` on a PVH kernel's
//! command line, so the guest probes microvm's slots when the word is missing. QEMU announces a migrated guest
//! with its own RARPs; the guest sends no gratuitous ARP then (there is no mailbox under QEMU).

use core::{
    arch::global_asm,
    sync::atomic::{AtomicU32, Ordering},
};

use guest::cmdline::Cmdline;
use guest_abi::{BOOT_MAGIC, BOOT_VERSION, BootInfo, MMIO_BASE};

use crate::{arch, log, serial};

/// `hvm_start_info::magic`.
const HVM_START_MAGIC: u32 = 0x336e_c578;
/// The local APIC's register window.
const LAPIC: u64 = 0xfee0_0000;
/// The PIT's input clock in Hz.
const PIT_HZ: u64 = 1_193_182;
/// Idle tick rate under QEMU.
const TICK_HZ: u64 = 1000;
/// IRQ of the NIC when booted by PVH (`u32::MAX` = not PVH: the VMM's hlt/sleep-port protocol applies).
static PVH_NIC_IRQ: AtomicU32 = AtomicU32::new(u32::MAX);

/// `idle=poll` was on the command line (1) or not (0).
static PVH_IDLE_POLL: AtomicU32 = AtomicU32::new(0);

/// How the guest idles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Idle {
    /// The migrator's protocol: write the sleep time to `PORT_SLEEP_US`, then `hlt` with interrupts off.
    SleepPort,
    /// PVH under QEMU: `sti; hlt` until the tick or the NIC's interrupt.
    Interrupt,
    /// PVH with `idle=poll`: spin with `pause` until the deadline or a received frame.
    Poll,
}

/// How this boot idles.
pub fn idle_mode() -> Idle {
    if PVH_NIC_IRQ.load(Ordering::Relaxed) == u32::MAX {
        Idle::SleepPort
    } else if PVH_IDLE_POLL.load(Ordering::Relaxed) != 0 {
        Idle::Poll
    } else {
        Idle::Interrupt
    }
}

global_asm!(
    r#"
    .section .note.pvh, "a", @note
    .balign 4
    .long 4
    .long 8
    .long 18
    .asciz "Xen"
    .balign 4
    .quad _start_pvh
    .balign 4

    .section .data
    .balign 8
pvh_gdt:
    .quad 0
    .quad 0x00af9b000000ffff
    .quad 0x00cf93000000ffff
pvh_gdt_ptr:
    .word 23
    .long pvh_gdt

    .section .text.pvh, "ax"
    .global _start_pvh
    .code32
_start_pvh:
    cli
    cld
    movl %ebx, %esi
    movl $guest_pml4, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $0x20, %eax
    movl %eax, %cr4
    movl $0xc0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax
    movl %eax, %cr0
    lgdt pvh_gdt_ptr
    ljmp $0x08, $pvh_long
    .code64
pvh_long:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movl %esi, %r12d
    leaq __bss_start(%rip), %rdi
    leaq __bss_end(%rip), %rcx
    subq %rdi, %rcx
    xorl %eax, %eax
    rep stosb
    leaq guest_stack_top(%rip), %rsp
    xorl %ebp, %ebp
    movq %r12, %rdi
    call pvh_main
3:
    hlt
    jmp 3b

"#,
    options(att_syntax)
);

/// The `BootInfo` the PVH path builds (the VMM path's lives at `BOOT_INFO_ADDR`).
static mut PVH_BOOT_INFO: BootInfo = BootInfo {
    magic: 0,
    version: 0,
    pad0: 0,
    ram_bytes: 0,
    tsc_khz: 0,
    mmio_base: 0,
    mmio_size: 0,
    mac: [0; 6],
    prefix_len: 0,
    pad1: 0,
    ipv4: [0; 4],
    gateway: [0; 4],
    dirty_bytes: 0,
    dirty_rate: 0,
    garp_request: 0,
    garp_done: 0,
    ipv6: [0; 16],
    ipv6_prefix_len: 0,
    pad2: [0; 7],
};

fn read_u32(addr: u64) -> u32 {
    // SAFETY: callers pass addresses inside the hvm_start_info or memory map QEMU wrote into RAM.
    unsafe { (addr as *const u32).read_unaligned() }
}

fn read_u64(addr: u64) -> u64 {
    // SAFETY: as for read_u32.
    unsafe { (addr as *const u64).read_unaligned() }
}

/// The NUL-terminated command line at `addr` (at most 4 KiB; non-UTF-8 makes it empty).
fn cmdline_at(addr: u64) -> &'static str {
    if addr == 0 {
        return "";
    }
    // SAFETY: QEMU put a NUL-terminated string there; it stays untouched (below the image, never allocated).
    let bytes = unsafe { core::slice::from_raw_parts(addr as *const u8, 4096) };
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    core::str::from_utf8(&bytes[..len]).unwrap_or("")
}

/// 64-bit continuation of `_start_pvh`, on the guest's stack.
#[unsafe(no_mangle)]
extern "C" fn pvh_main(start_info: u64) -> ! {
    serial::init();
    let magic = read_u32(start_info);
    assert!(
        magic == HVM_START_MAGIC,
        "PVH: bad hvm_start_info magic {magic:#x} at {start_info:#x}"
    );
    let version = read_u32(start_info + 4);
    let line = cmdline_at(read_u64(start_info + 24));
    log!("guest: PVH boot (start info v{version}), command line: {line}");
    let cmdline = Cmdline::parse(line)
        .unwrap_or_else(|bad| panic!("PVH: cannot parse {:?} on the command line", bad.0));

    // RAM: the end of the highest usable (type 1) region below 4 GiB.
    let mut ram_top = 0;
    if version >= 1 {
        let map = read_u64(start_info + 40);
        let entries = read_u32(start_info + 48);
        for i in 0..u64::from(entries) {
            let entry = map + i * 24;
            let (addr, size, kind) = (read_u64(entry), read_u64(entry + 8), read_u32(entry + 16));
            if kind == 1 && addr < (1 << 32) {
                ram_top = ram_top.max((addr + size).min(1 << 32));
            }
        }
    }
    assert!(
        ram_top > 0,
        "PVH: no usable RAM in the memory map (start info v{version})"
    );

    let (mmio_base, mmio_size, irq) = cmdline
        .virtio_mmio
        .or_else(probe_microvm_virtio_net)
        .unwrap_or_else(|| {
            panic!(
                "PVH: no virtio_mmio.device=<size>@<base>:<irq> on the command line and no virtio-net found"
            )
        });
    let (ipv4, prefix_len) = cmdline
        .ip
        .unwrap_or_else(|| panic!("PVH: no ip=<a.b.c.d>/<prefix> on the command line"));
    let tsc_khz = cmdline.tsc_khz.unwrap_or_else(calibrate_tsc_khz);

    let info = BootInfo {
        magic: BOOT_MAGIC,
        version: BOOT_VERSION,
        pad0: 0,
        ram_bytes: ram_top.min(MMIO_BASE),
        tsc_khz,
        mmio_base,
        mmio_size,
        mac: cmdline.mac.unwrap_or([0; 6]),
        prefix_len,
        pad1: 0,
        ipv4,
        gateway: cmdline.gateway.unwrap_or([0; 4]),
        dirty_bytes: cmdline.dirty_bytes,
        dirty_rate: cmdline.dirty_rate,
        garp_request: 0,
        garp_done: 0,
        ipv6: cmdline.ip6.map_or([0; 16], |(a, _)| a),
        ipv6_prefix_len: cmdline.ip6.map_or(0, |(_, p)| p),
        pad2: [0; 7],
    };
    let boot_info = &raw mut PVH_BOOT_INFO;
    // SAFETY: nothing else uses the static yet; guest_main reads it through the pointer from now on.
    unsafe { boot_info.write(info) };
    crate::cpu::init(&[mmio_base, LAPIC]);

    if cmdline.idle_poll {
        PVH_IDLE_POLL.store(1, Ordering::Relaxed);
    } else {
        setup_interrupts(irq);
    }
    PVH_NIC_IRQ.store(irq, Ordering::Relaxed);
    crate::run_in_user_mode(boot_info)
}

/// QEMU's microvm has virtio-mmio slots of 512 bytes from `0xfeb0_0000`: eight on GSIs 5-12 with `ioapic2=off`,
/// 24 on the second IO-APIC otherwise. QEMU 7.2 does not append them to a PVH kernel's command line, so look for
/// the network device (ID 1) there. Without a second IO-APIC the IRQ is `5 + slot` (8259-reachable); otherwise
/// it is reported as unknown (255) and the guest relies on its timer tick.
fn probe_microvm_virtio_net() -> Option<(u64, u64, u32)> {
    const BASE: u64 = 0xfeb0_0000;
    const SLOT: u64 = 512;
    let mut slots = 0;
    for i in 0..24u32 {
        let base = BASE + u64::from(i) * SLOT;
        // SAFETY: as below; an absent slot reads as zero in QEMU.
        if unsafe { (base as *const u32).read_volatile() } == u32::from_le_bytes(*b"virt") {
            slots = i + 1;
        }
    }
    (0..slots).find_map(|i| {
        let base = BASE + u64::from(i) * SLOT;
        // SAFETY: the microvm virtio-mmio window is identity-mapped; reading the magic and device ID registers has
        // no side effects.
        let (magic, device_id) = unsafe {
            (
                (base as *const u32).read_volatile(),
                ((base + 8) as *const u32).read_volatile(),
            )
        };
        (magic == u32::from_le_bytes(*b"virt") && device_id == 1).then(|| {
            let irq = if slots <= 8 { 5 + i } else { 255 };
            log!("guest: found virtio-net at {base:#x} (microvm slot {i} of {slots}, IRQ {irq})");
            (base, SLOT, irq)
        })
    })
}

/// Measures the TSC against the PIT (channel 0, counting down from 65536 at 1.193182 MHz) for about 50 ms.
fn calibrate_tsc_khz() -> u64 {
    arch::outb(0x43, 0x34); // channel 0, lo/hi, mode 2
    arch::outb(0x40, 0);
    arch::outb(0x40, 0);
    let read = || {
        arch::outb(0x43, 0x00); // latch channel 0
        let lo = arch::inb(0x40);
        let hi = arch::inb(0x40);
        u16::from_le_bytes([lo, hi])
    };
    let mut prev = read();
    let start = arch::rdtsc();
    let mut ticks: u64 = 0;
    let target = PIT_HZ / 20;
    while ticks < target {
        let now = read();
        ticks += u64::from(prev.wrapping_sub(now));
        prev = now;
    }
    let cycles = arch::rdtsc() - start;
    let khz = (u128::from(cycles) * u128::from(PIT_HZ) / (u128::from(ticks) * 1000)) as u64;
    log!("guest: TSC calibrated against the PIT: {khz} kHz");
    khz.max(1)
}

/// PICs remapped to vectors 32-47 with the PIT and the NIC's IRQ unmasked, LINT0 in virtual-wire mode, PIT at
/// [`TICK_HZ`]. The IDT (cpu.rs) sends vectors 32-47 to a handler that only acknowledges.
fn setup_interrupts(nic_irq: u32) {
    // 8259 PICs: vectors 32-39 and 40-47, cascade on IRQ 2.
    for (port, value) in [
        (0x20, 0x11),
        (0xa0, 0x11),
        (0x21, 0x20),
        (0xa1, 0x28),
        (0x21, 4),
        (0xa1, 2),
        (0x21, 1),
        (0xa1, 1),
    ] {
        arch::outb(port, value);
    }
    let mut master_mask: u8 = !(1 | 1 << 2);
    let mut slave_mask: u8 = 0xff;
    match nic_irq {
        0..8 => master_mask &= !(1 << nic_irq),
        8..16 => slave_mask &= !(1 << (nic_irq - 8)),
        _ => log!("guest: NIC IRQ {nic_irq} is beyond the PICs; relying on the {TICK_HZ} Hz tick"),
    }
    arch::outb(0x21, master_mask);
    arch::outb(0xa1, slave_mask);

    // The PICs reach the CPU through the local APIC's LINT0, which comes out of reset masked: make it ExtINT
    // (virtual wire mode, as a PC BIOS does) and software-enable the APIC.
    // SAFETY: the local APIC window is identity-mapped; these are its spurious-vector and LVT LINT0 registers.
    unsafe {
        ((LAPIC + 0xf0) as *mut u32).write_volatile(0x1ff);
        ((LAPIC + 0x350) as *mut u32).write_volatile(0x700);
    }

    let divisor = (PIT_HZ / TICK_HZ) as u16;
    arch::outb(0x43, 0x34); // channel 0, lo/hi, mode 2 (rate generator)
    arch::outb(0x40, divisor as u8);
    arch::outb(0x40, (divisor >> 8) as u8);
}
