//! Control and time: commands from the control thread (behind the wake pipe), stop and drain,
//! and the tick that drives idle timeouts, deadlines and the accept back-off.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use io_uring::{opcode, types};
use log::debug;

use crate::flow::{CloseReason, Phase};

use super::token::{Kind, Token};
use super::{AcceptState, Command, Slot, Worker};

/// Idle flows closed per event-loop turn at most (see `expire_due`).
const EXPIRE_BATCH: usize = 256;

impl Worker {
    pub(super) fn arm_wake(&mut self) {
        let entry = opcode::Read::new(
            types::Fd(self.wake.as_raw_fd()),
            self.wake_buf.as_mut_ptr(),
            self.wake_buf.len() as u32,
        )
        .build()
        .user_data(Token::worker(Kind::Wake).encode());
        self.push(entry);
    }

    pub(super) fn on_wake(&mut self, res: i32) {
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
                Command::Handover { exports } => self.start_handover(exports),
                Command::Release(handles) => self.release_handed_over(handles),
                Command::Resume(unstarted) => self.resume_after_handover(unstarted),
                Command::Adopt(flows, pauses) => self.adopt(flows, &pauses),
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
            // An exported flow belongs to the successor until the handover fails: never closed.
            .filter(|(_, slot)| slot.handover() != super::handover::Mark::Exported && which(slot))
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
                    .and_then(|(i, set)| set.backends.get(i as usize))
                    .is_some_and(|b| due.contains(&b.name))
                    || slot
                        .adopted_backend()
                        .is_some_and(|name| due.contains(name))
            },
            CloseReason::Shutdown,
        );
    }

    /// Closes the flows of due timers whose idle time really ran out (the others are filed
    /// again), at most `EXPIRE_BATCH` a call: when thousands time out together, each event-loop
    /// turn closes one batch and still serves every other completion, so live flows never wait
    /// for the whole wave. The loop does not sleep while some are left (`has_expiry_backlog`).
    pub(super) fn expire_due(&mut self) {
        let now = self.timers.now();
        let take = self.due.len().min(EXPIRE_BATCH);
        let batch: Vec<(u32, u32)> = self.due.drain(self.due.len() - take..).collect();
        if self.due.is_empty() && self.due.capacity() > EXPIRE_BATCH {
            // A wave of timeouts is over: do not keep its queue's memory.
            self.due = Vec::new();
        }
        for (index, generation) in batch {
            let Some(slot) = self.slots.get_mut(index as usize) else {
                continue;
            };
            if slot.generation != generation || slot.flow.phase() == Phase::Closing {
                continue;
            }
            if slot.handover() == super::handover::Mark::Exported {
                // Moving to the successor: its idle time counts there. Back here if the
                // handover fails.
                self.timers.schedule(now + 1, (index, generation));
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
    }

    /// Timers are due that `expire_due` has not handled yet.
    pub(super) fn has_expiry_backlog(&self) -> bool {
        !self.due.is_empty()
    }

    /// The buffer pool is tight: flows that moved no byte for a whole tick give back the ring
    /// buffers their stalled sends hold (their bytes move to a heap spill of their exact size),
    /// so a crowd of readers that never read cannot starve other flows of buffers.
    fn reclaim_stalled(&mut self, now: u64) {
        let stalled: Vec<usize> = self
            .slots
            .iter()
            .filter(|(_, slot)| slot.last_active + 1 < now && slot.flow.buffers_held() > 0)
            .map(|(i, _)| i)
            .collect();
        for index in stalled {
            let mut ops = std::mem::take(&mut self.ops);
            if self.slots[index].flow.reclaim(&mut ops) {
                self.stats.buffers_reclaimed();
            }
            self.apply(index, &mut ops);
            self.ops = ops;
        }
    }

    /// Spills are heap blocks of up to a few hundred KiB; freed, glibc keeps them in this
    /// thread's arena, so RSS would stay at the high-water mark of a stall. Once the spills are
    /// gone (and at least 1 MiB was freed), ask it to hand the free pages back.
    fn return_spill_memory(&mut self) {
        if self.spill_bytes == 0 && self.spill_freed >= 1 << 20 {
            self.spill_freed = 0;
            #[cfg(target_env = "gnu")]
            // SAFETY: malloc_trim only releases free memory of the allocator's own arenas; it
            // touches no memory we hold.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }

    pub(super) fn arm_tick(&mut self) {
        let entry = opcode::Timeout::new(&*self.tick_timespec as *const types::Timespec)
            .build()
            .user_data(Token::worker(Kind::Tick).encode());
        self.push(entry);
    }

    pub(super) fn on_tick(&mut self) {
        // The liveness sign the control thread checks before feeding systemd's watchdog. This
        // thread is the only writer: a plain store, no locked read-modify-write.
        let beats = self.heartbeat.load(Ordering::Relaxed);
        self.heartbeat
            .store(beats.wrapping_add(1), Ordering::Relaxed);
        let now = (self.started.elapsed().as_nanos() / self.tick.as_nanos()) as u64;
        // Timers that fell due join the queue that `expire_due` works through a batch per
        // event-loop turn.
        let mut due = std::mem::take(&mut self.due);
        self.timers.advance(now, &mut due);
        self.due = due;
        self.expire_due();
        self.flush_live_bytes();
        if self.bufring.tight() {
            self.reclaim_stalled(now);
        }
        self.bufring.relax();
        self.bufring.trim();
        if let Some(pipes) = self.pipes.as_mut() {
            pipes.trim_idle();
        }
        self.return_spill_memory();
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
}
