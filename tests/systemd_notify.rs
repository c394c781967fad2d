//! Ringway under systemd's `Type=notify`: the test plays the service manager. It binds a Unix
//! datagram socket, names it in `NOTIFY_SOCKET` (as systemd does), starts the real binary and
//! reads what it announces: READY=1 once clients are served, STATUS= lines that follow the
//! flows, RELOADING=1 ... READY=1 around a SIGHUP, STOPPING=1 on SIGTERM, and WATCHDOG=1 pings
//! when `WATCHDOG_USEC` is set.

mod common;

use std::os::unix::net::UnixDatagram;
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// How long an announcement may take to arrive.
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(20);

/// The service manager's end: every datagram received, in order, with when it came.
struct Manager {
    messages: Receiver<(Instant, String)>,
    /// Everything received so far, for failure messages.
    seen: Vec<String>,
    _dir: TempDir,
}

impl Manager {
    /// Binds the socket; returns it and the value for `NOTIFY_SOCKET`.
    fn bind(what: &str) -> (Manager, String) {
        let dir = TempDir::new(what);
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        let (tx, messages) = mpsc::channel();
        thread::Builder::new()
            .name("notify-reader".into())
            .spawn(move || {
                let mut buf = vec![0u8; 4096];
                // Ends when the test drops the receiver (a send fails) or the socket errors.
                while let Ok(n) = socket.recv(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    if tx.send((Instant::now(), text)).is_err() {
                        return;
                    }
                }
            })
            .expect("spawn the notify reader");
        let name = path.to_str().expect("utf-8 temp path").to_string();
        (
            Manager {
                messages,
                seen: Vec::new(),
                _dir: dir,
            },
            name,
        )
    }

    /// Waits for the next message that satisfies `want`, skipping others; panics at the
    /// deadline with everything seen.
    fn expect(&mut self, what: &str, proxy: &Proxy, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + NOTIFY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.messages.recv_timeout(left) {
                Ok((_, text)) => {
                    self.seen.push(text.clone());
                    if want(&text) {
                        return text;
                    }
                }
                Err(_) => panic!(
                    "no notification {what} within {NOTIFY_TIMEOUT:?}; received: {:#?}\n{}",
                    self.seen,
                    proxy.stderr_tail()
                ),
            }
        }
    }
}

/// The fields of one notification, `KEY=VALUE` a line.
fn field<'a>(message: &'a str, key: &str) -> Option<&'a str> {
    message
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
}

#[test]
fn ready_status_reload_and_stopping_reach_the_service_manager() {
    let echo = Backend::echo();
    let (mut manager, socket) = Manager::bind("notify");
    let mut proxy = Proxy::start_with_env(
        &["--listen", "127.0.0.1:0", "--backend", &echo.arg()],
        &[("NOTIFY_SOCKET", &socket)],
    );

    // READY=1 means clients are served: a flow works the moment it arrives.
    manager.expect("READY=1", &proxy, |m| field(m, "READY") == Some("1"));
    let mut held = connect(proxy.addr).expect("connect after READY=1");
    echo_roundtrip(&mut held, b"ready means served").expect("a flow after READY=1");

    // STATUS= follows the flows: the one held open shows within the next ticks.
    manager.expect("STATUS= with 1 flow", &proxy, |m| {
        field(m, "STATUS").is_some_and(|s| s.starts_with("serving: 1 flows, 1/1 backends up"))
    });

    // SIGHUP: RELOADING=1 (with the monotonic time systemd >= 253 wants), then READY=1.
    wait_signal_handlers(&proxy);
    proxy.signal(libc::SIGHUP);
    let reloading = manager.expect("RELOADING=1", &proxy, |m| {
        field(m, "RELOADING") == Some("1")
    });
    let usec: u64 = field(&reloading, "MONOTONIC_USEC")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("RELOADING=1 without MONOTONIC_USEC: {reloading:?}"));
    assert!(usec > 0, "{reloading:?}");
    manager.expect("READY=1 after the reload", &proxy, |m| {
        field(m, "READY") == Some("1")
    });

    // SIGTERM: STOPPING=1 at once, while the held flow still runs (the drain).
    proxy.signal(libc::SIGTERM);
    manager.expect("STOPPING=1", &proxy, |m| field(m, "STOPPING") == Some("1"));
    echo_roundtrip(&mut held, b"still served while draining").expect("the held flow drains");
    manager.expect("STATUS= draining", &proxy, |m| {
        field(m, "STATUS").is_some_and(|s| s.starts_with("draining: 1 flows"))
    });
    drop(held);
    let status = proxy.wait_exit(Duration::from_secs(30));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "exit after the drain\n{}",
        proxy.stderr_tail()
    );
}

/// With `WATCHDOG_USEC` set, systemd expects WATCHDOG=1 at least that often; Ringway pings at
/// half the interval while every worker answers. The same through an abstract socket name.
#[test]
fn watchdog_pings_come_at_half_the_interval_on_an_abstract_socket() {
    let echo = Backend::echo();
    let name = format!("ringway-test-notify-{}", std::process::id());
    let socket = abstract_notify_socket(&name, Duration::from_secs(1));
    let interval = Duration::from_millis(600);
    let mut proxy = Proxy::start_with_env(
        &[
            "--listen",
            "127.0.0.1:0",
            "--backend",
            &echo.arg(),
            "--workers",
            "2",
        ],
        &[
            ("NOTIFY_SOCKET", &format!("@{name}")),
            ("WATCHDOG_USEC", &interval.as_micros().to_string()),
        ],
    );

    let mut pings = Vec::new();
    let mut seen = Vec::new();
    let deadline = Instant::now() + NOTIFY_TIMEOUT;
    let mut buf = [0u8; 4096];
    while pings.len() < 6 && Instant::now() < deadline {
        proxy.assert_running();
        let Ok(n) = socket.recv(&mut buf) else {
            continue;
        };
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        if field(&text, "WATCHDOG") == Some("1") {
            pings.push(Instant::now());
        }
        seen.push(text);
    }
    assert!(
        pings.len() >= 6,
        "want 6 WATCHDOG=1 pings within {NOTIFY_TIMEOUT:?}, got {}; received: {seen:#?}\n{}",
        pings.len(),
        proxy.stderr_tail()
    );
    assert!(
        seen.iter().any(|m| field(m, "READY") == Some("1")),
        "{seen:#?}"
    );
    // Not a timing claim (the machine may be loaded): the pings are spread out over time, not
    // a burst sent at once.
    let span = *pings.last().unwrap() - pings[0];
    assert!(
        span >= interval,
        "6 pings within {span:?}: a burst, not a schedule"
    );
}

/// A worker thread stopped by the debugger's own means (ptrace, which stops one thread and
/// leaves the rest of the process running) is a wedged worker as far as anyone can tell: its
/// event loop no longer turns. Resumed (detached) when dropped.
struct StoppedThread(libc::pid_t);

impl StoppedThread {
    fn stop(tid: libc::pid_t) -> StoppedThread {
        // SAFETY: ptrace with PTRACE_SEIZE/INTERRUPT takes plain integers and no pointers; the
        // tid is a thread of our own child process, which has not been reaped.
        let rc = unsafe { libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0) };
        assert_eq!(
            rc,
            0,
            "PTRACE_SEIZE {tid}: {}",
            std::io::Error::last_os_error()
        );
        let stopped = StoppedThread(tid);
        // SAFETY: as above.
        let rc = unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0) };
        assert_eq!(
            rc,
            0,
            "PTRACE_INTERRUPT: {}",
            std::io::Error::last_os_error()
        );
        let mut status = 0;
        // SAFETY: waitpid writes one int into `status`, which we own.
        let rc = unsafe { libc::waitpid(tid, &mut status, libc::__WALL) };
        assert!(
            rc == tid && libc::WIFSTOPPED(status),
            "thread {tid} did not stop: rc {rc}, status {status:#x}"
        );
        stopped
    }
}

impl Drop for StoppedThread {
    fn drop(&mut self) {
        // SAFETY: plain integers; detaching resumes the thread (it is in a ptrace-stop).
        unsafe { libc::ptrace(libc::PTRACE_DETACH, self.0, 0, 0) };
    }
}

/// The thread id of the proxy's thread named `name`.
fn thread_named(proxy: &Proxy, name: &str) -> libc::pid_t {
    let tasks = std::fs::read_dir(format!("/proc/{}/task", proxy.pid())).expect("list threads");
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() == name {
            return task.file_name().to_string_lossy().parse().expect("tid");
        }
    }
    panic!("no thread named {name} in ringway {}", proxy.pid());
}

/// The watchdog is fed only while every worker answers: with one worker's event loop stopped,
/// the pings stop (so systemd would restart the process); once it runs again, they resume.
#[test]
fn watchdog_pings_stop_while_a_worker_is_wedged() {
    let echo = Backend::echo();
    let name = format!("ringway-test-wedged-{}", std::process::id());
    let socket = abstract_notify_socket(&name, Duration::from_millis(100));
    let mut proxy = Proxy::start_with_env(
        &[
            "--listen",
            "127.0.0.1:0",
            "--backend",
            &echo.arg(),
            "--workers",
            "2",
        ],
        &[
            ("NOTIFY_SOCKET", &format!("@{name}")),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let mut buf = [0u8; 4096];
    // The next WATCHDOG=1 within `timeout`, if any.
    let mut next_ping = |timeout: Duration| -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(n) = socket.recv(&mut buf) {
                if field(&String::from_utf8_lossy(&buf[..n]), "WATCHDOG") == Some("1") {
                    return Some(Instant::now());
                }
            }
        }
        None
    };
    assert!(
        next_ping(NOTIFY_TIMEOUT).is_some(),
        "no WATCHDOG=1 with every worker running\n{}",
        proxy.stderr_tail()
    );

    let worker = thread_named(&proxy, "ringway-w1");
    let stopped = StoppedThread::stop(worker);
    // Pings may go on for up to 2 s (the control thread's patience, `WEDGED_AFTER`); then a
    // silence of several watchdog intervals must follow while the rest of the process runs.
    let silence = Duration::from_secs(3);
    let deadline = Instant::now() + NOTIFY_TIMEOUT;
    let stopped_at = Instant::now();
    while next_ping(silence).is_some() {
        proxy.assert_running();
        assert!(
            Instant::now() < deadline,
            "WATCHDOG=1 pings went on {:?} after a worker was stopped\n{}",
            stopped_at.elapsed(),
            proxy.stderr_tail()
        );
    }

    drop(stopped);
    assert!(
        next_ping(NOTIFY_TIMEOUT).is_some(),
        "the pings did not resume once the worker ran again\n{}",
        proxy.stderr_tail()
    );
    proxy.assert_running();
}

/// A notify socket bound to the abstract name `name` (NOTIFY_SOCKET=@name), reads timing out
/// after `timeout`.
fn abstract_notify_socket(name: &str, timeout: Duration) -> UnixDatagram {
    use std::os::linux::net::SocketAddrExt;
    let socket = UnixDatagram::bind_addr(
        &std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap(),
    )
    .expect("bind an abstract notify socket");
    socket.set_read_timeout(Some(timeout)).unwrap();
    socket
}

/// `systemctl reload` under the shipped unit starts a successor with `--takeover`
/// (deploy/ringway.service, ExecReload). The successor must name itself the main process
/// (MAINPID=, accepted with NotifyAccess=all) before the old one exits, then say READY=1, and
/// nobody may say STOPPING=1 on the way: systemd would take the service for stopping.
#[test]
fn a_takeover_names_itself_the_main_process_and_nobody_says_stopping() {
    let echo = Backend::echo();
    let (mut manager, notify) = Manager::bind("notify-takeover");
    let dir = TempDir::new("notify-upgrade");
    let socket = dir.path().join("upgrade.sock");
    let backend = echo.arg();
    let base = [
        "--listen",
        "127.0.0.1:0",
        "--backend",
        backend.as_str(),
        "--upgrade-socket",
        socket.to_str().expect("utf-8 temp path"),
    ];
    let mut old = Proxy::start_with_env(&base, &[("NOTIFY_SOCKET", &notify)]);
    manager.expect("READY=1 from the first process", &old, |m| {
        field(m, "READY") == Some("1")
    });
    let mut flow = connect(old.addr).expect("connect to the first process");
    echo_roundtrip(&mut flow, b"before the upgrade").expect("a flow before the upgrade");

    let mut takeover = base.to_vec();
    takeover.push("--takeover");
    let mut new = Proxy::start_with_env(&takeover, &[("NOTIFY_SOCKET", &notify)]);
    let main = manager.expect("MAINPID= from the successor", &new, |m| {
        field(m, "MAINPID").is_some()
    });
    assert_eq!(
        field(&main, "MAINPID"),
        Some(new.pid().to_string().as_str()),
        "MAINPID names the successor"
    );
    manager.expect("READY=1 from the successor", &new, |m| {
        field(m, "READY") == Some("1")
    });
    let status = old.wait_exit(NOTIFY_TIMEOUT);
    assert!(
        status.is_some_and(|s| s.success()),
        "the old process exits 0 after the handover: {status:?}\n{}",
        old.stderr_tail()
    );
    // The flow moved with the listeners: same connection, now served by the successor.
    echo_roundtrip(&mut flow, b"after the upgrade").expect("the flow after the upgrade");
    assert!(
        !manager
            .seen
            .iter()
            .any(|m| field(m, "STOPPING") == Some("1")),
        "STOPPING=1 during an upgrade: {:#?}",
        manager.seen
    );

    // The successor is the service now: a stop drains it as usual.
    new.signal(libc::SIGTERM);
    manager.expect("STOPPING=1 from the successor", &new, |m| {
        field(m, "STOPPING") == Some("1")
    });
    drop(flow);
    let status = new.wait_exit(NOTIFY_TIMEOUT);
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}
