//! `idle`: open N flows (spread over several client source addresses), check each once
//! end to end, report "ready" (and write the ready file), hold them idle, then check each again.
//! A check round waits at most `timeout` (2 s or more) for its replies; a reply still missing
//! then is an `unfinished_reply` error (`first_unfinished_reply` in the first round).

use crate::net::{connect_blocking, error_kind, would_block};
use crate::payload::{check_reply, make_request};
use crate::stats::Stats;
use crate::Common;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct IdleConfig {
    /// `conns` flows to open; `duration` is unused (see `hold`).
    pub common: Common,
    pub hold: Duration,
    pub ready_file: Option<PathBuf>,
    pub size: usize,
    /// Give up opening after this long; flows not open by then count as failed.
    pub open_deadline: Duration,
    /// Check exchanges outstanding at once in a round; 0: send every request before waiting
    /// (the replies overlap as much as they can), 1: one flow after the other.
    pub in_flight: usize,
}

#[derive(Debug, Default)]
pub struct IdleResult {
    pub wanted: usize,
    pub opened: usize,
    pub open_secs: f64,
    /// Flows that answered the exchange right after opening.
    pub first_ok: usize,
    /// Flows that answered after the hold.
    pub final_ok: usize,
    pub held_secs: f64,
    /// Latency of the exchanges after the hold, errors of every phase.
    pub stats: Stats,
}

impl IdleResult {
    pub fn failed(&self) -> usize {
        self.wanted - self.final_ok
    }
}

/// `stop` ends the hold early (the CLI sets it on SIGUSR1).
pub fn run(cfg: &IdleConfig, stop: Arc<AtomicBool>) -> IdleResult {
    let mut res = IdleResult {
        wanted: cfg.common.conns,
        stats: Stats::new(),
        ..Default::default()
    };
    let mut poll = Poll::new().expect("poll");
    let t_open = Instant::now();
    let open_until = t_open + cfg.open_deadline;
    let mut flows: Vec<Option<TcpStream>> = Vec::with_capacity(cfg.common.conns);
    let mut scratch = Stats::new();
    for i in 0..cfg.common.conns {
        if Instant::now() >= open_until {
            res.stats.record_error("open_deadline");
            flows.push(None);
            continue;
        }
        match connect_blocking(
            cfg.common.target,
            cfg.common.source_for(i),
            cfg.common.timeout,
        ) {
            Ok(mut s) => {
                if poll
                    .registry()
                    .register(&mut s, Token(i), Interest::READABLE)
                    .is_ok()
                {
                    flows.push(Some(s));
                } else {
                    res.stats.record_error("register");
                    flows.push(None);
                }
            }
            Err(e) => {
                res.stats.record_error(&error_kind("connect", &e));
                flows.push(None);
            }
        }
    }
    res.opened = flows.iter().filter(|f| f.is_some()).count();
    res.open_secs = t_open.elapsed().as_secs_f64();
    eprintln!(
        "idle: opened {}/{} flows in {:.2}s",
        res.opened, res.wanted, res.open_secs
    );

    // one exchange on each, so every flow is known to reach a backend
    res.first_ok = exchange_all(&mut poll, &mut flows, 0, cfg, &mut scratch);
    for (k, v) in &scratch.errors {
        *res.stats.errors.entry(format!("first_{k}")).or_insert(0) += v;
    }
    res.stats.unfinished += scratch.unfinished;
    eprintln!("ready: {} flows open and checked", res.first_ok);
    if let Some(p) = &cfg.ready_file {
        if let Err(e) = std::fs::write(p, format!("{}\n", res.first_ok)) {
            eprintln!("idle: cannot write ready file {}: {e}", p.display());
            res.stats.record_error("ready_file");
        }
    }

    let t_hold = Instant::now();
    let hold_until = t_hold + cfg.hold;
    while Instant::now() < hold_until && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(
            hold_until
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(20)),
        );
    }
    res.held_secs = t_hold.elapsed().as_secs_f64();

    let mut final_stats = Stats::new();
    res.final_ok = exchange_all(&mut poll, &mut flows, 1, cfg, &mut final_stats);
    res.stats.merge(&final_stats);
    res
}

/// Send request `seq` on every open flow, wait for all replies (bounded). Flows that fail are
/// closed. Returns the number of good replies.
fn exchange_all(
    poll: &mut Poll,
    flows: &mut [Option<TcpStream>],
    seq: u64,
    cfg: &IdleConfig,
    stats: &mut Stats,
) -> usize {
    let mut req = Vec::new();
    make_request(seq, cfg.size, &mut req);
    let n = flows.len();
    let mut got: Vec<Vec<u8>> = vec![Vec::new(); n];
    let mut pending = vec![false; n];
    let mut origin = vec![Instant::now(); n];
    let mut waiting = 0usize;
    for i in 0..n {
        let Some(s) = flows[i].as_mut() else { continue };
        origin[i] = Instant::now();
        match s.write(&req) {
            Ok(w) if w == req.len() => {
                pending[i] = true;
                waiting += 1;
            }
            Ok(_) => {
                stats.record_error("write_short");
                drop_flow(poll, flows, i);
            }
            Err(e) => {
                stats.record_error(&error_kind("write", &e));
                drop_flow(poll, flows, i);
            }
        }
        // at most `in_flight` exchanges outstanding: wait for replies before the next request
        // (bounded by the round's timeout, like the final wait below)
        if cfg.in_flight > 0 && waiting >= cfg.in_flight {
            let until = Instant::now() + cfg.common.timeout.max(Duration::from_secs(2));
            while waiting >= cfg.in_flight && Instant::now() < until {
                let left = until.saturating_duration_since(Instant::now());
                waiting -= collect(
                    &mut *poll,
                    flows,
                    &mut got,
                    &mut pending,
                    &origin,
                    seq,
                    cfg,
                    stats,
                    left.min(Duration::from_millis(100)),
                );
            }
        }
        // a full pass may take a while with many flows: read whatever is ready meanwhile
        if i % 512 == 511 {
            waiting -= collect(
                &mut *poll,
                flows,
                &mut got,
                &mut pending,
                &origin,
                seq,
                cfg,
                stats,
                Duration::ZERO,
            );
        }
    }
    let until = Instant::now() + cfg.common.timeout.max(Duration::from_secs(2));
    while waiting > 0 && Instant::now() < until {
        let left = until.saturating_duration_since(Instant::now());
        waiting -= collect(
            &mut *poll,
            flows,
            &mut got,
            &mut pending,
            &origin,
            seq,
            cfg,
            stats,
            left.min(Duration::from_millis(100)),
        );
    }
    for (i, p) in pending.iter_mut().enumerate() {
        if *p {
            // still in flight when the round stopped waiting
            stats.record_unfinished("reply");
            *p = false;
            drop_flow(poll, flows, i);
        }
    }
    flows.iter().filter(|f| f.is_some()).count()
}

fn drop_flow(poll: &Poll, flows: &mut [Option<TcpStream>], i: usize) {
    if let Some(mut s) = flows[i].take() {
        let _ = poll.registry().deregister(&mut s);
    }
}

/// Poll once and read replies; returns how many flows finished (well or badly).
#[allow(clippy::too_many_arguments)]
fn collect(
    poll: &mut Poll,
    flows: &mut [Option<TcpStream>],
    got: &mut [Vec<u8>],
    pending: &mut [bool],
    origin: &[Instant],
    seq: u64,
    cfg: &IdleConfig,
    stats: &mut Stats,
    timeout: Duration,
) -> usize {
    let mut events = Events::with_capacity(1024);
    let mut finished = 0;
    let mut buf = [0u8; 4096];
    let mut ready: Vec<usize> = Vec::new();
    if poll.poll(&mut events, Some(timeout)).is_ok() {
        ready.extend(events.iter().map(|e| e.token().0));
    }
    for i in ready {
        if !pending[i] {
            continue;
        }
        while let Some(s) = flows[i].as_mut() {
            match s.read(&mut buf) {
                Ok(0) => {
                    stats.record_error("eof_before_reply");
                    pending[i] = false;
                    finished += 1;
                    drop_flow(poll, flows, i);
                    break;
                }
                Ok(k) => {
                    got[i].extend_from_slice(&buf[..k]);
                    if got[i].len() >= cfg.size {
                        pending[i] = false;
                        finished += 1;
                        match check_reply(seq, cfg.size, &got[i]) {
                            Ok(()) => stats.record_ok(origin[i].elapsed()),
                            Err(e) => {
                                stats.record_error(e.kind());
                                drop_flow(poll, flows, i);
                            }
                        }
                        got[i].clear();
                        break;
                    }
                }
                Err(e) if would_block(&e) => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    stats.record_error(&error_kind("read", &e));
                    pending[i] = false;
                    finished += 1;
                    drop_flow(poll, flows, i);
                    break;
                }
            }
        }
    }
    finished
}
