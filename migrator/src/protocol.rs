//! The migration wire protocol.
//!
//! Every message is a fixed 32-byte [`Header`] followed by `length` bytes of payload. All integers are little
//! endian. The header carries a per-direction sequence number, a CRC-32 (IEEE) of the payload and a CRC-32 of
//! itself, so a corrupted length is caught before the receiver waits for bytes that never come, and a corrupted or
//! spliced stream is caught at the first bad message, not when the guest misbehaves.
//!
//! ```text
//! offset  size  field
//!      0     4  command     (Command)
//!      4     4  flags       (per command; 0 unless stated)
//!      8     8  length      (payload bytes, at most MAX_PAYLOAD)
//!     16     4  sequence    (0, 1, 2 ... per direction)
//!     20     4  crc         (CRC-32 of the payload)
//!     24     4  header_crc  (CRC-32 of bytes 0..24)
//!     28     4  reserved    (0)
//! ```
//!
//! The source opens with [`Hello`] (magic, protocol version, mode, RAM layout, MAC, migration id and the VM
//! configuration). The destination checks the version first, answers `HelloAck` (or `Abort` with a reason), and from
//! then on accepts:
//!
//! - `Pages`: `u32 count, u32 round`, then `count` entries `{u64 page, u32 npages, u32 flags}`, then the bytes of
//!   every entry without [`PAGE_ZERO`], in entry order. A page is a flat page index (see [`crate::ram`]); a run
//!   must lie inside one RAM region. Zero pages travel as a flag, without data.
//! - `RoundEnd`, `State` (the VMM's versioned, checksummed state blob), `Frames` (tap frames the source read while
//!   the guest was paused), `Verify` (the RAM hash at pause), `Complete { paused_ns, commit_within_ns }`;
//!
//! answers every `RoundEnd` with `RoundAck { round }` once it has read that round (so the source times a round to
//! the moment its pages are in the destination's RAM, not to the moment they fill a socket buffer), then
//! answers `Ready` once it holds the whole guest, restored but not running, waits for `Commit` (the source's
//! point of no return; `commit_within_ns` says how long the source will still wait for `Ready`, 0 for no limit),
//! and answers `Ack` once the guest runs on the destination. After the `Ack` the source may still send `Frames`,
//! then `Close`. Either side may send `Abort { reason }` at any time before `Commit`.
//!
//! Every length, count, page number and address is checked before use. Bad input yields a [`ProtocolError`], never
//! a panic.

use std::io::{self, BufRead, IoSlice, Read, Write};

use migevents::Mode;

use crate::ram::{PAGE_SIZE, RamError, RamLayout, RamRegion, is_zero};

/// "MIGMONVM", first field of [`Hello`].
pub const MAGIC: u64 = u64::from_le_bytes(*b"MIGMONVM");
/// Protocol version. Bump on any change of the wire format.
pub const VERSION: u32 = 3;
/// Header size in bytes.
pub const HEADER_SIZE: usize = 32;
/// Largest payload of any message.
pub const MAX_PAYLOAD: u64 = 80 << 20;
/// The first step by which a message's buffer grows as its payload arrives (then by doubling, so a payload that
/// arrives whole costs a few reads, and one that does not arrive costs no more than twice what did).
pub const PAYLOAD_CHUNK: usize = 64 << 10;
/// Largest `State` blob.
pub const MAX_STATE: usize = 64 << 20;
/// Most entries in one `Pages` message.
pub const MAX_ENTRIES: u32 = 8192;
/// Most frames in one `Frames` message and most bytes in one frame.
pub const MAX_FRAMES: u32 = 65536;
pub const MAX_FRAME_LEN: u32 = 65536 + 64;
/// Most RAM regions in a layout, and the largest guest (1 TiB).
pub const MAX_REGIONS: u32 = 16;
pub const MAX_RAM: u64 = 1 << 40;
const MAX_ID: u32 = 256;
const MAX_CONFIG: u32 = 1 << 20;
const MAX_REASON: u32 = 4096;

/// `Pages` entry flag: the run is all zero; no data follows for it.
pub const PAGE_ZERO: u32 = 1;
/// `Hello` flag: the source will send a `Verify` hash; the destination must check it before resume.
pub const HELLO_VERIFY: u32 = 1;

/// The fixed message header.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Header {
    pub command: u32,
    pub flags: u32,
    pub length: u64,
    pub sequence: u32,
    pub crc: u32,
    pub header_crc: u32,
    pub reserved: u32,
}

const _: () = assert!(size_of::<Header>() == HEADER_SIZE);

impl Header {
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(&self.command.to_le_bytes());
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.length.to_le_bytes());
        b[16..20].copy_from_slice(&self.sequence.to_le_bytes());
        b[20..24].copy_from_slice(&self.crc.to_le_bytes());
        b[24..28].copy_from_slice(&self.header_crc.to_le_bytes());
        b[28..32].copy_from_slice(&self.reserved.to_le_bytes());
        b
    }

    /// Sets `header_crc` over the other fields.
    pub fn seal(&mut self) {
        self.header_crc = crc32fast::hash(&self.encode()[..24]);
    }

    /// Decodes and checks the header's own checksum and reserved field.
    pub fn decode_checked(b: &[u8; HEADER_SIZE]) -> Result<Self, ProtocolError> {
        let h = Self::decode(b);
        if crc32fast::hash(&b[..24]) != h.header_crc || h.reserved != 0 {
            return Err(ProtocolError::HeaderChecksum);
        }
        Ok(h)
    }

    pub fn decode(b: &[u8; HEADER_SIZE]) -> Self {
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let mut len = [0u8; 8];
        len.copy_from_slice(&b[8..16]);
        Self {
            command: u32_at(0),
            flags: u32_at(4),
            length: u64::from_le_bytes(len),
            sequence: u32_at(16),
            crc: u32_at(20),
            header_crc: u32_at(24),
            reserved: u32_at(28),
        }
    }
}

/// Message kinds.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Hello = 1,
    HelloAck = 2,
    Pages = 3,
    RoundEnd = 4,
    State = 5,
    Frames = 6,
    Verify = 7,
    Complete = 8,
    Ack = 9,
    Abort = 10,
    Close = 11,
    Ready = 12,
    Commit = 13,
    RoundAck = 14,
}

impl TryFrom<u32> for Command {
    type Error = ProtocolError;
    fn try_from(v: u32) -> Result<Self, ProtocolError> {
        Ok(match v {
            1 => Self::Hello,
            2 => Self::HelloAck,
            3 => Self::Pages,
            4 => Self::RoundEnd,
            5 => Self::State,
            6 => Self::Frames,
            7 => Self::Verify,
            8 => Self::Complete,
            9 => Self::Ack,
            10 => Self::Abort,
            11 => Self::Close,
            12 => Self::Ready,
            13 => Self::Commit,
            14 => Self::RoundAck,
            other => return Err(ProtocolError::UnknownCommand { command: other }),
        })
    }
}

/// The migration mode on the wire, in [`Hello`]: live 1, quick 2.
fn mode_code(mode: Mode) -> u32 {
    match mode {
        Mode::Live => 1,
        Mode::Quick => 2,
    }
}

/// Everything that can go wrong reading or writing the stream.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("migration stream I/O failed")]
    Io(#[source] io::Error),
    #[error("the peer closed the migration stream {during}")]
    Closed { during: &'static str },
    #[error("not a migmon migration stream (magic {magic:#018x}); is the peer a migrator?")]
    BadMagic { magic: u64 },
    #[error(
        "protocol version mismatch: we speak {ours}, the peer speaks {theirs}; run the same migrator build on both sides"
    )]
    VersionMismatch { ours: u32, theirs: u32 },
    #[error("corrupted message header in the migration stream (header checksum mismatch)")]
    HeaderChecksum,
    #[error("the peer went silent {during} (timed out)")]
    Timeout { during: &'static str },
    #[error("unknown command {command} in the migration stream (corrupted stream?)")]
    UnknownCommand { command: u32 },
    #[error("message too long: {length} bytes for {command:?} (limit {limit}); corrupted stream?")]
    TooLong {
        command: Command,
        length: u64,
        limit: u64,
    },
    #[error("message sequence {got}, expected {expected}: messages lost or spliced")]
    Sequence { expected: u32, got: u32 },
    #[error("checksum mismatch in a {command:?} message (sequence {sequence}): the stream is corrupted")]
    Checksum { command: Command, sequence: u32 },
    #[error("malformed {command:?} message: {what}")]
    Malformed { command: Command, what: String },
    #[error(
        "page run {page}+{npages} is outside guest RAM ({total} pages) or crosses a region boundary: corrupted stream?"
    )]
    PageOutOfRange { page: u64, npages: u64, total: u64 },
    #[error("unexpected {got:?} message {during}")]
    Unexpected { got: Command, during: &'static str },
    #[error("cannot store a page batch in guest RAM")]
    Ram(#[from] RamError),
}

fn malformed(command: Command, what: impl Into<String>) -> ProtocolError {
    ProtocolError::Malformed {
        command,
        what: what.into(),
    }
}

/// A little-endian cursor over a payload; every read is bounds-checked.
struct Cursor<'a> {
    b: &'a [u8],
    command: Command,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.b.len() < n {
            return Err(malformed(
                self.command,
                format!("truncated: needs {n} more bytes, has {}", self.b.len()),
            ));
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn bytes(&mut self, limit: u32, what: &str) -> Result<&'a [u8], ProtocolError> {
        let n = self.u32()?;
        if n > limit {
            return Err(malformed(
                self.command,
                format!("{what} of {n} bytes exceeds {limit}"),
            ));
        }
        self.take(n as usize)
    }
    fn end(&self) -> Result<(), ProtocolError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(malformed(
                self.command,
                format!("{} trailing bytes", self.b.len()),
            ))
        }
    }
}

/// The first message: who is coming and what its RAM looks like.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version: u32,
    pub mode: Mode,
    pub flags: u32,
    pub regions: Vec<RamRegion>,
    pub mac: [u8; 6],
    pub migration_id: String,
    /// The VM's configuration as the VMM serialises it (opaque here).
    pub config: Vec<u8>,
}

impl Hello {
    pub fn total_pages(&self) -> u64 {
        self.regions.iter().map(RamRegion::pages).sum()
    }
}

/// Destination's acknowledgement: the guest runs there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack {
    /// `CLOCK_MONOTONIC` ns at which the destination resumed the vCPU.
    pub resumed_ns: u64,
    /// Time the destination spent restoring state, µs.
    pub restore_us: u64,
}

/// End of one pre-copy round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoundEnd {
    pub round: u32,
    pub pages: u64,
    pub bytes: u64,
    pub bandwidth: u64,
}

/// Every message except `Pages`, which is streamed straight into guest RAM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    HelloAck,
    RoundEnd(RoundEnd),
    State(Vec<u8>),
    Frames(Vec<Vec<u8>>),
    Verify(u128),
    /// Everything was sent. Carries the source's `CLOCK_MONOTONIC` ns at pause (meaningful as a time only when both
    /// ends share a host clock; used for the destination's pause figure).
    Complete {
        paused_ns: u64,
        /// How long from now the source still waits for `Ready` before it rolls back, ns; 0: no limit.
        commit_within_ns: u64,
    },
    /// The destination holds the whole guest, restored and paused: it resumes on `Commit`.
    Ready,
    /// The source's point of no return: it will not resume the guest; the destination resumes it.
    Commit,
    /// The destination has read the round up to its `RoundEnd`: every page of it is in guest RAM there. The
    /// source times its rounds to this, not to its own writes (which only fill socket buffers).
    RoundAck(u32),
    Ack(Ack),
    Abort(String),
    Close,
}

impl Message {
    pub fn command(&self) -> Command {
        match self {
            Self::Hello(_) => Command::Hello,
            Self::HelloAck => Command::HelloAck,
            Self::RoundEnd(_) => Command::RoundEnd,
            Self::State(_) => Command::State,
            Self::Frames(_) => Command::Frames,
            Self::Verify(_) => Command::Verify,
            Self::Complete { .. } => Command::Complete,
            Self::Ack(_) => Command::Ack,
            Self::Abort(_) => Command::Abort,
            Self::Close => Command::Close,
            Self::Ready => Command::Ready,
            Self::Commit => Command::Commit,
            Self::RoundAck(_) => Command::RoundAck,
        }
    }

    /// The flags and payload.
    pub fn encode(&self) -> (u32, Vec<u8>) {
        let mut p = Vec::new();
        let mut flags = 0;
        match self {
            Self::Hello(h) => {
                flags = h.flags;
                p.extend_from_slice(&MAGIC.to_le_bytes());
                p.extend_from_slice(&h.version.to_le_bytes());
                p.extend_from_slice(&mode_code(h.mode).to_le_bytes());
                p.extend_from_slice(&(h.regions.len() as u32).to_le_bytes());
                p.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
                for r in &h.regions {
                    p.extend_from_slice(&r.gpa.to_le_bytes());
                    p.extend_from_slice(&r.size.to_le_bytes());
                }
                p.extend_from_slice(&h.mac);
                p.extend_from_slice(&[0, 0]);
                put_bytes(&mut p, h.migration_id.as_bytes());
                put_bytes(&mut p, &h.config);
            }
            Self::RoundEnd(r) => {
                p.extend_from_slice(&r.round.to_le_bytes());
                p.extend_from_slice(&0u32.to_le_bytes());
                p.extend_from_slice(&r.pages.to_le_bytes());
                p.extend_from_slice(&r.bytes.to_le_bytes());
                p.extend_from_slice(&r.bandwidth.to_le_bytes());
            }
            Self::State(s) => p.extend_from_slice(s),
            Self::Frames(frames) => {
                p.extend_from_slice(&(frames.len() as u32).to_le_bytes());
                for f in frames {
                    put_bytes(&mut p, f);
                }
            }
            Self::Verify(h) => p.extend_from_slice(&h.to_le_bytes()),
            Self::Complete {
                paused_ns,
                commit_within_ns,
            } => {
                p.extend_from_slice(&paused_ns.to_le_bytes());
                p.extend_from_slice(&commit_within_ns.to_le_bytes());
            }
            Self::Ack(a) => {
                p.extend_from_slice(&a.resumed_ns.to_le_bytes());
                p.extend_from_slice(&a.restore_us.to_le_bytes());
            }
            Self::Abort(reason) => put_bytes(&mut p, reason.as_bytes()),
            Self::RoundAck(round) => p.extend_from_slice(&round.to_le_bytes()),
            Self::HelloAck | Self::Close | Self::Ready | Self::Commit => {}
        }
        (flags, p)
    }

    /// Decodes a checked payload.
    pub fn decode(command: Command, flags: u32, payload: &[u8]) -> Result<Self, ProtocolError> {
        let mut c = Cursor { b: payload, command };
        let msg = match command {
            Command::Hello => Self::Hello(decode_hello(&mut c, flags)?),
            Command::HelloAck => Self::HelloAck,
            Command::RoundEnd => {
                let round = c.u32()?;
                let _pad = c.u32()?;
                Self::RoundEnd(RoundEnd {
                    round,
                    pages: c.u64()?,
                    bytes: c.u64()?,
                    bandwidth: c.u64()?,
                })
            }
            Command::State => {
                if payload.len() > MAX_STATE {
                    return Err(malformed(command, "state blob too large"));
                }
                c.b = &[];
                Self::State(payload.to_vec())
            }
            Command::Frames => {
                let n = c.u32()?;
                if n > MAX_FRAMES {
                    return Err(malformed(command, format!("{n} frames exceed {MAX_FRAMES}")));
                }
                let mut frames = Vec::with_capacity(n.min(1024) as usize);
                for _ in 0..n {
                    let f = c.bytes(MAX_FRAME_LEN, "frame")?;
                    if f.len() < 14 {
                        return Err(malformed(
                            command,
                            format!("frame of {} bytes is shorter than an Ethernet header", f.len()),
                        ));
                    }
                    frames.push(f.to_vec());
                }
                Self::Frames(frames)
            }
            Command::Verify => {
                let mut a = [0u8; 16];
                a.copy_from_slice(c.take(16)?);
                Self::Verify(u128::from_le_bytes(a))
            }
            Command::Complete => Self::Complete {
                paused_ns: c.u64()?,
                commit_within_ns: c.u64()?,
            },
            Command::Ready => Self::Ready,
            Command::Commit => Self::Commit,
            Command::RoundAck => Self::RoundAck(c.u32()?),
            Command::Ack => Self::Ack(Ack {
                resumed_ns: c.u64()?,
                restore_us: c.u64()?,
            }),
            Command::Abort => {
                let r = c.bytes(MAX_REASON, "reason")?;
                Self::Abort(String::from_utf8_lossy(r).into_owned())
            }
            Command::Close => Self::Close,
            Command::Pages => return Err(malformed(command, "page batches are read with read_pages")),
        };
        c.end()?;
        Ok(msg)
    }
}

fn put_bytes(p: &mut Vec<u8>, b: &[u8]) {
    p.extend_from_slice(&(b.len() as u32).to_le_bytes());
    p.extend_from_slice(b);
}

fn decode_hello(c: &mut Cursor<'_>, flags: u32) -> Result<Hello, ProtocolError> {
    let magic = c.u64()?;
    if magic != MAGIC {
        return Err(ProtocolError::BadMagic { magic });
    }
    let version = c.u32()?;
    if version != VERSION {
        return Err(ProtocolError::VersionMismatch {
            ours: VERSION,
            theirs: version,
        });
    }
    if flags & !HELLO_VERIFY != 0 {
        return Err(malformed(Command::Hello, format!("unknown flags {flags:#x}")));
    }
    let mode = match c.u32()? {
        1 => Mode::Live,
        2 => Mode::Quick,
        m => return Err(malformed(Command::Hello, format!("unknown mode {m}"))),
    };
    let nregions = c.u32()?;
    let page_size = c.u32()?;
    if page_size as usize != PAGE_SIZE {
        return Err(malformed(
            Command::Hello,
            format!("page size {page_size}, expected {PAGE_SIZE}"),
        ));
    }
    if nregions == 0 || nregions > MAX_REGIONS {
        return Err(malformed(
            Command::Hello,
            format!("{nregions} RAM regions (1..={MAX_REGIONS} allowed)"),
        ));
    }
    let mut regions = Vec::with_capacity(nregions as usize);
    let mut end = 0u64;
    let mut total = 0u64;
    for _ in 0..nregions {
        let gpa = c.u64()?;
        let size = c.u64()?;
        let page = PAGE_SIZE as u64;
        let region_end = gpa.checked_add(size);
        if size == 0
            || !gpa.is_multiple_of(page)
            || !size.is_multiple_of(page)
            || gpa < end
            || region_end.is_none()
        {
            return Err(malformed(
                Command::Hello,
                format!("bad RAM region {gpa:#x}+{size:#x}"),
            ));
        }
        end = region_end.unwrap_or(u64::MAX);
        total = total.saturating_add(size);
        regions.push(RamRegion { gpa, size });
    }
    if total > MAX_RAM {
        return Err(malformed(
            Command::Hello,
            format!("guest RAM of {total} bytes exceeds {MAX_RAM}"),
        ));
    }
    let mut mac = [0u8; 6];
    mac.copy_from_slice(c.take(6)?);
    let _pad = c.take(2)?;
    let id = c.bytes(MAX_ID, "migration id")?;
    let migration_id = std::str::from_utf8(id)
        .map_err(|_| malformed(Command::Hello, "migration id is not UTF-8"))?
        .to_owned();
    let config = c.bytes(MAX_CONFIG, "VM configuration")?.to_vec();
    Ok(Hello {
        version,
        mode,
        flags,
        regions,
        mac,
        migration_id,
        config,
    })
}

/// One run in a page batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRun {
    pub page: u64,
    pub npages: u32,
    pub flags: u32,
}

/// Builds `Pages` messages: runs of data pages copied out of guest RAM, and zero runs.
pub struct PageBatch {
    entries: Vec<PageRun>,
    data: Vec<u8>,
    max_data: usize,
    pub round: u32,
}

impl PageBatch {
    /// A batch holding at most `max_data` bytes of page data (rounded to pages, at least one page).
    pub fn new(max_data: usize) -> Self {
        let max_data = (max_data / PAGE_SIZE).max(1) * PAGE_SIZE;
        Self {
            entries: Vec::new(),
            data: Vec::with_capacity(max_data),
            max_data,
            round: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.entries.len() >= MAX_ENTRIES as usize || self.data.len() >= self.max_data
    }

    pub fn data_len(&self) -> usize {
        self.data.len()
    }

    /// Adds a zero page, merging it into the previous zero run when contiguous and in the same region.
    pub fn push_zero(&mut self, layout: &RamLayout, page: u64) {
        self.push_run_page(layout, page, PAGE_ZERO);
    }

    /// Adds one page whose bytes `fill` writes into the batch. Returns `Ok(true)` if it held data, `Ok(false)` if
    /// it was all zero (then it is added as a zero page, without data); the error of `fill` otherwise (the page is
    /// then not added).
    pub fn push_page_with<E>(
        &mut self,
        layout: &RamLayout,
        page: u64,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<bool, E> {
        let start = self.data.len();
        self.data.resize(start + PAGE_SIZE, 0);
        if let Err(e) = fill(&mut self.data[start..]) {
            self.data.truncate(start);
            return Err(e);
        }
        if is_zero(&self.data[start..]) {
            self.data.truncate(start);
            self.push_zero(layout, page);
            return Ok(false);
        }
        self.push_run_page(layout, page, 0);
        Ok(true)
    }

    /// Extends the last run by `page` when it has the same flags, follows it and stays in its region; starts a run
    /// otherwise.
    fn push_run_page(&mut self, layout: &RamLayout, page: u64, flags: u32) {
        if let Some(last) = self.entries.last_mut()
            && last.flags == flags
            && last.page + u64::from(last.npages) == page
            && last.npages < u32::MAX
            && layout.run_in_one_region(last.page, u64::from(last.npages) + 1)
        {
            last.npages += 1;
            return;
        }
        self.entries.push(PageRun {
            page,
            npages: 1,
            flags,
        });
    }

    /// Writes the batch as one `Pages` message (one `writev`) and empties it. Returns the bytes written.
    pub fn flush<W: Write>(&mut self, out: &mut MessageWriter<W>) -> Result<u64, ProtocolError> {
        if self.entries.is_empty() {
            return Ok(0);
        }
        let mut head = Vec::with_capacity(8 + self.entries.len() * 16);
        head.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        head.extend_from_slice(&self.round.to_le_bytes());
        for e in &self.entries {
            head.extend_from_slice(&e.page.to_le_bytes());
            head.extend_from_slice(&e.npages.to_le_bytes());
            head.extend_from_slice(&e.flags.to_le_bytes());
        }
        let n = out.send_parts(Command::Pages, 0, &[&head, &self.data])?;
        self.entries.clear();
        self.data.clear();
        Ok(n)
    }
}

/// Writes messages with sequence numbers and checksums.
pub struct MessageWriter<W> {
    out: W,
    sequence: u32,
    bytes: u64,
}

impl<W: Write> MessageWriter<W> {
    pub fn new(out: W) -> Self {
        Self::with_sequence(out, 0)
    }

    /// A writer whose first message carries `sequence` (to continue a stream in another sink).
    pub fn with_sequence(out: W, sequence: u32) -> Self {
        Self {
            out,
            sequence,
            bytes: 0,
        }
    }

    pub fn sequence(&self) -> u32 {
        self.sequence
    }

    /// Skips `n` sequence numbers (messages forwarded raw from elsewhere).
    pub fn advance_sequence(&mut self, n: u32) {
        self.sequence = self.sequence.wrapping_add(n);
    }

    /// Bytes written so far, headers included.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Accounts `n` bytes written raw through [`MessageWriter::get_mut`].
    pub fn count_raw(&mut self, n: u64) {
        self.bytes += n;
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.out
    }

    pub fn into_inner(self) -> W {
        self.out
    }

    pub fn send(&mut self, msg: &Message) -> Result<u64, ProtocolError> {
        let (flags, payload) = msg.encode();
        self.send_parts(msg.command(), flags, &[&payload])
    }

    /// Writes a header and the payload made of `parts` with as few syscalls as the kernel allows.
    pub fn send_parts(
        &mut self,
        command: Command,
        flags: u32,
        parts: &[&[u8]],
    ) -> Result<u64, ProtocolError> {
        let length: u64 = parts.iter().map(|p| p.len() as u64).sum();
        if length > MAX_PAYLOAD {
            return Err(ProtocolError::TooLong {
                command,
                length,
                limit: MAX_PAYLOAD,
            });
        }
        let mut crc = crc32fast::Hasher::new();
        for p in parts {
            crc.update(p);
        }
        let mut header = Header {
            command: command as u32,
            flags,
            length,
            sequence: self.sequence,
            crc: crc.finalize(),
            header_crc: 0,
            reserved: 0,
        };
        header.seal();
        let header = header.encode();
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(parts.len() + 1);
        slices.push(IoSlice::new(&header));
        slices.extend(parts.iter().filter(|p| !p.is_empty()).map(|p| IoSlice::new(p)));
        write_all_vectored(&mut self.out, &mut slices).map_err(ProtocolError::Io)?;
        self.sequence = self.sequence.wrapping_add(1);
        let n = HEADER_SIZE as u64 + length;
        self.bytes += n;
        Ok(n)
    }

    pub fn flush(&mut self) -> Result<(), ProtocolError> {
        self.out.flush().map_err(ProtocolError::Io)
    }
}

fn write_all_vectored<W: Write>(w: &mut W, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "peer stopped reading")),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// What [`MessageReader::recv`] returns.
#[derive(Debug)]
pub enum Incoming {
    Message(Message),
    /// A page batch follows; pass the header to [`MessageReader::read_pages`] now.
    Pages(Header),
}

/// What one page batch carried.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PagesReceived {
    pub round: u32,
    pub data_pages: u64,
    pub zero_pages: u64,
    pub bytes: u64,
}

/// A read error as the protocol reports it: end of stream and timeouts by name.
fn io_error(e: io::Error, during: &'static str) -> ProtocolError {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => ProtocolError::Closed { during },
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ProtocolError::Timeout { during },
        _ => ProtocolError::Io(e),
    }
}

/// Reads and checks messages.
pub struct MessageReader<R> {
    input: R,
    sequence: u32,
    bytes: u64,
    entries: Vec<u8>,
}

impl<R: Read> MessageReader<R> {
    pub fn new(input: R) -> Self {
        Self {
            input,
            sequence: 0,
            bytes: 0,
            entries: Vec::new(),
        }
    }

    pub fn get_ref(&self) -> &R {
        &self.input
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.input
    }

    /// Bytes read so far, headers included.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    fn read_exact(&mut self, buf: &mut [u8], during: &'static str) -> Result<(), ProtocolError> {
        self.input.read_exact(buf).map_err(|e| io_error(e, during))?;
        self.bytes += buf.len() as u64;
        Ok(())
    }

    /// Reads a payload of `length` bytes (checked against its command's limit by the caller). The buffer grows
    /// with the data that has arrived, [`PAYLOAD_CHUNK`] at a time, never to the declared length up front: a peer
    /// that declares a large message and sends little makes the reader hold little.
    fn read_payload(&mut self, length: u64, during: &'static str) -> Result<Vec<u8>, ProtocolError> {
        // The caller bounded `length` (at most MAX_PAYLOAD), so it fits.
        let len = usize::try_from(length).unwrap_or(usize::MAX);
        let mut payload = Vec::new();
        while payload.len() < len {
            let start = payload.len();
            let chunk = (len - start).min(PAYLOAD_CHUNK.max(start));
            payload.resize(start + chunk, 0);
            self.read_exact(&mut payload[start..], during)?;
        }
        Ok(payload)
    }

    /// Reads the next header and, except for page batches, its payload.
    pub fn recv(&mut self) -> Result<Incoming, ProtocolError> {
        let mut hb = [0u8; HEADER_SIZE];
        self.read_exact(&mut hb, "between messages")?;
        let header = Header::decode_checked(&hb)?;
        let command = Command::try_from(header.command)?;
        if header.sequence != self.sequence {
            return Err(ProtocolError::Sequence {
                expected: self.sequence,
                got: header.sequence,
            });
        }
        self.sequence = self.sequence.wrapping_add(1);
        let limit = match command {
            Command::Pages | Command::Frames => MAX_PAYLOAD,
            Command::State => MAX_STATE as u64,
            _ => u64::from(MAX_CONFIG) + 64 * 1024,
        };
        if header.length > limit {
            return Err(ProtocolError::TooLong {
                command,
                length: header.length,
                limit,
            });
        }
        if command == Command::Pages {
            return Ok(Incoming::Pages(header));
        }
        if command != Command::Hello && header.flags != 0 {
            return Err(malformed(command, format!("unknown flags {:#x}", header.flags)));
        }
        let payload = self.read_payload(header.length, "inside a message")?;
        if crc32fast::hash(&payload) != header.crc {
            return Err(ProtocolError::Checksum {
                command,
                sequence: header.sequence,
            });
        }
        Message::decode(command, header.flags, &payload).map(Incoming::Message)
    }

    /// Reads a message and requires it not to be a page batch.
    pub fn recv_message(&mut self, during: &'static str) -> Result<Message, ProtocolError> {
        match self.recv()? {
            Incoming::Message(m) => Ok(m),
            Incoming::Pages(_) => Err(ProtocolError::Unexpected {
                got: Command::Pages,
                during,
            }),
        }
    }
}

/// Where the contents of a page batch go (guest RAM at the destination). The reader has checked every run against
/// the layout before the sink sees it.
pub trait PageSink {
    /// `data` belongs at byte `offset` of the run that starts at flat page `page` (a run arrives in pieces, in
    /// order).
    fn write(&mut self, page: u64, offset: usize, data: &[u8]) -> Result<(), RamError>;
    /// The run of `npages` pages from `page` is all zero.
    fn zero(&mut self, page: u64, npages: u64) -> Result<(), RamError>;
}

impl<R: BufRead> MessageReader<R> {
    /// Reads a page batch and hands its runs to `sink` as they arrive, without a copy of the batch in between.
    ///
    /// Every run is checked against `layout` before the sink sees a byte. The checksum covers the whole payload and
    /// is checked at the end: a corrupted batch has then already reached the sink, so the caller must treat the
    /// error as fatal for the migration (the destination's guest never runs with it).
    pub fn read_pages(
        &mut self,
        header: &Header,
        layout: &RamLayout,
        sink: &mut impl PageSink,
    ) -> Result<PagesReceived, ProtocolError> {
        let cmd = Command::Pages;
        if header.flags != 0 {
            return Err(malformed(cmd, format!("unknown flags {:#x}", header.flags)));
        }
        if header.length < 8 {
            return Err(malformed(cmd, "shorter than its count"));
        }
        let mut crc = crc32fast::Hasher::new();
        let mut head = [0u8; 8];
        self.read_exact(&mut head, "inside a page batch")?;
        crc.update(&head);
        let count = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let round = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if count == 0 || count > MAX_ENTRIES {
            return Err(malformed(
                cmd,
                format!("{count} entries (1..={MAX_ENTRIES} allowed)"),
            ));
        }
        let entries_len = count as usize * 16;
        if header.length < 8 + entries_len as u64 {
            return Err(malformed(cmd, "shorter than its entries"));
        }
        let mut entries = std::mem::take(&mut self.entries);
        entries.resize(entries_len, 0);
        let runs = self.read_runs(&mut entries, &mut crc, header, layout);
        self.entries = entries;
        let mut out = PagesReceived {
            round,
            ..PagesReceived::default()
        };
        for r in &runs? {
            let n = u64::from(r.npages);
            if r.flags & PAGE_ZERO != 0 {
                sink.zero(r.page, n)?;
                out.zero_pages += n;
            } else {
                self.stream_run(r.page, n as usize * PAGE_SIZE, &mut crc, sink)?;
                out.data_pages += n;
            }
        }
        if crc.finalize() != header.crc {
            return Err(ProtocolError::Checksum {
                command: cmd,
                sequence: header.sequence,
            });
        }
        out.bytes = HEADER_SIZE as u64 + header.length;
        Ok(out)
    }

    /// Reads the entry table and checks each run (known flags, inside one region) and the payload length.
    fn read_runs(
        &mut self,
        entries: &mut [u8],
        crc: &mut crc32fast::Hasher,
        header: &Header,
        layout: &RamLayout,
    ) -> Result<Vec<PageRun>, ProtocolError> {
        let cmd = Command::Pages;
        self.read_exact(entries, "inside a page batch")?;
        crc.update(entries);
        let runs: Vec<PageRun> = entries
            .as_chunks::<16>()
            .0
            .iter()
            .map(|e| {
                let mut p = [0u8; 8];
                p.copy_from_slice(&e[0..8]);
                PageRun {
                    page: u64::from_le_bytes(p),
                    npages: u32::from_le_bytes([e[8], e[9], e[10], e[11]]),
                    flags: u32::from_le_bytes([e[12], e[13], e[14], e[15]]),
                }
            })
            .collect();
        let mut data_bytes = 0u64;
        for r in &runs {
            if r.flags & !PAGE_ZERO != 0 {
                return Err(malformed(cmd, format!("unknown page flags {:#x}", r.flags)));
            }
            if !layout.run_in_one_region(r.page, u64::from(r.npages)) {
                return Err(ProtocolError::PageOutOfRange {
                    page: r.page,
                    npages: u64::from(r.npages),
                    total: layout.total_pages(),
                });
            }
            if r.flags & PAGE_ZERO == 0 {
                data_bytes += u64::from(r.npages) * PAGE_SIZE as u64;
            }
        }
        if header.length != 8 + entries.len() as u64 + data_bytes {
            return Err(malformed(
                cmd,
                format!(
                    "length {} does not match its entries ({} data bytes)",
                    header.length, data_bytes
                ),
            ));
        }
        Ok(runs)
    }

    /// Moves `len` bytes of a data run from the input's buffer to the sink, checksumming them on the way.
    fn stream_run(
        &mut self,
        page: u64,
        len: usize,
        crc: &mut crc32fast::Hasher,
        sink: &mut impl PageSink,
    ) -> Result<(), ProtocolError> {
        let during = "inside a page batch";
        let mut done = 0;
        while done < len {
            let chunk = match self.input.fill_buf() {
                Ok([]) => return Err(ProtocolError::Closed { during }),
                Ok(chunk) => chunk,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_error(e, during)),
            };
            let take = chunk.len().min(len - done);
            crc.update(&chunk[..take]);
            sink.write(page, done, &chunk[..take])?;
            self.input.consume(take);
            self.bytes += take as u64;
            done += take;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;

    /// Guest RAM as a plain vector, flat page index over `layout`.
    struct VecRam {
        layout: RamLayout,
        bytes: Vec<u8>,
    }

    impl VecRam {
        fn new(regions: &[RamRegion]) -> Self {
            let layout = RamLayout::new(regions).unwrap();
            let bytes = vec![0; layout.total_bytes() as usize];
            Self { layout, bytes }
        }

        fn page(&self, p: u64) -> &[u8] {
            &self.bytes[p as usize * PAGE_SIZE..][..PAGE_SIZE]
        }

        fn fill(&mut self, p: u64, v: u8) {
            self.bytes[p as usize * PAGE_SIZE..][..PAGE_SIZE].fill(v);
        }

        fn total_pages(&self) -> u64 {
            self.layout.total_pages()
        }
    }

    impl PageSink for VecRam {
        fn write(&mut self, page: u64, offset: usize, data: &[u8]) -> Result<(), RamError> {
            let at = page as usize * PAGE_SIZE + offset;
            self.bytes[at..at + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn zero(&mut self, page: u64, npages: u64) -> Result<(), RamError> {
            self.bytes[page as usize * PAGE_SIZE..][..npages as usize * PAGE_SIZE].fill(0);
            Ok(())
        }
    }

    /// Adds page `p` of `src` to the batch.
    fn push(b: &mut PageBatch, src: &VecRam, p: u64) -> bool {
        b.push_page_with(&src.layout, p, |buf| {
            buf.copy_from_slice(src.page(p));
            Ok::<(), Infallible>(())
        })
        .unwrap()
    }

    fn hello() -> Hello {
        Hello {
            version: VERSION,
            mode: Mode::Live,
            flags: HELLO_VERIFY,
            regions: vec![RamRegion {
                gpa: 0,
                size: 64 * 4096,
            }],
            mac: [0x52, 0x54, 0, 1, 2, 3],
            migration_id: "m-1".into(),
            config: b"{\"mem\":1}".to_vec(),
        }
    }

    fn all_messages() -> Vec<Message> {
        vec![
            Message::Hello(hello()),
            Message::HelloAck,
            Message::RoundEnd(RoundEnd {
                round: 3,
                pages: 9,
                bytes: 99,
                bandwidth: 1 << 30,
            }),
            Message::State(vec![1, 2, 3]),
            Message::Frames(vec![vec![0xff; 60], vec![7; 1514]]),
            Message::Verify(0x0123_4567_89ab_cdef_0011_2233_4455_6677),
            Message::Complete {
                paused_ns: 77,
                commit_within_ns: 5,
            },
            Message::Ready,
            Message::Commit,
            Message::RoundAck(7),
            Message::Ack(Ack {
                resumed_ns: 5,
                restore_us: 6,
            }),
            Message::Abort("no".into()),
            Message::Close,
        ]
    }

    fn ram() -> VecRam {
        VecRam::new(&[RamRegion {
            gpa: 0,
            size: 64 * 4096,
        }])
    }

    #[test]
    fn round_trip_every_message() {
        let mut w = MessageWriter::new(Vec::new());
        for m in all_messages() {
            w.send(&m).unwrap();
        }
        let buf = w.into_inner();
        let mut r = MessageReader::new(&buf[..]);
        for m in all_messages() {
            assert_eq!(r.recv_message("test").unwrap(), m);
        }
        assert!(matches!(r.recv(), Err(ProtocolError::Closed { .. })));
    }

    /// A stream with a hello, one page batch (data and zero runs) and a complete.
    fn page_stream(src: &VecRam) -> Vec<u8> {
        let mut w = MessageWriter::new(Vec::new());
        w.send(&Message::Hello(hello())).unwrap();
        let mut b = PageBatch::new(1 << 20);
        b.round = 2;
        for p in 0..src.total_pages() {
            push(&mut b, src, p);
        }
        b.flush(&mut w).unwrap();
        w.send(&Message::Complete {
            paused_ns: 1,
            commit_within_ns: 0,
        })
        .unwrap();
        w.into_inner()
    }

    fn source_ram() -> VecRam {
        let mut src = ram();
        for (p, v) in [(1u64, 1u8), (2, 2), (3, 3), (10, 10), (63, 63)] {
            src.fill(p, v);
        }
        src
    }

    fn receive(stream: &[u8], dst: &mut VecRam) -> Result<Vec<PagesReceived>, ProtocolError> {
        let mut r = MessageReader::new(stream);
        let layout = dst.layout.clone();
        let mut got = Vec::new();
        loop {
            match r.recv()? {
                Incoming::Pages(h) => got.push(r.read_pages(&h, &layout, dst)?),
                Incoming::Message(Message::Complete { .. }) => return Ok(got),
                Incoming::Message(_) => {}
            }
        }
    }

    #[test]
    fn pages_round_trip_with_zero_runs() {
        let src = source_ram();
        let stream = page_stream(&src);
        let mut dst = ram();
        // A page that is non-zero at the destination but zero at the source must come out zero.
        dst.fill(20, 0xee);
        let got = receive(&stream, &mut dst).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].round, 2);
        assert_eq!(got[0].data_pages, 5);
        assert_eq!(got[0].zero_pages, 59);
        assert!(src.bytes == dst.bytes, "the destination holds the source's pages");
        assert_eq!(dst.page(20)[0], 0);
    }

    #[test]
    fn runs_are_merged() {
        let src = source_ram();
        let mut b = PageBatch::new(1 << 20);
        for p in 0..src.total_pages() {
            push(&mut b, &src, p);
        }
        // zero 0, data 1-3, zero 4-9, data 10, zero 11-62, data 63
        let shape: Vec<(u64, u32, u32)> = b.entries.iter().map(|e| (e.page, e.npages, e.flags)).collect();
        assert_eq!(
            shape,
            vec![
                (0, 1, PAGE_ZERO),
                (1, 3, 0),
                (4, 6, PAGE_ZERO),
                (10, 1, 0),
                (11, 52, PAGE_ZERO),
                (63, 1, 0)
            ]
        );
        assert_eq!(b.data_len(), 5 * PAGE_SIZE);
    }

    /// Flipping any single byte of the stream must give an error, never a panic, and never a silent success.
    #[test]
    fn every_single_byte_corruption_is_caught() {
        let mut src = ram();
        for (p, v) in [(1u64, 1u8), (2, 2), (9, 9)] {
            src.fill(p, v);
        }
        let stream = page_stream(&src);
        for i in 0..stream.len() {
            let flips: &[u8] = if i % 4096 < 64 {
                &[0x01, 0x80, 0xff]
            } else {
                &[0x01]
            };
            for flip in flips {
                let mut bad = stream.clone();
                bad[i] ^= flip;
                let mut dst = ram();
                assert!(
                    receive(&bad, &mut dst).is_err(),
                    "corruption at byte {i} (^{flip:#x}) went unnoticed"
                );
            }
        }
    }

    #[test]
    fn every_truncation_is_caught() {
        let src = source_ram();
        let stream = page_stream(&src);
        for cut in 0..stream.len() {
            let mut dst = ram();
            let err = receive(&stream[..cut], &mut dst).unwrap_err();
            assert!(matches!(err, ProtocolError::Closed { .. }), "cut at {cut}: {err}");
        }
    }

    #[test]
    fn version_and_magic_mismatch() {
        let mut h = hello();
        h.version = VERSION + 1;
        let mut w = MessageWriter::new(Vec::new());
        w.send(&Message::Hello(h)).unwrap();
        let buf = w.into_inner();
        let err = MessageReader::new(&buf[..]).recv().unwrap_err();
        assert!(matches!(err, ProtocolError::VersionMismatch { theirs, .. } if theirs == VERSION + 1));
        assert!(err.to_string().contains("same migrator build"));

        let mut w = MessageWriter::new(Vec::new());
        w.send_parts(Command::Hello, 0, &[&0x1234u64.to_le_bytes(), &[0; 40]])
            .unwrap();
        let buf = w.into_inner();
        assert!(matches!(
            MessageReader::new(&buf[..]).recv(),
            Err(ProtocolError::BadMagic { .. })
        ));
    }

    /// Well-checksummed but semantically bad batches: out-of-range pages, runs across regions, length mismatches.
    #[test]
    fn bad_page_batches_are_rejected() {
        let mut dst = VecRam::new(&[
            RamRegion {
                gpa: 0,
                size: 8 * 4096,
            },
            RamRegion {
                gpa: 1 << 32,
                size: 8 * 4096,
            },
        ]);
        let layout = dst.layout.clone();
        let entry = |page: u64, npages: u32, flags: u32| {
            let mut e = Vec::new();
            e.extend_from_slice(&page.to_le_bytes());
            e.extend_from_slice(&npages.to_le_bytes());
            e.extend_from_slice(&flags.to_le_bytes());
            e
        };
        let batch = |count: u32, entries: Vec<u8>, data: Vec<u8>| {
            let mut head = count.to_le_bytes().to_vec();
            head.extend_from_slice(&0u32.to_le_bytes());
            let mut w = MessageWriter::new(Vec::new());
            w.send_parts(Command::Pages, 0, &[&head, &entries, &data])
                .unwrap();
            w.into_inner()
        };
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("page past the end", batch(1, entry(16, 1, 0), vec![1; 4096])),
            ("run across regions", batch(1, entry(7, 2, 0), vec![1; 8192])),
            (
                "huge run overflow",
                batch(1, entry(u64::MAX, 2, PAGE_ZERO), vec![]),
            ),
            ("zero npages", batch(1, entry(0, 0, 0), vec![])),
            ("unknown flag", batch(1, entry(0, 1, 4), vec![])),
            ("missing data", batch(1, entry(0, 2, 0), vec![1; 4096])),
            ("extra data", batch(1, entry(0, 1, PAGE_ZERO), vec![1; 4096])),
            ("zero count", batch(0, vec![], vec![])),
            ("count beyond entries", batch(3, entry(0, 1, PAGE_ZERO), vec![])),
            ("count too large", batch(MAX_ENTRIES + 1, vec![], vec![])),
        ];
        for (what, stream) in cases {
            let mut r = MessageReader::new(&stream[..]);
            let res = match r.recv().unwrap() {
                Incoming::Pages(h) => r.read_pages(&h, &layout, &mut dst),
                Incoming::Message(m) => panic!("{what}: got {m:?}"),
            };
            assert!(res.is_err(), "{what} was accepted");
        }
        // The good case of the same shape works.
        let ok = batch(
            2,
            [entry(8, 1, 0), entry(9, 7, PAGE_ZERO)].concat(),
            vec![5; 4096],
        );
        let mut r = MessageReader::new(&ok[..]);
        let Incoming::Pages(h) = r.recv().unwrap() else {
            panic!()
        };
        let got = r.read_pages(&h, &layout, &mut dst).unwrap();
        assert_eq!((got.data_pages, got.zero_pages), (1, 7));
    }

    /// Recomputes the header checksum of a hand-edited message.
    fn reseal(b: &mut [u8]) {
        let mut h = Header::decode(b[..HEADER_SIZE].try_into().unwrap());
        h.seal();
        b[..HEADER_SIZE].copy_from_slice(&h.encode());
    }

    #[test]
    fn bad_headers_are_rejected() {
        let mut w = MessageWriter::new(Vec::new());
        w.send(&Message::Close).unwrap();
        let good = w.into_inner();
        let mut bad = good.clone();
        bad[9] = 1;
        assert!(matches!(
            MessageReader::new(&bad[..]).recv(),
            Err(ProtocolError::HeaderChecksum)
        ));
        let mut bad = good.clone();
        bad[30] = 1;
        reseal(&mut bad);
        assert!(
            matches!(
                MessageReader::new(&bad[..]).recv(),
                Err(ProtocolError::HeaderChecksum)
            ),
            "reserved"
        );
        let mut unknown = good.clone();
        unknown[0] = 99;
        reseal(&mut unknown);
        assert!(matches!(
            MessageReader::new(&unknown[..]).recv(),
            Err(ProtocolError::UnknownCommand { command: 99 })
        ));
        let mut seq = good.clone();
        seq[16] = 5;
        reseal(&mut seq);
        assert!(matches!(
            MessageReader::new(&seq[..]).recv(),
            Err(ProtocolError::Sequence { .. })
        ));
        let mut long = good.clone();
        long[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        reseal(&mut long);
        assert!(matches!(
            MessageReader::new(&long[..]).recv(),
            Err(ProtocolError::TooLong { .. })
        ));
        let mut flags = good;
        flags[4] = 1;
        reseal(&mut flags);
        assert!(MessageReader::new(&flags[..]).recv().is_err());
    }

    #[test]
    fn malformed_payloads_are_rejected() {
        let send = |cmd: Command, payload: &[u8]| {
            let mut w = MessageWriter::new(Vec::new());
            w.send_parts(cmd, 0, &[payload]).unwrap();
            w.into_inner()
        };
        let cases = [
            send(Command::Frames, &5u32.to_le_bytes()),
            send(Command::Frames, &[1, 0, 0, 0, 4, 0, 0, 0, 1, 2, 3, 4]),
            send(Command::Frames, &(MAX_FRAMES + 1).to_le_bytes()),
            send(Command::Verify, &[0; 15]),
            send(Command::Ack, &[0; 17]),
            send(Command::Abort, &100u32.to_le_bytes()),
            send(Command::Complete, &[0; 17]),
            send(Command::Ready, &[0]),
            send(Command::Commit, &[0]),
            send(Command::RoundAck, &[0; 3]),
            send(Command::RoundAck, &[0; 5]),
            send(Command::Close, &[0]),
            send(Command::Hello, &MAGIC.to_le_bytes()),
        ];
        for (i, c) in cases.iter().enumerate() {
            assert!(MessageReader::new(&c[..]).recv().is_err(), "case {i} accepted");
        }
        // Hello with a bad region.
        let mut h = hello();
        h.regions = vec![RamRegion { gpa: 5, size: 4096 }];
        let mut w = MessageWriter::new(Vec::new());
        w.send(&Message::Hello(h)).unwrap();
        let buf = w.into_inner();
        assert!(MessageReader::new(&buf[..]).recv().is_err());
    }
}
