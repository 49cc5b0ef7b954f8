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
    api::ApiServer,
    config::ReceiveConfig,
    engine::{
        BoxedVmError, MigrationSource, MigrationState, MigrationSummary, MigrationTarget, Status, Tracker,
        error_chain,
    },
    protocol::Hello,
    receive::{ReceiveOptions, ReceiveReport, receive},
    runner::RunError,
    source::migrate,
    transport::Listener,
};

/// Why [`serve`] returned.
#[derive(Debug)]
pub enum Served {
    /// The VM now runs elsewhere; this process should exit.
    Migrated(Box<MigrationSummary>),
    /// The VM stopped on its own.
    Stopped,
}

/// The control loop of a running VM: waits for migrate requests (when there is an API) and runs them on this
/// thread, until the VM was migrated away or `stopped` reports that it has gone. A failed migration leaves the VM
/// running here and the loop goes on.
pub fn serve<S: MigrationSource>(
    vm: &mut S,
    server: Option<&ApiServer>,
    events: Option<&Path>,
    mut stopped: impl FnMut(&mut S) -> bool,
) -> Served {
    let set_running = |server: &ApiServer| {
        server
            .status()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .state = MigrationState::Running;
    };
    if let Some(s) = server {
        set_running(s);
    }
    loop {
        if stopped(vm) {
            return Served::Stopped;
        }
        let Some(server) = server else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let Some(pending) = server.next_migrate(Duration::from_millis(50)) else {
            continue;
        };
        let tracker = pending.tracker(server.status());
        let result = migrate(vm, &pending.options, events, &tracker);
        match &result {
            Ok(r) => eprintln!(
                "migrator: migrated to {} in {:.1} ms (pause {:.1} ms)",
                pending.options.to, r.total_ms, r.pause_ms
            ),
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
        set_running(server);
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
    let stream = listener.accept()?;
    drop(listener);
    let opts = ReceiveOptions {
        announce: config.announce,
        idle_timeout: config.idle_timeout,
        events: config.events.clone(),
        host: config.tap.clone(),
    };
    let (mut vm, report) =
        receive(stream, create, &opts, &Tracker::new(status)).map_err(RunError::Receive)?;
    eprintln!(
        "migrator: guest {} received ({} data pages, {} rounds), running here",
        report.mac, report.data_pages, report.rounds
    );
    let served = match serve(&mut vm, server.as_ref(), config.events.as_deref(), stopped) {
        Served::Migrated(r) => Some(*r),
        Served::Stopped => None,
    };
    Ok((served, report))
}
