//! `_start`: the 64-bit entry the VMM jumps to, with `rdi` = the boot-info address.
//!
//! It disables interrupts, clears the direction flag, sets the stack to the top of a `.bss` array and calls
//! `kernel_main(rdi)`, which drops to ring 3 (see cpu.rs).
//!
//! It does not zero `.bss`: the VMM's ELF loader does (the guest-abi contract), and on `kvm_pvm` every ring-0
//! instruction is emulated, so a `rep stosb` over the 282 KiB `.bss` cost about 400 ms of boot. The PVH entry
//! (pvh.rs) still zeroes it, since a foreign loader makes no such promise.

use core::arch::global_asm;

/// Bytes of stack.
pub const STACK_SIZE: usize = 256 * 1024;

global_asm!(
    r#"
    .section .text.boot, "ax"
    .global _start
    .code64
_start:
    cli
    cld
    lea rsp, [rip + guest_stack_top]
    xor ebp, ebp
    call kernel_main
2:
    hlt
    jmp 2b

    .section .bss.stack, "aw", @nobits
    .balign 16
guest_stack_bottom:
    .skip {stack_size}
    .global guest_stack_top
guest_stack_top:
    .text
"#,
    stack_size = const STACK_SIZE,
);
