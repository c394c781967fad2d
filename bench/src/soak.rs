//! Chaos soak: a mixed, self-checking load through a proxy while something else (scripts/soak.sh)
//! kills and restarts backends, rewrites the backends file and sends SIGHUP; and the backend it
//! talks to.
//!
//! # The soak backend (`ringway-load soak-serve`)
//!
//! Thread per connection, blocking. On accept it writes its name and `\n` (so the client knows
//! which backend served the flow, which is how errors are matched with the backend kills), then
//! serves commands of 17 bytes, `op` then two little-endian u64 `a`, `b`:
//!
//! | op | does |
//! |---|---|
//! | `E` | reads `a` bytes and writes them back as they come |
//! | `D` | writes `a` bytes of the pattern at offset `b` |
//! | `U` | reads `a` bytes, checks them against the pattern at offset `b`, answers `K` or `X` |
//! | `H` | reads to EOF (the client half-closed), then writes `a` pattern bytes from `b` and closes |
//! | `R` | closes with an RST (SO_LINGER 0) |
//!
//! EOF between commands: shut down writing and close (a clean end).
//!
//! # The soak client (`ringway-load soak`)
//!
//! Threads of four kinds, each looping until the deadline (and each bounded in count):
//! - **rr**: persistent connections sending `E` messages of random size at a fixed total rate;
//!   a broken connection is recorded and replaced.
//! - **churn**: a new connection per exchange: mostly one small echo then a half-close and a
//!   clean EOF; some end in a client RST mid-message; some ask the backend for an RST (which
//!   must reach the client as a reset); some half-close first and then receive (`H`).
//! - **bulk**: long transfers down (`D`), up (`U`) and both ways (`E` with a writer thread);
//!   some downloads read slowly (backpressure), some end in a client RST mid-download.
//!
//! Every byte is checked. A flow that fails is kept with its backend and its start and end
//! time; at the end the chaos log (`<unix ms> <event> <backend>` lines) decides whether the
//! failure was *expected*: its backend (or, before the greeting, any backend) was killed while it
//! ran. Wrong bytes are never expected; nor is a failed connect to the proxy.
//!
//! While the load runs, a thread samples the proxy's RSS, descriptors and CPU from /proc. The
//! report compares the second half of the run with the first (after a warm-up) and checks that
//! once the load stops the proxy returns to its idle descriptor count and to zero active flows.

use crate::payload::{check_stream, window};
use socket2::{SockRef, Socket};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const OP_ECHO: u8 = b'E';
pub const OP_DOWN: u8 = b'D';
pub const OP_UP: u8 = b'U';
pub const OP_HALF: u8 = b'H';
pub const OP_RESET: u8 = b'R';

/// Milliseconds since the Unix epoch: the clock the chaos log uses too.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn header(op: u8, a: u64, b: u64) -> [u8; 17] {
    let mut h = [0u8; 17];
    h[0] = op;
    h[1..9].copy_from_slice(&a.to_le_bytes());
    h[9..17].copy_from_slice(&b.to_le_bytes());
    h
}

/// Writes `len` pattern bytes starting at stream offset `offset`.
fn write_stream(w: &mut impl Write, offset: u64, len: u64) -> io::Result<()> {
    let mut pos = 0u64;
    while pos < len {
        let chunk = window(offset + pos, (len - pos).min(64 * 1024) as usize);
        w.write_all(chunk)?;
        pos += chunk.len() as u64;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Backend
// ---------------------------------------------------------------------------------------------

/// Serves the soak protocol on `listen` until `stop` (or `deadline`). Prints
/// `listening on ADDR mode=soak name=NAME` once it accepts.
pub fn serve(
    listen: SocketAddr,
    name: String,
    stop: Arc<AtomicBool>,
    deadline: Option<Instant>,
) -> io::Result<()> {
    let sock = Socket::new(
        socket2::Domain::for_address(listen),
        socket2::Type::STREAM,
        None,
    )?;
    // Restarted on the same port while connections of the killed process are in TIME_WAIT.
    sock.set_reuse_address(true)?;
    sock.bind(&listen.into())?;
    sock.listen(1024)?;
    let listener: TcpListener = sock.into();
    println!(
        "listening on {} mode=soak name={name}",
        listener.local_addr()?
    );
    io::stdout().flush()?;
    let name: Arc<str> = name.into();
    while !stop.load(Ordering::Relaxed) && deadline.is_none_or(|d| Instant::now() < d) {
        // Wait for a connection at most 100 ms, so that `stop` is seen.
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll reads and writes one pollfd that lives across the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, 100) };
        if ready <= 0 {
            continue;
        }
        let Ok((stream, _)) = listener.accept() else {
            continue;
        };
        let name = name.clone();
        // A failed spawn drops the connection: the client sees it as an error, which is right.
        let _ = thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || {
                let _ = serve_conn(stream, &name);
            });
    }
    Ok(())
}

fn serve_conn(mut s: TcpStream, name: &str) -> io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    s.set_write_timeout(Some(Duration::from_secs(120)))?;
    s.write_all(format!("{name}\n").as_bytes())?;
    const BUF: usize = 64 * 1024;
    let mut buf = vec![0u8; BUF];
    loop {
        let mut h = [0u8; 17];
        // EOF before a command: the client is done.
        match s.read(&mut h[..1])? {
            0 => {
                s.shutdown(Shutdown::Write)?;
                return Ok(());
            }
            _ => s.read_exact(&mut h[1..])?,
        }
        let a = u64::from_le_bytes(h[1..9].try_into().unwrap());
        let b = u64::from_le_bytes(h[9..17].try_into().unwrap());
        match h[0] {
            OP_ECHO => {
                let mut left = a;
                while left > 0 {
                    let n = s.read(&mut buf[..left.min(BUF as u64) as usize])?;
                    if n == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    s.write_all(&buf[..n])?;
                    left -= n as u64;
                }
            }
            OP_DOWN => write_stream(&mut s, b, a)?,
            OP_UP => {
                let mut pos = 0u64;
                let mut good = true;
                while pos < a {
                    let n = s.read(&mut buf[..(a - pos).min(BUF as u64) as usize])?;
                    if n == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    good &= check_stream(b + pos, &buf[..n]).is_ok();
                    pos += n as u64;
                }
                s.write_all(if good { b"K" } else { b"X" })?;
            }
            OP_HALF => {
                let extra = s.read(&mut buf)?;
                if extra != 0 {
                    // Bytes after an H command break the protocol: end without answering.
                    return Err(io::ErrorKind::InvalidData.into());
                }
                write_stream(&mut s, b, a)?;
                s.shutdown(Shutdown::Write)?;
                return Ok(());
            }
            OP_RESET => {
                SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
                return Ok(());
            }
            _ => return Err(io::ErrorKind::InvalidData.into()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct SoakConfig {
    pub target: SocketAddr,
    pub duration: Duration,
    /// Requests per second over all rr connections.
    pub rate: f64,
    pub rr_conns: usize,
    /// Connections per second per churn thread.
    pub churn_rate: f64,
    pub churn_threads: usize,
    pub bulk_threads: usize,
    /// Largest bulk transfer.
    pub bulk_max: u64,
    /// Client source addresses, one picked at random per connection (so that a proxy hashing
    /// the client address spreads the flows over every backend). Empty: the kernel's choice.
    pub sources: Vec<IpAddr>,
    pub seed: u64,
    /// Timeout of each connect, read and write.
    pub timeout: Duration,
}

/// A flow that did not end as it should have.
#[derive(Clone, Debug)]
pub struct FlowError {
    pub kind: &'static str,
    /// The backend's name from its greeting, if it got that far.
    pub backend: Option<String>,
    pub start_ms: u64,
    pub end_ms: u64,
    pub detail: String,
}

/// Counters of a whole run (shared by the threads).
#[derive(Default)]
pub struct Counters {
    pub flows_ok: AtomicU64,
    pub requests_ok: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    pub client_resets: AtomicU64,
    pub backend_resets: AtomicU64,
    pub half_closes: AtomicU64,
    pub bulk_flows: AtomicU64,
    pub slow_reads: AtomicU64,
    pub errors: Mutex<Vec<FlowError>>,
}

impl Counters {
    fn up(&self, n: u64) {
        self.bytes_up.fetch_add(n, Ordering::Relaxed);
    }
    fn down(&self, n: u64) {
        self.bytes_down.fetch_add(n, Ordering::Relaxed);
    }
}

/// splitmix64.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// What went wrong in a flow: a kind for the table, and the details.
struct Failure {
    kind: &'static str,
    detail: String,
}

fn io_kind(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::ConnectionReset => "reset",
        io::ErrorKind::UnexpectedEof => "early_eof",
        io::ErrorKind::BrokenPipe => "broken_pipe",
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "timeout",
        _ => "io_error",
    }
}

fn fail(what: &str, e: io::Error) -> Failure {
    Failure {
        kind: io_kind(&e),
        detail: format!("{what}: {e}"),
    }
}

/// A connection through the proxy, after the backend's greeting.
struct Conn {
    s: TcpStream,
    backend: Option<String>,
    start_ms: u64,
}

impl Conn {
    fn open(cfg: &SoakConfig, source: Option<IpAddr>) -> (Option<Conn>, Option<Failure>, u64) {
        let start_ms = unix_ms();
        let connected = Socket::new(
            socket2::Domain::for_address(cfg.target),
            socket2::Type::STREAM,
            None,
        )
        .and_then(|sock| {
            if let Some(ip) = source {
                sock.bind(&SocketAddr::new(ip, 0).into())?;
            }
            sock.connect_timeout(&cfg.target.into(), cfg.timeout)?;
            Ok(TcpStream::from(sock))
        });
        let s = match connected {
            Ok(s) => s,
            Err(e) => {
                return (
                    None,
                    Some(Failure {
                        kind: "connect",
                        detail: format!("connect to the proxy: {e}"),
                    }),
                    start_ms,
                )
            }
        };
        let _ = s.set_nodelay(true);
        let _ = s.set_read_timeout(Some(cfg.timeout));
        let _ = s.set_write_timeout(Some(cfg.timeout));
        let mut c = Conn {
            s,
            backend: None,
            start_ms,
        };
        match read_greeting(&mut c.s) {
            Ok(name) => {
                c.backend = Some(name);
                (Some(c), None, start_ms)
            }
            Err(f) => (
                None,
                Some(Failure {
                    kind: "no_greeting",
                    detail: f.detail,
                }),
                start_ms,
            ),
        }
    }

    /// One echo exchange of `len` bytes at stream offset `key` (small: written, then read).
    fn echo(&mut self, key: u64, len: u64, n: &Counters) -> Result<(), Failure> {
        let mut msg = Vec::with_capacity(17 + len as usize);
        msg.extend_from_slice(&header(OP_ECHO, len, 0));
        msg.extend_from_slice(window(key, len as usize));
        self.s.write_all(&msg).map_err(|e| fail("echo: write", e))?;
        n.up(len);
        let mut back = vec![0u8; len as usize];
        self.s
            .read_exact(&mut back)
            .map_err(|e| fail("echo: read", e))?;
        n.down(len);
        check_stream(key, &back).map_err(|at| Failure {
            kind: "wrong_bytes",
            detail: format!("echo of {len} bytes: wrong byte at {at}"),
        })
    }

    /// Half-closes and expects a clean EOF with nothing more.
    fn finish(&mut self) -> Result<(), Failure> {
        self.s
            .shutdown(Shutdown::Write)
            .map_err(|e| fail("half-close", e))?;
        let mut extra = [0u8; 256];
        match self.s.read(&mut extra) {
            Ok(0) => Ok(()),
            Ok(k) => Err(Failure {
                kind: "wrong_bytes",
                detail: format!("{k} bytes after the last answer"),
            }),
            Err(e) => Err(fail("waiting for the end", e)),
        }
    }
}

fn read_greeting(s: &mut TcpStream) -> Result<String, Failure> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match s.read(&mut byte) {
            Ok(0) => {
                return Err(Failure {
                    kind: "no_greeting",
                    detail: "EOF before the greeting".into(),
                })
            }
            Ok(_) if byte[0] == b'\n' => return Ok(String::from_utf8_lossy(&line).into_owned()),
            Ok(_) if line.len() < 64 => line.push(byte[0]),
            Ok(_) => {
                return Err(Failure {
                    kind: "wrong_bytes",
                    detail: "greeting longer than 64 bytes".into(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(fail("greeting", e)),
        }
    }
}

/// Reads exactly `len` pattern bytes from `offset`, checking them.
fn read_stream(s: &mut TcpStream, offset: u64, len: u64, n: &Counters) -> Result<(), Failure> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut pos = 0u64;
    while pos < len {
        let want = (len - pos).min(buf.len() as u64) as usize;
        let k = s
            .read(&mut buf[..want])
            .map_err(|e| fail(&format!("read at {pos} of {len}"), e))?;
        if k == 0 {
            return Err(Failure {
                kind: "early_eof",
                detail: format!("EOF at {pos} of {len}"),
            });
        }
        check_stream(offset + pos, &buf[..k]).map_err(|at| Failure {
            kind: "wrong_bytes",
            detail: format!("wrong byte at {} of {len}", pos + at as u64),
        })?;
        pos += k as u64;
        n.down(k as u64);
    }
    Ok(())
}

struct Run<'a> {
    cfg: &'a SoakConfig,
    n: &'a Counters,
    end: Instant,
}

impl Run<'_> {
    fn record(&self, backend: Option<String>, start_ms: u64, f: Failure) {
        let e = FlowError {
            kind: f.kind,
            backend,
            start_ms,
            end_ms: unix_ms(),
            detail: f.detail,
        };
        self.n
            .errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(e);
    }

    /// Opens a connection, or records why it could not.
    fn open(&self, rng: &mut Rng) -> Option<Conn> {
        let sources = &self.cfg.sources;
        let source =
            (!sources.is_empty()).then(|| sources[(rng.next() % sources.len() as u64) as usize]);
        let (conn, failure, start_ms) = Conn::open(self.cfg, source);
        if let Some(f) = failure {
            self.record(None, start_ms, f);
        }
        conn
    }

    /// Sleeps until `at` or the end of the run, whichever is first (load pacing only).
    fn pace(&self, at: Instant) {
        let until = at.min(self.end);
        let now = Instant::now();
        if until > now {
            thread::sleep(until - now);
        }
    }

    fn rr(&self, id: u64) {
        let mut rng = Rng(self.cfg.seed ^ (0x5252 << 32) ^ id);
        let interval = Duration::from_secs_f64(self.cfg.rr_conns as f64 / self.cfg.rate);
        // Spread the connections' schedules over one interval.
        let mut next = Instant::now() + interval.mul_f64(rng.range(0, 1000) as f64 / 1000.0);
        let max_requests = (self.cfg.duration.as_secs_f64() / interval.as_secs_f64()) as u64 + 2;
        let mut conn: Option<Conn> = None;
        for _ in 0..max_requests {
            self.pace(next);
            if Instant::now() >= self.end {
                break;
            }
            // Fixed rate: the next send is scheduled from the last schedule, not from now; a
            // late request does not make the following ones bunch up beyond one interval.
            next = (next + interval).max(Instant::now());
            if conn.is_none() {
                conn = self.open(&mut rng);
            }
            let Some(c) = conn.as_mut() else { continue };
            let len = rng.range(1, 2048);
            match c.echo(rng.next() >> 16, len, self.n) {
                Ok(()) => {
                    self.n.requests_ok.fetch_add(1, Ordering::Relaxed);
                }
                Err(f) => {
                    let c = conn.take().expect("present");
                    self.record(c.backend, c.start_ms, f);
                }
            }
        }
        if let Some(mut c) = conn {
            match c.finish() {
                Ok(()) => {
                    self.n.flows_ok.fetch_add(1, Ordering::Relaxed);
                }
                Err(f) => self.record(c.backend, c.start_ms, f),
            }
        }
    }

    fn churn(&self, id: u64) {
        let mut rng = Rng(self.cfg.seed ^ (0x4348 << 32) ^ id);
        let interval = Duration::from_secs_f64(1.0 / self.cfg.churn_rate);
        let max_flows = (self.cfg.duration.as_secs_f64() * self.cfg.churn_rate) as u64 + 2;
        let mut next = Instant::now();
        for _ in 0..max_flows {
            self.pace(next);
            if Instant::now() >= self.end {
                break;
            }
            next = (next + interval).max(Instant::now());
            let Some(mut c) = self.open(&mut rng) else {
                continue;
            };
            let roll = rng.range(0, 99);
            let result = if roll < 70 {
                c.echo(rng.next() >> 16, rng.range(1, 4096), self.n)
                    .and_then(|()| c.finish())
            } else if roll < 80 {
                self.client_reset(c, &mut rng);
                continue;
            } else if roll < 90 {
                self.backend_reset(&mut c)
            } else {
                self.half_close(&mut c, &mut rng)
            };
            match result {
                Ok(()) => {
                    self.n.flows_ok.fetch_add(1, Ordering::Relaxed);
                }
                Err(f) => self.record(c.backend, c.start_ms, f),
            }
        }
    }

    /// Sends part of an echo message, then resets: the proxy must pass the reset on and free the
    /// flow; nothing to check on this side.
    fn client_reset(&self, mut c: Conn, rng: &mut Rng) {
        let len = rng.range(100, 8192);
        let mut msg = header(OP_ECHO, len, 0).to_vec();
        msg.extend_from_slice(window(rng.next() >> 16, (len / 2) as usize));
        let _ = c.s.write_all(&msg);
        let _ = SockRef::from(&c.s).set_linger(Some(Duration::ZERO));
        drop(c);
        self.n.client_resets.fetch_add(1, Ordering::Relaxed);
    }

    /// Asks the backend for an RST; the client must see a reset, not an EOF.
    fn backend_reset(&self, c: &mut Conn) -> Result<(), Failure> {
        c.s.write_all(&header(OP_RESET, 0, 0))
            .map_err(|e| fail("asking for a reset", e))?;
        let mut byte = [0u8; 1];
        match c.s.read(&mut byte) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                self.n.backend_resets.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Ok(0) => Err(Failure {
                kind: "reset_became_eof",
                detail: "the backend reset the flow; the client saw a clean EOF".into(),
            }),
            Ok(_) => Err(Failure {
                kind: "wrong_bytes",
                detail: "bytes instead of a reset".into(),
            }),
            Err(e) => Err(fail("waiting for the reset", e)),
        }
    }

    /// Half-closes first, then receives: the client's EOF must reach the backend while the
    /// other direction keeps flowing.
    fn half_close(&self, c: &mut Conn, rng: &mut Rng) -> Result<(), Failure> {
        let len = rng.range(1, 256 * 1024);
        let offset = rng.next() >> 16;
        c.s.write_all(&header(OP_HALF, len, offset))
            .and_then(|()| c.s.shutdown(Shutdown::Write))
            .map_err(|e| fail("half-close request", e))?;
        read_stream(&mut c.s, offset, len, self.n)?;
        let mut extra = [0u8; 64];
        match c.s.read(&mut extra) {
            Ok(0) => {
                self.n.half_closes.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Ok(k) => Err(Failure {
                kind: "wrong_bytes",
                detail: format!("{k} bytes after the half-close answer"),
            }),
            Err(e) => Err(fail("end after the half-close answer", e)),
        }
    }

    fn bulk(&self, id: u64) {
        let mut rng = Rng(self.cfg.seed ^ (0x424B << 32) ^ id);
        // Paced, so that the load is the same in the first and the second half of the run (the
        // growth check compares them): a new bulk flow at most every BULK_EVERY per thread.
        const BULK_EVERY: Duration = Duration::from_millis(250);
        let max_flows = (self.cfg.duration.as_millis() / BULK_EVERY.as_millis()) as u64 + 1;
        let mut next = Instant::now();
        for _ in 0..max_flows {
            self.pace(next);
            if Instant::now() >= self.end {
                break;
            }
            next = (next + BULK_EVERY).max(Instant::now());
            let Some(mut c) = self.open(&mut rng) else {
                continue;
            };
            if rng.range(0, 9) == 0 {
                self.abort_download(c, &mut rng);
                continue;
            }
            let result = self.one_bulk(&mut c, &mut rng).and_then(|()| c.finish());
            match result {
                Ok(()) => {
                    self.n.flows_ok.fetch_add(1, Ordering::Relaxed);
                    self.n.bulk_flows.fetch_add(1, Ordering::Relaxed);
                }
                Err(f) => self.record(c.backend, c.start_ms, f),
            }
        }
    }

    /// Asks for a long download, reads part of it, then resets: the proxy must drop the flow
    /// with its buffers full and in flight, and stay fine.
    fn abort_download(&self, mut c: Conn, rng: &mut Rng) {
        let len = self.cfg.bulk_max.max(64 * 1024);
        let offset = rng.next() >> 16;
        let part = rng.range(1, len / 2);
        // Whatever fails before our reset is a failure of the flow like any other.
        let read =
            c.s.write_all(&header(OP_DOWN, len, offset))
                .map_err(|e| fail("download request", e))
                .and_then(|()| read_stream(&mut c.s, offset, part, self.n));
        let _ = SockRef::from(&c.s).set_linger(Some(Duration::ZERO));
        match read {
            Ok(()) => {
                self.n.client_resets.fetch_add(1, Ordering::Relaxed);
            }
            Err(f) => self.record(c.backend.take(), c.start_ms, f),
        }
        drop(c);
    }

    /// One to three transfers of random size and direction on one connection.
    fn one_bulk(&self, c: &mut Conn, rng: &mut Rng) -> Result<(), Failure> {
        for _ in 0..rng.range(1, 3) {
            let len = rng.range(64 * 1024, self.cfg.bulk_max.max(64 * 1024));
            let offset = rng.next() >> 16;
            match rng.range(0, 3) {
                3 => {
                    // A slow reader: at most 16 KiB every 2 ms (8 MiB/s), far below what the
                    // backend sends, so the proxy must stop reading from the backend and resume
                    // (its memory per flow is bounded; the RSS check would see it otherwise).
                    let len = len.min(2 << 20);
                    c.s.write_all(&header(OP_DOWN, len, offset))
                        .map_err(|e| fail("download request", e))?;
                    let mut pos = 0;
                    while pos < len {
                        let chunk = (len - pos).min(16 * 1024);
                        read_stream(&mut c.s, offset + pos, chunk, self.n).map_err(|f| {
                            Failure {
                                kind: f.kind,
                                detail: format!("slow download at {pos} of {len}: {}", f.detail),
                            }
                        })?;
                        pos += chunk;
                        thread::sleep(Duration::from_millis(2)); // pacing the slow reader
                    }
                    self.n.slow_reads.fetch_add(1, Ordering::Relaxed);
                }
                0 => {
                    c.s.write_all(&header(OP_DOWN, len, offset))
                        .map_err(|e| fail("download request", e))?;
                    read_stream(&mut c.s, offset, len, self.n)?;
                }
                1 => {
                    c.s.write_all(&header(OP_UP, len, offset))
                        .and_then(|()| write_stream(&mut c.s, offset, len))
                        .map_err(|e| fail("upload", e))?;
                    self.n.up(len);
                    let mut verdict = [0u8; 1];
                    c.s.read_exact(&mut verdict)
                        .map_err(|e| fail("upload verdict", e))?;
                    if verdict[0] != b'K' {
                        return Err(Failure {
                            kind: "wrong_bytes",
                            detail: format!("the backend got wrong bytes in a {len}-byte upload"),
                        });
                    }
                }
                _ => {
                    // Both ways at once: a writer thread, and this one reading the echo.
                    c.s.write_all(&header(OP_ECHO, len, 0))
                        .map_err(|e| fail("echo request", e))?;
                    let mut w = c.s.try_clone().map_err(|e| fail("clone", e))?;
                    let writer = thread::Builder::new()
                        .stack_size(128 * 1024)
                        .spawn(move || write_stream(&mut w, offset, len))
                        .map_err(|e| fail("spawn", e))?;
                    let read = read_stream(&mut c.s, offset, len, self.n);
                    let written = writer
                        .join()
                        .unwrap_or_else(|_| Err(io::Error::other("writer thread panicked")));
                    read?;
                    written.map_err(|e| fail("echo: write", e))?;
                    self.n.up(len);
                }
            }
        }
        Ok(())
    }
}

/// Runs the load until `cfg.duration` has passed; returns the counters.
pub fn run(cfg: &SoakConfig) -> Counters {
    let n = Counters::default();
    let run = Run {
        cfg,
        n: &n,
        end: Instant::now() + cfg.duration,
    };
    thread::scope(|scope| {
        let run = &run;
        for i in 0..cfg.rr_conns {
            thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn_scoped(scope, move || run.rr(i as u64))
                .expect("spawn an rr thread");
        }
        for i in 0..cfg.churn_threads {
            thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn_scoped(scope, move || run.churn(i as u64))
                .expect("spawn a churn thread");
        }
        for i in 0..cfg.bulk_threads {
            thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn_scoped(scope, move || run.bulk(i as u64))
                .expect("spawn a bulk thread");
        }
    });
    n
}

// ---------------------------------------------------------------------------------------------
// Chaos log and classification
// ---------------------------------------------------------------------------------------------

/// One line of the chaos log: `<unix ms> <event> [<backend>]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChaosEvent {
    pub at_ms: u64,
    pub event: String,
    pub backend: Option<String>,
}

pub fn parse_chaos_log(text: &str) -> Vec<ChaosEvent> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let at_ms = w.next()?.parse().ok()?;
            let event = w.next()?.to_string();
            Some(ChaosEvent {
                at_ms,
                event,
                backend: w.next().map(str::to_string),
            })
        })
        .collect()
}

/// How close (ms) a kill must be to a flow's life for the flow's failure to be blamed on it:
/// the kill is seen by the flow a little after it happens, and the log's timestamp is taken a
/// little before or after the signal.
pub const BLAME_MARGIN_MS: u64 = 1500;

/// Whether `e` is explained by the chaos: a `kill` of its backend (or of any backend, if the
/// flow failed before learning its backend) while it ran. Wrong bytes and failed connects to the
/// proxy never are.
pub fn is_expected(e: &FlowError, chaos: &[ChaosEvent]) -> bool {
    if matches!(e.kind, "wrong_bytes" | "connect") {
        return false;
    }
    chaos.iter().any(|c| {
        c.event == "kill"
            && c.at_ms + BLAME_MARGIN_MS >= e.start_ms
            && c.at_ms <= e.end_ms + BLAME_MARGIN_MS
            && match &e.backend {
                Some(b) => c.backend.as_deref() == Some(b.as_str()),
                None => true,
            }
    })
}

// ---------------------------------------------------------------------------------------------
// Resource samples and the trend
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    /// Seconds since the load started.
    pub t: f64,
    pub rss_kb: u64,
    pub fds: u64,
    /// utime + stime, clock ticks.
    pub cpu_ticks: u64,
}

/// Reads RSS, descriptor count and CPU ticks of `pid`; `None` if it is gone.
pub fn sample(pid: u32, t: f64) -> Option<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name: state is the 1st, utime the 12th.
    let rest = stat.rsplit_once(") ")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let cpu_ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(Sample {
        t,
        rss_kb,
        fds,
        cpu_ticks,
    })
}

fn median(mut v: Vec<u64>) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[v.len() / 2]
}

/// The growth check: drop the first `warmup` fraction of the samples, split the rest in two
/// halves, and call it growth when both the median and the minimum of the second half exceed
/// those of the first by more than `rel` (fraction) plus `abs`. A leak lifts the whole second
/// half; a burst of buffers in use lifts some samples (the median, maybe) but not the floor.
/// Returns (first median, second median, ok).
pub fn trend(
    samples: &[Sample],
    warmup: f64,
    value: impl Fn(&Sample) -> u64,
    rel: f64,
    abs: u64,
) -> (u64, u64, bool) {
    let skip = (samples.len() as f64 * warmup) as usize;
    let warm = &samples[skip.min(samples.len())..];
    let mid = warm.len() / 2;
    let (a, b) = (&warm[..mid], &warm[mid..]);
    let first = median(a.iter().map(&value).collect());
    let second = median(b.iter().map(&value).collect());
    let floor = |half: &[Sample]| half.iter().map(&value).min().unwrap_or(0);
    let grew = |from: u64, to: u64| to as f64 > from as f64 * (1.0 + rel) + abs as f64;
    let ok = warm.len() < 4 || !(grew(first, second) && grew(floor(a), floor(b)));
    (first, second, ok)
}

// ---------------------------------------------------------------------------------------------
// The admin endpoint and the access log
// ---------------------------------------------------------------------------------------------

/// `GET path` on the admin endpoint; the body.
pub fn http_get(addr: SocketAddr, path: &str) -> io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}

/// Sums of a metric's samples by the value of one label (`""` key for unlabelled samples).
pub fn metric_by_label(text: &str, name: &str, label: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, labels) = series.split_once('{').unwrap_or((series, ""));
        if n != name {
            continue;
        }
        let key = labels
            .trim_end_matches('}')
            .split(',')
            .find_map(|kv| kv.strip_prefix(&format!("{label}=")))
            .map(|v| v.trim_matches('"').to_string())
            .unwrap_or_default();
        *out.entry(key).or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
    }
    out
}

/// Access-log lines by their `reason` field.
pub fn access_log_reasons(text: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let reason = line
            .split("\"reason\":\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or("(none)");
        *out.entry(reason.to_string()).or_insert(0) += 1;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The whole soak: load, sampling, end checks, report
// ---------------------------------------------------------------------------------------------

pub struct SoakChecks {
    pub proxy_pid: Option<u32>,
    pub admin: Option<SocketAddr>,
    pub chaos_log: Option<PathBuf>,
    pub access_log: Option<PathBuf>,
    pub sample_every: Duration,
}

/// Runs the load with sampling, waits for the proxy to settle, prints the report; returns
/// whether the soak passed.
pub fn soak(cfg: &SoakConfig, checks: &SoakChecks, out: &mut String) -> bool {
    let started = Instant::now();
    let idle_before = checks.proxy_pid.and_then(|p| sample(p, 0.0));
    let samples = Arc::new(Mutex::new(Vec::new()));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = checks.proxy_pid.map(|pid| {
        let (samples, done, every) = (samples.clone(), done.clone(), checks.sample_every);
        thread::spawn(move || {
            let mut next = Instant::now();
            while !done.load(Ordering::Relaxed) {
                if let Some(s) = sample(pid, started.elapsed().as_secs_f64()) {
                    samples.lock().unwrap().push(s);
                }
                next += every;
                // Pacing the sampler; `done` is checked every 100 ms so the end is prompt.
                while !done.load(Ordering::Relaxed) && Instant::now() < next {
                    thread::sleep(Duration::from_millis(100).min(every));
                }
            }
        })
    });
    let counters = run(cfg);
    done.store(true, Ordering::Relaxed);
    if let Some(t) = sampler {
        let _ = t.join();
    }
    let load_secs = started.elapsed().as_secs_f64();
    let samples = samples.lock().unwrap().clone();

    let mut problems: Vec<String> = Vec::new();

    // After the load: no active flows, descriptors back to idle (bounded wait for both).
    let mut metrics_text = String::new();
    if let Some(admin) = checks.admin {
        let deadline = Instant::now() + Duration::from_secs(15);
        let active = loop {
            metrics_text = http_get(admin, "/metrics").unwrap_or_default();
            let active: f64 = metric_by_label(&metrics_text, "ringway_flows_active", "worker")
                .values()
                .sum();
            if metrics_text.is_empty() || active == 0.0 || Instant::now() >= deadline {
                break active;
            }
            thread::sleep(Duration::from_millis(100));
        };
        if metrics_text.is_empty() {
            problems.push("the admin endpoint did not answer".into());
        } else if active != 0.0 {
            problems.push(format!(
                "{active} flows still active 15 s after the load ended"
            ));
        }
    }
    let mut idle_after = None;
    if let (Some(pid), Some(before)) = (checks.proxy_pid, idle_before) {
        // Health checks and this process's scrapes hold a descriptor or two for a moment.
        let slack = 4;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            idle_after = sample(pid, started.elapsed().as_secs_f64());
            match idle_after {
                None => break,
                Some(s) if s.fds <= before.fds + slack => break,
                Some(_) if Instant::now() >= deadline => break,
                Some(_) => thread::sleep(Duration::from_millis(100)),
            }
        }
        match idle_after {
            None => problems.push("the proxy process is gone".into()),
            Some(s) if s.fds > before.fds + slack => problems.push(format!(
                "descriptors after the load: {} (idle before: {}): a leak",
                s.fds, before.fds
            )),
            Some(_) => {}
        }
    }

    let chaos = checks
        .chaos_log
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .map(|t| parse_chaos_log(&t))
        .unwrap_or_default();
    let errors = counters.errors.lock().unwrap().clone();
    let mut by_kind: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    let mut unexpected = Vec::new();
    for e in &errors {
        let slot = by_kind.entry(e.kind).or_default();
        if is_expected(e, &chaos) {
            slot.0 += 1;
        } else {
            slot.1 += 1;
            unexpected.push(e.clone());
        }
    }
    if !unexpected.is_empty() {
        problems.push(format!("{} unexpected errors", unexpected.len()));
    }

    let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let expected_total: u64 = by_kind.values().map(|v| v.0).sum();
    let w = |out: &mut String, s: String| {
        let _ = writeln!(out, "{s}");
    };
    w(
        out,
        format!(
            "soak: {load_secs:.0} s of load on {} (seed {})",
            cfg.target, cfg.seed
        ),
    );
    w(out, String::new());
    w(out, "| what | count |".into());
    w(out, "| --- | ---: |".into());
    let rows = [
        ("flows completed and checked", g(&counters.flows_ok)),
        ("flows failed, expected", expected_total),
        ("flows failed, unexpected", unexpected.len() as u64),
        ("requests (rr) answered", g(&counters.requests_ok)),
        ("bulk flows", g(&counters.bulk_flows)),
        ("slow-reader downloads", g(&counters.slow_reads)),
        ("half-closed flows", g(&counters.half_closes)),
        ("client resets sent", g(&counters.client_resets)),
        ("backend resets passed on", g(&counters.backend_resets)),
        ("MB up (checked)", g(&counters.bytes_up) >> 20),
        ("MB down (checked)", g(&counters.bytes_down) >> 20),
    ];
    for (what, v) in rows {
        w(out, format!("| {what} | {v} |"));
    }
    let mut events: BTreeMap<&str, u64> = BTreeMap::new();
    for c in &chaos {
        *events.entry(c.event.as_str()).or_default() += 1;
    }
    for (event, count) in &events {
        w(out, format!("| chaos: {event} | {count} |"));
    }
    w(out, String::new());
    if by_kind.is_empty() {
        w(out, "errors: none".into());
    } else {
        w(
            out,
            "| error kind | expected (backend killed) | unexpected |".into(),
        );
        w(out, "| --- | ---: | ---: |".into());
        for (kind, (exp, unexp)) in &by_kind {
            w(out, format!("| {kind} | {exp} | {unexp} |"));
        }
    }
    for e in unexpected.iter().take(20) {
        w(
            out,
            format!(
                "  unexpected {}: backend {}, flow {}..{} ms: {}",
                e.kind,
                e.backend.as_deref().unwrap_or("?"),
                e.start_ms,
                e.end_ms,
                e.detail
            ),
        );
    }
    if !metrics_text.is_empty() {
        let closed = metric_by_label(&metrics_text, "ringway_flows_closed_total", "reason");
        let shown: Vec<String> = closed
            .iter()
            .filter(|(_, v)| **v > 0.0)
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        w(out, String::new());
        w(
            out,
            format!("proxy flows closed by reason: {}", shown.join(", ")),
        );
        // Informational: connects to a killed backend fail and are retried elsewhere; the
        // buffer ring runs dry only with small --buffers.
        let total = |name: &str| -> u64 {
            metric_by_label(&metrics_text, name, "")
                .values()
                .map(|v| *v as u64)
                .sum()
        };
        w(
            out,
            format!(
                "proxy counters: backend connects failed {}, accept errors {}, buffer ring exhausted {}",
                total("ringway_connect_failures_total"),
                total("ringway_accept_errors_total"),
                total("ringway_buffer_ring_exhausted_total")
            ),
        );
    }
    if let Some(path) = &checks.access_log {
        // Every closed or refused flow gets a line, or is counted as dropped; the writer
        // flushes within 100 ms of a record, so wait (bounded) for the counts to agree.
        let count = |name: &str, label: &str| -> u64 {
            metric_by_label(&metrics_text, name, label)
                .values()
                .map(|v| *v as u64)
                .sum()
        };
        let closed = count("ringway_flows_closed_total", "reason");
        let dropped = count("ringway_access_log_dropped_total", "");
        let deadline = Instant::now() + Duration::from_secs(5);
        let reasons = loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let reasons = access_log_reasons(&text);
            let lines = reasons.values().sum::<u64>();
            if metrics_text.is_empty() || lines + dropped >= closed || Instant::now() >= deadline {
                break reasons;
            }
            thread::sleep(Duration::from_millis(100));
        };
        let lines = reasons.values().sum::<u64>();
        let shown: Vec<String> = reasons.iter().map(|(k, v)| format!("{k} {v}")).collect();
        w(
            out,
            format!(
                "access log: {lines} lines ({}), {dropped} dropped",
                shown.join(", ")
            ),
        );
        if !metrics_text.is_empty() && lines + dropped != closed {
            problems.push(format!(
                "access log: {lines} lines + {dropped} dropped, but {closed} flows closed"
            ));
        }
    }

    if !samples.is_empty() {
        w(out, String::new());
        w(out, "| t (s) | RSS (MiB) | descriptors | CPU (%) |".into());
        w(out, "| ---: | ---: | ---: | ---: |".into());
        // About 12 rows whatever the length; CPU over the interval since the previous row.
        let step = samples.len().div_ceil(12).max(1);
        let tck = 100.0; // USER_HZ: /proc reports in 1/100 s on Linux
        let mut prev: Option<Sample> = None;
        for s in samples.iter().step_by(step).chain(samples.last()) {
            let cpu = prev
                .filter(|p| s.t > p.t)
                .map(|p| (s.cpu_ticks - p.cpu_ticks) as f64 / tck / (s.t - p.t) * 100.0);
            w(
                out,
                format!(
                    "| {:.0} | {:.1} | {} | {} |",
                    s.t,
                    s.rss_kb as f64 / 1024.0,
                    s.fds,
                    cpu.map(|c| format!("{c:.0}")).unwrap_or_else(|| "-".into())
                ),
            );
            prev = Some(*s);
        }
        let (r1, r2, rss_ok) = trend(&samples, 0.2, |s| s.rss_kb, 0.10, 4096);
        let (f1, f2, fds_ok) = trend(&samples, 0.2, |s| s.fds, 0.25, 16);
        w(out, String::new());
        w(
            out,
            format!(
                "RSS median, first half {:.1} MiB -> second half {:.1} MiB (limit +10% +4 MiB): {}",
                r1 as f64 / 1024.0,
                r2 as f64 / 1024.0,
                if rss_ok { "ok" } else { "GROWING" }
            ),
        );
        w(
            out,
            format!(
                "descriptors median, first half {f1} -> second half {f2} (limit +25% +16): {}",
                if fds_ok { "ok" } else { "GROWING" }
            ),
        );
        if let (Some(b), Some(a)) = (idle_before, idle_after) {
            w(
                out,
                format!(
                    "idle: descriptors {} before the load, {} after; RSS {:.1} MiB before, {:.1} MiB after",
                    b.fds,
                    a.fds,
                    b.rss_kb as f64 / 1024.0,
                    a.rss_kb as f64 / 1024.0
                ),
            );
        }
        if !rss_ok {
            problems.push("RSS grew from the first half of the run to the second".into());
        }
        if !fds_ok {
            problems.push("descriptors grew from the first half of the run to the second".into());
        }
    }
    if g(&counters.flows_ok) == 0 {
        problems.push("no flow completed".into());
    }
    w(out, String::new());
    if problems.is_empty() {
        w(out, "verdict: PASS".into());
    } else {
        w(out, format!("verdict: FAIL: {}", problems.join("; ")));
    }
    problems.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(kind: &'static str, backend: Option<&str>, start: u64, end: u64) -> FlowError {
        FlowError {
            kind,
            backend: backend.map(str::to_string),
            start_ms: start,
            end_ms: end,
            detail: String::new(),
        }
    }

    #[test]
    fn errors_are_expected_only_near_a_kill_of_their_backend() {
        let chaos = parse_chaos_log("10000 kill b1\n20000 start b1\n30000 reload\nnoise\n");
        assert_eq!(chaos.len(), 3);
        assert!(is_expected(&err("reset", Some("b1"), 5000, 10200), &chaos));
        assert!(is_expected(
            &err("early_eof", Some("b1"), 10500, 11000),
            &chaos
        ));
        // Another backend, or long after the kill.
        assert!(!is_expected(&err("reset", Some("b2"), 5000, 10200), &chaos));
        assert!(!is_expected(
            &err("reset", Some("b1"), 15000, 16000),
            &chaos
        ));
        // Before the greeting: any kill nearby.
        assert!(is_expected(&err("no_greeting", None, 9900, 10000), &chaos));
        // Never expected, kill or not.
        assert!(!is_expected(
            &err("wrong_bytes", Some("b1"), 5000, 10200),
            &chaos
        ));
        assert!(!is_expected(&err("connect", None, 9900, 10000), &chaos));
        // A reload is no excuse.
        assert!(!is_expected(
            &err("reset", Some("b3"), 29000, 31000),
            &chaos
        ));
    }

    fn samples(rss: &[u64]) -> Vec<Sample> {
        rss.iter()
            .enumerate()
            .map(|(i, &r)| Sample {
                t: i as f64,
                rss_kb: r,
                fds: 10,
                cpu_ticks: 0,
            })
            .collect()
    }

    #[test]
    fn trend_ignores_warmup_and_noise_but_not_growth() {
        // Warm-up growth, then flat with noise.
        let flat = samples(&[
            1000, 5000, 9000, 10000, 10100, 9900, 10050, 10000, 9950, 10020,
        ]);
        assert!(trend(&flat, 0.2, |s| s.rss_kb, 0.10, 0).2);
        // Steady growth after the warm-up.
        let growing = samples(&[
            1000, 2000, 10000, 12000, 14000, 16000, 18000, 20000, 22000, 24000,
        ]);
        assert!(!trend(&growing, 0.2, |s| s.rss_kb, 0.10, 0).2);
        // Bursts lift most of the second half's samples but not its floor: no leak.
        let bursty = samples(&[
            1000, 2000, 10000, 10000, 10000, 10000, 10000, 16000, 16000, 10000, 16000, 16000,
        ]);
        assert!(trend(&bursty, 0.2, |s| s.rss_kb, 0.10, 0).2);
    }

    #[test]
    fn metrics_and_access_log_are_summed_by_label() {
        let text = "# HELP x\nringway_flows_closed_total{reason=\"done\"} 5\n\
                    ringway_flows_closed_total{reason=\"client_reset\"} 2\n\
                    ringway_flows_active{worker=\"0\"} 1\nringway_flows_active{worker=\"1\"} 2\n\
                    ringway_connect_failures_total 3\n";
        let closed = metric_by_label(text, "ringway_flows_closed_total", "reason");
        assert_eq!(closed["done"], 5.0);
        assert_eq!(closed["client_reset"], 2.0);
        let active: f64 = metric_by_label(text, "ringway_flows_active", "worker")
            .values()
            .sum();
        assert_eq!(active, 3.0);
        assert_eq!(
            metric_by_label(text, "ringway_connect_failures_total", "")[""],
            3.0
        );
        let log = "{\"a\":1,\"reason\":\"done\"}\n{\"reason\":\"done\"}\n{\"reason\":\"backend_reset\"}\n";
        let reasons = access_log_reasons(log);
        assert_eq!(reasons["done"], 2);
        assert_eq!(reasons["backend_reset"], 1);
    }
}
