//! Health checks and failover seen from outside ("if one server has a problem, others step
//! in"): backends that die and come back on the same port, backups, every backend down,
//! passive checks, probe/expect checks, and `--show-mapping` against real flows.
//!
//! The backends here are restartable servers of this file (the harness's backends cannot
//! come back on the same port, nor close their open connections). Each greets a client flow
//! with its own address, the backend name the proxy logs and `--show-mapping` prints, so a
//! client learns which backend served it. Waits are on observable events (log lines, flow
//! results) with deadlines.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use common::*;

/// Upper bound for "a failed backend is noticed promptly": with checks every 200 ms and
/// `--fall 2` the proxy needs about 0.6 s; the rest is slack for a loaded machine.
const NOTICE_BOUND: Duration = Duration::from_secs(5);
/// Time given to the workers to pick up a new backend state after its log line was seen (the
/// proxy logs a transition just before it publishes it).
const PUBLISH_GRACE: Duration = Duration::from_secs(1);
/// Health-check flags used by most tests here.
const CHECKS: [&str; 6] = ["--health-interval", "200ms", "--fall", "2", "--rise", "2"];

/// What a server answers to the probe line `PING`: the right answer for `--health-expect +PONG`
/// and a wrong one.
const GOOD_PONG: &[u8] = b"+PONG\r\n";
const BAD_PONG: &[u8] = b"-ERR not ready\r\n";

// ---------------------------------------------------------------------------------------------
// A restartable backend
// ---------------------------------------------------------------------------------------------

/// A loopback backend that can be killed (listener and every connection closed) and restarted
/// on the same port. Protocol: it reads one line; `PING` gets `pong` and a close (a health
/// probe); anything else gets `"<its address>\n"` and from then on an echo. A connection that
/// closes before a line (a plain connect check) is just closed.
struct Server {
    addr: SocketAddr,
    pong: &'static [u8],
    /// Client flows served (lines other than PING), over all runs.
    flows: Arc<AtomicUsize>,
    /// PING probes answered, over all runs.
    probes: Arc<AtomicUsize>,
    running: Option<Running>,
}

struct Running {
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<HashMap<u64, TcpStream>>>,
    acceptor: JoinHandle<()>,
}

fn bind_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&SockAddr::from(addr))?;
    socket.listen(1024)?;
    Ok(socket.into())
}

impl Server {
    fn start(pong: &'static [u8]) -> Server {
        let listener = bind_listener("127.0.0.1:0".parse().unwrap()).expect("bind backend");
        let mut server = Server::not_started(listener.local_addr().unwrap(), pong);
        server.run(listener);
        server
    }

    /// A server that will live at `addr`, where nothing listens until `restart`.
    fn not_started(addr: SocketAddr, pong: &'static [u8]) -> Server {
        Server {
            addr,
            pong,
            flows: Arc::default(),
            probes: Arc::default(),
            running: None,
        }
    }

    /// The backend's name: its `--backend` text, as the proxy logs and prints it.
    fn name(&self) -> String {
        self.addr.to_string()
    }

    fn flows(&self) -> usize {
        self.flows.load(Ordering::SeqCst)
    }

    fn probes(&self) -> usize {
        self.probes.load(Ordering::SeqCst)
    }

    fn run(&mut self, listener: TcpListener) {
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<HashMap<u64, TcpStream>>> = Arc::default();
        let (name, pong) = (self.name(), self.pong);
        let (flows, probes) = (self.flows.clone(), self.probes.clone());
        let acceptor = {
            let (stop, conns) = (stop.clone(), conns.clone());
            thread::Builder::new()
                .name(format!("server-{name}"))
                .stack_size(SMALL_STACK)
                .spawn(move || {
                    let mut next_id = 0u64;
                    loop {
                        let accepted = listener.accept();
                        if stop.load(Ordering::SeqCst) {
                            return; // drops the listener: connects are refused from now on
                        }
                        let Ok((stream, _)) = accepted else { continue };
                        next_id += 1;
                        let id = next_id;
                        if let Ok(clone) = stream.try_clone() {
                            conns.lock().unwrap().insert(id, clone);
                        }
                        let (name, conns, flows, probes) =
                            (name.clone(), conns.clone(), flows.clone(), probes.clone());
                        let _ = thread::Builder::new()
                            .stack_size(SMALL_STACK)
                            .spawn(move || {
                                serve(stream, &name, pong, &flows, &probes);
                                conns.lock().unwrap().remove(&id);
                            });
                    }
                })
                .expect("spawn server acceptor")
        };
        self.running = Some(Running {
            stop,
            conns,
            acceptor,
        });
    }

    /// Closes the listener (new connects are refused) and every open connection.
    fn kill(&mut self) {
        let Some(running) = self.running.take() else {
            return;
        };
        running.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept() with a connection of our own.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2));
        let _ = running.acceptor.join();
        for (_, conn) in running.conns.lock().unwrap().drain() {
            let _ = conn.shutdown(Shutdown::Both);
        }
    }

    /// Listens again on the same address.
    fn restart(&mut self) {
        assert!(self.running.is_none(), "{} is already running", self.addr);
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match bind_listener(self.addr) {
                Ok(listener) => break listener,
                // The port may be briefly held (e.g. by another test's connect): retry.
                Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("cannot listen again on {}: {e}", self.addr),
            }
        };
        self.run(listener);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn serve(mut s: TcpStream, name: &str, pong: &[u8], flows: &AtomicUsize, probes: &AtomicUsize) {
    let _ = s.set_read_timeout(Some(BACKEND_IO_TIMEOUT));
    let _ = s.set_write_timeout(Some(BACKEND_IO_TIMEOUT));
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match s.read(&mut byte) {
            Ok(1) if byte[0] == b'\n' => break,
            Ok(1) if line.len() < 64 => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            _ => return, // a connect-only check, or garbage
        }
    }
    if line.strip_suffix(b"\r").unwrap_or(&line) == b"PING" {
        probes.fetch_add(1, Ordering::SeqCst);
        let _ = s.write_all(pong);
        return;
    }
    flows.fetch_add(1, Ordering::SeqCst);
    if s.write_all(format!("{name}\n").as_bytes()).is_err() {
        return;
    }
    let mut buf = vec![0u8; 32 * 1024];
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
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

/// On an open flow: asks who serves it and checks an echo of 1 KiB. Returns the backend name.
fn ask(s: &mut TcpStream, key: u64) -> Result<String, String> {
    s.write_all(b"HI\n")
        .map_err(|e| format!("write failed: {e}"))?;
    let name = read_line(s)?;
    echo_roundtrip(s, &pattern_vec(key, 1024))?;
    Ok(name)
}

/// One short flow from `src`: which backend served it, or how it failed.
fn who(proxy: SocketAddr, src: IpAddr) -> Result<String, String> {
    let mut s = connect_from(src, proxy).map_err(|e| format!("connect: {e}"))?;
    let key = match src {
        IpAddr::V4(v4) => u64::from(u32::from(v4)),
        IpAddr::V6(_) => 6,
    };
    ask(&mut s, key)
}

/// Like `who`, but a failure panics with the proxy's stderr.
fn served(proxy: &Proxy, src: IpAddr) -> String {
    who(proxy.addr, src)
        .unwrap_or_else(|e| panic!("flow from {src} failed: {e}\n{}", proxy.stderr_tail()))
}

fn client_ips(first: u8, n: u8) -> Vec<IpAddr> {
    (first..first + n).map(client_ip).collect()
}

/// `--listen 127.0.0.1:0` and a `--backend` for each of `backends`, then `extra`.
fn args(backends: &[String], extra: &[&str]) -> Vec<String> {
    let mut args = vec!["--listen".to_string(), "127.0.0.1:0".to_string()];
    for b in backends {
        args.push("--backend".into());
        args.push(b.clone());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Waits (bounded) for a stderr line containing `needle`; returns whether it came.
fn wait_log(proxy: &Proxy, needle: &str, timeout: Duration) -> bool {
    wait_until(timeout, || proxy.stderr().contains(needle))
}

/// The first stderr line containing `needle`.
fn log_line(proxy: &Proxy, needle: &str) -> Option<String> {
    proxy
        .stderr()
        .lines()
        .find(|l| l.contains(needle))
        .map(str::to_string)
}

/// Runs rounds of one flow per client until `good` holds for every flow of a round (the new
/// backend state has reached every worker), or panics after `timeout`.
fn until_round(
    proxy: &Proxy,
    ips: &[IpAddr],
    timeout: Duration,
    what: &str,
    good: impl Fn(&Result<String, String>) -> bool,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let round: Vec<(IpAddr, Result<String, String>)> =
            ips.iter().map(|&ip| (ip, who(proxy.addr, ip))).collect();
        if round.iter().all(|(_, r)| good(r)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not the case within {timeout:?}; last round: {round:?}\n{}",
            proxy.stderr_tail()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// `ringway --show-mapping` for `clients` with these backends and flags: `(client, backend)`
/// pairs in output order; panics unless it exits 0.
fn show_mapping(backends: &[String], extra: &[&str], clients: &[String]) -> Vec<(String, String)> {
    let mut argv = Vec::new();
    for b in backends {
        argv.push("--backend".to_string());
        argv.push(b.clone());
    }
    argv.extend(extra.iter().map(|s| s.to_string()));
    for c in clients {
        argv.push("--show-mapping".into());
        argv.push(c.clone());
    }
    let out = run_to_exit(&argv, Duration::from_secs(20));
    assert_eq!(
        out.status.code(),
        Some(0),
        "ringway {argv:?}: status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    out.stdout
        .lines()
        .map(|l| {
            let (client, backend) = l
                .split_once(" -> ")
                .unwrap_or_else(|| panic!("not a `ADDR -> BACKEND` line: {l:?}\n{}", out.stdout));
            (client.to_string(), backend.to_string())
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Long-running flows
// ---------------------------------------------------------------------------------------------

/// A flow that keeps echoing checksummed bytes until told to stop, then half-closes and
/// expects a clean end.
struct LongFlow {
    stop: Arc<AtomicBool>,
    /// Bytes echoed and checked so far.
    progress: Arc<AtomicU64>,
    done: Receiver<Result<(String, u64), String>>,
    thread: Option<JoinHandle<()>>,
}

impl LongFlow {
    fn start(proxy: SocketAddr, src: IpAddr, key: u64) -> LongFlow {
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(AtomicU64::new(0));
        let (tx, done) = mpsc::channel();
        let thread = {
            let (stop, progress) = (stop.clone(), progress.clone());
            thread::Builder::new()
                .stack_size(SMALL_STACK)
                .spawn(move || {
                    let _ = tx.send(long_flow(proxy, src, key, &stop, &progress));
                })
                .unwrap()
        };
        LongFlow {
            stop,
            progress,
            done,
            thread: Some(thread),
        }
    }

    fn progress(&self) -> u64 {
        self.progress.load(Ordering::SeqCst)
    }

    /// Waits (bounded) for the flow to end on its own; `None` if it is still running.
    fn wait_ended(&mut self, timeout: Duration) -> Option<Result<(String, u64), String>> {
        let result = self.done.recv_timeout(timeout).ok()?;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        Some(result)
    }

    /// Tells the flow to finish and returns how it ended.
    fn finish(mut self) -> Result<(String, u64), String> {
        self.stop.store(true, Ordering::SeqCst);
        self.wait_ended(IO_TIMEOUT + Duration::from_secs(5))
            .unwrap_or_else(|| Err("long flow did not finish".into()))
    }
}

fn long_flow(
    proxy: SocketAddr,
    src: IpAddr,
    key: u64,
    stop: &AtomicBool,
    progress: &AtomicU64,
) -> Result<(String, u64), String> {
    const CHUNK: usize = 8 * 1024;
    let mut s = connect_from(src, proxy).map_err(|e| format!("connect: {e}"))?;
    s.write_all(b"HI\n").map_err(|e| format!("write: {e}"))?;
    let name = read_line(&mut s)?;
    let mut buf = vec![0u8; CHUNK];
    let mut pos = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let chunk = pattern_slice(key, pos, CHUNK);
        s.write_all(chunk)
            .map_err(|e| format!("{name}: write after {pos} bytes: {e}"))?;
        let back = &mut buf[..chunk.len()];
        s.read_exact(back)
            .map_err(|e| format!("{name}: read after {pos} bytes: {e}"))?;
        check_pattern(key, pos, back)
            .map_err(|i| format!("{name}: wrong byte at offset {}", pos + i as u64))?;
        pos += chunk.len() as u64;
        progress.store(pos, Ordering::SeqCst);
        // Pacing, so a few of these do not hog a small machine (not a synchronisation).
        thread::sleep(Duration::from_millis(3));
    }
    s.shutdown(Shutdown::Write)
        .map_err(|e| format!("{name}: shutdown: {e}"))?;
    let mut extra = [0u8; 64];
    match s.read(&mut extra) {
        Ok(0) => Ok((name, pos)),
        Ok(n) => Err(format!("{name}: {n} unexpected bytes after {pos}")),
        Err(e) => Err(format!("{name}: no clean end after {pos} bytes: {e}")),
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// `to - from` in milliseconds, negative when `to` comes first.
fn signed_ms(from: Instant, to: Instant) -> i128 {
    to.saturating_duration_since(from).as_millis() as i128
        - from.saturating_duration_since(to).as_millis() as i128
}

/// One flow of the client loop: when it started, from where, and what came of it.
#[derive(Debug)]
struct Record {
    start: Instant,
    ip: IpAddr,
    result: Result<String, String>,
}

/// Kill one of three backends under steady load from many client IPs. With `--retries 0` and
/// passive checks off, a flow sent to the dead backend fails, so the flows show exactly when
/// the active checks took it out of rotation. Then restart it on the same port and expect
/// its clients back.
#[test]
fn killed_backend_leaves_rotation_promptly_and_its_clients_return_after_restart() {
    let mut servers: Vec<Server> = (0..3).map(|_| Server::start(GOOD_PONG)).collect();
    let names: Vec<String> = servers.iter().map(Server::name).collect();
    let mut extra = CHECKS.to_vec();
    extra.extend(["--retries", "0", "--max-fails", "0"]);
    let proxy = Proxy::start(&args(&names, &extra));
    let ips = client_ips(10, 30);

    let before: BTreeMap<IpAddr, String> = ips.iter().map(|&ip| (ip, served(&proxy, ip))).collect();
    let clients_of = |name: &str| -> Vec<IpAddr> {
        before
            .iter()
            .filter(|(_, b)| b.as_str() == name)
            .map(|(ip, _)| *ip)
            .collect()
    };
    // The victim: the backend with the most clients; every backend must have some.
    let victim = (0..3).max_by_key(|&i| clients_of(&names[i]).len()).unwrap();
    for name in &names {
        assert!(
            !clients_of(name).is_empty(),
            "30 client IPs never reached {name}: {before:?}"
        );
    }
    let victim_name = names[victim].clone();

    // A long checksummed flow on every backend, from one of its clients.
    let mut long: Vec<(String, LongFlow)> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let src = clients_of(name)[0];
            (
                name.clone(),
                LongFlow::start(proxy.addr, src, 0x1000 + i as u64),
            )
        })
        .collect();
    assert!(
        wait_until(Duration::from_secs(10), || long
            .iter()
            .all(|(_, f)| f.progress() > 0)),
        "long flows did not get going\n{}",
        proxy.stderr_tail()
    );

    // The client loop.
    let stop = Arc::new(AtomicBool::new(false));
    let records: Arc<Mutex<Vec<Record>>> = Arc::default();
    let looper = {
        let (stop, records, ips, addr) = (stop.clone(), records.clone(), ips.clone(), proxy.addr);
        thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                for &ip in &ips {
                    let start = Instant::now();
                    let result = who(addr, ip);
                    records.lock().unwrap().push(Record { start, ip, result });
                    thread::sleep(Duration::from_millis(2)); // pacing
                }
            }
        })
    };
    let rounds_since = |t: Instant| {
        records
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.start >= t)
            .count()
            / ips.len()
    };
    let t0 = Instant::now();
    assert!(
        wait_until(Duration::from_secs(20), || rounds_since(t0) >= 1),
        "the client loop made no progress\n{}",
        proxy.stderr_tail()
    );

    // Kill it.
    let t_kill = Instant::now();
    let progress_at_kill: Vec<u64> = long.iter().map(|(_, f)| f.progress()).collect();
    servers[victim].kill();
    let down = format!("backend {victim_name} is DOWN");
    assert!(
        wait_log(&proxy, &down, NOTICE_BOUND),
        "{victim_name} was killed {NOTICE_BOUND:?} ago and is still not marked down\n{}",
        proxy.stderr_tail()
    );
    let t_down_seen = Instant::now();
    let line = log_line(&proxy, &down).unwrap();
    assert!(
        line.contains("(check"),
        "not from the active checks: {line}"
    );

    // The long flow on the killed backend ends (the backend closed it), it does not hang.
    let victim_long = long.iter_mut().find(|(n, _)| *n == victim_name).unwrap();
    match victim_long.1.wait_ended(CLOSE_TIMEOUT) {
        None => panic!(
            "the long flow on the killed backend is still open {CLOSE_TIMEOUT:?} after its \
             backend closed it\n{}",
            proxy.stderr_tail()
        ),
        Some(Ok(r)) => panic!("the long flow on the killed backend went on: {r:?}"),
        Some(Err(e)) => assert!(!e.contains("wrong byte"), "{e}"),
    }

    // Let the loop run two full rounds with the backend known to be down.
    let t_settled = t_down_seen + PUBLISH_GRACE;
    assert!(
        wait_until(Duration::from_secs(30), || rounds_since(t_settled) >= 2),
        "the client loop stalled after the kill\n{}",
        proxy.stderr_tail()
    );

    // Restart it on the same port.
    let t_restart = Instant::now();
    servers[victim].restart();
    let up = format!("backend {victim_name} is UP");
    assert!(
        wait_log(&proxy, &up, NOTICE_BOUND),
        "{victim_name} is listening again and still not marked up after {NOTICE_BOUND:?}\n{}",
        proxy.stderr_tail()
    );
    let t_back = Instant::now() + PUBLISH_GRACE;
    assert!(
        wait_until(Duration::from_secs(30), || rounds_since(t_back) >= 2),
        "the client loop stalled after the restart\n{}",
        proxy.stderr_tail()
    );
    stop.store(true, Ordering::SeqCst);
    looper.join().unwrap();

    // Flows in progress on the other backends went on across the kill, every byte intact.
    for (i, (name, flow)) in long.into_iter().enumerate() {
        if name == victim_name {
            continue;
        }
        let progressed_after_kill = flow.progress() > progress_at_kill[i];
        let result = flow.finish();
        match result {
            Ok((served_by, bytes)) => {
                assert_eq!(served_by, name);
                assert!(
                    progressed_after_kill,
                    "long flow on {name} made no progress after the kill ({bytes} bytes)"
                );
            }
            Err(e) => panic!(
                "long flow on surviving backend {name} broke: {e}\n{}",
                proxy.stderr_tail()
            ),
        }
    }

    // What the client loop saw.
    let records = std::mem::take(&mut *records.lock().unwrap());
    let mut problems = Vec::new();
    for r in &records {
        let home = &before[&r.ip];
        let is_victim_client = *home == victim_name;
        let ok = match (&r.result, is_victim_client) {
            // Clients of the surviving backends never notice a thing.
            (Ok(b), false) => b == home,
            (Err(_), false) => false,
            // Cut by the kill, or sent to the dead backend before the checks noticed.
            (Err(_), true) => r.start < t_settled,
            // Before the kill: its own backend.
            (Ok(b), true) if r.start < t_kill => b == home,
            // From the kill until the restart: another backend.
            (Ok(b), true) if r.start < t_restart => b != home,
            // Restarted: wherever the proxy thinks it is, the flow is served.
            (Ok(_), true) if r.start < t_back => true,
            // Back up: the exact original backend again.
            (Ok(b), true) => b == home,
        };
        if !ok {
            problems.push(format!(
                "{:>6} ms after the kill: {} (home {home}): {:?}",
                signed_ms(t_kill, r.start),
                r.ip,
                r.result
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{} of {} flows went wrong (killed {victim_name}; down seen after {:?}, restarted \
         after {:?}):\n{}\n{}",
        problems.len(),
        records.len(),
        t_down_seen - t_kill,
        t_restart - t_kill,
        problems.join("\n"),
        proxy.stderr_tail()
    );

    // And the mapping is exactly what it was before.
    let after: BTreeMap<IpAddr, String> = ips.iter().map(|&ip| (ip, served(&proxy, ip))).collect();
    assert_eq!(after, before, "the mapping did not return to what it was");
}

/// `--backend A --backend B --backend C,backup`: C serves only while both A and B are down.
#[test]
fn backup_serves_only_while_every_primary_is_down() {
    let mut a = Server::start(GOOD_PONG);
    let mut b = Server::start(GOOD_PONG);
    let c = Server::start(GOOD_PONG);
    let (an, bn, cn) = (a.name(), b.name(), c.name());
    // Without retries or passive checks, only the active checks' verdict moves flows.
    let mut flags = CHECKS.to_vec();
    flags.extend(["--retries", "0", "--max-fails", "0"]);
    let proxy = Proxy::start(&args(
        &[an.clone(), bn.clone(), format!("{cn},backup")],
        &flags,
    ));
    let ips = client_ips(50, 20);
    let round = |what: &str, allowed: &[&str]| {
        for &ip in &ips {
            let got = served(&proxy, ip);
            assert!(
                allowed.contains(&got.as_str()),
                "{what}: client {ip} was served by {got}, want one of {allowed:?} (backup \
                 {cn})\n{}",
                proxy.stderr_tail()
            );
        }
    };

    round("all healthy", &[&an, &bn]);
    round("all healthy, again", &[&an, &bn]);
    let seen: Vec<String> = ips.iter().map(|&ip| served(&proxy, ip)).collect();
    assert!(
        seen.contains(&an) && seen.contains(&bn),
        "20 clients did not use both primaries: {seen:?}"
    );

    a.kill();
    assert!(
        wait_log(&proxy, &format!("backend {an} is DOWN"), NOTICE_BOUND),
        "{an} killed, not marked down\n{}",
        proxy.stderr_tail()
    );
    until_round(&proxy, &ips, NOTICE_BOUND, "A down: all on B", |r| {
        r.as_deref() == Ok(bn.as_str())
    });
    round("A down, B up", &[&bn]);
    assert_eq!(
        c.flows(),
        0,
        "the backup served flows while a primary was up"
    );

    b.kill();
    assert!(
        wait_log(&proxy, &format!("backend {bn} is DOWN"), NOTICE_BOUND),
        "{bn} killed, not marked down\n{}",
        proxy.stderr_tail()
    );
    until_round(&proxy, &ips, NOTICE_BOUND, "A and B down: all on C", |r| {
        r.as_deref() == Ok(cn.as_str())
    });
    round("A and B down", &[&cn]);

    a.restart();
    assert!(
        wait_log(&proxy, &format!("backend {an} is UP"), NOTICE_BOUND),
        "{an} restarted, not marked up\n{}",
        proxy.stderr_tail()
    );
    until_round(&proxy, &ips, NOTICE_BOUND, "A back: all on A", |r| {
        r.as_deref() == Ok(an.as_str())
    });
    let flows_on_c = c.flows();
    round("A back, B down", &[&an]);
    assert_eq!(
        c.flows(),
        flows_on_c,
        "the backup still got new flows with A back"
    );
}

/// Whether a new client from `src` is closed (or refused) within 2 s.
fn closed_promptly(proxy: &Proxy, src: IpAddr) -> Result<(), String> {
    const BOUND: Duration = Duration::from_secs(2);
    let started = Instant::now();
    let mut s = match connect_from(src, proxy.addr) {
        Ok(s) => s,
        // Refusing the connect outright is as good as closing it.
        Err(_) if started.elapsed() < BOUND => return Ok(()),
        Err(e) => {
            return Err(format!(
                "connect from {src} took {:?} to fail: {e}",
                started.elapsed()
            ))
        }
    };
    let _ = s.write_all(b"HI\n");
    expect_closed(&mut s, BOUND)
        .map(|_| ())
        .map_err(|e| format!("client {src}: {e}"))
}

/// With every backend down and marked down, a new client is closed at once, not left waiting;
/// when a backend comes back, flows go through again. One backend is a black hole (its
/// connects hang), and `--connect-timeout` is long: a proxy that still tried the backends
/// marked down would keep the client waiting.
#[test]
fn all_backends_down_refuses_new_clients_at_once_and_recovers() {
    let mut a = Server::start(GOOD_PONG);
    let hole = Blackhole::new();
    let hole_addr = hole.addr;
    let mut flags = CHECKS.to_vec();
    flags.extend(["--health-timeout", "300ms", "--connect-timeout", "10s"]);
    let proxy = Proxy::start(&args(&[a.name(), hole_addr.to_string()], &flags));
    assert!(
        wait_log(
            &proxy,
            &format!("backend {hole_addr} is DOWN"),
            NOTICE_BOUND
        ),
        "a backend whose connects hang is not marked down\n{}",
        proxy.stderr_tail()
    );
    let ips = client_ips(81, 5);
    until_round(&proxy, &ips, NOTICE_BOUND, "all on the live backend", |r| {
        r.as_deref() == Ok(a.name().as_str())
    });

    a.kill();
    assert!(
        wait_log(
            &proxy,
            &format!("backend {} is DOWN", a.name()),
            NOTICE_BOUND
        ),
        "{} killed, not marked down\n{}",
        a.name(),
        proxy.stderr_tail()
    );
    assert!(
        wait_log(&proxy, "no backend is healthy", Duration::from_secs(2)),
        "no warning that nothing is healthy\n{}",
        proxy.stderr_tail()
    );
    // The state is logged just before it is published to the workers: wait for one client
    // to be closed promptly, then every one must be.
    let deadline = Instant::now() + NOTICE_BOUND;
    while let Err(e) = closed_promptly(&proxy, ips[0]) {
        assert!(
            Instant::now() < deadline,
            "with every backend marked down: {e}\n{}",
            proxy.stderr_tail()
        );
    }
    for &src in &ips {
        if let Err(e) = closed_promptly(&proxy, src) {
            panic!(
                "with every backend marked down: {e}\n{}",
                proxy.stderr_tail()
            );
        }
    }

    // The black hole's address comes back as a working backend.
    drop(hole);
    let mut back = Server::not_started(hole_addr, GOOD_PONG);
    back.restart();
    assert!(
        wait_log(&proxy, &format!("backend {hole_addr} is UP"), NOTICE_BOUND),
        "{hole_addr} is back, not marked up\n{}",
        proxy.stderr_tail()
    );
    until_round(&proxy, &ips, NOTICE_BOUND, "a backend is back", |r| {
        r.as_deref() == Ok(back.name().as_str())
    });
}

/// Passive checks only (no `--health-interval`): a backend refusing connections is taken down
/// after `--max-fails` failures, its clients are redispatched by the retry, and after
/// `--fail-timeout` it is tried again.
#[test]
fn passive_checks_take_a_refusing_backend_down_and_retry_it_after_fail_timeout() {
    let a = Server::start(GOOD_PONG);
    let b = Server::start(GOOD_PONG);
    let mut d = Server::not_started(dead_addr(), GOOD_PONG);
    let names = [a.name(), b.name(), d.name()];
    let flags = ["--max-fails", "2", "--fail-timeout", "2s", "--retries", "1"];
    let ips = client_ips(90, 40);
    let ip_texts: Vec<String> = ips.iter().map(|ip| ip.to_string()).collect();
    let d_clients: Vec<IpAddr> = show_mapping(&names, &[], &ip_texts)
        .into_iter()
        .filter(|(_, backend)| *backend == d.name())
        .map(|(ip, _)| ip.parse().unwrap())
        .collect();
    assert!(
        !d_clients.is_empty(),
        "--show-mapping maps none of 40 clients to {}",
        d.name()
    );
    let proxy = Proxy::start(&args(&names, &flags));
    let down = format!("backend {} is DOWN (passive", d.name());
    let up = format!("backend {} is UP", d.name());

    // Its clients are redispatched until it is taken down, after the second failure.
    let mut flows = 0;
    while !proxy.stderr().contains(&down) {
        assert!(
            flows < 20,
            "{flows} flows to a refusing backend and no `{down}` line\n{}",
            proxy.stderr_tail()
        );
        let ip = d_clients[flows % d_clients.len()];
        let got = served(&proxy, ip);
        assert_ne!(got, d.name());
        flows += 1;
        if flows == 1 {
            assert!(
                !proxy.stderr().contains(&down),
                "taken down after one failure with --max-fails 2\n{}",
                proxy.stderr_tail()
            );
        } else {
            // After the second failure the line follows (the workers report asynchronously).
            wait_log(&proxy, &down, Duration::from_secs(2));
        }
    }
    let t_down_seen = Instant::now();

    // It comes back to life at once, but the proxy leaves it alone until the fail timeout
    // (2 s) has passed: for the first second (the rest is slack) its clients go elsewhere.
    d.restart();
    let quiet_until = t_down_seen + Duration::from_secs(1);
    while Instant::now() < quiet_until {
        for &ip in &d_clients {
            let got = served(&proxy, ip);
            assert!(
                got != d.name() || proxy.stderr().contains(&up),
                "{ip} was served by {got} {:?} after it was taken down with --fail-timeout 2s\n{}",
                t_down_seen.elapsed(),
                proxy.stderr_tail()
            );
        }
        thread::sleep(Duration::from_millis(20)); // pacing
    }
    assert!(
        wait_log(&proxy, &up, NOTICE_BOUND),
        "{} not tried again after the fail timeout\n{}",
        d.name(),
        proxy.stderr_tail()
    );
    let line = log_line(&proxy, &up).unwrap();
    assert!(line.contains("fail timeout"), "{line}");
    until_round(
        &proxy,
        &d_clients,
        NOTICE_BOUND,
        "its clients are back on it",
        |r| r.as_deref() == Ok(d.name().as_str()),
    );
}

/// The line that says every backend is down and those down by passive checks are tried anyway.
const PASSIVE_OVERRIDE: &str = "every backend is down, some by passive checks alone";

/// Default flags, one backend that refuses connections: passive checks take it down, but that
/// must not turn clients away without a try. Each client is closed at once (its connect is
/// refused, nothing hangs), the override is logged once, and when the backend comes back the
/// next client is served at once, not `--fail-timeout` (10 s) later.
#[test]
fn a_single_refusing_backend_closes_clients_at_once_and_serves_again_as_soon_as_it_is_back() {
    let mut d = Server::not_started(dead_addr(), GOOD_PONG);
    let proxy = Proxy::start(&args(&[d.name()], &[]));
    let down = format!("backend {} is DOWN (passive", d.name());
    let ips = client_ips(60, 10);
    for &ip in &ips {
        if let Err(e) = closed_promptly(&proxy, ip) {
            panic!(
                "with its one backend refusing: {e}\n{}",
                proxy.stderr_tail()
            );
        }
    }
    assert!(
        wait_log(&proxy, &down, NOTICE_BOUND),
        "10 refused connects and no `{down}` line\n{}",
        proxy.stderr_tail()
    );
    // Marked down, it is still tried: clients are still closed at once.
    for &ip in &ips {
        if let Err(e) = closed_promptly(&proxy, ip) {
            panic!(
                "with its one backend down by passive checks: {e}\n{}",
                proxy.stderr_tail()
            );
        }
    }
    d.restart();
    let back = Instant::now();
    for &ip in &ips {
        assert_eq!(served(&proxy, ip), d.name());
    }
    assert!(
        back.elapsed() < Duration::from_secs(5),
        "serving {} clients took {:?} after the backend came back",
        ips.len(),
        back.elapsed()
    );
    // Logged once when it started, not for each client.
    assert_eq!(
        proxy.stderr().matches(PASSIVE_OVERRIDE).count(),
        1,
        "`{PASSIVE_OVERRIDE}` is not logged exactly once\n{}",
        proxy.stderr_tail()
    );
}

/// A backend that resets every connection it accepts, before sending a byte, is making its own
/// choice (iperf3 after an upload, sshd over MaxStartups): it stays up and keeps getting its
/// clients. Flags make passive checks as sensitive as they go (one failure takes a backend
/// down), and a healthy second backend stands by, so any such failure would show.
#[test]
fn a_backend_resetting_connections_it_accepted_stays_up() {
    let resetter = Backend::start(Kind::Reset { prefix: 0, read: 0 });
    let other = Server::start(GOOD_PONG);
    let names = [resetter.arg(), other.name()];
    let ips = client_ips(70, 40);
    let ip_texts: Vec<String> = ips.iter().map(|ip| ip.to_string()).collect();
    let resetter_clients: Vec<IpAddr> = show_mapping(&names, &[], &ip_texts)
        .into_iter()
        .filter(|(_, backend)| *backend == resetter.arg())
        .map(|(ip, _)| ip.parse().unwrap())
        .collect();
    assert!(
        resetter_clients.len() >= 3,
        "--show-mapping maps only {} of 40 clients to the resetting backend",
        resetter_clients.len()
    );
    let proxy = Proxy::start(&args(&names, &["--max-fails", "1", "--retries", "0"]));
    for (n, &ip) in resetter_clients.iter().cycle().take(12).enumerate() {
        match connect_from(ip, proxy.addr) {
            Ok(mut s) => {
                let _ = s.write_all(b"HI\n");
                if let Err(e) = expect_closed(&mut s, CLOSE_TIMEOUT) {
                    panic!(
                        "client {ip} of the resetting backend: {e}\n{}",
                        proxy.stderr_tail()
                    );
                }
            }
            // The backend's reset can reach the client before its connect call returns (the
            // call reports the socket's error after the handshake): closed all the same.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("connect from {ip}: {e}\n{}", proxy.stderr_tail()),
        }
        // Every client reached it: it was never taken out of rotation.
        assert!(
            wait_until(CLOSE_TIMEOUT, || resetter
                .stats
                .accepted
                .load(Ordering::SeqCst)
                > n),
            "client {} of the resetting backend never reached it\n{}",
            n + 1,
            proxy.stderr_tail()
        );
    }
    assert!(
        !proxy.stderr().contains("is DOWN"),
        "a backend was taken down for resetting connections it accepted\n{}",
        proxy.stderr_tail()
    );
    assert_eq!(
        other.flows(),
        0,
        "with --retries 0 nothing was redispatched"
    );
}

/// `--health-send`/`--health-expect`: a backend that accepts connections but answers the
/// probe wrongly is taken down and gets no new flows; the ones answering right stay up.
#[test]
fn probe_with_the_wrong_answer_takes_a_backend_down_and_right_answers_keep_it_up() {
    let good1 = Server::start(GOOD_PONG);
    let good2 = Server::start(GOOD_PONG);
    let bad = Server::start(BAD_PONG);
    let names = [good1.name(), good2.name(), bad.name()];
    let mut flags = CHECKS.to_vec();
    flags.extend(["--health-send", "PING\\r\\n", "--health-expect", "+PONG"]);
    let ips = client_ips(140, 40);
    let ip_texts: Vec<String> = ips.iter().map(|ip| ip.to_string()).collect();
    let bad_clients = show_mapping(&names, &[], &ip_texts)
        .into_iter()
        .filter(|(_, backend)| *backend == bad.name())
        .count();
    assert!(bad_clients > 0, "no client maps to the bad backend");

    let proxy = Proxy::start(&args(&names, &flags));
    let down = format!("backend {} is DOWN", bad.name());
    assert!(
        wait_log(&proxy, &down, NOTICE_BOUND),
        "{} answers the probe wrongly and is not marked down\n{}",
        bad.name(),
        proxy.stderr_tail()
    );
    let line = log_line(&proxy, &down).unwrap();
    assert!(
        line.contains("(check") && line.contains("does not match"),
        "{line}"
    );
    assert!(bad.probes() >= 2, "the bad backend was never probed");
    until_round(
        &proxy,
        &ips,
        NOTICE_BOUND,
        "nothing on the bad backend",
        |r| r.as_ref().is_ok_and(|b| *b != bad.name()),
    );

    // The good ones keep passing checks and stay up.
    let probes = (good1.probes(), good2.probes());
    assert!(
        wait_until(Duration::from_secs(10), || good1.probes() >= probes.0 + 4
            && good2.probes() >= probes.1 + 4),
        "the good backends are not being probed\n{}",
        proxy.stderr_tail()
    );
    let flows_on_bad = bad.flows();
    let mut used = Vec::new();
    for &ip in &ips {
        let got = served(&proxy, ip);
        assert_ne!(
            got,
            bad.name(),
            "client {ip} reached the backend marked down"
        );
        used.push(got);
    }
    assert_eq!(bad.flows(), flows_on_bad);
    for good in [&good1, &good2] {
        assert!(
            !proxy
                .stderr()
                .contains(&format!("backend {} is DOWN", good.name())),
            "a backend answering the probe right was marked down\n{}",
            proxy.stderr_tail()
        );
        assert!(
            used.contains(&good.name()),
            "no client reached {}",
            good.name()
        );
    }
}

/// `--show-mapping` prints `ADDR -> BACKEND` for each address and exits 0 without
/// listening; the order of `--backend` flags does not matter; and the printed backend is the
/// one a real flow reaches, for the ring and for Maglev.
#[test]
fn show_mapping_matches_real_flows_and_ignores_backend_order() {
    let servers: Vec<Server> = (0..3).map(|_| Server::start(GOOD_PONG)).collect();
    let names: Vec<String> = servers.iter().map(Server::name).collect();
    let reversed: Vec<String> = names.iter().rev().cloned().collect();
    let ips = client_ips(180, 24);
    let ip_texts: Vec<String> = ips.iter().map(|ip| ip.to_string()).collect();

    // It must not listen: the --listen port is taken, so listening would fail.
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap().to_string();
    let listen = ["--listen", busy_addr.as_str()];
    let mut serving = args(&names, &[]);
    serving[1] = busy_addr.clone();
    assert!(
        Proxy::try_start(&serving).is_err(),
        "ringway could listen on {busy_addr}, which is taken: the check below means nothing"
    );

    for extra in [
        &["--hash", "ring"][..],
        &["--hash", "maglev", "--hash-seed", "7"],
    ] {
        let mut with_listen = listen.to_vec();
        with_listen.extend_from_slice(extra);
        let shown = show_mapping(&names, &with_listen, &ip_texts);
        let shown_reversed = show_mapping(&reversed, extra, &ip_texts);
        assert_eq!(
            shown, shown_reversed,
            "{extra:?}: the mapping depends on --backend order"
        );
        let printed: Vec<&str> = shown.iter().map(|(c, _)| c.as_str()).collect();
        assert_eq!(
            printed, ip_texts,
            "{extra:?}: one line per address, in order"
        );
        assert!(
            shown.iter().all(|(_, b)| names.contains(b)),
            "{extra:?}: {shown:?}"
        );

        let proxy = Proxy::start(&args(&names, extra));
        for (client, backend) in &shown {
            let got = served(&proxy, client.parse().unwrap());
            assert_eq!(
                &got, backend,
                "{extra:?}: --show-mapping says {client} -> {backend}, a real flow from it \
                 reached {got}"
            );
        }
    }

    // With --hash-key src-ip-port, IP:PORT addresses: connect from exactly those.
    let sockets: Vec<(Socket, SocketAddr)> = (0..8)
        .map(|_| {
            let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
            s.bind(&SockAddr::from(SocketAddr::new(client_ip(210), 0)))
                .unwrap();
            let addr = s.local_addr().unwrap().as_socket().unwrap();
            (s, addr)
        })
        .collect();
    let texts: Vec<String> = sockets.iter().map(|(_, a)| a.to_string()).collect();
    let extra = ["--hash-key", "src-ip-port"];
    let shown = show_mapping(&names, &extra, &texts);
    let printed: Vec<&str> = shown.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(printed, texts);
    let proxy = Proxy::start(&args(&names, &extra));
    for ((socket, addr), (_, backend)) in sockets.into_iter().zip(&shown) {
        socket
            .connect_timeout(&SockAddr::from(proxy.addr), Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("connect from {addr}: {e}"));
        let mut stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        let got = ask(&mut stream, 9).unwrap_or_else(|e| panic!("flow from {addr}: {e}"));
        assert_eq!(
            &got, backend,
            "src-ip-port: --show-mapping says {addr} -> {backend}, the flow reached {got}"
        );
    }
    drop(busy);
}
