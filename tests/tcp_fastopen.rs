//! TCP Fast Open: `--tcp-fastopen N` on the listener and `--backend-fastopen` toward backends.
//!
//! Each test makes a network namespace of its own with net.ipv4.tcp_fastopen=3 (client and
//! server), so the setting and the kernel's TFO counters (TcpExt in /proc/net/netstat, per
//! namespace) are the test's alone. Everything runs on a thread that entered the namespace:
//! the backend, the clients and the proxy process.
//!
//! What shows that data rode in a SYN: TcpExtTCPFastOpenPassive, which the kernel counts on the
//! listening side when it accepts a SYN carrying data with a valid cookie. A first connection
//! only fetches the cookie; the second one carries its data in the SYN. The same steps against
//! the proxy without the flag count nothing, which shows the counter moves because of the flag.
//!
//! The last test puts real peers on both sides: curl `--tcp-fastopen` as the client and nginx
//! `listen ... fastopen=` as the backend.
//!
//! Needs root (CAP_SYS_ADMIN), `ip`/`sysctl` (iproute2, procps), curl and nginx, as CI has.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::thread;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use common::netns::Netns;
use common::*;

/// A namespace with Fast Open allowed on both sides.
fn fastopen_netns() -> Netns {
    let ns = Netns::new("dn-tfo");
    ns.sysctl("net.ipv4.tcp_fastopen=3");
    ns
}

/// A TcpExt counter of the calling thread's network namespace.
fn tcp_ext(name: &str) -> u64 {
    // /proc/thread-self: the namespace this thread entered (/proc/self is the process's).
    let text = std::fs::read_to_string("/proc/thread-self/net/netstat").expect("read netstat");
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no {name} in /proc/net/netstat"))
        .1
        .parse()
        .unwrap()
}

fn passive() -> u64 {
    tcp_ext("TCPFastOpenPassive")
}

/// Sends `message` as a Fast Open client (sendto with MSG_FASTOPEN: in the SYN when a cookie
/// for `addr` is cached, else after an ordinary handshake that fetches one) and checks that the
/// echo comes back byte for byte.
fn fastopen_roundtrip(addr: SocketAddr, message: &[u8]) {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
    socket.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let sent = socket
        .send_to_with_flags(message, &SockAddr::from(addr), libc::MSG_FASTOPEN)
        .unwrap_or_else(|e| panic!("sendto MSG_FASTOPEN {addr}: {e}"));
    assert_eq!(sent, message.len());
    let mut stream: TcpStream = socket.into();
    let mut back = vec![0u8; message.len()];
    stream.read_exact(&mut back).expect("read the echo");
    assert_eq!(back, message);
}

/// An ordinary client: connect, send, read the echo.
fn plain_roundtrip(addr: SocketAddr, message: &[u8]) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.write_all(message).unwrap();
    let mut back = vec![0u8; message.len()];
    stream.read_exact(&mut back).expect("read the echo");
    assert_eq!(back, message);
}

#[test]
fn a_clients_data_in_the_syn_reaches_the_backend() {
    let ns = fastopen_netns();
    ns.run(|| {
        let echo = Backend::echo();
        let without = Proxy::start(&["--listen", "127.0.0.1:0", "--backend", &echo.arg()]);
        let before = passive();
        fastopen_roundtrip(without.addr, b"first, no cookie yet");
        fastopen_roundtrip(without.addr, b"second, still none to use");
        assert_eq!(passive(), before, "no Fast Open without the flag");
        drop(without);

        let proxy = Proxy::start(&[
            "--listen",
            "127.0.0.1:0",
            "--backend",
            &echo.arg(),
            "--tcp-fastopen",
            "16",
        ]);
        fastopen_roundtrip(proxy.addr, b"first: fetches the cookie");
        assert_eq!(passive(), before, "a cookie request carries no data");
        fastopen_roundtrip(proxy.addr, b"second: these bytes ride in the SYN");
        assert_eq!(
            passive(),
            before + 1,
            "the listener accepted one SYN with data\n{}",
            proxy.stderr_tail()
        );
        // A client without Fast Open is served as before.
        plain_roundtrip(proxy.addr, b"plain");
        assert!(!proxy.stderr().contains("tcp_fastopen is"), "no hint at 3");
    });
}

/// An echo server whose listener has Fast Open on (a queue of 16), on 127.0.0.2; returns its
/// address and a handle to its listener (shut it down to stop listening).
fn fastopen_echo_server() -> (SocketAddr, TcpListener) {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
    socket
        .bind(&SockAddr::from(SocketAddr::from(([127, 0, 0, 2], 0))))
        .unwrap();
    let queue: libc::c_int = 16;
    // SAFETY: the descriptor is open (owned by `socket`) and the value points at a live c_int
    // whose size is passed with it.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_FASTOPEN,
            (&queue as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "TCP_FASTOPEN: {}", std::io::Error::last_os_error());
    socket.listen(64).unwrap();
    let listener: TcpListener = socket.into();
    let addr = listener.local_addr().unwrap();
    let handle = listener.try_clone().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            thread::spawn(move || {
                let mut reader = stream.try_clone().unwrap();
                let _ = std::io::copy(&mut reader, &mut stream);
            });
        }
    });
    (addr, handle)
}

#[test]
fn backend_fastopen_puts_the_clients_first_bytes_in_the_backend_syn() {
    let ns = fastopen_netns();
    ns.run(|| {
        let (backend, listener) = fastopen_echo_server();
        let args = |extra: &[&'static str]| {
            let mut args = vec![
                "--listen".to_string(),
                "127.0.0.1:0".into(),
                "--backend".into(),
                backend.to_string(),
            ];
            args.extend(extra.iter().map(|s| s.to_string()));
            args
        };
        // The proxy's listener has no Fast Open and the client is ordinary: every count of
        // TCPFastOpenPassive is the backend's listener accepting a SYN with data from the proxy.
        let without = Proxy::start(&args(&[]));
        let before = passive();
        plain_roundtrip(without.addr, b"one");
        plain_roundtrip(without.addr, b"two");
        assert_eq!(passive(), before, "no Fast Open without the flag");
        drop(without);

        let proxy = Proxy::start(&args(&["--backend-fastopen"]));
        let active_before = tcp_ext("TCPFastOpenActive");
        plain_roundtrip(proxy.addr, b"first flow: the proxy fetches a cookie");
        assert_eq!(passive(), before);
        for n in 1..=3 {
            let message = format!("flow {n} after the cookie: in the backend SYN");
            plain_roundtrip(proxy.addr, message.as_bytes());
            assert_eq!(
                passive(),
                before + n,
                "the backend accepted a SYN with data for flow {n}\n{}",
                proxy.stderr_tail()
            );
        }
        assert_eq!(tcp_ext("TCPFastOpenActive"), active_before + 3);

        // The backend stops listening. The connect "succeeds" at once (cookie cached, nothing
        // sent); the SYN with the client's bytes is answered with a reset, and the flow is
        // closed: not retried elsewhere, but not left hanging either.
        socket2::SockRef::from(&listener)
            .shutdown(std::net::Shutdown::Both)
            .unwrap();
        let mut stream = TcpStream::connect(proxy.addr).unwrap();
        stream.write_all(b"to a backend that is gone").unwrap();
        let closed = expect_closed(&mut stream, CLOSE_TIMEOUT);
        assert!(closed.is_ok(), "{closed:?}\n{}", proxy.stderr_tail());
    });
}

/// A private nginx in the test's namespace (the port is free there by construction) whose
/// listener has Fast Open on; killed by its PID on drop.
struct FastopenNginx {
    child: std::process::Child,
    addr: SocketAddr,
    _dir: TempDir,
}

impl FastopenNginx {
    fn start() -> FastopenNginx {
        let dir = TempDir::new("dn-tfo-nginx");
        let d = dir.path().display();
        let addr: SocketAddr = "127.0.0.2:8088".parse().unwrap();
        // One process, no daemon; as root nginx would look up `nobody` for its workers.
        let conf = format!(
            "user root;
daemon off;
master_process off;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen {addr} fastopen=16;
        location / {{ return 200 \"hello from nginx\\n\"; }}
    }}
}}
"
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        // /usr/sbin is not on every user's PATH.
        let binary = ["/usr/sbin/nginx", "/usr/local/sbin/nginx"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or("nginx");
        let child = std::process::Command::new(binary)
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(dir.path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start nginx (Debian: apt-get install nginx)");
        let nginx = FastopenNginx {
            child,
            addr,
            _dir: dir,
        };
        let ready = wait_until(START_TIMEOUT, || TcpStream::connect(addr).is_ok());
        assert!(
            ready,
            "nginx did not listen on {addr}:\n{}",
            std::fs::read_to_string(nginx._dir.path().join("error.log")).unwrap_or_default()
        );
        nginx
    }
}

impl Drop for FastopenNginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `curl --tcp-fastopen http://ADDR/`: the body.
fn curl_fastopen(addr: SocketAddr) -> String {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "--tcp-fastopen"])
        .arg(format!("http://{addr}/"))
        .output()
        .expect("run curl (Debian: apt-get install curl)");
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn curl_and_nginx_exchange_data_in_the_syn_on_both_sides() {
    let ns = fastopen_netns();
    ns.run(|| {
        let nginx = FastopenNginx::start();
        let proxy = Proxy::start(&[
            "--listen",
            "127.0.0.1:0",
            "--backend",
            &nginx.addr.to_string(),
            "--tcp-fastopen",
            "16",
            "--backend-fastopen",
        ]);
        let before = passive();
        // The first request fetches both cookies: curl's from Ringway, Ringway's from nginx
        // (the readiness probe above was not a Fast Open client).
        assert_eq!(curl_fastopen(proxy.addr), "hello from nginx\n");
        assert_eq!(passive(), before);
        for n in 1..=2 {
            assert_eq!(curl_fastopen(proxy.addr), "hello from nginx\n");
            // Both listeners, Ringway's and nginx's, accepted a SYN with data.
            assert_eq!(
                passive(),
                before + 2 * n,
                "request {n}\n{}",
                proxy.stderr_tail()
            );
        }
    });
}
