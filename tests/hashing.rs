//! Backend choice seen from outside: clients act as different IPs by binding 127.0.0.x, and
//! "hello" backends tell each client which backend served it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use common::*;

fn hello_backends(n: usize) -> Vec<Backend> {
    (0..n).map(|i| Backend::hello(&format!("b{i}"))).collect()
}

fn proxy_args(backends: &[&Backend], extra: &[&str]) -> Vec<String> {
    let mut args = vec!["--listen".to_string(), "127.0.0.1:0".to_string()];
    for b in backends {
        args.push("--backend".into());
        args.push(b.arg());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Which backend each of the client IPs `ips` is served by (one connection each).
fn mapping(proxy: &Proxy, ips: &[IpAddr]) -> BTreeMap<IpAddr, String> {
    ips.iter().map(|&ip| (ip, served_by(proxy, ip))).collect()
}

fn client_ips(first: u8, n: u8) -> Vec<IpAddr> {
    (first..first + n).map(client_ip).collect()
}

#[test]
fn same_client_ip_reaches_same_backend_every_time() {
    let backends = hello_backends(4);
    let refs: Vec<&Backend> = backends.iter().collect();
    // Default hash key is src-ip.
    let proxy = Proxy::start(&proxy_args(&refs, &[]));
    let ips = client_ips(20, 20);
    let mut used = BTreeSet::new();
    for &ip in &ips {
        let first = served_by(&proxy, ip);
        for i in 1..8 {
            let again = served_by(&proxy, ip);
            assert_eq!(
                again, first,
                "client {ip}: connection {i} went to {again}, the first went to {first}"
            );
        }
        used.insert(first);
    }
    assert!(
        used.len() >= 2,
        "20 client IPs all went to {used:?}: the proxy is not hashing across 4 backends"
    );
}

#[test]
fn src_ip_port_spreads_one_client_ip_over_backends() {
    let backends = hello_backends(4);
    let refs: Vec<&Backend> = backends.iter().collect();
    let proxy = Proxy::start(&proxy_args(&refs, &["--hash-key", "src-ip-port"]));
    let src = client_ip(2);
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..40 {
        *counts.entry(served_by(&proxy, src)).or_default() += 1;
    }
    assert!(
        counts.len() >= 3,
        "40 connections from one IP with --hash-key src-ip-port used only {counts:?}"
    );
}

#[test]
fn weights_shift_the_share_of_flows() {
    let light = Backend::hello("light");
    let heavy = Backend::hello("heavy");
    let args = vec![
        "--listen".to_string(),
        "127.0.0.1:0".into(),
        "--backend".into(),
        format!("{},weight=1", light.arg()),
        "--backend".into(),
        format!("{},weight=4", heavy.arg()),
        "--hash-key".into(),
        "src-ip-port".into(),
    ];
    let proxy = Proxy::start(&args);
    let mut heavy_count = 0;
    const N: usize = 100;
    for _ in 0..N {
        if served_by(&proxy, client_ip(3)) == "heavy" {
            heavy_count += 1;
        }
    }
    // Expected about 80 of 100.
    assert!(
        heavy_count >= 60,
        "weight=4 backend got {heavy_count} of {N} flows, weight=1 got the rest"
    );
}

#[test]
fn backend_going_down_moves_only_its_clients_with_retries() {
    let mut backends = hello_backends(3);
    let refs: Vec<&Backend> = backends.iter().collect();
    let proxy = Proxy::start(&proxy_args(&refs, &["--retries", "2"]));
    let ips = client_ips(40, 30);
    let before = mapping(&proxy, &ips);

    // Take down the backend with the most clients, so the retry path is certainly used.
    let victim = (0..3)
        .max_by_key(|i| before.values().filter(|n| **n == format!("b{i}")).count())
        .unwrap();
    let victim_name = format!("b{victim}");
    backends[victim].stop();

    let after = mapping(&proxy, &ips);
    for ip in &ips {
        let (was, now) = (&before[ip], &after[ip]);
        if *was == victim_name {
            assert_ne!(now, &victim_name, "{ip} still served by stopped backend?");
        } else {
            assert_eq!(
                now, was,
                "{ip} moved from {was} to {now} although only {victim_name} went down"
            );
        }
    }
}

#[test]
fn backend_dead_at_startup_is_skipped_with_retries() {
    let mut backends = hello_backends(3);
    let refs: Vec<&Backend> = backends.iter().collect();
    let args = proxy_args(&refs, &["--retries", "1"]);
    let ips = client_ips(80, 30);
    let reference = {
        let proxy = Proxy::start(&args);
        mapping(&proxy, &ips)
    };
    backends[2].stop(); // b2's address now refuses connections
    let dead_clients = reference.values().filter(|n| *n == "b2").count();
    assert!(dead_clients > 0, "no client hashed to b2: {reference:?}");

    // A fresh proxy whose b2 has never been reachable.
    let proxy = Proxy::start(&args);
    let now = mapping(&proxy, &ips);
    for ip in &ips {
        if reference[ip] == "b2" {
            assert!(now[ip] == "b0" || now[ip] == "b1", "{ip} got {}", now[ip]);
        } else {
            assert_eq!(
                now[ip], reference[ip],
                "{ip} moved although its backend is up"
            );
        }
    }
}

#[test]
fn refused_backend_without_retries_closes_the_client() {
    let dead = dead_addr();
    let proxy = Proxy::start(&[
        "--listen",
        "127.0.0.1:0",
        "--backend",
        &dead.to_string(),
        "--retries",
        "0",
    ]);
    let mut client = connect(proxy.addr).unwrap();
    expect_closed(&mut client, CLOSE_TIMEOUT)
        .unwrap_or_else(|e| panic!("client of a refused backend: {e}\n{}", proxy.stderr_tail()));
}

#[test]
fn two_proxies_with_backends_in_different_order_agree() {
    let backends = hello_backends(4);
    let ips = client_ips(120, 24);
    let order_a: Vec<&Backend> = backends.iter().collect();
    let order_b: Vec<&Backend> = [2, 0, 3, 1].iter().map(|&i| &backends[i]).collect();
    let pa = Proxy::start(&proxy_args(&order_a, &["--hash-key", "src-ip"]));
    let pb = Proxy::start(&proxy_args(&order_b, &["--hash-key", "src-ip"]));
    let ma = mapping(&pa, &ips);
    let mb = mapping(&pb, &ips);
    assert_eq!(
        ma, mb,
        "same backends listed in another order map clients differently"
    );
    let used: BTreeSet<&String> = ma.values().collect();
    assert!(used.len() >= 2, "24 client IPs all went to {used:?}");
}

#[test]
fn two_proxies_with_same_flags_and_seed_map_clients_identically() {
    // Clients of both proxies connect concurrently; each proxy runs two workers, which must
    // agree with each other too.
    let backends = hello_backends(3);
    let refs: Vec<&Backend> = backends.iter().collect();
    let args = proxy_args(&refs, &["--hash-seed", "12345", "--workers", "2"]);
    let pa = Proxy::start(&args);
    let pb = Proxy::start(&args);
    let ips = client_ips(160, 16);
    let (ma, mb) = std::thread::scope(|s| {
        let a = s.spawn(|| mapping(&pa, &ips));
        let b = s.spawn(|| mapping(&pb, &ips));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(ma, mb, "two proxies with identical flags disagree");
}

#[test]
fn all_backends_refusing_closes_the_client_after_retries() {
    let dead: Vec<String> = (0..3).map(|_| dead_addr().to_string()).collect();
    let mut args = vec!["--listen", "127.0.0.1:0", "--retries", "2"];
    for d in &dead {
        args.push("--backend");
        args.push(d);
    }
    let proxy = Proxy::start(&args);
    for n in 0..5 {
        let mut client = connect_from(client_ip(230 + n), proxy.addr).unwrap();
        expect_closed(&mut client, CLOSE_TIMEOUT).unwrap_or_else(|e| {
            panic!(
                "client when every backend refuses: {e}\n{}",
                proxy.stderr_tail()
            )
        });
    }
}
