//! A minimal COM1: the guest writes log bytes to THR; LSR always says the transmitter is empty.
//!
//! There is no receive path and no interrupt. Registers the guest may program (IER, LCR, MCR, SCR, the divisor)
//! keep their values, so a driver that reads back what it wrote sees it, and they are part of the saved state.

use std::io::Write;

use serde::{Deserialize, Serialize};

use crate::{bus::BusDevice, persist::Persist};

const DATA: u8 = 0;
const IER: u8 = 1;
const IIR: u8 = 2;
const LCR: u8 = 3;
const MCR: u8 = 4;
const LSR: u8 = 5;
const MSR: u8 = 6;
const SCR: u8 = 7;
const LCR_DLAB: u8 = 0x80;
/// THR empty and transmitter idle.
const LSR_IDLE: u8 = 0x60;
/// No interrupt pending.
const IIR_NONE: u8 = 0x01;
/// Carrier detect, data set ready, clear to send.
const MSR_READY: u8 = 0xb0;

/// Saved COM1 registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub ier: u8,
    pub lcr: u8,
    pub mcr: u8,
    pub scr: u8,
    pub dll: u8,
    pub dlm: u8,
}

/// Turns the guest's bytes into lines for a sink.
pub struct Serial {
    regs: SerialState,
    line: Vec<u8>,
    sink: Box<dyn Write + Send>,
}

impl std::fmt::Debug for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serial")
            .field("regs", &self.regs)
            .finish_non_exhaustive()
    }
}

impl Serial {
    /// A port whose output goes to `sink`, one line per write (a partial line is flushed on drop).
    pub fn new(sink: Box<dyn Write + Send>) -> Self {
        Self {
            regs: SerialState::default(),
            line: Vec::new(),
            sink,
        }
    }

    fn dlab(&self) -> bool {
        self.regs.lcr & LCR_DLAB != 0
    }

    fn flush_line(&mut self) {
        if self.line.is_empty() {
            return;
        }
        self.line.push(b'\n');
        // The log is best effort: a full disk or closed stderr must not stop the guest.
        if self.sink.write_all(&self.line).is_err() || self.sink.flush().is_err() {
            self.line.clear();
            return;
        }
        self.line.clear();
    }

    /// A guest `out` to `base + offset`.
    pub fn write_register(&mut self, offset: u8, value: u8) {
        match offset {
            DATA if self.dlab() => self.regs.dll = value,
            DATA => match value {
                b'\n' => self.flush_line(),
                b'\r' => {}
                _ => {
                    self.line.push(value);
                    if self.line.len() >= 4096 {
                        self.flush_line();
                    }
                }
            },
            IER if self.dlab() => self.regs.dlm = value,
            IER => self.regs.ier = value & 0x0f,
            LCR => self.regs.lcr = value,
            MCR => self.regs.mcr = value & 0x1f,
            SCR => self.regs.scr = value,
            _ => {}
        }
    }

    /// A guest `in` from `base + offset`.
    pub fn read_register(&self, offset: u8) -> u8 {
        match offset {
            DATA if self.dlab() => self.regs.dll,
            IER if self.dlab() => self.regs.dlm,
            IER => self.regs.ier,
            IIR => IIR_NONE,
            LCR => self.regs.lcr,
            MCR => self.regs.mcr,
            LSR => LSR_IDLE,
            MSR => MSR_READY,
            SCR => self.regs.scr,
            _ => 0,
        }
    }
}

/// On the port bus: one byte per access (wider accesses read the register in their low byte, zero above it).
impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = self.read_register(offset as u8);
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for &b in data {
            self.write_register(offset as u8, b);
        }
    }
}

impl Drop for Serial {
    fn drop(&mut self) {
        self.flush_line();
    }
}

impl Persist for Serial {
    type State = SerialState;
    type Error = std::convert::Infallible;

    fn save(&self) -> Result<SerialState, Self::Error> {
        Ok(self.regs)
    }

    fn restore(&mut self, state: &SerialState) -> Result<(), Self::Error> {
        self.regs = *state;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_registers_and_state() {
        let out = Shared::default();
        let mut s = Serial::new(Box::new(out.clone()));
        for b in b"hello\r\nwor" {
            s.write_register(0, *b);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hello\n");
        assert_eq!(s.read_register(LSR), LSR_IDLE);
        s.write_register(LCR, 0x83);
        s.write_register(DATA, 1);
        s.write_register(IER, 0);
        s.write_register(LCR, 0x03);
        s.write_register(SCR, 0x5a);
        let saved = s.save().unwrap();
        assert_eq!(saved.dll, 1);
        assert_eq!(saved.lcr, 3);
        let mut t = Serial::new(Box::new(std::io::sink()));
        t.restore(&saved).unwrap();
        assert_eq!(t.read_register(SCR), 0x5a);
        drop(s);
        assert_eq!(&*out.0.lock().unwrap(), b"hello\nwor\n");
    }
}
