//! The split of long-lived flows between workers (`worker/handoff.rs`): however the kernel's
//! SO_REUSEPORT hash spreads connections, the flows end up within 10% of even, every handed-off
//! flow relays byte-exact, and a drain lets them finish.
//!
//! To take chance out of it, the client first finds source ports the kernel sends to worker 0
//! (one probe connection per port, seen in `ringway_flows_accepted_total{worker}`, then reset),
//! and opens every long-lived connection from those ports: left to the hash, all of them land
//! on worker 0.
//!
//! Every wait is for an observable condition with a deadline.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use common::admin::{admin_addr, http_get, metric, parse_metrics, Sample};
use common::*;

const FLOWS: usize = 32;
const SHOW_TIMEOUT: Duration = Duration::from_secs(10);

fn scrape(admin: SocketAddr) -> Vec<Sample> {
    parse_metrics(&http_get(admin, "/metrics").1)
}

fn per_worker(samples: &[Sample], name: &str) -> [f64; 2] {
    [0, 1].map(|w| metric(samples, name, &[("worker", &w.to_string())]))
}

/// Connects to `to` from `from`; `None` if that source port is taken.
fn connect_from_port(from: SocketAddr, to: SocketAddr) -> Option<TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
    socket.set_reuse_address(true).unwrap();
    socket.bind(&SockAddr::from(from)).ok()?;
    socket
        .connect_timeout(&SockAddr::from(to), Duration::from_secs(10))
        .ok()?;
    let stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    Some(stream)
}

/// Writes `len` bytes of stream `key` in chunks and checks each chunk's echo.
fn echo_exact(s: &mut TcpStream, key: u64, len: u64) -> Result<(), String> {
    let mut buf = vec![0u8; 16 * 1024];
    let mut pos = 0;
    while pos < len {
        let chunk = pattern_slice(key, pos, (len - pos).min(16 * 1024) as usize);
        s.write_all(chunk).map_err(|e| format!("write: {e}"))?;
        s.read_exact(&mut buf[..chunk.len()])
            .map_err(|e| format!("read after {pos}: {e}"))?;
        check_pattern(key, pos, &buf[..chunk.len()])
            .map_err(|i| format!("wrong byte at {}", pos + i as u64))?;
        pos += chunk.len() as u64;
    }
    Ok(())
}

/// Source addresses (on `ip`) whose connections the kernel hands to worker 0's listener.
fn ports_the_kernel_sends_to_worker_0(
    proxy: &Proxy,
    admin: SocketAddr,
    ip: IpAddr,
    seed: u64,
) -> Vec<SocketAddr> {
    let mut rng = Rng::new(seed);
    let mut found = Vec::new();
    let mut accepted = 0.0;
    let mut on_0_before = 0.0;
    let first = rng.range(20_000, 28_000) as u16;
    for port in first..first + 2_000 {
        if found.len() == FLOWS {
            break;
        }
        let from = SocketAddr::new(ip, port);
        let Some(probe) = connect_from_port(from, proxy.addr) else {
            continue;
        };
        let mut samples = Vec::new();
        let seen = wait_until(SHOW_TIMEOUT, || {
            samples = scrape(admin);
            metric(&samples, "ringway_flows_accepted_total", &[]) > accepted
        });
        assert!(
            seen,
            "probe from {from} never accepted\n{}",
            proxy.stderr_tail()
        );
        let before = accepted;
        accepted = metric(&samples, "ringway_flows_accepted_total", &[]);
        assert_eq!(accepted, before + 1.0, "one probe at a time");
        let on_0 = per_worker(&samples, "ringway_flows_accepted_total")[0];
        reset(probe);
        // Gone before the next probe, so no probe is ever passed on: each lands where the
        // kernel put it.
        assert!(
            wait_until(SHOW_TIMEOUT, || metric(
                &scrape(admin),
                "ringway_flows_active",
                &[]
            ) == 0.0),
            "probe from {from} still open\n{}",
            proxy.stderr_tail()
        );
        if on_0 > on_0_before {
            found.push(from);
        }
        on_0_before = on_0;
    }
    assert_eq!(
        found.len(),
        FLOWS,
        "not enough source ports land on worker 0"
    );
    found
}

#[test]
fn long_lived_flows_that_all_hash_to_one_worker_are_split_within_10_percent_and_relay_exactly() {
    let seed = test_seed();
    let backend = Backend::echo();
    let dir = TempDir::new("worker-balance");
    let log = dir.path().join("access.log");
    let mut proxy = Proxy::start(&[
        "--access-log",
        log.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--backend",
        &backend.arg(),
        "--admin",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--shutdown-timeout",
        "30s",
    ]);
    let admin = admin_addr(&proxy);
    // A client address of our own, so source ports cannot collide with other tests' clients.
    let ip = client_ip(100 + (seed % 150) as u8);
    let sources = ports_the_kernel_sends_to_worker_0(&proxy, admin, ip, seed);
    let accepted_before = per_worker(&scrape(admin), "ringway_flows_accepted_total");

    let mut flows = Vec::with_capacity(FLOWS);
    for (i, from) in sources.iter().enumerate() {
        let mut s = connect_from_port(*from, proxy.addr)
            .unwrap_or_else(|| panic!("connect from {from}\n{}", proxy.stderr_tail()));
        echo_exact(&mut s, seed ^ i as u64, 64 * 1024)
            .unwrap_or_else(|e| panic!("flow {i} from {from}: {e} (seed {seed})"));
        flows.push(s);
    }

    let mut samples = Vec::new();
    let all_open = wait_until(SHOW_TIMEOUT, || {
        samples = scrape(admin);
        metric(&samples, "ringway_flows_active", &[]) == FLOWS as f64
    });
    assert!(all_open, "{FLOWS} flows open\n{}", proxy.stderr_tail());
    let active = per_worker(&samples, "ringway_flows_active");
    let accepted = per_worker(&samples, "ringway_flows_accepted_total");
    let started = [0, 1].map(|w| accepted[w] - accepted_before[w]);
    let handed_off = per_worker(&samples, "ringway_flows_handed_off_total");
    let even = FLOWS as f64 / 2.0;
    for w in 0..2 {
        assert!(
            (active[w] - even).abs() <= 0.1 * even,
            "open flows per worker {active:?} (started {started:?}, handed off {handed_off:?}): \
             not within 10% of {even}"
        );
        assert_eq!(active[w], started[w], "every flow started where it is open");
    }
    assert_eq!(
        handed_off[0], started[1],
        "worker 1's flows all came from worker 0, each handed off once"
    );

    // Every flow relays byte-exact at once, wherever it runs.
    std::thread::scope(|scope| {
        for (i, s) in flows.iter_mut().enumerate() {
            scope.spawn(move || {
                echo_exact(s, seed.wrapping_add(1000 + i as u64), 1 << 20)
                    .unwrap_or_else(|e| panic!("flow {i}: {e} (seed {seed})"));
            });
        }
    });

    // A drain lets the flows of both workers finish: they still relay, then the proxy exits
    // once the clients close.
    proxy.signal(libc::SIGTERM);
    assert!(
        wait_until(SHOW_TIMEOUT, || proxy
            .stderr()
            .contains("listeners closed, letting live flows finish")),
        "drain started\n{}",
        proxy.stderr_tail()
    );
    for (i, s) in flows.iter_mut().enumerate() {
        echo_exact(s, seed.wrapping_add(2000 + i as u64), 64 * 1024)
            .unwrap_or_else(|e| panic!("flow {i} while draining: {e} (seed {seed})"));
    }
    drop(flows);
    let status = proxy
        .wait_exit(SHOW_TIMEOUT)
        .unwrap_or_else(|| panic!("no exit after the drain\n{}", proxy.stderr_tail()));
    assert!(status.success(), "{status}\n{}", proxy.stderr_tail());

    // Each flow, wherever it ran, has its access-log line with its client and every byte.
    let text = std::fs::read_to_string(&log).unwrap();
    let bytes = 64 * 1024 + (1 << 20) + 64 * 1024;
    let whole = format!("\"bytes_client_to_backend\":{bytes},\"bytes_backend_to_client\":{bytes},");
    for from in &sources {
        let client = format!("\"client\":\"{from}\"");
        let lines = text
            .lines()
            .filter(|l| l.contains(&client) && l.contains(&whole))
            .count();
        assert_eq!(
            lines, 1,
            "access-log lines for the flow from {from}:\n{text}"
        );
    }
}
