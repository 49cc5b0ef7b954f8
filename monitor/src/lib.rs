//! migmon: watches VM migrations and tells, for every TCP session, whether it survived and why not.
//!
//! This crate holds what touches the running system: the eBPF probes ([`probes`], every aya call), the ring-buffer
//! decoder ([`decode`]), the live sources of pause windows ([`pause`]: migrator events, QMP), the event
//! [`pipeline`] with its [`output`], the live gate ([`live`]), the metrics endpoint and the CLI. What a trace means
//! (correlation, reports, check, what-if, exports) is the `migmon-analysis` crate.
//!
//! See `docs/architecture.md` for the crate map and the event flow.

pub mod btf;
pub mod cli;
pub mod clocks;
pub mod decode;
pub mod ebpf_log;
pub mod live;
pub mod metrics;
pub mod netns;
pub mod output;
pub mod pause;
pub mod pipeline;
pub mod ports;
pub mod probes;
pub mod record_dir;
pub mod rtnl;
pub mod skipped;
pub mod tracefs;
pub mod watch;
