//! `--source`: more flows to one backend than one local address can carry.
//!
//! The ephemeral port range is per network namespace, so each test makes its own namespace
//! (`ip netns add`, unique name from the pid and a counter; deleted on drop), brings up its
//! loopback and shrinks the range to 100 ports (40000-40099). A dedicated thread of the test
//! switches into the namespace with setns(2); everything it creates (the echo backend, the
//! client sockets) and every process it spawns (the proxy) lives there.
//!
//! With `--source 127.0.0.2 --source 127.0.0.3 --source 127.0.0.4`, 250 concurrent flows to a
//! single backend all work (three source addresses, ~100 ports each); without `--source` the
//! same 250 fail beyond ~100, which shows the limit the flag lifts is real. Running out of those
//! ports is this host's shortage: the backend stays up and serves again as soon as a port is
//! free.
//!
//! Needs root (CAP_SYS_ADMIN) and `ip` from iproute2, as CI has.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use common::netns::Netns;
use common::*;

/// Flows the tests open at once.
const FLOWS: usize = 250;

/// A network namespace of the test's own with a 100-port ephemeral range.
fn port_limited_netns() -> Netns {
    let ns = Netns::new("edge");
    ns.sysctl("net.ipv4.ip_local_port_range=40000 40099");
    ns
}

/// `ss` inside the namespace.
fn ss_in(ns: &Netns, args: &[&str]) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, "ss", "-H"])
        .args(args)
        .output()
        .expect("run ss in the namespace");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

/// What became of the flows: how many echoed, and how the others ended.
struct Outcome {
    served: usize,
    refused: usize,
    other: Vec<String>,
}

/// Opens `FLOWS` flows to `proxy` at once and keeps them open; each sends a line and expects
/// it back. Client sockets bind explicit ports below the ephemeral range, so the clients
/// themselves never compete with the proxy for ephemeral ports.
fn open_flows(proxy: &Proxy) -> (Outcome, Vec<TcpStream>) {
    let mut streams = Vec::with_capacity(FLOWS);
    for i in 0..FLOWS {
        let src = SocketAddr::new(client_ip(9), 30000 + i as u16);
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        socket.set_reuse_address(true).unwrap();
        socket.bind(&SockAddr::from(src)).unwrap();
        socket
            .connect_timeout(&SockAddr::from(proxy.addr), Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("flow {i}: connect to the proxy: {e}"));
        let mut s: TcpStream = socket.into();
        // The proxy may already have closed it: the outcome below tells.
        let _ = s.write_all(format!("flow {i:04}\n").as_bytes());
        streams.push(s);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut outcome = Outcome {
        served: 0,
        refused: 0,
        other: Vec::new(),
    };
    for (i, s) in streams.iter_mut().enumerate() {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(10));
        s.set_read_timeout(Some(left)).unwrap();
        let want = format!("flow {i:04}\n");
        let mut got = vec![0u8; want.len()];
        let mut n = 0;
        let end = loop {
            match s.read(&mut got[n..]) {
                Ok(0) => break Some(Closed::Eof),
                Ok(k) => {
                    n += k;
                    if n == got.len() {
                        break None;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Some(classify(&e)),
            }
        };
        match end {
            None if got == want.as_bytes() => outcome.served += 1,
            None => outcome
                .other
                .push(format!("flow {i}: got {:?}", String::from_utf8_lossy(&got))),
            Some(how) if how.is_closed() && n == 0 => outcome.refused += 1,
            Some(how) => outcome
                .other
                .push(format!("flow {i}: {how:?} after {n} bytes")),
        }
    }
    (outcome, streams)
}

/// Source addresses of the connections the backend on `port` accepted, seen with ss.
fn sources_seen(ns: &Netns, port: u16) -> BTreeSet<IpAddr> {
    ss_in(
        ns,
        &["-tn", "state", "established", &format!("sport = :{port}")],
    )
    .iter()
    .filter_map(|l| {
        let peer = l.split_whitespace().last()?;
        peer.parse::<SocketAddr>().ok().map(|a| a.ip())
    })
    .collect()
}

#[test]
fn source_addresses_carry_more_flows_to_one_backend_than_one_address_can() {
    let ns = port_limited_netns();
    let (outcome, sources, stderr) = ns.run(|| {
        let echo = Backend::echo();
        let proxy = Proxy::start(&[
            "--listen",
            "127.0.0.1:0",
            "--backend",
            &echo.arg(),
            "--source",
            "127.0.0.2",
            "--source",
            "127.0.0.3",
            "--source",
            "127.0.0.4",
            // An IPv6 source is skipped for an IPv4 backend.
            "--source",
            "::1",
        ]);
        let (outcome, streams) = open_flows(&proxy);
        let sources = sources_seen(&ns, echo.addr.port());
        let stderr = proxy.stderr_tail();
        drop(streams);
        (outcome, sources, stderr)
    });
    assert!(
        outcome.served == FLOWS && outcome.other.is_empty(),
        "with three --source addresses and a 100-port range, {} of {FLOWS} flows were served, \
         {} closed, others: {:?}\n{stderr}",
        outcome.served,
        outcome.refused,
        outcome.other
    );
    let expected: BTreeSet<IpAddr> = [2, 3, 4].into_iter().map(client_ip).collect();
    assert_eq!(
        sources, expected,
        "the backend's connections came from {sources:?}, expected every --source address"
    );
}

#[test]
fn without_source_one_address_runs_out_of_ports() {
    let ns = port_limited_netns();
    let (outcome, stderr) = ns.run(|| {
        let echo = Backend::echo();
        let proxy = Proxy::start(&["--listen", "127.0.0.1:0", "--backend", &echo.arg()]);
        let (outcome, streams) = open_flows(&proxy);
        let stderr = proxy.stderr_tail();
        drop(streams);
        (outcome, stderr)
    });
    // 100 ports, less the two that listeners in the namespace took from the range.
    assert!(
        (90..=100).contains(&outcome.served) && outcome.other.is_empty(),
        "without --source, {} of {FLOWS} flows were served (expected at most the 100 ports of \
         the range), {} closed, others: {:?}\n{stderr}",
        outcome.served,
        outcome.refused,
        outcome.other
    );
    assert_eq!(outcome.served + outcome.refused, FLOWS);
}

/// One flow from a client port below the ephemeral range: served (its line echoed) or why not.
fn one_flow(proxy: &Proxy, port: u16) -> Result<(), String> {
    let src = SocketAddr::new(client_ip(9), port);
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
    socket.set_reuse_address(true).unwrap();
    socket.bind(&SockAddr::from(src)).unwrap();
    socket
        .connect_timeout(&SockAddr::from(proxy.addr), Duration::from_secs(10))
        .map_err(|e| format!("connect: {e}"))?;
    let mut s: TcpStream = socket.into();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.write_all(b"one more\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut got = [0u8; 9];
    s.read_exact(&mut got).map_err(|e| format!("read: {e}"))?;
    let _ = s.shutdown(std::net::Shutdown::Write);
    Ok(())
}

/// `GET /metrics` from the admin endpoint at `admin`: the value of the unlabelled `name`.
fn metric(admin: SocketAddr, name: &str) -> Option<u64> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {admin}\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// With `--source` and a 100-port range, 250 flows to one backend run out of local ports
/// (EADDRNOTAVAIL at connect). That is not the backend's failure: it is not taken down (with
/// passive checks at their defaults, three would have done it), the shortage is counted, the
/// warning names the fix, and once a port is free again a new flow is served at once rather
/// than refused for `--fail-timeout`.
#[test]
fn running_out_of_local_ports_leaves_the_backend_up() {
    let ns = port_limited_netns();
    let (outcome, again, local_errors, stderr) = ns.run(|| {
        let echo = Backend::echo();
        let proxy = Proxy::start(&[
            "--listen",
            "127.0.0.1:0",
            "--backend",
            &echo.arg(),
            "--source",
            "127.0.0.2",
            "--admin",
            "127.0.0.1:0",
        ]);
        let admin: SocketAddr = proxy
            .stderr()
            .split("admin endpoint on http://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("no admin endpoint line\n{}", proxy.stderr_tail()));
        let (outcome, mut streams) = open_flows(&proxy);
        let local_errors = metric(admin, "ringway_connect_local_errors_total");
        // Free one local port: a client reset is passed on as a reset, which leaves no
        // TIME_WAIT behind on the proxy's side. Then a new flow must be served; until the
        // proxy has released the port its connect may still run short, so retry (bounded).
        let first_served = streams.remove(0);
        reset(first_served);
        let deadline = Instant::now() + Duration::from_secs(5);
        let again = loop {
            match one_flow(&proxy, 31000) {
                Ok(()) => break Ok(()),
                Err(_) if Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(50)) // pacing, not synchronisation
                }
                Err(e) => break Err(e),
            }
        };
        let stderr = proxy.stderr_tail();
        drop(streams);
        (outcome, again, local_errors, stderr)
    });
    assert!(
        outcome.refused > 0 && outcome.other.is_empty(),
        "250 flows with a 100-port range did not run out of ports: {} served, {} closed, \
         others: {:?}\n{stderr}",
        outcome.served,
        outcome.refused,
        outcome.other
    );
    assert!(
        !stderr.contains("is DOWN"),
        "running out of local ports took the backend down\n{stderr}"
    );
    assert!(
        local_errors.is_some_and(|n| n > 0),
        "ringway_connect_local_errors_total is {local_errors:?} after running out of ports\n{stderr}"
    );
    assert!(
        stderr.contains("--source") && stderr.contains("net.ipv4.ip_local_port_range"),
        "the warning does not name --source and net.ipv4.ip_local_port_range\n{stderr}"
    );
    if let Err(e) = again {
        panic!("with a local port free again, a new flow was not served: {e}\n{stderr}");
    }
}
