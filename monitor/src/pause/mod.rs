//! The live sources of pause windows: our migrator's event stream ([`migrator`]) and QEMU's QMP ([`qmp`]). (Windows
//! inferred from the data plane are analysis: `migmon_analysis::correlate::wire`.) Each live source runs on its own thread and hands `trace::Event`s to an emit callback, so it
//! plugs into whatever channel the watch pipeline uses (`move |ev| tx.send(ev).is_ok()`).

use std::{
    io::{self, Read},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use migmon_analysis::trace::Event;

#[cfg(test)]
mod fuzz;
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

impl Emit for std::sync::mpsc::SyncSender<Event> {
    fn emit(&self, ev: Event) -> bool {
        self.send(ev).is_ok()
    }
}

/// True for a migration event that pauses a vCPU: the watch pipeline samples the MAC counters right then, so frames
/// black-holed after the pause are counted exactly.
pub fn is_pause(ev: &Event) -> bool {
    matches!(ev, Event::Migration { ev, .. } if ev.phase == migevents::Phase::Pause)
}

/// A running source: stop it, or wait for it.
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

    /// Asks the source to stop and waits for its thread (it notices within its poll interval, 100 ms).
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
        level: "warn".to_owned(),
        message,
    }
}

/// Splits a byte stream into lines, keeping a partial line across reads (timeouts, a file still being written).
pub(crate) struct LineReader<R> {
    inner: R,
    buf: Vec<u8>,
}

impl<R: Read> LineReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        Self {
            inner,
            buf: Vec::new(),
        }
    }

    /// The next complete line; `Ok(None)` at end of input.
    pub(crate) fn next_line(&mut self) -> io::Result<Option<String>> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                return Ok(Some(String::from_utf8_lossy(&line[..pos]).into_owned()));
            }
            let mut chunk = [0u8; 8192];
            let n = self.inner.read(&mut chunk)?;
            if n == 0 {
                return Ok(None);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    pub(crate) fn take_partial(&mut self) -> Option<String> {
        if self.buf.iter().all(u8::is_ascii_whitespace) {
            self.buf.clear();
            return None;
        }
        let s = String::from_utf8_lossy(&self.buf).into_owned();
        self.buf.clear();
        Some(s)
    }
}
