//! Relay semantics end to end: bytes arrive exactly, both ways at once, over many concurrent
//! flows; half-close in each direction; resets in each direction; a client that stops reading.

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Size of one flow: mostly small, some large, some of several MB, a few empty.
/// About 330 KiB on average.
fn flow_size(rng: &mut Rng, id: usize) -> u64 {
    if id % 256 == 1 {
        return rng.range(4 << 20, 6 << 20);
    }
    match rng.range(0, 99) {
        0..=4 => 0,
        5..=49 => rng.range(1, 2 << 10),
        50..=74 => rng.range((2 << 10) + 1, 128 << 10),
        75..=89 => rng.range((128 << 10) + 1, 1 << 20),
        _ => rng.range((1 << 20) + 1, 4 << 20),
    }
}

/// One flow: connect from `src`, wait for the gate, then write `size` bytes of stream `key`
/// while reading them back from the echo backend, half-close, and expect exactly those bytes
/// followed by EOF.
fn run_flow(
    proxy: std::net::SocketAddr,
    src: std::net::IpAddr,
    key: u64,
    size: u64,
    gate: &Gate,
) -> Result<(), String> {
    let connected = connect_from(src, proxy);
    gate.arrive();
    let mut stream = connected.map_err(|e| format!("connect from {src}: {e}"))?;
    if !gate.wait_open(Duration::from_secs(120)) {
        return Err("gate never opened".into());
    }
    let mut rd = stream.try_clone().map_err(|e| format!("try_clone: {e}"))?;
    let reader = thread::Builder::new()
        .stack_size(SMALL_STACK)
        .spawn(move || read_pattern_to_eof(&mut rd, key, size))
        .map_err(|e| format!("spawn reader: {e}"))?;
    let written = write_pattern(&mut stream, key, size)
        .and_then(|()| stream.shutdown(Shutdown::Write))
        .map_err(|e| format!("write/shutdown: {e}"));
    let read = reader
        .join()
        .unwrap_or_else(|_| Err("reader panicked".into()))
        .map_err(|e| format!("read: {e}"));
    written?;
    read
}

/// Runs one flow per entry of `sizes` through `proxy` to the echo `backends`, all open at
/// once: every client connects first, and the bytes start only when the backends hold every
/// flow open at the same time. Checks every byte both ways. Clients use 64 source IPs.
fn relay_concurrently(proxy: &mut Proxy, backends: &[Backend], sizes: &[u64], seed: u64) {
    let flows = sizes.len();
    let total: u64 = sizes.iter().sum();
    let gate = Arc::new(Gate::default());
    let failures = Arc::new(Mutex::new(Vec::new()));
    let mut threads = Vec::new();
    for (id, &size) in sizes.iter().enumerate() {
        let (flow_gate, failures, addr) = (gate.clone(), failures.clone(), proxy.addr);
        let src = client_ip(10 + (id % 64) as u8);
        let key = seed.wrapping_add(id as u64);
        let spawned = thread::Builder::new()
            .stack_size(SMALL_STACK)
            .spawn(move || {
                if let Err(e) = run_flow(addr, src, key, size, &flow_gate) {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("flow {id} ({size} bytes from {src}): {e}"));
                }
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                gate.open();
                panic!("spawning flow thread {id}: {e}");
            }
        }
    }

    // All clients connected, and the proxy holds every flow open to a backend at once.
    let arrived = gate.wait_arrived(flows, Duration::from_secs(90));
    let all_open = wait_until(Duration::from_secs(90), || {
        backends.iter().map(Backend::open).sum::<usize>() >= flows
    });
    let open_at_start: usize = backends.iter().map(Backend::open).sum();
    let started = Instant::now();
    gate.open();
    for t in threads {
        t.join().expect("flow thread panicked");
    }
    eprintln!(
        "{flows} flows, {total} bytes each way, relayed in {:?}",
        started.elapsed()
    );
    proxy.assert_running();

    let failures = failures.lock().unwrap();
    let spread: Vec<usize> = backends.iter().map(Backend::accepted).collect();
    assert!(
        failures.is_empty(),
        "{} of {flows} flows failed (seed {seed}, {total} bytes each way); first ones:\n{}\n{}",
        failures.len(),
        failures
            .iter()
            .take(15)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n"),
        proxy.stderr_tail()
    );
    assert_eq!(arrived, flows, "only {arrived} clients connected");
    assert!(
        all_open,
        "the backends never saw all {flows} flows open at once (at most {open_at_start}); \
         connections accepted per backend: {spread:?}\n{}",
        proxy.stderr_tail()
    );
    assert!(
        spread.iter().sum::<usize>() >= flows,
        "backends accepted {spread:?} connections for {flows} flows"
    );
}

fn start_proxy(backends: &[Backend], extra: &[&str]) -> Proxy {
    let mut args = vec!["--listen".to_string(), "127.0.0.1:0".to_string()];
    for b in backends {
        args.push("--backend".into());
        args.push(b.arg());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    Proxy::start(&args)
}

#[test]
fn thousand_concurrent_flows_of_random_sizes_relay_every_byte() {
    const FLOWS: usize = 1024;
    let seed = test_seed();
    let backends: Vec<Backend> = (0..3).map(|_| Backend::echo()).collect();
    let mut proxy = start_proxy(&backends, &[]);
    let mut rng = Rng::new(seed);
    let sizes: Vec<u64> = (0..FLOWS).map(|id| flow_size(&mut rng, id)).collect();
    relay_concurrently(&mut proxy, &backends, &sizes, seed);
}

#[test]
fn flows_outnumbering_relay_buffers_still_relay_every_byte() {
    // One worker with 64 buffers of 4 KiB and 200 busy flows: the buffer ring runs dry
    // (ENOBUFS) again and again; flows must wait for buffers, not fail or lose bytes.
    let seed = test_seed();
    let backends = vec![Backend::echo()];
    let mut proxy = start_proxy(
        &backends,
        &["--workers", "1", "--buffers", "64", "--buffer-size", "4096"],
    );
    let mut rng = Rng::new(seed ^ 0xB0F);
    let sizes: Vec<u64> = (0..200).map(|_| rng.range(64 << 10, 1 << 20)).collect();
    relay_concurrently(&mut proxy, &backends, &sizes, seed);
}

#[test]
fn small_buffer_rings_relay_every_byte() {
    // --buffers takes any power of two; the small ones must work too (and run dry at once).
    for buffers in ["16", "32"] {
        let seed = test_seed();
        let backends = vec![Backend::echo()];
        let mut proxy = start_proxy(
            &backends,
            &[
                "--workers",
                "1",
                "--buffers",
                buffers,
                "--buffer-size",
                "4096",
            ],
        );
        let sizes = vec![256 << 10; 20];
        relay_concurrently(&mut proxy, &backends, &sizes, seed);
    }
}

#[test]
fn max_conns_holds_extra_clients_until_a_flow_ends() {
    let backend = Backend::hello("only");
    let proxy = start_proxy(
        std::slice::from_ref(&backend),
        &["--workers", "1", "--max-conns", "2"],
    );
    let mut first = connect(proxy.addr).unwrap();
    let mut second = connect(proxy.addr).unwrap();
    for s in [&mut first, &mut second] {
        assert_eq!(read_line(s).unwrap(), "only");
    }
    // The kernel completes the third client's handshake, but the proxy must not serve it
    // while two flows are open. (Waiting for something not to happen needs a wait; a slow
    // proxy cannot make this fail wrongly.)
    let mut third = connect(proxy.addr).unwrap();
    third
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut byte = [0u8; 1];
    match third.read(&mut byte) {
        Err(e) if classify(&e) == Closed::TimedOut => {}
        other => panic!(
            "third client with --max-conns 2 and two open flows: want to wait, got {other:?}\n{}",
            proxy.stderr_tail()
        ),
    }

    // One flow ends: the waiting client is served.
    drop(first);
    third.set_read_timeout(Some(CLOSE_TIMEOUT)).unwrap();
    let greeting = read_line(&mut third).unwrap_or_else(|e| {
        panic!(
            "waiting client after a flow ended: {e}\n{}",
            proxy.stderr_tail()
        )
    });
    assert_eq!(greeting, "only");
    echo_roundtrip(&mut third, b"served").unwrap();
    echo_roundtrip(&mut second, b"still served").unwrap();
}

fn start_limited(backend: &crowd::CountingBackend, limit: usize, extra: &[&str]) -> Proxy {
    let limit = limit.to_string();
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--max-conns",
        &limit,
        "--idle-timeout",
        "0",
    ];
    let backend = backend.arg();
    args.extend(["--backend", &backend]);
    args.extend(extra);
    Proxy::start(&args)
}

/// Fails unless every client was served and none was turned away, and the backend never had
/// more than `limit` connections open at once.
fn check_crowd(
    crowd: &crowd::Crowd,
    backend: &crowd::CountingBackend,
    limit: usize,
    proxy: &Proxy,
) {
    let waiting = crowd.count(crowd::Fate::Waiting);
    assert!(
        crowd.turned_away.is_empty() && waiting == 0,
        "--max-conns {limit}, {} clients: {waiting} still waiting after the deadline, {} turned \
         away by the proxy: {:?}\n{}",
        crowd.len(),
        crowd.turned_away.len(),
        &crowd.turned_away[..crowd.turned_away.len().min(5)],
        proxy.stderr_tail()
    );
    assert!(
        backend.max_open() <= limit,
        "--max-conns {limit}: up to {} backend connections were open at once",
        backend.max_open()
    );
    assert_eq!(
        backend.accepted(),
        crowd.len(),
        "one backend connection per client"
    );
}

/// `--max-conns` under a crowd: 1500 clients connect at once to two workers limited to 40
/// flows. Each client resets its connection as soon as it is served, so flows end while
/// others wait and both workers keep starting flows as room comes back. At no moment may more
/// than `--max-conns` flows reach the backend (the counting backend sees a connection the proxy
/// closed before one it opened afterwards), and every client waits and is served.
#[test]
fn max_conns_bounds_backend_connections_under_a_crowd_of_two_workers() {
    const LIMIT: usize = 40;
    const CLIENTS: usize = 1500;
    raise_nofile(CLIENTS as u64 + 500);
    let backend = crowd::CountingBackend::start();
    let proxy = start_limited(&backend, LIMIT, &[]);
    let mut crowd = crowd::Crowd::default();
    for i in 0..CLIENTS {
        let s = connect(proxy.addr)
            .unwrap_or_else(|e| panic!("client {i}: {e}\n{}", proxy.stderr_tail()));
        crowd.push(s);
    }
    crowd.churn(Duration::from_secs(60));
    check_crowd(&crowd, &backend, LIMIT, &proxy);
}

/// A burst that reaches a busy proxy close to `--max-conns`: the clients that do not fit must
/// wait in the kernel's listen queue, not be accepted into the process. Documented bound: at
/// most `--max-conns` flows, and at most one accepted connection per worker waiting for room.
///
/// The proxy is far enough from the limit at first that it accepts with multishot accepts
/// (more room than every worker's listen backlog, 2 x (32 + 64)); it then holds all but ten
/// flows, and is stopped while a burst of 40 clients queues up (the burst fits the two listen
/// queues). When it continues, ten clients are served, and its descriptors show how many more
/// it accepted: two per flow, its own, and at most one per worker.
#[test]
fn max_conns_leaves_a_burst_in_the_backlog_beyond_one_per_worker() {
    const LIMIT: usize = 250;
    const ROOM: usize = 10;
    const BURST: usize = 40;
    const WORKERS: usize = 2;
    let backend = crowd::CountingBackend::start();
    let proxy = start_limited(&backend, LIMIT, &["--listen-backlog", "32"]);
    let own_fds = crowd::open_fds(proxy.pid());
    let mut crowd = crowd::Crowd::default();
    for i in 0..LIMIT - ROOM {
        crowd
            .connect_served(proxy.addr, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("held flow {i}: {e}\n{}", proxy.stderr_tail()));
    }
    crowd::freeze(proxy.pid());
    for i in 0..BURST {
        let s = connect(proxy.addr).unwrap_or_else(|e| panic!("burst client {i}: {e}"));
        crowd.push(s);
    }
    crowd::thaw(proxy.pid());
    let filled = crowd.pump_until(Duration::from_secs(10), |c| {
        c.count(crowd::Fate::Served) >= LIMIT || !c.turned_away.is_empty()
    });
    assert!(
        filled && crowd.turned_away.is_empty(),
        "after the burst: {} served of {LIMIT} flows, turned away: {:?}\n{}",
        crowd.count(crowd::Fate::Served),
        crowd.turned_away,
        proxy.stderr_tail()
    );
    let fds = crowd::open_fds(proxy.pid());
    let accepted_beyond = fds.saturating_sub(own_fds + 2 * LIMIT);
    assert!(
        accepted_beyond <= WORKERS,
        "at --max-conns {LIMIT} the proxy held {fds} descriptors: {own_fds} of its own, \
         {} for the flows, and {accepted_beyond} connections accepted beyond the limit \
         (at most one per worker may wait in the process; the rest belong in the backlog)",
        2 * LIMIT
    );
    crowd.churn(Duration::from_secs(60));
    check_crowd(&crowd, &backend, LIMIT, &proxy);
}

#[test]
fn client_half_close_delivers_all_bytes_then_eof_and_reply_still_flows() {
    const LEN: u64 = 3 << 20;
    let sink = Backend::start(Kind::Sink);
    let proxy = Proxy::start(&["--listen", "127.0.0.1:0", "--backend", &sink.arg()]);
    let mut client = connect(proxy.addr).unwrap();
    write_pattern(&mut client, 7, LEN).unwrap();
    client.shutdown(Shutdown::Write).unwrap();

    // The sink replies only after it saw EOF: the reply proves the backend got our FIN after
    // all the bytes, and that the backend-to-client direction still works after it.
    let reply = read_line(&mut client)
        .unwrap_or_else(|e| panic!("no reply after half-close: {e}\n{}", proxy.stderr_tail()));
    let want = format!("{LEN} {:016x}", digest(&pattern_vec(7, LEN as usize)));
    assert_eq!(reply, want, "backend received different bytes (len digest)");
    let (how, _) = expect_closed(&mut client, CLOSE_TIMEOUT)
        .unwrap_or_else(|e| panic!("after the reply: {e}\n{}", proxy.stderr_tail()));
    assert_eq!(
        how,
        Closed::Eof,
        "backend closed cleanly, client should see EOF"
    );
    match sink.next_event(CLOSE_TIMEOUT) {
        Some(Event::Sunk { how, len, .. }) => {
            assert_eq!((how, len), (Closed::Eof, LEN), "what the backend saw")
        }
        other => panic!("sink event: {other:?}"),
    }
}

#[test]
fn backend_half_close_delivers_eof_and_client_can_still_send() {
    const DOWN: u64 = 2 << 20;
    const UP: u64 = 1 << 20;
    let backend = Backend::start(Kind::HalfCloser { bytes: DOWN });
    let proxy = Proxy::start(&["--listen", "127.0.0.1:0", "--backend", &backend.arg()]);
    let mut client = connect(proxy.addr).unwrap();

    // All of the backend's bytes, then EOF, while our write side is still open.
    read_pattern_to_eof(&mut client, HALF_CLOSE_KEY, DOWN).unwrap_or_else(|e| {
        panic!(
            "reading the backend's stream before its FIN: {e}\n{}",
            proxy.stderr_tail()
        )
    });
    // The other direction keeps flowing after the backend's FIN.
    write_pattern(&mut client, 99, UP)
        .unwrap_or_else(|e| panic!("writing after backend half-close: {e}"));
    client.shutdown(Shutdown::Write).unwrap();
    match backend.next_event(Duration::from_secs(30)) {
        Some(Event::Sunk {
            how,
            len,
            digest: d,
            ..
        }) => {
            assert_eq!(how, Closed::Eof, "backend should see our FIN as EOF");
            assert_eq!(len, UP, "bytes the backend received after its half-close");
            assert_eq!(d, digest(&pattern_vec(99, UP as usize)), "content differs");
        }
        other => panic!(
            "backend did not get our bytes + FIN after its half-close: {other:?}\n{}",
            proxy.stderr_tail()
        ),
    }
    let (how, _) = expect_closed(&mut client, CLOSE_TIMEOUT).unwrap();
    assert_eq!(how, Closed::Eof);
}

#[test]
fn backend_reset_mid_stream_tears_down_client_without_losing_or_adding_bytes() {
    const PREFIX: u64 = 256 << 10;
    const READ: u64 = 64 << 10;
    let backend = Backend::start(Kind::Reset {
        prefix: PREFIX,
        read: READ,
    });
    let proxy = Proxy::start(&["--listen", "127.0.0.1:0", "--backend", &backend.arg()]);
    let mut client = connect(proxy.addr).unwrap();

    // Everything the backend sent before its RST arrives (we read it all before we send the
    // bytes that trigger the reset, so none of it can be in flight when the RST happens).
    read_pattern_exact(&mut client, RESET_PREFIX_KEY, PREFIX)
        .unwrap_or_else(|e| panic!("prefix: {e}\n{}", proxy.stderr_tail()));
    write_pattern(&mut client, 5, READ).unwrap();
    match backend.next_event(Duration::from_secs(30)) {
        Some(Event::ResetSent { received, .. }) => assert_eq!(received, READ),
        other => panic!("reset backend: {other:?}\n{}", proxy.stderr_tail()),
    }

    // Then the client sees the connection end: a reset, or at least EOF; no extra bytes.
    let (how, _) = expect_closed(&mut client, CLOSE_TIMEOUT)
        .unwrap_or_else(|e| panic!("client after backend RST: {e}\n{}", proxy.stderr_tail()));
    eprintln!("client saw the backend's RST as {how:?}");

    // And the connection is really gone: writing fails (soon) instead of vanishing forever.
    let deadline = Instant::now() + CLOSE_TIMEOUT;
    let chunk = vec![0u8; 16 << 10];
    let write_error = loop {
        match client.write(&chunk) {
            Ok(_) if Instant::now() < deadline => {}
            Ok(_) => panic!(
                "client writes still accepted {CLOSE_TIMEOUT:?} after the backend reset\n{}",
                proxy.stderr_tail()
            ),
            Err(e) => break e,
        }
    };
    assert!(
        matches!(
            write_error.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
        "write after backend reset failed oddly: {write_error}"
    );
}

#[test]
fn client_reset_closes_backend_connection() {
    let echo = Backend::echo();
    let mut proxy = Proxy::start(&["--listen", "127.0.0.1:0", "--backend", &echo.arg()]);
    let mut client = connect(proxy.addr).unwrap();
    echo_roundtrip(&mut client, b"ping").unwrap();
    // Leave some bytes in flight (echoed back but never read), then reset.
    write_pattern(&mut client, 3, 256 << 10).unwrap();
    reset(client);

    match echo.next_event(CLOSE_TIMEOUT) {
        Some(Event::Closed { how, .. }) => {
            eprintln!("backend saw the client's RST as {how:?}");
            assert!(
                how.is_closed() || how == Closed::Other(std::io::ErrorKind::BrokenPipe),
                "backend connection ended oddly: {how:?}"
            );
        }
        other => panic!(
            "backend connection not closed within {CLOSE_TIMEOUT:?} of the client's RST: \
             {other:?}\n{}",
            proxy.stderr_tail()
        ),
    }
    // The proxy carries on serving.
    proxy.assert_running();
    let mut again = connect(proxy.addr).unwrap();
    echo_roundtrip(&mut again, b"still there?").unwrap();
}

/// Starts a flow to a `Stream` backend asking for `total` bytes.
fn request_stream(proxy: &Proxy, total: u64) -> std::net::TcpStream {
    let mut client = connect(proxy.addr).unwrap();
    client.write_all(&total.to_le_bytes()).unwrap();
    client
}

/// Waits for the stream backend to block on a client that reads nothing.
fn wait_for_stall(backend: &Backend, proxy: &Proxy, total: u64) {
    match backend.next_event(Duration::from_secs(60)) {
        Some(Event::Stalled { written, .. }) => {
            eprintln!("backend blocked after writing {written} of {total} bytes");
        }
        Some(Event::Streamed {
            written,
            error: None,
            ..
        }) => panic!(
            "the backend wrote all {written} bytes to a client that read nothing: the proxy \
             buffered the whole stream instead of applying backpressure\n{}",
            proxy.stderr_tail()
        ),
        other => panic!("stream backend: {other:?}\n{}", proxy.stderr_tail()),
    }
}

const SMALL_POOL: [&str; 4] = ["--buffer-size", "16384", "--buffers", "256"];

#[test]
fn slow_reader_gets_backpressure_then_every_byte_in_order() {
    const TOTAL: u64 = 96 << 20;
    let backend = Backend::start(Kind::Stream);
    let mut args = vec!["--listen", "127.0.0.1:0", "--backend"];
    let arg = backend.arg();
    args.push(&arg);
    args.extend(SMALL_POOL);
    let mut proxy = Proxy::start(&args);

    let mut client = request_stream(&proxy, TOTAL);
    wait_for_stall(&backend, &proxy, TOTAL);
    proxy.assert_running();

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
fn slow_reader_does_not_stall_other_flows() {
    const SLOW: u64 = 96 << 20;
    const OTHER: u64 = 4 << 20;
    let backend = Backend::start(Kind::Stream);
    // One worker, so both flows share its buffers and event loop.
    let mut args = vec!["--listen", "127.0.0.1:0", "--workers", "1", "--backend"];
    let arg = backend.arg();
    args.push(&arg);
    args.extend(SMALL_POOL);
    let proxy = Proxy::start(&args);

    let mut slow = request_stream(&proxy, SLOW);
    wait_for_stall(&backend, &proxy, SLOW);

    let mut other = request_stream(&proxy, OTHER);
    other
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    read_pattern_to_eof(&mut other, OTHER, OTHER).unwrap_or_else(|e| {
        panic!(
            "a second flow on the same worker while another client is not reading: {e}\n{}",
            proxy.stderr_tail()
        )
    });

    read_pattern_to_eof(&mut slow, SLOW, SLOW)
        .unwrap_or_else(|e| panic!("slow reader, once it reads: {e}\n{}", proxy.stderr_tail()));
}

#[test]
fn zero_byte_flow_closes_cleanly() {
    let echo = Backend::echo();
    let proxy = Proxy::start(&["--listen", "127.0.0.1:0", "--backend", &echo.arg()]);
    let mut client = connect(proxy.addr).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let (how, _) = expect_closed(&mut client, CLOSE_TIMEOUT)
        .unwrap_or_else(|e| panic!("empty flow: {e}\n{}", proxy.stderr_tail()));
    assert_eq!(how, Closed::Eof);
    // The backend connection ends with EOF too. (Its event is `Empty`, as is that of any
    // check connection the proxy makes, so wait for an `Empty` that ended with EOF.)
    let deadline = Instant::now() + CLOSE_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match echo.next_event_any(left) {
            Some(Event::Empty {
                how: Closed::Eof, ..
            }) => break,
            Some(Event::Empty { .. }) => {}
            other => panic!("backend: {other:?}\n{}", proxy.stderr_tail()),
        }
    }
    let mut buf = [0u8; 1];
    assert_eq!(client.read(&mut buf).unwrap(), 0);
}

#[test]
fn backend_that_stops_reading_backpressures_the_client() {
    const TOTAL: u64 = 96 << 20;
    let gate = Arc::new(Gate::default());
    let backend = Backend::start(Kind::LateSink(gate.clone()));
    let arg = backend.arg();
    let mut args = vec!["--listen", "127.0.0.1:0", "--backend", &arg];
    args.extend(SMALL_POOL);
    let proxy = Proxy::start(&args);
    let mut client = connect(proxy.addr).unwrap();

    // Write until a write blocks for a second: the chain to the backend is full.
    client
        .set_write_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let mut sent = 0u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while sent < TOTAL && Instant::now() < deadline {
        let chunk = pattern_slice(TOTAL, sent, (TOTAL - sent).min(64 << 10) as usize);
        match client.write(chunk) {
            Ok(n) => sent += n as u64,
            Err(e) if classify(&e) == Closed::TimedOut => break,
            Err(e) => panic!("write after {sent} bytes: {e}\n{}", proxy.stderr_tail()),
        }
    }
    assert!(
        sent < TOTAL,
        "all {TOTAL} bytes were accepted while the backend read nothing: the proxy buffered \
         the whole upload instead of applying backpressure\n{}",
        proxy.stderr_tail()
    );
    eprintln!("client blocked after writing {sent} of {TOTAL} bytes");

    // The backend starts reading: the rest goes through, and every byte arrives.
    gate.open();
    client.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    while sent < TOTAL {
        let chunk = pattern_slice(TOTAL, sent, (TOTAL - sent).min(64 << 10) as usize);
        client.write_all(chunk).unwrap_or_else(|e| {
            panic!(
                "write after backend resumed, at {sent}: {e}\n{}",
                proxy.stderr_tail()
            )
        });
        sent += chunk.len() as u64;
    }
    client.shutdown(Shutdown::Write).unwrap();
    let reply = read_line(&mut client)
        .unwrap_or_else(|e| panic!("sink reply: {e}\n{}", proxy.stderr_tail()));
    let mut h = xxhash_rust::xxh3::Xxh3Default::new();
    let mut pos = 0u64;
    while pos < TOTAL {
        let chunk = pattern_slice(TOTAL, pos, (TOTAL - pos).min(1 << 20) as usize);
        h.update(chunk);
        pos += chunk.len() as u64;
    }
    assert_eq!(
        reply,
        format!("{TOTAL} {:016x}", h.digest()),
        "len and digest at the backend"
    );
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(usize::MAX)
}

#[test]
fn flows_ending_in_every_way_leak_no_slots_or_descriptors() {
    // With --max-conns 8, a flow slot that is not released after a flow ends soon makes new
    // clients wait forever; a descriptor that is not closed shows in /proc/PID/fd.
    let echo = Backend::echo();
    let mut proxy = start_proxy(
        std::slice::from_ref(&echo),
        &["--workers", "1", "--max-conns", "8"],
    );
    // The first 20 flows warm up whatever the proxy opens lazily; the count after them is
    // the baseline. A leak in any of the five endings would add about 60 descriptors.
    let mut baseline = 0;
    for i in 0..320u64 {
        if i == 20 {
            baseline = open_fds(proxy.pid());
        }
        let mut s = connect(proxy.addr).unwrap();
        s.set_read_timeout(Some(CLOSE_TIMEOUT)).unwrap();
        let ending = i % 5;
        let step = || format!("flow {i} (ending {ending})");
        match ending {
            // Echo, then a normal close from the client.
            0 => echo_roundtrip(&mut s, b"hello")
                .unwrap_or_else(|e| panic!("{}: {e}\n{}", step(), proxy.stderr_tail())),
            // Echo, then the client resets.
            1 => {
                echo_roundtrip(&mut s, b"hello")
                    .unwrap_or_else(|e| panic!("{}: {e}\n{}", step(), proxy.stderr_tail()));
                reset(s);
                continue;
            }
            // Client connects and leaves at once.
            2 => {}
            // Client resets at once, maybe before the backend connect completes.
            3 => {
                reset(s);
                continue;
            }
            // Half-close, wait for the echo side's EOF, then close.
            _ => {
                s.write_all(b"bye").unwrap();
                s.shutdown(Shutdown::Write).unwrap();
                let mut back = Vec::new();
                s.read_to_end(&mut back)
                    .unwrap_or_else(|e| panic!("{}: {e}\n{}", step(), proxy.stderr_tail()));
                assert_eq!(back, b"bye", "{}", step());
            }
        }
        drop(s);
    }
    // Every flow slot is free again: eight flows at once still work.
    let mut flows: Vec<_> = (0..8).map(|_| connect(proxy.addr).unwrap()).collect();
    for (i, f) in flows.iter_mut().enumerate() {
        f.set_read_timeout(Some(CLOSE_TIMEOUT)).unwrap();
        echo_roundtrip(f, b"after").unwrap_or_else(|e| {
            panic!(
                "flow {i} of 8 after 320 ended flows (--max-conns 8): {e}\n{}",
                proxy.stderr_tail()
            )
        });
    }
    drop(flows);
    proxy.assert_running();
    // And every descriptor is closed once the flows are gone.
    let settled = wait_until(CLOSE_TIMEOUT, || open_fds(proxy.pid()) <= baseline + 4);
    eprintln!(
        "ringway fds: {baseline} before, {} after",
        open_fds(proxy.pid())
    );
    assert!(
        settled,
        "ringway had {baseline} fds after 20 flows, {} after 308 more ended",
        open_fds(proxy.pid())
    );
}
