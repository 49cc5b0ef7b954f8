//! The source side of a migration: [`migrate`] opens a [`session::Session`], runs the mode's engine on it
//! ([`precopy`] for live, [`quick`] for quick), and on failure rolls back so the guest keeps running here.

pub mod precopy;
pub mod quick;
pub mod session;

use std::{path::Path, time::Duration};

use migevents::{Mode, Phase};

use crate::source::session::{Progress, Session};
use crate::{
    engine::{
        Events, MigrateOptions, MigrationError, MigrationSource, MigrationState, MigrationSummary, Tracker,
        error_chain,
    },
    protocol::Message,
};

/// Runs a migration in the mode `opts` asks for. On failure the guest keeps running here.
pub fn migrate<S: MigrationSource>(
    vm: &mut S,
    opts: &MigrateOptions,
    events_path: Option<&Path>,
    tracker: &Tracker,
) -> Result<MigrationSummary, MigrationError> {
    if opts.mode == Mode::Live && (opts.via_file.is_some() || !opts.extra_pause.is_zero()) {
        return Err(MigrationError::Usage(
            "--via-file and --extra-pause belong to --mode quick".into(),
        ));
    }
    if let Some(max) = opts.max_pause
        && !opts.extra_pause.is_zero()
        && opts.extra_pause >= max
    {
        return Err(MigrationError::Usage(format!(
            "--extra-pause {:?} holds the guest paused past --max-pause {max:?}, whose deadline would roll it \
             back: raise --max-pause or shorten --extra-pause",
            opts.extra_pause
        )));
    }
    let mut session = match Session::open(vm, opts, events_path, tracker) {
        Ok(s) => s,
        Err(failed) => {
            let (e, mut events) = *failed;
            rollback(vm, Progress::default(), &e, None, events.as_mut(), tracker);
            return Err(e);
        }
    };
    let mut progress = Progress::default();
    tracker.clear_cancel();
    let res = match opts.mode {
        Mode::Live => precopy::run(vm, opts, &mut session, &mut progress),
        Mode::Quick => quick::run(vm, opts, &mut session, &mut progress),
    };
    match res {
        Ok(()) => {
            if progress.dirty_log {
                let _ignored = vm.stop_dirty_log();
            }
            Ok(session.report)
        }
        Err(e) if progress.committed => {
            hold_in_doubt(&e, &mut session, tracker);
            Err(e)
        }
        Err(e) => {
            rollback(vm, progress, &e, Some(&mut session), None, tracker);
            Err(e)
        }
    }
}

/// After the commit the guest must not resume here on its own: it stays paused, the status says `in_doubt` with
/// the way out, and the caller waits for the operator (`migrator resume --force` or `migrator cancel`).
fn hold_in_doubt(err: &MigrationError, session: &mut Session, tracker: &Tracker) {
    let reason = error_chain(err);
    session.writer.get_mut().get_mut().shutdown();
    session.events.emit(Phase::Failed {
        reason: reason.clone(),
    });
    eprintln!("migrator: {reason}");
    tracker.update(|s| {
        s.state = MigrationState::InDoubt;
        s.error = Some(reason);
    });
}

/// Gives the VM back to the source after a failure: resume if paused, stop dirty logging, tell the destination
/// (best effort), and emit `failed`, `resume` (if it was paused) and `rollback`.
pub fn rollback<S: MigrationSource>(
    vm: &mut S,
    progress: Progress,
    err: &MigrationError,
    mut session: Option<&mut Session>,
    events: Option<&mut Events>,
    tracker: &Tracker,
) {
    let reason = error_chain(err);
    let mut resume_err = None;
    if let Some(s) = session.as_deref_mut() {
        let frames = std::mem::take(&mut s.forwarded);
        if !frames.is_empty() {
            vm.return_frames(frames);
        }
    }
    // With --verify the hash at the pause is known: hash again before the guest runs, so that a rollback can be shown
    // to resume exactly the memory that was paused.
    let hashes = session
        .as_deref()
        .filter(|_| progress.paused)
        .and_then(|s| Some((s.report.verified_hash.clone()?, format!("{:032x}", s.ram.hash()))));
    tracker.update(|st| {
        (st.pause_ram_hash, st.rollback_ram_hash) = hashes.map_or((None, None), |(p, r)| (Some(p), Some(r)));
    });
    if progress.paused {
        match vm.resume() {
            // The destination may have been seen on the network (its tap came up, frames went over): the guest's
            // MAC is announced from here again.
            Ok(()) => {
                if let Err(e) = vm.announce() {
                    eprintln!("migrator: warning: could not re-announce the guest after the rollback: {e}");
                }
            }
            Err(e) => resume_err = Some(e),
        }
    }
    if progress.dirty_log {
        let _ignored = vm.stop_dirty_log();
    }
    let events = match session {
        Some(s) => {
            if !matches!(err, MigrationError::DestinationAborted { .. }) {
                let _ignored = s
                    .writer
                    .get_mut()
                    .get_mut()
                    .set_write_timeout(Some(Duration::from_millis(200)));
                let _ignored = s.writer.send(&Message::Abort(reason.clone()));
            }
            s.writer.get_mut().get_mut().shutdown();
            Some(&mut s.events)
        }
        None => events,
    };
    if let Some(ev) = events {
        ev.emit(migevents::Phase::Failed {
            reason: reason.clone(),
        });
        if progress.paused {
            ev.emit(Phase::Resume);
        }
        ev.emit(Phase::Rollback);
    }
    if let Some(e) = resume_err {
        eprintln!("migrator: CRITICAL: the guest could not be resumed after a failed migration: {e}");
    }
    tracker.update(|s| {
        s.state = MigrationState::Failed;
        s.error = Some(reason);
    });
}
