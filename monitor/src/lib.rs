//! migmon: watches VM migrations and tells, for every TCP session, whether it survived and why not.
//!
//! See `docs/architecture.md` for the event flow.

pub mod btf;
pub mod check;
pub mod cli;
pub mod correlate;
pub mod events;
pub mod export;
pub mod live;
pub mod metrics;
pub mod netns;
pub mod pause;
pub mod probes;
pub mod report;
pub mod trace;
pub mod tracefs;
pub mod watch;
pub mod whatif;
