//! What the status page (`status_page.rs`) shows beyond the counters `/metrics` reads:
//!
//! - [`ProcessInfo`]: facts fixed at start-up (version, start time, listen address, limits).
//! - [`TransitionLog`]: the last [`KEPT_TRANSITIONS`] health transitions, recorded by the
//!   control thread as it makes them (`transitions.rs`) and read by the admin threads. Only
//!   those two sides take its lock; workers never see it.
//! - [`new_flow_shares`]: each backend's share of new flows under a snapshot's health mask.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::balance::Algorithm;
use crate::balance::HashKey;
use crate::config::{Balance, Config, ProxyVersion};
use crate::snapshot::Snapshot;

use super::status_page::TransitionLine;

/// Health transitions the page keeps (the process log has every one).
pub const KEPT_TRANSITIONS: usize = 32;

/// Keys sampled to estimate each backend's share of the hash space. Measured against 4M random
/// keys (ring, 2 to 20 backends of weights 1-3): at most 0.27 percentage points off, in
/// 0.2-0.4 ms (release build); taken once per snapshot.
const SHARE_SAMPLE: u64 = 16_384;

/// Facts about the process that do not change while it runs.
pub struct ProcessInfo {
    pub started: Instant,
    pub listen: SocketAddr,
    pub workers: usize,
    /// `(flag, value)` in display order.
    pub limits: Vec<(&'static str, String)>,
}

impl ProcessInfo {
    /// `workers` and `max_conns` as start-up decided them (the flags may leave them unset).
    pub fn new(config: &Config, workers: usize, max_conns: usize, listen: SocketAddr) -> Self {
        ProcessInfo {
            started: Instant::now(),
            listen,
            workers,
            limits: limits(config, workers, max_conns),
        }
    }
}

/// The settings an operator checks first, as flag and value.
fn limits(config: &Config, workers: usize, max_conns: usize) -> Vec<(&'static str, String)> {
    let off = || "off".to_string();
    let edge = &config.edge;
    let health = &config.health;
    let balance = match config.balance {
        Balance::Hash => {
            let table = match config.algorithm {
                Algorithm::Ring => format!("ring, {} vnodes", config.vnodes),
                Algorithm::Maglev => "maglev".to_string(),
            };
            let key = match config.hash_key {
                HashKey::SrcIp => "src-ip",
                HashKey::SrcIpPort => "src-ip-port",
            };
            let bound = config
                .hash_balance_factor
                .map(|f| format!(", bounded loads {f}%"))
                .unwrap_or_default();
            format!(
                "hash ({table}, key {key}, seed {}{bound})",
                config.hash_seed
            )
        }
        Balance::RoundRobin => "round-robin".to_string(),
        Balance::LeastConn => "least-conn".to_string(),
        Balance::RandomTwo => "random-two".to_string(),
    };
    let max_conns_text = if config.max_conns.is_some() {
        max_conns.to_string()
    } else {
        format!("{max_conns} (from the open-file limit)")
    };
    let access = match (edge.allow.len(), edge.deny.len()) {
        (0, 0) => "everyone".to_string(),
        (allow, deny) => format!("{allow} allowed, {deny} denied CIDRs"),
    };
    let proxy = |v: Option<ProxyVersion>| match v {
        Some(ProxyVersion::V1) => "v1".to_string(),
        Some(ProxyVersion::V2) => "v2".to_string(),
        None => off(),
    };
    vec![
        ("--max-conns", max_conns_text),
        (
            "--max-conns-per-source",
            edge.max_conns_per_source
                .map_or_else(off, |n| n.to_string()),
        ),
        ("--workers", workers.to_string()),
        ("--balance", balance),
        ("--connect-timeout", duration(config.connect_timeout)),
        ("--retries", config.retries.to_string()),
        (
            "--idle-timeout",
            config.idle_timeout.map_or_else(off, duration),
        ),
        (
            "--buffers",
            format!(
                "{} x {} bytes per worker",
                config.buffers, config.buffer_size
            ),
        ),
        (
            "--health-interval",
            health.interval.map_or_else(off, |every| {
                format!(
                    "{} (timeout {}, rise {}, fall {})",
                    duration(every),
                    duration(health.timeout),
                    health.rise,
                    health.fall
                )
            }),
        ),
        (
            "--max-fails",
            format!(
                "{} within {}",
                health.max_fails,
                duration(health.fail_timeout)
            ),
        ),
        ("--listen-backlog", edge.listen_backlog.to_string()),
        ("--allow/--deny", access),
        ("--send-proxy", proxy(edge.send_proxy)),
        (
            "--accept-proxy",
            if edge.accept_proxy {
                format!("{} trusted CIDRs", edge.trusted_proxies.len())
            } else {
                off()
            },
        ),
        (
            "--drain-timeout",
            config
                .drain_timeout
                .map_or_else(|| "until they end".to_string(), duration),
        ),
        ("--shutdown-timeout", duration(config.shutdown_timeout)),
    ]
}

/// A duration as the flags take it: `500ms`, `3s`, `10m`, `1h`, or `1m30s`.
fn duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 || !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let s = ms / 1000;
    match (s / 3600, s / 60 % 60, s % 60) {
        (h, 0, 0) if h > 0 => format!("{h}h"),
        (0, m, 0) if m > 0 => format!("{m}m"),
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s}s"),
        (h, m, s) => format!("{h}h{m}m{s}s"),
    }
}

/// The last few health transitions, newest last; bounded.
#[derive(Default)]
pub struct TransitionLog {
    inner: Mutex<Kept>,
}

#[derive(Default)]
struct Kept {
    entries: VecDeque<TransitionLine>,
    /// Transitions pushed out of `entries`.
    dropped: u64,
}

impl TransitionLog {
    /// Records a transition of `backend` to up or down; `how` is `check`, `passive` or `retry`.
    pub fn record(&self, backend: &str, up: bool, how: &str, detail: &str) {
        let Ok(mut kept) = self.inner.lock() else {
            return;
        };
        if kept.entries.len() == KEPT_TRANSITIONS {
            kept.entries.pop_front();
            kept.dropped += 1;
        }
        kept.entries.push_back(TransitionLine {
            at: SystemTime::now(),
            backend: backend.to_string(),
            up,
            cause: format!("{how}: {detail}"),
        });
    }

    /// The kept transitions, newest first, and how many older ones were dropped.
    pub fn recent(&self) -> (Vec<TransitionLine>, u64) {
        match self.inner.lock() {
            Ok(kept) => (kept.entries.iter().rev().cloned().collect(), kept.dropped),
            Err(_) => (Vec::new(), 0),
        }
    }
}

/// Each backend's share of new flows (0 to 1, by index) under `snapshot`'s routing mask.
///
/// With `--balance hash`: the fraction of a sample of the hash space its table walk gives each
/// backend (keys of a backend that is down go where they really go: the next one on the ring,
/// or a backup). With the other policies: its weight over the weight of the backends that take
/// flows (the primaries, or the backups when no primary is usable). Bounded loads and
/// least-conn adjust this by load at each pick; the page shows the plan.
pub fn new_flow_shares(snapshot: &Snapshot) -> Vec<f64> {
    let backends = snapshot.backends();
    let mut shares = vec![0.0; backends.len()];
    let usable = |i: usize| snapshot.healthy.get(i).copied().unwrap_or(false);
    if snapshot.policy.balance == Balance::Hash {
        let mut hits = vec![0u64; backends.len()];
        for k in 0..SHARE_SAMPLE {
            // A Weyl sequence spreads the sample evenly over the 64-bit key space.
            let key = k.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            if let Some(i) = snapshot.set.table.choose(key, usable) {
                hits[i] += 1;
            }
        }
        for (share, n) in shares.iter_mut().zip(hits) {
            *share = n as f64 / SHARE_SAMPLE as f64;
        }
        return shares;
    }
    for backup in [false, true] {
        let members: Vec<usize> = (0..backends.len())
            .filter(|&i| backends[i].backup == backup && backends[i].weight > 0 && usable(i))
            .collect();
        let total: u64 = members.iter().map(|&i| u64::from(backends[i].weight)).sum();
        if total > 0 {
            for i in members {
                shares[i] = f64::from(backends[i].weight) / total as f64;
            }
            break;
        }
    }
    shares
}

/// Shares computed for the last snapshot the page was rendered from: sampling is done once per
/// snapshot (a health change or a reload), not per page view.
#[derive(Default)]
pub struct ShareCache {
    last: Mutex<Option<SharesOf>>,
}

/// A snapshot and its shares.
type SharesOf = (Arc<Snapshot>, Arc<Vec<f64>>);

impl ShareCache {
    pub fn get(&self, snapshot: &Arc<Snapshot>) -> Arc<Vec<f64>> {
        if let Ok(last) = self.last.lock() {
            if let Some((cached, shares)) = last.as_ref() {
                if Arc::ptr_eq(cached, snapshot) {
                    return Arc::clone(shares);
                }
            }
        }
        // Computed outside the lock: two admin threads may both compute it, never wait.
        let shares = Arc::new(new_flow_shares(snapshot));
        if let Ok(mut last) = self.last.lock() {
            *last = Some((Arc::clone(snapshot), Arc::clone(&shares)));
        }
        shares
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::{Algorithm, DEFAULT_VNODES};
    use crate::metrics::BackendStats;
    use crate::snapshot::{Backend, BackendLoad, BackendSet, Policy};

    fn snapshot(backends: &[(&str, u32, bool)], healthy: Vec<bool>, balance: Balance) -> Snapshot {
        let list = backends
            .iter()
            .enumerate()
            .map(|(i, &(name, weight, backup))| {
                let addr: SocketAddr = format!("10.0.0.{}:80", i + 1).parse().unwrap();
                Backend {
                    name: name.into(),
                    addr,
                    sockaddr: addr.into(),
                    weight,
                    backup,
                    load: Arc::new(BackendLoad::default()),
                    stats: Arc::new(BackendStats::new()),
                }
            })
            .collect();
        let set = BackendSet::new(list, Algorithm::Ring, DEFAULT_VNODES, None, 0);
        let policy = Policy {
            balance,
            hash_balance_factor: None,
        };
        Snapshot::new(Arc::new(set), healthy, policy)
    }

    #[test]
    fn hash_shares_follow_weight_and_health() {
        let backends = [
            ("a", 1, false),
            ("b", 1, false),
            ("c", 2, false),
            ("d", 1, true),
        ];
        let all = snapshot(&backends, vec![true; 4], Balance::Hash);
        let s = new_flow_shares(&all);
        assert!((s[0] - 0.25).abs() < 0.04, "{s:?}");
        assert!((s[2] - 0.5).abs() < 0.04, "{s:?}");
        assert_eq!(s[3], 0.0, "a backup takes nothing while primaries are up");
        assert!((s.iter().sum::<f64>() - 1.0).abs() < 1e-9);

        // c down: its keys go to a and b, not to the backup.
        let c_down = snapshot(&backends, vec![true, true, false, true], Balance::Hash);
        let s = new_flow_shares(&c_down);
        assert_eq!(s[2], 0.0);
        assert!((s[0] + s[1] - 1.0).abs() < 1e-9, "{s:?}");

        // Every primary down: the backup takes everything.
        let backup_only = snapshot(&backends, vec![false, false, false, true], Balance::Hash);
        assert_eq!(new_flow_shares(&backup_only), vec![0.0, 0.0, 0.0, 1.0]);
    }

    #[test]
    fn other_policies_share_by_weight() {
        let backends = [("a", 1, false), ("b", 3, false), ("c", 0, false)];
        let s = new_flow_shares(&snapshot(&backends, vec![true; 3], Balance::RoundRobin));
        assert_eq!(s, vec![0.25, 0.75, 0.0]);
        let none = snapshot(&backends, vec![false; 3], Balance::LeastConn);
        assert_eq!(new_flow_shares(&none), vec![0.0; 3]);
    }

    #[test]
    fn transition_log_is_bounded_and_newest_first() {
        let log = TransitionLog::default();
        for i in 0..KEPT_TRANSITIONS + 5 {
            log.record(&format!("b{i}"), i % 2 == 0, "check", "x");
        }
        let (recent, dropped) = log.recent();
        assert_eq!(recent.len(), KEPT_TRANSITIONS);
        assert_eq!(dropped, 5);
        assert_eq!(recent[0].backend, format!("b{}", KEPT_TRANSITIONS + 4));
        assert_eq!(recent[0].cause, "check: x");
        assert_eq!(recent.last().unwrap().backend, "b5");
    }

    #[test]
    fn durations_read_like_flags() {
        assert_eq!(duration(Duration::from_millis(500)), "500ms");
        assert_eq!(duration(Duration::from_secs(3)), "3s");
        assert_eq!(duration(Duration::from_secs(600)), "10m");
        assert_eq!(duration(Duration::from_secs(90)), "1m30s");
        assert_eq!(duration(Duration::from_secs(7200)), "2h");
        assert_eq!(duration(Duration::ZERO), "0ms");
    }

    #[test]
    fn share_cache_recomputes_only_for_a_new_snapshot() {
        let cache = ShareCache::default();
        let one = Arc::new(snapshot(&[("a", 1, false)], vec![true], Balance::Hash));
        let first = cache.get(&one);
        assert!(Arc::ptr_eq(&first, &cache.get(&one)));
        let two = Arc::new(snapshot(&[("a", 1, false)], vec![false], Balance::Hash));
        assert_eq!(*cache.get(&two), vec![0.0]);
    }
}
