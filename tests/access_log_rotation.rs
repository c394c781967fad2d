//! Log rotation without copytruncate: logrotate renames the access log and sends SIGUSR1;
//! Ringway writes out what it holds to the renamed file and reopens the path. Under load, no
//! line may be lost or written twice: the lines of both files together are the flows served.

mod common;

use std::collections::HashSet;
use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Clients opening short flows at once.
const CLIENTS: usize = 4;
/// Bounds of the load: flows per client and time.
const MAX_FLOWS_PER_CLIENT: usize = 20_000;
const MAX_LOAD_TIME: Duration = Duration::from_secs(90);
/// How long to wait for a file or a log line to show what we wait for.
const WAIT: Duration = Duration::from_secs(30);

/// The complete lines of `path` (none if it does not exist).
fn lines(path: &Path) -> Vec<String> {
    let text = fs::read_to_string(path).unwrap_or_default();
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(|l| l.trim_end().to_string())
        .collect()
}

#[test]
fn rotation_by_rename_and_sigusr1_loses_and_repeats_no_line_under_load() {
    let dir = TempDir::new("log-rotation");
    let log = dir.path().join("access.log");
    let rotated = dir.path().join("access.log.1");
    let echo = Backend::echo();
    let mut proxy = Proxy::start(&[
        "--listen",
        "127.0.0.1:0",
        "--backend",
        &echo.arg(),
        "--workers",
        "2",
        "--access-log",
        log.to_str().unwrap(),
    ]);
    wait_signal_handlers(&proxy);

    // The load: each client opens flows one after another (connect, one echo, close), counting
    // those that connected. Every connected flow gets exactly one access-log line.
    let stop = Arc::new(AtomicBool::new(false));
    let addr = proxy.addr;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let stop = Arc::clone(&stop);
            thread::spawn(move || -> Result<usize, String> {
                let started = Instant::now();
                let mut flows = 0;
                while !stop.load(Ordering::Relaxed)
                    && flows < MAX_FLOWS_PER_CLIENT
                    && started.elapsed() < MAX_LOAD_TIME
                {
                    let mut stream = connect_from(client_ip(i as u8 + 1), addr)
                        .map_err(|e| format!("client {i}, flow {flows}: connect: {e}"))?;
                    flows += 1;
                    echo_roundtrip(&mut stream, b"one short flow\n")
                        .map_err(|e| format!("client {i}, flow {flows}: {e}"))?;
                }
                Ok(flows)
            })
        })
        .collect();

    // Rotate while flows are being logged.
    assert!(
        wait_until(WAIT, || lines(&log).len() >= 2000),
        "the access log did not reach 2000 lines under load\n{}",
        proxy.stderr_tail()
    );
    fs::rename(&log, &rotated).expect("rename the access log");
    proxy.signal(libc::SIGUSR1);
    assert!(
        wait_until(WAIT, || proxy.stderr().contains("access log: reopened")),
        "no reopen after SIGUSR1\n{}",
        proxy.stderr_tail()
    );
    // The load goes on into the new file.
    assert!(
        wait_until(WAIT, || lines(&log).len() >= 2000),
        "the reopened access log did not reach 2000 lines\n{}",
        proxy.stderr_tail()
    );
    stop.store(true, Ordering::Relaxed);
    let mut flows = 0;
    for client in clients {
        flows += client
            .join()
            .expect("client thread")
            .unwrap_or_else(|e| panic!("{e}\n{}", proxy.stderr_tail()));
    }

    // A clean stop writes out every line still queued.
    proxy.signal(libc::SIGTERM);
    let status = proxy.wait_exit(WAIT);
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{}",
        proxy.stderr_tail()
    );

    let old = lines(&rotated);
    let new = lines(&log);
    let mut distinct = HashSet::new();
    for line in old.iter().chain(&new) {
        assert!(
            line.starts_with("{\"start\":") && line.ends_with('}') && line.contains("\"client\""),
            "not a whole access-log line: {line:?}"
        );
        assert!(
            distinct.insert(line.as_str()),
            "a line written twice: {line}"
        );
    }
    assert_eq!(
        old.len() + new.len(),
        flows,
        "{flows} flows, {} lines in the rotated file + {} in the new one\n{}",
        old.len(),
        new.len(),
        proxy.stderr_tail()
    );
    eprintln!(
        "{flows} flows: {} lines before the rotation, {} after",
        old.len(),
        new.len()
    );
}

/// Opens `n` short flows one after another, each checked end to end.
fn flows(proxy: &Proxy, n: usize) {
    for i in 0..n {
        let mut stream = connect(proxy.addr).unwrap_or_else(|e| panic!("flow {i}: {e}"));
        echo_roundtrip(&mut stream, b"rotate me\n")
            .unwrap_or_else(|e| panic!("flow {i}: {e}\n{}", proxy.stderr_tail()));
    }
}

/// The real logrotate with the shipped deploy/logrotate/ringway, pointed at a temporary
/// directory and at this proxy's pid instead of `systemctl kill` (no systemd here): the file is
/// renamed, Ringway reopens the path, and each file holds exactly the lines of its flows.
#[test]
fn logrotate_with_the_shipped_config_rotates_the_access_log() {
    let dir = TempDir::new("logrotate");
    let log = dir.path().join("access.log");
    let echo = Backend::echo();
    let mut proxy = Proxy::start(&[
        "--listen",
        "127.0.0.1:0",
        "--backend",
        &echo.arg(),
        "--access-log",
        log.to_str().unwrap(),
    ]);
    wait_signal_handlers(&proxy);

    let shipped = fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/logrotate/ringway"
    ))
    .expect("read deploy/logrotate/ringway");
    let mut config = String::new();
    let mut signal_lines = 0;
    for line in shipped.lines() {
        let line = line.replace(
            "/var/log/ringway/*.log",
            &format!("{}/*.log", dir.path().display()),
        );
        if line.trim_start().starts_with("systemctl kill") {
            signal_lines += 1;
            if signal_lines == 1 {
                config.push_str(&format!("        kill -USR1 {}\n", proxy.pid()));
            }
            continue;
        }
        config.push_str(&line);
        config.push('\n');
    }
    assert!(
        signal_lines > 0 && config.contains(&dir.path().display().to_string()),
        "deploy/logrotate/ringway no longer has the path and the systemctl kill line this test \
         rewrites:\n{shipped}"
    );
    let config_path = dir.path().join("logrotate.conf");
    fs::write(&config_path, &config).unwrap();

    flows(&proxy, 40);
    assert!(
        wait_until(WAIT, || lines(&log).len() == 40),
        "40 flows, {} lines\n{}",
        lines(&log).len(),
        proxy.stderr_tail()
    );
    let out = std::process::Command::new("logrotate")
        .arg("--force")
        .arg("--state")
        .arg(dir.path().join("logrotate.state"))
        .arg(&config_path)
        .output()
        .expect("run logrotate (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "logrotate failed: {}\n{}\nconfig:\n{config}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        wait_until(WAIT, || proxy.stderr().contains("access log: reopened")),
        "logrotate's postrotate did not make ringway reopen the log\n{}",
        proxy.stderr_tail()
    );
    flows(&proxy, 25);
    proxy.signal(libc::SIGTERM);
    assert_eq!(proxy.wait_exit(WAIT).and_then(|s| s.code()), Some(0));
    // delaycompress: the rotated file stays plain until the next rotation.
    assert_eq!(lines(&dir.path().join("access.log.1")).len(), 40);
    assert_eq!(lines(&log).len(), 25);
}
