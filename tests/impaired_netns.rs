//! Relaying over a bad network: client, proxy and backends in separate network namespaces whose
//! links drop, delay, jitter, reorder and duplicate packets (see `common::impair`). Through the
//! proxy, at the same time:
//!
//! - bulk both ways: flows that send a few MiB to an echo backend while reading it back, then
//!   half-close and expect exactly those bytes and a clean EOF;
//! - bulk up: a few MiB to a sink backend, which answers with the length and XXH3 of what it got;
//! - bulk down: a few MiB from a stream backend, after the client half-closed first;
//! - request/response: many small messages of random size on persistent echo flows.
//!
//! Every byte is checked against its pattern stream, and every flow must end within
//! `FLOW_DEADLINE`. Afterwards each proxy must still serve a fresh flow, count every flow as
//! closed `done` (nothing reset, timed out or failed to connect), and have logged no warning,
//! error or panic. The bridge's own counters must show that it really dropped, duplicated and
//! held back packets, or the test would prove nothing.
//!
//! The impairment is seeded: `RINGWAY_IMPAIR_SEED=N` replays a run (the seed is printed, and
//! repeated in every failure message). Needs root and iproute2, like the other netns tests.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::admin::admin_addr;
use common::impair::{
    ImpairedNet, Impairment, Mode, NsBound, BACKEND_IP, CLIENT_IP, PROXY_BACK_IP, PROXY_FRONT_IP,
};
use common::*;

/// Each flow must have finished this long after it started.
const FLOW_DEADLINE: Duration = Duration::from_secs(60);
/// The flows run at once, so all of them must have finished by then; the test gives up on
/// the stragglers at this point (and fails).
const LOAD_DEADLINE: Duration = FLOW_DEADLINE;
/// Bound on the small flows that check the proxies still serve after the load. With the load,
/// set-up and the metrics wait, a failing run ends within ~95 s; a passing one takes ~15 s.
const FRESH_DEADLINE: Duration = Duration::from_secs(20);

/// Per direction of each link: a bad but usable path (a lossy Wi-Fi or a congested uplink).
const IMPAIRMENT: Impairment = Impairment {
    loss: 0.03,
    delay: Duration::from_millis(2),
    jitter: Duration::from_millis(1),
    reorder: 0.03,
    reorder_hold: Duration::from_millis(6),
    duplicate: 0.01,
};

const ECHO_FLOWS: u64 = 4;
const ECHO_BYTES: u64 = 2 << 20;
const UPLOAD_FLOWS: u64 = 3;
const UPLOAD_BYTES: u64 = 2 << 20;
const DOWNLOAD_FLOWS: u64 = 3;
const DOWNLOAD_BYTES: u64 = 2 << 20;
const RR_FLOWS: u64 = 6;
const RR_MESSAGES: u64 = 150;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Service {
    Echo,
    Sink,
    Stream,
}

/// What a flow does, and the key of its byte pattern.
#[derive(Clone, Copy, Debug)]
enum Work {
    /// Send `len` bytes to an echo backend while reading them back; half-close; expect EOF.
    EchoBulk { key: u64, len: u64 },
    /// Send `len` bytes to a sink, half-close, expect its length + digest line and EOF.
    Upload { key: u64, len: u64 },
    /// Ask a stream backend for `len` bytes (pattern key = `len`), half-closing first.
    Download { len: u64 },
    /// `msgs` messages of 1..=1024 bytes, each read back before the next; then half-close.
    Rr { key: u64, msgs: u64 },
}

impl Work {
    fn service(self) -> Service {
        match self {
            Work::EchoBulk { .. } | Work::Rr { .. } => Service::Echo,
            Work::Upload { .. } => Service::Sink,
            Work::Download { .. } => Service::Stream,
        }
    }
}

/// Connects from the client's address on the impaired link.
fn connect_client(addr: SocketAddr) -> Result<TcpStream, String> {
    let src: IpAddr = CLIENT_IP.parse().unwrap();
    connect_from(src, addr).map_err(|e| format!("connect to {addr}: {e}"))
}

fn run_work(addr: SocketAddr, work: Work) -> Result<u64, String> {
    let mut s = connect_client(addr)?;
    match work {
        Work::EchoBulk { key, len } => {
            let mut w = s.try_clone().map_err(|e| e.to_string())?;
            let writer = thread::Builder::new()
                .stack_size(SMALL_STACK)
                .spawn(move || {
                    write_pattern(&mut w, key, len)
                        .and_then(|()| w.shutdown(Shutdown::Write))
                        .map_err(|e| format!("write: {e}"))
                })
                .map_err(|e| e.to_string())?;
            let read = read_pattern_to_eof(&mut s, key, len);
            let written = writer.join().map_err(|_| "writer panicked".to_string())?;
            written?;
            read?;
            Ok(2 * len)
        }
        Work::Upload { key, len } => {
            write_pattern(&mut s, key, len).map_err(|e| format!("write: {e}"))?;
            s.shutdown(Shutdown::Write)
                .map_err(|e| format!("half-close: {e}"))?;
            let want = format!("{len} {:016x}", digest(&pattern_vec(key, len as usize)));
            let got = read_line(&mut s)?;
            if got != want {
                return Err(format!("the sink got {got:?}, expected {want:?}"));
            }
            let mut rest = Vec::new();
            match s.read_to_end(&mut rest) {
                Ok(0) => Ok(len),
                Ok(n) => Err(format!("{n} bytes after the sink's answer")),
                Err(e) => Err(format!("no clean end after the sink's answer: {e}")),
            }
        }
        Work::Download { len } => {
            s.write_all(&len.to_le_bytes())
                .and_then(|()| s.shutdown(Shutdown::Write))
                .map_err(|e| format!("asking for the stream: {e}"))?;
            read_pattern_to_eof(&mut s, len, len)?;
            Ok(len)
        }
        Work::Rr { key, msgs } => {
            let mut rng = Rng::new(key);
            let mut pos = 0u64;
            let mut back = vec![0u8; 1024];
            for i in 0..msgs {
                let size = rng.range(1, 1024) as usize;
                let msg: Vec<u8> = {
                    let mut v = Vec::with_capacity(size);
                    while v.len() < size {
                        v.extend_from_slice(pattern_slice(
                            key,
                            pos + v.len() as u64,
                            size - v.len(),
                        ));
                    }
                    v
                };
                s.write_all(&msg)
                    .map_err(|e| format!("message {i}: write: {e}"))?;
                s.read_exact(&mut back[..size])
                    .map_err(|e| format!("message {i} ({size} bytes at {pos}): read: {e}"))?;
                check_pattern(key, pos, &back[..size]).map_err(|at| {
                    format!("message {i}: wrong byte at offset {}", pos + at as u64)
                })?;
                pos += size as u64;
            }
            s.shutdown(Shutdown::Write)
                .map_err(|e| format!("half-close: {e}"))?;
            expect_closed(&mut s, FLOW_DEADLINE)
                .and_then(|(how, _)| match how {
                    Closed::Eof => Ok(()),
                    other => Err(format!("expected EOF after the last echo, got {other:?}")),
                })
                .map(|()| 2 * pos)
        }
    }
}

/// How long a flow took and the bytes it checked, or what went wrong.
type FlowResult = Result<(Duration, u64), String>;

/// Runs every piece of work at once (the caller's thread must be in the client namespace; the
/// flow threads inherit it). Returns, per work item, how long it took and what it moved, or
/// what went wrong; items still running after `bound` are reported as such.
fn run_all(
    targets: &[(Service, SocketAddr)],
    work: &[Work],
    bound: Duration,
) -> Vec<(Work, FlowResult)> {
    let (tx, rx) = mpsc::channel();
    for (i, &w) in work.iter().enumerate() {
        let addr = targets
            .iter()
            .find(|(service, _)| *service == w.service())
            .expect("a proxy for every service")
            .1;
        let tx = tx.clone();
        thread::Builder::new()
            .name(format!("flow-{i}"))
            .stack_size(256 * 1024)
            .spawn(move || {
                let started = Instant::now();
                let result = run_work(addr, w).map(|bytes| (started.elapsed(), bytes));
                let _ = tx.send((i, result));
            })
            .expect("spawn a flow thread");
    }
    drop(tx);
    let deadline = Instant::now() + bound;
    let mut results: Vec<Option<FlowResult>> = vec![None; work.len()];
    while results.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((i, result)) => results[i] = Some(result),
            Err(_) => break,
        }
    }
    work.iter()
        .zip(results)
        .map(|(&w, r)| {
            (
                w,
                r.unwrap_or_else(|| Err(format!("still running after {bound:?}"))),
            )
        })
        .collect()
}

/// `GET /metrics` (the caller's thread must be in the proxy's namespace).
fn scrape(admin: SocketAddr) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(5))
        .map_err(|e| format!("connect to the admin endpoint: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\n\r\n").map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    text.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .ok_or_else(|| "no end of headers".into())
}

/// Sum of the samples of metric `name` whose labels include `label` (e.g. `reason="done"`).
fn metric(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| {
            let (n, labels) = series.split_once('{').unwrap_or((series, ""));
            n == name && labels.contains(label)
        })
        .filter_map(|(_, v)| v.parse::<f64>().ok())
        .sum()
}

#[test]
fn flows_through_an_impaired_network_arrive_byte_exact_and_in_time() {
    let seed = std::env::var("RINGWAY_IMPAIR_SEED")
        .map(|s| s.parse().expect("RINGWAY_IMPAIR_SEED must be a u64"))
        .unwrap_or_else(|_| test_seed());
    let replay = format!("(impairment seed {seed}; replay with RINGWAY_IMPAIR_SEED={seed})");
    eprintln!("{replay}");
    let started = Instant::now();
    let net = ImpairedNet::new(IMPAIRMENT, seed);
    eprintln!("impairing with {:?}: {IMPAIRMENT:?}", net.mode);

    let backend_ip: IpAddr = BACKEND_IP.parse().unwrap();
    let backends = NsBound::new(
        &net.backend,
        net.backend.run(move || {
            [
                (Service::Echo, Backend::start_on(Kind::Echo, backend_ip)),
                (Service::Sink, Backend::start_on(Kind::Sink, backend_ip)),
                (Service::Stream, Backend::start_on(Kind::Stream, backend_ip)),
            ]
        }),
    );
    // One proxy per service, so each flow's backend is known. A generous connect timeout: a
    // connect whose SYNs are all lost is the network's fault, not the proxy's.
    let proxies: Vec<(Service, Proxy)> = backends
        .iter()
        .map(|(service, backend)| {
            let backend = backend.arg();
            let proxy = net.proxy.run(move || {
                Proxy::start(&[
                    "--listen",
                    &format!("{PROXY_FRONT_IP}:0"),
                    "--backend",
                    &backend,
                    "--source",
                    PROXY_BACK_IP,
                    "--connect-timeout",
                    "15s",
                    "--workers",
                    "2",
                    "--admin",
                    "127.0.0.1:0",
                ])
            });
            (*service, proxy)
        })
        .collect();
    let targets: Vec<(Service, SocketAddr)> = proxies.iter().map(|(s, p)| (*s, p.addr)).collect();

    let mut work = Vec::new();
    for i in 0..ECHO_FLOWS {
        work.push(Work::EchoBulk {
            key: seed ^ (0xE000 + i),
            len: ECHO_BYTES + i * 4099,
        });
    }
    for i in 0..UPLOAD_FLOWS {
        work.push(Work::Upload {
            key: seed ^ (0xA000 + i),
            len: UPLOAD_BYTES + i * 7919,
        });
    }
    for i in 0..DOWNLOAD_FLOWS {
        work.push(Work::Download {
            len: DOWNLOAD_BYTES + i * 6151,
        });
    }
    for i in 0..RR_FLOWS {
        work.push(Work::Rr {
            key: seed ^ (0xF000 + i),
            msgs: RR_MESSAGES,
        });
    }
    let load_targets = targets.clone();
    let load_work = work.clone();
    let results = net
        .client
        .run(move || run_all(&load_targets, &load_work, LOAD_DEADLINE));
    let load_time = started.elapsed();

    let stderr_tails = || {
        proxies
            .iter()
            .map(|(s, p)| format!("{s:?} proxy:\n{}", p.stderr_tail()))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let mut failures = Vec::new();
    let mut moved = 0u64;
    let mut slowest = Duration::ZERO;
    for (w, r) in &results {
        // Per-flow times, for `--nocapture` readers tuning the sizes or the impairment.
        if let Ok((took, _)) = r {
            eprintln!("  {took:>8.2?}  {w:?}");
        }
        match r {
            Ok((took, bytes)) if *took <= FLOW_DEADLINE => {
                moved += bytes;
                slowest = slowest.max(*took);
            }
            Ok((took, _)) => failures.push(format!("{w:?}: took {took:?} > {FLOW_DEADLINE:?}")),
            Err(e) => failures.push(format!("{w:?}: {e}")),
        }
    }
    eprintln!(
        "{} flows, {moved} bytes checked, slowest flow {slowest:?}, load done after {load_time:?}\n{}",
        results.len(),
        net.summary()
    );
    assert!(
        failures.is_empty(),
        "{} of {} flows failed over the impaired network {replay}:\n{}\n{}\n{}",
        failures.len(),
        results.len(),
        failures.join("\n"),
        net.summary(),
        stderr_tails()
    );

    // The impairment must really have happened, and on real frames.
    if net.mode == Mode::PacketBridge {
        for (link, stats) in ["client-proxy", "proxy-backend"]
            .iter()
            .zip(net.bridge_stats())
        {
            let g = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
            assert_eq!(
                g(&stats.oversized),
                0,
                "{link}: frames longer than the MTU crossed the bridge: an offload is still on \
                 ({})",
                stats.summary()
            );
            assert!(
                g(&stats.dropped) > 0 && g(&stats.duplicated) > 0 && g(&stats.held_back) > 0,
                "{link}: the bridge did not impair the traffic ({}) {replay}",
                stats.summary()
            );
        }
    }

    // Each proxy still serves a fresh flow over the same bad path.
    let fresh: Vec<Work> = vec![
        Work::EchoBulk {
            key: seed ^ 0xE0FF,
            len: 64 << 10,
        },
        Work::Upload {
            key: seed ^ 0xA0FF,
            len: 64 << 10,
        },
        Work::Download { len: 64 << 10 },
    ];
    let fresh_targets = targets.clone();
    let fresh_work = fresh.clone();
    let after = net
        .client
        .run(move || run_all(&fresh_targets, &fresh_work, FRESH_DEADLINE));
    let broken: Vec<String> = after
        .iter()
        .filter_map(|(w, r)| r.as_ref().err().map(|e| format!("{w:?}: {e}")))
        .collect();
    assert!(
        broken.is_empty(),
        "after the load, the proxies no longer serve {replay}:\n{}\n{}",
        broken.join("\n"),
        stderr_tails()
    );

    // Metrics: every flow closed `done` (the proxy may finish a flow a little after the client
    // saw its end, so wait for the count), nothing else, no failed connects.
    for (service, proxy) in &proxies {
        let flows = work
            .iter()
            .chain(&fresh)
            .filter(|w| w.service() == *service)
            .count() as f64;
        let admin = admin_addr(proxy);
        let text = net.proxy.run(move || {
            let mut text = String::new();
            wait_until(CLOSE_TIMEOUT, || {
                text = scrape(admin).unwrap_or_default();
                metric(&text, "ringway_flows_closed_total", "reason=\"done\"") >= flows
            });
            text
        });
        let closed = |reason: &str| {
            metric(
                &text,
                "ringway_flows_closed_total",
                &format!("reason=\"{reason}\""),
            )
        };
        let all_closed = metric(&text, "ringway_flows_closed_total", "");
        assert!(
            closed("done") == flows && all_closed == flows,
            "{service:?} proxy: {flows} flows, but closed_total done={} all={} {replay}\n{}\n{}",
            closed("done"),
            all_closed,
            text.lines()
                .filter(|l| l.starts_with("ringway_flows_closed_total"))
                .collect::<Vec<_>>()
                .join("\n"),
            proxy.stderr_tail()
        );
        let failed_connects = metric(&text, "ringway_connect_failures_total", "");
        assert_eq!(
            failed_connects,
            0.0,
            "{service:?} proxy: failed backend connects {replay}\n{}",
            proxy.stderr_tail()
        );
        let bad_lines: Vec<String> = proxy
            .stderr()
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR ") || l.contains("panicked"))
            .map(str::to_string)
            .collect();
        assert!(
            bad_lines.is_empty(),
            "{service:?} proxy logged trouble {replay}:\n{}",
            bad_lines.join("\n")
        );
    }
    // Stop the proxies and backends before their namespaces go.
    drop(proxies);
    drop(backends);
    eprintln!("done in {:?}", started.elapsed());
}
