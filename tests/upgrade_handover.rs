//! Upgrades that keep every live flow (`--upgrade-socket`, `--takeover`): the running process
//! hands its listeners and its established flows to the successor, which carries on relaying
//! them byte-exact; the old process exits 0 as soon as everything is handed over.
//!
//! The flows are driven through a test backend that picks its behaviour from the first byte a
//! client sends (`Mux`): echo, a sink that reads nothing until a gate opens and then replies with
//! the length and digest of what it got, or a stream of N pattern bytes. Every byte either way
//! is a position in a per-flow pattern, so a byte lost, duplicated, reordered or delivered to
//! the wrong flow is caught.

mod common;

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::*;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Flows exchanging messages both ways all through the upgrades.
const ACTIVE: usize = 2000;
/// Threads driving them.
const DRIVERS: usize = 8;
/// Flows that do one round trip before the first upgrade and the next after the last.
const IDLE: usize = 200;
/// Flows that send a request and half-close before the first upgrade; the backend reads it and
/// replies only after the second.
const LATE_REPLY: usize = 100;
/// More than the backend's receive buffer takes before it reads (about 128 KiB): the rest
/// waits in the proxy.
const LATE_REQUEST: usize = 300_000;
/// Flows whose client reads nothing until after the last upgrade, while the backend streams.
const SLOW: usize = 10;
const SLOW_BYTES: u64 = 16 << 20;
/// Flows whose backend connect is still in progress when the first handover starts.
const MID_CONNECT: usize = 10;

// ---------------------------------------------------------------------------------------------
// The backend
// ---------------------------------------------------------------------------------------------

const ECHO: u8 = b'E';
const LATE_SINK: u8 = b'S';
const STREAM: u8 = b'T';

/// A backend whose behaviour per connection is chosen by the client's first byte: `ECHO`
/// (echo until EOF, then half-close), `LATE_SINK` (wait for the gate, read to EOF, reply
/// `len: u64 LE, digest: u64 LE`, close), `STREAM` (read key and length as u64 LE, write that
/// many pattern bytes, half-close, read to EOF).
struct Mux {
    addr: SocketAddr,
    gate: Arc<Gate>,
}

impl Mux {
    fn start() -> Mux {
        // A deep backlog: thousands of flows connect at once, and an overflowing accept queue
        // resets handshakes answered with syncookies (the test's doing, not the proxy's).
        let (listener, addr) = loopback_listener(4096);
        let gate = Arc::new(Gate::default());
        serve(listener, Arc::clone(&gate));
        Mux { addr, gate }
    }
}

/// A listener on 127.0.0.1, on a port the OS picks, with this accept backlog.
fn loopback_listener(backlog: i32) -> (Socket, SocketAddr) {
    let listener = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
    listener
        .bind(&SockAddr::from(
            "127.0.0.1:0".parse::<SocketAddr>().unwrap(),
        ))
        .unwrap();
    listener.listen(backlog).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    (listener, addr)
}

/// Accepts on `listener` for good, a thread per connection.
fn serve(listener: Socket, gate: Arc<Gate>) {
    thread::Builder::new()
        .name("mux-accept".into())
        .stack_size(SMALL_STACK)
        .spawn(move || loop {
            let Ok((conn, _)) = listener.accept() else {
                continue;
            };
            let gate = Arc::clone(&gate);
            let stream: TcpStream = conn.into();
            let _ = thread::Builder::new()
                .name("mux-conn".into())
                .stack_size(SMALL_STACK)
                .spawn(move || handle(stream, &gate));
        })
        .unwrap();
}

fn handle(mut s: TcpStream, gate: &Gate) {
    s.set_read_timeout(Some(BACKEND_IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(BACKEND_IO_TIMEOUT)).unwrap();
    let mut mode = [0u8];
    if s.read_exact(&mut mode).is_err() {
        return;
    }
    match mode[0] {
        ECHO => {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => {
                        let _ = s.shutdown(Shutdown::Write);
                        return;
                    }
                    Ok(n) => {
                        if s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        }
        LATE_SINK => {
            if !gate.wait_open(Duration::from_secs(120)) {
                return;
            }
            let mut got = Vec::new();
            if s.read_to_end(&mut got).is_err() {
                return;
            }
            let mut reply = (got.len() as u64).to_le_bytes().to_vec();
            reply.extend_from_slice(&digest(&got).to_le_bytes());
            let _ = s.write_all(&reply);
        }
        STREAM => {
            let mut head = [0u8; 16];
            if s.read_exact(&mut head).is_err() {
                return;
            }
            let key = u64::from_le_bytes(head[..8].try_into().unwrap());
            let len = u64::from_le_bytes(head[8..].try_into().unwrap());
            if write_pattern(&mut s, key, len).is_ok() {
                let _ = s.shutdown(Shutdown::Write);
                let _ = s.read_to_end(&mut Vec::new());
            }
        }
        _ => {}
    }
}

/// A backend that does not accept connections until `open`: its accept queue is full, so the
/// kernel drops the proxy's SYNs and the proxy's connects stay in progress (it retransmits).
struct LateBackend {
    addr: SocketAddr,
    listener: Socket,
    fillers: Vec<Socket>,
}

impl LateBackend {
    fn new() -> LateBackend {
        let (listener, addr) = loopback_listener(0);
        let mut fillers = Vec::new();
        for _ in 0..64 {
            let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
            match s.connect_timeout(&SockAddr::from(addr), Duration::from_millis(300)) {
                Ok(()) => fillers.push(s),
                Err(_) => {
                    return LateBackend {
                        addr,
                        listener,
                        fillers,
                    }
                }
            }
        }
        panic!("a backlog-0 listener accepted 64 connections: cannot hold connects here");
    }

    /// Starts accepting (and serving like `Mux`): the proxy's next SYN retransmission connects.
    fn open(self, gate: Arc<Gate>) {
        // A full backlog first: with backlog 0 the kernel answers SYNs with syncookies and then
        // resets a handshake whose last ACK finds the accept queue full (two at once).
        self.listener.listen(4096).unwrap();
        drop(self.fillers);
        serve(self.listener, gate);
    }
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

/// Client source addresses and the backend each maps to (`ringway --show-mapping`).
fn mapping(backends: &[String]) -> BTreeMap<IpAddr, String> {
    let mut argv: Vec<String> = Vec::new();
    for b in backends {
        argv.extend(["--backend".into(), b.clone()]);
    }
    for n in 2..=60u8 {
        argv.extend(["--show-mapping".into(), client_ip(n).to_string()]);
    }
    let out = run_to_exit(&argv, Duration::from_secs(20));
    assert!(out.status.success(), "--show-mapping: {}", out.stderr);
    out.stdout
        .lines()
        .filter_map(|l| {
            let (ip, name) = l.split_once(" -> ")?;
            Some((ip.trim().parse().ok()?, name.trim().to_string()))
        })
        .collect()
}

/// Connects from one of `ips` in turn and sends the mode byte.
fn open_flow(addr: SocketAddr, ips: &[IpAddr], n: usize, mode: u8) -> io::Result<TcpStream> {
    let mut s = connect_from(ips[n % ips.len()], addr)?;
    s.write_all(&[mode])?;
    Ok(s)
}

/// A client with a tiny receive buffer, so what it does not read waits in the proxy.
fn slow_reader(addr: SocketAddr, ip: IpAddr) -> TcpStream {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    s.bind(&SockAddr::from(SocketAddr::new(ip, 0))).unwrap();
    s.connect_timeout(&SockAddr::from(addr), Duration::from_secs(10))
        .unwrap();
    let mut s: TcpStream = s.into();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s.write_all(&[STREAM]).unwrap();
    s
}

/// One echoed message of flow `key` at `pos`; returns its length.
fn round_trip(s: &mut TcpStream, key: u64, pos: u64, len: usize) -> Result<usize, String> {
    let msg = pattern_slice(key, pos, len);
    s.write_all(msg).map_err(|e| format!("write: {e}"))?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back)
        .map_err(|e| format!("reading the echo: {e}"))?;
    check_pattern(key, pos, &back)
        .map_err(|i| format!("echo differs at byte {}", pos + i as u64))?;
    Ok(msg.len())
}

/// Half-closes and expects the backend's half-close back, with nothing before it.
fn finish(s: &mut TcpStream) -> Result<(), String> {
    s.shutdown(Shutdown::Write)
        .map_err(|e| format!("half-close: {e}"))?;
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(0) => Ok(()),
        Ok(n) => Err(format!("{n} bytes after the last echo")),
        Err(e) => Err(format!("no clean end: {e}")),
    }
}

/// What went wrong, shared by every client thread.
#[derive(Clone, Default)]
struct Errors(Arc<Mutex<Vec<String>>>);

impl Errors {
    fn push(&self, what: String) {
        self.0.lock().unwrap().push(what);
    }
    fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

/// `ACTIVE` flows exchanging messages of 1..1500 bytes, `DRIVERS` threads of them.
struct Active {
    stop: Arc<AtomicBool>,
    trips: Arc<AtomicU64>,
    /// The slowest round trip, in microseconds.
    slowest_us: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl Active {
    fn start(addr: SocketAddr, ips: &[IpAddr], errors: &Errors) -> Active {
        let stop = Arc::new(AtomicBool::new(false));
        let trips = Arc::new(AtomicU64::new(0));
        let slowest_us = Arc::new(AtomicU64::new(0));
        let threads = (0..DRIVERS)
            .map(|d| {
                let mut flows: Vec<(TcpStream, u64, u64)> = (0..ACTIVE / DRIVERS)
                    .map(|i| {
                        let n = d * ACTIVE / DRIVERS + i;
                        let s = open_flow(addr, ips, n, ECHO)
                            .unwrap_or_else(|e| panic!("opening active flow {n}: {e}"));
                        (s, 0xAC71_0000 + n as u64, 0)
                    })
                    .collect();
                let (stop, trips, slowest, errors) = (
                    stop.clone(),
                    trips.clone(),
                    slowest_us.clone(),
                    errors.clone(),
                );
                thread::Builder::new()
                    .name(format!("active-{d}"))
                    .spawn(move || {
                        let mut rng = Rng::new(d as u64 + 1);
                        while !stop.load(Ordering::SeqCst) && !flows.is_empty() {
                            let mut failed = Vec::new();
                            for (i, (s, key, pos)) in flows.iter_mut().enumerate() {
                                let len = rng.range(1, 1500) as usize;
                                let started = Instant::now();
                                match round_trip(s, *key, *pos, len) {
                                    Ok(n) => {
                                        *pos += n as u64;
                                        trips.fetch_add(1, Ordering::SeqCst);
                                        let us = started.elapsed().as_micros() as u64;
                                        slowest.fetch_max(us, Ordering::SeqCst);
                                    }
                                    Err(e) => {
                                        errors.push(format!("active flow {key:x} at {pos}: {e}"));
                                        failed.push(i);
                                    }
                                }
                            }
                            for i in failed.into_iter().rev() {
                                flows.swap_remove(i);
                            }
                        }
                        for (s, key, _) in &mut flows {
                            if let Err(e) = finish(s) {
                                errors.push(format!("active flow {key:x} at the end: {e}"));
                            }
                        }
                    })
                    .unwrap()
            })
            .collect();
        Active {
            stop,
            trips,
            slowest_us,
            threads,
        }
    }

    fn trips(&self) -> u64 {
        self.trips.load(Ordering::SeqCst)
    }

    /// Waits until every flow has made about `rounds` more round trips.
    fn progress(&self, rounds: u64, what: &str, proxy: &Proxy) {
        let from = self.trips();
        assert!(
            wait_until(Duration::from_secs(60), || self.trips()
                >= from + rounds * ACTIVE as u64),
            "active flows stalled {what}: {} round trips\n{}",
            self.trips(),
            proxy.stderr_tail()
        );
    }

    fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().expect("active driver panicked");
        }
    }
}

/// New short flows, one after another, all through the upgrades.
struct Newcomers {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    thread: JoinHandle<()>,
}

impl Newcomers {
    fn start(addr: SocketAddr, ips: Vec<IpAddr>, errors: &Errors) -> Newcomers {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let (stop2, ok2, errors) = (stop.clone(), ok.clone(), errors.clone());
        let thread = thread::spawn(move || {
            let mut n = 0usize;
            while !stop2.load(Ordering::SeqCst) {
                n += 1;
                let key = 0x4E57_0000_0000 + n as u64;
                let outcome = open_flow(addr, &ips, n, ECHO)
                    .map_err(|e| format!("connect: {e}"))
                    .and_then(|mut s| {
                        let local = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
                        round_trip(&mut s, key, 0, 100 + n % 900)
                            .and_then(|_| finish(&mut s))
                            .map_err(|e| format!("from {local}: {e}"))
                    });
                match outcome {
                    Ok(()) => {
                        ok2.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => errors.push(format!("new client {n}: {e}")),
                }
                // Paced (about 300 a second at most): each leaves a TIME_WAIT behind, and the
                // ports to one backend are finite.
                thread::sleep(Duration::from_millis(3));
            }
        });
        Newcomers { stop, ok, thread }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::SeqCst)
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("newcomer thread panicked");
        self.ok.load(Ordering::SeqCst)
    }
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

fn args(backends: &[String], workers: usize, socket: &Path) -> Vec<String> {
    let mut v = vec!["--listen".to_string(), "127.0.0.1:0".to_string()];
    for b in backends {
        v.extend(["--backend".into(), b.clone()]);
    }
    v.extend([
        "--workers".into(),
        workers.to_string(),
        "--connect-timeout".into(),
        "20s".into(),
        "--upgrade-socket".into(),
        socket.display().to_string(),
    ]);
    v
}

fn takeover(mut argv: Vec<String>) -> Vec<String> {
    argv.push("--takeover".into());
    argv
}

/// Waits for a line containing `text` in the proxy's stderr.
fn wait_log(proxy: &Proxy, text: &str, within: Duration) {
    assert!(
        wait_until(within, || proxy.stderr().contains(text)),
        "no `{text}` in the log within {within:?}\n{}",
        proxy.stderr_tail()
    );
}

/// The old process exits 0 once the successor has everything.
fn expect_handed_over(old: &mut Proxy, new: &Proxy) {
    let status = old.wait_exit(Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| s.success()),
        "old process: {status:?}\n{}\n{}",
        old.stderr_tail(),
        new.stderr_tail()
    );
    assert!(
        old.stderr().contains("handover complete"),
        "{}",
        old.stderr_tail()
    );
    wait_log(new, "waiting for a successor", Duration::from_secs(60));
}

/// Bytes were waiting in the old process at the handover (slow readers, a backend not
/// reading) and went with the flows.
fn expect_pending_bytes_moved(old: &Proxy) {
    let log = old.stderr();
    let in_flight: u64 = log
        .split(" bytes read and not yet written")
        .next()
        .and_then(|head| head.rsplit('(').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        in_flight > 0,
        "no pending bytes moved\n{}",
        old.stderr_tail()
    );
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn three_upgrades_under_load_keep_every_flow_byte_exact() {
    raise_nofile(16_000);
    let dir = TempDir::new("handover");
    let socket = dir.path().join("upgrade.sock");
    let mux = Mux::start();
    let late = LateBackend::new();
    let backends = vec![mux.addr.to_string(), late.addr.to_string()];
    let map = mapping(&backends);
    let ips_to = |name: &str| -> Vec<IpAddr> {
        map.iter()
            .filter(|(_, b)| *b == name)
            .map(|(ip, _)| *ip)
            .collect()
    };
    let mux_ips = ips_to(&backends[0]);
    let late_ips = ips_to(&backends[1]);
    assert!(
        mux_ips.len() >= 5 && !late_ips.is_empty(),
        "mapping: {map:?}"
    );
    let errors = Errors::default();

    let mut proxy = Proxy::start(&args(&backends, 2, &socket));
    // Kept so that a failure shows their logs too.
    let mut retired = Vec::new();
    wait_log(&proxy, "waiting for a successor", Duration::from_secs(10));
    let addr = proxy.addr;

    // Flows of every kind, before the first upgrade.
    let mut idle: Vec<TcpStream> = (0..IDLE)
        .map(|n| {
            let mut s = open_flow(addr, &mux_ips, n, ECHO).unwrap();
            round_trip(&mut s, 0x1D1E_0000 + n as u64, 0, 300).unwrap();
            s
        })
        .collect();
    let mut late_reply: Vec<TcpStream> = (0..LATE_REPLY)
        .map(|n| {
            let mut s = open_flow(addr, &mux_ips, n, LATE_SINK).unwrap();
            write_pattern(&mut s, 0x1A7E_0000 + n as u64, LATE_REQUEST as u64).unwrap();
            s.shutdown(Shutdown::Write).unwrap();
            s
        })
        .collect();
    let mut slow: Vec<TcpStream> = (0..SLOW)
        .map(|n| {
            let mut s = slow_reader(addr, mux_ips[n % mux_ips.len()]);
            let mut head = (0x5107_0000 + n as u64).to_le_bytes().to_vec();
            head.extend_from_slice(&SLOW_BYTES.to_le_bytes());
            s.write_all(&head).unwrap();
            s
        })
        .collect();
    let active = Active::start(addr, &mux_ips, &errors);
    let newcomers = Newcomers::start(addr, mux_ips.clone(), &errors);
    active.progress(2, "before the first upgrade", &proxy);
    let mut mid_connect: Vec<TcpStream> = (0..MID_CONNECT)
        .map(|n| open_flow(addr, &late_ips, n, ECHO).unwrap())
        .collect();

    // Upgrade 1: the late backend starts accepting only once the handover has begun, so its
    // flows are still connecting when the old process quiesces.
    let mut next = Proxy::start(&takeover(args(&backends, 2, &socket)));
    wait_log(&proxy, "handing over the flows", Duration::from_secs(30));
    late.open(Arc::clone(&mux.gate));
    expect_handed_over(&mut proxy, &next);
    expect_pending_bytes_moved(&proxy);
    retired.push(std::mem::replace(&mut proxy, next));
    for (n, s) in mid_connect.iter_mut().enumerate() {
        round_trip(s, 0x31D0_0000 + n as u64, 0, 500)
            .unwrap_or_else(|e| panic!("mid-connect flow {n}: {e}\n{}", proxy.stderr_tail()));
    }
    active.progress(2, "after the first upgrade", &proxy);

    // Upgrade 2: more workers than listeners handed over.
    let from = newcomers.ok();
    next = Proxy::start(&takeover(args(&backends, 3, &socket)));
    expect_handed_over(&mut proxy, &next);
    expect_pending_bytes_moved(&proxy);
    retired.push(std::mem::replace(&mut proxy, next));
    mux.gate.open(); // the late-reply backends read and answer now
    active.progress(2, "after the second upgrade", &proxy);

    // Upgrade 3: fewer workers than listeners handed over.
    next = Proxy::start(&takeover(args(&backends, 2, &socket)));
    expect_handed_over(&mut proxy, &next);
    expect_pending_bytes_moved(&proxy);
    retired.push(std::mem::replace(&mut proxy, next));
    active.progress(2, "after the third upgrade", &proxy);
    assert!(
        wait_until(Duration::from_secs(30), || newcomers.ok() > from + 50),
        "new clients are not served after the upgrades\n{}",
        proxy.stderr_tail()
    );

    // Every kind of flow finishes exactly.
    for (n, s) in idle.iter_mut().enumerate() {
        let key = 0x1D1E_0000 + n as u64;
        if let Err(e) = round_trip(s, key, 300, 300).and_then(|_| finish(s)) {
            errors.push(format!("idle flow {n}: {e}"));
        }
    }
    for (n, s) in late_reply.iter_mut().enumerate() {
        let mut reply = [0u8; 16];
        let want_digest = digest(&pattern_vec(0x1A7E_0000 + n as u64, LATE_REQUEST));
        let outcome = s
            .read_exact(&mut reply)
            .map_err(|e| format!("reading the reply: {e}"))
            .and_then(|()| {
                let len = u64::from_le_bytes(reply[..8].try_into().unwrap());
                let got = u64::from_le_bytes(reply[8..].try_into().unwrap());
                if len != LATE_REQUEST as u64 || got != want_digest {
                    return Err(format!("the backend got {len} bytes (digest {got:x})"));
                }
                expect_closed(s, CLOSE_TIMEOUT).and_then(|(how, _)| match how {
                    Closed::Eof => Ok(()),
                    other => Err(format!("ended with {other:?}")),
                })
            });
        if let Err(e) = outcome {
            errors.push(format!("late-reply flow {n}: {e}"));
        }
    }
    for (n, s) in slow.iter_mut().enumerate() {
        if let Err(e) = read_pattern_to_eof(s, 0x5107_0000 + n as u64, SLOW_BYTES) {
            errors.push(format!("slow reader {n}: {e}"));
        }
    }
    for (n, s) in mid_connect.iter_mut().enumerate() {
        if let Err(e) = round_trip(s, 0x31D0_0000 + n as u64, 500, 500).and_then(|_| finish(s)) {
            errors.push(format!("mid-connect flow {n}: {e}"));
        }
    }
    let slowest = Duration::from_micros(active.slowest_us.load(Ordering::SeqCst));
    let trips = active.trips();
    active.stop();
    let served = newcomers.stop();
    eprintln!("{trips} round trips on {ACTIVE} flows, slowest {slowest:?}; {served} new clients");
    let errors = errors.all();
    if !errors.is_empty() && std::env::var("RINGWAY_TEST_KEEP_LOGS").is_ok() {
        for p in retired.iter().chain([&proxy]) {
            let _ = std::fs::write(format!("/tmp/uh-proc-{}.log", p.pid()), p.stderr());
        }
    }
    assert!(
        errors.is_empty(),
        "{} errors across three upgrades, first ones:\n{}\n{}",
        errors.len(),
        errors[..errors.len().min(20)].join("\n"),
        proxy.stderr_tail()
    );
    proxy.assert_running();
}

// ---------------------------------------------------------------------------------------------
// Failures and refusals
// ---------------------------------------------------------------------------------------------

/// The last line the process wrote, which must be its one-line error.
fn last_line(text: &str) -> String {
    text.lines().last().unwrap_or_default().to_string()
}

/// Echo flows on `addr`, one round trip each.
fn echo_flows(addr: SocketAddr, ips: &[IpAddr], count: usize, key: u64) -> Vec<TcpStream> {
    (0..count)
        .map(|n| {
            let mut s = open_flow(addr, ips, n, ECHO).unwrap();
            round_trip(&mut s, key + n as u64, 0, 200).unwrap();
            s
        })
        .collect()
}

/// Each flow echoes one more message at `pos` (then its position is `pos + 200`).
fn still_echo(flows: &mut [TcpStream], key: u64, pos: u64, proxy: &Proxy) {
    for (n, s) in flows.iter_mut().enumerate() {
        round_trip(s, key + n as u64, pos, 200)
            .unwrap_or_else(|e| panic!("flow {n}: {e}\n{}", proxy.stderr_tail()));
    }
}

fn fake_successor(socket: &Path) -> ringway::handover::fds::Conn {
    use ringway::handover::{fds::Conn, protocol::Message};
    let mut conn = Conn::new(std::os::unix::net::UnixStream::connect(socket).unwrap());
    conn.set_timeout(Some(Duration::from_secs(30))).unwrap();
    let (hello, _) = conn.recv().unwrap();
    assert_eq!(hello, Message::Hello { version: 1 });
    conn
}

/// A successor that takes the listeners and the first batch, then dies before acknowledging
/// it: every flow stays on the old process, which accepts again; a later upgrade works.
#[test]
fn a_successor_dying_before_its_ack_leaves_every_flow_on_the_old_process() {
    use ringway::handover::protocol::Message;
    let dir = TempDir::new("handover-dies");
    let socket = dir.path().join("upgrade.sock");
    let mux = Mux::start();
    let backends = vec![mux.addr.to_string()];
    let ips = [client_ip(1)];
    let mut proxy = Proxy::start(&args(&backends, 2, &socket));
    wait_log(&proxy, "waiting for a successor", Duration::from_secs(10));
    let key = 0xD1E5_0000;
    let mut flows = echo_flows(proxy.addr, &ips, 300, key);

    let mut conn = fake_successor(&socket);
    conn.send(&Message::Speak { version: 1 }, &[]).unwrap();
    let (listeners, fds) = conn.recv().unwrap();
    assert!(
        matches!(listeners, Message::Listeners { count: 2, .. }),
        "{listeners:?}"
    );
    assert_eq!(fds.len(), 2);
    conn.send(&Message::Ready, &[]).unwrap();
    let (batch, fds) = conn.recv().unwrap();
    assert!(matches!(batch, Message::Flows { .. }), "{batch:?}");
    assert!(!fds.is_empty());
    drop((conn, fds, listeners)); // dies: no ack

    wait_log(&proxy, "handover failed", Duration::from_secs(30));
    still_echo(&mut flows, key, 200, &proxy);
    let mut fresh = echo_flows(proxy.addr, &ips, 20, key + 1000);

    let next = Proxy::start(&takeover(args(&backends, 2, &socket)));
    expect_handed_over(&mut proxy, &next);
    still_echo(&mut flows, key, 400, &next);
    still_echo(&mut fresh, key + 1000, 200, &next);
    for s in flows.iter_mut().chain(&mut fresh) {
        finish(s).unwrap();
    }
}

/// SIGKILL of a real successor while the old process waits for flows still connecting: those
/// flows (not handed over yet) keep working on the old process, which logs why; the next
/// upgrade moves them.
#[test]
fn sigkill_of_the_successor_mid_handover_keeps_the_flows_not_handed_over() {
    let dir = TempDir::new("handover-sigkill");
    let socket = dir.path().join("upgrade.sock");
    let late = LateBackend::new();
    let gate = Arc::new(Gate::default());
    let backends = vec![late.addr.to_string()];
    let ips = [client_ip(1)];
    let mut proxy = Proxy::start(&args(&backends, 2, &socket));
    wait_log(&proxy, "waiting for a successor", Duration::from_secs(10));
    let mut connecting: Vec<TcpStream> = (0..5)
        .map(|n| open_flow(proxy.addr, &ips, n, ECHO).unwrap())
        .collect();

    let mut successor = Proxy::start(&takeover(args(&backends, 2, &socket)));
    wait_log(&proxy, "handing over the flows", Duration::from_secs(30));
    successor.signal(libc::SIGKILL);
    let _ = successor.wait_exit(Duration::from_secs(10));
    wait_log(&proxy, "handover failed", Duration::from_secs(30));
    assert!(
        proxy
            .stderr()
            .contains("the successor closed the connection"),
        "{}",
        proxy.stderr_tail()
    );
    late.open(gate);
    let key = 0x5167_0000;
    still_echo(&mut connecting, key, 0, &proxy);
    proxy.assert_running();

    let next = Proxy::start(&takeover(args(&backends, 2, &socket)));
    expect_handed_over(&mut proxy, &next);
    still_echo(&mut connecting, key, 200, &next);
    for s in &mut connecting {
        finish(s).unwrap();
    }
}

/// The socket file: a stale one is replaced, a live one refuses a second fresh process, a
/// successor without a process to take over from fails, and a process of another user is
/// refused (SO_PEERCRED) while the flows go on.
#[test]
fn the_upgrade_socket_admits_only_its_own_successor() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let dir = TempDir::new("handover-socket");
    let socket = dir.path().join("upgrade.sock");
    let mux = Mux::start();
    let backends = vec![mux.addr.to_string()];

    // Nobody there.
    let out = run_to_exit(
        &takeover(args(&backends, 1, &socket)),
        Duration::from_secs(20),
    );
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(
        last_line(&out.stderr).contains("--takeover: no Ringway process at"),
        "{}",
        out.stderr
    );

    // A stale file left by a dead process is replaced.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let mut proxy = Proxy::start(&args(&backends, 1, &socket));
    wait_log(&proxy, "waiting for a successor", Duration::from_secs(10));
    assert!(
        proxy.stderr().contains("removing a stale socket"),
        "{}",
        proxy.stderr()
    );
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    // A live one: a second fresh process fails.
    let out = run_to_exit(&args(&backends, 1, &socket), Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(
        last_line(&out.stderr).contains("another Ringway is running there"),
        "{}",
        out.stderr
    );

    // Another user, even with the file opened up, is refused by its credentials.
    let ips = [client_ip(1)];
    let key = 0x0DD0_0000;
    let mut flows = echo_flows(proxy.addr, &ips, 10, key);
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let mut intruder = std::process::Command::new(bin());
    intruder
        .args(takeover(args(&backends, 1, &socket)))
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null());
    // SAFETY: setgid/setuid are async-signal-safe; they run in the child before exec.
    unsafe {
        intruder.pre_exec(|| {
            if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = intruder.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        last_line(&stderr).contains("refused the handover: uid 65534 may not take over"),
        "{stderr}"
    );
    wait_log(
        &proxy,
        "refused a process of uid 65534",
        Duration::from_secs(10),
    );
    still_echo(&mut flows, key, 200, &proxy);
    proxy.assert_running();
}

/// While one successor is being dealt with, a second is refused in one line; the first one's
/// departure leaves the old process serving, ready for the next.
#[test]
fn a_second_successor_at_once_is_refused() {
    let dir = TempDir::new("handover-two");
    let socket = dir.path().join("upgrade.sock");
    let mux = Mux::start();
    let backends = vec![mux.addr.to_string()];
    let mut proxy = Proxy::start(&args(&backends, 1, &socket));
    wait_log(&proxy, "waiting for a successor", Duration::from_secs(10));
    let first = fake_successor(&socket); // says hello, then nothing yet
    let out = run_to_exit(
        &takeover(args(&backends, 1, &socket)),
        Duration::from_secs(20),
    );
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(
        last_line(&out.stderr).contains("a handover to another process is already in progress"),
        "{}",
        out.stderr
    );
    drop(first);
    wait_log(&proxy, "connected and left", Duration::from_secs(10));
    let key = 0x2222_0000;
    let mut flows = echo_flows(proxy.addr, &[client_ip(1)], 10, key);
    let next = Proxy::start(&takeover(args(&backends, 1, &socket)));
    expect_handed_over(&mut proxy, &next);
    still_echo(&mut flows, key, 200, &next);
}

/// Versions: a successor that cannot read the old process's handover says so in one line and
/// starts on listeners of its own; an old process whose successor cannot read it drains.
#[test]
fn an_unreadable_handover_version_falls_back_to_a_drain() {
    use ringway::handover::{fds::Conn, protocol::Message};
    let dir = TempDir::new("handover-version");
    let mux = Mux::start();
    let backends = vec![mux.addr.to_string()];

    // A (pretend) old process from the future.
    let future = dir.path().join("future.sock");
    let listener = std::os::unix::net::UnixListener::bind(&future).unwrap();
    listener.set_nonblocking(true).unwrap();
    let old = thread::spawn(move || {
        let mut accepted = None;
        // Bounded: a successor that never connects fails the test instead of hanging it.
        wait_until(Duration::from_secs(30), || {
            accepted = listener.accept().ok();
            accepted.is_some()
        });
        let (stream, _) = accepted.expect("the successor did not connect");
        stream.set_nonblocking(false).unwrap();
        let mut conn = Conn::new(stream);
        conn.set_timeout(Some(Duration::from_secs(30))).unwrap();
        conn.send(&Message::Hello { version: 99 }, &[]).unwrap();
        conn.recv().unwrap().0
    });
    let successor = Proxy::start(&takeover(args(&backends, 1, &future)));
    assert_eq!(old.join().unwrap(), Message::CannotRead { reads: 1 });
    let line = successor
        .stderr()
        .lines()
        .find(|l| l.contains("speaks handover version 99"))
        .map(str::to_string);
    assert!(
        line.as_deref()
            .is_some_and(|l| l.contains("reads version 1 only")),
        "{}",
        successor.stderr()
    );
    let mut s = open_flow(successor.addr, &[client_ip(1)], 0, ECHO).unwrap();
    round_trip(&mut s, 0x9999, 0, 100).unwrap();

    // A real old process whose successor cannot read it: it drains, as on SIGTERM.
    let socket = dir.path().join("upgrade.sock");
    let mut proxy = Proxy::start(&args(&backends, 1, &socket));
    wait_log(&proxy, "waiting for a successor", Duration::from_secs(10));
    let mut flow = open_flow(proxy.addr, &[client_ip(1)], 0, ECHO).unwrap();
    round_trip(&mut flow, 0x7777, 0, 100).unwrap();
    let mut conn = fake_successor(&socket);
    conn.send(&Message::CannotRead { reads: 0 }, &[]).unwrap();
    wait_log(&proxy, "falling back to a drain", Duration::from_secs(10));
    // A live flow finishes during the drain; then the process exits 0.
    round_trip(&mut flow, 0x7777, 100, 100).unwrap();
    finish(&mut flow).unwrap();
    let status = proxy.wait_exit(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        proxy.stderr_tail()
    );
}

/// `--admin` on the same address in both processes: the successor can bind it while the old
/// process still holds it, and the metrics count the adopted flows as active.
#[test]
fn the_admin_endpoint_moves_with_the_upgrade() {
    use common::admin::{http_get, metric, parse_metrics};
    let dir = TempDir::new("handover-admin");
    let socket = dir.path().join("upgrade.sock");
    let mux = Mux::start();
    let backends = vec![mux.addr.to_string()];
    let admin = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let with_admin = |mut v: Vec<String>| {
        v.extend(["--admin".into(), admin.to_string()]);
        v
    };
    let mut proxy = Proxy::start(&with_admin(args(&backends, 1, &socket)));
    wait_log(&proxy, "waiting for a successor", Duration::from_secs(10));
    let key = 0xAD31_0000;
    let mut flows = echo_flows(proxy.addr, &[client_ip(1)], 7, key);
    let next = Proxy::start(&with_admin(takeover(args(&backends, 1, &socket))));
    expect_handed_over(&mut proxy, &next);
    let (status, body) = http_get(admin, "/metrics");
    assert_eq!(status, 200, "{body}");
    let active = metric(&parse_metrics(&body), "ringway_flows_active", &[]);
    assert_eq!(active, 7.0, "{body}");
    still_echo(&mut flows, key, 200, &next);
}

/// A successor that takes a batch and then says nothing: after 5 s the old process gives up on
/// it, never commits the batch, and every flow carries on where it was.
#[test]
fn a_successor_that_stalls_is_given_up_and_never_gets_a_commit() {
    use ringway::handover::protocol::Message;
    let dir = TempDir::new("handover-stall");
    let socket = dir.path().join("upgrade.sock");
    let mux = Mux::start();
    let backends = vec![mux.addr.to_string()];
    let mut proxy = Proxy::start(&args(&backends, 1, &socket));
    wait_log(&proxy, "waiting for a successor", Duration::from_secs(10));
    let key = 0x57A1_0000;
    let mut flows = echo_flows(proxy.addr, &[client_ip(1)], 50, key);
    let mut conn = fake_successor(&socket);
    conn.send(&Message::Speak { version: 1 }, &[]).unwrap();
    let _listeners = conn.recv().unwrap();
    conn.send(&Message::Ready, &[]).unwrap();
    let (batch, _fds) = conn.recv().unwrap();
    assert!(matches!(batch, Message::Flows { .. }), "{batch:?}");
    // Stalled: no ack. The old process gives up and closes the connection without a commit.
    let next = conn.recv();
    assert!(
        next.is_err(),
        "the old process sent {next:?} to a successor that never acked"
    );
    wait_log(&proxy, "handover failed", Duration::from_secs(10));
    still_echo(&mut flows, key, 200, &proxy);
    for s in &mut flows {
        finish(s).unwrap();
    }
    proxy.assert_running();
}

/// A flow keeps its backend across the upgrade even when the successor's flags do not have it;
/// such flows then close at the successor's --drain-timeout, the others carry on.
#[test]
fn flows_on_a_backend_the_successor_lacks_follow_its_drain_timeout() {
    let dir = TempDir::new("handover-removed");
    let socket = dir.path().join("upgrade.sock");
    let (kept, removed) = (Mux::start(), Mux::start());
    let both = vec![kept.addr.to_string(), removed.addr.to_string()];
    let map = mapping(&both);
    let ip_of = |name: &str| *map.iter().find(|(_, b)| *b == name).unwrap().0;
    let (kept_ip, removed_ip) = (ip_of(&both[0]), ip_of(&both[1]));
    let mut proxy = Proxy::start(&args(&both, 1, &socket));
    wait_log(&proxy, "waiting for a successor", Duration::from_secs(10));
    let key = 0xDEAD_0000;
    let mut staying = echo_flows(proxy.addr, &[kept_ip], 5, key);
    let mut leaving = echo_flows(proxy.addr, &[removed_ip], 5, key + 100);
    let mut successor_args = takeover(args(&both[..1], 1, &socket));
    successor_args.extend(["--drain-timeout".into(), "1s".into()]);
    let next = Proxy::start(&successor_args);
    expect_handed_over(&mut proxy, &next);
    wait_log(
        &next,
        "close in 1s (--drain-timeout)",
        Duration::from_secs(10),
    );
    still_echo(&mut staying, key, 200, &next);
    for (n, s) in leaving.iter_mut().enumerate() {
        match expect_closed(s, Duration::from_secs(10)) {
            Ok((Closed::Reset, _)) => {}
            other => panic!(
                "flow {n} on the removed backend: {other:?}\n{}",
                next.stderr_tail()
            ),
        }
    }
    still_echo(&mut staying, key, 400, &next);
}

/// The successor's access log tells the truth about an adopted flow: the client address from
/// its PROXY header, the bytes both processes moved, a duration from the original accept.
#[test]
fn the_access_log_of_an_adopted_flow_counts_from_its_first_accept() {
    let dir = TempDir::new("handover-log");
    let socket = dir.path().join("upgrade.sock");
    let log_path = dir.path().join("access.log");
    let mux = Mux::start();
    let backends = vec![mux.addr.to_string()];
    let edge = |mut v: Vec<String>| {
        v.extend([
            "--accept-proxy".into(),
            "--trusted-proxy".into(),
            "127.0.0.0/8".into(),
        ]);
        v
    };
    let mut proxy = Proxy::start(&edge(args(&backends, 1, &socket)));
    wait_log(&proxy, "waiting for a successor", Duration::from_secs(10));
    let opened = Instant::now();
    let mut s = connect(proxy.addr).unwrap();
    s.write_all(b"PROXY TCP4 192.0.2.7 198.51.100.1 5555 443\r\n")
        .unwrap();
    s.write_all(&[ECHO]).unwrap();
    round_trip(&mut s, 0x1065, 0, 200).unwrap();
    let before = opened.elapsed();
    let mut successor_args = edge(takeover(args(&backends, 1, &socket)));
    successor_args.extend(["--access-log".into(), log_path.display().to_string()]);
    let next = Proxy::start(&successor_args);
    expect_handed_over(&mut proxy, &next);
    round_trip(&mut s, 0x1065, 200, 200).unwrap();
    finish(&mut s).unwrap();
    let lived = opened.elapsed();
    let mut line = String::new();
    assert!(
        wait_until(Duration::from_secs(10), || {
            line = std::fs::read_to_string(&log_path).unwrap_or_default();
            line.contains('\n')
        }),
        "no access-log line\n{}",
        next.stderr_tail()
    );
    assert!(line.contains("\"client\":\"192.0.2.7:5555\""), "{line}");
    assert!(
        line.contains(&format!("\"backend\":\"{}\"", mux.addr)),
        "{line}"
    );
    assert!(line.contains("\"bytes_client_to_backend\":401,"), "{line}");
    assert!(line.contains("\"bytes_backend_to_client\":400,"), "{line}");
    let duration_ms: f64 = line
        .split("\"duration_ms\":")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no duration in {line}"));
    assert!(
        duration_ms >= before.as_secs_f64() * 1000.0 && duration_ms <= lived.as_secs_f64() * 1000.0 + 50.0,
        "duration {duration_ms} ms, the flow lived {lived:?} ({before:?} before the upgrade): {line}"
    );
}

/// A real peer we did not write: iperf3 streams both ways at full speed (two streams each way
/// and its control connection) while the proxy is upgraded under it, and finishes cleanly.
#[test]
fn iperf3_streaming_both_ways_survives_an_upgrade() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    if Command::new("iperf3").arg("--version").output().is_err() {
        panic!("iperf3 is not installed (apt-get install iperf3; scripts/test.sh installs it)");
    }
    // A free port for `iperf3 -s`, tried again if another process takes it first. Listening is
    // read from /proc/net/tcp (state 0A): a probe connection would count as its one client.
    let listening = |port: u16| {
        std::fs::read_to_string("/proc/net/tcp").is_ok_and(|t| {
            t.lines()
                .any(|l| l.contains(&format!(":{port:04X} 00000000:0000 0A")))
        })
    };
    let (server, port) = (0..5)
        .find_map(|_| {
            let port = {
                let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                probe.local_addr().unwrap().port()
            };
            let mut server = Command::new("iperf3")
                .args(["-s", "-1", "-B", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let up = wait_until(Duration::from_secs(10), || {
                listening(port) || server.try_wait().ok().flatten().is_some()
            });
            if up && server.try_wait().ok().flatten().is_none() {
                Some((KillOnDrop(server), port))
            } else {
                let _ = server.kill();
                let _ = server.wait();
                None
            }
        })
        .expect("iperf3 -s did not start on any of 5 ports");
    let backend = format!("127.0.0.1:{port}");
    let dir = TempDir::new("handover-iperf3");
    let socket = dir.path().join("upgrade.sock");
    let backends = vec![backend.clone()];
    // One worker: iperf3 --bidir gives each data stream its direction by the order the server
    // accepts them, and with two workers two backend connects can finish in either order (the
    // streams then wait for each other and move nothing). Any proxy with parallel workers has
    // that race; the handover itself is the same with one worker or two.
    let mut proxy = Proxy::start(&args(&backends, 1, &socket));
    wait_log(&proxy, "waiting for a successor", Duration::from_secs(10));
    let mut client = KillOnDrop(
        Command::new("iperf3")
            .args(["-c", "127.0.0.1", "-p", &proxy.addr.port().to_string()])
            .args(["-t", "3", "-P", "2", "--bidir", "-i", "0.5", "--forceflush"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (tx, lines) = std::sync::mpsc::channel();
    let stdout = client.0.stdout.take().unwrap();
    let reader = thread::spawn(move || {
        let mut all = Vec::new();
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line.clone());
            all.push(line);
        }
        all.join("\n")
    });
    // Upgrade once the streams carry data (the first interval report).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            // The first interval ends near 0.50 s; a loaded machine prints 0.00-0.51 and such.
            Ok(line) if line.contains(" 0.00-0.") && line.contains(" sec ") => break,
            Ok(_) => {}
            Err(e) => {
                let _ = client.0.kill();
                let _ = client.0.wait();
                let mut stderr = String::new();
                let _ = client.0.stderr.take().unwrap().read_to_string(&mut stderr);
                panic!(
                    "iperf3 printed no interval report ({e}):\n{}\n{stderr}\n{}",
                    reader.join().unwrap_or_default(),
                    proxy.stderr_tail()
                );
            }
        }
    }
    let next = Proxy::start(&takeover(args(&backends, 1, &socket)));
    expect_handed_over(&mut proxy, &next);
    assert!(
        wait_until(Duration::from_secs(30), || client
            .0
            .try_wait()
            .ok()
            .flatten()
            .is_some()),
        "iperf3 did not finish"
    );
    let status = client.0.wait().unwrap();
    let output = reader.join().unwrap();
    let mut stderr = String::new();
    client
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(
        status.success() && output.contains("iperf Done.") && !output.contains("error"),
        "iperf3 across the upgrade: {status}\n{output}\n{stderr}\n{}",
        next.stderr_tail()
    );
    let moved = proxy.stderr();
    eprintln!(
        "{}",
        moved
            .lines()
            .find(|l| l.contains("flows moved"))
            .unwrap_or_default()
    );
    drop(server);
}

/// A child process of the test, killed (by its PID) and reaped when the test ends, passed or
/// not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A flow still reading its PROXY header when the handover starts finishes the header (and
/// its connect) in the old process, then moves; nothing of it is lost.
#[test]
fn a_flow_mid_proxy_header_finishes_it_then_moves() {
    let dir = TempDir::new("handover-header");
    let socket = dir.path().join("upgrade.sock");
    let mux = Mux::start();
    let backends = vec![mux.addr.to_string()];
    let edge = |mut v: Vec<String>| {
        v.extend([
            "--accept-proxy".into(),
            "--trusted-proxy".into(),
            "127.0.0.0/8".into(),
            "--proxy-header-timeout".into(),
            "30s".into(),
        ]);
        v
    };
    let mut proxy = Proxy::start(&edge(args(&backends, 1, &socket)));
    wait_log(&proxy, "waiting for a successor", Duration::from_secs(10));
    let mut s = connect(proxy.addr).unwrap();
    s.write_all(b"PROXY TCP4 192.0.2.9 198.51.").unwrap();
    let next = Proxy::start(&edge(takeover(args(&backends, 1, &socket))));
    wait_log(&proxy, "handing over the flows", Duration::from_secs(30));
    s.write_all(b"100.1 6666 443\r\n").unwrap();
    s.write_all(&[ECHO]).unwrap();
    expect_handed_over(&mut proxy, &next);
    assert!(
        proxy.stderr().contains("handover complete: 1 flows moved"),
        "{}",
        proxy.stderr()
    );
    round_trip(&mut s, 0x4EAD, 0, 300).unwrap();
    finish(&mut s).unwrap();
}

/// A successor whose old process breaks off before any flow moved gives up in one line (exit
/// 1) and leaves the old process alone.
#[test]
fn a_successor_that_gets_no_flow_exits_1() {
    use ringway::handover::{fds::Conn, protocol::Message};
    use std::os::fd::AsRawFd;
    let dir = TempDir::new("handover-noflow");
    let path = dir.path().join("old.sock");
    let unix = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    unix.set_nonblocking(true).unwrap();
    let old = thread::spawn(move || {
        let mut accepted = None;
        // Bounded: a successor that never connects fails the test instead of hanging it.
        wait_until(Duration::from_secs(30), || {
            accepted = unix.accept().ok();
            accepted.is_some()
        });
        let Some((stream, _)) = accepted else {
            return;
        };
        stream.set_nonblocking(false).unwrap();
        let mut conn = Conn::new(stream);
        conn.set_timeout(Some(Duration::from_secs(30))).unwrap();
        conn.send(&Message::Hello { version: 1 }, &[]).unwrap();
        assert_eq!(conn.recv().unwrap().0, Message::Speak { version: 1 });
        let listeners = Message::Listeners {
            addr: tcp.local_addr().unwrap().to_string(),
            count: 1,
        };
        conn.send(&listeners, &[tcp.as_raw_fd()]).unwrap();
        assert_eq!(conn.recv().unwrap().0, Message::Ready);
        // ... and the old process goes away.
    });
    let backends = vec![Mux::start().addr.to_string()];
    let out = run_to_exit(
        &takeover(args(&backends, 1, &path)),
        Duration::from_secs(30),
    );
    old.join().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(
        last_line(&out.stderr).contains("the handover broke off before any flow moved"),
        "{}",
        out.stderr
    );
}

/// With a tight buffer pool, stalled readers' bytes sit in heap spills: those move too, exactly.
#[test]
fn spilled_bytes_of_stalled_readers_move_exactly() {
    use common::admin::{http_get, metric, parse_metrics};
    let dir = TempDir::new("handover-spill");
    let socket = dir.path().join("upgrade.sock");
    let mux = Mux::start();
    let backends = vec![mux.addr.to_string()];
    let admin = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    // Spills belong to the buffered path: with splice, bulk streams like these may move into
    // kernel pipes instead (that case has its own test below), and leave no spill to move.
    let tight = |mut v: Vec<String>| {
        v.extend([
            "--buffers".into(),
            "16".into(),
            "--admin".into(),
            admin.to_string(),
            "--splice".into(),
            "off".into(),
        ]);
        v
    };
    let mut proxy = Proxy::start(&tight(args(&backends, 1, &socket)));
    wait_log(&proxy, "waiting for a successor", Duration::from_secs(10));
    const READERS: usize = 24;
    const BYTES: u64 = 4 << 20;
    let mut readers: Vec<TcpStream> = (0..READERS)
        .map(|n| {
            let mut s = slow_reader(proxy.addr, client_ip(1));
            let mut head = (0x5B11_0000 + n as u64).to_le_bytes().to_vec();
            head.extend_from_slice(&BYTES.to_le_bytes());
            s.write_all(&head).unwrap();
            s
        })
        .collect();
    let spilled = || {
        let (_, body) = http_get(admin, "/metrics");
        metric(&parse_metrics(&body), "ringway_spill_bytes", &[])
    };
    assert!(
        wait_until(Duration::from_secs(20), || spilled() > 0.0),
        "no bytes in spills\n{}",
        proxy.stderr_tail()
    );
    let next = Proxy::start(&tight(takeover(args(&backends, 1, &socket))));
    expect_handed_over(&mut proxy, &next);
    expect_pending_bytes_moved(&proxy);
    for (n, s) in readers.iter_mut().enumerate() {
        read_pattern_to_eof(s, 0x5B11_0000 + n as u64, BYTES)
            .unwrap_or_else(|e| panic!("reader {n}: {e}\n{}", next.stderr_tail()));
    }
}

/// A bulk download relayed by splice whose client stops reading: at the upgrade the bytes in
/// the kernel pipe go with the flow (read out into the handover), and the client, reading
/// again from the successor, gets every byte in order.
#[test]
fn a_spliced_stream_with_bytes_in_its_pipe_moves_byte_exact() {
    const TOTAL: u64 = 64 << 20;
    const FIRST: u64 = 8 << 20;
    let dir = TempDir::new("handover-splice");
    let socket = dir.path().join("upgrade.sock");
    let backend = Backend::start(Kind::Stream);
    let backends = vec![backend.arg()];
    let mut old = Proxy::start(&args(&backends, 1, &socket));
    wait_log(&old, "waiting for a successor", Duration::from_secs(10));
    let mut client = connect(old.addr).unwrap();
    client.write_all(&TOTAL.to_le_bytes()).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < FIRST {
        let n = client.read(&mut buf).unwrap();
        assert!(n > 0, "EOF at {pos}");
        check_pattern(TOTAL, pos, &buf[..n]).unwrap_or_else(|i| panic!("byte {}", pos + i as u64));
        pos += n as u64;
    }
    // The client stops reading: the chain fills up to the proxy's pipe.
    match backend.next_event(Duration::from_secs(60)) {
        Some(Event::Stalled { .. }) => {}
        other => panic!("stream backend: {other:?}\n{}", old.stderr_tail()),
    }
    let held: u64 = bytes_in_pipes(old.pid()).iter().sum();
    assert!(
        held > 0,
        "no bytes in the old process's pipes\n{}",
        old.stderr_tail()
    );

    let new = Proxy::start(&takeover(args(&backends, 1, &socket)));
    expect_handed_over(&mut old, &new);
    expect_pending_bytes_moved(&old);
    while pos < TOTAL {
        let n = client
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("after the upgrade at {pos}: {e}\n{}", new.stderr_tail()));
        assert!(n > 0, "EOF at {pos} of {TOTAL}\n{}", new.stderr_tail());
        check_pattern(TOTAL, pos, &buf[..n])
            .unwrap_or_else(|i| panic!("byte {} differs after the upgrade", pos + i as u64));
        pos += n as u64;
    }
    assert_eq!(client.read(&mut buf).unwrap(), 0, "EOF after every byte");
    match backend.next_event(Duration::from_secs(30)) {
        Some(Event::Streamed { written, error, .. }) => {
            assert_eq!((written, error), (TOTAL, None), "backend's side")
        }
        other => panic!("stream backend: {other:?}"),
    }
}
