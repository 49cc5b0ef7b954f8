//! `migmon watch --record-dir DIR`: traces that stay small however long the watch runs.
//!
//! - `background-NNNNNN.trace`: every event, in files of at most `--record-max-size` (rotated; the newest
//!   `--record-keep` are kept);
//! - `migration-ID.trace`: one per migration (per id its pause source gave), from `--lookback` before its first
//!   phase event until the live correlation has made it final (or [`HOLD_MAX_NS`] after its last phase event); the
//!   newest `--record-keep-migrations` are kept.
//!
//! Every file is a whole trace (header, events, end record), locked (`flock`) while it is written: a reader tells a
//! trace in progress from one whose watch died before its end record. `migmon report DIR` (and `check`, `whatif`, `export`)
//! merges a directory's traces: one host, one clock, events present in two files kept once. The look-back of a
//! migration trace is read back from the background files (an index of offsets, one mark per 100 ms of event time),
//! so recording costs no memory beyond a write buffer per open file.

use std::{
    collections::VecDeque,
    fs,
    io::{BufRead, BufReader, Seek, SeekFrom},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

use anyhow::{Context, Result, bail};
use migmon_analysis::{
    live::HOLD_MAX_NS,
    trace::{Event, TraceHeader, TraceWriter, lock_for_writing},
};

/// What `--record-dir` needs.
#[derive(Clone, Debug)]
pub struct RecordDirConfig {
    pub dir: PathBuf,
    pub max_size: u64,
    pub keep: usize,
    pub keep_migrations: usize,
    pub lookback_ns: u64,
}

/// An index mark: from this background file offset on, events are at or after `ts_ns` (arrival order is close to
/// time order; a margin of one mark covers the difference).
struct Mark {
    ts_ns: u64,
    file: PathBuf,
    offset: u64,
}

struct Background {
    writer: TraceWriter,
    path: PathBuf,
    /// Held until the end record is written.
    _lock: fs::File,
}

struct OpenMigration {
    id: String,
    writer: TraceWriter,
    path: PathBuf,
    /// Held until the end record is written.
    _lock: fs::File,
    last_phase_ns: u64,
}

/// How often what was written is flushed to the files (and released migrations' traces finished) when no event comes
/// to do it: a reader of a running watch's directory sees every event at most this late.
const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

/// The recorder: an observer of every event. A thread of its own flushes the files every [`FLUSH_EVERY`] while
/// they have unflushed lines, and finishes the traces of migrations the live correlation released, also while no
/// event comes.
pub struct RecordDir {
    /// `None` once finished.
    files: Arc<Mutex<Option<Files>>>,
    /// Dropping it stops the flusher.
    stop: Option<std::sync::mpsc::Sender<()>>,
    flusher: Option<std::thread::JoinHandle<()>>,
}

/// The open files and what they need.
struct Files {
    cfg: RecordDirConfig,
    header: Box<dyn Fn() -> TraceHeader + Send>,
    background: Option<Background>,
    seq: u64,
    index: VecDeque<Mark>,
    open: Vec<OpenMigration>,
    /// Ids of migrations whose traces were written (recently), so that a late phase event does not open another.
    done: VecDeque<String>,
    /// Ids the live correlation made final (its gate thread pushes them).
    released: Arc<Mutex<Vec<String>>>,
    /// Lines written since the last flush.
    dirty: bool,
    /// The time of the last event taken: the flusher's clock, so that event time alone decides when a migration
    /// outlived the longest hold.
    last_ts_ns: u64,
    /// The first write error, reported once.
    failed: bool,
}

/// A file name made of the id's safe characters.
fn file_id(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Creates the trace `path`, locked for writing first so that no reader ever sees it unlocked before its end record.
fn create_locked(path: &Path, header: &TraceHeader) -> Result<(TraceWriter, fs::File)> {
    let lock =
        lock_for_writing(path).with_context(|| format!("cannot create and lock {}", path.display()))?;
    let writer =
        TraceWriter::create(path, header).with_context(|| format!("cannot create {}", path.display()))?;
    Ok((writer, lock))
}

/// The files of `dir` whose names start with `prefix` and end in `.trace`, oldest (by name) first.
fn files_with(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(prefix))
                        && p.extension().is_some_and(|x| x == "trace")
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

impl RecordDir {
    /// Creates the directory (if needed) and the first background file. `header` makes each file's header.
    pub fn create(
        cfg: RecordDirConfig,
        header: impl Fn() -> TraceHeader + Send + 'static,
        released: Arc<Mutex<Vec<String>>>,
    ) -> Result<Self> {
        let files = Arc::new(Mutex::new(Some(Files::create(cfg, header, released)?)));
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let f = Arc::clone(&files);
        let flusher = std::thread::Builder::new()
            .name("migmon-record".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(FLUSH_EVERY)
                {
                    if let Some(f) = f.lock().unwrap_or_else(PoisonError::into_inner).as_mut() {
                        f.tick();
                    }
                }
            })
            .context("cannot start the --record-dir flusher thread")?;
        Ok(Self {
            files,
            stop: Some(stop),
            flusher: Some(flusher),
        })
    }

    /// Takes one event.
    pub fn observe(&mut self, ev: &Event) {
        if let Some(f) = self.files.lock().unwrap_or_else(PoisonError::into_inner).as_mut() {
            f.observe(ev);
        }
    }

    /// Finishes every file (the end of the watch).
    pub fn finish(mut self) -> Result<()> {
        self.stop_flusher();
        let files = self.files.lock().unwrap_or_else(PoisonError::into_inner).take();
        files.map_or(Ok(()), Files::finish)
    }

    fn stop_flusher(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.flusher.take() {
            let _ = t.join();
        }
    }
}

impl Drop for RecordDir {
    fn drop(&mut self) {
        self.stop_flusher();
    }
}

impl Files {
    /// Creates the directory (if needed) and the first background file. `header` makes each file's header.
    pub fn create(
        cfg: RecordDirConfig,
        header: impl Fn() -> TraceHeader + Send + 'static,
        released: Arc<Mutex<Vec<String>>>,
    ) -> Result<Self> {
        if cfg.max_size < 64 * 1024 {
            bail!("--record-max-size must be at least 64KiB");
        }
        fs::create_dir_all(&cfg.dir)
            .with_context(|| format!("cannot create the --record-dir {}", cfg.dir.display()))?;
        // Continue the numbering of an earlier watch in the same directory.
        let seq = files_with(&cfg.dir, "background-")
            .last()
            .and_then(|p| {
                p.file_stem()?
                    .to_str()?
                    .strip_prefix("background-")?
                    .parse::<u64>()
                    .ok()
            })
            .map_or(0, |n| n + 1);
        let mut r = Self {
            cfg,
            header: Box::new(header),
            background: None,
            seq,
            index: VecDeque::new(),
            open: Vec::new(),
            done: VecDeque::new(),
            released,
            dirty: false,
            last_ts_ns: 0,
            failed: false,
        };
        r.rotate()?;
        Ok(r)
    }

    /// Finishes the current background file (if any) and starts the next; drops the oldest beyond `--record-keep`.
    fn rotate(&mut self) -> Result<()> {
        if let Some(b) = self.background.take() {
            b.writer
                .finish(migevents::monotonic_ns())
                .with_context(|| format!("cannot finish {}", b.path.display()))?;
        }
        let path = self.cfg.dir.join(format!("background-{:06}.trace", self.seq));
        self.seq += 1;
        let (writer, lock) = create_locked(&path, &(self.header)())?;
        self.background = Some(Background {
            writer,
            path,
            _lock: lock,
        });
        let files = files_with(&self.cfg.dir, "background-");
        let excess = files.len().saturating_sub(self.cfg.keep.max(1));
        for old in &files[..excess] {
            let _ = fs::remove_file(old);
            self.index.retain(|m| &m.file != old);
        }
        Ok(())
    }

    /// The flusher's turn: finishes released migrations' traces and flushes what was written.
    fn tick(&mut self) {
        let r = self.close_released(self.last_ts_ns).and_then(|()| {
            if self.dirty {
                self.flush()?;
            }
            Ok(())
        });
        self.report(r);
    }

    fn report(&mut self, r: Result<()>) {
        if let Err(e) = r {
            if !self.failed {
                eprintln!("migmon: warning: --record-dir: {e:#}; recording continues where it can");
            }
            self.failed = true;
        }
    }

    /// Takes one event.
    fn observe(&mut self, ev: &Event) {
        let r = self.take(ev);
        self.report(r);
    }

    fn take(&mut self, ev: &Event) -> Result<()> {
        let ts = ev.ts_ns();
        self.last_ts_ns = self.last_ts_ns.max(ts);
        let line = serde_json::to_vec(ev).context("cannot serialise an event")?;
        self.close_released(ts)?;
        if let Event::Migration { ev: m, .. } = ev {
            if let Some(o) = self.open.iter_mut().find(|o| o.id == m.migration_id) {
                o.last_phase_ns = o.last_phase_ns.max(ts);
            } else if !self.done.contains(&m.migration_id) {
                self.open_migration(&m.migration_id, ts)?;
            }
        }
        let Some(b) = self.background.as_mut() else {
            return Ok(());
        };
        if self.index.back().is_none_or(|m| ts >= m.ts_ns + 100_000_000) {
            self.index.push_back(Mark {
                ts_ns: ts,
                file: b.path.clone(),
                offset: b.writer.bytes(),
            });
            let keep_from = ts.saturating_sub(self.cfg.lookback_ns + 1_000_000_000);
            while self.index.len() > 2 && self.index[1].ts_ns < keep_from {
                self.index.pop_front();
            }
        }
        b.writer.write_line(&line)?;
        for o in &mut self.open {
            o.writer.write_line(&line)?;
        }
        self.dirty = true;
        if b.writer.bytes() >= self.cfg.max_size {
            self.rotate()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        self.dirty = false;
        if let Some(b) = &mut self.background {
            b.writer.flush()?;
        }
        for o in &mut self.open {
            o.writer.flush()?;
        }
        Ok(())
    }

    /// Opens `migration-ID.trace` with the look-back before `ts` read back from the background files.
    fn open_migration(&mut self, id: &str, ts: u64) -> Result<()> {
        let path = self.cfg.dir.join(format!("migration-{}.trace", file_id(id)));
        let (mut writer, lock) = create_locked(&path, &(self.header)())?;
        self.flush()?;
        let from = ts.saturating_sub(self.cfg.lookback_ns);
        // The last mark before `from` (one mark earlier: arrival order is not quite time order).
        let start = self
            .index
            .iter()
            .rposition(|m| m.ts_ns < from)
            .map_or(0, |i| i.saturating_sub(1));
        let mut marks = self.index.iter().skip(start);
        if let Some(first) = marks.next() {
            let mut files: Vec<(PathBuf, u64)> = vec![(first.file.clone(), first.offset)];
            for m in marks {
                if files.last().is_some_and(|(f, _)| *f != m.file) {
                    files.push((m.file.clone(), 0));
                }
            }
            for (file, offset) in files {
                copy_lines(&file, offset, from, &mut writer)?;
            }
        }
        writer.flush()?;
        self.open.push(OpenMigration {
            id: id.to_owned(),
            writer,
            path,
            _lock: lock,
            last_phase_ns: ts,
        });
        let files = files_with(&self.cfg.dir, "migration-");
        let excess = files.len().saturating_sub(self.cfg.keep_migrations.max(1));
        for old in &files[..excess] {
            if self.open.iter().all(|o| &o.path != old) {
                let _ = fs::remove_file(old);
            }
        }
        Ok(())
    }

    /// Finishes the migration traces the live correlation made final, or that outlived the longest hold.
    fn close_released(&mut self, now_ns: u64) -> Result<()> {
        let released: Vec<String> =
            std::mem::take(&mut *self.released.lock().unwrap_or_else(PoisonError::into_inner));
        let mut i = 0;
        while i < self.open.len() {
            let o = &self.open[i];
            let fin = released.iter().any(|r| r.split('+').any(|c| c == o.id))
                || now_ns > o.last_phase_ns.saturating_add(HOLD_MAX_NS);
            if fin {
                let o = self.open.swap_remove(i);
                self.done.push_back(o.id.clone());
                while self.done.len() > 256 {
                    self.done.pop_front();
                }
                o.writer
                    .finish(now_ns)
                    .with_context(|| format!("cannot finish {}", o.path.display()))?;
            } else {
                i += 1;
            }
        }
        Ok(())
    }

    /// Finishes every file.
    fn finish(mut self) -> Result<()> {
        let now = migevents::monotonic_ns();
        for o in self.open.drain(..) {
            o.writer
                .finish(now)
                .with_context(|| format!("cannot finish {}", o.path.display()))?;
        }
        if let Some(b) = self.background.take() {
            b.writer
                .finish(now)
                .with_context(|| format!("cannot finish {}", b.path.display()))?;
        }
        Ok(())
    }
}

/// Copies the event lines of `file` from `offset` whose time is at or after `from` into `to`.
fn copy_lines(file: &Path, offset: u64, from: u64, to: &mut TraceWriter) -> Result<()> {
    let Ok(mut f) = fs::File::open(file) else {
        // Rotated away: the look-back starts later.
        return Ok(());
    };
    f.seek(SeekFrom::Start(offset))
        .with_context(|| format!("cannot read back {}", file.display()))?;
    for line in BufReader::new(f).split(b'\n') {
        let line = line.with_context(|| format!("cannot read back {}", file.display()))?;
        let Ok(ev) = serde_json::from_slice::<Event>(&line) else {
            // The header, the end record, or a line cut by a concurrent write: not an event.
            continue;
        };
        if ev.ts_ns() >= from {
            to.write_line(&line)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use migmon_analysis::{
        fixtures::{MS, live_trace, quick_trace},
        trace::read_trace,
    };

    use super::*;

    fn header() -> TraceHeader {
        TraceHeader {
            kind: "trace_header".into(),
            version: migmon_analysis::trace::TRACE_VERSION,
            migmon: "test".into(),
            hostname: "h".into(),
            boot_id: "b00t".into(),
            ..TraceHeader::default()
        }
    }

    /// Two migrations 60 s apart with filler events: a trace per migration with its look-back, background files
    /// rotated and bounded, and the directory reads back as the whole story.
    #[test]
    fn one_trace_per_migration_and_rotated_background() {
        let dir = std::env::temp_dir().join(format!("migmon-record-dir-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let released = Arc::new(Mutex::new(Vec::new()));
        let cfg = RecordDirConfig {
            dir: dir.clone(),
            max_size: 64 * 1024,
            keep: 3,
            keep_migrations: 10,
            lookback_ns: 2_000 * MS,
        };
        let mut r = RecordDir::create(cfg, header, released.clone()).unwrap();
        let mut ev = quick_trace();
        ev.extend(live_trace().into_iter().map(|mut e| {
            if let Event::Migration { ev, .. } = &mut e {
                ev.ts_ns += 60_000 * MS;
            } else if let Event::TcpState { ts_ns, .. } | Event::TcpRetransmit { ts_ns, .. } = &mut e {
                *ts_ns += 60_000 * MS;
            }
            e
        }));
        // Filler: a note every 10 ms, enough to rotate the background files several times.
        ev.extend((0..7_000).map(|i| Event::Note {
            ts_ns: i * 10 * MS,
            level: "info".into(),
            message: format!("filler {i} {}", "x".repeat(40)),
        }));
        ev.sort_by_key(Event::ts_ns);
        for e in &ev {
            if e.ts_ns() == 30_000 * MS {
                released.lock().unwrap().push("quick-1".to_owned());
            }
            r.observe(e);
        }
        // While the recorder runs, its newest background file and the live migration's trace have no end record:
        // in progress, not damage.
        let (_, running) = crate::cli::load_all(std::slice::from_ref(&dir)).unwrap();
        assert!(running.damage.is_empty(), "{:?}", running.damage);
        assert_eq!(running.in_progress.len(), 2, "{:?}", running.in_progress);
        assert!(
            running.in_progress[0].contains("background-"),
            "{:?}",
            running.in_progress
        );
        assert!(
            running.in_progress[1].contains("migration-live-1"),
            "{:?}",
            running.in_progress
        );
        r.finish().unwrap();
        let back = files_with(&dir, "background-");
        assert_eq!(back.len(), 3, "{back:?}");
        for f in &back {
            assert!(
                fs::metadata(f).unwrap().len() < 64 * 1024 + 1024,
                "{}",
                f.display()
            );
        }
        let quick = read_trace(&dir.join("migration-quick-1.trace")).unwrap();
        assert!(quick.damage().is_empty(), "{:?}", quick.damage());
        let first = quick.events.first().unwrap().ts_ns();
        let last = quick.events.last().unwrap().ts_ns();
        // From the look-back before its setup (at 500 ms: from 0) until it was released at 30 s.
        assert!(first < 100 * MS, "{first}");
        assert!((29_000 * MS..31_000 * MS).contains(&last), "{last}");
        let a = migmon_analysis::correlate::analyse(&quick);
        assert_eq!(a.migrations.len(), 1);
        let whole = migmon_analysis::correlate::correlate(&quick_trace());
        assert_eq!(
            (a.migrations[0].aborted, a.migrations[0].survived),
            (whole.migrations[0].aborted, whole.migrations[0].survived)
        );
        let live = read_trace(&dir.join("migration-live-1.trace")).unwrap();
        let setup = 60_500 * MS;
        assert!(live.events.first().unwrap().ts_ns() >= setup - 2_000 * MS - 200 * MS);
        assert!(live.events.first().unwrap().ts_ns() < setup - 1_500 * MS);
        // The directory reads back (`migmon report DIR`) as the whole stream does.
        let (_, merged) = crate::cli::load_all(std::slice::from_ref(&dir)).unwrap();
        let whole = migmon_analysis::correlate::correlate(&ev);
        let verdicts = |a: &migmon_analysis::correlate::Analysis| {
            a.migrations
                .iter()
                .map(|m| (m.id.clone(), m.survived, m.aborted, m.downtime.vcpu_pause.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(verdicts(&merged), verdicts(&whole));
        assert!(
            merged.in_progress.is_empty() && merged.damage.is_empty(),
            "{merged:?}"
        );
        fs::remove_dir_all(&dir).unwrap();

        // An empty directory, or one that does not exist, is a clear error.
        fs::create_dir_all(&dir).unwrap();
        let e = crate::cli::load_all(std::slice::from_ref(&dir)).unwrap_err();
        assert!(format!("{e:#}").contains("holds no *.trace file"), "{e:#}");
        fs::remove_dir_all(&dir).unwrap();
        let e = crate::cli::load_all(std::slice::from_ref(&dir)).unwrap_err();
        assert!(format!("{e:#}").contains("cannot read the trace"), "{e:#}");
    }
}
