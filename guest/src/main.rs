//! The migmon guest: a tiny bare-metal x86-64 program that the `migrator` VMM runs and migrates.
//!
//! It brings up a virtio-net device (virtio-mmio, polled, no interrupts), runs smoltcp with three TCP services
//! (echo on 7, a sequence-numbered stream on 5001, request/response on 5002; see `guest_abi`), optionally
//! dirties a working set of memory at a fixed rate so that pre-copy has work to converge on, announces itself when
//! the VMM asks through the boot-info mailbox (a gratuitous ARP, and an unsolicited neighbor advertisement for each
//! of its IPv6 addresses, as Linux does after a migration), and halts when idle after telling the VMM how long it
//! may sleep. It speaks IPv4 and IPv6: a link-local address from its MAC, and the address the VMM gives it.
//!
//! # Why only simple instructions, and why ring 3
//!
//! `/dev/kvm` on the machines this project runs on is `kvm_pvm`: software virtualization without VMX/SVM. Every
//! instruction that traps (port I/O, MMIO, `hlt`, control registers) goes through KVM's instruction emulator,
//! and that emulator cannot do `cmpxchg16b`, `xsave`/`xrstor`, `int3` or `int n` (a stock Linux guest dies on
//! exactly those). Worse, `kvm_pvm` emulates *all* of a guest's ring-0 code, one instruction at a time (measured:
//! about 4 µs per byte of a ring-0 memory loop), while ring 3 runs natively. So after a few hundred instructions
//! of set-up the guest drops to ring 3 and stays there (cpu.rs); its rare privileged instructions trap to a tiny
//! ring-0 handler. And this guest:
//!
//! - is built for `x86_64-unknown-none`, which is soft-float: no SSE/AVX registers are ever touched, so there is
//!   no FPU state to save and no `xsave`/`xrstor` anywhere;
//! - takes no locks and uses no 128-bit atomics (one vCPU, no interrupts: the allocator is a plain cell);
//! - talks to devices with plain `mov` (virtio-mmio registers through volatile 8/16/32-bit accesses) and
//!   `out` (serial, the paravirtual ports), reads time with `rdtsc` and idles with `hlt`;
//! - panics by writing the message to the serial port and a non-zero status to `PORT_EXIT`, never by trapping.
//!
//! `tests/tests/guest_image.rs` disassembles the built image and fails on any forbidden instruction.
//!
//! # Boot
//!
//! The VMM loads the ELF's `PT_LOAD` segments at their (identity-mapped) addresses, from `guest_abi::IMAGE_ADDR`
//! up, writes `BootInfo` at `guest_abi::BOOT_INFO_ADDR`, and enters `_start` in 64-bit mode with
//! `rdi = BOOT_INFO_ADDR`. `_start` sets its own stack (in `.bss`), so the VMM sets only `rip` and `rdi`.
//! The VMM's page tables must identity-map the image; the guest then loads its own page tables (identity map of
//! the low 4 GiB, user-accessible), GDT, TSS and IDT, and continues in ring 3. Guest RAM above `MMIO_BASE` is not
//! used. `rdtsc` costs a VM exit under `kvm_pvm` (about 25 µs), so the main loop reads the clock once per round.
#![no_std]
#![no_main]

extern crate alloc;

mod arch;
mod boot;
mod clock;
mod cpu;
mod dirtier;
mod heap;
mod net;
mod pvh;
mod serial;

use core::panic::PanicInfo;

use guest::services::{self, Services};
use guest_abi::{
    BOOT_MAGIC, BOOT_VERSION, BootInfo, GuestMark, MMIO_BASE, PORT_EXIT, PORT_MARK, PORT_SLEEP_US,
};
use smoltcp::{
    iface::{Config, Interface, SocketSet},
    time::Instant,
    wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address, Ipv4Cidr, Ipv6Address, Ipv6Cidr},
};

use crate::{clock::Clock, dirtier::Dirtier, net::NetDevice, pvh::Idle};

/// Shortest sleep worth a `hlt` (a VM exit and re-entry cost about 10 µs each).
const MIN_SLEEP_US: u64 = 20;
/// The longest sleep requested even with no deadline, so the loop looks at the mailbox now and then.
const MAX_SLEEP_US: u64 = 1_000_000;
/// Stats are logged at most this often, and only when they changed.
const LOG_EVERY_US: u64 = 2_000_000;

unsafe extern "C" {
    /// Top of the main stack (boot.rs).
    static guest_stack_top: u8;
}

/// Ring 0 continuation of `_start` (the migrator's entry): sets up ring 3 and runs [`guest_main`] there.
#[unsafe(no_mangle)]
extern "C" fn kernel_main(boot_info: *mut BootInfo) -> ! {
    // SAFETY: the VMM wrote the BootInfo before entry (validated in guest_main).
    let mmio_base = unsafe { (&raw const (*boot_info).mmio_base).read_volatile() };
    cpu::init(&[mmio_base]);
    run_in_user_mode(boot_info)
}

/// Drops to ring 3 and runs [`guest_main`] on the main stack.
fn run_in_user_mode(boot_info: *mut BootInfo) -> ! {
    unsafe extern "C" fn entry(boot_info: u64) -> ! {
        // SAFETY: the caller's pointer, passed through unchanged.
        unsafe { guest_main(boot_info as *mut BootInfo) }
    }
    cpu::enter_user(entry, boot_info as u64, (&raw const guest_stack_top) as u64)
}

/// The guest proper, in ring 3. Reached from `kernel_main` or `pvh_main` through [`run_in_user_mode`].
///
/// # Safety
///
/// `boot_info` points to a `BootInfo` in identity-mapped RAM that stays there for the guest's lifetime and that
/// only the VMM (its mailbox fields) and this function write.
unsafe fn guest_main(boot_info: *mut BootInfo) -> ! {
    serial::init();
    // SAFETY: the caller's promise.
    let info = unsafe { read_boot_info(boot_info) };
    heap::init(info.ram_bytes.min(MMIO_BASE));
    let clock = Clock::new(info.tsc_khz);
    let (mut device, mut iface, mac) = bring_up_network(&info, &clock);
    let mut sockets = SocketSet::new(alloc::vec::Vec::new());
    let mut services = Services::new(&mut sockets);
    let mut dirtier = Dirtier::new(info.dirty_bytes, info.dirty_rate, clock.now_us());

    arch::outl(PORT_MARK, GuestMark::Ready as u32);
    log!(
        "guest: ready: echo {}, stream {}, rr {}",
        guest_abi::ECHO_PORT,
        guest_abi::STREAM_PORT,
        guest_abi::RR_PORT
    );

    let mut mailbox = Mailbox {
        boot_info,
        garp_done: info.garp_done,
        mac,
        ipv4: info.ipv4,
        ipv6: ipv6_addresses(&info, mac),
    };
    let mut stats_log = StatsLog::new(services.stats(), clock.now_us());
    loop {
        mailbox.answer_garp_request(&mut device);

        // One clock read per round: under software KVM `rdtsc` is emulated and costs a VM exit (~25 µs).
        let now_us = clock.now_us();
        let now = Instant::from_micros(now_us as i64);
        let mut busy = services::poll(&mut iface, &mut device, &mut sockets, &mut services, now);
        busy |= dirtier.work(now_us);
        stats_log.log_if_changed(now_us, &services, &dirtier, &device);

        let idle = pvh::idle_mode();
        if idle == Idle::Interrupt {
            // Lower the NIC's interrupt line before looking at the queue: a frame after this raises it again.
            device.ack_interrupt();
        }
        if busy || device.rx_pending() {
            continue;
        }
        // Idle: sleep until the earliest deadline (smoltcp timers, paced streams, the dirtier's next slice).
        let deadlines = [
            iface.poll_at(now, &sockets),
            services.next_deadline(&sockets),
            dirtier.next_deadline(),
        ];
        let sleep_us = sleep_budget(now, deadlines);
        if sleep_us < MIN_SLEEP_US {
            continue;
        }
        stats_log.sleeps += 1;
        sleep(idle, now_us, sleep_us, &clock, &device);
    }
}

/// Reads and checks the `BootInfo` the VMM wrote, and logs what it says.
///
/// # Safety
///
/// As for [`guest_main`].
unsafe fn read_boot_info(boot_info: *mut BootInfo) -> BootInfo {
    // SAFETY: the VMM (or the PVH entry) put a BootInfo at this address; the page is identity-mapped RAM.
    let info = unsafe { boot_info.read_volatile() };
    assert!(
        info.magic == BOOT_MAGIC && info.version == BOOT_VERSION,
        "bad boot info at {boot_info:p}: magic {:#x} version {} (want {BOOT_VERSION})",
        info.magic,
        info.version
    );
    log!(
        "guest: {} MiB RAM, tsc {} kHz, mac {:02x?}, ip {}/{} gw {} ip6 {}/{}, virtio-mmio {:#x}, dirty {} B @ {} B/s",
        info.ram_bytes >> 20,
        info.tsc_khz,
        info.mac,
        Ipv4Address::from(info.ipv4),
        info.prefix_len,
        Ipv4Address::from(info.gateway),
        Ipv6Address::from(info.ipv6),
        info.ipv6_prefix_len,
        info.mmio_base,
        info.dirty_bytes,
        info.dirty_rate
    );
    info
}

/// The virtio-net device and the smoltcp interface on it, with the address and default route of `info`.
fn bring_up_network(info: &BootInfo, clock: &Clock) -> (NetDevice, Interface, EthernetAddress) {
    let mut device = NetDevice::new(info.mmio_base, info.mmio_size, info.mac);
    // PVH without mac= on the command line: the device's own MAC.
    let mac = EthernetAddress(if info.mac == [0; 6] {
        device.mac()
    } else {
        info.mac
    });
    let mut config = Config::new(HardwareAddress::Ethernet(mac));
    config.random_seed = arch::rdtsc();
    let mut iface = Interface::new(config, &mut device, clock.now());
    let ip = Ipv4Address::from(info.ipv4);
    let [link_local, global] = ipv6_addresses(info, mac);
    iface.update_ip_addrs(|addrs| {
        let _full = addrs.push(IpCidr::Ipv4(Ipv4Cidr::new(ip, info.prefix_len)));
        if let Some(a) = link_local {
            let _full = addrs.push(IpCidr::Ipv6(Ipv6Cidr::new(Ipv6Address::from(a), 64)));
        }
        if let Some(a) = global {
            let _full = addrs.push(IpCidr::Ipv6(Ipv6Cidr::new(
                Ipv6Address::from(a),
                info.ipv6_prefix_len,
            )));
        }
    });
    if info.gateway != [0; 4] {
        let _replaced = iface
            .routes_mut()
            .add_default_ipv4_route(Ipv4Address::from(info.gateway));
    }
    (device, iface, mac)
}

/// The guest's IPv6 addresses: the link-local one from its MAC, and the one the VMM gave it (if any).
fn ipv6_addresses(info: &BootInfo, mac: EthernetAddress) -> [Option<[u8; 16]>; 2] {
    [
        Some(guest_abi::link_local_ipv6(mac.0)),
        (info.ipv6 != [0; 16]).then_some(info.ipv6),
    ]
}

/// The `BootInfo` mailbox: the VMM bumps `garp_request` (after a migration) to ask for the self-announce.
struct Mailbox {
    boot_info: *mut BootInfo,
    garp_done: u32,
    mac: EthernetAddress,
    ipv4: [u8; 4],
    ipv6: [Option<[u8; 16]>; 2],
}

impl Mailbox {
    /// Sends a gratuitous ARP and an unsolicited neighbor advertisement (override) per IPv6 address if the VMM
    /// asked since the last time, and says so in `garp_done` and a mark.
    fn answer_garp_request(&mut self, device: &mut NetDevice) {
        // SAFETY: BootInfo stays mapped for the guest's lifetime; the VMM writes the field at any time.
        let garp_request = unsafe { (&raw const (*self.boot_info).garp_request).read_volatile() };
        if garp_request == self.garp_done {
            return;
        }
        device.send_raw(&guest::frames::gratuitous_arp(self.mac.0, self.ipv4));
        for a in self.ipv6.into_iter().flatten() {
            device.send_raw(&guest::frames::unsolicited_neighbor_advert(self.mac.0, a));
        }
        self.garp_done = garp_request;
        // SAFETY: as above; the guest owns garp_done.
        unsafe { (&raw mut (*self.boot_info).garp_done).write_volatile(garp_request) };
        arch::outl(PORT_MARK, GuestMark::GarpSent as u32);
        log!(
            "guest: gratuitous ARP and {} neighbor advertisement(s) sent (request {garp_request})",
            self.ipv6.iter().flatten().count()
        );
    }
}

/// The periodic stats line: at most every [`LOG_EVERY_US`], and only when something changed.
struct StatsLog {
    logged: (services::Stats, u64),
    last_log_us: u64,
    /// Idle waits so far.
    sleeps: u64,
}

impl StatsLog {
    fn new(stats: services::Stats, now_us: u64) -> Self {
        Self {
            logged: (stats, 0),
            last_log_us: now_us,
            sleeps: 0,
        }
    }

    fn log_if_changed(&mut self, now_us: u64, services: &Services, dirtier: &Dirtier, device: &NetDevice) {
        let stats = services.stats();
        if (stats, dirtier.passes()) == self.logged || now_us.saturating_sub(self.last_log_us) < LOG_EVERY_US
        {
            return;
        }
        let net = device.counters();
        log!(
            "guest: connections active {} opened {} closed {} listening {} (pool full {}, bad requests {}); \
             frames rx {} tx {}; sleeps {}; dirtier passes {}",
            stats.active,
            stats.opened,
            stats.closed,
            stats.listening,
            stats.pool_full,
            stats.bad_requests,
            net.rx_frames,
            net.tx_frames,
            self.sleeps,
            dirtier.passes()
        );
        self.logged = (stats, dirtier.passes());
        self.last_log_us = now_us;
    }
}

/// How long the guest may sleep from `now`: until the earliest deadline, at most [`MAX_SLEEP_US`].
fn sleep_budget(now: Instant, deadlines: [Option<Instant>; 3]) -> u64 {
    deadlines.into_iter().flatten().min().map_or(MAX_SLEEP_US, |d| {
        (d.total_micros() - now.total_micros()).clamp(0, MAX_SLEEP_US as i64) as u64
    })
}

/// Waits up to `sleep_us` in the way the platform wants (see [`pvh::idle_mode`]).
fn sleep(idle: Idle, now_us: u64, sleep_us: u64, clock: &Clock, device: &NetDevice) {
    match idle {
        Idle::SleepPort => {
            cpu::out32_then_halt(PORT_SLEEP_US, sleep_us as u32);
        }
        // Under QEMU: the 1 kHz tick or the NIC's interrupt ends the wait.
        Idle::Interrupt => cpu::wait_for_interrupt(),
        Idle::Poll => {
            let until = now_us + sleep_us;
            'spin: while clock.now_us() < until {
                for _ in 0..256 {
                    if device.rx_pending() {
                        break 'spin;
                    }
                    core::hint::spin_loop();
                }
            }
        }
    }
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    log!("guest: panic: {info}");
    arch::outl(PORT_EXIT, 1);
    loop {
        cpu::halt();
    }
}
