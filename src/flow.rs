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
//! has a multishot recv on its source socket that fills buffers from the worker's buffer ring,
//! a queue of filled buffers, and at most one send in flight to the destination socket (two sends
//! on one socket may reorder bytes). When the queue reaches `max_queued` buffers the recv is
//! cancelled, so a slow reader costs at most that many buffers; it is re-armed when the queue has
//! drained to half. EOF on the source becomes shutdown(SHUT_WR) on the destination once the queue
//! is empty. A flow is released only when no operation on its sockets is in flight, so a
//! completion can never land on a reused slot or a closed descriptor.

use std::collections::VecDeque;

/// Index of a buffer in the worker's provided-buffer ring.
pub type BufId = u16;

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
    /// Arm a multishot recv on this side's socket.
    Recv(Side),
    /// Cancel the multishot recv on this side (backpressure); completes via `on_recv_cancelled`.
    CancelRecv(Side),
    /// Send `len` bytes of buffer `buf` from `offset` to `to`.
    Send {
        to: Side,
        buf: BufId,
        offset: u32,
        len: u32,
    },
    /// shutdown(SHUT_WR) on this side's socket.
    Shutdown(Side),
    /// Give a buffer back to the ring.
    ReturnBuffer(BufId),
    /// Cancel every operation on this side's socket; completes via `on_cancel_all_done`.
    CancelAll(Side),
    /// The buffer ring ran dry: call `on_buffers_available` when buffers come back.
    WaitForBuffers,
    /// Nothing is in flight any more: close both sockets (with an RST where asked) and free the slot.
    Release(Ending),
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
    /// The process is stopping.
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
    /// Not armed: before connect, after a backpressure cancel, or after the ring ran dry.
    Off,
    Armed,
    /// A backpressure cancel has been submitted and the recv has not ended yet.
    Cancelling,
    /// The source sent EOF; nothing more will be read.
    Eof,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ShutdownState {
    NotYet,
    InFlight,
    Done,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Chunk {
    buf: BufId,
    len: u32,
    offset: u32,
}

#[derive(Debug)]
struct Pipe {
    recv: RecvState,
    /// The recv ended with ENOBUFS; re-arm when buffers come back.
    starved: bool,
    /// A backpressure cancel's own completion is outstanding; re-arming waits for it so the
    /// cancel cannot hit the new recv.
    cancel_in_flight: bool,
    /// Filled buffers waiting to be sent, oldest first.
    queue: VecDeque<Chunk>,
    /// The chunk whose send is in flight.
    sending: Option<Chunk>,
    shutdown: ShutdownState,
    /// Bytes delivered to the destination.
    bytes: u64,
}

impl Pipe {
    fn new() -> Pipe {
        Pipe {
            recv: RecvState::Off,
            starved: false,
            cancel_in_flight: false,
            queue: VecDeque::new(),
            sending: None,
            shutdown: ShutdownState::NotYet,
            bytes: 0,
        }
    }

    fn queued(&self) -> usize {
        self.queue.len() + usize::from(self.sending.is_some())
    }

    fn ops_in_flight(&self) -> u32 {
        u32::from(matches!(
            self.recv,
            RecvState::Armed | RecvState::Cancelling
        )) + u32::from(self.cancel_in_flight)
            + u32::from(self.sending.is_some())
            + u32::from(self.shutdown == ShutdownState::InFlight)
    }
}

/// Tunables that shape every flow of a worker.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connect attempts after the first one.
    pub retries: u32,
    /// Filled buffers a pipe may hold before its recv is paused.
    pub max_queued: usize,
    /// Read a PROXY protocol header from the client before anything else.
    pub read_header: bool,
}

#[derive(Debug)]
pub struct Flow {
    phase: Phase,
    pipes: [Pipe; 2],
    limits: Limits,
    connect_attempts: u32,
    connect_in_flight: bool,
    /// Linked timeouts complete separately from their connect, possibly after a retry started.
    link_timeouts_in_flight: u8,
    /// Fd-wide cancels submitted while closing, not yet completed.
    cancels_in_flight: u8,
    header_in_flight: bool,
    /// Bytes to send to the backend before any relayed client byte.
    preface_len: u32,
    preface_sent: u32,
    preface_in_flight: bool,
    ending: Option<Ending>,
    released: bool,
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
        self.connect_attempts
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
        if res <= 0 {
            self.abort_reset(Side::Backend, ops);
            return;
        }
        self.preface_sent = (self.preface_sent + res as u32).min(self.preface_len);
        self.pipes[UPLOAD].bytes += res as u64;
        self.send_preface_or_start_upload(ops);
    }

    fn send_preface_or_start_upload(&mut self, ops: &mut Vec<Op>) {
        if self.preface_sent < self.preface_len {
            self.preface_in_flight = true;
            ops.push(Op::SendPreface {
                offset: self.preface_sent,
                len: self.preface_len - self.preface_sent,
            });
        } else {
            self.arm_recv(Side::Client, ops);
        }
    }

    /// The worker submitted a connect and its linked timeout.
    pub fn on_connect_submitted(&mut self) {
        self.connect_attempts += 1;
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
            self.arm_recv(Side::Backend, ops);
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

    /// A multishot recv on `from` completed: `res` bytes in `buf` (res > 0), EOF (res == 0) or a
    /// negative errno. `more` is IORING_CQE_F_MORE: the recv stays armed.
    pub fn on_recv(
        &mut self,
        from: Side,
        res: i32,
        buf: Option<BufId>,
        more: bool,
        ops: &mut Vec<Op>,
    ) {
        let pipe = &mut self.pipes[from.pipe()];
        if !more && pipe.recv != RecvState::Eof {
            pipe.recv = RecvState::Off;
        }
        if self.phase == Phase::Closing {
            if let Some(buf) = buf {
                ops.push(Op::ReturnBuffer(buf));
            }
            self.release_if_idle(ops);
            return;
        }
        match (res, buf) {
            (len, Some(buf)) if len > 0 => {
                pipe.queue.push_back(Chunk {
                    buf,
                    len: len as u32,
                    offset: 0,
                });
                if pipe.queued() >= self.limits.max_queued && pipe.recv == RecvState::Armed {
                    pipe.recv = RecvState::Cancelling;
                    pipe.cancel_in_flight = true;
                    ops.push(Op::CancelRecv(from));
                }
                self.pump(from, ops);
                if !more {
                    self.rearm_if_room(from, ops);
                }
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
                    libc::ECANCELED => self.rearm_if_room(from, ops),
                    libc::ECONNRESET | libc::EPIPE | libc::ETIMEDOUT | libc::EHOSTUNREACH => {
                        self.abort_reset(from, ops)
                    }
                    errno => self.abort(CloseReason::Error(errno), ops),
                }
            }
        }
    }

    /// The backpressure cancel of the recv on `from` completed (whatever its result: the recv
    /// may have ended on its own first).
    pub fn on_recv_cancelled(&mut self, from: Side, ops: &mut Vec<Op>) {
        self.pipes[from.pipe()].cancel_in_flight = false;
        if self.phase == Phase::Closing {
            self.release_if_idle(ops);
        } else {
            self.rearm_if_room(from, ops);
        }
    }

    /// A send to `to` completed with `res` bytes sent or a negative errno.
    pub fn on_send(&mut self, to: Side, res: i32, ops: &mut Vec<Op>) {
        let from = to.other();
        let pipe = &mut self.pipes[from.pipe()];
        let Some(mut chunk) = pipe.sending.take() else {
            return; // not ours: cannot happen while tokens carry generations
        };
        if self.phase == Phase::Closing {
            ops.push(Op::ReturnBuffer(chunk.buf));
            self.release_if_idle(ops);
            return;
        }
        if res <= 0 {
            ops.push(Op::ReturnBuffer(chunk.buf));
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
        } else {
            ops.push(Op::ReturnBuffer(chunk.buf));
        }
        self.pump(from, ops);
        self.rearm_if_room(from, ops);
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

    /// An fd-wide cancel submitted while closing completed.
    pub fn on_cancel_all_done(&mut self, ops: &mut Vec<Op>) {
        self.cancels_in_flight = self.cancels_in_flight.saturating_sub(1);
        self.release_if_idle(ops);
    }

    /// Buffers came back to the ring: re-arm recvs that had stopped for lack of them.
    pub fn on_buffers_available(&mut self, ops: &mut Vec<Op>) {
        for side in [Side::Client, Side::Backend] {
            let pipe = &mut self.pipes[side.pipe()];
            if pipe.starved {
                pipe.starved = false;
                if self.phase == Phase::Relaying {
                    self.rearm_if_room(side, ops);
                }
            }
        }
    }

    /// Is this flow waiting for buffers?
    pub fn is_starved(&self) -> bool {
        self.pipes.iter().any(|p| p.starved)
    }

    /// Close the flow now (timeout, no backend, process stopping): cancel what is in flight and
    /// release when it has all completed.
    pub fn abort(&mut self, reason: CloseReason, ops: &mut Vec<Op>) {
        self.finish(
            Ending {
                reason,
                reset_client: false,
                reset_backend: false,
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
        for pipe in &mut self.pipes {
            for chunk in pipe.queue.drain(..) {
                ops.push(Op::ReturnBuffer(chunk.buf));
            }
            pipe.starved = false;
        }
        for side in [Side::Client, Side::Backend] {
            if self.ops_on(side) > 0 {
                self.cancels_in_flight += 1;
                ops.push(Op::CancelAll(side));
            }
        }
        self.release_if_idle(ops);
    }

    /// Operations in flight on `side`'s socket.
    fn ops_on(&self, side: Side) -> u32 {
        let reading = &self.pipes[side.pipe()];
        let writing = &self.pipes[side.other().pipe()];
        let recv = u32::from(matches!(
            reading.recv,
            RecvState::Armed | RecvState::Cancelling
        )) + u32::from(reading.cancel_in_flight);
        let write = u32::from(writing.sending.is_some())
            + u32::from(writing.shutdown == ShutdownState::InFlight);
        let connect =
            u32::from(side == Side::Backend && (self.connect_in_flight || self.preface_in_flight));
        let header = u32::from(side == Side::Client && self.header_in_flight);
        recv + write + connect + header
    }

    fn ops_in_flight(&self) -> u32 {
        self.pipes.iter().map(Pipe::ops_in_flight).sum::<u32>()
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
            ops.push(Op::Release(ending));
        }
    }

    fn arm_recv(&mut self, side: Side, ops: &mut Vec<Op>) {
        self.pipes[side.pipe()].recv = RecvState::Armed;
        ops.push(Op::Recv(side));
    }

    /// Re-arm the recv on `from` if it is off, nothing blocks it, and its queue has drained to half.
    fn rearm_if_room(&mut self, from: Side, ops: &mut Vec<Op>) {
        let pipe = &self.pipes[from.pipe()];
        if self.phase == Phase::Relaying
            && pipe.recv == RecvState::Off
            && !pipe.starved
            && !pipe.cancel_in_flight
            && pipe.queued() <= self.limits.max_queued / 2
        {
            self.arm_recv(from, ops);
        }
    }

    /// Start the next send of the pipe reading `from`, or the shutdown after its EOF.
    fn pump(&mut self, from: Side, ops: &mut Vec<Op>) {
        let pipe = &mut self.pipes[from.pipe()];
        if pipe.sending.is_some() {
            return;
        }
        if let Some(chunk) = pipe.queue.pop_front() {
            pipe.sending = Some(chunk);
            ops.push(Op::Send {
                to: from.other(),
                buf: chunk.buf,
                offset: chunk.offset,
                len: chunk.len - chunk.offset,
            });
        } else if pipe.recv == RecvState::Eof && pipe.shutdown == ShutdownState::NotYet {
            pipe.shutdown = ShutdownState::InFlight;
            ops.push(Op::Shutdown(from.other()));
        }
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
    };

    fn take(ops: &mut Vec<Op>) -> Vec<Op> {
        std::mem::take(ops)
    }

    /// A flow that has connected and armed both recvs.
    fn relaying() -> (Flow, Vec<Op>) {
        let mut f = Flow::new(LIMITS);
        let mut ops = Vec::new();
        f.start(&mut ops);
        assert_eq!(take(&mut ops), [Op::Connect]);
        f.on_connect_submitted();
        f.on_connect(0, &mut ops);
        assert_eq!(take(&mut ops), [Op::Recv(Backend), Op::Recv(Client)]);
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

    #[test]
    fn relays_one_buffer_each_way() {
        let (mut f, mut ops) = relaying();
        f.on_recv(Client, 100, Some(7), true, &mut ops);
        assert_eq!(
            take(&mut ops),
            [Op::Send {
                to: Backend,
                buf: 7,
                offset: 0,
                len: 100
            }]
        );
        f.on_send(Backend, 100, &mut ops);
        assert_eq!(take(&mut ops), [Op::ReturnBuffer(7)]);
        f.on_recv(Backend, 5, Some(8), true, &mut ops);
        assert_eq!(
            take(&mut ops),
            [Op::Send {
                to: Client,
                buf: 8,
                offset: 0,
                len: 5
            }]
        );
        f.on_send(Client, 5, &mut ops);
        assert_eq!(take(&mut ops), [Op::ReturnBuffer(8)]);
        assert_eq!(f.bytes(), (100, 5));
    }

    #[test]
    fn one_send_in_flight_per_direction_in_order() {
        let (mut f, mut ops) = relaying();
        f.on_recv(Client, 10, Some(1), true, &mut ops);
        f.on_recv(Client, 20, Some(2), true, &mut ops);
        f.on_recv(Client, 30, Some(3), true, &mut ops);
        assert_eq!(
            take(&mut ops),
            [Op::Send {
                to: Backend,
                buf: 1,
                offset: 0,
                len: 10
            }]
        );
        f.on_send(Backend, 10, &mut ops);
        assert_eq!(
            take(&mut ops),
            [
                Op::ReturnBuffer(1),
                Op::Send {
                    to: Backend,
                    buf: 2,
                    offset: 0,
                    len: 20
                }
            ]
        );
        f.on_send(Backend, 20, &mut ops);
        assert_eq!(
            take(&mut ops),
            [
                Op::ReturnBuffer(2),
                Op::Send {
                    to: Backend,
                    buf: 3,
                    offset: 0,
                    len: 30
                }
            ]
        );
    }

    #[test]
    fn partial_send_resends_the_rest() {
        let (mut f, mut ops) = relaying();
        f.on_recv(Backend, 1000, Some(4), true, &mut ops);
        take(&mut ops);
        f.on_send(Client, 300, &mut ops);
        assert_eq!(
            take(&mut ops),
            [Op::Send {
                to: Client,
                buf: 4,
                offset: 300,
                len: 700
            }]
        );
        f.on_send(Client, 700, &mut ops);
        assert_eq!(take(&mut ops), [Op::ReturnBuffer(4)]);
        assert_eq!(f.bytes(), (0, 1000));
    }

    #[test]
    fn backpressure_pauses_and_resumes_recv() {
        let (mut f, mut ops) = relaying();
        for buf in 0..4 {
            f.on_recv(Client, 100, Some(buf), true, &mut ops);
        }
        // The 4th buffer reaches max_queued: the recv is cancelled.
        assert_eq!(
            take(&mut ops),
            [
                Op::Send {
                    to: Backend,
                    buf: 0,
                    offset: 0,
                    len: 100
                },
                Op::CancelRecv(Client)
            ]
        );
        // A buffer that raced the cancel is still queued, never lost.
        f.on_recv(Client, 50, Some(9), true, &mut ops);
        assert!(ops.is_empty());
        f.on_recv(Client, -libc::ECANCELED, None, false, &mut ops);
        assert!(
            ops.is_empty(),
            "no re-arm before the cancel itself completes"
        );
        f.on_recv_cancelled(Client, &mut ops);
        assert!(ops.is_empty(), "queue is still full");
        f.on_send(Backend, 100, &mut ops); // 4 left
        f.on_send(Backend, 100, &mut ops); // 3 left
        let got = take(&mut ops);
        assert!(!got.contains(&Op::Recv(Client)), "{got:?}");
        f.on_send(Backend, 100, &mut ops); // 2 left = half: re-arm
        let got = take(&mut ops);
        assert_eq!(got.last(), Some(&Op::Recv(Client)), "{got:?}");
        f.on_send(Backend, 100, &mut ops);
        assert_eq!(
            take(&mut ops),
            [
                Op::ReturnBuffer(3),
                Op::Send {
                    to: Backend,
                    buf: 9,
                    offset: 0,
                    len: 50
                }
            ]
        );
    }

    #[test]
    fn recv_ending_on_its_own_is_rearmed() {
        let (mut f, mut ops) = relaying();
        f.on_recv(Client, 10, Some(1), false, &mut ops);
        assert_eq!(
            take(&mut ops),
            [
                Op::Send {
                    to: Backend,
                    buf: 1,
                    offset: 0,
                    len: 10
                },
                Op::Recv(Client)
            ]
        );
    }

    #[test]
    fn client_eof_becomes_backend_shutdown_after_buffered_bytes() {
        let (mut f, mut ops) = relaying();
        f.on_recv(Client, 10, Some(1), true, &mut ops);
        take(&mut ops);
        f.on_recv(Client, 0, None, false, &mut ops);
        assert!(ops.is_empty(), "shutdown waits for the send in flight");
        f.on_send(Backend, 10, &mut ops);
        assert_eq!(take(&mut ops), [Op::ReturnBuffer(1), Op::Shutdown(Backend)]);
        f.on_shutdown(Backend, 0, &mut ops);
        assert!(ops.is_empty());
        // The other direction keeps flowing after the half-close.
        f.on_recv(Backend, 3, Some(2), true, &mut ops);
        assert_eq!(
            take(&mut ops),
            [Op::Send {
                to: Client,
                buf: 2,
                offset: 0,
                len: 3
            }]
        );
        f.on_send(Client, 3, &mut ops);
        take(&mut ops);
        f.on_recv(Backend, 0, None, false, &mut ops);
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
    fn backend_eof_first_then_client() {
        let (mut f, mut ops) = relaying();
        f.on_recv(Backend, 0, None, false, &mut ops);
        assert_eq!(take(&mut ops), [Op::Shutdown(Client)]);
        f.on_shutdown(Client, 0, &mut ops);
        f.on_recv(Client, 4, Some(5), true, &mut ops);
        assert_eq!(
            take(&mut ops),
            [Op::Send {
                to: Backend,
                buf: 5,
                offset: 0,
                len: 4
            }]
        );
        f.on_send(Backend, 4, &mut ops);
        f.on_recv(Client, 0, None, false, &mut ops);
        assert_eq!(take(&mut ops), [Op::ReturnBuffer(5), Op::Shutdown(Backend)]);
        f.on_shutdown(Backend, 0, &mut ops);
        assert_eq!(released(&take(&mut ops)).unwrap().reason, CloseReason::Done);
    }

    #[test]
    fn backend_reset_resets_client_after_all_ops_complete() {
        let (mut f, mut ops) = relaying();
        f.on_recv(Client, 10, Some(1), true, &mut ops);
        f.on_recv(Client, 10, Some(2), true, &mut ops);
        take(&mut ops);
        f.on_recv(Backend, -libc::ECONNRESET, None, false, &mut ops);
        // Queued buffer 2 goes back now; buffer 1 is still being sent by the kernel.
        assert_eq!(
            take(&mut ops),
            [
                Op::ReturnBuffer(2),
                Op::CancelAll(Client),
                Op::CancelAll(Backend)
            ]
        );
        assert_eq!(f.phase(), Phase::Closing);
        f.on_cancel_all_done(&mut ops);
        f.on_cancel_all_done(&mut ops);
        assert!(ops.is_empty());
        f.on_recv(Client, -libc::ECANCELED, None, false, &mut ops);
        assert!(ops.is_empty());
        f.on_send(Backend, -libc::ECANCELED, &mut ops);
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
        f.on_recv(Client, -libc::ECONNRESET, None, false, &mut ops);
        assert_eq!(take(&mut ops), [Op::CancelAll(Backend)]);
        f.on_cancel_all_done(&mut ops);
        f.on_recv(Backend, -libc::ECANCELED, None, false, &mut ops);
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
        f.on_recv(Backend, 10, Some(1), true, &mut ops);
        take(&mut ops);
        f.on_send(Client, -libc::EPIPE, &mut ops);
        let got = take(&mut ops);
        assert_eq!(got[0], Op::ReturnBuffer(1));
        assert!(got.contains(&Op::CancelAll(Client)) && got.contains(&Op::CancelAll(Backend)));
        f.on_cancel_all_done(&mut ops);
        f.on_cancel_all_done(&mut ops);
        f.on_recv(Client, -libc::ECANCELED, None, false, &mut ops);
        f.on_recv(Backend, -libc::ECANCELED, None, false, &mut ops);
        let e = released(&take(&mut ops)).unwrap();
        assert_eq!(
            (e.reason, e.reset_backend),
            (CloseReason::ClientReset, true)
        );
    }

    #[test]
    fn zero_byte_send_is_not_retried_forever() {
        let (mut f, mut ops) = relaying();
        f.on_recv(Client, 10, Some(1), true, &mut ops);
        take(&mut ops);
        f.on_send(Backend, 0, &mut ops);
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
        assert_eq!(take(&mut ops), [Op::CancelAll(Backend)]);
        f.on_cancel_all_done(&mut ops);
        f.on_connect(-libc::ECANCELED, &mut ops);
        assert!(ops.is_empty());
        f.on_link_timeout(&mut ops);
        assert_eq!(
            released(&take(&mut ops)).unwrap().reason,
            CloseReason::Shutdown
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
    fn idle_timeout_closes_without_reset() {
        let (mut f, mut ops) = relaying();
        f.abort(CloseReason::IdleTimeout, &mut ops);
        assert_eq!(
            take(&mut ops),
            [Op::CancelAll(Client), Op::CancelAll(Backend)]
        );
        f.on_recv(Client, -libc::ECANCELED, None, false, &mut ops);
        f.on_recv(Backend, -libc::ECANCELED, None, false, &mut ops);
        f.on_cancel_all_done(&mut ops);
        assert!(ops.is_empty());
        f.on_cancel_all_done(&mut ops);
        assert_eq!(
            released(&take(&mut ops)),
            Some(Ending {
                reason: CloseReason::IdleTimeout,
                reset_client: false,
                reset_backend: false
            })
        );
    }

    #[test]
    fn data_arriving_while_closing_is_returned() {
        let (mut f, mut ops) = relaying();
        f.abort(CloseReason::Shutdown, &mut ops);
        take(&mut ops);
        f.on_recv(Backend, 100, Some(3), true, &mut ops);
        assert_eq!(take(&mut ops), [Op::ReturnBuffer(3)]);
    }

    #[test]
    fn release_happens_exactly_once() {
        let (mut f, mut ops) = relaying();
        f.abort(CloseReason::Shutdown, &mut ops);
        f.abort(CloseReason::IdleTimeout, &mut ops);
        f.on_recv(Client, -libc::ECANCELED, None, false, &mut ops);
        f.on_recv(Backend, -libc::ECANCELED, None, false, &mut ops);
        f.on_cancel_all_done(&mut ops);
        f.on_cancel_all_done(&mut ops);
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
        f.on_recv(Client, -libc::ENOBUFS, None, false, &mut ops);
        assert_eq!(take(&mut ops), [Op::WaitForBuffers]);
        assert!(f.is_starved());
        f.on_buffers_available(&mut ops);
        assert_eq!(take(&mut ops), [Op::Recv(Client)]);
        assert!(!f.is_starved());
    }

    #[test]
    fn eof_with_a_buffer_returns_it() {
        let (mut f, mut ops) = relaying();
        f.on_recv(Client, 0, Some(6), false, &mut ops);
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
            [Op::Recv(Backend), Op::SendPreface { offset: 0, len: 28 }],
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
        assert_eq!(take(&mut ops), [Op::Recv(Client)]);
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
        assert_eq!(take(&mut ops), [Op::CancelAll(Backend)]);
        f.on_cancel_all_done(&mut ops);
        f.on_recv(Backend, -libc::ECANCELED, None, false, &mut ops);
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
        f.on_recv(Backend, -libc::EINVAL, None, false, &mut ops);
        f.on_cancel_all_done(&mut ops);
        f.on_recv(Client, -libc::ECANCELED, None, false, &mut ops);
        assert_eq!(
            released(&take(&mut ops)).unwrap().reason,
            CloseReason::Error(libc::EINVAL)
        );
    }
}
