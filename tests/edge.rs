//! Edge features seen from outside, against the real binary on loopback:
//!
//! - `--send-proxy v1|v2` against a real PROXY protocol peer: nginx, started by the test with
//!   its own configuration, pid file and logs in a temporary directory (never the system's
//!   nginx). A client bound to 127.0.0.9, or on ::1, must be reported back with its own address
//!   and port; an IPv4 client in front of an IPv6 nginx too (mapped address).
//! - `--accept-proxy` / `--trusted-proxy` / `--proxy-header-timeout`: the header is stripped,
//!   the flow is hashed by the address the header names (compared with `--show-mapping`), v1
//!   and v2 (built here by hand, with TLVs and IPv6), bytes that arrive with the header are
//!   kept, a header in pieces is reassembled; malformed, truncated and untrusted headers close
//!   their own flow and nothing else; the header's address is the client for `--deny` and
//!   `--max-conns-per-source`; bad edge flags exit 2.
//! - `--allow` / `--deny`: refused at accept, before any backend connect; longest prefix wins;
//!   IPv6 rules; IPv4 clients on a dual-stack `[::]` listener match IPv4 rules.
//! - `--max-conns-per-source`.
//! - A flood of idle connections against a proxy started under `ulimit -n 1024` (at
//!   `--max-conns`, and beyond what the open-file limit allows): open flows keep working, the
//!   proxy does not spin, logs stay bounded, and it serves again after the flood.
//! - Socket options visible with `ss` (iproute2): `--listen-backlog`, `--tcp-keepalive`.
//!
//! `--source` needs its own network namespace: see tests/edge_netns.rs.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const V6_LOCALHOST: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

/// Numbers temporary directories of this process.
static UNIQUE: AtomicUsize = AtomicUsize::new(0);

fn args(listen: &str, backends: &[&Backend], extra: &[&str]) -> Vec<String> {
    let mut v = vec!["--listen".to_string(), listen.to_string()];
    for b in backends {
        v.push("--backend".into());
        v.push(b.arg());
    }
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// Expects the proxy to close `stream` without sending it a byte (so no backend greeted it).
fn expect_refused(stream: &mut TcpStream, what: &str, proxy: &Proxy) {
    if let Err(e) = expect_closed(stream, Duration::from_secs(5)) {
        panic!(
            "{what}: should have been closed at once: {e}\n{}",
            proxy.stderr_tail()
        );
    }
}

/// Connects from `src` and expects the proxy to close the connection without a byte.
fn refused_from(proxy: &Proxy, src: IpAddr, what: &str) {
    let mut s =
        connect_from(src, proxy.addr).unwrap_or_else(|e| panic!("{what}: connect from {src}: {e}"));
    expect_refused(&mut s, what, proxy);
}

// ---------------------------------------------------------------------------------------------
// PROXY headers built by hand (independently of src/proxy_protocol.rs)
// ---------------------------------------------------------------------------------------------

const V2_SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

fn v1_header(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
    .into_bytes()
}

/// A v2 PROXY command header; `tlvs` are appended after the addresses (and counted in the
/// length, as the spec requires).
fn v2_header(src: SocketAddr, dst: SocketAddr, tlvs: &[u8]) -> Vec<u8> {
    let mut addrs = Vec::new();
    let family = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            addrs.extend_from_slice(&s.octets());
            addrs.extend_from_slice(&d.octets());
            0x11
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            addrs.extend_from_slice(&s.octets());
            addrs.extend_from_slice(&d.octets());
            0x21
        }
        _ => panic!("mixed families in a hand-made header"),
    };
    addrs.extend_from_slice(&src.port().to_be_bytes());
    addrs.extend_from_slice(&dst.port().to_be_bytes());
    addrs.extend_from_slice(tlvs);
    let mut h = V2_SIG.to_vec();
    h.push(0x21); // version 2, PROXY
    h.push(family);
    h.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
    h.extend_from_slice(&addrs);
    h
}

/// Two TLVs of the kinds load balancers add: PP2_TYPE_AUTHORITY and PP2_TYPE_NOOP.
fn some_tlvs() -> Vec<u8> {
    let mut t = vec![0x02];
    t.extend_from_slice(&11u16.to_be_bytes());
    t.extend_from_slice(b"example.com");
    t.push(0x04);
    t.extend_from_slice(&3u16.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0]);
    t
}

fn dst_for(src: SocketAddr) -> SocketAddr {
    if src.is_ipv4() {
        "198.51.100.1:443".parse().unwrap()
    } else {
        "[2001:db8::1]:443".parse().unwrap()
    }
}

/// `ringway --show-mapping` for `clients` with these arguments (no `--listen`): client -> name.
fn show_mapping(argv: &[String], clients: &[IpAddr]) -> BTreeMap<IpAddr, String> {
    let mut argv = argv.to_vec();
    for c in clients {
        argv.push("--show-mapping".into());
        argv.push(c.to_string());
    }
    let out = run_to_exit(&argv, Duration::from_secs(20));
    assert_eq!(
        out.status.code(),
        Some(0),
        "ringway {argv:?}: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    let map: BTreeMap<IpAddr, String> = out
        .stdout
        .lines()
        .map(|l| {
            let (c, b) = l
                .split_once(" -> ")
                .unwrap_or_else(|| panic!("not `ADDR -> BACKEND`: {l:?}\n{}", out.stdout));
            let c = c.trim();
            let ip = c
                .parse::<IpAddr>()
                .or_else(|_| c.parse::<SocketAddr>().map(|a| a.ip()))
                .unwrap_or_else(|_| panic!("client {c:?} in {l:?}"));
            (ip, b.trim().to_string())
        })
        .collect();
    assert_eq!(
        map.len(),
        clients.len(),
        "--show-mapping printed:\n{}",
        out.stdout
    );
    map
}

// ---------------------------------------------------------------------------------------------
// nginx as a real PROXY protocol peer
// ---------------------------------------------------------------------------------------------

fn nginx_binary() -> PathBuf {
    for p in [
        "/usr/sbin/nginx",
        "/usr/local/sbin/nginx",
        "/usr/local/nginx/sbin/nginx",
    ] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            if dir.join("nginx").exists() {
                return dir.join("nginx");
            }
        }
    }
    panic!("nginx is not installed: these tests need it as a PROXY protocol peer (Debian: apt-get install nginx)");
}

/// A free TCP port on `ip` (bound once, then released; nginx cannot take port 0).
fn free_port(ip: IpAddr) -> u16 {
    TcpListener::bind(SocketAddr::new(ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A private nginx (one process, no master, no daemon) whose HTTP server on 127.0.0.1 and ::1
/// expects a PROXY header and answers with the address and port the header named.
struct Nginx {
    child: Child,
    dir: PathBuf,
    v4: SocketAddr,
    v6: SocketAddr,
}

impl Nginx {
    fn start() -> Nginx {
        let binary = nginx_binary();
        let mut last_error = String::new();
        // A port released by free_port() may be taken by someone else before nginx binds it:
        // try a few times.
        for _ in 0..5 {
            let dir = std::env::temp_dir().join(format!(
                "ringway-edge-nginx-{}-{}",
                std::process::id(),
                UNIQUE.fetch_add(1, Ordering::SeqCst)
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            let v4 = SocketAddr::new(
                "127.0.0.1".parse().unwrap(),
                free_port("127.0.0.1".parse().unwrap()),
            );
            let v6 = SocketAddr::new(V6_LOCALHOST, free_port(V6_LOCALHOST));
            let d = dir.display();
            // As root nginx would look up the `nobody` user for worker processes; there are
            // none (master_process off), so name root to avoid depending on that account.
            // SAFETY: geteuid has no preconditions.
            let user = if unsafe { libc::geteuid() } == 0 {
                "user root;"
            } else {
                ""
            };
            let conf = format!(
                "{user}
daemon off;
master_process off;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    default_type text/plain;
    server {{
        listen {v4} proxy_protocol;
        listen {v6} proxy_protocol;
        location / {{ return 200 \"$proxy_protocol_addr $proxy_protocol_port\\n\"; }}
    }}
}}
"
            );
            fs::write(dir.join("nginx.conf"), conf).unwrap();
            let out = fs::File::create(dir.join("stdout.log")).unwrap();
            let err = fs::File::create(dir.join("stderr.log")).unwrap();
            let mut child = Command::new(&binary)
                .arg("-p")
                .arg(&dir)
                .arg("-c")
                .arg(dir.join("nginx.conf"))
                .arg("-e")
                .arg(dir.join("error.log"))
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", binary.display()));
            let ready = wait_until(Duration::from_secs(15), || {
                matches!(child.try_wait(), Ok(Some(_)))
                    || (TcpStream::connect_timeout(&v4, Duration::from_secs(1)).is_ok()
                        && TcpStream::connect_timeout(&v6, Duration::from_secs(1)).is_ok())
            });
            let log = format!(
                "{}{}",
                fs::read_to_string(dir.join("stderr.log")).unwrap_or_default(),
                fs::read_to_string(dir.join("error.log")).unwrap_or_default()
            );
            match child.try_wait() {
                Ok(None) if ready => return Nginx { child, dir, v4, v6 },
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_error = format!("nginx did not listen within 15 s:\n{log}");
                }
                status => {
                    last_error = format!("nginx exited ({status:?}):\n{log}");
                }
            }
            let _ = fs::remove_dir_all(&dir);
            if !last_error.contains("Address already in use") {
                break;
            }
        }
        panic!("{last_error}");
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // Child::kill is kill(pid, SIGKILL) on our own unreaped child.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("--- nginx error.log ---\n{}", self.log());
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Sends an HTTP/1.0 request through the proxy from `src` and returns the body nginx sent
/// (what it read from the PROXY header) and the client's own address.
fn ask_nginx(proxy: &Proxy, src: IpAddr) -> (String, SocketAddr) {
    let mut s = connect_from(src, proxy.addr)
        .unwrap_or_else(|e| panic!("connect from {src} to {}: {e}", proxy.addr));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let me = s.local_addr().unwrap();
    s.write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
        .unwrap();
    let mut response = Vec::new();
    if let Err(e) = s.read_to_end(&mut response) {
        panic!(
            "reading nginx's answer via {}: {e} (got {:?})\n{}",
            proxy.addr,
            String::from_utf8_lossy(&response),
            proxy.stderr_tail()
        );
    }
    let text = String::from_utf8_lossy(&response).into_owned();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(head, body)| {
            assert!(head.starts_with("HTTP/1.1 200"), "nginx answered:\n{text}");
            body.trim().to_string()
        })
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}\n{}", proxy.stderr_tail()));
    (body, me)
}

fn send_proxy_to_nginx(version: &str) {
    let nginx = Nginx::start();
    let v4_client: IpAddr = "127.0.0.9".parse().unwrap();
    let cases = [
        ("IPv4", "127.0.0.1:0", nginx.v4, v4_client),
        ("IPv6", "[::1]:0", nginx.v6, V6_LOCALHOST),
        (
            "IPv4 client, IPv6 backend",
            "127.0.0.1:0",
            nginx.v6,
            v4_client,
        ),
    ];
    for (what, listen, backend, client) in cases {
        let argv = [
            "--listen",
            listen,
            "--backend",
            &backend.to_string(),
            "--send-proxy",
            version,
        ];
        let proxy = Proxy::start(&argv);
        for _ in 0..3 {
            let (body, me) = ask_nginx(&proxy, client);
            let expected = format!("{} {}", me.ip(), me.port());
            let mapped = format!("::ffff:{} {}", me.ip(), me.port());
            assert!(
                body == expected || (backend.is_ipv6() && me.is_ipv4() && body == mapped),
                "{what}, --send-proxy {version}: nginx saw the client as {body:?}, it is {me}\n{}\n--- nginx ---\n{}",
                proxy.stderr_tail(),
                nginx.log()
            );
        }
    }
}

#[test]
fn send_proxy_v1_tells_nginx_the_real_client() {
    send_proxy_to_nginx("v1");
}

#[test]
fn send_proxy_v2_tells_nginx_the_real_client() {
    send_proxy_to_nginx("v2");
}

// ---------------------------------------------------------------------------------------------
// --accept-proxy
// ---------------------------------------------------------------------------------------------

/// Sends `header` and `payload` in one write, then expects the Hello backend's greeting and
/// the echo of exactly `payload`; half-closes and expects EOF. Returns the backend's name.
fn through_with_header(
    proxy: &Proxy,
    from: IpAddr,
    header: &[u8],
    payload: &[u8],
) -> Result<String, String> {
    let mut s = connect_from(from, proxy.addr).map_err(|e| format!("connect: {e}"))?;
    let mut first = header.to_vec();
    first.extend_from_slice(payload);
    s.write_all(&first).map_err(|e| format!("write: {e}"))?;
    let name = read_line(&mut s)?;
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back)
        .map_err(|e| format!("reading the echo of {} bytes: {e}", payload.len()))?;
    if back != payload {
        return Err(format!(
            "echo differs: sent {:?}, got {:?}",
            String::from_utf8_lossy(payload),
            String::from_utf8_lossy(&back)
        ));
    }
    s.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .map_err(|e| format!("after the echo: {e}"))?;
    if !rest.is_empty() {
        return Err(format!(
            "{} unexpected bytes after the echo: {:?}",
            rest.len(),
            String::from_utf8_lossy(&rest)
        ));
    }
    Ok(name)
}

#[test]
fn accept_proxy_strips_the_header_and_hashes_by_the_named_client() {
    let backends: Vec<Backend> = (0..4).map(|i| Backend::hello(&format!("b{i}"))).collect();
    let name_of: BTreeMap<String, String> = backends
        .iter()
        .enumerate()
        .map(|(i, b)| (b.arg(), format!("b{i}")))
        .collect();
    let refs: Vec<&Backend> = backends.iter().collect();
    let flags = ["--accept-proxy", "--trusted-proxy", "127.0.0.0/8"];
    let proxy = Proxy::start(&args("127.0.0.1:0", &refs, &flags));

    let named: Vec<SocketAddr> = [
        "192.0.2.7:40001",
        "198.51.100.23:5555",
        "203.0.113.9:1234",
        "10.1.2.3:999",
        "172.16.5.4:80",
        "100.64.1.1:22",
        "192.0.2.200:65535",
        "[2001:db8::7]:4000",
        "[2001:db8:ffff::42]:1",
        "[fd00::1]:7",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    let peer: IpAddr = "127.0.0.1".parse().unwrap();
    let mut ips: Vec<IpAddr> = named.iter().map(|a| a.ip()).collect();
    ips.push(peer);
    let mapping_argv: Vec<String> = args("127.0.0.1:0", &refs, &flags)[2..].to_vec();
    let expected = show_mapping(&mapping_argv, &ips);

    let mut served = BTreeSet::new();
    for (i, &client) in named.iter().enumerate() {
        let payload = format!("payload {i} from {client}\n").into_bytes();
        for (version, header) in [
            ("v1", v1_header(client, dst_for(client))),
            ("v2", v2_header(client, dst_for(client), &[])),
            (
                "v2 with TLVs",
                v2_header(client, dst_for(client), &some_tlvs()),
            ),
        ] {
            let name = through_with_header(&proxy, peer, &header, &payload).unwrap_or_else(|e| {
                panic!(
                    "{version} header naming {client}: {e}\n{}",
                    proxy.stderr_tail()
                )
            });
            let want = &name_of[&expected[&client.ip()]];
            assert_eq!(
                &name, want,
                "{version} header naming {client}: served by {name}, --show-mapping says {want}\n{}",
                proxy.stderr_tail()
            );
            served.insert(name.clone());
            // The backend received exactly the payload: not a byte of the header.
            let b = &backends[name[1..].parse::<usize>().unwrap()];
            match b.next_event(CLOSE_TIMEOUT) {
                Some(Event::Closed { received, .. }) => assert_eq!(
                    received,
                    payload.len() as u64,
                    "{version} header naming {client}: backend {name} received {received} bytes for a {}-byte payload",
                    payload.len()
                ),
                other => panic!("{version} header naming {client}: backend event {other:?}"),
            }
        }
    }
    let peer_backend = &name_of[&expected[&peer]];
    assert!(
        served.len() >= 2 && served.iter().any(|n| n != peer_backend),
        "every named client went to {served:?}, where the peer 127.0.0.1 maps: the header's address is not what is hashed"
    );
}

#[test]
fn accept_proxy_unknown_and_local_headers_use_the_real_peer() {
    let backends: Vec<Backend> = (0..4).map(|i| Backend::hello(&format!("b{i}"))).collect();
    let name_of: BTreeMap<String, String> = backends
        .iter()
        .enumerate()
        .map(|(i, b)| (b.arg(), format!("b{i}")))
        .collect();
    let refs: Vec<&Backend> = backends.iter().collect();
    let argv = args(
        "127.0.0.1:0",
        &refs,
        &["--accept-proxy", "--trusted-proxy", "127.0.0.0/8"],
    );
    let proxy = Proxy::start(&argv);
    let peers: Vec<IpAddr> = (40..46).map(client_ip).collect();
    let expected = show_mapping(&argv[2..], &peers);
    let mut local = V2_SIG.to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0, 0]);
    for &peer in &peers {
        for (what, header) in [
            ("v1 UNKNOWN", b"PROXY UNKNOWN\r\n".to_vec()),
            ("v2 LOCAL", local.clone()),
        ] {
            let name = through_with_header(&proxy, peer, &header, b"hi\n")
                .unwrap_or_else(|e| panic!("{what} from {peer}: {e}\n{}", proxy.stderr_tail()));
            assert_eq!(
                name, name_of[&expected[&peer]],
                "{what} from {peer}: not hashed by the real peer"
            );
        }
    }
}

#[test]
fn accept_proxy_keeps_bytes_that_come_with_the_header() {
    let echo = Backend::echo();
    let proxy = Proxy::start(&args(
        "127.0.0.1:0",
        &[&echo],
        &["--accept-proxy", "--trusted-proxy", "127.0.0.0/8"],
    ));
    let client: SocketAddr = "192.0.2.7:40000".parse().unwrap();
    let v6client: SocketAddr = "[2001:db8::7]:40000".parse().unwrap();
    let headers = [
        ("v1", v1_header(client, dst_for(client))),
        ("v1 IPv6", v1_header(v6client, dst_for(v6client))),
        ("v2", v2_header(client, dst_for(client), &some_tlvs())),
        ("v2 IPv6", v2_header(v6client, dst_for(v6client), &[])),
    ];
    for (key, (what, header)) in headers.iter().enumerate() {
        // Small payload: header and payload in one segment. Large payload: more than the
        // proxy's header buffer arrives in the first read.
        for len in [1u64, 200, 100_000] {
            let key = 1000 + key as u64 * 10 + len;
            let mut s = connect(proxy.addr).unwrap();
            let mut first = header.clone();
            first.extend_from_slice(&pattern_vec(key, len as usize));
            let mut rd = s.try_clone().unwrap();
            let reader = thread::spawn(move || read_pattern_to_eof(&mut rd, key, len));
            s.write_all(&first).unwrap();
            s.shutdown(Shutdown::Write).unwrap();
            reader.join().unwrap().unwrap_or_else(|e| {
                panic!(
                    "{what} header + {len} bytes in one write: {e}\n{}",
                    proxy.stderr_tail()
                )
            });
        }
        // The header in pieces (separate segments: TCP_NODELAY), the payload after it.
        let mut s = connect(proxy.addr).unwrap();
        s.set_nodelay(true).unwrap();
        let cuts = [1, 5, header.len() / 2, header.len() - 1];
        let mut at = 0;
        for cut in cuts {
            s.write_all(&header[at..cut]).unwrap();
            at = cut;
        }
        s.write_all(&header[at..]).unwrap();
        echo_roundtrip(&mut s, b"after a header in pieces")
            .unwrap_or_else(|e| panic!("{what} header in pieces: {e}\n{}", proxy.stderr_tail()));
    }
}

/// A proxy in front of a Hello("only") backend that reads PROXY headers from loopback peers.
fn header_reading_proxy(backend: &Backend, header_timeout: &str) -> Proxy {
    Proxy::start(&args(
        "127.0.0.1:0",
        &[backend],
        &[
            "--accept-proxy",
            "--trusted-proxy",
            "127.0.0.0/8",
            "--proxy-header-timeout",
            header_timeout,
        ],
    ))
}

/// Opens a flow with a valid header and checks it is served.
fn good_header_flow(proxy: &Proxy, v2: bool) -> TcpStream {
    let named: SocketAddr = "192.0.2.7:1111".parse().unwrap();
    let header = if v2 {
        v2_header(named, dst_for(named), &[])
    } else {
        v1_header(named, dst_for(named))
    };
    let mut s = connect(proxy.addr).unwrap();
    s.write_all(&header).unwrap();
    let greeting = read_line(&mut s)
        .unwrap_or_else(|e| panic!("good header flow: {e}\n{}", proxy.stderr_tail()));
    assert_eq!(greeting, "only");
    echo_roundtrip(&mut s, b"good").unwrap();
    s
}

/// Bytes that cannot start a valid header: refused as soon as they arrive (well before the
/// 20 s header timeout), while a good flow carries on.
#[test]
fn malformed_proxy_headers_close_only_their_own_flow_at_once() {
    let backend = Backend::hello("only");
    let proxy = header_reading_proxy(&backend, "20s");
    let mut good = good_header_flow(&proxy, false);

    let named: SocketAddr = "192.0.2.7:1111".parse().unwrap();
    let mut bad_v2_version = v2_header(named, dst_for(named), &[]);
    bad_v2_version[12] = 0x31;
    let mut bad_v2_family = v2_header(named, dst_for(named), &[]);
    bad_v2_family[13] = 0x51;
    let mut long_v1 = b"PROXY TCP6 ".to_vec();
    long_v1.extend(std::iter::repeat_n(b'1', 120));
    let malformed: Vec<(&str, Vec<u8>)> = vec![
        (
            "HTTP instead of a header",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        (
            "v1 with a bad address",
            b"PROXY TCP4 192.0.2.300 198.51.100.1 1 2\r\n".to_vec(),
        ),
        (
            "v1 with a bad port",
            b"PROXY TCP4 192.0.2.3 198.51.100.1 70000 2\r\nhi".to_vec(),
        ),
        (
            "v1 TCP4 with IPv6 addresses",
            b"PROXY TCP4 ::1 ::1 1 2\r\n".to_vec(),
        ),
        (
            "v1 with LF only",
            b"PROXY TCP4 192.0.2.3 198.51.100.1 1 2\n".to_vec(),
        ),
        ("v1 longer than 107 bytes", long_v1),
        ("v2 with version 3", bad_v2_version),
        ("v2 with an undefined family", bad_v2_family),
    ];
    for (what, bytes) in &malformed {
        let mut s = connect(proxy.addr).unwrap();
        s.write_all(bytes).unwrap();
        // expect_refused waits 5 s at most: far less than the 20 s header timeout.
        expect_refused(&mut s, what, &proxy);
    }
    echo_roundtrip(&mut good, b"after").unwrap_or_else(|e| {
        panic!(
            "the good flow after the bad headers: {e}\n{}",
            proxy.stderr_tail()
        )
    });
    let mut again = good_header_flow(&proxy, true);
    echo_roundtrip(&mut again, b"new").unwrap();
    assert_eq!(
        backend.accepted(),
        2,
        "only the two good flows may reach the backend\n{}",
        proxy.stderr_tail()
    );
    proxy_still_running(vec![good, again], proxy);
}

/// A header that stops half-way (or never starts) is closed by --proxy-header-timeout, not
/// before, while a good flow carries on.
#[test]
fn incomplete_proxy_headers_close_only_their_own_flow_at_the_timeout() {
    let backend = Backend::hello("only");
    let proxy = header_reading_proxy(&backend, "500ms");
    let mut good = good_header_flow(&proxy, true);
    let named: SocketAddr = "192.0.2.7:1111".parse().unwrap();
    let truncated: Vec<(&str, Vec<u8>)> = vec![
        ("nothing at all", Vec::new()),
        ("half a v1 header", b"PROXY TCP4 192.0.2.7 ".to_vec()),
        ("a v2 signature only", V2_SIG.to_vec()),
        (
            "a v2 header missing its addresses",
            v2_header(named, dst_for(named), &[])[..20].to_vec(),
        ),
    ];
    for (what, bytes) in &truncated {
        let mut s = connect(proxy.addr).unwrap();
        let start = Instant::now();
        s.write_all(bytes).unwrap();
        expect_refused(&mut s, what, &proxy);
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(400),
            "{what}: closed after {took:?}, before --proxy-header-timeout 500ms"
        );
    }
    echo_roundtrip(&mut good, b"after").unwrap_or_else(|e| {
        panic!(
            "the good flow after the incomplete headers: {e}\n{}",
            proxy.stderr_tail()
        )
    });
    let mut again = good_header_flow(&proxy, false);
    echo_roundtrip(&mut again, b"new").unwrap();
    assert_eq!(
        backend.accepted(),
        2,
        "only the two good flows may reach the backend"
    );
    proxy_still_running(vec![good, again], proxy);
}

/// Closes the test's flows, then checks the proxy is still alive (before it is dropped: a
/// proxy told to stop with flows open would wait for them).
fn proxy_still_running(flows: Vec<TcpStream>, mut proxy: Proxy) {
    drop(flows);
    proxy.assert_running();
}

#[test]
fn headers_from_untrusted_peers_are_refused() {
    let backend = Backend::hello("b");
    let named: SocketAddr = "192.0.2.7:1111".parse().unwrap();
    let header = v1_header(named, dst_for(named));

    // No loopback address is trusted: every flow is refused, whatever it sends.
    let proxy = Proxy::start(&args(
        "127.0.0.1:0",
        &[&backend],
        &["--accept-proxy", "--trusted-proxy", "10.0.0.0/8"],
    ));
    for (what, bytes) in [
        ("a valid header", header.clone()),
        ("no header", Vec::new()),
    ] {
        let mut s = connect(proxy.addr).unwrap();
        let _ = s.write_all(&bytes);
        expect_refused(&mut s, &format!("untrusted peer sending {what}"), &proxy);
    }
    drop(proxy);
    assert_eq!(
        backend.accepted(),
        0,
        "an untrusted peer reached the backend"
    );

    // One trusted loopback address among untrusted ones: only its flows pass.
    let proxy = Proxy::start(&args(
        "127.0.0.1:0",
        &[&backend],
        &[
            "--accept-proxy",
            "--trusted-proxy",
            "10.0.0.0/8",
            "--trusted-proxy",
            "127.0.0.2/32",
        ],
    ));
    let mut good = connect_from(client_ip(2), proxy.addr).unwrap();
    good.write_all(&header).unwrap();
    assert_eq!(read_line(&mut good).unwrap(), "b");
    let mut bad = connect_from(client_ip(3), proxy.addr).unwrap();
    // The proxy may already have closed it: a failed write is fine, a served flow is not.
    let _ = bad.write_all(&[header.as_slice(), b"payload"].concat());
    expect_refused(&mut bad, "header from untrusted 127.0.0.3", &proxy);
    echo_roundtrip(&mut good, b"still here").unwrap();
    assert_eq!(backend.accepted(), 1);
}

#[test]
fn the_header_address_is_the_client_for_deny_and_per_source_limits() {
    let backend = Backend::hello("b");
    let proxy = Proxy::start(&args(
        "127.0.0.1:0",
        &[&backend],
        &[
            "--accept-proxy",
            "--trusted-proxy",
            "127.0.0.0/8",
            "--deny",
            "192.0.2.0/24",
            "--max-conns-per-source",
            "1",
        ],
    ));
    let open_with = |named: &str| {
        let named: SocketAddr = named.parse().unwrap();
        let mut s = connect(proxy.addr).unwrap();
        s.write_all(&v2_header(named, dst_for(named), &[])).unwrap();
        s
    };
    let mut denied = open_with("192.0.2.7:1");
    expect_refused(&mut denied, "header naming denied 192.0.2.7", &proxy);

    let mut first = open_with("198.51.100.5:1");
    assert_eq!(read_line(&mut first).unwrap(), "b");
    // Same peer (127.0.0.1), same named client: over the per-source limit of 1.
    let mut second = open_with("198.51.100.5:2");
    expect_refused(&mut second, "second flow naming 198.51.100.5", &proxy);
    // Same peer, another named client: its own budget.
    let mut other = open_with("198.51.100.6:1");
    assert_eq!(read_line(&mut other).unwrap(), "b");
    echo_roundtrip(&mut first, b"1").unwrap();
    echo_roundtrip(&mut other, b"2").unwrap();
    assert_eq!(backend.accepted(), 2);
}

#[test]
fn bad_edge_flags_exit_2_naming_the_flag() {
    let base = ["--listen", "127.0.0.1:0", "--backend", "127.0.0.1:9"];
    let cases: &[(&[&str], &str)] = &[
        (&["--accept-proxy"], "--accept-proxy"),
        (
            &["--accept-proxy", "--trusted-proxy", "10.0.0.0/33"],
            "--trusted-proxy",
        ),
        (&["--send-proxy", "v3"], "--send-proxy"),
        (&["--allow", "nonsense"], "--allow"),
        (&["--deny", "127.0.0.1/40"], "--deny"),
        (&["--max-conns-per-source", "0"], "--max-conns-per-source"),
        (&["--tcp-keepalive", "30s"], "--tcp-keepalive"),
        (&["--listen-backlog", "0"], "--listen-backlog"),
        (&["--source", "127.0.0.300"], "--source"),
        (
            &[
                "--accept-proxy",
                "--trusted-proxy",
                "127.0.0.0/8",
                "--proxy-header-timeout",
                "0",
            ],
            "--proxy-header-timeout",
        ),
    ];
    for (extra, flag) in cases {
        let mut argv: Vec<&str> = base.to_vec();
        argv.extend_from_slice(extra);
        let out = run_to_exit(&argv, Duration::from_secs(20));
        assert_eq!(
            out.status.code(),
            Some(2),
            "{argv:?}: expected exit status 2, got {}\nstderr:\n{}",
            out.status,
            out.stderr
        );
        let lines: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert!(
            lines.len() == 1 && lines[0].contains(flag),
            "{argv:?}: expected one line naming {flag}, got:\n{}",
            out.stderr
        );
    }
}

// ---------------------------------------------------------------------------------------------
// --allow / --deny
// ---------------------------------------------------------------------------------------------

#[test]
fn deny_refuses_before_any_backend_is_contacted() {
    let backend = Backend::hello("b");
    let proxy = Proxy::start(&args(
        "127.0.0.1:0",
        &[&backend],
        &["--deny", "127.0.0.5/32"],
    ));
    for _ in 0..3 {
        refused_from(&proxy, client_ip(5), "127.0.0.5 under --deny 127.0.0.5/32");
    }
    assert_eq!(served_by(&proxy, client_ip(6)), "b");
    assert_eq!(
        backend.accepted(),
        1,
        "a denied client reached the backend\n{}",
        proxy.stderr_tail()
    );
}

#[test]
fn allow_admits_only_its_networks() {
    let backend = Backend::hello("b");
    let proxy = Proxy::start(&args(
        "127.0.0.1:0",
        &[&backend],
        &["--allow", "127.0.0.0/29"],
    ));
    assert_eq!(served_by(&proxy, client_ip(2)), "b");
    assert_eq!(served_by(&proxy, client_ip(7)), "b");
    refused_from(
        &proxy,
        client_ip(9),
        "127.0.0.9 outside --allow 127.0.0.0/29",
    );
    refused_from(
        &proxy,
        client_ip(8),
        "127.0.0.8 outside --allow 127.0.0.0/29",
    );
    assert_eq!(backend.accepted(), 2);
}

#[test]
fn the_longest_prefix_wins_and_deny_wins_a_tie() {
    let backend = Backend::hello("b");
    let proxy = Proxy::start(&args(
        "127.0.0.1:0",
        &[&backend],
        &[
            "--allow",
            "127.0.0.0/8",
            "--deny",
            "127.0.0.0/24",
            "--allow",
            "127.0.0.7/32",
            "--allow",
            "127.0.0.8/32",
            "--deny",
            "127.0.0.8/32",
        ],
    ));
    assert_eq!(
        served_by(&proxy, client_ip(7)),
        "b",
        "127.0.0.7/32 allow beats the /24 deny"
    );
    assert_eq!(
        served_by(&proxy, "127.0.1.1".parse().unwrap()),
        "b",
        "127.0.1.1: /8 allow"
    );
    refused_from(&proxy, client_ip(6), "127.0.0.6 in the denied /24");
    refused_from(
        &proxy,
        client_ip(8),
        "127.0.0.8 both allowed and denied as /32 (deny wins)",
    );
    assert_eq!(backend.accepted(), 2);
}

#[test]
fn ipv6_access_rules() {
    let backend = Backend::hello("b");
    let cases: &[(&[&str], bool)] = &[
        (&["--deny", "::1/128"], false),
        (&["--allow", "::1/128", "--deny", "::/0"], true),
        (&["--allow", "2001:db8::/32"], false),
        (&["--deny", "::/0", "--allow", "::/1"], true),
        // IPv4 rules do not match an IPv6 client.
        (&["--deny", "0.0.0.0/0"], true),
    ];
    let mut admitted = 0;
    for (rules, admit) in cases {
        let proxy = Proxy::start(&args("[::1]:0", &[&backend], rules));
        if *admit {
            assert_eq!(served_by(&proxy, V6_LOCALHOST), "b", "::1 under {rules:?}");
            admitted += 1;
        } else {
            refused_from(&proxy, V6_LOCALHOST, &format!("::1 under {rules:?}"));
        }
    }
    assert_eq!(backend.accepted(), admitted);
}

#[test]
fn ipv4_clients_of_a_dual_stack_listener_match_ipv4_rules() {
    let backend = Backend::hello("b");
    let proxy = Proxy::start(&args(
        "[::]:0",
        &[&backend],
        &["--allow", "127.0.0.0/8", "--deny", "127.0.0.5/32"],
    ));
    let port = proxy.addr.port();
    let v4 = SocketAddr::new("127.0.0.1".parse().unwrap(), port);
    // The proxy sees ::ffff:127.0.0.x; the IPv4 rules must still apply.
    let mut s = connect_from(client_ip(6), v4).unwrap();
    assert_eq!(
        read_line(&mut s).unwrap_or_else(|e| panic!(
            "127.0.0.6 on [::] under --allow 127.0.0.0/8: {e}\n{}",
            proxy.stderr_tail()
        )),
        "b"
    );
    let mut s5 = connect_from(client_ip(5), v4).unwrap();
    expect_refused(
        &mut s5,
        "127.0.0.5 on [::] under --deny 127.0.0.5/32",
        &proxy,
    );
    let mut s6 = connect_from(V6_LOCALHOST, SocketAddr::new(V6_LOCALHOST, port)).unwrap();
    expect_refused(&mut s6, "::1 outside --allow 127.0.0.0/8", &proxy);
    echo_roundtrip(&mut s, b"ok").unwrap();
    assert_eq!(backend.accepted(), 1);
}

// ---------------------------------------------------------------------------------------------
// --max-conns-per-source
// ---------------------------------------------------------------------------------------------

#[test]
fn max_conns_per_source_refuses_the_fourth_and_frees_on_close() {
    let backend = Backend::hello("b");
    let proxy = Proxy::start(&args(
        "127.0.0.1:0",
        &[&backend],
        &["--max-conns-per-source", "3"],
    ));
    let open = |n: u8| -> TcpStream {
        let mut s = connect_from(client_ip(n), proxy.addr).unwrap();
        let greeting = read_line(&mut s)
            .unwrap_or_else(|e| panic!("flow from 127.0.0.{n}: {e}\n{}", proxy.stderr_tail()));
        assert_eq!(greeting, "b");
        s
    };
    let mut three: Vec<TcpStream> = (0..3).map(|_| open(3)).collect();
    refused_from(&proxy, client_ip(3), "fourth flow from 127.0.0.3");
    let mut other = open(4);
    echo_roundtrip(&mut other, b"other client").unwrap();
    for s in &mut three {
        echo_roundtrip(s, b"still open").unwrap();
    }
    assert_eq!(backend.accepted(), 4);

    // Close one; its slot comes back once the proxy has seen the flow end.
    let closed = three.pop().unwrap();
    drop(closed);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut refusals = 0;
    let fresh = loop {
        let mut s = connect_from(client_ip(3), proxy.addr).unwrap();
        match read_line(&mut s) {
            Ok(greeting) => {
                assert_eq!(greeting, "b");
                break s;
            }
            Err(_) => {
                refusals += 1;
                assert!(
                    Instant::now() < deadline,
                    "no new flow from 127.0.0.3 within 10 s of closing one ({refusals} refused)\n{}",
                    proxy.stderr_tail()
                );
            }
        }
    };
    let mut fresh = fresh;
    echo_roundtrip(&mut fresh, b"fresh").unwrap();
    refused_from(
        &proxy,
        client_ip(3),
        "fourth flow from 127.0.0.3 after the reuse",
    );
}

// ---------------------------------------------------------------------------------------------
// Flood
// ---------------------------------------------------------------------------------------------

/// A proxy started by `sh -c 'ulimit -n N; exec ringway ...'` (the common harness cannot set
/// limits). Dropping it sends SIGTERM, waits a bounded time, then SIGKILLs.
struct LimitedProxy {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    listening_line: usize,
}

impl LimitedProxy {
    fn start(nofile: u32, argv: &[String]) -> LimitedProxy {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!("ulimit -n {nofile} && exec \"$0\" \"$@\""))
            .arg(bin())
            .args(argv)
            .env("RUST_LOG", "info")
            .env("RUST_LOG_STYLE", "never")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sh");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let pipe = child.stderr.take().unwrap();
        let log2 = Arc::clone(&log);
        thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                log2.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addr) = parse_listening(&line) {
                        let listening_line = log.lock().unwrap().len();
                        return LimitedProxy {
                            child,
                            addr,
                            log,
                            listening_line,
                        };
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "ringway under ulimit -n {nofile} did not start:\n{}",
                        log.lock().unwrap().join("\n")
                    );
                }
            }
        }
    }

    /// Lines logged after the `listening on` line.
    fn lines_since_start(&self) -> Vec<String> {
        self.log.lock().unwrap()[self.listening_line..].to_vec()
    }

    fn stderr_tail(&self) -> String {
        let lines = self.log.lock().unwrap();
        let skip = lines.len().saturating_sub(40);
        format!(
            "--- ringway stderr (last 40 of {} lines) ---\n{}\n--- end ---",
            lines.len(),
            lines[skip..].join("\n")
        )
    }

    /// User plus system CPU time the process has used.
    fn cpu_time(&self) -> Duration {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .expect("read /proc/PID/stat of the proxy");
        // Fields after the command name (which is in parentheses and may contain spaces):
        // state is field 3, utime 14, stime 15.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        Duration::from_millis(ticks * 1000 / hz)
    }

    fn open_fds(&self) -> usize {
        fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("ringway exited: {status}\n{}", self.stderr_tail());
        }
        let lines = self.log.lock().unwrap();
        if let Some(l) = lines.iter().find(|l| l.contains("panicked")) {
            panic!("a ringway thread panicked: {l}");
        }
    }
}

impl Drop for LimitedProxy {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            send_signal(&self.child, libc::SIGTERM);
            if !wait_until(Duration::from_secs(5), || {
                matches!(self.child.try_wait(), Ok(Some(_)))
            }) {
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("{}", self.stderr_tail());
        }
    }
}

fn roundtrip_pattern(s: &mut TcpStream, key: u64, len: usize) -> Result<(), String> {
    let data = pattern_vec(key, len);
    s.write_all(&data).map_err(|e| format!("write: {e}"))?;
    read_pattern_exact(s, key, len as u64)
}

/// Idle connections from 127.0.0.20 and up, `per_source` from each address; also returns the
/// most descriptors the proxy held at samples taken while they were opened.
fn open_flood(proxy: &LimitedProxy, total: usize, per_source: usize) -> (Vec<TcpStream>, usize) {
    let mut flood = Vec::with_capacity(total);
    let mut fds = 0;
    for i in 0..total {
        let src = client_ip(20 + (i / per_source) as u8);
        match connect_from(src, proxy.addr) {
            Ok(s) => flood.push(s),
            Err(e) => panic!("flood connection {i} from {src}: {e}"),
        }
        if i % 50 == 0 {
            fds = fds.max(proxy.open_fds());
        }
    }
    (flood, fds)
}

/// CPU the proxy uses over a window of `len`, and the most descriptors it held at any of the
/// samples taken every 100 ms. The sleeps pace the measurement window; nothing waits on them.
fn measure(proxy: &LimitedProxy, len: Duration) -> (Duration, Duration, usize) {
    let cpu_before = proxy.cpu_time();
    let wall = Instant::now();
    let mut fds = proxy.open_fds();
    while wall.elapsed() < len {
        thread::sleep(Duration::from_millis(100));
        fds = fds.max(proxy.open_fds());
    }
    (
        proxy.cpu_time().saturating_sub(cpu_before),
        wall.elapsed(),
        fds,
    )
}

/// The shared flood scenario. The test first opens `hold` flows (4 checked byte-exact
/// throughout, 4 "triggers", the rest idle fillers), then `FLOOD` idle connections, then ends
/// the triggers one by one while the flood is queued (each frees room, so the proxy accepts
/// again with a deep accept queue in front of it). Checks that the checked flows keep working,
/// that the proxy does not spin (idle, and while the flood is held open), that it does not log
/// a line per connection, that with `max_fds` it holds at most that many descriptors
/// (connections beyond `--max-conns` wait in the kernel backlog), and that it serves new flows
/// once the flood is gone. Every finding is collected, so one failure message tells the whole
/// story.
fn flood(nofile: u32, extra: &[&str], hold: usize, max_fds: Option<usize>) {
    const FLOOD: usize = 1500;
    const CHECKED: usize = 4;
    const TRIGGERS: usize = 4;
    assert!(hold >= CHECKED + TRIGGERS);
    raise_nofile(6000);
    let echo = Backend::echo();
    let mut argv = args("127.0.0.1:0", &[&echo], extra);
    argv.push("--idle-timeout".into());
    argv.push("0".into());
    let mut proxy = LimitedProxy::start(nofile, &argv);
    let what = format!("ulimit -n {nofile}, {extra:?}");
    let mut problems: Vec<String> = Vec::new();

    let mut held: Vec<TcpStream> = Vec::with_capacity(hold);
    for i in 0..hold {
        let mut s = connect_from(client_ip(2), proxy.addr).unwrap();
        let (key, len) = if i < CHECKED {
            (500 + i as u64, 16 * 1024)
        } else {
            (550, 1)
        };
        roundtrip_pattern(&mut s, key, len).unwrap_or_else(|e| {
            panic!(
                "{what}: flow {i} before the flood: {e}\n{}",
                proxy.stderr_tail()
            )
        });
        held.push(s);
    }
    let mut fillers = held.split_off(CHECKED + TRIGGERS);
    let triggers = held.split_off(CHECKED);
    let mut established = held;
    let (busy, window, _) = measure(&proxy, Duration::from_secs(1));
    if busy >= window / 2 {
        problems.push(format!(
            "with {hold} open, silent flows and no flood, the proxy used {busy:?} of CPU in \
             {window:?}: it spins even when idle"
        ));
    }

    let (flood, mut fds) = open_flood(&proxy, FLOOD, 300);
    for (i, mut t) in triggers.into_iter().enumerate() {
        t.shutdown(Shutdown::Write).unwrap();
        if let Err(e) = expect_closed(&mut t, CLOSE_TIMEOUT) {
            problems.push(format!(
                "trigger flow {i}, half-closed during the flood, did not end: {e}"
            ));
        }
        fds = fds.max(proxy.open_fds());
    }
    let (busy, window, fds_window) = measure(&proxy, Duration::from_secs(2));
    let fds = fds.max(fds_window);
    if busy >= window / 2 {
        problems.push(format!(
            "the proxy used {busy:?} of CPU in {window:?} while {FLOOD} idle connections were \
             held open: it spins"
        ));
    }
    if let Some(max) = max_fds {
        if fds > max {
            problems.push(format!(
                "the proxy held up to {fds} descriptors during the flood (expected at most {max}: \
                 two per flow and some overhead; connections beyond --max-conns should wait in \
                 the kernel backlog, not in the process)"
            ));
        }
    }
    for (i, s) in established.iter_mut().enumerate() {
        if let Err(e) = roundtrip_pattern(s, 600 + i as u64, 64 * 1024) {
            problems.push(format!("established flow {i} during the flood: {e}"));
        }
    }
    proxy.assert_running();

    fillers.clear();
    drop(flood);
    // A new flow is served once the proxy has worked through what the flood left queued:
    // retry (each attempt waits its turn in the queue) until one works or 20 s pass.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut failures = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let attempt = connect_from(client_ip(3), proxy.addr)
            .map_err(|e| format!("connect: {e}"))
            .and_then(|mut s| {
                s.set_read_timeout(Some(left.max(Duration::from_millis(100))))
                    .unwrap();
                roundtrip_pattern(&mut s, 700, 8 * 1024)
            });
        match attempt {
            Ok(()) => break,
            Err(e) => failures.push(e),
        }
        if Instant::now() >= deadline {
            problems.push(format!(
                "no new flow worked within 20 s of the flood ending ({} attempts; last: {:?})",
                failures.len(),
                failures.last()
            ));
            break;
        }
    }
    // Then new flows are served straight away (a flow accepted but never served fails here).
    for i in 0..4 {
        let mut s = connect_from(client_ip(4), proxy.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        if let Err(e) = roundtrip_pattern(&mut s, 710 + i, 8 * 1024) {
            problems.push(format!("new flow {i} after the flood: {e}"));
        }
    }
    for (i, s) in established.iter_mut().enumerate() {
        if let Err(e) = roundtrip_pattern(s, 800 + i as u64, 16 * 1024) {
            problems.push(format!("established flow {i} after the flood: {e}"));
        }
    }
    proxy.assert_running();

    let lines = proxy.lines_since_start();
    if lines.len() > 30 {
        let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
        for l in &lines {
            // The message without its timestamp and addresses, to count lines by kind.
            let text: String = l
                .split_once("] ")
                .map_or(l.as_str(), |(_, m)| m)
                .chars()
                .filter(|c| !c.is_ascii_digit())
                .collect();
            *kinds.entry(text).or_default() += 1;
        }
        let mut kinds: Vec<(usize, String)> = kinds.into_iter().map(|(k, n)| (n, k)).collect();
        kinds.sort_unstable_by(|a, b| b.cmp(a));
        problems.push(format!(
            "{} log lines for a flood of {FLOOD} connections (rate-limited warnings expected, \
             not a line per connection); most frequent: {:?}",
            lines.len(),
            &kinds[..kinds.len().min(3)]
        ));
    }
    // The proxy's stderr is printed by LimitedProxy's Drop when this fails.
    assert!(problems.is_empty(), "{what}:\n- {}", problems.join("\n- "));
}

#[test]
fn flood_at_max_conns_does_not_starve_open_flows() {
    // The test holds all 200 flows before the flood, so every flood connection must wait in
    // the kernel. 200 flows are 400 descriptors; the rest of the 1024 are headroom.
    flood(1024, &["--max-conns", "200"], 200, Some(2 * 200 + 100));
}

/// `--max-conns` above what the open-file limit allows: accepts (and backend sockets) fail
/// with EMFILE during the flood.
#[test]
fn flood_beyond_the_open_file_limit_does_not_starve_open_flows() {
    flood(1024, &["--max-conns", "5000"], 8, None);
}

/// The flow limit the proxy derived (the `max N flows` of its start-up line).
fn derived_limit(proxy: &LimitedProxy) -> usize {
    let lines = proxy.log.lock().unwrap();
    let line = &lines[proxy.listening_line - 1];
    line.split(", max ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no flow limit in {line:?}"))
}

/// With the flow limit derived from a low open-file limit, a burst of clients that do not fit
/// reaches a busy proxy: every one of them must wait (in the listen queue) and be served as
/// others finish; none may be closed for want of a descriptor. The proxy starts far enough
/// from the limit to accept with multishot accepts (`--listen-backlog 128`, two workers), holds
/// all but 100 flows, and is stopped while 200 clients queue up (they fit the two listen
/// queues); it then continues, and the held clients end ten at a time.
#[test]
fn default_limit_lets_a_burst_beyond_the_descriptors_wait_and_serves_it() {
    const ROOM: usize = 100;
    const BURST: usize = 200;
    raise_nofile(4000);
    let backend = crowd::CountingBackend::start();
    let argv: Vec<String> = [
        "--listen",
        "127.0.0.1:0",
        "--backend",
        &backend.arg(),
        "--workers",
        "2",
        "--listen-backlog",
        "128",
        "--idle-timeout",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let proxy = LimitedProxy::start(1024, &argv);
    let limit = derived_limit(&proxy);
    assert!(
        limit > ROOM + 256,
        "ulimit -n 1024 gave a flow limit of {limit}"
    );
    let mut held = crowd::Crowd::default();
    for i in 0..limit - ROOM {
        held.connect_served(proxy.addr, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("held flow {i}: {e}\n{}", proxy.stderr_tail()));
    }
    let pid = proxy.child.id();
    crowd::freeze(pid);
    let mut burst = crowd::Crowd::default();
    for i in 0..BURST {
        let s = connect(proxy.addr).unwrap_or_else(|e| panic!("burst client {i}: {e}"));
        burst.push(s);
    }
    crowd::thaw(pid);
    // The room left is served at once; then each held flow that ends lets one more in.
    burst.pump_until(Duration::from_secs(10), |c| {
        c.count(crowd::Fate::Served) >= ROOM || !c.turned_away.is_empty()
    });
    let mut next_held = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while burst.count(crowd::Fate::Waiting) > 0
        && burst.turned_away.is_empty()
        && Instant::now() < deadline
    {
        // Ten at a time: a worker with no flow ending of its own notices room at its next
        // tick, so one at a time would make the test slow, not stricter.
        for _ in 0..10 {
            held.reset(next_held);
            next_held += 1;
        }
        let want = ROOM + next_held;
        burst.pump_until(Duration::from_secs(10), |c| {
            c.count(crowd::Fate::Served) + c.count(crowd::Fate::TurnedAway) >= want.min(BURST)
        });
    }
    assert!(
        burst.turned_away.is_empty() && burst.count(crowd::Fate::Waiting) == 0,
        "ulimit -n 1024, default limit {limit}, {} flows held, burst of {BURST}: {} served, {} \
         still waiting, {} closed by the proxy: {:?}\n{}",
        limit - ROOM,
        burst.count(crowd::Fate::Served),
        burst.count(crowd::Fate::Waiting),
        burst.turned_away.len(),
        &burst.turned_away[..burst.turned_away.len().min(5)],
        proxy.stderr_tail()
    );
    assert!(
        backend.max_open() <= limit,
        "default limit {limit}: up to {} backend connections were open at once",
        backend.max_open()
    );
}

// ---------------------------------------------------------------------------------------------
// Socket options seen with ss
// ---------------------------------------------------------------------------------------------

/// Runs `ss` with `args`, returns its lines (no header).
fn ss(args: &[&str]) -> Vec<String> {
    let out = Command::new("ss")
        .arg("-H")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run ss (iproute2): {e}"));
    assert!(
        out.status.success(),
        "ss {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

/// Send-Q of each listening socket on `port`: the accept queue length for listeners.
fn listen_backlogs(port: u16) -> Vec<u32> {
    ss(&["-ltn", &format!("sport = :{port}")])
        .iter()
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols[2].parse().unwrap_or_else(|_| panic!("ss line {l:?}"))
        })
        .collect()
}

#[test]
fn listen_backlog_sets_the_accept_queue_length() {
    let echo = Backend::echo();
    let proxy = Proxy::start(&args("127.0.0.1:0", &[&echo], &["--listen-backlog", "77"]));
    let backlogs = listen_backlogs(proxy.addr.port());
    assert!(
        !backlogs.is_empty() && backlogs.iter().all(|&b| b == 77),
        "--listen-backlog 77: ss shows listeners with Send-Q {backlogs:?}"
    );
    drop(proxy);
    let proxy = Proxy::start(&args("127.0.0.1:0", &[&echo], &[]));
    let somaxconn: u32 = fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let backlogs = listen_backlogs(proxy.addr.port());
    assert!(
        !backlogs.is_empty() && backlogs.iter().all(|&b| b == somaxconn.min(4096)),
        "default backlog: ss shows {backlogs:?}, expected min(4096, somaxconn {somaxconn})"
    );
}

/// Parses an ss timer value like `29sec`, `1min29sec`, `950ms`.
fn parse_ss_time(text: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut number = String::new();
    let mut unit = String::new();
    let mut flush = |number: &mut String, unit: &mut String| -> Option<()> {
        if number.is_empty() {
            return Some(());
        }
        let n: f64 = number.parse().ok()?;
        total += match unit.as_str() {
            "ms" => Duration::from_secs_f64(n / 1000.0),
            "sec" => Duration::from_secs_f64(n),
            "min" => Duration::from_secs_f64(n * 60.0),
            "h" => Duration::from_secs_f64(n * 3600.0),
            _ => return None,
        };
        number.clear();
        unit.clear();
        Some(())
    };
    for c in text.chars() {
        if c.is_ascii_digit() || c == '.' {
            if !unit.is_empty() {
                flush(&mut number, &mut unit)?;
            }
            number.push(c);
        } else {
            unit.push(c);
        }
    }
    flush(&mut number, &mut unit)?;
    Some(total)
}

/// The proxy's own sockets of its flows: accepted from clients (local port = the proxy's)
/// and connected to the backend (remote port = the backend's).
fn proxy_flow_sockets(proxy: &Proxy, backend: &Backend) -> Vec<String> {
    // ss filters by port; other tests running at the same time may use the same port number on
    // another loopback address, so keep only lines naming our exact addresses.
    let (ours, theirs) = (proxy.addr.to_string(), backend.addr.to_string());
    ss(&[
        "-tno",
        "state",
        "established",
        &format!(
            "( sport = :{} or dport = :{} )",
            proxy.addr.port(),
            backend.addr.port()
        ),
    ])
    .into_iter()
    .filter(|line| {
        let mut addrs = line.split_whitespace().skip(2);
        let (local, peer) = (addrs.next().unwrap_or(""), addrs.next().unwrap_or(""));
        local == ours || peer == theirs
    })
    .collect()
}

fn keepalive_of(line: &str) -> Option<Duration> {
    let rest = &line[line.find("timer:(keepalive,")? + "timer:(keepalive,".len()..];
    parse_ss_time(&rest[..rest.find(',')?])
}

#[test]
fn tcp_keepalive_is_set_on_both_sides_of_each_flow() {
    let echo = Backend::echo();
    let proxy = Proxy::start(&args(
        "127.0.0.1:0",
        &[&echo],
        &["--tcp-keepalive", "30s,5s,3"],
    ));
    let mut flows: Vec<TcpStream> = (0..2).map(|_| connect(proxy.addr).unwrap()).collect();
    for s in &mut flows {
        echo_roundtrip(s, b"keepalive").unwrap();
    }
    let mut last = Vec::new();
    let ok = wait_until(Duration::from_secs(10), || {
        last = proxy_flow_sockets(&proxy, &echo);
        last.len() == 4
            && last.iter().all(|l| {
                keepalive_of(l).is_some_and(|t| t > Duration::ZERO && t <= Duration::from_secs(30))
            })
    });
    assert!(
        ok,
        "--tcp-keepalive 30s,5s,3: expected the proxy's 4 sockets (2 flows, both sides) to \
         show a keepalive timer of at most 30 s; ss shows:\n{}",
        last.join("\n")
    );
    drop(flows);
    drop(proxy);

    let proxy = Proxy::start(&args("127.0.0.1:0", &[&echo], &[]));
    let mut flows: Vec<TcpStream> = (0..2).map(|_| connect(proxy.addr).unwrap()).collect();
    for s in &mut flows {
        echo_roundtrip(s, b"no keepalive").unwrap();
    }
    let mut last = Vec::new();
    assert!(
        wait_until(Duration::from_secs(10), || {
            last = proxy_flow_sockets(&proxy, &echo);
            last.len() == 4
        }),
        "expected the proxy's 4 flow sockets, ss shows:\n{}",
        last.join("\n")
    );
    assert!(
        last.iter().all(|l| !l.contains("keepalive")),
        "without --tcp-keepalive the proxy's sockets have a keepalive timer:\n{}",
        last.join("\n")
    );
}
