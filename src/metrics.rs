//! Counters the data path bumps and the admin endpoint reads, and their Prometheus rendering.
//!
//! # Per worker: [`WorkerStatsWriter`] and [`WorkerStats`]
//!
//! Each worker gets one [`WorkerStatsWriter`] (`WorkerStatsWriter::new()`, moved into the worker)
//! and the control thread keeps the matching `Arc<WorkerStats>` (`writer.stats().clone()`) for
//! scrapes. The writer is neither `Clone` nor `Sync`, so there is exactly one writing thread per
//! `WorkerStats`: that is what lets every bump be a plain relaxed load + store (no locked
//! instruction) without losing updates. The whole struct is aligned to 128 bytes so two workers' counters never share
//! a cache line (or an adjacent-line prefetch pair); readers only load.
//!
//! What the worker calls, and when:
//! - [`flow_accepted`](WorkerStatsWriter::flow_accepted): a client connection was accepted and
//!   became a flow (also bumps the active gauge).
//! - [`flow_closed`](WorkerStatsWriter::flow_closed)`(kind)`: a flow was released (drops the
//!   active gauge, counts the reason).
//! - [`flow_refused`](WorkerStatsWriter::flow_refused)`(kind)`: an accepted connection was closed
//!   before it became a flow (limit, ACL, per-source limit, bad PROXY header). Does not touch
//!   the active gauge; the connection is *not* counted in `flows_accepted`.
//! - [`bytes_client_to_backend`](WorkerStatsWriter::bytes_client_to_backend) /
//!   [`bytes_backend_to_client`](WorkerStatsWriter::bytes_backend_to_client): bytes delivered.
//!   The worker adds each open flow's new bytes on its periodic flush and the rest at release
//!   (`worker/live_bytes.rs`), so every byte is added exactly once.
//! - [`connect_failed`](WorkerStatsWriter::connect_failed): one backend connect attempt failed or
//!   timed out (a flow that retries may count several).
//! - [`connect_local_error`](WorkerStatsWriter::connect_local_error): a backend connect (or its
//!   socket) failed for lack of a local resource: ports, descriptors, buffers, memory.
//! - [`connected`](WorkerStatsWriter::connected)`(elapsed)`: a backend connect succeeded after
//!   `elapsed`; feeds the connect-time histogram.
//! - [`flow_relayed`](WorkerStatsWriter::flow_relayed)`(duration, up, down)`: a flow that reached
//!   a backend ended; feeds the flow-duration and bytes-per-flow histograms.
//! - [`accept_error`](WorkerStatsWriter::accept_error): accept completed with an error.
//! - [`buffer_ring_exhausted`](WorkerStatsWriter::buffer_ring_exhausted): a recv got ENOBUFS.
//!
//! # Per backend: [`BackendStats`]
//!
//! One `Arc<BackendStats>` per backend name, kept by the control thread in a name-keyed map so the
//! numbers survive reloads, and handed to workers (e.g. inside the snapshot). All workers write
//! it, so it uses `fetch_add`; it is touched at flow start and end and by each worker's periodic
//! byte flush (one add per backend per flush, see `worker/live_bytes.rs`), never per byte.
//!
//! # Rendering
//!
//! [`render_prometheus`] writes the text exposition format 0.0.4; [`render_counter`] and
//! [`render_gauge`] append extra unlabelled samples (e.g. access-log drops) after it.
//!
//! Every name is written out in full (`ringway_...`) where it is rendered. The list of families,
//! with types, labels and meaning, is in docs/operations.md ("Metrics and the admin endpoint");
//! tests/operations.rs checks that list against what a running proxy exports.

use std::cell::Cell;
use std::fmt::Write as _;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::flow::CloseReason;

/// How a flow (or a refused connection) ended; the `reason` label of `flows_closed_total` and the
/// `reason` field of the access log. Mirrors [`CloseReason`] plus the ways a connection is refused
/// before it becomes a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CloseKind {
    Done,
    ClientReset,
    BackendReset,
    IdleTimeout,
    ConnectFailed,
    NoBackend,
    Shutdown,
    Error,
    /// Refused: the process-wide flow limit was reached.
    RefusedLimit,
    /// Refused: the client address is not allowed.
    RefusedAcl,
    /// Refused: the client's address has too many flows open.
    RefusedPerSource,
    /// Refused: the PROXY protocol header was missing, malformed or too slow.
    RefusedProxyHeader,
}

impl CloseKind {
    pub const COUNT: usize = 12;

    /// Every kind, in label order; `ALL[k.index()] == k`.
    pub const ALL: [CloseKind; CloseKind::COUNT] = [
        CloseKind::Done,
        CloseKind::ClientReset,
        CloseKind::BackendReset,
        CloseKind::IdleTimeout,
        CloseKind::ConnectFailed,
        CloseKind::NoBackend,
        CloseKind::Shutdown,
        CloseKind::Error,
        CloseKind::RefusedLimit,
        CloseKind::RefusedAcl,
        CloseKind::RefusedPerSource,
        CloseKind::RefusedProxyHeader,
    ];

    /// Position in [`CloseKind::ALL`] and in the per-reason counter array.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The label value: snake_case, stable (dashboards and log queries depend on it).
    pub fn as_str(self) -> &'static str {
        match self {
            CloseKind::Done => "done",
            CloseKind::ClientReset => "client_reset",
            CloseKind::BackendReset => "backend_reset",
            CloseKind::IdleTimeout => "idle_timeout",
            CloseKind::ConnectFailed => "connect_failed",
            CloseKind::NoBackend => "no_backend",
            CloseKind::Shutdown => "shutdown",
            CloseKind::Error => "error",
            CloseKind::RefusedLimit => "refused_limit",
            CloseKind::RefusedAcl => "refused_acl",
            CloseKind::RefusedPerSource => "refused_per_source",
            CloseKind::RefusedProxyHeader => "refused_proxy_header",
        }
    }

    /// Whether the connection was refused before it became a flow.
    pub fn is_refusal(self) -> bool {
        matches!(
            self,
            CloseKind::RefusedLimit
                | CloseKind::RefusedAcl
                | CloseKind::RefusedPerSource
                | CloseKind::RefusedProxyHeader
        )
    }
}

impl From<CloseReason> for CloseKind {
    fn from(reason: CloseReason) -> CloseKind {
        match reason {
            CloseReason::Done => CloseKind::Done,
            CloseReason::ClientReset => CloseKind::ClientReset,
            CloseReason::BackendReset => CloseKind::BackendReset,
            CloseReason::IdleTimeout => CloseKind::IdleTimeout,
            CloseReason::ConnectFailed => CloseKind::ConnectFailed,
            CloseReason::NoBackend => CloseKind::NoBackend,
            CloseReason::Shutdown => CloseKind::Shutdown,
            CloseReason::Error(_) => CloseKind::Error,
            CloseReason::Denied => CloseKind::RefusedAcl,
            CloseReason::SourceLimit => CloseKind::RefusedPerSource,
            CloseReason::BadProxyHeader => CloseKind::RefusedProxyHeader,
        }
    }
}

/// Event-loop turns slower than these are counted (`ringway_event_loop_slow_turns_total`): a
/// turn is how long every other flow of the worker may wait for its next completion.
const SLOW_TURNS: [(Duration, &str); 3] = [
    (Duration::from_millis(10), "0.01"),
    (Duration::from_millis(50), "0.05"),
    (Duration::from_millis(250), "0.25"),
];

// ---- connect-time histogram buckets --------------------------------------------------------

/// Upper bounds of the connect-time buckets in microseconds, with the `le` label text for each.
/// An observation lands in the first bucket whose bound is >= it; larger ones go to the overflow
/// slot, which only the `+Inf` bucket counts.
const CONNECT_BUCKETS: [(u64, &str); 13] = [
    (500, "0.0005"),
    (1_000, "0.001"),
    (2_500, "0.0025"),
    (5_000, "0.005"),
    (10_000, "0.01"),
    (25_000, "0.025"),
    (50_000, "0.05"),
    (100_000, "0.1"),
    (250_000, "0.25"),
    (500_000, "0.5"),
    (1_000_000, "1"),
    (2_500_000, "2.5"),
    (5_000_000, "5"),
];
/// Bucket slots: one per bound plus the overflow slot.
const CONNECT_SLOTS: usize = CONNECT_BUCKETS.len() + 1;

fn connect_slot(micros: u64) -> usize {
    CONNECT_BUCKETS
        .iter()
        .position(|&(bound, _)| micros <= bound)
        .unwrap_or(CONNECT_BUCKETS.len())
}

// ---- flow histograms (duration, bytes per flow) ---------------------------------------------

/// Upper bounds of the flow-duration buckets in microseconds, with their `le` text: from a
/// millisecond (a refused request) to a day (a long-lived stream).
const FLOW_DURATION_BUCKETS: [(u64, &str); 16] = [
    (1_000, "0.001"),
    (5_000, "0.005"),
    (10_000, "0.01"),
    (50_000, "0.05"),
    (100_000, "0.1"),
    (500_000, "0.5"),
    (1_000_000, "1"),
    (5_000_000, "5"),
    (10_000_000, "10"),
    (30_000_000, "30"),
    (60_000_000, "60"),
    (300_000_000, "300"),
    (900_000_000, "900"),
    (3_600_000_000, "3600"),
    (14_400_000_000, "14400"),
    (86_400_000_000, "86400"),
];
const FLOW_DURATION_SLOTS: usize = FLOW_DURATION_BUCKETS.len() + 1;

/// Upper bounds of the bytes-per-flow buckets (one direction of one flow), powers of 4 from
/// 256 B to 16 GiB.
const FLOW_BYTES_BUCKETS: [(u64, &str); 14] = [
    (1 << 8, "256"),
    (1 << 10, "1024"),
    (1 << 12, "4096"),
    (1 << 14, "16384"),
    (1 << 16, "65536"),
    (1 << 18, "262144"),
    (1 << 20, "1048576"),
    (1 << 22, "4194304"),
    (1 << 24, "16777216"),
    (1 << 26, "67108864"),
    (1 << 28, "268435456"),
    (1 << 30, "1073741824"),
    (1 << 32, "4294967296"),
    (1 << 34, "17179869184"),
];
const FLOW_BYTES_SLOTS: usize = FLOW_BYTES_BUCKETS.len() + 1;

/// Index of the bytes-per-flow histogram for each direction (and the `direction` label).
const DIRECTIONS: [&str; 2] = ["client_to_backend", "backend_to_client"];

/// The slot for `value` among `bounds`: the first bound >= it, or the overflow slot.
fn bucket_slot(bounds: &[(u64, &str)], value: u64) -> usize {
    bounds
        .iter()
        .position(|&(bound, _)| value <= bound)
        .unwrap_or(bounds.len())
}

fn duration_micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

// ---- per worker ----------------------------------------------------------------------------

/// One worker's counters. Read with [`WorkerStats::read`]; written only through the worker's
/// [`WorkerStatsWriter`].
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct WorkerStats {
    flows_accepted: AtomicU64,
    flows_active: AtomicU64,
    /// Indexed by [`CloseKind::index`].
    flows_closed: [AtomicU64; CloseKind::COUNT],
    bytes_client_to_backend: AtomicU64,
    bytes_backend_to_client: AtomicU64,
    connect_failures: AtomicU64,
    connect_local_errors: AtomicU64,
    accept_errors: AtomicU64,
    buffer_ring_exhausted: AtomicU64,
    buffers_reclaimed: AtomicU64,
    /// Accepted connections passed to a less loaded worker (`worker/handoff.rs`).
    flows_handed_off: AtomicU64,
    /// Event-loop turns whose handling took longer than each of `SLOW_TURNS`.
    slow_turns: [AtomicU64; SLOW_TURNS.len()],
    /// Gauges the worker stores once per event-loop turn.
    buffers_in_use: AtomicU64,
    spill_bytes: AtomicU64,
    /// Bytes delivered by splice (also counted in the byte counters above), and kernel pipes
    /// lent to flows now (a gauge).
    spliced_bytes: AtomicU64,
    pipes_in_use: AtomicU64,
    /// Non-cumulative: slot i counts observations in (bound i-1, bound i]; the last slot counts
    /// those above the largest bound. The count is their sum, so `+Inf == _count` always holds.
    connect_buckets: [AtomicU64; CONNECT_SLOTS],
    connect_sum_micros: AtomicU64,
    /// Flows that reached a backend, by lifetime (non-cumulative, like `connect_buckets`).
    flow_duration_buckets: [AtomicU64; FLOW_DURATION_SLOTS],
    flow_duration_sum_micros: AtomicU64,
    /// The same flows by bytes moved, per direction (indexed like [`DIRECTIONS`]).
    flow_bytes_buckets: [[AtomicU64; FLOW_BYTES_SLOTS]; 2],
    flow_bytes_sum: [AtomicU64; 2],
}

impl WorkerStats {
    /// A consistent-enough copy for rendering: each counter is read once, relaxed. Counters may be
    /// a few events apart from each other (a scrape races the worker), never torn.
    pub fn read(&self) -> WorkerCounts {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        WorkerCounts {
            flows_accepted: load(&self.flows_accepted),
            flows_active: load(&self.flows_active),
            flows_closed: self.flows_closed.each_ref().map(load),
            bytes_client_to_backend: load(&self.bytes_client_to_backend),
            bytes_backend_to_client: load(&self.bytes_backend_to_client),
            connect_failures: load(&self.connect_failures),
            connect_local_errors: load(&self.connect_local_errors),
            accept_errors: load(&self.accept_errors),
            buffer_ring_exhausted: load(&self.buffer_ring_exhausted),
            buffers_reclaimed: load(&self.buffers_reclaimed),
            flows_handed_off: load(&self.flows_handed_off),
            slow_turns: self.slow_turns.each_ref().map(load),
            buffers_in_use: load(&self.buffers_in_use),
            spill_bytes: load(&self.spill_bytes),
            spliced_bytes: load(&self.spliced_bytes),
            pipes_in_use: load(&self.pipes_in_use),
            connect_buckets: self.connect_buckets.each_ref().map(load),
            connect_sum_micros: load(&self.connect_sum_micros),
            flow_duration_buckets: self.flow_duration_buckets.each_ref().map(load),
            flow_duration_sum_micros: load(&self.flow_duration_sum_micros),
            flow_bytes_buckets: self
                .flow_bytes_buckets
                .each_ref()
                .map(|direction| direction.each_ref().map(load)),
            flow_bytes_sum: self.flow_bytes_sum.each_ref().map(load),
        }
    }
}

/// The only writer of one [`WorkerStats`]; owned by its worker thread. Every method is a relaxed
/// load + store on a line no other thread writes (see the module docs).
#[derive(Debug)]
pub struct WorkerStatsWriter {
    stats: Arc<WorkerStats>,
    /// `Send` but not `Sync`: the writer can move to its worker thread but cannot be shared
    /// (say, behind an `Arc`), which keeps the load + store bumps free of lost updates.
    _single_thread: PhantomData<Cell<()>>,
}

impl Default for WorkerStatsWriter {
    fn default() -> Self {
        Self::new()
    }
}

/// Adds `n` to a counter that only the calling thread writes. Wrapping, so a counter never
/// panics; at 2^64 it would take centuries of traffic to wrap.
fn bump(counter: &AtomicU64, n: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(n),
        Ordering::Relaxed,
    );
}

impl WorkerStatsWriter {
    pub fn new() -> WorkerStatsWriter {
        WorkerStatsWriter {
            stats: Arc::new(WorkerStats::default()),
            _single_thread: PhantomData,
        }
    }

    /// The read side, to clone for the control thread.
    pub fn stats(&self) -> &Arc<WorkerStats> {
        &self.stats
    }

    pub fn flow_accepted(&self) {
        bump(&self.stats.flows_accepted, 1);
        bump(&self.stats.flows_active, 1);
    }

    /// A flow accepted with [`flow_accepted`](Self::flow_accepted) was released.
    pub fn flow_closed(&self, kind: CloseKind) {
        let active = &self.stats.flows_active;
        // Saturating: an unpaired close shows as 0 active rather than 2^64 - 1.
        active.store(
            active.load(Ordering::Relaxed).saturating_sub(1),
            Ordering::Relaxed,
        );
        bump(&self.stats.flows_closed[kind.index()], 1);
    }

    /// A connection closed before it became a flow; `kind` should be a `Refused*` kind.
    pub fn flow_refused(&self, kind: CloseKind) {
        bump(&self.stats.flows_closed[kind.index()], 1);
    }

    pub fn bytes_client_to_backend(&self, n: u64) {
        bump(&self.stats.bytes_client_to_backend, n);
    }

    pub fn bytes_backend_to_client(&self, n: u64) {
        bump(&self.stats.bytes_backend_to_client, n);
    }

    /// One connect attempt failed or timed out.
    pub fn connect_failed(&self) {
        bump(&self.stats.connect_failures, 1);
    }

    /// A backend connect, or the socket for it, failed for lack of a local resource (no local
    /// port, descriptor, buffer or memory): not the backend's fault.
    pub fn connect_local_error(&self) {
        bump(&self.stats.connect_local_errors, 1);
    }

    /// A backend connect succeeded `elapsed` after it was submitted.
    pub fn connected(&self, elapsed: Duration) {
        let micros = duration_micros(elapsed);
        bump(&self.stats.connect_buckets[connect_slot(micros)], 1);
        bump(&self.stats.connect_sum_micros, micros);
    }

    /// A flow that reached a backend ended `duration` after it was accepted, having moved `up`
    /// bytes client to backend and `down` bytes back.
    pub fn flow_relayed(&self, duration: Duration, up: u64, down: u64) {
        let micros = duration_micros(duration);
        let slot = bucket_slot(&FLOW_DURATION_BUCKETS, micros);
        bump(&self.stats.flow_duration_buckets[slot], 1);
        bump(&self.stats.flow_duration_sum_micros, micros);
        for (direction, bytes) in [up, down].into_iter().enumerate() {
            let slot = bucket_slot(&FLOW_BYTES_BUCKETS, bytes);
            bump(&self.stats.flow_bytes_buckets[direction][slot], 1);
            bump(&self.stats.flow_bytes_sum[direction], bytes);
        }
    }

    pub fn accept_error(&self) {
        bump(&self.stats.accept_errors, 1);
    }

    /// A recv ended with ENOBUFS: the buffer ring was empty.
    pub fn buffer_ring_exhausted(&self) {
        bump(&self.stats.buffer_ring_exhausted, 1);
    }

    /// The pool was tight and a stalled flow was asked to give its ring buffers back.
    pub fn buffers_reclaimed(&self) {
        bump(&self.stats.buffers_reclaimed, 1);
    }

    /// A connection this worker accepted was passed to a less loaded worker, which counts it
    /// in its `flows_accepted` when it starts the flow.
    pub fn flow_handed_off(&self) {
        bump(&self.stats.flows_handed_off, 1);
    }

    /// One event-loop turn's handling (completions in, submissions out) took `took`.
    pub fn turn_took(&self, took: Duration) {
        for (i, &(bound, _)) in SLOW_TURNS.iter().enumerate() {
            if took > bound {
                bump(&self.stats.slow_turns[i], 1);
            }
        }
    }

    /// Relay buffers held by flows now, and bytes held in their heap spills.
    pub fn set_buffer_use(&self, buffers: u64, spill_bytes: u64) {
        self.stats.buffers_in_use.store(buffers, Ordering::Relaxed);
        self.stats.spill_bytes.store(spill_bytes, Ordering::Relaxed);
    }

    /// `n` bytes delivered by splice (through a kernel pipe, not a relay buffer).
    pub fn spliced(&self, n: u64) {
        bump(&self.stats.spliced_bytes, n);
    }

    /// Kernel pipes lent to splicing flows now.
    pub fn set_pipes_in_use(&self, pipes: u64) {
        self.stats.pipes_in_use.store(pipes, Ordering::Relaxed);
    }

    /// A live flow moved to the successor process (upgrade): no longer active here, and not
    /// closed either.
    pub fn flow_handed_over(&self) {
        let active = &self.stats.flows_active;
        active.store(
            active.load(Ordering::Relaxed).saturating_sub(1),
            Ordering::Relaxed,
        );
    }

    /// A live flow taken over from the previous process: active here (its accept was counted
    /// there).
    pub fn flow_adopted(&self) {
        bump(&self.stats.flows_active, 1);
    }
}

/// Plain copy of one worker's counters (or of several, summed with [`WorkerCounts::add`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerCounts {
    pub flows_accepted: u64,
    pub flows_active: u64,
    /// Indexed by [`CloseKind::index`].
    pub flows_closed: [u64; CloseKind::COUNT],
    pub bytes_client_to_backend: u64,
    pub bytes_backend_to_client: u64,
    pub connect_failures: u64,
    pub connect_local_errors: u64,
    pub accept_errors: u64,
    pub buffer_ring_exhausted: u64,
    pub buffers_reclaimed: u64,
    pub flows_handed_off: u64,
    pub slow_turns: [u64; SLOW_TURNS.len()],
    pub buffers_in_use: u64,
    pub spill_bytes: u64,
    pub spliced_bytes: u64,
    pub pipes_in_use: u64,
    /// Non-cumulative bucket counts, the last being above 5 s.
    pub connect_buckets: [u64; CONNECT_SLOTS],
    pub connect_sum_micros: u64,
    /// Non-cumulative, the last being above a day.
    pub flow_duration_buckets: [u64; FLOW_DURATION_SLOTS],
    pub flow_duration_sum_micros: u64,
    /// Per direction (client to backend, backend to client); non-cumulative.
    pub flow_bytes_buckets: [[u64; FLOW_BYTES_SLOTS]; 2],
    pub flow_bytes_sum: [u64; 2],
}

impl WorkerCounts {
    /// Adds `other` into `self` (wrapping, like the counters themselves).
    pub fn add(&mut self, other: &WorkerCounts) {
        fn sum<const N: usize>(a: &mut [u64; N], b: &[u64; N]) {
            for (x, y) in a.iter_mut().zip(b) {
                *x = x.wrapping_add(*y);
            }
        }
        self.flows_accepted = self.flows_accepted.wrapping_add(other.flows_accepted);
        self.flows_active = self.flows_active.wrapping_add(other.flows_active);
        sum(&mut self.flows_closed, &other.flows_closed);
        self.bytes_client_to_backend = self
            .bytes_client_to_backend
            .wrapping_add(other.bytes_client_to_backend);
        self.bytes_backend_to_client = self
            .bytes_backend_to_client
            .wrapping_add(other.bytes_backend_to_client);
        self.connect_failures = self.connect_failures.wrapping_add(other.connect_failures);
        self.connect_local_errors = self
            .connect_local_errors
            .wrapping_add(other.connect_local_errors);
        self.accept_errors = self.accept_errors.wrapping_add(other.accept_errors);
        self.buffer_ring_exhausted = self
            .buffer_ring_exhausted
            .wrapping_add(other.buffer_ring_exhausted);
        self.buffers_reclaimed = self.buffers_reclaimed.wrapping_add(other.buffers_reclaimed);
        self.flows_handed_off = self.flows_handed_off.wrapping_add(other.flows_handed_off);
        sum(&mut self.slow_turns, &other.slow_turns);
        self.buffers_in_use = self.buffers_in_use.wrapping_add(other.buffers_in_use);
        self.spill_bytes = self.spill_bytes.wrapping_add(other.spill_bytes);
        self.spliced_bytes = self.spliced_bytes.wrapping_add(other.spliced_bytes);
        self.pipes_in_use = self.pipes_in_use.wrapping_add(other.pipes_in_use);
        sum(&mut self.connect_buckets, &other.connect_buckets);
        self.connect_sum_micros = self
            .connect_sum_micros
            .wrapping_add(other.connect_sum_micros);
        sum(
            &mut self.flow_duration_buckets,
            &other.flow_duration_buckets,
        );
        self.flow_duration_sum_micros = self
            .flow_duration_sum_micros
            .wrapping_add(other.flow_duration_sum_micros);
        for direction in 0..2 {
            sum(
                &mut self.flow_bytes_buckets[direction],
                &other.flow_bytes_buckets[direction],
            );
        }
        sum(&mut self.flow_bytes_sum, &other.flow_bytes_sum);
    }

    /// Successful connects observed (the histogram's `_count`).
    pub fn connects(&self) -> u64 {
        self.connect_buckets
            .iter()
            .fold(0u64, |acc, n| acc.wrapping_add(*n))
    }
}

// ---- per backend ---------------------------------------------------------------------------

/// One backend's counters, shared by every worker. Touched at flow start and end, and by each
/// worker's byte flush (a few times a second), never per byte.
#[derive(Debug)]
pub struct BackendStats {
    flows_active: AtomicU64,
    flows_total: AtomicU64,
    connect_failures: AtomicU64,
    bytes_client_to_backend: AtomicU64,
    bytes_backend_to_client: AtomicU64,
    healthy: AtomicBool,
    health_transitions: AtomicU64,
}

impl Default for BackendStats {
    fn default() -> Self {
        Self::new()
    }
}

impl BackendStats {
    /// A backend starts healthy, like the snapshot's health mask.
    pub fn new() -> BackendStats {
        BackendStats {
            flows_active: AtomicU64::new(0),
            flows_total: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            bytes_client_to_backend: AtomicU64::new(0),
            bytes_backend_to_client: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
            health_transitions: AtomicU64::new(0),
        }
    }

    /// A flow's connect to this backend succeeded: it now carries the flow.
    pub fn flow_started(&self) {
        self.flows_active.fetch_add(1, Ordering::Relaxed);
        self.flows_total.fetch_add(1, Ordering::Relaxed);
    }

    /// A flow that [started](Self::flow_started) here was released, having moved these bytes
    /// since they were last [added](Self::add_bytes) (its whole bytes if never).
    pub fn flow_ended(&self, client_to_backend: u64, backend_to_client: u64) {
        // Saturating, so an unpaired call cannot make the gauge read 2^64 - 1.
        let _ = self
            .flows_active
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(1))
            });
        self.add_bytes(client_to_backend, backend_to_client);
    }

    /// Bytes that flows still open here moved (a worker's periodic flush): the byte counters
    /// move while long flows run, not only when they end.
    pub fn add_bytes(&self, client_to_backend: u64, backend_to_client: u64) {
        if client_to_backend > 0 {
            self.bytes_client_to_backend
                .fetch_add(client_to_backend, Ordering::Relaxed);
        }
        if backend_to_client > 0 {
            self.bytes_backend_to_client
                .fetch_add(backend_to_client, Ordering::Relaxed);
        }
    }

    /// One connect attempt to this backend failed or timed out.
    pub fn connect_failed(&self) {
        self.connect_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Records the health-check verdict; returns whether it changed (and counts the transition
    /// if so), so the caller knows when to publish a new snapshot.
    pub fn set_healthy(&self, healthy: bool) -> bool {
        let changed = self.healthy.swap(healthy, Ordering::Relaxed) != healthy;
        if changed {
            self.health_transitions.fetch_add(1, Ordering::Relaxed);
        }
        changed
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn read(&self) -> BackendCounts {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BackendCounts {
            flows_active: load(&self.flows_active),
            flows_total: load(&self.flows_total),
            connect_failures: load(&self.connect_failures),
            bytes_client_to_backend: load(&self.bytes_client_to_backend),
            bytes_backend_to_client: load(&self.bytes_backend_to_client),
            healthy: self.healthy.load(Ordering::Relaxed),
            health_transitions: load(&self.health_transitions),
        }
    }
}

/// Plain copy of one backend's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendCounts {
    pub flows_active: u64,
    pub flows_total: u64,
    pub connect_failures: u64,
    pub bytes_client_to_backend: u64,
    pub bytes_backend_to_client: u64,
    pub healthy: bool,
    pub health_transitions: u64,
}

// ---- Prometheus text exposition ------------------------------------------------------------

/// Writes `HELP` and `TYPE` for one metric family. `name` is the full exported name, written
/// out at every call site (so a grep for a documented name finds the code). `help` must be a
/// single line without backslashes (all ours are literals).
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Writes one sample line. `labels` are (name, unescaped value) pairs; `suffix` is appended to
/// the family name (`_bucket`, `_sum`, `_count` or "").
fn sample(out: &mut String, name: &str, suffix: &str, labels: &[(&str, &str)], value: impl Value) {
    out.push_str(name);
    out.push_str(suffix);
    if !labels.is_empty() {
        out.push('{');
        for (i, (label, text)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(label);
            out.push_str("=\"");
            escape_label_value(text, out);
            out.push('"');
        }
        out.push('}');
    }
    out.push(' ');
    value.write_to(out);
    out.push('\n');
}

/// A sample value: integers as such, seconds as decimals.
trait Value {
    fn write_to(&self, out: &mut String);
}

impl Value for u64 {
    fn write_to(&self, out: &mut String) {
        let _ = write!(out, "{self}");
    }
}

/// Microseconds rendered as seconds, exactly (no float rounding): "1.000250".
struct Seconds(u64);

impl Value for Seconds {
    fn write_to(&self, out: &mut String) {
        let _ = write!(out, "{}.{:06}", self.0 / 1_000_000, self.0 % 1_000_000);
    }
}

/// Label values may hold any UTF-8; the format requires `\`, `"` and newline escaped.
pub fn escape_label_value(text: &str, out: &mut String) {
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Appends an unlabelled counter family; `name` is the full name and should end in `_total`.
pub fn render_counter(out: &mut String, name: &str, help: &str, value: u64) {
    family(out, name, "counter", help);
    sample(out, name, "", &[], value);
}

/// Appends an unlabelled gauge family; `name` is the full name.
pub fn render_gauge(out: &mut String, name: &str, help: &str, value: u64) {
    family(out, name, "gauge", help);
    sample(out, name, "", &[], value);
}

/// Renders every worker and backend counter in the Prometheus text format 0.0.4, appending to
/// `out`. Worker labels are positions in `workers`; backend rows are `(name, stats, backup)`
/// with unique names (the control thread's name-keyed map guarantees it).
pub fn render_prometheus(
    workers: &[Arc<WorkerStats>],
    backends: &[(String, Arc<BackendStats>, bool)],
    out: &mut String,
) {
    let per_worker: Vec<WorkerCounts> = workers.iter().map(|w| w.read()).collect();
    let mut total = WorkerCounts::default();
    for counts in &per_worker {
        total.add(counts);
    }
    let worker_labels: Vec<String> = (0..workers.len()).map(|i| i.to_string()).collect();

    family(
        out,
        "ringway_flows_accepted_total",
        "counter",
        "Client connections accepted as flows, per worker.",
    );
    for (label, counts) in worker_labels.iter().zip(&per_worker) {
        sample(
            out,
            "ringway_flows_accepted_total",
            "",
            &[("worker", label)],
            counts.flows_accepted,
        );
    }
    family(
        out,
        "ringway_flows_active",
        "gauge",
        "Flows open now, per worker.",
    );
    for (label, counts) in worker_labels.iter().zip(&per_worker) {
        sample(
            out,
            "ringway_flows_active",
            "",
            &[("worker", label)],
            counts.flows_active,
        );
    }
    family(
        out,
        "ringway_flows_handed_off_total",
        "counter",
        "Accepted connections passed to a less loaded worker, per worker that accepted them.",
    );
    for (label, counts) in worker_labels.iter().zip(&per_worker) {
        sample(
            out,
            "ringway_flows_handed_off_total",
            "",
            &[("worker", label)],
            counts.flows_handed_off,
        );
    }
    family(
        out,
        "ringway_flows_closed_total",
        "counter",
        "Flows closed and connections refused, by reason.",
    );
    for kind in CloseKind::ALL {
        sample(
            out,
            "ringway_flows_closed_total",
            "",
            &[("reason", kind.as_str())],
            total.flows_closed[kind.index()],
        );
    }
    family(
        out,
        "ringway_bytes_total",
        "counter",
        "Bytes relayed, by direction; open flows' bytes added every 0.5 s.",
    );
    sample(
        out,
        "ringway_bytes_total",
        "",
        &[("direction", "client_to_backend")],
        total.bytes_client_to_backend,
    );
    sample(
        out,
        "ringway_bytes_total",
        "",
        &[("direction", "backend_to_client")],
        total.bytes_backend_to_client,
    );
    render_counter(
        out,
        "ringway_connect_failures_total",
        "Backend connect attempts that failed or timed out.",
        total.connect_failures,
    );
    render_counter(
        out,
        "ringway_connect_local_errors_total",
        "Backend connects that failed for lack of a local port, descriptor or memory.",
        total.connect_local_errors,
    );
    render_counter(
        out,
        "ringway_accept_errors_total",
        "Accept completions that returned an error.",
        total.accept_errors,
    );
    render_counter(
        out,
        "ringway_buffer_ring_exhausted_total",
        "Receives that found the buffer ring empty (ENOBUFS).",
        total.buffer_ring_exhausted,
    );
    render_counter(
        out,
        "ringway_buffer_reclaims_total",
        "Stalled flows asked to give their buffers back because the pool was more than half lent.",
        total.buffers_reclaimed,
    );
    render_gauge(
        out,
        "ringway_buffers_in_use",
        "Relay buffers held by flows now (bytes received, not yet delivered), all workers.",
        total.buffers_in_use,
    );
    render_gauge(
        out,
        "ringway_spill_bytes",
        "Undelivered bytes of stalled flows held off the buffer pool, all workers.",
        total.spill_bytes,
    );
    render_counter(
        out,
        "ringway_spliced_bytes_total",
        "Bytes relayed by splice through kernel pipes (also in the bytes counters), both directions.",
        total.spliced_bytes,
    );
    render_gauge(
        out,
        "ringway_splice_pipes_in_use",
        "Kernel pipes lent to bulk flows now (splice), all workers.",
        total.pipes_in_use,
    );

    let name = "ringway_event_loop_slow_turns_total";
    family(
        out,
        name,
        "counter",
        "Event-loop turns whose handling took longer than `over` seconds (others waited that long).",
    );
    for (&(_, over), &n) in SLOW_TURNS.iter().zip(&total.slow_turns) {
        sample(out, name, "", &[("over", over)], n);
    }

    let name = "ringway_connect_duration_seconds";
    family(
        out,
        name,
        "histogram",
        "Time from submitting a backend connect to its success.",
    );
    let mut cumulative = 0u64;
    for (&(_, le), &n) in CONNECT_BUCKETS.iter().zip(&total.connect_buckets) {
        cumulative = cumulative.wrapping_add(n);
        sample(out, name, "_bucket", &[("le", le)], cumulative);
    }
    let count = total.connects();
    sample(out, name, "_bucket", &[("le", "+Inf")], count);
    sample(out, name, "_sum", &[], Seconds(total.connect_sum_micros));
    sample(out, name, "_count", &[], count);

    let name = "ringway_flow_duration_seconds";
    family(
        out,
        name,
        "histogram",
        "Lifetime of flows that reached a backend, from accept to release.",
    );
    let count = histogram_buckets(
        out,
        name,
        &[],
        &FLOW_DURATION_BUCKETS,
        &total.flow_duration_buckets,
    );
    sample(
        out,
        name,
        "_sum",
        &[],
        Seconds(total.flow_duration_sum_micros),
    );
    sample(out, name, "_count", &[], count);

    let name = "ringway_flow_bytes";
    family(
        out,
        name,
        "histogram",
        "Bytes one flow that reached a backend moved in its life, by direction.",
    );
    for (i, direction) in DIRECTIONS.iter().enumerate() {
        let labels = [("direction", *direction)];
        let count = histogram_buckets(
            out,
            name,
            &labels,
            &FLOW_BYTES_BUCKETS,
            &total.flow_bytes_buckets[i],
        );
        sample(out, name, "_sum", &labels, total.flow_bytes_sum[i]);
        sample(out, name, "_count", &labels, count);
    }

    render_backends(backends, out);
}

/// Writes the cumulative `_bucket` samples (with `labels` plus `le`) of one histogram from its
/// non-cumulative slots (one per bound, then the overflow); returns the count.
fn histogram_buckets(
    out: &mut String,
    name: &str,
    labels: &[(&str, &str)],
    bounds: &[(u64, &str)],
    slots: &[u64],
) -> u64 {
    let mut cumulative = 0u64;
    let mut with_le: Vec<(&str, &str)> = labels.to_vec();
    with_le.push(("le", ""));
    let le = with_le.len() - 1;
    for (i, &n) in slots.iter().enumerate() {
        cumulative = cumulative.wrapping_add(n);
        with_le[le].1 = bounds.get(i).map_or("+Inf", |&(_, text)| text);
        sample(out, name, "_bucket", &with_le, cumulative);
    }
    cumulative
}

fn render_backends(backends: &[(String, Arc<BackendStats>, bool)], out: &mut String) {
    let rows: Vec<(&str, BackendCounts, bool)> = backends
        .iter()
        .map(|(name, stats, backup)| (name.as_str(), stats.read(), *backup))
        .collect();

    family(
        out,
        "ringway_backend_up",
        "gauge",
        "1 if the backend passes health checks and may take new flows.",
    );
    for (name, counts, backup) in &rows {
        let backup = if *backup { "true" } else { "false" };
        sample(
            out,
            "ringway_backend_up",
            "",
            &[("backend", name), ("backup", backup)],
            u64::from(counts.healthy),
        );
    }
    type Field = fn(&BackendCounts) -> u64;
    let simple: [(&str, &str, &str, Field); 4] = [
        (
            "ringway_backend_flows_active",
            "gauge",
            "Flows relayed through the backend now.",
            |c| c.flows_active,
        ),
        (
            "ringway_backend_flows_total",
            "counter",
            "Flows that connected to the backend.",
            |c| c.flows_total,
        ),
        (
            "ringway_backend_connect_failures_total",
            "counter",
            "Connect attempts to the backend that failed or timed out.",
            |c| c.connect_failures,
        ),
        (
            "ringway_backend_health_transitions_total",
            "counter",
            "Changes of the backend's health state.",
            |c| c.health_transitions,
        ),
    ];
    for (metric, kind, help, field) in simple {
        family(out, metric, kind, help);
        for (name, counts, _) in &rows {
            sample(out, metric, "", &[("backend", name)], field(counts));
        }
    }
    family(
        out,
        "ringway_backend_bytes_total",
        "counter",
        "Bytes relayed through the backend, by direction; open flows' bytes added every 0.5 s.",
    );
    for (name, counts, _) in &rows {
        sample(
            out,
            "ringway_backend_bytes_total",
            "",
            &[("backend", name), ("direction", "client_to_backend")],
            counts.bytes_client_to_backend,
        );
        sample(
            out,
            "ringway_backend_bytes_total",
            "",
            &[("backend", name), ("direction", "backend_to_client")],
            counts.bytes_backend_to_client,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// One parsed sample line.
    #[derive(Debug)]
    struct Sample {
        name: String,
        labels: Vec<(String, String)>,
        value: f64,
    }

    impl Sample {
        fn label(&self, key: &str) -> Option<&str> {
            self.labels
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        }
    }

    fn is_metric_name(s: &str) -> bool {
        let mut chars = s.chars();
        matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }

    type Labels = Vec<(String, String)>;

    /// Parses `a="x",b="y"}` (the text after `{`), unescaping values; returns the rest too.
    fn parse_labels(mut s: &str) -> Result<(Labels, &str), String> {
        let mut labels = Vec::new();
        loop {
            if let Some(rest) = s.strip_prefix('}') {
                return Ok((labels, rest));
            }
            if !labels.is_empty() {
                s = s.strip_prefix(',').ok_or(format!("expected , in {s:?}"))?;
            }
            let eq = s.find('=').ok_or("label without =")?;
            let key = &s[..eq];
            if !is_metric_name(key) || key.contains(':') {
                return Err(format!("bad label name {key:?}"));
            }
            s = s[eq + 1..]
                .strip_prefix('"')
                .ok_or("label value not quoted")?;
            let mut value = String::new();
            let mut chars = s.char_indices();
            let end = loop {
                match chars.next() {
                    None => return Err("unterminated label value".into()),
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        Some((_, 'n')) => value.push('\n'),
                        other => return Err(format!("bad escape {other:?}")),
                    },
                    Some((_, '\n')) => return Err("raw newline in label value".into()),
                    Some((_, c)) => value.push(c),
                }
            };
            labels.push((key.to_string(), value));
            s = &s[end + 1..];
        }
    }

    /// A small checker for the text format: comment lines are HELP/TYPE for a family declared
    /// once, every sample belongs to the family declared just above it (with the histogram
    /// suffixes), values are numbers, and series are unique. Returns the samples.
    fn parse_exposition(text: &str) -> Result<Vec<Sample>, String> {
        let mut types: HashMap<String, String> = HashMap::new();
        let mut helps: HashMap<String, String> = HashMap::new();
        let mut current: Option<String> = None;
        let mut samples = Vec::new();
        let mut series = std::collections::HashSet::new();
        if !text.ends_with('\n') {
            return Err("no final newline".into());
        }
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# ") {
                let mut parts = rest.splitn(3, ' ');
                let (kw, name, arg) = (parts.next(), parts.next(), parts.next());
                let (Some(kw), Some(name), Some(arg)) = (kw, name, arg) else {
                    return Err(format!("bad comment {line:?}"));
                };
                if !is_metric_name(name) {
                    return Err(format!("bad name {name:?}"));
                }
                let map = match kw {
                    "HELP" => &mut helps,
                    "TYPE" => {
                        if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&arg) {
                            return Err(format!("bad type {arg:?}"));
                        }
                        &mut types
                    }
                    _ => return Err(format!("bad comment {line:?}")),
                };
                if map.insert(name.to_string(), arg.to_string()).is_some() {
                    return Err(format!("{kw} twice for {name}"));
                }
                current = Some(name.to_string());
                continue;
            }
            if line.is_empty() || line.starts_with('#') {
                return Err(format!("unexpected line {line:?}"));
            }
            let name_end = line.find(['{', ' ']).ok_or(format!("no value: {line:?}"))?;
            let name = &line[..name_end];
            let (labels, rest) = if line[name_end..].starts_with('{') {
                parse_labels(&line[name_end + 1..])?
            } else {
                (Vec::new(), &line[name_end..])
            };
            let value = rest
                .strip_prefix(' ')
                .ok_or(format!("no space before value: {line:?}"))?;
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                "NaN" => f64::NAN,
                v => v.parse().map_err(|_| format!("bad value {v:?}"))?,
            };
            let family = current.as_deref().ok_or("sample before any TYPE")?;
            let kind = types.get(family).ok_or(format!("no TYPE for {family}"))?;
            if !helps.contains_key(family) {
                return Err(format!("no HELP for {family}"));
            }
            let allowed = if kind == "histogram" {
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| name.strip_suffix(s) == Some(family))
            } else {
                name == family
            };
            if !allowed {
                return Err(format!("sample {name} under family {family} ({kind})"));
            }
            let mut key_labels = labels.clone();
            key_labels.sort();
            if !series.insert((name.to_string(), key_labels)) {
                return Err(format!("duplicate series {line:?}"));
            }
            samples.push(Sample {
                name: name.to_string(),
                labels,
                value,
            });
        }
        Ok(samples)
    }

    /// Checks a histogram's buckets are cumulative, ordered and end in +Inf == _count.
    fn check_histogram(samples: &[Sample], family: &str) -> Result<(), String> {
        let bucket = format!("{family}_bucket");
        let buckets: Vec<&Sample> = samples.iter().filter(|s| s.name == bucket).collect();
        let mut last_le = f64::NEG_INFINITY;
        let mut last_count = 0.0;
        for b in &buckets {
            let le = match b.label("le").ok_or("bucket without le")? {
                "+Inf" => f64::INFINITY,
                v => v.parse::<f64>().map_err(|_| format!("bad le {v}"))?,
            };
            if le <= last_le || b.value < last_count {
                return Err(format!("buckets not cumulative at le={le}"));
            }
            last_le = le;
            last_count = b.value;
        }
        if last_le != f64::INFINITY {
            return Err("no +Inf bucket".into());
        }
        let count = samples
            .iter()
            .find(|s| s.name == format!("{family}_count"))
            .ok_or("no _count")?;
        if count.value != last_count {
            return Err("+Inf bucket != _count".into());
        }
        samples
            .iter()
            .find(|s| s.name == format!("{family}_sum"))
            .ok_or("no _sum")?;
        Ok(())
    }

    fn find<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> Option<&'a Sample> {
        samples
            .iter()
            .find(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(*v)))
    }

    fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
        find(samples, name, labels)
            .unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
            .value
    }

    fn busy_worker() -> WorkerStatsWriter {
        let w = WorkerStatsWriter::new();
        for _ in 0..3 {
            w.flow_accepted();
        }
        w.flow_closed(CloseKind::Done);
        w.flow_closed(CloseKind::IdleTimeout);
        w.flow_refused(CloseKind::RefusedAcl);
        w.bytes_client_to_backend(100);
        w.bytes_backend_to_client(1000);
        w.connect_failed();
        w.connect_local_error();
        w.accept_error();
        w.buffer_ring_exhausted();
        w.connected(Duration::from_micros(300)); // le 0.0005
        w.connected(Duration::from_micros(500)); // le 0.0005 (bound is inclusive)
        w.connected(Duration::from_millis(30)); // le 0.05
        w.connected(Duration::from_secs(10)); // +Inf only
        w
    }

    #[test]
    fn rendering_is_valid_and_sums_workers() {
        let a = busy_worker();
        let b = busy_worker();
        b.flow_accepted();
        let idle = WorkerStatsWriter::new();
        let workers = vec![a.stats().clone(), b.stats().clone(), idle.stats().clone()];

        let up = Arc::new(BackendStats::new());
        up.flow_started();
        up.flow_started();
        up.flow_ended(10, 20);
        up.connect_failed();
        let down = Arc::new(BackendStats::new());
        assert!(down.set_healthy(false));
        assert!(!down.set_healthy(false));
        let backends = vec![
            ("10.0.0.1:80".to_string(), up, false),
            ("db.internal:5432".to_string(), down, true),
        ];

        let mut out = String::new();
        render_prometheus(&workers, &backends, &mut out);
        let samples = parse_exposition(&out).unwrap_or_else(|e| panic!("{e}\n{out}"));
        check_histogram(&samples, "ringway_connect_duration_seconds").unwrap();

        let v = |name: &str, labels: &[(&str, &str)]| value(&samples, name, labels);
        assert_eq!(v("ringway_flows_accepted_total", &[("worker", "0")]), 3.0);
        assert_eq!(v("ringway_flows_accepted_total", &[("worker", "1")]), 4.0);
        assert_eq!(v("ringway_flows_accepted_total", &[("worker", "2")]), 0.0);
        assert_eq!(v("ringway_flows_active", &[("worker", "1")]), 2.0);
        assert_eq!(v("ringway_flows_closed_total", &[("reason", "done")]), 2.0);
        assert_eq!(
            v("ringway_flows_closed_total", &[("reason", "refused_acl")]),
            2.0
        );
        assert_eq!(
            v("ringway_flows_closed_total", &[("reason", "client_reset")]),
            0.0
        );
        let reasons = samples
            .iter()
            .filter(|s| s.name == "ringway_flows_closed_total")
            .count();
        assert_eq!(reasons, CloseKind::COUNT);
        assert_eq!(
            v("ringway_bytes_total", &[("direction", "client_to_backend")]),
            200.0
        );
        assert_eq!(
            v("ringway_bytes_total", &[("direction", "backend_to_client")]),
            2000.0
        );
        assert_eq!(v("ringway_connect_failures_total", &[]), 2.0);
        assert_eq!(v("ringway_connect_local_errors_total", &[]), 2.0);
        assert_eq!(v("ringway_accept_errors_total", &[]), 2.0);
        assert_eq!(v("ringway_buffer_ring_exhausted_total", &[]), 2.0);

        let h = "ringway_connect_duration_seconds";
        assert_eq!(v(&format!("{h}_bucket"), &[("le", "0.0005")]), 4.0);
        assert_eq!(v(&format!("{h}_bucket"), &[("le", "0.025")]), 4.0);
        assert_eq!(v(&format!("{h}_bucket"), &[("le", "0.05")]), 6.0);
        assert_eq!(v(&format!("{h}_bucket"), &[("le", "5")]), 6.0);
        assert_eq!(v(&format!("{h}_bucket"), &[("le", "+Inf")]), 8.0);
        assert_eq!(v(&format!("{h}_count"), &[]), 8.0);
        // 2 x (0.0003 + 0.0005 + 0.03 + 10) s
        assert!((v(&format!("{h}_sum"), &[]) - 20.0616).abs() < 1e-9);

        let up = [("backend", "10.0.0.1:80")];
        assert_eq!(
            v(
                "ringway_backend_up",
                &[("backend", "10.0.0.1:80"), ("backup", "false")]
            ),
            1.0
        );
        assert_eq!(
            v(
                "ringway_backend_up",
                &[("backend", "db.internal:5432"), ("backup", "true")]
            ),
            0.0
        );
        assert_eq!(v("ringway_backend_flows_active", &up), 1.0);
        assert_eq!(v("ringway_backend_flows_total", &up), 2.0);
        assert_eq!(v("ringway_backend_connect_failures_total", &up), 1.0);
        assert_eq!(
            v(
                "ringway_backend_bytes_total",
                &[
                    ("backend", "10.0.0.1:80"),
                    ("direction", "backend_to_client")
                ]
            ),
            20.0
        );
        assert_eq!(
            v(
                "ringway_backend_health_transitions_total",
                &[("backend", "db.internal:5432")]
            ),
            1.0
        );
    }

    #[test]
    fn flow_histograms_sum_workers_and_split_directions() {
        let a = WorkerStatsWriter::new();
        let b = WorkerStatsWriter::new();
        a.flow_relayed(Duration::from_micros(800), 100, 0); // le 0.001; 256 / 256
        a.flow_relayed(Duration::from_secs(2), 5_000, 70_000); // le 5; 16384 / 262144
        b.flow_relayed(Duration::from_secs(90_000), 1 << 40, 1); // +Inf; +Inf / 256
        let workers = vec![a.stats().clone(), b.stats().clone()];
        let mut out = String::new();
        render_prometheus(&workers, &[], &mut out);
        let samples = parse_exposition(&out).unwrap_or_else(|e| panic!("{e}\n{out}"));
        check_histogram(&samples, "ringway_flow_duration_seconds").unwrap();
        let v = |name: &str, labels: &[(&str, &str)]| value(&samples, name, labels);

        let d = "ringway_flow_duration_seconds";
        assert_eq!(v(&format!("{d}_bucket"), &[("le", "0.001")]), 1.0);
        assert_eq!(v(&format!("{d}_bucket"), &[("le", "1")]), 1.0);
        assert_eq!(v(&format!("{d}_bucket"), &[("le", "5")]), 2.0);
        assert_eq!(v(&format!("{d}_bucket"), &[("le", "86400")]), 2.0);
        assert_eq!(v(&format!("{d}_bucket"), &[("le", "+Inf")]), 3.0);
        assert_eq!(v(&format!("{d}_count"), &[]), 3.0);
        assert!((v(&format!("{d}_sum"), &[]) - 90_002.000_8).abs() < 1e-6);

        let f = "ringway_flow_bytes";
        let up = ("direction", "client_to_backend");
        let down = ("direction", "backend_to_client");
        assert_eq!(v(&format!("{f}_bucket"), &[up, ("le", "256")]), 1.0);
        assert_eq!(v(&format!("{f}_bucket"), &[up, ("le", "16384")]), 2.0);
        assert_eq!(v(&format!("{f}_bucket"), &[up, ("le", "17179869184")]), 2.0);
        assert_eq!(v(&format!("{f}_bucket"), &[up, ("le", "+Inf")]), 3.0);
        assert_eq!(v(&format!("{f}_bucket"), &[down, ("le", "256")]), 2.0);
        assert_eq!(v(&format!("{f}_bucket"), &[down, ("le", "65536")]), 2.0);
        assert_eq!(v(&format!("{f}_bucket"), &[down, ("le", "262144")]), 3.0);
        assert_eq!(v(&format!("{f}_count"), &[up]), 3.0);
        assert_eq!(v(&format!("{f}_count"), &[down]), 3.0);
        assert_eq!(v(&format!("{f}_sum"), &[up]), (5_100 + (1u64 << 40)) as f64);
        assert_eq!(v(&format!("{f}_sum"), &[down]), 70_001.0);
        // Each direction's buckets are cumulative and end in +Inf == _count.
        for direction in DIRECTIONS {
            let own: Vec<Sample> = samples
                .iter()
                .filter(|s| s.name.starts_with(f) && s.label("direction") == Some(direction))
                .map(|s| Sample {
                    name: s.name.clone(),
                    labels: s.labels.clone(),
                    value: s.value,
                })
                .collect();
            check_histogram(&own, f).unwrap();
        }
    }

    #[test]
    fn backend_bytes_added_live_and_at_end_sum_once() {
        let b = BackendStats::new();
        b.flow_started();
        b.add_bytes(10, 0);
        b.add_bytes(5, 7);
        assert_eq!(b.read().bytes_client_to_backend, 15);
        assert_eq!(b.read().flows_active, 1);
        b.flow_ended(1, 2);
        let counts = b.read();
        assert_eq!(
            (
                counts.bytes_client_to_backend,
                counts.bytes_backend_to_client
            ),
            (16, 9)
        );
        assert_eq!(counts.flows_active, 0);
    }

    #[test]
    fn empty_input_renders_valid_families() {
        let mut out = String::new();
        render_prometheus(&[], &[], &mut out);
        let samples = parse_exposition(&out).unwrap_or_else(|e| panic!("{e}\n{out}"));
        check_histogram(&samples, "ringway_connect_duration_seconds").unwrap();
        assert_eq!(
            value(&samples, "ringway_connect_duration_seconds_count", &[]),
            0.0
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let mut escaped = String::new();
        escape_label_value("a\\b\"c\nd", &mut escaped);
        assert_eq!(escaped, r#"a\\b\"c\nd"#);

        let weird = "we\"ird\\name\nx";
        let backends = vec![(weird.to_string(), Arc::new(BackendStats::new()), false)];
        let mut out = String::new();
        render_prometheus(&[], &backends, &mut out);
        let samples = parse_exposition(&out).unwrap_or_else(|e| panic!("{e}\n{out}"));
        assert_eq!(
            value(
                &samples,
                "ringway_backend_flows_total",
                &[("backend", weird)]
            ),
            0.0
        );
    }

    #[test]
    fn extra_families_append_validly() {
        let mut out = String::new();
        render_prometheus(&[], &[], &mut out);
        render_counter(
            &mut out,
            "ringway_access_log_dropped_total",
            "Records dropped.",
            7,
        );
        render_gauge(&mut out, "ringway_config_generation", "Reloads applied.", 2);
        let samples = parse_exposition(&out).unwrap_or_else(|e| panic!("{e}\n{out}"));
        assert_eq!(
            value(&samples, "ringway_access_log_dropped_total", &[]),
            7.0
        );
    }

    #[test]
    fn checker_rejects_bad_text() {
        for bad in [
            "ringway_x 1\n",                                             // no TYPE
            "# HELP ringway_x h\n# TYPE ringway_x gauge\nringway_y 1\n", // wrong family
            "# HELP ringway_x h\n# TYPE ringway_x gauge\nringway_x{a=\"b} 1\n",
            "# HELP ringway_x h\n# TYPE ringway_x gauge\nringway_x one\n",
            "# HELP ringway_x h\n# TYPE ringway_x gauge\nringway_x 1\nringway_x 2\n",
        ] {
            assert!(parse_exposition(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn gauges_saturate_on_unpaired_close() {
        let w = WorkerStatsWriter::new();
        w.flow_closed(CloseKind::Error);
        assert_eq!(w.stats().read().flows_active, 0);
        let b = BackendStats::new();
        b.flow_ended(1, 2);
        assert_eq!(b.read().flows_active, 0);
    }

    #[test]
    fn close_kinds_round_trip() {
        for (i, kind) in CloseKind::ALL.iter().enumerate() {
            assert_eq!(kind.index(), i);
            assert_eq!(kind.is_refusal(), kind.as_str().starts_with("refused_"));
        }
        assert_eq!(CloseKind::from(CloseReason::Error(5)), CloseKind::Error);
        assert_eq!(
            CloseKind::from(CloseReason::IdleTimeout).as_str(),
            "idle_timeout"
        );
    }

    #[test]
    fn worker_stats_do_not_share_cache_lines() {
        assert_eq!(std::mem::align_of::<WorkerStats>() % 128, 0);
    }

    #[test]
    fn connect_buckets_are_inclusive_and_overflow() {
        assert_eq!(connect_slot(0), 0);
        assert_eq!(connect_slot(500), 0);
        assert_eq!(connect_slot(501), 1);
        assert_eq!(connect_slot(5_000_000), CONNECT_BUCKETS.len() - 1);
        assert_eq!(connect_slot(u64::MAX), CONNECT_BUCKETS.len());
        assert_eq!(duration_micros(Duration::MAX), u64::MAX);
    }
}
