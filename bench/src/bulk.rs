//! `bulk`: long streams, one way or both. Every byte received is checked against the stream
//! pattern (see `payload`); bytes sent are counted as written.
//!
//! - up: client -> `sink` backend. At the end the client shuts down writing and waits for the
//!   backend's EOF, so the bytes still in flight are delivered (and timed) too.
//! - down: `source` backend -> client; counted while the clock runs, then closed.
//! - both: client <-> `echo` backend, writing and reading at once; at the end the client shuts
//!   down writing, reads the rest of the echo, and checks received == sent.
//!
//! A stream still draining when the drain's time is up is an `unfinished_stream` error, and one
//! that ran to the end without moving a byte its way a `no_data` error: neither counts as ok.

use crate::net::{connect_result, error_kind, start_connect, would_block};
use crate::payload::{check_stream, window, MAX_WINDOW};
use crate::stats::Stats;
use crate::Common;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::sync::Barrier;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Up,
    Down,
    Both,
}

impl std::str::FromStr for Direction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "up" => Ok(Direction::Up),
            "down" => Ok(Direction::Down),
            "both" => Ok(Direction::Both),
            _ => Err(format!("unknown direction {s:?} (up, down, both)")),
        }
    }
}

#[derive(Clone, Debug)]
pub struct BulkConfig {
    /// `conns` is the number of streams.
    pub common: Common,
    pub direction: Direction,
}

#[derive(Debug)]
pub struct BulkResult {
    pub stats: Stats,
    /// From the start to the last stream finished (longest thread).
    pub elapsed: Duration,
    /// Streams that ran to the end without error.
    pub streams_ok: u64,
}

impl BulkResult {
    pub fn gbps(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs <= 0.0 {
            return 0.0;
        }
        (self.stats.bytes_up + self.stats.bytes_down) as f64 * 8.0 / secs / 1e9
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Connecting,
    Running,
    Draining,
    Done,
    Failed,
}

struct Stream {
    sock: TcpStream,
    phase: Phase,
    sent: u64,
    received: u64,
    /// Stopped because of the per-step budget, not because the socket would block: step
    /// again without waiting for an event.
    hot: bool,
}

/// Reads or writes per step, so one fast stream cannot hold the loop past the end time.
const STEP_BUDGET: usize = 16;

pub fn run(cfg: &BulkConfig) -> BulkResult {
    let threads = cfg.common.threads.clamp(1, cfg.common.conns.max(1));
    let barrier = Barrier::new(threads);
    let results: Vec<(Stats, Duration, u64)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let barrier = &barrier;
                s.spawn(move || run_thread(cfg, t, threads, barrier))
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("bulk thread panicked"))
            .collect()
    });
    let mut stats = Stats::new();
    let mut elapsed = Duration::ZERO;
    let mut ok = 0;
    for (s, e, o) in &results {
        stats.merge(s);
        elapsed = elapsed.max(*e);
        ok += o;
    }
    BulkResult {
        stats,
        elapsed,
        streams_ok: ok,
    }
}

fn run_thread(
    cfg: &BulkConfig,
    t: usize,
    threads: usize,
    barrier: &Barrier,
) -> (Stats, Duration, u64) {
    let mut common = cfg.common.clone();
    common.threads = threads;
    let mut stats = Stats::new();
    let mut poll = Poll::new().expect("poll");
    let mut events = Events::with_capacity(256);
    let mut buf = vec![0u8; MAX_WINDOW];
    let mut streams: Vec<Stream> = Vec::new();
    for gi in common.conns_of_thread(t) {
        match start_connect(common.target, common.source_for(gi)) {
            Ok(mut sock) => {
                let token = Token(streams.len());
                if poll
                    .registry()
                    .register(&mut sock, token, Interest::READABLE | Interest::WRITABLE)
                    .is_ok()
                {
                    streams.push(Stream {
                        sock,
                        phase: Phase::Connecting,
                        sent: 0,
                        received: 0,
                        hot: false,
                    });
                } else {
                    stats.record_error("register");
                }
            }
            Err(e) => stats.record_error(&error_kind("connect", &e)),
        }
    }
    // establish before the clock starts
    let until = Instant::now() + common.timeout;
    loop {
        for s in streams.iter_mut().filter(|s| s.phase == Phase::Connecting) {
            match connect_result(&s.sock) {
                Ok(true) => s.phase = Phase::Running,
                Ok(false) => {}
                Err(e) => {
                    stats.record_error(&error_kind("connect", &e));
                    s.phase = Phase::Failed;
                }
            }
        }
        if !streams.iter().any(|s| s.phase == Phase::Connecting) || Instant::now() >= until {
            break;
        }
        let _ = poll.poll(&mut events, Some(Duration::from_millis(10)));
    }
    for s in streams.iter_mut().filter(|s| s.phase == Phase::Connecting) {
        stats.record_error("timeout_connect");
        s.phase = Phase::Failed;
    }
    barrier.wait();

    let t0 = Instant::now();
    let t_end = t0 + common.duration;
    // kick every stream once; afterwards edge-triggered events drive them
    for s in streams.iter_mut() {
        step(s, cfg.direction, &mut buf, &mut stats);
    }
    let mut draining = false;
    let mut drain_deadline = t_end;
    let mut last_done = t0;
    loop {
        let now = Instant::now();
        if !draining && now >= t_end {
            draining = true;
            drain_deadline = now + common.timeout.max(Duration::from_secs(2));
            for s in streams.iter_mut().filter(|s| s.phase == Phase::Running) {
                match cfg.direction {
                    Direction::Down => {
                        s.phase = Phase::Done;
                        let _ = s.sock.shutdown(Shutdown::Both);
                    }
                    Direction::Up | Direction::Both => {
                        s.phase = Phase::Draining;
                        if s.sock.shutdown(Shutdown::Write).is_err() {
                            stats.record_error("shutdown");
                            s.phase = Phase::Failed;
                        }
                    }
                }
            }
            last_done = now;
            for s in streams.iter_mut().filter(|s| s.phase == Phase::Draining) {
                step(s, cfg.direction, &mut buf, &mut stats);
                if s.phase == Phase::Done {
                    last_done = Instant::now();
                }
            }
        }
        if draining {
            if !streams.iter().any(|s| s.phase == Phase::Draining) {
                break;
            }
            if now >= drain_deadline {
                for s in streams.iter_mut().filter(|s| s.phase == Phase::Draining) {
                    stats.record_unfinished("stream");
                    s.phase = Phase::Failed;
                }
                break;
            }
        }
        let wake = if draining { drain_deadline } else { t_end };
        let mut timeout = wake
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(100));
        if streams.iter().any(|s| s.hot) {
            timeout = Duration::ZERO;
        }
        let _ = poll.poll(&mut events, Some(timeout));
        let woken = events.iter().map(|ev| ev.token().0);
        let hot: Vec<usize> = (0..streams.len()).filter(|&i| streams[i].hot).collect();
        for i in woken.chain(hot) {
            let s = &mut streams[i];
            let before = s.phase;
            step(s, cfg.direction, &mut buf, &mut stats);
            if before == Phase::Draining && s.phase == Phase::Done {
                last_done = Instant::now();
            }
        }
    }
    let elapsed = match cfg.direction {
        Direction::Down => common.duration,
        _ => last_done.max(t_end).duration_since(t0),
    };
    // A stream that ran to the end without moving a byte its way did nothing useful.
    for s in streams.iter_mut().filter(|s| s.phase == Phase::Done) {
        let moved = match cfg.direction {
            Direction::Up => s.sent,
            Direction::Down | Direction::Both => s.received,
        };
        if moved == 0 {
            stats.record_error("no_data");
            s.phase = Phase::Failed;
        }
    }
    let ok = streams.iter().filter(|s| s.phase == Phase::Done).count() as u64;
    (stats, elapsed, ok)
}

/// Move one stream as far as it goes without blocking.
fn step(s: &mut Stream, dir: Direction, buf: &mut [u8], stats: &mut Stats) {
    s.hot = false;
    if !matches!(s.phase, Phase::Running | Phase::Draining) {
        return;
    }
    // read what is available (up to the budget)
    let mut round = 0;
    loop {
        round += 1;
        if round > STEP_BUDGET {
            s.hot = true;
            break;
        }
        match s.sock.read(buf) {
            Ok(0) => {
                if s.phase == Phase::Draining {
                    if dir == Direction::Both && s.received != s.sent {
                        stats.record_error("echo_short");
                        s.phase = Phase::Failed;
                    } else {
                        s.phase = Phase::Done;
                    }
                } else {
                    stats.record_error("eof_early");
                    s.phase = Phase::Failed;
                }
                return;
            }
            Ok(n) => {
                if dir == Direction::Up {
                    stats.record_error("unexpected_data");
                    s.phase = Phase::Failed;
                    return;
                }
                if check_stream(s.received, &buf[..n]).is_err() {
                    stats.record_error("stream_content");
                    s.phase = Phase::Failed;
                    return;
                }
                s.received += n as u64;
                stats.bytes_down += n as u64;
                if dir == Direction::Both && s.received > s.sent {
                    stats.record_error("echo_long");
                    s.phase = Phase::Failed;
                    return;
                }
            }
            Err(e) if would_block(&e) => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                stats.record_error(&error_kind("read", &e));
                s.phase = Phase::Failed;
                return;
            }
        }
    }
    if s.phase != Phase::Running || dir == Direction::Down {
        return;
    }
    let mut round = 0;
    loop {
        round += 1;
        if round > STEP_BUDGET {
            s.hot = true;
            break;
        }
        match s.sock.write(window(s.sent, MAX_WINDOW)) {
            Ok(n) => {
                s.sent += n as u64;
                stats.bytes_up += n as u64;
            }
            Err(e) if would_block(&e) => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                stats.record_error(&error_kind("write", &e));
                s.phase = Phase::Failed;
                return;
            }
        }
    }
}
