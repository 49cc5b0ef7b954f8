//! The log: bytes written to the COM1 transmit register (`guest_abi::PORT_SERIAL`), one `out` each.

use core::fmt::{self, Write};

use guest_abi::PORT_SERIAL;

use crate::arch;

/// Programs a 16550 for 115200 8N1 (harmless for the VMM's write-only port; needed on QEMU).
pub fn init() {
    arch::outb(PORT_SERIAL + 1, 0x00); // no interrupts
    arch::outb(PORT_SERIAL + 3, 0x80); // DLAB
    arch::outb(PORT_SERIAL, 0x01); // divisor 1: 115200
    arch::outb(PORT_SERIAL + 1, 0x00);
    arch::outb(PORT_SERIAL + 3, 0x03); // 8N1
}

/// A writer to the serial port.
pub struct Serial;

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        arch::out_bytes(PORT_SERIAL, s.as_bytes());
        Ok(())
    }
}

/// Writes one formatted line to the serial port.
pub fn write_line(args: fmt::Arguments<'_>) {
    let _infallible = Serial.write_fmt(args);
    let _infallible = Serial.write_str("\n");
}

/// `log!("...", args)`: one line on the serial port.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => { $crate::serial::write_line(format_args!($($arg)*)) };
}
