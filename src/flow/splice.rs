//! Splice: a bulk direction relays through a kernel pipe instead of ring buffers.
//!
//! A direction whose receives fill whole buffers `FULL_RECVS_TO_SPLICE` times in a row (never
//! while the pool is tight, never before the preface is out) asks the worker for a kernel pipe
//! (`Op::TakePipe`). If one is lent (`on_pipe`), the direction stops receiving into buffers,
//! delivers what it already holds (queue, send in flight, spill: the oldest bytes go first),
//! and only then moves bytes with non-blocking splice calls the worker makes at once
//! (`Op::SpliceIn`, `Op::SpliceOut`, results in `on_spliced_in`/`on_spliced_out`). Readiness
//! comes from the ring: a splice in that finds nothing arms a one-shot POLLIN on the source, a
//! splice out that the destination takes only in part arms a POLLOUT on it. The pipe holds at
//! most the pipe's byte budget (`Splice::room`, given with the pipe), so a stalled reader stops the
//! reads from its source exactly as a full buffered pipe does. EOF (a splice in of 0) becomes
//! the shutdown once the kernel pipe is empty. A direction never switches back, except when a
//! splice call fails with an error that says splice does not work on these sockets (EINVAL
//! and the like): its bytes are then read out of the pipe into the spill and it relays
//! through buffers for good.
//!
//! This module holds the splice half of the flow state machine (`Splice`, one per direction,
//! boxed in `Flow`) and its transitions; the buffered half is in `flow.rs`, which calls
//! `drive_splice` where it would re-arm a receive.

use super::{Chunk, CloseReason, Data, Flow, Op, Phase, RecvState, ShutdownState, Side};

/// Whether a pipe relays through ring buffers or a kernel pipe (splice).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum SpliceMode {
    /// Buffered; may switch once it proves bulk.
    #[default]
    Off,
    /// Asked the worker for a kernel pipe (`Op::TakePipe`); the answer comes at once.
    Asked,
    /// Holds a kernel pipe: once the buffered bytes are delivered, bytes move by splice.
    On,
    /// Buffered for good: splice failed on these sockets.
    Never,
}

/// One direction's splice state (see "Splice" below). Boxed for both directions and made only
/// when a direction first asks for a kernel pipe, so a flow that never splices pays one pointer
/// (RSS per idle flow is a goal).
#[derive(Debug, Default)]
pub(super) struct Splice {
    pub(super) mode: SpliceMode,
    /// Splice rounds since the last poll (bounded, so one flow cannot hold the worker).
    pub(super) rounds: u8,
    /// Bytes in the kernel pipe (spliced in, not yet out).
    pub(super) in_pipe: u32,
    /// A POLLIN on the source / POLLOUT on the destination is in flight.
    pub(super) poll_in: bool,
    pub(super) poll_out: bool,
    /// A `SpliceIn` / `SpliceOut` was emitted and its result has not come back yet.
    pub(super) in_pending: bool,
    pub(super) out_pending: bool,
    /// The last splice in found the kernel pipe full (EAGAIN with bytes in it): read again
    /// only after the destination took some.
    pub(super) pipe_full: bool,
    /// Bytes the lent kernel pipe may hold (the direction's budget), from `on_pipe`.
    pub(super) room: u32,
}

impl Splice {
    pub(super) fn ops_in_flight(&self) -> u32 {
        u32::from(self.poll_in)
            + u32::from(self.poll_out)
            + u32::from(self.in_pending)
            + u32::from(self.out_pending)
    }
}

/// Receives in a row that must fill a whole buffer before a direction asks for a kernel pipe:
/// one full buffer may be a single large message, two in a row is a stream.
pub(super) const FULL_RECVS_TO_SPLICE: u8 = 2;
/// Splice rounds (in, then out) a direction makes before it lets other flows run: it then
/// polls its source, which completes at once if more is there.
const SPLICE_ROUNDS: u8 = 8;

impl Flow {
    /// The worker's answer to `Op::TakePipe`: the lent pipe's byte budget, or `None`.
    pub fn on_pipe(&mut self, from: Side, granted: Option<u32>, tight: bool, ops: &mut Vec<Op>) {
        let Some(splice) = self.splice_mut(from) else {
            return;
        };
        if splice.mode != SpliceMode::Asked {
            return;
        }
        if let Some(room) = granted {
            splice.mode = SpliceMode::On;
            splice.room = room;
        } else {
            // No pipe free: stay buffered, and prove bulk again before the next ask.
            splice.mode = SpliceMode::Off;
            self.pipes[from.pipe()].full_recvs = 0;
        }
        if self.phase == Phase::Closing {
            self.release_if_idle(ops);
            return;
        }
        self.rearm_if_room(from, tight, ops);
    }

    /// The result of `Op::SpliceIn`: bytes moved into the kernel pipe, 0 for EOF, or -errno.
    pub fn on_spliced_in(&mut self, from: Side, res: i32, ops: &mut Vec<Op>) {
        let quiescing = self.quiescing;
        let closing = self.phase == Phase::Closing;
        let Some(splice) = self.splice.as_deref_mut().map(|s| &mut s[from.pipe()]) else {
            return;
        };
        splice.in_pending = false;
        if res > 0 {
            splice.in_pipe += res as u32;
        }
        if closing {
            self.release_if_idle(ops);
            return;
        }
        match res {
            n if n > 0 => {}
            0 => self.pipes[from.pipe()].recv = RecvState::Eof,
            e if -e == libc::EAGAIN && splice.in_pipe > 0 => splice.pipe_full = true,
            e if -e == libc::EAGAIN => {
                splice.rounds = 0;
                if !quiescing {
                    splice.poll_in = true;
                    ops.push(Op::PollIn(from));
                }
            }
            e if -e == libc::EINTR => {}
            e => {
                match -e {
                    libc::ECONNRESET | libc::EPIPE | libc::ETIMEDOUT | libc::EHOSTUNREACH => {
                        self.abort_reset(from, ops)
                    }
                    errno if splice_unsupported(errno) => self.fall_back(from, ops),
                    errno => self.abort(CloseReason::Error(errno), ops),
                }
                return;
            }
        }
        self.drive_splice(from, ops);
    }

    /// The result of `Op::SpliceOut`: bytes moved to the destination, or -errno.
    pub fn on_spliced_out(&mut self, from: Side, res: i32, ops: &mut Vec<Op>) {
        let to = from.other();
        let quiescing = self.quiescing;
        let closing = self.phase == Phase::Closing;
        let Some(splice) = self.splice.as_deref_mut().map(|s| &mut s[from.pipe()]) else {
            return;
        };
        splice.out_pending = false;
        if res > 0 {
            let moved = (res as u32).min(splice.in_pipe);
            splice.in_pipe -= moved;
            splice.pipe_full = false;
            self.pipes[from.pipe()].bytes += u64::from(moved);
        }
        if closing {
            self.release_if_idle(ops);
            return;
        }
        match res {
            n if n > 0 => {
                if splice.in_pipe > 0 && !quiescing {
                    // The destination took only part: it is full; wait until it can take more.
                    splice.poll_out = true;
                    ops.push(Op::PollOut(to));
                }
            }
            e if -e == libc::EAGAIN => {
                if !quiescing {
                    splice.poll_out = true;
                    ops.push(Op::PollOut(to));
                }
            }
            e if -e == libc::EINTR => {}
            e => {
                match -e {
                    // Nothing taken from a non-empty pipe: the peer is gone, as for a send.
                    0 | libc::EPIPE | libc::ECONNRESET | libc::ETIMEDOUT | libc::EHOSTUNREACH => {
                        self.abort_reset(to, ops)
                    }
                    errno if splice_unsupported(errno) => self.fall_back(from, ops),
                    errno => self.abort(CloseReason::Error(errno), ops),
                }
                return;
            }
        }
        self.drive_splice(from, ops);
    }

    /// A POLLIN on a splicing source completed (ready, cancelled, or an error the next splice
    /// will report).
    pub fn on_poll_in(&mut self, from: Side, _res: i32, ops: &mut Vec<Op>) {
        if let Some(splice) = self.splice_mut(from) {
            splice.poll_in = false;
        }
        if self.phase == Phase::Closing {
            self.release_if_idle(ops);
            return;
        }
        self.drive_splice(from, ops);
    }

    /// A POLLOUT on a splicing destination completed.
    pub fn on_poll_out(&mut self, to: Side, _res: i32, ops: &mut Vec<Op>) {
        if let Some(splice) = self.splice_mut(to.other()) {
            splice.poll_out = false;
            splice.pipe_full = false;
        }
        if self.phase == Phase::Closing {
            self.release_if_idle(ops);
            return;
        }
        self.drive_splice(to.other(), ops);
    }

    /// The result of `Op::DrainPipe`: `got` bytes were appended to the spill of the pipe
    /// reading `from`, whose kernel pipe is empty now (the worker read it to the end).
    pub fn on_pipe_drained(&mut self, from: Side, got: u32, ops: &mut Vec<Op>) {
        let expected = self
            .splice_mut(from)
            .map_or(0, |splice| std::mem::take(&mut splice.in_pipe));
        let pipe = &mut self.pipes[from.pipe()];
        if got > 0 {
            // Splicing starts only once the queue and the spill are empty, and nothing is
            // received into buffers after: the drained bytes are all there is to deliver.
            debug_assert!(pipe.queue.is_empty() && pipe.sending.is_none());
            let start = pipe.spill_len;
            pipe.spill_len += got;
            pipe.queue.push_back(Chunk {
                data: Data::Spill,
                offset: start,
                len: pipe.spill_len,
            });
        }
        if got != expected {
            self.abort(CloseReason::Error(libc::EIO), ops);
            return;
        }
        self.pump(from, ops);
    }

    /// Bytes in the kernel pipe of the pipe reading `from`.
    pub fn bytes_in_pipe(&self, from: Side) -> u32 {
        self.splice.as_deref().map_or(0, |s| s[from.pipe()].in_pipe)
    }

    pub(super) fn splice_mode(&self, from: Side) -> SpliceMode {
        self.splice
            .as_deref()
            .map_or(SpliceMode::Off, |s| s[from.pipe()].mode)
    }

    fn splice_mut(&mut self, from: Side) -> Option<&mut Splice> {
        self.splice.as_deref_mut().map(|s| &mut s[from.pipe()])
    }

    /// Splice does not work on these sockets: relay through buffers for good, the bytes in the
    /// kernel pipe first.
    fn fall_back(&mut self, from: Side, ops: &mut Vec<Op>) {
        let Some(splice) = self.splice_mut(from) else {
            return;
        };
        splice.mode = SpliceMode::Never;
        let in_pipe = splice.in_pipe;
        if in_pipe > 0 {
            ops.push(Op::DrainPipe(from));
        }
        // After the drain, which reads the pipe to its end.
        ops.push(Op::ReturnPipe { from, empty: true });
        if in_pipe == 0 {
            self.pump(from, ops);
            self.rearm_if_room(from, false, ops);
        }
    }

    /// Gives the kernel pipe of the pipe reading `from` back, if it holds one.
    pub(super) fn return_pipe(&mut self, from: Side, ops: &mut Vec<Op>) {
        if let Some(splice) = self.splice_mut(from) {
            if splice.mode == SpliceMode::On {
                splice.mode = SpliceMode::Off;
                let empty = splice.in_pipe == 0;
                ops.push(Op::ReturnPipe { from, empty });
            }
        }
    }

    /// The next splice step of the pipe reading `from`: out first (the pipe's bytes go to the
    /// destination), then in while the kernel pipe has room, or the shutdown after EOF. At
    /// most one splice call is asked for at a time, so a result never finds another one of the
    /// same pipe queued behind it (a fall-back or a close acts on a quiet pipe).
    pub(super) fn drive_splice(&mut self, from: Side, ops: &mut Vec<Op>) {
        if self.phase != Phase::Relaying || self.quiescing {
            return;
        }
        let pipe = &mut self.pipes[from.pipe()];
        let Some(splice) = self.splice.as_deref_mut().map(|s| &mut s[from.pipe()]) else {
            return;
        };
        let room = splice.room;
        if splice.mode != SpliceMode::On
            || !pipe.buffered_empty()
            || splice.in_pending
            || splice.out_pending
        {
            return;
        }
        if splice.in_pipe > 0 && !splice.poll_out {
            splice.out_pending = true;
            ops.push(Op::SpliceOut {
                from,
                len: splice.in_pipe,
            });
            return;
        }
        if splice.in_pipe == 0 && pipe.recv == RecvState::Eof {
            if pipe.shutdown == ShutdownState::NotYet {
                pipe.shutdown = ShutdownState::InFlight;
                ops.push(Op::Shutdown(from.other()));
            }
            return;
        }
        if pipe.recv == RecvState::Off
            && !splice.poll_in
            && !splice.pipe_full
            && splice.in_pipe < room
        {
            if splice.rounds >= SPLICE_ROUNDS {
                // Enough for one turn: the poll completes at once if more is waiting, after
                // the other flows' completions.
                splice.rounds = 0;
                splice.poll_in = true;
                ops.push(Op::PollIn(from));
            } else {
                splice.rounds += 1;
                splice.in_pending = true;
                ops.push(Op::SpliceIn {
                    from,
                    len: room - splice.in_pipe,
                });
            }
        }
    }
}

/// Errors that say splice cannot work on these descriptors (not that the connection failed).
fn splice_unsupported(errno: i32) -> bool {
    matches!(
        errno,
        libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS | libc::EBADF
    )
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use super::*;
    use Side::{Backend, Client};

    const PIPE: u32 = 262_144;
    const LIMITS: Limits = Limits {
        retries: 1,
        max_queued: 4,
        read_header: false,
        splice_after_units: (65536 / SPLICE_UNIT) as u16,
    };

    fn take(ops: &mut Vec<Op>) -> Vec<Op> {
        std::mem::take(ops)
    }

    fn relaying() -> Flow {
        let mut f = Flow::new(LIMITS);
        let mut ops = Vec::new();
        f.start(&mut ops);
        f.on_connect_submitted();
        f.on_connect(0, &mut ops);
        f.on_link_timeout(&mut ops);
        f
    }

    /// A download that proved bulk, got its pipe, delivered its two buffers and now splices:
    /// its first `SpliceIn` has been asked for.
    fn splicing_download() -> (Flow, Vec<Op>) {
        let mut f = relaying();
        let mut ops = Vec::new();
        f.on_recv(Backend, 65536, Some(1), true, false, &mut ops);
        assert!(
            !ops.contains(&Op::TakePipe(Backend)),
            "one full buffer is not a stream"
        );
        ops.clear();
        f.on_recv(Backend, 65536, Some(2), true, false, &mut ops);
        assert_eq!(
            take(&mut ops),
            [Op::TakePipe(Backend)],
            "no recv once it asked"
        );
        f.on_pipe(Backend, Some(PIPE), false, &mut ops);
        assert!(ops.is_empty(), "buffered bytes first: nothing spliced yet");
        f.on_send(Client, 65536, false, &mut ops);
        assert!(
            !ops.iter().any(|op| matches!(op, Op::SpliceIn { .. })),
            "still a buffer queued: {ops:?}"
        );
        ops.clear();
        f.on_send(Client, 65536, false, &mut ops);
        assert_eq!(
            take(&mut ops),
            [
                Op::ReturnBuffer(2),
                Op::SpliceIn {
                    from: Backend,
                    len: PIPE
                }
            ]
        );
        (f, ops)
    }

    #[test]
    fn a_bulk_direction_splices_only_after_its_buffered_bytes_are_delivered() {
        let (mut f, mut ops) = splicing_download();
        f.on_spliced_in(Backend, 100_000, &mut ops);
        assert_eq!(
            take(&mut ops),
            [Op::SpliceOut {
                from: Backend,
                len: 100_000
            }]
        );
        f.on_spliced_out(Backend, 100_000, &mut ops);
        assert_eq!(
            take(&mut ops),
            [Op::SpliceIn {
                from: Backend,
                len: PIPE
            }]
        );
        assert_eq!(f.bytes(), (0, 2 * 65536 + 100_000));
        // The upload direction is untouched: still buffered.
        f.on_recv(Client, 10, Some(3), false, false, &mut ops);
        assert!(ops.contains(&Op::Send {
            to: Backend,
            data: Data::Buffer(3),
            offset: 0,
            len: 10
        }));
    }

    #[test]
    fn small_messages_never_ask_for_a_pipe() {
        let mut f = relaying();
        let mut ops = Vec::new();
        for i in 0..50 {
            f.on_recv(Client, 64, Some(i), false, false, &mut ops);
            f.on_send(Backend, 64, false, &mut ops);
        }
        // Full buffers, but not in a row.
        for i in 0..10 {
            let len = if i % 2 == 0 { 65536 } else { 100 };
            f.on_recv(Client, len, Some(i), false, false, &mut ops);
            f.on_send(Backend, len, false, &mut ops);
        }
        assert!(
            !ops.iter().any(|op| matches!(op, Op::TakePipe(_))),
            "{ops:?}"
        );
    }

    #[test]
    fn no_pipe_free_keeps_the_buffered_path() {
        let mut f = relaying();
        let mut ops = Vec::new();
        f.on_recv(Backend, 65536, Some(1), true, false, &mut ops);
        f.on_recv(Backend, 65536, Some(2), true, false, &mut ops);
        ops.clear();
        f.on_pipe(Backend, None, false, &mut ops);
        assert_eq!(
            take(&mut ops),
            [Op::Recv {
                from: Backend,
                poll_first: false,
                small: false
            }],
            "two buffers held, room for more"
        );
    }

    #[test]
    fn an_empty_source_is_polled_and_a_full_destination_waits_for_pollout() {
        let (mut f, mut ops) = splicing_download();
        f.on_spliced_in(Backend, -libc::EAGAIN, &mut ops);
        assert_eq!(take(&mut ops), [Op::PollIn(Backend)]);
        f.on_poll_in(Backend, libc::POLLIN as i32, &mut ops);
        assert_eq!(
            take(&mut ops),
            [Op::SpliceIn {
                from: Backend,
                len: PIPE
            }]
        );
        f.on_spliced_in(Backend, 200_000, &mut ops);
        ops.clear();
        // The client takes only part: wait for POLLOUT; the pipe still has room, so read on.
        f.on_spliced_out(Backend, 50_000, &mut ops);
        assert_eq!(
            take(&mut ops),
            [
                Op::PollOut(Client),
                Op::SpliceIn {
                    from: Backend,
                    len: PIPE - 150_000
                }
            ]
        );
        // The kernel pipe is full (EAGAIN with bytes in it): no poll on the source, which
        // would fire at once and spin; wait for the destination instead.
        f.on_spliced_in(Backend, -libc::EAGAIN, &mut ops);
        assert!(ops.is_empty(), "{ops:?}");
        assert_eq!(f.bytes_in_pipe(Backend), 150_000);
        f.on_poll_out(Client, libc::POLLOUT as i32, &mut ops);
        assert_eq!(
            take(&mut ops),
            [Op::SpliceOut {
                from: Backend,
                len: 150_000
            }]
        );
    }

    #[test]
    fn the_pipe_never_holds_more_than_the_budget() {
        let (mut f, mut ops) = splicing_download();
        f.on_spliced_in(Backend, PIPE as i32, &mut ops);
        assert_eq!(
            take(&mut ops),
            [Op::SpliceOut {
                from: Backend,
                len: PIPE
            }],
            "a full pipe reads nothing more"
        );
        f.on_spliced_out(Backend, -libc::EAGAIN, &mut ops);
        assert_eq!(take(&mut ops), [Op::PollOut(Client)]);
        assert_eq!(f.bytes_in_pipe(Backend), PIPE);
    }

    #[test]
    fn eof_becomes_the_shutdown_once_the_pipe_is_empty() {
        let (mut f, mut ops) = splicing_download();
        f.on_spliced_in(Backend, 1000, &mut ops);
        ops.clear(); // out 1000
        f.on_spliced_out(Backend, -libc::EAGAIN, &mut ops);
        assert_eq!(
            take(&mut ops),
            [
                Op::PollOut(Client),
                Op::SpliceIn {
                    from: Backend,
                    len: PIPE - 1000
                }
            ]
        );
        f.on_spliced_in(Backend, 0, &mut ops);
        assert!(
            ops.is_empty(),
            "bytes still in the pipe: no shutdown yet: {ops:?}"
        );
        f.on_poll_out(Client, libc::POLLOUT as i32, &mut ops);
        ops.clear(); // out 1000
        f.on_spliced_out(Backend, 1000, &mut ops);
        assert_eq!(take(&mut ops), [Op::Shutdown(Client)]);
        f.on_shutdown(Client, 0, &mut ops);
        assert!(ops.is_empty());
        // The other direction ends too: both shutdowns done, the pipe comes back empty.
        f.on_recv(Client, 0, None, false, false, &mut ops);
        assert_eq!(take(&mut ops), [Op::Shutdown(Backend)]);
        f.on_shutdown(Backend, 0, &mut ops);
        assert_eq!(
            ops,
            [
                Op::ReturnPipe {
                    from: Backend,
                    empty: true
                },
                Op::Release(Ending {
                    reason: CloseReason::Done,
                    reset_client: false,
                    reset_backend: false
                })
            ]
        );
        assert_eq!(f.bytes(), (0, 2 * 65536 + 1000));
    }

    #[test]
    fn a_reset_while_the_pipe_holds_bytes_resets_the_other_side_and_closes_the_pipe() {
        let (mut f, mut ops) = splicing_download();
        f.on_spliced_in(Backend, 5000, &mut ops);
        ops.clear();
        f.on_spliced_out(Backend, -libc::EPIPE, &mut ops);
        // The upload's recv is cancelled; release waits for it.
        assert_eq!(take(&mut ops), [Op::Cancel(Target::Recv(Client))]);
        f.on_recv(Client, -libc::ECANCELED, None, false, false, &mut ops);
        f.on_cancel_done(&mut ops);
        assert_eq!(
            take(&mut ops),
            [
                Op::ReturnPipe {
                    from: Backend,
                    empty: false
                },
                Op::Release(Ending {
                    reason: CloseReason::ClientReset,
                    reset_client: false,
                    reset_backend: true
                })
            ]
        );
    }

    #[test]
    fn closing_cancels_the_polls_and_releases_after_them() {
        let (mut f, mut ops) = splicing_download();
        f.on_spliced_in(Backend, -libc::EAGAIN, &mut ops);
        ops.clear();
        f.abort(CloseReason::IdleTimeout, &mut ops);
        assert!(
            ops.contains(&Op::Cancel(Target::PollIn(Backend))),
            "{ops:?}"
        );
        assert!(released(&ops).is_none());
        ops.clear();
        f.on_poll_in(Backend, -libc::ECANCELED, &mut ops);
        f.on_cancel_done(&mut ops);
        f.on_recv(Client, -libc::ECANCELED, None, false, false, &mut ops);
        f.on_cancel_done(&mut ops);
        assert!(ops.contains(&Op::ReturnPipe {
            from: Backend,
            empty: true
        }));
        assert_eq!(
            released(&ops).map(|e| e.reason),
            Some(CloseReason::IdleTimeout)
        );
    }

    fn released(ops: &[Op]) -> Option<Ending> {
        ops.iter().find_map(|op| match op {
            Op::Release(e) => Some(*e),
            _ => None,
        })
    }

    #[test]
    fn a_splice_error_like_einval_falls_back_to_buffers_without_losing_bytes() {
        let (mut f, mut ops) = splicing_download();
        f.on_spliced_in(Backend, 3000, &mut ops);
        ops.clear();
        f.on_spliced_out(Backend, -libc::EINVAL, &mut ops);
        assert_eq!(
            take(&mut ops),
            [
                Op::DrainPipe(Backend),
                Op::ReturnPipe {
                    from: Backend,
                    empty: true
                }
            ]
        );
        f.on_pipe_drained(Backend, 3000, &mut ops);
        assert_eq!(
            take(&mut ops),
            [Op::Send {
                to: Client,
                data: Data::Spill,
                offset: 0,
                len: 3000
            }]
        );
        f.on_send(Client, 3000, false, &mut ops);
        assert_eq!(
            take(&mut ops),
            [
                Op::DropSpill(Backend),
                Op::Recv {
                    from: Backend,
                    poll_first: false,
                    small: false
                }
            ]
        );
        assert_eq!(f.bytes(), (0, 2 * 65536 + 3000));
    }

    #[test]
    fn a_fast_stream_yields_after_a_few_rounds() {
        let (mut f, _) = splicing_download();
        let mut ops = vec![Op::SpliceIn {
            from: Backend,
            len: PIPE,
        }];
        let mut polled = false;
        for _ in 0..2 * SPLICE_ROUNDS {
            let Some(Op::SpliceIn { len, .. }) = ops
                .iter()
                .copied()
                .find(|op| matches!(op, Op::SpliceIn { .. }))
            else {
                polled = ops.contains(&Op::PollIn(Backend));
                break;
            };
            ops.clear();
            f.on_spliced_in(Backend, len as i32, &mut ops);
            ops.clear();
            f.on_spliced_out(Backend, len as i32, &mut ops);
        }
        assert!(polled, "never yielded: {ops:?}");
    }

    #[test]
    fn a_handover_takes_the_bytes_in_the_pipe_and_a_resumed_flow_sends_them_first() {
        let (mut f, mut ops) = splicing_download();
        f.on_spliced_in(Backend, 7000, &mut ops);
        ops.clear();
        f.on_spliced_out(Backend, 2000, &mut ops);
        assert_eq!(
            take(&mut ops),
            [
                Op::PollOut(Client),
                Op::SpliceIn {
                    from: Backend,
                    len: PIPE - 5000
                }
            ]
        );
        f.on_spliced_in(Backend, -libc::EAGAIN, &mut ops); // full: wait for the client
        assert!(ops.is_empty(), "{ops:?}");
        f.quiesce(&mut ops);
        assert!(ops.contains(&Op::Cancel(Target::PollOut(Client))));
        assert!(ops.contains(&Op::DrainPipe(Backend)));
        ops.clear();
        f.on_pipe_drained(Backend, 5000, &mut ops);
        assert!(ops.is_empty(), "quiescing: nothing sent: {ops:?}");
        f.on_poll_out(Client, -libc::ECANCELED, &mut ops);
        f.on_cancel_done(&mut ops);
        f.on_recv(Client, -libc::ECANCELED, None, false, false, &mut ops);
        f.on_cancel_done(&mut ops);
        assert!(f.is_quiesced());
        assert_eq!(f.export()[1].pending, vec![(Data::Spill, 0, 5000)]);
        assert_eq!(f.bytes(), (0, 2 * 65536 + 2000));
        // The handover failed: the drained bytes go first, then splicing again.
        ops.clear();
        f.resume(false, &mut ops);
        assert!(ops.contains(&Op::Send {
            to: Client,
            data: Data::Spill,
            offset: 0,
            len: 5000
        }));
        ops.clear();
        f.on_send(Client, 5000, false, &mut ops);
        assert_eq!(
            ops,
            [
                Op::DropSpill(Backend),
                Op::SpliceIn {
                    from: Backend,
                    len: PIPE
                }
            ]
        );
        // Handed off instead: the (empty) pipe goes back.
        let mut ops = Vec::new();
        f.hand_off(&mut ops);
        assert!(ops.contains(&Op::ReturnPipe {
            from: Backend,
            empty: true
        }));
    }
}
