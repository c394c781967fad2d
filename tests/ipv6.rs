//! IPv6 listeners, backends and clients, alone and mixed with IPv4.

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown};
use std::thread;

use common::*;

const V6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);
const V4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Sends `len` bytes while reading them back (both directions at once), half-closes, and
/// expects exactly the same bytes and EOF.
fn echo_through(proxy: &Proxy, key: u64, len: u64) {
    let mut client = connect(proxy.addr).unwrap();
    let mut rd = client.try_clone().unwrap();
    let reader = thread::spawn(move || read_pattern_to_eof(&mut rd, key, len));
    write_pattern(&mut client, key, len).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    reader
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("echo of {len} bytes: {e}\n{}", proxy.stderr_tail()));
}

fn listen_arg(ip: IpAddr) -> &'static str {
    if ip.is_ipv6() {
        "[::1]:0"
    } else {
        "127.0.0.1:0"
    }
}

fn start(listen: IpAddr, backend: &Backend) -> Proxy {
    Proxy::start(&["--listen", listen_arg(listen), "--backend", &backend.arg()])
}

#[test]
fn ipv6_listener_and_ipv6_backend_relay_bytes() {
    let echo = Backend::start_on(Kind::Echo, V6);
    let proxy = start(V6, &echo);
    assert!(proxy.addr.is_ipv6(), "listening on {}", proxy.addr);
    assert_ne!(proxy.addr.port(), 0);
    echo_through(&proxy, 61, 3 << 20);
    echo_through(&proxy, 62, 0);
}

#[test]
fn ipv6_listener_with_ipv4_backend() {
    let echo = Backend::start_on(Kind::Echo, V4);
    let proxy = start(V6, &echo);
    echo_through(&proxy, 63, 1 << 20);
}

#[test]
fn ipv4_listener_with_ipv6_backend() {
    let echo = Backend::start_on(Kind::Echo, V6);
    let proxy = start(V4, &echo);
    echo_through(&proxy, 64, 1 << 20);
}

#[test]
fn ipv6_client_sticks_to_one_backend() {
    let backends: Vec<Backend> = (0..3)
        .map(|i| Backend::start_on(Kind::Hello(format!("v6-{i}")), V6))
        .collect();
    let mut args = vec!["--listen".to_string(), "[::1]:0".to_string()];
    for b in &backends {
        args.push("--backend".into());
        args.push(b.arg());
    }
    let proxy = Proxy::start(&args);
    let mut names = BTreeSet::new();
    for _ in 0..10 {
        let mut s = connect_from(V6, proxy.addr).unwrap();
        names.insert(
            read_line(&mut s)
                .unwrap_or_else(|e| panic!("greeting over IPv6: {e}\n{}", proxy.stderr_tail())),
        );
        echo_roundtrip(&mut s, b"v6").unwrap();
    }
    assert_eq!(
        names.len(),
        1,
        "one IPv6 client IP was served by several backends: {names:?}"
    );
}
