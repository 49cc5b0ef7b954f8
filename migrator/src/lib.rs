//! migrator: a small KVM VMM with pre-copy live and quick migration.
//!
//! The VMM core: [`vm::Vm`] (KVM, RAM, vCPU and I/O threads), [`memory`] (memslots and dirty tracking), [`boot`]
//! (ELF, page tables, GDT, `BootInfo`), [`vcpu`], [`devices`] (COM1, virtio-mmio, virtio-net), [`tap`] and
//! [`state`] (`Persist` and the versioned [`state::VmState`]). [`runner`] is `migrator run`.
//!
//! ```no_run
//! use std::time::Duration;
//! use migrator::vm::{Vm, VmConfig, SerialOutput};
//!
//! let config = VmConfig {
//!     ram_bytes: 256 << 20,
//!     tap: "tap0".into(),
//!     mac: [0x02, 0, 0, 0, 0, 1],
//!     ipv4: "10.0.0.2".parse().unwrap(),
//!     prefix_len: 24,
//!     gateway: None,
//!     dirty_bytes: 0,
//!     dirty_rate: 0,
//!     serial: SerialOutput::Stderr { prefix: "guest: ".into() },
//! };
//! let mut vm = Vm::create(&config)?;
//! vm.start()?;
//! vm.wait_guest_mark(guest_abi::GuestMark::Ready, 1, Duration::from_secs(10))?;
//! vm.pause()?;
//! let state = vm.save_state()?;
//! let bytes = state.encode()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod boot;
pub mod devices;
pub mod memory;
pub mod protocol;
pub mod ram;
pub mod runner;
pub mod state;
pub mod tap;
pub mod vcpu;
pub mod vm;
