//! migmon: watches VM migrations and tells, for every TCP session, whether it survived and why not.
//!
//! See `docs/architecture.md` for the event flow.

pub mod cli;
pub mod correlate;
pub mod pause;
pub mod trace;
pub mod watch;
