//! The control side of the process: start-up, the control loop that owns the backend set and
//! its health and publishes immutable snapshots to the workers, and shutdown.
//!
//! | module | one idea |
//! | --- | --- |
//! | `signals` | the signal thread, installed before anything else starts |
//! | `startup` | binding, opening, starting every thread, in an order that fails early |
//! | `threads` | `Threads`: owns every thread and what tells it to end; `shutdown` |
//! | `workers` | command channels and wake pipes to the workers |
//! | `control_loop` | signals, worker events, checks, DNS, tick; serving -> draining -> stopping |
//! | `backends` | the running backend list, its health, counters and selection structures |
//! | `reload` | backends file and DNS changes applied to the running set |
//! | `transitions` | health changes from checks, passive failures and time |
//! | `health` | the up/down state machine and the active-check thread |
//! | `sources` | where backends come from; the DNS refresh thread |
//! | `admin`, `view` | the admin HTTP endpoint and what it shows |
//! | `status`, `status_page` | `GET /`: what the status page gathers (limits, recent transitions, shares) and its HTML |
//! | `readiness` | `/live` and `/ready`: whether the routing layer should send this host traffic |
//! | `notify` | systemd's sd_notify protocol: READY, RELOADING, STOPPING, STATUS, WATCHDOG |
//! | `liveness` | per-worker heartbeats: is every worker's event loop still turning |
//! | `upgrade` | `--upgrade-socket` and `--takeover` around start-up and in the control loop |
//!
//! Workers get commands over crossbeam channels, each followed by a byte on the worker's wake
//! pipe so its ring notices at once. Workers report to the control thread (`crate::events`) on
//! a bounded channel with `try_send`: they never block on it.

pub mod admin;
mod backends;
mod control_loop;
pub mod health;
mod liveness;
pub mod notify;
mod readiness;
mod reload;
mod signals;
mod sources;
mod startup;
mod status;
mod status_page;
mod threads;
mod transitions;
mod upgrade;
mod view;
pub(crate) mod workers;

use std::fmt;

use log::info;

use backends::Backends;
use signals::SignalThread;

/// A start-up failure: the process exits with status 1 and this one-line message.
#[derive(Debug)]
pub struct StartError(pub String);

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

/// Starts the proxy and serves until SIGINT or SIGTERM; returns once every thread has ended,
/// or been given up on (see `Threads::shutdown`). With `--show-mapping` it prints the mapping
/// and returns at once.
pub fn run(config: crate::config::Config) -> Result<(), StartError> {
    let backends = Backends::load(&config).map_err(StartError)?;
    if !config.show_mapping.is_empty() {
        backends.print_mapping(&config);
        return Ok(());
    }
    let signals = SignalThread::start()?;
    let mut upgrade = upgrade::Before::start(&config)?;
    let (mut control, mut threads) =
        startup::start(config, backends, signals, upgrade.listeners())?;
    if let Err(e) = upgrade.after_start(&mut control, &mut threads) {
        drop(control);
        threads.shutdown();
        return Err(e);
    }
    let outcome = control.run(&mut threads);
    if let Some(server) = &control.upgrade {
        server.remove_socket();
    }
    let handed_over_at = control.handed_over_at;
    // Closes the event channel: a worker still ending does not wait to report it to nobody.
    drop(control);
    threads.shutdown();
    if let Some(at) = handed_over_at {
        info!("exiting {:.1?} after the handover", at.elapsed());
    }
    if outcome.is_ok() {
        info!("stopped");
    }
    outcome
}
