//! The few machine instructions the guest uses, each one that this machine's software KVM can emulate.

use core::arch::asm;

/// `out dx, al`.
pub fn outb(port: u16, value: u8) {
    // SAFETY: port output has no memory effects on the guest; the ports used are the VMM's (serial, paravirtual).
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags)) };
}

/// `out dx, eax`.
pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags)) };
}

/// The time-stamp counter.
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc only reads the counter into edx:eax.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// `hlt` with interrupts off: the VMM gets a `KVM_EXIT_HLT` and re-enters the vCPU when there is work.
pub fn hlt() {
    // SAFETY: hlt has no effect on memory; execution continues after it when the VMM re-enters.
    unsafe { asm!("hlt", options(nomem, nostack, preserves_flags)) };
}

/// `in al, dx`.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: port input has no memory effects on the guest.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags)) };
    value
}

/// `sti; hlt; cli`: waits for an interrupt (PVH boot under QEMU, where a timer and the NIC interrupt). `sti`
/// takes effect after the next instruction, so an interrupt that is already pending wakes the `hlt` instead of
/// being taken before it.
pub fn wait_for_interrupt() {
    // SAFETY: the IDT is installed (pvh.rs) before interrupts are ever enabled; the handlers preserve every
    // register. Interrupts are off again before returning.
    unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) };
}
