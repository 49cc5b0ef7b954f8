//! The event pipeline of `migmon watch`: any thread pushes [`Event`]s through a [`Sender`] from
//! [`Pipeline::sender`]; one consumer ([`Pipeline::consume`]) hands each to the [`Output`] (stdout and the trace),
//! counts it for the [`Summary`] and shows it to the [`Observer`]s (metrics, the live gate). [`Control`] carries the
//! stop and sample-now switches between the threads.

use std::{
    collections::BTreeMap,
    os::fd::{AsFd, BorrowedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use migmon_analysis::trace::Event;
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::output::Output;

/// Shared switches between the pipeline's threads.
#[derive(Clone)]
pub struct Control {
    stop: Arc<AtomicBool>,
    sample: Arc<AtomicBool>,
    wake: Arc<EventFd>,
}

impl Control {
    fn new() -> Result<Self> {
        Ok(Self {
            stop: Arc::new(AtomicBool::new(false)),
            sample: Arc::new(AtomicBool::new(false)),
            wake: Arc::new(
                EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
                    .context("cannot create an eventfd")?,
            ),
        })
    }

    /// Asks the probe collector to sample the MAC counters now (e.g. when a VM pause is announced).
    pub fn request_sample(&self) {
        self.sample.store(true, Ordering::SeqCst);
        let _ = self.wake.write(1);
    }

    /// Asks every part of the pipeline to finish.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.wake.write(1);
    }

    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    pub(crate) fn wake_fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }

    pub(crate) fn take_sample_request(&self) -> bool {
        let _ = self.wake.read();
        self.sample.swap(false, Ordering::SeqCst)
    }
}

/// What an observer wants after seeing an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Finish the watch with this exit code.
    Stop(i32),
}

/// Sees every event the consumer handles, after it was recorded and printed (on a terminal) or queued for the next
/// batched write (otherwise; see [`Output::flush`]).
pub type Observer = Box<dyn FnMut(&Event) -> Flow + Send>;

/// The event pipeline: many senders, one consumer.
pub struct Pipeline {
    tx: Sender<Event>,
    rx: Receiver<Event>,
    control: Control,
}

/// Counts per kind and losses, printed at the end.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub counts: BTreeMap<&'static str, u64>,
    pub lost: u64,
    pub elapsed: Duration,
}

impl Summary {
    fn add(&mut self, ev: &Event) {
        *self.counts.entry(ev.kind()).or_default() += 1;
        if let Event::Loss { count, .. } = ev {
            self.lost += count;
        }
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let total: u64 = self.counts.values().sum();
        write!(f, "{total} events in {:.1} s", self.elapsed.as_secs_f64())?;
        if !self.counts.is_empty() {
            let parts: Vec<String> = self.counts.iter().map(|(k, n)| format!("{k} {n}")).collect();
            write!(f, " ({})", parts.join(", "))?;
        }
        if self.lost == 0 {
            write!(f, "; no events lost")
        } else {
            write!(
                f,
                "; {} EVENTS LOST (ring buffer full: the figures may be incomplete)",
                self.lost
            )
        }
    }
}

impl Pipeline {
    pub fn new() -> Result<Self> {
        let (tx, rx) = mpsc::channel();
        Ok(Self {
            tx,
            rx,
            control: Control::new()?,
        })
    }

    /// A sender for another source of events.
    pub fn sender(&self) -> Sender<Event> {
        self.tx.clone()
    }

    /// Stop and sample switches.
    pub fn control(&self) -> Control {
        self.control.clone()
    }

    /// Consumes events until stopped (Ctrl-C, `deadline`, an observer, or [`Control::stop`]), then drains what is
    /// left once `until_done` (the probe collector) has finished. Returns the summary and the exit code.
    pub fn consume(
        self,
        out: &mut Output,
        deadline: Option<Instant>,
        observers: &mut [Observer],
        until_done: Option<JoinHandle<()>>,
    ) -> Result<(Summary, i32)> {
        let Pipeline { tx, rx, control } = self;
        drop(tx);
        let start = Instant::now();
        let mut summary = Summary::default();
        let mut code = 0;
        let mut handle = |ev: Event, out: &mut Output, summary: &mut Summary, code: &mut i32| -> Result<()> {
            out.emit(&ev)?;
            summary.add(&ev);
            for o in observers.iter_mut() {
                if let Flow::Stop(c) = o(&ev) {
                    *code = c;
                    control.stop();
                }
            }
            Ok(())
        };
        // Events handled since the deadline was last checked: reading the clock per event was a visible cost of
        // a storm.
        let mut unchecked = 0u32;
        loop {
            if control.stopped() {
                break;
            }
            if unchecked == 0 && deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            // Take what is queued without waiting; print it in one write once the queue is empty.
            match rx.try_recv() {
                Ok(ev) => {
                    handle(ev, out, &mut summary, &mut code)?;
                    unchecked = (unchecked + 1) % 256;
                    continue;
                }
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) => out.flush(),
            }
            unchecked = 0;
            let wait = deadline.map_or(Duration::from_millis(100), |d| {
                d.saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(100))
            });
            match rx.recv_timeout(wait) {
                Ok(ev) => handle(ev, out, &mut summary, &mut code)?,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        control.stop();
        let elapsed = start.elapsed();
        if let Some(h) = until_done {
            // The collector does a last drain and sample before it detaches; take those events too.
            while !h.is_finished() {
                out.flush();
                match rx.recv_timeout(Duration::from_millis(20)) {
                    Ok(ev) => handle(ev, out, &mut summary, &mut code)?,
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            let _ = h.join();
        }
        while let Ok(ev) = rx.try_recv() {
            handle(ev, out, &mut summary, &mut code)?;
        }
        out.flush();
        summary.elapsed = elapsed;
        Ok((summary, code))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipeline_takes_events_from_any_thread() {
        let p = Pipeline::new().unwrap();
        let tx = p.sender();
        let control = p.control();
        let t = std::thread::spawn(move || {
            for i in 0..3 {
                tx.send(Event::Loss {
                    ts_ns: i,
                    cpu: 0,
                    count: 2,
                })
                .unwrap();
            }
        });
        t.join().unwrap();
        let mut seen = 0;
        let mut observers: Vec<Observer> = vec![Box::new(move |_ev: &Event| {
            seen += 1;
            if seen == 3 { Flow::Stop(7) } else { Flow::Continue }
        })];
        let mut out = Output::new(true, None);
        let (summary, code) = p
            .consume(
                &mut out,
                Some(Instant::now() + Duration::from_secs(5)),
                &mut observers,
                None,
            )
            .unwrap();
        assert_eq!(code, 7);
        assert_eq!(summary.counts.get("loss"), Some(&3));
        assert_eq!(summary.lost, 6);
        assert!(control.stopped());
    }
}
