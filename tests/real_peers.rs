//! Real programs on both sides of Ringway, with default flags (only `--listen` and `--backend`;
//! `--admin` only to read `/backends`): what a user runs through a TCP proxy and relies on.
//!
//! - iperf3 uploads (`-P4`), downloads (`-R`) and both at once (`--bidir`) complete with every
//!   byte accounted for, and the one backend is still up afterwards. iperf3's server resets its
//!   data streams at the end of a test without having sent a byte on them: a proxy that takes
//!   such resets as evidence against the backend marks it down and refuses the next run.
//! - redis-benchmark completes every request, and the server saw each one.
//!
//! The servers are started here on loopback ports picked free, and killed by PID when the test
//! ends. Every wait has a deadline. A missing program fails the test with the name of the
//! Debian package to install (`scripts/test.sh` installs them): nothing is skipped.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Longest a client tool may run: a run of a few seconds on a loaded two-CPU machine.
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a server may take to say it is ready.
const SERVER_START: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Programs
// ---------------------------------------------------------------------------------------------

/// Panics unless `program` is on the PATH, naming the Debian package that provides it.
fn require(program: &str, package: &str) {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path).any(|dir| dir.join(program).is_file());
    assert!(
        found,
        "`{program}` is not installed: install the Debian package `{package}` \
         (scripts/test.sh does) to run the real-peer tests"
    );
}

/// A port that was free a moment ago, for servers that cannot take port 0.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("pick a free port")
        .port()
}

/// A server process owned by the test: killed (by its PID) and reaped on drop.
struct Server {
    child: Child,
    addr: SocketAddr,
}

/// Attempts at starting a server on a free port: another process may take the port between
/// our pick and the server's bind.
const START_ATTEMPTS: usize = 3;

impl Server {
    /// Starts the server that `command(port)` makes on a free port; panics after
    /// `START_ATTEMPTS` failures with what it printed.
    fn start_on_free_port(
        what: &'static str,
        command: impl Fn(u16) -> Command,
        ready: &str,
    ) -> Server {
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            match Server::start(what, command(port), port, ready) {
                Ok(server) => return server,
                Err(e) => failures.push(e),
            }
        }
        panic!("{what} did not start: {}", failures.join("\n---\n"));
    }

    /// Starts `cmd` and waits (bounded) for a line containing `ready` on its stdout.
    fn start(what: &str, mut cmd: Command, port: u16, ready: &str) -> Result<Server, String> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {what}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        thread::Builder::new()
            .name(format!("{what}-stdout"))
            .stack_size(SMALL_STACK)
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { return };
                    if tx.send(line).is_err() {
                        // Nobody listens any more; keep draining so the server never blocks.
                        continue;
                    }
                }
            })
            .expect("spawn a stdout reader");
        // From here on, dropping `server` kills the process.
        let server = Server {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        let deadline = Instant::now() + SERVER_START;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) if line.contains(ready) => return Ok(server),
                Ok(line) => seen.push(line),
                Err(_) => {
                    return Err(format!(
                        "{what} on port {port} did not print `{ready}` within {SERVER_START:?} \
                         (or exited); it printed:\n{}",
                        seen.join("\n")
                    ))
                }
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a client program to its end (killed after `TOOL_TIMEOUT`).
fn run_tool(program: &str, args: &[&str]) -> Outcome {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    let read_all = |mut pipe: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut text = Vec::new();
            let _ = pipe.read_to_end(&mut text);
            String::from_utf8_lossy(&text).into_owned()
        })
    };
    let stdout = read_all(Box::new(child.stdout.take().expect("stdout")));
    let stderr = read_all(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + TOOL_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for a client tool") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{program} {args:?} still running after {TOOL_TIMEOUT:?} (killed)");
        }
        thread::sleep(Duration::from_millis(20));
    };
    Outcome {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

// ---------------------------------------------------------------------------------------------
// The proxy and its view of the backend
// ---------------------------------------------------------------------------------------------

/// Ringway with default flags in front of `backend`, plus the admin endpoint to read and
/// `extra` flags.
fn proxy_to(backend: SocketAddr, extra: &[&str]) -> (Proxy, SocketAddr) {
    let backend = backend.to_string();
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--backend",
        &backend,
        "--admin",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let proxy = Proxy::start(&args);
    let text = proxy.stderr();
    let admin = text
        .split("admin endpoint on http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("no admin endpoint line\n{}", proxy.stderr_tail()));
    (proxy, admin)
}

/// The body of `GET /backends`.
fn backends_json(admin: SocketAddr) -> String {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to the admin endpoint {admin}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /backends HTTP/1.0\r\nHost: {admin}\r\n\r\n").expect("send the request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read /backends");
    text.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_else(|| panic!("no end of headers in {text:?}"))
}

/// The backend is up by every account once the run's flows are all released (each release
/// reports its ending to the control thread): `/backends` says healthy and the proxy never
/// logged it down. The next run through the proxy is the user's own check.
fn assert_backend_up(proxy: &Proxy, admin: SocketAddr, backend: SocketAddr, after: &str) {
    assert!(
        wait_until(CLOSE_TIMEOUT, || backends_json(admin)
            .contains("\"active\":0")),
        "after {after}, flows still open on {backend}: {}\n{}",
        backends_json(admin),
        proxy.stderr_tail()
    );
    let json = backends_json(admin);
    assert!(
        json.contains(&format!("\"name\":\"{backend}\"")) && json.contains("\"healthy\":true"),
        "after {after}, /backends does not show {backend} healthy: {json}\n{}",
        proxy.stderr_tail()
    );
    assert!(
        !proxy.stderr().contains("is DOWN"),
        "after {after}, the proxy took a working backend down\n{}",
        proxy.stderr_tail()
    );
}

// ---------------------------------------------------------------------------------------------
// iperf3
// ---------------------------------------------------------------------------------------------

fn iperf3_server() -> Server {
    require("iperf3", "iperf3");
    let command = |port: u16| {
        let mut cmd = Command::new("iperf3");
        cmd.args(["-s", "-B", "127.0.0.1", "--forceflush", "-p"])
            .arg(port.to_string());
        cmd
    };
    Server::start_on_free_port("iperf3 -s", command, "Server listening")
}

/// The `"bytes"` of the JSON object that follows `"key":` in iperf3's `-J` report.
fn json_bytes(report: &str, key: &str) -> Option<u64> {
    let at = report.find(&format!("\"{key}\":"))?;
    let rest = &report[at..];
    let bytes = &rest[rest.find("\"bytes\":")? + "\"bytes\":".len()..];
    let digits: String = bytes
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Both directions of a `--bidir` run: the client's upload, then its download.
const BIDIR_SUMS: [(&str, &str); 2] = [
    ("sum_sent", "sum_received"),
    ("sum_sent_bidir_reverse", "sum_received_bidir_reverse"),
];
/// The one direction of any other run.
const SUMS: [(&str, &str); 1] = [("sum_sent", "sum_received")];

const MIB: u64 = 1024 * 1024;

/// The largest buffer TCP autotuning may give a socket, from `net.ipv4.tcp_wmem` or
/// `tcp_rmem` (their third field), or `default` if it cannot be read.
fn tcp_buffer_max(sysctl: &str, default: u64) -> u64 {
    std::fs::read_to_string(format!("/proc/sys/net/ipv4/{sysctl}"))
        .ok()
        .and_then(|text| text.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(default)
}

/// Bytes one stream can have in flight when iperf3 stops counting at the end of a run (the
/// receiver stops reading then): the sender's send buffer, the proxy's receive buffer, its
/// relay buffers or kernel pipe (at most 256 KiB) and send buffer towards the receiver, and the
/// receiver's receive buffer, at this machine's autotuning maxima (Linux's defaults are 4 MiB
/// to send and 6 MiB to receive, about 21 MiB in all; a host with `tcp_rmem` raised to 32 MiB
/// allows more, and a proxy that splices reads fast enough for autotuning to grow its windows
/// towards that maximum), plus 1 MiB.
fn in_flight_per_stream() -> u64 {
    let send = tcp_buffer_max("tcp_wmem", 4 * MIB);
    let receive = tcp_buffer_max("tcp_rmem", 6 * MIB);
    2 * (send + receive) + MIB
}

/// Runs the iperf3 client (with `streams` parallel streams) through the proxy and checks that
/// it succeeded and moved its bytes: for each `(sent, received)` pair of end-summary keys, at
/// least `at_least` bytes sent (its `-n`), and the receiver got what the sender sent, less what
/// can have been in flight when the run ended.
fn iperf3_through(
    proxy: &Proxy,
    what: &str,
    args: &[&str],
    streams: u64,
    at_least: u64,
    sums: &[(&str, &str)],
) {
    let port = proxy.addr.port().to_string();
    let mut argv = vec!["-c", "127.0.0.1", "-p", &port, "-J"];
    argv.extend_from_slice(args);
    let out = run_tool("iperf3", &argv);
    assert!(
        out.status.success() && !out.stdout.contains("\"error\""),
        "iperf3 {what} through the proxy failed: {}\n{}{}\n{}",
        out.status,
        out.stdout,
        out.stderr,
        proxy.stderr_tail()
    );
    // The top-level "end" object (one tab in): the run's summary.
    let end = out
        .stdout
        .find("\n\t\"end\":")
        .map(|at| &out.stdout[at..])
        .unwrap_or_else(|| panic!("iperf3 {what}: no end summary in\n{}", out.stdout));
    for (sent_key, received_key) in sums {
        let sent = json_bytes(end, sent_key)
            .unwrap_or_else(|| panic!("iperf3 {what}: no {sent_key} in\n{end}"));
        let received = json_bytes(end, received_key)
            .unwrap_or_else(|| panic!("iperf3 {what}: no {received_key} in\n{end}"));
        eprintln!("iperf3 {what} {sent_key}: {sent} bytes sent, {received} received");
        assert!(
            sent >= at_least,
            "iperf3 {what} {sent_key}: sent {sent} bytes, expected at least {at_least}"
        );
        assert!(
            received <= sent && received + streams * in_flight_per_stream() >= sent,
            "iperf3 {what} {sent_key}: the receiver got {received} of {sent} bytes sent (at \
             most {} may be in flight per stream)",
            in_flight_per_stream()
        );
    }
}

/// Four parallel uploads: at the end iperf3's server resets each data stream, on which it never
/// sent a byte. The backend must stay up and serve a second run right away.
#[test]
fn iperf3_parallel_upload_leaves_the_backend_up_for_the_next_run() {
    let server = iperf3_server();
    let (proxy, admin) = proxy_to(server.addr, &[]);
    iperf3_through(
        &proxy,
        "-P4",
        &["-P", "4", "-n", "512M"],
        4,
        512 * MIB,
        &SUMS,
    );
    assert_backend_up(&proxy, admin, server.addr, "iperf3 -P4");
    iperf3_through(
        &proxy,
        "-P4 (second run)",
        &["-P", "4", "-n", "256M"],
        4,
        256 * MIB,
        &SUMS,
    );
    assert_backend_up(&proxy, admin, server.addr, "two iperf3 -P4 runs");
    drop(server);
}

/// Downloads (`-R`), then both directions at once (`--bidir`, which runs for a time: its `-n`
/// would count one direction only).
///
/// The `--bidir` run goes through a proxy with one worker: iperf3's server gives its data
/// streams their roles (send or receive) in the order it accepts them, and two workers connect
/// the client's two streams to the backend in parallel, so now and then in the other order;
/// then both ends send on one stream, nobody reads, and the run moves no bytes (seen in 2 of
/// 12 runs with two workers, 0 of 15 with one). Any multi-threaded TCP proxy can reorder
/// connections so; the test pins what Ringway can promise.
#[test]
fn iperf3_reverse_and_bidirectional_runs_complete_and_leave_the_backend_up() {
    let server = iperf3_server();
    let (proxy, admin) = proxy_to(server.addr, &[]);
    iperf3_through(
        &proxy,
        "-R",
        &["-P", "2", "-R", "-n", "256M"],
        2,
        256 * MIB,
        &SUMS,
    );
    assert_backend_up(&proxy, admin, server.addr, "iperf3 -R");
    drop(proxy);

    let (proxy, admin) = proxy_to(server.addr, &["--workers", "1"]);
    iperf3_through(
        &proxy,
        "--bidir",
        &["--bidir", "-t", "2"],
        1,
        MIB,
        &BIDIR_SUMS,
    );
    assert_backend_up(&proxy, admin, server.addr, "iperf3 --bidir");
    drop(server);
}

// ---------------------------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------------------------

/// `calls=N` of `cmdstat_NAME` in `INFO commandstats`.
fn command_calls(info: &str, name: &str) -> Option<u64> {
    let line = info
        .lines()
        .find(|l| l.starts_with(&format!("cmdstat_{name}:")))?;
    let calls = line.split("calls=").nth(1)?;
    calls.split(',').next()?.parse().ok()
}

/// redis-benchmark's SET and GET through the proxy: every request completes, and the server
/// (asked directly, not through the proxy) executed exactly that many.
#[test]
fn redis_benchmark_completes_every_request_through_the_proxy() {
    const REQUESTS: u64 = 20_000;
    require("redis-server", "redis-server");
    require("redis-benchmark", "redis-tools");
    require("redis-cli", "redis-tools");
    let command = |port: u16| {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--logfile", "", "--daemonize", "no", "--port"])
            .arg(port.to_string());
        cmd
    };
    let server = Server::start_on_free_port("redis-server", command, "Ready to accept connections");
    let port = server.addr.port();
    let (proxy, admin) = proxy_to(server.addr, &[]);

    let proxy_port = proxy.addr.port().to_string();
    let n = REQUESTS.to_string();
    let out = run_tool(
        "redis-benchmark",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &proxy_port,
            "-n",
            &n,
            "-t",
            "set,get",
        ],
    );
    let completed = format!("{REQUESTS} requests completed");
    assert!(
        out.status.success() && out.stdout.matches(&completed).count() == 2,
        "redis-benchmark through the proxy: {}; expected `{completed}` for SET and GET\n\
         stdout:\n{}\nstderr:\n{}\n{}",
        out.status,
        out.stdout,
        out.stderr,
        proxy.stderr_tail()
    );
    for line in out
        .stdout
        .lines()
        .filter(|l| l.contains("requests per second"))
    {
        eprintln!("redis-benchmark: {}", line.trim());
    }

    let port_text = port.to_string();
    let info = run_tool(
        "redis-cli",
        &["-h", "127.0.0.1", "-p", &port_text, "INFO", "commandstats"],
    );
    assert!(info.status.success(), "redis-cli INFO: {}", info.stderr);
    for name in ["set", "get"] {
        assert_eq!(
            command_calls(&info.stdout, name),
            Some(REQUESTS),
            "the server did not execute every {name} sent through the proxy:\n{}",
            info.stdout
        );
    }
    assert_backend_up(&proxy, admin, server.addr, "redis-benchmark");
    drop(server);
}
