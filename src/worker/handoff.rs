//! Load-aware hand-off of accepted connections between workers.
//!
//! The kernel's SO_REUSEPORT hash picks the worker for each new connection. Over thousands of
//! short connections that evens out (within 1% measured), but a few long-lived flows do not:
//! 32 of them split 19/13 or 12/20. So each worker publishes how many flows it holds, and a
//! worker that accepts a connection while it holds clearly more than the least-loaded worker
//! passes the connection to that worker instead of starting the flow itself. The target
//! starts it exactly as if it had accepted it (`start_or_park`: admission, PROXY header,
//! metrics, access log); a handed-in connection is never handed on again.
//!
//! What is shared, per worker, on its own cache line ([`Peer`]):
//! - `load`: flows the worker holds (slots + parked), or [`NOT_TAKING`] while it stops, drains
//!   or hands over to a successor. Only its owner stores it, once per event-loop turn when it
//!   changed; the others read it relaxed. The common accept costs one or two relaxed loads
//!   per other worker and no write.
//! - `incoming`: connections sent to it that it has not started yet, so that several
//!   connections handed off in one turn do not all go to the same worker before its `load`
//!   moves. Written (one atomic add) only by a hand-off, never on a plain accept.
//! - the inbox: a crossbeam channel of descriptors, and an eventfd the owner keeps an io_uring
//!   read armed on, so a sleeping target wakes at once.
//!
//! Why a channel and an eventfd rather than IORING_OP_MSG_RING: a message to another ring
//! names that ring by descriptor, and a worker's ring descriptor can be closed (the worker
//! ended) and its number reused between reading it and submitting; keeping a duplicate open
//! instead would keep the ring, and the kernel's use of the ended worker's buffers, alive.
//! The eventfd is owned here, so it outlives every sender, and a hand-off is rare (only when
//! the split is off), so its write(2) costs nothing measurable (docs/benchmarks.md, issue 10).
//!
//! No descriptor leaks: if the target has ended, sending fails and the connection is started
//! here; one queued to a worker that ends before it reads its inbox is closed when the channel
//! is dropped with it; a worker that is stopping hard closes what arrives (as it does with a
//! connection its own accept brings in then).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use io_uring::{opcode, types};

use super::token::{Kind, Token};
use super::Worker;

/// The published `load` of a worker that takes no new connections.
const NOT_TAKING: usize = usize::MAX;

/// Whether a worker holding `mine` flows should pass a new connection to one holding `least`.
///
/// Only when it holds at least 2 more, plus one more per 16 it holds: with a few long-lived
/// flows this keeps the split within one or two flows of even (32 flows: 17/15 at worst); with
/// many it lets the counts wander by about 6% before moving anything, so connection churn,
/// whose counts go up and down by a few all the time, rarely moves a connection. Two workers
/// can never pass connections to each other at once: each would have to hold 2 more than the
/// other.
pub fn should_hand_off(mine: usize, least: usize) -> bool {
    mine >= least.saturating_add(2 + mine / 16)
}

/// One worker's shared load and inbox, alone on its cache lines (128 bytes: a line and its
/// adjacent-line prefetch pair), so a worker storing its load does not disturb the others'.
#[repr(align(128))]
struct Peer {
    load: AtomicUsize,
    incoming: AtomicUsize,
    inbox: Sender<OwnedFd>,
    bell: OwnedFd,
}

/// Every worker's [`Peer`], shared by all workers.
pub struct Peers {
    peers: Box<[Peer]>,
}

/// One worker's side: the shared table, its inbox, and the buffer its armed eventfd read
/// fills (declared in `Worker` after the ring, so the kernel is done with it before it goes).
pub struct Handoff {
    id: usize,
    peers: Arc<Peers>,
    inbox: Receiver<OwnedFd>,
    bell_buf: Box<u64>,
    /// What this worker last stored in its `load` (stores only when it changes).
    published: usize,
}

/// Creates the table and one [`Handoff`] per worker, in worker order.
pub fn for_workers(workers: usize) -> io::Result<Vec<Handoff>> {
    let mut peers = Vec::with_capacity(workers);
    let mut inboxes = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (inbox, receiver) = crossbeam_channel::unbounded();
        peers.push(Peer {
            load: AtomicUsize::new(0),
            incoming: AtomicUsize::new(0),
            inbox,
            bell: new_eventfd()?,
        });
        inboxes.push(receiver);
    }
    let peers = Arc::new(Peers {
        peers: peers.into_boxed_slice(),
    });
    Ok(inboxes
        .into_iter()
        .enumerate()
        .map(|(id, inbox)| Handoff {
            id,
            peers: Arc::clone(&peers),
            inbox,
            bell_buf: Box::new(0),
            published: 0,
        })
        .collect())
}

fn new_eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers; a non-negative result is a new descriptor we own.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Handoff {
    /// A single worker has nobody to hand to.
    fn alone(&self) -> bool {
        self.peers.peers.len() < 2
    }

    /// Stores this worker's load for the others (only when it changed: no needless write to a
    /// line others read). `None`: it takes no new connections.
    fn publish(&mut self, load: Option<usize>) {
        let value = load.unwrap_or(NOT_TAKING);
        if value != self.published {
            self.published = value;
            self.peers.peers[self.id]
                .load
                .store(value, Ordering::Relaxed);
        }
    }

    /// The worker to pass a new connection to, if this one holds `mine` flows and another that
    /// takes connections holds clearly fewer (`should_hand_off`).
    fn choose(&self, mine: usize) -> Option<usize> {
        let mut least: Option<(usize, usize)> = None;
        for (id, peer) in self.peers.peers.iter().enumerate() {
            if id == self.id {
                continue;
            }
            let load = peer.load.load(Ordering::Relaxed);
            if load == NOT_TAKING {
                continue;
            }
            let load = load.saturating_add(peer.incoming.load(Ordering::Relaxed));
            if least.is_none_or(|(_, l)| load < l) {
                least = Some((id, load));
            }
        }
        let (target, least) = least?;
        should_hand_off(mine, least).then_some(target)
    }

    /// Queues `fd` for worker `target` and rings its bell; gives `fd` back if it has ended.
    fn send(&self, target: usize, fd: OwnedFd) -> Result<(), OwnedFd> {
        let peer = &self.peers.peers[target];
        peer.incoming.fetch_add(1, Ordering::Relaxed);
        if let Err(refused) = peer.inbox.send(fd) {
            peer.incoming.fetch_sub(1, Ordering::Relaxed);
            return Err(refused.into_inner());
        }
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd this table owns (it outlives
        // every sender). Non-blocking: it could only fail if the counter reached 2^64 - 1.
        unsafe {
            libc::write(
                peer.bell.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            );
        }
        Ok(())
    }
}

impl Worker {
    /// Arms the read on this worker's eventfd that wakes it for handed-in connections.
    pub(super) fn arm_handoff(&mut self) {
        if self.handoff.alone() {
            return;
        }
        let bell = self.handoff.peers.peers[self.handoff.id].bell.as_raw_fd();
        let buf: *mut u64 = &mut *self.handoff.bell_buf;
        let entry = opcode::Read::new(types::Fd(bell), buf.cast(), 8)
            .build()
            .user_data(Token::worker(Kind::HandedIn).encode());
        self.push(entry);
    }

    /// Flows this worker holds, as the others should see it: `None` while it takes no new
    /// connections (stopping, draining, handing over to a successor). Once per event-loop turn.
    pub(super) fn publish_load(&mut self) {
        let load = (!self.stopping && self.handover.is_none())
            .then(|| self.slots.len() + self.parked.len());
        self.handoff.publish(load);
    }

    /// Passes a connection this worker just accepted to a less loaded worker, if one holds
    /// clearly fewer flows; otherwise gives it back to be started here.
    pub(super) fn hand_off_if_busier(&mut self, fd: OwnedFd) -> Option<OwnedFd> {
        if self.stopping || self.handover.is_some() {
            return Some(fd);
        }
        let mine = self.slots.len() + self.parked.len();
        let Some(target) = self.handoff.choose(mine) else {
            return Some(fd);
        };
        match self.handoff.send(target, fd) {
            Ok(()) => {
                self.stats.flow_handed_off();
                None
            }
            Err(fd) => Some(fd),
        }
    }

    /// The eventfd read completed: start every connection waiting in the inbox as if this
    /// worker had accepted it.
    pub(super) fn on_handed_in(&mut self, res: i32) {
        let mut taken = 0;
        while let Ok(fd) = self.handoff.inbox.try_recv() {
            taken += 1;
            if self.hard_stop {
                continue; // dropped: closed, like a connection accepted now
            }
            if self.handover.is_some() {
                // Moving to a successor: it goes with the other connections not started.
                self.parked.push_back(fd);
            } else {
                self.start_or_park(fd);
            }
        }
        if taken > 0 {
            // The load first, then the count in flight, so others never see this worker
            // lighter than it is (relaxed: at worst one more connection comes here).
            self.publish_load();
            self.handoff.peers.peers[self.handoff.id]
                .incoming
                .fetch_sub(taken, Ordering::Relaxed);
            if !self.parked.is_empty() && self.handover.is_none() {
                self.resume_accepting();
            }
        }
        if res > 0 && !self.hard_stop {
            self.arm_handoff();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_few_flows_stay_within_one_or_two_of_even() {
        assert!(!should_hand_off(0, 0));
        assert!(!should_hand_off(1, 0));
        assert!(should_hand_off(2, 0));
        assert!(!should_hand_off(16, 15));
        assert!(!should_hand_off(17, 15));
        assert!(should_hand_off(18, 15));
    }

    #[test]
    fn many_flows_may_wander_a_little_before_anything_moves() {
        assert!(!should_hand_off(1000, 940));
        assert!(should_hand_off(1000, 930));
    }

    #[test]
    fn two_workers_never_pass_to_each_other_at_once() {
        for a in 0..200 {
            for b in 0..200 {
                assert!(!(should_hand_off(a, b) && should_hand_off(b, a)), "{a} {b}");
            }
        }
    }

    /// Simulates workers where the kernel's hash sends every connection to worker 0: with
    /// hand-offs the long-lived flows end up within one or two of even.
    #[test]
    fn connections_all_arriving_at_one_worker_end_up_even() {
        let mut handoffs = for_workers(2).unwrap();
        let mut held = [0usize; 2];
        for _ in 0..32 {
            match handoffs[0].choose(held[0]) {
                Some(target) => {
                    assert_eq!(target, 1);
                    held[1] += 1;
                    handoffs[1].publish(Some(held[1]));
                }
                None => {
                    held[0] += 1;
                    handoffs[0].publish(Some(held[0]));
                }
            }
        }
        assert!(held[0].abs_diff(held[1]) <= 2, "{held:?}");
    }

    #[test]
    fn a_worker_that_takes_nothing_is_never_chosen() {
        let mut handoffs = for_workers(2).unwrap();
        handoffs[1].publish(None);
        assert_eq!(handoffs[0].choose(100), None);
        handoffs[1].publish(Some(3));
        assert_eq!(handoffs[0].choose(100), Some(1));
    }

    #[test]
    fn connections_in_flight_count_against_the_target() {
        let handoffs = for_workers(2).unwrap();
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(handoffs[0].choose(3), Some(1));
        handoffs[0].send(1, OwnedFd::from(a)).unwrap();
        handoffs[0].send(1, OwnedFd::from(b)).unwrap();
        // Worker 1 holds nothing yet but has two on the way: 3 is not 2 more than 2.
        assert_eq!(handoffs[0].choose(3), None);
        assert_eq!(handoffs[1].inbox.len(), 2);
    }

    #[test]
    fn a_connection_for_a_worker_that_ended_comes_back() {
        let mut handoffs = for_workers(2).unwrap();
        drop(handoffs.pop()); // worker 1 ended: its inbox is gone
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(handoffs[0].send(1, OwnedFd::from(a)).is_err());
        assert_eq!(
            handoffs[0].peers.peers[1].incoming.load(Ordering::Relaxed),
            0
        );
    }

    #[test]
    fn a_connection_queued_to_a_worker_that_ends_is_closed_not_leaked() {
        use std::io::Read;
        let mut handoffs = for_workers(2).unwrap();
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        handoffs[0].send(1, OwnedFd::from(a)).unwrap();
        drop(handoffs.pop()); // worker 1 ended before reading its inbox
        b.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        assert_eq!(
            b.read(&mut [0u8; 1]).unwrap(),
            0,
            "the other end was closed"
        );
    }
}
