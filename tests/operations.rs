//! Operating Ringway: the admin endpoint's numbers against the traffic that made them, the
//! access log, backend changes while flows are live (backends file reloaded on SIGHUP or on
//! change, a bad file, `--drain-timeout`, DNS discovery against a real dnsmasq) and the drain
//! on SIGTERM (`--shutdown-timeout`, a second signal).
//!
//! Every wait is for an observable condition (a log line, a counter, a closed socket) with a
//! deadline; time bounds are generous and only check that things happen, and not early.

mod common;

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::admin::{admin_addr, http_get, metric, parse_metrics};
use common::dnsmasq::Dnsmasq;
use common::*;

/// How long a reload, a DNS change or a log line may take to show.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Helpers: logs, files, the admin endpoint
// ---------------------------------------------------------------------------------------------

/// The proxy's stderr, one entry a line.
fn log_lines(proxy: &Proxy) -> Vec<String> {
    proxy.stderr().lines().map(str::to_string).collect()
}

/// Waits for a stderr line at index `from` or later that satisfies `pred`; returns it.
fn wait_for_line(
    proxy: &Proxy,
    from: usize,
    timeout: Duration,
    pred: impl Fn(&str) -> bool,
) -> Option<String> {
    let mut found = None;
    wait_until(timeout, || {
        found = log_lines(proxy).into_iter().skip(from).find(|l| pred(l));
        found.is_some()
    });
    found
}

/// Like `wait_for_line`, but panics with the proxy's stderr at the deadline.
fn expect_line(proxy: &Proxy, from: usize, what: &str, pred: impl Fn(&str) -> bool) -> String {
    wait_for_line(proxy, from, CHANGE_TIMEOUT, pred).unwrap_or_else(|| {
        panic!(
            "no log line {what} within {CHANGE_TIMEOUT:?}{}\n{}",
            if has_exited(proxy) {
                " (the proxy process has exited)"
            } else {
                ""
            },
            proxy.stderr_tail()
        )
    })
}

/// Whether the proxy process is gone (a zombie not reaped yet, or reaped).
fn has_exited(proxy: &Proxy) -> bool {
    match fs::read_to_string(format!("/proc/{}/stat", proxy.pid())) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with(['Z', 'X'])),
        Err(_) => true,
    }
}

/// The raw value of `key` in a flat JSON object: a string's contents (no escapes expected), or
/// a number, `true`, `false` or `null` as written.
fn json_field<'a>(object: &'a str, key: &str) -> Option<&'a str> {
    let pattern = format!("\"{key}\":");
    let rest = &object[object.find(&pattern)? + pattern.len()..];
    if let Some(string) = rest.strip_prefix('"') {
        return Some(&string[..string.find('"')?]);
    }
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    Some(rest[..end].trim())
}

// ---------------------------------------------------------------------------------------------
// Helpers: flows
// ---------------------------------------------------------------------------------------------

/// One flow through a `Sink` backend from `src`: sends `len` bytes of stream `key`, half-closes,
/// checks the backend's `<len> <digest>` reply and the end after it. Returns the client's
/// address and the bytes it received.
fn sink_flow(proxy: &Proxy, src: IpAddr, key: u64, len: u64) -> (SocketAddr, u64) {
    let fail =
        |what: String| -> ! { panic!("flow {key} from {src}: {what}\n{}", proxy.stderr_tail()) };
    let mut s = connect_from(src, proxy.addr).unwrap_or_else(|e| fail(format!("connect: {e}")));
    let client = s.local_addr().unwrap();
    write_pattern(&mut s, key, len).unwrap_or_else(|e| fail(format!("write: {e}")));
    s.shutdown(Shutdown::Write).unwrap();
    let reply = read_line(&mut s).unwrap_or_else(|e| fail(format!("reply: {e}")));
    let expected = format!("{len} {:016x}", digest(&pattern_vec(key, len as usize)));
    if reply != expected {
        fail(format!("backend got {reply:?}, sent {expected:?}"));
    }
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(0) => {}
        other => fail(format!("after the reply: {other:?}")),
    }
    (client, reply.len() as u64 + 1)
}

/// A long-lived flow through a `Hello` backend: a thread keeps sending stream `key` in chunks
/// and checks every echoed byte, until `finish`.
struct LiveFlow {
    backend: String,
    src: IpAddr,
    rounds: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<u64, String>>>,
}

impl LiveFlow {
    /// Connects from `src`; `None` if the greeting names a backend `keep` does not want (the
    /// connection is then closed).
    fn open(proxy: &Proxy, src: IpAddr, key: u64, keep: impl Fn(&str) -> bool) -> Option<LiveFlow> {
        let mut s = connect_from(src, proxy.addr)
            .unwrap_or_else(|e| panic!("connect from {src}: {e}\n{}", proxy.stderr_tail()));
        let backend = read_line(&mut s)
            .unwrap_or_else(|e| panic!("greeting for {src}: {e}\n{}", proxy.stderr_tail()));
        if !keep(&backend) {
            return None;
        }
        let rounds = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (rounds, stop) = (rounds.clone(), stop.clone());
            thread::Builder::new()
                .name(format!("live-{src}"))
                .stack_size(SMALL_STACK)
                .spawn(move || live_loop(s, key, &rounds, &stop))
                .unwrap()
        };
        Some(LiveFlow {
            backend,
            src,
            rounds,
            stop,
            thread: Some(thread),
        })
    }

    fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::SeqCst)
    }

    /// Stops sending, half-closes and reads the echo to its end: the bytes echoed, all checked.
    fn finish(mut self) -> Result<u64, String> {
        self.stop.store(true, Ordering::SeqCst);
        let result = self.thread.take().unwrap().join();
        result.unwrap_or_else(|_| Err("the flow thread panicked".into()))
    }
}

impl Drop for LiveFlow {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn live_loop(
    mut s: TcpStream,
    key: u64,
    rounds: &AtomicU64,
    stop: &AtomicBool,
) -> Result<u64, String> {
    let mut pos = 0u64;
    let mut buf = vec![0u8; 16 * 1024];
    while !stop.load(Ordering::SeqCst) {
        let chunk = pattern_slice(key, pos, 512 + (pos % 9000) as usize);
        s.write_all(chunk)
            .map_err(|e| format!("write after {pos} bytes: {e}"))?;
        let n = chunk.len();
        s.read_exact(&mut buf[..n])
            .map_err(|e| format!("reading the echo after {pos} bytes: {e}"))?;
        check_pattern(key, pos, &buf[..n])
            .map_err(|i| format!("wrong byte at offset {}", pos + i as u64))?;
        pos += n as u64;
        rounds.fetch_add(1, Ordering::SeqCst);
        // Pacing, so that a few live flows do not take every CPU from the other tests.
        thread::sleep(Duration::from_millis(1));
    }
    s.shutdown(Shutdown::Write)
        .map_err(|e| format!("half-close after {pos} bytes: {e}"))?;
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(0) => Ok(pos),
        Ok(n) => Err(format!("{n} bytes after the echo of {pos} bytes")),
        Err(e) => Err(format!("no clean end after {pos} bytes: {e}")),
    }
}

/// Opens live flows from successive client addresses (starting at 127.0.0.`first_ip`) until
/// each backend of `wanted` carries its count of them.
fn open_live_flows(proxy: &Proxy, wanted: &[(&str, usize)], first_ip: u8) -> Vec<LiveFlow> {
    let mut flows: Vec<LiveFlow> = Vec::new();
    let count = |flows: &[LiveFlow], name: &str| flows.iter().filter(|f| f.backend == name).count();
    for n in first_ip..=250 {
        if wanted
            .iter()
            .all(|(name, want)| count(&flows, name) >= *want)
        {
            return flows;
        }
        let keep = |name: &str| {
            wanted
                .iter()
                .any(|(w, want)| *w == name && count(&flows, name) < *want)
        };
        if let Some(flow) = LiveFlow::open(proxy, client_ip(n), 1000 + u64::from(n), keep) {
            flows.push(flow);
        }
    }
    panic!(
        "could not place live flows {wanted:?} with client addresses {first_ip}..250\n{}",
        proxy.stderr_tail()
    );
}

/// Waits until every flow has made `more` rounds beyond `marks` (its rounds at some earlier
/// point): the flows carried traffic after that point.
fn wait_progress(proxy: &Proxy, flows: &[LiveFlow], marks: &[u64], more: u64) {
    let ok = wait_until(Duration::from_secs(20), || {
        flows.iter().zip(marks).all(|(f, m)| f.rounds() >= m + more)
    });
    assert!(
        ok,
        "live flows stopped making progress: {:?} rounds, marks {marks:?}\n{}",
        flows
            .iter()
            .map(|f| (f.src, f.rounds()))
            .collect::<Vec<_>>(),
        proxy.stderr_tail()
    );
}

fn marks(flows: &[LiveFlow]) -> Vec<u64> {
    flows.iter().map(LiveFlow::rounds).collect()
}

/// Finishes every flow and checks that each carried its bytes intact to a clean end.
fn finish_all(proxy: &Proxy, flows: Vec<LiveFlow>) {
    for flow in flows {
        let (src, backend) = (flow.src, flow.backend.clone());
        match flow.finish() {
            Ok(bytes) => assert!(bytes > 0, "flow from {src} on {backend} carried nothing"),
            Err(e) => panic!(
                "live flow from {src} on {backend}: {e}\n{}",
                proxy.stderr_tail()
            ),
        }
    }
}

/// The backend names new flows from `ips` reach.
fn new_flows(proxy: &Proxy, ips: impl Iterator<Item = u8>) -> Vec<String> {
    ips.map(|n| served_by(proxy, client_ip(n))).collect()
}

/// The `N.N` in a `...; N.N% of keys moved` log line.
fn moved_percent(line: &str) -> f64 {
    let before = line
        .split("% of keys moved")
        .next()
        .filter(|_| line.contains("% of keys moved"))
        .unwrap_or_else(|| panic!("no moved-keys figure in {line:?}"));
    let number = before.rsplit(' ').next().unwrap_or_default();
    number
        .parse()
        .unwrap_or_else(|_| panic!("moved-keys figure {number:?} in {line:?}"))
}

// ---------------------------------------------------------------------------------------------
// Metrics and the access log
// ---------------------------------------------------------------------------------------------

#[test]
fn metrics_and_backends_endpoint_match_the_traffic() {
    let a = Backend::start(Kind::Sink);
    let b = Backend::start(Kind::Sink);
    let proxy = Proxy::start(&[
        "--listen",
        "127.0.0.1:0",
        "--backend",
        &a.arg(),
        "--backend",
        &b.arg(),
        "--admin",
        "127.0.0.1:0",
        "--workers",
        "2",
    ]);
    let admin = admin_addr(&proxy);

    const N: u64 = 24;
    let (mut up, mut down) = (0u64, 0u64);
    for i in 0..N {
        let len = 1000 + i * 3001;
        let (_, received) = sink_flow(&proxy, client_ip(10 + i as u8), i, len);
        up += len;
        down += received;
    }

    // A client sees the end of its flow a moment before the proxy releases it.
    let mut samples = Vec::new();
    let settled = wait_until(CHANGE_TIMEOUT, || {
        samples = parse_metrics(&http_get(admin, "/metrics").1);
        metric(
            &samples,
            "ringway_flows_closed_total",
            &[("reason", "done")],
        ) == N as f64
    });
    assert!(
        settled,
        "flows_closed_total{{reason=\"done\"}} never reached {N}: {samples:?}\n{}",
        proxy.stderr_tail()
    );
    let m = |name: &str, labels: &[(&str, &str)]| metric(&samples, name, labels);
    let workers = samples
        .iter()
        .filter(|s| s.name == "ringway_flows_accepted_total")
        .count();
    assert_eq!(workers, 2, "one flows_accepted_total sample per worker");
    assert_eq!(m("ringway_flows_accepted_total", &[]), N as f64);
    assert_eq!(m("ringway_flows_active", &[]), 0.0);
    assert_eq!(
        m("ringway_flows_closed_total", &[]),
        N as f64,
        "every flow closed as done, none for another reason"
    );
    assert_eq!(
        m("ringway_bytes_total", &[("direction", "client_to_backend")]),
        up as f64
    );
    assert_eq!(
        m("ringway_bytes_total", &[("direction", "backend_to_client")]),
        down as f64
    );
    assert_eq!(m("ringway_connect_failures_total", &[]), 0.0);
    assert_eq!(m("ringway_connect_duration_seconds_count", &[]), N as f64);

    let mut per_backend = 0.0;
    for backend in [&a, &b] {
        let name = backend.arg();
        let flows = m("ringway_backend_flows_total", &[("backend", &name)]);
        assert_eq!(
            flows,
            backend.accepted() as f64,
            "backend_flows_total of {name} against the connections it accepted"
        );
        assert!(
            flows > 0.0,
            "{N} client addresses all hashed to one backend"
        );
        per_backend += flows;
        assert_eq!(
            m(
                "ringway_backend_up",
                &[("backend", &name), ("backup", "false")]
            ),
            1.0
        );
        assert_eq!(
            m("ringway_backend_flows_active", &[("backend", &name)]),
            0.0
        );
    }
    assert_eq!(
        per_backend, N as f64,
        "backend_flows_total summed over backends"
    );
    assert_eq!(
        m(
            "ringway_backend_bytes_total",
            &[("direction", "client_to_backend")]
        ),
        up as f64
    );
    assert_eq!(
        m(
            "ringway_backend_bytes_total",
            &[("direction", "backend_to_client")]
        ),
        down as f64
    );

    let (status, body) = http_get(admin, "/backends");
    assert_eq!(status, 200, "{body}");
    let objects: Vec<&str> = body
        .trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .split("},{")
        .collect();
    assert_eq!(objects.len(), 2, "{body}");
    for backend in [&a, &b] {
        let name = backend.arg();
        let object = objects
            .iter()
            .find(|o| json_field(o, "name") == Some(name.as_str()))
            .unwrap_or_else(|| panic!("{name} missing from /backends: {body}"));
        assert_eq!(json_field(object, "healthy"), Some("true"), "{object}");
        assert_eq!(
            json_field(object, "address"),
            Some(name.as_str()),
            "{object}"
        );
        assert_eq!(json_field(object, "active"), Some("0"), "{object}");
        assert_eq!(
            json_field(object, "total"),
            Some(backend.accepted().to_string().as_str()),
            "{object}"
        );
    }
    assert_eq!(http_get(admin, "/nothing-here").0, 404);
}

/// The metric families docs/operations.md documents: (name, type) from each row of the table
/// in "Metrics and the admin endpoint" whose first cell is a backticked `ringway_` name.
fn documented_metric_families() -> Vec<(String, String)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md");
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let section = text
        .split("\n## ")
        .find(|s| s.starts_with("Metrics and the admin endpoint"))
        .unwrap_or_else(|| panic!("{path}: no section \"Metrics and the admin endpoint\""));
    section
        .lines()
        .filter(|line| line.starts_with("| `ringway_"))
        .map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let name = cells[1].trim_matches('`');
            assert!(
                !name.contains(['`', ' ', ',']),
                "{path}: one metric name per row, got {:?}",
                cells[1]
            );
            let kind = cells[2].split([',', ' ']).next().unwrap_or_default();
            (name.to_string(), kind.to_string())
        })
        .collect()
}

#[test]
fn every_exported_metric_family_is_documented_and_every_documented_one_exported() {
    let dir = TempDir::new("metric-names");
    let backend = Backend::start(Kind::Sink);
    // Every optional family on: the admin endpoint, the access log, health checks.
    let proxy = Proxy::start(&[
        "--listen",
        "127.0.0.1:0",
        "--backend",
        &backend.arg(),
        "--admin",
        "127.0.0.1:0",
        "--access-log",
        dir.path().join("access.log").to_str().unwrap(),
        "--health-interval",
        "200ms",
    ]);
    let (status, body) = http_get(admin_addr(&proxy), "/metrics");
    assert_eq!(status, 200, "{body}");
    let exported: Vec<(String, String)> = body
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .map(|rest| {
            let (name, kind) = rest
                .split_once(' ')
                .unwrap_or_else(|| panic!("bad TYPE line {rest:?}"));
            (name.to_string(), kind.to_string())
        })
        .collect();
    let documented = documented_metric_families();

    let mut problems = Vec::new();
    for (list, name) in [(&exported, "exported"), (&documented, "documented")] {
        let mut names: Vec<&str> = list.iter().map(|(n, _)| n.as_str()).collect();
        names.sort();
        if let Some(twice) = names.windows(2).find(|w| w[0] == w[1]) {
            problems.push(format!("{} is {name} twice", twice[0]));
        }
    }
    for (name, kind) in &exported {
        match documented.iter().find(|(d, _)| d == name) {
            None => problems.push(format!("{name} ({kind}) is exported but not documented")),
            Some((_, doc_kind)) if doc_kind != kind => problems.push(format!(
                "{name} is exported as a {kind} but documented as a {doc_kind}"
            )),
            Some(_) => {}
        }
    }
    for (name, _) in &documented {
        if !exported.iter().any(|(e, _)| e == name) {
            problems.push(format!("{name} is documented but not exported"));
        }
    }
    assert!(
        problems.is_empty(),
        "docs/operations.md and /metrics disagree:\n{}\n--- /metrics ---\n{body}",
        problems.join("\n")
    );
    // The table cannot be vacuously equal to an empty scrape.
    assert!(exported.len() >= 15, "{body}");
}

/// Waits until the file at `path` holds at least `n` complete lines; returns them all.
fn wait_for_file_lines(path: &Path, n: usize, proxy: &Proxy) -> Vec<String> {
    let mut lines = Vec::new();
    let ok = wait_until(CHANGE_TIMEOUT, || {
        let text = fs::read_to_string(path).unwrap_or_default();
        // Only complete lines: the writer may be in the middle of one.
        lines = text
            .split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .map(|l| l.trim_end().to_string())
            .collect();
        lines.len() >= n
    });
    assert!(
        ok,
        "access log has {} lines, expected {n}: {lines:#?}\n{}",
        lines.len(),
        proxy.stderr_tail()
    );
    lines
}

#[test]
fn access_log_has_one_line_per_flow_with_its_bytes() {
    let dir = TempDir::new("access-log");
    let path = dir.path().join("access.log");
    let backend = Backend::start(Kind::Sink);
    let proxy = Proxy::start(&[
        "--listen",
        "127.0.0.1:0",
        "--backend",
        &backend.arg(),
        "--access-log",
        path.to_str().unwrap(),
    ]);

    const N: u64 = 12;
    let mut expected: HashMap<SocketAddr, (u64, u64)> = HashMap::new();
    for i in 0..N {
        let len = 100 + i * 7919;
        let (client, received) = sink_flow(&proxy, client_ip(20 + i as u8), 50 + i, len);
        expected.insert(client, (len, received));
    }

    let lines = wait_for_file_lines(&path, N as usize, &proxy);
    assert_eq!(lines.len(), N as usize, "{lines:#?}");
    for line in &lines {
        assert!(line.starts_with('{') && line.ends_with('}'), "{line}");
        let client: SocketAddr = json_field(line, "client")
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no client address in {line}"));
        let (up, down) = expected
            .remove(&client)
            .unwrap_or_else(|| panic!("a line for an unknown or repeated client: {line}"));
        let field =
            |key: &str| json_field(line, key).unwrap_or_else(|| panic!("no {key} in {line}"));
        assert_eq!(field("bytes_client_to_backend"), up.to_string(), "{line}");
        assert_eq!(field("bytes_backend_to_client"), down.to_string(), "{line}");
        assert_eq!(field("reason"), "done", "{line}");
        assert_eq!(field("backend"), backend.arg(), "{line}");
        assert_eq!(field("listener"), proxy.addr.to_string(), "{line}");
        assert_ne!(field("connect_ms"), "null", "{line}");
        assert!(field("duration_ms").parse::<f64>().is_ok(), "{line}");
        let start = field("start");
        assert!(
            start.len() == 24 && start.ends_with('Z') && start.as_bytes()[10] == b'T',
            "{line}"
        );
    }
    assert!(expected.is_empty(), "flows without a line: {expected:?}");
}

#[test]
fn access_log_records_a_flow_no_backend_took() {
    let dir = TempDir::new("access-log-refused");
    let path = dir.path().join("access.log");
    let proxy = Proxy::start(&[
        "--listen",
        "127.0.0.1:0",
        "--backend",
        &dead_addr().to_string(),
        "--retries",
        "0",
        "--access-log",
        path.to_str().unwrap(),
    ]);
    let mut s = connect(proxy.addr).unwrap();
    let client = s.local_addr().unwrap();
    expect_closed(&mut s, CLOSE_TIMEOUT)
        .unwrap_or_else(|e| panic!("flow to a dead backend: {e}\n{}", proxy.stderr_tail()));

    let lines = wait_for_file_lines(&path, 1, &proxy);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    let line = &lines[0];
    assert_eq!(
        json_field(line, "client"),
        Some(client.to_string().as_str()),
        "{line}"
    );
    let reason = json_field(line, "reason").unwrap_or_default();
    assert!(
        reason == "connect_failed" || reason == "no_backend",
        "reason {reason:?}: {line}"
    );
    assert_eq!(json_field(line, "backend"), Some("null"), "{line}");
    assert_eq!(json_field(line, "connect_ms"), Some("null"), "{line}");
    assert_eq!(
        json_field(line, "bytes_client_to_backend"),
        Some("0"),
        "{line}"
    );
    assert_eq!(
        json_field(line, "bytes_backend_to_client"),
        Some("0"),
        "{line}"
    );
}

#[test]
fn access_log_records_clients_refused_at_accept() {
    let dir = TempDir::new("access-log-denied");
    let path = dir.path().join("access.log");
    let backend = Backend::start(Kind::Echo);
    let proxy = Proxy::start(&[
        "--listen",
        "127.0.0.1:0",
        "--backend",
        &backend.arg(),
        "--deny",
        "127.0.0.5/32",
        "--access-log",
        path.to_str().unwrap(),
    ]);
    let denied: IpAddr = Ipv4Addr::new(127, 0, 0, 5).into();
    let mut s = connect_from(denied, proxy.addr).unwrap();
    let client = s.local_addr().unwrap();
    expect_closed(&mut s, CLOSE_TIMEOUT)
        .unwrap_or_else(|e| panic!("denied client: {e}\n{}", proxy.stderr_tail()));

    let lines = wait_for_file_lines(&path, 1, &proxy);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    let line = &lines[0];
    assert_eq!(
        json_field(line, "client"),
        Some(client.to_string().as_str()),
        "{line}"
    );
    assert_eq!(json_field(line, "reason"), Some("refused_acl"), "{line}");
    assert_eq!(json_field(line, "backend"), Some("null"), "{line}");
    assert_eq!(
        json_field(line, "bytes_client_to_backend"),
        Some("0"),
        "{line}"
    );
}

// ---------------------------------------------------------------------------------------------
// The backends file
// ---------------------------------------------------------------------------------------------

#[test]
fn reload_under_load_keeps_live_flows_and_moves_new_ones() {
    let a = Backend::hello("A");
    let b = Backend::hello("B");
    let c = Backend::hello("C");
    let dir = TempDir::new("reload");
    let file = dir.path().join("backends");
    write_atomically(
        &file,
        &format!("# two to start with\n{}\n{}\n", a.arg(), b.arg()),
    );
    let proxy = Proxy::start(&[
        "--listen",
        "127.0.0.1:0",
        "--backends-file",
        file.to_str().unwrap(),
        "--workers",
        "2",
    ]);

    let flows = open_live_flows(&proxy, &[("A", 3), ("B", 3)], 10);
    wait_progress(&proxy, &flows, &vec![0; flows.len()], 10);
    let accepted_by_a = a.accepted();

    let from = log_lines(&proxy).len();
    write_atomically(&file, &format!("{}\n{}\n", b.arg(), c.arg()));
    wait_signal_handlers(&proxy);
    proxy.signal(libc::SIGHUP);
    let line = expect_line(&proxy, from, "about the reload", |l| {
        l.contains("backends changed")
    });
    eprintln!("reload: {line}");
    assert!(
        line.contains(&format!("added: [{}]", c.arg()))
            && line.contains(&format!("removed: [{}]", a.arg()))
            && line.contains("2 total"),
        "{line}"
    );
    let moved = moved_percent(&line);
    // A held about half of the keys: all of those moved, and C took some of B's.
    assert!(
        (35.0..100.0).contains(&moved),
        "{moved}% of keys moved: {line}"
    );

    // New flows right after the line, first from the client addresses that hash to A in the
    // old set: any flow still placed with the old set goes to A.
    let a_clients: Vec<u8> = flows
        .iter()
        .filter(|f| f.backend == "A")
        .map(|f| match f.src {
            IpAddr::V4(ip) => ip.octets()[3],
            IpAddr::V6(_) => unreachable!(),
        })
        .collect();
    let served = new_flows(&proxy, a_clients.into_iter().chain(100..140));
    assert!(
        !served.iter().any(|n| n == "A"),
        "a new flow reached the removed backend A after the reload line: {served:?} (the first \
         ones from client addresses that hashed to A)\n{}",
        proxy.stderr_tail()
    );
    assert!(
        served.iter().any(|n| n == "C"),
        "no new flow reached C: {served:?}"
    );
    assert_eq!(
        a.accepted(),
        accepted_by_a,
        "A accepted connections after its removal"
    );

    // The live flows, A's included, keep carrying bytes after the reload, to a clean end.
    wait_progress(&proxy, &flows, &marks(&flows), 20);
    finish_all(&proxy, flows);
    let mut proxy = proxy;
    proxy.assert_running();
}

#[test]
fn a_changed_backends_file_is_applied_without_sighup() {
    let a = Backend::hello("A");
    let c = Backend::hello("C");
    let dir = TempDir::new("file-change");
    let file = dir.path().join("backends");
    write_atomically(&file, &format!("{}\n", a.arg()));
    let proxy = Proxy::start(&[
        "--listen",
        "127.0.0.1:0",
        "--backends-file",
        file.to_str().unwrap(),
    ]);
    assert_eq!(served_by(&proxy, client_ip(1)), "A");

    let from = log_lines(&proxy).len();
    write_atomically(&file, &format!("{}\n{}\n", a.arg(), c.arg()));
    // The proxy looks at the file once a second.
    let line = expect_line(&proxy, from, "about the file change", |l| {
        l.contains("backends changed")
    });
    assert!(line.contains("file change:"), "{line}");
    assert!(line.contains(&format!("added: [{}]", c.arg())), "{line}");
    assert!(line.contains("removed: []"), "{line}");
    let served = new_flows(&proxy, 10..40);
    assert!(
        served.iter().any(|n| n == "C"),
        "no new flow reached C: {served:?}"
    );
    assert!(served.iter().all(|n| n == "A" || n == "C"), "{served:?}");
}

#[test]
fn a_bad_backends_file_keeps_the_running_backends() {
    let a = Backend::hello("A");
    let b = Backend::hello("B");
    let c = Backend::hello("C");
    let dir = TempDir::new("bad-file");
    let file = dir.path().join("backends");
    write_atomically(&file, &format!("{}\n{}\n", a.arg(), b.arg()));
    let proxy = Proxy::start(&[
        "--listen",
        "127.0.0.1:0",
        "--backends-file",
        file.to_str().unwrap(),
    ]);

    let before = new_flows(&proxy, 10..40);
    assert!(
        before.iter().any(|n| n == "A") && before.iter().any(|n| n == "B"),
        "{before:?}"
    );

    let from = log_lines(&proxy).len();
    write_atomically(
        &file,
        &format!("# edited\n{}\n{},weight=lots\n", c.arg(), b.arg()),
    );
    wait_signal_handlers(&proxy);
    proxy.signal(libc::SIGHUP);
    let line = expect_line(&proxy, from, "about the bad file", |l| {
        l.contains("keeping the running backends")
    });
    assert!(line.contains("WARN"), "{line}");
    assert!(
        line.contains("line 3"),
        "the warning names the line: {line}"
    );
    assert!(
        !log_lines(&proxy)[from..]
            .iter()
            .any(|l| l.contains("backends changed")),
        "part of a bad file was applied\n{}",
        proxy.stderr_tail()
    );

    let served = new_flows(&proxy, 10..40);
    assert!(
        served.iter().all(|n| n == "A" || n == "B"),
        "flows went outside the old set after a bad file: {served:?}"
    );
    assert!(
        served.iter().any(|n| n == "A") && served.iter().any(|n| n == "B"),
        "{served:?}"
    );
    assert_eq!(c.accepted(), 0);

    // Fixing the file is picked up as usual.
    let from = log_lines(&proxy).len();
    write_atomically(&file, &format!("{}\n{}\n", c.arg(), b.arg()));
    proxy.signal(libc::SIGHUP);
    let line = expect_line(&proxy, from, "about the fixed file", |l| {
        l.contains("backends changed")
    });
    assert!(line.contains(&format!("added: [{}]", c.arg())), "{line}");
    // (Whether a flow may still reach A right after the line is the reload test's business.)
    let on_a = 10 + before.iter().position(|n| n == "A").unwrap() as u8;
    assert!(
        wait_until(CHANGE_TIMEOUT, || served_by(&proxy, client_ip(on_a)) != "A"),
        "new flows still reach A after the fixed file was applied\n{}",
        proxy.stderr_tail()
    );
    let served = new_flows(&proxy, 10..40);
    assert!(served.iter().all(|n| n == "B" || n == "C"), "{served:?}");
    assert!(served.iter().any(|n| n == "C"), "{served:?}");
}

#[test]
fn drain_timeout_closes_flows_of_a_removed_backend_only() {
    let a = Backend::hello("A");
    let b = Backend::hello("B");
    let dir = TempDir::new("drain-timeout");
    let file = dir.path().join("backends");
    write_atomically(&file, &format!("{}\n{}\n", a.arg(), b.arg()));
    let proxy = Proxy::start(&[
        "--listen",
        "127.0.0.1:0",
        "--backends-file",
        file.to_str().unwrap(),
        "--drain-timeout",
        "1s",
        "--workers",
        "1",
    ]);

    // Idle flows: two on A, two on B.
    let mut on_a = Vec::new();
    let mut on_b = Vec::new();
    for n in 10..=250u8 {
        if on_a.len() >= 2 && on_b.len() >= 2 {
            break;
        }
        let mut s = connect_from(client_ip(n), proxy.addr).unwrap();
        let name = read_line(&mut s).unwrap();
        echo_roundtrip(&mut s, b"before").unwrap();
        match name.as_str() {
            "A" if on_a.len() < 2 => on_a.push(s),
            "B" if on_b.len() < 2 => on_b.push(s),
            _ => {}
        }
    }
    assert!(
        on_a.len() == 2 && on_b.len() == 2,
        "could not place the flows"
    );

    let from = log_lines(&proxy).len();
    let changed_at = Instant::now();
    write_atomically(&file, &format!("{}\n", b.arg()));
    wait_signal_handlers(&proxy);
    proxy.signal(libc::SIGHUP);
    expect_line(&proxy, from, "about the reload", |l| {
        l.contains("backends changed")
    });

    for s in &mut on_a {
        let (how, closed_at) = expect_closed(s, Duration::from_secs(15)).unwrap_or_else(|e| {
            panic!(
                "flow on removed A, --drain-timeout 1s: {e}\n{}",
                proxy.stderr_tail()
            )
        });
        let after = closed_at - changed_at;
        eprintln!("flow on A closed ({how:?}) {after:?} after the change");
        assert!(
            after >= Duration::from_millis(900),
            "closed {after:?} after the change, drain timeout is 1s"
        );
        assert!(
            after <= Duration::from_secs(8),
            "closed only {after:?} after the change, drain timeout is 1s"
        );
    }
    // The flows on B went through the same deadline check and live on.
    for s in &mut on_b {
        echo_roundtrip(s, b"after")
            .unwrap_or_else(|e| panic!("flow on B after A's drain: {e}\n{}", proxy.stderr_tail()));
        s.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        assert_eq!(s.read_to_end(&mut rest).unwrap(), 0);
    }
}

// ---------------------------------------------------------------------------------------------
// DNS discovery
// ---------------------------------------------------------------------------------------------

/// A backend on a given address that greets with its name and then echoes (the harness's
/// backends always take a port of their own; DNS discovery needs one port on two addresses).
struct FixedHello {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FixedHello {
    fn serve(listener: TcpListener, name: &str) -> FixedHello {
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let greeting = format!("{name}\n");
        let thread = {
            let stop = stop.clone();
            thread::Builder::new()
                .name(format!("hello-{addr}"))
                .stack_size(SMALL_STACK)
                .spawn(move || {
                    for conn in listener.incoming() {
                        if stop.load(Ordering::SeqCst) {
                            return;
                        }
                        let Ok(mut s) = conn else { continue };
                        let greeting = greeting.clone();
                        let _ = thread::Builder::new()
                            .stack_size(SMALL_STACK)
                            .spawn(move || {
                                let _ = s.set_read_timeout(Some(BACKEND_IO_TIMEOUT));
                                let _ = s.set_write_timeout(Some(BACKEND_IO_TIMEOUT));
                                if s.write_all(greeting.as_bytes()).is_err() {
                                    return;
                                }
                                let _ = io::copy(&mut s.try_clone().unwrap(), &mut s);
                                let _ = s.shutdown(Shutdown::Write);
                            });
                    }
                })
                .unwrap()
        };
        FixedHello {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for FixedHello {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Listeners on 127.0.0.2 and 127.0.0.3 with the same port.
fn listener_pair() -> (TcpListener, TcpListener, u16) {
    for _ in 0..50 {
        let two = TcpListener::bind((Ipv4Addr::new(127, 0, 0, 2), 0)).unwrap();
        let port = two.local_addr().unwrap().port();
        if let Ok(three) = TcpListener::bind((Ipv4Addr::new(127, 0, 0, 3), port)) {
            return (two, three, port);
        }
    }
    panic!("no port free on both 127.0.0.2 and 127.0.0.3 in 50 tries");
}

#[test]
fn dns_backends_follow_the_name() {
    let (two, three, port) = listener_pair();
    let _two = FixedHello::serve(two, "two");
    let _three = FixedHello::serve(three, "three");
    let dns = Dnsmasq::start("127.0.0.2 svc.test\n", &[]);
    let proxy = Proxy::start(&[
        "--listen",
        "127.0.0.1:0",
        "--backend-dns",
        &format!("svc.test:{port}"),
        "--dns-server",
        &dns.addr.to_string(),
        "--dns-refresh",
        "500ms",
    ]);
    assert_eq!(served_by(&proxy, client_ip(1)), "two");

    let from = log_lines(&proxy).len();
    dns.set_hosts("127.0.0.3 svc.test\n");
    let mut last = String::new();
    let moved = wait_until(CHANGE_TIMEOUT, || {
        last = served_by(&proxy, client_ip(1));
        last == "three"
    });
    assert!(
        moved,
        "new flows still reach {last:?} {CHANGE_TIMEOUT:?} after the DNS change\n{}\n--- dnsmasq ---\n{}",
        proxy.stderr_tail(),
        dns.log()
    );
    let line = expect_line(&proxy, from, "about the DNS change", |l| {
        l.contains("backends changed")
    });
    assert!(line.contains("DNS:"), "{line}");
    assert!(
        line.contains(&format!("added: [127.0.0.3:{port}]")),
        "{line}"
    );
    assert!(
        line.contains(&format!("removed: [127.0.0.2:{port}]")),
        "{line}"
    );
    let served = new_flows(&proxy, 10..20);
    assert!(served.iter().all(|n| n == "three"), "{served:?}");
}

// ---------------------------------------------------------------------------------------------
// Drain on SIGTERM
// ---------------------------------------------------------------------------------------------

/// Whether a connect to `addr` is refused now (a connect that gets through is closed again).
fn connect_refused(addr: SocketAddr) -> bool {
    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Err(e) => e.kind() == io::ErrorKind::ConnectionRefused,
        Ok(_) => false,
    }
}

#[test]
fn sigterm_closes_the_listener_and_lets_live_flows_finish() {
    let backend = Backend::hello("E");
    let mut proxy = Proxy::start(&[
        "--listen",
        "127.0.0.1:0",
        "--backend",
        &backend.arg(),
        "--shutdown-timeout",
        "60s",
        "--workers",
        "2",
    ]);
    let flows: Vec<LiveFlow> = (10..14)
        .map(|n| LiveFlow::open(&proxy, client_ip(n), 2000 + u64::from(n), |_| true).unwrap())
        .collect();
    wait_progress(&proxy, &flows, &vec![0; flows.len()], 10);

    let from = log_lines(&proxy).len();
    let marks_at_signal = marks(&flows);
    wait_signal_handlers(&proxy);
    proxy.signal(libc::SIGTERM);
    let signalled = Instant::now();
    expect_line(&proxy, from, "about the drain", |l| {
        l.contains("listeners closed")
    });
    // Nothing else listens on the port: once the listeners are closed, connects are refused.
    assert!(
        wait_until(Duration::from_secs(5), || connect_refused(proxy.addr)),
        "connects to {} still accepted 5 s after SIGTERM\n{}",
        proxy.addr,
        proxy.stderr_tail()
    );

    // The live flows go on carrying bytes for a while after the signal.
    wait_progress(&proxy, &flows, &marks_at_signal, 50);
    let kept_on = wait_until(Duration::from_secs(10), || {
        signalled.elapsed() >= Duration::from_millis(700)
    });
    assert!(kept_on);
    assert_eq!(
        proxy.wait_exit(Duration::ZERO),
        None,
        "exited with flows live\n{}",
        proxy.stderr_tail()
    );
    wait_progress(&proxy, &flows, &marks(&flows), 5);
    finish_all(&proxy, flows);

    let ended = Instant::now();
    let status = proxy.wait_exit(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "exit status {status:?} (expected 0 soon after the last flow ended)\n{}",
        proxy.stderr_tail()
    );
    eprintln!("exited {:?} after the last flow ended", ended.elapsed());
    assert!(
        proxy.stderr().contains("stopped"),
        "{}",
        proxy.stderr_tail()
    );
}

#[test]
fn a_second_sigterm_closes_flows_at_once() {
    let backend = Backend::hello("E");
    let mut proxy = Proxy::start(&["--listen", "127.0.0.1:0", "--backend", &backend.arg()]);
    let mut s = connect(proxy.addr).unwrap();
    assert_eq!(read_line(&mut s).unwrap(), "E");
    echo_roundtrip(&mut s, b"before").unwrap();

    let from = log_lines(&proxy).len();
    wait_signal_handlers(&proxy);
    proxy.signal(libc::SIGTERM);
    expect_line(&proxy, from, "about the drain", |l| {
        l.contains("listeners closed")
    });
    echo_roundtrip(&mut s, b"draining")
        .unwrap_or_else(|e| panic!("flow during the drain: {e}\n{}", proxy.stderr_tail()));

    // The default --shutdown-timeout is 10 s: a second signal must not wait for it.
    proxy.signal(libc::SIGTERM);
    let second = Instant::now();
    expect_closed(&mut s, Duration::from_secs(5)).unwrap_or_else(|e| {
        panic!(
            "flow after the second SIGTERM: {e}\n{}",
            proxy.stderr_tail()
        )
    });
    let status = proxy.wait_exit(Duration::from_secs(5));
    assert!(
        status.is_some_and(|s| s.success()),
        "exit status {status:?} within 5 s of the second SIGTERM\n{}",
        proxy.stderr_tail()
    );
    eprintln!("exited {:?} after the second SIGTERM", second.elapsed());
}

#[test]
fn shutdown_timeout_ends_a_flow_that_never_ends() {
    let backend = Backend::hello("E");
    let mut proxy = Proxy::start(&[
        "--listen",
        "127.0.0.1:0",
        "--backend",
        &backend.arg(),
        "--shutdown-timeout",
        "1s",
    ]);
    let mut s = connect(proxy.addr).unwrap();
    assert_eq!(read_line(&mut s).unwrap(), "E");
    echo_roundtrip(&mut s, b"idle from now on").unwrap();

    wait_signal_handlers(&proxy);
    let signalled = Instant::now();
    proxy.signal(libc::SIGTERM);
    let status = proxy.wait_exit(Duration::from_secs(15));
    let after = signalled.elapsed();
    assert!(
        status.is_some_and(|s| s.success()),
        "exit status {status:?} after {after:?}, --shutdown-timeout 1s\n{}",
        proxy.stderr_tail()
    );
    eprintln!("exited {after:?} after SIGTERM");
    assert!(
        after >= Duration::from_millis(900),
        "exited {after:?} after SIGTERM with a live flow, --shutdown-timeout 1s"
    );
    assert!(
        after <= Duration::from_secs(8),
        "exited only {after:?} after SIGTERM"
    );
    expect_closed(&mut s, Duration::from_secs(5))
        .expect("the flow is closed when the process ends");
}

/// A supervisor (or an upgrade script) waits for the `listening on` line and may signal the
/// proxy right after it: a SIGHUP must then reload (not kill the process) and a SIGTERM must
/// drain and exit 0 (not kill it).
#[test]
fn signals_right_after_the_listening_line_are_handled() {
    use std::os::unix::process::ExitStatusExt;

    let backend = Backend::hello("E");
    let dir = TempDir::new("early-signal");
    let file = dir.path().join("backends");
    write_atomically(&file, &format!("{}\n", backend.arg()));
    let mut failures: Vec<String> = Vec::new();
    for attempt in 0..10 {
        let mut proxy = Proxy::start(&[
            "--listen",
            "127.0.0.1:0",
            "--backends-file",
            file.to_str().unwrap(),
        ]);
        let (first, name) = if attempt % 2 == 0 {
            (libc::SIGHUP, "SIGHUP")
        } else {
            (libc::SIGTERM, "SIGTERM")
        };
        proxy.signal(first);
        let mut problems: Vec<String> = Vec::new();
        if first == libc::SIGHUP {
            // Still serving after the reload (which changes nothing)?
            match connect(proxy.addr)
                .map_err(|e| e.to_string())
                .and_then(|mut s| read_line(&mut s))
            {
                Ok(greeting) if greeting == "E" => {}
                Ok(other) => problems.push(format!("flow after SIGHUP greeted {other:?}")),
                Err(e) => problems.push(format!("flow after SIGHUP: {e}")),
            }
            if !has_exited(&proxy) {
                proxy.signal(libc::SIGTERM);
            }
        }
        match proxy.wait_exit(Duration::from_secs(10)) {
            Some(status) if status.success() => {}
            Some(status) => problems.push(format!(
                "exit status {status} (signal {:?}), expected 0",
                status.signal()
            )),
            None => problems.push("still running 10 s after SIGTERM".to_string()),
        }
        if !problems.is_empty() {
            failures.push(format!(
                "attempt {attempt}, {name} right after `listening on`: {}",
                problems.join("; ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 10 proxies mishandled an early signal:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
