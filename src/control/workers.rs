//! The control side of the workers: per worker, a command channel, the wake pipe that makes
//! its ring notice a command at once, and its thread.
//!
//! A worker thread ends on `Stop`, after a `Drain`, or by a bug; either way it reports
//! `Event::WorkerExited` on the event channel just before it ends, which is how the control
//! loop knows when every worker is gone.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use log::warn;

use crate::events::Event;
use crate::snapshot::Snapshot;
use crate::worker::{self, Command, WorkerSetup};

/// How long an exiting worker may block to report its exit on a full event queue.
const EXIT_REPORT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long `publish_and_wait` waits for every worker to confirm a new snapshot.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(1);

struct WorkerHandle {
    commands: Sender<Command>,
    wake: std::io::PipeWriter,
    /// Bumped by the worker once per tick of its event loop (`super::liveness`).
    heartbeat: Arc<AtomicU64>,
    /// `None` once joined or given up on.
    thread: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    /// Returns whether the worker is still there to receive it.
    fn send(&mut self, command: Command) -> bool {
        let sent = self.commands.send(command).is_ok();
        if sent {
            let _ = self.wake.write_all(&[1]);
        }
        sent
    }
}

#[derive(Default)]
pub struct WorkerPool {
    workers: Vec<WorkerHandle>,
}

impl WorkerPool {
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// Starts worker `id`, pinned to `cpu` if given, with the setup `setup` builds around the
    /// worker's ends of its command channel and wake pipe. The worker reports on `ready` once
    /// its ring is up (or why it is not), and on `exits` when its thread ends. The setup also
    /// gets the heartbeat counter the worker bumps every tick ([`WorkerPool::heartbeats`]).
    pub fn spawn(
        &mut self,
        id: usize,
        cpu: Option<core_affinity::CoreId>,
        ready: Sender<Result<(), String>>,
        exits: Sender<Event>,
        setup: impl FnOnce(Receiver<Command>, std::io::PipeReader, Arc<AtomicU64>) -> WorkerSetup,
    ) -> Result<(), String> {
        let (commands, command_rx) = crossbeam_channel::unbounded();
        let (wake_rx, wake) =
            std::io::pipe().map_err(|e| format!("cannot create a wake-up pipe: {e}"))?;
        let heartbeat = Arc::new(AtomicU64::new(0));
        let setup = setup(command_rx, wake_rx, Arc::clone(&heartbeat));
        let thread = std::thread::Builder::new()
            .name(format!("ringway-w{id}"))
            .spawn(move || {
                if let Some(cpu) = cpu {
                    core_affinity::set_for_current(cpu);
                }
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    worker::run(setup, ready)
                }));
                let panicked = outcome.is_err();
                let _ =
                    exits.send_timeout(Event::WorkerExited { id, panicked }, EXIT_REPORT_TIMEOUT);
            })
            .map_err(|e| format!("cannot start worker thread: {e}"))?;
        self.workers.push(WorkerHandle {
            commands,
            wake,
            heartbeat,
            thread: Some(thread),
        });
        Ok(())
    }

    /// Each worker's heartbeat, or `None` for a worker whose thread has ended (or was given up
    /// on): it is no longer expected to beat.
    pub fn heartbeats(&self) -> Vec<Option<u64>> {
        self.workers
            .iter()
            .map(|w| {
                let running = w.thread.as_ref().is_some_and(|t| !t.is_finished());
                running.then(|| w.heartbeat.load(Ordering::Relaxed))
            })
            .collect()
    }

    /// Sends one worker a command; false if it is gone.
    pub fn send_to(&mut self, id: usize, command: Command) -> bool {
        self.workers.get_mut(id).is_some_and(|w| w.send(command))
    }

    pub fn broadcast(&mut self, command: impl Fn() -> Command) {
        for worker in &mut self.workers {
            let _ = worker.send(command());
        }
    }

    /// Sends every worker `snapshot` and waits (up to a second) until each routes by it, so
    /// that what is logged next is already true for every new flow.
    pub fn publish_and_wait(&mut self, snapshot: &Arc<Snapshot>) {
        let (ack, acks) = crossbeam_channel::bounded(self.workers.len());
        let mut listening = 0;
        for worker in &mut self.workers {
            if worker.send(Command::Snapshot(Arc::clone(snapshot), Some(ack.clone()))) {
                listening += 1;
            }
        }
        drop(ack);
        let deadline = Instant::now() + PUBLISH_TIMEOUT;
        for _ in 0..listening {
            if acks.recv_deadline(deadline).is_err() {
                warn!("a worker did not confirm the new backend set within {PUBLISH_TIMEOUT:?}");
                break;
            }
        }
    }

    /// The threads not joined yet, to be joined by whoever stops the process.
    pub fn take_threads(&mut self) -> Vec<(String, JoinHandle<()>)> {
        self.workers
            .iter_mut()
            .enumerate()
            .filter_map(|(id, w)| Some((format!("worker {id}"), w.thread.take()?)))
            .collect()
    }

    /// Forgets the threads that have not ended: the process exits without them.
    pub fn give_up(&mut self) {
        for (name, thread) in self.take_threads() {
            if !thread.is_finished() {
                warn!("{name} did not stop; exiting without it");
            }
        }
    }
}
