//! What the admin endpoint shows: the control thread keeps the current snapshot here, and the
//! admin threads read it with worker counters. Only the control path takes this lock; workers
//! never touch it.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use crate::access_log::AccessLogCounters;
use crate::control::admin::{self, AdminView, BackendRow};
use crate::control::readiness::{self, Readiness, Verdict};
use crate::control::status::{ProcessInfo, ShareCache, TransitionLog};
use crate::control::status_page::{self, BackendLine, ProcessCounts, State, StatusPage};
use crate::metrics::{self, CloseKind, WorkerCounts, WorkerStats};
use crate::snapshot::Snapshot;

pub struct View {
    workers: Vec<Arc<WorkerStats>>,
    max_flows: u64,
    snapshot: Mutex<Arc<Snapshot>>,
    /// Counters only: the admin threads hold this view until they end, and a sender here
    /// would keep the access-log writer (and so the process) alive after the workers stopped.
    access_log: Option<AccessLogCounters>,
    /// Start-up facts for the status page (`with_process`).
    process: ProcessInfo,
    /// Recent health transitions, recorded by the control thread.
    pub transitions: TransitionLog,
    shares: ShareCache,
    /// Set on the first stop signal: `/ready` answers 503 from then on.
    pub readiness: Readiness,
}

impl View {
    pub fn new(
        workers: Vec<Arc<WorkerStats>>,
        max_flows: u64,
        snapshot: Arc<Snapshot>,
        access_log: Option<AccessLogCounters>,
    ) -> View {
        let process = ProcessInfo {
            started: Instant::now(),
            listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            workers: workers.len(),
            limits: Vec::new(),
        };
        View {
            workers,
            max_flows,
            snapshot: Mutex::new(snapshot),
            access_log,
            process,
            transitions: TransitionLog::default(),
            shares: ShareCache::default(),
            readiness: Readiness::default(),
        }
    }

    /// The listen address, limits and start time the status page shows.
    pub fn with_process(mut self, process: ProcessInfo) -> View {
        self.process = process;
        self
    }

    pub fn set_snapshot(&self, snapshot: Arc<Snapshot>) {
        if let Ok(mut current) = self.snapshot.lock() {
            *current = snapshot;
        }
    }

    fn current(&self) -> Option<Arc<Snapshot>> {
        self.snapshot.lock().ok().map(|s| Arc::clone(&s))
    }
}

impl AdminView for View {
    fn metrics(&self, out: &mut String) {
        let Some(snapshot) = self.current() else {
            return;
        };
        let backends: Vec<_> = snapshot
            .backends()
            .iter()
            .map(|b| (b.name.to_string(), Arc::clone(&b.stats), b.backup))
            .collect();
        metrics::render_prometheus(&self.workers, &backends, out);
        metrics::render_gauge(
            out,
            "ringway_max_flows",
            "The --max-conns limit in force: flows the process holds at most.",
            self.max_flows,
        );
        if let Some(log) = &self.access_log {
            metrics::render_counter(
                out,
                "ringway_access_log_dropped_total",
                "Access-log lines dropped because the writer could not keep up.",
                log.dropped(),
            );
            metrics::render_counter(
                out,
                "ringway_access_log_write_errors_total",
                "Failed writes of the access log (e.g. disk full).",
                log.write_errors(),
            );
        }
    }

    fn backends_json(&self, out: &mut String) {
        let Some(snapshot) = self.current() else {
            return;
        };
        let rows: Vec<BackendRow> = snapshot
            .backends()
            .iter()
            .map(|b| {
                let counts = b.stats.read();
                BackendRow {
                    name: &b.name,
                    address: b.addr,
                    weight: b.weight,
                    backup: b.backup,
                    // The health verdict, not the routing mask: while every backend is down
                    // and those down by passive checks take flows anyway, they show down.
                    healthy: counts.healthy,
                    active: counts.flows_active,
                    total: counts.flows_total,
                }
            })
            .collect();
        admin::backends_json(&rows, out);
    }

    fn status_page(&self, out: &mut String) {
        let Some(snapshot) = self.current() else {
            return;
        };
        let shares = self.shares.get(&snapshot);
        let (transitions, transitions_dropped) = self.transitions.recent();
        let mut total = WorkerCounts::default();
        for worker in &self.workers {
            total.add(&worker.read());
        }
        let closed = |which: &dyn Fn(CloseKind) -> bool| -> u64 {
            CloseKind::ALL
                .iter()
                .filter(|&&k| which(k))
                .map(|k| total.flows_closed[k.index()])
                .sum()
        };
        let backends = snapshot
            .backends()
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let counts = b.stats.read();
                let routed = snapshot.healthy.get(i).copied().unwrap_or(false);
                let state = match (counts.healthy, routed) {
                    (true, _) => State::Up,
                    (false, true) => State::DownTried,
                    (false, false) => State::Down,
                };
                BackendLine {
                    name: b.name.to_string(),
                    address: b.addr,
                    backup: b.backup,
                    weight: b.weight,
                    state,
                    since: transitions
                        .iter()
                        .find(|t| *t.backend == *b.name)
                        .map(|t| (t.at, t.cause.clone())),
                    flows_active: counts.flows_active,
                    flows_total: counts.flows_total,
                    share: shares.get(i).copied().unwrap_or(0.0),
                    bytes_client_to_backend: counts.bytes_client_to_backend,
                    bytes_backend_to_client: counts.bytes_backend_to_client,
                    connect_failures: counts.connect_failures,
                    health_transitions: counts.health_transitions,
                }
            })
            .collect();
        let page = StatusPage {
            version: env!("CARGO_PKG_VERSION"),
            pid: std::process::id(),
            listen: self.process.listen,
            uptime: self.process.started.elapsed(),
            now: SystemTime::now(),
            process: ProcessCounts {
                workers: self.process.workers,
                flows_active: total.flows_active,
                max_flows: self.max_flows,
                flows_accepted: total.flows_accepted,
                refused: closed(&CloseKind::is_refusal),
                unserved: closed(&|k| matches!(k, CloseKind::NoBackend | CloseKind::ConnectFailed)),
                bytes_client_to_backend: total.bytes_client_to_backend,
                bytes_backend_to_client: total.bytes_backend_to_client,
                connect_failures: total.connect_failures,
                buffers_in_use: total.buffers_in_use,
            },
            limits: self.process.limits.clone(),
            backends,
            transitions,
            transitions_dropped,
        };
        status_page::render(&page, out);
    }

    fn ready(&self) -> Verdict {
        let (up, total) = match self.current() {
            Some(snapshot) => {
                let backends = snapshot.backends();
                let up = backends.iter().filter(|b| b.stats.read().healthy).count();
                (up, backends.len())
            }
            None => (0, 0),
        };
        readiness::verdict(self.readiness.is_leaving(), up, total)
    }
}
