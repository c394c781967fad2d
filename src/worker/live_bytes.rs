//! Byte counters that move while flows run. A flow's bytes are counted by its state machine as
//! they are delivered (`Flow::bytes`); the worker adds them to its own totals and to the
//! backend's counters in two places only, so every byte is added exactly once:
//!
//! - on the tick, at most every [`FLUSH_INTERVAL`]: each open flow's bytes moved since it was
//!   last accounted (`Slot::bytes_accounted`), summed per backend first so a backend's shared
//!   counters take one add per flush from this worker, however many flows it carries;
//! - at release, whatever the flow moved since its last flush ([`take_unaccounted`]).
//!
//! So an operator watching a day-long stream sees its bytes within a second, and the data path
//! itself writes nothing shared: a send completion only bumps the flow's own count.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::metrics::BackendStats;

use super::{Slot, Worker};

/// How often open flows' bytes are added to the counters. With the tick (at most 250 ms) this
/// keeps `/metrics` within 0.75 s of the bytes delivered.
pub(super) const FLUSH_INTERVAL: Duration = Duration::from_millis(500);

/// Bytes `slot`'s flow moved (client to backend, backend to client) that no counter has yet,
/// and marks them counted.
pub(super) fn take_unaccounted(slot: &mut Slot) -> (u64, u64) {
    let (up, down) = slot.flow.bytes();
    let (done_up, done_down) = slot.bytes_accounted;
    slot.bytes_accounted = (up, down);
    // The flow's counts only grow; saturating keeps a bug from adding 2^64 - n.
    (up.saturating_sub(done_up), down.saturating_sub(done_down))
}

impl Worker {
    /// On the tick: adds every open flow's new bytes to the counters, if [`FLUSH_INTERVAL`] has
    /// passed since the last flush. One pass over the worker's flows every half second.
    pub(super) fn flush_live_bytes(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.bytes_flushed_at) < FLUSH_INTERVAL {
            return;
        }
        self.bytes_flushed_at = now;
        let (mut total_up, mut total_down) = (0u64, 0u64);
        // Keyed by the counters' address: one entry per backend this worker's flows use.
        let mut per_backend: HashMap<*const BackendStats, (Arc<BackendStats>, u64, u64)> =
            HashMap::new();
        for (_, slot) in self.slots.iter_mut() {
            if slot.flow.bytes() == slot.bytes_accounted {
                continue;
            }
            let (up, down) = take_unaccounted(slot);
            total_up += up;
            total_down += down;
            // Backend counters hold the bytes of flows that connected (as `release` does).
            let backend = slot
                .backend_index
                .zip(slot.backend_set.as_ref())
                .and_then(|(i, set)| set.backends.get(i as usize))
                .filter(|_| slot.connected);
            if let Some(backend) = backend {
                let entry = per_backend
                    .entry(Arc::as_ptr(&backend.stats))
                    .or_insert_with(|| (Arc::clone(&backend.stats), 0, 0));
                entry.1 += up;
                entry.2 += down;
            }
        }
        self.stats.bytes_client_to_backend(total_up);
        self.stats.bytes_backend_to_client(total_down);
        for (stats, up, down) in per_backend.into_values() {
            stats.add_bytes(up, down);
        }
    }
}
