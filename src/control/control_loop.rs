//! The control loop: what the main thread does between start-up and shutdown. It waits on
//! signals, worker events, health-check results, DNS answers and a one-second tick, and turns
//! each into a change of the backend set (`reload`, `transitions`) or of the workers' phase:
//!
//! - serving -> first SIGTERM/SIGINT -> leaving: `/ready` answers 503 (so the routing layer
//!   withdraws this host) while the listeners keep accepting for `--drain-delay`; with no delay
//!   this phase is skipped;
//! - leaving -> the delay is over -> draining: workers close their listeners and let flows
//!   finish until `--shutdown-timeout`;
//! - leaving or draining -> second signal (or a worker dying) -> stopping: workers close every
//!   flow now;
//! - stopping -> third signal, or workers still there [`STOP_GRACE`] after they were due to
//!   end -> the loop gives up on them and returns.
//!
//! It returns when every worker has ended (or been given up on); `Threads::shutdown` does the
//! rest.
//!
//! Under systemd (`Type=notify`) it also tells the service manager what happens (`notify`):
//! READY=1 when it starts, RELOADING=1/READY=1 around a SIGHUP reload, STOPPING=1 when the drain
//! starts, a STATUS= line from the tick, and WATCHDOG=1 pings while every worker answers
//! (`liveness`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver};
use log::{error, info, warn};
use signal_hook::consts::{SIGHUP, SIGUSR1};

use super::backends::Backends;
use super::health::CheckResult;
use super::liveness::Liveness;
use super::notify::Notifier;
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
    /// The service manager (systemd), if the process runs under one that listens.
    pub notify: Notifier,
    /// Flows open in the process (the counter behind `--max-conns`), for the status line.
    pub active_flows: Arc<AtomicUsize>,
    pub liveness: Liveness,
    /// The last STATUS= line sent, so an unchanged one is not sent again.
    pub last_status: String,
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
    /// `/ready` says 503; the listeners still accept until `--drain-delay` is over.
    Leaving,
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
        // When the `--drain-delay` is over; `never()` outside the leaving phase.
        let mut drain_at = crossbeam_channel::never::<Instant>();
        let mut running = threads.workers.len();
        let mut exit_error = None;
        // Every listener is bound and every worker runs: start-up has returned.
        self.notify.ready();
        self.report_status(phase);
        let watchdog = match self.notify.watchdog() {
            // systemd's advice: ping at half the interval. At most once a second, at least
            // every 10 ms (a WatchdogSec= that short cannot be met anyway).
            Some(interval) => crossbeam_channel::tick(
                (interval / 2).clamp(Duration::from_millis(10), Duration::from_secs(1)),
            ),
            None => crossbeam_channel::never(),
        };
        while running > 0 {
            select! {
                recv(signals) -> signal => {
                    // The signal thread is stopped only after this loop: not expected.
                    let Ok(signal) = signal else { break };
                    if signal == SIGUSR1 {
                        threads.reopen_access_log();
                        continue;
                    }
                    if signal == SIGHUP {
                        // After STOPPING=1 a READY=1 would tell systemd the service is up again.
                        let tell = phase == Phase::Serving;
                        if tell {
                            self.notify.reloading();
                        }
                        self.reload("SIGHUP", threads);
                        if tell {
                            self.notify.ready();
                            self.report_status(phase);
                        }
                        continue;
                    }
                    let name = signals::name(signal);
                    match phase {
                        Phase::Serving => {
                            self.view.readiness.leave();
                            self.notify.stopping();
                            let delay = self.config.drain_delay;
                            if delay.is_zero() {
                                phase = Phase::Draining;
                                give_up = self.start_drain(name, threads);
                            } else {
                                phase = Phase::Leaving;
                                let ready = if self.config.admin.is_some() {
                                    "/ready now answers 503; "
                                } else {
                                    ""
                                };
                                info!(
                                    "{name}: {ready}still accepting for {delay:?} (--drain-delay), \
                                     then draining (send it again to stop now)"
                                );
                                drain_at = crossbeam_channel::at(Instant::now() + delay);
                            }
                        }
                        Phase::Leaving | Phase::Draining => {
                            drain_at = crossbeam_channel::never();
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
                        if panicked || (matches!(phase, Phase::Serving | Phase::Leaving) && !self.handed_over) {
                            let message = format!("worker {id} stopped unexpectedly");
                            error!("{message}; stopping the process");
                            exit_error.get_or_insert(message);
                            if phase != Phase::Stopping {
                                if phase == Phase::Serving {
                                    self.notify.stopping();
                                }
                                phase = Phase::Stopping;
                                drain_at = crossbeam_channel::never();
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
                    self.report_status(phase);
                },
                recv(watchdog) -> _ => {
                    let heartbeats = threads.workers.heartbeats();
                    if self.liveness.all_answering(Instant::now(), &heartbeats) {
                        self.notify.watchdog_ping();
                    }
                },
                recv(drain_at) -> _ => {
                    drain_at = crossbeam_channel::never();
                    phase = Phase::Draining;
                    give_up = self.start_drain("--drain-delay over", threads);
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

    /// Closes the listeners and lets live flows finish until `--shutdown-timeout`; returns when
    /// to give up on the workers.
    fn start_drain(&self, why: &str, threads: &mut Threads) -> Receiver<Instant> {
        let deadline = Instant::now() + self.config.shutdown_timeout;
        info!(
            "{why}: listeners closed, letting live flows finish for up to {:?} \
             (send it again to close them now)",
            self.config.shutdown_timeout
        );
        threads.workers.broadcast(|| Command::Drain { deadline });
        crossbeam_channel::at(deadline + STOP_GRACE)
    }

    /// Sends systemd a STATUS= line (`systemctl status` shows it) if it changed.
    fn report_status(&mut self, phase: Phase) {
        let flows = self.active_flows.load(Ordering::Relaxed);
        let state = match phase {
            Phase::Serving => "serving",
            Phase::Leaving => "leaving (--drain-delay)",
            Phase::Draining => "draining",
            Phase::Stopping => "stopping",
        };
        let status = format!(
            "{state}: {flows} flows, {}/{} backends up",
            self.backends.healthy_count(),
            self.backends.entries.len()
        );
        if status != self.last_status {
            self.notify.status(&status);
            self.last_status = status;
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
