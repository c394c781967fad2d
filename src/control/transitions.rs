//! Health transitions: how active-check results, passive failures reported by workers and the
//! passage of time change a backend between up and down (the state machine itself is in
//! `health.rs`), and what a change does: new snapshot to every worker, metrics, one log line.

use std::sync::Arc;
use std::time::Instant;

use log::{info, warn};

use super::control_loop::Control;
use super::health::{self, CheckResult};
use super::threads::Threads;
use crate::snapshot::BackendSet;

impl Control {
    /// A worker saw a connect to backend `index` of `set` fail in a way that blames the backend.
    pub fn on_backend_failure(&mut self, set: &BackendSet, index: usize, threads: &mut Threads) {
        let Some(name) = set.backends.get(index).map(|b| Arc::clone(&b.name)) else {
            return;
        };
        let entries = &mut self.backends.entries;
        let Some(i) = entries.iter().position(|e| *e.spec.name == *name) else {
            return; // removed since
        };
        let config = &self.config.health;
        if let Some(up) = entries[i].health.on_passive_failure(Instant::now(), config) {
            let detail = format!(
                "{} failed connects within {:?}",
                config.max_fails, config.fail_timeout
            );
            self.transition(i, up, "passive", &detail, threads);
        }
    }

    pub fn on_check(&mut self, result: CheckResult, threads: &mut Threads) {
        let entries = &mut self.backends.entries;
        let Some(i) = entries.iter().position(|e| e.spec.name == result.name) else {
            return;
        };
        let config = &self.config.health;
        if let Some(up) = entries[i].health.on_check(result.ok, config) {
            let detail = if up {
                format!("{} checks passed", config.rise)
            } else {
                format!("{} checks failed, last: {}", config.fall, result.detail)
            };
            self.transition(i, up, "check", &detail, threads);
        }
    }

    /// Without active checks, a backend taken down by passive failures is tried again after
    /// `--fail-timeout`.
    pub fn retry_passive_downs(&mut self, threads: &mut Threads) {
        let now = Instant::now();
        for i in 0..self.backends.entries.len() {
            let health = &mut self.backends.entries[i].health;
            if let Some(up) = health.on_tick(now, &self.config.health) {
                self.transition(i, up, "retry", "fail timeout passed", threads);
            }
        }
    }

    /// Logs a health change, updates the metrics and sends workers the new mask.
    fn transition(&mut self, i: usize, up: bool, how: &str, detail: &str, threads: &mut Threads) {
        let name = self.backends.entries[i].spec.name.clone();
        self.backends.set_healthy_metric(&name, up);
        self.view.transitions.record(&name, up, how, detail);
        // Every worker uses the new mask before the line is logged: what it says is true.
        self.publish(threads);
        let healthy = self.backends.healthy_count();
        let total = self.backends.entries.len();
        if up {
            info!("backend {name} is UP ({how}: {detail}); {healthy}/{total} healthy");
        } else {
            warn!("backend {name} is DOWN ({how}: {detail}); {healthy}/{total} healthy");
        }
        self.log_routing();
    }

    /// Says when new flows have nowhere to go, and when (and until when) backends down by
    /// passive evidence alone take them anyway; the override is logged once, when it starts.
    pub fn log_routing(&mut self) {
        let routable = health::routable(self.backends.entries.iter().map(|e| &e.health));
        if routable.passive_override && !self.backends.passive_override {
            warn!(
                "every backend is down, some by passive checks alone (failed connects): new \
                 flows still try those, so passive evidence never leaves the pool empty; \
                 backends down by active checks stay out"
            );
        } else if !routable.passive_override && self.backends.passive_override {
            info!("passive override over: new flows use healthy backends only again");
        }
        self.backends.passive_override = routable.passive_override;
        if !routable.usable.contains(&true) {
            warn!("no backend is healthy: new flows are refused until one comes back");
        }
    }
}
