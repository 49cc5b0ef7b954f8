//! Booting the guest: ELF loading, the identity map, the GDT, [`BootInfo`] and the long-mode entry registers.
//!
//! The register set is the one verified on this machine's software KVM (see `REFERENCE.md` §3): the guest is
//! entered directly in 64-bit mode with paging on, through `KVM_SET_SREGS`. Nothing here is PVM specific; the same
//! state boots on hardware KVM.
//!
//! Page tables: the PML4 at [`PML4_ADDR`], the PDPT in the next page, then one page directory per GiB of
//! guest-physical space, each of 512 entries `addr | present | writable | user | 2 MiB`. The map covers RAM and the
//! virtio-mmio window (so at least 4 GiB). The first four page directories sit right after the PDPT, ending below
//! [`BOOT_INFO_ADDR`]; a guest with RAM above 4 GiB gets the others from `0x8000` on.

use guest_abi::{
    BOOT_INFO_ADDR, BOOT_MAGIC, BOOT_VERSION, BootInfo, GDT_ADDR, IMAGE_ADDR, KERNEL_CS, KERNEL_DS,
    MMIO_BASE, MMIO_SIZE, PML4_ADDR,
};
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use crate::{memory::GuestMemoryMmap, ram::RamRegion};

/// The flat GDT: null, 64-bit code ([`KERNEL_CS`]), data ([`KERNEL_DS`]), then the DPL 3 user data and 64-bit user
/// code segments ([`guest_abi::USER_DS`], [`guest_abi::USER_CS`]) a guest may drop to.
pub const GDT: [u64; 5] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x00cf_f300_0000_ffff,
    0x00af_fb00_0000_ffff,
];

const PTE_PRESENT: u64 = 1;
const PTE_WRITABLE: u64 = 1 << 1;
/// User-accessible: a guest at CPL 3 reaches all of its memory (see the guest-abi crate on privilege levels).
const PTE_USER: u64 = 1 << 2;
const PTE_PWT: u64 = 1 << 3;
const PTE_PCD: u64 = 1 << 4;
const PTE_HUGE: u64 = 1 << 7;
const GIB: u64 = 1 << 30;
const TWO_MIB: u64 = 2 << 20;
/// Where the page directories for guest-physical space above 4 GiB start.
const HIGH_PD_ADDR: u64 = 0x8000;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Errors loading the guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("the guest image is not a 64-bit little-endian x86-64 ELF executable")]
    NotElf,
    #[error("the guest ELF is truncated or its {what} lies outside the file")]
    Truncated { what: &'static str },
    #[error("guest ELF segment at {addr:#x} (+{len:#x}) does not fit in RAM above {IMAGE_ADDR:#x}")]
    SegmentOutOfRam { addr: u64, len: u64 },
    #[error("the guest ELF entry point {0:#x} is not inside a loaded segment")]
    BadEntry(u64),
    #[error("the guest ELF has no loadable segment")]
    NoSegments,
    #[error("cannot write {what} into guest memory")]
    WriteMemory {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// One `PT_LOAD` segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub paddr: u64,
    pub file_offset: u64,
    pub file_size: u64,
    pub mem_size: u64,
}

/// A parsed, checked ELF image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElfImage {
    pub entry: u64,
    pub segments: Vec<Segment>,
}

fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Parses an ELF64 executable and checks that its `PT_LOAD` segments lie in `[IMAGE_ADDR, ram_top)`.
///
/// Only `PT_LOAD` segments are used; they are loaded at their physical address (the guest is identity mapped).
pub fn parse_elf(elf: &[u8], ram_top: u64) -> Result<ElfImage, BootError> {
    const PT_LOAD: u32 = 1;
    const EM_X86_64: u16 = 62;
    if elf.get(..4) != Some(b"\x7fELF".as_slice()) || elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err(BootError::NotElf);
    }
    let header = |what| BootError::Truncated { what };
    if le_u16(elf, 18).ok_or(header("header"))? != EM_X86_64 {
        return Err(BootError::NotElf);
    }
    let entry = le_u64(elf, 24).ok_or(header("header"))?;
    let phoff = le_u64(elf, 32).ok_or(header("header"))?;
    let phentsize = u64::from(le_u16(elf, 54).ok_or(header("header"))?);
    let phnum = u64::from(le_u16(elf, 56).ok_or(header("header"))?);
    if phentsize < 56 {
        return Err(header("program header table"));
    }
    let mut segments = Vec::new();
    for i in 0..phnum {
        let at = phoff
            .checked_add(i * phentsize)
            .and_then(|a| usize::try_from(a).ok())
            .ok_or(header("program header table"))?;
        let field32 = |off| le_u32(elf, at + off).ok_or(header("program header table"));
        let field64 = |off| le_u64(elf, at + off).ok_or(header("program header table"));
        if field32(0)? != PT_LOAD {
            continue;
        }
        let seg = Segment {
            file_offset: field64(8)?,
            paddr: field64(24)?,
            file_size: field64(32)?,
            mem_size: field64(40)?,
        };
        if seg.mem_size == 0 {
            continue;
        }
        let file_end = seg.file_offset.checked_add(seg.file_size);
        if seg.file_size > seg.mem_size || file_end.is_none_or(|e| e > elf.len() as u64) {
            return Err(header("segment data"));
        }
        let end = seg.paddr.checked_add(seg.mem_size);
        if seg.paddr < IMAGE_ADDR || end.is_none_or(|e| e > ram_top) {
            return Err(BootError::SegmentOutOfRam {
                addr: seg.paddr,
                len: seg.mem_size,
            });
        }
        segments.push(seg);
    }
    if segments.is_empty() {
        return Err(BootError::NoSegments);
    }
    if !segments
        .iter()
        .any(|s| entry >= s.paddr && entry < s.paddr + s.mem_size)
    {
        return Err(BootError::BadEntry(entry));
    }
    Ok(ElfImage { entry, segments })
}

/// Loads a checked image into guest memory and returns its entry point.
pub fn load_elf(mem: &GuestMemoryMmap, elf: &[u8], image: &ElfImage) -> Result<u64, BootError> {
    for seg in &image.segments {
        let start = seg.file_offset as usize;
        let data = elf
            .get(start..start + seg.file_size as usize)
            .ok_or(BootError::Truncated { what: "segment data" })?;
        let write = |source| BootError::WriteMemory {
            what: "a guest ELF segment",
            source,
        };
        mem.write_slice(data, GuestAddress(seg.paddr)).map_err(write)?;
        let bss = vec![0u8; (seg.mem_size - seg.file_size) as usize];
        mem.write_slice(&bss, GuestAddress(seg.paddr + seg.file_size))
            .map_err(write)?;
    }
    Ok(image.entry)
}

/// Address of the page directory that maps GiB `gib` of guest-physical space.
pub fn page_directory_addr(gib: u64) -> u64 {
    if gib < 4 {
        PML4_ADDR + 0x2000 + gib * 0x1000
    } else {
        HIGH_PD_ADDR + (gib - 4) * 0x1000
    }
}

/// The identity map for `regions` plus the MMIO window: `(guest address, 512 entries)` per table page.
pub fn page_tables(regions: &[RamRegion]) -> Vec<(u64, Vec<u64>)> {
    let top = regions
        .iter()
        .map(|r| r.gpa + r.size)
        .chain([MMIO_BASE + MMIO_SIZE])
        .max()
        .unwrap_or(0);
    let gibs = top.div_ceil(GIB);
    let pdpt_addr = PML4_ADDR + 0x1000;
    let mut pml4 = vec![0u64; 512];
    pml4[0] = pdpt_addr | PTE_PRESENT | PTE_WRITABLE | PTE_USER;
    let mut pdpt = vec![0u64; 512];
    let mut tables = vec![(PML4_ADDR, pml4)];
    let mut pds = Vec::new();
    for gib in 0..gibs {
        let pd_addr = page_directory_addr(gib);
        pdpt[gib as usize] = pd_addr | PTE_PRESENT | PTE_WRITABLE | PTE_USER;
        let pd = (0..512u64)
            .map(|i| {
                let addr = gib * GIB + i * TWO_MIB;
                let mmio = addr < MMIO_BASE + MMIO_SIZE && addr + TWO_MIB > MMIO_BASE;
                let cache = if mmio { PTE_PCD | PTE_PWT } else { 0 };
                addr | PTE_PRESENT | PTE_WRITABLE | PTE_USER | PTE_HUGE | cache
            })
            .collect();
        pds.push((pd_addr, pd));
    }
    tables.push((pdpt_addr, pdpt));
    tables.extend(pds);
    tables
}

/// The boot-time settings the guest reads from [`BootInfo`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootParams {
    pub ram_bytes: u64,
    pub tsc_khz: u64,
    pub mac: [u8; 6],
    pub ipv4: [u8; 4],
    pub prefix_len: u8,
    pub gateway: [u8; 4],
    /// `::` for none.
    pub ipv6: [u8; 16],
    pub ipv6_prefix_len: u8,
    pub dirty_bytes: u64,
    pub dirty_rate: u64,
}

/// The [`BootInfo`] for `params`.
pub fn boot_info(p: &BootParams) -> BootInfo {
    BootInfo {
        magic: BOOT_MAGIC,
        version: BOOT_VERSION,
        pad0: 0,
        ram_bytes: p.ram_bytes,
        tsc_khz: p.tsc_khz,
        mmio_base: MMIO_BASE,
        mmio_size: MMIO_SIZE,
        mac: p.mac,
        prefix_len: p.prefix_len,
        pad1: 0,
        ipv4: p.ipv4,
        gateway: p.gateway,
        dirty_bytes: p.dirty_bytes,
        dirty_rate: p.dirty_rate,
        garp_request: 0,
        garp_done: 0,
        ipv6: p.ipv6,
        ipv6_prefix_len: p.ipv6_prefix_len,
        pad2: [0; 7],
    }
}

/// The bytes of a [`BootInfo`] as the guest sees them.
pub fn boot_info_bytes(info: &BootInfo) -> [u8; size_of::<BootInfo>()] {
    let mut out = [0u8; size_of::<BootInfo>()];
    // SAFETY: `BootInfo` is `#[repr(C)]` plain data whose fields add up to its size (asserted in guest-abi), so it
    // has no uninitialised padding; we copy exactly `size_of::<BootInfo>()` bytes into a buffer of that size.
    unsafe {
        std::ptr::copy_nonoverlapping(std::ptr::from_ref(info).cast::<u8>(), out.as_mut_ptr(), out.len());
    }
    out
}

/// Byte offset of `BootInfo::garp_request` (the VMM's mailbox word).
pub const GARP_REQUEST_OFFSET: u64 = std::mem::offset_of!(BootInfo, garp_request) as u64;

/// Writes the GDT, the page tables and [`BootInfo`] into guest memory.
pub fn write_boot_structures(
    mem: &GuestMemoryMmap,
    regions: &[RamRegion],
    info: &BootInfo,
) -> Result<(), BootError> {
    let write = |what| move |source| BootError::WriteMemory { what, source };
    for (i, entry) in GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(write("the GDT"))?;
    }
    for (addr, table) in page_tables(regions) {
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_le_bytes()).collect();
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(write("the page tables"))?;
    }
    mem.write_slice(&boot_info_bytes(info), GuestAddress(BOOT_INFO_ADDR))
        .map_err(write("the boot info"))?;
    Ok(())
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Sets the long-mode system registers on top of the vCPU's reset state.
pub fn set_long_mode_sregs(sregs: &mut kvm_sregs) {
    sregs.cs = segment(KERNEL_CS, 11, true);
    let data = segment(KERNEL_DS, 3, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (size_of_val(&GDT) - 1) as u16;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE;
    sregs.cr0 = CR0_PG | CR0_ET | CR0_PE;
    sregs.efer = EFER_LME | EFER_LMA;
}

/// The general registers at entry: `rip` = the ELF entry, `rdi` = [`BOOT_INFO_ADDR`]. The guest sets its own stack.
pub fn entry_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rdi: BOOT_INFO_ADDR,
        rflags: 0x2,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf_with(segments: &[(u64, &[u8], u64)], entry: u64) -> Vec<u8> {
        let phoff = 64u64;
        let data_start = phoff + 56 * segments.len() as u64;
        let mut out = vec![0u8; data_start as usize];
        out[..4].copy_from_slice(b"\x7fELF");
        out[4] = 2;
        out[5] = 1;
        out[6] = 1;
        out[16..18].copy_from_slice(&2u16.to_le_bytes());
        out[18..20].copy_from_slice(&62u16.to_le_bytes());
        out[24..32].copy_from_slice(&entry.to_le_bytes());
        out[32..40].copy_from_slice(&phoff.to_le_bytes());
        out[54..56].copy_from_slice(&56u16.to_le_bytes());
        out[56..58].copy_from_slice(&(segments.len() as u16).to_le_bytes());
        let mut offset = data_start;
        for (i, (paddr, data, memsz)) in segments.iter().enumerate() {
            let ph = (phoff + 56 * i as u64) as usize;
            out[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
            out[ph + 8..ph + 16].copy_from_slice(&offset.to_le_bytes());
            out[ph + 16..ph + 24].copy_from_slice(&paddr.to_le_bytes());
            out[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
            out[ph + 32..ph + 40].copy_from_slice(&(data.len() as u64).to_le_bytes());
            out[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes());
            offset += data.len() as u64;
        }
        for (_, data, _) in segments {
            out.extend_from_slice(data);
        }
        out
    }

    #[test]
    fn loads_segments_and_zeroes_bss() {
        let elf = elf_with(
            &[(IMAGE_ADDR, b"code", 16), (IMAGE_ADDR + 0x1000, b"data", 4)],
            IMAGE_ADDR,
        );
        let image = parse_elf(&elf, 16 << 20).unwrap();
        assert_eq!(image.entry, IMAGE_ADDR);
        assert_eq!(image.segments.len(), 2);
        let mem = crate::memory::Memory::new(16 << 20).unwrap();
        let gm = mem.guest_memory();
        gm.write_slice(&[0xffu8; 16], GuestAddress(IMAGE_ADDR)).unwrap();
        assert_eq!(load_elf(gm, &elf, &image).unwrap(), IMAGE_ADDR);
        let mut buf = [0u8; 16];
        gm.read_slice(&mut buf, GuestAddress(IMAGE_ADDR)).unwrap();
        assert_eq!(&buf[..4], b"code");
        assert_eq!(&buf[4..], &[0u8; 12]);
        let mut buf = [0u8; 4];
        gm.read_slice(&mut buf, GuestAddress(IMAGE_ADDR + 0x1000))
            .unwrap();
        assert_eq!(&buf, b"data");
    }

    #[test]
    fn rejects_bad_images() {
        assert!(matches!(parse_elf(b"nope", 1 << 30), Err(BootError::NotElf)));
        let good = elf_with(&[(IMAGE_ADDR, b"code", 4)], IMAGE_ADDR);
        for cut in [10, 40, 70, good.len() - 1] {
            assert!(parse_elf(&good[..cut], 1 << 30).is_err(), "cut at {cut}");
        }
        let low = elf_with(&[(0x1000, b"code", 4)], 0x1000);
        assert!(matches!(
            parse_elf(&low, 1 << 30),
            Err(BootError::SegmentOutOfRam { .. })
        ));
        let high = elf_with(&[(IMAGE_ADDR, b"code", 32 << 20)], IMAGE_ADDR);
        assert!(matches!(
            parse_elf(&high, 16 << 20),
            Err(BootError::SegmentOutOfRam { .. })
        ));
        let entry = elf_with(&[(IMAGE_ADDR, b"code", 4)], 0x10);
        assert!(matches!(
            parse_elf(&entry, 1 << 30),
            Err(BootError::BadEntry(0x10))
        ));
        let wrap = elf_with(&[(u64::MAX - 2, b"code", 4)], u64::MAX - 2);
        assert!(parse_elf(&wrap, 1 << 30).is_err());
    }

    #[test]
    fn identity_map_covers_ram_and_mmio() {
        let regions = crate::memory::ram_regions(256 << 20).unwrap();
        let tables = page_tables(&regions);
        // PML4, PDPT, 4 page directories (the MMIO window is in GiB 3).
        assert_eq!(tables.len(), 6);
        assert_eq!(tables[0].0, PML4_ADDR);
        assert_eq!(tables[0].1[0], (PML4_ADDR + 0x1000) | 7);
        let pdpt = &tables[1].1;
        for (gib, entry) in pdpt.iter().enumerate().take(4) {
            assert_eq!(*entry, page_directory_addr(gib as u64) | 7);
        }
        assert_eq!(pdpt[4], 0);
        assert_eq!(tables[2].1[0], 0x87);
        assert_eq!(tables[2].1[1], TWO_MIB | 0x87);
        let mmio_pd = &tables[5].1;
        let idx = ((MMIO_BASE % GIB) / TWO_MIB) as usize;
        assert_eq!(mmio_pd[idx], MMIO_BASE | 0x87 | PTE_PCD | PTE_PWT);
        // Every table lies below BootInfo or from 0x8000, never on it.
        for (addr, _) in &tables {
            assert!(*addr + 0x1000 <= BOOT_INFO_ADDR || *addr >= HIGH_PD_ADDR);
        }

        let big = crate::memory::ram_regions(6 << 30).unwrap();
        let tables = page_tables(&big);
        let top = HIGH_RAM_TOP_6G;
        assert_eq!(tables.len() as u64, 2 + top.div_ceil(GIB));
        assert_eq!(
            tables.last().unwrap().0,
            HIGH_PD_ADDR + (top.div_ceil(GIB) - 5) * 0x1000
        );
    }
    const HIGH_RAM_TOP_6G: u64 = (1 << 32) + (6 << 30) - MMIO_BASE;

    #[test]
    fn gdt_selectors_match_the_abi() {
        let dpl = |e: u64| (e >> 45) & 3;
        let long = |e: u64| (e >> 53) & 1;
        let code = |e: u64| (e >> 43) & 1;
        let k_cs = GDT[usize::from(KERNEL_CS >> 3)];
        let k_ds = GDT[usize::from(KERNEL_DS >> 3)];
        let u_cs = GDT[usize::from(guest_abi::USER_CS >> 3)];
        let u_ds = GDT[usize::from(guest_abi::USER_DS >> 3)];
        assert_eq!((dpl(k_cs), long(k_cs), code(k_cs)), (0, 1, 1));
        assert_eq!((dpl(k_ds), code(k_ds)), (0, 0));
        assert_eq!((dpl(u_cs), long(u_cs), code(u_cs)), (3, 1, 1));
        assert_eq!((dpl(u_ds), code(u_ds)), (3, 0));
        assert_eq!(guest_abi::USER_CS & 3, 3);
        assert_eq!(guest_abi::USER_DS & 3, 3);
    }

    #[test]
    fn boot_info_bytes_match_layout() {
        let info = boot_info(&BootParams {
            ram_bytes: 256 << 20,
            tsc_khz: 2_000_000,
            mac: [2, 0, 0, 0, 0, 1],
            ipv4: [10, 0, 0, 2],
            prefix_len: 24,
            gateway: [0; 4],
            ipv6: [0; 16],
            ipv6_prefix_len: 0,
            dirty_bytes: 0,
            dirty_rate: 0,
        });
        let b = boot_info_bytes(&info);
        assert_eq!(&b[..8], b"MIGGUEST");
        assert_eq!(u64::from_le_bytes(b[16..24].try_into().unwrap()), 256 << 20);
        assert_eq!(&b[48..54], &[2, 0, 0, 0, 0, 1]);
        assert_eq!(b[54], 24);
        assert_eq!(&b[56..60], &[10, 0, 0, 2]);
        assert_eq!(GARP_REQUEST_OFFSET, 80);
    }
}
