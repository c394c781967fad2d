//! End to end: start `ringway-load serve` on a free loopback port, run workloads against it
//! for about a second each, and check that traffic flowed without errors. Readiness is the
//! server printing its address; every wait is bounded.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_ringway-load");

/// A backend process, killed (by its own handle) when dropped.
struct Server {
    child: Child,
    addrs: Vec<SocketAddr>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(args: &[&str], listeners: usize) -> Server {
    let mut child = Command::new(BIN)
        .arg("serve")
        .args(args)
        // bounded even if a test forgets it
        .args(["--duration", "60s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn serve");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut addrs = Vec::new();
    while addrs.len() < listeners {
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("server printed its address");
        let addr = line
            .strip_prefix("listening on ")
            .and_then(|r| r.split_whitespace().next())
            .expect("listening line");
        addrs.push(addr.parse().expect("address"));
    }
    Server { child, addrs }
}

/// Run a workload, bounded by its own --duration; returns (exit ok, stdout).
fn workload(args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN).args(args).output().expect("run workload");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{args:?}\n{stdout}{}", String::from_utf8_lossy(&out.stderr));
    (out.status.success(), stdout)
}

/// The number after `"key":` in a flat JSON object.
fn json_num(json: &str, key: &str) -> f64 {
    let pat = format!("\"{key}\":");
    let at = json.find(&pat).unwrap_or_else(|| panic!("{key} in {json}")) + pat.len();
    let rest = &json[at..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-'))
        .unwrap_or(rest.len());
    rest[..end].parse().expect("number")
}

#[test]
fn rr_and_connect_against_echo() {
    let srv = serve(&["--listen", "127.0.0.1:0", "--mode", "echo"], 1);
    let target = srv.addrs[0].to_string();
    let (ok, out) = workload(&[
        "rr",
        "--target",
        &target,
        "--duration",
        "1s",
        "--conns",
        "4",
        "--json",
    ]);
    assert!(ok, "{out}");
    assert!(json_num(&out, "ok") > 100.0);
    assert_eq!(json_num(&out, "errors"), 0.0);
    assert!(json_num(&out, "p99") > 0.0);
    // closed loop: every connection has a request out when the clock stops; each is answered
    assert_eq!(json_num(&out, "in_flight_at_end"), 4.0, "{out}");
    assert_eq!(json_num(&out, "finished_after_end"), 4.0, "{out}");
    assert_eq!(json_num(&out, "unfinished"), 0.0, "{out}");

    let (ok, out) = workload(&[
        "rr",
        "--target",
        &target,
        "--duration",
        "1s",
        "--conns",
        "4",
        "--rate",
        "2000",
        "--json",
    ]);
    assert!(ok, "{out}");
    let done = json_num(&out, "ok");
    assert!(
        (1500.0..=2100.0).contains(&done),
        "fixed rate gave {done} requests"
    );

    let (ok, out) = workload(&[
        "connect",
        "--target",
        &target,
        "--duration",
        "1s",
        "--conns",
        "2",
        "--sources",
        "127.0.0.2-127.0.0.5",
        "--json",
    ]);
    assert!(ok, "{out}");
    assert!(json_num(&out, "cps") > 50.0);
    assert_eq!(json_num(&out, "errors"), 0.0);
    assert_eq!(json_num(&out, "unfinished"), 0.0, "{out}");
    assert_eq!(
        json_num(&out, "in_flight_at_end"),
        json_num(&out, "finished_after_end"),
        "{out}"
    );
}

#[test]
fn bulk_every_direction() {
    let echo = serve(&["--listen", "127.0.0.1:0", "--mode", "echo"], 1);
    let sink = serve(&["--listen", "127.0.0.1:0", "--mode", "sink"], 1);
    let source = serve(&["--listen", "127.0.0.1:0", "--mode", "source"], 1);
    for (dir, target) in [("up", &sink), ("down", &source), ("both", &echo)] {
        let t = target.addrs[0].to_string();
        let (ok, out) = workload(&[
            "bulk",
            "--target",
            &t,
            "--duration",
            "1s",
            "--streams",
            "2",
            "--direction",
            dir,
            "--json",
        ]);
        assert!(ok, "{dir}: {out}");
        assert!(json_num(&out, "gbps") > 0.01, "{dir}: {out}");
        assert_eq!(json_num(&out, "streams_ok"), 2.0);
        assert_eq!(json_num(&out, "unfinished"), 0.0, "{dir}: {out}");
        if dir == "both" {
            assert_eq!(json_num(&out, "bytes_up"), json_num(&out, "bytes_down"));
        }
    }
}

#[test]
fn idle_flows_over_many_sources() {
    let srv = serve(&["--listen", "127.0.0.1:0", "--mode", "echo"], 1);
    let dir = std::env::temp_dir().join(format!("ringway-load-idle-{}", std::process::id()));
    let ready = dir.with_extension("ready");
    let (ok, out) = workload(&[
        "idle",
        "--target",
        &srv.addrs[0].to_string(),
        "--conns",
        "500",
        "--sources",
        "127.0.0.2-127.0.0.20",
        "--hold",
        "300ms",
        "--ready-file",
        ready.to_str().expect("path"),
        "--json",
    ]);
    assert!(ok, "{out}");
    assert_eq!(json_num(&out, "ok"), 500.0);
    assert_eq!(json_num(&out, "failed"), 0.0);
    assert_eq!(json_num(&out, "unfinished"), 0.0, "{out}");
    assert_eq!(json_num(&out, "sources"), 19.0);
    assert_eq!(
        std::fs::read_to_string(&ready).expect("ready file").trim(),
        "500"
    );
    let _ = std::fs::remove_file(&ready);
}

#[test]
fn hello_names_each_listener_and_half_closes() {
    let srv = serve(
        &[
            "--listen",
            "127.0.0.1:0",
            "--listen",
            "127.0.0.1:0",
            "--mode",
            "hello",
            "--name",
            "alpha",
            "--name",
            "beta",
        ],
        2,
    );
    for (addr, name) in srv.addrs.iter().zip(["alpha", "beta"]) {
        let mut s = TcpStream::connect_timeout(addr, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.write_all(b"ping").expect("write");
        // half-close: the echo of what was sent must still arrive, then EOF
        s.shutdown(Shutdown::Write).expect("shutdown");
        let mut all = String::new();
        s.read_to_string(&mut all).expect("read to EOF");
        assert_eq!(all, format!("{name}\nping"));
    }
}

#[test]
fn http_mode_answers_pipelined_requests() {
    let srv = serve(&["--listen", "127.0.0.1:0", "--mode", "http"], 1);
    let mut s = TcpStream::connect_timeout(&srv.addrs[0], Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .expect("write");
    s.shutdown(Shutdown::Write).expect("shutdown");
    let mut all = String::new();
    s.read_to_string(&mut all).expect("read");
    assert_eq!(all.matches("HTTP/1.1 200 OK").count(), 2);
}

#[test]
fn bad_arguments_fail_fast() {
    let (ok, _) = workload(&["rr", "--target", "127.0.0.1:9", "--duration", "soon"]);
    assert!(!ok);
    let (ok, _) = workload(&["rr", "--target", "127.0.0.1:9", "--conns", "0"]);
    assert!(!ok);
}

#[test]
fn refused_connections_are_counted_not_hidden() {
    // a port that was free a moment ago: nothing listens there
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let (ok, out) = workload(&[
        "rr",
        "--target",
        &format!("127.0.0.1:{port}"),
        "--duration",
        "300ms",
        "--conns",
        "1",
        "--timeout",
        "200ms",
        "--json",
    ]);
    assert!(!ok, "a run with errors must fail: {out}");
    assert!(json_num(&out, "errors") >= 1.0, "{out}");
    assert_eq!(json_num(&out, "ok"), 0.0);
}

#[test]
fn probe_and_greeting_rr_against_hello() {
    let srv = serve(
        &[
            "--listen",
            "127.0.0.1:0",
            "--mode",
            "hello",
            "--name",
            "solo",
        ],
        1,
    );
    let target = srv.addrs[0].to_string();
    let (ok, out) = workload(&[
        "probe",
        "--target",
        &target,
        "--sources",
        "127.0.0.2-127.0.0.4",
        "--times",
        "2",
    ]);
    assert!(ok, "{out}");
    assert_eq!(
        out.matches("solo, solo   (same backend every time)")
            .count(),
        3,
        "{out}"
    );
    let (ok, out) = workload(&[
        "rr",
        "--target",
        &target,
        "--greeting",
        "--duration",
        "500ms",
        "--conns",
        "2",
        "--json",
    ]);
    assert!(ok, "{out}");
    assert_eq!(json_num(&out, "errors"), 0.0);
}

/// A backend in this process: it accepts `conns` connections; the first `echo` of them get
/// their bytes back, the others are held open and never read or answered. Everything it holds
/// is dropped when the returned sender is dropped (or after 30 s).
fn partly_silent_backend(conns: usize, echo: usize) -> (SocketAddr, mpsc::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (done_tx, done_rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for n in 0..conns {
            let Ok((stream, _)) = listener.accept() else {
                return;
            };
            if n < echo {
                std::thread::spawn(move || {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                    let mut s = stream;
                    let mut buf = [0u8; 4096];
                    while let Ok(k) = s.read(&mut buf) {
                        if k == 0 || s.write_all(&buf[..k]).is_err() {
                            break;
                        }
                    }
                });
            } else {
                held.push(stream);
            }
        }
        let _ = done_rx.recv_timeout(Duration::from_secs(30));
        drop(held);
    });
    (addr, done_tx)
}

#[test]
fn rr_against_a_backend_that_never_answers_reports_the_requests_left_unanswered() {
    // a sink reads every request and never answers
    let sink = serve(&["--listen", "127.0.0.1:0", "--mode", "sink"], 1);
    let target = sink.addrs[0].to_string();
    let args = [
        "rr",
        "--target",
        &target,
        "--duration",
        "300ms",
        "--conns",
        "3",
        "--timeout",
        "1s",
    ];
    let (ok, out) = workload(&[&args[..], &["--json"]].concat());
    assert!(!ok, "requests left unanswered must fail the run: {out}");
    assert_eq!(json_num(&out, "ok"), 0.0, "{out}");
    assert_eq!(json_num(&out, "in_flight_at_end"), 3.0, "{out}");
    assert_eq!(json_num(&out, "finished_after_end"), 0.0, "{out}");
    assert_eq!(json_num(&out, "unfinished"), 3.0, "{out}");
    assert_eq!(json_num(&out, "errors"), 3.0, "{out}");
    assert_eq!(json_num(&out, "unfinished_reply"), 3.0, "{out}");

    let (ok, out) = workload(&args);
    assert!(!ok, "{out}");
    assert!(
        out.contains("unfinished at the end: 3 "),
        "text output shows them: {out}"
    );
    assert!(out.contains("errors: 3 (unfinished_reply=3)"), "{out}");
}

#[test]
fn rr_with_one_stuck_connection_is_not_a_success() {
    // two connections: one answered at full speed, one never; before, this run reported
    // thousands of requests, "errors: 0" and exit status 0
    let (addr, _hold) = partly_silent_backend(2, 1);
    let (ok, out) = workload(&[
        "rr",
        "--target",
        &addr.to_string(),
        "--duration",
        "500ms",
        "--conns",
        "2",
        "--timeout",
        "1500ms",
        "--json",
    ]);
    assert!(!ok, "a stuck request must fail the run: {out}");
    assert!(json_num(&out, "ok") > 10.0, "{out}");
    assert_eq!(json_num(&out, "in_flight_at_end"), 2.0, "{out}");
    assert_eq!(json_num(&out, "finished_after_end"), 1.0, "{out}");
    assert_eq!(json_num(&out, "unfinished"), 1.0, "{out}");
    assert_eq!(json_num(&out, "errors"), 1.0, "{out}");
}

#[test]
fn connect_against_a_backend_that_never_answers_reports_unfinished_exchanges() {
    let sink = serve(&["--listen", "127.0.0.1:0", "--mode", "sink"], 1);
    let (ok, out) = workload(&[
        "connect",
        "--target",
        &sink.addrs[0].to_string(),
        "--duration",
        "300ms",
        "--conns",
        "2",
        "--timeout",
        "1s",
        "--json",
    ]);
    assert!(!ok, "{out}");
    assert_eq!(json_num(&out, "ok"), 0.0, "{out}");
    assert_eq!(json_num(&out, "in_flight_at_end"), 2.0, "{out}");
    assert_eq!(json_num(&out, "unfinished"), 2.0, "{out}");
    assert_eq!(json_num(&out, "errors"), 2.0, "{out}");
}

#[test]
fn bulk_that_moves_nothing_or_cannot_drain_fails() {
    // down from a backend that never sends: the streams "ran" but carried nothing
    let sink = serve(&["--listen", "127.0.0.1:0", "--mode", "sink"], 1);
    let (ok, out) = workload(&[
        "bulk",
        "--target",
        &sink.addrs[0].to_string(),
        "--duration",
        "300ms",
        "--streams",
        "2",
        "--direction",
        "down",
        "--json",
    ]);
    assert!(!ok, "a bulk run that moved no byte must fail: {out}");
    assert_eq!(json_num(&out, "streams_ok"), 0.0, "{out}");
    assert_eq!(json_num(&out, "no_data"), 2.0, "{out}");

    // up to a backend that never reads: the bytes in flight at the end are never delivered
    let (addr, _hold) = partly_silent_backend(2, 0);
    let (ok, out) = workload(&[
        "bulk",
        "--target",
        &addr.to_string(),
        "--duration",
        "300ms",
        "--streams",
        "2",
        "--direction",
        "up",
        "--timeout",
        "500ms",
        "--json",
    ]);
    assert!(!ok, "{out}");
    assert_eq!(json_num(&out, "unfinished"), 2.0, "{out}");
    assert_eq!(json_num(&out, "unfinished_stream"), 2.0, "{out}");
}

#[test]
fn idle_and_probe_report_checks_left_unanswered() {
    let sink = serve(&["--listen", "127.0.0.1:0", "--mode", "sink"], 1);
    let target = sink.addrs[0].to_string();
    let (ok, out) = workload(&[
        "idle",
        "--target",
        &target,
        "--conns",
        "3",
        "--hold",
        "10ms",
        "--timeout",
        "300ms",
        "--json",
    ]);
    assert!(!ok, "{out}");
    assert_eq!(json_num(&out, "ok"), 0.0, "{out}");
    assert_eq!(json_num(&out, "unfinished"), 3.0, "{out}");
    assert_eq!(json_num(&out, "first_unfinished_reply"), 3.0, "{out}");

    // probe waits for a greeting a sink never sends
    let (ok, out) = workload(&[
        "probe",
        "--target",
        &target,
        "--sources",
        "127.0.0.2",
        "--times",
        "2",
        "--timeout",
        "300ms",
    ]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("attempts: 2, answered 0, failed 2; unfinished at the end: 2"),
        "{out}"
    );
    assert!(
        out.contains("[unfinished: no greeting within 300ms]"),
        "{out}"
    );
}
