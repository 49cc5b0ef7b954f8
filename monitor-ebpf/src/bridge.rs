//! `bridge:br_fdb_update`: a MAC (re)learned on a bridge port, the switch-convergence instant of a migration.

use aya_ebpf::{
    EbpfContext, helpers::bpf_probe_read_kernel_str_bytes, macros::tracepoint, programs::TracePointContext,
};
use monitor_common::{CFG_FILTER_FDB, EventKind, FdbEvent, IFNAMSIZ, NO_FIELD};

use crate::{EVENTS, WATCH_MACS, config, count_lost, header};

#[tracepoint]
pub fn br_fdb_update(ctx: TracePointContext) -> u32 {
    let _ = emit(&ctx);
    0
}

/// Reads a `__data_loc char[]` field (u32: offset in the low 16 bits) into `dst`.
#[inline(always)]
fn data_loc_str(ctx: &TracePointContext, field: u16, dst: &mut [u8; IFNAMSIZ]) -> Result<(), i32> {
    // SAFETY: bpf_probe_read_kernel checks the address.
    let loc: u32 = unsafe { ctx.read_at(usize::from(field))? };
    let off = (loc & 0xffff) as usize;
    // SAFETY: the helper reads at most IFNAMSIZ bytes and checks the address.
    unsafe { bpf_probe_read_kernel_str_bytes(ctx.as_ptr().cast::<u8>().add(off), dst) }.map(|_| ())
}

fn emit(ctx: &TracePointContext) -> Result<(), i32> {
    let (br, dev, addr, vid) = (
        config!(fdb.br_dev),
        config!(fdb.dev),
        config!(fdb.addr),
        config!(fdb.vid),
    );
    if br == NO_FIELD || dev == NO_FIELD || addr == NO_FIELD || vid == NO_FIELD {
        return Err(-1);
    }
    // SAFETY: bpf_probe_read_kernel checks the address.
    let mac: [u8; 6] = unsafe { ctx.read_at(usize::from(addr))? };
    if config!(flags) & CFG_FILTER_FDB != 0 {
        let key8 = [mac[0], mac[1], mac[2], mac[3], mac[4], mac[5], 0, 0];
        // SAFETY: map lookup of a plain key; the value is not dereferenced.
        if unsafe { WATCH_MACS.get(&key8) }.is_none() {
            return Ok(());
        }
    }
    // SAFETY: as above.
    let vid: u16 = unsafe { ctx.read_at(usize::from(vid))? };
    let mut ev = FdbEvent {
        header: header(EventKind::FdbUpdate),
        br_dev: [0; IFNAMSIZ],
        dev: [0; IFNAMSIZ],
        mac,
        vid,
    };
    data_loc_str(ctx, br, &mut ev.br_dev)?;
    data_loc_str(ctx, dev, &mut ev.dev)?;
    if EVENTS.output(&ev, 0).is_err() {
        count_lost();
    }
    Ok(())
}
