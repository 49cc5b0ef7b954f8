//! The destination side: accept one migration, restore, resume, announce, acknowledge.
//!
//! The receiver never holds more than one message of page data: page batches are read straight into guest RAM
//! (at most [`crate::source::session::BATCH_BYTES`] plus the entry table per message), so its own memory does not grow with
//! the guest or the round.

use std::{
    io::BufReader,
    path::PathBuf,
    sync::mpsc,
    time::{Duration, Instant},
};

use migevents::{Phase, Role};
use migmon_base::MacAddr;

use crate::{
    announce::{AnnounceSchedule, rarp_frame},
    engine::{BoxedVmError, Events, MigrationError, MigrationState, MigrationTarget, Tracker, error_chain},
    protocol::{
        Ack, Command, HELLO_VERIFY, Hello, Incoming, Message, MessageReader, MessageWriter, ProtocolError,
        RoundEnd,
    },
    ram::{DirtyBitmap, RamRegion},
    ram_io::{GuestRam, RamSink},
    transport::Stream,
};

/// Options of the receiving side.
#[derive(Clone, Debug)]
pub struct ReceiveOptions {
    pub announce: AnnounceSchedule,
    /// A source silent this long is given up on.
    pub idle_timeout: Duration,
    /// Where phase events go (unix socket or file).
    pub events: Option<PathBuf>,
    /// Host label for the events.
    pub host: String,
    /// The largest guest RAM a source may bring (`--max-mem`).
    pub max_mem: u64,
}

/// The default of `--max-mem`.
pub const DEFAULT_MAX_MEM: u64 = 4 << 30;
/// How long a new connection may take to show its hello (after the TLS handshake).
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// The most bytes of tap frames the destination buffers from the source before the guest runs here.
pub const MAX_BUFFERED_FRAME_BYTES: usize = 32 << 20;

impl Default for ReceiveOptions {
    fn default() -> Self {
        Self {
            announce: AnnounceSchedule::default(),
            idle_timeout: Duration::from_secs(60),
            events: None,
            host: String::new(),
            max_mem: DEFAULT_MAX_MEM,
        }
    }
}

/// A source that connected, passed the transport's checks and sent an acceptable hello.
pub struct Arrival {
    pub reader: MessageReader<BufReader<Stream>>,
    pub writer: MessageWriter<Stream>,
    pub hello: Hello,
    /// Who it is, for log lines.
    pub peer: String,
}

/// Reads the hello on a fresh stream (within [`HELLO_TIMEOUT`]) and checks it against the limits. A refused
/// source is told why (`Abort`, best effort) and the stream is closed.
pub fn greet(stream: Stream, opts: &ReceiveOptions) -> Result<Arrival, MigrationError> {
    let io = |e| MigrationError::Protocol(ProtocolError::Io(e));
    let peer = stream.peer();
    stream.set_read_timeout(Some(HELLO_TIMEOUT)).map_err(io)?;
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    let rd = stream.try_clone().map_err(io)?;
    let mut reader = MessageReader::new(BufReader::with_capacity(256 << 10, rd));
    let mut writer = MessageWriter::new(stream);
    let checked = read_hello(&mut reader).and_then(|hello| {
        let ram: u64 = hello.regions.iter().map(|r| r.size).sum();
        if ram > opts.max_mem {
            return Err(MigrationError::TooLarge {
                ram,
                max_mem: opts.max_mem,
            });
        }
        Ok(hello)
    });
    match checked {
        Ok(hello) => Ok(Arrival {
            reader,
            writer,
            hello,
            peer,
        }),
        Err(e) => Err(abort(&mut writer, None, e)),
    }
}

/// What the destination saw.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ReceiveReport {
    pub migration_id: String,
    pub mode: String,
    pub mac: String,
    pub bytes: u64,
    pub rounds: u32,
    pub data_pages: u64,
    pub zero_pages: u64,
    pub state_bytes: u64,
    pub restore_us: u64,
    pub resumed_ns: u64,
    pub forwarded_frames: u64,
    pub verified: bool,
    pub announces: u32,
    pub total_ms: f64,
    /// Source pause to destination resume, ms, from the two ends' `CLOCK_MONOTONIC` stamps (valid when both ends
    /// share a host clock, as in the testbed).
    pub pause_ms: f64,
}

/// The layout of a RAM, as text for error messages.
fn layout_text(r: &[RamRegion]) -> String {
    r.iter()
        .map(|r| format!("{:#x}+{:#x}", r.gpa, r.size))
        .collect::<Vec<_>>()
        .join(",")
}

/// Receives one migration on `stream` (see [`greet`] and [`receive_arrival`]).
/// A guest held in doubt is dropped here (the error says so).
pub fn receive<T, F>(
    stream: Stream,
    create: F,
    opts: &ReceiveOptions,
    tracker: &Tracker,
) -> Result<(T, ReceiveReport), MigrationError>
where
    T: MigrationTarget,
    F: FnOnce(&Hello) -> Result<T, BoxedVmError>,
{
    match receive_arrival(greet(stream, opts)?, create, opts, tracker)? {
        Outcome::Running(t, r) => Ok((t, r)),
        Outcome::InDoubt { reason, .. } => Err(MigrationError::InDoubt {
            side: "destination",
            reason,
        }),
    }
}

/// Receives the migration of a source that was greeted. `create` builds the VM from the hello (its configuration
/// blob and layout). On success the guest runs here and the VM is returned; on failure the VM is dropped and the
/// source rolls back. The guest resumes here only after the source's `Commit`.
pub fn receive_arrival<T, F>(
    arrival: Arrival,
    create: F,
    opts: &ReceiveOptions,
    tracker: &Tracker,
) -> Result<Outcome<T>, MigrationError>
where
    T: MigrationTarget,
    F: FnOnce(&Hello) -> Result<T, BoxedVmError>,
{
    let started = Instant::now();
    let Arrival {
        reader,
        mut writer,
        hello,
        ..
    } = arrival;
    let io = |e| MigrationError::Protocol(ProtocolError::Io(e));
    if let Err(e) = reader
        .get_ref()
        .get_ref()
        .set_read_timeout(Some(opts.idle_timeout))
    {
        return Err(abort(&mut writer, None, io(e)));
    }
    tracker.update(|s| s.state = MigrationState::Receiving);
    let mode = hello.mode;
    let mut events = Events::open(
        opts.events.as_deref(),
        &hello.migration_id,
        &MacAddr(hello.mac).to_string(),
        Role::Destination,
    );
    events.emit(Phase::Setup {
        mode,
        ram_bytes: hello.regions.iter().map(|r| r.size).sum(),
        ips: Vec::new(),
        host: opts.host.clone(),
        // Frames that reach the source tap during the pause are delivered to the guest at resume.
        carries_frames: true,
    });
    tracker.update(|s| {
        s.migration_id = Some(hello.migration_id.clone());
        s.mode = Some(crate::engine::mode_name(mode).into());
    });
    let (mut target, ram) = match create_target(create, &hello) {
        Ok(t) => t,
        Err(e) => return Err(abort(&mut writer, Some(&mut events), e)),
    };
    let mut report = ReceiveReport {
        migration_id: hello.migration_id.clone(),
        mode: crate::engine::mode_name(mode).into(),
        mac: MacAddr(hello.mac).to_string(),
        verified: hello.flags & HELLO_VERIFY != 0,
        ..ReceiveReport::default()
    };
    let mut session = ReceiveSession {
        reader,
        writer,
        events,
        report: &mut report,
    };
    let mut received = match session.prepare(&mut target, &ram, &hello, tracker) {
        Ok(r) => r,
        Err(e) => return Err(abort(&mut session.writer, Some(&mut session.events), e)),
    };
    match session.await_commit(&mut received, opts) {
        Ok(()) => {}
        Err(NoCommit::SourceKeeps(e)) => {
            return Err(abort(&mut session.writer, Some(&mut session.events), e));
        }
        Err(NoCommit::InDoubt(reason)) => {
            session.writer.get_mut().shutdown();
            let err = MigrationError::InDoubt {
                side: "destination",
                reason,
            };
            let reason = error_chain(&err);
            session.events.emit(Phase::Failed {
                reason: reason.clone(),
            });
            eprintln!("migrator: {reason}");
            tracker.update(|s| {
                s.state = MigrationState::InDoubt;
                s.error = Some(reason.clone());
            });
            return Ok(Outcome::InDoubt {
                target,
                mac: hello.mac,
                reason,
            });
        }
    }
    if let Err(e) = session.resume(&mut target, received, &hello, opts) {
        return Err(abort(&mut session.writer, Some(&mut session.events), e));
    }
    let ReceiveSession {
        reader, mut events, ..
    } = session;
    // The guest runs here now: finish the announce while draining the source's last frames.
    finish(&mut target, reader, &hello, &mut events, opts, &mut report);
    report.total_ms = started.elapsed().as_secs_f64() * 1e3;
    events.emit(Phase::Complete {
        total_ms: report.total_ms,
        pause_ms: report.pause_ms,
        bytes: report.bytes,
    });
    tracker.update(|s| s.state = MigrationState::Running);
    Ok(Outcome::Running(target, report))
}

/// How a receive that did not fail ended.
pub enum Outcome<T> {
    /// The guest runs here.
    Running(T, ReceiveReport),
    /// The stream broke after this side was ready and before the commit: the guest is restored here and paused,
    /// and the source may have committed. Resolve with [`resume_held`] (`migrator resume --force`) or drop it.
    InDoubt { target: T, mac: [u8; 6], reason: String },
}

/// Resumes a guest held in doubt (the operator chose this side), and announces its MAC from here.
pub fn resume_held<T: MigrationTarget>(target: &mut T, mac: [u8; 6]) -> Result<(), MigrationError> {
    target.resume().map_err(MigrationError::vm("resume"))?;
    if let Err(e) = target.send_frame(&rarp_frame(mac)) {
        eprintln!("migrator: warning: announce failed: {e}");
    }
    if let Err(e) = target.request_garp() {
        eprintln!("migrator: warning: could not ask the guest for a gratuitous ARP: {e}");
    }
    Ok(())
}

/// The first message, which must be the hello.
fn read_hello<R: std::io::Read>(reader: &mut MessageReader<R>) -> Result<Hello, MigrationError> {
    match reader.recv_message("waiting for the hello")? {
        Message::Hello(h) => Ok(h),
        other => Err(ProtocolError::Unexpected {
            got: other.command(),
            during: "waiting for the hello",
        }
        .into()),
    }
}

/// Builds the VM the hello describes and checks that its RAM layout is the source's.
fn create_target<T, F>(create: F, hello: &Hello) -> Result<(T, GuestRam), MigrationError>
where
    T: MigrationTarget,
    F: FnOnce(&Hello) -> Result<T, BoxedVmError>,
{
    let target = create(hello).map_err(MigrationError::vm("be created for restore"))?;
    let ram = target.guest_ram();
    if ram.regions() != hello.regions {
        return Err(MigrationError::LayoutMismatch {
            ours: layout_text(&hello.regions),
            theirs: layout_text(&ram.regions()),
        });
    }
    Ok((target, ram))
}

/// Tells the source (best effort) and the monitor why, and returns the error.
fn abort(
    writer: &mut MessageWriter<Stream>,
    events: Option<&mut Events>,
    e: MigrationError,
) -> MigrationError {
    let reason = error_chain(&e);
    if !matches!(e, MigrationError::SourceAborted { .. }) {
        let _ignored = writer.send(&Message::Abort(reason.clone()));
    }
    writer.get_mut().shutdown();
    if let Some(ev) = events {
        ev.emit(Phase::Failed { reason });
    }
    e
}

/// What the source sent up to `Complete`.
struct Received {
    state: Vec<u8>,
    hash: Option<u128>,
    frames: Vec<Vec<u8>>,
    /// The source's `CLOCK_MONOTONIC` ns at pause.
    paused_ns: u64,
    /// How long the source waits for `Ready` (zero: no limit given).
    commit_within: Duration,
    /// Time spent restoring the state.
    restore: Duration,
}

/// The receive session once the target exists: the stream both ways, the events and the report.
struct ReceiveSession<'r> {
    reader: MessageReader<BufReader<Stream>>,
    writer: MessageWriter<Stream>,
    events: Events,
    report: &'r mut ReceiveReport,
}

/// How long past the source's own deadline the destination still waits for `Commit` (the network's share).
pub const COMMIT_SLACK: Duration = Duration::from_secs(1);

/// Why the wait for `Commit` ended without one.
enum NoCommit {
    /// The source gave up (Abort) or its deadline has certainly passed: it keeps the guest.
    SourceKeeps(MigrationError),
    /// The stream broke: the source may have committed.
    InDoubt(String),
}

impl ReceiveSession<'_> {
    /// Acknowledges the hello, receives everything, restores and checks the hash, then says `Ready`. The guest
    /// does not run here yet.
    fn prepare<T: MigrationTarget>(
        &mut self,
        target: &mut T,
        ram: &GuestRam,
        hello: &Hello,
        tracker: &Tracker,
    ) -> Result<Received, MigrationError> {
        self.writer.send(&Message::HelloAck)?;
        let mut received = self.receive_until_complete(ram, tracker)?;
        self.events.emit(Phase::StateSent);
        self.report.state_bytes = received.state.len() as u64;
        let t_restore = Instant::now();
        target
            .restore_state(&received.state)
            .map_err(MigrationError::vm("restore its state"))?;
        received.restore = t_restore.elapsed();
        if hello.flags & HELLO_VERIFY != 0 {
            verify(ram, received.hash)?;
        }
        self.writer.send(&Message::Ready)?;
        tracker.update(|s| s.state = MigrationState::Prepared);
        Ok(received)
    }

    /// Waits for the source's `Commit`: as long as the source said it would wait for `Ready`, plus
    /// [`COMMIT_SLACK`] (without a limit from the source, the idle timeout).
    fn await_commit(&mut self, received: &mut Received, opts: &ReceiveOptions) -> Result<(), NoCommit> {
        let wait = if received.commit_within.is_zero() {
            opts.idle_timeout
        } else {
            received.commit_within + COMMIT_SLACK
        };
        let until = Instant::now() + wait;
        let mut frame_bytes: usize = received.frames.iter().map(Vec::len).sum();
        loop {
            let left = until
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            let _ignored = self.reader.get_ref().get_ref().set_read_timeout(Some(left));
            match self.reader.recv_message("waiting for the commit") {
                Ok(Message::Commit) => return Ok(()),
                // Frames that reach the paused source while it waits for the ready go to the guest at resume.
                Ok(Message::Frames(f)) => {
                    frame_bytes += f.iter().map(Vec::len).sum::<usize>();
                    if frame_bytes > MAX_BUFFERED_FRAME_BYTES {
                        return Err(NoCommit::InDoubt(
                            "the source forwarded more than 32 MiB of frames before its commit".into(),
                        ));
                    }
                    received.frames.extend(f);
                }
                Ok(Message::Abort(reason)) => {
                    return Err(NoCommit::SourceKeeps(MigrationError::SourceAborted { reason }));
                }
                Ok(other) => {
                    return Err(NoCommit::InDoubt(format!(
                        "the source sent {:?} where the commit was due",
                        other.command()
                    )));
                }
                Err(ProtocolError::Timeout { .. }) => {
                    return Err(NoCommit::SourceKeeps(MigrationError::Usage(format!(
                        "no commit within {wait:?} of the source's complete: its deadline has passed and it keeps the guest"
                    ))));
                }
                Err(e) => {
                    return Err(NoCommit::InDoubt(format!(
                        "the stream failed after this side was ready, before the commit ({})",
                        error_chain(&e)
                    )));
                }
            }
        }
    }

    /// After the commit: resumes, delivers the forwarded frames, announces and acknowledges.
    fn resume<T: MigrationTarget>(
        &mut self,
        target: &mut T,
        received: Received,
        hello: &Hello,
        opts: &ReceiveOptions,
    ) -> Result<(), MigrationError> {
        let t_resume = Instant::now();
        target.resume().map_err(MigrationError::vm("resume"))?;
        self.report.restore_us = (received.restore + t_resume.elapsed()).as_micros() as u64;
        let resumed_ns = self.events.emit(Phase::Resume);
        self.report.resumed_ns = resumed_ns;
        self.report.pause_ms = resumed_ns.saturating_sub(received.paused_ns) as f64 / 1e6;
        self.report.forwarded_frames += received.frames.len() as u64;
        if !received.frames.is_empty()
            && let Err(e) = target.deliver_frames(received.frames)
        {
            eprintln!("migrator: warning: could not deliver forwarded frames: {e}");
        }
        // The first announce goes out before the ack, so the bridges re-learn as early as possible.
        if opts.announce.rounds > 0 {
            announce(target, hello.mac, 0, &mut self.events, self.report);
        }
        self.writer.send(&Message::Ack(Ack {
            resumed_ns,
            restore_us: self.report.restore_us,
        }))?;
        self.report.bytes = self.reader.bytes() + self.writer.bytes();
        Ok(())
    }

    /// Pages go straight into guest RAM; the rest is kept until `Complete`.
    fn receive_until_complete(
        &mut self,
        ram: &GuestRam,
        tracker: &Tracker,
    ) -> Result<Received, MigrationError> {
        // Pages never touched here read as zero and need no zeroing.
        let mut maybe_nonzero: DirtyBitmap = ram.resident_pages();
        let mut state = None;
        let mut hash = None;
        let mut frames: Vec<Vec<u8>> = Vec::new();
        let mut frame_bytes = 0usize;
        loop {
            let message = match self.reader.recv()? {
                Incoming::Pages(h) => {
                    // The target has not been resumed: its guest does not run and nothing else writes its RAM.
                    let mut sink = RamSink {
                        ram,
                        maybe_nonzero: &mut maybe_nonzero,
                    };
                    let got = self.reader.read_pages(&h, ram.layout(), &mut sink)?;
                    self.report.data_pages += got.data_pages;
                    self.report.zero_pages += got.zero_pages;
                    continue;
                }
                Incoming::Message(m) => m,
            };
            match message {
                Message::RoundEnd(r) => self.end_round(&r, tracker)?,
                Message::Verify(h) => hash = Some(h),
                Message::State(s) => state = Some(s),
                Message::Frames(f) => {
                    frame_bytes += f.iter().map(Vec::len).sum::<usize>();
                    if frames.len() + f.len() > 1 << 16 || frame_bytes > MAX_BUFFERED_FRAME_BYTES {
                        return Err(malformed(
                            Command::Frames,
                            "more than 65536 frames or 32 MiB of frames queued at the source",
                        ));
                    }
                    frames.extend(f);
                }
                Message::Complete {
                    paused_ns,
                    commit_within_ns,
                } => {
                    let state =
                        state.ok_or_else(|| malformed(Command::Complete, "complete before any state"))?;
                    return Ok(Received {
                        state,
                        hash,
                        frames,
                        paused_ns,
                        commit_within: Duration::from_nanos(commit_within_ns),
                        restore: Duration::ZERO,
                    });
                }
                Message::Abort(reason) => return Err(MigrationError::SourceAborted { reason }),
                other => {
                    return Err(ProtocolError::Unexpected {
                        got: other.command(),
                        during: "receiving the migration",
                    }
                    .into());
                }
            }
        }
    }

    /// Acknowledges the round (its pages are all in RAM here), then records it.
    fn end_round(&mut self, r: &RoundEnd, tracker: &Tracker) -> Result<(), MigrationError> {
        self.writer.send(&Message::RoundAck(r.round))?;
        self.report.rounds = r.round + 1;
        self.events.emit(Phase::Round {
            n: r.round,
            pages: r.pages,
            bytes: r.bytes,
            bandwidth: r.bandwidth,
        });
        tracker.update(|s| {
            s.iteration = r.round;
            s.bandwidth = r.bandwidth;
            s.bytes_sent = self.reader.bytes();
        });
        Ok(())
    }
}

fn malformed(command: Command, what: &str) -> MigrationError {
    ProtocolError::Malformed {
        command,
        what: what.into(),
    }
    .into()
}

/// Compares the RAM hash here with the source's, before the guest runs.
fn verify(ram: &GuestRam, source_hash: Option<u128>) -> Result<(), MigrationError> {
    let Some(source_hash) = source_hash else {
        return Err(malformed(
            Command::Complete,
            "verification was announced but no hash came",
        ));
    };
    // The guest has not run yet: nothing writes its RAM.
    let here = ram.hash();
    if here != source_hash {
        eprintln!("migrator: RAM VERIFICATION FAILED: source {source_hash:032x} != destination {here:032x}");
        return Err(MigrationError::VerifyMismatch {
            source_hash,
            destination: here,
        });
    }
    Ok(())
}

fn announce<T: MigrationTarget>(
    target: &mut T,
    mac: [u8; 6],
    n: u32,
    events: &mut Events,
    report: &mut ReceiveReport,
) {
    if let Err(e) = target.send_frame(&rarp_frame(mac)) {
        eprintln!("migrator: warning: announce {n} failed: {e}");
    }
    if n == 0
        && let Err(e) = target.request_garp()
    {
        eprintln!("migrator: warning: could not ask the guest for a gratuitous ARP: {e}");
    }
    events.emit(Phase::Announce { n });
    report.announces = n + 1;
}

/// After the ack: the rest of the announce schedule, while frames the source still forwards are delivered.
fn finish<T: MigrationTarget>(
    target: &mut T,
    mut reader: MessageReader<BufReader<Stream>>,
    hello: &Hello,
    events: &mut Events,
    opts: &ReceiveOptions,
    report: &mut ReceiveReport,
) {
    let resumed = Instant::now();
    // Bounded: a source that floods frames after the ack waits for the guest to take them.
    let (tx, rx) = mpsc::sync_channel(64);
    let drain = std::thread::spawn(move || {
        let _ignored = reader
            .get_ref()
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(5)));
        // Frames until Close (or an error: the source is gone, which is fine now).
        while let Ok(Message::Frames(f)) = reader.recv_message("after the ack") {
            if tx.send(f).is_err() {
                break;
            }
        }
    });
    let offsets = opts.announce.offsets();
    let mut rx_open = true;
    for (n, at) in offsets.iter().enumerate().skip(1) {
        loop {
            let left = at.saturating_sub(resumed.elapsed());
            if left.is_zero() {
                break;
            }
            if !rx_open {
                std::thread::sleep(left);
                break;
            }
            match rx.recv_timeout(left) {
                Ok(frames) => {
                    report.forwarded_frames += frames.len() as u64;
                    if let Err(e) = target.deliver_frames(frames) {
                        eprintln!("migrator: warning: could not deliver forwarded frames: {e}");
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => rx_open = false,
            }
        }
        announce(target, hello.mac, n as u32, events, report);
    }
    for frames in &rx {
        report.forwarded_frames += frames.len() as u64;
        let _ignored = target.deliver_frames(frames);
    }
    let _ignored = drain.join();
}
