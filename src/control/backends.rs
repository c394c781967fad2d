//! The running backend set as the control thread keeps it: the configured entries with their
//! resolved addresses and health, the sources they come from, the per-name counters that
//! outlive set changes, and the selection structures workers route by.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::balance::flow_key_hash;
use crate::config::{BackendSpec, Config};
use crate::metrics::BackendStats;
use crate::net;
use crate::snapshot::{Backend, BackendLoad, BackendSet, PickState, Policy, Snapshot};

use super::health::{self, CheckTarget, Health};
use super::sources::Sources;

/// Keys sampled to report what fraction of the key space a backend change moved.
const MOVED_SAMPLE: u64 = 65536;

/// A configured backend and what the control thread knows about it.
pub struct BackendEntry {
    pub spec: BackendSpec,
    pub addr: SocketAddr,
    pub health: Health,
}

/// Counters that belong to a backend name and outlive backend-set changes.
#[derive(Clone, Default)]
struct Shared {
    load: Arc<BackendLoad>,
    stats: Arc<BackendStats>,
}

pub struct Backends {
    pub entries: Vec<BackendEntry>,
    pub sources: Sources,
    shared: HashMap<String, Shared>,
    set: Arc<BackendSet>,
    policy: Policy,
    /// Every backend is down and those down by passive evidence alone take flows anyway.
    pub passive_override: bool,
}

/// What replacing the backend list did, for the log line.
pub struct Change {
    /// Added backends, described (`name (addr) backup`).
    pub added: Vec<String>,
    pub removed: Vec<Arc<str>>,
    /// Fraction of a sample of keys whose backend changed (all backends healthy).
    pub moved: f64,
}

impl Backends {
    /// Reads every source and resolves every backend; an empty list is an error.
    pub fn load(config: &Config) -> Result<Backends, String> {
        let sources = Sources::load(config)?;
        let specs = sources.merged();
        if specs.is_empty() {
            return Err("no backends configured".into());
        }
        let entries = resolve_all(&specs, &[])?;
        let mut backends = Backends {
            entries,
            sources,
            shared: HashMap::new(),
            set: Arc::new(BackendSet::new(
                Vec::new(),
                config.algorithm,
                config.vnodes,
                None,
                0,
            )),
            policy: Policy {
                balance: config.balance,
                hash_balance_factor: config.hash_balance_factor,
            },
            passive_override: false,
        };
        backends.rebuild_set(config);
        Ok(backends)
    }

    /// What workers route by now: the set with the current health mask applied.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        let usable = health::routable(self.entries.iter().map(|e| &e.health)).usable;
        Arc::new(Snapshot::new(Arc::clone(&self.set), usable, self.policy))
    }

    /// Records a backend's health in its metrics (the entry's own state is already changed).
    pub fn set_healthy_metric(&self, name: &str, up: bool) {
        if let Some(shared) = self.shared.get(name) {
            shared.stats.set_healthy(up);
        }
    }

    pub fn healthy_count(&self) -> usize {
        self.entries.iter().filter(|e| e.health.is_up()).count()
    }

    pub fn check_targets(&self) -> Vec<CheckTarget> {
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

    /// Every backend described for the start-up line.
    pub fn describe_all(&self) -> Vec<String> {
        self.entries.iter().map(describe).collect()
    }

    /// `--show-mapping`: where each client would go with every backend healthy.
    pub fn print_mapping(&self, config: &Config) {
        let snapshot = self.snapshot();
        let mut state = PickState::new(0);
        for client in &config.show_mapping {
            let key = flow_key_hash(client, config.hash_key, config.hash_seed);
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

    /// Makes `specs` the backend list: resolves every name first (any failure keeps the running
    /// list and is returned), carries health over by name, rebuilds the selection structures.
    /// `Ok(None)` when nothing changed.
    pub fn replace(
        &mut self,
        specs: &[BackendSpec],
        config: &Config,
    ) -> Result<Option<Change>, String> {
        let unchanged = specs.len() == self.entries.len()
            && specs.iter().zip(&self.entries).all(|(s, e)| *s == e.spec);
        if unchanged {
            return Ok(None);
        }
        let entries = resolve_all(specs, &self.entries)?;
        let old_set = Arc::clone(&self.set);
        let added = entries
            .iter()
            .filter(|e| !self.entries.iter().any(|o| o.spec.name == e.spec.name))
            .map(describe)
            .collect();
        let removed = self
            .entries
            .iter()
            .filter(|o| !entries.iter().any(|e| e.spec.name == o.spec.name))
            .map(|o| Arc::from(o.spec.name.as_str()))
            .collect();
        self.entries = entries;
        self.rebuild_set(config);
        self.shared
            .retain(|name, _| self.entries.iter().any(|e| e.spec.name == *name));
        Ok(Some(Change {
            added,
            removed,
            moved: moved_fraction(&old_set, &self.set),
        }))
    }

    /// Builds the selection structures for the current entries (health is applied per
    /// snapshot).
    fn rebuild_set(&mut self, config: &Config) {
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
            config.algorithm,
            config.vnodes,
            config.maglev_table_size,
            config.hash_seed,
        ));
    }
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
