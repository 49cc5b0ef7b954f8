//! The contract between the `migrator` VMM and the `guest`.
//!
//! Both sides compile this crate, so the memory map, the boot-info layout, the paravirtual ports and the
//! service protocols cannot drift. Everything here is plain data: `#[repr(C)]`, explicit padding, no `bool`.
//!
//! # Guest physical memory map
//!
//! ```text
//! 0x0000_0500  GDT (null, code64, data, user data, user code64)
//! 0x0000_1000  PML4, then PDPT, then page directories (identity map, 2 MiB pages)
//! 0x0000_7000  BootInfo (one page; the VMM writes it before entry, the mailbox part later too)
//! 0x0020_0000  guest image (ELF, loaded at its link address, `.bss` zeroed by the loader); stack and heap above it
//! MMIO_BASE    virtio-mmio net device (outside every memslot: accesses exit as KVM_EXIT_MMIO)
//! ```
//!
//! # Paravirtual ports
//!
//! The guest has no interrupts. It polls its virtqueues, and when it has nothing to do it tells the VMM how long it
//! may sleep ([`PORT_SLEEP_US`]) and executes `hlt`. The VMM re-enters the vCPU when the tap is readable, when the
//! deadline passes, or when it wants the guest to look at its mailbox. A guest running at CPL 3, where `hlt` faults,
//! writes [`PORT_IDLE`] instead: the same sleep, in one exit.
//!
//! # Privilege level
//!
//! The VMM enters the guest at CPL 0. The identity map is user-accessible and the GDT also holds user segments
//! ([`USER_CS`], [`USER_DS`]), so the guest may drop to CPL 3 with `iretq` (with IOPL 3 in the pushed `rflags`, so
//! `in`/`out`/`cli` keep working) and never come back. This matters on software KVM (`kvm_pvm`): it runs guest CPL 3
//! natively but emulates every CPL 0 instruction, measured about 2.5 µs per instruction against native speed at
//! CPL 3. On hardware KVM both run natively.
#![no_std]

/// Where the VMM writes [`BootInfo`].
pub const BOOT_INFO_ADDR: u64 = 0x7000;
/// Where the GDT lives.
pub const GDT_ADDR: u64 = 0x500;
/// Where the PML4 lives; the PDPT and page directories follow it page by page.
pub const PML4_ADDR: u64 = 0x1000;
/// The guest image's load (and link) address.
pub const IMAGE_ADDR: u64 = 0x20_0000;
/// The virtio-mmio window of the net device (one 4 KiB page).
pub const MMIO_BASE: u64 = 0xd000_0000;
/// Size of the virtio-mmio window.
pub const MMIO_SIZE: u64 = 0x1000;

/// COM1 transmit register: the guest writes log bytes here.
pub const PORT_SERIAL: u16 = 0x3f8;
/// The guest writes a `u32`: the most microseconds it may sleep before its next `hlt` ends (`u32::MAX` = no timer).
pub const PORT_SLEEP_US: u16 = 0x510;
/// The guest writes a `u32` status and stops for good: 0 = clean exit, anything else = panic.
pub const PORT_EXIT: u16 = 0x511;
/// The guest writes a `u32` [`GuestMark`] when it reaches a milestone (boot done, GARP sent ...).
pub const PORT_MARK: u16 = 0x512;
/// The guest writes a `u32`: sleep now, for at most that many microseconds (`u32::MAX` = until there is work).
/// `PORT_SLEEP_US` + `hlt` in one exit, for a guest at CPL 3. The write returns when the tap is readable, the time is
/// up, or the VMM wants the guest to look at its mailbox.
pub const PORT_IDLE: u16 = 0x513;

/// GDT selector of the flat 64-bit kernel code segment (the guest is entered with it).
pub const KERNEL_CS: u16 = 0x08;
/// GDT selector of the flat kernel data segment.
pub const KERNEL_DS: u16 = 0x10;
/// GDT selector (RPL 3) of the flat user data segment, DPL 3.
pub const USER_DS: u16 = 0x1b;
/// GDT selector (RPL 3) of the flat 64-bit user code segment, DPL 3.
pub const USER_CS: u16 = 0x23;

/// `BootInfo::magic`: "MIGGUEST".
pub const BOOT_MAGIC: u64 = u64::from_le_bytes(*b"MIGGUEST");
/// `BootInfo::version`. Bump on any layout change.
pub const BOOT_VERSION: u32 = 2;

/// Milestones the guest reports on [`PORT_MARK`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestMark {
    /// The network is up and the services listen.
    Ready = 1,
    /// A gratuitous ARP went out, in answer to a mailbox request.
    GarpSent = 2,
}

impl TryFrom<u32> for GuestMark {
    type Error = u32;
    fn try_from(v: u32) -> Result<Self, u32> {
        match v {
            1 => Ok(Self::Ready),
            2 => Ok(Self::GarpSent),
            other => Err(other),
        }
    }
}

/// What the VMM tells the guest at boot. Lives at [`BOOT_INFO_ADDR`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootInfo {
    /// [`BOOT_MAGIC`].
    pub magic: u64,
    /// [`BOOT_VERSION`].
    pub version: u32,
    pub pad0: u32,
    /// Guest RAM in bytes. RAM is `[0, min(ram, MMIO_BASE))`, then `[4 GiB, ...)` for the rest.
    pub ram_bytes: u64,
    /// TSC frequency in kHz, so the guest can keep time with `rdtsc`.
    pub tsc_khz: u64,
    /// The virtio-mmio net device.
    pub mmio_base: u64,
    pub mmio_size: u64,
    /// The VM's MAC address.
    pub mac: [u8; 6],
    /// IPv4 prefix length of `ipv4`.
    pub prefix_len: u8,
    pub pad1: u8,
    /// The VM's IPv4 address.
    pub ipv4: [u8; 4],
    /// Default gateway, or 0.0.0.0 for none.
    pub gateway: [u8; 4],
    /// Memory dirtier: bytes of working set to rewrite (0 = off).
    pub dirty_bytes: u64,
    /// Memory dirtier: bytes per second to rewrite.
    pub dirty_rate: u64,
    /// Mailbox, written by the VMM at any time: bump it to ask for the self-announce (a gratuitous ARP, and an
    /// unsolicited neighbor advertisement for each IPv6 address).
    pub garp_request: u32,
    /// Mailbox, written by the guest: the last `garp_request` it answered.
    pub garp_done: u32,
    /// The VM's global (or unique local) IPv6 address, or `::` for none. The guest always has a link-local address
    /// too, derived from its MAC.
    pub ipv6: [u8; 16],
    /// IPv6 prefix length of `ipv6`.
    pub ipv6_prefix_len: u8,
    pub pad2: [u8; 7],
}

const _: () = assert!(core::mem::size_of::<BootInfo>() == 112);
const _: () = assert!(core::mem::offset_of!(BootInfo, garp_request) == 80);
const _: () = assert!(core::mem::offset_of!(BootInfo, ipv6) == 88);

/// The modified EUI-64 link-local address (`fe80::/64`) of `mac`, as Linux and smoltcp derive it.
pub const fn link_local_ipv6(mac: [u8; 6]) -> [u8; 16] {
    [
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        mac[0] ^ 0x02,
        mac[1],
        mac[2],
        0xff,
        0xfe,
        mac[3],
        mac[4],
        mac[5],
    ]
}

/// TCP echo service.
pub const ECHO_PORT: u16 = 7;
/// Sequence-numbered stream service.
///
/// The client first sends a `u32` (big endian): records per second, 0 = as fast as the window allows. The guest then
/// sends [`STREAM_RECORD`]-byte records forever: record `n` is `n` as a big-endian `u64`, then `STREAM_RECORD - 8`
/// bytes each equal to `n as u8`. A client proves nothing was lost or reordered by checking `n` increases by one.
pub const STREAM_PORT: u16 = 5001;
/// Bytes per stream record.
pub const STREAM_RECORD: usize = 64;
/// Request/response service.
///
/// A request is 8 bytes: a big-endian `u32` sequence number, then a big-endian `u32` response length `len`
/// (at most [`RR_MAX_RESPONSE`]). The response is the same `u32` sequence number followed by `len` bytes, each equal
/// to the sequence number's low byte.
pub const RR_PORT: u16 = 5002;
/// Largest response the request/response service sends.
pub const RR_MAX_RESPONSE: u32 = 65536;
/// The guest serves at least this many TCP connections at once, over all services.
pub const MAX_CONNECTIONS: usize = 80;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_local_is_modified_eui64() {
        let ll = link_local_ipv6([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
        assert_eq!(
            core::net::Ipv6Addr::from(ll),
            "fe80::5054:ff:fe12:3456".parse::<core::net::Ipv6Addr>().unwrap()
        );
        // The universal/local bit flips both ways.
        let ll = link_local_ipv6([0x00, 0x11, 0x22, 0x33, 0x44, 0x55]);
        assert_eq!(&ll[8..], &[0x02, 0x11, 0x22, 0xff, 0xfe, 0x33, 0x44, 0x55]);
    }
}
