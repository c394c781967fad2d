//! An impaired network for tests: client, proxy and backends each in a network namespace of
//! their own, joined through a fourth "wire" namespace that delays, jitters, drops, reorders and
//! duplicates packets on the way.
//!
//! ```text
//! client ns                  wire ns                       proxy ns
//! eth0 10.201.1.1 ── wc ⇄ [impair] ⇄ wpf ──────────────── eth0 10.201.1.2 (listens)
//!                                                          eth1 10.201.2.1 (connects from)
//! backend ns                                                 │
//! eth0 10.201.2.2 ── wb ⇄ [impair] ⇄ wpb ────────────────────┘
//! ```
//!
//! The kernel may lack `sch_netem` (this test machine does). Then the impairment is ours: a
//! thread per link holds an AF_PACKET (ETH_P_ALL) socket on each of the link's two wire-side veth
//! ends and forwards every frame it reads on one to the other through a time-ordered queue,
//! applying loss, delay + jitter, extra hold-back (reordering) and duplication per frame, from a
//! seeded generator. When `tc ... netem` works, the wire ends are bridged by the kernel instead
//! and netem does the same on each wire end's egress.
//!
//! For a user-space bridge to see real MTU-sized frames with real checksums, the veth ends must
//! not offload: with TX checksum offload a frame arrives with its TCP checksum not yet filled
//! in, and with TSO/GSO/GRO a "frame" can be a 64 KiB super-packet that cannot be re-sent. There
//! is no `ethtool` here, so offloads are switched off with the SIOCETHTOOL ioctl; the bridge
//! counts any frame longer than the MTU, and the test asserts it saw none.
//!
//! Namespaces are named from the pid and a counter (so parallel tests and runs do not collide)
//! and deleted on drop; a thread enters one with setns(2), and whatever it creates afterwards
//! (sockets, threads, child processes) lives there. Needs root and iproute2.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::netns::Netns;
use super::Rng;

/// Client side of the front link.
pub const CLIENT_IP: &str = "10.201.1.1";
/// The proxy's address on the front link (where it listens).
pub const PROXY_FRONT_IP: &str = "10.201.1.2";
/// The proxy's address on the back link (where its backend connections come from).
pub const PROXY_BACK_IP: &str = "10.201.2.1";
/// The backends' address.
pub const BACKEND_IP: &str = "10.201.2.2";

/// What the wire does to each IPv4 frame, in each direction of each link.
#[derive(Clone, Copy, Debug)]
pub struct Impairment {
    /// Fraction of frames dropped.
    pub loss: f64,
    /// Base one-way delay.
    pub delay: Duration,
    /// Each frame's delay is `delay` ± up to `jitter` (uniform).
    pub jitter: Duration,
    /// Fraction of frames held back an extra `reorder_hold`, so that later frames overtake them.
    pub reorder: f64,
    pub reorder_hold: Duration,
    /// Fraction of frames sent twice.
    pub duplicate: f64,
}

// ---------------------------------------------------------------------------------------------
// Commands and namespaces
// ---------------------------------------------------------------------------------------------

/// Runs a command to success, or panics with its output.
pub fn run(argv: &[&str]) {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {argv:?} (is iproute2 installed?): {e}"));
    assert!(
        out.status.success(),
        "{argv:?} failed ({}): {}{} (these tests need root for network namespaces)",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Runs a command; whether it succeeded.
fn try_run(argv: &[&str]) -> bool {
    Command::new(argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A value that must be dropped inside a namespace, e.g. a test `Backend`, whose drop connects
/// to its own listener to wake its accept thread (from outside the namespace that connect would
/// fail and the drop would hang). Dropped there even when the test panics.
pub struct NsBound<T: Send + 'static> {
    value: Option<T>,
    path: String,
}

impl<T: Send + 'static> NsBound<T> {
    pub fn new(ns: &Netns, value: T) -> NsBound<T> {
        NsBound {
            value: Some(value),
            path: ns.path(),
        }
    }
}

impl<T: Send + 'static> std::ops::Deref for NsBound<T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.value.as_ref().expect("present until dropped")
    }
}

impl<T: Send + 'static> Drop for NsBound<T> {
    fn drop(&mut self) {
        let value = self.value.take();
        let path = self.path.clone();
        let dropper = thread::spawn(move || {
            if let Ok(file) = File::open(&path) {
                // SAFETY: as in `Netns::enter`.
                unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            }
            drop(value);
        });
        let _ = dropper.join();
    }
}

// ---------------------------------------------------------------------------------------------
// Offloads off (SIOCETHTOOL, legacy per-feature commands)
// ---------------------------------------------------------------------------------------------

const ETHTOOL_STXCSUM: u32 = 0x17;
const ETHTOOL_SSG: u32 = 0x19;
const ETHTOOL_STSO: u32 = 0x1f;
const ETHTOOL_SGSO: u32 = 0x24;
const ETHTOOL_SGRO: u32 = 0x2c;

#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// `struct ifreq` with the `ifr_data` member of its union (40 bytes on 64-bit Linux).
#[repr(C)]
struct IfreqData {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    _pad: [u8; 16],
}

/// Switches off TX checksum offload, scatter-gather, TSO, GSO and GRO on interface `ifname` of
/// the calling thread's namespace.
fn offloads_off(ifname: &str) {
    // SAFETY: a plain socket(2) call; the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // GRO first and TX checksum last: the kernel drops SG and TSO itself once the checksum
    // offload they depend on is gone, and turning those off first just makes that explicit.
    for (cmd, what, required) in [
        (ETHTOOL_SGRO, "gro", false),
        (ETHTOOL_SGSO, "gso", true),
        (ETHTOOL_STSO, "tso", false),
        (ETHTOOL_SSG, "sg", false),
        (ETHTOOL_STXCSUM, "tx-checksum", true),
    ] {
        let mut value = EthtoolValue { cmd, data: 0 };
        let mut req = IfreqData {
            name: [0; libc::IFNAMSIZ],
            data: (&mut value as *mut EthtoolValue).cast(),
            _pad: [0; 16],
        };
        for (dst, src) in req.name.iter_mut().zip(ifname.bytes()) {
            *dst = src as libc::c_char;
        }
        // SAFETY: SIOCETHTOOL reads the ifreq (a NUL-terminated name and a pointer to an
        // ethtool_value that lives across the call) and writes only into the ethtool_value.
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL as _, &mut req) };
        if rc != 0 && required {
            panic!(
                "SIOCETHTOOL {what} off on {ifname}: {}",
                io::Error::last_os_error()
            );
        }
    }
}

/// The index of interface `ifname` in the calling thread's namespace.
fn ifindex(ifname: &str) -> i32 {
    let c = std::ffi::CString::new(ifname).unwrap();
    // SAFETY: if_nametoindex reads a NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert!(
        index != 0,
        "no interface {ifname}: {}",
        io::Error::last_os_error()
    );
    index as i32
}

// ---------------------------------------------------------------------------------------------
// The user-space impairing bridge
// ---------------------------------------------------------------------------------------------

const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
/// Longest frame the bridge expects: a 1500-byte MTU plus the Ethernet header.
const MAX_FRAME: usize = 1514;
const ETH_P_IP: u16 = 0x0800;

/// What a bridge did, over both directions of its link.
#[derive(Debug, Default)]
pub struct BridgeStats {
    pub frames_in: AtomicU64,
    pub forwarded: AtomicU64,
    pub dropped: AtomicU64,
    pub duplicated: AtomicU64,
    pub held_back: AtomicU64,
    /// Frames longer than the MTU: an offload was not switched off (the test fails on these).
    pub oversized: AtomicU64,
    /// Sends that failed (e.g. ENOBUFS): behave like loss, but are counted apart.
    pub send_errors: AtomicU64,
}

impl BridgeStats {
    pub fn summary(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "frames in {}, forwarded {}, dropped {}, duplicated {}, held back {}, oversized {}, \
             send errors {}",
            g(&self.frames_in),
            g(&self.forwarded),
            g(&self.dropped),
            g(&self.duplicated),
            g(&self.held_back),
            g(&self.oversized),
            g(&self.send_errors)
        )
    }
}

/// An AF_PACKET socket bound to one interface, non-blocking, that does not see what it sends.
fn packet_socket(ifname: &str) -> OwnedFd {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: a plain socket(2) call; the descriptor is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            proto as libc::c_int,
        )
    };
    assert!(fd >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads an int that lives across the call. Frames this socket sends
    // would otherwise come back to it as PACKET_OUTGOING copies (recv_frame filters them too).
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_PACKET,
            PACKET_IGNORE_OUTGOING,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        let size: libc::c_int = 4 << 20;
        // SAFETY: as above. Big buffers so that bursts are impaired by us, not by the socket.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value to fill in.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = ifindex(ifname);
    // SAFETY: bind reads a sockaddr_ll of the size given, which lives across the call.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "bind AF_PACKET to {ifname}: {}",
        io::Error::last_os_error()
    );
    sock
}

/// Reads one frame; `None` when nothing is waiting. Skips frames the host sent itself.
fn recv_frame(sock: &OwnedFd, buf: &mut [u8]) -> Option<usize> {
    loop {
        // SAFETY: sockaddr_ll is plain data.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: recvfrom writes at most buf.len() bytes into buf and at most `len` bytes
        // into `from`, both alive across the call.
        let n = unsafe {
            libc::recvfrom(
                sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_TRUNC,
                (&mut from as *mut libc::sockaddr_ll).cast(),
                &mut len,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return None,
                _ => panic!("AF_PACKET recv: {e}"),
            }
        }
        if from.sll_pkttype == libc::PACKET_OUTGOING {
            continue;
        }
        return Some(n as usize);
    }
}

fn send_frame(sock: &OwnedFd, frame: &[u8]) -> bool {
    // SAFETY: send reads frame.len() bytes from a slice alive across the call.
    let n = unsafe {
        libc::send(
            sock.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            libc::MSG_DONTWAIT,
        )
    };
    n == frame.len() as isize
}

/// A frame waiting in the queue: when it leaves, a tie-break, where it goes, the bytes.
type Queued = Reverse<(Instant, u64, usize, Vec<u8>)>;

/// Forwards frames between the two sockets until `stop`, impairing IPv4 frames.
fn bridge_loop(
    socks: [OwnedFd; 2],
    imp: Impairment,
    seed: u64,
    stop: Arc<AtomicBool>,
    stats: Arc<BridgeStats>,
) {
    let mut rng = Rng::new(seed);
    let mut unit = move || (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    let mut queue: BinaryHeap<Queued> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut buf = vec![0u8; 65536 + 64];
    while !stop.load(Ordering::Relaxed) {
        // Sleep in poll until a frame arrives or the next queued frame is due (at most 10 ms, so
        // `stop` is seen promptly).
        let now = Instant::now();
        let wait = queue
            .peek()
            .map(|Reverse((at, ..))| at.saturating_duration_since(now))
            .unwrap_or(Duration::from_millis(10))
            .min(Duration::from_millis(10));
        let mut fds = [
            libc::pollfd {
                fd: socks[0].as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: socks[1].as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: wait.as_nanos() as libc::c_long,
        };
        // SAFETY: ppoll reads and writes the two pollfds and reads the timespec, all alive
        // across the call; no signal mask is passed.
        unsafe { libc::ppoll(fds.as_mut_ptr(), 2, &ts, std::ptr::null()) };
        for (from, sock) in socks.iter().enumerate() {
            while let Some(n) = recv_frame(sock, &mut buf) {
                stats.frames_in.fetch_add(1, Ordering::Relaxed);
                if n > buf.len() || n > MAX_FRAME {
                    stats.oversized.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let frame = buf[..n].to_vec();
                let to = 1 - from;
                let now = Instant::now();
                let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
                if ethertype != ETH_P_IP {
                    // ARP and IPv6 housekeeping pass straight through: losing an ARP reply
                    // costs a 1 s neighbour retry and tests nothing about the proxy.
                    seq += 1;
                    queue.push(Reverse((now, seq, to, frame)));
                    continue;
                }
                if unit() < imp.loss {
                    stats.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let copies = if unit() < imp.duplicate {
                    stats.duplicated.fetch_add(1, Ordering::Relaxed);
                    2
                } else {
                    1
                };
                for _ in 0..copies {
                    let jitter = imp.jitter.as_secs_f64() * (2.0 * unit() - 1.0);
                    let mut delay = (imp.delay.as_secs_f64() + jitter).max(0.0);
                    if unit() < imp.reorder {
                        stats.held_back.fetch_add(1, Ordering::Relaxed);
                        delay += imp.reorder_hold.as_secs_f64();
                    }
                    seq += 1;
                    let at = now + Duration::from_secs_f64(delay);
                    queue.push(Reverse((at, seq, to, frame.clone())));
                }
            }
        }
        let now = Instant::now();
        while queue.peek().is_some_and(|Reverse((at, ..))| *at <= now) {
            let Reverse((_, _, to, frame)) = queue.pop().expect("peeked");
            if send_frame(&socks[to], &frame) {
                stats.forwarded.fetch_add(1, Ordering::Relaxed);
            } else {
                stats.send_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// A running bridge thread; stopped and joined on drop.
struct Bridge {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<BridgeStats>,
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The topology
// ---------------------------------------------------------------------------------------------

/// How the wire impairs packets on this machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The kernel's netem qdisc on each wire end, the ends bridged by the kernel.
    Netem,
    /// Our AF_PACKET bridge threads.
    PacketBridge,
}

/// The four namespaces and the impaired links between them. Drop order: bridges stop first,
/// then the namespaces go (which deletes the veth pairs in them).
pub struct ImpairedNet {
    bridges: Vec<Bridge>,
    pub mode: Mode,
    pub seed: u64,
    pub client: Netns,
    pub proxy: Netns,
    pub backend: Netns,
    pub wire: Netns,
}

impl ImpairedNet {
    pub fn new(imp: Impairment, seed: u64) -> ImpairedNet {
        let client = Netns::new("cli");
        let proxy = Netns::new("prx");
        let backend = Netns::new("bck");
        let wire = Netns::new("wire");
        // (wire-side end, endpoint namespace, endpoint interface, endpoint address)
        let ends = [
            ("wc", &client, "eth0", CLIENT_IP),
            ("wpf", &proxy, "eth0", PROXY_FRONT_IP),
            ("wpb", &proxy, "eth1", PROXY_BACK_IP),
            ("wb", &backend, "eth0", BACKEND_IP),
        ];
        for (wire_end, ns, ifname, ip) in ends {
            wire.ip(&[
                "link", "add", wire_end, "type", "veth", "peer", "name", ifname, "netns", &ns.name,
            ]);
            ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", ifname]);
            ns.ip(&["link", "set", ifname, "up"]);
            wire.ip(&["link", "set", wire_end, "up"]);
        }
        let mode = if Self::netem_works(&wire, imp) {
            Mode::Netem
        } else {
            Mode::PacketBridge
        };
        let mut net = ImpairedNet {
            bridges: Vec::new(),
            mode,
            seed,
            client,
            proxy,
            backend,
            wire,
        };
        match mode {
            Mode::Netem => net.bridge_with_netem(imp),
            Mode::PacketBridge => net.bridge_in_user_space(imp, seed),
        }
        net
    }

    /// Whether this kernel has netem: try it on a wire end (and leave it there if it works).
    fn netem_works(wire: &Netns, imp: Impairment) -> bool {
        try_run_strings(&netem_argv(&wire.name, "wc", imp))
    }

    fn bridge_with_netem(&mut self, imp: Impairment) {
        for end in ["wpf", "wpb", "wb"] {
            let argv = netem_argv(&self.wire.name, end, imp);
            run(&argv.iter().map(String::as_str).collect::<Vec<_>>());
        }
        for (br, a, b) in [("brf", "wc", "wpf"), ("brb", "wpb", "wb")] {
            self.wire.ip(&["link", "add", br, "type", "bridge"]);
            self.wire.ip(&["link", "set", a, "master", br]);
            self.wire.ip(&["link", "set", b, "master", br]);
            self.wire.ip(&["link", "set", br, "up"]);
        }
    }

    fn bridge_in_user_space(&mut self, imp: Impairment, seed: u64) {
        // Offloads off on both ends of every veth, each in its own namespace.
        for (ns, ifnames) in [
            (&self.client, &["eth0"][..]),
            (&self.proxy, &["eth0", "eth1"][..]),
            (&self.backend, &["eth0"][..]),
            (&self.wire, &["wc", "wpf", "wpb", "wb"][..]),
        ] {
            let ifnames: Vec<String> = ifnames.iter().map(|s| s.to_string()).collect();
            ns.run(move || ifnames.iter().for_each(|i| offloads_off(i)));
        }
        for (i, (a, b)) in [("wc", "wpf"), ("wpb", "wb")].into_iter().enumerate() {
            // The sockets are made in the wire namespace and stay bound to it; the thread that
            // uses them can live anywhere.
            let socks = self.wire.run(move || [packet_socket(a), packet_socket(b)]);
            let stop = Arc::new(AtomicBool::new(false));
            let stats = Arc::new(BridgeStats::default());
            let link_seed = seed ^ (0x9E37_79B9 * (i as u64 + 1));
            let thread = {
                let (stop, stats) = (stop.clone(), stats.clone());
                thread::Builder::new()
                    .name(format!("impair-{a}-{b}"))
                    .spawn(move || bridge_loop(socks, imp, link_seed, stop, stats))
                    .expect("spawn a bridge thread")
            };
            self.bridges.push(Bridge {
                stop,
                thread: Some(thread),
                stats,
            });
        }
    }

    /// Statistics of the user-space bridges: front link, back link (empty with netem).
    pub fn bridge_stats(&self) -> Vec<Arc<BridgeStats>> {
        self.bridges.iter().map(|b| b.stats.clone()).collect()
    }

    /// One line per link, for messages.
    pub fn summary(&self) -> String {
        match self.mode {
            Mode::Netem => format!("netem (seed {} is not used by netem)", self.seed),
            Mode::PacketBridge => self
                .bridges
                .iter()
                .zip(["client-proxy", "proxy-backend"])
                .map(|(b, name)| format!("{name}: {}", b.stats.summary()))
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
}

/// `ip netns exec WIRE tc qdisc add dev END root netem ...` for `imp`.
fn netem_argv(wire: &str, end: &str, imp: Impairment) -> Vec<String> {
    let ms = |d: Duration| format!("{}ms", d.as_secs_f64() * 1000.0);
    let pct = |f: f64| format!("{}%", f * 100.0);
    [
        "ip", "netns", "exec", wire, "tc", "qdisc", "add", "dev", end, "root", "netem", "delay",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        ms(imp.delay),
        ms(imp.jitter),
        "loss".into(),
        pct(imp.loss),
        "duplicate".into(),
        pct(imp.duplicate),
        "reorder".into(),
        pct(imp.reorder),
    ])
    .collect()
}

fn try_run_strings(argv: &[String]) -> bool {
    let v: Vec<&str> = argv.iter().map(String::as_str).collect();
    try_run(&v)
}
