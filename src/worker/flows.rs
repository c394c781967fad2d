//! Flows: starting one on an accepted socket, routing its completions to the flow state
//! machine, the client's PROXY header, flows waiting for buffers, and releasing the slot.

use std::io;
use std::os::fd::{IntoRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::cqueue;
use log::debug;
use socket2::SockRef;

use crate::access_log::FlowRecord;
use crate::control::health::{classify_connect_error, ConnectFailure};
use crate::events::Event;
use crate::flow::{CloseReason, Ending, Flow, Op, Phase};
use crate::metrics::CloseKind;
use crate::proxy_protocol::{self, Parsed};

use super::live_bytes;
use super::token::{self, Kind, Token};
use super::{slot, timespec, Greeting, Slot, Worker};

impl Worker {
    /// Starts a flow on `client` in a share of `--max-conns` the caller has taken
    /// (`take_slot`); gives it back if the client is gone or refused.
    pub(super) fn start_flow(&mut self, client: OwnedFd) {
        if !self.try_start_flow(client) {
            // Its descriptor is closed (dropped) already: nothing is left open.
            self.active_flows.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn try_start_flow(&mut self, client: OwnedFd) -> bool {
        let client_addr = match SockRef::from(&client).peer_addr().map(|a| a.as_socket()) {
            Ok(Some(addr)) => addr,
            // The client is already gone (reset while queued): nothing to serve.
            _ => return false,
        };
        let edge = Arc::clone(&self.settings.edge);
        // Behind trusted load balancers the real client is only known from the PROXY header:
        // admission waits for it. Otherwise refuse here, before anything is allocated.
        let mut ticket = None;
        let mut greeting = None;
        if edge.trusted.is_some() {
            if !edge.trusts(client_addr.ip()) {
                self.refused(client_addr, CloseKind::RefusedProxyHeader);
                return false;
            }
        } else {
            match edge.admit(client_addr.ip()) {
                Ok(t) => ticket = t,
                Err(reason) => {
                    debug!("flow {client_addr}: refused ({reason:?})");
                    self.refused(client_addr, CloseKind::from(reason));
                    return false;
                }
            }
        }
        if edge.trusted.is_some() || edge.sends_proxy_header() {
            let local = SockRef::from(&client)
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .unwrap_or(self.listen_addr);
            let mut preface = Vec::new();
            if edge.trusted.is_none() {
                edge.proxy_header(client_addr, local, &mut preface);
            }
            greeting = Some(Box::new(Greeting {
                header: Vec::new(),
                deadline: Instant::now() + edge.header_timeout,
                timeout: timespec(edge.header_timeout),
                preface,
                local,
            }));
        }
        self.stats.flow_accepted();
        let generation = self.next_generation;
        self.next_generation = (self.next_generation + 1) & token::GENERATION_MASK;
        let slot = self.slots.insert(Slot {
            generation,
            flow: Flow::new(self.limits),
            client,
            backend: None,
            client_addr,
            backend_index: None,
            backend_set: None,
            backend_load: None,
            last_active: self.timers.now(),
            accepted_ns: slot::now_ns(),
            connect_ns: 0,
            bytes_accounted: (0, 0),
            timer_filed: false,
            connected: false,
            cold: None,
        });
        let mut ops = std::mem::take(&mut self.ops);
        let entry = &mut self.slots[slot];
        if ticket.is_some() || greeting.is_some() {
            let cold = entry.cold();
            cold.ticket = ticket;
            cold.greeting = greeting;
        }
        if let Some(greeting) = entry.greeting() {
            let preface_len = greeting.preface.len() as u32;
            entry.flow.set_preface(preface_len);
        }
        entry.flow.start(&mut ops);
        self.apply(slot, &mut ops);
        self.ops = ops;
        // Started during a handover (accepted before the accept's cancel landed): it moves too.
        self.join_handover(slot);
        true
    }

    pub(super) fn on_flow_completion(&mut self, token: Token, res: i32, flags: u32) {
        let index = token.slot as usize;
        match self.slots.get(index) {
            Some(slot) if slot.generation == token.generation => {}
            // Stale: the flow that issued it is gone. Only a recv can still hold a buffer.
            _ => {
                if let Some(bid) = cqueue::buffer_select(flags) {
                    self.bufring.take();
                    self.bufring.give_back(bid);
                }
                return;
            }
        }
        let mut ops = std::mem::take(&mut self.ops);
        let now = self.timers.now();
        let tight = self.bufring.tight();
        let slot = &mut self.slots[index];
        match token.kind {
            Kind::Connect => {
                if res >= 0 {
                    slot.connect_succeeded();
                    // Only connect retries need the list: an idle flow keeps no heap for it.
                    slot.forget_tried();
                }
                let backend = slot
                    .backend_index
                    .zip(slot.backend_set.as_ref())
                    .and_then(|(i, set)| set.backends.get(i as usize));
                if res >= 0 {
                    self.stats
                        .connected(slot.connect_time().unwrap_or_default());
                    if let Some(backend) = backend {
                        backend.stats.flow_started();
                    }
                } else if slot.flow.phase() != Phase::Closing {
                    // The connect itself failed (a cancel because the flow is closing, above,
                    // says nothing); what that says about the backend is health's to decide.
                    // A timeout shows as ECANCELED, from the linked timeout.
                    let error = io::Error::from_raw_os_error(-res);
                    let name = backend.map_or("?", |b| &*b.name);
                    debug!(
                        "flow {} -> {name}: connect failed: {error}",
                        slot.client_addr
                    );
                    self.stats.connect_failed();
                    match classify_connect_error(-res) {
                        ConnectFailure::Local => {
                            self.stats.connect_local_error();
                            let client = slot.client_addr;
                            self.socket_errors.warn(|suppressed| {
                                format!(
                                    "flow {client} -> {name}: connect failed: {error}: {} \
                                     ({suppressed} more since last report)",
                                    local_error_hint(-res)
                                )
                            });
                        }
                        failure => {
                            if let Some(backend) = backend {
                                backend.stats.connect_failed();
                            }
                            if let (ConnectFailure::Backend, Some(i), Some(set)) =
                                (failure, slot.backend_index, &slot.backend_set)
                            {
                                let _ = self.events.try_send(Event::BackendFailure {
                                    set: Arc::clone(set),
                                    index: i as usize,
                                });
                            }
                        }
                    }
                }
                slot.flow.on_connect(res, &mut ops);
                if slot.flow.phase() == Phase::Relaying && !slot.timer_filed {
                    slot.last_active = now;
                    if let Some(idle) = self.idle_ticks {
                        slot.timer_filed = true;
                        self.timers
                            .schedule(now + idle, (token.slot, token.generation));
                    }
                }
            }
            Kind::LinkTimeout => slot.flow.on_link_timeout(&mut ops),
            Kind::HeaderRecv => {
                if slot.flow.on_header_read(res, &mut ops) {
                    self.on_header_bytes(index, res as usize, &mut ops);
                }
            }
            Kind::Preface => slot.flow.on_preface_sent(res, &mut ops),
            Kind::Recv(side) => {
                let buf = cqueue::buffer_select(flags);
                if buf.is_some() {
                    self.bufring.take();
                }
                slot.last_active = now;
                let nonempty = cqueue::sock_nonempty(flags);
                slot.flow.on_recv(side, res, buf, nonempty, tight, &mut ops);
            }
            Kind::Send(side) => {
                if res > 0 {
                    slot.last_active = now;
                }
                slot.flow.on_send(side, res, tight, &mut ops);
            }
            Kind::Shutdown(side) => slot.flow.on_shutdown(side, res, &mut ops),
            Kind::PollIn(side) => slot.flow.on_poll_in(side, res, &mut ops),
            Kind::PollOut(side) => slot.flow.on_poll_out(side, res, &mut ops),
            Kind::Cancel => slot.flow.on_cancel_done(&mut ops),
            Kind::Accept
            | Kind::AcceptCancel
            | Kind::Wake
            | Kind::Tick
            | Kind::Close
            | Kind::FlowClosed
            | Kind::HandedIn => {}
        }
        self.apply(index, &mut ops);
        self.ops = ops;
        if self.handover.is_some() {
            self.export_if_quiesced(index, token.generation);
        }
    }

    /// A connection closed at accept, before it became a flow: counted, and logged like a flow
    /// so the access log shows who was turned away and why.
    fn refused(&mut self, client: std::net::SocketAddr, kind: CloseKind) {
        self.stats.flow_refused(kind);
        if let Some(log) = &self.access_log {
            log.log(FlowRecord {
                start: std::time::SystemTime::now(),
                client,
                listener: self.listen_addr,
                backend: None,
                bytes_client_to_backend: 0,
                bytes_backend_to_client: 0,
                duration: Duration::ZERO,
                connect: None,
                reason: kind,
            });
        }
    }

    pub(super) fn release(&mut self, index: usize, ending: Ending) {
        self.return_kernel_pipes(index);
        let mut slot = self.slots.remove(index);
        self.handover_forget(slot.handover());
        // What the tick's flushes have not counted yet: the counters end exactly at the flow's
        // bytes, which the access log records whole.
        let (new_up, new_down) = live_bytes::take_unaccounted(&mut slot);
        if ending.reset_client {
            let _ = SockRef::from(&slot.client).set_linger(Some(Duration::ZERO));
        }
        if let (true, Some(backend)) = (ending.reset_backend, &slot.backend) {
            let _ = backend.set_linger(Some(Duration::ZERO));
        }
        if let Some(load) = &slot.backend_load {
            load.active.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(ticket) = slot.ticket() {
            self.settings.edge.release(ticket);
        }
        let (up, down) = slot.flow.bytes();
        let backend = slot
            .backend_index
            .zip(slot.backend_set.as_ref())
            .and_then(|(i, set)| set.backends.get(i as usize));
        let kind = CloseKind::from(ending.reason);
        self.stats.flow_closed(kind);
        self.stats.bytes_client_to_backend(new_up);
        self.stats.bytes_backend_to_client(new_down);
        let duration = slot.age();
        if let (Some(backend), Some(_)) = (backend, slot.connect_time()) {
            backend.stats.flow_ended(new_up, new_down);
            self.stats.flow_relayed(duration, up, down);
        }
        if let Some(log) = &self.access_log {
            log.log(FlowRecord {
                start: std::time::SystemTime::now() - duration,
                client: slot.client_addr,
                listener: self.listen_addr,
                backend: backend
                    .filter(|_| slot.connected)
                    .map(|b| Arc::clone(&b.name))
                    .or_else(|| slot.adopted_backend().cloned()),
                bytes_client_to_backend: up,
                bytes_backend_to_client: down,
                duration,
                connect: slot.connect_time(),
                reason: kind,
            });
        }
        // A backend resetting a flow it accepted is not reported to health checks, not even
        // before its first byte: it is the server's choice (iperf3 after an upload, sshd over
        // MaxStartups, load shedding), not evidence that it cannot take connections.
        debug!(
            "flow {} -> {} closed ({:?}): {} bytes up, {} bytes down, {} connect attempts",
            slot.client_addr,
            backend.map_or("-", |b| &*b.name),
            ending.reason,
            up,
            down,
            slot.flow.connect_attempts()
        );
        if matches!(
            ending.reason,
            CloseReason::NoBackend | CloseReason::ConnectFailed
        ) {
            self.accept_errors.warn(|suppressed| {
                format!(
                    "flow {}: no backend could be reached ({:?}, {suppressed} similar since last report)",
                    slot.client_addr, ending.reason
                )
            });
        }
        // Both sockets close through the ring: no system call of their own, and nothing can
        // still refer to them (a flow is released only when none of its operations is in
        // flight). The flow's share of --max-conns is given back when the closes complete.
        let backend = slot.backend.map(IntoRawFd::into_raw_fd);
        self.close_flow(slot.client.into_raw_fd(), backend);
    }

    /// A released flow's descriptors are closed: only now is its share of `--max-conns` free.
    /// Freeing it at release, with the closes still queued in the ring, let this or another
    /// worker accept and open a backend socket while those descriptors were still open: more
    /// backend connections than the limit for a moment, and more descriptors than the limit
    /// was derived from (EMFILE on the backend socket, which closed a client that could have
    /// waited).
    pub(super) fn on_flow_closed(&mut self) {
        self.active_flows.fetch_sub(1, Ordering::Relaxed);
        self.resume_accepting();
    }

    /// Bytes of the client's PROXY header arrived: parse what we have, then read more, refuse,
    /// or admit the real client and connect.
    fn on_header_bytes(&mut self, index: usize, received: usize, ops: &mut Vec<Op>) {
        let edge = Arc::clone(&self.settings.edge);
        let slot = &mut self.slots[index];
        let Some(cold) = slot.cold.as_deref_mut() else {
            return;
        };
        let Some(greeting) = cold.greeting.as_deref_mut() else {
            return;
        };
        let filled = greeting.header.len() + received;
        // SAFETY: the kernel wrote `received` bytes into the spare capacity right after the
        // initialised part (the recv was given exactly that region), so they are initialised.
        unsafe {
            greeting
                .header
                .set_len(filled.min(greeting.header.capacity()))
        };
        match proxy_protocol::parse(&greeting.header) {
            Ok(Parsed::Incomplete { .. }) if greeting.header.len() < greeting.header.capacity() => {
                slot.flow.header_incomplete(ops)
            }
            Ok(Parsed::Incomplete { .. }) => slot.flow.abort(CloseReason::BadProxyHeader, ops),
            Ok(Parsed::Complete {
                header_len, source, ..
            }) => {
                if let Some(client) = source {
                    slot.client_addr = client;
                }
                match edge.admit(slot.client_addr.ip()) {
                    Ok(ticket) => cold.ticket = ticket,
                    Err(reason) => {
                        debug!("flow {}: refused ({reason:?})", slot.client_addr);
                        slot.flow.abort(reason, ops);
                        return;
                    }
                }
                // Our own header (if any) first, then client bytes that came with theirs.
                let mut preface = Vec::new();
                edge.proxy_header(slot.client_addr, greeting.local, &mut preface);
                preface.extend_from_slice(&greeting.header[header_len..]);
                greeting.preface = preface;
                greeting.header = Vec::new();
                slot.flow.set_preface(greeting.preface.len() as u32);
                slot.flow.header_done(ops);
            }
            Err(e) => {
                debug!("flow {}: bad PROXY header: {e}", slot.client_addr);
                slot.flow.abort(CloseReason::BadProxyHeader, ops);
            }
        }
    }

    /// Re-arm recvs of flows that ran out of buffers, at most one flow per returned buffer.
    pub(super) fn wake_starved(&mut self, mut budget: usize) {
        while budget > 0 {
            let Some((index, generation)) = self.starved.pop_front() else {
                return;
            };
            let mut ops = std::mem::take(&mut self.ops);
            if let Some(slot) = self.slots.get_mut(index as usize) {
                if slot.generation == generation && slot.flow.is_starved() {
                    slot.flow
                        .on_buffers_available(self.bufring.tight(), &mut ops);
                    budget -= 1;
                }
            }
            self.apply(index as usize, &mut ops);
            self.ops = ops;
        }
    }
}

/// What to do about a connect that failed for lack of a local resource: it is this host's
/// shortage, not the backend's failure, so the warning names the local fix.
pub(super) fn local_error_hint(errno: i32) -> &'static str {
    match errno {
        libc::EADDRNOTAVAIL | libc::EADDRINUSE => {
            "out of local ports towards this backend; not held against it. Add --source \
             addresses or widen net.ipv4.ip_local_port_range"
        }
        libc::EMFILE | libc::ENFILE => {
            "out of file descriptors; not held against the backend. Raise the open-file limit \
             (LimitNOFILE, fs.file-max) or lower --max-conns"
        }
        _ => "the kernel is short of memory or buffers; not held against the backend",
    }
}
