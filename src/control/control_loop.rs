//! The control loop: what the main thread does between start-up and shutdown. It waits on
//! signals, worker events, health-check results, DNS answers and a one-second tick, and turns
//! each into a change of the backend set (`reload`, `transitions`) or of the workers' phase:
//!
//! - serving -> first SIGTERM/SIGINT -> draining: workers close their listeners and let flows
//!   finish until `--shutdown-timeout`;
//! - draining -> second signal (or a worker dying) -> stopping: workers close every flow now;
//! - stopping -> third signal, or workers still there [`STOP_GRACE`] after they were due to
//!   end -> the loop gives up on them and returns.
//!
//! It returns when every worker has ended (or been given up on); `Threads::shutdown` does the
//! rest.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver};
use log::{error, info, warn};
use signal_hook::consts::SIGHUP;

use super::backends::Backends;
use super::health::CheckResult;
use super::signals;
use super::sources::DnsAnswer;
use super::threads::Threads;
use super::view::View;
use super::StartError;
use crate::config::Config;
use crate::events::Event;
use crate::worker::Command;

/// How long workers get to end after they were told to stop now (or after their drain
/// deadline) before the process exits without them. Closing every flow takes milliseconds; a
/// worker that needs longer is stuck, and the operator asked for the process to end.
pub const STOP_GRACE: Duration = Duration::from_secs(1);

/// What the control thread owns while the proxy runs, besides the threads.
pub struct Control {
    pub config: Config,
    pub backends: Backends,
    /// What the admin endpoint shows; updated with every published snapshot.
    pub view: Arc<View>,
    pub events: Receiver<Event>,
    /// Health-check results; `never()` without active checks.
    pub checks: Receiver<CheckResult>,
    /// DNS answers; `never()` without `--backend-dns`.
    pub dns: Receiver<DnsAnswer>,
    /// The workers' listening sockets (owned by the workers), to hand to a successor.
    pub listener_fds: Vec<std::os::fd::RawFd>,
    pub listen_addr: std::net::SocketAddr,
    /// The thread waiting on `--upgrade-socket`, if any.
    pub upgrade: Option<crate::handover::old::UpgradeServer>,
    /// Successors from that thread; `never()` without it.
    pub upgrades: Receiver<crate::handover::old::Incoming>,
    /// Everything was handed to a successor: the workers are ending on purpose.
    pub handed_over: bool,
    /// When the successor was told it has everything, to report how long exiting took.
    pub handed_over_at: Option<Instant>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Serving,
    Draining,
    Stopping,
}

impl Control {
    /// Runs until every worker has ended or been given up on. `Err` if a worker died.
    pub fn run(&mut self, threads: &mut Threads) -> Result<(), StartError> {
        let signals = threads.signals.received().clone();
        let ticker = crossbeam_channel::tick(Duration::from_secs(1));
        let mut phase = Phase::Serving;
        // When to stop waiting for the workers; `never()` while serving.
        let mut give_up = crossbeam_channel::never::<Instant>();
        let mut running = threads.workers.len();
        let mut exit_error = None;
        while running > 0 {
            select! {
                recv(signals) -> signal => {
                    // The signal thread is stopped only after this loop: not expected.
                    let Ok(signal) = signal else { break };
                    if signal == SIGHUP {
                        self.reload("SIGHUP", threads);
                        continue;
                    }
                    let name = signals::name(signal);
                    match phase {
                        Phase::Serving => {
                            phase = Phase::Draining;
                            let deadline = Instant::now() + self.config.shutdown_timeout;
                            info!(
                                "{name}: listeners closed, letting live flows finish for up to {:?} \
                                 (send it again to close them now)",
                                self.config.shutdown_timeout
                            );
                            threads.workers.broadcast(|| Command::Drain { deadline });
                            give_up = crossbeam_channel::at(deadline + STOP_GRACE);
                        }
                        Phase::Draining => {
                            phase = Phase::Stopping;
                            info!("{name} again: closing every flow now");
                            threads.workers.broadcast(|| Command::Stop);
                            give_up = crossbeam_channel::at(Instant::now() + STOP_GRACE);
                        }
                        Phase::Stopping => {
                            info!("{name} again: exiting without waiting for the workers");
                            threads.workers.give_up();
                            break;
                        }
                    }
                },
                recv(self.events) -> event => match event {
                    Ok(Event::WorkerExited { id, panicked }) => {
                        running -= 1;
                        if panicked || (phase == Phase::Serving && !self.handed_over) {
                            let message = format!("worker {id} stopped unexpectedly");
                            error!("{message}; stopping the process");
                            exit_error.get_or_insert(message);
                            if phase != Phase::Stopping {
                                phase = Phase::Stopping;
                                threads.workers.broadcast(|| Command::Stop);
                                give_up = crossbeam_channel::at(Instant::now() + STOP_GRACE);
                            }
                        }
                    }
                    Ok(Event::BackendFailure { set, index }) => {
                        self.on_backend_failure(&set, index, threads)
                    }
                    // Every worker is gone, one without reporting it (its report timed out).
                    Err(_) => break,
                },
                recv(self.checks) -> result => match result {
                    Ok(result) => self.on_check(result, threads),
                    // A source that is off must be `never()`: a disconnected channel is always
                    // ready in `select!` and would spin this thread.
                    Err(_) => self.checks = crossbeam_channel::never(),
                },
                recv(self.dns) -> answer => match answer {
                    Ok(answer) => self.on_dns(answer, threads),
                    Err(_) => self.dns = crossbeam_channel::never(),
                },
                recv(self.upgrades) -> incoming => match incoming {
                    Ok(incoming) if phase == Phase::Serving => {
                        match self.on_successor(incoming, threads) {
                            super::upgrade::Next::Serve => {}
                            super::upgrade::Next::Exit => {
                                phase = Phase::Stopping;
                                give_up = crossbeam_channel::at(Instant::now() + STOP_GRACE);
                            }
                            super::upgrade::Next::Drain => {
                                phase = Phase::Draining;
                                let deadline = Instant::now() + self.config.shutdown_timeout;
                                threads.workers.broadcast(|| Command::Drain { deadline });
                                give_up = crossbeam_channel::at(deadline + STOP_GRACE);
                            }
                        }
                    }
                    Ok(_) => {} // draining or stopping: nothing to hand over
                    Err(_) => self.upgrades = crossbeam_channel::never(),
                },
                recv(ticker) -> _ => {
                    self.retry_passive_downs(threads);
                    self.reload_if_file_changed(threads);
                },
                recv(give_up) -> _ => {
                    warn!(
                        "{running} worker(s) still running {STOP_GRACE:?} after they were due \
                         to end; exiting without them"
                    );
                    threads.workers.give_up();
                    break;
                },
            }
        }
        match exit_error {
            Some(message) => Err(StartError(message)),
            None => Ok(()),
        }
    }

    /// Sends every worker the current snapshot, waits until each uses it, then shows it on the
    /// admin endpoint: what is logged next is already true.
    pub fn publish(&mut self, threads: &mut Threads) {
        let snapshot = self.backends.snapshot();
        threads.workers.publish_and_wait(&snapshot);
        self.view.set_snapshot(snapshot);
    }
}
