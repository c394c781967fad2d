//! What the admin endpoint shows: the control thread keeps the current snapshot here, and the
//! admin threads read it with worker counters. Only the control path takes this lock; workers
//! never touch it.

use std::sync::{Arc, Mutex};

use crate::access_log::AccessLogCounters;
use crate::control::admin::{self, AdminView, BackendRow};
use crate::control::readiness::{self, Readiness, Verdict};
use crate::metrics::{self, WorkerStats};
use crate::snapshot::Snapshot;

pub struct View {
    workers: Vec<Arc<WorkerStats>>,
    max_flows: u64,
    snapshot: Mutex<Arc<Snapshot>>,
    /// Counters only: the admin threads hold this view until they end, and a sender here
    /// would keep the access-log writer (and so the process) alive after the workers stopped.
    access_log: Option<AccessLogCounters>,
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
        View {
            workers,
            max_flows,
            snapshot: Mutex::new(snapshot),
            access_log,
            readiness: Readiness::default(),
        }
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
