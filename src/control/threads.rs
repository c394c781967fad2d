//! `Threads`: every thread the process starts besides the main one, with the channel or call
//! that tells it to end. The main thread owns it; start-up fills it, the control loop sends
//! through it (commands to workers, targets to the health checker), and [`Threads::shutdown`]
//! is the one place that ends them all.
//!
//! Which thread is started where, what tells it to end and what it holds is drawn in
//! docs/architecture.md ("Who owns which thread"); `shutdown` below documents the order.

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};
use log::{info, warn};

use super::admin::AdminServer;
use super::health::CheckTarget;
use super::signals::{self, SignalThread};
use super::workers::WorkerPool;
use crate::worker::Command;

/// How long the threads together may take to end once shutdown starts. A clean stop takes
/// milliseconds (the workers have already ended); this covers a health check or DNS query in
/// flight running to its timeout and a slow disk under the access log. Past it, the process
/// exits without the threads that are left (a warning names each).
const STOP_BUDGET: Duration = Duration::from_secs(5);
/// How long a thread may take to end before the wait for it is logged.
const PATIENCE: Duration = Duration::from_millis(500);
/// How often a wait for a thread checks whether it has ended. std has no join with a timeout,
/// and the threads come from modules that hand back plain `JoinHandle`s.
const POLL: Duration = Duration::from_millis(5);

/// The active health checker: dropping `targets` tells it to end.
pub struct HealthChecker {
    pub thread: JoinHandle<()>,
    pub targets: Sender<Vec<CheckTarget>>,
}

/// The DNS refresher: dropping `stop` tells it to end.
pub struct DnsRefresher {
    pub thread: JoinHandle<()>,
    pub stop: Sender<()>,
}

pub struct Threads {
    pub signals: SignalThread,
    pub workers: WorkerPool,
    pub access_log_writer: Option<crate::access_log::WriterThread>,
    pub admin: Option<AdminServer>,
    pub health: Option<HealthChecker>,
    pub dns: Option<DnsRefresher>,
}

impl Threads {
    pub fn new(signals: SignalThread) -> Threads {
        Threads {
            signals,
            workers: WorkerPool::default(),
            access_log_writer: None,
            admin: None,
            health: None,
            dns: None,
        }
    }

    /// Hands the health checker a new list of backends, if it runs.
    pub fn send_check_targets(&self, targets: Vec<CheckTarget>) {
        if let Some(checker) = &self.health {
            let _ = checker.targets.try_send(targets);
        }
    }

    /// SIGUSR1: the access-log writer reopens its file (after a rotation).
    pub fn reopen_access_log(&self) {
        match &self.access_log_writer {
            Some(writer) => writer.reopen(),
            None => info!("SIGUSR1: no --access-log to reopen"),
        }
    }

    /// Ends every thread and returns once each has ended or been given up on. Order:
    ///
    /// 1. Every thread is told to end at once, so they wind down in parallel: workers get
    ///    `Stop` (a no-op for those that already ended), the health checker's and the DNS
    ///    refresher's channels are dropped, the admin server is stopped.
    /// 2. Workers are joined first: they hold the last access-log senders, so only after them
    ///    can the access-log writer flush and end.
    /// 3. Then the health checker, the DNS refresher, the admin threads, the access-log writer.
    /// 4. The signal thread last, so that a SIGINT or SIGTERM during steps 2-3 still arrives:
    ///    it abandons whatever is still being waited for, and the process exits at once.
    ///
    /// All waits share one deadline, [`STOP_BUDGET`] from now.
    pub fn shutdown(mut self) {
        let mut waiter = Waiter {
            signals: self.signals.received().clone(),
            deadline: Instant::now() + STOP_BUDGET,
            abandoned: false,
        };
        self.workers.broadcast(|| Command::Stop);
        let mut threads = self.workers.take_threads();
        if let Some(checker) = self.health.take() {
            drop(checker.targets);
            threads.push(("the health checker".into(), checker.thread));
        }
        if let Some(refresher) = self.dns.take() {
            drop(refresher.stop);
            threads.push(("the DNS refresher".into(), refresher.thread));
        }
        if let Some(admin) = self.admin.take() {
            threads.push(("the admin endpoint".into(), admin.stop()));
        }
        if let Some(writer) = self.access_log_writer.take() {
            threads.push(("the access-log writer".into(), writer.into_thread()));
        }
        for (name, thread) in threads {
            waiter.join(&name, thread);
        }
        let signal_thread = self.signals.stop();
        waiter.join("the signal thread", signal_thread);
    }
}

/// Joins threads within a shared deadline, unless a stop signal says not to wait at all.
struct Waiter {
    signals: Receiver<i32>,
    deadline: Instant,
    /// Set by a stop signal: nothing more is waited for.
    abandoned: bool,
}

impl Waiter {
    fn join(&mut self, name: &str, thread: JoinHandle<()>) {
        let started = Instant::now();
        let mut announced = false;
        loop {
            if thread.is_finished() {
                if thread.join().is_err() {
                    warn!("{name} panicked");
                }
                return;
            }
            if self.abandoned {
                return;
            }
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                warn!("{name} did not end within {STOP_BUDGET:?}; exiting without it");
                return;
            }
            if !announced && started.elapsed() >= PATIENCE {
                // Tells the operator why the process is still there, and how not to wait.
                info!(
                    "waiting up to {left:.1?} more for {name} to end \
                     (SIGTERM again exits now)"
                );
                announced = true;
            }
            select! {
                recv(self.signals) -> signal => match signal {
                    Ok(signal) if signals::is_stop(signal) => {
                        info!(
                            "{} during shutdown: exiting without waiting for {name}",
                            signals::name(signal)
                        );
                        self.abandoned = true;
                    }
                    Ok(_) => {} // SIGHUP, SIGUSR1: nothing is reloaded or reopened any more
                    // The signal thread has ended (it is stopped last): a disconnected channel
                    // is always ready, so stop selecting on it.
                    Err(_) => self.signals = crossbeam_channel::never(),
                },
                default(left.min(POLL)) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use signal_hook::consts::{SIGHUP, SIGTERM};

    /// A thread that runs until `release` is dropped or sent to.
    fn blocked_thread() -> (JoinHandle<()>, Sender<()>) {
        let (release, wait) = crossbeam_channel::bounded::<()>(0);
        let thread = std::thread::spawn(move || {
            let _ = wait.recv();
        });
        (thread, release)
    }

    fn waiter(within: Duration) -> (Waiter, Sender<i32>) {
        let (send, signals) = crossbeam_channel::unbounded();
        let waiter = Waiter {
            signals,
            deadline: Instant::now() + within,
            abandoned: false,
        };
        (waiter, send)
    }

    #[test]
    fn a_thread_that_ends_is_joined() {
        let (mut waiter, _signals) = waiter(Duration::from_secs(30));
        let (thread, release) = blocked_thread();
        drop(release);
        waiter.join("test thread", thread);
        assert!(!waiter.abandoned);
    }

    #[test]
    fn a_stuck_thread_is_left_behind_at_the_deadline() {
        let (mut waiter, _signals) = waiter(Duration::from_millis(100));
        let (thread, _release) = blocked_thread();
        let started = Instant::now();
        waiter.join("stuck thread", thread);
        // Not before the deadline (measured against the deadline itself: the waiter was
        // created, and its deadline set, before `started`), and not much after it.
        assert!(Instant::now() >= waiter.deadline);
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn sighup_does_not_end_the_wait() {
        let (mut waiter, signals) = waiter(Duration::from_millis(200));
        signals.send(SIGHUP).unwrap();
        let (thread, _release) = blocked_thread();
        waiter.join("stuck thread", thread);
        assert!(Instant::now() >= waiter.deadline);
        assert!(!waiter.abandoned);
    }

    #[test]
    fn a_stop_signal_abandons_this_wait_and_every_later_one() {
        let (mut waiter, signals) = waiter(Duration::from_secs(30));
        signals.send(SIGTERM).unwrap();
        let started = Instant::now();
        let (first, _release_first) = blocked_thread();
        waiter.join("first", first);
        assert!(waiter.abandoned);
        let (second, _release_second) = blocked_thread();
        waiter.join("second", second);
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
