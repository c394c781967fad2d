//! One worker thread: its own io_uring ring, SO_REUSEPORT listener, buffer ring, timer wheel
//! and flows. Nothing here is shared with other workers except the process-wide flow counter
//! (one atomic add per flow) and the immutable snapshot of backends.
//!
//! The event loop submits, waits for completions, and routes each completion by its token to
//! the flow state machine (`crate::flow`), then carries out the operations the flow asks for.

mod bufring;
mod edge;
mod ring;
mod timer;
mod token;

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use log::{debug, error, warn};
use slab::Slab;
use socket2::{SockRef, Socket};

use crate::balance::{flow_key_hash, HashKey};
use crate::control::access_log::{AccessLog, FlowRecord};
use crate::control::Event;
use crate::flow::{CloseReason, Ending, Flow, Limits, Op, Phase, Side};
use crate::metrics::{CloseKind, WorkerStatsWriter};
use crate::proxy_protocol::{self, Parsed};
use crate::snapshot::{BackendLoad, BackendSet, PickState, Snapshot};
use crate::source_limit::SourceTicket;
use bufring::BufRing;
pub use edge::Edge;
pub use ring::{new_ring, RingError};
use timer::TimerWheel;
use token::{Kind, Token};

/// Messages from the control thread. Each is followed by a byte on the worker's wake pipe.
pub enum Command {
    /// Route new flows by this snapshot from now on; acknowledge on the sender, if any, once
    /// it is in use (the control thread waits for that before it reports a backend change).
    Snapshot(Arc<Snapshot>, Option<Sender<()>>),
    /// Stop accepting, close every flow, and end the thread.
    Stop,
    /// Stop accepting; let live flows finish, close what is left at `deadline`, then end.
    Drain { deadline: Instant },
    /// These backends were removed: close their flows that are still open at `deadline`.
    CloseBackends {
        names: Vec<Arc<str>>,
        deadline: Instant,
    },
}

/// Everything a worker needs, handed over when its thread starts.
pub struct WorkerSetup {
    pub id: usize,
    pub listener: Socket,
    pub snapshot: Arc<Snapshot>,
    pub commands: Receiver<Command>,
    pub wake: std::io::PipeReader,
    pub settings: Settings,
    /// Flows open in the whole process, for `max_conns`.
    pub active_flows: Arc<AtomicUsize>,
    /// Passive health reports to the control thread (never blocks: `try_send`).
    pub events: Sender<Event>,
    /// This worker's counters; the control thread reads them through `stats()`.
    pub stats: WorkerStatsWriter,
    pub access_log: Option<AccessLog>,
    /// The listening address, for access-log lines.
    pub listen_addr: SocketAddr,
}

#[derive(Clone)]
pub struct Settings {
    pub hash_key: HashKey,
    pub hash_seed: u64,
    pub connect_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub retries: u32,
    pub max_conns: usize,
    pub buffer_size: u32,
    pub buffers: u16,
    pub edge: Arc<Edge>,
    /// Room below `max_conns` under which accepts are single-shot: enough that every worker's
    /// multishot accept could take a full listen backlog without passing the limit.
    pub multishot_accept_room: usize,
}

/// Buffers a pipe may hold before its recv pauses: 4 x 64 KiB keeps a bulk flow streaming while
/// a slow reader ties up at most 256 KiB per direction (4 buffers whatever --buffer-size).
const MAX_QUEUED_BUFFERS: usize = 4;
/// Submission queue entries; the completion queue is 4x larger because multishot operations
/// post many completions per submission.
const RING_ENTRIES: u32 = 4096;
const BUFFER_GROUP: u16 = 0;
/// How long accepting pauses after EMFILE/ENFILE before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// One accepted flow and the resources the worker holds for it.
struct Slot {
    generation: u32,
    flow: Flow,
    client: OwnedFd,
    backend: Option<Socket>,
    client_addr: SocketAddr,
    key_hash: u64,
    backend_index: Option<usize>,
    /// The backend set `backend_index` refers to (snapshots may change during the flow).
    backend_set: Option<Arc<BackendSet>>,
    /// Active-flow gauge of the backend this flow holds, released when the flow ends.
    backend_load: Option<Arc<BackendLoad>>,
    /// Backends already tried by this flow's connect attempts.
    tried: Vec<u32>,
    /// Tick of the last byte moved either way.
    last_active: u64,
    /// Filed in the timer wheel for the idle timeout.
    timer_filed: bool,
    accepted_at: Instant,
    /// When the connect in flight was submitted.
    connect_started: Option<Instant>,
    /// How long the successful connect took.
    connect_time: Option<Duration>,
    /// This flow's share of `--max-conns-per-source`.
    ticket: Option<SourceTicket>,
    /// PROXY protocol state, only for flows that read or send a header.
    greeting: Option<Box<Greeting>>,
}

/// Per-flow PROXY protocol state, boxed so flows without it pay one pointer.
struct Greeting {
    /// The client's header as received so far (accept-proxy).
    header: Vec<u8>,
    deadline: Instant,
    /// Linked timeout of the header read in flight; the kernel copies it at submission.
    timeout: types::Timespec,
    /// Sent to the backend before any relayed byte: our PROXY header, then any client bytes
    /// that arrived with the header we read.
    preface: Vec<u8>,
    /// The address the client connected to, for the PROXY header we send.
    local: SocketAddr,
}

/// Why accepting is paused, if it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AcceptState {
    Armed,
    /// A cancel was submitted (limit reached, backoff, or stop); waiting for the final completion.
    Cancelling,
    /// Not armed; re-armed when there is room (`max_conns`) or the backoff tick passes.
    Paused,
    /// The listener is closed for good.
    Closed,
}

struct Worker {
    // Field order is drop order: the ring goes first, so the kernel stops using the buffers,
    // timespecs and wake buffer declared after it before they are freed.
    ring: IoUring,
    bufring: BufRing,
    wake_buf: Box<[u8; 64]>,
    connect_timespec: Box<types::Timespec>,
    tick_timespec: Box<types::Timespec>,
    wake: std::io::PipeReader,
    listener: Option<Socket>,
    id: usize,
    settings: Settings,
    limits: Limits,
    snapshot: Arc<Snapshot>,
    /// Snapshots replaced since the last submit: connect SQEs still in the submission queue may
    /// point at their addresses, which the kernel copies only when it reads the SQE.
    retired: Vec<Arc<Snapshot>>,
    commands: Receiver<Command>,
    events: Sender<Event>,
    pick: PickState,
    active_flows: Arc<AtomicUsize>,
    slots: Slab<Slot>,
    next_generation: u32,
    ops: Vec<Op>,
    completions: Vec<(u64, i32, u32)>,
    starved: VecDeque<(u32, u32)>,
    parked: VecDeque<OwnedFd>,
    accept: AcceptState,
    accept_resume_at: Option<Instant>,
    timers: TimerWheel,
    due: Vec<(u32, u32)>,
    started: Instant,
    tick: Duration,
    idle_ticks: Option<u64>,
    /// No new flows: draining or stopping.
    stopping: bool,
    /// Every flow is being closed now.
    hard_stop: bool,
    drain_deadline: Option<Instant>,
    /// Removed backends whose remaining flows close at the deadline.
    backend_deadlines: Vec<(Vec<Arc<str>>, Instant)>,
    accept_errors: RateLimited,
    socket_errors: RateLimited,
    stats: WorkerStatsWriter,
    access_log: Option<AccessLog>,
    listen_addr: SocketAddr,
    /// Next `--source` address to use.
    source_turn: usize,
}

/// Runs a worker on the current thread until it is told to stop. Ring set-up errors are
/// returned before the loop starts, through `ready`.
pub fn run(setup: WorkerSetup, ready: crossbeam_channel::Sender<Result<(), String>>) {
    let mut worker = match Worker::new(setup) {
        Ok(worker) => {
            let _ = ready.send(Ok(()));
            worker
        }
        Err(message) => {
            let _ = ready.send(Err(message));
            return;
        }
    };
    if let Err(e) = worker.event_loop() {
        error!("worker {}: event loop failed: {e}", worker.id);
    }
    worker.shutdown_ring();
}

impl Worker {
    fn new(setup: WorkerSetup) -> Result<Worker, String> {
        let settings = setup.settings;
        let ring = new_ring(RING_ENTRIES).map_err(|e| e.to_string())?;
        let bufring = BufRing::new(&ring, BUFFER_GROUP, settings.buffers, settings.buffer_size)
            .map_err(|e| {
                format!(
                    "cannot register the io_uring buffer ring ({e}); Ringway needs Linux 6.0 or newer"
                )
            })?;
        // The tick drives idle timeouts and accept back-off: an eighth of the idle timeout keeps
        // timeouts within ~12% of their setting, capped so back-off and limits react quickly.
        let tick = settings
            .idle_timeout
            .map(|idle| idle / 8)
            .unwrap_or(Duration::from_millis(250))
            .clamp(Duration::from_millis(10), Duration::from_millis(250));
        let idle_ticks = settings
            .idle_timeout
            .map(|idle| (idle.as_nanos() / tick.as_nanos()).max(1) as u64);
        let limits = Limits {
            retries: settings.retries,
            max_queued: MAX_QUEUED_BUFFERS,
            read_header: settings.edge.trusted.is_some(),
        };
        Ok(Worker {
            ring,
            bufring,
            wake_buf: Box::new([0; 64]),
            connect_timespec: Box::new(timespec(settings.connect_timeout)),
            tick_timespec: Box::new(timespec(tick)),
            wake: setup.wake,
            listener: Some(setup.listener),
            id: setup.id,
            limits,
            settings,
            snapshot: setup.snapshot,
            retired: Vec::new(),
            commands: setup.commands,
            events: setup.events,
            pick: PickState::new(setup.id as u64),
            active_flows: setup.active_flows,
            slots: Slab::new(),
            next_generation: 1,
            ops: Vec::with_capacity(16),
            completions: Vec::with_capacity(1024),
            starved: VecDeque::new(),
            parked: VecDeque::new(),
            accept: AcceptState::Paused,
            accept_resume_at: None,
            timers: TimerWheel::new(512),
            due: Vec::new(),
            started: Instant::now(),
            tick,
            idle_ticks,
            stopping: false,
            hard_stop: false,
            drain_deadline: None,
            backend_deadlines: Vec::new(),
            accept_errors: RateLimited::new(),
            socket_errors: RateLimited::new(),
            stats: setup.stats,
            access_log: setup.access_log,
            listen_addr: setup.listen_addr,
            source_turn: setup.id,
        })
    }

    fn event_loop(&mut self) -> io::Result<()> {
        self.arm_accept();
        self.arm_wake();
        self.arm_tick();
        loop {
            let returned = self.bufring.publish();
            if returned > 0 {
                self.wake_starved(returned as usize);
            }
            if self.stopping
                && self.slots.is_empty()
                && self.parked.is_empty()
                && self.accept == AcceptState::Closed
            {
                return Ok(());
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => self.retired.clear(),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                // The completion queue overflowed: reap before submitting more.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(e),
            }
            self.completions.clear();
            self.reap();
            // `reap` may append more while these are handled (see `submit_pending`).
            let mut next = 0;
            while next < self.completions.len() {
                let (user_data, res, flags) = self.completions[next];
                next += 1;
                self.on_completion(user_data, res, flags);
            }
        }
    }

    /// Moves every posted completion into `completions`.
    fn reap(&mut self) {
        for cqe in self.ring.completion() {
            self.completions
                .push((cqe.user_data(), cqe.result(), cqe.flags()));
        }
    }

    fn on_completion(&mut self, user_data: u64, res: i32, flags: u32) {
        let Some(token) = Token::decode(user_data) else {
            return;
        };
        match token.kind {
            Kind::Accept => self.on_accept(res, cqueue::more(flags)),
            Kind::AcceptCancel => {}
            Kind::Wake => self.on_wake(res),
            Kind::Tick => self.on_tick(),
            _ => self.on_flow_completion(token, res, flags),
        }
    }

    // ---- accepting -------------------------------------------------------------------------

    fn arm_accept(&mut self) {
        if self.stopping || self.accept != AcceptState::Paused {
            return;
        }
        let Some(listener) = &self.listener else {
            return;
        };
        // A multishot accept takes everything queued on the listener in one go, before a cancel
        // can stop it. Far from --max-conns that is what we want; close to it, it would pull
        // the whole backlog into user space (and past the fd limit) instead of leaving it in the
        // kernel, so there one connection is accepted per submission.
        let room = self
            .settings
            .max_conns
            .saturating_sub(self.active_flows.load(Ordering::Relaxed));
        let fd = types::Fd(listener.as_raw_fd());
        let flags = libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
        let entry = if room > self.settings.multishot_accept_room {
            opcode::AcceptMulti::new(fd).flags(flags).build()
        } else {
            opcode::Accept::new(fd, std::ptr::null_mut(), std::ptr::null_mut())
                .flags(flags)
                .build()
        };
        self.push(entry.user_data(Token::worker(Kind::Accept).encode()));
        self.accept = AcceptState::Armed;
    }

    fn cancel_accept(&mut self) {
        if self.accept == AcceptState::Armed {
            let entry = opcode::AsyncCancel::new(Token::worker(Kind::Accept).encode())
                .build()
                .user_data(Token::worker(Kind::AcceptCancel).encode());
            self.push(entry);
            self.accept = AcceptState::Cancelling;
        }
    }

    fn has_room(&self) -> bool {
        self.active_flows.load(Ordering::Relaxed) < self.settings.max_conns
    }

    fn on_accept(&mut self, res: i32, more: bool) {
        if !more {
            self.accept = AcceptState::Paused;
        }
        if res >= 0 {
            // SAFETY: a successful accept completion hands us a new descriptor that nothing else
            // owns; OwnedFd closes it exactly once.
            let fd = unsafe { OwnedFd::from_raw_fd(res as RawFd) };
            if self.hard_stop {
                return; // dropped: closed
            }
            if self.has_room() && self.parked.is_empty() {
                self.start_flow(fd);
            } else {
                // Over the limit: hold it like the kernel backlog would (served first when room
                // comes back), and stop accepting.
                self.parked.push_back(fd);
                self.resume_accepting();
            }
            if !self.has_room() {
                self.cancel_accept();
            }
        } else {
            match -res {
                libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM => {
                    self.stats.accept_error();
                    self.accept_errors.warn(|suppressed| {
                        format!(
                            "worker {}: accept failed: {} ({suppressed} more since last report); \
                             pausing accepts for {ACCEPT_BACKOFF:?}, open flows keep running",
                            self.id,
                            io::Error::from_raw_os_error(-res)
                        )
                    });
                    self.accept_resume_at = Some(Instant::now() + ACCEPT_BACKOFF);
                    self.cancel_accept();
                }
                libc::ECANCELED => {}
                errno => {
                    self.stats.accept_error();
                    debug!(
                        "worker {}: accept error: {}",
                        self.id,
                        io::Error::from_raw_os_error(errno)
                    );
                }
            }
        }
        if self.accept == AcceptState::Paused {
            if self.stopping {
                self.close_listener();
            } else {
                self.resume_accepting();
            }
        }
    }

    /// Closes the listener for good. When draining, the connections already queued on it are
    /// accepted and served first: closing a listener resets its queue (unless the kernel
    /// migrates it to another SO_REUSEPORT listener, net.ipv4.tcp_migrate_req = 1).
    fn close_listener(&mut self) {
        if let (Some(listener), false) = (&self.listener, self.hard_stop) {
            let mut queued = Vec::new();
            while let Ok((socket, _)) = listener.accept() {
                queued.push(OwnedFd::from(socket));
            }
            for fd in queued {
                if self.has_room() && self.parked.is_empty() {
                    self.start_flow(fd);
                } else {
                    self.parked.push_back(fd);
                }
            }
        }
        self.listener = None;
        self.accept = AcceptState::Closed;
    }

    /// Serve parked connections and resume accepting when there is room again.
    fn resume_accepting(&mut self) {
        if self.hard_stop {
            return;
        }
        while self.has_room() {
            let Some(fd) = self.parked.pop_front() else {
                break;
            };
            self.start_flow(fd);
        }
        if self.stopping {
            return;
        }
        if let Some(at) = self.accept_resume_at {
            if Instant::now() < at {
                return;
            }
            self.accept_resume_at = None;
        }
        if self.has_room() && self.parked.is_empty() {
            self.arm_accept();
        }
    }

    // ---- flows -----------------------------------------------------------------------------

    fn start_flow(&mut self, client: OwnedFd) {
        let client_addr = match SockRef::from(&client).peer_addr().map(|a| a.as_socket()) {
            Ok(Some(addr)) => addr,
            // The client is already gone (reset while queued): nothing to serve.
            _ => return,
        };
        let edge = Arc::clone(&self.settings.edge);
        // Behind trusted load balancers the real client is only known from the PROXY header:
        // admission waits for it. Otherwise refuse here, before anything is allocated.
        let mut ticket = None;
        let mut greeting = None;
        if edge.trusted.is_some() {
            if !edge.trusts(client_addr.ip()) {
                self.stats.flow_refused(CloseKind::RefusedProxyHeader);
                return;
            }
        } else {
            match edge.admit(client_addr.ip()) {
                Ok(t) => ticket = t,
                Err(reason) => {
                    debug!("flow {client_addr}: refused ({reason:?})");
                    self.stats.flow_refused(CloseKind::from(reason));
                    return;
                }
            }
        }
        if edge.trusted.is_some() || edge.sends_proxy_header() {
            let local = SockRef::from(&client)
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .unwrap_or(self.listen_addr);
            let mut preface = Vec::new();
            if edge.trusted.is_none() {
                edge.proxy_header(client_addr, local, &mut preface);
            }
            greeting = Some(Box::new(Greeting {
                header: Vec::new(),
                deadline: Instant::now() + edge.header_timeout,
                timeout: timespec(edge.header_timeout),
                preface,
                local,
            }));
        }
        self.active_flows.fetch_add(1, Ordering::Relaxed);
        self.stats.flow_accepted();
        let generation = self.next_generation;
        self.next_generation = (self.next_generation + 1) & token::GENERATION_MASK;
        let key_hash = flow_key_hash(
            &client_addr,
            self.settings.hash_key,
            self.settings.hash_seed,
        );
        let slot = self.slots.insert(Slot {
            generation,
            flow: Flow::new(self.limits),
            client,
            backend: None,
            client_addr,
            key_hash,
            backend_index: None,
            backend_set: None,
            backend_load: None,
            tried: Vec::new(),
            last_active: self.timers.now(),
            timer_filed: false,
            accepted_at: Instant::now(),
            connect_started: None,
            connect_time: None,
            ticket,
            greeting,
        });
        let mut ops = std::mem::take(&mut self.ops);
        let entry = &mut self.slots[slot];
        if let Some(greeting) = &entry.greeting {
            entry.flow.set_preface(greeting.preface.len() as u32);
        }
        entry.flow.start(&mut ops);
        self.apply(slot, &mut ops);
        self.ops = ops;
    }

    fn on_flow_completion(&mut self, token: Token, res: i32, flags: u32) {
        let index = token.slot as usize;
        match self.slots.get(index) {
            Some(slot) if slot.generation == token.generation => {}
            // Stale: the flow that issued it is gone. Only a recv can still hold a buffer.
            _ => {
                if let Some(bid) = cqueue::buffer_select(flags) {
                    self.bufring.take();
                    self.bufring.give_back(bid);
                }
                return;
            }
        }
        let mut ops = std::mem::take(&mut self.ops);
        let now = self.timers.now();
        let slot = &mut self.slots[index];
        match token.kind {
            Kind::Connect => {
                let backend = slot
                    .backend_index
                    .zip(slot.backend_set.as_ref())
                    .and_then(|(i, set)| set.backends.get(i));
                if res >= 0 {
                    slot.connect_time = slot.connect_started.map(|t| t.elapsed());
                    self.stats.connected(slot.connect_time.unwrap_or_default());
                    if let Some(backend) = backend {
                        backend.stats.flow_started();
                    }
                } else if slot.flow.phase() != Phase::Closing {
                    self.stats.connect_failed();
                    if let Some(backend) = backend {
                        backend.stats.connect_failed();
                    }
                }
                if res < 0 {
                    if let (Some(i), Some(set)) = (slot.backend_index, &slot.backend_set) {
                        debug!(
                            "flow {} -> {}: connect failed: {}",
                            slot.client_addr,
                            set.backends.get(i).map_or("?", |b| &*b.name),
                            io::Error::from_raw_os_error(-res)
                        );
                        // A connect cancelled because the flow is closing says nothing about
                        // the backend; a timeout (also ECANCELED, from the linked timeout) does.
                        if slot.flow.phase() != Phase::Closing {
                            let _ = self.events.try_send(Event::BackendFailure {
                                set: Arc::clone(set),
                                index: i,
                            });
                        }
                    }
                }
                slot.flow.on_connect(res, &mut ops);
                if slot.flow.phase() == Phase::Relaying && !slot.timer_filed {
                    slot.last_active = now;
                    if let Some(idle) = self.idle_ticks {
                        slot.timer_filed = true;
                        self.timers
                            .schedule(now + idle, (token.slot, token.generation));
                    }
                }
            }
            Kind::LinkTimeout => slot.flow.on_link_timeout(&mut ops),
            Kind::HeaderRecv => {
                if slot.flow.on_header_read(res, &mut ops) {
                    self.on_header_bytes(index, res as usize, &mut ops);
                }
            }
            Kind::Preface => slot.flow.on_preface_sent(res, &mut ops),
            Kind::Recv(side) => {
                let buf = cqueue::buffer_select(flags);
                if buf.is_some() {
                    self.bufring.take();
                }
                slot.last_active = now;
                slot.flow
                    .on_recv(side, res, buf, cqueue::more(flags), &mut ops);
            }
            Kind::RecvCancel(side) => slot.flow.on_recv_cancelled(side, &mut ops),
            Kind::Send(side) => {
                slot.last_active = now;
                slot.flow.on_send(side, res, &mut ops);
            }
            Kind::Shutdown(side) => slot.flow.on_shutdown(side, res, &mut ops),
            Kind::CancelAll(_) => slot.flow.on_cancel_all_done(&mut ops),
            Kind::Accept | Kind::AcceptCancel | Kind::Wake | Kind::Tick => {}
        }
        self.apply(index, &mut ops);
        self.ops = ops;
    }

    /// Carries out a flow's operations; some (a connect with no backend left) feed the flow
    /// again, so this runs until the list is empty.
    fn apply(&mut self, index: usize, ops: &mut Vec<Op>) {
        let mut next = 0;
        while next < ops.len() {
            let op = ops[next];
            next += 1;
            match op {
                Op::ReturnBuffer(bid) => self.bufring.give_back(bid),
                Op::Release(ending) => {
                    self.release(index, ending);
                    // Nothing may follow a release: the slot is gone.
                    break;
                }
                op => {
                    let mut more = Vec::new();
                    self.submit_op(index, op, &mut more);
                    ops.extend(more);
                }
            }
        }
        ops.clear();
    }

    fn submit_op(&mut self, index: usize, op: Op, more: &mut Vec<Op>) {
        let slot = &mut self.slots[index];
        let generation = slot.generation;
        let token = |kind| Token::new(index, generation, kind).encode();
        let fd = |slot: &Slot, side: Side| match side {
            Side::Client => Some(slot.client.as_raw_fd()),
            Side::Backend => slot.backend.as_ref().map(|s| s.as_raw_fd()),
        };
        let entry = match op {
            Op::ReadHeader => {
                let Some(greeting) = slot.greeting.as_mut() else {
                    return;
                };
                let left = greeting.deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    slot.flow.abort(CloseReason::BadProxyHeader, more);
                    return;
                }
                if greeting.header.capacity() == 0 {
                    greeting
                        .header
                        .reserve_exact(proxy_protocol::V2_MAX_HEADER_LEN);
                }
                let filled = greeting.header.len();
                let room = greeting.header.capacity() - filled;
                greeting.timeout = timespec(left);
                // SAFETY (pointer): the recv writes into the spare capacity of `header`, which
                // is not resized while the read is in flight (only `on_header_bytes` touches it,
                // after the completion) and lives in the slot until the flow is released, which
                // waits for this operation's completion.
                let ptr = greeting.header.as_mut_ptr().wrapping_add(filled);
                let recv = opcode::Recv::new(types::Fd(slot.client.as_raw_fd()), ptr, room as u32)
                    .build()
                    .flags(squeue::Flags::IO_LINK)
                    .user_data(token(Kind::HeaderRecv));
                let timeout = opcode::LinkTimeout::new(&greeting.timeout as *const types::Timespec)
                    .build()
                    .user_data(token(Kind::LinkTimeout));
                slot.flow.on_header_submitted();
                self.push_linked(recv, timeout);
                return;
            }
            Op::SendPreface { offset, len } => {
                let (Some(greeting), Some(fd)) = (&slot.greeting, fd(slot, Side::Backend)) else {
                    return;
                };
                // The preface is not touched while its send is in flight and lives in the slot.
                let ptr = greeting.preface.as_ptr().wrapping_add(offset as usize);
                opcode::Send::new(types::Fd(fd), ptr, len)
                    .flags(libc::MSG_NOSIGNAL)
                    .build()
                    .user_data(token(Kind::Preface))
            }
            Op::Connect => {
                self.connect_next(index, more);
                return;
            }
            Op::Recv(side) => {
                let Some(fd) = fd(slot, side) else { return };
                opcode::RecvMulti::new(types::Fd(fd), self.bufring.group())
                    .build()
                    .user_data(token(Kind::Recv(side)))
            }
            Op::CancelRecv(side) => opcode::AsyncCancel::new(token(Kind::Recv(side)))
                .build()
                .user_data(token(Kind::RecvCancel(side))),
            Op::Send {
                to,
                buf,
                offset,
                len,
            } => {
                let Some(fd) = fd(slot, to) else { return };
                // SAFETY (pointer arithmetic): offset + len <= buffer size because the flow only
                // sends bytes the kernel wrote into this buffer.
                let ptr = self.bufring.buffer(buf).wrapping_add(offset as usize);
                opcode::Send::new(types::Fd(fd), ptr, len)
                    .flags(libc::MSG_NOSIGNAL)
                    .build()
                    .user_data(token(Kind::Send(to)))
            }
            Op::Shutdown(side) => {
                let Some(fd) = fd(slot, side) else { return };
                opcode::Shutdown::new(types::Fd(fd), libc::SHUT_WR)
                    .build()
                    .user_data(token(Kind::Shutdown(side)))
            }
            Op::CancelAll(side) => {
                let Some(fd) = fd(slot, side) else {
                    // No socket yet: nothing can be in flight on it.
                    slot.flow.on_cancel_all_done(more);
                    return;
                };
                opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all())
                    .build()
                    .user_data(token(Kind::CancelAll(side)))
            }
            Op::WaitForBuffers => {
                self.bufring.ran_dry();
                self.stats.buffer_ring_exhausted();
                self.starved.push_back((index as u32, generation));
                return;
            }
            Op::ReturnBuffer(_) | Op::Release(_) => return,
        };
        self.push(entry);
    }

    /// Picks the next untried healthy backend for the flow and submits a connect to it with a
    /// linked timeout.
    fn connect_next(&mut self, index: usize, more: &mut Vec<Op>) {
        let snapshot = Arc::clone(&self.snapshot);
        let slot = &mut self.slots[index];
        slot.backend = None; // a failed attempt's socket: its connect has completed
        if let Some(load) = slot.backend_load.take() {
            load.active.fetch_sub(1, Ordering::Relaxed);
        }
        // Tried indices refer to the set they were chosen from; a new set starts afresh.
        if !slot
            .backend_set
            .as_ref()
            .is_some_and(|set| Arc::ptr_eq(set, &snapshot.set))
        {
            slot.tried.clear();
            slot.backend_set = Some(Arc::clone(&snapshot.set));
        }
        loop {
            let tried = &slot.tried;
            let Some(backend) = snapshot.choose(slot.key_hash, &mut self.pick, |i| {
                !tried.contains(&(i as u32))
            }) else {
                // Nothing left to try: after failed attempts that is a connect failure.
                let reason = if slot.tried.is_empty() {
                    CloseReason::NoBackend
                } else {
                    CloseReason::ConnectFailed
                };
                slot.flow.abort(reason, more);
                return;
            };
            slot.tried.push(backend as u32);
            let target = &snapshot.backends()[backend];
            let socket = match self
                .settings
                .edge
                .backend_socket(&target.addr, &mut self.source_turn)
            {
                Ok(socket) => socket,
                Err(e) => {
                    let client = slot.client_addr;
                    self.socket_errors.warn(|suppressed| {
                        format!(
                            "flow {client}: cannot open a socket to {}: {e} ({suppressed} more \
                             since last report)",
                            target.name
                        )
                    });
                    if slot.tried.len() as u32 > self.settings.retries {
                        slot.flow.abort(CloseReason::ConnectFailed, more);
                        return;
                    }
                    continue;
                }
            };
            let token = |kind| Token::new(index, slot.generation, kind).encode();
            let connect = opcode::Connect::new(
                types::Fd(socket.as_raw_fd()),
                target.sockaddr.as_ptr() as *const libc::sockaddr,
                target.sockaddr.len(),
            )
            .build()
            .flags(squeue::Flags::IO_LINK)
            .user_data(token(Kind::Connect));
            let timeout =
                opcode::LinkTimeout::new(&*self.connect_timespec as *const types::Timespec)
                    .build()
                    .user_data(token(Kind::LinkTimeout));
            slot.backend = Some(socket);
            slot.backend_index = Some(backend);
            target.load.active.fetch_add(1, Ordering::Relaxed);
            slot.backend_load = Some(Arc::clone(&target.load));
            slot.flow.on_connect_submitted();
            slot.connect_started = Some(Instant::now());
            // The two must be adjacent in the submission queue for the link to hold.
            self.push_linked(connect, timeout);
            return;
        }
    }

    fn release(&mut self, index: usize, ending: Ending) {
        let slot = self.slots.remove(index);
        if ending.reset_client {
            let _ = SockRef::from(&slot.client).set_linger(Some(Duration::ZERO));
        }
        if let (true, Some(backend)) = (ending.reset_backend, &slot.backend) {
            let _ = backend.set_linger(Some(Duration::ZERO));
        }
        if let Some(load) = &slot.backend_load {
            load.active.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(ticket) = slot.ticket {
            self.settings.edge.release(ticket);
        }
        let (up, down) = slot.flow.bytes();
        let backend = slot
            .backend_index
            .zip(slot.backend_set.as_ref())
            .and_then(|(i, set)| set.backends.get(i));
        let kind = CloseKind::from(ending.reason);
        self.stats.flow_closed(kind);
        self.stats.bytes_client_to_backend(up);
        self.stats.bytes_backend_to_client(down);
        if let (Some(backend), Some(_)) = (backend, slot.connect_time) {
            backend.stats.flow_ended(up, down);
        }
        if let Some(log) = &self.access_log {
            let duration = slot.accepted_at.elapsed();
            log.log(FlowRecord {
                start: std::time::SystemTime::now() - duration,
                client: slot.client_addr,
                listener: self.listen_addr,
                backend: backend
                    .filter(|_| slot.connect_time.is_some())
                    .map(|b| Arc::clone(&b.name)),
                bytes_client_to_backend: up,
                bytes_backend_to_client: down,
                duration,
                connect: slot.connect_time,
                reason: kind,
            });
        }
        if let (CloseReason::BackendReset, 0, Some(i), Some(set)) =
            (ending.reason, down, slot.backend_index, &slot.backend_set)
        {
            // Reset before sending a byte: as suspicious as a failed connect.
            let _ = self.events.try_send(Event::BackendFailure {
                set: Arc::clone(set),
                index: i,
            });
        }
        debug!(
            "flow {} -> {} closed ({:?}): {} bytes up, {} bytes down, {} connect attempts",
            slot.client_addr,
            backend.map_or("-", |b| &*b.name),
            ending.reason,
            up,
            down,
            slot.flow.connect_attempts()
        );
        if matches!(
            ending.reason,
            CloseReason::NoBackend | CloseReason::ConnectFailed
        ) {
            self.accept_errors.warn(|suppressed| {
                format!(
                    "flow {}: no backend could be reached ({:?}, {suppressed} similar since last report)",
                    slot.client_addr, ending.reason
                )
            });
        }
        drop(slot); // closes both sockets
        self.active_flows.fetch_sub(1, Ordering::Relaxed);
        self.resume_accepting();
    }

    /// Bytes of the client's PROXY header arrived: parse what we have, then read more, refuse,
    /// or admit the real client and connect.
    fn on_header_bytes(&mut self, index: usize, received: usize, ops: &mut Vec<Op>) {
        let edge = Arc::clone(&self.settings.edge);
        let hash_key = self.settings.hash_key;
        let seed = self.settings.hash_seed;
        let slot = &mut self.slots[index];
        let Some(greeting) = slot.greeting.as_mut() else {
            return;
        };
        let filled = greeting.header.len() + received;
        // SAFETY: the kernel wrote `received` bytes into the spare capacity right after the
        // initialised part (the recv was given exactly that region), so they are initialised.
        unsafe {
            greeting
                .header
                .set_len(filled.min(greeting.header.capacity()))
        };
        match proxy_protocol::parse(&greeting.header) {
            Ok(Parsed::Incomplete { .. }) if greeting.header.len() < greeting.header.capacity() => {
                slot.flow.header_incomplete(ops)
            }
            Ok(Parsed::Incomplete { .. }) => slot.flow.abort(CloseReason::BadProxyHeader, ops),
            Ok(Parsed::Complete {
                header_len, source, ..
            }) => {
                if let Some(client) = source {
                    slot.client_addr = client;
                    slot.key_hash = flow_key_hash(&client, hash_key, seed);
                }
                match edge.admit(slot.client_addr.ip()) {
                    Ok(ticket) => slot.ticket = ticket,
                    Err(reason) => {
                        debug!("flow {}: refused ({reason:?})", slot.client_addr);
                        slot.flow.abort(reason, ops);
                        return;
                    }
                }
                // Our own header (if any) first, then client bytes that came with theirs.
                let mut preface = Vec::new();
                edge.proxy_header(slot.client_addr, greeting.local, &mut preface);
                preface.extend_from_slice(&greeting.header[header_len..]);
                greeting.preface = preface;
                greeting.header = Vec::new();
                slot.flow.set_preface(greeting.preface.len() as u32);
                slot.flow.header_done(ops);
            }
            Err(e) => {
                debug!("flow {}: bad PROXY header: {e}", slot.client_addr);
                slot.flow.abort(CloseReason::BadProxyHeader, ops);
            }
        }
    }

    /// Re-arm recvs of flows that ran out of buffers, at most one flow per returned buffer.
    fn wake_starved(&mut self, mut budget: usize) {
        while budget > 0 {
            let Some((index, generation)) = self.starved.pop_front() else {
                return;
            };
            let mut ops = std::mem::take(&mut self.ops);
            if let Some(slot) = self.slots.get_mut(index as usize) {
                if slot.generation == generation && slot.flow.is_starved() {
                    slot.flow.on_buffers_available(&mut ops);
                    budget -= 1;
                }
            }
            self.apply(index as usize, &mut ops);
            self.ops = ops;
        }
    }

    // ---- control and time ------------------------------------------------------------------

    fn arm_wake(&mut self) {
        let entry = opcode::Read::new(
            types::Fd(self.wake.as_raw_fd()),
            self.wake_buf.as_mut_ptr(),
            self.wake_buf.len() as u32,
        )
        .build()
        .user_data(Token::worker(Kind::Wake).encode());
        self.push(entry);
    }

    fn on_wake(&mut self, res: i32) {
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::Snapshot(snapshot, ack) => {
                    let old = std::mem::replace(&mut self.snapshot, snapshot);
                    self.retired.push(old);
                    if let Some(ack) = ack {
                        let _ = ack.send(());
                    }
                }
                Command::Stop => self.stop(),
                Command::Drain { deadline } => self.drain(deadline),
                Command::CloseBackends { names, deadline } => {
                    self.backend_deadlines.push((names, deadline))
                }
            }
        }
        if res > 0 && !self.hard_stop {
            self.arm_wake();
        } else if res <= 0 && !self.hard_stop {
            // The control side is gone (EOF) or the read failed: nobody can stop us any more
            // except a signal to the process, which the control thread handles; stop cleanly.
            let mut sink = [0u8; 64];
            let _ = self.wake.read(&mut sink);
            self.stop();
        }
    }

    /// No new flows: cancel the multishot accept; the listener closes when it has ended.
    fn stop_accepting(&mut self) {
        self.stopping = true;
        match self.accept {
            AcceptState::Armed => self.cancel_accept(),
            AcceptState::Paused => self.close_listener(),
            AcceptState::Cancelling | AcceptState::Closed => {}
        }
    }

    /// Close every flow now and end the thread when their operations have completed.
    fn stop(&mut self) {
        if self.hard_stop {
            return;
        }
        self.hard_stop = true;
        self.parked.clear();
        self.stop_accepting();
        self.close_flows(|_| true, CloseReason::Shutdown);
    }

    /// Stop accepting and end the thread when the live flows have finished (or at `deadline`).
    fn drain(&mut self, deadline: Instant) {
        if self.stopping {
            return;
        }
        self.drain_deadline = Some(deadline);
        self.stop_accepting();
    }

    fn close_flows(&mut self, which: impl Fn(&Slot) -> bool, reason: CloseReason) {
        let chosen: Vec<usize> = self
            .slots
            .iter()
            .filter(|(_, slot)| which(slot))
            .map(|(i, _)| i)
            .collect();
        for index in chosen {
            let mut ops = std::mem::take(&mut self.ops);
            if let Some(slot) = self.slots.get_mut(index) {
                slot.flow.abort(reason, &mut ops);
            }
            self.apply(index, &mut ops);
            self.ops = ops;
        }
    }

    /// Closes flows of removed backends whose drain deadline has passed.
    fn close_drained_backends(&mut self) {
        let now = Instant::now();
        let due: Vec<Arc<str>> = self
            .backend_deadlines
            .iter()
            .filter(|(_, deadline)| *deadline <= now)
            .flat_map(|(names, _)| names.iter().cloned())
            .collect();
        if due.is_empty() {
            return;
        }
        self.backend_deadlines
            .retain(|(_, deadline)| *deadline > now);
        self.close_flows(
            |slot| {
                slot.backend_index
                    .zip(slot.backend_set.as_ref())
                    .and_then(|(i, set)| set.backends.get(i))
                    .is_some_and(|b| due.contains(&b.name))
            },
            CloseReason::Shutdown,
        );
    }

    fn arm_tick(&mut self) {
        let entry = opcode::Timeout::new(&*self.tick_timespec as *const types::Timespec)
            .build()
            .user_data(Token::worker(Kind::Tick).encode());
        self.push(entry);
    }

    fn on_tick(&mut self) {
        let now = (self.started.elapsed().as_nanos() / self.tick.as_nanos()) as u64;
        let mut due = std::mem::take(&mut self.due);
        self.timers.advance(now, &mut due);
        for (index, generation) in due.drain(..) {
            let Some(slot) = self.slots.get_mut(index as usize) else {
                continue;
            };
            if slot.generation != generation || slot.flow.phase() == Phase::Closing {
                continue;
            }
            let Some(idle) = self.idle_ticks else {
                continue;
            };
            let deadline = slot.last_active + idle;
            if deadline <= now {
                debug!("flow {}: idle timeout", slot.client_addr);
                let mut ops = std::mem::take(&mut self.ops);
                slot.flow.abort(CloseReason::IdleTimeout, &mut ops);
                self.apply(index as usize, &mut ops);
                self.ops = ops;
            } else {
                self.timers.schedule(deadline, (index, generation));
            }
        }
        self.due = due;
        self.bufring.relax();
        if self.drain_deadline.is_some_and(|d| Instant::now() >= d) {
            self.stop();
        }
        if !self.backend_deadlines.is_empty() {
            self.close_drained_backends();
        }
        self.resume_accepting();
        if !self.stopping || !self.slots.is_empty() {
            self.arm_tick();
        }
    }

    // ---- submission ------------------------------------------------------------------------

    fn push(&mut self, entry: squeue::Entry) {
        loop {
            // SAFETY: every pointer in an entry built by this worker (buffers from the buffer
            // ring, the wake buffer, timespecs, backend socket addresses held by a live snapshot
            // in `snapshot` or `retired`) stays valid until the kernel has consumed the entry
            // and, for buffers, until the operation's completion has been handled.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            self.submit_pending();
        }
    }

    fn push_linked(&mut self, first: squeue::Entry, second: squeue::Entry) {
        loop {
            let mut sq = self.ring.submission();
            if sq.capacity() - sq.len() >= 2 {
                // SAFETY: as in `push`; the connect's address is the backend's SockAddr in the
                // current snapshot, kept alive (in `retired` if replaced) until after submit.
                unsafe {
                    let _ = sq.push(&first);
                    let _ = sq.push(&second);
                }
                return;
            }
            drop(sq);
            self.submit_pending();
        }
    }

    /// The submission queue is full: hand it to the kernel now.
    fn submit_pending(&mut self) {
        match self.ring.submit() {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                // Completion queue overflow: make room by reaping (handled in this same loop
                // turn), then the caller retries its push.
                self.reap();
            }
            Err(e) => warn!("worker {}: submit failed: {e}", self.id),
        }
    }

    fn shutdown_ring(&mut self) {
        self.bufring.unregister(&self.ring);
    }
}

fn timespec(d: Duration) -> types::Timespec {
    types::Timespec::new()
        .sec(d.as_secs())
        .nsec(d.subsec_nanos())
}

/// A warning that is logged at most once a second, with a count of what it held back.
struct RateLimited {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimited {
    fn new() -> RateLimited {
        RateLimited {
            last: None,
            suppressed: 0,
        }
    }

    fn warn(&mut self, message: impl FnOnce(u64) -> String) {
        let now = Instant::now();
        match self.last {
            Some(last) if now.duration_since(last) < Duration::from_secs(1) => {
                self.suppressed += 1;
            }
            _ => {
                warn!("{}", message(self.suppressed));
                self.last = Some(now);
                self.suppressed = 0;
            }
        }
    }
}
