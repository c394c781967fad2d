//! Changes of the backend list: the backends file (on SIGHUP or when it changes on disk) and
//! DNS answers. A new list is applied as a whole or not at all; only changed backends' keys
//! move, removed backends take no new flows, and their live flows go on (up to
//! `--drain-timeout`).

use std::time::Instant;

use log::{info, warn};

use super::control_loop::Control;
use super::sources::DnsAnswer;
use super::threads::Threads;
use crate::worker::Command;

impl Control {
    /// SIGHUP or a file change: re-read the backends file and apply it as a whole.
    pub fn reload(&mut self, why: &str, threads: &mut Threads) {
        if !self.backends.sources.has_file() {
            if why == "SIGHUP" {
                info!("SIGHUP: no --backends-file to reload");
            }
            return;
        }
        match self.backends.sources.reload_file() {
            Ok(()) => self.apply_sources(why, threads),
            Err(e) => warn!("{why}: {e}; keeping the running backends"),
        }
    }

    /// The once-a-second look at the backends file.
    pub fn reload_if_file_changed(&mut self, threads: &mut Threads) {
        if self.backends.sources.file_changed() {
            self.reload("file change", threads);
        }
    }

    pub fn on_dns(&mut self, answer: DnsAnswer, threads: &mut Threads) {
        if self.backends.sources.apply_dns(answer) {
            self.apply_sources("DNS", threads);
        }
    }

    /// Makes the merged source lists the running backend set.
    fn apply_sources(&mut self, why: &str, threads: &mut Threads) {
        let specs = self.backends.sources.merged();
        if specs.is_empty() {
            warn!("{why}: the backend list would be empty; keeping the running backends");
            return;
        }
        let change = match self.backends.replace(&specs, &self.config) {
            Ok(Some(change)) => change,
            Ok(None) => return,
            Err(e) => {
                warn!("{why}: {e}; keeping the running backends");
                return;
            }
        };
        self.publish(threads);
        self.log_routing();
        info!(
            "{why}: backends changed (added: [{}], removed: [{}], {} total); {:.1}% of keys moved",
            change.added.join(", "),
            change
                .removed
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            self.backends.entries.len(),
            change.moved * 100.0
        );
        threads.send_check_targets(self.backends.check_targets());
        if let (Some(timeout), false) = (self.config.drain_timeout, change.removed.is_empty()) {
            let deadline = Instant::now() + timeout;
            threads.workers.broadcast(|| Command::CloseBackends {
                names: change.removed.clone(),
                deadline,
            });
        }
    }
}
