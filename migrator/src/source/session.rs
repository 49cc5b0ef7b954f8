//! An open outgoing migration, shared by live and quick mode: connect and hello, page rounds, the paused tail (final
//! pages, hash, state, frames, complete), and the wait for the acknowledgement with frame forwarding.

use std::{
    io::{self, BufReader, Write},
    path::Path,
    time::{Duration, Instant},
};

use migevents::{Phase, Role};
use migmon_base::MacAddr;

use crate::{
    engine::{
        Events, MigrateOptions, MigrationError, MigrationSource, MigrationState, MigrationSummary, Tracker,
        mode_name, new_migration_id,
    },
    protocol::{HELLO_VERIFY, Hello, Message, MessageReader, MessageWriter, PageBatch, RoundEnd, VERSION},
    ram::{DirtyBitmap, PAGE_SIZE},
    ram_io::GuestRam,
    transport::Stream,
};

/// Bytes of page data per `Pages` message (one writev).
pub const BATCH_BYTES: usize = 4 << 20;
/// How long to wait for the destination to create its VM, and for its acknowledgement.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// A write blocked this long means the destination is stuck (`--timeout` when shorter).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Until a round of at least this size was measured, the bandwidth is the running average.
const MIN_MEASURED_ROUND: u64 = 1 << 20;
/// State-transfer time assumed before it was measured: save + send + restore of a small state blob.
pub const STATE_TIME_GUESS: Duration = Duration::from_millis(1);
/// State size assumed before it was measured.
pub const STATE_BYTES_GUESS: u64 = 64 << 10;

/// How long the source waits for the destination's `Ack` once it has committed. Past it the migration is in
/// doubt (the destination may or may not run the guest).
pub const ACK_AFTER_COMMIT: Duration = Duration::from_secs(10);

/// A stream whose writes can be bounded in time.
pub trait TimedWrite: Write {
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()>;
}

impl TimedWrite for Stream {
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        Stream::set_write_timeout(self, t)
    }
}

/// A token bucket in front of the stream, for `--max-bandwidth`, and the pause deadline: once set, no write
/// blocks past it.
pub struct Throttled<W> {
    inner: W,
    rate: Option<u64>,
    tokens: f64,
    last: Instant,
    deadline: Option<Instant>,
    stall: Duration,
}

impl<W: TimedWrite> Throttled<W> {
    /// `stall`: the longest a write may make no progress (outside the pause, where the deadline rules).
    pub fn new(inner: W, rate: Option<u64>, stall: Duration) -> Self {
        Self {
            inner,
            rate,
            tokens: 0.0,
            last: Instant::now(),
            deadline: None,
            stall,
        }
    }

    /// From now on every write ends by `deadline` (an error past it).
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
        if deadline.is_none() {
            let _ignored = self.inner.set_write_timeout(Some(self.stall));
        }
    }

    /// Bounds the next write by the deadline.
    fn arm(&mut self) -> io::Result<()> {
        let Some(d) = self.deadline else {
            return Ok(());
        };
        let left = d.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the pause deadline passed",
            ));
        }
        self.inner.set_write_timeout(Some(left.min(self.stall)))
    }

    /// The stream behind the throttle.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// Waits until `want` bytes may go (at most 1/20 s of burst), returns how many may.
    fn admit(&mut self, want: usize) -> usize {
        let Some(rate) = self.rate else {
            return want;
        };
        let rate = rate as f64;
        let burst = (rate / 20.0).max(PAGE_SIZE as f64);
        let chunk = (want as f64).min(burst);
        loop {
            let now = Instant::now();
            self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(burst);
            self.last = now;
            if self.tokens >= chunk {
                self.tokens -= chunk;
                return chunk as usize;
            }
            std::thread::sleep(Duration::from_secs_f64((chunk - self.tokens) / rate));
        }
    }
}

impl<W: TimedWrite> Write for Throttled<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.arm()?;
        let n = self.admit(buf.len());
        let written = self.inner.write(&buf[..n])?;
        // Give back the tokens of a short write.
        self.tokens += (n - written) as f64;
        Ok(written)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        if self.rate.is_some() {
            let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| &**b);
            return self.write(first);
        }
        self.arm()?;
        self.inner.write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Measured copy bandwidth.
#[derive(Clone, Copy, Debug, Default)]
pub struct Bandwidth {
    best_round: Option<(u64, f64)>,
    total_bytes: u64,
    total_secs: f64,
}

impl Bandwidth {
    pub fn record(&mut self, bytes: u64, secs: f64) {
        self.total_bytes += bytes;
        self.total_secs += secs;
        if bytes >= MIN_MEASURED_ROUND && self.best_round.is_none_or(|(b, _)| bytes >= b) && secs > 0.0 {
            self.best_round = Some((bytes, secs));
        }
    }

    /// Bytes per second: the largest round's rate once one of at least 1 MiB was measured, the running average
    /// before that, 1 GiB/s before anything was measured.
    pub fn rate(&self) -> u64 {
        if let Some((b, s)) = self.best_round {
            return (b as f64 / s) as u64;
        }
        if self.total_secs > 0.0 && self.total_bytes > 0 {
            return ((self.total_bytes as f64 / self.total_secs) as u64).max(1);
        }
        1 << 30
    }
}

/// Figures of one page round.
#[derive(Clone, Copy, Debug, Default)]
pub struct RoundStats {
    pub pages: u64,
    pub data_pages: u64,
    pub zero_pages: u64,
    pub bytes: u64,
    pub secs: f64,
}

/// An open outgoing migration.
pub struct Session {
    pub writer: MessageWriter<Throttled<Stream>>,
    pub reader: MessageReader<BufReader<Stream>>,
    pub ram: GuestRam,
    pub batch: PageBatch,
    pub events: Events,
    pub tracker: Tracker,
    pub report: MigrationSummary,
    pub bandwidth: Bandwidth,
    pub started: Instant,
    pub mac: [u8; 6],
    /// Frames sent to the destination before its ack: handed back to the guest on a rollback.
    pub forwarded: Vec<Vec<u8>>,
}

impl Session {
    /// Connects, sends the hello and waits for the destination to have created its VM.
    pub fn open<S: MigrationSource>(
        vm: &S,
        opts: &MigrateOptions,
        events_path: Option<&Path>,
        tracker: &Tracker,
    ) -> Result<Self, Box<(MigrationError, Option<Events>)>> {
        let id = vm.identity();
        let migration_id = new_migration_id();
        let mut events = Events::open(
            events_path,
            &migration_id,
            &MacAddr(id.mac).to_string(),
            Role::Source,
        );
        let ram = vm.guest_ram();
        let started = Instant::now();
        events.emit(Phase::Setup {
            mode: opts.mode,
            ram_bytes: ram.total_bytes(),
            ips: id.ips.clone(),
            host: id.host.clone(),
            // Frames that reach the source tap during the pause are delivered to the guest at resume.
            carries_frames: true,
        });
        tracker.update(|s| {
            *s = crate::engine::Status {
                state: MigrationState::Setup,
                migration_id: Some(migration_id.clone()),
                mode: Some(mode_name(opts.mode).into()),
                ..Default::default()
            };
        });
        let connect = || -> Result<(Stream, Stream), MigrationError> {
            crate::transport::check_security(&opts.to, opts.tls.is_some(), opts.insecure)?;
            let stream = Stream::connect_secure(&opts.to, opts.tls.as_ref(), HANDSHAKE_TIMEOUT)?;
            let io = |e| MigrationError::Protocol(crate::protocol::ProtocolError::Io(e));
            stream.set_write_timeout(Some(stall_timeout(opts))).map_err(io)?;
            stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(io)?;
            let rd = stream.try_clone().map_err(io)?;
            Ok((stream, rd))
        };
        let (stream, rd) = match connect() {
            Ok(s) => s,
            Err(e) => return Err(Box::new((e, Some(events)))),
        };
        let mut s = Self {
            writer: MessageWriter::new(Throttled::new(stream, opts.max_bandwidth, stall_timeout(opts))),
            reader: MessageReader::new(BufReader::with_capacity(64 << 10, rd)),
            batch: PageBatch::new(BATCH_BYTES),
            ram,
            events,
            tracker: tracker.clone(),
            report: MigrationSummary {
                migration_id: migration_id.clone(),
                mode: mode_name(opts.mode).into(),
                max_bandwidth: opts.max_bandwidth,
                ..Default::default()
            },
            bandwidth: Bandwidth::default(),
            started,
            mac: id.mac,
            forwarded: Vec::new(),
        };
        if let Some(rate) = opts.max_bandwidth {
            s.report.notes.push(format!(
                "bandwidth deliberately capped at {rate} B/s (--max-bandwidth)"
            ));
        }
        let hello = Hello {
            version: VERSION,
            mode: opts.mode,
            flags: if opts.verify { HELLO_VERIFY } else { 0 },
            regions: s.ram.regions(),
            mac: id.mac,
            migration_id,
            config: id.config,
        };
        let res = (|| {
            s.writer.send(&Message::Hello(hello))?;
            match s.reader.recv_message("waiting for the destination's hello ack")? {
                Message::HelloAck => Ok(()),
                Message::Abort(reason) => Err(MigrationError::DestinationAborted { reason }),
                other => Err(crate::protocol::ProtocolError::Unexpected {
                    got: other.command(),
                    during: "waiting for the hello ack",
                }
                .into()),
            }
        })();
        match res {
            Ok(()) => Ok(s),
            Err(e) => Err(Box::new((e, Some(s.events)))),
        }
    }

    /// Sends `pages` as round `round` on the stream (see [`write_round`]), with progress to the tracker.
    pub fn send_round(
        &mut self,
        round: u32,
        pages: impl Iterator<Item = u64>,
        total: u64,
        known_zero: Option<&DirtyBitmap>,
    ) -> Result<RoundStats, MigrationError> {
        let tracker = self.tracker.clone();
        let mut last_progress = Instant::now();
        let mut on_flush = |done: u64, sent: u64| {
            if last_progress.elapsed() >= Duration::from_millis(100) {
                last_progress = Instant::now();
                let left = total.saturating_sub(done) * PAGE_SIZE as u64;
                tracker.update(|s| {
                    s.bytes_sent = sent;
                    s.remaining_bytes = left;
                });
            }
        };
        let st = write_round(
            &mut self.writer,
            &mut self.batch,
            &self.ram,
            round,
            pages,
            known_zero,
            &mut on_flush,
        )?;
        self.report.data_pages += st.data_pages;
        self.report.zero_pages += st.zero_pages;
        Ok(st)
    }

    /// Sends the round-end marker and its event.
    pub fn end_round(&mut self, round: u32, st: &RoundStats) -> Result<(), MigrationError> {
        let bandwidth = if st.secs > 0.0 {
            (st.bytes as f64 / st.secs) as u64
        } else {
            0
        };
        self.writer.send(&Message::RoundEnd(RoundEnd {
            round,
            pages: st.pages,
            bytes: st.bytes,
            bandwidth,
        }))?;
        self.events.emit(Phase::Round {
            n: round,
            pages: st.pages,
            bytes: st.bytes,
            bandwidth,
        });
        Ok(())
    }

    /// Waits until the destination acknowledges round `round` (every page of it in its RAM), for at most
    /// `timeout`. An `Abort` or anything else ends the migration.
    pub fn await_round_ack(&mut self, round: u32, timeout: Duration) -> Result<(), MigrationError> {
        let during = "waiting for the destination's round acknowledgement";
        let io = |e| MigrationError::Protocol(crate::protocol::ProtocolError::Io(e));
        let until = Instant::now() + timeout;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(crate::protocol::ProtocolError::Timeout { during }.into());
            }
            self.reader
                .get_ref()
                .get_ref()
                .set_read_timeout(Some(left))
                .map_err(io)?;
            match self.reader.recv_message(during)? {
                Message::RoundAck(r) if r == round => return Ok(()),
                Message::RoundAck(r) if r < round => {}
                Message::Abort(reason) => return Err(MigrationError::DestinationAborted { reason }),
                other => {
                    return Err(crate::protocol::ProtocolError::Unexpected {
                        got: other.command(),
                        during,
                    }
                    .into());
                }
            }
        }
    }

    /// The paused tail after the last pages: hash, state, frames, complete.
    pub fn send_tail<S: MigrationSource>(
        &mut self,
        vm: &mut S,
        verify: bool,
        paused_ns: u64,
        deadline: Option<Instant>,
    ) -> Result<(), MigrationError> {
        let frames = write_tail(&mut self.writer, &self.ram, vm, verify, &mut self.report)?;
        self.forwarded.extend(frames);
        self.send_complete(paused_ns, deadline)
    }

    /// `Complete`, with how long the destination has to be ready.
    pub fn send_complete(&mut self, paused_ns: u64, deadline: Option<Instant>) -> Result<(), MigrationError> {
        let commit_within_ns = deadline.map_or(0, |d| {
            d.saturating_duration_since(Instant::now()).as_nanos().max(1) as u64
        });
        self.writer.send(&Message::Complete {
            paused_ns,
            commit_within_ns,
        })?;
        self.events.emit(Phase::StateSent);
        Ok(())
    }

    /// Sends the frames the paused source has queued, if any.
    pub fn forward_frames<S: MigrationSource>(&mut self, vm: &mut S) -> Result<(), MigrationError> {
        let frames = vm.take_pending_frames();
        if !frames.is_empty() {
            self.report.forwarded_frames += frames.len() as u64;
            let res = frames
                .chunks(1024)
                .try_for_each(|chunk| self.writer.send(&Message::Frames(chunk.to_vec())).map(|_| ()));
            self.forwarded.extend(frames);
            res?;
        }
        Ok(())
    }

    /// Waits until `until` for one message from the destination, forwarding frames that reach the source
    /// meanwhile. `None` when the time is up.
    fn next_reply<S: MigrationSource>(
        &mut self,
        vm: &mut S,
        until: Instant,
        during: &'static str,
    ) -> Result<Option<Message>, MigrationError> {
        let io = |e| MigrationError::Protocol(crate::protocol::ProtocolError::Io(e));
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let readable = !self.reader.get_ref().buffer().is_empty()
                || self
                    .reader
                    .get_ref()
                    .get_ref()
                    .wait_readable(left.min(Duration::from_millis(1)))
                    .map_err(io)?;
            if readable {
                // A message that has begun arrives whole soon; the read still ends at `until`.
                self.reader
                    .get_ref()
                    .get_ref()
                    .set_read_timeout(Some(left))
                    .map_err(io)?;
                match self.reader.recv_message(during)? {
                    // The acknowledgement of a round nobody waits for (the paused one, quick mode's).
                    Message::RoundAck(_) => continue,
                    m => return Ok(Some(m)),
                }
            }
            if self.tracker.cancelled() {
                return Err(MigrationError::Cancelled);
            }
            self.forward_frames(vm)?;
        }
    }

    /// Waits for the destination's `Ready` (it holds the guest, restored and paused) until `deadline`, then
    /// commits: sends `Commit` and marks `progress.committed`, from which point the guest never resumes here.
    /// Any failure before that point leaves the guest to the caller's rollback.
    pub fn await_ready_and_commit<S: MigrationSource>(
        &mut self,
        vm: &mut S,
        deadline: Option<Instant>,
        max_pause: Option<Duration>,
        progress: &mut Progress,
    ) -> Result<(), MigrationError> {
        let until = deadline.unwrap_or_else(|| Instant::now() + HANDSHAKE_TIMEOUT);
        let late = || match max_pause {
            Some(d) => MigrationError::PauseDeadline(d),
            None => MigrationError::AckTimeout(HANDSHAKE_TIMEOUT),
        };
        match self.next_reply(vm, until, "waiting for the destination's ready") {
            Ok(Some(Message::Ready)) => {}
            Ok(Some(Message::Abort(reason))) => return Err(MigrationError::DestinationAborted { reason }),
            Ok(Some(other)) => {
                return Err(crate::protocol::ProtocolError::Unexpected {
                    got: other.command(),
                    during: "waiting for the ready",
                }
                .into());
            }
            Ok(None) => return Err(late()),
            Err(e) if deadline.is_some_and(|d| Instant::now() >= d) => {
                eprintln!("migrator: {e} at the pause deadline");
                return Err(late());
            }
            Err(e) => return Err(e),
        }
        if self.tracker.cancelled() {
            return Err(MigrationError::Cancelled);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(late());
        }
        // The point of no return: from the first byte of `Commit` on, the guest never resumes here on its own.
        progress.committed = true;
        self.tracker.update(|st| st.state = MigrationState::Committed);
        self.writer.get_mut().set_deadline(None);
        self.writer
            .send(&Message::Commit)
            .map_err(|e| in_doubt(&format!("sending the commit failed: {e}")))?;
        Ok(())
    }

    /// After the commit: waits for the acknowledgement (the guest runs there), forwarding frames meanwhile, then
    /// sends the last frames and `Close`. A failure here is in doubt: the destination may run the guest.
    pub fn await_ack<S: MigrationSource>(
        &mut self,
        vm: &mut S,
    ) -> Result<crate::protocol::Ack, MigrationError> {
        let until = Instant::now() + ACK_AFTER_COMMIT;
        let ack = match self.next_reply(vm, until, "waiting for the destination's ack") {
            Ok(Some(Message::Ack(a))) => a,
            Ok(Some(other)) => {
                return Err(in_doubt(&format!(
                    "the destination answered the commit with {:?} instead of an ack",
                    other.command()
                )));
            }
            Ok(None) => {
                return Err(in_doubt(&format!(
                    "no acknowledgement within {ACK_AFTER_COMMIT:?} of the commit"
                )));
            }
            Err(e) => {
                return Err(in_doubt(&format!(
                    "the stream failed after the commit ({})",
                    crate::engine::error_chain(&e)
                )));
            }
        };
        // After the ack the guest runs at the destination; what still reaches us goes over, best effort.
        let _ignored = self.forward_frames(vm);
        let _ignored = self.writer.send(&Message::Close);
        Ok(ack)
    }

    /// Fills in the summary after the acknowledgement and emits `complete`.
    pub fn complete(&mut self, paused_at: Instant, ack: crate::protocol::Ack, expected_pause_ms: f64) {
        let r = &mut self.report;
        r.total_ms = self.started.elapsed().as_secs_f64() * 1e3;
        r.pause_ms = paused_at.elapsed().as_secs_f64() * 1e3;
        r.bytes = self.writer.bytes() + self.reader.bytes();
        r.bandwidth = self.bandwidth.rate();
        r.floor_ms = r.final_bytes as f64 / r.bandwidth.max(1) as f64 * 1e3 + r.state_ms;
        r.expected_pause_ms = expected_pause_ms;
        r.restore_us = ack.restore_us;
        let (total_ms, pause_ms, bytes) = (r.total_ms, r.pause_ms, r.bytes);
        self.events.emit(Phase::Complete {
            total_ms,
            pause_ms,
            bytes,
        });
        self.tracker.update(|s| {
            s.state = MigrationState::Migrated;
            s.bytes_sent = bytes;
        });
    }
}

/// Writes `pages` as round `round`: data pages copied out of RAM, zero pages as flags. Pages not set in
/// `known_zero` (when given) are sent as zero without being read. `on_flush(pages_done, bytes_written)` runs after
/// each batch.
pub fn write_round<W: Write>(
    w: &mut MessageWriter<W>,
    batch: &mut PageBatch,
    ram: &GuestRam,
    round: u32,
    pages: impl Iterator<Item = u64>,
    known_zero: Option<&DirtyBitmap>,
    on_flush: &mut dyn FnMut(u64, u64),
) -> Result<RoundStats, MigrationError> {
    let t0 = Instant::now();
    let bytes0 = w.bytes();
    let mut st = RoundStats::default();
    batch.round = round;
    for p in pages {
        st.pages += 1;
        if known_zero.is_some_and(|z| !z.get(p)) {
            batch.push_zero(ram.layout(), p);
            st.zero_pages += 1;
        } else if batch.push_page_with(ram.layout(), p, |buf| ram.read(p, buf))? {
            st.data_pages += 1;
        } else {
            st.zero_pages += 1;
        }
        if batch.is_full() {
            batch.flush(w)?;
            on_flush(st.pages, w.bytes());
        }
    }
    batch.flush(w)?;
    st.bytes = w.bytes() - bytes0;
    st.secs = t0.elapsed().as_secs_f64();
    Ok(st)
}

/// Writes what follows the last pages while the VM is paused: the RAM hash (with `verify`), the state and the
/// queued frames. Returns the frames (the caller keeps them until the ack, for a rollback).
pub fn write_tail<W: Write, S: MigrationSource>(
    w: &mut MessageWriter<W>,
    ram: &GuestRam,
    vm: &mut S,
    verify: bool,
    report: &mut MigrationSummary,
) -> Result<Vec<Vec<u8>>, MigrationError> {
    if verify {
        let t_hash = Instant::now();
        // The VM is paused: neither the vCPU nor the VMM's devices write guest RAM now.
        let h = ram.hash();
        report.hash_ms = t_hash.elapsed().as_secs_f64() * 1e3;
        report.verified_hash = Some(format!("{h:032x}"));
        w.send(&Message::Verify(h))?;
    }
    let t_state = Instant::now();
    let state = vm.save_state().map_err(MigrationError::vm("save its state"))?;
    report.state_bytes = state.len() as u64;
    w.send(&Message::State(state))?;
    report.state_ms = t_state.elapsed().as_secs_f64() * 1e3;
    let frames = vm.take_pending_frames();
    report.forwarded_frames += frames.len() as u64;
    for chunk in frames.chunks(1024) {
        if let Err(e) = w.send(&Message::Frames(chunk.to_vec())) {
            vm.return_frames(frames);
            return Err(e.into());
        }
    }
    Ok(frames)
}

/// The longest a write may make no progress before the pause: `--timeout`, at least 1 s (a loaded host may hold
/// a writer that long) and at most [`WRITE_TIMEOUT`].
pub fn stall_timeout(opts: &MigrateOptions) -> Duration {
    opts.timeout.clamp(Duration::from_secs(1), WRITE_TIMEOUT)
}

/// An error in the pause, once the deadline has passed, is the deadline's (the stream's own error says less).
pub fn past_deadline(
    e: MigrationError,
    deadline: Option<Instant>,
    max_pause: Option<Duration>,
) -> MigrationError {
    match (deadline, max_pause, &e) {
        (_, _, MigrationError::InDoubt { .. } | MigrationError::PauseDeadline(_)) => e,
        (Some(d), Some(max), _) if Instant::now() >= d => {
            eprintln!(
                "migrator: {} at the pause deadline",
                crate::engine::error_chain(&e)
            );
            MigrationError::PauseDeadline(max)
        }
        _ => e,
    }
}

fn in_doubt(reason: &str) -> MigrationError {
    MigrationError::InDoubt {
        side: "source",
        reason: reason.to_owned(),
    }
}

/// What the source had done when it failed, so the rollback undoes exactly that.
#[derive(Clone, Copy, Debug, Default)]
pub struct Progress {
    pub dirty_log: bool,
    pub paused: bool,
    /// `Commit` was (being) sent: the guest must not resume here on its own any more.
    pub committed: bool,
}
