//! Registered (direct) descriptors for relayed sockets: a flow's client and backend sockets
//! also go into the ring's fixed-file table once the backend is connected, so each recv, send
//! and shutdown names a table slot (`types::Fixed`) and the kernel skips the per-operation file
//! lookup and reference count (`fget`/`fput`).
//!
//! The regular descriptors are kept: getpeername, setsockopt, the upgrade handover's
//! SCM_RIGHTS and the close path all use them unchanged. The table only adds a reference, so
//! a flow's sockets stay open until their table entries are cleared too; the release does that
//! first, in the same linked chain as the closes (`Worker::close_flow`).
//!
//! The table is sparse and sized at ring set-up. Flow slot `i` owns table entries `2i` (client)
//! and `2i + 1` (backend), so no allocator is needed; flows whose slot index is past the table
//! (more flows than `MAX_TABLE_ENTRIES / 2` in one worker) keep using regular descriptors.
//!
//! Registration goes through the ring (`IORING_OP_FILES_UPDATE`, no system call of its own)
//! and is awaited: operations switch to the fixed entries only after its completion reported
//! success, so an operation never names an entry that is not filled. Set
//! `RINGWAY_FIXED_FILES=0` to keep every flow on regular descriptors (tests run the relay
//! suite both ways; kernels that refuse the table fall back to it by themselves).

use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, squeue, types, IoUring};

use super::token::{Kind, Token};

/// At most this many table entries (two per flow) per worker: 512 KiB of kernel memory for the
/// table. Flows beyond it relay on regular descriptors.
const MAX_TABLE_ENTRIES: usize = 1 << 16;

/// The environment variable that turns registered descriptors off (`0`, `off` or `no`).
pub const DISABLE_ENV: &str = "RINGWAY_FIXED_FILES";

/// Both of a released flow's table entries are cleared by one update from this pair.
static CLEARED: [RawFd; 2] = [-1, -1];

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not in the table.
    Unregistered,
    /// An update is queued or in flight; its completion decides.
    Pending,
    /// Both sockets are in the table: operations use the fixed entries.
    Registered,
}

/// Whether registered descriptors are wanted (not turned off by `RINGWAY_FIXED_FILES`).
pub fn enabled_by_env() -> bool {
    !matches!(
        std::env::var(DISABLE_ENV).as_deref().map(str::trim),
        Ok("0") | Ok("off") | Ok("no") | Ok("false")
    )
}

/// A worker's fixed-file table: which flow slots have their sockets registered.
pub struct FixedFiles {
    /// Descriptors an update in the submission queue registers, two per flow slot. The kernel
    /// reads them when it issues the update (at the next submit), so they live here, in memory
    /// that never moves, rather than in the flow's slot (the slab may reallocate).
    staged: Box<[RawFd]>,
    state: Box<[State]>,
}

impl FixedFiles {
    /// Registers a sparse table for up to `max_flows` flows (capped at `MAX_TABLE_ENTRIES / 2`).
    /// `None` when the kernel refuses it: every flow then uses regular descriptors.
    pub fn new(ring: &IoUring, max_flows: usize) -> Option<FixedFiles> {
        let flows = max_flows.clamp(1, MAX_TABLE_ENTRIES / 2);
        ring.submitter()
            .register_files_sparse((flows * 2) as u32)
            .ok()?;
        Some(FixedFiles {
            staged: vec![-1; flows * 2].into_boxed_slice(),
            state: vec![State::Unregistered; flows].into_boxed_slice(),
        })
    }

    /// The table entries (client, backend) of flow slot `index`, when its sockets are there.
    pub fn entries(&self, index: usize) -> Option<(types::Fixed, types::Fixed)> {
        match self.state.get(index) {
            Some(State::Registered) => {
                let client = (index * 2) as u32;
                Some((types::Fixed(client), types::Fixed(client + 1)))
            }
            _ => None,
        }
    }

    /// The update that puts flow slot `index`'s two sockets into its table entries, or `None`
    /// when the slot is past the table or already has them. Its completion goes to
    /// `on_registered`.
    pub fn register(
        &mut self,
        index: usize,
        client: RawFd,
        backend: RawFd,
    ) -> Option<squeue::Entry> {
        if self.state.get(index) != Some(&State::Unregistered) {
            return None;
        }
        self.state[index] = State::Pending;
        let first = index * 2;
        self.staged[first] = client;
        self.staged[first + 1] = backend;
        Some(
            opcode::FilesUpdate::new(self.staged[first..].as_ptr(), 2)
                .offset(first as i32)
                .build(),
        )
    }

    /// The registration of flow slot `index` completed with `res` (entries updated, or an
    /// error): on success its operations use the table from now on.
    pub fn on_registered(&mut self, index: usize, res: i32) {
        if self.state.get(index) == Some(&State::Pending) && res == 2 {
            self.state[index] = State::Registered;
        }
    }

    /// Flow slot `index` is released: the update that clears its table entries (the sockets
    /// close only when both the descriptor and the entry are gone), or `None` if it never had
    /// any. An update still queued for the slot runs before this one, so nothing stays behind.
    pub fn release(&mut self, index: usize) -> Option<squeue::Entry> {
        let state = self.state.get_mut(index)?;
        if *state == State::Unregistered {
            return None;
        }
        *state = State::Unregistered;
        Some(
            opcode::FilesUpdate::new(CLEARED.as_ptr(), 2)
                .offset((index * 2) as i32)
                .build(),
        )
    }
}

impl super::Worker {
    /// The flow in slot `index` is connected: put both its sockets in the table (awaited; see
    /// `on_files_registered`).
    pub(super) fn register_files(&mut self, index: usize) {
        let (Some(fixed), Some(slot)) = (self.fixed.as_mut(), self.slots.get(index)) else {
            return;
        };
        let Some(backend) = slot.backend.as_ref() else {
            return;
        };
        let generation = slot.generation;
        if let Some(update) = fixed.register(
            index,
            slot.client.as_raw_fd(),
            backend.as_raw_fd(),
        ) {
            let token = Token::new(index, generation, Kind::FilesUpdate).encode();
            self.push(update.user_data(token));
        }
    }

    /// A registration completed: only for the flow that asked (a released slot's update is
    /// stale, and its entries were cleared after it).
    pub(super) fn on_files_registered(&mut self, token: Token, res: i32) {
        let index = token.slot as usize;
        let current = self
            .slots
            .get(index)
            .is_some_and(|slot| slot.generation == token.generation);
        if let (true, Some(fixed)) = (current, self.fixed.as_mut()) {
            fixed.on_registered(index, res);
        }
    }

    /// The update clearing released flow slot `index`'s table entries, if it has any.
    pub(super) fn unregister_files(&mut self, index: usize) -> Option<squeue::Entry> {
        self.fixed.as_mut()?.release(index)
    }
}
