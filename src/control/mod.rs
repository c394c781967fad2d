//! The control side of the process: start-up (resolve, bind, spawn pinned workers), and the
//! signals that stop it. Workers get their commands over crossbeam channels, each followed by a
//! byte on the worker's wake pipe so its ring notices at once.

use std::fmt;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::Sender;
use log::{info, warn};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::balance::BackendId;
use crate::config::Config;
use crate::net;
use crate::snapshot::Snapshot;
use crate::worker::{self, Command, Settings, WorkerSetup};

/// A start-up failure: the process exits with status 1 and this one-line message.
#[derive(Debug)]
pub struct StartError(pub String);

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

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

/// Starts the proxy and serves until SIGINT or SIGTERM; returns after every worker has closed
/// its flows and exited.
pub fn run(config: Config) -> Result<(), StartError> {
    let cpus = core_affinity::get_core_ids().unwrap_or_default();
    let workers = config.workers.unwrap_or(cpus.len().max(1));

    let mut backends = Vec::with_capacity(config.backends.len());
    for spec in &config.backends {
        let addr = net::resolve(spec).map_err(StartError)?;
        let id = BackendId {
            name: spec.name.clone(),
            weight: spec.weight,
            backup: spec.backup,
        };
        backends.push((id, addr));
    }
    let backend_names: Vec<String> = backends
        .iter()
        .map(|(id, addr)| {
            if id.name == addr.to_string() {
                id.name.clone()
            } else {
                format!("{} ({addr})", id.name)
            }
        })
        .collect();
    let snapshot = Arc::new(Snapshot::new(backends, config.vnodes, config.hash_seed));

    let max_conns = config.max_conns.unwrap_or_else(|| {
        let limit = raise_fd_limit();
        let budget = limit.saturating_sub(RESERVED_FDS + 8 * workers as u64) / 2;
        budget.max(1) as usize
    });

    let listeners = net::bind_listeners(config.listen, workers)
        .map_err(|e| StartError(format!("cannot listen on {}: {e}", config.listen)))?;
    let listen_addr: SocketAddr = net::local_addr(&listeners[0])
        .map_err(|e| StartError(format!("cannot listen on {}: {e}", config.listen)))?;

    let settings = Settings {
        hash_key: config.hash_key,
        hash_seed: config.hash_seed,
        connect_timeout: config.connect_timeout,
        idle_timeout: config.idle_timeout,
        retries: config.retries,
        max_conns,
        buffer_size: config.buffer_size,
        buffers: config.buffers,
    };
    let active_flows = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::with_capacity(workers);
    let (ready_tx, ready_rx) = crossbeam_channel::bounded(workers);
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
        handles.push(WorkerHandle {
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
        stop_all(handles);
        return Err(StartError(message));
    }

    info!(
        "listening on {listen_addr} with {workers} workers, max {max_conns} flows, backends: {}",
        backend_names.join(", ")
    );

    let mut signals = Signals::new([SIGINT, SIGTERM])
        .map_err(|e| StartError(format!("cannot install signal handlers: {e}")))?;
    if let Some(signal) = signals.forever().next() {
        let name = if signal == SIGINT {
            "SIGINT"
        } else {
            "SIGTERM"
        };
        info!("{name}: closing listeners and flows");
    }
    stop_all(handles);
    info!("stopped");
    Ok(())
}

fn stop_all(mut handles: Vec<WorkerHandle>) {
    for handle in &mut handles {
        handle.send(Command::Stop);
    }
    for handle in handles {
        if handle.thread.join().is_err() {
            warn!("a worker thread panicked while stopping");
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
