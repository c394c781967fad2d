//! The command line as an operator meets it: exit codes, messages, signals.

mod common;

use std::net::TcpListener;
use std::time::Duration;

use common::*;

const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs ringway with `args`, expecting a usage error: exit status 2 and one line on stderr that
/// names `flag`, without starting to listen.
fn expect_bad_flag(args: &[&str], flag: &str) {
    let out = run_to_exit(args, EXIT_TIMEOUT);
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(
        out.status.code(),
        Some(2),
        "ringway {args:?}: want exit status 2, got {}\nstderr:\n{}",
        out.status,
        out.stderr
    );
    assert!(
        lines.iter().any(|l| l.contains(flag)),
        "ringway {args:?}: stderr does not name {flag}:\n{}",
        out.stderr
    );
    assert_eq!(
        lines.len(),
        1,
        "ringway {args:?}: want one line on stderr, got:\n{}",
        out.stderr
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
}

/// A backend address for command lines that must fail before connecting anywhere.
const B: &str = "127.0.0.1:9";
const L: &str = "127.0.0.1:0";

#[test]
fn backend_that_is_not_an_address_is_rejected() {
    expect_bad_flag(&["--listen", L, "--backend", "nonsense"], "--backend");
}

#[test]
fn backend_port_out_of_range_is_rejected() {
    expect_bad_flag(
        &["--listen", L, "--backend", "127.0.0.1:70000"],
        "--backend",
    );
}

#[test]
fn backend_with_bad_weight_is_rejected() {
    expect_bad_flag(
        &["--listen", L, "--backend", "127.0.0.1:80,weight=heavy"],
        "--backend",
    );
}

#[test]
fn zero_workers_is_rejected() {
    expect_bad_flag(
        &["--listen", L, "--backend", B, "--workers", "0"],
        "--workers",
    );
}

#[test]
fn missing_listen_is_rejected() {
    expect_bad_flag(&["--backend", B], "--listen");
}

#[test]
fn missing_backend_is_rejected() {
    expect_bad_flag(&["--listen", L], "--backend");
}

#[test]
fn listen_that_is_not_an_address_is_rejected() {
    expect_bad_flag(&["--listen", "not-an-address", "--backend", B], "--listen");
}

#[test]
fn idle_timeout_with_unknown_unit_is_rejected() {
    expect_bad_flag(
        &["--listen", L, "--backend", B, "--idle-timeout", "5parsecs"],
        "--idle-timeout",
    );
}

#[test]
fn connect_timeout_without_number_is_rejected() {
    expect_bad_flag(
        &["--listen", L, "--backend", B, "--connect-timeout", "soon"],
        "--connect-timeout",
    );
}

#[test]
fn unknown_hash_key_is_rejected() {
    expect_bad_flag(
        &["--listen", L, "--backend", B, "--hash-key", "dst-ip"],
        "--hash-key",
    );
}

#[test]
fn retries_that_is_not_a_number_is_rejected() {
    expect_bad_flag(
        &["--listen", L, "--backend", B, "--retries", "many"],
        "--retries",
    );
}

#[test]
fn unknown_flag_is_rejected() {
    expect_bad_flag(
        &["--listen", L, "--backend", B, "--frobnicate"],
        "--frobnicate",
    );
}

#[test]
fn busy_listen_port_exits_1_with_a_message() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = run_to_exit(&["--listen", &addr, "--backend", B], EXIT_TIMEOUT);
    assert_eq!(
        out.status.code(),
        Some(1),
        "listen on busy {addr}: want exit status 1, got {}\nstderr:\n{}",
        out.status,
        out.stderr
    );
    let lower = out.stderr.to_lowercase();
    assert!(
        lower.contains("in use") || out.stderr.contains(&addr),
        "message should say the address is in use or name it:\n{}",
        out.stderr
    );
    assert!(!out.stderr.contains("listening on"), "{}", out.stderr);
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
}

#[test]
fn unresolvable_backend_exits_1_naming_it() {
    let out = run_to_exit(
        &["--listen", L, "--backend", "no-such-host.invalid:80"],
        EXIT_TIMEOUT,
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "unresolvable backend: want exit status 1, got {}\nstderr:\n{}",
        out.status,
        out.stderr
    );
    assert!(
        out.stderr.contains("no-such-host.invalid"),
        "message should name the backend:\n{}",
        out.stderr
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
}

#[test]
fn help_exits_0_and_documents_every_flag() {
    let out = run_to_exit(&["--help"], EXIT_TIMEOUT);
    assert_eq!(
        out.status.code(),
        Some(0),
        "--help: {}\n{}",
        out.status,
        out.stderr
    );
    let text = format!("{}{}", out.stdout, out.stderr);
    for flag in [
        "--listen",
        "--backend",
        "--workers",
        "--hash-key",
        "--vnodes",
        "--hash-seed",
        "--connect-timeout",
        "--idle-timeout",
        "--retries",
        "--max-conns",
        "--buffer-size",
        "--buffers",
    ] {
        assert!(
            text.contains(flag),
            "--help does not mention {flag}:\n{text}"
        );
    }
}

#[test]
fn version_exits_0_and_prints_the_version() {
    let out = run_to_exit(&["--version"], EXIT_TIMEOUT);
    assert_eq!(
        out.status.code(),
        Some(0),
        "--version: {}\n{}",
        out.status,
        out.stderr
    );
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(
        text.contains(env!("CARGO_PKG_VERSION")),
        "--version output lacks {}: {text}",
        env!("CARGO_PKG_VERSION")
    );
}

/// `--version` names the commit the binary was built from, so an operator can tell which build
/// runs on a host: the same 12-digit hash `git rev-parse --short=12 HEAD` gives in this checkout
/// (or `unknown` when the tests run outside a git checkout, as the binary then says too).
#[test]
fn version_names_the_git_commit_it_was_built_from() {
    let out = run_to_exit(&["--version"], EXIT_TIMEOUT);
    assert_eq!(out.status.code(), Some(0), "--version: {}", out.stderr);
    let line = out.stdout.trim();
    let head = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let commit = std::env::var("RINGWAY_BUILD_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or(head)
        .unwrap_or_else(|| "unknown".into());
    assert_eq!(
        line,
        format!("ringway {} (commit {commit})", env!("CARGO_PKG_VERSION")),
        "--version must print the version and the commit; stderr: {}",
        out.stderr
    );
}

/// Starts a proxy with open, working flows, sends `signal`, and expects a clean exit.
fn stops_cleanly_on(signal: libc::c_int) {
    let echo = Backend::echo();
    let mut proxy = Proxy::start(&["--listen", L, "--backend", &echo.arg()]);
    let mut flows: Vec<_> = (0..5).map(|_| connect(proxy.addr).unwrap()).collect();
    for (i, f) in flows.iter_mut().enumerate() {
        echo_roundtrip(f, format!("flow {i}").as_bytes()).unwrap();
    }
    proxy.signal(signal);
    let status = proxy.wait_exit(Duration::from_secs(15)).unwrap_or_else(|| {
        panic!(
            "still running 15s after signal {signal} with 5 open flows\n{}",
            proxy.stderr_tail()
        )
    });
    assert_eq!(
        status.code(),
        Some(0),
        "exit after signal {signal}: {status}\n{}",
        proxy.stderr_tail()
    );
    assert!(
        !proxy.stderr().contains("panicked"),
        "{}",
        proxy.stderr_tail()
    );
    // The open flows were closed, not left hanging.
    for f in &mut flows {
        expect_closed(f, CLOSE_TIMEOUT).unwrap();
    }
}

#[test]
fn sigterm_with_open_flows_exits_0() {
    stops_cleanly_on(libc::SIGTERM);
}

#[test]
fn sigint_with_open_flows_exits_0() {
    stops_cleanly_on(libc::SIGINT);
}

/// Runs ringway with `args` plus `--show-mapping`, which checks the whole command line and
/// exits 0 without listening: the flags were accepted.
fn expect_accepted(args: &[&str]) {
    let mut all = args.to_vec();
    all.extend(["--show-mapping", "10.0.0.1"]);
    let out = run_to_exit(&all, EXIT_TIMEOUT);
    assert_eq!(
        out.status.code(),
        Some(0),
        "ringway {all:?}:\n{}",
        out.stderr
    );
}

/// [`expect_bad_flag`], and the line also explains the problem with `because`.
fn expect_bad_value(args: &[&str], flag: &str, because: &str) {
    expect_bad_flag(args, flag);
    let out = run_to_exit(args, EXIT_TIMEOUT);
    assert!(
        out.stderr.contains(because),
        "ringway {args:?}: stderr does not say {because:?}:\n{}",
        out.stderr
    );
}

#[test]
fn backend_dns_srv_with_a_port_or_a_bad_name_is_rejected() {
    let srv = |value| ["--listen", L, "--backend-dns-srv", value];
    let flag = "--backend-dns-srv";
    expect_bad_value(&srv("_http._tcp.web.test:80"), flag, "without a port");
    expect_bad_value(&srv("a..b"), flag, "'a..b' is not a DNS name");
    expect_bad_value(&srv("web test"), flag, "'web test' is not a DNS name");
    expect_bad_value(&srv(""), flag, "'' is not a DNS name");
}

#[test]
fn tcp_fastopen_that_is_not_a_queue_length_is_rejected() {
    let tfo = |value| ["--listen", L, "--backend", B, "--tcp-fastopen", value];
    let flag = "--tcp-fastopen";
    expect_bad_value(&tfo("lots"), flag, "'lots' is not an unsigned integer");
    expect_bad_value(&tfo("-1"), flag, "'-1' is not an unsigned integer");
    expect_bad_value(&tfo("2000000"), flag, "out of range (0 to 1048576)");
    expect_accepted(&tfo("256"));
    expect_accepted(&tfo("0"));
}

#[test]
fn backend_fastopen_is_a_switch() {
    let args = ["--listen", L, "--backend", B, "--backend-fastopen"];
    expect_accepted(&args);
    expect_bad_flag(
        &["--listen", L, "--backend", B, "--backend-fastopen=yes"],
        "--backend-fastopen",
    );
}
