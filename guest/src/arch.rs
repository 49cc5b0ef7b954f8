//! The few machine instructions the guest uses, each one that this machine's software KVM can emulate.
//! In ring 3 the privileged ones trap to the `#GP` handler, which executes them (cpu.rs).

use core::arch::asm;

/// Writes bytes to one port (the serial log).
pub fn out_bytes(port: u16, bytes: &[u8]) {
    for &byte in bytes {
        outb(port, byte);
    }
}

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

/// `in al, dx`.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: port input has no memory effects on the guest.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags)) };
    value
}
