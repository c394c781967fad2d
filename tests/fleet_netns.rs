//! Beyond one host: Ringway hosts behind a router with equal-cost routes announced over BGP
//! (BIRD), and an active/backup pair sharing a virtual address (keepalived), each in network
//! namespaces of the test's own, with the real daemons running the configs of deploy/bgp and
//! deploy/keepalived (only their timers are made faster, the way docs/scale-out.md says).
//!
//! What an operator relies on, checked here:
//! - ECMP: the router holds a next hop per ready host; clients spread over the hosts; every
//!   connection of a client reaches the same backend whichever host took it (the mapping is a
//!   pure function of the flags). SIGTERM on one host with `--drain-delay`: its route is
//!   withdrawn, new connections go to the other host and the same backends, not one fails, its
//!   live flows finish; when it returns, its route and its share come back. Then what is not
//!   planned: a killed Ringway (its live flow ends, the health loop withdraws the route) and a
//!   dead host (only the router's BGP hold timer removes the route).
//! - VRRP: killing the active host's Ringway moves the VIP to the backup within seconds; new
//!   connections then succeed through the backup with the same mapping. The failed host comes
//!   back without taking the VIP (nopreempt); a SIGTERM with `--drain-delay` on the holder
//!   moves the VIP with no connection refused (those live at the move are cut: the address
//!   moves with every packet for it).
//!
//! The measured times (route withdrawal, VIP move) are printed with a `fleet:` prefix
//! (`cargo test --test fleet_netns -- --nocapture`) and reported in docs/scale-out.md.
//!
//! Needs root, iproute2, bird2 (bird, birdc), keepalived, nftables and curl, as
//! scripts/test.sh installs. Every daemon is started by this test, runs in the test's own
//! namespaces, and is stopped by PID when its guard drops, also when an assertion fails.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::netns::Netns;
use common::*;

/// The virtual address of the examples in deploy/.
const VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const VIP_PORT: u16 = 80;
/// Where the backends listen (in the backend namespace).
const BACKEND_PORT: u16 = 7000;
const BACKENDS: [Ipv4Addr; 4] = [
    Ipv4Addr::new(10, 3, 0, 1),
    Ipv4Addr::new(10, 3, 0, 2),
    Ipv4Addr::new(10, 3, 0, 3),
    Ipv4Addr::new(10, 3, 0, 4),
];
/// The address each host connects to the backends from: which host took a flow.
const HOST_SIDE: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 2, 1, 2), Ipv4Addr::new(10, 2, 2, 2)];
const HOST_NAMES: [&str; 2] = ["a", "b"];
/// Each host's next hop as the router sees it (deploy/bgp's example addresses).
const HOST_NEXT_HOP: [&str; 2] = ["198.51.100.2", "198.51.100.6"];
/// Deadline for routing changes (BGP session up, route in, VIP moved) on a loaded machine.
const ROUTING_TIMEOUT: Duration = Duration::from_secs(40);
/// What the tests give `--drain-delay`: the health loop checks every 200 ms, so the route is
/// withdrawn well within it (the measured time is printed). `RINGWAY_FLEET_DRAIN_DELAY=0`
/// shows what the delay is for: the tests then fail, printing how many connections were
/// refused.
fn drain_delay() -> String {
    std::env::var("RINGWAY_FLEET_DRAIN_DELAY").unwrap_or_else(|_| "5s".to_string())
}

/// Panics with what to install if a program the test runs is missing (rather than timing out
/// waiting for a route that a daemon that never started cannot announce).
fn require(programs: &[&str]) {
    for program in programs {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {program}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            found,
            "{program} is not installed: this test needs bird2, keepalived, nftables and curl \
             (scripts/test.sh installs them)"
        );
    }
}

fn deploy_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path);
    fs::read_to_string(&full).unwrap_or_else(|e| panic!("read {}: {e}", full.display()))
}

/// `text` with `from` replaced by `to`; panics if `from` is not there (the example changed and
/// the test would silently stop testing it).
fn replaced(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "{from:?} is not in the deploy example");
    text.replace(from, to)
}

// ---------------------------------------------------------------------------------------------
// Processes and namespaces
// ---------------------------------------------------------------------------------------------

/// A daemon started in a namespace (`ip netns exec` execs it, so the child's PID is the
/// daemon's), its output in a log file; stopped by PID on drop: SIGTERM, then SIGKILL.
struct Daemon {
    what: String,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(ns: &Netns, what: &str, dir: &Path, argv: &[&str], env: &[(&str, &str)]) -> Daemon {
        let log = dir.join(format!("{what}.log"));
        let out = fs::File::create(&log).expect("create the daemon log");
        let err = out.try_clone().unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .args(argv)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("start {what} ({argv:?}): {e}"));
        Daemon {
            what: what.to_string(),
            child,
            log,
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics with its log if it has exited.
    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited ({status}):\n{}", self.what, self.log());
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on the PID of our own child, which we have not reaped yet.
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if thread::panicking() {
            eprintln!("--- {} log ---\n{}", self.what, self.log());
        }
    }
}

/// A veth pair from `a` (named `a_name`) to `b` (named `b_name`), with addresses, up.
fn link(a: &Netns, a_name: &str, a_addr: &str, b: &Netns, b_name: &str, b_addr: &str) {
    a.ip(&[
        "link", "add", a_name, "type", "veth", "peer", "name", b_name, "netns", &b.name,
    ]);
    for (ns, name, addr) in [(a, a_name, a_addr), (b, b_name, b_addr)] {
        if !addr.is_empty() {
            ns.ip(&["addr", "add", addr, "dev", name]);
        }
        ns.ip(&["link", "set", name, "up"]);
    }
}

/// A backend that greets with its name and the address the flow came from (which host took
/// it), then echoes until EOF.
struct WhoBackend {
    /// The listener, to shut it down: that ends the accept loop.
    listener: TcpListener,
    thread: Option<JoinHandle<()>>,
}

impl WhoBackend {
    fn start(ns: &Netns, name: &str, addr: SocketAddr) -> WhoBackend {
        let listener = ns.run(|| TcpListener::bind(addr).unwrap_or_else(|e| panic!("{addr}: {e}")));
        let accepting = listener.try_clone().unwrap();
        let name = name.to_string();
        let thread = thread::spawn(move || {
            while let Ok((mut s, peer)) = accepting.accept() {
                let greeting = format!("{name} {}\n", peer.ip());
                thread::Builder::new()
                    .stack_size(SMALL_STACK)
                    .spawn(move || {
                        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                        if s.write_all(greeting.as_bytes()).is_err() {
                            return;
                        }
                        let mut buf = [0u8; 4096];
                        while let Ok(n @ 1..) = s.read(&mut buf) {
                            if s.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    })
                    .unwrap();
            }
        });
        WhoBackend {
            listener,
            thread: Some(thread),
        }
    }
}

impl Drop for WhoBackend {
    fn drop(&mut self) {
        // A pending accept fails once the socket is shut down (EINVAL), ending the loop.
        let _ = socket2::SockRef::from(&self.listener).shutdown(Shutdown::Both);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The backend namespace: four backends, reached from each host over its own link.
fn backend_namespace() -> Netns {
    let ns = Netns::new("fl-be");
    for ip in BACKENDS {
        ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"]);
    }
    ns
}

/// Links host `i` to the backend namespace and routes the backends through it.
fn link_host_to_backends(host: &Netns, i: usize, backends: &Netns) {
    link(
        host,
        "be",
        &format!("{}/24", HOST_SIDE[i]),
        backends,
        &format!("h{}", HOST_NAMES[i]),
        &format!("10.2.{}.1/24", i + 1),
    );
    host.ip(&[
        "route",
        "add",
        "10.3.0.0/24",
        "via",
        &format!("10.2.{}.1", i + 1),
    ]);
}

fn start_backends(ns: &Netns) -> Vec<WhoBackend> {
    BACKENDS
        .iter()
        .enumerate()
        .map(|(i, ip)| {
            WhoBackend::start(
                ns,
                &format!("backend{}", i + 1),
                SocketAddr::new((*ip).into(), BACKEND_PORT),
            )
        })
        .collect()
}

/// Ringway as every host runs it: same backends and seed on every host.
fn start_ringway(ns: &Netns, extra: &[&str]) -> Proxy {
    let mut args: Vec<String> = [
        "--listen",
        &format!("{VIP}:{VIP_PORT}"),
        "--admin",
        "127.0.0.1:9000",
        "--workers",
        "1",
        "--hash-seed",
        "20250131",
        "--shutdown-timeout",
        "60s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for ip in BACKENDS {
        args.push("--backend".into());
        args.push(format!("{ip}:{BACKEND_PORT}"));
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    ns.run(|| Proxy::start(&args))
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

/// Where one connection went: the backend's name and the host (index) that relayed it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hop {
    backend: String,
    host: usize,
}

/// One connection from `src` to the VIP: greeting, then an echo. Runs on a thread that is in
/// the client namespace.
fn one_connection(src: IpAddr) -> Result<(Hop, TcpStream), String> {
    let mut s = connect_from(src, SocketAddr::new(VIP.into(), VIP_PORT))
        .map_err(|e| format!("connect from {src}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let line = read_line(&mut s).map_err(|e| format!("greeting for {src}: {e}"))?;
    let (backend, peer) = line
        .split_once(' ')
        .ok_or_else(|| format!("odd greeting {line:?}"))?;
    let host = HOST_SIDE
        .iter()
        .position(|h| h.to_string() == peer)
        .ok_or_else(|| format!("greeting from an unknown host {line:?}"))?;
    echo_roundtrip(&mut s, b"ping").map_err(|e| format!("echo for {src}: {e}"))?;
    Ok((
        Hop {
            backend: backend.to_string(),
            host,
        },
        s,
    ))
}

/// `per_client` connections from each client, one after another; every one must work.
fn survey(cli: &Netns, clients: &[IpAddr], per_client: usize) -> BTreeMap<IpAddr, Vec<Hop>> {
    cli.run(|| {
        let mut seen = BTreeMap::new();
        for _ in 0..per_client {
            for &src in clients {
                let (hop, _) = one_connection(src).unwrap_or_else(|e| panic!("{e}"));
                seen.entry(src).or_insert_with(Vec::new).push(hop);
            }
        }
        seen
    })
}

/// Every connection of a client reached one backend; returns that mapping.
fn one_backend_per_client(seen: &BTreeMap<IpAddr, Vec<Hop>>) -> BTreeMap<IpAddr, String> {
    seen.iter()
        .map(|(src, hops)| {
            let backends: BTreeSet<&str> = hops.iter().map(|h| h.backend.as_str()).collect();
            assert_eq!(
                backends.len(),
                1,
                "client {src} reached several backends: {hops:?}"
            );
            (*src, hops[0].backend.clone())
        })
        .collect()
}

/// One connection of the load: when it started and ended, from where, and where it went.
#[derive(Debug)]
struct Attempt {
    at: Instant,
    done: Instant,
    src: IpAddr,
    outcome: Result<Hop, String>,
}

/// A client loop that opens connections from the clients in turn until stopped (bounded in
/// count and time), recording when each started and where it went.
struct Load {
    stop: Arc<AtomicBool>,
    results: Arc<Mutex<Vec<Attempt>>>,
    thread: Option<JoinHandle<()>>,
}

impl Load {
    const MAX_CONNECTIONS: usize = 20_000;
    const MAX_TIME: Duration = Duration::from_secs(120);

    fn start(cli: &Netns, clients: Vec<IpAddr>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let results = Arc::new(Mutex::new(Vec::new()));
        let path = cli.path();
        let thread = {
            let (stop, results) = (stop.clone(), results.clone());
            thread::spawn(move || {
                enter_netns(&path);
                let started = Instant::now();
                for n in 0..Self::MAX_CONNECTIONS {
                    if stop.load(Ordering::SeqCst) || started.elapsed() > Self::MAX_TIME {
                        return;
                    }
                    let src = clients[n % clients.len()];
                    let at = Instant::now();
                    let outcome = one_connection(src).map(|(hop, _)| hop);
                    let failed = outcome.is_err();
                    results.lock().unwrap().push(Attempt {
                        at,
                        done: Instant::now(),
                        src,
                        outcome,
                    });
                    if failed {
                        // A client's retry pause: a refused connect returns at once, and the
                        // loop must not burn its budget on a host that is gone.
                        thread::sleep(Duration::from_millis(10));
                    }
                }
            })
        };
        Load {
            stop,
            results,
            thread: Some(thread),
        }
    }

    fn count(&self) -> usize {
        self.results.lock().unwrap().len()
    }

    /// Connections started at or after `at`.
    fn count_since(&self, at: Instant) -> usize {
        self.results
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.at >= at)
            .count()
    }

    fn finish(mut self) -> Vec<Attempt> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("the load thread");
        }
        std::mem::take(&mut *self.results.lock().unwrap())
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Moves the calling thread into the namespace pinned at `path`.
fn enter_netns(path: &str) {
    use std::os::fd::AsRawFd;
    let file = fs::File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: setns with a descriptor we own; changes only this thread's network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

// ---------------------------------------------------------------------------------------------
// ECMP with BGP
// ---------------------------------------------------------------------------------------------

/// The next hops the router's kernel holds for the VIP.
fn vip_next_hops(router: &Netns) -> BTreeSet<String> {
    let out = Command::new("ip")
        .args([
            "-n",
            &router.name,
            "-4",
            "route",
            "show",
            &format!("{VIP}/32"),
        ])
        .output()
        .expect("ip route show");
    let text = String::from_utf8_lossy(&out.stdout);
    let words: Vec<&str> = text.split_whitespace().collect();
    words
        .windows(2)
        .filter(|w| w[0] == "via")
        .map(|w| w[1].to_string())
        .collect()
}

fn wait_next_hops(router: &Netns, want: &[&str], why: &str, logs: &dyn Fn() -> String) -> Instant {
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    let mut last = BTreeSet::new();
    let reached = wait_until(ROUTING_TIMEOUT, || {
        last = vip_next_hops(router);
        last == want
    });
    assert!(
        reached,
        "{why}: the router's next hops for {VIP} are {last:?}, not {want:?}, after \
         {ROUTING_TIMEOUT:?}\n{}",
        logs()
    );
    Instant::now()
}

/// One Ringway host of the ECMP fleet: BIRD, the health loop and Ringway. Field order is drop
/// order: Ringway first (its SIGTERM withdraws nothing any more), then the daemons.
struct BgpHost {
    ringway: Option<Proxy>,
    health: Daemon,
    bird: Daemon,
}

fn bird_host_config(i: usize, fast_timers: &str) -> String {
    let mut text = deploy_file("bgp/bird-host.conf");
    text = replaced(&text, "log syslog all;", "log stderr all;");
    text = replaced(&text, "hold time 9; keepalive time 3;", fast_timers);
    if i == 1 {
        text = replaced(&text, "198.51.100.2", "198.51.100.6");
        text = replaced(&text, "198.51.100.1", "198.51.100.5");
    }
    text
}

#[test]
fn ecmp_fleet_spreads_clients_keeps_their_backend_and_drains_a_host_without_a_failure() {
    require(&["bird", "birdc", "nft", "curl"]);
    raise_nofile(8192);
    let dir = TempDir::new("fleet-ecmp");
    // BGP timers for the test: sessions come up in about a second and a dead peer is noticed
    // in 3 s. Production values are in the deploy files (docs/scale-out.md).
    let fast = "hold time 3; keepalive time 1; connect retry time 1; error wait time 1, 2;";

    // Namespaces (dropped last: declared first).
    let backends_ns = backend_namespace();
    let cli = Netns::new("fl-cli");
    let router = Netns::new("fl-rtr");
    let hosts = [Netns::new("fl-a"), Netns::new("fl-b")];

    // Clients 203.0.113.10-49 behind the router at 203.0.113.1.
    link(
        &cli,
        "rtr",
        "203.0.113.10/24",
        &router,
        "cli",
        "203.0.113.1/24",
    );
    let clients: Vec<IpAddr> = (10..50u8)
        .map(|n| IpAddr::V4(Ipv4Addr::new(203, 0, 113, n)))
        .collect();
    for ip in &clients[1..] {
        cli.ip(&["addr", "add", &format!("{ip}/24"), "dev", "rtr"]);
    }
    cli.ip(&["route", "add", "default", "via", "203.0.113.1"]);
    for (i, host) in hosts.iter().enumerate() {
        let (router_side, host_side) = if i == 0 {
            ("198.51.100.1/30", "198.51.100.2/30")
        } else {
            ("198.51.100.5/30", "198.51.100.6/30")
        };
        link(
            host,
            "upl",
            host_side,
            &router,
            &format!("h{}", HOST_NAMES[i]),
            router_side,
        );
        host.ip(&[
            "route",
            "add",
            "default",
            "via",
            router_side.split('/').next().unwrap(),
        ]);
        host.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"]);
        link_host_to_backends(host, i, &backends_ns);
    }
    let setup = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/bgp/router-setup.sh");
    router.exec(&["sh", setup.to_str().unwrap()]);

    let _backends = start_backends(&backends_ns);
    let d = dir.path();
    let router_conf = d.join("bird-router.conf");
    let text = deploy_file("bgp/bird-router.conf");
    let text = replaced(&text, "log syslog all;", "log stderr all;");
    fs::write(
        &router_conf,
        replaced(&text, "hold time 9; keepalive time 3;", fast),
    )
    .unwrap();
    let bird = |ns: &Netns, name: &str, conf: &Path| {
        let sock = d.join(format!("{name}.ctl"));
        let pid = d.join(format!("{name}.pid"));
        Daemon::start(
            ns,
            name,
            d,
            &[
                "bird",
                "-f",
                "-c",
                conf.to_str().unwrap(),
                "-s",
                sock.to_str().unwrap(),
                "-P",
                pid.to_str().unwrap(),
            ],
            &[],
        )
    };
    let mut router_bird = bird(&router, "bird-router", &router_conf);
    let health_script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/bgp/ringway-bgp-health");
    let mut fleet: Vec<BgpHost> = hosts
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            let name = HOST_NAMES[i];
            let conf = d.join(format!("bird-{name}.conf"));
            fs::write(&conf, bird_host_config(i, fast)).unwrap();
            let bird = bird(ns, &format!("bird-{name}"), &conf);
            let ringway = start_ringway(ns, &["--drain-delay", &drain_delay()]);
            let sock = d.join(format!("bird-{name}.ctl"));
            let health = Daemon::start(
                ns,
                &format!("health-{name}"),
                d,
                &["sh", health_script.to_str().unwrap()],
                &[
                    ("BIRD_SOCKET", sock.to_str().unwrap()),
                    ("INTERVAL", "0.2"),
                    ("TIMEOUT", "1"),
                ],
            );
            BgpHost {
                ringway: Some(ringway),
                health,
                bird,
            }
        })
        .collect();
    let logs = |fleet: &[BgpHost], router_bird: &Daemon| {
        let mut text = format!("--- router BIRD ---\n{}", router_bird.log());
        for (i, host) in fleet.iter().enumerate() {
            text += &format!(
                "\n--- host {} BIRD ---\n{}\n--- host {} health loop ---\n{}",
                HOST_NAMES[i],
                host.bird.log(),
                HOST_NAMES[i],
                host.health.log()
            );
        }
        text
    };

    // 1. Both hosts announce: the router holds two next hops.
    let started = Instant::now();
    wait_next_hops(&router, &HOST_NEXT_HOP, "both hosts ready", &|| {
        logs(&fleet, &router_bird)
    });
    eprintln!("fleet: both routes in {:?} after start", started.elapsed());
    router_bird.assert_running();

    // 2. Clients spread over both hosts; each client keeps its backend on either host.
    let seen = survey(&cli, &clients, 8);
    let mapping = one_backend_per_client(&seen);
    let per_host = |seen: &BTreeMap<IpAddr, Vec<Hop>>| {
        let mut count = [0usize; 2];
        for hop in seen.values().flatten() {
            count[hop.host] += 1;
        }
        count
    };
    let count = per_host(&seen);
    let total = count[0] + count[1];
    eprintln!(
        "fleet: {total} connections, host a {} host b {}",
        count[0], count[1]
    );
    assert!(
        count.iter().all(|&c| c * 4 >= total),
        "clients do not spread over both hosts: {count:?}"
    );
    let on_both = seen
        .values()
        .filter(|hops| hops.iter().map(|h| h.host).collect::<BTreeSet<_>>().len() == 2)
        .count();
    assert!(
        on_both * 2 >= clients.len(),
        "only {on_both} of {} clients went through both hosts (layer-4 hashing off?)",
        clients.len()
    );
    let used: BTreeSet<&String> = mapping.values().collect();
    assert_eq!(
        used.len(),
        BACKENDS.len(),
        "not every backend has clients: {mapping:?}"
    );

    // 3. Live flows on host a, kept open across its drain.
    let mut live: Vec<(IpAddr, TcpStream)> = cli.run(|| {
        let mut live = Vec::new();
        for attempt in 0..400 {
            let src = clients[attempt % clients.len()];
            let (hop, stream) = one_connection(src).unwrap_or_else(|e| panic!("{e}"));
            if hop.host == 0 {
                live.push((src, stream));
                if live.len() == 6 {
                    break;
                }
            }
        }
        live
    });
    assert_eq!(live.len(), 6, "could not open live flows through host a");

    // 4. SIGTERM on host a under load.
    let load = Load::start(&cli, clients.clone());
    assert!(
        wait_until(ROUTING_TIMEOUT, || load.count() >= 50),
        "the load does not get going"
    );
    let a = fleet[0].ringway.as_ref().unwrap();
    let sigterm = Instant::now();
    a.signal(libc::SIGTERM);
    let withdrawn = wait_next_hops(
        &router,
        &HOST_NEXT_HOP[1..],
        "after SIGTERM on host a",
        &|| logs(&fleet, &router_bird),
    );
    let a = fleet[0].ringway.as_ref().unwrap();
    let drained = wait_until(ROUTING_TIMEOUT, || a.stderr().contains("listeners closed"));
    assert!(
        drained,
        "host a did not start draining\n{}",
        a.stderr_tail()
    );
    let drain_started = Instant::now();
    eprintln!(
        "fleet: route withdrawn {:?} after SIGTERM; listeners closed {:?} after SIGTERM \
         (--drain-delay {})",
        withdrawn - sigterm,
        drain_started - sigterm,
        drain_delay()
    );
    assert!(
        wait_until(ROUTING_TIMEOUT, || load.count_since(drain_started) >= 100),
        "the load stalled after host a closed its listeners"
    );
    // Its live flows still carry bytes both ways after its listeners closed, then end; the
    // process exits cleanly once they have.
    cli.run(|| {
        for (src, s) in &mut live {
            echo_roundtrip(s, b"still here")
                .unwrap_or_else(|e| panic!("live flow of {src} on host a: {e}"));
        }
    });
    let closed_live = Instant::now();
    live.clear();
    let mut a = fleet[0].ringway.take().unwrap();
    let status = a.wait_exit(ROUTING_TIMEOUT);
    assert!(
        status.is_some_and(|s| s.success()),
        "host a: {status:?}\n{}",
        a.stderr_tail()
    );
    eprintln!(
        "fleet: host a exited {:?} after its last live flow ended",
        closed_live.elapsed()
    );
    drop(a);
    let results = load.finish();
    let failures: Vec<&Attempt> = results.iter().filter(|r| r.outcome.is_err()).collect();
    eprintln!(
        "fleet: {} new connections during the removal of host a, {} failed",
        results.len(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} new connections failed during the removal, e.g. {:?}",
        failures.len(),
        results.len(),
        failures.iter().take(5).collect::<Vec<_>>()
    );
    for Attempt {
        at, src, outcome, ..
    } in &results
    {
        let hop = outcome.as_ref().unwrap();
        assert_eq!(
            hop.backend, mapping[src],
            "client {src} reached another backend during the removal"
        );
        if *at >= withdrawn {
            assert_eq!(
                hop.host, 1,
                "a connection after the withdrawal went to host a"
            );
        }
    }
    assert!(
        results.iter().any(|r| r.at >= withdrawn),
        "no connection after the withdrawal"
    );

    // 5. Host a returns: its route and its share of clients come back, with the same mapping.
    let returned = Instant::now();
    fleet[0].ringway = Some(start_ringway(&hosts[0], &["--drain-delay", &drain_delay()]));
    wait_next_hops(&router, &HOST_NEXT_HOP, "host a back", &|| {
        logs(&fleet, &router_bird)
    });
    eprintln!(
        "fleet: route back {:?} after host a restarted",
        returned.elapsed()
    );
    let seen = survey(&cli, &clients, 8);
    assert_eq!(
        one_backend_per_client(&seen),
        mapping,
        "the mapping changed"
    );
    let count = per_host(&seen);
    assert!(
        count.iter().all(|&c| c * 4 >= count[0] + count[1]),
        "the spread did not come back: {count:?}"
    );
    for host in &mut fleet {
        host.bird.assert_running();
        host.health.assert_running();
    }

    // 6. Ringway on host b dies (SIGKILL): its live flow ends (the TCP state was in it), and
    //    the health loop withdraws the route.
    let (src, mut on_b) = cli.run(|| {
        (0..400)
            .map(|n| clients[n % clients.len()])
            .find_map(|src| match one_connection(src) {
                Ok((hop, stream)) if hop.host == 1 => Some((src, stream)),
                _ => None,
            })
            .expect("a flow through host b")
    });
    let mut b = fleet[1].ringway.take().unwrap();
    let killed = Instant::now();
    b.signal(libc::SIGKILL);
    assert!(b.wait_exit(Duration::from_secs(10)).is_some());
    let withdrawn = wait_next_hops(
        &router,
        &HOST_NEXT_HOP[..1],
        "host b's Ringway killed",
        &|| logs(&fleet, &router_bird),
    );
    let ended = expect_closed(&mut on_b, Duration::from_secs(10));
    assert!(
        ended.is_ok(),
        "the live flow of {src} on host b outlived its Ringway: {ended:?}"
    );
    eprintln!(
        "fleet: host b's Ringway killed: route withdrawn {:?} later; its live flow ended ({:?})",
        withdrawn - killed,
        ended.unwrap().0
    );

    // 7. Host a dies (every packet in and out dropped, as if powered off): nothing withdraws
    //    its route but the router's BGP hold timer.
    hosts[0].exec(&["nft", "add", "table", "inet", "dead"]);
    let died = Instant::now();
    for (chain, hook) in [("in", "input"), ("out", "output")] {
        hosts[0].exec(&[
            "nft",
            &format!("add chain inet dead {chain} {{ type filter hook {hook} priority -300; policy drop; }}"),
        ]);
    }
    let removed = wait_next_hops(&router, &[], "host a dead", &|| logs(&fleet, &router_bird));
    eprintln!(
        "fleet: host a dead: its route removed {:?} later (BGP hold time 3 s)",
        removed - died
    );
}

// ---------------------------------------------------------------------------------------------
// VRRP with keepalived
// ---------------------------------------------------------------------------------------------

/// Which hosts hold the VIP now.
fn vip_holders(hosts: &[Netns]) -> Vec<usize> {
    (0..hosts.len())
        .filter(|&i| {
            let out = Command::new("ip")
                .args(["-n", &hosts[i].name, "-4", "addr", "show", "dev", "eth0"])
                .output()
                .expect("ip addr show");
            String::from_utf8_lossy(&out.stdout).contains(&format!("inet {VIP}/"))
        })
        .collect()
}

/// One host of the pair; drop order: Ringway, then keepalived.
struct VrrpHost {
    ringway: Option<Proxy>,
    keepalived: Daemon,
}

#[test]
fn vrrp_pair_moves_the_vip_when_ringway_dies_or_stops_and_keeps_the_mapping() {
    require(&["keepalived", "curl"]);
    let dir = TempDir::new("fleet-vrrp");
    let d = dir.path();
    let backends_ns = backend_namespace();
    // The LAN: a bridge in the client namespace, clients 192.0.2.100-119 on it, hosts .2 and .3.
    let lan = Netns::new("fl-lan");
    let hosts = [Netns::new("fl-va"), Netns::new("fl-vb")];
    lan.ip(&["link", "add", "br0", "type", "bridge"]);
    lan.ip(&["link", "set", "br0", "up"]);
    let clients: Vec<IpAddr> = (100..120u8)
        .map(|n| IpAddr::V4(Ipv4Addr::new(192, 0, 2, n)))
        .collect();
    for ip in &clients {
        lan.ip(&["addr", "add", &format!("{ip}/24"), "dev", "br0"]);
    }
    for (i, host) in hosts.iter().enumerate() {
        let port = format!("to-{}", HOST_NAMES[i]);
        link(
            &lan,
            &port,
            "",
            host,
            "eth0",
            &format!("192.0.2.{}/24", i + 2),
        );
        lan.ip(&["link", "set", &port, "master", "br0"]);
        // The backup listens on the VIP before it holds it.
        host.sysctl("net.ipv4.ip_nonlocal_bind=1");
        link_host_to_backends(host, i, &backends_ns);
    }
    let _backends = start_backends(&backends_ns);

    let template = deploy_file("keepalived/keepalived.conf");
    let template = replaced(
        &template,
        "    interval 2\n    timeout 2\n    fall 2\n    rise 2\n",
        "    interval 1\n    timeout 1\n    fall 1\n    rise 1\n",
    );
    let mut pair: Vec<VrrpHost> = hosts
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            let name = HOST_NAMES[i];
            let ringway = start_ringway(ns, &["--drain-delay", &drain_delay()]);
            let conf = d.join(format!("keepalived-{name}.conf"));
            let priority = if i == 0 {
                "priority 150"
            } else {
                "priority 100"
            };
            fs::write(&conf, replaced(&template, "priority 150", priority)).unwrap();
            let file = |what: &str| d.join(format!("keepalived-{name}-{what}.pid"));
            let (main, vrrp, checkers) = (file("main"), file("vrrp"), file("checkers"));
            let keepalived = Daemon::start(
                ns,
                &format!("keepalived-{name}"),
                d,
                &[
                    "keepalived",
                    "--dont-fork",
                    "--log-console",
                    "--log-detail",
                    "--vrrp",
                    "--use-file",
                    conf.to_str().unwrap(),
                    "--pid",
                    main.to_str().unwrap(),
                    "--vrrp_pid",
                    vrrp.to_str().unwrap(),
                    "--checkers_pid",
                    checkers.to_str().unwrap(),
                ],
                &[],
            );
            VrrpHost {
                ringway: Some(ringway),
                keepalived,
            }
        })
        .collect();
    let logs = |pair: &[VrrpHost]| {
        pair.iter()
            .enumerate()
            .map(|(i, h)| {
                format!(
                    "--- keepalived {} ---\n{}\n",
                    HOST_NAMES[i],
                    h.keepalived.log()
                )
            })
            .collect::<String>()
    };

    // 1. One host takes the VIP; every connection goes through it.
    let mut holders = Vec::new();
    let held = wait_until(ROUTING_TIMEOUT, || {
        holders = vip_holders(&hosts);
        holders.len() == 1
    });
    assert!(held, "no single VIP holder: {holders:?}\n{}", logs(&pair));
    let active = holders[0];
    let backup = 1 - active;
    let seen = survey(&lan, &clients, 3);
    let mapping = one_backend_per_client(&seen);
    assert!(
        seen.values().flatten().all(|h| h.host == active),
        "a connection did not go through the VIP holder {}: {seen:?}",
        HOST_NAMES[active]
    );

    // 2. The active host's Ringway dies (SIGKILL: no drain, no goodbye) while clients keep
    //    opening connections.
    let load = Load::start(&lan, clients.clone());
    assert!(
        wait_until(ROUTING_TIMEOUT, || load.count() >= 50),
        "the load does not get going"
    );
    let mut dead = pair[active].ringway.take().unwrap();
    let killed = Instant::now();
    dead.signal(libc::SIGKILL);
    assert!(dead.wait_exit(Duration::from_secs(10)).is_some());
    let moved = wait_until(ROUTING_TIMEOUT, || vip_holders(&hosts) == [backup]);
    assert!(
        moved,
        "the VIP did not move to host {}\n{}",
        HOST_NAMES[backup],
        logs(&pair)
    );
    let vip_moved = Instant::now();
    assert!(
        wait_until(ROUTING_TIMEOUT, || load.count_since(vip_moved) >= 100),
        "the load stalled after the VIP moved"
    );
    let results = load.finish();
    let failed: Vec<&Attempt> = results.iter().filter(|r| r.outcome.is_err()).collect();
    let first_ok_after_kill = results
        .iter()
        .filter(|r| r.at >= killed && r.outcome.is_ok())
        .map(|r| r.done)
        .min()
        .expect("a connection succeeded after the kill");
    eprintln!(
        "fleet: VIP moved {:?} after the active Ringway was killed; the first connection \
         opened after the kill was served {:?} after it; {} of {} connections failed, none \
         after the move",
        vip_moved - killed,
        first_ok_after_kill - killed,
        failed.len(),
        results.len()
    );
    for Attempt {
        at, src, outcome, ..
    } in &results
    {
        match outcome {
            Ok(hop) => assert_eq!(hop.backend, mapping[src], "client {src} changed backend"),
            // Connections cut by the kill, and those the dead host refused until the move.
            Err(e) => assert!(
                *at <= vip_moved,
                "a connection failed after the VIP moved: {src}: {e}"
            ),
        }
        if *at > vip_moved {
            assert_eq!(outcome.as_ref().map(|h| h.host), Ok(backup));
        }
    }

    // 3. New connections succeed through the backup, each client on the same backend.
    let seen = survey(&lan, &clients, 3);
    assert!(seen.values().flatten().all(|h| h.host == backup));
    assert_eq!(
        one_backend_per_client(&seen),
        mapping,
        "the mapping changed"
    );
    pair[backup].keepalived.assert_running();
    pair[active].keepalived.assert_running();

    // 4. The failed host's Ringway returns: its keepalived is ready again (BACKUP) and, with
    //    nopreempt, leaves the VIP where it is.
    let entered_backup = |pair: &[VrrpHost]| {
        pair[active]
            .keepalived
            .log()
            .matches("Entering BACKUP STATE")
            .count()
    };
    let before = entered_backup(&pair);
    pair[active].ringway = Some(start_ringway(
        &hosts[active],
        &["--drain-delay", &drain_delay()],
    ));
    assert!(
        wait_until(ROUTING_TIMEOUT, || entered_backup(&pair) > before),
        "host {}'s keepalived did not return to BACKUP\n{}",
        HOST_NAMES[active],
        logs(&pair)
    );
    assert_eq!(
        vip_holders(&hosts),
        [backup],
        "the returning host took the VIP back"
    );

    // 5. A planned switch-over: SIGTERM on the holder with --drain-delay. /ready turns 503,
    //    keepalived moves the VIP, the holder keeps accepting meanwhile: no new connection is
    //    refused. Connections live at the move do not survive it (the address moves, with
    //    every packet for it).
    let holder = backup;
    let (src, mut on_holder) = lan
        .run(|| one_connection(clients[0]).map(|(hop, s)| (hop.host, s)))
        .map(|(host, s)| {
            assert_eq!(host, holder);
            (clients[0], s)
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let load = Load::start(&lan, clients.clone());
    assert!(
        wait_until(ROUTING_TIMEOUT, || load.count() >= 50),
        "the load does not get going"
    );
    let sigterm = Instant::now();
    pair[holder].ringway.as_ref().unwrap().signal(libc::SIGTERM);
    let moved = wait_until(ROUTING_TIMEOUT, || vip_holders(&hosts) == [active]);
    assert!(moved, "the VIP did not move back\n{}", logs(&pair));
    let vip_moved = Instant::now();
    assert!(
        wait_until(ROUTING_TIMEOUT, || load.count_since(vip_moved) >= 100),
        "the load stalled after the planned move"
    );
    let results = load.finish();
    let failed: Vec<&Attempt> = results.iter().filter(|r| r.outcome.is_err()).collect();
    let refused = failed
        .iter()
        .filter(|r| {
            r.outcome
                .as_ref()
                .is_err_and(|e| e.starts_with("connect from"))
        })
        .count();
    let live = lan.run(|| echo_roundtrip(&mut on_holder, b"after the move"));
    eprintln!(
        "fleet: planned VRRP move: VIP moved {:?} after SIGTERM (--drain-delay {}); \
         {} of {} new connections failed, {refused} of them refused; the old holder's live \
         flow of {src} after the move: {live:?}",
        vip_moved - sigterm,
        drain_delay(),
        failed.len(),
        results.len()
    );
    // None is refused: the holder accepts until the move. Only connections in flight at the
    // move, like the live flow, are cut.
    for r in &failed {
        let e = r.outcome.as_ref().unwrap_err();
        assert!(
            !e.starts_with("connect from") && r.at <= vip_moved,
            "a connection failed otherwise than by being cut at the move: {r:?}"
        );
    }
    for r in results.iter().filter(|r| r.outcome.is_ok()) {
        assert_eq!(
            r.outcome.as_ref().unwrap().backend,
            mapping[&r.src],
            "client {} changed backend",
            r.src
        );
    }
}
