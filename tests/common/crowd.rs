//! Many clients at once, and a backend that counts its open connections exactly: for the
//! `--max-conns` and descriptor-limit tests, which must tell "waiting in the backlog" from
//! "closed by the proxy" and see the most flows that ever reached the backend.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use socket2::SockRef;

/// The byte the counting backend greets each connection with: a client that reads it was
/// served end to end (the proxy connected it to the backend).
pub const GREETING: u8 = b'g';

/// A backend on one thread that greets each connection with [`GREETING`] and counts open
/// connections, closing its side when the peer closes or resets.
///
/// The count follows the order in which things happened: each round handles every hang-up
/// the kernel reports before accepting a single connection (the oldest queued). A connection
/// the proxy closed before it connected the next one is therefore never counted together with
/// it, while one it still held is. `max_open` is then the most backend connections the proxy
/// held at once.
pub struct CountingBackend {
    pub addr: SocketAddr,
    open: Arc<AtomicUsize>,
    max_open: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

struct Counts {
    open: Arc<AtomicUsize>,
    max_open: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
}

impl CountingBackend {
    pub fn start() -> CountingBackend {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let counts = Counts {
            open: Arc::new(AtomicUsize::new(0)),
            max_open: Arc::new(AtomicUsize::new(0)),
            accepted: Arc::new(AtomicUsize::new(0)),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let (open, max_open, accepted) = (
            Arc::clone(&counts.open),
            Arc::clone(&counts.max_open),
            Arc::clone(&counts.accepted),
        );
        let stop2 = Arc::clone(&stop);
        let thread = thread::Builder::new()
            .name("counting-backend".into())
            .spawn(move || count_loop(listener, counts, stop2))
            .unwrap();
        CountingBackend {
            addr,
            open,
            max_open,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    pub fn arg(&self) -> String {
        self.addr.to_string()
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    pub fn max_open(&self) -> usize {
        self.max_open.load(Ordering::SeqCst)
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for CountingBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

const LISTENER: u64 = u64::MAX;

fn epoll_add(epoll: i32, fd: i32, events: u32, data: u64) {
    let mut ev = libc::epoll_event { events, u64: data };
    // SAFETY: epoll_ctl reads the event we pass; both descriptors are open.
    let rc = unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, &mut ev) };
    assert_eq!(rc, 0, "epoll_ctl: {}", io::Error::last_os_error());
}

fn count_loop(listener: TcpListener, counts: Counts, stop: Arc<AtomicBool>) {
    // SAFETY: plain system call; the descriptor is closed at the end of this function.
    let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(epoll >= 0, "epoll_create1: {}", io::Error::last_os_error());
    epoll_add(epoll, listener.as_raw_fd(), libc::EPOLLIN as u32, LISTENER);
    let mut conns: HashMap<u64, TcpStream> = HashMap::new();
    let mut next_id = 0u64;
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 4096];
    let hangup = (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;
    while !stop.load(Ordering::SeqCst) {
        // SAFETY: the kernel writes at most `events.len()` entries into the vector.
        let n = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), events.len() as i32, 50) };
        let n = if n < 0 { 0 } else { n as usize };
        let mut listener_ready = false;
        for ev in &events[..n] {
            let (id, what) = (ev.u64, ev.events);
            if id == LISTENER {
                listener_ready = true;
            } else if what & hangup != 0 {
                conns.remove(&id); // closes our side
                counts.open.fetch_sub(1, Ordering::SeqCst);
            } else if let Some(s) = conns.get_mut(&id) {
                let _ = s.read(&mut [0u8; 256]); // clients send nothing; drain if they do
            }
        }
        // One connection a round, after the hang-ups: see the type's doc.
        if listener_ready {
            if let Ok((mut s, _)) = listener.accept() {
                s.set_nonblocking(true).unwrap();
                let _ = s.write(&[GREETING]);
                epoll_add(
                    epoll,
                    s.as_raw_fd(),
                    (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
                    next_id,
                );
                conns.insert(next_id, s);
                next_id += 1;
                counts.accepted.fetch_add(1, Ordering::SeqCst);
                let now = counts.open.fetch_add(1, Ordering::SeqCst) + 1;
                counts.max_open.fetch_max(now, Ordering::SeqCst);
            }
        }
    }
    drop(conns);
    // SAFETY: closes the epoll descriptor created above, used by nothing else.
    unsafe { libc::close(epoll) };
}

/// What became of a client of a [`Crowd`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Connected, nothing received yet: waiting (in the proxy's backlog or on a backend).
    Waiting,
    /// Received the greeting: served end to end.
    Served,
    /// Closed or reset before the greeting arrived: turned away by the proxy.
    TurnedAway,
    /// The test closed it.
    Gone,
}

/// Clients connected to the proxy, watched together with `poll(2)`.
#[derive(Default)]
pub struct Crowd {
    streams: Vec<Option<TcpStream>>,
    fates: Vec<Fate>,
    /// How each turned-away client ended, for the failure message.
    pub turned_away: Vec<String>,
}

impl Crowd {
    pub fn push(&mut self, s: TcpStream) -> usize {
        self.streams.push(Some(s));
        self.fates.push(Fate::Waiting);
        self.streams.len() - 1
    }

    pub fn len(&self) -> usize {
        self.fates.len()
    }

    pub fn count(&self, fate: Fate) -> usize {
        self.fates.iter().filter(|f| **f == fate).count()
    }

    pub fn fate(&self, i: usize) -> Fate {
        self.fates[i]
    }

    /// Waits up to `timeout` for greetings or closes of waiting clients; returns the clients
    /// served in this call. Turned-away clients are recorded in `turned_away`.
    pub fn pump(&mut self, timeout: Duration) -> Vec<usize> {
        let watched: Vec<usize> = (0..self.len())
            .filter(|&i| self.fates[i] == Fate::Waiting)
            .collect();
        let mut fds: Vec<libc::pollfd> = watched
            .iter()
            .map(|&i| libc::pollfd {
                fd: self.streams[i].as_ref().unwrap().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        if fds.is_empty() {
            return Vec::new();
        }
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: poll writes only the revents fields of the vector we pass, of that length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        let mut served = Vec::new();
        if n <= 0 {
            return served;
        }
        for (pfd, &i) in fds.iter().zip(&watched) {
            if pfd.revents != 0 && self.read_greeting(i) {
                served.push(i);
            }
        }
        served
    }

    /// Pumps until `done(self)` holds or `timeout` passes; returns whether it held.
    pub fn pump_until(&mut self, timeout: Duration, mut done: impl FnMut(&Crowd) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if done(self) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            self.pump(left.min(Duration::from_millis(100)));
        }
    }

    fn read_greeting(&mut self, i: usize) -> bool {
        let s = self.streams[i].as_mut().unwrap();
        let mut byte = [0u8; 1];
        let outcome = match s.read(&mut byte) {
            Ok(1) if byte[0] == GREETING => Ok(()),
            Ok(0) => Err("EOF".to_string()),
            Ok(_) => Err(format!("unexpected byte {:?}", byte[0])),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) => Err(e.to_string()),
        };
        match outcome {
            Ok(()) => {
                self.fates[i] = Fate::Served;
                true
            }
            Err(how) => {
                self.fates[i] = Fate::TurnedAway;
                self.turned_away.push(format!("client {i}: {how}"));
                self.streams[i] = None;
                false
            }
        }
    }

    /// Closes client `i` with a reset (SO_LINGER 0): the proxy tears the flow down at once,
    /// without waiting for the backend's side of a graceful close.
    pub fn reset(&mut self, i: usize) {
        if let Some(s) = self.streams[i].take() {
            let _ = SockRef::from(&s).set_linger(Some(Duration::ZERO));
        }
        self.fates[i] = Fate::Gone;
    }
}

impl Crowd {
    /// Resets each client as soon as it is served, so its flow ends and makes room for the
    /// next, until no client is waiting or `timeout` passes; returns how many were served.
    pub fn churn(&mut self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let mut served = 0;
        for i in 0..self.len() {
            if self.fates[i] == Fate::Served {
                served += 1;
                self.reset(i);
            }
        }
        while self.count(Fate::Waiting) > 0 && Instant::now() < deadline {
            for i in self.pump(Duration::from_millis(100)) {
                served += 1;
                self.reset(i);
            }
        }
        served
    }

    /// Connects a client to `addr` and waits (up to `timeout`) until it is served.
    pub fn connect_served(&mut self, addr: SocketAddr, timeout: Duration) -> Result<usize, String> {
        let s = super::connect(addr).map_err(|e| format!("connect: {e}"))?;
        let i = self.push(s);
        self.pump_until(timeout, |c| c.fate(i) != Fate::Waiting);
        match self.fate(i) {
            Fate::Served => Ok(i),
            fate => Err(format!("client {i}: {fate:?} after {timeout:?}")),
        }
    }
}

/// Descriptors process `pid` holds.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Stops process `pid` (SIGSTOP) and returns once every one of its threads is stopped:
/// connections made meanwhile wait in its listen queues, as they do in front of a proxy that is
/// busy, and reach it together when it continues ([`thaw`]).
pub fn freeze(pid: u32) {
    // SAFETY: kill has no memory effects; pid is a child of this test.
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    let stopped = || {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return false;
        };
        tasks.flatten().all(|t| {
            std::fs::read_to_string(t.path().join("stat")).is_ok_and(|stat| {
                // The state follows the command name, which is in parentheses.
                stat.rfind(')')
                    .and_then(|i| stat[i + 1..].trim_start().chars().next())
                    .is_some_and(|c| c == 'T' || c == 't')
            })
        })
    };
    assert!(
        super::wait_until(Duration::from_secs(5), stopped),
        "process {pid} did not stop within 5 s of SIGSTOP"
    );
}

/// Continues a process stopped by [`freeze`].
pub fn thaw(pid: u32) {
    // SAFETY: as in `freeze`.
    unsafe { libc::kill(pid as i32, libc::SIGCONT) };
}
