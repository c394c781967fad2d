//! Upgrades that keep every live flow: the running process hands its listeners and its
//! established flows to a successor over a Unix socket (`--upgrade-socket`, `--takeover`).
//!
//! | module | one idea |
//! | --- | --- |
//! | `protocol` | the messages and their encoding (pure, versioned) |
//! | `fds` | frames over a Unix stream socket with descriptors beside them (SCM_RIGHTS) |
//! | `socket` | the socket file: 0600, stale ones replaced, who may connect (SO_PEERCRED) |
//! | `old` | the running process: waiting for a successor, shipping batches, resuming on failure |
//! | `new` | the successor: taking the listeners, adopting the flows |
//!
//! The workers' part (quiesce, export, release, resume, adopt) is in `worker/handover.rs`.
//! docs/architecture.md ("Upgrade handover") walks through the whole exchange.

pub mod fds;
pub mod new;
pub mod old;
pub mod protocol;
pub mod socket;

use std::os::fd::{OwnedFd, RawFd};

use protocol::FlowState;

/// A flow's slot in its worker, to release it once the successor holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowHandle {
    pub slot: u32,
    pub generation: u32,
}

/// What a worker reports to the control thread during a handover.
pub enum Exported {
    /// A quiesced flow. The descriptors still belong to the worker: valid until it is told to
    /// release the flow (or to resume).
    Flow {
        worker: usize,
        handle: FlowHandle,
        state: FlowState,
        client: RawFd,
        backend: RawFd,
    },
    /// A connection accepted but not started; the control thread owns it now.
    Unstarted {
        worker: usize,
        state: FlowState,
        fd: OwnedFd,
    },
    /// Nothing more will come from this worker.
    Drained { worker: usize },
}

/// How long adopted flows stood still: from the moment the old process stopped moving their
/// bytes to the moment this process moves them again (receives re-armed, pending bytes sent).
pub struct Pauses {
    micros: std::sync::Mutex<hdrhistogram::Histogram<u64>>,
}

impl Pauses {
    pub fn new() -> std::sync::Arc<Pauses> {
        let histogram = hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3)
            .expect("valid histogram bounds");
        std::sync::Arc::new(Pauses {
            micros: std::sync::Mutex::new(histogram),
        })
    }

    /// Flows resumed at `now` (CLOCK_MONOTONIC ns) that stood still since each `quiesced_at`.
    pub fn record(&self, now: u64, quiesced_at: impl IntoIterator<Item = u64>) {
        let Ok(mut histogram) = self.micros.lock() else {
            return;
        };
        for at in quiesced_at {
            let _ = histogram.record((now.saturating_sub(at) / 1000).max(1));
        }
    }

    pub fn count(&self) -> u64 {
        self.micros.lock().map_or(0, |h| h.len())
    }

    /// `p50 .., p99 .., max ..` in milliseconds.
    pub fn summary(&self) -> String {
        let Ok(h) = self.micros.lock() else {
            return String::new();
        };
        let ms = |us: u64| us as f64 / 1000.0;
        format!(
            "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.99)),
            ms(h.max())
        )
    }
}

/// A flow received from the previous process, for a worker to adopt.
pub struct Adopted {
    pub state: FlowState,
    pub client: OwnedFd,
    /// `None`: a connection the previous process accepted but did not start.
    pub backend: Option<OwnedFd>,
}
