//! migrator: a small KVM VMM with pre-copy live and quick migration.
//!
//! The VMM core: [`vm::Vm`] (KVM, RAM, vCPU and I/O threads), [`memory`] (memslots and dirty tracking), [`boot`]
//! (ELF, page tables, GDT, `BootInfo`), [`vcpu`], [`bus`] (port and MMIO ranges mapped to devices), [`devices`]
//! (COM1, virtio-mmio, virtio-net), [`tap`], [`persist`] (the `Persist` trait alone) and [`vm_state`] (the
//! versioned [`vm_state::VmState`] of the whole VM). [`runner`] boots and runs a guest.
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
//!     ipv6: None,
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
//!
//! # Migration
//!
//! The engines work on two traits, [`engine::MigrationSource`] and [`engine::MigrationTarget`], and speak the
//! protocol of [`protocol`] over a [`transport`]: `tcp:HOST:PORT` with mutual TLS ([`tls`], `--tls-creds DIR` on
//! both ends, QEMU's `tls-creds-x509` layout) or, only when both ends say `--insecure`, plain; or `unix:PATH`
//! (plain, the socket mode 0600). The destination ([`accept`]) keeps listening through port scans, failed
//! handshakes, garbage and hellos over its limits (`--max-mem`), each logged and counted, until a source it
//! accepts arrives or `--idle-timeout` passes.
//!
//! ```text
//!  source (migrator run / receive)                 destination (migrator receive)
//!  ───────────────────────────────                 ──────────────────────────────
//!  connect ── Hello{version, mode, RAM layout, MAC, id, config} ──►  create VM for restore
//!          ◄────────────────────────────────────── HelloAck
//!  start dirty log; mincore (untouched = zero)
//!  round 0: every page (zero pages as flags) ─ Pages… RoundEnd ─►  write straight into guest RAM
//!          ◄────────────────────────────────────── RoundAck{0}    (every page of the round is in RAM)
//!  round n: pages dirtied since ───────────── Pages… RoundEnd ─►  write
//!          ◄────────────────────────────────────── RoundAck{n}
//!    … until the switch-over rule says pause …
//!  PAUSE vCPU                                                      (event pause)
//!  final dirty set ───────────────────────── Pages… RoundEnd ─►
//!  [--verify] RAM hash ─────────────────────── Verify ─────────►
//!  vCPU + device state ─────────────────────── State ──────────►
//!  frames the paused tap received ──────────── Frames ─────────►
//!  Complete{paused_ns, commit_within} ────────────────────────►  restore; [--verify] hash RAM, compare
//!          ◄────────────────────────────────────── Ready          (guest restored, still paused)
//!  COMMIT (point of no return) ── Commit ─────────────────────►
//!                                                                 RESUME vCPU                (event resume)
//!                                                                 deliver forwarded frames
//!                                                                 RARP #0, ask guest for GARP (announce 0)
//!          ◄────────────────────────────────────── Ack
//!  frames still arriving ──────────────────── Frames, Close ───►  deliver; RARP #1..4 at 50/200/450/800 ms
//!  exit (event complete)
//! ```
//!
//! ## Never two running copies
//!
//! The guest runs on exactly one side at every step, or on none with the operator told where it is:
//!
//! | what fails | source | destination |
//! |---|---|---|
//! | anything before the source sends `Commit` (stream, deadline, `Abort`, cancel) | resumes (rollback), announces its MAC again, sends `Abort` | drops its VM, exits non-zero |
//! | the stream, after the destination sent `Ready` and before `Commit` arrived | - | **in doubt**: keeps the restored guest paused |
//! | the stream or the `Ack`, after the source sent `Commit` | **in doubt**: keeps the guest paused | resumed if the commit arrived |
//! | no `Commit` within the source's `commit_within` + 1 s | (it has rolled back) | drops its VM |
//!
//! A side in doubt says so (`state: in_doubt` in `migrator status`, and a message naming the way out) and waits
//! for the operator, who checks the other side and runs `migrator resume --force --api SOCKET` on exactly one
//! (`migrator cancel` drops a side's copy). A destination without `--api` drops its copy and says so.
//!
//! ## The pause deadline
//!
//! From the vCPU stop, the destination must be `Ready` within `--max-pause`; otherwise the source rolls back. The
//! default, in live mode, is `max(10 × --downtime, 1 s)`: the downtime budget is an estimate, ten times it means a
//! stuck destination or link, not a slow one. Quick mode, whose pause is the whole copy, has none unless asked.
//! The source gives up at the deadline less what its own resume takes (a tenth of it, at most 50 ms), so the
//! guest runs again within `--max-pause`. Every write in the pause is bounded by the time left (socket write
//! timeouts set before each write), every read by the same; before the pause, a stream that makes no progress
//! for `--timeout` (at least 1 s, at most 30 s) ends the migration, and pre-copy that does not converge ends at `--timeout` as
//! `--on-timeout` says. After the commit the source waits 10 s for the `Ack`, then is in doubt.
//!
//! ## The switch-over rule (live mode)
//!
//! After round 0 and after every later round, the source reads the dirty log and estimates the pause that switching
//! over now would cost:
//!
//! ```text
//! expected_pause = remaining_bytes / bandwidth + state_time
//! remaining_bytes = dirty_pages × (4096 + 16) + state_bytes
//! ```
//!
//! - `bandwidth` is measured: the rate of the largest round of at least 1 MiB (the running average before one),
//!   from its first byte to the destination's `RoundAck`, so it includes the copy out of guest RAM, the socket
//!   buffers draining and the destination's writes into RAM: what the final round will really get. A round ends
//!   at its acknowledgement, not when its last write returns (which only fills socket buffers, megabytes of them:
//!   a pause begun then would first wait for them to drain). With `--max-bandwidth` it is the capped rate.
//! - `state_bytes` and `state_time` (save, send, restore, resume and ack after the last page) are those measured in
//!   this process's previous migration, or 64 KiB and 1 ms before there was one.
//!
//! `--verify` is a check, not part of the move: its hashing (of every resident page, at both ends) lengthens the
//! pause but is not counted against `--downtime`; the summary reports it as `hash_ms`.
//!
//! If `expected_pause ≤ --downtime`, the pause fits the budget; the source still sends one more round when that is
//! predicted to make the pause clearly shorter. The prediction uses the guest's measured dirty rate (the dirty set
//! over the time since the log was last read) and the last round's fixed cost (its time beyond its bytes at the
//! measured bandwidth):
//!
//! ```text
//! next_dirty = dirty_rate × (dirty_pages × (4096 + 16) / bandwidth + round_overhead)
//! ```
//!
//! One more round is sent while `next_dirty ≤ ¾ × dirty_pages`, the set is larger than 64 pages, and at most 8
//! such extra rounds were sent. A dirtier slower than the link leaves a dirty set that shrinks geometrically round
//! after round, so the pause ends up near the floor of what it writes during one short round, not just under the
//! budget; a round that cannot shrink the set (a dirtier as fast as the link, or a round's fixed cost as long as
//! the dirtier needs to refill the set) is not sent. Then the source pauses and sends the final set. Otherwise (the estimate does not fit)
//! it sends the dirty set as the next round and repeats. When `--timeout` has passed since setup and the estimate still does not fit,
//! `--on-timeout force` pauses anyway (the report says `forced` with the expected pause) and `--on-timeout abort`
//! gives up while the guest keeps running at the source.
//!
//! The pause reported is measured at the source, from the vCPU stop to the arrival of the ack; the destination's
//! events carry the exact resume instant for the monitor.

pub mod accept;
pub mod announce;
pub mod api;
pub mod boot;
pub mod bus;
pub mod config;
pub mod devices;
pub mod engine;
pub mod memory;
pub mod persist;
pub mod poll;
pub mod protocol;
pub mod ram;
pub mod ram_io;
pub mod receive;
pub mod runner;
pub mod service;
pub mod source;
pub mod tap;
pub mod tls;
pub mod transport;
pub mod vcpu;
pub mod vm;
pub mod vm_migration;
pub mod vm_state;

#[cfg(test)]
mod engine_tests;
#[cfg(test)]
mod fuzz;
