//! Accepting: the multishot (or, near `--max-conns`, single-shot) accept on the listener,
//! pausing it at the limit or after EMFILE, parked connections, and closing the listener.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use io_uring::{opcode, types};
use log::debug;

use super::token::{Kind, Token};
use super::{AcceptState, Worker};

/// Flows started per event-loop turn at most (see `may_start_more`).
const START_BATCH: usize = 256;

/// How long accepting pauses after EMFILE/ENFILE before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

impl Worker {
    pub(super) fn arm_accept(&mut self) {
        if self.stopping || self.handover.is_some() || self.accept != AcceptState::Paused {
            return;
        }
        let Some(listener) = &self.listener else {
            return;
        };
        // A multishot accept takes everything queued on the listener in one go, before a cancel
        // can stop it. Far from --max-conns that is what we want; close to it, it would pull
        // the whole backlog into user space (and past the fd limit) instead of leaving it in the
        // kernel, so there one connection is accepted per submission.
        let multishot = self.room() > self.settings.multishot_accept_room;
        let fd = types::Fd(listener.as_raw_fd());
        let flags = libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
        let entry = if multishot {
            opcode::AcceptMulti::new(fd).flags(flags).build()
        } else {
            opcode::Accept::new(fd, std::ptr::null_mut(), std::ptr::null_mut())
                .flags(flags)
                .build()
        };
        self.push(entry.user_data(Token::worker(Kind::Accept).encode()));
        self.accept = AcceptState::Armed;
        self.accept_multishot = multishot;
    }

    pub(super) fn cancel_accept(&mut self) {
        if self.accept == AcceptState::Armed {
            let entry = opcode::AsyncCancel::new(Token::worker(Kind::Accept).encode())
                .build()
                .user_data(Token::worker(Kind::AcceptCancel).encode());
            self.push(entry);
            self.accept = AcceptState::Cancelling;
        }
    }

    /// Flows that may still start before `--max-conns` (every worker's, and those whose
    /// descriptors are still being closed).
    fn room(&self) -> usize {
        self.settings
            .max_conns
            .saturating_sub(self.active_flows.load(Ordering::Relaxed))
    }

    fn has_room(&self) -> bool {
        self.room() > 0
    }

    /// This event-loop turn has not started `START_BATCH` flows yet. A multishot accept can
    /// deliver thousands of connections in one turn, and starting a flow costs system calls
    /// (socket, options): 3,800 started in one turn held every other flow of the worker up for
    /// 117 ms. The rest wait parked and start over the next turns, and accepting pauses until
    /// they have (the kernel's listen queue holds what comes meanwhile).
    fn may_start_more(&self) -> bool {
        self.started_this_turn < START_BATCH
    }

    /// Connections accepted and waiting while there is room: the next turn starts more of them
    /// (so the event loop must not sleep).
    pub(super) fn has_start_backlog(&self) -> bool {
        !self.hard_stop && !self.parked.is_empty() && self.has_room()
    }

    /// Takes one share of `--max-conns` for a flow about to start, or fails at the limit. A
    /// compare-and-swap, not a check followed by an add: workers taking the last share at the
    /// same moment cannot both get it. Given back by `start_flow` (client gone or refused) or
    /// when the flow's descriptors are closed (`on_flow_closed`).
    fn take_slot(&self) -> bool {
        take_share(&self.active_flows, self.settings.max_conns)
    }

    /// Starts a flow on an accepted connection if a share of `--max-conns` is free and no
    /// connection accepted earlier is waiting; otherwise parks it, served first when room
    /// comes back.
    pub(super) fn start_or_park(&mut self, fd: OwnedFd) {
        if self.parked.is_empty() && self.may_start_more() && self.take_slot() {
            self.started_this_turn += 1;
            self.start_flow(fd);
        } else {
            self.parked.push_back(fd);
        }
    }

    pub(super) fn on_accept(&mut self, res: i32, more: bool) {
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
            // Passed to a worker holding clearly fewer flows, or started here (handoff.rs).
            if let Some(fd) = self.hand_off_if_busier(fd) {
                self.start_or_park(fd);
                if !self.parked.is_empty() {
                    // Parked at the limit (held like the kernel backlog would; single-shot
                    // accepts make that one per worker), or behind earlier ones: serve them in
                    // order while there is room.
                    self.resume_accepting();
                }
            }
            self.narrow_accepting();
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
    pub(super) fn close_listener(&mut self) {
        if let (Some(listener), false) = (&self.listener, self.hard_stop) {
            let mut queued = Vec::new();
            while let Ok((socket, _)) = listener.accept() {
                queued.push(OwnedFd::from(socket));
            }
            for fd in queued {
                self.start_or_park(fd);
            }
        }
        self.listener = None;
        self.accept = AcceptState::Closed;
    }

    /// Serve parked connections and resume accepting when there is room again.
    pub(super) fn resume_accepting(&mut self) {
        if self.hard_stop {
            return;
        }
        while !self.parked.is_empty() && self.may_start_more() && self.take_slot() {
            if let Some(fd) = self.parked.pop_front() {
                self.started_this_turn += 1;
                self.start_flow(fd);
            }
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

    /// Stops the armed accept when it takes more than the room left allows: at the limit, and
    /// (multishot) as soon as the room is down to what every worker's listen backlog could fill
    /// in one go, so that the next accept is single-shot and the rest of a burst stays queued
    /// in the kernel. A multishot accept left armed until the limit took a whole backlog into
    /// the process at once: parked connections beyond --max-conns, and descriptors the flows
    /// then lacked for their backend sockets.
    fn narrow_accepting(&mut self) {
        let room = self.room();
        let too_wide =
            room == 0 || (self.accept_multishot && room <= self.settings.multishot_accept_room);
        if too_wide {
            self.cancel_accept();
        }
    }
}

/// Adds one to `active` unless that would pass `max`; whether it did.
fn take_share(active: &AtomicUsize, max: usize) -> bool {
    active
        .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn shares_taken_at_once_never_pass_the_limit() {
        const MAX: usize = 100;
        let active = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let active = Arc::clone(&active);
                std::thread::spawn(move || (0..10_000).filter(|_| take_share(&active, MAX)).count())
            })
            .collect();
        let taken: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(taken, MAX);
        assert_eq!(active.load(Ordering::Relaxed), MAX);
        assert!(!take_share(&active, MAX));
        active.fetch_sub(1, Ordering::Relaxed);
        assert!(
            take_share(&active, MAX),
            "a share given back can be taken again"
        );
    }
}
