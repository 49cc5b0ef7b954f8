//! The event pipeline of `migmon watch`: every source pushes [`Event`]s through a [`Sender`] from
//! [`Pipeline::sender`]; one consumer ([`Pipeline::consume`], on the calling thread) hands each to the [`Output`]
//! (stdout and the trace) in the order they arrived, counts it for the [`Summary`], shows it to the [`Observer`]s
//! (metrics, `--record-dir`) and gives it to the [`Keeper`] (the live gate). [`Control`] carries the stop and sample-now switches between the parts.
//!
//! The sources are tasks on one tokio runtime, [`Sources`]: the probe collector (ring buffers through `AsyncFd`),
//! the pause-window sources (QMP, the migrator events socket, followed files), the metrics server, the clock sampler
//! and the signal handler. A new source is an `async` function that takes a [`Sender`] (sending never blocks: the
//! channel is unbounded) and, if it must finish cleanly, a [`Control`]; `Sources::spawn` starts it. A blocking
//! library runs in `tokio::task::spawn_blocking` or a thread of its own and sends through the same [`Sender`].
//!
//! ```text
//!  Sources (tokio) ──► Sender<Event> ──► consumer (this thread) ──► Output, Summary, observers
//! ```

use std::{
    collections::BTreeMap,
    future::Future,
    sync::{
        Arc,
        mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use migmon_analysis::trace::Event;
use tokio::{
    runtime::{Handle, Runtime},
    sync::{Notify, watch},
    task::JoinHandle,
};

use crate::output::Output;

/// Shared switches between the pipeline's parts: the consumer, the sources' tasks and any thread.
#[derive(Clone)]
pub struct Control {
    inner: Arc<Switches>,
}

struct Switches {
    stop: watch::Sender<bool>,
    sample: Notify,
}

impl Control {
    fn new() -> Self {
        Self {
            inner: Arc::new(Switches {
                stop: watch::Sender::new(false),
                sample: Notify::new(),
            }),
        }
    }

    /// Asks the probe collector to sample the MAC counters now (e.g. when a VM pause is announced).
    pub fn request_sample(&self) {
        self.inner.sample.notify_one();
    }

    /// Asks every part of the pipeline to finish.
    pub fn stop(&self) {
        self.inner.stop.send_replace(true);
    }

    pub fn stopped(&self) -> bool {
        *self.inner.stop.borrow()
    }

    /// Completes once [`Control::stop`] was called (at once if it was already).
    pub async fn stopping(&self) {
        let mut rx = self.inner.stop.subscribe();
        // The sender lives in `self`, so the wait ends only by the value.
        let _ = rx.wait_for(|stopped| *stopped).await;
    }

    /// Completes at the next [`Control::request_sample`] (at once if one is pending).
    pub async fn sample_requested(&self) {
        self.inner.sample.notified().await;
    }
}

/// The collector's I/O: one tokio runtime, and the tasks of every source of events on it.
pub struct Sources {
    runtime: Runtime,
    tasks: Vec<(String, JoinHandle<()>)>,
    tx: Sender<Event>,
    control: Control,
}

/// How long the tasks get to finish once the watch is over.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// The consumer writes what it holds (stdout, the `--record` trace) whenever its queue runs empty, and at least
/// this often while events keep coming.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);

impl Sources {
    /// A runtime for `pipeline`'s sources: two worker threads (`migmon-io`), timers and I/O.
    pub fn new(pipeline: &Pipeline) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("migmon-io")
            .enable_all()
            .build()
            .context("cannot start the I/O runtime (tokio)")?;
        Ok(Self {
            runtime,
            tasks: Vec::new(),
            tx: pipeline.sender(),
            control: pipeline.control(),
        })
    }

    /// A sender into the pipeline, for a new source.
    pub fn sender(&self) -> Sender<Event> {
        self.tx.clone()
    }

    /// The pipeline's switches.
    pub fn control(&self) -> Control {
        self.control.clone()
    }

    /// The runtime, to spawn from elsewhere or to enter (`handle().enter()`) where tokio objects are built.
    pub fn handle(&self) -> &Handle {
        self.runtime.handle()
    }

    /// Runs `fut` to its end on the runtime (a step that must finish before the watch starts: a bind, a first
    /// connect).
    pub fn block_on<F: Future>(&self, fut: F) -> F::Output {
        self.runtime.block_on(fut)
    }

    /// Starts a source as a task named `name`. It runs until it returns or the watch is over (then it is dropped at
    /// its next `.await`; a source that must do something last waits for [`Control::stopping`] instead).
    pub fn spawn(&mut self, name: &str, fut: impl Future<Output = ()> + Send + 'static) {
        let task = self.runtime.spawn(fut);
        self.tasks.push((name.to_owned(), task));
    }

    /// Starts a task whose end the caller waits for (the probe collector: [`Pipeline::consume`] drains until it ends).
    pub fn spawn_joined(&mut self, fut: impl Future<Output = ()> + Send + 'static) -> JoinHandle<()> {
        self.runtime.spawn(fut)
    }

    /// The names of the sources that have ended (their input closed, or they failed: each said why in a note).
    pub fn finished(&self) -> Vec<&str> {
        self.tasks
            .iter()
            .filter(|(_, t)| t.is_finished())
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// Stops every task: they are dropped at their next `.await` (sockets closed, the events socket removed).
    pub fn shutdown(self) {
        self.control.stop();
        for (_, t) in &self.tasks {
            t.abort();
        }
        self.runtime.shutdown_timeout(SHUTDOWN_GRACE);
    }
}

/// What an observer wants after seeing an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Finish the watch with this exit code.
    Stop(i32),
}

/// Sees every event the consumer handles, after it was printed (on a terminal) or queued for the next batched write
/// of stdout and the trace (see [`Output::flush`]).
pub type Observer = Box<dyn FnMut(&Event) -> Flow + Send>;

/// Takes each event by value after the output and the observers have seen it: the one part that keeps events (the
/// live correlation) gets them without a copy.
pub type Keeper = Box<dyn FnMut(Event) + Send>;

/// The event pipeline: many senders, one consumer.
pub struct Pipeline {
    tx: Sender<Event>,
    rx: Receiver<Event>,
    control: Control,
    keeper: Option<Keeper>,
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

impl Default for Pipeline {
    fn default() -> Self {
        Self::new()
    }
}

impl Pipeline {
    pub fn new() -> Self {
        let (tx, rx) = mpsc::channel();
        Self {
            tx,
            rx,
            control: Control::new(),
            keeper: None,
        }
    }

    /// Hands every event, once handled, to `keeper`.
    pub fn keep_with(&mut self, keeper: Keeper) {
        self.keeper = Some(keeper);
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
    /// left once `until_done` (the probe collector's task) has finished. Returns the summary and the exit code.
    pub fn consume(
        self,
        out: &mut Output,
        deadline: Option<Instant>,
        observers: &mut [Observer],
        until_done: Option<JoinHandle<()>>,
    ) -> Result<(Summary, i32)> {
        let Pipeline {
            tx,
            rx,
            control,
            mut keeper,
        } = self;
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
            if let Some(k) = &mut keeper {
                k(ev);
            }
            Ok(())
        };
        // Events handled since the deadline and the flush time were last checked: reading the clock per event was
        // a visible cost of a storm.
        let mut unchecked = 0u32;
        let mut flushed = Instant::now();
        loop {
            if control.stopped() {
                break;
            }
            if unchecked == 0 {
                let now = Instant::now();
                if deadline.is_some_and(|d| now >= d) {
                    break;
                }
                if now.duration_since(flushed) >= FLUSH_EVERY {
                    out.flush()?;
                    flushed = now;
                }
            }
            // Take what is queued without waiting; write it in one go once the queue is empty.
            match rx.try_recv() {
                Ok(ev) => {
                    handle(ev, out, &mut summary, &mut code)?;
                    unchecked = (unchecked + 1) % 256;
                    continue;
                }
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) => {
                    out.flush()?;
                    flushed = Instant::now();
                }
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
                out.flush()?;
                match rx.recv_timeout(Duration::from_millis(20)) {
                    Ok(ev) => handle(ev, out, &mut summary, &mut code)?,
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
        }
        while let Ok(ev) = rx.try_recv() {
            handle(ev, out, &mut summary, &mut code)?;
        }
        out.flush()?;
        summary.elapsed = elapsed;
        Ok((summary, code))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_run_on_the_runtime_and_see_the_switches() {
        let p = Pipeline::new();
        let mut sources = Sources::new(&p).unwrap();
        let control = sources.control();
        // A sample request made before anyone waits is kept for the next wait.
        control.request_sample();
        let (tx, control_t) = (sources.sender(), sources.control());
        let collector = sources.spawn_joined(async move {
            control_t.sample_requested().await;
            control_t.stopping().await;
            // A source that must do something last does it after the stop.
            let _ = tx.send(Event::Loss {
                ts_ns: 9,
                cpu: 0,
                count: 1,
            });
        });
        sources.spawn("forever", std::future::pending());
        let mut out = Output::new(true, None);
        control.stop();
        let (summary, code) = p.consume(&mut out, None, &mut [], Some(collector)).unwrap();
        assert_eq!((summary.lost, code), (1, 0), "the last event is consumed");
        assert!(sources.finished().is_empty());
        // Shutting down drops the task that never ends.
        sources.shutdown();
    }

    #[test]
    fn pipeline_takes_events_from_any_thread() {
        let p = Pipeline::new();
        let tx = p.sender();
        let control = p.control();
        assert!(!control.stopped());
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
