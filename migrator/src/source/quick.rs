//! Quick migration: pause first, move everything, resume at the destination.
//!
//! This is how Quick Migration moved VMs before live migration existed: the guest is frozen for the whole copy.
//! With `--via-file` the suspended state and RAM are first written to a file and fsynced (as suspend to a shared
//! disk did), then sent. `--extra-pause` holds the guest paused longer still, to reproduce a slow move; the report
//! labels it (`extra_pause_ms` and a note), so nobody mistakes it for the cost of the copy.
//!
//! The file holds exactly the protocol messages the stream would carry, so the destination reads one format.

use std::{
    fs::{File, OpenOptions},
    io::{BufWriter, Seek, SeekFrom, Write},
    os::unix::fs::OpenOptionsExt,
    path::Path,
    time::{Duration, Instant},
};

use migevents::Phase;

use crate::{
    engine::{MigrateOptions, MigrationError, MigrationSource, MigrationState},
    protocol::{Message, MessageWriter, ProtocolError, RoundEnd},
    source::session::{Progress, Session, past_deadline, write_round, write_tail},
};

/// Runs the quick migration on an open session.
pub fn run<S: MigrationSource>(
    vm: &mut S,
    opts: &MigrateOptions,
    s: &mut Session,
    progress: &mut Progress,
) -> Result<(), MigrationError> {
    let paused_at = Instant::now();
    let deadline = crate::source::precopy::pause_deadline(opts, paused_at);
    s.writer.get_mut().set_deadline(deadline);
    vm.pause().map_err(MigrationError::vm("pause"))?;
    progress.paused = true;
    paused(vm, opts, s, progress, paused_at, deadline)
        .map_err(|e| past_deadline(e, deadline, opts.pause_deadline()))
}

/// Everything from the stopped vCPU to the ack.
fn paused<S: MigrationSource>(
    vm: &mut S,
    opts: &MigrateOptions,
    s: &mut Session,
    progress: &mut Progress,
    paused_at: Instant,
    deadline: Option<Instant>,
) -> Result<(), MigrationError> {
    let paused_ns = s.events.emit(Phase::Pause);
    s.tracker.update(|st| st.state = MigrationState::Paused);
    let bytes0 = s.writer.bytes();

    if let Some(path) = &opts.via_file {
        send_via_file(vm, opts.verify, s, path)?;
    } else {
        let resident = s.ram.resident_pages();
        let total = s.ram.total_pages();
        let st = s.send_round(0, 0..total, total, Some(&resident))?;
        s.bandwidth.record(st.bytes, st.secs);
        s.end_round(0, &st)?;
        let frames = write_tail(&mut s.writer, &s.ram, vm, opts.verify, &mut s.report)?;
        s.forwarded.extend(frames);
    }
    s.report.rounds = 0;
    hold_extra_pause(opts.extra_pause, s);

    s.send_complete(paused_ns, deadline)?;
    s.report.final_bytes = s.writer.bytes() - bytes0;
    s.tracker.update(|st| st.state = MigrationState::Completing);
    s.await_ready_and_commit(vm, deadline, opts.pause_deadline(), progress)?;
    let ack = s.await_ack(vm)?;
    s.complete(paused_at, ack, 0.0);
    if let Some(path) = &opts.via_file
        && let Err(e) = std::fs::remove_file(path)
    {
        eprintln!(
            "migrator: warning: could not remove the suspend file {}: {e}",
            path.display()
        );
    }
    Ok(())
}

/// Writes RAM, state and frames to `path` as the protocol messages the stream would carry, fsyncs it, then sends
/// the file's bytes as they are.
fn send_via_file<S: MigrationSource>(
    vm: &mut S,
    verify: bool,
    s: &mut Session,
    path: &Path,
) -> Result<(), MigrationError> {
    let file_err = |source| MigrationError::SuspendFile {
        path: path.to_owned(),
        source,
    };
    let t_file = Instant::now();
    // Guest RAM goes in there: a new file only this user can read, never through a link, never an old file.
    let file = OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(file_err)?;
    let first_seq = s.writer.sequence();
    let mut fw = MessageWriter::with_sequence(BufWriter::with_capacity(4 << 20, file), first_seq);
    let resident = s.ram.resident_pages();
    let total = s.ram.total_pages();
    let st = write_round(
        &mut fw,
        &mut s.batch,
        &s.ram,
        0,
        0..total,
        Some(&resident),
        &mut |_, _| {},
    )?;
    fw.send(&Message::RoundEnd(RoundEnd {
        round: 0,
        pages: st.pages,
        bytes: st.bytes,
        bandwidth: 0,
    }))?;
    let frames = write_tail(&mut fw, &s.ram, vm, verify, &mut s.report)?;
    s.forwarded.extend(frames);
    let messages = fw.sequence().wrapping_sub(first_seq);
    let file_bytes = fw.bytes();
    let mut file: File = fw
        .into_inner()
        .into_inner()
        .map_err(|e| file_err(e.into_error()))?;
    file.sync_all().map_err(file_err)?;
    let write_ms = t_file.elapsed().as_secs_f64() * 1e3;
    s.report.data_pages += st.data_pages;
    s.report.zero_pages += st.zero_pages;
    // Now send what the file holds, as it is.
    let t_send = Instant::now();
    file.seek(SeekFrom::Start(0)).map_err(file_err)?;
    let io = |e| MigrationError::Protocol(ProtocolError::Io(e));
    let copied = std::io::copy(&mut file, s.writer.get_mut()).map_err(io)?;
    s.writer.get_mut().flush().map_err(io)?;
    s.writer.advance_sequence(messages);
    s.writer.count_raw(copied);
    let secs = t_send.elapsed().as_secs_f64();
    s.bandwidth.record(copied, secs);
    s.events.emit(Phase::Round {
        n: 0,
        pages: st.pages,
        bytes: copied,
        bandwidth: if secs > 0.0 {
            (copied as f64 / secs) as u64
        } else {
            0
        },
    });
    s.report.notes.push(format!(
        "suspended to {} first: {file_bytes} bytes written and fsynced in {write_ms:.1} ms, then sent (removed after the ack)",
        path.display()
    ));
    Ok(())
}

/// `--extra-pause`: holds the guest paused longer on purpose, and says so in the report.
fn hold_extra_pause(extra: Duration, s: &mut Session) {
    if extra.is_zero() {
        return;
    }
    s.report.extra_pause_ms = extra.as_secs_f64() * 1e3;
    s.report.notes.push(format!(
        "the guest was held paused {extra:?} longer on purpose (--extra-pause), to reproduce a slow move"
    ));
    std::thread::sleep(extra);
}
