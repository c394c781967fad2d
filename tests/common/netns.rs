//! A network namespace of the test's own (`ip netns add`, so the test needs root, as in CI):
//! loopback up, its own sysctls and MTUs, deleted on drop. Code run through [`Netns::run`]
//! lives in it: the sockets it opens, the threads it spawns and the processes it starts.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

pub struct Netns {
    pub name: String,
}

impl Netns {
    /// A new namespace named after `what`, this process and a counter, with loopback up.
    pub fn new(what: &str) -> Netns {
        let name = format!(
            "ringway-{what}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        // A namespace left by a killed run of a process with the same PID.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run_checked(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command inside the namespace; panics with its output if it fails.
    pub fn exec(&self, argv: &[&str]) {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(argv);
        run_checked(&full);
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) {
        let mut argv = vec!["ip", "-n", &self.name];
        argv.extend_from_slice(args);
        run_checked(&argv);
    }

    /// Where the namespace is pinned, for setns(2).
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Moves the calling thread into this namespace: the sockets it opens from now on, the
    /// threads it spawns and the processes it starts all live there.
    pub fn enter(&self) {
        let path = self.path();
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns takes a descriptor we own (alive for the call) and a flag; it changes
        // only the calling thread's network namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
    }

    /// Sets a sysctl of the namespace (`net.*` ones are per namespace).
    pub fn sysctl(&self, setting: &str) {
        self.exec(&["sysctl", "-q", "-w", setting]);
    }

    /// Runs `f` on a new thread that has entered this namespace, and returns its result.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        thread::scope(|scope| {
            thread::Builder::new()
                .name(format!("in-{}", self.name))
                .spawn_scoped(scope, move || {
                    self.enter();
                    f()
                })
                .expect("spawn the namespace thread")
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdin(Stdio::null())
            .status();
    }
}

fn run_checked(argv: &[&str]) {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {argv:?} (iproute2 and procps needed): {e}"));
    assert!(
        out.status.success(),
        "{argv:?} failed ({}): {} (network-namespace tests need root)",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}
