//! Harness shared by the integration tests: start the real `ringway` binary, run test
//! backends as in-process threads on loopback, and move deterministic byte patterns through
//! them.
//!
//! Rules kept everywhere: every blocking call has a deadline (socket timeouts, bounded waits),
//! ports are picked by the OS (port 0), and nothing sleeps to synchronise: when we wait for
//! something we wait for an observable event (a log line, a channel message, a counter) with a
//! deadline.
#![allow(dead_code)] // each test file uses a different part of the harness

pub mod admin;
pub mod crowd;
pub mod dnsmasq;
pub mod impair;
pub mod netns;

use std::ffi::OsStr;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, Type};
use xxhash_rust::xxh3::Xxh3Default;

/// The binary under test: the one cargo built, unless `RINGWAY_TEST_BIN` names another build
/// (e.g. a release build) to run the same tests against.
pub fn bin() -> String {
    std::env::var("RINGWAY_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_ringway").into())
}

/// How long the proxy may take to print its `listening on` line.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Read/write timeout on every client socket: a test that waits this long has failed.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Read/write timeout on backend sockets (a little longer than the clients', so that a stuck
/// test is reported by the client side, which knows what it expected).
pub const BACKEND_IO_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a closed connection may take to be noticed on the other side of the proxy.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Stack size for the many small threads the tests spawn.
pub const SMALL_STACK: usize = 128 * 1024;

// ---------------------------------------------------------------------------------------------
// Captured output of a child process
// ---------------------------------------------------------------------------------------------

/// Lines a child wrote to one of its pipes, kept for failure messages.
#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn push(&self, line: String) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(line);
    }

    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn text(&self) -> String {
        self.lines().join("\n")
    }

    /// The last `n` lines, for failure messages.
    pub fn tail(&self, n: usize) -> String {
        let lines = self.lines();
        let skip = lines.len().saturating_sub(n);
        let mut out = String::new();
        if skip > 0 {
            out.push_str(&format!("... ({skip} earlier lines)\n"));
        }
        out.push_str(&lines[skip..].join("\n"));
        out
    }
}

/// Reads `pipe` line by line until EOF, storing each line in `log` and, if given, sending it
/// on `tx` (a dropped receiver is fine: the lines are still kept).
fn drain_pipe<R: Read + Send + 'static>(
    pipe: R,
    log: Log,
    tx: Option<Sender<String>>,
) -> JoinHandle<()> {
    thread::Builder::new()
        .name("pipe-drain".into())
        .stack_size(SMALL_STACK)
        .spawn(move || {
            let mut reader = BufReader::new(pipe);
            let mut raw = Vec::new();
            loop {
                raw.clear();
                match reader.read_until(b'\n', &mut raw) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&raw)
                            .trim_end_matches(['\n', '\r'])
                            .to_string();
                        log.push(line.clone());
                        if let Some(tx) = &tx {
                            let _ = tx.send(line);
                        }
                    }
                }
            }
        })
        .expect("spawn pipe drain thread")
}

/// Finds `listening on ADDR` in a log line and parses ADDR.
pub fn parse_listening(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find("listening on ")? + "listening on ".len()..];
    let word = rest.split_whitespace().next()?;
    let word = word.trim_end_matches([',', ';', ')', '.', ':']);
    word.parse().ok()
}

fn base_command<S: AsRef<OsStr>>(args: &[S]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .env(
            "RUST_LOG",
            std::env::var("RINGWAY_TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .env("RUST_LOG_STYLE", "never")
        .stdin(Stdio::null());
    cmd
}

/// Waits for `child` to exit, polling until `timeout`. `None` if it is still running.
fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(e) => panic!("waiting for ringway (pid {}): {e}", child.id()),
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Sends `signal` to a child process that has not been reaped yet.
pub fn send_signal(child: &Child, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
    // SAFETY: kill(2) takes plain integers and touches no memory of ours. The pid belongs to
    // our own child, which has not been reaped (we hold the `Child` and only reap through it),
    // so the pid cannot have been reused by an unrelated process.
    let rc = unsafe { libc::kill(pid, signal) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {signal}) failed: {}",
        io::Error::last_os_error()
    );
}

// ---------------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------------

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// `what` goes into the directory's name, to tell what left it behind.
    pub fn new(what: &str) -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "ringway-test-{what}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create a temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Writes a new file and renames it over `path`, as editors and config tools do, so a reader
/// never sees a half-written file.
pub fn write_atomically(path: &Path, text: &str) {
    let temporary = path.with_extension("new");
    fs::write(&temporary, text).expect("write the new file");
    fs::rename(&temporary, path).expect("rename the new file into place");
}

// ---------------------------------------------------------------------------------------------
// The proxy process
// ---------------------------------------------------------------------------------------------

/// A running `ringway`. Dropping it sends SIGTERM, waits a bounded time, then SIGKILLs.
pub struct Proxy {
    child: Child,
    /// The address the proxy reported in its `listening on` line.
    pub addr: SocketAddr,
    log: Log,
    status: Option<ExitStatus>,
    args: Vec<String>,
}

/// Why a proxy did not come up.
#[derive(Debug)]
pub struct StartFailure {
    /// Exit status if it exited; `None` if it was still running at the deadline (then killed).
    pub status: Option<ExitStatus>,
    pub stderr: String,
}

impl Proxy {
    /// Starts the proxy and waits for its `listening on` line; panics if it doesn't come up.
    pub fn start<S: AsRef<OsStr>>(args: &[S]) -> Proxy {
        match Self::try_start(args) {
            Ok(proxy) => proxy,
            Err(failure) => panic!(
                "ringway {:?} did not start: status {:?}\n--- stderr ---\n{}",
                args.iter()
                    .map(|a| a.as_ref().to_string_lossy())
                    .collect::<Vec<_>>(),
                failure.status,
                failure.stderr
            ),
        }
    }

    /// Starts the proxy and waits (bounded) for its `listening on` line.
    pub fn try_start<S: AsRef<OsStr>>(args: &[S]) -> Result<Proxy, StartFailure> {
        Self::try_start_with_stdout(args, Stdio::null(), &[])
    }

    /// Starts the proxy with extra environment variables (e.g. systemd's `NOTIFY_SOCKET`) and
    /// waits for its `listening on` line; panics if it doesn't come up.
    pub fn start_with_env<S: AsRef<OsStr>>(args: &[S], env: &[(&str, &str)]) -> Proxy {
        Self::try_start_with_stdout(args, Stdio::null(), env)
            .unwrap_or_else(|failure| panic!("ringway did not start: {failure:?}"))
    }

    /// Starts the proxy with its stdout connected to a pipe the caller gets (and may leave
    /// unread, to make a writer on stdout block); panics if the proxy doesn't come up.
    pub fn start_with_stdout_pipe<S: AsRef<OsStr>>(args: &[S]) -> (Proxy, ChildStdout) {
        let mut proxy = Self::try_start_with_stdout(args, Stdio::piped(), &[])
            .unwrap_or_else(|failure| panic!("ringway did not start: {failure:?}"));
        let stdout = proxy.child.stdout.take().expect("piped stdout");
        (proxy, stdout)
    }

    fn try_start_with_stdout<S: AsRef<OsStr>>(
        args: &[S],
        stdout: Stdio,
        env: &[(&str, &str)],
    ) -> Result<Proxy, StartFailure> {
        let mut cmd = base_command(args);
        cmd.envs(env.iter().copied());
        cmd.stdout(stdout).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn ringway");
        let log = Log::default();
        let (tx, rx) = mpsc::channel();
        drain_pipe(
            child.stderr.take().expect("piped stderr"),
            log.clone(),
            Some(tx),
        );
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addr) = parse_listening(&line) {
                        return Ok(Proxy {
                            child,
                            addr,
                            log,
                            status: None,
                            args: args
                                .iter()
                                .map(|a| a.as_ref().to_string_lossy().into_owned())
                                .collect(),
                        });
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    // stderr closed: the process is exiting (or closed stderr, then we kill it).
                    let status = wait_with_timeout(&mut child, Duration::from_secs(5));
                    if status.is_none() {
                        let _ = child.kill();
                        let _ = child.wait();
                    }
                    return Err(StartFailure {
                        status,
                        stderr: log.text(),
                    });
                }
                Err(RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(StartFailure {
                        status: None,
                        stderr: format!(
                            "(no `listening on` line within {START_TIMEOUT:?}; killed)\n{}",
                            log.text()
                        ),
                    });
                }
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the proxy wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.log.text()
    }

    /// The last lines of stderr, for failure messages.
    pub fn stderr_tail(&self) -> String {
        format!(
            "--- ringway {} stderr (last 60 lines) ---\n{}\n--- end ---",
            self.args.join(" "),
            self.log.tail(60)
        )
    }

    /// Sends a signal (SIGTERM, SIGINT, ...) to the proxy.
    pub fn signal(&self, signal: libc::c_int) {
        assert!(self.status.is_none(), "proxy already exited");
        send_signal(&self.child, signal);
    }

    /// Waits up to `timeout` for the proxy to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = wait_with_timeout(&mut self.child, timeout);
        }
        self.status
    }

    /// Panics (with the proxy's stderr) if the proxy has exited or any of its threads
    /// panicked (a worker thread can die while the process lives on).
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            self.status = Some(status);
            panic!(
                "ringway exited unexpectedly: {status}\n{}",
                self.stderr_tail()
            );
        }
        if let Some(line) = self.log.lines().iter().find(|l| l.contains("panicked at")) {
            panic!("a ringway thread panicked: {line}\n{}", self.stderr_tail());
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if self.status.is_none() {
            if let Ok(None) = self.child.try_wait() {
                send_signal(&self.child, libc::SIGTERM);
            }
            if wait_with_timeout(&mut self.child, Duration::from_secs(5)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        if thread::panicking() {
            eprintln!("{}", self.stderr_tail());
        }
    }
}

/// What a process that ran to completion did.
#[derive(Debug)]
pub struct Outcome {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the binary to completion (bounded by `timeout`; killed and panics after that).
pub fn run_to_exit<S: AsRef<OsStr>>(args: &[S], timeout: Duration) -> Outcome {
    let mut cmd = base_command(args);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn ringway");
    let out = Log::default();
    let err = Log::default();
    let out_thread = drain_pipe(child.stdout.take().expect("stdout"), out.clone(), None);
    let err_thread = drain_pipe(child.stderr.take().expect("stderr"), err.clone(), None);
    let Some(status) = wait_with_timeout(&mut child, timeout) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "ringway {:?} still running after {timeout:?} (killed)\n--- stderr ---\n{}",
            args.iter()
                .map(|a| a.as_ref().to_string_lossy())
                .collect::<Vec<_>>(),
            err.text()
        );
    };
    // The pipes close when the process exits; the drains end right after.
    let _ = out_thread.join();
    let _ = err_thread.join();
    Outcome {
        status,
        stdout: out.text(),
        stderr: err.text(),
    }
}

// ---------------------------------------------------------------------------------------------
// Deterministic byte patterns
// ---------------------------------------------------------------------------------------------

/// splitmix64: a tiny deterministic generator for sizes and pattern bytes.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

/// The seed for randomised tests: `RINGWAY_TEST_SEED` if set, else from the clock. Tests print
/// it in failure messages so a failure can be replayed.
pub fn test_seed() -> u64 {
    if let Ok(s) = std::env::var("RINGWAY_TEST_SEED") {
        return s.parse().expect("RINGWAY_TEST_SEED must be a u64");
    }
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}

const PATTERN_LEN: usize = 8 << 20;

fn pattern() -> &'static [u8] {
    static PATTERN: OnceLock<Vec<u8>> = OnceLock::new();
    PATTERN.get_or_init(|| {
        let mut rng = Rng::new(0x5249_4E47_5741_5921);
        let mut v = Vec::with_capacity(PATTERN_LEN);
        while v.len() < PATTERN_LEN {
            v.extend_from_slice(&rng.next_u64().to_le_bytes());
        }
        v
    })
}

fn pattern_offset(key: u64) -> usize {
    (Rng::new(key).next_u64() % PATTERN_LEN as u64) as usize
}

/// The bytes of stream `key` starting at `pos`: a contiguous slice of at most `max` bytes
/// (shorter where the underlying pattern wraps). Every key starts at a different offset of
/// the pattern, so bytes delivered to the wrong flow are detected.
pub fn pattern_slice(key: u64, pos: u64, max: usize) -> &'static [u8] {
    let p = pattern();
    let start = ((pattern_offset(key) as u64 + pos) % PATTERN_LEN as u64) as usize;
    let end = (start + max).min(PATTERN_LEN);
    &p[start..end]
}

/// Stream `key`'s first `len` bytes as one vector (for small payloads).
pub fn pattern_vec(key: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        v.extend_from_slice(pattern_slice(key, v.len() as u64, len - v.len()));
    }
    v
}

/// Checks `buf` against stream `key` at `pos`; `Err(i)` is the index of the first wrong byte.
pub fn check_pattern(key: u64, pos: u64, buf: &[u8]) -> Result<(), usize> {
    let mut done = 0;
    while done < buf.len() {
        let want = pattern_slice(key, pos + done as u64, buf.len() - done);
        let got = &buf[done..done + want.len()];
        if got != want {
            let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
            return Err(done + i);
        }
        done += want.len();
    }
    Ok(())
}

/// Writes stream `key`'s first `len` bytes.
pub fn write_pattern(w: &mut impl Write, key: u64, len: u64) -> io::Result<()> {
    let mut pos = 0;
    while pos < len {
        let chunk = pattern_slice(key, pos, (len - pos).min(64 * 1024) as usize);
        w.write_all(chunk)?;
        pos += chunk.len() as u64;
    }
    Ok(())
}

/// Reads exactly `len` bytes and checks them against stream `key` (starting at byte 0).
pub fn read_pattern_exact(r: &mut impl Read, key: u64, len: u64) -> Result<(), String> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut pos = 0u64;
    while pos < len {
        let want = (len - pos).min(buf.len() as u64) as usize;
        match r.read(&mut buf[..want]) {
            Ok(0) => return Err(format!("EOF after {pos} of {len} bytes")),
            Ok(n) => {
                if let Err(i) = check_pattern(key, pos, &buf[..n]) {
                    return Err(format!(
                        "wrong byte at offset {} (of {len})",
                        pos + i as u64
                    ));
                }
                pos += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read error after {pos} of {len} bytes: {e}")),
        }
    }
    Ok(())
}

/// Reads stream `key` until EOF, checking every byte; expects exactly `len` bytes.
pub fn read_pattern_to_eof(r: &mut impl Read, key: u64, len: u64) -> Result<(), String> {
    read_pattern_exact(r, key, len)?;
    let mut extra = [0u8; 4096];
    loop {
        match r.read(&mut extra) {
            Ok(0) => return Ok(()),
            Ok(n) => return Err(format!("{n} unexpected bytes after the expected {len}")),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("after all {len} bytes, no clean EOF: {e}")),
        }
    }
}

/// XXH3-64 of a byte string, for checksums sent by the sink backend.
pub fn digest(bytes: &[u8]) -> u64 {
    let mut h = Xxh3Default::new();
    h.update(bytes);
    h.digest()
}

// ---------------------------------------------------------------------------------------------
// Client sockets
// ---------------------------------------------------------------------------------------------

fn domain_for(addr: &SocketAddr) -> Domain {
    if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    }
}

fn with_timeouts(stream: TcpStream) -> TcpStream {
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    stream
}

/// Connects to `addr` (bounded), with read/write timeouts set.
pub fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    TcpStream::connect_timeout(&addr, Duration::from_secs(10)).map(with_timeouts)
}

/// Connects to `addr` from source address `src` (e.g. 127.0.0.7 to act as another client IP).
pub fn connect_from(src: IpAddr, addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = Socket::new(domain_for(&addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.bind(&SockAddr::from(SocketAddr::new(src, 0)))?;
    socket.connect_timeout(&SockAddr::from(addr), Duration::from_secs(10))?;
    Ok(with_timeouts(socket.into()))
}

/// Loopback client address number `n` (127.0.0.`n`), for acting as different client IPs.
pub fn client_ip(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

/// Reads one `\n`-terminated line (without the newline), bounded by the socket's timeout and a
/// 4 KiB length limit.
pub fn read_line(stream: &mut TcpStream) -> Result<String, String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => {
                return Err(format!(
                    "EOF before end of line (got {:?})",
                    String::from_utf8_lossy(&line)
                ))
            }
            Ok(_) if byte[0] == b'\n' => return Ok(String::from_utf8_lossy(&line).into_owned()),
            Ok(_) => {
                line.push(byte[0]);
                if line.len() > 4096 {
                    return Err("line longer than 4 KiB".into());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(format!(
                    "read error before end of line (got {:?}): {e}",
                    String::from_utf8_lossy(&line)
                ))
            }
        }
    }
}

/// How a connection ended, seen from a reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// read returned 0.
    Eof,
    /// read failed with ECONNRESET.
    Reset,
    /// Nothing happened before the read timeout.
    TimedOut,
    /// Another read error.
    Other(io::ErrorKind),
}

impl Closed {
    /// Whether the peer really closed (EOF or reset), as opposed to a timeout or odd error.
    pub fn is_closed(self) -> bool {
        matches!(self, Closed::Eof | Closed::Reset)
    }
}

pub fn classify(e: &io::Error) -> Closed {
    match e.kind() {
        io::ErrorKind::ConnectionReset => Closed::Reset,
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Closed::TimedOut,
        kind => Closed::Other(kind),
    }
}

/// Waits (up to `timeout`) for the peer to close `stream`, which must not deliver more data.
/// Returns how it closed and when, or a description of what happened instead.
pub fn expect_closed(
    stream: &mut TcpStream,
    timeout: Duration,
) -> Result<(Closed, Instant), String> {
    let old = stream.read_timeout().ok().flatten();
    stream.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 4096];
    let result = loop {
        match stream.read(&mut buf) {
            Ok(0) => break Ok((Closed::Eof, Instant::now())),
            Ok(n) => {
                break Err(format!(
                    "expected the connection to close, got {n} more bytes"
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => match classify(&e) {
                Closed::Reset => break Ok((Closed::Reset, Instant::now())),
                Closed::TimedOut => break Err(format!("connection still open after {timeout:?}")),
                other => break Err(format!("unexpected read error {other:?}: {e}")),
            },
        }
    };
    let _ = stream.set_read_timeout(old);
    result
}

/// Closes `stream` with an RST (SO_LINGER 0) instead of a FIN.
pub fn reset(stream: TcpStream) {
    SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER 0");
    drop(stream);
}

/// Sends `msg` and reads the same bytes back (for echo and hello backends).
pub fn echo_roundtrip(stream: &mut TcpStream, msg: &[u8]) -> Result<(), String> {
    stream
        .write_all(msg)
        .map_err(|e| format!("write failed: {e}"))?;
    let mut back = vec![0u8; msg.len()];
    stream
        .read_exact(&mut back)
        .map_err(|e| format!("reading echo failed: {e}"))?;
    if back != msg {
        return Err(format!("echo mismatch: sent {msg:?}, got {back:?}"));
    }
    Ok(())
}

/// Connects from `src` and returns the name a `Hello` backend greeted us with, after checking
/// that the flow carries bytes the other way too. Panics (with the proxy's stderr) on failure.
pub fn served_by(proxy: &Proxy, src: IpAddr) -> String {
    let mut s = connect_from(src, proxy.addr)
        .unwrap_or_else(|e| panic!("connect from {src}: {e}\n{}", proxy.stderr_tail()));
    let name = read_line(&mut s)
        .unwrap_or_else(|e| panic!("greeting for {src}: {e}\n{}", proxy.stderr_tail()));
    echo_roundtrip(&mut s, b"x").unwrap_or_else(|e| panic!("echo for {src}: {e}"));
    name
}

/// An address where nothing listens (connections are refused): bound once, then released.
pub fn dead_addr() -> SocketAddr {
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => addr,
        other => panic!("expected {addr} to refuse connections, got {other:?}"),
    }
}

/// Waits until the proxy catches SIGHUP, SIGINT and SIGTERM (its handlers are installed), read
/// from `SigCgt`/`SigBlk` in /proc, so a test of what a signal does is not a test of the
/// start-up window.
pub fn wait_signal_handlers(proxy: &Proxy) {
    let wanted: u64 = [libc::SIGHUP, libc::SIGINT, libc::SIGTERM]
        .iter()
        .map(|s| 1u64 << (s - 1))
        .sum();
    let caught = || -> u64 {
        let status =
            fs::read_to_string(format!("/proc/{}/status", proxy.pid())).unwrap_or_default();
        // Caught by a handler, or blocked for a signalfd or sigwait.
        ["SigCgt:", "SigBlk:"]
            .iter()
            .filter_map(|field| status.lines().find_map(|l| l.strip_prefix(field)))
            .filter_map(|hex| u64::from_str_radix(hex.trim(), 16).ok())
            .fold(0, |mask, m| mask | m)
    };
    assert!(
        wait_until(CLOSE_TIMEOUT, || caught() & wanted == wanted),
        "the proxy does not catch SIGHUP/SIGINT/SIGTERM {CLOSE_TIMEOUT:?} after start (SigCgt {:x})\n{}",
        caught(),
        proxy.stderr_tail()
    );
}

/// Raises this process's soft open-file limit to at least `want` (bounded by the hard limit);
/// tests that hold many sockets call it. Raising it cannot hurt tests running alongside.
pub fn raise_nofile(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read or write the struct we pass.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < want as libc::rlim_t {
            lim.rlim_cur = (want as libc::rlim_t).min(lim.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
    }
    assert!(
        lim.rlim_cur >= want as libc::rlim_t,
        "this test needs {want} open files; the hard limit is {}",
        lim.rlim_max
    );
}

/// Polls `cond` until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

// ---------------------------------------------------------------------------------------------
// Gate: let many threads start together, with deadlines
// ---------------------------------------------------------------------------------------------

/// Threads `arrive()`, then `wait_open()`; the coordinator waits for arrivals, then `open()`s.
/// Unlike `std::sync::Barrier`, every wait has a deadline.
#[derive(Default, Debug)]
pub struct Gate {
    state: Mutex<(usize, bool)>,
    cv: Condvar,
}

impl Gate {
    pub fn arrive(&self) {
        self.state.lock().unwrap().0 += 1;
        self.cv.notify_all();
    }

    /// Waits until `n` threads arrived or `timeout` passed; returns how many arrived.
    pub fn wait_arrived(&self, n: usize, timeout: Duration) -> usize {
        let guard = self.state.lock().unwrap();
        let (guard, _) = self
            .cv
            .wait_timeout_while(guard, timeout, |s| s.0 < n)
            .unwrap();
        guard.0
    }

    pub fn open(&self) {
        self.state.lock().unwrap().1 = true;
        self.cv.notify_all();
    }

    /// Waits until the gate opens or `timeout` passes; returns whether it opened.
    pub fn wait_open(&self, timeout: Duration) -> bool {
        let guard = self.state.lock().unwrap();
        let (guard, _) = self
            .cv
            .wait_timeout_while(guard, timeout, |s| !s.1)
            .unwrap();
        guard.1
    }
}

// ---------------------------------------------------------------------------------------------
// Test backends
// ---------------------------------------------------------------------------------------------

/// Key of the bytes the reset backend writes before resetting.
pub const RESET_PREFIX_KEY: u64 = 0xBAD;
/// Key of the bytes the half-closing backend writes before its FIN.
pub const HALF_CLOSE_KEY: u64 = 0x4A1F;

/// What a backend does with each accepted connection.
#[derive(Clone, Debug)]
pub enum Kind {
    /// Echoes everything; on EOF shuts down its write side (propagating the half-close).
    Echo,
    /// Reads until EOF, then replies `"<len> <xxh3 hex>\n"` and closes.
    Sink,
    /// Writes its name and `\n` on accept, then echoes like `Echo`.
    Hello(String),
    /// Writes `prefix` bytes of stream `RESET_PREFIX_KEY`, reads exactly `read` bytes, then
    /// closes with SO_LINGER 0 (an RST).
    Reset { prefix: u64, read: u64 },
    /// Reads a little-endian u64 count N, then writes N bytes of stream N and closes. Writes
    /// use a 1 s send timeout: the first time one times out (the peer chain is full) it
    /// reports `Event::Stalled` and keeps going.
    Stream,
    /// Writes `bytes` bytes of stream `HALF_CLOSE_KEY`, shuts down its write side, then reads
    /// until EOF and reports what it got (`Event::Sunk`).
    HalfCloser { bytes: u64 },
    /// Reads nothing until the gate opens, then behaves like `Sink`.
    LateSink(Arc<Gate>),
}

/// Something a backend connection reports to the test.
#[derive(Debug, Clone)]
pub enum Event {
    /// An echo/hello connection ended: how its reading side saw the end, bytes received.
    Closed {
        conn: usize,
        how: Closed,
        received: u64,
    },
    /// A sink or half-closer connection read to the end.
    Sunk {
        conn: usize,
        how: Closed,
        len: u64,
        digest: u64,
    },
    /// The reset backend sent its RST after receiving `received` bytes.
    ResetSent { conn: usize, received: u64 },
    /// A stream write blocked for 1 s after `written` bytes.
    Stalled { conn: usize, written: u64 },
    /// A stream connection finished (or failed) after `written` bytes.
    Streamed {
        conn: usize,
        written: u64,
        error: Option<String>,
    },
    /// A connection that ended before the backend received a single byte. The proxy may open
    /// such connections on its own (start-up or health checks), so waiting for the events of
    /// a flow skips these (`Backend::next_event`).
    Empty { conn: usize, how: Closed },
    /// The backend could not handle a connection.
    Error(String),
}

impl Event {
    /// Reclassifies a connection that received nothing as `Empty`.
    fn empty_if_idle(self) -> Event {
        match self {
            Event::Closed {
                conn,
                how,
                received: 0,
            }
            | Event::Sunk {
                conn, how, len: 0, ..
            } => Event::Empty { conn, how },
            other => other,
        }
    }
}

fn read_error_how(e: &io::Error) -> Closed {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        Closed::Eof
    } else {
        classify(e)
    }
}

/// Connection counters of a backend.
#[derive(Default)]
pub struct Stats {
    pub accepted: AtomicUsize,
    pub open: AtomicUsize,
    pub max_open: AtomicUsize,
}

/// A test backend: a loopback listener with an accept thread and a thread per connection.
/// Dropping it (or `stop()`) closes the listener: new connections are then refused.
pub struct Backend {
    pub addr: SocketAddr,
    pub stats: Arc<Stats>,
    events: Receiver<Event>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl Backend {
    /// Starts a backend of `kind` on 127.0.0.1.
    pub fn start(kind: Kind) -> Backend {
        Self::start_on(kind, IpAddr::V4(Ipv4Addr::LOCALHOST))
    }

    pub fn echo() -> Backend {
        Self::start(Kind::Echo)
    }

    pub fn hello(name: &str) -> Backend {
        Self::start(Kind::Hello(name.to_string()))
    }

    /// Starts a backend of `kind` listening on `ip` port 0.
    pub fn start_on(kind: Kind, ip: IpAddr) -> Backend {
        let bind = SocketAddr::new(ip, 0);
        let socket = Socket::new(domain_for(&bind), Type::STREAM, Some(Protocol::TCP)).unwrap();
        socket.set_reuse_address(true).unwrap();
        socket.bind(&SockAddr::from(bind)).unwrap();
        socket.listen(4096).unwrap();
        let listener: TcpListener = socket.into();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(Stats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, events) = mpsc::channel();
        let acceptor = {
            let stats = stats.clone();
            let stop = stop.clone();
            thread::Builder::new()
                .name(format!("backend-{addr}"))
                .stack_size(SMALL_STACK)
                .spawn(move || accept_loop(listener, kind, stats, stop, tx))
                .unwrap()
        };
        Backend {
            addr,
            stats,
            events,
            stop,
            acceptor: Some(acceptor),
        }
    }

    /// The `--backend` argument for this backend.
    pub fn arg(&self) -> String {
        self.addr.to_string()
    }

    /// Next event of a connection that carried bytes to the backend (skipping `Empty` ones,
    /// which may be the proxy's own checks), waiting at most `timeout` in all.
    pub fn next_event(&self, timeout: Duration) -> Option<Event> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left).ok()? {
                Event::Empty { .. } => {}
                event => return Some(event),
            }
        }
    }

    /// Next event of any kind, including `Empty`, waiting at most `timeout`.
    pub fn next_event_any(&self, timeout: Duration) -> Option<Event> {
        self.events.recv_timeout(timeout).ok()
    }

    /// Events already reported, without waiting.
    pub fn pending_events(&self) -> Vec<Event> {
        self.events.try_iter().collect()
    }

    pub fn open(&self) -> usize {
        self.stats.open.load(Ordering::SeqCst)
    }

    pub fn accepted(&self) -> usize {
        self.stats.accepted.load(Ordering::SeqCst)
    }

    /// Closes the listener (returns once it is closed). Open connections carry on.
    pub fn stop(&mut self) {
        let Some(acceptor) = self.acceptor.take() else {
            return;
        };
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept() with a connection of our own.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2));
        let _ = acceptor.join();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(
    listener: TcpListener,
    kind: Kind,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    tx: Sender<Event>,
) {
    let mut conn = 0usize;
    loop {
        let accepted = listener.accept();
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                let _ = tx.send(Event::Error(format!("accept: {e}")));
                continue;
            }
        };
        conn += 1;
        stats.accepted.fetch_add(1, Ordering::SeqCst);
        let now_open = stats.open.fetch_add(1, Ordering::SeqCst) + 1;
        stats.max_open.fetch_max(now_open, Ordering::SeqCst);
        let (kind, stats2, tx2) = (kind.clone(), stats.clone(), tx.clone());
        let spawned = thread::Builder::new()
            .stack_size(SMALL_STACK)
            .spawn(move || {
                let _ = stream.set_read_timeout(Some(BACKEND_IO_TIMEOUT));
                let _ = stream.set_write_timeout(Some(BACKEND_IO_TIMEOUT));
                let event = serve(stream, conn, &kind, &tx2).empty_if_idle();
                stats2.open.fetch_sub(1, Ordering::SeqCst);
                let _ = tx2.send(event);
            });
        if let Err(e) = spawned {
            stats.open.fetch_sub(1, Ordering::SeqCst);
            let _ = tx.send(Event::Error(format!("spawn connection thread: {e}")));
        }
    }
}

fn serve(mut s: TcpStream, conn: usize, kind: &Kind, tx: &Sender<Event>) -> Event {
    match kind {
        Kind::Echo => echo(s, conn),
        Kind::Hello(name) => {
            if let Err(e) = s.write_all(format!("{name}\n").as_bytes()) {
                return Event::Closed {
                    conn,
                    how: classify(&e),
                    received: 0,
                };
            }
            echo(s, conn)
        }
        Kind::Sink | Kind::LateSink(_) => {
            if let Kind::LateSink(gate) = kind {
                if !gate.wait_open(BACKEND_IO_TIMEOUT) {
                    return Event::Error("late sink: gate never opened".into());
                }
            }
            let (how, len, digest) = sink(&mut s);
            if how == Closed::Eof {
                let _ = s.write_all(format!("{len} {digest:016x}\n").as_bytes());
            }
            Event::Sunk {
                conn,
                how,
                len,
                digest,
            }
        }
        Kind::Reset { prefix, read } => {
            if let Err(e) = write_pattern(&mut s, RESET_PREFIX_KEY, *prefix) {
                return Event::Empty {
                    conn,
                    how: classify(&e),
                };
            }
            let mut got = 0u64;
            let mut buf = vec![0u8; 16 * 1024];
            while got < *read {
                let want = (*read - got).min(buf.len() as u64) as usize;
                match s.read(&mut buf[..want]) {
                    Ok(0) if got == 0 => {
                        return Event::Empty {
                            conn,
                            how: Closed::Eof,
                        }
                    }
                    Ok(0) => return Event::Error(format!("reset backend: EOF after {got}")),
                    Ok(n) => got += n as u64,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if got == 0 => {
                        return Event::Empty {
                            conn,
                            how: classify(&e),
                        }
                    }
                    Err(e) => return Event::Error(format!("reset backend: read: {e}")),
                }
            }
            reset(s);
            Event::ResetSent {
                conn,
                received: got,
            }
        }
        Kind::Stream => stream_out(s, conn, tx),
        Kind::HalfCloser { bytes } => {
            if let Err(e) = write_pattern(&mut s, HALF_CLOSE_KEY, *bytes)
                .and_then(|()| s.shutdown(Shutdown::Write))
            {
                // The peer left before reading what we wrote: not the flow of a test.
                return Event::Empty {
                    conn,
                    how: classify(&e),
                };
            }
            let (how, len, digest) = sink(&mut s);
            Event::Sunk {
                conn,
                how,
                len,
                digest,
            }
        }
    }
}

fn echo(mut s: TcpStream, conn: usize) -> Event {
    let mut buf = vec![0u8; 64 * 1024];
    let mut received = 0u64;
    let how = loop {
        match s.read(&mut buf) {
            Ok(0) => {
                let _ = s.shutdown(Shutdown::Write);
                break Closed::Eof;
            }
            Ok(n) => {
                received += n as u64;
                if let Err(e) = s.write_all(&buf[..n]) {
                    break classify(&e);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break classify(&e),
        }
    };
    Event::Closed {
        conn,
        how,
        received,
    }
}

/// Reads until EOF or error; returns how it ended, the length and the XXH3 of what was read.
fn sink(s: &mut TcpStream) -> (Closed, u64, u64) {
    let mut h = Xxh3Default::new();
    let mut len = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    let how = loop {
        match s.read(&mut buf) {
            Ok(0) => break Closed::Eof,
            Ok(n) => {
                h.update(&buf[..n]);
                len += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break classify(&e),
        }
    };
    (how, len, h.digest())
}

fn stream_out(mut s: TcpStream, conn: usize, tx: &Sender<Event>) -> Event {
    let mut count = [0u8; 8];
    if let Err(e) = s.read_exact(&mut count) {
        return Event::Empty {
            conn,
            how: read_error_how(&e),
        };
    }
    let total = u64::from_le_bytes(count);
    let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
    let deadline = Instant::now() + BACKEND_IO_TIMEOUT;
    let mut written = 0u64;
    let mut stalled = false;
    while written < total {
        let chunk = pattern_slice(total, written, (total - written).min(64 * 1024) as usize);
        match s.write(chunk) {
            Ok(0) => {
                return Event::Streamed {
                    conn,
                    written,
                    error: Some("write returned 0".into()),
                }
            }
            Ok(n) => written += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if matches!(classify(&e), Closed::TimedOut) => {
                if !stalled {
                    stalled = true;
                    let _ = tx.send(Event::Stalled { conn, written });
                }
                if Instant::now() >= deadline {
                    return Event::Streamed {
                        conn,
                        written,
                        error: Some(format!("still blocked after {BACKEND_IO_TIMEOUT:?}")),
                    };
                }
            }
            Err(e) => {
                return Event::Streamed {
                    conn,
                    written,
                    error: Some(e.to_string()),
                }
            }
        }
    }
    let _ = s.shutdown(Shutdown::Write);
    Event::Streamed {
        conn,
        written,
        error: None,
    }
}

/// A backend address whose connects hang: a listener with backlog 0 whose accept queue we fill
/// and never accept from, so the kernel drops further SYNs (the connecting side keeps
/// retransmitting its SYN). Needs no privileges. The constructor checks that a connect to it
/// really does hang on this kernel.
pub struct Blackhole {
    pub addr: SocketAddr,
    _listener: Socket,
    _fillers: Vec<Socket>,
}

impl Blackhole {
    pub fn new() -> Blackhole {
        let bind: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let listener = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        listener.bind(&SockAddr::from(bind)).unwrap();
        listener.listen(0).unwrap();
        let addr = listener.local_addr().unwrap().as_socket().unwrap();
        let mut fillers = Vec::new();
        for _ in 0..64 {
            let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
            match s.connect_timeout(&SockAddr::from(addr), Duration::from_millis(300)) {
                Ok(()) => fillers.push(s),
                Err(e) if matches!(classify(&e), Closed::TimedOut) => {
                    // The accept queue is full: this connect hung. That is what we want.
                    return Blackhole {
                        addr,
                        _listener: listener,
                        _fillers: fillers,
                    };
                }
                Err(e) => panic!("filling the blackhole's accept queue: unexpected {e}"),
            }
        }
        panic!(
            "64 connects to a backlog-0 listener all completed: the backlog trick does not make \
             connect hang on this kernel"
        );
    }
}

impl Default for Blackhole {
    fn default() -> Self {
        Self::new()
    }
}

/// Bytes waiting in each kernel pipe the process holds (a worker's wake pipe included), read
/// with FIONREAD on a descriptor opened through /proc (it shares the pipe, reads nothing).
pub fn bytes_in_pipes(pid: u32) -> Vec<u64> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let mut found = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return found;
    };
    for entry in dir.flatten() {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.to_string_lossy().into_owned();
        // Both ends of a pipe show the same `pipe:[inode]`: count each pipe once.
        if !target.starts_with("pipe:") || !seen.insert(target) {
            continue;
        }
        let Ok(file) = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(entry.path())
        else {
            continue;
        };
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int through the pointer, on a descriptor we own.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::FIONREAD, &mut n) } == 0 {
            found.push(n as u64);
        }
    }
    found
}
