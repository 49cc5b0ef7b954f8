//! migmon: watches VM migrations and tells, for every TCP session, whether it survived and why not.
//!
//! See `docs/architecture.md` for the event flow.

pub mod btf;
pub mod cli;
pub mod events;
pub mod netns;
pub mod probes;
pub mod trace;
pub mod tracefs;
pub mod watch;
