//! Bulk relay through kernel pipes (`--splice auto`, the default): streams of many MB go through
//! splice byte-exact both ways (the metric proves splice carried them), half-closes and resets
//! behave as on the buffered path, a reader that stops holds at most the direction's budget in
//! the pipe, and `--splice off` (or RINGWAY_SPLICE=off) keeps every byte on the buffered path.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::thread;
use std::time::Duration;

use common::admin::{admin_addr, http_get, metric, parse_metrics, Sample};
use common::*;

/// The per-direction budget: 4 buffers of the default 64 KiB.
const BUDGET: u64 = 4 * 65536;

fn start(backend: &Backend, extra: &[&str]) -> Proxy {
    let arg = backend.arg();
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--backend",
        &arg,
        "--admin",
        "127.0.0.1:0",
    ];
    args.extend(extra);
    Proxy::start(&args)
}

fn scrape(proxy: &Proxy) -> Vec<Sample> {
    parse_metrics(&http_get(admin_addr(proxy), "/metrics").1)
}

/// Scrapes until `done` holds (at most 20 s); returns the last samples and whether it held.
fn scrape_until(proxy: &Proxy, done: impl Fn(&[Sample]) -> bool) -> (bool, Vec<Sample>) {
    let mut samples = Vec::new();
    let held = wait_until(Duration::from_secs(20), || {
        samples = scrape(proxy);
        done(&samples)
    });
    (held, samples)
}

fn bytes(samples: &[Sample], direction: &str) -> f64 {
    metric(samples, "ringway_bytes_total", &[("direction", direction)])
}

/// Uploads `len` bytes of stream `key` to a sink backend and checks its length and digest.
fn upload(proxy: &Proxy, key: u64, len: u64) -> u64 {
    let mut client = connect(proxy.addr).unwrap();
    write_pattern(&mut client, key, len)
        .unwrap_or_else(|e| panic!("upload: {e}\n{}", proxy.stderr_tail()));
    client.shutdown(Shutdown::Write).unwrap();
    let reply = read_line(&mut client)
        .unwrap_or_else(|e| panic!("sink reply: {e}\n{}", proxy.stderr_tail()));
    assert_eq!(
        reply,
        format!("{len} {:016x}", pattern_digest(key, len)),
        "len and digest at the backend"
    );
    reply.len() as u64 + 1
}

fn pattern_digest(key: u64, len: u64) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3Default::new();
    let mut pos = 0u64;
    while pos < len {
        let chunk = pattern_slice(key, pos, (len - pos).min(1 << 20) as usize);
        h.update(chunk);
        pos += chunk.len() as u64;
    }
    h.digest()
}

/// Asks a stream backend for `len` bytes and returns the client connection.
fn request_stream(proxy: &Proxy, len: u64) -> TcpStream {
    let mut client = connect(proxy.addr).unwrap();
    client.write_all(&len.to_le_bytes()).unwrap();
    client
}

#[test]
fn multi_megabyte_streams_go_through_splice_byte_exact_both_ways() {
    const LEN: u64 = 48 << 20;
    let sink = Backend::start(Kind::Sink);
    let proxy = start(&sink, &[]);
    let reply = upload(&proxy, 0x5EED, LEN);

    let stream = Backend::start(Kind::Stream);
    let proxy2 = start(&stream, &[]);
    let mut client = request_stream(&proxy2, LEN);
    read_pattern_to_eof(&mut client, LEN, LEN)
        .unwrap_or_else(|e| panic!("download: {e}\n{}", proxy2.stderr_tail()));
    drop(client);

    // Counters end exactly at the bytes moved (spliced bytes included), and splice carried
    // almost all of them: only the first buffers of each stream go through the ring.
    for (proxy, up, down) in [(&proxy, LEN, reply), (&proxy2, 8, LEN)] {
        let (done, samples) = scrape_until(proxy, |s| {
            metric(s, "ringway_flows_active", &[]) == 0.0
                && bytes(s, "client_to_backend") == up as f64
                && bytes(s, "backend_to_client") == down as f64
        });
        assert!(
            done,
            "byte counters {} up, {} down, expected {up} and {down}\n{}",
            bytes(&samples, "client_to_backend"),
            bytes(&samples, "backend_to_client"),
            proxy.stderr_tail()
        );
        let spliced = metric(&samples, "ringway_spliced_bytes_total", &[]);
        assert!(
            spliced >= (LEN - 4 * BUDGET) as f64 && spliced <= LEN as f64,
            "{spliced} of {LEN} bytes spliced"
        );
        assert_eq!(metric(&samples, "ringway_splice_pipes_in_use", &[]), 0.0);
    }
}

#[test]
fn echo_both_ways_at_once_through_splice() {
    const LEN: u64 = 32 << 20;
    let echo = Backend::echo();
    let proxy = start(&echo, &[]);
    let mut client = connect(proxy.addr).unwrap();
    let mut rd = client.try_clone().unwrap();
    let reader = thread::spawn(move || read_pattern_to_eof(&mut rd, 77, LEN));
    write_pattern(&mut client, 77, LEN).unwrap();
    // Half-close after a spliced stream: the echo backend sees EOF, echoes the rest, and
    // closes its side; the client reads every byte, then EOF.
    client.shutdown(Shutdown::Write).unwrap();
    reader
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("echo: {e}\n{}", proxy.stderr_tail()));
    let (_, samples) = scrape_until(&proxy, |s| metric(s, "ringway_flows_active", &[]) == 0.0);
    let spliced = metric(&samples, "ringway_spliced_bytes_total", &[]);
    assert!(
        spliced >= (2 * LEN - 8 * BUDGET) as f64,
        "{spliced} of {} bytes spliced",
        2 * LEN
    );
    let done = metric(
        &samples,
        "ringway_flows_closed_total",
        &[("reason", "done")],
    );
    assert_eq!(done, 1.0, "the flow ends with both half-closes");
}

#[test]
fn backend_half_close_in_splice_mode_then_the_client_still_uploads() {
    const DOWN: u64 = 24 << 20;
    const UP: u64 = 24 << 20;
    let backend = Backend::start(Kind::HalfCloser { bytes: DOWN });
    let proxy = start(&backend, &[]);
    let mut client = connect(proxy.addr).unwrap();
    // Every byte the backend wrote, then EOF (its FIN forwarded once the pipe was empty).
    read_pattern_to_eof(&mut client, HALF_CLOSE_KEY, DOWN)
        .unwrap_or_else(|e| panic!("download before the FIN: {e}\n{}", proxy.stderr_tail()));
    // The other direction still flows, through splice too.
    write_pattern(&mut client, 91, UP).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    match backend.next_event(Duration::from_secs(60)) {
        Some(Event::Sunk { len, digest, .. }) => {
            assert_eq!(
                (len, digest),
                (UP, pattern_digest(91, UP)),
                "upload after the FIN"
            )
        }
        other => panic!("half-closing backend: {other:?}\n{}", proxy.stderr_tail()),
    }
    let (done, samples) = scrape_until(&proxy, |s| {
        metric(s, "ringway_flows_closed_total", &[("reason", "done")]) == 1.0
    });
    assert!(
        done,
        "the flow did not end cleanly\n{}",
        proxy.stderr_tail()
    );
    let spliced = metric(&samples, "ringway_spliced_bytes_total", &[]);
    assert!(
        spliced >= (DOWN + UP - 8 * BUDGET) as f64,
        "{spliced} of {} bytes spliced",
        DOWN + UP
    );
}

#[test]
fn a_reader_that_stops_holds_at_most_the_budget_in_the_pipe_and_loses_nothing() {
    const TOTAL: u64 = 96 << 20;
    let backend = Backend::start(Kind::Stream);
    let mut proxy = start(&backend, &[]);
    let mut client = request_stream(&proxy, TOTAL);
    // The backend blocks: the chain to the client is full, the proxy stopped reading.
    match backend.next_event(Duration::from_secs(60)) {
        Some(Event::Stalled { written, .. }) => {
            eprintln!("backend blocked after writing {written} of {TOTAL} bytes")
        }
        other => panic!("stream backend: {other:?}\n{}", proxy.stderr_tail()),
    }
    let samples = scrape(&proxy);
    assert_eq!(
        metric(&samples, "ringway_splice_pipes_in_use", &[]),
        1.0,
        "the stalled download holds its pipe"
    );
    assert!(metric(&samples, "ringway_spliced_bytes_total", &[]) > 0.0);
    assert_eq!(metric(&samples, "ringway_buffers_in_use", &[]), 0.0);
    let held = bytes_in_pipes(proxy.pid());
    assert!(
        held.iter().any(|&n| n > 0) && held.iter().sum::<u64>() <= BUDGET,
        "bytes in the proxy's pipes: {held:?} (budget {BUDGET})"
    );
    proxy.assert_running();
    // The reader comes back: every byte, in order.
    read_pattern_to_eof(&mut client, TOTAL, TOTAL)
        .unwrap_or_else(|e| panic!("slow reader, once it reads: {e}\n{}", proxy.stderr_tail()));
    match backend.next_event(Duration::from_secs(30)) {
        Some(Event::Streamed { written, error, .. }) => {
            assert_eq!((written, error), (TOTAL, None), "backend's side")
        }
        other => panic!("stream backend: {other:?}"),
    }
}

#[test]
fn a_client_reset_while_the_pipe_holds_bytes_resets_the_backend_and_frees_the_pipe() {
    const TOTAL: u64 = 256 << 20;
    let backend = Backend::start(Kind::Stream);
    let mut proxy = start(&backend, &[]);
    let client = request_stream(&proxy, TOTAL);
    match backend.next_event(Duration::from_secs(60)) {
        Some(Event::Stalled { .. }) => {}
        other => panic!("stream backend: {other:?}\n{}", proxy.stderr_tail()),
    }
    assert!(
        bytes_in_pipes(proxy.pid()).iter().any(|&n| n > 0),
        "the pipe should hold bytes when the client resets"
    );
    reset(client);
    // The backend's stream fails (the proxy passed the reset on) before all was written.
    match backend.next_event(Duration::from_secs(30)) {
        Some(Event::Streamed {
            written,
            error: Some(e),
            ..
        }) => assert!(written < TOTAL, "{written} written, then {e}"),
        other => panic!("stream backend after the client's reset: {other:?}"),
    }
    let (done, samples) = scrape_until(&proxy, |s| {
        metric(s, "ringway_flows_active", &[]) == 0.0
            && metric(s, "ringway_splice_pipes_in_use", &[]) == 0.0
    });
    assert!(done, "flow or pipe left over\n{}", proxy.stderr_tail());
    assert_eq!(
        metric(
            &samples,
            "ringway_flows_closed_total",
            &[("reason", "client_reset")]
        ),
        1.0
    );
    proxy.assert_running();
    // The pipe the flow held was closed, not reused: the next bulk flow still gets a clean one.
    let reply = upload(&start(&Backend::start(Kind::Sink), &[]), 3, 8 << 20);
    assert!(reply > 0);
}

#[test]
fn splice_off_keeps_every_byte_on_the_buffered_path() {
    const LEN: u64 = 24 << 20;
    let sink = Backend::start(Kind::Sink);
    let proxy = start(&sink, &["--splice", "off"]);
    let reply = upload(&proxy, 12, LEN);
    let (done, samples) = scrape_until(&proxy, |s| {
        bytes(s, "client_to_backend") == LEN as f64 && bytes(s, "backend_to_client") == reply as f64
    });
    assert!(done, "byte counters\n{}", proxy.stderr_tail());
    assert_eq!(metric(&samples, "ringway_spliced_bytes_total", &[]), 0.0);

    // The same from the environment, for a whole test run on the buffered path.
    let arg = sink.arg();
    let proxy = Proxy::start_with_env(
        &[
            "--listen",
            "127.0.0.1:0",
            "--backend",
            &arg,
            "--admin",
            "127.0.0.1:0",
        ],
        &[("RINGWAY_SPLICE", "off")],
    );
    upload(&proxy, 13, LEN);
    let (_, samples) = scrape_until(&proxy, |s| bytes(s, "client_to_backend") == LEN as f64);
    assert_eq!(metric(&samples, "ringway_spliced_bytes_total", &[]), 0.0);
}

#[test]
fn a_bad_splice_value_is_refused_naming_the_flag() {
    let out = run_to_exit(
        &[
            "--listen",
            "127.0.0.1:0",
            "--backend",
            "127.0.0.1:9",
            "--splice",
            "yes",
        ],
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("--splice") && out.stderr.contains("not one of auto, off"),
        "{}",
        out.stderr
    );
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);
}

#[test]
fn request_response_traffic_never_takes_a_pipe() {
    let echo = Backend::echo();
    let proxy = start(&echo, &[]);
    let mut client = connect(proxy.addr).unwrap();
    for i in 0..2000u32 {
        echo_roundtrip(&mut client, format!("request {i}").as_bytes()).unwrap();
    }
    // A large reply once is not a stream either.
    let mut big = vec![0u8; 65536];
    client.write_all(&big).unwrap();
    client.read_exact(&mut big).unwrap();
    drop(client);
    let (_, samples) = scrape_until(&proxy, |s| metric(s, "ringway_flows_active", &[]) == 0.0);
    assert!(
        samples
            .iter()
            .any(|s| s.name == "ringway_spliced_bytes_total"),
        "no splice counter"
    );
    assert_eq!(metric(&samples, "ringway_spliced_bytes_total", &[]), 0.0);
    assert!(metric(&samples, "ringway_bytes_total", &[]) > 2000.0 * 10.0);
}

#[test]
fn spliced_bytes_count_as_activity_and_a_quiet_spliced_flow_times_out() {
    const LEN: u64 = 96 << 20;
    let stream = Backend::start(Kind::Stream);
    let proxy = start(&stream, &["--idle-timeout", "1s"]);
    // A download read slowly over about three idle timeouts: it moves bytes all the time
    // (through the pipe), so it must not be cut.
    let mut client = request_stream(&proxy, LEN);
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    let started = std::time::Instant::now();
    while pos < LEN {
        let n = client
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("at {pos}: {e}\n{}", proxy.stderr_tail()));
        assert!(n > 0, "cut at {pos} of {LEN}\n{}", proxy.stderr_tail());
        check_pattern(LEN, pos, &buf[..n]).unwrap_or_else(|i| panic!("byte {}", pos + i as u64));
        pos += n as u64;
        // Pace the reader: about 32 MiB a second.
        let due = Duration::from_secs_f64(pos as f64 / (32 << 20) as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            thread::sleep(wait);
        }
    }
    drop(client);
    let (_, samples) = scrape_until(&proxy, |s| metric(s, "ringway_flows_active", &[]) == 0.0);
    assert_eq!(
        metric(
            &samples,
            "ringway_flows_closed_total",
            &[("reason", "idle_timeout")]
        ),
        0.0,
        "a flow moving bytes was cut as idle"
    );
    assert!(metric(&samples, "ringway_spliced_bytes_total", &[]) >= (LEN - 4 * BUDGET) as f64);

    // An echo flow that went through splice and then goes quiet is closed by the idle
    // timeout: its poll is cancelled and its pipe comes back.
    let echo = Backend::echo();
    let proxy = start(&echo, &["--idle-timeout", "1s"]);
    let mut client = connect(proxy.addr).unwrap();
    let mut rd = client.try_clone().unwrap();
    let reader = thread::spawn(move || read_pattern_exact(&mut rd, 5, 8 << 20));
    write_pattern(&mut client, 5, 8 << 20).unwrap();
    reader.join().unwrap().unwrap();
    assert!(metric(&scrape(&proxy), "ringway_spliced_bytes_total", &[]) > 0.0);
    let (how, _) = expect_closed(&mut client, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("quiet spliced flow: {e}\n{}", proxy.stderr_tail()));
    eprintln!("quiet spliced flow ended with {how:?}");
    let (done, _) = scrape_until(&proxy, |s| {
        metric(
            s,
            "ringway_flows_closed_total",
            &[("reason", "idle_timeout")],
        ) == 1.0
            && metric(s, "ringway_splice_pipes_in_use", &[]) == 0.0
    });
    assert!(
        done,
        "not closed as idle, or its pipe kept\n{}",
        proxy.stderr_tail()
    );
}
