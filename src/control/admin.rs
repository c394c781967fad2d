//! `--admin ADDR`: a tiny HTTP/1.1 endpoint for loopback scrapes.
//!
//! - `GET /metrics`  -> 200, `text/plain; version=0.0.4`, whatever [`AdminView::metrics`] writes.
//! - `GET /backends` -> 200, `application/json`, whatever [`AdminView::backends_json`] writes
//!   (use [`backends_json`] with [`BackendRow`]s to produce it).
//! - `GET /` -> 200, `text/html`, whatever [`AdminView::status_page`] writes.
//! - `GET /live` -> 200; `GET /ready` -> 200 or 503 by [`AdminView::ready`], with one line
//!   saying why (see `readiness`).
//! - any other path -> 404; any method other than GET or HEAD -> 405; a malformed request -> 400;
//!   a request head over 8 KiB -> 431.
//!
//! Use: bind a `std::net::TcpListener` at start-up (so a bad address is a start-up error), then
//! `admin::spawn(listener, Arc::new(view))`. The control thread implements [`AdminView`]; it is
//! called on the admin threads, so it reads shared state (stats `Arc`s, the current snapshot
//! behind a lock or an `ArcSwap`-like cell) and never blocks on the workers.
//!
//! Design: a few threads ([`THREADS`]) each block in `accept` on the same listener and serve one
//! request per connection (`Connection: close`), so an idle or slow client holds up at most one
//! of them, and only for [`REQUEST_DEADLINE`] (a deadline for the whole request head, not per
//! read, so trickling bytes does not extend it).
//!
//! Stopping: [`AdminServer::stop`] sets a flag and shuts the listening socket down, which makes
//! every thread blocked in `accept` return (Linux fails a pending accept with EINVAL), and shuts
//! down the connections being answered, so a slow or silent client does not hold a thread for
//! its deadlines. Each thread then sees the flag and ends. The caller joins the returned handle,
//! with a deadline of its own.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, warn};

use super::readiness::{self, Verdict};

/// What the admin endpoint shows; implemented by the control thread.
pub trait AdminView: Send + Sync {
    /// Appends the Prometheus text exposition (see `crate::metrics::render_prometheus`).
    fn metrics(&self, out: &mut String);
    /// Appends a JSON array of backends (see [`backends_json`]).
    fn backends_json(&self, out: &mut String);
    /// Appends the HTML status page (see `super::status_page`).
    fn status_page(&self, out: &mut String);
    /// Whether the routing layer should send this host traffic (`GET /ready`).
    fn ready(&self) -> Verdict;
}

/// Connections served at once.
pub const THREADS: usize = 4;
/// Largest request head accepted (request line and headers).
pub const MAX_REQUEST: usize = 8 * 1024;
/// Time a client has to send its whole request head.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// Time a client has to take the response.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// After answering early (e.g. 431), unread request bytes are drained for this long before the
/// socket is closed: closing with unread data sends an RST, which may destroy the response
/// before the client reads it.
const DRAIN_TIME: Duration = Duration::from_millis(500);
const DRAIN_LIMIT: usize = 64 * 1024;
/// After an accept error (EMFILE...), wait this long before the next accept so the thread does
/// not spin; errors are logged at most once per `ACCEPT_WARN_INTERVAL`.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
const ACCEPT_WARN_INTERVAL: Duration = Duration::from_secs(10);

/// The running admin threads.
pub struct AdminServer {
    /// The first thread; the others are scoped inside it, so it ends after all of them.
    thread: JoinHandle<()>,
    stop: Arc<StopSignal>,
    /// The same socket the threads accept on (a duplicate descriptor), to shut it down.
    listener: TcpListener,
}

impl AdminServer {
    /// Asks every admin thread to end and returns the handle that finishes when they all have.
    pub fn stop(self) -> JoinHandle<()> {
        self.stop.stopping.store(true, Ordering::SeqCst);
        // Wakes the threads blocked in accept; they see `stopping` and return. An error here
        // (the socket is already shut) leaves nothing to wake.
        if let Err(e) = socket2::SockRef::from(&self.listener).shutdown(Shutdown::Both) {
            debug!("admin: shutting the listener down: {e}");
        }
        // Ends the requests being answered: their reads see EOF, their writes fail.
        for stream in self.stop.in_flight().iter().flatten() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        self.thread
    }
}

/// What [`AdminServer::stop`] reaches in the serving threads.
struct StopSignal {
    stopping: AtomicBool,
    /// A duplicate of the connection each thread is answering, by thread number.
    in_flight: Mutex<Vec<Option<TcpStream>>>,
}

impl StopSignal {
    fn in_flight(&self) -> std::sync::MutexGuard<'_, Vec<Option<TcpStream>>> {
        // A panic while holding the lock leaves a plain list behind: still usable.
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records (or with `None` forgets) the connection thread `slot` answers. Recording comes
    /// before the thread checks `stopping`, and `stop` sets `stopping` before it looks here,
    /// so every connection is either seen by `stop` or never answered.
    fn set_in_flight(&self, slot: usize, stream: Option<&TcpStream>) {
        self.in_flight()[slot] = stream.and_then(|s| s.try_clone().ok());
    }
}

/// Starts the admin threads on `listener`. Fails only if the listener cannot be duplicated or
/// a thread cannot be created.
pub fn spawn(listener: TcpListener, view: Arc<dyn AdminView>) -> io::Result<AdminServer> {
    spawn_with(listener, view, REQUEST_DEADLINE)
}

fn spawn_with(
    listener: TcpListener,
    view: Arc<dyn AdminView>,
    deadline: Duration,
) -> io::Result<AdminServer> {
    // Accept must block: the listener may have been set non-blocking by whoever bound it.
    listener.set_nonblocking(false)?;
    let handle = listener.try_clone()?;
    let stop = Arc::new(StopSignal {
        stopping: AtomicBool::new(false),
        in_flight: Mutex::new((0..THREADS).map(|_| None).collect()),
    });
    let shared = Arc::clone(&stop);
    let thread = std::thread::Builder::new()
        .name("ringway-admin".to_string())
        .spawn(move || {
            let (listener, view, stop) = (&listener, &*view, &*shared);
            std::thread::scope(|scope| {
                for i in 1..THREADS {
                    let spawned = std::thread::Builder::new()
                        .name(format!("ringway-admin{i}"))
                        .spawn_scoped(scope, move || serve(listener, view, deadline, stop, i));
                    if let Err(e) = spawned {
                        warn!("admin: cannot start a helper thread: {e}");
                        break;
                    }
                }
                serve(listener, view, deadline, stop, 0);
            })
        })?;
    Ok(AdminServer {
        thread,
        stop,
        listener: handle,
    })
}

/// Accepts and answers connections until `stop.stopping` is set. `slot` is this thread's
/// number, its place in `stop.in_flight`.
fn serve(
    listener: &TcpListener,
    view: &dyn AdminView,
    deadline: Duration,
    stop: &StopSignal,
    slot: usize,
) {
    let mut last_warning: Option<Instant> = None;
    let mut suppressed = 0u64;
    loop {
        let accepted = listener.accept();
        if let Ok((stream, _)) = &accepted {
            stop.set_in_flight(slot, Some(stream));
        }
        if stop.stopping.load(Ordering::SeqCst) {
            return; // a connection accepted in the meantime is closed unanswered
        }
        match accepted {
            Ok((stream, peer)) => {
                if let Err(e) = handle(stream, view, deadline) {
                    debug!("admin: {peer}: {e}");
                }
                stop.set_in_flight(slot, None);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // ECONNABORTED and friends are per-connection; EMFILE is not: back off either way.
                if last_warning.is_none_or(|at| at.elapsed() >= ACCEPT_WARN_INTERVAL) {
                    warn!("admin: accept failed: {e} ({suppressed} similar since last report)");
                    last_warning = Some(Instant::now());
                    suppressed = 0;
                } else {
                    suppressed += 1;
                }
                std::thread::sleep(ACCEPT_BACKOFF);
            }
        }
    }
}

/// A response: status line parts, content type and body.
struct Response {
    status: u16,
    reason: &'static str,
    content_type: &'static str,
    body: String,
    /// HEAD: send the headers (with the GET body's length) but not the body.
    head_only: bool,
}

impl Response {
    fn text(status: u16, reason: &'static str) -> Response {
        Response {
            status,
            reason,
            content_type: "text/plain; charset=utf-8",
            body: format!("{status} {reason}\n"),
            head_only: false,
        }
    }

    /// A plain-text response whose body is one line.
    fn line(status: u16, reason: &'static str, line: &str) -> Response {
        Response {
            body: format!("{line}\n"),
            ..Response::text(status, reason)
        }
    }
}

fn handle(mut stream: TcpStream, view: &dyn AdminView, deadline: Duration) -> io::Result<()> {
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    // `complete`: nothing more is expected from the client. Otherwise the rest of its request
    // (an oversized head, a body) is drained after the response.
    let (response, complete) = match read_head(&mut stream, deadline) {
        Ok(head) => {
            let response = route(&head, view);
            let complete = response.status != 405;
            (response, complete)
        }
        Err(HeadError::TooLarge) => (
            Response::text(431, "Request Header Fields Too Large"),
            false,
        ),
        Err(HeadError::Malformed) => (Response::text(400, "Bad Request"), false),
        // Timed out, reset, or closed before a full head: nobody to answer.
        Err(HeadError::Io(e)) => return Err(e),
    };
    write_response(&mut stream, &response)?;
    stream.shutdown(Shutdown::Write)?;
    if !complete {
        drain(&mut stream);
    }
    Ok(())
}

enum HeadError {
    TooLarge,
    Malformed,
    Io(io::Error),
}

/// Reads up to the blank line ending the request head, within `deadline` overall.
fn read_head(stream: &mut TcpStream, deadline: Duration) -> Result<Vec<u8>, HeadError> {
    let until = Instant::now() + deadline;
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HeadError::Io(io::ErrorKind::TimedOut.into()));
        }
        stream.set_read_timeout(Some(left)).map_err(HeadError::Io)?;
        let n = match stream.read(&mut chunk) {
            Ok(0) => {
                return Err(HeadError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before the end of the request head",
                )))
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(HeadError::Io(e)),
        };
        // Search only where the terminator can newly appear.
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(&chunk[..n]);
        if let Some(end) = find_head_end(&head[from..]) {
            head.truncate(from + end);
            return Ok(head);
        }
        if head.len() > MAX_REQUEST {
            return Err(HeadError::TooLarge);
        }
        if cannot_be_a_request(&head) {
            // Garbage (a TLS hello, say): answer now rather than wait for a blank line.
            return Err(HeadError::Malformed);
        }
    }
}

/// Whether the bytes so far already rule out a valid request: the method must be uppercase
/// letters up to the first space, and a complete first line must parse.
fn cannot_be_a_request(head: &[u8]) -> bool {
    let method_end = head.iter().position(|&b| b == b' ').unwrap_or(head.len());
    if !head[..method_end].iter().all(u8::is_ascii_uppercase) {
        return true;
    }
    head.contains(&b'\n') && parse_request_line(head).is_none()
}

/// Position just past the blank line (CRLF CRLF, or bare LF LF which lenient parsers accept).
fn find_head_end(bytes: &[u8]) -> Option<usize> {
    (0..bytes.len()).find_map(|i| {
        let rest = &bytes[i..];
        if rest.starts_with(b"\r\n\r\n") {
            Some(i + 4)
        } else if rest.starts_with(b"\n\n") {
            Some(i + 2)
        } else {
            None
        }
    })
}

/// Picks the response for a complete request head.
fn route(head: &[u8], view: &dyn AdminView) -> Response {
    let Some((method, path)) = parse_request_line(head) else {
        return Response::text(400, "Bad Request");
    };
    if method != "GET" && method != "HEAD" {
        return Response::text(405, "Method Not Allowed");
    }
    let path = path.split(['?', '#']).next().unwrap_or(path);
    let mut response = match path {
        "/metrics" => {
            let mut body = String::with_capacity(8 * 1024);
            view.metrics(&mut body);
            Response {
                status: 200,
                reason: "OK",
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                body,
                head_only: false,
            }
        }
        "/backends" => {
            let mut body = String::with_capacity(1024);
            view.backends_json(&mut body);
            Response {
                status: 200,
                reason: "OK",
                content_type: "application/json",
                body,
                head_only: false,
            }
        }
        "/" => {
            let mut body = String::with_capacity(16 * 1024);
            view.status_page(&mut body);
            Response {
                status: 200,
                reason: "OK",
                content_type: "text/html; charset=utf-8",
                body,
                head_only: false,
            }
        }
        "/live" => Response::line(200, "OK", readiness::LIVE),
        "/ready" => {
            let verdict = view.ready();
            let (status, reason) = verdict.status();
            Response::line(status, reason, &verdict.why)
        }
        _ => Response::text(404, "Not Found"),
    };
    response.head_only = method == "HEAD";
    response
}

/// `METHOD SP target SP HTTP/1.x` -> (method, target).
fn parse_request_line(head: &[u8]) -> Option<(&str, &str)> {
    let end = head.iter().position(|&b| b == b'\n')?;
    let line = std::str::from_utf8(&head[..end]).ok()?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    let token = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_uppercase());
    if parts.next().is_some() || !token(method) || !version.starts_with("HTTP/1.") {
        return None;
    }
    target.starts_with('/').then_some((method, target))
}

fn write_response(stream: &mut TcpStream, response: &Response) -> io::Result<()> {
    let allow = if response.status == 405 {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{allow}Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        response.status,
        response.reason,
        response.content_type,
        response.body.len(),
    );
    let mut bytes = head.into_bytes();
    if !response.head_only {
        bytes.extend_from_slice(response.body.as_bytes());
    }
    stream.write_all(&bytes)
}

/// Reads and discards what the client is still sending, briefly and boundedly, so the close
/// that follows is a FIN rather than an RST that could destroy the response in flight.
fn drain(stream: &mut TcpStream) {
    let until = Instant::now() + DRAIN_TIME;
    let mut buf = [0u8; 4096];
    let mut total = 0;
    while total < DRAIN_LIMIT {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => total += n,
        }
    }
}

// ---- /backends JSON --------------------------------------------------------------------------

/// One backend as `/backends` shows it.
#[derive(Clone, Copy, Debug)]
pub struct BackendRow<'a> {
    /// The configured address text (the backend's identity).
    pub name: &'a str,
    /// The resolved address connects go to.
    pub address: SocketAddr,
    pub weight: u32,
    pub backup: bool,
    pub healthy: bool,
    /// Flows relayed through it now.
    pub active: u64,
    /// Flows that have connected to it since start.
    pub total: u64,
}

/// Appends `rows` as a JSON array of
/// `{"name","address","weight","backup","healthy","active","total"}` objects.
pub fn backends_json(rows: &[BackendRow], out: &mut String) {
    use std::fmt::Write as _;
    out.push('[');
    for (i, row) in rows.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"name\":");
        crate::json::push_string(row.name, out);
        let _ = write!(
            out,
            ",\"address\":\"{}\",\"weight\":{},\"backup\":{},\"healthy\":{},\"active\":{},\"total\":{}}}",
            row.address, row.weight, row.backup, row.healthy, row.active, row.total
        );
    }
    out.push(']');
}

#[cfg(test)]
mod tests {
    use super::*;

    struct FakeView;

    impl AdminView for FakeView {
        fn metrics(&self, out: &mut String) {
            out.push_str("# HELP ringway_up h\n# TYPE ringway_up gauge\nringway_up 1\n");
        }
        fn backends_json(&self, out: &mut String) {
            backends_json(
                &[BackendRow {
                    name: "a",
                    address: "127.0.0.1:80".parse().unwrap(),
                    weight: 1,
                    backup: false,
                    healthy: true,
                    active: 0,
                    total: 3,
                }],
                out,
            );
        }
        fn status_page(&self, out: &mut String) {
            out.push_str("<!DOCTYPE html><title>status</title>");
        }

        fn ready(&self) -> Verdict {
            readiness::verdict(false, 0, 1)
        }
    }

    /// Starts a server on an ephemeral loopback port with the given request deadline. It runs
    /// until the test process ends.
    fn start(deadline: Duration) -> SocketAddr {
        let (addr, server) = start_server(deadline);
        std::mem::forget(server);
        addr
    }

    fn start_server(deadline: Duration) -> (SocketAddr, AdminServer) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        (
            addr,
            spawn_with(listener, Arc::new(FakeView), deadline).unwrap(),
        )
    }

    /// Sends `request` and reads the whole response (the server closes after it).
    fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream.write_all(request).unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).unwrap();
        String::from_utf8(response).unwrap()
    }

    fn status(response: &str) -> &str {
        response.split(' ').nth(1).unwrap_or("")
    }

    fn body(response: &str) -> &str {
        response.split_once("\r\n\r\n").map_or("", |(_, b)| b)
    }

    #[test]
    fn serves_metrics_and_backends() {
        let addr = start(REQUEST_DEADLINE);
        let r = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(status(&r), "200", "{r}");
        assert!(r.contains("Content-Type: text/plain; version=0.0.4"), "{r}");
        assert_eq!(
            body(&r),
            "# HELP ringway_up h\n# TYPE ringway_up gauge\nringway_up 1\n"
        );
        assert!(r.contains(&format!("Content-Length: {}\r\n", body(&r).len())));

        let r = exchange(addr, b"GET /backends?pretty HTTP/1.0\r\n\r\n");
        assert_eq!(status(&r), "200", "{r}");
        assert!(r.contains("Content-Type: application/json"), "{r}");
        assert_eq!(
            body(&r),
            r#"[{"name":"a","address":"127.0.0.1:80","weight":1,"backup":false,"healthy":true,"active":0,"total":3}]"#
        );

        let r = exchange(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n");
        assert_eq!(status(&r), "200", "{r}");
        assert_eq!(body(&r), "");
    }

    #[test]
    fn serves_the_status_page_at_the_root_only() {
        let addr = start(REQUEST_DEADLINE);
        let r = exchange(addr, b"GET /?refresh=1 HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(status(&r), "200", "{r}");
        assert!(
            r.contains("Content-Type: text/html; charset=utf-8\r\n"),
            "{r}"
        );
        assert_eq!(body(&r), "<!DOCTYPE html><title>status</title>");
        let r = exchange(addr, b"HEAD / HTTP/1.1\r\n\r\n");
        assert_eq!(status(&r), "200", "{r}");
        assert_eq!(body(&r), "");
        for path in ["/index.html", "//", "/status"] {
            let r = exchange(addr, format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes());
            assert_eq!(status(&r), "404", "{path}: {r}");
        }
        let r = exchange(addr, b"DELETE / HTTP/1.1\r\n\r\n");
        assert_eq!(status(&r), "405", "{r}");
        assert!(r.contains("Allow: GET, HEAD\r\n"), "{r}");
    }

    #[test]
    fn serves_live_and_ready() {
        let addr = start(REQUEST_DEADLINE);
        let r = exchange(addr, b"GET /live HTTP/1.1\r\n\r\n");
        assert_eq!(status(&r), "200", "{r}");
        assert_eq!(body(&r), format!("{}\n", readiness::LIVE));
        // The fake view has no backend up: 503, and the line says why.
        let r = exchange(addr, b"GET /ready HTTP/1.1\r\n\r\n");
        assert_eq!(status(&r), "503", "{r}");
        assert_eq!(body(&r), "not ready: no backend is up (0 of 1)\n");
        let r = exchange(addr, b"HEAD /ready HTTP/1.1\r\n\r\n");
        assert_eq!(status(&r), "503", "{r}");
        assert_eq!(body(&r), "");
        let r = exchange(addr, b"POST /ready HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(status(&r), "405", "{r}");
    }

    #[test]
    fn unknown_path_method_and_garbage() {
        let addr = start(REQUEST_DEADLINE);
        let r = exchange(addr, b"GET /nope HTTP/1.1\r\n\r\n");
        assert_eq!(status(&r), "404", "{r}");
        let r = exchange(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(status(&r), "405", "{r}");
        assert!(r.contains("Allow: GET, HEAD\r\n"), "{r}");
        let r = exchange(addr, b"hello\r\n\r\n");
        assert_eq!(status(&r), "400", "{r}");
        let r = exchange(addr, b"GET /metrics SPDY/3\r\n\r\n");
        assert_eq!(status(&r), "400", "{r}");
        let r = exchange(
            addr,
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x00\x00\x00\x00\x00\x00",
        );
        assert_eq!(status(&r), "400", "{r}");
    }

    #[test]
    fn oversized_request_is_rejected() {
        let addr = start(REQUEST_DEADLINE);
        let mut request = b"GET /metrics HTTP/1.1\r\n".to_vec();
        while request.len() <= 2 * MAX_REQUEST {
            request.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        request.extend_from_slice(b"\r\n");
        let r = exchange(addr, &request);
        assert_eq!(status(&r), "431", "{r}");
    }

    #[test]
    fn silent_clients_do_not_block_others() {
        // More silent clients than threads: each is dropped when its deadline passes, after
        // which the real request is served.
        let addr = start(Duration::from_millis(200));
        let silent: Vec<TcpStream> = (0..THREADS + 1)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        let r = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
        assert_eq!(status(&r), "200", "{r}");
        // The silent ones were closed without a response.
        for mut s in silent {
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn request_line_parsing() {
        assert_eq!(
            parse_request_line(b"GET /metrics HTTP/1.1\r\n\r\n"),
            Some(("GET", "/metrics"))
        );
        assert_eq!(parse_request_line(b"GET /metrics\r\n\r\n"), None);
        assert_eq!(parse_request_line(b"GET  /metrics HTTP/1.1\r\n"), None);
        assert_eq!(parse_request_line(b"get /metrics HTTP/1.1\r\n"), None);
        assert_eq!(parse_request_line(b"GET * HTTP/1.1\r\n"), None);
        assert_eq!(parse_request_line(b"GET /\xff HTTP/1.1\r\n"), None);
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n\r\nbody"), Some(18));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\n\n"), Some(16));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n"), None);
        assert!(!cannot_be_a_request(b"GE"));
        assert!(!cannot_be_a_request(b"GET /met"));
        assert!(!cannot_be_a_request(b"GET /metrics HTTP/1.1\r\nHost"));
        assert!(cannot_be_a_request(b"\x16\x03"));
        assert!(cannot_be_a_request(b"GET /metrics\r\n"));
    }

    /// Joins `thread` (without panicking) within 10 s, or fails with `why`.
    fn assert_ends_within_10s(thread: std::thread::JoinHandle<()>, why: &str) {
        let (joined, ended) = std::sync::mpsc::channel();
        std::thread::spawn(move || joined.send(thread.join().is_ok()));
        assert_eq!(
            ended.recv_timeout(Duration::from_secs(10)),
            Ok(true),
            "{why}"
        );
    }

    #[test]
    fn stop_ends_every_thread_blocked_in_accept() {
        let (addr, server) = start_server(REQUEST_DEADLINE);
        let r = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
        assert_eq!(status(&r), "200", "{r}");
        // Every thread was blocked in accept: all of them end, and promptly.
        assert_ends_within_10s(server.stop(), "admin threads still running 10 s after stop");
    }

    #[test]
    fn stop_ends_a_request_in_progress_without_waiting_for_its_deadline() {
        let (addr, server) = start_server(Duration::from_secs(600));
        let mut silent = TcpStream::connect(addr).unwrap();
        silent.write_all(b"GET /met").unwrap();
        // Wait until a thread has taken the connection and waits for the rest of the head.
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.stop.in_flight().iter().all(Option::is_none) {
            assert!(
                Instant::now() < deadline,
                "the connection was never accepted"
            );
            std::thread::sleep(Duration::from_millis(1)); // pacing of the check, not a wait
        }
        assert_ends_within_10s(
            server.stop(),
            "an admin thread still waits for the silent client's request 10 s after stop",
        );
        silent
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut rest = Vec::new();
        let _ = silent.read_to_end(&mut rest);
        assert!(rest.is_empty(), "answered: {rest:?}");
    }
}
