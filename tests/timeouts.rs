//! `--idle-timeout` and `--connect-timeout`, with generous bounds on both sides: these tests
//! check that the timeouts happen, and not early, never how precisely.

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn idle_flow_is_closed_on_both_sides_after_idle_timeout() {
    let echo = Backend::echo();
    let proxy = Proxy::start(&[
        "--listen",
        "127.0.0.1:0",
        "--backend",
        &echo.arg(),
        "--idle-timeout",
        "2s",
    ]);
    let mut client = connect(proxy.addr).unwrap();
    echo_roundtrip(&mut client, b"ping").unwrap();
    let last_activity = Instant::now();

    let (how, closed_at) = expect_closed(&mut client, Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("idle flow, 2s idle timeout: {e}\n{}", proxy.stderr_tail()));
    let idle = closed_at - last_activity;
    eprintln!("idle flow closed ({how:?}) after {idle:?}");
    assert!(
        idle >= Duration::from_millis(1500),
        "closed after {idle:?} of idleness, idle timeout is 2s"
    );
    assert!(
        idle <= Duration::from_secs(5),
        "closed only after {idle:?} of idleness, idle timeout is 2s"
    );
    match echo.next_event(CLOSE_TIMEOUT) {
        Some(Event::Closed { how, received, .. }) => {
            assert!(how.is_closed(), "backend side ended with {how:?}");
            assert_eq!(received, 4);
        }
        other => panic!(
            "backend side of the idle flow not closed: {other:?}\n{}",
            proxy.stderr_tail()
        ),
    }
}

#[test]
fn flow_with_traffic_both_ways_outlives_idle_timeout() {
    let echo = Backend::echo();
    let proxy = Proxy::start(&[
        "--listen",
        "127.0.0.1:0",
        "--backend",
        &echo.arg(),
        "--idle-timeout",
        "1s",
    ]);
    let mut client = connect(proxy.addr).unwrap();
    let start = Instant::now();
    let mut round = 0;
    // Pacing, not synchronisation: a message every 250 ms for 3.5 s (> 3x the idle timeout).
    while start.elapsed() < Duration::from_millis(3500) {
        echo_roundtrip(&mut client, format!("round {round}").as_bytes()).unwrap_or_else(|e| {
            panic!(
                "active flow cut after {:?} (round {round}), idle timeout 1s: {e}\n{}",
                start.elapsed(),
                proxy.stderr_tail()
            )
        });
        round += 1;
        thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn upload_without_replies_is_not_idle() {
    // Bytes flowing in one direction only keep the flow alive too.
    let sink = Backend::start(Kind::Sink);
    let proxy = Proxy::start(&[
        "--listen",
        "127.0.0.1:0",
        "--backend",
        &sink.arg(),
        "--idle-timeout",
        "1s",
    ]);
    let mut client = connect(proxy.addr).unwrap();
    let start = Instant::now();
    let mut sent = Vec::new();
    while start.elapsed() < Duration::from_millis(3500) {
        let chunk = format!("chunk {} ", sent.len());
        client
            .write_all(chunk.as_bytes())
            .unwrap_or_else(|e| panic!("upload cut after {:?}: {e}", start.elapsed()));
        sent.extend_from_slice(chunk.as_bytes());
        thread::sleep(Duration::from_millis(250));
    }
    client.shutdown(Shutdown::Write).unwrap();
    let reply = read_line(&mut client).unwrap_or_else(|e| {
        panic!(
            "one-way upload of 3.5 s with idle timeout 1s: no reply from the backend: {e}\n{}",
            proxy.stderr_tail()
        )
    });
    assert_eq!(reply, format!("{} {:016x}", sent.len(), digest(&sent)));
}

#[test]
fn connect_timeout_closes_client_when_backend_never_answers() {
    let hole = Blackhole::new();
    let proxy = Proxy::start(&[
        "--listen",
        "127.0.0.1:0",
        "--backend",
        &hole.addr.to_string(),
        "--connect-timeout",
        "2s",
        "--retries",
        "0",
    ]);
    let start = Instant::now();
    let mut client = connect(proxy.addr).unwrap();
    let (how, closed_at) =
        expect_closed(&mut client, Duration::from_secs(15)).unwrap_or_else(|e| {
            panic!(
                "client of a backend whose connect hangs, connect timeout 2s: {e}\n{}",
                proxy.stderr_tail()
            )
        });
    let waited = closed_at - start;
    eprintln!("client closed ({how:?}) {waited:?} after connecting");
    assert!(
        waited >= Duration::from_millis(1500),
        "client closed after {waited:?}, before the 2s connect timeout"
    );
    assert!(
        waited <= Duration::from_secs(5),
        "client closed only after {waited:?}, connect timeout is 2s"
    );
}

#[test]
fn connect_timeout_does_not_cut_established_flows() {
    // A short connect timeout applies to connecting only, not to a flow that lives longer.
    let echo = Backend::echo();
    let proxy = Proxy::start(&[
        "--listen",
        "127.0.0.1:0",
        "--backend",
        &echo.arg(),
        "--connect-timeout",
        "500ms",
    ]);
    let mut client = connect(proxy.addr).unwrap();
    echo_roundtrip(&mut client, b"first").unwrap();
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(2000) {
        echo_roundtrip(&mut client, b"still here").unwrap_or_else(|e| {
            panic!(
                "flow cut {:?} after it was established (connect timeout 500ms): {e}\n{}",
                start.elapsed(),
                proxy.stderr_tail()
            )
        });
        thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn connect_timeout_moves_the_flow_to_the_next_backend() {
    // A backend whose connects hang, between two working ones: flows hashed to it are served
    // by another backend after the connect timeout.
    let hole = Blackhole::new();
    let b0 = Backend::hello("b0");
    let b1 = Backend::hello("b1");
    let proxy = Proxy::start(&[
        "--listen",
        "127.0.0.1:0",
        "--backend",
        &b0.arg(),
        "--backend",
        &hole.addr.to_string(),
        "--backend",
        &b1.arg(),
        "--connect-timeout",
        "1s",
        "--retries",
        "2",
    ]);
    // 30 client IPs at once; with three backends some certainly hash to the hole.
    let results: Vec<(String, Duration)> = thread::scope(|s| {
        let handles: Vec<_> = (0..30u8)
            .map(|i| {
                let proxy = &proxy;
                s.spawn(move || {
                    let start = Instant::now();
                    let name = served_by(proxy, client_ip(200 + i));
                    (name, start.elapsed())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (name, _) in &results {
        assert!(name == "b0" || name == "b1", "served by {name}");
    }
    let waited = results
        .iter()
        .filter(|(_, t)| *t >= Duration::from_millis(800))
        .count();
    assert!(
        waited > 0,
        "no client waited for the connect timeout: did none hash to the blackholed backend? \
         {results:?}"
    );
}

/// A download cut by the idle timeout must not look complete: the client sees a reset, not a
/// clean end of stream after part of the bytes, and so does the backend.
#[test]
fn download_cut_by_the_idle_timeout_ends_in_a_reset_not_an_eof() {
    const TOTAL: u64 = 256 << 20;
    let backend = Backend::start(Kind::Stream);
    let proxy = Proxy::start(&[
        "--listen",
        "127.0.0.1:0",
        "--backend",
        &backend.arg(),
        "--idle-timeout",
        "1s",
    ]);
    let mut client = connect(proxy.addr).unwrap();
    client.write_all(&TOTAL.to_le_bytes()).unwrap();
    // The client reads nothing: the stream backs up, no byte moves, the flow goes idle and the
    // proxy gives up on it: the backend's write fails (its side was cut). The backend may or
    // may not have reported the stall (a write blocked for 1 s) first.
    loop {
        match backend.next_event(Duration::from_secs(30)) {
            Some(Event::Stalled { .. }) => {}
            Some(Event::Streamed {
                written,
                error: Some(error),
                ..
            }) => {
                eprintln!("backend: stream cut after {written} bytes: {error}");
                break;
            }
            other => panic!(
                "the idle flow's backend side should have been cut: {other:?}\n{}",
                proxy.stderr_tail()
            ),
        }
    }
    // The client drains what reached it, then must see the cut as a reset.
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let mut got = 0u64;
    let end = loop {
        match client.read(&mut buf) {
            Ok(0) => break Closed::Eof,
            Ok(n) => got += n as u64,
            Err(e) => break classify(&e),
        }
    };
    assert!(got < TOTAL, "the whole stream arrived ({got} bytes)");
    assert_eq!(
        end,
        Closed::Reset,
        "after {got} of {TOTAL} bytes the cut flow ended with {end:?}: a clean EOF would tell the \
         client the download was complete\n{}",
        proxy.stderr_tail()
    );
}
