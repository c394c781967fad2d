//! A tier is the set of backends one walk chooses from: all primaries, or all backups.
//! Keeping them in separate structures means a backup never sits between two primaries on
//! the ring, so "backups only when no primary is usable" falls out of the order of walks.

use super::maglev::Maglev;
use super::ring::Ring;
use super::{Algorithm, BackendId};

/// A backend as the builders see it. Builders receive members sorted by name, which is what
/// makes every construction independent of the order of the configured list.
pub(super) struct Member<'a> {
    /// Position in the list given to `Table::build` (what `choose` returns).
    pub(super) index: u32,
    pub(super) name: &'a str,
    /// Always > 0: weight-0 backends are never members.
    pub(super) weight: u32,
}

enum Selector {
    Ring(Ring),
    Maglev(Maglev),
}

pub(super) struct Tier {
    /// Backend indices, sorted by (name, index).
    members: Vec<u32>,
    selector: Selector,
}

impl Tier {
    /// The tier of backends with `backup == want_backup` and a non-zero weight; `None` if empty.
    pub(super) fn build(
        backends: &[BackendId],
        want_backup: bool,
        algorithm: Algorithm,
        vnodes: u32,
        maglev_size: Option<u64>,
        seed: u64,
    ) -> Option<Tier> {
        let mut members: Vec<Member<'_>> = backends
            .iter()
            .zip(0u32..)
            .filter(|(b, _)| b.backup == want_backup && b.weight > 0)
            .map(|(b, index)| Member {
                index,
                name: &b.name,
                weight: b.weight,
            })
            .collect();
        if members.is_empty() {
            return None;
        }
        // Names are the identity; the index only breaks ties between duplicate names (which
        // configuration should reject) so that sorting stays deterministic.
        members.sort_unstable_by(|a, b| a.name.cmp(b.name).then(a.index.cmp(&b.index)));
        let selector = match algorithm {
            Algorithm::Ring => Selector::Ring(Ring::build(&members, vnodes, seed)),
            Algorithm::Maglev => Selector::Maglev(Maglev::build(&members, maglev_size, seed)),
        };
        Some(Tier {
            members: members.iter().map(|m| m.index).collect(),
            selector,
        })
    }

    /// Backend indices in this tier, sorted by name.
    pub(super) fn members(&self) -> &[u32] {
        &self.members
    }

    /// The first backend in this key's walk for which `accept` holds. The walk reaches every
    /// member, so `None` means no member is accepted.
    pub(super) fn find(&self, key_hash: u64, accept: &impl Fn(usize) -> bool) -> Option<usize> {
        match &self.selector {
            Selector::Ring(ring) => ring.find(key_hash, &self.members, accept),
            Selector::Maglev(maglev) => maglev.find(key_hash, &self.members, accept),
        }
    }

    /// Ring points or Maglev slots: the size of the lookup structure (for Debug and benches).
    pub(super) fn entries(&self) -> usize {
        match &self.selector {
            Selector::Ring(ring) => ring.points(),
            Selector::Maglev(maglev) => maglev.slots(),
        }
    }
}
