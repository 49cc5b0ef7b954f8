//! The migmon testbed: network namespaces, veths, bridges and taps as RAII guards ([`net`]), the two-host topology
//! of `./x testbed` and `./x demo` ([`topology`]), a TCP client load generator with socket profiles ([`clients`]),
//! loopback connection churn for the probes' load tests ([`churn`]),
//! and the demo's scenario, live against quick migration on the same guest and clients ([`scenario`]).
//!
//! Used by the privileged tests (package `integration-tests`), by `./x testbed`/`./x demo`, and by the benchmarks.
//! Everything it creates stays inside namespaces it names with a prefix, and is removed by guards or by
//! [`topology::Topology::down`]. See docs/testbed.md.

pub mod churn;
pub mod clients;
pub mod guest;
pub mod net;
pub mod scenario;
pub mod topology;
