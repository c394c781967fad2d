//! A hashed timer wheel for idle timeouts: one kernel timer per worker, not one per flow.
//!
//! Flows are filed under the tick of their deadline. Activity does not touch the wheel: it only
//! moves the flow's `last_active` tick, and when the wheel reaches the filed tick the worker checks
//! the real deadline and files the flow again if it has been active since (lazy re-insertion).
//! Deadlines further away than one turn of the wheel are filed in the last slot of the turn and
//! re-filed from there.

/// An entry: (slab slot, generation) of a flow.
pub type Entry = (u32, u32);

/// Entries a drained slot may keep room for (what ordinary ticks need, without reallocating).
const SLOT_KEEP: usize = 64;

fn index_of(tick: u64, span: u64) -> usize {
    (tick % span) as usize
}

pub struct TimerWheel {
    slots: Vec<Vec<Entry>>,
    /// The last tick whose slot has been drained.
    now: u64,
}

impl TimerWheel {
    pub fn new(slots: usize) -> TimerWheel {
        TimerWheel {
            slots: (0..slots.max(2)).map(|_| Vec::new()).collect(),
            now: 0,
        }
    }

    /// Files `entry` to come back at tick `at` (or at the end of the current turn if later).
    pub fn schedule(&mut self, at: u64, entry: Entry) {
        let span = self.slots.len() as u64;
        let at = at.clamp(self.now + 1, self.now + span - 1);
        self.slots[index_of(at, span)].push(entry);
    }

    /// Moves the wheel to tick `now`, appending every entry filed at or before it to `due`.
    pub fn advance(&mut self, now: u64, due: &mut Vec<Entry>) {
        let span = self.slots.len() as u64;
        // After a long stall only one full turn needs draining: every slot is visited once.
        let start = self.now.max(now.saturating_sub(span)) + 1;
        for tick in start..=now {
            let slot = &mut self.slots[index_of(tick, span)];
            due.append(slot);
            // A slot keeps the capacity of its busiest tick; after a burst of short flows that
            // would hold memory for the peak connection rate for good, so large ones are freed.
            if slot.capacity() > SLOT_KEEP {
                *slot = Vec::new();
            }
        }
        self.now = self.now.max(now);
    }

    pub fn now(&self) -> u64 {
        self.now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_come_back_at_their_tick() {
        let mut wheel = TimerWheel::new(8);
        wheel.schedule(3, (1, 0));
        wheel.schedule(5, (2, 0));
        let mut due = Vec::new();
        wheel.advance(2, &mut due);
        assert!(due.is_empty());
        wheel.advance(3, &mut due);
        assert_eq!(due, [(1, 0)]);
        due.clear();
        wheel.advance(5, &mut due);
        assert_eq!(due, [(2, 0)]);
    }

    #[test]
    fn far_deadlines_are_filed_within_one_turn() {
        let mut wheel = TimerWheel::new(4);
        wheel.schedule(100, (7, 1));
        let mut due = Vec::new();
        wheel.advance(3, &mut due);
        assert_eq!(
            due,
            [(7, 1)],
            "comes back early so the caller can re-file it"
        );
    }

    #[test]
    fn past_deadlines_come_back_on_the_next_tick() {
        let mut wheel = TimerWheel::new(4);
        let mut due = Vec::new();
        wheel.advance(10, &mut due);
        wheel.schedule(2, (3, 3));
        wheel.advance(11, &mut due);
        assert_eq!(due, [(3, 3)]);
    }

    #[test]
    fn a_drained_burst_gives_its_memory_back() {
        let mut wheel = TimerWheel::new(4);
        for i in 0..10_000 {
            wheel.schedule(1, (i, 0));
        }
        let mut due = Vec::new();
        wheel.advance(1, &mut due);
        assert_eq!(due.len(), 10_000);
        assert!(wheel.slots.iter().all(|s| s.capacity() <= SLOT_KEEP));
    }

    #[test]
    fn a_long_stall_drains_everything_once() {
        let mut wheel = TimerWheel::new(4);
        for t in 1..4 {
            wheel.schedule(t, (t as u32, 0));
        }
        let mut due = Vec::new();
        wheel.advance(1000, &mut due);
        due.sort();
        assert_eq!(due, [(1, 0), (2, 0), (3, 0)]);
        assert_eq!(wheel.now(), 1000);
    }
}
