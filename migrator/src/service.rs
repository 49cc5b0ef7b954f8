//! A VM as a long-running service: [`serve`] runs the control loop of a VM (migrate requests from the API socket)
//! until the VM is migrated away or stops, and [`receive_and_serve`] is the destination's whole life: wait for one
//! incoming migration, receive it, then serve the VM like `run` does. Both are generic over the migration traits;
//! [`crate::vm_migration`] plugs the KVM VM in.

use std::{
    path::Path,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use crate::{
    accept::wait_for_source,
    api::{ApiServer, Command},
    config::ReceiveConfig,
    engine::{
        BoxedVmError, MigrationError, MigrationSource, MigrationState, MigrationSummary, MigrationTarget,
        Status, Tracker, error_chain,
    },
    protocol::Hello,
    receive::{Outcome, ReceiveOptions, ReceiveReport, receive_arrival, resume_held},
    runner::RunError,
    source::migrate,
    transport::{Listener, check_security},
};

/// Why [`serve`] returned.
#[derive(Debug)]
pub enum Served {
    /// The VM now runs elsewhere; this process should exit.
    Migrated(Box<MigrationSummary>),
    /// The VM stopped on its own.
    Stopped,
    /// The operator dropped this side's copy of an in-doubt guest (`migrator cancel`).
    Dropped,
}

fn set_state(server: &ApiServer, state: MigrationState) {
    server
        .status()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .state = state;
}

/// The control loop of a running VM: waits for migrate requests (when there is an API) and runs them on this
/// thread, until the VM was migrated away or `stopped` reports that it has gone. A failed migration leaves the VM
/// running here and the loop goes on; one in doubt (the commit was sent, no acknowledgement came) leaves it paused
/// until the operator resumes it here or drops it.
pub fn serve<S: MigrationSource>(
    vm: &mut S,
    server: Option<&ApiServer>,
    events: Option<&Path>,
    mut stopped: impl FnMut(&mut S) -> bool,
) -> Served {
    if let Some(s) = server {
        set_state(s, MigrationState::Running);
    }
    loop {
        if stopped(vm) {
            return Served::Stopped;
        }
        let Some(server) = server else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let pending = match server.next_command(Duration::from_millis(50)) {
            None => continue,
            Some(Command::Migrate(p)) => p,
            Some(Command::Resume(a) | Command::Cancel(a)) => {
                a.error("the guest is not in doubt here");
                continue;
            }
        };
        let tracker = pending.tracker(server);
        let result = migrate(vm, &pending.options, events, &tracker);
        let in_doubt = matches!(result, Err(MigrationError::InDoubt { .. }));
        match &result {
            Ok(r) => eprintln!(
                "migrator: migrated to {} in {:.1} ms (pause {:.1} ms)",
                pending.options.to, r.total_ms, r.pause_ms
            ),
            Err(_) if in_doubt => {}
            Err(e) => eprintln!(
                "migrator: migration to {} failed, the guest keeps running here: {}",
                pending.options.to,
                error_chain(e)
            ),
        }
        pending.finish(&result);
        if let Ok(r) = result {
            return Served::Migrated(Box::new(r));
        }
        if in_doubt && !hold_source(vm, server) {
            return Served::Dropped;
        }
        set_state(server, MigrationState::Running);
    }
}

/// An in-doubt source: the guest stays paused until `resume --force` (true: it runs here again, announced) or
/// `cancel` (false: this copy is to be dropped).
fn hold_source<S: MigrationSource>(vm: &mut S, server: &ApiServer) -> bool {
    loop {
        match server.next_command(Duration::from_millis(100)) {
            Some(Command::Resume(a)) => {
                if let Err(e) = vm.resume() {
                    a.error(format!("the guest could not be resumed: {e}"));
                    continue;
                }
                let _ignored = vm.stop_dirty_log();
                if let Err(e) = vm.announce() {
                    eprintln!("migrator: warning: could not announce the resumed guest: {e}");
                }
                eprintln!("migrator: the in-doubt guest was resumed here (resume --force)");
                a.ok("the guest runs here again");
                return true;
            }
            Some(Command::Cancel(a)) => {
                eprintln!("migrator: the in-doubt guest's copy here was dropped (cancel)");
                a.ok("this copy of the guest is dropped; the migrator exits");
                return false;
            }
            Some(Command::Migrate(p)) => p.finish(&Err(MigrationError::Usage(
                "the guest is in doubt here: resolve that first (resume --force or cancel)".into(),
            ))),
            None => {}
        }
    }
}

/// An in-doubt destination: holds the restored, paused guest until `resume --force` (it runs here) or `cancel`.
fn hold_destination<T: MigrationTarget>(
    target: &mut T,
    mac: [u8; 6],
    server: Option<&ApiServer>,
) -> Result<(), RunError> {
    let Some(server) = server else {
        return Err(RunError::InDoubtWithoutApi);
    };
    loop {
        match server.next_command(Duration::from_millis(100)) {
            Some(Command::Resume(a)) => match resume_held(target, mac) {
                Ok(()) => {
                    eprintln!("migrator: the in-doubt guest was resumed here (resume --force)");
                    a.ok("the guest runs here");
                    return Ok(());
                }
                Err(e) => a.error(format!("the guest could not be resumed: {}", error_chain(&e))),
            },
            Some(Command::Cancel(a)) => {
                a.ok("this copy of the guest is dropped; the migrator exits");
                return Err(RunError::Dropped);
            }
            Some(Command::Migrate(p)) => p.finish(&Err(MigrationError::Usage(
                "the guest is in doubt here: resolve that first (resume --force or cancel)".into(),
            ))),
            None => {}
        }
    }
}

/// The destination: waits for one migration on `config.listen`, builds the VM with `create`, receives it, then
/// serves it like `run` (with `config.api`, so it can be migrated on) until it is migrated away or stops.
///
/// `stopped` is polled by the control loop and reports whether the VM has ended on its own. Returns the summary
/// of the onward migration, if there was one, and what was received.
pub fn receive_and_serve<T, F>(
    config: &ReceiveConfig,
    create: F,
    stopped: impl FnMut(&mut T) -> bool,
) -> Result<(Option<MigrationSummary>, ReceiveReport), RunError>
where
    T: MigrationTarget + MigrationSource,
    F: FnOnce(&Hello) -> Result<T, BoxedVmError>,
{
    check_security(&config.listen, config.tls_creds.is_some(), config.insecure)?;
    let tls = config
        .tls_creds
        .as_deref()
        .map(crate::tls::server_config)
        .transpose()
        .map_err(crate::transport::TransportError::from)?;
    let listener = Listener::bind(&config.listen)?;
    // The API comes up at once so that `status` works while receiving.
    let status = Arc::new(Mutex::new(Status {
        state: MigrationState::Waiting,
        ..Status::default()
    }));
    let server = config
        .api
        .as_deref()
        .map(|p| ApiServer::bind(p, status.clone()))
        .transpose()?;
    eprintln!(
        "migrator: waiting for an incoming migration on {}",
        listener.local_endpoint()
    );
    let opts = ReceiveOptions {
        announce: config.announce,
        idle_timeout: config.idle_timeout,
        events: config.events.clone(),
        host: config.tap.clone(),
        max_mem: config.max_mem,
    };
    let tracker = server
        .as_ref()
        .map_or_else(|| Tracker::new(status), ApiServer::tracker);
    let arrival = wait_for_source(&listener, tls.as_ref(), &opts, &tracker).map_err(RunError::Receive)?;
    drop(listener);
    let outcome = receive_arrival(arrival, create, &opts, &tracker).map_err(RunError::Receive)?;
    let (mut vm, report) = match outcome {
        Outcome::Running(vm, report) => (vm, report),
        Outcome::InDoubt { mut target, mac, .. } => {
            hold_destination(&mut target, mac, server.as_ref())?;
            (target, ReceiveReport::default())
        }
    };
    eprintln!(
        "migrator: guest {} received ({} data pages, {} rounds), running here",
        report.mac, report.data_pages, report.rounds
    );
    let served = match serve(&mut vm, server.as_ref(), config.events.as_deref(), stopped) {
        Served::Migrated(r) => Some(*r),
        Served::Stopped => None,
        Served::Dropped => return Err(RunError::Dropped),
    };
    Ok((served, report))
}
