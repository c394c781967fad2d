//! A worker's part in an upgrade handover (docs/architecture.md, "Upgrade handover").
//!
//! Old process, on `Command::Handover`: accepting pauses (the listener stays open: the
//! successor accepts on the same socket, and if the handover fails this worker accepts again),
//! every flow is quiesced (`Flow::quiesce`: receives and sends in flight cancelled), and each
//! flow is exported to the control thread as soon as it relays with nothing in flight: its
//! state, its pending bytes copied out, and its descriptors (still owned here). Flows still
//! reading a PROXY header or connecting carry on until they relay, then stop and go too.
//! Accepted connections not started yet go as they are. `Drained` says nothing more will come.
//! `Command::Release` closes this process's copies of flows the successor acknowledged;
//! `Command::Resume` (the handover failed) takes every other flow back and accepts again.
//!
//! New process, on `Command::Adopt`: each flow gets a slot in relaying state with its pending
//! bytes in the pipe's spill, written before any receive is armed.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;
use log::{debug, warn};
use socket2::{SockRef, Socket};

use crate::flow::{AdoptedPipe, Data, Flow};
use crate::handover::protocol::monotonic_ns;
use crate::handover::protocol::{FlowState, PipeState};
use crate::handover::{Adopted, Exported, FlowHandle, Pauses};

use super::token::{self};
use super::{AcceptState, Slot, Worker};

/// Where a flow is in a handover.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mark {
    /// Not being handed over.
    #[default]
    No,
    /// Quiescing since this CLOCK_MONOTONIC time (ns): exported once nothing is in flight.
    Pending(u64),
    /// Exported to the control thread; the successor may own it any moment. Nothing here
    /// touches it (no timeout, no close) until it is released or the handover fails.
    Exported,
}

/// Flows of a worker quiescing or exported but not released at once.
const WINDOW: usize = 64;

/// This worker's side of a handover in progress.
pub struct Progress {
    exports: Sender<Exported>,
    /// When the handover began (CLOCK_MONOTONIC ns).
    started_ns: u64,
    /// Flows marked `Pending`.
    pending: usize,
    /// Flows exported and not released yet.
    unreleased: usize,
    /// Flows that have not started quiescing yet, oldest first: a flow stands still from its
    /// quiesce until the successor resumes it, so flows are quiesced a window at a time
    /// (`WINDOW`), not all at once (with 9,800 flows quiesced together the last ones waited
    /// for the whole handover, 160 ms; a window of 64 gave p99 15-31 ms, 128 gave 16-37 ms).
    waiting: std::collections::VecDeque<(usize, u32)>,
    drained_sent: bool,
}

impl Worker {
    pub(super) fn start_handover(&mut self, exports: Sender<Exported>) {
        if self.stopping || self.handover.is_some() {
            // Draining or stopping already: nothing to hand over; say so at once.
            let _ = exports.send(Exported::Drained { worker: self.id });
            return;
        }
        self.handover = Some(Progress {
            exports,
            started_ns: monotonic_ns(),
            pending: 0,
            unreleased: 0,
            waiting: self
                .slots
                .iter()
                .map(|(i, slot)| (i, slot.generation))
                .collect(),
            drained_sent: false,
        });
        // Other workers stop passing connections here now, not at the end of the turn.
        self.publish_load();
        self.cancel_accept();
        self.handover_turn();
    }

    /// Marks a flow for the handover and quiesces it (a no-op without a handover).
    pub(super) fn join_handover(&mut self, index: usize) {
        let Some(progress) = self.handover.as_mut() else {
            return;
        };
        let Some(slot) = self.slots.get_mut(index) else {
            return;
        };
        if slot.handover() != Mark::No || slot.flow.phase() == crate::flow::Phase::Closing {
            return;
        }
        slot.set_handover(Mark::Pending(monotonic_ns()));
        progress.pending += 1;
        let generation = slot.generation;
        let mut ops = std::mem::take(&mut self.ops);
        slot.flow.quiesce(&mut ops);
        self.apply(index, &mut ops);
        self.ops = ops;
        self.export_if_quiesced(index, generation);
    }

    /// A released slot leaves the handover's count.
    pub(super) fn handover_forget(&mut self, mark: Mark) {
        if let (Mark::Pending(_), Some(progress)) = (mark, self.handover.as_mut()) {
            progress.pending -= 1;
        }
    }

    /// Once per event-loop turn during a handover: hand over connections accepted but not
    /// started, and say `Drained` when nothing is left to export.
    pub(super) fn handover_turn(&mut self) {
        // Quiesce the next flows while the window has room.
        while let Some(progress) = self.handover.as_mut() {
            if progress.pending + progress.unreleased >= WINDOW {
                break;
            }
            let Some((index, generation)) = progress.waiting.pop_front() else {
                break;
            };
            if self
                .slots
                .get(index)
                .is_some_and(|s| s.generation == generation)
            {
                self.join_handover(index);
            }
        }
        let accepting = matches!(self.accept, AcceptState::Armed | AcceptState::Cancelling);
        if accepting {
            return;
        }
        while let Some(fd) = self.parked.pop_front() {
            let client = SockRef::from(&fd)
                .peer_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
            let state = FlowState {
                client,
                backend: None,
                bytes: [0, 0],
                age: Duration::ZERO,
                idle: Duration::ZERO,
                connect_time: None,
                pipes: Default::default(),
                quiesced_at: self.handover.as_ref().map_or(0, |p| p.started_ns),
            };
            if let Some(progress) = &self.handover {
                let _ = progress.exports.send(Exported::Unstarted {
                    worker: self.id,
                    state,
                    fd,
                });
            }
        }
        let id = self.id;
        let in_flight = self.handoffs_in_flight();
        if let Some(progress) = self.handover.as_mut() {
            if progress.pending == 0
                && progress.waiting.is_empty()
                && !progress.drained_sent
                && !in_flight
            {
                progress.drained_sent = true;
                let _ = progress.exports.send(Exported::Drained { worker: id });
            }
        }
    }

    /// Exports the flow in `index` if it is quiesced (relaying, nothing in flight).
    pub(super) fn export_if_quiesced(&mut self, index: usize, generation: u32) {
        let Some(slot) = self.slots.get(index) else {
            return;
        };
        let Mark::Pending(quiesced_at) = slot.handover() else {
            return;
        };
        if slot.generation != generation || !slot.flow.is_quiesced() {
            return;
        }
        let idle = self.idle_elapsed(slot.last_active);
        let mut state = describe(slot, &self.bufring, idle);
        state.quiesced_at = quiesced_at;
        let slot = &mut self.slots[index];
        let Some(backend) = slot.backend.as_ref().map(|s| s.as_raw_fd()) else {
            return; // relaying always has a backend socket
        };
        let exported = Exported::Flow {
            worker: self.id,
            handle: FlowHandle {
                slot: index as u32,
                generation,
            },
            state,
            client: slot.client.as_raw_fd(),
            backend,
        };
        slot.set_handover(Mark::Exported);
        if let Some(progress) = self.handover.as_mut() {
            progress.pending -= 1;
            progress.unreleased += 1;
            let _ = progress.exports.send(exported);
        }
    }

    fn idle_elapsed(&self, last_active: u64) -> Duration {
        self.tick * (self.timers.now().saturating_sub(last_active)) as u32
    }

    /// The successor holds these flows: close this process's copies (a plain close: the
    /// sockets live on in the successor), give back their buffers and counters, no log line.
    pub(super) fn release_handed_over(&mut self, handles: Vec<FlowHandle>) {
        for handle in handles {
            let index = handle.slot as usize;
            match self.slots.get(index) {
                Some(slot)
                    if slot.generation == handle.generation
                        && slot.handover() == Mark::Exported => {}
                _ => continue,
            }
            if let Some(progress) = self.handover.as_mut() {
                progress.unreleased = progress.unreleased.saturating_sub(1);
            }
            let mut ops = std::mem::take(&mut self.ops);
            self.slots[index].flow.hand_off(&mut ops);
            // Only buffer returns and spill drops: nothing is submitted, nothing released.
            self.apply(index, &mut ops);
            self.ops = ops;
            self.return_kernel_pipes(index);
            let slot = self.slots.remove(index);
            if let Some(load) = &slot.backend_load {
                load.active.fetch_sub(1, Ordering::Relaxed);
            }
            if let Some(ticket) = slot.ticket() {
                self.settings.edge.release(ticket);
            }
            self.stats.flow_handed_over();
            let backend = slot.backend.map(IntoRawFd::into_raw_fd);
            // The flow's share of --max-conns comes back when the closes complete.
            self.close_flow(slot.client.into_raw_fd(), backend);
        }
    }

    /// The handover failed: every flow not released moves again, accepting resumes, and the
    /// connections that were not started come back.
    pub(super) fn resume_after_handover(&mut self, unstarted: Vec<OwnedFd>) {
        self.parked.extend(unstarted);
        if self.handover.take().is_none() {
            self.resume_accepting();
            return;
        }
        let tight = self.bufring.tight();
        let indices: Vec<usize> = self.slots.iter().map(|(i, _)| i).collect();
        for index in indices {
            let slot = &mut self.slots[index];
            if slot.handover() == Mark::No {
                continue;
            }
            slot.set_handover(Mark::No);
            let mut ops = std::mem::take(&mut self.ops);
            slot.flow.resume(tight, &mut ops);
            self.apply(index, &mut ops);
            self.ops = ops;
        }
        self.resume_accepting();
    }

    /// Flows from the previous process.
    pub(super) fn adopt(&mut self, flows: Vec<Adopted>, pauses: &Pauses) {
        let mut quiesced_at = Vec::with_capacity(flows.len());
        for adopted in flows {
            quiesced_at.push(adopted.state.quiesced_at);
            match adopted.backend {
                None => self.parked.push_back(adopted.client),
                Some(backend) => self.adopt_flow(adopted.state, adopted.client, backend),
            }
        }
        self.resume_accepting();
        // The receives and sends just queued reach the kernel at once, not at the next turn.
        let _ = self.ring.submit();
        pauses.record(monotonic_ns(), quiesced_at);
    }

    fn adopt_flow(&mut self, state: FlowState, client: OwnedFd, backend: OwnedFd) {
        // An adopted flow counts against --max-conns (it holds two descriptors) even past it:
        // it is live and cannot wait in a backlog.
        self.active_flows.fetch_add(1, Ordering::Relaxed);
        self.stats.flow_adopted();
        let name = state.backend.clone().unwrap_or_default();
        let set = Arc::clone(&self.snapshot.set);
        let index = set.backends.iter().position(|b| *b.name == *name);
        let (backend_index, backend_set, backend_load, adopted_backend) = match index {
            Some(i) => {
                let b = &set.backends[i];
                b.load.active.fetch_add(1, Ordering::Relaxed);
                b.stats.flow_started();
                (
                    Some(i as u32),
                    Some(Arc::clone(&set)),
                    Some(Arc::clone(&b.load)),
                    None,
                )
            }
            None => {
                debug!(
                    "flow {}: adopted on backend {name}, which is not in this process's set",
                    state.client
                );
                (None, None, None, Some(Arc::from(name.as_str())))
            }
        };
        let pipes: [AdoptedPipe; 2] = [0, 1].map(|i| AdoptedPipe {
            eof: state.pipes[i].eof,
            shutdown_done: state.pipes[i].shutdown_done,
            pending: state.pipes[i].pending.len() as u32,
            bytes: state.bytes[i],
        });
        let flow = Flow::adopt(self.limits, pipes);
        let spill = if state.pipes.iter().any(|p| !p.pending.is_empty()) {
            let [up, down] = state.pipes;
            self.spill_bytes += (up.pending.len() + down.pending.len()) as u64;
            Some(Box::new([up.pending, down.pending]))
        } else {
            None
        };
        let generation = self.next_generation;
        self.next_generation = (self.next_generation + 1) & token::GENERATION_MASK;
        let now = self.timers.now();
        let idle_ticks = (state.idle.as_nanos() / self.tick.as_nanos().max(1)) as u64;
        let last_active = now.saturating_sub(idle_ticks);
        let now_ns = super::slot::now_ns();
        let age_ns = u64::try_from(state.age.as_nanos()).unwrap_or(u64::MAX);
        let accepted_ns = now_ns.checked_sub(age_ns).unwrap_or(now_ns);
        let index = self.slots.insert(Slot {
            generation,
            flow,
            client,
            backend: Some(Socket::from(backend)),
            client_addr: state.client,
            backend_index,
            backend_set,
            backend_load,
            last_active,
            accepted_ns,
            connect_ns: 0,
            timer_filed: false,
            connected: false,
            cold: None,
            // The previous process already counted these bytes in its own metrics: this one
            // counts only what it relays itself.
            bytes_accounted: (state.bytes[0], state.bytes[1]),
        });
        let slot = &mut self.slots[index];
        slot.set_connect_time(state.connect_time.or(Some(Duration::ZERO)));
        if spill.is_some() || adopted_backend.is_some() {
            let cold = slot.cold();
            cold.spill = spill;
            cold.adopted_backend = adopted_backend;
        }
        if let Some(idle) = self.idle_ticks {
            self.slots[index].timer_filed = true;
            self.timers
                .schedule(last_active + idle, (index as u32, generation));
        }
        let tight = self.bufring.tight();
        let mut ops = std::mem::take(&mut self.ops);
        self.slots[index].flow.resume(tight, &mut ops);
        self.apply(index, &mut ops);
        self.ops = ops;
    }
}

/// The flow's state and its pending bytes (copied out of ring buffers, spills and the preface).
fn describe(slot: &Slot, bufring: &super::bufring::BufRing, idle: Duration) -> FlowState {
    let exports = slot.flow.export();
    let mut pipes: [PipeState; 2] = Default::default();
    for (i, export) in exports.iter().enumerate() {
        let pipe = &mut pipes[i];
        pipe.eof = export.eof;
        pipe.shutdown_done = export.shutdown_done;
        if i == 0 {
            // The rest of the preface goes before any relayed client byte.
            let (sent, len) = slot.flow.preface_left();
            if let Some(greeting) = slot.greeting() {
                if let Some(rest) = greeting.preface.get(sent as usize..len as usize) {
                    pipe.pending.extend_from_slice(rest);
                }
            }
        }
        for &(data, offset, len) in &export.pending {
            match data {
                Data::Buffer(buf) => {
                    let start = bufring.buffer(buf).wrapping_add(offset as usize);
                    // SAFETY: the buffer is lent to this flow (queued, not given back), and the
                    // kernel wrote at least offset + len bytes into it; nothing writes it now
                    // (the flow is quiesced: no recv or send in flight).
                    let bytes = unsafe { std::slice::from_raw_parts(start, len as usize) };
                    pipe.pending.extend_from_slice(bytes);
                }
                Data::Spill => match slot.spill() {
                    Some(spill) => {
                        let spilled = &spill[i];
                        let end = (offset as usize + len as usize).min(spilled.len());
                        pipe.pending
                            .extend_from_slice(&spilled[(offset as usize).min(end)..end]);
                    }
                    None => warn!("flow {}: a spill chunk without a spill", slot.client_addr),
                },
            }
        }
    }
    let (up, down) = slot.flow.bytes();
    FlowState {
        client: slot.client_addr,
        backend: slot
            .backend_index
            .zip(slot.backend_set.as_ref())
            .and_then(|(i, set)| set.backends.get(i as usize))
            .map(|b| b.name.to_string())
            .or_else(|| slot.adopted_backend().map(|n| n.to_string()))
            .or_else(|| Some(String::new())),
        bytes: [up, down],
        age: slot.age(),
        idle,
        connect_time: slot.connect_time(),
        pipes,
        quiesced_at: 0,
    }
}
