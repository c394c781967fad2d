//! The control side of the process: start-up (resolve, bind, spawn pinned workers), then the
//! control loop that owns the backend set and its health, publishes immutable snapshots to the
//! workers, and handles signals.
//!
//! Workers get commands over crossbeam channels, each followed by a byte on the worker's wake
//! pipe so its ring notices at once. Workers report passive failures back on a bounded channel
//! with `try_send`: they never block on the control thread.

pub mod access_log;
pub mod admin;
pub mod health;

use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};
use log::{info, warn};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::balance::flow_key_hash;
use crate::config::{BackendSpec, Config};
use crate::net;
use crate::snapshot::{Backend, BackendLoad, BackendSet, PickState, Policy, Snapshot};
use crate::worker::{self, Command, Settings, WorkerSetup};
use health::{CheckResult, CheckTarget, Health};

/// A start-up failure: the process exits with status 1 and this one-line message.
#[derive(Debug)]
pub struct StartError(pub String);

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

/// What workers and helper threads tell the control thread.
pub enum Event {
    Signal(i32),
    /// A flow failed to connect to backend `index` of `set`, or the backend reset it before
    /// sending a byte.
    BackendFailure {
        set: Arc<BackendSet>,
        index: usize,
    },
}

/// Events queued from workers before the control thread reads them; beyond this, failures are
/// dropped (they only feed a counter window, and a flood of them already took the backend down).
const EVENT_QUEUE: usize = 4096;
/// Descriptors kept back from the flow budget: listeners, rings, pipes, logs.
const RESERVED_FDS: u64 = 64;

struct WorkerHandle {
    commands: Sender<Command>,
    wake: std::io::PipeWriter,
    thread: JoinHandle<()>,
}

impl WorkerHandle {
    fn send(&mut self, command: Command) {
        if self.commands.send(command).is_ok() {
            let _ = self.wake.write_all(&[1]);
        }
    }
}

/// A configured backend and what the control thread knows about it.
struct BackendEntry {
    spec: BackendSpec,
    addr: SocketAddr,
    health: Health,
}

/// Starts the proxy and serves until SIGINT or SIGTERM; returns after every worker has closed
/// its flows and exited. With `--show-mapping` it prints the mapping and returns at once.
pub fn run(config: Config) -> Result<(), StartError> {
    let mut entries = Vec::with_capacity(config.backends.len());
    for spec in &config.backends {
        let addr = net::resolve(spec).map_err(StartError)?;
        entries.push(BackendEntry {
            spec: spec.clone(),
            addr,
            health: Health::new(),
        });
    }
    let mut control = Controller {
        policy: Policy {
            balance: config.balance,
            hash_balance_factor: config.hash_balance_factor,
        },
        loads: HashMap::new(),
        set: Arc::new(BackendSet::new(
            Vec::new(),
            config.algorithm,
            config.vnodes,
            None,
            0,
        )),
        entries,
        workers: Vec::new(),
        health_targets: None,
        events: None,
        config,
    };
    control.rebuild_set();

    if !control.config.show_mapping.is_empty() {
        control.print_mapping();
        return Ok(());
    }
    control.start_workers()?;
    control.serve()
}

struct Controller {
    config: Config,
    entries: Vec<BackendEntry>,
    /// Active-flow gauges by backend name, so counts survive changes of the backend set.
    loads: HashMap<String, Arc<BackendLoad>>,
    set: Arc<BackendSet>,
    policy: Policy,
    workers: Vec<WorkerHandle>,
    health_targets: Option<Sender<Vec<CheckTarget>>>,
    /// Events from workers; taken by the control loop.
    events: Option<Receiver<Event>>,
}

impl Controller {
    /// Builds the selection structures for the current entries (health is applied per snapshot).
    fn rebuild_set(&mut self) {
        let backends = self
            .entries
            .iter()
            .map(|entry| Backend {
                name: entry.spec.name.clone(),
                addr: entry.addr,
                sockaddr: entry.addr.into(),
                weight: entry.spec.weight,
                backup: entry.spec.backup,
                load: Arc::clone(self.loads.entry(entry.spec.name.clone()).or_default()),
            })
            .collect();
        self.set = Arc::new(BackendSet::new(
            backends,
            self.config.algorithm,
            self.config.vnodes,
            self.config.maglev_table_size,
            self.config.hash_seed,
        ));
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        let healthy = self.entries.iter().map(|e| e.health.is_up()).collect();
        Arc::new(Snapshot::new(Arc::clone(&self.set), healthy, self.policy))
    }

    fn publish(&mut self) {
        let snapshot = self.snapshot();
        for worker in &mut self.workers {
            worker.send(Command::Snapshot(Arc::clone(&snapshot)));
        }
    }

    fn print_mapping(&self) {
        let snapshot = self.snapshot();
        let mut state = PickState::new(0);
        for client in &self.config.show_mapping {
            let key = flow_key_hash(client, self.config.hash_key, self.config.hash_seed);
            let shown = if client.port() == 0 {
                client.ip().to_string()
            } else {
                client.to_string()
            };
            match snapshot.choose(key, &mut state, |_| true) {
                Some(i) => println!("{shown} -> {}", snapshot.backends()[i].name),
                None => println!("{shown} -> (no backend)"),
            }
        }
    }

    fn start_workers(&mut self) -> Result<(), StartError> {
        let cpus = core_affinity::get_core_ids().unwrap_or_default();
        let workers = self.config.workers.unwrap_or(cpus.len().max(1));
        let max_conns = self.config.max_conns.unwrap_or_else(|| {
            let limit = raise_fd_limit();
            let budget = limit.saturating_sub(RESERVED_FDS + 8 * workers as u64) / 2;
            budget.max(1) as usize
        });
        let listen = self.config.listen;
        let listeners = net::bind_listeners(listen, workers)
            .map_err(|e| StartError(format!("cannot listen on {listen}: {e}")))?;
        let listen_addr = net::local_addr(&listeners[0])
            .map_err(|e| StartError(format!("cannot listen on {listen}: {e}")))?;

        let settings = Settings {
            hash_key: self.config.hash_key,
            hash_seed: self.config.hash_seed,
            connect_timeout: self.config.connect_timeout,
            idle_timeout: self.config.idle_timeout,
            retries: self.config.retries,
            max_conns,
            buffer_size: self.config.buffer_size,
            buffers: self.config.buffers,
        };
        let (events_tx, events_rx) = crossbeam_channel::bounded(EVENT_QUEUE);
        self.events = Some(events_rx);
        let active_flows = Arc::new(AtomicUsize::new(0));
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(workers);
        let snapshot = self.snapshot();
        for (id, listener) in listeners.into_iter().enumerate() {
            let (commands, command_rx) = crossbeam_channel::unbounded();
            let (wake_rx, wake_tx) = std::io::pipe()
                .map_err(|e| StartError(format!("cannot create a wake-up pipe: {e}")))?;
            let setup = WorkerSetup {
                id,
                listener,
                snapshot: Arc::clone(&snapshot),
                commands: command_rx,
                wake: wake_rx,
                settings: settings.clone(),
                active_flows: Arc::clone(&active_flows),
                events: events_tx.clone(),
            };
            let cpu = (!cpus.is_empty()).then(|| cpus[id % cpus.len()]);
            let ready = ready_tx.clone();
            let thread = std::thread::Builder::new()
                .name(format!("ringway-w{id}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        core_affinity::set_for_current(cpu);
                    }
                    worker::run(setup, ready);
                })
                .map_err(|e| StartError(format!("cannot start worker thread: {e}")))?;
            self.workers.push(WorkerHandle {
                commands,
                wake: wake_tx,
                thread,
            });
        }
        drop(ready_tx);
        let mut failure = None;
        for _ in 0..workers {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(message)) => failure = Some(message),
                Err(_) => failure = Some("a worker thread died during start-up".to_string()),
            }
        }
        if let Some(message) = failure {
            self.stop_workers();
            return Err(StartError(message));
        }

        let names: Vec<String> = self
            .entries
            .iter()
            .map(|e| {
                let mut text = e.spec.name.clone();
                if e.spec.name != e.addr.to_string() {
                    text = format!("{text} ({})", e.addr);
                }
                if e.spec.backup {
                    text.push_str(" backup");
                }
                text
            })
            .collect();
        info!(
            "listening on {listen_addr} with {workers} workers, max {max_conns} flows, backends: {}",
            names.join(", ")
        );
        Ok(())
    }

    /// The control loop: health results, worker events, signals, periodic work.
    fn serve(&mut self) -> Result<(), StartError> {
        let events = self.events.take().expect("workers started");
        let (signal_tx, signal_rx) = crossbeam_channel::bounded(8);
        let mut signals = Signals::new([SIGINT, SIGTERM])
            .map_err(|e| StartError(format!("cannot install signal handlers: {e}")))?;
        let signal_handle = signals.handle();
        let signal_thread = std::thread::Builder::new()
            .name("ringway-signals".into())
            .spawn(move || {
                for signal in signals.forever() {
                    if signal_tx.send(Event::Signal(signal)).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| StartError(format!("cannot start the signal thread: {e}")))?;

        let (check_tx, check_rx) = crossbeam_channel::unbounded::<CheckResult>();
        let mut health_thread = None;
        if self.config.health.interval.is_some() {
            let (targets_tx, targets_rx) = crossbeam_channel::bounded(4);
            health_thread = Some(
                health::spawn(
                    self.config.health.clone(),
                    self.check_targets(),
                    targets_rx,
                    check_tx,
                )
                .map_err(|e| StartError(format!("cannot start the health checker: {e}")))?,
            );
            self.health_targets = Some(targets_tx);
        } else {
            drop(check_tx);
        }
        let ticker = crossbeam_channel::tick(Duration::from_secs(1));

        loop {
            select! {
                recv(signal_rx) -> event => {
                    if let Ok(Event::Signal(signal)) = event {
                        let name = if signal == SIGINT { "SIGINT" } else { "SIGTERM" };
                        info!("{name}: closing listeners and flows");
                        break;
                    }
                }
                recv(events) -> event => {
                    if let Ok(event) = event {
                        self.on_event(event);
                    }
                }
                recv(check_rx) -> result => {
                    if let Ok(result) = result {
                        self.on_check(result);
                    }
                }
                recv(ticker) -> _ => self.on_tick(),
            }
        }
        signal_handle.close();
        let _ = signal_thread.join();
        self.health_targets = None; // disconnects the checker, which then exits
        self.stop_workers();
        if let Some(thread) = health_thread {
            let _ = thread.join();
        }
        info!("stopped");
        Ok(())
    }

    fn check_targets(&self) -> Vec<CheckTarget> {
        self.entries
            .iter()
            .map(|e| CheckTarget {
                name: e.spec.name.clone(),
                addr: match e.spec.check_port {
                    Some(port) => SocketAddr::new(e.addr.ip(), port),
                    None => e.addr,
                },
            })
            .collect()
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Signal(_) => {}
            Event::BackendFailure { set, index } => {
                let Some(name) = set.backends.get(index).map(|b| b.name.clone()) else {
                    return;
                };
                let Some(i) = self.entries.iter().position(|e| e.spec.name == name) else {
                    return; // removed since
                };
                let config = &self.config.health;
                if let Some(up) = self.entries[i]
                    .health
                    .on_passive_failure(Instant::now(), config)
                {
                    self.log_transition(
                        i,
                        up,
                        "passive",
                        &format!(
                            "{} failed connects or early resets within {:?}",
                            config.max_fails, config.fail_timeout
                        ),
                    );
                    self.publish();
                }
            }
        }
    }

    fn on_check(&mut self, result: CheckResult) {
        let Some(i) = self.entries.iter().position(|e| e.spec.name == result.name) else {
            return;
        };
        if let Some(up) = self.entries[i]
            .health
            .on_check(result.ok, &self.config.health)
        {
            let detail = if up {
                format!("{} checks passed", self.config.health.rise)
            } else {
                format!(
                    "{} checks failed, last: {}",
                    self.config.health.fall, result.detail
                )
            };
            self.log_transition(i, up, "check", &detail);
            self.publish();
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        let mut changed = false;
        for i in 0..self.entries.len() {
            if let Some(up) = self.entries[i].health.on_tick(now, &self.config.health) {
                self.log_transition(i, up, "retry", "fail timeout passed");
                changed = true;
            }
        }
        if changed {
            self.publish();
        }
    }

    fn log_transition(&self, i: usize, up: bool, how: &str, detail: &str) {
        let name = &self.entries[i].spec.name;
        let healthy = self.entries.iter().filter(|e| e.health.is_up()).count();
        let total = self.entries.len();
        if up {
            info!("backend {name} is UP ({how}: {detail}); {healthy}/{total} healthy");
        } else {
            warn!("backend {name} is DOWN ({how}: {detail}); {healthy}/{total} healthy");
        }
        if healthy == 0 {
            warn!("no backend is healthy: new flows are refused until one comes back");
        }
    }

    fn stop_workers(&mut self) {
        for worker in &mut self.workers {
            worker.send(Command::Stop);
        }
        for worker in self.workers.drain(..) {
            if worker.thread.join().is_err() {
                warn!("a worker thread panicked while stopping");
            }
        }
    }
}

/// Raises the soft open-file limit to the hard one (each flow needs two descriptors) and
/// returns the limit in force.
fn raise_fd_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            warn!("cannot read or raise the open-file limit: {e}");
            1024
        }
    }
}
