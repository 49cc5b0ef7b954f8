//! `_start`: the 64-bit entry the VMM jumps to, with `rdi` = the boot-info address.
//!
//! It disables interrupts, clears the direction flag, zeroes `.bss` (harmless when the loader already did), sets
//! the stack to the top of a `.bss` array and calls `kernel_main(rdi)`, which drops to ring 3 (see cpu.rs).

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
    mov r12, rdi
    lea rdi, [rip + __bss_start]
    lea rcx, [rip + __bss_end]
    sub rcx, rdi
    xor eax, eax
    rep stosb
    lea rsp, [rip + guest_stack_top]
    xor ebp, ebp
    mov rdi, r12
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
