//! `--max-conns-per-source`: flows open per client IP, shared by all workers without locks.
//!
//! A fixed table of atomic counters indexed by a hash of the IP. Two IPs that share a counter
//! share one budget, so the limit can only be stricter than configured, never looser; with
//! 64Ki counters a collision needs tens of thousands of active client IPs to become likely.
//! Counting costs one atomic add at accept and one at close.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};

const COUNTERS: usize = 1 << 16;

pub struct SourceLimiter {
    limit: u32,
    counters: Box<[AtomicU32]>,
    seed: u64,
}

/// A counted flow: give it back with [`SourceLimiter::release`] when the flow ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceTicket(u32);

impl SourceLimiter {
    pub fn new(limit: u32, seed: u64) -> SourceLimiter {
        SourceLimiter {
            limit,
            counters: (0..COUNTERS).map(|_| AtomicU32::new(0)).collect(),
            seed,
        }
    }

    fn index(&self, ip: IpAddr) -> usize {
        let bytes = match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        (xxhash_rust::xxh3::xxh3_64_with_seed(&bytes, self.seed) as usize) & (COUNTERS - 1)
    }

    /// Counts a new flow from `ip`, or refuses it when the IP is at its limit.
    pub fn acquire(&self, ip: IpAddr) -> Option<SourceTicket> {
        let index = self.index(ip);
        let counter = &self.counters[index];
        let before = counter.fetch_add(1, Ordering::Relaxed);
        if before >= self.limit {
            counter.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(SourceTicket(index as u32))
    }

    pub fn release(&self, ticket: SourceTicket) {
        self.counters[ticket.0 as usize].fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_over_the_limit_and_frees_on_release() {
        let limiter = SourceLimiter::new(2, 0);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let t1 = limiter.acquire(a).unwrap();
        let _t2 = limiter.acquire(a).unwrap();
        assert_eq!(limiter.acquire(a), None);
        assert!(
            limiter.acquire(b).is_some(),
            "other clients are not affected"
        );
        limiter.release(t1);
        assert!(limiter.acquire(a).is_some());
    }

    #[test]
    fn mapped_ipv4_counts_as_the_same_client() {
        let limiter = SourceLimiter::new(1, 0);
        let _t = limiter.acquire("192.0.2.7".parse().unwrap()).unwrap();
        assert_eq!(limiter.acquire("::ffff:192.0.2.7".parse().unwrap()), None);
    }
}
