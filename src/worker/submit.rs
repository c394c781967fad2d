//! Submission: pushing entries into the submission queue (submitting early when it is full)
//! and reaping completions.

use std::os::fd::RawFd;

use io_uring::{opcode, squeue, types};
use log::warn;

use super::token::{Kind, Token};
use super::Worker;

/// `IORING_ENTER_GETEVENTS` (the io-uring crate keeps its constants private).
const IORING_ENTER_GETEVENTS: u32 = 1;

impl Worker {
    pub(super) fn push(&mut self, entry: squeue::Entry) {
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

    pub(super) fn push_linked(&mut self, first: squeue::Entry, second: squeue::Entry) {
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

    /// Submits and gathers the completions that are ready, without waiting for one. Unlike
    /// `submit_and_wait(0)`, this always asks for events: with DEFER_TASKRUN the kernel runs
    /// this thread's deferred work (the receives other flows' data woke) only then, so a worker
    /// busy with a long batch of its own still serves them every turn.
    pub(super) fn submit_and_collect(&mut self) -> std::io::Result<usize> {
        let pending = self.ring.submission().len() as u32;
        // SAFETY: io_uring_enter with GETEVENTS, min_complete 0 and no argument: it only
        // submits the entries already in the queue (valid as `push` documents) and runs
        // pending work; no pointer is passed.
        unsafe {
            self.ring
                .submitter()
                .enter::<libc::sigset_t>(pending, 0, IORING_ENTER_GETEVENTS, None)
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

    /// Moves every posted completion into `completions`.
    pub(super) fn reap(&mut self) {
        for cqe in self.ring.completion() {
            self.completions
                .push((cqe.user_data(), cqe.result(), cqe.flags()));
        }
    }

    /// Closes a released flow's sockets through the ring. The closes are hard-linked (the
    /// second runs even if the first fails) and only the last one always completes, as
    /// `FlowClosed`: until then the descriptors are still open, so the flow keeps its share of
    /// `--max-conns` (see `Worker::on_flow_closed`).
    pub(super) fn close_flow(&mut self, client: RawFd, backend: Option<RawFd>) {
        let last = |fd| {
            opcode::Close::new(types::Fd(fd))
                .build()
                .user_data(Token::worker(Kind::FlowClosed).encode())
        };
        match backend {
            None => self.push(last(client)),
            Some(backend) => {
                let first = opcode::Close::new(types::Fd(client))
                    .build()
                    .flags(squeue::Flags::IO_HARDLINK | squeue::Flags::SKIP_SUCCESS)
                    .user_data(Token::worker(Kind::Close).encode());
                self.push_linked(first, last(backend));
            }
        }
    }
}
