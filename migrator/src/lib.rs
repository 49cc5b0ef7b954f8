//! migrator: a small KVM VMM with pre-copy live and quick migration.

pub mod protocol;
pub mod ram;
