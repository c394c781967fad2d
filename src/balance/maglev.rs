//! Maglev lookup table (Eisenbud et al., NSDI 2016), weighted.
//!
//! Each member has a permutation of the `size` slots (offset and skip from a hash of its
//! name). Members take turns claiming their next free preferred slot until the table is full;
//! turns go by weight, so a weight-2 backend claims twice as often. A key's backend is
//! `slots[key_hash % size]`.
//!
//! When that backend is not accepted, the key is re-hashed per attempt
//! (`REPROBES` times) and looked up again, which spreads a down backend's keys over all the
//! others in proportion to their slots; if every re-probe misses, a scan of the members in
//! name order (starting at a key-dependent member) finds any acceptable one. Everything is a
//! pure function of (key, accept), so a recovered backend gets back exactly its old keys.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::hash::{maglev_permutation_seeds, reprobe_hash};
use super::primes::next_prime_at_least;
use super::tier::Member;

/// Default floor on the table size. 65537 is prime, is the size the Maglev paper and Katran
/// use, fits in L2 as u32 slots (256 KB), and keeps keys within 1 + members/size of the mean
/// (10 backends: 0.02%). Above 655 members the "> 100 slots per backend" rule takes over.
const MIN_DEFAULT_SIZE: u64 = 65537;

/// Slots per member for the default size ("> 100 x backends", from the Maglev paper).
const SLOTS_PER_MEMBER: u64 = 100;

/// Ceiling on the size, explicit or default: 2^24 slots is 64 MB. Larger requests are clamped.
const MAX_SIZE: u64 = 1 << 24;

/// Re-hashed lookups before the fallback scan. With a fraction `f` of slots unacceptable,
/// `f^16` of those keys reach the scan (one of 10 down: 1e-16; half down: 1.5e-5).
const REPROBES: u64 = 16;

const EMPTY: u32 = u32::MAX;

pub(super) struct Maglev {
    /// Backend index per slot; the length is prime.
    slots: Vec<u32>,
    seed: u64,
}

impl Maglev {
    /// `members` must be non-empty and sorted by name.
    pub(super) fn build(members: &[Member<'_>], requested_size: Option<u64>, seed: u64) -> Maglev {
        let size = table_size(members.len() as u64, requested_size);
        Maglev {
            slots: populate(members, size, seed),
            seed,
        }
    }

    pub(super) fn slots(&self) -> usize {
        self.slots.len()
    }

    pub(super) fn find(
        &self,
        key_hash: u64,
        members: &[u32],
        accept: &impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let size = self.slots.len() as u64;
        if size == 0 || members.is_empty() {
            return None;
        }
        let preferred = self.slots[(key_hash % size) as usize] as usize;
        if accept(preferred) {
            return Some(preferred);
        }
        for attempt in 1..=REPROBES {
            let slot = reprobe_hash(key_hash, attempt, self.seed) % size;
            let backend = self.slots[slot as usize] as usize;
            if accept(backend) {
                return Some(backend);
            }
        }
        let count = members.len();
        let start = (key_hash % count as u64) as usize;
        (0..count)
            .map(|step| members[(start + step) % count] as usize)
            .find(|&backend| accept(backend))
    }
}

/// The table size: a prime, at least the member count (so every member can own a slot),
/// at most about `MAX_SIZE`. Default: smallest prime > 100 x members, floor 65537. An explicit
/// size is rounded up to a prime, since the permutations need a prime size.
fn table_size(members: u64, requested: Option<u64>) -> u64 {
    let wanted = match requested {
        Some(size) => size.max(members),
        None => (members.saturating_mul(SLOTS_PER_MEMBER) + 1).max(MIN_DEFAULT_SIZE),
    };
    next_prime_at_least(wanted.min(MAX_SIZE))
}

/// One member's progress through its permutation.
struct Claimant {
    index: u32,
    next_slot: u64,
    skip: u64,
}

/// Whose turn it is to claim a slot. A member's `k`-th claim happens at virtual time
/// `k / weight`; the earliest goes first, ties go to the name-sorted position. With equal
/// weights this is the paper's plain round-robin in name order.
#[derive(PartialEq, Eq)]
struct Turn {
    claims: u64,
    weight: u64,
    rank: usize,
}

impl Ord for Turn {
    fn cmp(&self, other: &Self) -> Ordering {
        // claims/weight vs other.claims/other.weight without division; both products < 2^57.
        let time = (self.claims * other.weight).cmp(&(other.claims * self.weight));
        // BinaryHeap pops the greatest, so the earliest turn must compare greatest.
        time.then(self.rank.cmp(&other.rank)).reverse()
    }
}

impl PartialOrd for Turn {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

fn populate(members: &[Member<'_>], size: u64, seed: u64) -> Vec<u32> {
    let mut claimants: Vec<Claimant> = members
        .iter()
        .map(|m| {
            let (offset_seed, skip_seed) = maglev_permutation_seeds(m.name, seed);
            Claimant {
                index: m.index,
                next_slot: offset_seed % size,
                // In 1..size: coprime with the prime size, so the walk visits every slot.
                skip: skip_seed % (size - 1).max(1) + 1,
            }
        })
        .collect();
    let mut turns: BinaryHeap<Turn> = members
        .iter()
        .enumerate()
        .map(|(rank, m)| Turn {
            claims: 0,
            weight: u64::from(m.weight.max(1)),
            rank,
        })
        .collect();
    let mut slots = vec![EMPTY; size as usize];
    let mut filled = 0u64;
    while filled < size {
        let Some(mut turn) = turns.pop() else { break };
        let claimant = &mut claimants[turn.rank];
        // Terminates: the permutation covers every slot and at least one is still empty.
        loop {
            let slot = claimant.next_slot as usize;
            claimant.next_slot = (claimant.next_slot + claimant.skip) % size;
            if slots[slot] == EMPTY {
                slots[slot] = claimant.index;
                break;
            }
        }
        filled += 1;
        turn.claims += 1;
        turns.push(turn);
    }
    slots
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members<'a>(names: &'a [String], weights: &[u32]) -> Vec<Member<'a>> {
        names
            .iter()
            .zip(weights)
            .zip(0u32..)
            .map(|((name, &weight), index)| Member {
                index,
                name,
                weight,
            })
            .collect()
    }

    fn slot_counts(maglev: &Maglev, backends: usize) -> Vec<u64> {
        let mut counts = vec![0u64; backends];
        for &b in &maglev.slots {
            counts[b as usize] += 1;
        }
        counts
    }

    #[test]
    fn sizes() {
        assert_eq!(table_size(10, None), 65537);
        assert_eq!(table_size(1000, None), 100_003);
        assert_eq!(table_size(10, Some(1000)), 1009);
        assert_eq!(table_size(10, Some(0)), 11);
        assert_eq!(table_size(1, Some(1)), 2);
        assert_eq!(
            table_size(10, Some(u64::MAX)),
            next_prime_at_least(MAX_SIZE)
        );
    }

    #[test]
    fn equal_weights_differ_by_at_most_one_slot() {
        let names: Vec<String> = (1..=10).map(|i| format!("10.0.0.{i}:80")).collect();
        let maglev = Maglev::build(&members(&names, &[1; 10]), None, 0);
        let counts = slot_counts(&maglev, 10);
        let (min, max) = (counts.iter().min(), counts.iter().max());
        assert!(
            max.zip(min).is_some_and(|(max, min)| max - min <= 1),
            "{counts:?}"
        );
        assert_eq!(counts.iter().sum::<u64>(), 65537);
    }

    #[test]
    fn weighted_slots_follow_weights() {
        let names: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let maglev = Maglev::build(&members(&names, &[1, 2, 7]), Some(10007), 3);
        let counts = slot_counts(&maglev, 3);
        for (count, weight) in counts.iter().zip([1u64, 2, 7]) {
            let ideal = 10007 * weight / 10;
            assert!(count.abs_diff(ideal) <= 1, "{counts:?}");
        }
    }

    #[test]
    fn tiny_tables_fill_completely() {
        let names: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let maglev = Maglev::build(&members(&names, &[u32::MAX, 1, 1]), Some(1), 0);
        assert_eq!(maglev.slots.len(), 3);
        assert!(maglev.slots.iter().all(|&s| s < 3));
        for key in 0..50 {
            assert_eq!(maglev.find(key, &[0, 1, 2], &|i| i == 2), Some(2));
            assert_eq!(maglev.find(key, &[0, 1, 2], &|_| false), None);
        }
    }
}
