//! Whole-table properties: balance, disruption on set changes, health masking, backups,
//! bounded loads, order independence and golden vectors. Figures are printed (run with
//! `--nocapture`) so they can be quoted; the assertions are the required bounds.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::OnceLock;

use super::*;

const KEY_COUNT: usize = 1_000_000;

/// 1M distinct client keys (SrcIp hashes of 10.0.0.0 upwards), computed once per test binary.
fn keys() -> &'static [u64] {
    static KEYS: OnceLock<Vec<u64>> = OnceLock::new();
    KEYS.get_or_init(|| {
        (0..KEY_COUNT as u32)
            .map(|i| {
                let client = SocketAddr::new(Ipv4Addr::from(0x0a00_0000 + i).into(), 40000);
                flow_key_hash(&client, HashKey::SrcIp, 0)
            })
            .collect()
    })
}

fn backend(name: &str, weight: u32, backup: bool) -> BackendId {
    BackendId {
        name: name.to_string(),
        weight,
        backup,
    }
}

/// `count` equal primaries named "10.0.0.<i>:80", i from 1.
fn equal_backends(count: usize) -> Vec<BackendId> {
    (1..=count)
        .map(|i| backend(&format!("10.0.0.{i}:80"), 1, false))
        .collect()
}

fn build(backends: &[BackendId], algorithm: Algorithm) -> Table {
    Table::build(backends, algorithm, DEFAULT_VNODES, None, 0)
}

const ALGORITHMS: [Algorithm; 2] = [Algorithm::Ring, Algorithm::Maglev];

/// The chosen backend *name* for every key, with everything usable.
fn assignment<'a>(table: &Table, backends: &'a [BackendId]) -> Vec<&'a str> {
    keys()
        .iter()
        .map(|&k| {
            table
                .choose(k, |_| true)
                .map_or("", |i| backends[i].name.as_str())
        })
        .collect()
}

fn counts_by_name<'a>(assigned: &[&'a str]) -> HashMap<&'a str, u64> {
    let mut counts = HashMap::new();
    for &name in assigned {
        *counts.entry(name).or_insert(0) += 1;
    }
    counts
}

/// (max/mean, min/mean) of the keys per backend.
fn spread(counts: &HashMap<&str, u64>, backends: usize) -> (f64, f64) {
    let mean = KEY_COUNT as f64 / backends as f64;
    let max = counts.values().copied().max().unwrap_or(0) as f64;
    let min = if counts.len() < backends {
        0.0
    } else {
        counts.values().copied().min().unwrap_or(0) as f64
    };
    (max / mean, min / mean)
}

fn moved_fraction(before: &[&str], after: &[&str]) -> f64 {
    let moved = before.iter().zip(after).filter(|(a, b)| a != b).count();
    moved as f64 / before.len() as f64
}

#[test]
fn ring_balance_with_default_vnodes() {
    let backends = equal_backends(10);
    let counts = counts_by_name(&assignment(&build(&backends, Algorithm::Ring), &backends));
    let (max, min) = spread(&counts, 10);
    println!("ring, 10 backends, {DEFAULT_VNODES} vnodes: max/mean {max:.4}, min/mean {min:.4}");
    assert!(max <= 1.15 && min >= 0.85, "max/mean {max}, min/mean {min}");
}

#[test]
fn maglev_balance() {
    let backends = equal_backends(10);
    let counts = counts_by_name(&assignment(&build(&backends, Algorithm::Maglev), &backends));
    let (max, min) = spread(&counts, 10);
    println!("maglev, 10 backends, M=65537: max/mean {max:.4}, min/mean {min:.4}");
    assert!(max <= 1.02, "max/mean {max}");
}

#[test]
fn weights_one_to_two() {
    // Five backends of weight 1 and five of weight 2: each group's share of keys must be
    // within 2% (relative) of 1/3 and 2/3.
    let backends: Vec<BackendId> = (1..=10)
        .map(|i| {
            backend(
                &format!("10.0.1.{i}:80"),
                if i % 2 == 0 { 2 } else { 1 },
                false,
            )
        })
        .collect();
    for algorithm in ALGORITHMS {
        let table = build(&backends, algorithm);
        let mut heavy = 0u64;
        for &k in keys() {
            if table
                .choose(k, |_| true)
                .is_some_and(|i| backends[i].weight == 2)
            {
                heavy += 1;
            }
        }
        let heavy_share = heavy as f64 / KEY_COUNT as f64;
        let ratio = heavy_share / (1.0 - heavy_share);
        println!("{algorithm:?} weights 1:2 (5+5 backends): heavy/light keys = {ratio:.4}");
        assert!(
            (heavy_share / (2.0 / 3.0) - 1.0).abs() <= 0.02,
            "{heavy_share}"
        );
        assert!(
            ((1.0 - heavy_share) / (1.0 / 3.0) - 1.0).abs() <= 0.02,
            "{heavy_share}"
        );
    }
}

#[test]
fn weights_one_to_two_single_pair() {
    // One backend of each weight: Maglev is exact; the ring's share is a sum of 400 + 800
    // random arcs (relative std dev about 4% for the light one), so it gets a looser bound.
    let backends = vec![
        backend("10.0.2.1:80", 1, false),
        backend("10.0.2.2:80", 2, false),
    ];
    for (algorithm, tolerance) in [(Algorithm::Maglev, 0.02), (Algorithm::Ring, 0.10)] {
        let counts = counts_by_name(&assignment(&build(&backends, algorithm), &backends));
        let light = counts.get("10.0.2.1:80").copied().unwrap_or(0) as f64;
        let heavy = counts.get("10.0.2.2:80").copied().unwrap_or(0) as f64;
        println!(
            "{algorithm:?} weights 1:2 (one pair): heavy/light keys = {:.4}",
            heavy / light
        );
        assert!(
            (heavy / light / 2.0 - 1.0).abs() <= tolerance,
            "{heavy} / {light}"
        );
    }
}

#[test]
fn removing_one_of_ten() {
    let all = equal_backends(10);
    let removed = "10.0.0.4:80";
    let rest: Vec<BackendId> = all.iter().filter(|b| b.name != removed).cloned().collect();
    for algorithm in ALGORITHMS {
        let before = assignment(&build(&all, algorithm), &all);
        let after = assignment(&build(&rest, algorithm), &rest);
        let moved = moved_fraction(&before, &after);
        let moved_bystanders = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| **b != removed && b != a)
            .count();
        println!(
            "{algorithm:?} remove 1 of 10: moved {:.4} of keys, {moved_bystanders} from other backends",
            moved
        );
        match algorithm {
            Algorithm::Ring => assert_eq!(moved_bystanders, 0),
            Algorithm::Maglev => assert!(moved <= 2.0 / 10.0, "{moved}"),
        }
    }
}

#[test]
fn adding_one_to_ten() {
    let before_set = equal_backends(10);
    let after_set = equal_backends(11);
    for algorithm in ALGORITHMS {
        let before = assignment(&build(&before_set, algorithm), &before_set);
        let after = assignment(&build(&after_set, algorithm), &after_set);
        let moved = moved_fraction(&before, &after);
        let not_to_new = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| b != a && **a != "10.0.0.11:80")
            .count();
        println!(
            "{algorithm:?} add 1 to 10: moved {moved:.4} of keys (1/11 = {:.4}), {not_to_new} not to the new backend",
            1.0 / 11.0
        );
        if algorithm == Algorithm::Ring {
            assert!(moved <= 1.3 / 11.0, "{moved}");
            assert_eq!(not_to_new, 0);
        }
    }
}

#[test]
fn masking_moves_only_the_masked_keys_and_unmasking_restores() {
    let backends = equal_backends(10);
    let masked = [3usize, 7];
    for algorithm in ALGORITHMS {
        let table = build(&backends, algorithm);
        let mut receivers = HashMap::new();
        for &k in &keys()[..200_000] {
            let original = table.choose(k, |_| true);
            let while_masked = table.choose(k, |i| !masked.contains(&i));
            match original {
                Some(i) if masked.contains(&i) => {
                    let to = while_masked.expect("others are usable");
                    assert!(!masked.contains(&to));
                    *receivers.entry(to).or_insert(0u64) += 1;
                }
                _ => assert_eq!(while_masked, original, "an unrelated key moved"),
            }
            assert_eq!(table.choose(k, |_| true), original, "unmasking restores");
        }
        println!(
            "{algorithm:?} masked 2 of 10: their keys went to {} backends",
            receivers.len()
        );
        assert!(receivers.len() >= 4, "{receivers:?}");
    }
}

#[test]
fn retry_walk_visits_each_backend_once_then_gives_up() {
    // A connect retry marks tried backends unusable; every backend is offered exactly once.
    let backends = equal_backends(10);
    for algorithm in ALGORITHMS {
        let table = build(&backends, algorithm);
        for &k in &keys()[..2000] {
            let mut tried = Vec::new();
            while let Some(i) = table.choose(k, |i| !tried.contains(&i)) {
                tried.push(i);
            }
            tried.sort_unstable();
            assert_eq!(tried, (0..10).collect::<Vec<_>>());
        }
    }
}

#[test]
fn backups_weight_zero_and_empty() {
    let backends = vec![
        backend("10.0.3.1:80", 1, false),
        backend("10.0.3.2:80", 0, false),
        backend("10.0.3.3:80", 1, false),
        backend("10.0.3.9:80", 1, true),
        backend("10.0.3.8:80", 0, true),
    ];
    for algorithm in ALGORITHMS {
        let table = build(&backends, algorithm);
        assert_eq!(table.len(), 5);
        for &k in &keys()[..20_000] {
            let chosen = table.choose(k, |_| true);
            assert!(matches!(chosen, Some(0 | 2)), "primaries only: {chosen:?}");
            assert_eq!(table.choose(k, |i| i != 0), Some(2));
            assert_eq!(
                table.choose(k, |i| i >= 3),
                Some(3),
                "backup when no primary"
            );
            assert_eq!(
                table.choose(k, |i| i == 1 || i == 4),
                None,
                "weight 0 never"
            );
            assert_eq!(table.choose(k, |_| false), None);
            let bounded = table.choose_bounded(k, |i| i >= 3, |_| 5, 125);
            assert_eq!(bounded, Some(3));
        }
        for empty in [Table::build(&[], algorithm, DEFAULT_VNODES, None, 0), {
            Table::build(&backends[1..2], algorithm, DEFAULT_VNODES, None, 0)
        }] {
            assert_eq!(empty.choose(1, |_| true), None);
            assert_eq!(empty.choose_bounded(1, |_| true, |_| 0, 150), None);
        }
    }
    assert!(Table::build(&[], Algorithm::Ring, 1, None, 0).is_empty());
}

#[test]
fn bounded_load_never_exceeds_its_cap() {
    // Flows arrive and never leave, from only 300 distinct clients (hot keys), so plain
    // consistent hashing would pile them up; every placement must respect the cap computed
    // at that moment.
    let backends: Vec<BackendId> = (1..=10)
        .map(|i| backend(&format!("10.0.4.{i}:80"), if i <= 2 { 3 } else { 1 }, false))
        .collect();
    let total_weight: u32 = backends.iter().map(|b| b.weight).sum();
    for algorithm in ALGORITHMS {
        let table = build(&backends, algorithm);
        for factor in [100u32, 125, 150, 200] {
            let mut loads = vec![0u64; backends.len()];
            for flow in 0..30_000u64 {
                let key = keys()[(flow % 300) as usize];
                let chosen = table
                    .choose_bounded(key, |_| true, |i| loads[i], factor)
                    .expect("usable backends");
                let total = loads.iter().sum::<u64>() + 1;
                let weight = u128::from(backends[chosen].weight);
                let cap = (u128::from(factor) * u128::from(total) * weight)
                    .div_ceil(100 * u128::from(total_weight)) as u64;
                assert!(
                    loads[chosen] < cap,
                    "{algorithm:?} f={factor}: load {} cap {cap}",
                    loads[chosen]
                );
                loads[chosen] += 1;
            }
            let total = loads.iter().sum::<u64>() as f64;
            let worst = loads
                .iter()
                .zip(&backends)
                .map(|(&load, b)| {
                    load as f64 / (total * f64::from(b.weight) / f64::from(total_weight))
                })
                .fold(0.0, f64::max);
            println!(
                "{algorithm:?} bounded factor {factor}: final max load/weighted mean {worst:.4}"
            );
            assert!(worst <= f64::from(factor) / 100.0 + 0.01, "{worst}");
        }
    }
}

#[test]
fn bounded_load_keeps_keys_home_when_there_is_room() {
    let backends = equal_backends(10);
    for algorithm in ALGORITHMS {
        let table = build(&backends, algorithm);
        for &k in &keys()[..5000] {
            let plain = table.choose(k, |_| true);
            assert_eq!(table.choose_bounded(k, |_| true, |_| 7, 125), plain);
            assert_eq!(table.choose_bounded(k, |_| true, |_| 7, 0), plain);
        }
    }
}

fn name_of(set: &[BackendId], index: Option<usize>) -> Option<&str> {
    index.map(|i| set[i].name.as_str())
}

#[test]
fn order_independence() {
    let mut listed = equal_backends(12);
    listed.push(backend("10.0.9.1:80", 3, false));
    listed.push(backend("10.0.9.2:80", 1, true));
    listed.push(backend("10.0.9.3:80", 2, true));
    let mut shuffled = listed.clone();
    shuffled.reverse();
    shuffled.swap(2, 9);
    shuffled.rotate_left(5);
    let down = ["10.0.0.3:80", "10.0.9.1:80"];
    for algorithm in ALGORITHMS {
        let tables = [build(&listed, algorithm), build(&shuffled, algorithm)];
        let sets = [&listed, &shuffled];
        for &k in &keys()[..20_000] {
            // The same question asked of both tables, phrased in each one's indices.
            let answers: Vec<_> = tables
                .iter()
                .zip(sets)
                .map(|(table, set)| {
                    let up = |i: usize| !down.contains(&set[i].name.as_str());
                    let only_backups = |i: usize| set[i].backup;
                    let load = |i: usize| set[i].name.len() as u64 * 3;
                    [
                        name_of(set, table.choose(k, |_| true)),
                        name_of(set, table.choose(k, up)),
                        name_of(set, table.choose(k, only_backups)),
                        name_of(set, table.choose_bounded(k, up, load, 110)),
                    ]
                })
                .collect();
            assert_eq!(answers[0], answers[1], "{algorithm:?} key {k:#x}");
        }
    }
}

#[test]
fn src_ip_port_spreads_one_client_src_ip_keeps_it() {
    let backends = equal_backends(10);
    for algorithm in ALGORITHMS {
        let table = build(&backends, algorithm);
        let chosen_for = |key: HashKey| {
            let mut chosen: Vec<usize> = (1024..3024u16)
                .filter_map(|port| {
                    let client = SocketAddr::new(Ipv4Addr::new(198, 51, 100, 23).into(), port);
                    table.choose(flow_key_hash(&client, key, 0), |_| true)
                })
                .collect();
            chosen.sort_unstable();
            chosen.dedup();
            chosen.len()
        };
        assert_eq!(chosen_for(HashKey::SrcIpPort), 10);
        assert_eq!(chosen_for(HashKey::SrcIp), 1);
    }
}

#[test]
fn odd_inputs_do_not_panic() {
    let odd = vec![
        backend("", 1, false),
        backend("", 1, false),
        backend("same", 1000, false),
        backend("same", 1, true),
        backend("ünïcødé", 7, false),
    ];
    for algorithm in ALGORITHMS {
        // The caps on huge `vnodes` and sizes are tested on the sizing functions
        // (ring::point_counts_are_capped, maglev::sizes); building them here is slow in debug.
        for (vnodes, size) in [(0, Some(0)), (1, Some(1)), (3, None)] {
            let table = Table::build(&odd, algorithm, vnodes, size, u64::MAX);
            for k in [0, 1, u64::MAX / 2, u64::MAX] {
                assert!(table.choose(k, |_| true).is_some_and(|i| i < odd.len()));
                assert_eq!(table.choose(k, |i| i == 3), Some(3));
                let _ = table.choose_bounded(k, |_| true, |_| u64::MAX, u32::MAX);
                let _ = table.choose_bounded(k, |_| true, |i| i as u64, 1);
            }
            // Indices the table never saw are simply never returned.
            assert_eq!(table.choose(5, |i| i >= odd.len()), None);
        }
    }
    // Extreme weights: the ring hits its point cap (one build, ~2M points), yet the light
    // backend keeps a point and stays reachable.
    let extreme = [
        backend("heavy", u32::MAX, false),
        backend("light", 1, false),
    ];
    for algorithm in ALGORITHMS {
        let table = Table::build(&extreme, algorithm, 1, None, 0);
        assert_eq!(table.choose(42, |i| i == 1), Some(1));
    }
}

/// Golden vectors: computed once and pasted. A failure means table construction or lookup
/// changed and deployed clients would move; that needs a deliberate decision.
#[test]
fn golden_choices() {
    let backends = vec![
        backend("10.0.0.11:80", 1, false),
        backend("10.0.0.12:80", 2, false),
        backend("10.0.0.13:80", 1, false),
        backend("[2001:db8::14]:80", 1, false),
        backend("10.0.0.15:80", 1, true),
    ];
    let key_of = |text: &str| flow_key_hash(&text.parse().expect("addr"), HashKey::SrcIpPort, 7);
    let clients = [
        "192.0.2.1:1000",
        "192.0.2.2:1000",
        "192.0.2.3:1000",
        "192.0.2.4:1000",
        "192.0.2.5:1000",
        "192.0.2.6:1000",
        "192.0.2.7:1000",
        "192.0.2.8:1000",
        "192.0.2.9:1000",
        "192.0.2.10:1000",
        "192.0.2.11:1000",
        "192.0.2.12:1000",
        "198.51.100.9:65535",
        "[2001:db8::77]:443",
    ];
    for algorithm in ALGORITHMS {
        let table = Table::build(&backends, algorithm, DEFAULT_VNODES, None, 7);
        let name = |i: Option<usize>| i.map_or("-", |i| backends[i].name.as_str());
        // Per client: preferred backend, where it goes when that one is down, backup only.
        let got: Vec<[&str; 3]> = clients
            .iter()
            .map(|c| {
                let k = key_of(c);
                let preferred = table.choose(k, |_| true);
                [
                    name(preferred),
                    name(table.choose(k, |i| Some(i) != preferred)),
                    name(table.choose(k, |i| i == 4)),
                ]
            })
            .collect();
        println!("{algorithm:?} golden: {got:?}");
        let expected: &[[&str; 3]] = match algorithm {
            Algorithm::Ring => &GOLDEN_RING,
            Algorithm::Maglev => &GOLDEN_MAGLEV,
        };
        assert_eq!(got, expected, "{algorithm:?}");
    }
}

const GOLDEN_RING: [[&str; 3]; 14] = [
    ["10.0.0.13:80", "10.0.0.12:80", "10.0.0.15:80"],
    ["[2001:db8::14]:80", "10.0.0.13:80", "10.0.0.15:80"],
    ["10.0.0.11:80", "10.0.0.13:80", "10.0.0.15:80"],
    ["10.0.0.11:80", "10.0.0.12:80", "10.0.0.15:80"],
    ["[2001:db8::14]:80", "10.0.0.12:80", "10.0.0.15:80"],
    ["10.0.0.11:80", "10.0.0.12:80", "10.0.0.15:80"],
    ["[2001:db8::14]:80", "10.0.0.12:80", "10.0.0.15:80"],
    ["10.0.0.13:80", "[2001:db8::14]:80", "10.0.0.15:80"],
    ["10.0.0.13:80", "[2001:db8::14]:80", "10.0.0.15:80"],
    ["10.0.0.13:80", "10.0.0.12:80", "10.0.0.15:80"],
    ["10.0.0.13:80", "10.0.0.11:80", "10.0.0.15:80"],
    ["10.0.0.12:80", "10.0.0.11:80", "10.0.0.15:80"],
    ["10.0.0.13:80", "10.0.0.12:80", "10.0.0.15:80"],
    ["10.0.0.13:80", "[2001:db8::14]:80", "10.0.0.15:80"],
];
const GOLDEN_MAGLEV: [[&str; 3]; 14] = [
    ["10.0.0.11:80", "10.0.0.12:80", "10.0.0.15:80"],
    ["10.0.0.12:80", "[2001:db8::14]:80", "10.0.0.15:80"],
    ["10.0.0.12:80", "10.0.0.13:80", "10.0.0.15:80"],
    ["10.0.0.13:80", "10.0.0.12:80", "10.0.0.15:80"],
    ["[2001:db8::14]:80", "10.0.0.12:80", "10.0.0.15:80"],
    ["10.0.0.12:80", "10.0.0.13:80", "10.0.0.15:80"],
    ["10.0.0.12:80", "10.0.0.11:80", "10.0.0.15:80"],
    ["10.0.0.11:80", "10.0.0.12:80", "10.0.0.15:80"],
    ["10.0.0.13:80", "[2001:db8::14]:80", "10.0.0.15:80"],
    ["10.0.0.12:80", "10.0.0.13:80", "10.0.0.15:80"],
    ["[2001:db8::14]:80", "10.0.0.11:80", "10.0.0.15:80"],
    ["10.0.0.13:80", "10.0.0.12:80", "10.0.0.15:80"],
    ["10.0.0.13:80", "10.0.0.11:80", "10.0.0.15:80"],
    ["10.0.0.11:80", "10.0.0.12:80", "10.0.0.15:80"],
];
