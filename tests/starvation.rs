//! Stalled flows against the shared buffer pool: a reader that never reads, or a backend that
//! never reads, must hold no more than its budget of relay buffers, and however many of them
//! there are, every other client keeps being served.

mod common;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::admin::{admin_addr, http_get, parse_metrics};
use common::*;
use socket2::{Domain, Socket, Type};

/// The value of an unlabelled metric from `/metrics`, if the proxy exports it.
fn gauge(admin: SocketAddr, name: &str) -> Option<f64> {
    let (_, body) = http_get(admin, "/metrics");
    parse_metrics(&body)
        .iter()
        .find(|s| s.name == name)
        .map(|s| s.value)
}

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kib * 1024
}

#[test]
fn readers_that_never_read_hold_at_most_four_buffers_each() {
    const READERS: usize = 20;
    const STREAM: u64 = 256 << 20;
    let backend = Backend::start(Kind::Stream);
    let proxy = Proxy::start(&[
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "1",
        "--admin",
        "127.0.0.1:0",
        "--backend",
        &backend.arg(),
    ]);
    let admin = admin_addr(&proxy);
    let before = rss(proxy.pid());
    let mut clients = Vec::new();
    for _ in 0..READERS {
        let mut client = connect(proxy.addr).unwrap();
        client.write_all(&STREAM.to_le_bytes()).unwrap();
        clients.push(client);
    }
    // Every stream backs up to its backend: each write there blocked for a second.
    for _ in 0..READERS {
        match backend.next_event(Duration::from_secs(60)) {
            Some(Event::Stalled { .. }) => {}
            other => panic!("stream backend: {other:?}\n{}", proxy.stderr_tail()),
        }
    }
    let grown = rss(proxy.pid()).saturating_sub(before);
    let budget = READERS as u64 * 4 * 65536;
    let in_use = gauge(admin, "ringway_buffers_in_use");
    eprintln!(
        "{READERS} stalled readers: RSS grew {} KiB (budget {} KiB), buffers in use: {in_use:?}",
        grown / 1024,
        budget / 1024
    );
    assert!(
        in_use.is_some_and(|n| n <= (READERS * 4) as f64),
        "{READERS} stalled readers hold {in_use:?} relay buffers; at most 4 each is the promise"
    );
    // The buffers' pages, plus slack for the pages of the buffers that cycled through the ring
    // while the streams ran (up to the ring's depth) and everything else that moved. Before the
    // bound held, these 20 readers grew RSS by about 100 MiB.
    assert!(
        grown <= budget + (24 << 20),
        "{READERS} stalled readers grew the proxy's RSS by {} KiB; 4 buffers each is {} KiB",
        grown / 1024,
        budget / 1024
    );
    drop(clients);
}

/// A test backend whose connections choose their behaviour with their first byte: `E` echoes,
/// `D` streams bytes until the connection breaks, `S` reads nothing more until the test ends.
struct MixedBackend {
    addr: SocketAddr,
    /// Connections that reached their behaviour (read their first byte).
    started: Arc<AtomicUsize>,
    /// Opened at the end of the test: the `S` connections then close.
    release: Arc<(Mutex<bool>, Condvar)>,
}

impl MixedBackend {
    fn start() -> MixedBackend {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let started = Arc::new(AtomicUsize::new(0));
        let release = Arc::new((Mutex::new(false), Condvar::new()));
        let (s, r) = (Arc::clone(&started), Arc::clone(&release));
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let (started, release) = (Arc::clone(&s), Arc::clone(&r));
                let spawned = thread::Builder::new()
                    .stack_size(SMALL_STACK)
                    .spawn(move || {
                        let _ = conn.set_read_timeout(Some(BACKEND_IO_TIMEOUT));
                        let _ = conn.set_write_timeout(Some(BACKEND_IO_TIMEOUT));
                        let mut kind = [0u8; 1];
                        if conn.read_exact(&mut kind).is_err() {
                            return;
                        }
                        started.fetch_add(1, Ordering::Relaxed);
                        if kind[0] == b'S' {
                            let (lock, cv) = &*release;
                            let released = lock.lock().unwrap();
                            let _unused = cv
                                .wait_timeout_while(released, BACKEND_IO_TIMEOUT, |r| !*r)
                                .unwrap();
                            return;
                        }
                        if kind[0] == b'D' {
                            let chunk = [b'd'; 16384];
                            while conn.write_all(&chunk).is_ok() {}
                            return;
                        }
                        let mut buf = vec![0u8; 16384];
                        loop {
                            match conn.read(&mut buf) {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    if conn.write_all(&buf[..n]).is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                    });
                if spawned.is_err() {
                    return;
                }
            }
        });
        MixedBackend {
            addr,
            started,
            release,
        }
    }
}

impl Drop for MixedBackend {
    fn drop(&mut self) {
        let (lock, cv) = &*self.release;
        *lock.lock().unwrap() = true;
        cv.notify_all();
    }
}

/// Connects with a small receive buffer (so a client that does not read backs up into the
/// proxy, not into its own kernel buffer) and writes `kind` then up to `bytes` bytes without
/// blocking.
fn stalled_client(proxy: SocketAddr, kind: u8, bytes: usize) -> io::Result<StalledClient> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.set_recv_buffer_size(4096)?;
    socket.connect_timeout(&proxy.into(), Duration::from_secs(10))?;
    let mut stream: TcpStream = socket.into();
    stream.write_all(&[kind])?;
    stream.set_nonblocking(true)?;
    let mut client = StalledClient {
        stream,
        left: bytes,
    };
    client.push();
    Ok(client)
}

/// A client that sends a bounded number of bytes and never reads.
struct StalledClient {
    stream: TcpStream,
    left: usize,
}

impl StalledClient {
    /// Writes what it still has to send, without blocking; returns how many bytes went out.
    fn push(&mut self) -> usize {
        let chunk = [b'x'; 16384];
        let mut sent = 0;
        while self.left > 0 {
            match self.stream.write(&chunk[..chunk.len().min(self.left)]) {
                Ok(n) => {
                    sent += n;
                    self.left -= n;
                }
                Err(_) => break,
            }
        }
        sent
    }
}

/// One fresh connection, one 100-byte echo round trip; its latency, or why it failed.
fn round_trip(proxy: SocketAddr) -> Result<Duration, String> {
    let start = Instant::now();
    let mut client = connect(proxy).map_err(|e| format!("connect: {e}"))?;
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut msg = vec![b'E'];
    msg.extend_from_slice(&[b'n'; 100]);
    client.write_all(&msg).map_err(|e| format!("write: {e}"))?;
    let mut reply = [0u8; 100];
    client
        .read_exact(&mut reply)
        .map_err(|e| format!("no echo within 5 s: {e}"))?;
    Ok(start.elapsed())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Echo round trips of `n` fresh clients, one after another; panics on the first failure.
fn serve_normal_clients(proxy: &Proxy, n: usize, what: &str) -> Vec<Duration> {
    let mut latencies = Vec::with_capacity(n);
    for i in 0..n {
        match round_trip(proxy.addr) {
            Ok(latency) => latencies.push(latency),
            Err(e) => panic!(
                "{what}: normal client {i} of {n} was not served: {e}\n{}",
                proxy.stderr_tail()
            ),
        }
    }
    latencies.sort();
    latencies
}

/// 1,500 stalled flows with default flags (750 clients that never read a download, 750 flows
/// to a backend that never reads), then fresh clients: every one is answered.
///
/// It runs in a namespace of its own whose loopback has an Ethernet MTU: on the host's
/// loopback (64 KiB segments) the kernel grows every socket buffer to megabytes, so 1,500
/// stalled flows would hit the host's TCP memory limit long before they back up into the proxy.
#[test]
fn fifteen_hundred_stalled_flows_never_starve_other_clients() {
    let netns = netns::Netns::new("starve");
    netns.exec(&["ip", "link", "set", "lo", "mtu", "1500"]);
    netns.run(stalled_flows_next_to_fresh_clients);
}

fn stalled_flows_next_to_fresh_clients() {
    const STALLED_EACH: usize = 750;
    const PUSH: usize = 512 << 10;
    const NORMAL: usize = 300;
    let backend = MixedBackend::start();
    let proxy = Proxy::start(&[
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--backend",
        &backend.addr.to_string(),
    ]);
    let admin = admin_addr(&proxy);
    let quiet = serve_normal_clients(&proxy, NORMAL, "before the stalled flows");

    let mut stalled = Vec::new();
    for i in 0..2 * STALLED_EACH {
        let kind = if i % 2 == 0 { b'D' } else { b'S' };
        let push = if kind == b'S' { PUSH } else { 0 };
        match stalled_client(proxy.addr, kind, push) {
            Ok(s) => stalled.push(s),
            Err(e) => panic!("stalled client {i}: {e}\n{}", proxy.stderr_tail()),
        }
    }
    let all = 2 * STALLED_EACH;
    assert!(
        wait_until(Duration::from_secs(60), || backend
            .started
            .load(Ordering::Relaxed)
            >= all + NORMAL),
        "only {} of {} connections reached the backend\n{}",
        backend.started.load(Ordering::Relaxed),
        all + NORMAL,
        proxy.stderr_tail()
    );
    // The uploads have pushed what they could: a whole round of writes moves nothing more.
    let settled = wait_until(Duration::from_secs(60), || {
        stalled.iter_mut().map(StalledClient::push).sum::<usize>() == 0
    });
    assert!(settled, "the stalled clients kept sending for 60 s");
    let held = |name| gauge(admin, name).unwrap_or(-1.0);
    eprintln!(
        "{all} stalled flows: buffers in use {}, spilled bytes {}, reclaims {}, ring ran dry {} times",
        held("ringway_buffers_in_use"),
        held("ringway_spill_bytes"),
        held("ringway_buffer_reclaims_total"),
        held("ringway_buffer_ring_exhausted_total"),
    );

    let loaded = serve_normal_clients(&proxy, NORMAL, "next to 1,500 stalled flows");
    eprintln!(
        "normal echo round trips, fresh connection each ({NORMAL}): without stalled flows \
         p50 {:?} p99 {:?} max {:?}; next to {all} stalled flows p50 {:?} p99 {:?} max {:?}",
        percentile(&quiet, 0.5),
        percentile(&quiet, 0.99),
        quiet[NORMAL - 1],
        percentile(&loaded, 0.5),
        percentile(&loaded, 0.99),
        loaded[NORMAL - 1],
    );
    drop(stalled);
    drop(backend);
}
