//! Stopping: whatever optional threads run (active health checks, DNS refresh, the backends-file
//! watch, the admin endpoint, the access-log writer), the first SIGTERM ends the process with
//! status 0 within a few seconds once its flows are done, and a second SIGTERM ends it at once
//! even with a flow still open. A thread that cannot end (an access-log writer blocked on a
//! full pipe) delays the exit by a bounded time only, and not at all after a second SIGTERM.
//!
//! Each proxy carries one flow before it is signalled, so the workers and the access-log writer
//! have done real work. Every wait is for the process to exit (or a log line), with a deadline.

mod common;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::dnsmasq::Dnsmasq;
use common::*;

/// What "within a few seconds" means: a clean stop takes milliseconds; this leaves room for a
/// loaded test machine.
const STOP_DEADLINE: Duration = Duration::from_secs(5);
/// What "at once" means after a second SIGTERM: well under the 5 s the process gives threads
/// that are slow to end.
const AT_ONCE: Duration = Duration::from_secs(2);

/// The optional threads, one bit each of a subset number.
const OPTIONS: [&str; 5] = [
    "health checks",
    "DNS refresh",
    "backends file",
    "admin",
    "access log",
];

/// Shared by every proxy of a test: a backend, a DNS server that names it, a backends file
/// that lists it.
struct Fixtures {
    backend: Backend,
    dns: Dnsmasq,
    dir: TempDir,
}

impl Fixtures {
    fn new() -> Fixtures {
        let backend = Backend::hello("E");
        let dns = Dnsmasq::start("127.0.0.1 svc.test\n", &[]);
        let dir = TempDir::new("stop");
        write_atomically(
            &dir.path().join("backends"),
            &format!("{}\n", backend.arg()),
        );
        Fixtures { backend, dns, dir }
    }

    /// Arguments of a proxy that runs the optional threads of `subset` (bits of `OPTIONS`).
    fn args(&self, subset: u32) -> Vec<String> {
        let mut args: Vec<String> = [
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--backend",
            &self.backend.arg(),
        ]
        .map(String::from)
        .to_vec();
        let on = |bit: u32| subset & (1 << bit) != 0;
        if on(0) {
            args.extend(["--health-interval".into(), "200ms".into()]);
        }
        if on(1) {
            // The name resolves to the backend itself: same name, counted once.
            args.extend([
                "--backend-dns".into(),
                format!("svc.test:{}", self.backend.addr.port()),
                "--dns-server".into(),
                self.dns.addr.to_string(),
                "--dns-refresh".into(),
                "200ms".into(),
            ]);
        }
        if on(2) {
            args.extend([
                "--backends-file".into(),
                path_arg(&self.dir.path().join("backends")),
            ]);
        }
        if on(3) {
            args.extend(["--admin".into(), "127.0.0.1:0".into()]);
        }
        if on(4) {
            args.extend([
                "--access-log".into(),
                path_arg(&self.dir.path().join(format!("access-{subset}.log"))),
            ]);
        }
        args
    }
}

fn path_arg(path: &Path) -> String {
    path.to_str().expect("temp paths are UTF-8").to_string()
}

fn describe(subset: u32) -> String {
    let names: Vec<&str> = (0..OPTIONS.len())
        .filter(|bit| subset & (1 << bit) != 0)
        .map(|bit| OPTIONS[bit])
        .collect();
    if names.is_empty() {
        "no optional threads".to_string()
    } else {
        names.join(" + ")
    }
}

/// One flow through the proxy, to its end.
fn one_flow(proxy: &Proxy) -> Result<(), String> {
    let mut s = connect(proxy.addr).map_err(|e| format!("connect: {e}"))?;
    let greeting = read_line(&mut s)?;
    if greeting != "E" {
        return Err(format!("greeted {greeting:?}"));
    }
    echo_roundtrip(&mut s, b"one flow")?;
    Ok(())
}

/// Starts a proxy with `args`, runs a flow, sends one SIGTERM and waits for the exit.
/// Returns a description of what went wrong, if anything.
fn first_sigterm_stops(args: &[String]) -> Option<String> {
    let mut proxy = Proxy::start(args);
    if let Err(e) = one_flow(&proxy) {
        return Some(format!("flow before the signal: {e}"));
    }
    wait_signal_handlers(&proxy);
    proxy.signal(libc::SIGTERM);
    let signalled = Instant::now();
    let status = proxy.wait_exit(STOP_DEADLINE);
    let took = signalled.elapsed();
    match status {
        Some(status) if status.success() => None,
        Some(status) => Some(format!(
            "exit status {status} after SIGTERM\n{}",
            proxy.stderr_tail()
        )),
        None => Some(format!(
            "still running {took:?} after SIGTERM (threads: {})\n{}",
            thread_names(&proxy),
            proxy.stderr_tail()
        )),
    }
}

/// The names of the proxy's threads, for failure messages.
fn thread_names(proxy: &Proxy) -> String {
    let dir = format!("/proc/{}/task", proxy.pid());
    let Ok(tasks) = fs::read_dir(&dir) else {
        return "(gone)".to_string();
    };
    let mut names: Vec<String> = tasks
        .filter_map(|t| t.ok())
        .filter_map(|t| fs::read_to_string(t.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect();
    names.sort();
    names.join(", ")
}

#[test]
fn first_sigterm_stops_the_process_with_every_combination_of_optional_threads() {
    let fixtures = Fixtures::new();
    let subsets = 1u32 << OPTIONS.len();
    // All at once: each proxy has one worker, and a stop takes milliseconds.
    let failures: Vec<String> = std::thread::scope(|scope| {
        let runs: Vec<_> = (0..subsets)
            .map(|subset| {
                let args = fixtures.args(subset);
                let run = std::thread::Builder::new()
                    .name(format!("subset-{subset}"))
                    .spawn_scoped(scope, move || first_sigterm_stops(&args))
                    .expect("spawn a test thread");
                (subset, run)
            })
            .collect();
        runs.into_iter()
            .filter_map(|(subset, run)| {
                let problem = match run.join() {
                    Ok(problem) => problem,
                    Err(_) => Some("the test thread panicked (see above)".to_string()),
                };
                problem.map(|p| format!("[{}] {p}", describe(subset)))
            })
            .collect()
    });
    assert!(
        failures.is_empty(),
        "{} of {subsets} proxies did not stop cleanly on the first SIGTERM:\n{}\n--- dnsmasq ---\n{}",
        failures.len(),
        failures.join("\n\n"),
        fixtures.dns.log()
    );
}

/// The proxy's stderr lines from index `from` on contain one matching `pred`, within 10 s.
fn wait_for_line(proxy: &Proxy, from: usize, pred: impl Fn(&str) -> bool) -> bool {
    wait_until(Duration::from_secs(10), || {
        proxy.stderr().lines().skip(from).any(&pred)
    })
}

#[test]
fn second_sigterm_stops_at_once_with_a_live_flow_and_every_optional_thread() {
    let fixtures = Fixtures::new();
    let every = (1u32 << OPTIONS.len()) - 1;
    let mut proxy = Proxy::start(
        &[
            fixtures.args(every),
            ["--shutdown-timeout".into(), "60s".into()].to_vec(),
        ]
        .concat(),
    );
    let mut live = connect(proxy.addr).expect("connect");
    assert_eq!(read_line(&mut live).unwrap(), "E");
    echo_roundtrip(&mut live, b"before").unwrap();

    let from = proxy.stderr().lines().count();
    wait_signal_handlers(&proxy);
    proxy.signal(libc::SIGTERM);
    assert!(
        wait_for_line(&proxy, from, |l| l.contains("listeners closed")),
        "no drain line after the first SIGTERM\n{}",
        proxy.stderr_tail()
    );
    // Draining: the live flow still works, and the process waits for it.
    echo_roundtrip(&mut live, b"draining")
        .unwrap_or_else(|e| panic!("flow during the drain: {e}\n{}", proxy.stderr_tail()));
    assert_eq!(
        proxy.wait_exit(Duration::ZERO),
        None,
        "exited with a flow live and --shutdown-timeout 60s\n{}",
        proxy.stderr_tail()
    );

    proxy.signal(libc::SIGTERM);
    let second = Instant::now();
    let status = proxy.wait_exit(AT_ONCE);
    assert!(
        status.is_some_and(|s| s.success()),
        "exit status {status:?} {:?} after the second SIGTERM (threads: {})\n{}",
        second.elapsed(),
        thread_names(&proxy),
        proxy.stderr_tail()
    );
    eprintln!("exited {:?} after the second SIGTERM", second.elapsed());
    expect_closed(&mut live, Duration::from_secs(5))
        .expect("the live flow is closed when the process ends");
    // The live flow was closed by the second signal; its line is on disk before the exit.
    let log = fs::read_to_string(fixtures.dir.path().join(format!("access-{every}.log")))
        .unwrap_or_default();
    assert!(
        log.lines().any(|l| l.contains("\"reason\":\"shutdown\"")),
        "no access-log line for the flow the second SIGTERM closed: {log:?}"
    );
}

/// A proxy whose access log goes to a stdout pipe of one page that nobody reads, with more
/// lines logged than fit: its access-log writer is stuck in write(2), as on a stuck disk or a
/// log collector that stopped reading.
fn proxy_with_a_stuck_access_log(fixtures: &Fixtures) -> (Proxy, std::process::ChildStdout) {
    use std::os::fd::AsRawFd;

    let (proxy, stdout) = Proxy::start_with_stdout_pipe(&[
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "1",
        "--backend",
        &fixtures.backend.arg(),
        "--access-log",
        "-",
    ]);
    // SAFETY: fcntl on a pipe descriptor we own, with plain integer arguments.
    let size = unsafe { libc::fcntl(stdout.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
    assert!(
        size > 0,
        "F_SETPIPE_SZ: {}",
        std::io::Error::last_os_error()
    );
    // A line is over 100 bytes: three pipes' worth, which the writer can never finish writing.
    // (Whether it is already blocked when the test goes on does not matter: it blocks at the
    // latest when the stop makes it flush.)
    let flows = 3 * size as usize / 100;
    for _ in 0..flows {
        one_flow(&proxy).unwrap_or_else(|e| panic!("flow: {e}\n{}", proxy.stderr_tail()));
    }
    (proxy, stdout)
}

/// Waits for the first SIGTERM's stop to reach the stuck writer: the wait for it is logged.
fn signal_and_wait_for_the_stuck_writer(proxy: &Proxy) {
    let from = proxy.stderr().lines().count();
    wait_signal_handlers(proxy);
    proxy.signal(libc::SIGTERM);
    assert!(
        wait_for_line(proxy, from, |l| l
            .contains("for the access-log writer to end")),
        "no line about waiting for the access-log writer (threads: {})\n{}",
        thread_names(proxy),
        proxy.stderr_tail()
    );
}

#[test]
fn second_sigterm_exits_at_once_while_the_access_log_writer_is_stuck() {
    let fixtures = Fixtures::new();
    let (mut proxy, _unread) = proxy_with_a_stuck_access_log(&fixtures);
    signal_and_wait_for_the_stuck_writer(&proxy);
    proxy.signal(libc::SIGTERM);
    let second = Instant::now();
    let status = proxy.wait_exit(AT_ONCE);
    assert!(
        status.is_some_and(|s| s.success()),
        "exit status {status:?} {:?} after the second SIGTERM (threads: {})\n{}",
        second.elapsed(),
        thread_names(&proxy),
        proxy.stderr_tail()
    );
    assert!(
        proxy
            .stderr()
            .contains("SIGTERM during shutdown: exiting without waiting for the access-log writer"),
        "{}",
        proxy.stderr_tail()
    );
}

#[test]
fn a_stuck_access_log_writer_delays_the_exit_by_a_bounded_time_only() {
    let fixtures = Fixtures::new();
    let (mut proxy, _unread) = proxy_with_a_stuck_access_log(&fixtures);
    let signalled = Instant::now();
    signal_and_wait_for_the_stuck_writer(&proxy);
    let status = proxy.wait_exit(Duration::from_secs(15));
    assert!(
        status.is_some_and(|s| s.success()),
        "exit status {status:?} {:?} after SIGTERM with the writer stuck (threads: {})\n{}",
        signalled.elapsed(),
        thread_names(&proxy),
        proxy.stderr_tail()
    );
    assert!(
        proxy
            .stderr()
            .contains("the access-log writer did not end within"),
        "{}",
        proxy.stderr_tail()
    );
}
