//! One flow's life as a pure state machine: accept -> connect -> relay both ways -> half-close
//! -> close.
//!
//! The worker feeds it completions (`on_*` methods) and carries out the [`Op`]s it returns; the
//! flow never touches a socket, so every transition is tested in memory below.
//!
//! Before connecting, a flow from a trusted load balancer may first read its PROXY protocol
//! header (`Phase::Greeting`); after connecting, a flow may first send a *preface* to the backend
//! (our own PROXY header and any client bytes that arrived with the one we read) before the
//! client's recv is armed, so nothing can overtake it.
//!
//! A flow is two pipes: client -> backend ("upload") and backend -> client ("download"). Each pipe
//! has at most one single-shot recv on its source socket, which takes one buffer from the
//! worker's buffer ring, a queue of filled buffers, and at most one send in flight to the
//! destination socket (two sends on one socket may reorder bytes). A recv is armed only while
//! the pipe holds fewer buffers than its budget, and each recv takes at most one buffer, so the
//! budget holds exactly whatever the timing (a multishot recv keeps filling buffers until its
//! cancel lands, which let slow readers pin many more than the budget).
//!
//! The budget is `max_queued` buffers while the worker's pool is roomy and one buffer when it is
//! *tight* (more than half lent out). When the pool is tight, a pipe whose destination stops
//! taking bytes (a partial send, or a send the worker reclaims after a tick without progress)
//! moves its undelivered bytes into a heap *spill* of exactly their size and gives its pool
//! buffers back, and reads nothing more until the spill is delivered: a stalled reader then
//! holds no pool buffer at all, and TCP flow control pushes back on its sender. So stalled flows
//! cannot starve the others of buffers, however many there are.
//!
//! EOF on the source becomes shutdown(SHUT_WR) on the destination once the pipe is empty. A
//! flow is released only when no operation on its sockets is in flight, so a completion can never
//! land on a reused slot or a closed descriptor. Closing cancels each operation in flight by its
//! own token (the kernel finds it by hash, O(1)), never by descriptor (a scan of every request
//! in the ring, which made closing many flows at once quadratic).

use std::collections::VecDeque;

mod splice;
use splice::{Splice, SpliceMode, FULL_RECVS_TO_SPLICE};

/// Index of a buffer in the worker's provided-buffer ring.
pub type BufId = u16;

/// Most bytes one recv takes while the pool is tight: a pipe whose destination then stalls
/// strands at most about this much in its spill.
pub const TIGHT_RECV_BYTES: u32 = 16 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Backend,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::Client => Side::Backend,
            Side::Backend => Side::Client,
        }
    }

    /// Index (0 or 1) of the pipe that reads from this side, for per-pipe state kept outside.
    pub fn pipe_index(self) -> usize {
        self.pipe()
    }

    /// The pipe that reads from this side.
    fn pipe(self) -> usize {
        match self {
            Side::Client => UPLOAD,
            Side::Backend => DOWNLOAD,
        }
    }
}

const UPLOAD: usize = 0; // client -> backend
const DOWNLOAD: usize = 1; // backend -> client

/// Where the bytes of a chunk live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Data {
    /// A buffer of the worker's buffer ring.
    Buffer(BufId),
    /// The pipe's heap spill (see the module docs), held by the worker per flow and pipe.
    Spill,
}

/// An operation that can be in flight on a flow's sockets, named so it can be cancelled alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Recv(Side),
    Send(Side),
    Connect,
    HeaderRecv,
    Preface,
    /// A readiness poll of a splicing pipe: POLLIN on its source, POLLOUT on its destination.
    PollIn(Side),
    PollOut(Side),
}

/// What the worker must do for this flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Read (more of) the client's PROXY protocol header, with a linked timeout, then call
    /// `on_header_submitted`; the completion goes to `on_header_read`.
    ReadHeader,
    /// Send `len` bytes of the flow's preface from `offset` to the backend.
    SendPreface { offset: u32, len: u32 },
    /// Close the socket of a failed attempt (if any), pick the next untried backend, open a socket
    /// and submit a connect with a linked timeout, then call `on_connect_submitted`.
    Connect,
    /// Arm a single-shot recv on `from`'s socket that takes one buffer from the ring.
    /// `poll_first`: the last recv emptied the socket, so wait for data before trying.
    /// `small`: the pool is tight, read at most `TIGHT_RECV_BYTES` (what a stalled destination
    /// may strand off the pool stays small).
    Recv {
        from: Side,
        poll_first: bool,
        small: bool,
    },
    /// Send bytes `offset..offset + len` of `data` to `to`.
    Send {
        to: Side,
        data: Data,
        offset: u32,
        len: u32,
    },
    /// shutdown(SHUT_WR) on this side's socket.
    Shutdown(Side),
    /// Give a buffer back to the ring.
    ReturnBuffer(BufId),
    /// Append `len` bytes of buffer `buf` from `offset` to the spill of the pipe reading `from`
    /// (a `ReturnBuffer` of that buffer follows).
    Spill {
        from: Side,
        buf: BufId,
        offset: u32,
        len: u32,
    },
    /// The spill of the pipe reading `from` was delivered: free it.
    DropSpill(Side),
    /// Cancel this operation (by its token); the cancel completes via `on_cancel_done`.
    Cancel(Target),
    /// The buffer ring ran dry: call `on_buffers_available` when buffers come back.
    WaitForBuffers,
    /// Nothing is in flight any more: close both sockets (with an RST where asked) and free the slot.
    Release(Ending),
    /// The pipe reading `from` proved bulk: lend it a kernel pipe from the worker's pool and
    /// answer at once with `on_pipe` (see "Splice" in the module docs).
    TakePipe(Side),
    /// splice(2) at most `len` bytes from `from`'s socket into its kernel pipe, now, without
    /// blocking; the result goes to `on_spliced_in` at once.
    SpliceIn { from: Side, len: u32 },
    /// splice(2) at most `len` bytes from the kernel pipe of the pipe reading `from` to the
    /// other side's socket, now, without blocking; the result goes to `on_spliced_out` at once.
    SpliceOut { from: Side, len: u32 },
    /// One-shot POLLIN on `from`'s socket (a splicing source had nothing to read); the
    /// completion goes to `on_poll_in`.
    PollIn(Side),
    /// One-shot POLLOUT on `to`'s socket (a splicing destination took only part); the
    /// completion goes to `on_poll_out`.
    PollOut(Side),
    /// Read every byte out of the kernel pipe of the pipe reading `from` onto the end of its
    /// spill (leaving splice with bytes in the pipe: a handover, a splice error), now; the
    /// count goes to `on_pipe_drained`.
    DrainPipe(Side),
    /// Give the kernel pipe of the pipe reading `from` back to the pool; `empty`: no byte is
    /// left in it (otherwise it is closed).
    ReturnPipe { from: Side, empty: bool },
}

/// How a flow ended: for logs and counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// Both directions finished with EOF.
    Done,
    ClientReset,
    BackendReset,
    IdleTimeout,
    /// Every connect attempt failed or timed out.
    ConnectFailed,
    /// No usable backend to try.
    NoBackend,
    /// The process is stopping (or the flow's backend was removed and its drain time is over).
    Shutdown,
    /// An unexpected error from the kernel, with its errno.
    Error(i32),
    /// The client's address is not allowed (`--allow`/`--deny`).
    Denied,
    /// The client already has `--max-conns-per-source` flows.
    SourceLimit,
    /// A PROXY protocol header that is missing, malformed, too slow, or from an untrusted peer.
    BadProxyHeader,
}

impl CloseReason {
    /// Ringway itself cut the flow (a timeout or a deadline), not a peer: a relaying flow cut
    /// this way may have bytes still undelivered.
    fn cut_by_proxy(self) -> bool {
        matches!(
            self,
            CloseReason::IdleTimeout | CloseReason::Shutdown | CloseReason::Error(_)
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ending {
    pub reason: CloseReason,
    /// Close the client socket with an RST (SO_LINGER 0) instead of a FIN.
    pub reset_client: bool,
    pub reset_backend: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Reading the client's PROXY protocol header.
    Greeting,
    Connecting,
    Relaying,
    Closing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RecvState {
    /// Not armed: before connect, while the pipe is full, or after the ring ran dry.
    Off,
    Armed,
    /// The source sent EOF; nothing more will be read.
    Eof,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ShutdownState {
    NotYet,
    InFlight,
    Done,
}

/// Bytes `offset..len` of `data` are still to be sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Chunk {
    data: Data,
    len: u32,
    offset: u32,
}

impl Chunk {
    fn buffer(&self) -> Option<BufId> {
        match self.data {
            Data::Buffer(buf) => Some(buf),
            Data::Spill => None,
        }
    }
}

#[derive(Debug)]
struct Pipe {
    recv: RecvState,
    /// The recv ended with ENOBUFS; re-arm when buffers come back.
    starved: bool,
    /// The last recv left more bytes in the source socket: the next one can read at once.
    source_nonempty: bool,
    /// Filled buffers (and the spill, always first) waiting to be sent, oldest first.
    queue: VecDeque<Chunk>,
    /// The chunk whose send is in flight.
    sending: Option<Chunk>,
    /// The send in flight is being cancelled to take its buffer back (`reclaim`).
    reclaiming: bool,
    /// Bytes appended to the spill since it was created; 0 when there is none.
    spill_len: u32,
    shutdown: ShutdownState,
    /// Bytes delivered to the destination.
    bytes: u64,
    /// Receives in a row that filled a whole buffer (the sign of a bulk direction).
    full_recvs: u8,
}

impl Pipe {
    fn new() -> Pipe {
        Pipe {
            recv: RecvState::Off,
            starved: false,
            source_nonempty: true,
            queue: VecDeque::new(),
            sending: None,
            reclaiming: false,
            spill_len: 0,
            shutdown: ShutdownState::NotYet,
            bytes: 0,
            full_recvs: 0,
        }
    }

    /// Nothing buffered is left to deliver and nothing is being received into buffers: a
    /// direction holding a kernel pipe may move bytes by splice.
    fn buffered_empty(&self) -> bool {
        self.recv != RecvState::Armed
            && self.sending.is_none()
            && self.queue.is_empty()
            && self.spill_len == 0
    }

    /// Ring buffers this pipe holds (queued or being sent).
    fn buffers_held(&self) -> usize {
        self.queue.iter().filter(|c| c.buffer().is_some()).count()
            + usize::from(self.sending.and_then(|c| c.buffer()).is_some())
    }

    fn ops_in_flight(&self) -> u32 {
        u32::from(self.recv == RecvState::Armed)
            + u32::from(self.sending.is_some())
            + u32::from(self.shutdown == ShutdownState::InFlight)
    }
}

/// Tunables that shape every flow of a worker.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connect attempts after the first one (at most `config::MAX_RETRIES`). Narrow types keep
    /// `Limits`, copied into every flow, small (see worker/slot.rs).
    pub retries: u8,
    /// Buffers a pipe may hold while the pool is roomy (one when it is tight).
    pub max_queued: u8,
    /// Read a PROXY protocol header from the client before anything else.
    pub read_header: bool,
    /// A recv of at least this many `SPLICE_UNIT`s (the buffer size, rounded down) fills its
    /// buffer and counts towards switching its direction to splice; 0: splice is off. Units
    /// rather than bytes keep `Limits`, copied into every flow, small (worker/slot.rs); the
    /// pipe's byte budget comes with the pipe (`on_pipe`).
    pub splice_after_units: u16,
}

/// The unit of `Limits::splice_after_units`: buffers are at most 1 MiB (32,768 units).
pub const SPLICE_UNIT: u32 = 32;

impl Limits {
    /// `splice_after_units` for buffers of `buffer_size` bytes, or 0 when splice is off.
    pub fn splice_after(buffer_size: u32, splice: bool) -> u16 {
        if !splice {
            return 0;
        }
        u16::try_from((buffer_size / SPLICE_UNIT).max(1)).unwrap_or(u16::MAX)
    }
}

#[derive(Debug)]
pub struct Flow {
    phase: Phase,
    pipes: [Pipe; 2],
    limits: Limits,
    connect_attempts: u8,
    connect_in_flight: bool,
    /// Linked timeouts complete separately from their connect, possibly after a retry started.
    link_timeouts_in_flight: u8,
    /// Cancels submitted (closing or reclaiming), not yet completed.
    cancels_in_flight: u8,
    header_in_flight: bool,
    /// Bytes to send to the backend before any relayed client byte.
    preface_len: u32,
    preface_sent: u32,
    preface_in_flight: bool,
    ending: Option<Ending>,
    released: bool,
    /// Being handed to a successor process (see `quiesce`): no recv is armed and no send
    /// started; what is in flight is cancelled.
    quiescing: bool,
    /// Splice state of both directions, by pipe; made when a direction first asks for a pipe.
    splice: Option<Box<[Splice; 2]>>,
}

impl Flow {
    pub fn new(limits: Limits) -> Flow {
        Flow {
            phase: if limits.read_header {
                Phase::Greeting
            } else {
                Phase::Connecting
            },
            pipes: [Pipe::new(), Pipe::new()],
            limits,
            connect_attempts: 0,
            connect_in_flight: false,
            link_timeouts_in_flight: 0,
            cancels_in_flight: 0,
            header_in_flight: false,
            preface_len: 0,
            preface_sent: 0,
            preface_in_flight: false,
            ending: None,
            released: false,
            quiescing: false,
            splice: None,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Bytes delivered client -> backend and backend -> client.
    pub fn bytes(&self) -> (u64, u64) {
        (self.pipes[UPLOAD].bytes, self.pipes[DOWNLOAD].bytes)
    }

    pub fn connect_attempts(&self) -> u32 {
        u32::from(self.connect_attempts)
    }

    /// Ring buffers the flow holds, both directions.
    pub fn buffers_held(&self) -> usize {
        self.pipes.iter().map(Pipe::buffers_held).sum()
    }

    /// The accepted flow starts by reading the PROXY header or by connecting to a backend.
    pub fn start(&mut self, ops: &mut Vec<Op>) {
        if self.phase == Phase::Greeting {
            ops.push(Op::ReadHeader);
        } else {
            ops.push(Op::Connect);
        }
    }

    /// The worker submitted a header read and its linked timeout.
    pub fn on_header_submitted(&mut self) {
        self.header_in_flight = true;
        self.link_timeouts_in_flight += 1;
    }

    /// A header read completed. Returns whether the worker should look at the bytes: false when
    /// the read failed (the flow is then closing) or the flow was already closing.
    pub fn on_header_read(&mut self, res: i32, ops: &mut Vec<Op>) -> bool {
        self.header_in_flight = false;
        if self.phase != Phase::Greeting {
            self.release_if_idle(ops);
            return false;
        }
        if res <= 0 {
            // EOF, reset or the timeout (ECANCELED) before a whole header arrived.
            self.abort(CloseReason::BadProxyHeader, ops);
            return false;
        }
        true
    }

    /// The header is not complete yet: read more.
    pub fn header_incomplete(&mut self, ops: &mut Vec<Op>) {
        if self.phase == Phase::Greeting {
            ops.push(Op::ReadHeader);
        }
    }

    /// The header is complete (and the client it names is allowed): connect.
    pub fn header_done(&mut self, ops: &mut Vec<Op>) {
        if self.phase == Phase::Greeting {
            self.phase = Phase::Connecting;
            ops.push(Op::Connect);
        }
    }

    /// Bytes the worker holds that must reach the backend before any relayed client byte.
    pub fn set_preface(&mut self, len: u32) {
        self.preface_len = len;
        self.preface_sent = 0;
    }

    /// A preface send completed.
    pub fn on_preface_sent(&mut self, res: i32, ops: &mut Vec<Op>) {
        self.preface_in_flight = false;
        if self.phase == Phase::Closing {
            self.release_if_idle(ops);
            return;
        }
        if res == -libc::ECANCELED {
            // Cancelled by `quiesce`: the rest of the preface is still to send (now, if the
            // flow was resumed meanwhile).
            self.send_preface_or_start_upload(ops);
            return;
        }
        if res <= 0 {
            self.abort_reset(Side::Backend, ops);
            return;
        }
        self.preface_sent = (self.preface_sent + res as u32).min(self.preface_len);
        self.pipes[UPLOAD].bytes += res as u64;
        self.send_preface_or_start_upload(ops);
    }

    fn send_preface_or_start_upload(&mut self, ops: &mut Vec<Op>) {
        if self.quiescing {
            return;
        }
        if self.preface_sent < self.preface_len {
            self.preface_in_flight = true;
            ops.push(Op::SendPreface {
                offset: self.preface_sent,
                len: self.preface_len - self.preface_sent,
            });
        } else {
            self.arm_recv(Side::Client, false, ops);
        }
    }

    /// The worker submitted a connect and its linked timeout.
    pub fn on_connect_submitted(&mut self) {
        self.connect_attempts = self.connect_attempts.saturating_add(1);
        self.connect_in_flight = true;
        self.link_timeouts_in_flight += 1;
    }

    /// The connect completed: `res` is 0 or a negative errno (-ECANCELED when the linked timeout
    /// fired first).
    pub fn on_connect(&mut self, res: i32, ops: &mut Vec<Op>) {
        self.connect_in_flight = false;
        if self.phase == Phase::Closing {
            self.release_if_idle(ops);
            return;
        }
        if res >= 0 {
            self.phase = Phase::Relaying;
            // Nothing can have come from a backend that just accepted: wait for data first.
            self.pipes[DOWNLOAD].source_nonempty = false;
            self.arm_recv(Side::Backend, false, ops);
            self.send_preface_or_start_upload(ops);
        } else if self.connect_attempts <= self.limits.retries {
            ops.push(Op::Connect);
        } else {
            self.abort(CloseReason::ConnectFailed, ops);
        }
    }

    /// A connect's linked timeout completed (fired or was cancelled).
    pub fn on_link_timeout(&mut self, ops: &mut Vec<Op>) {
        self.link_timeouts_in_flight = self.link_timeouts_in_flight.saturating_sub(1);
        self.release_if_idle(ops);
    }

    /// The recv on `from` completed: `res` bytes in `buf` (res > 0), EOF (res == 0) or a negative
    /// errno. `nonempty`: the kernel says more bytes are waiting in the socket. `tight`: the
    /// worker's buffer pool is more than half lent out.
    pub fn on_recv(
        &mut self,
        from: Side,
        res: i32,
        buf: Option<BufId>,
        nonempty: bool,
        tight: bool,
        ops: &mut Vec<Op>,
    ) {
        let limits = self.limits;
        let pipe = &mut self.pipes[from.pipe()];
        if pipe.recv == RecvState::Armed {
            pipe.recv = RecvState::Off;
        }
        pipe.source_nonempty = nonempty;
        if self.phase == Phase::Closing {
            if let Some(buf) = buf {
                ops.push(Op::ReturnBuffer(buf));
            }
            self.release_if_idle(ops);
            return;
        }
        match (res, buf) {
            (len, Some(buf)) if len > 0 => {
                let mode = self
                    .splice
                    .as_deref()
                    .map_or(SpliceMode::Off, |s| s[from.pipe()].mode);
                let full = u32::from(limits.splice_after_units) * SPLICE_UNIT;
                if full > 0 && mode == SpliceMode::Off {
                    // A direction proves bulk by filling whole buffers; small messages never
                    // do, so request/response traffic stays on the buffered path.
                    if len as u32 >= full && !tight {
                        pipe.full_recvs = pipe.full_recvs.saturating_add(1);
                    } else {
                        pipe.full_recvs = 0;
                    }
                    if pipe.full_recvs >= FULL_RECVS_TO_SPLICE {
                        self.splice.get_or_insert_with(Default::default)[from.pipe()].mode =
                            SpliceMode::Asked;
                        ops.push(Op::TakePipe(from));
                    }
                }
                let chunk = Chunk {
                    data: Data::Buffer(buf),
                    len: len as u32,
                    offset: 0,
                };
                if pipe.sending.is_none() && pipe.queue.is_empty() {
                    // The usual case (request/response, idle flows): straight to the send, so
                    // the queue never allocates and an idle flow keeps no heap memory.
                    Self::start_send(pipe, from, chunk, ops);
                } else {
                    pipe.queue.push_back(chunk);
                    self.pump(from, ops);
                }
                self.rearm_if_room(from, tight, ops);
            }
            (0, buf) => {
                if let Some(buf) = buf {
                    ops.push(Op::ReturnBuffer(buf));
                }
                pipe.recv = RecvState::Eof;
                self.pump(from, ops);
            }
            (len, buf) if len > 0 => {
                // Data without a buffer cannot happen with buffer select; treat it as a kernel error.
                debug_assert!(buf.is_none());
                self.abort(CloseReason::Error(libc::EINVAL), ops);
            }
            (err, buf) => {
                if let Some(buf) = buf {
                    ops.push(Op::ReturnBuffer(buf));
                }
                match -err {
                    libc::ENOBUFS => {
                        pipe.starved = true;
                        ops.push(Op::WaitForBuffers);
                    }
                    libc::EINTR | libc::EAGAIN => self.rearm_if_room(from, tight, ops),
                    // Cancelled by `quiesce` (only closing and quiescing cancel a recv): nothing
                    // was read. Re-armed if the flow was resumed meanwhile.
                    libc::ECANCELED => self.rearm_if_room(from, tight, ops),
                    libc::ECONNRESET | libc::EPIPE | libc::ETIMEDOUT | libc::EHOSTUNREACH => {
                        self.abort_reset(from, ops)
                    }
                    errno => self.abort(CloseReason::Error(errno), ops),
                }
            }
        }
    }

    /// A send to `to` completed with `res` bytes sent or a negative errno. `tight` as in
    /// `on_recv`: a destination that took only part of a send is full, and when the pool is
    /// tight the pipe's bytes move to its spill.
    pub fn on_send(&mut self, to: Side, res: i32, tight: bool, ops: &mut Vec<Op>) {
        let from = to.other();
        let pipe = &mut self.pipes[from.pipe()];
        let Some(mut chunk) = pipe.sending.take() else {
            return; // not ours: cannot happen while tokens carry generations
        };
        let reclaimed = std::mem::take(&mut pipe.reclaiming);
        if self.phase == Phase::Closing {
            if let Some(buf) = chunk.buffer() {
                ops.push(Op::ReturnBuffer(buf));
            }
            self.release_if_idle(ops);
            return;
        }
        if !reclaimed && res == -libc::ECANCELED {
            // Cancelled by `quiesce` before a byte went out: still the oldest bytes to send
            // (sent now if the flow was resumed meanwhile).
            pipe.queue.push_front(chunk);
            self.pump(from, ops);
            return;
        }
        if reclaimed && res == -libc::ECANCELED {
            // Taken back before a byte went out: the whole chunk moves to the spill.
            pipe.queue.push_front(chunk);
            self.spill(from, ops);
            self.pump(from, ops);
            return;
        }
        if res <= 0 {
            if let Some(buf) = chunk.buffer() {
                ops.push(Op::ReturnBuffer(buf));
            }
            match -res {
                // A send of 0 bytes would loop forever; the peer is gone.
                0 | libc::EPIPE | libc::ECONNRESET | libc::ETIMEDOUT | libc::EHOSTUNREACH => {
                    self.abort_reset(to, ops)
                }
                errno => self.abort(CloseReason::Error(errno), ops),
            }
            return;
        }
        let sent = (res as u32).min(chunk.len - chunk.offset);
        pipe.bytes += u64::from(sent);
        chunk.offset += sent;
        if chunk.offset < chunk.len {
            pipe.queue.push_front(chunk); // partial send: the rest goes first
            if tight || reclaimed {
                self.spill(from, ops);
            }
        } else {
            match chunk.data {
                Data::Buffer(buf) => ops.push(Op::ReturnBuffer(buf)),
                Data::Spill => {
                    pipe.spill_len = 0;
                    ops.push(Op::DropSpill(from));
                }
            }
        }
        self.pump(from, ops);
        self.rearm_if_room(from, tight, ops);
    }

    /// The pool is tight and this flow made no progress for a while: take back the ring buffers
    /// its stalled sends hold (cancel them; `on_send` then moves their bytes to the spill).
    /// Returns whether anything was asked.
    pub fn reclaim(&mut self, ops: &mut Vec<Op>) -> bool {
        if self.phase != Phase::Relaying || self.quiescing {
            return false;
        }
        let mut asked = false;
        for from in [Side::Client, Side::Backend] {
            let pipe = &mut self.pipes[from.pipe()];
            let holds_buffer = pipe.sending.and_then(|c| c.buffer()).is_some();
            if holds_buffer && !pipe.reclaiming {
                pipe.reclaiming = true;
                self.cancels_in_flight += 1;
                ops.push(Op::Cancel(Target::Send(from.other())));
                asked = true;
            }
        }
        asked
    }

    /// Moves every queued byte of the pipe reading `from` (nothing may be sending) into its
    /// spill, in order, and gives the ring buffers back.
    fn spill(&mut self, from: Side, ops: &mut Vec<Op>) {
        let pipe = &mut self.pipes[from.pipe()];
        debug_assert!(pipe.sending.is_none());
        let start = match pipe.queue.front() {
            Some(Chunk {
                data: Data::Spill,
                offset,
                ..
            }) => *offset,
            _ => pipe.spill_len,
        };
        let mut moved = false;
        for chunk in pipe.queue.drain(..) {
            if let Data::Buffer(buf) = chunk.data {
                let len = chunk.len - chunk.offset;
                ops.push(Op::Spill {
                    from,
                    buf,
                    offset: chunk.offset,
                    len,
                });
                ops.push(Op::ReturnBuffer(buf));
                pipe.spill_len += len;
            }
            moved = true;
        }
        if moved {
            pipe.queue.push_back(Chunk {
                data: Data::Spill,
                offset: start,
                len: pipe.spill_len,
            });
        }
    }

    /// shutdown(SHUT_WR) on `side` completed.
    pub fn on_shutdown(&mut self, side: Side, _res: i32, ops: &mut Vec<Op>) {
        // A failed shutdown means the socket is already dead; the other pipe will see it.
        self.pipes[side.other().pipe()].shutdown = ShutdownState::Done;
        if self.phase == Phase::Closing {
            self.release_if_idle(ops);
            return;
        }
        if self.pipes.iter().all(|p| p.shutdown == ShutdownState::Done) {
            self.finish(
                Ending {
                    reason: CloseReason::Done,
                    reset_client: false,
                    reset_backend: false,
                },
                ops,
            );
        }
    }

    /// A cancel (closing or reclaiming) completed, whatever its result.
    pub fn on_cancel_done(&mut self, ops: &mut Vec<Op>) {
        self.cancels_in_flight = self.cancels_in_flight.saturating_sub(1);
        self.release_if_idle(ops);
    }

    /// Buffers came back to the ring: re-arm recvs that had stopped for lack of them.
    pub fn on_buffers_available(&mut self, tight: bool, ops: &mut Vec<Op>) {
        for side in [Side::Client, Side::Backend] {
            let pipe = &mut self.pipes[side.pipe()];
            if pipe.starved {
                pipe.starved = false;
                self.rearm_if_room(side, tight, ops);
            }
        }
    }

    /// Is this flow waiting for buffers?
    pub fn is_starved(&self) -> bool {
        self.pipes.iter().any(|p| p.starved)
    }

    /// Close the flow now (timeout, no backend, process stopping): cancel what is in flight and
    /// release when it has all completed. A relaying flow cut this way ends with an RST both
    /// ways, so neither peer mistakes a truncated stream for a complete one.
    pub fn abort(&mut self, reason: CloseReason, ops: &mut Vec<Op>) {
        let cut = self.phase == Phase::Relaying && reason.cut_by_proxy();
        self.finish(
            Ending {
                reason,
                reset_client: cut,
                reset_backend: cut,
            },
            ops,
        );
    }

    /// `side` reset its connection (or broke it): pass the reset on to the other side.
    fn abort_reset(&mut self, side: Side, ops: &mut Vec<Op>) {
        let (reason, reset_client, reset_backend) = match side {
            Side::Client => (CloseReason::ClientReset, false, true),
            Side::Backend => (CloseReason::BackendReset, true, false),
        };
        self.finish(
            Ending {
                reason,
                reset_client,
                reset_backend,
            },
            ops,
        );
    }

    fn finish(&mut self, ending: Ending, ops: &mut Vec<Op>) {
        if self.phase == Phase::Closing {
            return;
        }
        self.phase = Phase::Closing;
        self.ending = Some(ending);
        for from in [Side::Client, Side::Backend] {
            let pipe = &mut self.pipes[from.pipe()];
            for chunk in pipe.queue.drain(..) {
                if let Some(buf) = chunk.buffer() {
                    ops.push(Op::ReturnBuffer(buf));
                }
            }
            pipe.starved = false;
            let mut targets = Vec::new();
            self.relay_ops_in_flight(from, &mut targets);
            self.cancel(&targets, ops);
        }
        let mut targets = Vec::new();
        if self.connect_in_flight {
            targets.push(Target::Connect);
        }
        if self.header_in_flight {
            targets.push(Target::HeaderRecv);
        }
        if self.preface_in_flight {
            targets.push(Target::Preface);
        }
        self.cancel(&targets, ops);
        self.release_if_idle(ops);
    }

    fn cancel(&mut self, targets: &[Target], ops: &mut Vec<Op>) {
        for &target in targets {
            self.cancels_in_flight += 1;
            ops.push(Op::Cancel(target));
        }
    }

    fn ops_in_flight(&self) -> u32 {
        self.pipes.iter().map(Pipe::ops_in_flight).sum::<u32>()
            + self
                .splice
                .as_deref()
                .map_or(0, |s| s.iter().map(Splice::ops_in_flight).sum::<u32>())
            + u32::from(self.connect_in_flight)
            + u32::from(self.header_in_flight)
            + u32::from(self.preface_in_flight)
            + u32::from(self.link_timeouts_in_flight)
            + u32::from(self.cancels_in_flight)
    }

    fn release_if_idle(&mut self, ops: &mut Vec<Op>) {
        if self.phase == Phase::Closing && !self.released && self.ops_in_flight() == 0 {
            self.released = true;
            let ending = self.ending.unwrap_or(Ending {
                reason: CloseReason::Shutdown,
                reset_client: false,
                reset_backend: false,
            });
            for from in [Side::Client, Side::Backend] {
                if self.pipes[from.pipe()].spill_len > 0 {
                    self.pipes[from.pipe()].spill_len = 0;
                    ops.push(Op::DropSpill(from));
                }
                self.return_pipe(from, ops);
            }
            ops.push(Op::Release(ending));
        }
    }

    fn arm_recv(&mut self, side: Side, tight: bool, ops: &mut Vec<Op>) {
        if self.quiescing {
            return;
        }
        let pipe = &mut self.pipes[side.pipe()];
        pipe.recv = RecvState::Armed;
        ops.push(Op::Recv {
            from: side,
            poll_first: !pipe.source_nonempty,
            small: tight,
        });
    }

    /// Arm the recv on `from` if it is off, nothing blocks it, and the pipe holds fewer buffers
    /// than its budget (`max_queued`, or one while the pool is tight), with no spill waiting.
    fn rearm_if_room(&mut self, from: Side, tight: bool, ops: &mut Vec<Op>) {
        if matches!(self.splice_mode(from), SpliceMode::Asked | SpliceMode::On) {
            // A splicing direction never receives into buffers again.
            self.drive_splice(from, ops);
            return;
        }
        let pipe = &self.pipes[from.pipe()];
        let budget = if tight {
            1
        } else {
            usize::from(self.limits.max_queued)
        };
        if self.phase == Phase::Relaying
            && pipe.recv == RecvState::Off
            && !pipe.starved
            && pipe.spill_len == 0
            && pipe.buffers_held() < budget
        {
            self.arm_recv(from, tight, ops);
        }
    }

    fn start_send(pipe: &mut Pipe, from: Side, chunk: Chunk, ops: &mut Vec<Op>) {
        pipe.sending = Some(chunk);
        ops.push(Op::Send {
            to: from.other(),
            data: chunk.data,
            offset: chunk.offset,
            len: chunk.len - chunk.offset,
        });
    }

    /// Start the next send of the pipe reading `from`, or the shutdown after its EOF.
    fn pump(&mut self, from: Side, ops: &mut Vec<Op>) {
        let pipe = &mut self.pipes[from.pipe()];
        if pipe.sending.is_some() || self.quiescing {
            return;
        }
        if let Some(chunk) = pipe.queue.pop_front() {
            Self::start_send(pipe, from, chunk, ops);
        } else if pipe.recv == RecvState::Eof
            && pipe.shutdown == ShutdownState::NotYet
            && self
                .splice
                .as_deref()
                .is_none_or(|s| s[from.pipe()].in_pipe == 0 && s[from.pipe()].ops_in_flight() == 0)
        {
            pipe.shutdown = ShutdownState::InFlight;
            ops.push(Op::Shutdown(from.other()));
        }
    }
}
/// One direction of a quiesced flow, for the handover (`Flow::export`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PipeExport {
    /// The source sent EOF.
    pub eof: bool,
    /// The destination's shutdown(SHUT_WR) has completed.
    pub shutdown_done: bool,
    /// Bytes read and not yet written, oldest first: `(data, offset, len)`.
    pub pending: Vec<(Data, u32, u32)>,
}

/// The state an adopted flow starts from (handed over by the previous process).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdoptedPipe {
    pub eof: bool,
    pub shutdown_done: bool,
    /// Bytes waiting in the pipe's spill, written before anything is read.
    pub pending: u32,
    /// Bytes delivered so far, for counters.
    pub bytes: u64,
}

/// Handing a flow to another process: quiesce it, describe it, then either let it go or take
/// it back. Adopting one from the previous process.
impl Flow {
    /// The relay operations of the pipe reading `from` that are in the kernel now (its recv,
    /// the send of its bytes, its splice polls): what closing or quiescing must cancel.
    fn relay_ops_in_flight(&self, from: Side, targets: &mut Vec<Target>) {
        let pipe = &self.pipes[from.pipe()];
        if pipe.recv == RecvState::Armed {
            targets.push(Target::Recv(from));
        }
        if pipe.sending.is_some() && !pipe.reclaiming {
            targets.push(Target::Send(from.other()));
        }
        if let Some(splice) = self.splice.as_deref() {
            let splice = &splice[from.pipe()];
            if splice.poll_in {
                targets.push(Target::PollIn(from));
            }
            if splice.poll_out {
                targets.push(Target::PollOut(from.other()));
            }
        }
    }

    /// Bytes of the pipe reading `from` waiting in its kernel pipe.
    fn splice_in_pipe(&self, from: Side) -> u32 {
        self.splice.as_deref().map_or(0, |s| s[from.pipe()].in_pipe)
    }

    /// Stops moving bytes so the flow can be handed over: armed recvs and sends (and a preface
    /// send) in flight are cancelled, and none is started again until `resume`. A flow still
    /// reading a PROXY header or connecting carries on until it relays, then stops there.
    /// A cancelled send either completed (its bytes count as sent) or sent nothing.
    pub fn quiesce(&mut self, ops: &mut Vec<Op>) {
        if self.quiescing || self.phase == Phase::Closing {
            return;
        }
        self.quiescing = true;
        if self.phase != Phase::Relaying {
            return;
        }
        let mut targets = Vec::new();
        for from in [Side::Client, Side::Backend] {
            self.relay_ops_in_flight(from, &mut targets);
            if self.splice_in_pipe(from) > 0 {
                // Bytes in a kernel pipe cannot be handed over: they move to the spill now
                // (polls in flight do not touch the pipe), and are exported with it.
                ops.push(Op::DrainPipe(from));
            }
        }
        if self.preface_in_flight {
            targets.push(Target::Preface);
        }
        self.cancel(&targets, ops);
    }

    /// Quiesced and relaying with nothing in flight: ready to be handed over.
    pub fn is_quiesced(&self) -> bool {
        self.quiescing && self.phase == Phase::Relaying && self.ops_in_flight() == 0
    }

    /// The preface bytes not sent yet (`offset..len` of the worker's preface).
    pub fn preface_left(&self) -> (u32, u32) {
        (self.preface_sent, self.preface_len)
    }

    /// What a quiesced flow holds, upload (client -> backend) first. The flow is unchanged, so
    /// it can still `resume` if the handover fails.
    pub fn export(&self) -> [PipeExport; 2] {
        [UPLOAD, DOWNLOAD].map(|i| {
            let pipe = &self.pipes[i];
            PipeExport {
                eof: pipe.recv == RecvState::Eof,
                shutdown_done: pipe.shutdown == ShutdownState::Done,
                pending: pipe
                    .queue
                    .iter()
                    .map(|c| (c.data, c.offset, c.len - c.offset))
                    .collect(),
            }
        })
    }

    /// The successor owns the flow now: give back the buffers and spills this process held
    /// for it. Nothing may be in flight (`is_quiesced`).
    pub fn hand_off(&mut self, ops: &mut Vec<Op>) {
        self.released = true;
        self.phase = Phase::Closing;
        for from in [Side::Client, Side::Backend] {
            let pipe = &mut self.pipes[from.pipe()];
            for chunk in pipe.queue.drain(..) {
                if let Some(buf) = chunk.buffer() {
                    ops.push(Op::ReturnBuffer(buf));
                }
            }
            if pipe.spill_len > 0 {
                pipe.spill_len = 0;
                ops.push(Op::DropSpill(from));
            }
            self.return_pipe(from, ops);
        }
    }

    /// Moves bytes again after `quiesce` (the handover failed), or for the first time in this
    /// process (an adopted flow): queued bytes first, then receives.
    pub fn resume(&mut self, tight: bool, ops: &mut Vec<Op>) {
        if !std::mem::take(&mut self.quiescing) || self.phase != Phase::Relaying {
            return;
        }
        self.pump(Side::Backend, ops);
        self.rearm_if_room(Side::Backend, tight, ops);
        self.pump(Side::Client, ops);
        if self.preface_sent < self.preface_len {
            self.send_preface_or_start_upload(ops);
        } else {
            self.rearm_if_room(Side::Client, tight, ops);
        }
    }

    /// A relaying flow handed over by the previous process; its pending bytes are in the
    /// worker's spills. Call `resume` to start it.
    pub fn adopt(limits: Limits, pipes: [AdoptedPipe; 2]) -> Flow {
        let mut flow = Flow::new(limits);
        flow.phase = Phase::Relaying;
        flow.quiescing = true;
        for (pipe, adopted) in flow.pipes.iter_mut().zip(pipes) {
            if adopted.eof {
                pipe.recv = RecvState::Eof;
            }
            if adopted.shutdown_done {
                pipe.shutdown = ShutdownState::Done;
            }
            pipe.bytes = adopted.bytes;
            if adopted.pending > 0 {
                pipe.spill_len = adopted.pending;
                pipe.queue.push_back(Chunk {
                    data: Data::Spill,
                    offset: 0,
                    len: adopted.pending,
                });
            }
        }
        flow
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Side::{Backend, Client};

    const LIMITS: Limits = Limits {
        retries: 1,
        max_queued: 4,
        read_header: false,
        splice_after_units: 0,
    };

    fn take(ops: &mut Vec<Op>) -> Vec<Op> {
        std::mem::take(ops)
    }

    fn send(to: Side, buf: BufId, offset: u32, len: u32) -> Op {
        Op::Send {
            to,
            data: Data::Buffer(buf),
            offset,
            len,
        }
    }

    /// The recv armed after `data` (which says the socket was emptied, so it polls first).
    fn recv(from: Side) -> Op {
        Op::Recv {
            from,
            poll_first: true,
            small: false,
        }
    }

    /// Data arrived on `from` into `buf`, the pool roomy.
    fn data(f: &mut Flow, from: Side, len: i32, buf: BufId, ops: &mut Vec<Op>) {
        f.on_recv(from, len, Some(buf), false, false, ops);
    }

    /// A recv ended without data (EOF, error, cancel).
    fn ended(f: &mut Flow, from: Side, res: i32, ops: &mut Vec<Op>) {
        f.on_recv(from, res, None, false, false, ops);
    }

    /// A flow that has connected and armed both recvs.
    fn relaying() -> (Flow, Vec<Op>) {
        let mut f = Flow::new(LIMITS);
        let mut ops = Vec::new();
        f.start(&mut ops);
        assert_eq!(take(&mut ops), [Op::Connect]);
        f.on_connect_submitted();
        f.on_connect(0, &mut ops);
        assert_eq!(
            take(&mut ops),
            [
                Op::Recv {
                    from: Backend,
                    poll_first: true,
                    small: false
                },
                Op::Recv {
                    from: Client,
                    poll_first: false,
                    small: false
                }
            ]
        );
        f.on_link_timeout(&mut ops);
        assert!(ops.is_empty());
        assert_eq!(f.phase(), Phase::Relaying);
        (f, ops)
    }

    fn released(ops: &[Op]) -> Option<Ending> {
        ops.iter().find_map(|op| match op {
            Op::Release(e) => Some(*e),
            _ => None,
        })
    }

    fn count(ops: &[Op], pred: impl Fn(&Op) -> bool) -> usize {
        ops.iter().filter(|op| pred(op)).count()
    }

    #[test]
    fn relays_one_buffer_each_way_and_rearms_each_recv() {
        let (mut f, mut ops) = relaying();
        data(&mut f, Client, 100, 7, &mut ops);
        assert_eq!(take(&mut ops), [send(Backend, 7, 0, 100), recv(Client)]);
        f.on_send(Backend, 100, false, &mut ops);
        assert_eq!(take(&mut ops), [Op::ReturnBuffer(7)]);
        data(&mut f, Backend, 5, 8, &mut ops);
        assert_eq!(take(&mut ops), [send(Client, 8, 0, 5), recv(Backend)]);
        f.on_send(Client, 5, false, &mut ops);
        assert_eq!(take(&mut ops), [Op::ReturnBuffer(8)]);
        assert_eq!(f.bytes(), (100, 5));
    }

    #[test]
    fn a_recv_that_emptied_the_socket_polls_first() {
        let (mut f, mut ops) = relaying();
        f.on_recv(Client, 10, Some(1), false, false, &mut ops);
        assert!(take(&mut ops).contains(&Op::Recv {
            from: Client,
            poll_first: true,
            small: false
        }));
        f.on_send(Backend, 10, false, &mut ops);
        take(&mut ops);
        f.on_recv(Client, 10, Some(2), true, false, &mut ops);
        assert!(take(&mut ops).contains(&Op::Recv {
            from: Client,
            poll_first: false,
            small: false
        }));
    }

    #[test]
    fn one_send_in_flight_per_direction_in_order() {
        let (mut f, mut ops) = relaying();
        data(&mut f, Client, 10, 1, &mut ops);
        data(&mut f, Client, 20, 2, &mut ops);
        data(&mut f, Client, 30, 3, &mut ops);
        let got = take(&mut ops);
        assert_eq!(got[0], send(Backend, 1, 0, 10));
        assert_eq!(count(&got, |op| matches!(op, Op::Send { .. })), 1);
        f.on_send(Backend, 10, false, &mut ops);
        assert_eq!(
            take(&mut ops)[..2],
            [Op::ReturnBuffer(1), send(Backend, 2, 0, 20)]
        );
        f.on_send(Backend, 20, false, &mut ops);
        assert_eq!(
            take(&mut ops)[..2],
            [Op::ReturnBuffer(2), send(Backend, 3, 0, 30)]
        );
    }

    #[test]
    fn partial_send_resends_the_rest() {
        let (mut f, mut ops) = relaying();
        data(&mut f, Backend, 1000, 4, &mut ops);
        take(&mut ops);
        f.on_send(Client, 300, false, &mut ops);
        assert_eq!(take(&mut ops), [send(Client, 4, 300, 700)]);
        f.on_send(Client, 700, false, &mut ops);
        assert_eq!(take(&mut ops)[0], Op::ReturnBuffer(4));
        assert_eq!(f.bytes(), (0, 1000));
    }

    #[test]
    fn a_pipe_never_holds_more_than_its_budget() {
        let (mut f, mut ops) = relaying();
        // The reader is slow: nothing completes the first send.
        for buf in 0..4 {
            data(&mut f, Backend, 100, buf, &mut ops);
        }
        let got = take(&mut ops);
        assert_eq!(
            count(&got, |op| matches!(op, Op::Recv { from: Backend, .. })),
            3,
            "the fourth buffer fills the budget: no recv armed after it"
        );
        assert_eq!(f.buffers_held(), 4);
        // The first send completes: the pipe is below budget again and reads one more.
        f.on_send(Client, 100, false, &mut ops);
        let got = take(&mut ops);
        assert_eq!(got[..2], [Op::ReturnBuffer(0), send(Client, 1, 0, 100)]);
        assert_eq!(count(&got, |op| *op == recv(Backend)), 1);
    }

    #[test]
    fn a_tight_pool_gives_each_pipe_one_buffer() {
        let (mut f, mut ops) = relaying();
        f.on_recv(Backend, 100, Some(1), false, true, &mut ops);
        assert_eq!(
            take(&mut ops),
            [send(Client, 1, 0, 100)],
            "holding one buffer, the pipe reads no more while the pool is tight"
        );
        f.on_send(Client, 100, true, &mut ops);
        assert_eq!(
            take(&mut ops),
            [
                Op::ReturnBuffer(1),
                Op::Recv {
                    from: Backend,
                    poll_first: true,
                    small: true
                }
            ]
        );
    }

    #[test]
    fn a_partial_send_in_a_tight_pool_moves_the_rest_to_the_spill() {
        let (mut f, mut ops) = relaying();
        data(&mut f, Backend, 1000, 4, &mut ops);
        data(&mut f, Backend, 500, 5, &mut ops);
        take(&mut ops);
        f.on_send(Client, 300, true, &mut ops);
        assert_eq!(
            take(&mut ops),
            [
                Op::Spill {
                    from: Backend,
                    buf: 4,
                    offset: 300,
                    len: 700
                },
                Op::ReturnBuffer(4),
                Op::Spill {
                    from: Backend,
                    buf: 5,
                    offset: 0,
                    len: 500
                },
                Op::ReturnBuffer(5),
                Op::Send {
                    to: Client,
                    data: Data::Spill,
                    offset: 0,
                    len: 1200
                },
            ]
        );
        assert_eq!(f.buffers_held(), 0, "a stalled reader holds no ring buffer");
        // Partly delivered, then the rest: the spill is freed and reading resumes.
        f.on_send(Client, 200, true, &mut ops);
        assert_eq!(
            take(&mut ops),
            [Op::Send {
                to: Client,
                data: Data::Spill,
                offset: 200,
                len: 1000
            }]
        );
        f.on_send(Client, 1000, true, &mut ops);
        assert_eq!(
            take(&mut ops),
            [Op::DropSpill(Backend)],
            "the recv armed before the spill is still in flight: no second one"
        );
        assert_eq!(f.bytes(), (0, 1500));
        // That recv's data goes out, and only then is the pipe read again.
        f.on_recv(Backend, 10, Some(6), false, true, &mut ops);
        assert_eq!(take(&mut ops), [send(Client, 6, 0, 10)]);
        f.on_send(Client, 10, true, &mut ops);
        assert_eq!(
            take(&mut ops),
            [
                Op::ReturnBuffer(6),
                Op::Recv {
                    from: Backend,
                    poll_first: true,
                    small: true
                }
            ]
        );
    }

    #[test]
    fn a_recv_in_flight_when_spilling_joins_the_spill_in_order() {
        let (mut f, mut ops) = relaying();
        data(&mut f, Backend, 100, 1, &mut ops); // send of 1 in flight, recv re-armed
        take(&mut ops);
        f.on_send(Client, 40, true, &mut ops); // spill 60 bytes of buffer 1
        take(&mut ops);
        f.on_recv(Backend, 50, Some(2), false, true, &mut ops); // the recv armed before
        assert!(take(&mut ops).is_empty(), "queued behind the spill's send");
        f.on_send(Client, 10, true, &mut ops); // the spill is still stuck: buffer 2 joins it
        assert_eq!(
            take(&mut ops),
            [
                Op::Spill {
                    from: Backend,
                    buf: 2,
                    offset: 0,
                    len: 50
                },
                Op::ReturnBuffer(2),
                Op::Send {
                    to: Client,
                    data: Data::Spill,
                    offset: 10,
                    len: 100
                },
            ]
        );
        f.on_send(Client, 100, true, &mut ops);
        assert_eq!(take(&mut ops)[0], Op::DropSpill(Backend));
        assert_eq!(f.bytes(), (0, 150));
    }

    #[test]
    fn reclaim_cancels_a_stalled_send_and_spills_its_bytes() {
        let (mut f, mut ops) = relaying();
        data(&mut f, Backend, 800, 3, &mut ops);
        take(&mut ops);
        assert!(f.reclaim(&mut ops));
        assert_eq!(take(&mut ops), [Op::Cancel(Target::Send(Client))]);
        assert!(!f.reclaim(&mut ops), "one reclaim at a time");
        f.on_send(Client, -libc::ECANCELED, true, &mut ops);
        assert_eq!(
            take(&mut ops),
            [
                Op::Spill {
                    from: Backend,
                    buf: 3,
                    offset: 0,
                    len: 800
                },
                Op::ReturnBuffer(3),
                Op::Send {
                    to: Client,
                    data: Data::Spill,
                    offset: 0,
                    len: 800
                },
            ]
        );
        f.on_cancel_done(&mut ops);
        assert!(ops.is_empty());
        assert_eq!(f.phase(), Phase::Relaying, "a reclaim is not an error");
    }

    #[test]
    fn a_reclaim_that_loses_the_race_to_the_send_changes_nothing() {
        let (mut f, mut ops) = relaying();
        data(&mut f, Backend, 800, 3, &mut ops);
        take(&mut ops);
        f.reclaim(&mut ops);
        take(&mut ops);
        f.on_send(Client, 800, false, &mut ops);
        assert_eq!(take(&mut ops)[0], Op::ReturnBuffer(3));
        f.on_cancel_done(&mut ops);
        assert!(ops.is_empty());
        assert_eq!(f.bytes(), (0, 800));
    }

    /// Random interleavings of completions, sizes and pool states: the budget always holds,
    /// every byte arrives once and in order, and the flow ends cleanly.
    #[test]
    fn random_schedules_keep_the_budget_and_the_byte_order() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..300 {
            let (mut f, mut ops) = relaying();
            ops.clear();
            // Model of one direction (backend -> client): the kernel side.
            let total: u32 = 200_000;
            let mut produced = 0u32; // bytes handed to recvs
            let mut delivered = Vec::new(); // (stream offset, len) in delivery order
            let mut recv_armed = true;
            let mut in_flight: Option<(Data, u32, u32)> = None;
            let mut buffers: std::collections::HashMap<BufId, (u32, u32)> = Default::default();
            let mut spill: Vec<(u32, u32)> = Vec::new(); // stream ranges appended to the spill
            let mut next_buf: BufId = 0;
            let mut eof = false;
            let mut steps = 0;
            loop {
                steps += 1;
                assert!(steps < 100_000, "no progress");
                let tight = next(3) == 0;
                let mut events = take(&mut ops);
                // Carry out the flow's ops against the model.
                let mut i = 0;
                while i < events.len() {
                    match events[i] {
                        Op::Recv { from: Backend, .. } => {
                            assert!(!recv_armed, "two recvs in flight on one pipe");
                            recv_armed = true;
                        }
                        Op::Send {
                            to: Client,
                            data,
                            offset,
                            len,
                        } => {
                            assert!(in_flight.is_none(), "two sends in flight on one socket");
                            in_flight = Some((data, offset, len));
                        }
                        Op::Spill {
                            buf, offset, len, ..
                        } => {
                            let (start, blen) = buffers[&buf];
                            assert!(offset + len <= blen);
                            spill.push((start + offset, len));
                        }
                        Op::DropSpill(Backend) => spill.clear(),
                        Op::ReturnBuffer(buf) => {
                            buffers.remove(&buf).expect("returned twice");
                        }
                        Op::Shutdown(Client) => {
                            f.on_shutdown(Client, 0, &mut ops);
                            events.extend(take(&mut ops));
                        }
                        Op::Release(_) => {}
                        _ => {}
                    }
                    i += 1;
                }
                assert!(
                    f.pipes[DOWNLOAD].buffers_held() <= usize::from(LIMITS.max_queued),
                    "budget exceeded"
                );
                assert_eq!(buffers.len(), f.pipes[DOWNLOAD].buffers_held());
                if eof && in_flight.is_none() && f.pipes[DOWNLOAD].shutdown == ShutdownState::Done {
                    break;
                }
                // Pick a kernel event.
                match next(4) {
                    0 | 1 if recv_armed && !eof => {
                        recv_armed = false;
                        if produced == total {
                            eof = true;
                            f.on_recv(Backend, 0, None, false, tight, &mut ops);
                        } else {
                            let len = (1 + next(5000) as u32).min(total - produced);
                            let buf = next_buf;
                            next_buf = next_buf.wrapping_add(1);
                            buffers.insert(buf, (produced, len));
                            produced += len;
                            f.on_recv(
                                Backend,
                                len as i32,
                                Some(buf),
                                next(2) == 0,
                                tight,
                                &mut ops,
                            );
                        }
                    }
                    2 if in_flight.is_some() && f.pipes[DOWNLOAD].sending.is_some() => {
                        let (data, offset, len) = in_flight.take().unwrap();
                        let sent = if next(2) == 0 {
                            len
                        } else {
                            next(len as u64) as u32 + 1
                        };
                        let start = match data {
                            Data::Buffer(buf) => buffers[&buf].0 + offset,
                            Data::Spill => {
                                // Map spill offset to stream offset through the appended ranges.
                                let mut at = offset;
                                let mut found = None;
                                for &(s, l) in &spill {
                                    if at < l {
                                        found = Some(s + at);
                                        break;
                                    }
                                    at -= l;
                                }
                                found.expect("spill offset inside the spill")
                            }
                        };
                        delivered.push((start, sent));
                        f.on_send(Client, sent as i32, tight, &mut ops);
                    }
                    // A reclaim (which asks only while a ring buffer is being sent).
                    3 if in_flight.is_some() && f.reclaim(&mut ops) => {
                        let reclaimed = take(&mut ops);
                        assert!(reclaimed.contains(&Op::Cancel(Target::Send(Client))));
                        // The cancel wins half the time; otherwise the send completes later.
                        if next(2) == 0 {
                            in_flight = None;
                            f.on_send(Client, -libc::ECANCELED, tight, &mut ops);
                        }
                        let more = take(&mut ops);
                        f.on_cancel_done(&mut ops);
                        ops.splice(0..0, more);
                    }
                    _ => {} // that event cannot happen now: pick another
                }
            }
            // Every byte exactly once, in order, and the sum matches.
            let mut expect = 0;
            for (start, len) in delivered {
                assert_eq!(start, expect, "bytes out of order or repeated");
                expect += len;
            }
            assert_eq!(expect, total);
            assert_eq!(f.bytes().1, u64::from(total));
        }
    }

    #[test]
    fn client_eof_becomes_backend_shutdown_after_buffered_bytes() {
        let (mut f, mut ops) = relaying();
        data(&mut f, Client, 10, 1, &mut ops);
        take(&mut ops);
        ended(&mut f, Client, 0, &mut ops);
        assert!(ops.is_empty(), "the shutdown waits for the buffered bytes");
        f.on_send(Backend, 10, false, &mut ops);
        assert_eq!(take(&mut ops), [Op::ReturnBuffer(1), Op::Shutdown(Backend)]);
        f.on_shutdown(Backend, 0, &mut ops);
        assert!(ops.is_empty());
        // The other direction keeps flowing after the half-close.
        data(&mut f, Backend, 3, 2, &mut ops);
        assert_eq!(take(&mut ops), [send(Client, 2, 0, 3), recv(Backend)]);
        f.on_send(Client, 3, false, &mut ops);
        take(&mut ops);
        ended(&mut f, Backend, 0, &mut ops);
        assert_eq!(take(&mut ops), [Op::Shutdown(Client)]);
        f.on_shutdown(Client, 0, &mut ops);
        assert_eq!(
            released(&take(&mut ops)),
            Some(Ending {
                reason: CloseReason::Done,
                reset_client: false,
                reset_backend: false
            })
        );
        assert_eq!(f.bytes(), (10, 3));
    }

    #[test]
    fn backend_reset_resets_client_after_all_ops_complete() {
        let (mut f, mut ops) = relaying();
        data(&mut f, Client, 10, 1, &mut ops);
        data(&mut f, Client, 10, 2, &mut ops);
        take(&mut ops);
        ended(&mut f, Backend, -libc::ECONNRESET, &mut ops);
        // Queued buffer 2 goes back now; buffer 1 is still being sent by the kernel. Each
        // operation in flight is cancelled by its own token.
        assert_eq!(
            take(&mut ops),
            [
                Op::ReturnBuffer(2),
                Op::Cancel(Target::Recv(Client)),
                Op::Cancel(Target::Send(Backend)),
            ]
        );
        assert_eq!(f.phase(), Phase::Closing);
        f.on_cancel_done(&mut ops);
        f.on_cancel_done(&mut ops);
        assert!(ops.is_empty());
        ended(&mut f, Client, -libc::ECANCELED, &mut ops);
        assert!(ops.is_empty());
        f.on_send(Backend, -libc::ECANCELED, false, &mut ops);
        let got = take(&mut ops);
        assert_eq!(got[0], Op::ReturnBuffer(1));
        assert_eq!(
            released(&got),
            Some(Ending {
                reason: CloseReason::BackendReset,
                reset_client: true,
                reset_backend: false
            })
        );
    }

    #[test]
    fn client_reset_resets_backend() {
        let (mut f, mut ops) = relaying();
        ended(&mut f, Client, -libc::ECONNRESET, &mut ops);
        assert_eq!(take(&mut ops), [Op::Cancel(Target::Recv(Backend))]);
        f.on_cancel_done(&mut ops);
        ended(&mut f, Backend, -libc::ECANCELED, &mut ops);
        assert_eq!(
            released(&take(&mut ops)),
            Some(Ending {
                reason: CloseReason::ClientReset,
                reset_client: false,
                reset_backend: true
            })
        );
    }

    #[test]
    fn send_to_a_dead_peer_resets_the_other_side() {
        let (mut f, mut ops) = relaying();
        data(&mut f, Backend, 10, 1, &mut ops);
        take(&mut ops);
        f.on_send(Client, -libc::EPIPE, false, &mut ops);
        let got = take(&mut ops);
        assert_eq!(got[0], Op::ReturnBuffer(1));
        assert_eq!(count(&got, |op| matches!(op, Op::Cancel(_))), 2);
        f.on_cancel_done(&mut ops);
        f.on_cancel_done(&mut ops);
        ended(&mut f, Client, -libc::ECANCELED, &mut ops);
        ended(&mut f, Backend, -libc::ECANCELED, &mut ops);
        let e = released(&take(&mut ops)).unwrap();
        assert_eq!(
            (e.reason, e.reset_backend),
            (CloseReason::ClientReset, true)
        );
    }

    #[test]
    fn zero_byte_send_is_not_retried_forever() {
        let (mut f, mut ops) = relaying();
        data(&mut f, Client, 10, 1, &mut ops);
        take(&mut ops);
        f.on_send(Backend, 0, false, &mut ops);
        assert_eq!(f.phase(), Phase::Closing);
        assert!(!take(&mut ops)
            .iter()
            .any(|op| matches!(op, Op::Send { .. })));
    }

    #[test]
    fn connect_failure_retries_then_gives_up() {
        let mut f = Flow::new(LIMITS);
        let mut ops = Vec::new();
        f.start(&mut ops);
        take(&mut ops);
        f.on_connect_submitted();
        f.on_connect(-libc::ECONNREFUSED, &mut ops);
        assert_eq!(take(&mut ops), [Op::Connect], "one retry allowed");
        f.on_connect_submitted();
        // The first attempt's linked timeout completes late; nothing happens.
        f.on_link_timeout(&mut ops);
        assert!(ops.is_empty());
        f.on_connect(-libc::ECANCELED, &mut ops); // the second attempt timed out
        assert!(
            ops.is_empty(),
            "release waits for the second linked timeout"
        );
        f.on_link_timeout(&mut ops);
        assert_eq!(
            released(&take(&mut ops)),
            Some(Ending {
                reason: CloseReason::ConnectFailed,
                reset_client: false,
                reset_backend: false
            })
        );
        assert_eq!(f.connect_attempts(), 2);
    }

    #[test]
    fn abort_while_connecting_cancels_the_connect() {
        let mut f = Flow::new(LIMITS);
        let mut ops = Vec::new();
        f.start(&mut ops);
        take(&mut ops);
        f.on_connect_submitted();
        f.abort(CloseReason::Shutdown, &mut ops);
        assert_eq!(take(&mut ops), [Op::Cancel(Target::Connect)]);
        f.on_cancel_done(&mut ops);
        f.on_connect(-libc::ECANCELED, &mut ops);
        assert!(ops.is_empty());
        f.on_link_timeout(&mut ops);
        let e = released(&take(&mut ops)).unwrap();
        assert_eq!(e.reason, CloseReason::Shutdown);
        assert!(
            !e.reset_client,
            "nothing was relayed yet: a plain close is the truth"
        );
    }

    #[test]
    fn no_backend_releases_at_once() {
        let mut f = Flow::new(LIMITS);
        let mut ops = Vec::new();
        f.start(&mut ops);
        take(&mut ops);
        f.abort(CloseReason::NoBackend, &mut ops);
        assert_eq!(
            released(&take(&mut ops)).unwrap().reason,
            CloseReason::NoBackend
        );
    }

    #[test]
    fn a_relaying_flow_cut_by_a_timeout_or_deadline_resets_both_sides() {
        for reason in [CloseReason::IdleTimeout, CloseReason::Shutdown] {
            let (mut f, mut ops) = relaying();
            f.abort(reason, &mut ops);
            assert_eq!(
                take(&mut ops),
                [
                    Op::Cancel(Target::Recv(Client)),
                    Op::Cancel(Target::Recv(Backend))
                ]
            );
            ended(&mut f, Client, -libc::ECANCELED, &mut ops);
            ended(&mut f, Backend, -libc::ECANCELED, &mut ops);
            f.on_cancel_done(&mut ops);
            assert!(ops.is_empty());
            f.on_cancel_done(&mut ops);
            assert_eq!(
                released(&take(&mut ops)),
                Some(Ending {
                    reason,
                    reset_client: true,
                    reset_backend: true
                }),
                "a FIN would tell the peer the stream was complete"
            );
        }
    }

    #[test]
    fn closing_frees_the_spill() {
        let (mut f, mut ops) = relaying();
        data(&mut f, Backend, 100, 1, &mut ops);
        take(&mut ops);
        f.on_send(Client, 10, true, &mut ops);
        take(&mut ops);
        f.abort(CloseReason::IdleTimeout, &mut ops);
        take(&mut ops);
        f.on_send(Client, -libc::ECANCELED, true, &mut ops);
        for _ in 0..3 {
            f.on_cancel_done(&mut ops);
        }
        ended(&mut f, Client, -libc::ECANCELED, &mut ops);
        assert!(ops.is_empty(), "the backend recv is still in flight");
        ended(&mut f, Backend, -libc::ECANCELED, &mut ops);
        let got = take(&mut ops);
        assert!(got.contains(&Op::DropSpill(Backend)));
        assert!(released(&got).is_some());
    }

    #[test]
    fn data_arriving_while_closing_is_returned() {
        let (mut f, mut ops) = relaying();
        f.abort(CloseReason::Shutdown, &mut ops);
        take(&mut ops);
        data(&mut f, Backend, 100, 3, &mut ops);
        assert_eq!(take(&mut ops), [Op::ReturnBuffer(3)]);
    }

    #[test]
    fn release_happens_exactly_once() {
        let (mut f, mut ops) = relaying();
        f.abort(CloseReason::Shutdown, &mut ops);
        f.abort(CloseReason::IdleTimeout, &mut ops);
        ended(&mut f, Client, -libc::ECANCELED, &mut ops);
        ended(&mut f, Backend, -libc::ECANCELED, &mut ops);
        f.on_cancel_done(&mut ops);
        f.on_cancel_done(&mut ops);
        f.on_link_timeout(&mut ops); // stray: must not release twice
        let releases = take(&mut ops)
            .iter()
            .filter(|op| matches!(op, Op::Release(_)))
            .count();
        assert_eq!(releases, 1);
    }

    #[test]
    fn ring_running_dry_waits_for_buffers() {
        let (mut f, mut ops) = relaying();
        ended(&mut f, Client, -libc::ENOBUFS, &mut ops);
        assert_eq!(take(&mut ops), [Op::WaitForBuffers]);
        assert!(f.is_starved());
        f.on_buffers_available(false, &mut ops);
        assert_eq!(take(&mut ops), [recv(Client)]);
        assert!(!f.is_starved());
    }

    #[test]
    fn eof_with_a_buffer_returns_it() {
        let (mut f, mut ops) = relaying();
        f.on_recv(Client, 0, Some(6), false, false, &mut ops);
        assert_eq!(take(&mut ops), [Op::ReturnBuffer(6), Op::Shutdown(Backend)]);
    }

    #[test]
    fn preface_goes_out_before_any_client_byte() {
        let mut f = Flow::new(LIMITS);
        let mut ops = Vec::new();
        f.start(&mut ops);
        take(&mut ops);
        f.set_preface(28);
        f.on_connect_submitted();
        f.on_connect(0, &mut ops);
        assert_eq!(
            take(&mut ops),
            [
                Op::Recv {
                    from: Backend,
                    poll_first: true,
                    small: false
                },
                Op::SendPreface { offset: 0, len: 28 }
            ],
            "the client's recv waits for the preface"
        );
        f.on_preface_sent(10, &mut ops);
        assert_eq!(
            take(&mut ops),
            [Op::SendPreface {
                offset: 10,
                len: 18
            }]
        );
        f.on_preface_sent(18, &mut ops);
        assert_eq!(
            take(&mut ops),
            [Op::Recv {
                from: Client,
                poll_first: false,
                small: false
            }]
        );
        assert_eq!(f.bytes(), (28, 0));
    }

    #[test]
    fn failed_preface_resets_the_client() {
        let mut f = Flow::new(LIMITS);
        let mut ops = Vec::new();
        f.start(&mut ops);
        f.set_preface(10);
        f.on_connect_submitted();
        f.on_connect(0, &mut ops);
        f.on_link_timeout(&mut ops);
        take(&mut ops);
        f.on_preface_sent(-libc::EPIPE, &mut ops);
        assert_eq!(take(&mut ops), [Op::Cancel(Target::Recv(Backend))]);
        f.on_cancel_done(&mut ops);
        ended(&mut f, Backend, -libc::ECANCELED, &mut ops);
        let e = released(&take(&mut ops)).unwrap();
        assert_eq!(
            (e.reason, e.reset_client),
            (CloseReason::BackendReset, true)
        );
    }

    fn greeting() -> (Flow, Vec<Op>) {
        let mut f = Flow::new(Limits {
            read_header: true,
            ..LIMITS
        });
        let mut ops = Vec::new();
        f.start(&mut ops);
        assert_eq!(take(&mut ops), [Op::ReadHeader]);
        assert_eq!(f.phase(), Phase::Greeting);
        f.on_header_submitted();
        (f, ops)
    }

    #[test]
    fn proxy_header_is_read_before_connecting() {
        let (mut f, mut ops) = greeting();
        assert!(f.on_header_read(20, &mut ops));
        f.header_incomplete(&mut ops);
        assert_eq!(take(&mut ops), [Op::ReadHeader]);
        f.on_link_timeout(&mut ops);
        f.on_header_submitted();
        assert!(f.on_header_read(30, &mut ops));
        f.header_done(&mut ops);
        assert_eq!(take(&mut ops), [Op::Connect]);
        assert_eq!(f.phase(), Phase::Connecting);
    }

    #[test]
    fn header_timeout_or_eof_closes_the_flow() {
        let (mut f, mut ops) = greeting();
        assert!(!f.on_header_read(-libc::ECANCELED, &mut ops));
        assert!(ops.is_empty(), "release waits for the linked timeout");
        f.on_link_timeout(&mut ops);
        assert_eq!(
            released(&take(&mut ops)).unwrap().reason,
            CloseReason::BadProxyHeader
        );
        let (mut f, mut ops) = greeting();
        f.on_link_timeout(&mut ops);
        assert!(!f.on_header_read(0, &mut ops));
        assert_eq!(
            released(&take(&mut ops)).unwrap().reason,
            CloseReason::BadProxyHeader
        );
    }

    #[test]
    fn abort_during_the_header_cancels_its_read() {
        let (mut f, mut ops) = greeting();
        f.abort(CloseReason::Shutdown, &mut ops);
        assert_eq!(take(&mut ops), [Op::Cancel(Target::HeaderRecv)]);
        f.on_cancel_done(&mut ops);
        assert!(!f.on_header_read(-libc::ECANCELED, &mut ops));
        f.on_link_timeout(&mut ops);
        assert!(released(&take(&mut ops)).is_some());
    }

    #[test]
    fn malformed_header_is_refused_after_the_read_completes() {
        let (mut f, mut ops) = greeting();
        assert!(f.on_header_read(12, &mut ops));
        f.abort(CloseReason::BadProxyHeader, &mut ops);
        assert!(ops.is_empty(), "the linked timeout is still in flight");
        f.on_link_timeout(&mut ops);
        assert_eq!(
            released(&take(&mut ops)).unwrap().reason,
            CloseReason::BadProxyHeader
        );
    }

    #[test]
    fn unexpected_recv_error_closes_with_errno() {
        let (mut f, mut ops) = relaying();
        ended(&mut f, Backend, -libc::EINVAL, &mut ops);
        f.on_cancel_done(&mut ops);
        ended(&mut f, Client, -libc::ECANCELED, &mut ops);
        assert_eq!(
            released(&take(&mut ops)).unwrap().reason,
            CloseReason::Error(libc::EINVAL)
        );
    }

    // ---- handover: quiesce, export, resume, adopt ----

    #[test]
    fn an_idle_flow_quiesces_once_both_recv_cancels_complete_and_resumes_as_it_was() {
        let (mut f, mut ops) = relaying();
        f.quiesce(&mut ops);
        assert_eq!(
            take(&mut ops),
            [
                Op::Cancel(Target::Recv(Client)),
                Op::Cancel(Target::Recv(Backend))
            ]
        );
        assert!(!f.is_quiesced());
        ended(&mut f, Client, -libc::ECANCELED, &mut ops);
        ended(&mut f, Backend, -libc::ECANCELED, &mut ops);
        f.on_cancel_done(&mut ops);
        f.on_cancel_done(&mut ops);
        assert!(ops.is_empty(), "a cancelled recv is not an error: {ops:?}");
        assert!(f.is_quiesced());
        assert_eq!(f.export(), [PipeExport::default(), PipeExport::default()]);
        f.resume(false, &mut ops);
        assert_eq!(count(&ops, |op| matches!(op, Op::Recv { .. })), 2);
        assert!(!f.is_quiesced());
    }

    #[test]
    fn bytes_not_sent_at_quiesce_are_exported_exactly_and_given_back_at_hand_off() {
        let (mut f, mut ops) = relaying();
        data(&mut f, Client, 100, 1, &mut ops);
        assert!(take(&mut ops).contains(&send(Backend, 1, 0, 100)));
        f.quiesce(&mut ops);
        let cancels = take(&mut ops);
        assert!(cancels.contains(&Op::Cancel(Target::Send(Backend))));
        // The cancelled send had already sent 10 bytes; the recvs were cancelled.
        f.on_send(Backend, 10, false, &mut ops);
        ended(&mut f, Client, -libc::ECANCELED, &mut ops);
        ended(&mut f, Backend, -libc::ECANCELED, &mut ops);
        for _ in 0..cancels.len() {
            f.on_cancel_done(&mut ops);
        }
        assert!(ops.is_empty(), "nothing is sent while quiescing: {ops:?}");
        assert!(f.is_quiesced());
        let [up, down] = f.export();
        assert_eq!(up.pending, [(Data::Buffer(1), 10, 90)]);
        assert!(down.pending.is_empty());
        assert_eq!(f.bytes(), (10, 0));
        f.hand_off(&mut ops);
        assert_eq!(take(&mut ops), [Op::ReturnBuffer(1)]);
    }

    #[test]
    fn a_send_cancelled_before_any_byte_keeps_its_chunk() {
        let (mut f, mut ops) = relaying();
        data(&mut f, Backend, 50, 3, &mut ops);
        take(&mut ops);
        f.quiesce(&mut ops);
        take(&mut ops);
        f.on_send(Client, -libc::ECANCELED, false, &mut ops);
        assert!(ops.is_empty(), "{ops:?}");
        assert_eq!(f.export()[1].pending, [(Data::Buffer(3), 0, 50)]);
    }

    #[test]
    fn a_connecting_flow_quiesces_when_it_connects_without_arming_anything() {
        let mut f = Flow::new(LIMITS);
        let mut ops = Vec::new();
        f.start(&mut ops);
        f.on_connect_submitted();
        take(&mut ops);
        f.quiesce(&mut ops);
        assert!(ops.is_empty());
        f.on_connect(0, &mut ops);
        assert!(ops.is_empty(), "no recv armed while quiescing: {ops:?}");
        assert!(!f.is_quiesced(), "the linked timeout is in flight");
        f.on_link_timeout(&mut ops);
        assert!(f.is_quiesced());
    }

    #[test]
    fn an_adopted_flow_writes_its_pending_bytes_before_reading_and_keeps_its_half_close() {
        let pipes = [
            AdoptedPipe {
                pending: 5,
                bytes: 1000,
                ..Default::default()
            },
            AdoptedPipe {
                eof: true,
                ..Default::default()
            },
        ];
        let mut f = Flow::adopt(LIMITS, pipes);
        let mut ops = Vec::new();
        f.resume(false, &mut ops);
        assert_eq!(
            take(&mut ops),
            [
                Op::Shutdown(Client),
                Op::Send {
                    to: Backend,
                    data: Data::Spill,
                    offset: 0,
                    len: 5
                }
            ],
            "the backend's EOF is passed on; the client is not read before its bytes are sent"
        );
        f.on_send(Backend, 5, false, &mut ops);
        assert_eq!(
            take(&mut ops),
            [
                Op::DropSpill(Client),
                Op::Recv {
                    from: Client,
                    poll_first: false,
                    small: false
                }
            ]
        );
        assert_eq!(f.bytes(), (1005, 0));
    }

    #[test]
    fn a_flow_resumed_before_its_cancels_complete_carries_on() {
        let (mut f, mut ops) = relaying();
        data(&mut f, Client, 100, 1, &mut ops);
        take(&mut ops);
        f.quiesce(&mut ops);
        take(&mut ops);
        f.resume(false, &mut ops);
        assert!(ops.is_empty(), "everything is still in flight: {ops:?}");
        ended(&mut f, Client, -libc::ECANCELED, &mut ops);
        assert_eq!(take(&mut ops), [recv(Client)]);
        f.on_send(Backend, -libc::ECANCELED, false, &mut ops);
        assert_eq!(take(&mut ops), [send(Backend, 1, 0, 100)]);
        f.on_cancel_done(&mut ops);
        f.on_cancel_done(&mut ops);
        f.on_cancel_done(&mut ops);
        assert!(ops.is_empty());
        assert_eq!(f.phase(), Phase::Relaying);
    }
}
