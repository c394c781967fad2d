//! What an operator watching the admin port sees while traffic runs: byte counters that move
//! while a flow is open (not only when it ends), the flow-duration and bytes-per-flow
//! histograms, and the `GET /` status page, served over plain HTTP and rendered by a real
//! headless browser (Debian's chromium).
//!
//! Every wait is for an observable condition with a deadline.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use common::admin::{admin_addr, http_get, metric, parse_metrics, Sample};
use common::*;

/// How long a counter may take to show what happened (the flush runs every 0.5 s).
const SHOW_TIMEOUT: Duration = Duration::from_secs(10);

/// Scrapes `/metrics` until `done` holds for the samples or `SHOW_TIMEOUT` passes; returns the
/// last scrape either way.
fn scrape_until(proxy: &Proxy, done: impl Fn(&[Sample]) -> bool) -> (bool, Vec<Sample>) {
    let admin = admin_addr(proxy);
    let mut samples = Vec::new();
    let ok = wait_until(SHOW_TIMEOUT, || {
        samples = parse_metrics(&http_get(admin, "/metrics").1);
        done(&samples)
    });
    (ok, samples)
}

/// Writes `len` bytes of stream `key` in chunks and reads each chunk's echo back.
fn echo_bytes(s: &mut TcpStream, key: u64, from: u64, len: u64) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut pos = from;
    while pos < from + len {
        let chunk = pattern_slice(key, pos, (from + len - pos).min(16 * 1024) as usize);
        s.write_all(chunk).expect("write to the proxy");
        let n = chunk.len();
        s.read_exact(&mut buf[..n]).expect("read the echo");
        check_pattern(key, pos, &buf[..n]).expect("echoed bytes intact");
        pos += n as u64;
    }
}

#[test]
fn byte_counters_move_while_a_flow_is_open_and_end_exact() {
    let backend = Backend::echo();
    let proxy = Proxy::start(&[
        "--listen",
        "127.0.0.1:0",
        "--backend",
        &backend.arg(),
        "--admin",
        "127.0.0.1:0",
        "--workers",
        "1",
    ]);
    let name = backend.arg();
    let up = [("direction", "client_to_backend")];
    let down = [("direction", "backend_to_client")];
    let backend_up = [
        ("backend", name.as_str()),
        ("direction", "client_to_backend"),
    ];
    let backend_down = [
        ("backend", name.as_str()),
        ("direction", "backend_to_client"),
    ];

    let mut s = connect(proxy.addr).unwrap();
    const FIRST: u64 = 300_000;
    echo_bytes(&mut s, 7, 0, FIRST);
    // The flow is open (the client holds it and has not half-closed): the bytes it moved must
    // show anyway, in the totals and in its backend's counters.
    let (shown, samples) = scrape_until(&proxy, |m| {
        metric(m, "ringway_bytes_total", &up) == FIRST as f64
            && metric(m, "ringway_bytes_total", &down) == FIRST as f64
            && metric(m, "ringway_backend_bytes_total", &backend_up) == FIRST as f64
            && metric(m, "ringway_backend_bytes_total", &backend_down) == FIRST as f64
    });
    assert!(
        shown,
        "the open flow's {FIRST} bytes each way never showed in /metrics: {:?}\n{}",
        samples
            .iter()
            .filter(|s| s.name.contains("bytes_total"))
            .collect::<Vec<_>>(),
        proxy.stderr_tail()
    );
    assert_eq!(metric(&samples, "ringway_flows_active", &[]), 1.0);
    assert_eq!(
        metric(&samples, "ringway_flow_duration_seconds_count", &[]),
        0.0,
        "the histograms count flows that ended"
    );

    // More bytes on the same flow, then its end: the counters end at exactly the flow's bytes,
    // neither the flushed part nor the rest counted twice.
    const MORE: u64 = 123_457;
    echo_bytes(&mut s, 7, FIRST, MORE);
    s.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    drop(s);
    let total = (FIRST + MORE) as f64;
    let (ended, samples) = scrape_until(&proxy, |m| {
        metric(m, "ringway_flows_closed_total", &[("reason", "done")]) == 1.0
    });
    assert!(ended, "the flow never ended\n{}", proxy.stderr_tail());
    let m = |name: &str, labels: &[(&str, &str)]| metric(&samples, name, labels);
    assert_eq!(m("ringway_bytes_total", &up), total);
    assert_eq!(m("ringway_bytes_total", &down), total);
    assert_eq!(m("ringway_backend_bytes_total", &backend_up), total);
    assert_eq!(m("ringway_backend_bytes_total", &backend_down), total);

    // The ended flow is in both histograms, once, with its bytes.
    assert_eq!(m("ringway_flow_duration_seconds_count", &[]), 1.0);
    assert_eq!(
        m("ringway_flow_duration_seconds_bucket", &[("le", "+Inf")]),
        1.0
    );
    assert_eq!(m("ringway_flow_bytes_count", &up), 1.0);
    assert_eq!(m("ringway_flow_bytes_sum", &up), total);
    assert_eq!(m("ringway_flow_bytes_sum", &down), total);
    // 423,457 bytes: above the 262144 bucket, within the 1048576 one.
    assert_eq!(
        m("ringway_flow_bytes_bucket", &[up[0], ("le", "262144")]),
        0.0
    );
    assert_eq!(
        m("ringway_flow_bytes_bucket", &[up[0], ("le", "1048576")]),
        1.0
    );
}
