//! Running the guest in ring 3.
//!
//! `kvm_pvm` runs a guest's *user* mode natively but emulates its *supervisor* mode instruction by instruction
//! (measured here: about 4 µs per byte written by a ring-0 loop, against a few ns in ring 3). So the guest sets up
//! just enough to live in ring 3 and does everything there:
//!
//! - its own page tables (identity map of 4 GiB in 2 MiB pages, user-accessible), a GDT with user segments and a
//!   TSS (the ring-0 stack for interrupts), and an IDT;
//! - `hlt`, `in`/`out`, `cli` and `sti; hlt; cli` stay in the code as they are. Ring 3 runs with `IOPL = 0`
//!   (`kvm_pvm` ignores `IOPL = 3` anyway, measured; and `int n` cannot be emulated there at all), so they raise
//!   `#GP`, and the ring-0 `#GP` handler executes exactly those instructions for ring 3 and returns past them:
//!   classic trap-and-emulate, the same on every hypervisor. Port I/O is rare (the log, the sleep port,
//!   milestones), so a few emulated instructions per call do not matter.
//!
//! Hardware KVM and QEMU run the same code unchanged.

use core::arch::{asm, global_asm};

/// The user code and data selectors (RPL 3).
const USER_CS: u64 = 0x23;
const USER_SS: u64 = 0x1b;
/// Page-table entry bits: cache disable, write-through.
const PTE_PCD: u64 = 1 << 4;
const PTE_PWT: u64 = 1 << 3;
/// The TSS selector.
const TSS_SELECTOR: u16 = 0x28;
/// Bytes of ring-0 stack (interrupts and the halt call).
const KERNEL_STACK: usize = 16 * 1024;

global_asm!(
    r#"
    .section .data.pagetables, "aw"
    .balign 4096
    .global guest_pml4
guest_pml4:
    .quad guest_pdpt + 0x7
    .fill 511, 8, 0
guest_pdpt:
    .quad guest_pd + 0x7
    .quad guest_pd + 0x1007
    .quad guest_pd + 0x2007
    .quad guest_pd + 0x3007
    .fill 508, 8, 0
    .global guest_pd
guest_pd:
    .set guest_page, 0
    .rept 2048
    .quad (guest_page << 21) | 0x87
    .set guest_page, guest_page + 1
    .endr

    .section .bss.kstack, "aw", @nobits
    .balign 16
guest_kernel_stack_bottom:
    .skip {kstack}
    .global guest_kernel_stack_top
guest_kernel_stack_top:

    .text
    .balign 16
    .global guest_gp_entry
// #GP: ring 3 executed a privileged instruction. Emulate the few the guest uses, else report the exception.
// Stack: error code, rip, cs, rflags, rsp, ss. rax and rdx are the faulting context's own.
guest_gp_entry:
    push rax
    push rcx
    push rsi
    mov rsi, [rsp + 32]
    movzx ecx, byte ptr [rsi]
    cmp cl, 0xee
    je 22f
    cmp cl, 0xef
    je 23f
    cmp cl, 0xec
    je 24f
    cmp cl, 0xf4
    je 25f
    cmp cl, 0xfb
    je 26f
    cmp cl, 0xfa
    je 28f
    pop rsi
    pop rcx
    pop rax
    push 13
    jmp guest_exception_common
22:
    out dx, al
    jmp 28f
23:
    out dx, eax
    // `out dx, eax; hlt` (the sleep request, then the halt) in one trip to ring 0.
    cmp byte ptr [rsi + 1], 0xf4
    jne 28f
    hlt
    add qword ptr [rsp + 32], 1
    jmp 28f
24:
    in al, dx
    mov [rsp + 16], al
    jmp 28f
25:
    hlt
    jmp 28f
26:
    // sti; hlt; cli
    cmp word ptr [rsi + 1], 0xfaf4
    jne 27f
    sti
    hlt
    cli
    add qword ptr [rsp + 32], 2
    jmp 28f
27:
    // a lone sti: interrupts stay off in ring 3
28:
    add qword ptr [rsp + 32], 1
    pop rsi
    pop rcx
    pop rax
    add rsp, 8
    iretq

    .balign 16
    .global guest_irq_entry
guest_irq_entry:
    push rax
    mov al, 0x20
    out 0xa0, al
    out 0x20, al
    pop rax
    iretq

    .balign 16
    .global guest_exception_entries
guest_exception_entries:
    .set vector, 0
    .rept 32
    .balign 16
    .if vector == 8 || (vector >= 10 && vector <= 14) || vector == 17 || vector == 21 || vector == 29 || vector == 30
    .else
    push 0
    .endif
    push vector
    jmp guest_exception_common
    .set vector, vector + 1
    .endr
guest_exception_common:
    mov rdi, [rsp]
    lea rsi, [rsp + 16]
    and rsp, -16
    call guest_exception
3:
    hlt
    jmp 3b

    .balign 16
    .global guest_enter_user
// guest_enter_user(entry = rdi, arg = rsi, user_stack_top = rdx): never returns.
guest_enter_user:
    push {user_ss}
    push rdx
    push 0x2
    push {user_cs}
    push rdi
    mov rdi, rsi
    xor ebp, ebp
    iretq
"#,
    kstack = const KERNEL_STACK,
    user_ss = const USER_SS,
    user_cs = const USER_CS,
);

unsafe extern "C" {
    static guest_pml4: u8;
    /// The four page directories (2048 entries of 2 MiB), in `.data`.
    static mut guest_pd: [u64; 2048];
    static guest_kernel_stack_top: u8;
    fn guest_gp_entry();
    fn guest_irq_entry();
    fn guest_exception_entries();
    fn guest_enter_user(entry: u64, arg: u64, user_stack_top: u64) -> !;
}

/// A 64-bit TSS: only `rsp0` matters (the stack for ring-3 → ring-0 transitions).
#[repr(C, packed(4))]
struct Tss {
    reserved0: u32,
    rsp0: u64,
    rsp1: u64,
    rsp2: u64,
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iopb_offset: u16,
}

const _: () = assert!(core::mem::size_of::<Tss>() == 104);

static mut TSS: Tss = Tss {
    reserved0: 0,
    rsp0: 0,
    rsp1: 0,
    rsp2: 0,
    reserved1: 0,
    ist: [0; 7],
    reserved2: 0,
    reserved3: 0,
    // Beyond the limit: no I/O bitmap, so ring 3 (IOPL 0) traps on every port access.
    iopb_offset: 104,
};

/// null, kernel code, kernel data, user data, user code, TSS (two slots).
static mut GDT: [u64; 7] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x00cf_f300_0000_ffff,
    0x00af_fb00_0000_ffff,
    0,
    0,
];

/// 256 gates of 16 bytes.
static mut IDT: [u64; 512] = [0; 512];

fn gate(handler: u64, dpl: u64) -> (u64, u64) {
    let low =
        (handler & 0xffff) | (0x08 << 16) | ((0x8e | dpl << 5) << 40) | (((handler >> 16) & 0xffff) << 48);
    (low, handler >> 32)
}

/// Ring 0: reports an exception (the CPU frame: `rip`, `cs`, `rflags`, `rsp`, `ss`; the entry stubs keep the
/// error code apart) and stops the guest with status 2.
#[unsafe(no_mangle)]
extern "C" fn guest_exception(vector: u64, frame: *const [u64; 5]) -> ! {
    // SAFETY: the entry stub passes the address of the frame the CPU pushed on the ring-0 stack.
    let frame = unsafe { frame.read() };
    let cr2: u64;
    // SAFETY: reading cr2 has no side effects (ring 0 here).
    unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags)) };
    crate::log!("guest: exception {vector}: frame {frame:#x?}, cr2 {cr2:#x}");
    crate::arch::outl(guest_abi::PORT_EXIT, 2);
    loop {
        // SAFETY: ring 0; stop here for good.
        unsafe { asm!("hlt", options(nomem, nostack)) };
    }
}

/// Loads the guest's page tables, GDT, TSS and IDT. Runs in ring 0 (emulated under `kvm_pvm`: keep it short).
///
/// `uncached` lists device windows (virtio-mmio, the local APIC): their 2 MiB pages get `PCD | PWT`.
pub fn init(uncached: &[u64]) {
    let tss = &raw mut TSS;
    let gdt = &raw mut GDT;
    let idt = &raw mut IDT;
    let tss_base = tss as u64;
    // SAFETY: boot code on the only vCPU, before anything else uses these statics.
    unsafe {
        (*tss).rsp0 = (&raw const guest_kernel_stack_top) as u64;
        let limit = (core::mem::size_of::<Tss>() - 1) as u64;
        (*gdt)[5] = (limit & 0xffff)
            | ((tss_base & 0xff_ffff) << 16)
            | (0x89 << 40)
            | (((tss_base >> 24) & 0xff) << 56);
        (*gdt)[6] = tss_base >> 32;
        for vector in 0..256usize {
            let (handler, dpl) = match vector {
                13 => (guest_gp_entry as *const () as u64, 0),
                0..32 => (
                    guest_exception_entries as *const () as u64 + 16 * vector as u64,
                    0,
                ),
                _ => (guest_irq_entry as *const () as u64, 0),
            };
            let (low, high) = gate(handler, dpl);
            (*idt)[2 * vector] = low;
            (*idt)[2 * vector + 1] = high;
        }
    }
    let mut gdtr = [0u8; 10];
    gdtr[..2].copy_from_slice(&((7 * 8 - 1) as u16).to_le_bytes());
    gdtr[2..].copy_from_slice(&(gdt as u64).to_le_bytes());
    let mut idtr = [0u8; 10];
    idtr[..2].copy_from_slice(&((256 * 16 - 1) as u16).to_le_bytes());
    idtr[2..].copy_from_slice(&(idt as u64).to_le_bytes());
    let pd = &raw mut guest_pd;
    for &addr in uncached {
        if addr < 1 << 32 {
            // SAFETY: guest_pd holds 2048 entries covering 4 GiB, so addr >> 21 is in bounds; the tables are not
            // loaded yet and nothing else touches them.
            unsafe { (*pd)[(addr >> 21) as usize] |= PTE_PCD | PTE_PWT };
        }
    }
    let cr3 = (&raw const guest_pml4) as u64;
    // SAFETY: the page tables identity-map the first 4 GiB (image, stacks, RAM, MMIO) exactly as before; the GDT
    // keeps the kernel selectors at the same indices (0x08, 0x10), so the current CS/SS stay valid; the TSS
    // descriptor is filled in above.
    unsafe {
        asm!(
            "mov cr3, {cr3}",
            "lgdt [{gdtr}]",
            "lidt [{idtr}]",
            "ltr {tss:x}",
            cr3 = in(reg) cr3,
            gdtr = in(reg) gdtr.as_ptr(),
            idtr = in(reg) idtr.as_ptr(),
            tss = in(reg) TSS_SELECTOR,
            options(nostack, preserves_flags)
        );
    }
}

/// Drops to ring 3 (IOPL 0, interrupts off) and calls `entry(arg)` there on the stack ending at `stack_top`.
pub fn enter_user(entry: unsafe extern "C" fn(u64) -> !, arg: u64, stack_top: u64) -> ! {
    // SAFETY: init() ran: the GDT has the user segments, the TSS gives interrupts a ring-0 stack, every page is
    // user-accessible. The stack is the guest's main stack, which nothing else uses from here on.
    unsafe { guest_enter_user(entry as *const () as u64, arg, stack_top) }
}

/// Writes `value` to `port`, then halts: one `#GP` round trip from ring 3 instead of two (the handler recognises
/// the pair). This is the idle path's "sleep at most N µs" request to the migrator.
pub fn out32_then_halt(port: u16, value: u32) {
    // SAFETY: port output and hlt have no memory effects on the guest; in ring 3 both trap to the #GP handler.
    unsafe {
        asm!("out dx, eax", "hlt", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags));
    };
}

/// `hlt` (from ring 3: the `#GP` handler executes it). Interrupts stay off; the VMM sees `KVM_EXIT_HLT`.
pub fn halt() {
    // SAFETY: hlt has no memory effect; in ring 3 it traps to the #GP handler, which halts and skips it.
    unsafe { asm!("hlt", options(nomem, nostack, preserves_flags)) };
}

/// `sti; hlt; cli`: waits for an interrupt (from ring 3 the `#GP` handler runs the three instructions).
pub fn wait_for_interrupt() {
    // SAFETY: the IDT is installed before this is ever called; every handler preserves all registers.
    unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) };
}
