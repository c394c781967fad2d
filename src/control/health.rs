//! Backend health: the per-backend up/down state machine (pure, HAProxy's rise/fall plus
//! nginx's max_fails/fail_timeout), which connect errors count as evidence against a backend,
//! which backends new flows may use, and the thread that runs active checks.
//!
//! Active checks are TCP connects (optionally a probe sent and the reply's first bytes
//! compared) from a thread of their own, so a slow or black-holed backend can never delay the
//! control thread or a worker. Results go to the control thread as events; it owns the state.
//!
//! Passive evidence is deliberately narrow. Only a connect that the backend (or the network on
//! the way) refused, left unanswered until `--connect-timeout`, or that found no route counts:
//! that is what "this backend cannot take connections" looks like, and what HAProxy's
//! `observe layer4` and nginx's `max_fails` count. A backend closing or resetting a connection
//! it accepted is its own choice (iperf3 resets its data streams after an upload, sshd resets
//! logins over `MaxStartups`, servers shed load), and a connect that failed for want of local
//! ports, descriptors or memory says nothing about the backend: neither counts. And passive
//! evidence alone never leaves new flows without a backend (nginx with a single server,
//! Envoy's panic threshold): see [`routable`].

use std::collections::{HashSet, VecDeque};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::config::HealthConfig;

/// What a failed backend connect says about the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectFailure {
    /// Refused, timed out (`--connect-timeout`), or no route to the backend: evidence that it
    /// cannot take connections, counted by passive checks.
    Backend,
    /// This host ran short: no local port for the connection (`EADDRNOTAVAIL`, `EADDRINUSE`),
    /// no descriptor, buffer or memory. Counted as a local error, never against the backend.
    Local,
    /// Anything else (a local firewall rule, an unexpected errno): counted as a failed connect,
    /// but not held against the backend.
    Other,
}

/// Classifies the errno of a failed backend connect (or of creating its socket). `ECANCELED`
/// is the connect's linked timeout firing: the caller must already have ruled out a cancel
/// because the flow itself was closing.
pub fn classify_connect_error(errno: i32) -> ConnectFailure {
    match errno {
        libc::ECONNREFUSED
        | libc::ETIMEDOUT
        | libc::ECANCELED
        | libc::EHOSTUNREACH
        | libc::ENETUNREACH
        | libc::EHOSTDOWN
        | libc::ENETDOWN => ConnectFailure::Backend,
        libc::EADDRNOTAVAIL
        | libc::EADDRINUSE
        | libc::EMFILE
        | libc::ENFILE
        | libc::ENOBUFS
        | libc::ENOMEM
        | libc::EAGAIN => ConnectFailure::Local,
        _ => ConnectFailure::Other,
    }
}

/// Why a backend is down. Only a passive verdict may be overridden when nothing else is left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DownCause {
    /// `--fall` active checks failed in a row.
    Checks,
    /// `--max-fails` failed connects within `--fail-timeout`.
    Passive,
}

/// Up/down state of one backend.
#[derive(Clone, Debug)]
pub struct Health {
    /// `None` while up.
    down: Option<DownCause>,
    ok_streak: u32,
    fail_streak: u32,
    /// Times of recent failed connects counted as evidence, oldest first.
    passive: VecDeque<Instant>,
    /// When a passive failure took the backend down (for recovery without active checks).
    down_since: Option<Instant>,
}

impl Default for Health {
    fn default() -> Self {
        Health::new()
    }
}

impl Health {
    /// Backends start up, as in HAProxy: traffic flows at once and checks take a dead one down.
    pub fn new() -> Health {
        Health {
            down: None,
            ok_streak: 0,
            fail_streak: 0,
            passive: VecDeque::new(),
            down_since: None,
        }
    }

    pub fn is_up(&self) -> bool {
        self.down.is_none()
    }

    /// Why it is down; `None` while up.
    pub fn down_cause(&self) -> Option<DownCause> {
        self.down
    }

    /// An active check finished. Returns the new state when it changed: `Some(true)` up,
    /// `Some(false)` down, also when failing checks confirm a backend that passive checks had
    /// taken down (it is then down by checks, and stays out even when nothing else is left).
    pub fn on_check(&mut self, ok: bool, config: &HealthConfig) -> Option<bool> {
        if ok {
            self.ok_streak += 1;
            self.fail_streak = 0;
            if !self.is_up() && self.ok_streak >= config.rise {
                return Some(self.set(None));
            }
        } else {
            self.fail_streak += 1;
            self.ok_streak = 0;
            if self.down != Some(DownCause::Checks) && self.fail_streak >= config.fall {
                return Some(self.set(Some(DownCause::Checks)));
            }
        }
        None
    }

    /// A flow's connect failed with evidence against the backend ([`ConnectFailure::Backend`]).
    /// Failures while it is down are not kept (flows still reach it when nothing else is left):
    /// back up, it gets a fresh `--max-fails` window, and the record stays small.
    pub fn on_passive_failure(&mut self, now: Instant, config: &HealthConfig) -> Option<bool> {
        if config.max_fails == 0 || !self.is_up() {
            return None;
        }
        self.passive.push_back(now);
        while self
            .passive
            .front()
            .is_some_and(|t| now.duration_since(*t) > config.fail_timeout)
        {
            self.passive.pop_front();
        }
        if self.is_up() && self.passive.len() >= config.max_fails as usize {
            self.passive.clear();
            self.ok_streak = 0;
            self.down_since = Some(now);
            return Some(self.set(Some(DownCause::Passive)));
        }
        None
    }

    /// Without active checks nothing would ever bring a passively failed backend back: like
    /// nginx, try it again after `fail_timeout`.
    pub fn on_tick(&mut self, now: Instant, config: &HealthConfig) -> Option<bool> {
        match (config.interval, self.down, self.down_since) {
            (None, Some(DownCause::Passive), Some(since))
                if now.duration_since(since) >= config.fail_timeout =>
            {
                Some(self.set(None))
            }
            _ => None,
        }
    }

    /// Returns whether it is now up.
    fn set(&mut self, down: Option<DownCause>) -> bool {
        self.down = down;
        self.ok_streak = 0;
        self.fail_streak = 0;
        if down.is_none() {
            self.down_since = None;
        }
        down.is_none()
    }
}

/// Which backends new flows may use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Routable {
    /// `usable[i]`: backend i may take new flows (the snapshot's mask).
    pub usable: Vec<bool>,
    /// Every backend is down, and at least one only by passive evidence: those are used anyway.
    pub passive_override: bool,
}

/// The mask of backends new flows may use: the ones that are up (backups included: a backup
/// that is up is what backups are for). When none is up, passive evidence alone must not turn
/// every client away, so the backends that only passive checks took down are used again (a
/// client of a backend that really refuses is still closed at once, after its connect is
/// refused, rather than refused without a try); a backend that active checks took down stays
/// out.
pub fn routable<'a>(states: impl IntoIterator<Item = &'a Health>) -> Routable {
    let causes: Vec<Option<DownCause>> = states.into_iter().map(Health::down_cause).collect();
    let up: Vec<bool> = causes.iter().map(Option::is_none).collect();
    if up.iter().any(|&u| u) {
        return Routable {
            usable: up,
            passive_override: false,
        };
    }
    let passive_only: Vec<bool> = causes
        .iter()
        .map(|c| *c == Some(DownCause::Passive))
        .collect();
    let passive_override = passive_only.iter().any(|&p| p);
    Routable {
        usable: if passive_override { passive_only } else { up },
        passive_override,
    }
}

/// One backend to check: its identity and the address the check connects to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckTarget {
    pub name: String,
    pub addr: SocketAddr,
}

/// The outcome of one check.
#[derive(Debug)]
pub struct CheckResult {
    pub name: String,
    pub ok: bool,
    /// Why it failed, for the log line when the backend goes down.
    pub detail: String,
}

/// Checks running at once: enough for hundreds of backends per interval without a thread per
/// backend.
const PARALLEL_CHECKS: usize = 32;

/// Starts the checker: a scheduler thread that queues every target once per interval (with
/// +-10% jitter, so many Ringway hosts do not probe in lockstep) and a pool of check threads.
/// A target whose previous check is still running (a black-holed backend waiting out its
/// timeout) is skipped for that round, so one slow backend never delays the checks of the
/// others. New target lists come from `targets`; everything stops when it is disconnected.
pub fn spawn(
    config: HealthConfig,
    mut current: Vec<CheckTarget>,
    targets: Receiver<Vec<CheckTarget>>,
    results: Sender<CheckResult>,
) -> std::io::Result<JoinHandle<()>> {
    let interval = config.interval.unwrap_or(Duration::from_secs(2));
    let busy: Arc<Mutex<HashSet<String>>> = Arc::default();
    let (jobs, queue) = crossbeam_channel::unbounded::<CheckTarget>();
    let mut pool = Vec::with_capacity(PARALLEL_CHECKS);
    for i in 0..PARALLEL_CHECKS {
        let queue = queue.clone();
        let results = results.clone();
        let busy = Arc::clone(&busy);
        let config = config.clone();
        pool.push(
            std::thread::Builder::new()
                .name(format!("ringway-check{i}"))
                .spawn(move || {
                    for target in queue {
                        let outcome = check(target.addr, &config);
                        if let Ok(mut busy) = busy.lock() {
                            busy.remove(&target.name);
                        }
                        let _ = results.send(CheckResult {
                            name: target.name,
                            ok: outcome.is_ok(),
                            detail: outcome.err().unwrap_or_default(),
                        });
                    }
                })?,
        );
    }
    std::thread::Builder::new()
        .name("ringway-health".into())
        .spawn(move || {
            let mut jitter = Jitter::new();
            let mut next_round = Instant::now();
            loop {
                let wait = next_round.saturating_duration_since(Instant::now());
                match targets.recv_timeout(wait) {
                    Ok(list) => {
                        current = list;
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                    Err(RecvTimeoutError::Timeout) => {}
                }
                next_round = Instant::now() + jitter.apply(interval);
                let Ok(mut running) = busy.lock() else { break };
                for target in &current {
                    if running.insert(target.name.clone()) {
                        let _ = jobs.send(target.clone());
                    }
                }
            }
            drop(jobs); // the pool drains its queue and ends
            for thread in pool {
                let _ = thread.join();
            }
        })
}

/// One active check: connect within the timeout; if a probe is configured, send it and compare
/// the start of the reply.
pub fn check(addr: SocketAddr, config: &HealthConfig) -> Result<(), String> {
    let deadline = Instant::now() + config.timeout;
    let mut stream =
        TcpStream::connect_timeout(&addr, config.timeout).map_err(|e| format!("connect: {e}"))?;
    if !config.send.is_empty() {
        stream
            .set_write_timeout(Some(config.timeout))
            .and_then(|_| stream.write_all(&config.send))
            .map_err(|e| format!("send: {e}"))?;
    }
    if !config.expect.is_empty() {
        let mut reply = Vec::with_capacity(config.expect.len());
        let mut buf = [0u8; 512];
        while reply.len() < config.expect.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("reply: timed out".into());
            }
            stream
                .set_read_timeout(Some(left))
                .map_err(|e| format!("reply: {e}"))?;
            match stream.read(&mut buf) {
                Ok(0) => return Err("reply: connection closed early".into()),
                Ok(n) => reply.extend_from_slice(&buf[..n]),
                Err(e) => return Err(format!("reply: {e}")),
            }
        }
        if !reply.starts_with(&config.expect) {
            return Err("reply: does not match --health-expect".into());
        }
    }
    Ok(())
}

/// +-10% jitter from a small xorshift seeded by the clock: no crate needed for this.
struct Jitter(u64);

impl Jitter {
    fn new() -> Jitter {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Jitter(seed | 1)
    }

    fn apply(&mut self, interval: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let permille = 900 + (self.0 % 201); // 0.900 ..= 1.100
        interval * permille as u32 / 1000
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn config() -> HealthConfig {
        HealthConfig {
            interval: Some(Duration::from_secs(1)),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            send: Vec::new(),
            expect: Vec::new(),
            max_fails: 2,
            fail_timeout: Duration::from_secs(10),
        }
    }

    #[test]
    fn falls_after_fall_failures_and_rises_after_rise_successes() {
        let c = config();
        let mut h = Health::new();
        assert_eq!(h.on_check(false, &c), None);
        assert_eq!(h.on_check(false, &c), None);
        assert_eq!(
            h.on_check(true, &c),
            None,
            "a success resets the failure streak"
        );
        assert_eq!(h.on_check(false, &c), None);
        assert_eq!(h.on_check(false, &c), None);
        assert_eq!(h.on_check(false, &c), Some(false));
        assert!(!h.is_up());
        assert_eq!(h.on_check(true, &c), None);
        assert_eq!(
            h.on_check(false, &c),
            None,
            "a failure resets the success streak"
        );
        assert_eq!(h.on_check(true, &c), None);
        assert_eq!(h.on_check(true, &c), Some(true));
        assert!(h.is_up());
    }

    #[test]
    fn passive_failures_within_the_window_take_it_down() {
        let c = config();
        let mut h = Health::new();
        let t0 = Instant::now();
        assert_eq!(h.on_passive_failure(t0, &c), None);
        // The next failure comes after the window: the first one no longer counts.
        assert_eq!(h.on_passive_failure(t0 + Duration::from_secs(11), &c), None);
        assert_eq!(
            h.on_passive_failure(t0 + Duration::from_secs(12), &c),
            Some(false)
        );
        // Down until checks pass: rise successes.
        assert_eq!(h.on_check(true, &c), None);
        assert_eq!(h.on_check(true, &c), Some(true));
    }

    #[test]
    fn without_active_checks_a_passive_down_recovers_after_fail_timeout() {
        let c = HealthConfig {
            interval: None,
            ..config()
        };
        let mut h = Health::new();
        let t0 = Instant::now();
        h.on_passive_failure(t0, &c);
        assert_eq!(h.on_passive_failure(t0, &c), Some(false));
        assert_eq!(h.on_tick(t0 + Duration::from_secs(5), &c), None);
        assert_eq!(h.on_tick(t0 + Duration::from_secs(10), &c), Some(true));
    }

    #[test]
    fn failures_while_down_do_not_count_once_it_is_back() {
        let c = HealthConfig {
            interval: None,
            ..config()
        };
        let mut h = Health::new();
        let t0 = Instant::now();
        h.on_passive_failure(t0, &c);
        assert_eq!(h.on_passive_failure(t0, &c), Some(false));
        let later = t0 + Duration::from_secs(9);
        for _ in 0..1000 {
            assert_eq!(h.on_passive_failure(later, &c), None);
        }
        assert_eq!(h.on_tick(t0 + Duration::from_secs(10), &c), Some(true));
        assert_eq!(
            h.on_passive_failure(t0 + Duration::from_secs(11), &c),
            None,
            "one failure after coming back is not --max-fails 2"
        );
        assert_eq!(
            h.on_passive_failure(t0 + Duration::from_secs(11), &c),
            Some(false)
        );
    }

    #[test]
    fn passive_checks_can_be_disabled() {
        let c = HealthConfig {
            max_fails: 0,
            ..config()
        };
        let mut h = Health::new();
        for _ in 0..10 {
            assert_eq!(h.on_passive_failure(Instant::now(), &c), None);
        }
        assert!(h.is_up());
    }

    #[test]
    fn only_refused_timed_out_and_unreachable_connects_are_evidence() {
        for errno in [
            libc::ECONNREFUSED,
            libc::ETIMEDOUT,
            libc::ECANCELED, // the linked --connect-timeout fired
            libc::EHOSTUNREACH,
            libc::ENETUNREACH,
        ] {
            assert_eq!(
                classify_connect_error(errno),
                ConnectFailure::Backend,
                "{errno}"
            );
        }
        // Running out of local ports (connect, or bind with --source), descriptors or memory.
        for errno in [
            libc::EADDRNOTAVAIL,
            libc::EADDRINUSE,
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOBUFS,
            libc::ENOMEM,
        ] {
            assert_eq!(
                classify_connect_error(errno),
                ConnectFailure::Local,
                "{errno}"
            );
        }
        for errno in [libc::EPERM, libc::EACCES, libc::ECONNRESET, libc::EINVAL] {
            assert_eq!(
                classify_connect_error(errno),
                ConnectFailure::Other,
                "{errno}"
            );
        }
    }

    #[test]
    fn failing_checks_confirm_a_passive_down_and_passing_ones_end_it() {
        let c = config();
        let mut h = Health::new();
        let t0 = Instant::now();
        h.on_passive_failure(t0, &c);
        assert_eq!(h.on_passive_failure(t0, &c), Some(false));
        assert_eq!(h.down_cause(), Some(DownCause::Passive));
        assert_eq!(h.on_check(false, &c), None);
        assert_eq!(h.on_check(false, &c), None);
        assert_eq!(
            h.on_check(false, &c),
            Some(false),
            "--fall failed checks make it down by checks"
        );
        assert_eq!(h.down_cause(), Some(DownCause::Checks));
        assert_eq!(h.on_check(false, &c), None, "reported once");
        assert_eq!(h.on_check(true, &c), None);
        assert_eq!(h.on_check(true, &c), Some(true));
        assert_eq!(h.down_cause(), None);
    }

    /// Healths in the given states: `u` up, `p` down by passive checks, `c` down by checks.
    fn states(spec: &str) -> Vec<Health> {
        let c = config();
        spec.chars()
            .map(|state| {
                let mut h = Health::new();
                let now = Instant::now();
                match state {
                    'u' => {}
                    'p' => {
                        h.on_passive_failure(now, &c);
                        h.on_passive_failure(now, &c);
                    }
                    'c' => {
                        for _ in 0..c.fall {
                            h.on_check(false, &c);
                        }
                    }
                    other => panic!("state {other:?}"),
                }
                h
            })
            .collect()
    }

    fn routable_for(spec: &str) -> Routable {
        routable(&states(spec))
    }

    #[test]
    fn backends_down_by_passive_evidence_stay_out_while_another_is_up() {
        assert_eq!(
            routable_for("upc"),
            Routable {
                usable: vec![true, false, false],
                passive_override: false
            }
        );
        assert_eq!(routable_for("uu").usable, [true, true]);
    }

    #[test]
    fn passive_evidence_alone_never_empties_the_pool() {
        // The single backend of nginx's rule, and a whole set.
        assert_eq!(
            routable_for("p"),
            Routable {
                usable: vec![true],
                passive_override: true
            }
        );
        assert_eq!(routable_for("pp").usable, [true, true]);
        // Backends that active checks took down stay down, even then.
        assert_eq!(
            routable_for("cpc"),
            Routable {
                usable: vec![false, true, false],
                passive_override: true
            }
        );
        // When every backend failed its checks, nothing is used: clients are closed at once.
        assert_eq!(
            routable_for("cc"),
            Routable {
                usable: vec![false, false],
                passive_override: false
            }
        );
        assert_eq!(
            routable_for(""),
            Routable {
                usable: vec![],
                passive_override: false
            }
        );
    }

    #[test]
    fn check_connects_and_compares_the_reply() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            for reply in [&b"+PONG\r\n"[..], &b"-ERR\r\n"[..]] {
                let (mut s, _) = listener.accept().unwrap();
                let mut buf = [0u8; 6];
                s.read_exact(&mut buf).unwrap();
                assert_eq!(&buf, b"PING\r\n");
                s.write_all(reply).unwrap();
            }
        });
        let c = HealthConfig {
            send: b"PING\r\n".to_vec(),
            expect: b"+PONG".to_vec(),
            ..config()
        };
        assert_eq!(check(addr, &c), Ok(()));
        assert!(check(addr, &c).unwrap_err().contains("does not match"));
        server.join().unwrap();
    }

    #[test]
    fn check_of_a_closed_port_fails() {
        let addr = {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap()
        };
        assert!(check(addr, &config()).unwrap_err().starts_with("connect"));
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        let mut j = Jitter::new();
        for _ in 0..1000 {
            let d = j.apply(Duration::from_millis(1000));
            assert!(d >= Duration::from_millis(900) && d <= Duration::from_millis(1100));
        }
    }
}
