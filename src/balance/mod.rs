//! Backend selection: stable flow-key hashing and consistent-hash tables (pure code, no I/O).
//!
//! A control thread builds one immutable [`Table`] per backend set and shares it through an
//! `Arc`; workers call [`Table::choose`] (or [`Table::choose_bounded`]) with the flow key hash
//! from [`flow_key_hash`] and a `usable` predicate that encodes health and "already tried".
//!
//! Map of the module:
//! - `hash`: the flow key bytes and every other stable hash (ring points, Maglev permutations).
//! - `tier`: primaries and backups are two separate walks; a tier lists its members by name.
//! - `ring`: weighted virtual nodes on a 64-bit circle, binary search plus "next distinct" walk.
//! - `maglev`: Maglev lookup table (prime size, weighted population), re-probe then scan.
//! - `primes`: the prime table sizes Maglev needs.
//! - `bounded`: the load cap of consistent hashing with bounded loads (HAProxy's rule).
//! - `table`: the public [`Table`] that ties them together.
//!
//! Backend identity is the configured name text, never the position in the list: every
//! placement decision hashes or sorts by name, so two hosts with the same configuration (in
//! any order) send the same client to the same backend.

mod bounded;
mod hash;
mod maglev;
mod primes;
mod ring;
mod table;
mod tier;

#[cfg(test)]
mod quality_tests;

pub use hash::{flow_key_hash, HashKey};
pub use ring::DEFAULT_VNODES;
pub use table::Table;

/// One configured backend as the selection code sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendId {
    /// The configured address text, e.g. "10.0.0.11:80". This is the backend's identity.
    pub name: String,
    /// Relative share of flows; 0 means "never chosen".
    pub weight: u32,
    /// Backups are chosen only when no primary is usable.
    pub backup: bool,
}

/// How keys are spread over backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// Consistent-hash ring with weighted virtual nodes (the default).
    Ring,
    /// Maglev lookup table: near-perfect balance, slightly more movement on set changes.
    Maglev,
}
