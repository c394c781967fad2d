//! What workers tell the control thread. Defined here, below both, so that neither imports the
//! other for it.
//!
//! Workers send on a bounded channel with `try_send` (a `BackendFailure` is dropped when the
//! queue is full: failures only feed a counter window, and a flood of them already took the
//! backend down), so a worker never blocks on the control thread.

use std::sync::Arc;

use crate::snapshot::BackendSet;

pub enum Event {
    /// A flow's connect to backend `index` of `set` failed with evidence against the backend
    /// (refused, timed out, unreachable: `health::ConnectFailure::Backend`).
    BackendFailure { set: Arc<BackendSet>, index: usize },
    /// A worker thread ended; `panicked` if it did not end by a stop or drain.
    WorkerExited { id: usize, panicked: bool },
}
