//! dnsmasq as a test DNS server: started on a free loopback UDP port, answering from a hosts
//! file the test writes. Records change the way an operator would change them: rewrite the file
//! and send dnsmasq SIGHUP, which makes it re-read the file and drop its cache.
//!
//! Needs the dnsmasq binary (Debian package dnsmasq-base, which installs no system service).
//! Without it the tests that use it fail, on purpose: a skipped test would hide that DNS
//! discovery is untested.
#![allow(dead_code)] // each test file uses a different part of the harness

use std::fs::{self, File};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ringway::discovery::dns::{resolve, DnsError};

use super::{write_atomically, TempDir};

/// How long dnsmasq may take to start answering, or to pick up a changed hosts file.
pub const DEADLINE: Duration = Duration::from_secs(10);
/// Per lookup while waiting for dnsmasq to start: short, so that a lookup sent before dnsmasq
/// is ready is soon retried.
const QUERY_TIMEOUT: Duration = Duration::from_millis(500);

/// A dnsmasq process answering on 127.0.0.1:`addr.port()` from `dir/hosts`.
pub struct Dnsmasq {
    pub addr: SocketAddr,
    process: KillOnDrop,
    dir: TempDir,
}

impl Dnsmasq {
    /// Starts dnsmasq serving `hosts` (hosts-file syntax) plus `extra_args`, and returns once it
    /// answers. Names under `.test` that it does not know get NXDOMAIN (`--local=/test/`).
    pub fn start(hosts: &str, extra_args: &[&str]) -> Dnsmasq {
        let binary = dnsmasq_binary();
        let dir = TempDir::new("dnsmasq");
        let hosts_path = dir.path().join("hosts");
        let log_path = dir.path().join("dnsmasq.log");
        write_atomically(&hosts_path, hosts);
        // The free port is found by binding and releasing it, so another process may take it
        // before dnsmasq does; then dnsmasq exits and we try another.
        for _ in 0..TRIES {
            let port = free_dns_port();
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let mut process = spawn(&binary, port, dir.path(), extra_args);
            if wait_until_ready(&mut process.0, addr, &log_path) {
                return Dnsmasq { addr, process, dir };
            }
            let log = fs::read_to_string(&log_path).unwrap_or_default();
            assert!(
                log.contains("Address already in use"),
                "dnsmasq did not start:\n{log}"
            );
        }
        panic!("dnsmasq found no free port in {TRIES} tries");
    }

    /// Stops dnsmasq and starts it again on the same port and hosts file with `extra_args`:
    /// the way to change records that only the command line sets (`--srv-host`, `--cname`),
    /// which SIGHUP does not re-read. Returns once the new process answers.
    pub fn restart(&mut self, extra_args: &[&str]) {
        let _ = self.process.0.kill();
        let _ = self.process.0.wait();
        let log_path = self.dir.path().join("dnsmasq.log");
        self.process = spawn(
            &dnsmasq_binary(),
            self.addr.port(),
            self.dir.path(),
            extra_args,
        );
        assert!(
            wait_until_ready(&mut self.process.0, self.addr, &log_path),
            "dnsmasq did not start again on {}:\n{}",
            self.addr,
            self.log()
        );
    }

    /// What dnsmasq has logged so far, for failure messages.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("dnsmasq.log")).unwrap_or_default()
    }

    /// One lookup of `name` by Ringway's DNS client.
    pub fn resolve(&self, name: &str) -> Result<Vec<IpAddr>, DnsError> {
        resolve(name, self.addr, Duration::from_secs(2))
    }

    /// Replaces the hosts file and tells dnsmasq to re-read it (SIGHUP also drops its cache).
    pub fn set_hosts(&self, hosts: &str) {
        write_atomically(&self.dir.path().join("hosts"), hosts);
        let status = Command::new("kill")
            .args(["-HUP", &self.process.0.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -HUP dnsmasq failed");
    }

    /// Retries until `name` resolves to `expected` (sorted), or fails at the deadline.
    pub fn wait_for_answer(&self, name: &str, expected: &[IpAddr]) {
        let started = Instant::now();
        loop {
            let answer = self.resolve(name);
            if matches!(&answer, Ok(addrs) if addrs == expected) {
                return;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "{name}: still {answer:?} after {DEADLINE:?}, expected {expected:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20)); // pacing of the retry, not a wait
        }
    }
}

/// Starts dnsmasq on 127.0.0.1:`port`, answering from `dir/hosts`, logging to
/// `dir/dnsmasq.log` (truncated).
fn spawn(binary: &Path, port: u16, dir: &Path, extra_args: &[&str]) -> KillOnDrop {
    let log = File::create(dir.join("dnsmasq.log")).expect("create the dnsmasq log");
    let child = Command::new(binary)
        .args([
            "--no-daemon", // foreground, no pid file, no user change, log to stderr
            "--conf-file=/dev/null",
            &format!("--port={port}"),
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            &format!("--addn-hosts={}", dir.join("hosts").display()),
            "--local=/test/",
            "--host-record=ready.test,127.0.0.1",
        ])
        .args(extra_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
    KillOnDrop(child)
}

/// A child process, killed (SIGKILL, by its PID) and reaped when dropped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `true` once dnsmasq answers; `false` if it exited (e.g. its port was taken).
fn wait_until_ready(child: &mut Child, addr: SocketAddr, log_path: &Path) -> bool {
    let started = Instant::now();
    loop {
        if let Ok(Some(_status)) = child.try_wait() {
            return false;
        }
        if resolve("ready.test", addr, QUERY_TIMEOUT).is_ok() {
            return true;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "dnsmasq did not answer within {DEADLINE:?}:\n{}",
            fs::read_to_string(log_path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20)); // pacing of the retry, not a wait
    }
}

/// The dnsmasq binary; panics (failing the test) with the fix when it is not installed.
fn dnsmasq_binary() -> PathBuf {
    // /usr/sbin is not on every user's PATH.
    for candidate in ["dnsmasq", "/usr/sbin/dnsmasq", "/sbin/dnsmasq"] {
        let works = Command::new(candidate)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if works {
            return PathBuf::from(candidate);
        }
    }
    panic!(
        "dnsmasq is not installed; the DNS tests need it as a test DNS server. \
         Install it with: apt-get install dnsmasq-base (the binary only, no system service)"
    );
}

/// Ports tried for dnsmasq before giving up.
const TRIES: usize = 20;

/// A loopback port free a moment ago for both UDP and TCP (dnsmasq listens on both), chosen
/// below the kernel's ephemeral range (32768 and up by default): ports picked by the kernel for
/// UDP are also the ones outgoing TCP connections use, and under load (other tests' flows) the
/// TCP side of such a port was often taken, failing every try.
fn free_dns_port() -> u16 {
    use std::hash::BuildHasher;
    let random = std::collections::hash_map::RandomState::new();
    for n in 0u32..1000 {
        let port = 20_000 + (random.hash_one((n, Instant::now())) % 12_000) as u16;
        let both = UdpSocket::bind(("127.0.0.1", port))
            .and_then(|udp| std::net::TcpListener::bind(("127.0.0.1", port)).map(|tcp| (udp, tcp)));
        if both.is_ok() {
            return port;
        }
    }
    panic!("no port from 20000 to 31999 free for both UDP and TCP in 1000 tries");
}

/// A loopback UDP port that was free a moment ago (bound and released).
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("bind a UDP port")
        .port()
}
