//! Hardware-independent parts of the migmon guest: the service protocols, pacing, the connection pool and frame
//! builders. They compile for the host as well, so their unit tests run with `cargo test -p guest --lib`; the
//! binary (`main.rs`) adds the machine: entry, serial, heap, virtio-net, the dirtier and the idle loop.
#![no_std]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod cmdline;
pub mod frames;
pub mod pace;
pub mod proto;
pub mod services;
