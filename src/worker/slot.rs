//! The per-flow slot's layout: what stays in `Slot` (every open flow pays for it, idle or not)
//! and what goes into `Cold`, boxed and allocated only for the flows that need it.
//!
//! RSS per idle flow is mostly this struct (the slab holds one `Slot` per flow) plus the flow's
//! share of fixed per-worker memory (scripts/idle-rss.sh measures both). So the slot keeps only
//! what every flow needs for its whole life, in narrow types: times as CLOCK_MONOTONIC
//! nanoseconds (8 bytes, not the 16 of `Instant`/`Duration`), the backend as a u32 index, and
//! one pointer to `Cold` for connect retries, PROXY protocol state, the spill, a source
//! ticket, the handover mark and an adopted backend's name. A flow that connects at the first
//! attempt, with neither PROXY protocol nor `--max-conns-per-source`, never allocates `Cold`.

use std::sync::Arc;
use std::time::Duration;

use super::handover::Mark;
use super::{Greeting, Slot};
use crate::handover::protocol::monotonic_ns;
use crate::source_limit::SourceTicket;

/// Per-flow state most flows need only briefly or never.
#[derive(Default)]
pub(super) struct Cold {
    /// Backends whose connect attempts failed before the current one (`Slot::backend_index`),
    /// in the current backend set: the first attempt needs no list.
    pub tried: Vec<u32>,
    /// This flow's share of `--max-conns-per-source`.
    pub ticket: Option<SourceTicket>,
    /// PROXY protocol state, only for flows that read or send a header.
    pub greeting: Option<Box<Greeting>>,
    /// Undelivered bytes of a stalled pipe moved off the buffer ring (flow.rs, "spill"), by
    /// `Side::pipe_index`.
    pub spill: Option<Box<[Vec<u8>; 2]>>,
    /// Where the flow is in an upgrade handover.
    pub handover: Mark,
    /// The backend of a flow adopted from the previous process when this process's set has no
    /// backend of that name (it follows `--drain-timeout`).
    pub adopted_backend: Option<Arc<str>>,
}

impl Cold {
    fn is_empty(&self) -> bool {
        self.tried.is_empty()
            && self.ticket.is_none()
            && self.greeting.is_none()
            && self.spill.is_none()
            && self.handover == Mark::No
            && self.adopted_backend.is_none()
    }
}

/// The slot's size, checked at compile time: it is most of RSS per idle flow (the goal is at most
/// 600 B per flow, with the worker's fixed memory divided among the flows). Grow it only with a
/// field every flow needs; anything else belongs in `Cold`. 296: the 280 of the slot shrink plus
/// splice's per-flow part (the pointer to its boxed state, and `Limits::splice_after_units`).
const SLOT_MAX_BYTES: usize = 296;
const _: () = assert!(std::mem::size_of::<Slot>() <= SLOT_MAX_BYTES);

/// The slab starts with room for this many bytes of slots: above glibc's mmap threshold (128 KiB),
/// so the slab's memory is mapped from the start and grows by mremap. Growing from small
/// allocations instead left each outgrown copy in the worker's heap, resident (about 80 B per
/// flow at 2,000 flows). Untouched capacity costs no resident memory.
const SLAB_START_BYTES: usize = 256 * 1024;

/// Initial capacity of a worker's slab (see `SLAB_START_BYTES`).
pub(super) fn slab_start_capacity() -> usize {
    SLAB_START_BYTES / std::mem::size_of::<Slot>()
}

/// Now, in the clock `accepted_ns` and `connect_ns` use.
pub(super) fn now_ns() -> u64 {
    monotonic_ns()
}

impl Slot {
    /// The cold part, allocated on first use.
    pub(super) fn cold(&mut self) -> &mut Cold {
        self.cold.get_or_insert_with(Default::default)
    }

    /// Frees the cold part once nothing in it is in use.
    pub(super) fn tidy_cold(&mut self) {
        if self.cold.as_ref().is_some_and(|cold| cold.is_empty()) {
            self.cold = None;
        }
    }

    pub(super) fn greeting(&self) -> Option<&Greeting> {
        self.cold.as_ref()?.greeting.as_deref()
    }

    pub(super) fn spill(&self) -> Option<&[Vec<u8>; 2]> {
        self.cold.as_ref()?.spill.as_deref()
    }

    pub(super) fn ticket(&self) -> Option<SourceTicket> {
        self.cold.as_ref()?.ticket
    }

    pub(super) fn handover(&self) -> Mark {
        self.cold.as_ref().map_or(Mark::No, |cold| cold.handover)
    }

    pub(super) fn set_handover(&mut self, mark: Mark) {
        if mark == Mark::No && self.cold.is_none() {
            return;
        }
        self.cold().handover = mark;
        self.tidy_cold();
    }

    pub(super) fn adopted_backend(&self) -> Option<&Arc<str>> {
        self.cold.as_ref()?.adopted_backend.as_ref()
    }

    /// Backends tried before the current attempt (see `Cold::tried`).
    pub(super) fn tried(&self) -> &[u32] {
        self.cold.as_ref().map_or(&[], |cold| &cold.tried)
    }

    /// The flow is connected: the list of tried backends is no longer needed.
    pub(super) fn forget_tried(&mut self) {
        if let Some(cold) = self.cold.as_mut() {
            cold.tried = Vec::new();
        }
        self.tidy_cold();
    }

    /// How long the flow has been open.
    pub(super) fn age(&self) -> Duration {
        Duration::from_nanos(now_ns().saturating_sub(self.accepted_ns))
    }

    /// How long the successful connect took; `None` if none succeeded.
    pub(super) fn connect_time(&self) -> Option<Duration> {
        self.connected
            .then(|| Duration::from_nanos(self.connect_ns))
    }

    /// A connect was submitted now.
    pub(super) fn connect_submitted(&mut self) {
        self.connect_ns = now_ns();
    }

    /// The connect in flight succeeded: from now on `connect_ns` is its duration.
    pub(super) fn connect_succeeded(&mut self) {
        if !self.connected {
            self.connect_ns = now_ns().saturating_sub(self.connect_ns);
            self.connected = true;
        }
    }

    /// Sets the connect time outright (a flow adopted from the previous process).
    pub(super) fn set_connect_time(&mut self, took: Option<Duration>) {
        self.connected = took.is_some();
        self.connect_ns = took.map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }
}
