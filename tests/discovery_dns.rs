//! The DNS client of `--backend-dns` (ringway::discovery::dns) against a real nameserver:
//! dnsmasq, started by each test on a free loopback port, answering from a hosts file the test
//! writes. Changing the records is done the way an operator would: rewrite the file and send
//! dnsmasq SIGHUP, which makes it re-read the file and drop its cache.
//!
//! Needs the dnsmasq binary (Debian package dnsmasq-base, which installs no system service).
//! Without it these tests fail, on purpose: a skipped test would hide that DNS discovery is
//! untested.

use std::fs::{self, File};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ringway::discovery::dns::{backends_from_addresses, resolve, DnsError, DnsTarget};

/// How long dnsmasq may take to start answering, or to pick up a changed hosts file.
const DEADLINE: Duration = Duration::from_secs(10);
/// Per lookup: short, so that a lookup sent before dnsmasq is ready is soon retried.
const QUERY_TIMEOUT: Duration = Duration::from_millis(500);

/// A dnsmasq process answering on 127.0.0.1:`addr.port()` from `dir/hosts`.
struct Dnsmasq {
    process: KillOnDrop,
    addr: SocketAddr,
    dir: TempDir,
}

/// A child process, killed (SIGKILL, by its PID) and reaped when dropped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Dnsmasq {
    /// Starts dnsmasq serving `hosts` (hosts-file syntax) plus `extra_args`, and returns once it
    /// answers. Names under `.test` that it does not know get NXDOMAIN (`--local=/test/`).
    fn start(hosts: &str, extra_args: &[&str]) -> Dnsmasq {
        let binary = dnsmasq_binary();
        let dir = TempDir::new();
        let hosts_path = dir.path().join("hosts");
        let log_path = dir.path().join("dnsmasq.log");
        write_atomically(&hosts_path, hosts);
        // The free port is found by binding and releasing it, so another process may take it
        // before dnsmasq does; then dnsmasq exits and we try another.
        for _ in 0..5 {
            let port = free_udp_port();
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let log = File::create(&log_path).expect("create the dnsmasq log");
            let child = Command::new(&binary)
                .args([
                    "--no-daemon", // foreground, no pid file, no user change, log to stderr
                    "--conf-file=/dev/null",
                    &format!("--port={port}"),
                    "--listen-address=127.0.0.1",
                    "--bind-interfaces",
                    "--no-resolv",
                    "--no-hosts",
                    &format!("--addn-hosts={}", hosts_path.display()),
                    "--local=/test/",
                    "--host-record=ready.test,127.0.0.1",
                ])
                .args(extra_args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
            let mut process = KillOnDrop(child);
            if wait_until_ready(&mut process.0, addr, &log_path) {
                return Dnsmasq { process, addr, dir };
            }
            let log = fs::read_to_string(&log_path).unwrap_or_default();
            assert!(
                log.contains("Address already in use"),
                "dnsmasq did not start:\n{log}"
            );
        }
        panic!("dnsmasq found no free port in 5 tries");
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("dnsmasq.log")).unwrap_or_default()
    }

    fn resolve(&self, name: &str) -> Result<Vec<IpAddr>, DnsError> {
        resolve(name, self.addr, Duration::from_secs(2))
    }

    /// Replaces the hosts file and tells dnsmasq to re-read it.
    fn set_hosts(&self, hosts: &str) {
        write_atomically(&self.dir.path().join("hosts"), hosts);
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!("kill -HUP {}", self.process.0.id()))
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -HUP dnsmasq failed");
    }

    /// Retries until `name` resolves to `expected` (sorted), or fails at the deadline.
    fn wait_for_answer(&self, name: &str, expected: &[IpAddr]) {
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
        "dnsmasq is not installed; these tests need it as a test DNS server. \
         Install it with: apt-get install dnsmasq-base (the binary only, no system service)"
    );
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("bind a UDP port")
        .port()
}

/// Writes a new file and renames it into place, so dnsmasq never reads a half-written file.
fn write_atomically(path: &Path, text: &str) {
    let temporary = path.with_extension("new");
    fs::write(&temporary, text).expect("write the hosts file");
    fs::rename(&temporary, path).expect("rename the hosts file");
}

fn ips(texts: &[&str]) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = texts.iter().map(|t| t.parse().unwrap()).collect();
    ips.sort();
    ips
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "ringway-discovery-dns-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create a temp dir");
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn answers_follow_the_hosts_file_across_sighup() {
    let dns = Dnsmasq::start(
        "10.1.0.2 web.test\n10.1.0.1 web.test\nfd00::1 web.test\n",
        &[],
    );
    let first = ips(&["10.1.0.1", "10.1.0.2", "fd00::1"]);
    assert_eq!(dns.resolve("web.test").unwrap(), first);
    assert_eq!(
        dns.resolve("WEB.Test.").unwrap(),
        first,
        "case and a trailing dot"
    );

    let target: DnsTarget = "web.test:8080".parse().unwrap();
    let names: Vec<String> = backends_from_addresses(&target, &first)
        .into_iter()
        .map(|b| b.name)
        .collect();
    assert_eq!(names, ["10.1.0.1:8080", "10.1.0.2:8080", "[fd00::1]:8080"]);

    // One address gone, one new, the IPv6 one replaced.
    dns.set_hosts("10.1.0.2 web.test\n10.1.0.3 web.test\nfd00::2 web.test\n");
    dns.wait_for_answer("web.test", &ips(&["10.1.0.2", "10.1.0.3", "fd00::2"]));

    // IPv4 only: the AAAA query gets an empty answer, not an error.
    dns.set_hosts("10.1.0.9 web.test\n");
    dns.wait_for_answer("web.test", &ips(&["10.1.0.9"]));
}

#[test]
fn errors_and_aliases() {
    let dns = Dnsmasq::start(
        "10.1.0.1 web.test\nfd00::1 web.test\n",
        &[
            "--cname=alias.test,web.test",
            "--cname=alias2.test,alias.test",
            "--txt-record=textonly.test,hello",
        ],
    );
    let web = ips(&["10.1.0.1", "fd00::1"]);
    assert_eq!(dns.resolve("alias.test").unwrap(), web, "through a CNAME");
    assert_eq!(dns.resolve("alias2.test").unwrap(), web, "through two");

    let error = dns.resolve("missing.test").unwrap_err();
    assert!(matches!(error, DnsError::NxDomain), "{error}");
    assert_eq!(error.to_string(), "the name does not exist (NXDOMAIN)");

    let error = dns.resolve("textonly.test").unwrap_err();
    assert!(matches!(error, DnsError::NoAddresses), "{error}");

    // Outside the local domain with no upstream servers: dnsmasq refuses.
    let error = dns.resolve("example.com").unwrap_err();
    assert!(
        matches!(error, DnsError::Refused | DnsError::ServFail),
        "{error}"
    );
}

#[test]
fn a_large_answer_is_fetched_over_tcp() {
    // 300 A records (about 4.8 KB) do not fit in the 1232-byte EDNS payload we offer, so the
    // UDP answer comes back truncated and the client must ask again over TCP.
    let hosts: String = (0..300)
        .map(|i| format!("10.2.{}.{} big.test\n", i / 200, i % 200 + 1))
        .collect();
    let dns = Dnsmasq::start(&hosts, &[]);
    let answer = dns.resolve("big.test").unwrap();
    assert_eq!(answer.len(), 300);
    assert!(
        answer.windows(2).all(|w| w[0] < w[1]),
        "sorted, no duplicates"
    );
}

#[test]
fn nothing_listening_is_an_io_error() {
    let port = free_udp_port();
    let nameserver = SocketAddr::from(([127, 0, 0, 1], port));
    let error = resolve("web.test", nameserver, Duration::from_secs(2)).unwrap_err();
    assert!(
        matches!(error, DnsError::Io { .. }),
        "ICMP port unreachable should show as an error at once: {error}"
    );
}
