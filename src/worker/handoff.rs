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
//! - `load`: flows the worker holds (slots + parked) plus connections sent to it that it has
//!   not started yet, with the [`NOT_TAKING`] bit set while it stops, drains or hands over to
//!   a successor. Exact at every moment, not a turn late: workers accept in bursts at the same
//!   moment (32 connections opened together), and a count stored once per turn let the other
//!   worker pass connections here it should have kept (22/10, 11/21). So it moves by atomic adds: the
//!   owner adds 1 for each connection it keeps, a sender adds 1 for each it passes here, and
//!   the owner settles the rest (flows that ended) once per turn. Others read it relaxed: the
//!   hand-off check costs one relaxed load per other worker.
//! - the inbox: a crossbeam channel of descriptors, and an eventfd the owner keeps an io_uring
//!   read armed on, so a sleeping target wakes at once.
//!
//! Why a channel and an eventfd rather than IORING_OP_MSG_RING: a message to another ring
//! names that ring by descriptor, and a worker's ring descriptor can be closed (the worker
//! ended) and its number reused between reading it and submitting; keeping a duplicate open
//! instead would keep the ring, and the kernel's use of the ended worker's buffers, alive.
//! The eventfd is owned here, so it outlives every sender, and hand-offs are few (at most 64
//! a second per worker, `HANDOFF_BURST`), so its write(2) costs nothing measurable
//! (docs/benchmarks.md, issue 10).
//!
//! No descriptor leaks: if the target has ended, sending fails and the connection is started
//! here; one queued to a worker that ends before it reads its inbox is closed when the channel
//! is dropped with it; a worker that is stopping hard closes what arrives (as it does with a
//! connection its own accept brings in then). A connection that reaches a worker during an
//! upgrade handover is parked and goes to the successor with its other unstarted connections.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use io_uring::{opcode, types};

use super::token::{Kind, Token};
use super::Worker;

/// Set in the `load` of a worker that takes no new connections (the count goes on below it).
const NOT_TAKING: usize = 1 << (usize::BITS - 1);

/// Whether a worker holding `mine` flows should pass a new connection to one holding `least`.
///
/// Only when it holds at least 3 more, or an eighth of what it holds if that is more. With a
/// few long-lived flows the difference then stays at most 3 (32 flows: 17/15 at worst, 6%
/// off even); with many, counts may wander by about 6% before anything moves, so connection
/// churn, whose counts go up and down all the time, moves few connections (docs/benchmarks.md,
/// issue 10). Two workers can never pass connections to each other at once: each would have
/// to hold 3 more than the other.
pub fn should_hand_off(mine: usize, least: usize) -> bool {
    mine >= least.saturating_add((mine / 8).max(3))
}

/// Connections a worker may pass on at once, and again per second after that.
///
/// The counts of connection churn go up and down by a few all the time, by chance and because
/// one worker is slower for a moment (sharing its CPU), and that crosses `should_hand_off`'s
/// threshold at a fraction of accepts (28% with 16 connect loops, measured), which moved the
/// churn split from the kernel hash's 1% to up to 11% off even. A bucket of 64 lets a burst of
/// long-lived connections even out at once (32 need at most 16 moves) and bounds what churn
/// can move to 64 a second per worker, a rounding error at thousands of connections a second.
const HANDOFF_BURST: f64 = 64.0;
const HANDOFF_RATE: f64 = 64.0;

/// A token bucket of hand-offs (`HANDOFF_BURST`, refilled at `HANDOFF_RATE` per second).
struct Budget {
    tokens: f64,
    at: Instant,
}

impl Budget {
    fn new(now: Instant) -> Budget {
        Budget {
            tokens: HANDOFF_BURST,
            at: now,
        }
    }

    /// Takes one hand-off if there is one left at `now`.
    fn take(&mut self, now: Instant) -> bool {
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * HANDOFF_RATE;
        self.tokens = (self.tokens + refill).min(HANDOFF_BURST);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// One worker's shared load and inbox, alone on its cache lines (128 bytes: a line and its
/// adjacent-line prefetch pair), so a worker storing its load does not disturb the others'.
#[repr(align(128))]
struct Peer {
    load: AtomicUsize,
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
    /// What this worker has added to its `load` for flows it holds (the rest of the count is
    /// connections on their way here).
    published: usize,
    /// Whether `load` says it takes new connections.
    taking: bool,
    budget: Budget,
}

/// Creates the table and one [`Handoff`] per worker, in worker order.
pub fn for_workers(workers: usize) -> io::Result<Vec<Handoff>> {
    let mut peers = Vec::with_capacity(workers);
    let mut inboxes = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (inbox, receiver) = crossbeam_channel::unbounded();
        peers.push(Peer {
            load: AtomicUsize::new(0),
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
            taking: true,
            budget: Budget::new(Instant::now()),
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

    fn load(&self) -> &AtomicUsize {
        &self.peers.peers[self.id].load
    }

    /// Brings this worker's `load` to `held` flows (no write when it is right already: others
    /// read that line), and says whether it takes new connections.
    fn settle(&mut self, held: usize, taking: bool) {
        if held != self.published {
            // Wrapping: a negative change is added as its two's complement, which leaves the
            // NOT_TAKING bit alone as long as the count stays >= 0 (it holds at least `held`).
            self.load()
                .fetch_add(held.wrapping_sub(self.published), Ordering::Relaxed);
            self.published = held;
        }
        if taking != self.taking {
            self.taking = taking;
            if taking {
                self.load().fetch_and(!NOT_TAKING, Ordering::Relaxed);
            } else {
                self.load().fetch_or(NOT_TAKING, Ordering::AcqRel);
            }
        }
    }

    /// What the others see this worker hold: its flows, and connections on their way here
    /// (which it must count too, or it keeps connections it should pass on while a burst it
    /// was sent waits in its inbox: 32 connections ended 14/18 that way).
    fn held(&self) -> usize {
        self.load().load(Ordering::Relaxed) & !NOT_TAKING
    }

    /// One connection more is held here (counted now, not at the end of the turn).
    fn kept(&mut self) {
        self.load().fetch_add(1, Ordering::Relaxed);
        self.published += 1;
    }

    /// `n` connections taken from the inbox: their senders counted them here already.
    fn took(&mut self, n: usize) {
        self.published += n;
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
            if load & NOT_TAKING != 0 {
                continue;
            }
            if least.is_none_or(|(_, l)| load < l) {
                least = Some((id, load));
            }
        }
        let (target, least) = least?;
        should_hand_off(mine, least).then_some(target)
    }

    /// Connections other workers counted into this worker's `load` and queued (or are about
    /// to queue) in its inbox, not taken out yet.
    fn in_flight(&self) -> usize {
        self.held().saturating_sub(self.published)
    }

    /// Queues `fd` for worker `target` and rings its bell; gives `fd` back if it has ended or
    /// has stopped taking connections.
    ///
    /// The count goes up before the send, and a target that has set `NOT_TAKING` is refused
    /// by the same atomic add: both are read-modify-writes of one word, so either this add
    /// comes first and the target, seeing it in its count, waits for the connection before it
    /// tells a successor it is drained (`in_flight`), or it comes second and sees the bit.
    /// Without it, a connection passed in the moment between the check in `choose` and the
    /// target's handover could reach the target after its `Drained` and wait there unserved.
    fn send(&self, target: usize, fd: OwnedFd) -> Result<(), OwnedFd> {
        let peer = &self.peers.peers[target];
        if peer.load.fetch_add(1, Ordering::AcqRel) & NOT_TAKING != 0 {
            peer.load.fetch_sub(1, Ordering::Relaxed);
            return Err(fd);
        }
        if let Err(refused) = peer.inbox.send(fd) {
            peer.load.fetch_sub(1, Ordering::Relaxed);
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

    /// Settles the flows this worker holds, and whether it takes new connections (not while
    /// stopping, draining or handing over to a successor), for the others. Once per turn.
    pub(super) fn publish_load(&mut self) {
        if self.handoff.alone() {
            return;
        }
        let taking = !self.stopping && self.handover.is_none();
        self.handoff
            .settle(self.slots.len() + self.parked.len(), taking);
    }

    /// Whether connections passed here before this worker stopped taking them may still be on
    /// their way (a handover waits for them before it says `Drained`; see `Handoff::send`).
    pub(super) fn handoffs_in_flight(&self) -> bool {
        !self.handoff.alone() && self.handoff.in_flight() > 0
    }

    /// Passes a connection this worker just accepted to a less loaded worker, if one holds
    /// clearly fewer flows; otherwise gives it back to be started here.
    pub(super) fn hand_off_if_busier(&mut self, fd: OwnedFd) -> Option<OwnedFd> {
        if self.stopping || self.handover.is_some() || self.handoff.alone() {
            return Some(fd);
        }
        let target = self
            .handoff
            .choose(self.handoff.held())
            .filter(|_| self.handoff.budget.take(Instant::now()));
        let fd = match target {
            Some(target) => match self.handoff.send(target, fd) {
                Ok(()) => {
                    self.stats.flow_handed_off();
                    return None;
                }
                Err(fd) => fd, // the target has ended
            },
            None => fd,
        };
        self.handoff.kept();
        Some(fd)
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
            self.handoff.took(taken);
            self.publish_load();
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
        assert!(!should_hand_off(2, 0));
        assert!(should_hand_off(3, 0));
        assert!(!should_hand_off(16, 14));
        assert!(should_hand_off(16, 13));
        assert!(!should_hand_off(17, 15));
        assert!(should_hand_off(18, 15));
    }

    #[test]
    fn many_flows_may_wander_a_little_before_anything_moves() {
        assert!(!should_hand_off(1000, 876));
        assert!(should_hand_off(1000, 875));
    }

    #[test]
    fn churn_can_move_only_a_bounded_number_a_second() {
        let start = Instant::now();
        let mut budget = Budget::new(start);
        let burst = (0..1000).filter(|_| budget.take(start)).count();
        assert_eq!(burst, HANDOFF_BURST as usize);
        let later = start + std::time::Duration::from_millis(500);
        let refilled = (0..1000).filter(|_| budget.take(later)).count();
        assert_eq!(refilled, (HANDOFF_RATE / 2.0) as usize);
        let much_later = later + std::time::Duration::from_secs(3600);
        let capped = (0..1000).filter(|_| budget.take(much_later)).count();
        assert_eq!(capped, HANDOFF_BURST as usize);
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
                    handoffs[1].kept();
                }
                None => {
                    held[0] += 1;
                    handoffs[0].kept();
                }
            }
        }
        assert_eq!(held, [17, 15]);
    }

    #[test]
    fn a_worker_that_takes_nothing_is_never_chosen() {
        let mut handoffs = for_workers(2).unwrap();
        handoffs[1].settle(3, false);
        assert_eq!(handoffs[0].choose(100), None);
        handoffs[1].settle(3, true);
        assert_eq!(handoffs[0].choose(100), Some(1));
        handoffs[1].settle(1, true);
        assert_eq!(handoffs[1].load().load(Ordering::Relaxed), 1);
    }

    #[test]
    fn connections_in_flight_count_against_the_target() {
        let mut handoffs = for_workers(2).unwrap();
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(handoffs[0].choose(3), Some(1));
        handoffs[0].send(1, OwnedFd::from(a)).unwrap();
        handoffs[0].send(1, OwnedFd::from(b)).unwrap();
        // Worker 1 holds nothing yet but has two on the way: 3 is not 3 more than 2.
        assert_eq!(handoffs[0].choose(3), None);
        assert_eq!(handoffs[1].inbox.len(), 2);
        // Taken and started there, then one ends: its count stays exact throughout.
        let mut target = handoffs.pop().unwrap();
        target.took(2);
        target.settle(2, true);
        assert_eq!(target.load().load(Ordering::Relaxed), 2);
        target.settle(1, false);
        assert_eq!(target.load().load(Ordering::Relaxed), 1 | NOT_TAKING);
        target.settle(4, true);
        assert_eq!(target.load().load(Ordering::Relaxed), 4);
    }

    #[test]
    fn a_connection_for_a_worker_that_ended_comes_back() {
        let mut handoffs = for_workers(2).unwrap();
        drop(handoffs.pop()); // worker 1 ended: its inbox is gone
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(handoffs[0].send(1, OwnedFd::from(a)).is_err());
        assert_eq!(handoffs[0].peers.peers[1].load.load(Ordering::Relaxed), 0);
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

    #[test]
    fn a_worker_that_stopped_taking_refuses_a_late_connection_and_waits_for_earlier_ones() {
        let mut handoffs = for_workers(2).unwrap();
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        // Worker 0 chose worker 1 and counted a connection into it just before worker 1
        // began a handover: worker 1 must see it on its way and wait for it.
        handoffs[0].send(1, OwnedFd::from(a)).unwrap();
        let mut target = handoffs.pop().unwrap();
        target.settle(0, false);
        assert_eq!(target.in_flight(), 1);
        // A connection sent after the bit is set comes back to its sender, uncounted.
        let late = handoffs[0].send(1, OwnedFd::from(b));
        assert!(late.is_err());
        assert_eq!(target.in_flight(), 1);
        // Once the first is taken out of the inbox nothing is on its way any more.
        assert!(target.inbox.try_recv().is_ok());
        target.took(1);
        assert_eq!(target.in_flight(), 0);
    }
}
