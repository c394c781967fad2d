//! The control side of the process: start-up (resolve, bind, spawn pinned workers), then the
//! control loop that owns the backend set and its health, publishes immutable snapshots to the
//! workers, follows the backend sources (file, DNS), serves the admin endpoint, and handles
//! signals (SIGHUP reload, SIGTERM/SIGINT drain, a second one stops at once).
//!
//! Workers get commands over crossbeam channels, each followed by a byte on the worker's wake
//! pipe so its ring notices at once. Workers report passive failures back on a bounded channel
//! with `try_send`: they never block on the control thread.

pub mod access_log;
pub mod admin;
pub mod health;
mod sources;
mod view;

use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};
use log::{error, info, warn};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::balance::flow_key_hash;
use crate::config::{BackendSpec, Config, ProxyVersion};
use crate::metrics::{BackendStats, WorkerStatsWriter};
use crate::net;
use crate::snapshot::{Backend, BackendLoad, BackendSet, PickState, Policy, Snapshot};
use crate::worker::{self, Command, Edge, Settings, WorkerSetup};
use health::{CheckResult, CheckTarget, Health};
use sources::{DnsAnswer, Sources};
use view::View;

/// A start-up failure: the process exits with status 1 and this one-line message.
#[derive(Debug)]
pub struct StartError(pub String);

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

/// What workers tell the control thread.
pub enum Event {
    /// A flow's connect to backend `index` of `set` failed with evidence against the backend
    /// (refused, timed out, unreachable: `health::ConnectFailure::Backend`).
    BackendFailure { set: Arc<BackendSet>, index: usize },
    /// A worker thread ended; `panicked` if it did not end by a stop or drain.
    WorkerExited { id: usize, panicked: bool },
}

/// Events queued from workers before the control thread reads them; beyond this, failures are
/// dropped (they only feed a counter window, and a flood of them already took the backend down).
const EVENT_QUEUE: usize = 4096;
/// Descriptors kept back from the flow budget: listeners, rings, pipes, logs.
const RESERVED_FDS: u64 = 64;
/// Queue of the access-log writer; about 150 bytes a record.
const ACCESS_LOG_QUEUE: usize = 16384;
/// Keys sampled to report what fraction of the key space a backend change moved.
const MOVED_SAMPLE: u64 = 65536;

struct WorkerHandle {
    commands: Sender<Command>,
    wake: std::io::PipeWriter,
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

/// A configured backend and what the control thread knows about it.
struct BackendEntry {
    spec: BackendSpec,
    addr: SocketAddr,
    health: Health,
}

/// Counters that belong to a backend name and outlive backend-set changes.
#[derive(Clone, Default)]
struct Shared {
    load: Arc<BackendLoad>,
    stats: Arc<BackendStats>,
}

/// Starts the proxy and serves until SIGINT or SIGTERM; returns after every worker has closed
/// its flows and exited. With `--show-mapping` it prints the mapping and returns at once.
pub fn run(config: Config) -> Result<(), StartError> {
    let sources = Sources::load(&config).map_err(StartError)?;
    let specs = sources.merged();
    if specs.is_empty() {
        return Err(StartError("no backends configured".into()));
    }
    let entries = resolve_all(&specs, &[]).map_err(StartError)?;
    let mut control = Controller {
        policy: Policy {
            balance: config.balance,
            hash_balance_factor: config.hash_balance_factor,
        },
        shared: HashMap::new(),
        set: Arc::new(BackendSet::new(
            Vec::new(),
            config.algorithm,
            config.vnodes,
            None,
            0,
        )),
        entries,
        sources,
        workers: Vec::new(),
        health_targets: None,
        events: None,
        view: None,
        access_log_writer: None,
        exit_error: None,
        passive_override: false,
        config,
    };
    control.rebuild_set();

    if !control.config.show_mapping.is_empty() {
        control.print_mapping();
        return Ok(());
    }
    // Handlers go in before anything starts: a SIGHUP or SIGTERM during start-up (systemd
    // reload right after start) must not kill the process with the default action.
    let signals = Signals::new([SIGINT, SIGTERM, SIGHUP])
        .map_err(|e| StartError(format!("cannot install signal handlers: {e}")))?;
    control.start_workers()?;
    control.serve(signals)
}

/// Resolves every spec; entries of names already known keep their health state.
fn resolve_all(
    specs: &[BackendSpec],
    previous: &[BackendEntry],
) -> Result<Vec<BackendEntry>, String> {
    specs
        .iter()
        .map(|spec| {
            let addr = net::resolve(spec)?;
            let health = previous
                .iter()
                .find(|e| e.spec.name == spec.name && e.addr == addr)
                .map(|e| e.health.clone())
                .unwrap_or_default();
            Ok(BackendEntry {
                spec: spec.clone(),
                addr,
                health,
            })
        })
        .collect()
}

struct Controller {
    config: Config,
    entries: Vec<BackendEntry>,
    sources: Sources,
    shared: HashMap<String, Shared>,
    set: Arc<BackendSet>,
    policy: Policy,
    workers: Vec<WorkerHandle>,
    health_targets: Option<Sender<Vec<CheckTarget>>>,
    /// Events from workers; taken by the control loop.
    events: Option<Receiver<Event>>,
    view: Option<Arc<View>>,
    access_log_writer: Option<JoinHandle<()>>,
    /// Set when a worker died: the process stops and exits non-zero.
    exit_error: Option<String>,
    /// Every backend is down and those down by passive evidence alone take flows anyway.
    passive_override: bool,
}

impl Controller {
    /// Builds the selection structures for the current entries (health is applied per snapshot).
    fn rebuild_set(&mut self) {
        let backends = self
            .entries
            .iter()
            .map(|entry| {
                let shared = self.shared.entry(entry.spec.name.clone()).or_default();
                shared.stats.set_healthy(entry.health.is_up());
                Backend {
                    name: entry.spec.name.as_str().into(),
                    addr: entry.addr,
                    sockaddr: entry.addr.into(),
                    weight: entry.spec.weight,
                    backup: entry.spec.backup,
                    load: Arc::clone(&shared.load),
                    stats: Arc::clone(&shared.stats),
                }
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
        let usable = health::routable(self.entries.iter().map(|e| &e.health)).usable;
        Arc::new(Snapshot::new(Arc::clone(&self.set), usable, self.policy))
    }

    /// Sends every worker the current snapshot and waits (up to a second) until each routes by
    /// it, so that what is logged next is already true for every new flow.
    fn publish_and_wait(&mut self) {
        let snapshot = self.snapshot();
        let (ack, acks) = crossbeam_channel::bounded(self.workers.len());
        let mut listening = 0;
        for worker in &mut self.workers {
            if worker.send(Command::Snapshot(Arc::clone(&snapshot), Some(ack.clone()))) {
                listening += 1;
            }
        }
        drop(ack);
        let deadline = Instant::now() + Duration::from_secs(1);
        for _ in 0..listening {
            if acks.recv_deadline(deadline).is_err() {
                warn!("a worker did not confirm the new backend set within 1 s");
                break;
            }
        }
        if let Some(view) = &self.view {
            view.set_snapshot(snapshot);
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
        // Raised even with an explicit --max-conns: each flow needs two descriptors.
        let fd_limit = raise_fd_limit();
        let max_conns = self.config.max_conns.unwrap_or_else(|| {
            let budget = fd_limit.saturating_sub(RESERVED_FDS + 8 * workers as u64) / 2;
            budget.max(1) as usize
        });
        if max_conns as u64 * 2 + RESERVED_FDS > fd_limit {
            warn!(
                "--max-conns {max_conns} needs about {} descriptors but the open-file limit is \
                 {fd_limit}: expect EMFILE (accepts pause) before the limit is reached",
                max_conns as u64 * 2 + RESERVED_FDS
            );
        }
        let listen = self.config.listen;
        let edge = Arc::new(Edge::new(&self.config.edge, self.config.hash_seed));
        let backlog = self.config.edge.listen_backlog;
        let listeners =
            net::bind_listeners(listen, workers, backlog, |s| edge.configure_listener(s))
                .map_err(|e| StartError(format!("cannot listen on {listen}: {e}")))?;
        let listen_addr = net::local_addr(&listeners[0])
            .map_err(|e| StartError(format!("cannot listen on {listen}: {e}")))?;
        let admin_listener = match self.config.admin {
            Some(addr) => Some(
                std::net::TcpListener::bind(addr)
                    .map_err(|e| StartError(format!("--admin: cannot listen on {addr}: {e}")))?,
            ),
            None => None,
        };
        let access_log = match &self.config.access_log {
            Some(target) => {
                let (log, writer) = access_log::open(target, ACCESS_LOG_QUEUE)
                    .map_err(|e| StartError(format!("--access-log {target}: {e}")))?;
                self.access_log_writer = Some(writer);
                Some(log)
            }
            None => None,
        };

        let settings = Settings {
            hash_key: self.config.hash_key,
            hash_seed: self.config.hash_seed,
            connect_timeout: self.config.connect_timeout,
            idle_timeout: self.config.idle_timeout,
            retries: self.config.retries,
            max_conns,
            buffer_size: self.config.buffer_size,
            buffers: self.config.buffers,
            edge,
            multishot_accept_room: (backlog.max(0) as usize + 64) * workers,
        };
        let (events_tx, events_rx) = crossbeam_channel::bounded(EVENT_QUEUE);
        self.events = Some(events_rx);
        let active_flows = Arc::new(AtomicUsize::new(0));
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(workers);
        let snapshot = self.snapshot();
        let mut worker_stats = Vec::with_capacity(workers);
        for (id, listener) in listeners.into_iter().enumerate() {
            let (commands, command_rx) = crossbeam_channel::unbounded();
            let (wake_rx, wake_tx) = std::io::pipe()
                .map_err(|e| StartError(format!("cannot create a wake-up pipe: {e}")))?;
            let stats = WorkerStatsWriter::new();
            worker_stats.push(Arc::clone(stats.stats()));
            let setup = WorkerSetup {
                id,
                listener,
                snapshot: Arc::clone(&snapshot),
                commands: command_rx,
                wake: wake_rx,
                settings: settings.clone(),
                active_flows: Arc::clone(&active_flows),
                events: events_tx.clone(),
                stats,
                access_log: access_log.clone(),
                listen_addr,
            };
            let cpu = (!cpus.is_empty()).then(|| cpus[id % cpus.len()]);
            let ready = ready_tx.clone();
            let exits = events_tx.clone();
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
                    let _ = exits
                        .send_timeout(Event::WorkerExited { id, panicked }, Duration::from_secs(1));
                })
                .map_err(|e| StartError(format!("cannot start worker thread: {e}")))?;
            self.workers.push(WorkerHandle {
                commands,
                wake: wake_tx,
                thread: Some(thread),
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

        let view = Arc::new(View::new(
            worker_stats,
            max_conns as u64,
            snapshot,
            access_log,
        ));
        if let Some(listener) = admin_listener {
            let addr = listener.local_addr().ok();
            admin::spawn(listener, Arc::clone(&view) as Arc<dyn admin::AdminView>)
                .map_err(|e| StartError(format!("--admin: cannot start: {e}")))?;
            if let Some(addr) = addr {
                info!("admin endpoint on http://{addr}/metrics and /backends");
            }
        }
        self.view = Some(view);

        if std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req")
            .is_ok_and(|v| v.trim() == "0")
        {
            info!(
                "net.ipv4.tcp_migrate_req is 0: during an upgrade the kernel resets connections \
                 still queued on this process's listeners when it stops; set it to 1 for \
                 zero-loss upgrades (docs/operations.md)"
            );
        }
        let names: Vec<String> = self.entries.iter().map(describe).collect();
        info!(
            "listening on {listen_addr} with {workers} workers, max {max_conns} flows, backends: {}",
            names.join(", ")
        );
        Ok(())
    }

    /// The control loop: health results, worker events, signals, periodic work.
    fn serve(&mut self, mut signals: Signals) -> Result<(), StartError> {
        let events = self.events.take().expect("workers started");
        let (signal_tx, signal_rx) = crossbeam_channel::bounded(8);
        let signal_handle = signals.handle();
        let signal_thread = std::thread::Builder::new()
            .name("ringway-signals".into())
            .spawn(move || {
                for signal in signals.forever() {
                    if signal_tx.send(signal).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| StartError(format!("cannot start the signal thread: {e}")))?;

        // A source that is off must be `never()`, not a dropped sender: a disconnected channel
        // is always ready in `select!` and would spin this thread.
        let (check_tx, mut check_rx) = crossbeam_channel::unbounded::<CheckResult>();
        let mut health_thread = None;
        if self.config.health.interval.is_some() {
            let (targets_tx, targets_rx) = crossbeam_channel::bounded(4);
            // Backends behind --send-proxy expect a PROXY header first; checks announce
            // themselves as LOCAL (v2) / UNKNOWN (v1), as HAProxy's check-send-proxy does.
            let mut check_config = self.config.health.clone();
            let mut prefix = Vec::new();
            match self.config.edge.send_proxy {
                Some(ProxyVersion::V1) => prefix.extend_from_slice(b"PROXY UNKNOWN\r\n"),
                Some(ProxyVersion::V2) => crate::proxy_protocol::encode_v2_local(&mut prefix),
                None => {}
            }
            prefix.extend_from_slice(&check_config.send);
            check_config.send = prefix;
            health_thread = Some(
                health::spawn(check_config, self.check_targets(), targets_rx, check_tx)
                    .map_err(|e| StartError(format!("cannot start the health checker: {e}")))?,
            );
            self.health_targets = Some(targets_tx);
        } else {
            drop(check_tx);
            check_rx = crossbeam_channel::never();
        }
        let (dns_tx, mut dns_rx) = crossbeam_channel::unbounded::<DnsAnswer>();
        let (dns_stop_tx, dns_stop_rx) = crossbeam_channel::bounded::<()>(1);
        let mut dns_thread = None;
        if !self.config.backend_dns.is_empty() {
            let nameserver = sources::nameserver(&self.config).map_err(StartError)?;
            dns_thread = Some(
                sources::spawn_dns_refresher(
                    self.config.backend_dns.clone(),
                    nameserver,
                    self.config.dns_refresh,
                    dns_tx,
                    dns_stop_rx,
                )
                .map_err(|e| StartError(format!("cannot start the DNS refresher: {e}")))?,
            );
        } else {
            drop(dns_tx);
            dns_rx = crossbeam_channel::never();
        }
        let ticker = crossbeam_channel::tick(Duration::from_secs(1));

        let mut draining = false;
        let mut running = self.workers.len();
        while running > 0 {
            select! {
                recv(signal_rx) -> signal => match signal {
                    Ok(SIGHUP) => self.reload("SIGHUP"),
                    Ok(signal) => {
                        let name = if signal == SIGINT { "SIGINT" } else { "SIGTERM" };
                        if draining {
                            info!("{name} again: closing every flow now");
                            self.broadcast(|| Command::Stop);
                        } else {
                            draining = true;
                            let deadline = Instant::now() + self.config.shutdown_timeout;
                            info!(
                                "{name}: listeners closed, letting live flows finish for up to {:?} \
                                 (send it again to close them now)",
                                self.config.shutdown_timeout
                            );
                            self.broadcast(|| Command::Drain { deadline });
                        }
                    }
                    Err(_) => break,
                },
                recv(events) -> event => match event {
                    Ok(Event::WorkerExited { id, panicked }) => {
                        running -= 1;
                        if panicked || !draining {
                            let message = format!("worker {id} stopped unexpectedly");
                            error!("{message}; stopping the process");
                            self.exit_error.get_or_insert(message);
                            draining = true;
                            self.broadcast(|| Command::Stop);
                        }
                    }
                    Ok(event) => self.on_event(event),
                    Err(_) => break,
                },
                recv(check_rx) -> result => match result {
                    Ok(result) => self.on_check(result),
                    Err(_) => check_rx = crossbeam_channel::never(),
                },
                recv(dns_rx) -> answer => match answer {
                    Ok(answer) => {
                        if self.sources.apply_dns(answer) {
                            self.apply_sources("DNS");
                        }
                    }
                    Err(_) => dns_rx = crossbeam_channel::never(),
                },
                recv(ticker) -> _ => self.on_tick(),
            }
        }
        signal_handle.close();
        let _ = signal_thread.join();
        self.health_targets = None; // disconnects the checker, which then exits
        drop(dns_stop_tx);
        self.stop_workers();
        if let Some(thread) = health_thread {
            let _ = thread.join();
        }
        if let Some(thread) = dns_thread {
            let _ = thread.join();
        }
        // The workers' access-log senders are gone: the writer flushes and ends.
        self.view = None;
        if let Some(writer) = self.access_log_writer.take() {
            let _ = writer.join();
        }
        match self.exit_error.take() {
            Some(message) => Err(StartError(message)),
            None => {
                info!("stopped");
                Ok(())
            }
        }
    }

    fn broadcast(&mut self, command: impl Fn() -> Command) {
        for worker in &mut self.workers {
            let _ = worker.send(command());
        }
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
        let Event::BackendFailure { set, index } = event else {
            return;
        };
        let Some(name) = set.backends.get(index).map(|b| Arc::clone(&b.name)) else {
            return;
        };
        let Some(i) = self.entries.iter().position(|e| *e.spec.name == *name) else {
            return; // removed since
        };
        let config = &self.config.health;
        if let Some(up) = self.entries[i]
            .health
            .on_passive_failure(Instant::now(), config)
        {
            let detail = format!(
                "{} failed connects within {:?}",
                config.max_fails, config.fail_timeout
            );
            self.transition(i, up, "passive", &detail);
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
            self.transition(i, up, "check", &detail);
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        for i in 0..self.entries.len() {
            if let Some(up) = self.entries[i].health.on_tick(now, &self.config.health) {
                self.transition(i, up, "retry", "fail timeout passed");
            }
        }
        if self.sources.file_changed() {
            self.reload("file change");
        }
    }

    /// Logs a health change, updates the metrics and sends workers the new mask.
    fn transition(&mut self, i: usize, up: bool, how: &str, detail: &str) {
        let name = self.entries[i].spec.name.clone();
        if let Some(shared) = self.shared.get(&name) {
            shared.stats.set_healthy(up);
        }
        // Every worker uses the new mask before the line is logged: what it says is true.
        self.publish_and_wait();
        let healthy = self.entries.iter().filter(|e| e.health.is_up()).count();
        let total = self.entries.len();
        if up {
            info!("backend {name} is UP ({how}: {detail}); {healthy}/{total} healthy");
        } else {
            warn!("backend {name} is DOWN ({how}: {detail}); {healthy}/{total} healthy");
        }
        self.log_routing();
    }

    /// Says when new flows have nowhere to go, and when (and until when) backends down by passive
    /// evidence alone take them anyway; the override is logged once, when it starts.
    fn log_routing(&mut self) {
        let routable = health::routable(self.entries.iter().map(|e| &e.health));
        if routable.passive_override && !self.passive_override {
            warn!(
                "every backend is down, some by passive checks alone (failed connects): new \
                 flows still try those, so passive evidence never leaves the pool empty; \
                 backends down by active checks stay out"
            );
        } else if !routable.passive_override && self.passive_override {
            info!("passive override over: new flows use healthy backends only again");
        }
        self.passive_override = routable.passive_override;
        if !routable.usable.contains(&true) {
            warn!("no backend is healthy: new flows are refused until one comes back");
        }
    }

    /// SIGHUP or a file change: re-read the backends file and apply it as a whole.
    fn reload(&mut self, why: &str) {
        if !self.sources.has_file() {
            if why == "SIGHUP" {
                info!("SIGHUP: no --backends-file to reload");
            }
            return;
        }
        match self.sources.reload_file() {
            Ok(()) => self.apply_sources(why),
            Err(e) => warn!("{why}: {e}; keeping the running backends"),
        }
    }

    /// Makes the merged source lists the running backend set: only changed backends' keys move;
    /// removed backends take no new flows, and their live flows go on (up to --drain-timeout).
    fn apply_sources(&mut self, why: &str) {
        let specs = self.sources.merged();
        if specs.is_empty() {
            warn!("{why}: the backend list would be empty; keeping the running backends");
            return;
        }
        let unchanged = specs.len() == self.entries.len()
            && specs.iter().zip(&self.entries).all(|(s, e)| *s == e.spec);
        if unchanged {
            return;
        }
        let entries = match resolve_all(&specs, &self.entries) {
            Ok(entries) => entries,
            Err(e) => {
                warn!("{why}: {e}; keeping the running backends");
                return;
            }
        };
        let old_set = Arc::clone(&self.set);
        let added: Vec<String> = entries
            .iter()
            .filter(|e| !self.entries.iter().any(|o| o.spec.name == e.spec.name))
            .map(describe)
            .collect();
        let removed: Vec<Arc<str>> = self
            .entries
            .iter()
            .filter(|o| !entries.iter().any(|e| e.spec.name == o.spec.name))
            .map(|o| Arc::from(o.spec.name.as_str()))
            .collect();
        self.entries = entries;
        self.rebuild_set();
        self.shared
            .retain(|name, _| self.entries.iter().any(|e| e.spec.name == *name));
        let moved = moved_fraction(&old_set, &self.set);
        self.publish_and_wait();
        self.log_routing();
        info!(
            "{why}: backends changed (added: [{}], removed: [{}], {} total); {:.1}% of keys moved",
            added.join(", "),
            removed
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            self.entries.len(),
            moved * 100.0
        );
        if let Some(targets) = &self.health_targets {
            let _ = targets.try_send(self.check_targets());
        }
        if let (Some(timeout), false) = (self.config.drain_timeout, removed.is_empty()) {
            let deadline = Instant::now() + timeout;
            self.broadcast(|| Command::CloseBackends {
                names: removed.clone(),
                deadline,
            });
        }
    }

    fn stop_workers(&mut self) {
        self.broadcast(|| Command::Stop);
        for worker in &mut self.workers {
            if let Some(thread) = worker.thread.take() {
                if thread.join().is_err() {
                    warn!("a worker thread panicked while stopping");
                }
            }
        }
        self.workers.clear();
    }
}

fn describe(entry: &BackendEntry) -> String {
    let mut text = entry.spec.name.clone();
    if entry.spec.name != entry.addr.to_string() {
        text = format!("{text} ({})", entry.addr);
    }
    if entry.spec.backup {
        text.push_str(" backup");
    }
    text
}

/// Fraction of a sample of keys whose backend (by name) differs between two sets, all healthy.
fn moved_fraction(old: &BackendSet, new: &BackendSet) -> f64 {
    let mut moved = 0u64;
    for k in 0..MOVED_SAMPLE {
        let key = k.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let before = old
            .table
            .choose(key, |_| true)
            .map(|i| &old.backends[i].name);
        let after = new
            .table
            .choose(key, |_| true)
            .map(|i| &new.backends[i].name);
        if before != after {
            moved += 1;
        }
    }
    moved as f64 / MOVED_SAMPLE as f64
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
