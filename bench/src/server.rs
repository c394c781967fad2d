//! Test backends: echo, sink, source, http, hello. One mio event loop per thread; every
//! thread accepts on every listener (clones of the same sockets). An idle connection holds no
//! buffer, so thousands of idle connections cost little.

use crate::net::{listen, would_block};
use crate::payload;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Write back everything read; on EOF finish writing, then shut down writing.
    Echo,
    /// Read and discard; on EOF shut down writing.
    Sink,
    /// Write the stream pattern (see `payload`) without end; reads are discarded.
    Source,
    /// Answer every request (ended by an empty line) with a small keep-alive response.
    Http,
    /// Write "NAME\n" on accept, then echo.
    Hello,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "echo" => Ok(Mode::Echo),
            "sink" => Ok(Mode::Sink),
            "source" => Ok(Mode::Source),
            "http" => Ok(Mode::Http),
            "hello" => Ok(Mode::Hello),
            _ => Err(format!(
                "unknown mode {s:?} (echo, sink, source, http, hello)"
            )),
        }
    }
}

pub const HTTP_RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\nConnection: keep-alive\r\n\r\nhello, world\n";

/// Counts complete HTTP request heads ("\r\n\r\n") across reads.
#[derive(Default, Clone, Copy, Debug)]
pub struct HeadCounter {
    matched: u8,
}

impl HeadCounter {
    pub fn feed(&mut self, data: &[u8]) -> usize {
        const END: &[u8; 4] = b"\r\n\r\n";
        let mut heads = 0;
        for &b in data {
            if b == END[self.matched as usize] {
                self.matched += 1;
                if self.matched == 4 {
                    heads += 1;
                    self.matched = 0;
                }
            } else {
                self.matched = u8::from(b == b'\r');
            }
        }
        heads
    }
}

pub struct ServeConfig {
    pub listen: Vec<SocketAddr>,
    pub mode: Mode,
    /// One optional name per listener (hello mode); default "backend@ADDR".
    pub names: Vec<Option<String>>,
    pub threads: usize,
    /// Stop after this long (None: run until killed).
    pub duration: Option<Duration>,
}

struct Conn {
    stream: TcpStream,
    out: Vec<u8>,
    out_pos: usize,
    read_eof: bool,
    listener: usize,
    http: HeadCounter,
    source_off: u64,
    /// Stopped at the per-drive budget rather than at WouldBlock: drive again soon.
    hot: bool,
}

/// Reads or writes per drive, so one busy connection cannot starve the others.
const DRIVE_BUDGET: usize = 16;

const BUF: usize = 64 * 1024;

/// Bind every listener, print "listening on ADDR mode=M name=N" for each (stdout, flushed),
/// then serve until `stop` is set or the duration ends.
pub fn serve(cfg: ServeConfig, stop: Arc<AtomicBool>) -> io::Result<()> {
    let mut listeners = Vec::new();
    let mut names = Vec::new();
    for (i, addr) in cfg.listen.iter().enumerate() {
        let l = listen(*addr)?;
        let local = l.local_addr()?;
        let name = cfg
            .names
            .get(i)
            .cloned()
            .flatten()
            .unwrap_or_else(|| format!("backend@{local}"));
        println!("listening on {local} mode={:?} name={name}", cfg.mode);
        names.push(name);
        listeners.push(l);
    }
    use std::io::Write as _;
    io::stdout().flush()?;
    let deadline = cfg.duration.map(|d| Instant::now() + d);
    let names = Arc::new(names);
    let mut handles = Vec::new();
    for _ in 1..cfg.threads.max(1) {
        let mut mine = Vec::new();
        for l in &listeners {
            let std_l = clone_listener(l)?;
            mine.push(TcpListener::from_std(std_l));
        }
        let (names, stop, mode) = (names.clone(), stop.clone(), cfg.mode);
        handles.push(std::thread::spawn(move || {
            run_loop(mine, mode, &names, &stop, deadline)
        }));
    }
    let res = run_loop(listeners, cfg.mode, &names, &stop, deadline);
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    res
}

fn clone_listener(l: &TcpListener) -> io::Result<std::net::TcpListener> {
    use std::os::fd::AsFd;
    let owned = l.as_fd().try_clone_to_owned()?;
    Ok(std::net::TcpListener::from(owned))
}

fn run_loop(
    mut listeners: Vec<TcpListener>,
    mode: Mode,
    names: &[String],
    stop: &AtomicBool,
    deadline: Option<Instant>,
) -> io::Result<()> {
    let mut poll = Poll::new()?;
    for (i, l) in listeners.iter_mut().enumerate() {
        poll.registry().register(l, Token(i), Interest::READABLE)?;
    }
    let nl = listeners.len();
    let mut conns: Slab<Conn> = Slab::new();
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; BUF];
    let mut accept_retry = false;
    let mut last_accept_log = Instant::now() - Duration::from_secs(10);
    loop {
        if stop.load(Ordering::Relaxed) || deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(());
        }
        let hot: Vec<usize> = conns
            .iter()
            .filter(|(_, c)| c.hot)
            .map(|(k, _)| k)
            .collect();
        let timeout = if !hot.is_empty() {
            0
        } else if accept_retry {
            10
        } else {
            200
        };
        match poll.poll(&mut events, Some(Duration::from_millis(timeout))) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        let mut to_accept: Vec<usize> = Vec::new();
        if accept_retry {
            to_accept.extend(0..nl);
            accept_retry = false;
        }
        let woken = events.iter().map(|ev| ev.token().0);
        for t in woken.chain(hot.into_iter().map(|k| k + nl)) {
            if t < nl {
                to_accept.push(t);
                continue;
            }
            let key = t - nl;
            let keep = match conns.get_mut(key) {
                Some(c) => drive(c, mode, &mut buf),
                None => continue,
            };
            if !keep {
                let mut c = conns.remove(key);
                let _ = poll.registry().deregister(&mut c.stream);
            }
        }
        to_accept.sort_unstable();
        to_accept.dedup();
        for li in to_accept {
            loop {
                match listeners[li].accept() {
                    Ok((stream, _)) => {
                        let _ = stream.set_nodelay(true);
                        let entry = conns.vacant_entry();
                        let key = entry.key();
                        let mut c = Conn {
                            stream,
                            out: Vec::new(),
                            out_pos: 0,
                            read_eof: false,
                            listener: li,
                            http: HeadCounter::default(),
                            source_off: 0,
                            hot: false,
                        };
                        if mode == Mode::Hello {
                            c.out.extend_from_slice(names[c.listener].as_bytes());
                            c.out.push(b'\n');
                        }
                        if poll
                            .registry()
                            .register(
                                &mut c.stream,
                                Token(nl + key),
                                Interest::READABLE | Interest::WRITABLE,
                            )
                            .is_err()
                        {
                            continue;
                        }
                        let c = entry.insert(c);
                        if !drive(c, mode, &mut buf) {
                            let mut c = conns.remove(key);
                            let _ = poll.registry().deregister(&mut c.stream);
                        }
                    }
                    Err(e) if would_block(&e) => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // EMFILE and friends: keep serving, retry accepting shortly.
                        if last_accept_log.elapsed() >= Duration::from_secs(1) {
                            eprintln!("ringway-load serve: accept: {e}");
                            last_accept_log = Instant::now();
                        }
                        accept_retry = true;
                        break;
                    }
                }
            }
        }
    }
}

/// Make all the progress possible on one connection. Returns false when it is finished.
fn drive(c: &mut Conn, mode: Mode, buf: &mut [u8]) -> bool {
    c.hot = false;
    if mode == Mode::Source {
        return drive_source(c, buf);
    }
    let mut round = 0;
    loop {
        round += 1;
        if round > DRIVE_BUDGET {
            c.hot = true;
            return true;
        }
        // 1. flush what is owed
        while c.out_pos < c.out.len() {
            match c.stream.write(&c.out[c.out_pos..]) {
                Ok(0) => return false,
                Ok(n) => c.out_pos += n,
                Err(e) if would_block(&e) => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        c.out.clear();
        c.out_pos = 0;
        if c.out.capacity() > BUF {
            c.out = Vec::new();
        }
        // 2. peer done and all written: half-close our side and finish
        if c.read_eof {
            let _ = c.stream.shutdown(Shutdown::Write);
            return false;
        }
        // 3. read more
        let n = match c.stream.read(buf) {
            Ok(0) => {
                c.read_eof = true;
                continue;
            }
            Ok(n) => n,
            Err(e) if would_block(&e) => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        };
        match mode {
            Mode::Echo | Mode::Hello => {
                // write straight from the read buffer; keep only what the socket refused
                let mut done = 0;
                while done < n {
                    match c.stream.write(&buf[done..n]) {
                        Ok(0) => return false,
                        Ok(w) => done += w,
                        Err(e) if would_block(&e) => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => return false,
                    }
                }
                if done < n {
                    c.out.extend_from_slice(&buf[done..n]);
                }
            }
            Mode::Sink | Mode::Source => {}
            Mode::Http => {
                let heads = c.http.feed(&buf[..n]);
                for _ in 0..heads {
                    c.out.extend_from_slice(HTTP_RESPONSE);
                }
            }
        }
    }
}

fn drive_source(c: &mut Conn, buf: &mut [u8]) -> bool {
    let mut round = 0;
    loop {
        round += 1;
        if round > DRIVE_BUDGET {
            c.hot = true;
            break;
        }
        match c.stream.read(buf) {
            Ok(0) => return false,
            Ok(_) => {}
            Err(e) if would_block(&e) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    let mut round = 0;
    loop {
        round += 1;
        if round > DRIVE_BUDGET {
            c.hot = true;
            return true;
        }
        match c
            .stream
            .write(payload::window(c.source_off, payload::MAX_WINDOW))
        {
            Ok(0) => return false,
            Ok(n) => c.source_off += n as u64,
            Err(e) if would_block(&e) => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_counter_across_chunks() {
        let mut h = HeadCounter::default();
        assert_eq!(h.feed(b"GET / HTTP/1.1\r\nHost: x\r"), 0);
        assert_eq!(h.feed(b"\n\r"), 0);
        assert_eq!(h.feed(b"\nGET / HTTP/1.1\r\n\r\nGET /"), 2);
        assert_eq!(h.feed(b" HTTP/1.1\r\r\n\r\n"), 1);
        assert_eq!(h.feed(b"\r\n\n\r\n"), 0);
    }

    #[test]
    fn modes_parse() {
        assert_eq!("echo".parse::<Mode>(), Ok(Mode::Echo));
        assert_eq!("hello".parse::<Mode>(), Ok(Mode::Hello));
        assert!("ehco".parse::<Mode>().is_err());
    }
}
