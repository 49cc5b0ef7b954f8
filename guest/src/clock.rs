//! Time from the TSC: `rdtsc` scaled by the TSC frequency the VMM measured (`BootInfo::tsc_khz`).
//!
//! The VMM migrates the TSC with the vCPU, so time continues across a migration.

use smoltcp::time::Instant;

use crate::arch;

/// Converts TSC ticks to time.
pub struct Clock {
    tsc_khz: u64,
}

impl Clock {
    /// A clock for a TSC running at `tsc_khz` (0 is taken as 1 GHz, rather than dividing by zero).
    pub fn new(tsc_khz: u64) -> Self {
        Self {
            tsc_khz: if tsc_khz == 0 { 1_000_000 } else { tsc_khz },
        }
    }

    /// Microseconds since the TSC started.
    pub fn now_us(&self) -> u64 {
        (u128::from(arch::rdtsc()) * 1000 / u128::from(self.tsc_khz)) as u64
    }

    /// The current time for smoltcp.
    pub fn now(&self) -> Instant {
        Instant::from_micros(self.now_us() as i64)
    }
}
