//! Are the workers answering? Each worker stores a heartbeat counter once per tick of its event
//! loop (at most every 250 ms; one relaxed store, the only shared write it adds). The control
//! thread reads the counters and calls a worker wedged when its counter has not moved for
//! [`WEDGED_AFTER`]: its event loop is stuck (a spin, a blocking call), so its flows are stuck
//! too. The systemd watchdog is fed only while no worker is wedged, so systemd restarts a process
//! that still runs but no longer serves.

use std::time::{Duration, Instant};

/// How long a worker's heartbeat may stand still before the worker counts as wedged: eight of
/// its longest ticks (250 ms). An event-loop turn takes milliseconds (the slowest measured
/// under an accept burst, 117 ms, before `START_BATCH` bounded it).
pub const WEDGED_AFTER: Duration = Duration::from_secs(2);

/// What the control thread last saw of each worker's heartbeat.
pub struct Liveness {
    seen: Vec<Seen>,
}

#[derive(Clone, Copy)]
struct Seen {
    beats: u64,
    /// When `beats` was first seen at its current value.
    since: Instant,
}

impl Liveness {
    pub fn new() -> Liveness {
        Liveness { seen: Vec::new() }
    }

    /// Records `readings` (worker `i`'s heartbeat, or `None` once its thread has ended: it is no
    /// longer expected to beat) taken at `now`, and says whether every running worker's heartbeat
    /// moved within [`WEDGED_AFTER`]. A worker seen for the first time counts as answering.
    pub fn all_answering(&mut self, now: Instant, readings: &[Option<u64>]) -> bool {
        if self.seen.len() != readings.len() {
            self.seen = readings
                .iter()
                .map(|r| Seen {
                    beats: r.unwrap_or(0),
                    since: now,
                })
                .collect();
        }
        let mut all = true;
        for (seen, reading) in self.seen.iter_mut().zip(readings) {
            let Some(beats) = *reading else { continue };
            if beats != seen.beats {
                *seen = Seen { beats, since: now };
            } else if now.saturating_duration_since(seen.since) > WEDGED_AFTER {
                all = false;
            }
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_whose_heartbeat_stands_still_is_wedged() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut liveness = Liveness::new();
        assert!(liveness.all_answering(at(0), &[Some(0), Some(0)]));
        // Both beat.
        assert!(liveness.all_answering(at(1000), &[Some(4), Some(3)]));
        // Worker 1 stops beating: still answering within WEDGED_AFTER of its last beat...
        assert!(liveness.all_answering(at(2000), &[Some(8), Some(3)]));
        assert!(liveness.all_answering(at(3000), &[Some(12), Some(3)]));
        // ...wedged after it.
        assert!(!liveness.all_answering(at(3100), &[Some(13), Some(3)]));
        assert!(!liveness.all_answering(at(9000), &[Some(40), Some(3)]));
        // It beats again: answering again at once.
        assert!(liveness.all_answering(at(9500), &[Some(42), Some(4)]));
    }

    #[test]
    fn ended_workers_are_not_expected_to_beat() {
        let start = Instant::now();
        let mut liveness = Liveness::new();
        assert!(liveness.all_answering(start, &[Some(5), Some(5)]));
        let later = start + WEDGED_AFTER * 3;
        assert!(liveness.all_answering(later, &[Some(9), None]));
        // The one still running stands still: wedged.
        assert!(!liveness.all_answering(later + WEDGED_AFTER * 2, &[Some(9), None]));
    }

    #[test]
    fn the_first_reading_counts_as_answering_whatever_its_value() {
        let start = Instant::now();
        let mut liveness = Liveness::new();
        assert!(liveness.all_answering(start, &[Some(77)]));
        assert!(liveness.all_answering(start + WEDGED_AFTER, &[Some(77)]));
        assert!(
            !liveness.all_answering(start + WEDGED_AFTER + Duration::from_millis(1), &[Some(77)])
        );
    }
}
