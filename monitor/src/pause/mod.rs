//! The live sources of pause windows: our migrator's event stream ([`migrator`]), QEMU's QMP ([`qmp`]) and libvirt's
//! domain events ([`libvirt`]). (Windows inferred from the data plane are analysis:
//! `migmon_analysis::correlate::wire`.) The migrator and QMP sources are futures to run on the watch's tokio runtime
//! (`Sources::spawn`); libvirt, a blocking library with its own event loop, runs on a thread of its own
//! ([`SourceHandle`]). Each hands `trace::Event`s to an emit callback, so it plugs into whatever channel the watch
//! pipeline uses (`move |ev| tx.send(ev).is_ok()`). A source stops when its emit callback says the receiver is gone,
//! or when its task is dropped (its thread is stopped).

#[cfg(test)]
use std::io::Read;
use std::{
    io,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use migmon_analysis::trace::Event;
use tokio::io::{AsyncRead, AsyncReadExt};

#[cfg(test)]
mod fuzz;
pub mod libvirt;
pub mod migrator;
pub mod qmp;

/// Where a source delivers events. Returns `false` when the receiver is gone (the source then stops).
pub trait Emit: Send + Sync + 'static {
    fn emit(&self, ev: Event) -> bool;
}

impl<F: Fn(Event) -> bool + Send + Sync + 'static> Emit for F {
    fn emit(&self, ev: Event) -> bool {
        self(ev)
    }
}

impl Emit for std::sync::mpsc::Sender<Event> {
    fn emit(&self, ev: Event) -> bool {
        self.send(ev).is_ok()
    }
}

impl Emit for tokio::sync::mpsc::UnboundedSender<Event> {
    fn emit(&self, ev: Event) -> bool {
        self.send(ev).is_ok()
    }
}

/// True for a migration event that pauses a vCPU: the watch pipeline samples the MAC counters right then, so frames
/// black-holed after the pause are counted exactly.
pub fn is_pause(ev: &Event) -> bool {
    matches!(ev, Event::Migration { ev, .. } if ev.phase == migevents::Phase::Pause)
}

/// A source running on a thread of its own (a blocking library): stop it, or wait for it.
pub struct SourceHandle {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SourceHandle {
    pub(crate) fn new(stop: Arc<AtomicBool>, thread: JoinHandle<()>) -> Self {
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Asks the source to stop and waits for its thread (it notices within its poll interval).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Whether the source thread has ended (its input closed or the receiver went away).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }
}

impl Drop for SourceHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A warning note, as sources emit them for skipped input.
pub(crate) fn warn_note(message: String) -> Event {
    Event::Note {
        ts_ns: migevents::monotonic_ns(),
        level: "warning".to_owned(),
        message,
    }
}

/// The longest line a source accepts (1 MiB): a longer one is an error, never a larger buffer.
pub const MAX_LINE: usize = 1 << 20;

/// Splits a byte stream into lines, keeping a partial line across reads (a file still being written). The buffer never
/// holds more than the bound plus one read: a line longer than the bound is an `InvalidData` error (a socket's caller
/// drops that connection; a file's goes on), the buffer is emptied, and the rest of that line is dropped as it comes. Sources read through [`LineReader::next_line_async`]; the blocking
/// [`LineReader::next_line`] serves the tests and the fuzz target, on the same splitting code.
pub(crate) struct LineReader<R> {
    inner: R,
    buf: Vec<u8>,
    /// Bytes of `buf` already searched for a newline.
    scanned: usize,
    max: usize,
    /// After an over-long line: the rest of it, up to its newline, is dropped as it comes.
    discarding: bool,
}

impl<R> LineReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        Self::with_limit(inner, MAX_LINE)
    }

    pub(crate) fn with_limit(inner: R, max: usize) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            scanned: 0,
            max,
            discarding: false,
        }
    }

    /// A complete line from the buffer; `None` when more input is needed; `InvalidData` for a line longer than the
    /// bound (the buffer is released).
    fn buffered_line(&mut self) -> Option<io::Result<String>> {
        if self.discarding {
            let Some(pos) = self.buf.iter().position(|&b| b == b'\n') else {
                self.buf.clear();
                return None;
            };
            self.buf.drain(..=pos);
            self.discarding = false;
        }
        if let Some(off) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
            let pos = self.scanned + off;
            let line = String::from_utf8_lossy(&self.buf[..pos]).into_owned();
            self.buf.drain(..=pos);
            self.scanned = 0;
            return Some(Ok(line));
        }
        self.scanned = self.buf.len();
        if self.buf.len() > self.max {
            let len = self.buf.len();
            self.buf = Vec::new();
            self.scanned = 0;
            self.discarding = true;
            return Some(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "a line longer than {} bytes ({len} bytes without a newline)",
                    self.max
                ),
            )));
        }
        None
    }
    /// What is left of a partial line at the end of input (`None` if only whitespace).
    pub(crate) fn take_partial(&mut self) -> Option<String> {
        self.scanned = 0;
        if self.buf.iter().all(u8::is_ascii_whitespace) {
            self.buf.clear();
            return None;
        }
        let s = String::from_utf8_lossy(&self.buf).into_owned();
        self.buf.clear();
        Some(s)
    }

    /// The bytes held for a partial line (the bound's test reads it).
    #[cfg(test)]
    fn held(&self) -> usize {
        self.buf.capacity()
    }
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    /// The next complete line; `Ok(None)` at end of input; `InvalidData` for a line longer than the bound.
    /// Cancel-safe: a line cut short by a dropped call stays buffered for the next.
    pub(crate) async fn next_line_async(&mut self) -> io::Result<Option<String>> {
        loop {
            if let Some(line) = self.buffered_line() {
                return line.map(Some);
            }
            self.buf.reserve(8192);
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                return Ok(None);
            }
        }
    }
}

#[cfg(test)]
impl<R: Read> LineReader<R> {
    /// The next complete line, blocking; `Ok(None)` at end of input; `InvalidData` for a line longer than the bound.
    pub(crate) fn next_line(&mut self) -> io::Result<Option<String>> {
        loop {
            if let Some(line) = self.buffered_line() {
                return line.map(Some);
            }
            let mut chunk = [0u8; 8192];
            let n = self.inner.read(&mut chunk)?;
            if n == 0 {
                return Ok(None);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An endless stream of one byte, never a newline.
    struct Endless;

    impl Read for Endless {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            buf.fill(b'x');
            Ok(buf.len())
        }
    }

    #[test]
    fn line_reader_splits_lines_across_reads() {
        let data: &[u8] = b"{\"a\":1}\n\n{\"b\":2}\npartial";
        let mut r = LineReader::new(Read::chain(io::Cursor::new(data), io::empty()));
        assert_eq!(r.next_line().unwrap().as_deref(), Some("{\"a\":1}"));
        assert_eq!(r.next_line().unwrap().as_deref(), Some(""));
        assert_eq!(r.next_line().unwrap().as_deref(), Some("{\"b\":2}"));
        assert_eq!(r.next_line().unwrap(), None);
        assert_eq!(r.take_partial().as_deref(), Some("partial"));
    }

    #[test]
    fn line_reader_refuses_an_overlong_line_without_growing() {
        let mut r = LineReader::with_limit(Endless, 64 * 1024);
        let err = r.next_line().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("longer than 65536 bytes"), "{err}");
        assert_eq!(r.held(), 0, "the buffer is released");
        // The default bound is 1 MiB, and the buffer stays within it plus one read.
        let mut r = LineReader::new(Endless.take(3 * MAX_LINE as u64));
        assert!(r.next_line().is_err());
        let mut r = LineReader::new(Endless.take(MAX_LINE as u64 / 2).chain(&b"\nnext\n"[..]));
        assert_eq!(r.next_line().unwrap().map(|l| l.len()), Some(MAX_LINE / 2));
        assert_eq!(r.next_line().unwrap().as_deref(), Some("next"));
        // After an over-long line, the rest of it is dropped as it comes and the next line is read.
        let data = [vec![b'x'; 200_000], b"\nafter\n".to_vec()].concat();
        let mut r = LineReader::with_limit(io::Cursor::new(data), 64 * 1024);
        assert!(r.next_line().is_err());
        assert!(r.held() <= 64 * 1024 + 8192, "{}", r.held());
        assert_eq!(r.next_line().unwrap().as_deref(), Some("after"));
    }
}
