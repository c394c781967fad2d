//! Lookup and build times of the balance tables: `cargo bench --bench balance`.
//!
//! Plain `Instant` timing, no framework. Keys are precomputed flow key hashes, so the lookup
//! figure is the table walk alone. Each case runs for a bounded number of lookups so the whole
//! bench takes a few seconds; numbers on a shared 2-core machine are indicative, not exact.
//!
//! Columns: build = best of 3 `Table::build` (ring: 400 points per backend; Maglev: 65537
//! slots, 100003 for 1000 backends); choose = all usable; "1 down" = backend 0 unusable, so
//! 1/N of keys take the failover walk; bounded = `choose_bounded` at factor 125 with fixed
//! loads, which sums the loads of the tier on every call (O(backends)).

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use ringway::balance::{flow_key_hash, Algorithm, BackendId, HashKey, Table, DEFAULT_VNODES};

const KEYS: usize = 1 << 16;
/// Each measurement runs whole batches until this much time has passed.
const BUDGET: Duration = Duration::from_millis(150);
const BATCH: usize = 4096;

fn backends(count: usize) -> Vec<BackendId> {
    (0..count)
        .map(|i| BackendId {
            name: format!("10.{}.{}.{}:80", i >> 16, (i >> 8) & 0xff, i & 0xff),
            weight: 1,
            backup: false,
        })
        .collect()
}

fn keys() -> Vec<u64> {
    (0..KEYS as u32)
        .map(|i| {
            let client = SocketAddr::new(Ipv4Addr::from(0xc633_6400 + i).into(), 40000);
            flow_key_hash(&client, HashKey::SrcIp, 0)
        })
        .collect()
}

/// Nanoseconds per call of `lookup`, cycling through `keys` for about `BUDGET`.
fn time_per_lookup(keys: &[u64], mut lookup: impl FnMut(u64) -> Option<usize>) -> f64 {
    let start = Instant::now();
    let mut calls = 0usize;
    while start.elapsed() < BUDGET {
        for _ in 0..BATCH {
            black_box(lookup(black_box(keys[calls % keys.len()])));
            calls += 1;
        }
    }
    start.elapsed().as_nanos() as f64 / calls as f64
}

fn best_build(set: &[BackendId], algorithm: Algorithm) -> (Table, Duration) {
    // Best of three, to shave off noise from other processes.
    let mut best = Duration::MAX;
    let mut table = None;
    for _ in 0..3 {
        let start = Instant::now();
        let built = Table::build(set, algorithm, DEFAULT_VNODES, None, 0);
        best = best.min(start.elapsed());
        table = Some(built);
    }
    (
        table.unwrap_or_else(|| Table::build(set, algorithm, DEFAULT_VNODES, None, 0)),
        best,
    )
}

fn main() {
    let keys = keys();
    let hash_ns = time_per_lookup(&keys, |k| {
        let client = SocketAddr::new(Ipv4Addr::from(k as u32).into(), 40000);
        Some(flow_key_hash(black_box(&client), HashKey::SrcIpPort, 0) as usize)
    });
    println!("flow_key_hash (SrcIpPort): {hash_ns:.1} ns/key");
    println!();
    println!(
        "{:<7} {:>8} {:>10} {:>10} {:>10} {:>11}",
        "algo", "backends", "build ms", "choose ns", "1 down ns", "bounded ns"
    );
    for algorithm in [Algorithm::Ring, Algorithm::Maglev] {
        for count in [10, 100, 1000] {
            let set = backends(count);
            let (table, build) = best_build(&set, algorithm);
            let all_up = time_per_lookup(&keys, |k| table.choose(k, |_| true));
            // One backend down: 1/count of the keys take the failover walk.
            let one_down = time_per_lookup(&keys, |k| table.choose(k, |i| i != 0));
            let loads: Vec<u64> = (0..count as u64).map(|i| i % 7).collect();
            let bounded = time_per_lookup(&keys, |k| {
                table.choose_bounded(k, |_| true, |i| loads[i], 125)
            });
            println!(
                "{:<7} {:>8} {:>10.2} {:>10.1} {:>10.1} {:>11.1}",
                format!("{algorithm:?}"),
                count,
                build.as_secs_f64() * 1e3,
                all_up,
                one_down,
                bounded
            );
        }
    }
}
