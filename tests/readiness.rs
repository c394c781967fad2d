//! `GET /live`, `GET /ready` and `--drain-delay`: what the routing layer (a BGP health loop,
//! keepalived's `track_script`, a Kubernetes probe) reads to stop sending a host traffic before
//! the host stops taking it. The fleet tests with real routing daemons are in
//! tests/fleet_netns.rs; these check the endpoint and the signal sequence on loopback.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::admin::{admin_addr, http_get};
use common::*;

/// Long enough for any state change under a loaded CI machine.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(20);

fn start(backends: &[String], extra: &[&str]) -> (Proxy, SocketAddr) {
    let mut args = vec![
        "--listen".to_string(),
        "127.0.0.1:0".to_string(),
        "--admin".to_string(),
        "127.0.0.1:0".to_string(),
    ];
    for b in backends {
        args.push("--backend".into());
        args.push(b.clone());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let proxy = Proxy::start(&args);
    let admin = admin_addr(&proxy);
    wait_signal_handlers(&proxy);
    (proxy, admin)
}

/// Waits until `/ready` answers `status` and a body `body` accepts; returns the body, or
/// panics with the last answer.
fn wait_ready_answer(
    proxy: &Proxy,
    admin: SocketAddr,
    status: u16,
    body: impl Fn(&str) -> bool,
) -> String {
    let mut last = (0, String::new());
    let reached = wait_until(CHANGE_TIMEOUT, || {
        last = http_get(admin, "/ready");
        last.0 == status && body(&last.1)
    });
    assert!(
        reached,
        "/ready did not answer {status} within {CHANGE_TIMEOUT:?}; last: {last:?}\n{}",
        proxy.stderr_tail()
    );
    last.1
}

fn wait_ready_status(proxy: &Proxy, admin: SocketAddr, status: u16) -> String {
    wait_ready_answer(proxy, admin, status, |_| true)
}

fn served(proxy: &Proxy, n: u8) -> Result<String, String> {
    let mut s = connect_from(client_ip(n), proxy.addr).map_err(|e| format!("connect: {e}"))?;
    let name = read_line(&mut s)?;
    echo_roundtrip(&mut s, b"ping")?;
    Ok(name)
}

#[test]
fn live_and_ready_while_serving() {
    let backend = Backend::hello("b1");
    let (proxy, admin) = start(&[backend.arg()], &[]);
    assert_eq!(
        http_get(admin, "/live"),
        (200, "live: the process runs\n".into())
    );
    assert_eq!(
        http_get(admin, "/ready"),
        (200, "ready: accepting; 1 of 1 backends up\n".into()),
        "{}",
        proxy.stderr_tail()
    );
}

#[test]
fn not_ready_while_every_backend_is_down() {
    let mut up = Backend::hello("up");
    let down = dead_addr().to_string();
    let (proxy, admin) = start(
        &[up.arg(), down],
        &[
            "--health-interval",
            "100ms",
            "--health-timeout",
            "500ms",
            "--fall",
            "1",
            "--rise",
            "1",
        ],
    );
    // Both start up; the dead one goes down after its first failed check.
    wait_ready_answer(&proxy, admin, 200, |b| {
        b == "ready: accepting; 1 of 2 backends up\n"
    });
    up.stop();
    let body = wait_ready_status(&proxy, admin, 503);
    assert_eq!(body, "not ready: no backend is up (0 of 2)\n");
    // /live is about the process, not its backends.
    assert_eq!(http_get(admin, "/live").0, 200);
}

/// With `--drain-delay`, SIGTERM turns `/ready` to 503 at once while new clients are still
/// served; a second SIGTERM during the delay stops the process at once.
#[test]
fn drain_delay_keeps_accepting_after_ready_turns_503_and_a_second_sigterm_stops_at_once() {
    let backend = Backend::hello("b1");
    let (mut proxy, admin) = start(&[backend.arg()], &["--drain-delay", "1h"]);
    assert_eq!(http_get(admin, "/ready").0, 200);
    proxy.signal(libc::SIGTERM);
    let body = wait_ready_status(&proxy, admin, 503);
    assert!(body.starts_with("not ready: stopping"), "{body}");
    assert_eq!(http_get(admin, "/live").0, 200, "still live while leaving");
    // The listeners still accept: the route may not be withdrawn yet.
    for n in 10..20 {
        assert_eq!(
            served(&proxy, n).unwrap_or_else(|e| panic!(
                "client {n} after SIGTERM: {e}\n{}",
                proxy.stderr_tail()
            )),
            "b1"
        );
    }
    assert!(
        !proxy.stderr().contains("listeners closed"),
        "drained before the delay was over\n{}",
        proxy.stderr_tail()
    );
    proxy.signal(libc::SIGTERM);
    let status = proxy.wait_exit(CHANGE_TIMEOUT);
    assert!(
        status.is_some_and(|s| s.success()),
        "a second SIGTERM during --drain-delay should stop at once (status {status:?})\n{}",
        proxy.stderr_tail()
    );
}

/// After the delay the usual drain runs: listeners close, a flow opened during the delay
/// finishes, and the process exits 0.
#[test]
fn drain_delay_then_drain_lets_live_flows_finish() {
    let backend = Backend::hello("b1");
    let (mut proxy, admin) = start(
        &[backend.arg()],
        &["--drain-delay", "2s", "--shutdown-timeout", "60s"],
    );
    let mut before = connect_from(client_ip(2), proxy.addr).unwrap();
    assert_eq!(read_line(&mut before).unwrap(), "b1");
    proxy.signal(libc::SIGTERM);
    wait_ready_status(&proxy, admin, 503);
    let mut during = connect_from(client_ip(3), proxy.addr)
        .unwrap_or_else(|e| panic!("connect during --drain-delay: {e}\n{}", proxy.stderr_tail()));
    assert_eq!(read_line(&mut during).unwrap(), "b1");
    assert!(
        wait_until(CHANGE_TIMEOUT, || proxy
            .stderr()
            .contains("--drain-delay over: listeners closed")),
        "no drain after the delay\n{}",
        proxy.stderr_tail()
    );
    assert!(
        wait_until(CHANGE_TIMEOUT, || connect(proxy.addr).is_err()),
        "listeners still accept after the drain started\n{}",
        proxy.stderr_tail()
    );
    // Both live flows still relay bytes in both directions, then end; the process follows.
    echo_roundtrip(&mut before, b"still here").unwrap();
    echo_roundtrip(&mut during, b"me too").unwrap();
    drop(before);
    drop(during);
    let status = proxy.wait_exit(CHANGE_TIMEOUT);
    assert!(
        status.is_some_and(|s| s.success()),
        "status {status:?}\n{}",
        proxy.stderr_tail()
    );
}

#[test]
fn bad_drain_delay_is_a_one_line_error() {
    let out = run_to_exit(
        &[
            "--listen",
            "127.0.0.1:0",
            "--backend",
            "127.0.0.1:9",
            "--drain-delay",
            "soon",
        ],
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "{:?}", out.stderr);
    assert!(
        lines[0].contains("--drain-delay") && lines[0].contains("'soon' is not a duration"),
        "{:?}",
        lines[0]
    );
}
