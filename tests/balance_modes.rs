//! `--balance` modes other than plain hashing, and hashing with bounded loads, seen from
//! outside: "hello" backends tell each client which backend served it.

mod common;

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::*;

/// `--listen 127.0.0.1:0`, a `--backend` per entry, then `extra`.
fn args(backends: &[String], extra: &[&str]) -> Vec<String> {
    let mut args = vec!["--listen".to_string(), "127.0.0.1:0".to_string()];
    for b in backends {
        args.push("--backend".into());
        args.push(b.clone());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Flows per backend name.
fn count(names: impl IntoIterator<Item = String>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for name in names {
        *counts.entry(name).or_insert(0) += 1;
    }
    counts
}

/// Opens a flow from `src` and keeps it open; returns it with the name of its backend, once
/// the backend has greeted it (so the proxy has counted it as active on that backend).
fn hold(proxy: &Proxy, src: IpAddr) -> (TcpStream, String) {
    let mut s = connect_from(src, proxy.addr)
        .unwrap_or_else(|e| panic!("connect from {src}: {e}\n{}", proxy.stderr_tail()));
    let name = read_line(&mut s)
        .unwrap_or_else(|e| panic!("greeting for {src}: {e}\n{}", proxy.stderr_tail()));
    (s, name)
}

/// A hello backend started later on an address chosen in advance (the harness's backends
/// always take a fresh port).
struct LateHello {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl LateHello {
    fn start(addr: SocketAddr, name: &str) -> LateHello {
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            // std sets SO_REUSEADDR on listeners.
            match TcpListener::bind(addr) {
                Ok(listener) => break listener,
                // The port may be briefly held (e.g. by another test's connect): retry.
                Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("cannot listen on {addr}: {e}"),
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let greeting = format!("{name}\n");
        let acceptor = {
            let stop = stop.clone();
            thread::Builder::new()
                .stack_size(SMALL_STACK)
                .spawn(move || loop {
                    let accepted = listener.accept();
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok((s, _)) = accepted else { continue };
                    let greeting = greeting.clone();
                    let _ = thread::Builder::new()
                        .stack_size(SMALL_STACK)
                        .spawn(move || hello_echo(s, &greeting));
                })
                .unwrap()
        };
        LateHello {
            addr,
            stop,
            acceptor: Some(acceptor),
        }
    }
}

impl Drop for LateHello {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2));
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }
}

fn hello_echo(mut s: TcpStream, greeting: &str) {
    let _ = s.set_read_timeout(Some(BACKEND_IO_TIMEOUT));
    let _ = s.set_write_timeout(Some(BACKEND_IO_TIMEOUT));
    if s.write_all(greeting.as_bytes()).is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => {
                let _ = s.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

#[test]
fn round_robin_follows_weights_for_one_client() {
    let a = Backend::hello("a");
    let b = Backend::hello("b");
    let proxy = Proxy::start(&args(
        &[format!("{},weight=2", a.arg()), b.arg()],
        &["--balance", "round-robin"],
    ));
    // One client IP: hashing would send every flow to the same backend.
    let counts = count((0..300).map(|_| served_by(&proxy, client_ip(200))));
    let on_a = counts.get("a").copied().unwrap_or(0);
    let on_b = counts.get("b").copied().unwrap_or(0);
    assert_eq!(on_a + on_b, 300, "{counts:?}");
    // 2:1 is 200:100; allow 10% of it either way.
    assert!(
        (180..=220).contains(&on_a),
        "weights 2:1 over 300 flows gave {counts:?}"
    );
}

#[test]
fn least_conn_sends_new_flows_to_the_backend_with_fewer_held_flows() {
    let a = Backend::hello("a");
    // B refuses connections at first, so the held flows all end up on A.
    let b_addr = dead_addr();
    let proxy = Proxy::start(&args(
        &[a.arg(), b_addr.to_string()],
        &[
            "--balance",
            "least-conn",
            "--retries",
            "1",
            "--max-fails",
            "0",
        ],
    ));
    let src = client_ip(201);
    let mut held = Vec::new();
    for i in 0..6 {
        let (s, name) = hold(&proxy, src);
        assert_eq!(name, "a", "flow {i}: only A accepts connections");
        held.push(s);
    }

    let _b = LateHello::start(b_addr, "b");
    // A holds 6 flows, B none: the next 6 (held too) must all go to B.
    for i in 0..6 {
        let (s, name) = hold(&proxy, src);
        assert_eq!(
            name,
            "b",
            "new flow {i}: A holds 6 flows and B {i}, least-conn chose A\n{}",
            proxy.stderr_tail()
        );
        held.push(s);
    }
    // Closing A's flows makes A the less loaded one.
    let on_b: Vec<TcpStream> = held.drain(6..).collect();
    for mut s in held.drain(..) {
        s.shutdown(Shutdown::Write).unwrap();
        expect_closed(&mut s, CLOSE_TIMEOUT).unwrap();
    }
    // The proxy releases a flow just after the client sees its end: wait for the counts
    // to settle by seeing a new flow land on A.
    let mut extra = Vec::new();
    assert!(
        wait_until(Duration::from_secs(5), || {
            let (s, name) = hold(&proxy, src);
            extra.push(s);
            name == "a"
        }),
        "with A's flows closed and 6 held on B, new flows still avoid A\n{}",
        proxy.stderr_tail()
    );
    drop(on_b);
}

#[test]
fn random_two_spreads_one_clients_flows() {
    let backends: Vec<Backend> = ["a", "b", "c"].iter().map(|n| Backend::hello(n)).collect();
    let names: Vec<String> = backends.iter().map(Backend::arg).collect();
    let proxy = Proxy::start(&args(&names, &["--balance", "random-two"]));
    let counts = count((0..300).map(|_| served_by(&proxy, client_ip(202))));
    // Equal weights: about 100 each; a backend under 60 is not spreading.
    for name in ["a", "b", "c"] {
        let n = counts.get(name).copied().unwrap_or(0);
        assert!(n >= 60, "random-two over 300 flows gave {counts:?}");
    }
}

#[test]
fn hash_balance_factor_spills_a_hot_clients_flows_to_other_backends() {
    let backends: Vec<Backend> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| Backend::hello(n))
        .collect();
    let names: Vec<String> = backends.iter().map(Backend::arg).collect();
    let proxy = Proxy::start(&args(&names, &["--hash-balance-factor", "125"]));
    let hot = client_ip(203);
    const FLOWS: usize = 40;
    let mut held = Vec::new();
    let mut served = Vec::new();
    for _ in 0..FLOWS {
        let (s, name) = hold(&proxy, hot);
        held.push(s);
        served.push(name);
    }
    let home = served[0].clone();
    let counts = count(served);
    // Fair share 10 of 40 flows; 125% of it is 12.5, rounded up: 13, plus one for rounding.
    let cap = (FLOWS * 125).div_ceil(100 * backends.len()) + 1;
    let on_home = counts[&home];
    assert!(
        on_home <= cap,
        "home backend {home} holds {on_home} of {FLOWS} flows of one client (cap {cap}): \
         {counts:?}"
    );
    // Bounded, but still sticky: the home backend takes its full fair share first.
    assert!(
        on_home >= FLOWS / backends.len(),
        "home backend {home} holds only {on_home}: {counts:?}"
    );
    assert_eq!(counts.values().sum::<usize>(), FLOWS);

    // Without the bound, the same client's flows all stay on one backend.
    drop(held);
    let plain = Proxy::start(&args(&names, &[]));
    let mut held = Vec::new();
    let mut on_plain = Vec::new();
    for _ in 0..10 {
        let (s, name) = hold(&plain, hot);
        held.push(s);
        on_plain.push(name);
    }
    assert!(
        on_plain.iter().all(|n| *n == on_plain[0]),
        "without --hash-balance-factor one client's flows spread: {on_plain:?}"
    );
}
