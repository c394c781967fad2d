//! The immutable view of the backends that workers route by: addresses, selection table, health
//! mask and balancing policy. The control thread builds a new one for every change and hands each
//! worker an `Arc` of it; a worker never sees a half-updated set.
//!
//! Selection is pure apart from the per-worker [`PickState`] (round-robin position and random
//! state) and the shared per-backend active-flow gauges that least-conn, random-two and bounded
//! load read.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use socket2::SockAddr;

use crate::balance::{Algorithm, BackendId, Table};
use crate::config::Balance;
use crate::metrics::BackendStats;

/// Flows assigned to one backend, counted by every worker from the moment it picks the backend
/// (not from connect success, so a burst of connects does not all pile onto the same
/// "least loaded" backend) until the flow ends; never per byte. Kept by the control thread by
/// backend name, so the count survives snapshot changes. Metrics live in `BackendStats`.
#[derive(Debug, Default)]
pub struct BackendLoad {
    pub active: AtomicU64,
}

/// A backend as workers need it.
#[derive(Debug)]
pub struct Backend {
    /// Identity for hashing and the name in logs: the configured address text.
    pub name: Arc<str>,
    pub addr: SocketAddr,
    /// The address in the form connect() takes; the kernel copies it when the connect is submitted.
    pub sockaddr: SockAddr,
    pub weight: u32,
    pub backup: bool,
    pub load: Arc<BackendLoad>,
    pub stats: Arc<BackendStats>,
}

/// How a snapshot picks among healthy backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub balance: Balance,
    /// Consistent hashing with bounded loads, in percent of the fair share.
    pub hash_balance_factor: Option<u32>,
}

/// A backend set with everything selection needs that only changes when the set changes.
pub struct BackendSet {
    pub backends: Vec<Backend>,
    pub table: Table,
    /// Smooth weighted round-robin order over the primaries, then over the backups: also a
    /// weighted sampling table for random-two.
    primary_order: Vec<u32>,
    backup_order: Vec<u32>,
}

impl BackendSet {
    pub fn new(
        backends: Vec<Backend>,
        algorithm: Algorithm,
        vnodes: u32,
        maglev_size: Option<u64>,
        seed: u64,
    ) -> BackendSet {
        let ids: Vec<BackendId> = backends
            .iter()
            .map(|b| BackendId {
                name: b.name.to_string(),
                weight: b.weight,
                backup: b.backup,
            })
            .collect();
        let table = Table::build(&ids, algorithm, vnodes, maglev_size, seed);
        let primary_order = smooth_weighted_order(&backends, false);
        let backup_order = smooth_weighted_order(&backends, true);
        BackendSet {
            backends,
            table,
            primary_order,
            backup_order,
        }
    }
}

/// The longest round-robin cycle kept; heavier weight sets are scaled down to fit.
const MAX_ORDER_LEN: u64 = 4096;

/// nginx's smooth weighted round robin, unrolled into one cycle: weights 5,1,1 give
/// a a b a c a a rather than a a a a a b c, so a heavy backend's turns are spread out.
/// Backends are visited in name order so the cycle does not depend on flag order.
fn smooth_weighted_order(backends: &[Backend], backup: bool) -> Vec<u32> {
    let mut members: Vec<(usize, u64)> = backends
        .iter()
        .enumerate()
        .filter(|(_, b)| b.backup == backup && b.weight > 0)
        .map(|(i, b)| (i, u64::from(b.weight)))
        .collect();
    members.sort_by(|a, b| backends[a.0].name.cmp(&backends[b.0].name));
    let total: u64 = members.iter().map(|m| m.1).sum();
    if total > MAX_ORDER_LEN {
        for member in &mut members {
            member.1 = (member.1 * MAX_ORDER_LEN / total).max(1);
        }
    }
    let total: i64 = members.iter().map(|m| m.1 as i64).sum();
    let mut current = vec![0i64; members.len()];
    let mut order = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (k, member) in members.iter().enumerate() {
            current[k] += member.1 as i64;
            if current[k] > current[best] {
                best = k;
            }
        }
        current[best] -= total;
        order.push(members[best].0 as u32);
    }
    order
}

pub struct Snapshot {
    pub set: Arc<BackendSet>,
    /// `healthy[i]`: backend i may take new flows.
    pub healthy: Vec<bool>,
    pub policy: Policy,
}

/// Per-worker selection state: no sharing, no locks.
#[derive(Debug)]
pub struct PickState {
    round_robin: u64,
    random: u64,
}

impl PickState {
    pub fn new(seed: u64) -> PickState {
        PickState {
            round_robin: seed,
            // xorshift must not start at zero
            random: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
        }
    }

    fn next_random(&mut self) -> u64 {
        let mut x = self.random;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.random = x;
        x
    }
}

impl Snapshot {
    pub fn new(set: Arc<BackendSet>, healthy: Vec<bool>, policy: Policy) -> Snapshot {
        Snapshot {
            set,
            healthy,
            policy,
        }
    }

    pub fn backends(&self) -> &[Backend] {
        &self.set.backends
    }

    fn usable(&self, i: usize) -> bool {
        self.healthy.get(i).copied().unwrap_or(false)
    }

    /// The backend for a new flow (or its next connect attempt): healthy, `untried`, chosen by the
    /// policy; a backup only when no primary qualifies. `None`: nothing can take the flow.
    pub fn choose(
        &self,
        key_hash: u64,
        state: &mut PickState,
        untried: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let usable = |i: usize| self.usable(i) && untried(i);
        match self.policy.balance {
            Balance::Hash => match self.policy.hash_balance_factor {
                None => self.set.table.choose(key_hash, usable),
                Some(factor) => self.set.table.choose_bounded(
                    key_hash,
                    usable,
                    |i| self.set.backends[i].load.active.load(Ordering::Relaxed),
                    factor,
                ),
            },
            Balance::RoundRobin => self
                .round_robin(&self.set.primary_order, state, &usable)
                .or_else(|| self.round_robin(&self.set.backup_order, state, &usable)),
            Balance::LeastConn => self
                .least_conn(false, &usable)
                .or_else(|| self.least_conn(true, &usable)),
            Balance::RandomTwo => self
                .random_two(&self.set.primary_order, state, &usable)
                .or_else(|| self.random_two(&self.set.backup_order, state, &usable)),
        }
    }

    fn round_robin(
        &self,
        order: &[u32],
        state: &mut PickState,
        usable: &impl Fn(usize) -> bool,
    ) -> Option<usize> {
        if order.is_empty() {
            return None;
        }
        for _ in 0..order.len() {
            let i = order[(state.round_robin % order.len() as u64) as usize] as usize;
            state.round_robin = state.round_robin.wrapping_add(1);
            if usable(i) {
                return Some(i);
            }
        }
        None
    }

    /// Active flows per unit of weight, compared without division: a/wa < b/wb <=> a*wb < b*wa.
    fn less_loaded(&self, a: usize, b: usize) -> bool {
        let (ba, bb) = (&self.set.backends[a], &self.set.backends[b]);
        let la = u128::from(ba.load.active.load(Ordering::Relaxed));
        let lb = u128::from(bb.load.active.load(Ordering::Relaxed));
        la * u128::from(bb.weight) < lb * u128::from(ba.weight)
    }

    fn least_conn(&self, backup: bool, usable: &impl Fn(usize) -> bool) -> Option<usize> {
        let mut best: Option<usize> = None;
        for (i, backend) in self.set.backends.iter().enumerate() {
            if backend.backup != backup || backend.weight == 0 || !usable(i) {
                continue;
            }
            if best.is_none_or(|b| self.less_loaded(i, b)) {
                best = Some(i);
            }
        }
        best
    }

    fn random_two(
        &self,
        order: &[u32],
        state: &mut PickState,
        usable: &impl Fn(usize) -> bool,
    ) -> Option<usize> {
        if order.is_empty() {
            return None;
        }
        let mut pick = || {
            // A few weighted draws find a usable backend quickly unless most are down; then
            // the round-robin walk visits every one.
            for _ in 0..8 {
                let i = order[(state.next_random() % order.len() as u64) as usize] as usize;
                if usable(i) {
                    return Some(i);
                }
            }
            None
        };
        match (pick(), pick()) {
            (Some(a), Some(b)) => Some(if self.less_loaded(b, a) { b } else { a }),
            (Some(a), None) | (None, Some(a)) => Some(a),
            (None, None) => self.round_robin(order, state, usable),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(name: &str, weight: u32, backup: bool) -> Backend {
        let addr: SocketAddr = name.parse().unwrap();
        Backend {
            name: name.into(),
            addr,
            sockaddr: SockAddr::from(addr),
            weight,
            backup,
            load: Arc::new(BackendLoad::default()),
            stats: Arc::new(BackendStats::new()),
        }
    }

    fn snapshot(backends: Vec<Backend>, balance: Balance) -> Snapshot {
        let n = backends.len();
        let set = Arc::new(BackendSet::new(backends, Algorithm::Ring, 400, None, 0));
        Snapshot::new(
            set,
            vec![true; n],
            Policy {
                balance,
                hash_balance_factor: None,
            },
        )
    }

    #[test]
    fn smooth_round_robin_spreads_heavy_backends() {
        let set = [
            backend("10.0.0.1:1", 5, false),
            backend("10.0.0.2:1", 1, false),
            backend("10.0.0.3:1", 1, false),
        ];
        assert_eq!(smooth_weighted_order(&set, false), [0, 0, 1, 0, 2, 0, 0]);
        assert!(smooth_weighted_order(&set, true).is_empty());
    }

    #[test]
    fn round_robin_honours_weights_and_health() {
        let mut s = snapshot(
            vec![
                backend("10.0.0.1:1", 2, false),
                backend("10.0.0.2:1", 1, false),
                backend("10.0.0.3:1", 1, true),
            ],
            Balance::RoundRobin,
        );
        let mut state = PickState::new(0);
        let mut counts = [0; 3];
        for _ in 0..300 {
            counts[s.choose(0, &mut state, |_| true).unwrap()] += 1;
        }
        assert_eq!(counts, [200, 100, 0]);
        s.healthy = vec![false, false, true];
        assert_eq!(
            s.choose(0, &mut state, |_| true),
            Some(2),
            "backup when all primaries are down"
        );
        s.healthy = vec![false, false, false];
        assert_eq!(s.choose(0, &mut state, |_| true), None);
    }

    #[test]
    fn least_conn_picks_fewest_active_per_weight() {
        let s = snapshot(
            vec![
                backend("10.0.0.1:1", 1, false),
                backend("10.0.0.2:1", 2, false),
                backend("10.0.0.3:1", 1, false),
            ],
            Balance::LeastConn,
        );
        let mut state = PickState::new(0);
        s.set.backends[0].load.active.store(3, Ordering::Relaxed);
        s.set.backends[1].load.active.store(5, Ordering::Relaxed); // 2.5 per weight
        s.set.backends[2].load.active.store(2, Ordering::Relaxed);
        assert_eq!(s.choose(0, &mut state, |_| true), Some(2));
        assert_eq!(
            s.choose(0, &mut state, |i| i != 2),
            Some(1),
            "retries skip tried backends"
        );
    }

    #[test]
    fn random_two_prefers_the_less_loaded_and_spreads_by_weight() {
        let s = snapshot(
            vec![
                backend("10.0.0.1:1", 1, false),
                backend("10.0.0.2:1", 3, false),
            ],
            Balance::RandomTwo,
        );
        let mut state = PickState::new(7);
        let mut counts = [0; 2];
        for _ in 0..4000 {
            counts[s.choose(0, &mut state, |_| true).unwrap()] += 1;
        }
        // Equal loads (0): the first draw wins, so the split follows the weights 1:3.
        let share = f64::from(counts[1]) / 4000.0;
        assert!((0.70..0.80).contains(&share), "{counts:?}");
        s.set.backends[1].load.active.store(10, Ordering::Relaxed);
        let mut heavy_picks = 0;
        for _ in 0..1000 {
            if s.choose(0, &mut state, |_| true) == Some(1) {
                heavy_picks += 1;
            }
        }
        // Only when both draws land on the loaded backend (9/16 of the time) is it chosen.
        assert!(heavy_picks < 650, "{heavy_picks}");
    }

    #[test]
    fn hash_policy_masks_unhealthy_and_keeps_others() {
        let mut s = snapshot(
            (1..=5)
                .map(|i| backend(&format!("10.0.0.{i}:1"), 1, false))
                .collect(),
            Balance::Hash,
        );
        let mut state = PickState::new(0);
        let before: Vec<usize> = (0..2000u64)
            .map(|k| {
                s.choose(k.wrapping_mul(0x9e37_79b9_7f4a_7c15), &mut state, |_| true)
                    .unwrap()
            })
            .collect();
        s.healthy[2] = false;
        for (k, old) in before.iter().enumerate() {
            let key = (k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let new = s.choose(key, &mut state, |_| true).unwrap();
            assert_ne!(new, 2);
            if *old != 2 {
                assert_eq!(new, *old, "keys on healthy backends never move");
            }
        }
    }

    #[test]
    fn bounded_load_caps_a_hot_backend() {
        let mut s = snapshot(
            (1..=4)
                .map(|i| backend(&format!("10.0.0.{i}:1"), 1, false))
                .collect(),
            Balance::Hash,
        );
        s.policy.hash_balance_factor = Some(125);
        let mut state = PickState::new(0);
        let key = 42;
        let home = s.choose(key, &mut state, |_| true).unwrap();
        // One hot client opening many flows: its home backend fills up to the cap, then
        // the rest spill over.
        for _ in 0..100 {
            let i = s.choose(key, &mut state, |_| true).unwrap();
            s.set.backends[i]
                .load
                .active
                .fetch_add(1, Ordering::Relaxed);
        }
        let home_load = s.set.backends[home].load.active.load(Ordering::Relaxed);
        assert!(
            home_load <= 32,
            "home took {home_load} of 100 with factor 125%"
        );
    }
}
