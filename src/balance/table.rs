//! The public selection table: one immutable snapshot of a backend set.

use std::fmt;

use super::bounded::LoadBound;
use super::tier::Tier;
use super::{Algorithm, BackendId};

/// Backends past this many in one list are ignored (never chosen). It keeps every index and
/// ring position within u32 and build time bounded; real configurations are far smaller.
const MAX_BACKENDS: usize = 1 << 20;

/// Immutable selection table for one backend set; built on a control thread, shared via
/// `Arc`, read by workers. Indices are positions in the list given to [`Table::build`].
pub struct Table {
    backend_count: usize,
    algorithm: Algorithm,
    /// Weight per backend index, for the bounded-load caps.
    weights: Vec<u32>,
    primaries: Option<Tier>,
    backups: Option<Tier>,
}

impl Table {
    /// Builds the table. Never panics; an empty list (or all weights 0) gives a table whose
    /// `choose` returns `None`.
    ///
    /// - `vnodes`: ring points per unit of weight ([`super::DEFAULT_VNODES`]); 0 acts as 1.
    ///   Weights are divided by their gcd first, so 100:200 costs the same as 1:2.
    /// - `maglev_size`: `None` = the smallest prime > 100 x backends, at least 65537 (prime,
    ///   the paper's and Katran's default, 256 KB, within 0.02% balance for 10 backends).
    ///   `Some(n)` is rounded up to a prime and to at least the backend count, and capped
    ///   near 2^24. Each tier (primaries, backups) gets its own table sized by its members.
    /// - `seed`: the same seed as the flow key hash is fine; placement hashes use distinct
    ///   inputs ("<name>#<k>" for ring points, the bare name for Maglev permutations).
    pub fn build(
        backends: &[BackendId],
        algorithm: Algorithm,
        vnodes: u32,
        maglev_size: Option<u64>,
        seed: u64,
    ) -> Table {
        let considered = &backends[..backends.len().min(MAX_BACKENDS)];
        let tier =
            |backup: bool| Tier::build(considered, backup, algorithm, vnodes, maglev_size, seed);
        Table {
            backend_count: backends.len(),
            algorithm,
            weights: considered.iter().map(|b| b.weight).collect(),
            primaries: tier(false),
            backups: tier(true),
        }
    }

    /// Preferred backend index for `key_hash` among those with `usable(i) == true`: the
    /// primaries' walk, or if no primary is usable the same walk over the backups.
    ///
    /// A key whose preferred backend is usable never moves; the keys of an unusable backend
    /// go to the next distinct backend clockwise (ring) or to a re-probe of the key (Maglev);
    /// when it is usable again every key returns to exactly its original backend. No
    /// allocation; O(log points) or O(1) when the preferred backend is usable.
    pub fn choose(&self, key_hash: u64, usable: impl Fn(usize) -> bool) -> Option<usize> {
        self.tiers().find_map(|tier| tier.find(key_hash, &usable))
    }

    /// Consistent hashing with bounded loads (HAProxy `hash-balance-factor`): the first
    /// backend in the key's walk that is usable and below its load cap; see the `bounded`
    /// module for the exact cap. `factor_pct` 0 disables the bound (plain [`Table::choose`]);
    /// values from 1 to 99 act as 100. `load(i)` is backend `i`'s active flows.
    ///
    /// Costs O(backends in the tier) per call for the load and weight totals.
    pub fn choose_bounded(
        &self,
        key_hash: u64,
        usable: impl Fn(usize) -> bool,
        load: impl Fn(usize) -> u64,
        factor_pct: u32,
    ) -> Option<usize> {
        if factor_pct == 0 {
            return self.choose(key_hash, usable);
        }
        for tier in self.tiers() {
            let (total_weight, total_load) = tier
                .members()
                .iter()
                .map(|&m| m as usize)
                .filter(|&i| usable(i))
                .fold((0u64, 0u64), |(weight, flows), i| {
                    (
                        weight + u64::from(self.weight(i)),
                        flows.saturating_add(load(i)),
                    )
                });
            if total_weight == 0 {
                continue; // Nothing usable in this tier: try the backups.
            }
            let bound = LoadBound::new(factor_pct, total_load, total_weight);
            let eligible = |i: usize| usable(i) && bound.admits(load(i), self.weight(i));
            // With consistent loads some backend is always eligible (the caps add up past the
            // total), but `load` may read counters that change between the sum and the walk;
            // then the plain walk decides, as HAProxy does when no server is eligible.
            return tier
                .find(key_hash, &eligible)
                .or_else(|| tier.find(key_hash, &usable));
        }
        None
    }

    /// Number of backends given to `build` (weight 0 included).
    pub fn len(&self) -> usize {
        self.backend_count
    }

    pub fn is_empty(&self) -> bool {
        self.backend_count == 0
    }

    fn tiers(&self) -> impl Iterator<Item = &Tier> {
        self.primaries.iter().chain(self.backups.iter())
    }

    fn weight(&self, index: usize) -> u32 {
        self.weights.get(index).copied().unwrap_or(0)
    }
}

/// A summary, not the (large) lookup structures.
impl fmt::Debug for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let describe = |tier: &Option<Tier>| {
            tier.as_ref()
                .map(|t| (t.members().len(), t.entries()))
                .unwrap_or((0, 0))
        };
        f.debug_struct("Table")
            .field("backends", &self.backend_count)
            .field("algorithm", &self.algorithm)
            .field("primaries (members, entries)", &describe(&self.primaries))
            .field("backups (members, entries)", &describe(&self.backups))
            .finish()
    }
}
