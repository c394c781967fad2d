//! Start-up: everything between a valid configuration and the `listening on` line. The order
//! is chosen so that whatever can fail for a reason the operator must fix (a busy port, the
//! admin port, the access-log path) fails before any worker starts; a failure after that stops
//! what was started and returns the error.
//!
//! 1. Bind one SO_REUSEPORT listener per worker, the admin listener, open the access log
//!    (starts the writer thread).
//! 2. Start the workers and wait until each reports its ring up.
//! 3. Start the admin threads, the health checker, the DNS refresher.
//!
//! Every thread started goes into [`Threads`], which the caller owns.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use log::{info, warn};

use super::admin;
use super::backends::Backends;
use super::control_loop::Control;
use super::health;
use super::liveness::Liveness;
use super::notify::Notifier;
use super::signals::SignalThread;
use super::sources;
use super::status::ProcessInfo;
use super::threads::{DnsRefresher, HealthChecker, Threads};
use super::view::View;
use super::StartError;
use crate::access_log;
use crate::config::{Config, HealthConfig, ProxyVersion};
use crate::metrics::WorkerStatsWriter;
use crate::net;
use crate::worker::{Edge, Settings, WorkerSetup};

/// Events queued from workers before the control thread reads them; beyond this, failures are
/// dropped (they only feed a counter window, and a flood of them already took the backend down).
const EVENT_QUEUE: usize = 4096;
/// Descriptors kept back from the flow budget for the process (besides the 8 per worker:
/// listener, ring, wake pipe, and the one connection a worker may hold parked at the limit):
/// stdio, the admin listener and its 4 connections, the access log, up to 32 health checks at
/// once, the DNS socket, the signal pipe: about 45 at most (19 measured with two workers,
/// --admin, --access-log and health checks, between checks).
const RESERVED_FDS: u64 = 64;
/// Queue of the access-log writer; about 150 bytes a record.
const ACCESS_LOG_QUEUE: usize = 16384;

/// Starts every thread. On success the caller runs the control loop and then
/// `Threads::shutdown`; on failure whatever was started has already been stopped.
/// `inherited`: listeners handed over by the previous process (`--takeover`), used instead of
/// binding.
pub fn start(
    config: Config,
    backends: Backends,
    signals: SignalThread,
    inherited: Option<Vec<socket2::Socket>>,
) -> Result<(Control, Threads), StartError> {
    let mut threads = Threads::new(signals);
    match start_threads(config, backends, &mut threads, inherited) {
        Ok(control) => Ok((control, threads)),
        Err(e) => {
            threads.shutdown();
            Err(e)
        }
    }
}

fn start_threads(
    config: Config,
    backends: Backends,
    threads: &mut Threads,
    inherited: Option<Vec<socket2::Socket>>,
) -> Result<Control, StartError> {
    let cpus = core_affinity::get_core_ids().unwrap_or_default();
    let mut workers = config.workers.unwrap_or(cpus.len().max(1));
    let listen = config.listen;
    let edge = Arc::new(Edge::new(&config.edge, config.hash_seed));
    let backlog = config.edge.listen_backlog;
    let inherited_listeners = inherited.is_some();
    let listeners = match inherited {
        Some(inherited) => {
            let (listeners, count) =
                super::upgrade::use_inherited(inherited, workers, backlog, &edge, listen)?;
            workers = count;
            listeners
        }
        None => net::bind_listeners(listen, workers, backlog, |s| edge.configure_listener(s))
            .map_err(|e| StartError(format!("cannot listen on {listen}: {e}")))?,
    };
    let listener_fds: Vec<std::os::fd::RawFd> = listeners
        .iter()
        .map(std::os::fd::AsRawFd::as_raw_fd)
        .collect();
    let (max_conns, splice_pipes) = flow_limit(&config, workers);
    let listen_addr = net::local_addr(&listeners[0])
        .map_err(|e| StartError(format!("cannot listen on {listen}: {e}")))?;
    let admin_listener = match config.admin {
        Some(addr) => Some(
            super::upgrade::bind_admin(addr, config.upgrade_socket.is_some())
                .map_err(|e| StartError(format!("--admin: cannot listen on {addr}: {e}")))?,
        ),
        None => None,
    };
    // This sender is only cloned into the workers and dropped when this function returns: from
    // then on the workers hold the last senders, and the writer ends after they do.
    let access_log = match &config.access_log {
        Some(target) => {
            let (log, writer) = access_log::open(target, ACCESS_LOG_QUEUE)
                .map_err(|e| StartError(format!("--access-log {target}: {e}")))?;
            threads.access_log_writer = Some(writer);
            Some(log)
        }
        None => None,
    };

    let settings = Settings {
        hash_key: config.hash_key,
        hash_seed: config.hash_seed,
        connect_timeout: config.connect_timeout,
        idle_timeout: config.idle_timeout,
        retries: config.retries,
        max_conns,
        buffer_size: config.buffer_size,
        buffers: config.buffers,
        edge,
        multishot_accept_room: (backlog.max(0) as usize + 64) * workers,
        splice_pipes,
    };
    let (events_tx, events) = crossbeam_channel::bounded(EVENT_QUEUE);
    let active_flows = Arc::new(AtomicUsize::new(0));
    let (ready_tx, ready_rx) = crossbeam_channel::bounded(workers);
    let snapshot = backends.snapshot();
    let mut worker_stats = Vec::with_capacity(workers);
    let handoffs = crate::worker::handoffs_for_workers(workers)
        .map_err(|e| StartError(format!("cannot create a hand-off eventfd: {e}")))?;
    for ((id, listener), handoff) in listeners.into_iter().enumerate().zip(handoffs) {
        let stats = WorkerStatsWriter::new();
        worker_stats.push(Arc::clone(stats.stats()));
        let cpu = (!cpus.is_empty()).then(|| cpus[id % cpus.len()]);
        let setup = |commands, wake, heartbeat| WorkerSetup {
            id,
            listener,
            snapshot: Arc::clone(&snapshot),
            commands,
            wake,
            settings: settings.clone(),
            active_flows: Arc::clone(&active_flows),
            events: events_tx.clone(),
            stats,
            access_log: access_log.clone(),
            listen_addr,
            heartbeat,
            handoff,
        };
        threads
            .workers
            .spawn(id, cpu, ready_tx.clone(), events_tx.clone(), setup)
            .map_err(StartError)?;
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
        return Err(StartError(message));
    }

    let view = Arc::new(
        View::new(
            worker_stats,
            max_conns as u64,
            snapshot,
            access_log.as_ref().map(access_log::AccessLog::counters),
        )
        .with_process(ProcessInfo::new(&config, workers, max_conns, listen_addr)),
    );
    if let Some(listener) = admin_listener {
        let addr = listener.local_addr().ok();
        let server = admin::spawn(listener, Arc::clone(&view) as Arc<dyn admin::AdminView>)
            .map_err(|e| StartError(format!("--admin: cannot start: {e}")))?;
        threads.admin = Some(server);
        if let Some(addr) = addr {
            info!("admin endpoint on http://{addr}/metrics, /backends, /live, /ready and the status page at /");
        }
    }

    // A source that is off is `never()`, not a dropped sender: a disconnected channel is
    // always ready in `select!` and would spin the control loop.
    let checks = match config.health.interval {
        Some(_) => {
            let (results, checks) = crossbeam_channel::unbounded();
            let (targets, targets_rx) = crossbeam_channel::bounded(4);
            let thread = health::spawn(
                check_config(&config),
                backends.check_targets(),
                targets_rx,
                results,
            )
            .map_err(|e| StartError(format!("cannot start the health checker: {e}")))?;
            threads.health = Some(HealthChecker { thread, targets });
            checks
        }
        None => crossbeam_channel::never(),
    };
    let dns = if config.backend_dns.is_empty() && config.backend_dns_srv.is_empty() {
        crossbeam_channel::never()
    } else {
        let nameserver = sources::nameserver(&config).map_err(StartError)?;
        let (answers, dns) = crossbeam_channel::unbounded();
        let (stop, stop_rx) = crossbeam_channel::bounded(1);
        let thread = sources::spawn_dns_refresher(
            sources::DnsSource::all(&config),
            nameserver,
            config.dns_refresh,
            answers,
            stop_rx,
        )
        .map_err(|e| StartError(format!("cannot start the DNS refresher: {e}")))?;
        threads.dns = Some(DnsRefresher { thread, stop });
        dns
    };

    if let Some(hint) = crate::tcp_fastopen::sysctl_hint(
        config.edge.tcp_fastopen.is_some(),
        config.edge.backend_fastopen,
    ) {
        warn!("{hint}");
    }
    if !inherited_listeners
        && config.upgrade_socket.is_none()
        && std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req")
            .is_ok_and(|v| v.trim() == "0")
    {
        info!(
            "net.ipv4.tcp_migrate_req is 0: during an upgrade the kernel resets connections \
             still queued on this process's listeners when it stops; set it to 1 for \
             zero-loss upgrades (docs/operations.md)"
        );
    }
    info!(
        "listening on {listen_addr} with {workers} workers, max {max_conns} flows, backends: {}",
        backends.describe_all().join(", ")
    );
    Ok(Control {
        config,
        backends,
        view,
        events,
        checks,
        dns,
        notify: Notifier::from_env(),
        active_flows,
        liveness: Liveness::new(),
        last_status: String::new(),
        listener_fds,
        listen_addr,
        upgrade: None,
        upgrades: crossbeam_channel::never(),
        handed_over: false,
        handed_over_at: None,
    })
}

/// `--max-conns`, or what the open-file limit allows, and the kernel pipes each worker may
/// lend to splicing flows (0: `--splice off`). Raises the soft limit to the hard one even with
/// an explicit `--max-conns`: each flow needs two descriptors, and the pipes' descriptors are
/// set aside too, so the default limit still never runs out of them.
fn flow_limit(config: &Config, workers: usize) -> (usize, usize) {
    let fd_limit = raise_fd_limit();
    let splice_pipes = if config.splice {
        crate::worker::pipes_per_worker(fd_limit, workers)
    } else {
        0
    };
    let pipe_fds = 2 * (splice_pipes * workers) as u64;
    let max_conns = config.max_conns.unwrap_or_else(|| {
        let budget = fd_limit.saturating_sub(RESERVED_FDS + 8 * workers as u64 + pipe_fds) / 2;
        budget.max(1) as usize
    });
    if max_conns as u64 * 2 + RESERVED_FDS > fd_limit {
        warn!(
            "--max-conns {max_conns} needs about {} descriptors but the open-file limit is \
             {fd_limit}: expect EMFILE (accepts pause) before the limit is reached",
            max_conns as u64 * 2 + RESERVED_FDS
        );
    }
    (max_conns, splice_pipes)
}

/// The health-check settings as the checker uses them. Backends behind --send-proxy expect a
/// PROXY header first; checks announce themselves as LOCAL (v2) / UNKNOWN (v1), as HAProxy's
/// check-send-proxy does.
fn check_config(config: &Config) -> HealthConfig {
    let mut check = config.health.clone();
    let mut prefix = Vec::new();
    match config.edge.send_proxy {
        Some(ProxyVersion::V1) => prefix.extend_from_slice(b"PROXY UNKNOWN\r\n"),
        Some(ProxyVersion::V2) => crate::proxy_protocol::encode_v2_local(&mut prefix),
        None => {}
    }
    prefix.extend_from_slice(&check.send);
    check.send = prefix;
    check
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
