//! Carrying out a flow's `Op`s: each becomes a submission; a connect first picks the next
//! untried backend.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use io_uring::{opcode, squeue, types};

use crate::balance::flow_key_hash;
use crate::control::health::{classify_connect_error, ConnectFailure};
use crate::flow::{CloseReason, Data, Op, Side, Target, TIGHT_RECV_BYTES};
use crate::proxy_protocol;

use super::flows::local_error_hint;
use super::splice;
use super::token::{Kind, Token};
use super::{timespec, Slot, Worker};

/// `IORING_RECVSEND_POLL_FIRST` (not exported by the io-uring crate): wait for readiness
/// before the first attempt, saving a recv that would only return EAGAIN.
const RECVSEND_POLL_FIRST: u16 = 1;

impl Worker {
    /// Carries out a flow's operations; some (a connect with no backend left) feed the flow
    /// again, so this runs until the list is empty.
    pub(super) fn apply(&mut self, index: usize, ops: &mut Vec<Op>) {
        let mut next = 0;
        while next < ops.len() {
            let op = ops[next];
            next += 1;
            match op {
                Op::ReturnBuffer(bid) => self.bufring.give_back(bid),
                Op::Release(ending) => {
                    self.release(index, ending);
                    // Nothing may follow a release: the slot is gone.
                    break;
                }
                op => {
                    let mut more = Vec::new();
                    self.submit_op(index, op, &mut more);
                    ops.extend(more);
                }
            }
        }
        ops.clear();
    }

    fn submit_op(&mut self, index: usize, op: Op, more: &mut Vec<Op>) {
        let slot = &mut self.slots[index];
        let generation = slot.generation;
        let token = |kind| Token::new(index, generation, kind).encode();
        let fd = |slot: &Slot, side: Side| match side {
            Side::Client => Some(slot.client.as_raw_fd()),
            Side::Backend => slot.backend.as_ref().map(|s| s.as_raw_fd()),
        };
        let entry = match op {
            Op::ReadHeader => {
                let Some(greeting) = slot
                    .cold
                    .as_deref_mut()
                    .and_then(|c| c.greeting.as_deref_mut())
                else {
                    return;
                };
                let left = greeting.deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    slot.flow.abort(CloseReason::BadProxyHeader, more);
                    return;
                }
                if greeting.header.capacity() == 0 {
                    greeting
                        .header
                        .reserve_exact(proxy_protocol::V2_MAX_HEADER_LEN);
                }
                let filled = greeting.header.len();
                let room = greeting.header.capacity() - filled;
                greeting.timeout = timespec(left);
                // SAFETY (pointer): the recv writes into the spare capacity of `header`, which
                // is not resized while the read is in flight (only `on_header_bytes` touches it,
                // after the completion) and lives in the slot until the flow is released, which
                // waits for this operation's completion.
                let ptr = greeting.header.as_mut_ptr().wrapping_add(filled);
                let recv = opcode::Recv::new(types::Fd(slot.client.as_raw_fd()), ptr, room as u32)
                    .build()
                    .flags(squeue::Flags::IO_LINK)
                    .user_data(token(Kind::HeaderRecv));
                let timeout = opcode::LinkTimeout::new(&greeting.timeout as *const types::Timespec)
                    .build()
                    .user_data(token(Kind::LinkTimeout));
                slot.flow.on_header_submitted();
                self.push_linked(recv, timeout);
                return;
            }
            Op::SendPreface { offset, len } => {
                let (Some(greeting), Some(fd)) = (slot.greeting(), fd(slot, Side::Backend)) else {
                    return;
                };
                // The preface is not touched while its send is in flight and lives in the slot.
                let ptr = greeting.preface.as_ptr().wrapping_add(offset as usize);
                opcode::Send::new(types::Fd(fd), ptr, len)
                    .flags(libc::MSG_NOSIGNAL)
                    .build()
                    .user_data(token(Kind::Preface))
            }
            Op::Connect => {
                self.connect_next(index, more);
                return;
            }
            Op::Recv {
                from,
                poll_first,
                small,
            } => {
                let Some(fd) = fd(slot, from) else { return };
                let len = if small {
                    TIGHT_RECV_BYTES.min(self.settings.buffer_size)
                } else {
                    self.settings.buffer_size
                };
                // Single-shot: one recv takes at most one buffer, so a pipe never holds more
                // than its budget (see flow.rs).
                opcode::Recv::new(types::Fd(fd), std::ptr::null_mut(), len)
                    .buf_group(self.bufring.group())
                    .ioprio(if poll_first { RECVSEND_POLL_FIRST } else { 0 })
                    .build()
                    .flags(squeue::Flags::BUFFER_SELECT)
                    .user_data(token(Kind::Recv(from)))
            }
            Op::Send {
                to,
                data,
                offset,
                len,
            } => {
                let Some(fd) = fd(slot, to) else { return };
                // Pointer arithmetic: offset + len never passes the bytes the flow put there (a
                // received buffer's length, or the spill's length).
                let ptr = match data {
                    Data::Buffer(buf) => self.bufring.buffer(buf),
                    Data::Spill => {
                        let Some(spill) = slot.spill() else {
                            return;
                        };
                        // The spill is not resized while this send is in flight: the flow
                        // appends to it only when the pipe has no send in flight, and frees it
                        // only after the send completed.
                        spill[to.other().pipe_index()].as_ptr()
                    }
                }
                .wrapping_add(offset as usize);
                opcode::Send::new(types::Fd(fd), ptr, len)
                    .flags(libc::MSG_NOSIGNAL)
                    .build()
                    .user_data(token(Kind::Send(to)))
            }
            Op::Spill {
                from,
                buf,
                offset,
                len,
            } => {
                let start = self.bufring.buffer(buf).wrapping_add(offset as usize);
                // SAFETY: `buf` is lent to this flow (received, not yet given back: the flow
                // emits its ReturnBuffer right after this op), and the kernel wrote at least
                // offset + len bytes into it, so the range is initialised and nobody writes it.
                let bytes = unsafe { std::slice::from_raw_parts(start, len as usize) };
                slot.cold().spill.get_or_insert_with(Default::default)[from.pipe_index()]
                    .extend_from_slice(bytes);
                self.spill_bytes += u64::from(len);
                return;
            }
            Op::DropSpill(from) => {
                if let Some(cold) = slot.cold.as_deref_mut() {
                    if let Some(spill) = cold.spill.as_mut() {
                        let freed = std::mem::take(&mut spill[from.pipe_index()]);
                        self.spill_bytes -= freed.len() as u64;
                        self.spill_freed += freed.capacity() as u64;
                        if spill.iter().all(Vec::is_empty) {
                            cold.spill = None;
                        }
                    }
                    slot.tidy_cold();
                }
                return;
            }
            Op::Shutdown(side) => {
                let Some(fd) = fd(slot, side) else { return };
                // Not through the ring: io_uring runs every shutdown on an io-wq thread
                // (see half_close.rs); the system call finishes at once.
                let res = super::half_close::shutdown_write(fd);
                slot.flow.on_shutdown(side, res, more);
                return;
            }
            Op::Cancel(target) => {
                // By the operation's own token: the kernel finds it by hash. Cancelling by
                // descriptor scans every request in the ring, which made closing N flows at
                // once cost O(N^2).
                let kind = match target {
                    Target::Recv(side) => Kind::Recv(side),
                    Target::Send(side) => Kind::Send(side),
                    Target::Connect => Kind::Connect,
                    Target::HeaderRecv => Kind::HeaderRecv,
                    Target::Preface => Kind::Preface,
                    Target::PollIn(side) => Kind::PollIn(side),
                    Target::PollOut(side) => Kind::PollOut(side),
                };
                opcode::AsyncCancel::new(token(kind))
                    .build()
                    .user_data(token(Kind::Cancel))
            }
            Op::WaitForBuffers => {
                self.bufring.ran_dry();
                self.stats.buffer_ring_exhausted();
                self.starved.push_back((index as u32, generation));
                return;
            }
            Op::PollIn(from) => {
                let Some(fd) = fd(slot, from) else { return };
                opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
                    .build()
                    .user_data(token(Kind::PollIn(from)))
            }
            Op::PollOut(to) => {
                let Some(fd) = fd(slot, to) else { return };
                opcode::PollAdd::new(types::Fd(fd), libc::POLLOUT as u32)
                    .build()
                    .user_data(token(Kind::PollOut(to)))
            }
            Op::TakePipe(_)
            | Op::SpliceIn { .. }
            | Op::SpliceOut { .. }
            | Op::DrainPipe(_)
            | Op::ReturnPipe { .. } => {
                self.splice_op(index, op, more);
                return;
            }
            Op::ReturnBuffer(_) | Op::Release(_) => return,
        };
        self.push(entry);
    }

    /// The splice operations: carried out at once (non-blocking system calls on the worker's
    /// own CPU, see `worker/splice.rs`), each answered to the flow before the next op runs.
    fn splice_op(&mut self, index: usize, op: Op, more: &mut Vec<Op>) {
        let now = self.timers.now();
        let tight = self.bufring.tight();
        let slot = &mut self.slots[index];
        let fd = |slot: &Slot, side: Side| match side {
            Side::Client => Some(slot.client.as_raw_fd()),
            Side::Backend => slot.backend.as_ref().map(|s| s.as_raw_fd()),
        };
        match op {
            Op::TakePipe(from) => {
                let i = from.pipe_index();
                let lent = match self.lent_pipes.get(&index).is_some_and(|l| l[i].is_some()) {
                    true => true,
                    false => match self.pipes.as_mut().and_then(splice::PipePool::take) {
                        Some(pipe) => {
                            self.lent_pipes.entry(index).or_default()[i] = Some(pipe);
                            true
                        }
                        None => false,
                    },
                };
                let granted = self
                    .pipes
                    .as_ref()
                    .map(splice::PipePool::size)
                    .filter(|_| lent);
                slot.flow.on_pipe(from, granted, tight, more);
            }
            Op::SpliceIn { from, len } => {
                let pipe = self
                    .lent_pipes
                    .get(&index)
                    .and_then(|l| l[from.pipe_index()].as_ref());
                let res = match (fd(slot, from), pipe) {
                    (Some(source), Some(pipe)) => splice::into_pipe(source, pipe, len),
                    _ => -libc::EBADF,
                };
                if res > 0 {
                    slot.last_active = now;
                }
                slot.flow.on_spliced_in(from, res, more);
            }
            Op::SpliceOut { from, len } => {
                let to = from.other();
                let pipe = self
                    .lent_pipes
                    .get(&index)
                    .and_then(|l| l[from.pipe_index()].as_ref());
                let res = match (fd(slot, to), pipe) {
                    (Some(destination), Some(pipe)) => splice::out_of_pipe(pipe, destination, len),
                    _ => -libc::EBADF,
                };
                if res > 0 {
                    slot.last_active = now;
                    self.stats.spliced(res as u64);
                }
                slot.flow.on_spliced_out(from, res, more);
            }
            Op::DrainPipe(from) => {
                let i = from.pipe_index();
                let pipe = self.lent_pipes.get(&index).and_then(|l| l[i].as_ref());
                let got = match pipe {
                    Some(pipe) => {
                        let spill = slot.cold().spill.get_or_insert_with(Default::default);
                        let before = spill[i].len();
                        let result = splice::drain(pipe, &mut spill[i]);
                        let got = spill[i].len() - before;
                        self.spill_bytes += got as u64;
                        if let Err(e) = result {
                            // The pipe may still hold bytes: it must not serve another flow.
                            log::warn!("flow {}: reading a kernel pipe: {e}", slot.client_addr);
                            let lent = self.lent_pipes.get_mut(&index).and_then(|l| l[i].take());
                            if let (Some(pipe), Some(pool)) = (lent, self.pipes.as_mut()) {
                                pool.give_back(pipe, false);
                            }
                        }
                        got
                    }
                    None => 0,
                };
                slot.flow.on_pipe_drained(from, got as u32, more);
            }
            Op::ReturnPipe { from, empty } => {
                let lent = self.lent_pipes.get_mut(&index);
                let pipe = lent.and_then(|l| l[from.pipe_index()].take());
                if let (Some(pipe), Some(pool)) = (pipe, self.pipes.as_mut()) {
                    pool.give_back(pipe, empty);
                }
                if self
                    .lent_pipes
                    .get(&index)
                    .is_some_and(|l| l.iter().all(Option::is_none))
                {
                    self.lent_pipes.remove(&index);
                }
            }
            _ => {}
        }
    }

    /// A slot leaving the worker gives back any kernel pipe it still holds (a flow returns
    /// its pipes before release; this keeps the pool's count right whatever happened). A pipe
    /// returned here is closed, not reused: nothing says it is empty.
    pub(super) fn return_kernel_pipes(&mut self, index: usize) {
        let Some(lent) = self.lent_pipes.remove(&index) else {
            return;
        };
        for pipe in lent.into_iter().flatten() {
            if let Some(pool) = self.pipes.as_mut() {
                pool.give_back(pipe, false);
            }
        }
    }

    /// Picks the next untried healthy backend for the flow and submits a connect to it with a
    /// linked timeout.
    fn connect_next(&mut self, index: usize, more: &mut Vec<Op>) {
        let snapshot = Arc::clone(&self.snapshot);
        let slot = &mut self.slots[index];
        slot.backend = None; // a failed attempt's socket: its connect has completed
        if let Some(load) = slot.backend_load.take() {
            load.active.fetch_sub(1, Ordering::Relaxed);
        }
        // Tried indices refer to the set they were chosen from; a new set starts afresh.
        if !slot
            .backend_set
            .as_ref()
            .is_some_and(|set| Arc::ptr_eq(set, &snapshot.set))
        {
            if let Some(cold) = slot.cold.as_deref_mut() {
                cold.tried.clear();
            }
            slot.backend_index = None;
            slot.backend_set = Some(Arc::clone(&snapshot.set));
        }
        let key_hash = flow_key_hash(
            &slot.client_addr,
            self.settings.hash_key,
            self.settings.hash_seed,
        );
        loop {
            // Tried: the current attempt's backend and those before it (`Cold::tried`).
            let current = slot.backend_index;
            let tried = slot.tried();
            let Some(backend) = snapshot.choose(key_hash, &mut self.pick, |i| {
                current != Some(i as u32) && !tried.contains(&(i as u32))
            }) else {
                // Nothing left to try: after failed attempts that is a connect failure.
                let reason = if current.is_none() {
                    CloseReason::NoBackend
                } else {
                    CloseReason::ConnectFailed
                };
                slot.flow.abort(reason, more);
                return;
            };
            // The attempt before this one joins the list (a first attempt needs none).
            if let Some(previous) = slot.backend_index.replace(backend as u32) {
                slot.cold().tried.push(previous);
            }
            let target = &snapshot.backends()[backend];
            let socket = match self
                .settings
                .edge
                .backend_socket(&target.addr, &mut self.source_turn)
            {
                Ok(socket) => socket,
                Err(e) => {
                    // Creating or binding a socket fails only for local reasons: counted and
                    // logged, never reported against the backend.
                    let errno = e.raw_os_error().unwrap_or(0);
                    let hint = match classify_connect_error(errno) {
                        // The port is chosen at connect (IP_BIND_ADDRESS_NO_PORT): here it
                        // means the address itself is missing.
                        ConnectFailure::Local if errno == libc::EADDRNOTAVAIL => {
                            self.stats.connect_local_error();
                            "the --source address is not on this host; not held against the \
                             backend"
                        }
                        ConnectFailure::Local => {
                            self.stats.connect_local_error();
                            local_error_hint(errno)
                        }
                        _ => "not held against the backend",
                    };
                    let client = slot.client_addr;
                    self.socket_errors.warn(|suppressed| {
                        format!(
                            "flow {client}: cannot open a socket to {}: {e}: {hint} \
                             ({suppressed} more since last report)",
                            target.name
                        )
                    });
                    if slot.tried().len() as u32 + 1 > self.settings.retries {
                        slot.flow.abort(CloseReason::ConnectFailed, more);
                        return;
                    }
                    continue;
                }
            };
            let token = |kind| Token::new(index, slot.generation, kind).encode();
            let connect = opcode::Connect::new(
                types::Fd(socket.as_raw_fd()),
                target.sockaddr.as_ptr() as *const libc::sockaddr,
                target.sockaddr.len(),
            )
            .build()
            .flags(squeue::Flags::IO_LINK)
            .user_data(token(Kind::Connect));
            let timeout =
                opcode::LinkTimeout::new(&*self.connect_timespec as *const types::Timespec)
                    .build()
                    .user_data(token(Kind::LinkTimeout));
            slot.backend = Some(socket);
            target.load.active.fetch_add(1, Ordering::Relaxed);
            slot.backend_load = Some(Arc::clone(&target.load));
            slot.flow.on_connect_submitted();
            slot.connect_submitted();
            // The two must be adjacent in the submission queue for the link to hold.
            self.push_linked(connect, timeout);
            return;
        }
    }
}
