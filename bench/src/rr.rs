//! Request/response workloads on a mio event loop per thread.
//!
//! `rr`: persistent connections; each sends a request of `size` bytes and waits for the echo
//! before sending the next (closed loop), or, with `rate`, sends on a fixed schedule.
//! `connect` (see `connect.rs`): the same exchange on a new connection every time.
//!
//! Fixed rate and coordinated omission: every connection has a schedule of intended send times
//! (`conns / rate` apart, staggered across connections). A request that is sent late because
//! its connection was still waiting for the previous reply (or was reconnecting) is timed from
//! its *intended* send time, as wrk2 does, so a stall is charged to every request it delayed.
//! A request sent on time by the timer is timed from when it was actually written: the poll
//! timer's ~1 ms granularity belongs to the load generator, not to the system under test (to
//! stay on schedule despite it, sends may leave up to 1 ms early).
//! Sends that left more than 1 ms after their intended time are counted as `late_sends`.
//!
//! The end of a run: no new exchange starts after `duration`, and the exchanges still in flight
//! (a request without its reply, a connect not finished) get until their own deadline, at most
//! `timeout` after the end, to finish. Those that finish are reported as `finished_after_end`
//! (not in `ok` or the latency, which cover the measured interval); those that do not are
//! `unfinished` errors. A run therefore never ends with work left in flight and "0 errors".

use crate::net::{connect_result, error_kind, start_connect, would_block};
use crate::payload::{check_reply, make_request};
use crate::stats::Stats;
use crate::Common;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{Read, Write};
use std::sync::Barrier;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct RrConfig {
    pub common: Common,
    pub size: usize,
    /// Offered load in requests per second over all connections (None: closed loop).
    pub rate: Option<f64>,
    /// A new connection for every exchange (the `connect` workload).
    pub reconnect: bool,
    /// The server sends one line first (`hello` backends): read and discard it.
    pub greeting: bool,
}

#[derive(Debug)]
pub struct RrResult {
    pub stats: Stats,
    /// Measured interval.
    pub elapsed: Duration,
    /// Connections established (including reconnects).
    pub connects: u64,
    /// Rate mode: sends that left more than 1 ms after their intended time.
    pub late_sends: u64,
    /// Exchanges (or rr reconnects) in flight when the measured interval ended.
    pub in_flight_at_end: u64,
    /// Of those, the ones that finished within `timeout` after the end; the rest are
    /// `stats.unfinished`, or errors of another kind if they failed otherwise (a reset, ...).
    pub finished_after_end: u64,
    /// How long the wait for them took (longest thread).
    pub drain: Duration,
}

/// What one load thread hands back.
struct ThreadResult {
    stats: Stats,
    connects: u64,
    late: u64,
    in_flight_at_end: u64,
    finished_after_end: u64,
    drain: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum St {
    /// Connected, waiting for the measurement to start.
    Ready,
    Connecting,
    /// Reading the server's greeting line.
    Greeting,
    Sending,
    Receiving,
    /// Rate mode: waiting for the next intended send time.
    Waiting,
    /// After an error: reconnect at `timer_at`.
    Backoff,
}

struct Slot {
    gi: usize,
    stream: Option<TcpStream>,
    st: St,
    seq: u64,
    req: Vec<u8>,
    reply: Vec<u8>,
    written: usize,
    /// Latency origin of the exchange in flight.
    origin: Instant,
    connect_started: Instant,
    deadline: Instant,
    /// Rate mode: the next intended send time.
    due: Instant,
    timer_at: Instant,
}

struct Ctx<'a> {
    cfg: &'a RrConfig,
    poll: Poll,
    stats: Stats,
    connects: u64,
    late: u64,
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    rbuf: Vec<u8>,
    /// Measurement running (false before the start and after the end).
    measuring: bool,
    /// After the end: finishing the exchanges in flight, starting none.
    draining: bool,
    /// Exchanges that finished while draining.
    drained: u64,
    interval: Option<Duration>,
}

const BACKOFF: Duration = Duration::from_millis(10);
/// Rate mode: a send may leave up to this much before its intended time. The poll timeout has
/// 1 ms granularity (rounded up), so waking 1 ms early keeps timer sends on schedule on
/// average instead of always up to 1 ms late.
const EARLY: Duration = Duration::from_millis(1);

pub fn run(cfg: &RrConfig) -> RrResult {
    let threads = cfg.common.threads.clamp(1, cfg.common.conns.max(1));
    let barrier = Barrier::new(threads);
    let results: Vec<ThreadResult> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let barrier = &barrier;
                s.spawn(move || run_thread(cfg, t, threads, barrier))
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("load thread panicked"))
            .collect()
    });
    let mut res = RrResult {
        stats: Stats::new(),
        elapsed: cfg.common.duration,
        connects: 0,
        late_sends: 0,
        in_flight_at_end: 0,
        finished_after_end: 0,
        drain: Duration::ZERO,
    };
    for r in &results {
        res.stats.merge(&r.stats);
        res.connects += r.connects;
        res.late_sends += r.late;
        res.in_flight_at_end += r.in_flight_at_end;
        res.finished_after_end += r.finished_after_end;
        res.drain = res.drain.max(r.drain);
    }
    res
}

/// An exchange (or a connect) is under way on this slot: it owes an outcome.
fn in_flight(st: St) -> bool {
    matches!(
        st,
        St::Connecting | St::Greeting | St::Sending | St::Receiving
    )
}

fn run_thread(cfg: &RrConfig, t: usize, threads: usize, barrier: &Barrier) -> ThreadResult {
    let mut common = cfg.common.clone();
    common.threads = threads;
    let ids = common.conns_of_thread(t);
    let now = Instant::now();
    let mut ctx = Ctx {
        cfg,
        poll: Poll::new().expect("poll"),
        stats: Stats::new(),
        connects: 0,
        late: 0,
        timers: BinaryHeap::new(),
        rbuf: vec![0u8; cfg.size.clamp(4096, 256 * 1024)],
        measuring: false,
        draining: false,
        drained: 0,
        interval: cfg
            .rate
            .filter(|r| *r > 0.0)
            .map(|r| Duration::from_secs_f64(cfg.common.conns as f64 / r)),
    };
    let mut slots: Vec<Slot> = ids
        .iter()
        .map(|&gi| Slot {
            gi,
            stream: None,
            st: St::Backoff,
            seq: 0,
            req: Vec::with_capacity(cfg.size),
            reply: Vec::with_capacity(cfg.size),
            written: 0,
            origin: now,
            connect_started: now,
            deadline: now,
            due: now,
            timer_at: now,
        })
        .collect();
    let mut events = Events::with_capacity(1024);

    // Phase 1 (rr only): establish the persistent connections before the clock starts.
    if !cfg.reconnect {
        for (i, s) in slots.iter_mut().enumerate() {
            open(s, i, &mut ctx);
        }
        let until = Instant::now() + cfg.common.timeout;
        while slots
            .iter()
            .any(|s| matches!(s.st, St::Connecting | St::Greeting))
            && Instant::now() < until
        {
            let _ = ctx.poll.poll(&mut events, Some(Duration::from_millis(20)));
            for ev in events.iter() {
                let i = ev.token().0;
                drive(&mut slots[i], i, &mut ctx);
            }
        }
        for (i, s) in slots.iter_mut().enumerate() {
            if matches!(s.st, St::Connecting | St::Greeting) {
                fail(s, i, &mut ctx, "timeout_connect");
            }
        }
        ctx.timers.clear();
    }
    barrier.wait();

    // Phase 2: measure.
    let t0 = Instant::now();
    let t_end = t0 + cfg.common.duration;
    ctx.measuring = true;
    for (i, s) in slots.iter_mut().enumerate() {
        if let Some(iv) = ctx.interval {
            s.due = t0 + iv.mul_f64(s.gi as f64 / cfg.common.conns as f64);
        }
        match s.st {
            St::Ready => begin(s, i, &mut ctx, Instant::now(), false),
            _ => {
                if cfg.reconnect {
                    open(s, i, &mut ctx);
                } else {
                    // failed in phase 1: retry now
                    s.st = St::Backoff;
                    s.timer_at = t0;
                    ctx.timers.push(Reverse((t0, i)));
                }
            }
        }
    }
    let mut next_scan = t0 + Duration::from_millis(50);
    loop {
        let now = Instant::now();
        if now >= t_end {
            break;
        }
        // timers due
        while let Some(Reverse((at, i))) = ctx.timers.peek().copied() {
            if at > now {
                break;
            }
            ctx.timers.pop();
            let s = &mut slots[i];
            if s.timer_at != at {
                continue;
            }
            match s.st {
                St::Waiting => begin(s, i, &mut ctx, now, true),
                St::Backoff => open(s, i, &mut ctx),
                _ => {}
            }
        }
        if now >= next_scan {
            next_scan = now + Duration::from_millis(50);
            for (i, s) in slots.iter_mut().enumerate() {
                if now > s.deadline {
                    match s.st {
                        St::Connecting => fail(s, i, &mut ctx, "timeout_connect"),
                        St::Greeting => fail(s, i, &mut ctx, "timeout_greeting"),
                        St::Sending | St::Receiving => fail(s, i, &mut ctx, "timeout_reply"),
                        _ => {}
                    }
                }
            }
        }
        let mut wake = t_end.min(next_scan);
        if let Some(Reverse((at, _))) = ctx.timers.peek() {
            wake = wake.min(*at);
        }
        let timeout = wake.saturating_duration_since(Instant::now());
        if let Err(e) = ctx.poll.poll(&mut events, Some(timeout)) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                ctx.stats.record_error("poll");
                break;
            }
        }
        for ev in events.iter() {
            let i = ev.token().0;
            drive(&mut slots[i], i, &mut ctx);
        }
    }

    // Phase 3: the work in flight at the end gets until its deadline (at most `timeout` after
    // the end) to finish; nothing new starts. What does not finish is an `unfinished` error.
    ctx.measuring = false;
    ctx.draining = true;
    let drain_start = Instant::now();
    let drain_until = drain_start + cfg.common.timeout;
    let in_flight_at_end = slots.iter().filter(|s| in_flight(s.st)).count() as u64;
    loop {
        let now = Instant::now();
        let mut wake = drain_until;
        for s in slots.iter_mut() {
            if !in_flight(s.st) {
                continue;
            }
            if now >= s.deadline || now >= drain_until {
                let what = match s.st {
                    St::Connecting => "connect",
                    St::Greeting => "greeting",
                    _ => "reply",
                };
                ctx.stats.record_unfinished(what);
                close(s, &mut ctx);
                s.st = St::Ready;
            } else {
                wake = wake.min(s.deadline);
            }
        }
        if !slots.iter().any(|s| in_flight(s.st)) {
            break;
        }
        let timeout = wake.saturating_duration_since(Instant::now());
        if let Err(e) = ctx.poll.poll(&mut events, Some(timeout)) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                ctx.stats.record_error("poll");
                for s in slots.iter_mut().filter(|s| in_flight(s.st)) {
                    ctx.stats.record_unfinished("reply");
                    s.st = St::Ready;
                }
                break;
            }
        }
        for ev in events.iter() {
            let i = ev.token().0;
            drive(&mut slots[i], i, &mut ctx);
        }
    }
    ThreadResult {
        stats: ctx.stats,
        connects: ctx.connects,
        late: ctx.late,
        in_flight_at_end,
        finished_after_end: ctx.drained,
        drain: drain_start.elapsed(),
    }
}

fn open(s: &mut Slot, i: usize, ctx: &mut Ctx) {
    close(s, ctx);
    let now = Instant::now();
    s.connect_started = now;
    match start_connect(ctx.cfg.common.target, ctx.cfg.common.source_for(s.gi)) {
        Ok(mut stream) => {
            if let Err(e) = ctx.poll.registry().register(
                &mut stream,
                Token(i),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                ctx.stats.record_error(&error_kind("register", &e));
                backoff(s, i, ctx);
                return;
            }
            s.stream = Some(stream);
            s.st = St::Connecting;
            s.deadline = now + ctx.cfg.common.timeout;
        }
        Err(e) => {
            ctx.stats.record_error(&error_kind("connect", &e));
            backoff(s, i, ctx);
        }
    }
}

fn close(s: &mut Slot, ctx: &mut Ctx) {
    if let Some(mut stream) = s.stream.take() {
        let _ = ctx.poll.registry().deregister(&mut stream);
    }
}

fn backoff(s: &mut Slot, i: usize, ctx: &mut Ctx) {
    close(s, ctx);
    s.st = St::Backoff;
    s.timer_at = Instant::now() + BACKOFF;
    ctx.timers.push(Reverse((s.timer_at, i)));
}

fn fail(s: &mut Slot, i: usize, ctx: &mut Ctx, kind: &str) {
    ctx.stats.record_error(kind);
    backoff(s, i, ctx);
}

/// Start the next exchange on a connected slot (or schedule it, in rate mode).
fn begin(s: &mut Slot, i: usize, ctx: &mut Ctx, now: Instant, by_timer: bool) {
    // Before the start, and while draining, a connection that comes up has nothing more to do,
    // except in `connect`, where the connect is the start of an exchange already under way.
    let exchange_under_way = ctx.measuring || (ctx.draining && ctx.cfg.reconnect);
    if !exchange_under_way {
        s.st = St::Ready;
        return;
    }
    if ctx.cfg.reconnect {
        s.origin = s.connect_started;
    } else if let Some(iv) = ctx.interval {
        if now + EARLY < s.due {
            s.st = St::Waiting;
            s.timer_at = s.due - EARLY;
            ctx.timers.push(Reverse((s.timer_at, i)));
            return;
        }
        s.origin = if by_timer || now <= s.due { now } else { s.due };
        if now.duration_since(s.due) > Duration::from_millis(1) {
            ctx.late += 1;
        }
        s.due += iv;
    } else {
        s.origin = now;
    }
    make_request(s.seq, ctx.cfg.size, &mut s.req);
    s.written = 0;
    s.reply.clear();
    s.st = St::Sending;
    s.deadline = now + ctx.cfg.common.timeout;
    drive(s, i, ctx);
}

/// Make all the progress possible on one slot after a readiness event.
fn drive(s: &mut Slot, i: usize, ctx: &mut Ctx) {
    loop {
        match s.st {
            St::Connecting => {
                let Some(stream) = s.stream.as_ref() else {
                    return;
                };
                match connect_result(stream) {
                    Ok(true) => {
                        ctx.connects += 1;
                        if ctx.cfg.greeting {
                            s.st = St::Greeting;
                            continue;
                        }
                        begin(s, i, ctx, Instant::now(), false);
                        return;
                    }
                    Ok(false) => return,
                    Err(e) => {
                        let kind = error_kind("connect", &e);
                        fail(s, i, ctx, &kind);
                        return;
                    }
                }
            }
            St::Sending => {
                let Some(stream) = s.stream.as_mut() else {
                    return;
                };
                match stream.write(&s.req[s.written..]) {
                    Ok(n) => {
                        s.written += n;
                        if s.written == s.req.len() {
                            s.st = St::Receiving;
                        }
                    }
                    Err(e) if would_block(&e) => return,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        let kind = error_kind("write", &e);
                        fail(s, i, ctx, &kind);
                        return;
                    }
                }
            }
            St::Receiving => {
                let Some(stream) = s.stream.as_mut() else {
                    return;
                };
                match stream.read(&mut ctx.rbuf) {
                    Ok(0) => {
                        fail(s, i, ctx, "eof_before_reply");
                        return;
                    }
                    Ok(n) => {
                        s.reply.extend_from_slice(&ctx.rbuf[..n]);
                        if s.reply.len() < ctx.cfg.size {
                            continue;
                        }
                        let now = Instant::now();
                        if let Err(e) = check_reply(s.seq, ctx.cfg.size, &s.reply) {
                            fail(s, i, ctx, e.kind());
                            return;
                        }
                        if ctx.measuring {
                            ctx.stats.record_ok(now.duration_since(s.origin));
                        }
                        s.seq += 1;
                        if ctx.draining {
                            ctx.drained += 1;
                            close(s, ctx);
                            s.st = St::Ready;
                        } else if ctx.cfg.reconnect {
                            open(s, i, ctx);
                        } else {
                            begin(s, i, ctx, now, false);
                        }
                        return;
                    }
                    Err(e) if would_block(&e) => return,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        let kind = error_kind("read", &e);
                        fail(s, i, ctx, &kind);
                        return;
                    }
                }
            }
            St::Greeting => {
                let Some(stream) = s.stream.as_mut() else {
                    return;
                };
                // read byte-wise: nothing after the newline may be consumed
                let mut byte = [0u8; 1];
                match stream.read(&mut byte) {
                    Ok(0) => {
                        fail(s, i, ctx, "eof_before_greeting");
                        return;
                    }
                    Ok(_) => {
                        if byte[0] == b'\n' {
                            begin(s, i, ctx, Instant::now(), false);
                            return;
                        }
                    }
                    Err(e) if would_block(&e) => return,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        let kind = error_kind("read", &e);
                        fail(s, i, ctx, &kind);
                        return;
                    }
                }
            }
            St::Ready | St::Waiting | St::Backoff => return,
        }
    }
}
