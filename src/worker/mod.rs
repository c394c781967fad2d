//! One worker thread: its own io_uring ring, SO_REUSEPORT listener, buffer ring, timer wheel
//! and flows. Nothing here is shared with other workers except the process-wide flow counter
//! (one atomic add per flow), the immutable snapshot of backends, and each worker's published
//! load and inbox for passing new connections to a less loaded worker (`handoff.rs`).
//!
//! The event loop submits, waits for completions, and routes each completion by its token to
//! the flow state machine (`crate::flow`), then carries out the operations the flow asks for.

mod accept;
mod bufring;
mod edge;
mod flows;
mod half_close;
mod handoff;
mod handover;
mod lifecycle;
mod live_bytes;
mod ops;
mod rate_limited;
mod ring;
mod slot;
mod splice;
mod submit;
mod timer;
mod token;

use std::collections::VecDeque;
use std::io::{self};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use io_uring::{cqueue, types, IoUring};
use log::error;
use slab::Slab;
use socket2::Socket;

use crate::access_log::AccessLog;
use crate::balance::HashKey;
use crate::events::Event;
use crate::flow::{Flow, Limits, Op};
use crate::metrics::WorkerStatsWriter;
use crate::snapshot::{BackendLoad, BackendSet, PickState, Snapshot};
use bufring::BufRing;
pub use edge::Edge;
pub use handoff::{for_workers as handoffs_for_workers, Handoff};
use rate_limited::RateLimited;
pub use ring::{new_ring, RingError};
pub use splice::pipes_per_worker;
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
    /// Upgrade: stop accepting (keeping the listener), quiesce every flow and report each on
    /// `exports` once it can move, then `Drained` (see `worker/handover.rs`).
    Handover {
        exports: Sender<crate::handover::Exported>,
    },
    /// The successor acknowledged these exported flows: close this process's copies.
    Release(Vec<crate::handover::FlowHandle>),
    /// The handover failed: accept again and move every flow not released; take back these
    /// accepted connections that were not started.
    Resume(Vec<OwnedFd>),
    /// Flows handed over by the previous process: relay them from where they stood.
    Adopt(Vec<crate::handover::Adopted>, Arc<crate::handover::Pauses>),
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
    /// Bumped once per tick: the control thread's sign that this worker's loop turns.
    pub heartbeat: Arc<AtomicU64>,
    /// This worker's part in passing new connections between workers (`handoff.rs`).
    pub handoff: Handoff,
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
    /// `--splice auto`: bulk directions relay through kernel pipes (`worker/splice.rs`), at
    /// most this many lent at once by this worker; 0: `--splice off`.
    pub splice_pipes: usize,
}

/// Buffers a pipe may hold before it stops reading (its budget while the pool is roomy; one when
/// it is tight, see flow.rs): 4 x 64 KiB keeps a bulk flow streaming while a slow reader ties up
/// at most 256 KiB per direction (4 buffers whatever --buffer-size).
const MAX_QUEUED_BUFFERS: u8 = 4;
/// Submission queue entries; the completion queue is 4x larger because multishot operations
/// post many completions per submission.
const RING_ENTRIES: u32 = 4096;
const BUFFER_GROUP: u16 = 0;

/// One accepted flow and the resources the worker holds for it.
///
/// Every open flow pays for this struct (the slab holds one per flow), idle or not, so it holds
/// only what every flow needs for its whole life; what most flows need briefly or never is in
/// `cold`, allocated only when needed (see `slot.rs`, which also checks the size at compile time).
struct Slot {
    generation: u32,
    /// The backend in `backend_set` this flow connects or connected to.
    backend_index: Option<u32>,
    flow: Flow,
    client: OwnedFd,
    backend: Option<Socket>,
    /// The client (from the PROXY header behind a trusted load balancer); the backend hash key
    /// is computed from it when a connect picks a backend.
    client_addr: SocketAddr,
    /// The backend set `backend_index` refers to (snapshots may change during the flow).
    backend_set: Option<Arc<BackendSet>>,
    /// Active-flow gauge of the backend this flow holds, released when the flow ends.
    backend_load: Option<Arc<BackendLoad>>,
    /// Tick of the last byte moved either way.
    last_active: u64,
    /// When the flow was accepted, in CLOCK_MONOTONIC ns (`Instant`'s clock on Linux; 8 bytes
    /// instead of 16).
    accepted_ns: u64,
    /// Until `connected`: when the connect in flight was submitted (CLOCK_MONOTONIC ns); after:
    /// how long the successful connect took (ns). See `Slot::connect_time`.
    connect_ns: u64,
    /// The flow's bytes (up, down) already added to the counters (`live_bytes`).
    bytes_accounted: (u64, u64),
    /// Filed in the timer wheel for the idle timeout.
    timer_filed: bool,
    /// A connect succeeded (or the flow was adopted relaying): `connect_ns` is its duration.
    connected: bool,
    /// Connect retries, PROXY protocol, spill, source ticket, handover: `None` for most flows.
    cold: Option<Box<slot::Cold>>,
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
    /// The armed accept is multishot (see `Worker::narrow_accepting`).
    accept_multishot: bool,
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
    /// Flows started in this event-loop turn (bounded by `accept::START_BATCH`).
    started_this_turn: usize,
    /// Bytes in every flow's spill (a gauge for operators).
    spill_bytes: u64,
    /// Spill memory freed since the allocator was last asked to return free pages.
    spill_freed: u64,
    /// When open flows' bytes were last added to the counters (`live_bytes`).
    bytes_flushed_at: Instant,
    /// See `WorkerSetup::heartbeat`.
    heartbeat: Arc<AtomicU64>,
    /// An upgrade handover in progress (`worker/handover.rs`).
    handover: Option<handover::Progress>,
    /// Load published to the other workers, and connections they pass here (`handoff.rs`).
    handoff: Handoff,
    /// Kernel pipes for splicing directions; `None` with `--splice off` or when the kernel
    /// would not make one at start-up.
    pipes: Option<splice::PipePool>,
    /// Kernel pipes lent to flows, by slot index, then `Side::pipe_index`: kept here, not in
    /// the slot, so flows that never splice pay nothing for them.
    lent_pipes: std::collections::HashMap<usize, [Option<splice::KernelPipe>; 2]>,
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
        let budget = MAX_QUEUED_BUFFERS as u32 * settings.buffer_size;
        let pipes = match settings.splice_pipes {
            0 => None,
            bound => match splice::PipePool::new(budget, bound) {
                Ok(pool) => Some(pool),
                Err(e) => {
                    log::warn!(
                        "worker {}: cannot make a {budget}-byte kernel pipe ({e}); bulk flows \
                         relay through buffers (see /proc/sys/fs/pipe-max-size)",
                        setup.id
                    );
                    None
                }
            },
        };
        let limits = Limits {
            retries: u8::try_from(settings.retries).unwrap_or(u8::MAX),
            max_queued: MAX_QUEUED_BUFFERS,
            read_header: settings.edge.trusted.is_some(),
            splice_after_units: Limits::splice_after(settings.buffer_size, pipes.is_some()),
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
            slots: Slab::with_capacity(slot::slab_start_capacity()),
            next_generation: 1,
            ops: Vec::with_capacity(16),
            completions: Vec::with_capacity(1024),
            starved: VecDeque::new(),
            parked: VecDeque::new(),
            accept: AcceptState::Paused,
            accept_multishot: false,
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
            spill_bytes: 0,
            spill_freed: 0,
            started_this_turn: 0,
            bytes_flushed_at: Instant::now(),
            heartbeat: setup.heartbeat,
            handover: None,
            handoff: setup.handoff,
            pipes,
            lent_pipes: std::collections::HashMap::new(),
        })
    }

    fn event_loop(&mut self) -> io::Result<()> {
        self.arm_accept();
        self.arm_wake();
        self.arm_tick();
        self.arm_handoff();
        loop {
            let returned = self.bufring.publish();
            if returned > 0 {
                self.wake_starved(returned as usize);
            }
            self.stats
                .set_buffer_use(u64::from(self.bufring.lent()), self.spill_bytes);
            self.stats
                .set_pipes_in_use(self.pipes.as_ref().map_or(0, |p| p.in_use() as u64));
            if self.stopping
                && self.slots.is_empty()
                && self.parked.is_empty()
                && self.accept == AcceptState::Closed
            {
                // The last released flows' closes may still be queued: hand them to the
                // kernel, or their descriptors stay open until the process exits.
                let _ = self.ring.submit();
                return Ok(());
            }
            // With idle flows still to close, collect what is ready without sleeping and come
            // back for the next batch.
            let entered = if self.has_expiry_backlog() || self.has_start_backlog() {
                self.submit_and_collect()
            } else {
                // About to wait: a burst's leftover buffer pages go back now (O(1) otherwise).
                self.bufring.trim_quiet();
                self.ring.submit_and_wait(1)
            };
            match entered {
                Ok(_) => self.retired.clear(),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                // The completion queue overflowed: reap before submitting more.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(e),
            }
            let turn = Instant::now();
            self.started_this_turn = 0;
            self.completions.clear();
            self.reap();
            // `reap` may append more while these are handled (see `submit_pending`).
            let mut next = 0;
            while next < self.completions.len() {
                let (user_data, res, flags) = self.completions[next];
                next += 1;
                self.on_completion(user_data, res, flags);
            }
            if self.has_expiry_backlog() {
                self.expire_due();
            }
            if self.has_start_backlog() {
                self.resume_accepting();
            }
            if self.handover.is_some() {
                self.handover_turn();
            }
            self.publish_load();
            self.stats.turn_took(turn.elapsed());
        }
    }

    fn on_completion(&mut self, user_data: u64, res: i32, flags: u32) {
        let Some(token) = Token::decode(user_data) else {
            return;
        };
        match token.kind {
            Kind::Accept => self.on_accept(res, cqueue::more(flags)),
            Kind::AcceptCancel | Kind::Close => {}
            Kind::FlowClosed => self.on_flow_closed(),
            Kind::Wake => self.on_wake(res),
            Kind::Tick => self.on_tick(),
            Kind::HandedIn => self.on_handed_in(res),
            _ => self.on_flow_completion(token, res, flags),
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
