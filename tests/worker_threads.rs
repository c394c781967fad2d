//! The data path stays on the worker threads: a flow's whole life (accept, connect, relay,
//! half-close both ways, close) must not hand work to io_uring's io-wq threads (`iou-wrk-*`),
//! which would run beside the pinned worker and cost a wake-up and two context switches per
//! operation. IORING_OP_SHUTDOWN was such an operation (docs/benchmarks.md, "Connection cost").

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::Duration;

use common::*;

/// Threads of `pid` whose name starts with `prefix`.
fn threads_named(pid: u32, prefix: &str) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .filter(|name| name.starts_with(prefix))
        .collect()
}

#[test]
fn flows_that_half_close_both_ways_start_no_io_wq_threads() {
    let echo = Backend::echo();
    let proxy = Proxy::start(&[
        "--listen",
        "127.0.0.1:0",
        "--backend",
        &echo.arg(),
        "--workers",
        "1",
    ]);
    // io-wq threads are created on the first operation punted to them and live on for a few
    // seconds after their last one: looking right after the flows sees them if there were any.
    for n in 0..50u8 {
        let mut client = connect(proxy.addr).unwrap();
        let message = [n; 100];
        client.write_all(&message).unwrap();
        // The client's FIN goes to the backend, whose FIN comes back: both shutdowns happen.
        client.shutdown(Shutdown::Write).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut got = Vec::new();
        client
            .read_to_end(&mut got)
            .unwrap_or_else(|e| panic!("flow {n}: {e}\n{}", proxy.stderr_tail()));
        assert_eq!(got, message, "flow {n}: the echo came back whole, then EOF");
    }
    let io_wq = threads_named(proxy.pid(), "iou-wrk");
    assert!(
        io_wq.is_empty(),
        "the worker handed operations to io-wq threads: {io_wq:?}"
    );
    assert!(
        !threads_named(proxy.pid(), "ringway-w").is_empty(),
        "the check reads the proxy's own threads"
    );
}
