//! The running process's side: wait for a successor on the upgrade socket, hand it the
//! listeners, then the flows in acknowledged batches; resume everything not acknowledged if the
//! successor dies or stalls.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use log::{info, warn};

use super::fds::Conn;
use super::protocol::{FlowState, Message, MAX_FDS_PER_FRAME, VERSION};
use super::socket::{self, Bound};
use super::{Exported, FlowHandle};
use crate::control::workers::WorkerPool;
use crate::worker::Command;

/// How long a successor may take to answer the hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a successor may take to start its workers on the listeners.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a successor may take to acknowledge a batch.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the workers may go without exporting anything while flows are still quiescing:
/// flows still connecting or reading a PROXY header finish within their own timeouts
/// (`--connect-timeout` times the attempts, `--proxy-header-timeout`), far below this.
const EXPORT_STALL: Duration = Duration::from_secs(60);
/// How often the successor is checked while the workers have nothing to export.
const WATCH_INTERVAL: Duration = Duration::from_millis(50);
/// Most flows in one batch (each has two descriptors).
const BATCH_FLOWS: usize = MAX_FDS_PER_FRAME / 2;
/// A batch stops growing past this many pending bytes.
const BATCH_BYTES: usize = 8 << 20;

/// What the upgrade socket's thread passes to the control loop.
pub enum Incoming {
    /// A successor that speaks our version: hand everything over to it.
    Successor(Conn),
    /// A successor that cannot read our version: drain, as on SIGTERM.
    CannotRead { reads: u16 },
}

/// The thread waiting on the upgrade socket.
pub struct UpgradeServer {
    pub incoming: Receiver<Incoming>,
    /// Set while a successor is being dealt with: a second one is refused.
    busy: Arc<AtomicBool>,
    bound: Bound,
}

impl UpgradeServer {
    /// Starts the thread; it lives until the process exits (it only ever blocks in accept).
    pub fn start(bound: Bound) -> Result<UpgradeServer, String> {
        let (tx, incoming) = crossbeam_channel::bounded(1);
        let busy = Arc::new(AtomicBool::new(false));
        let listener = bound
            .listener
            .try_clone()
            .map_err(|e| format!("--upgrade-socket: {e}"))?;
        let thread_busy = Arc::clone(&busy);
        std::thread::Builder::new()
            .name("ringway-upgrade".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    match stream {
                        // A thread each, so that one that takes its time to answer cannot keep
                        // a second one from being told that a handover is in progress.
                        Ok(stream) => {
                            let (busy, tx) = (Arc::clone(&thread_busy), tx.clone());
                            let greeter = std::thread::Builder::new()
                                .name("ringway-upgrade-greet".into())
                                .spawn(move || greet(stream, &busy, &tx));
                            if let Err(e) = greeter {
                                warn!("--upgrade-socket: cannot answer a successor: {e}");
                            }
                        }
                        Err(e) => warn!("--upgrade-socket: accept failed: {e}"),
                    }
                }
            })
            .map_err(|e| format!("cannot start the upgrade thread: {e}"))?;
        Ok(UpgradeServer {
            incoming,
            busy,
            bound,
        })
    }

    /// The handover failed or was refused: the next successor is welcome.
    pub fn idle(&self) {
        self.busy.store(false, Ordering::SeqCst);
    }

    /// At exit: remove the socket file unless a successor's is there now.
    pub fn remove_socket(&self) {
        self.bound.remove_if_ours();
    }
}

/// Checks who connected, then says hello and reads the answer.
fn greet(stream: UnixStream, busy: &AtomicBool, tx: &crossbeam_channel::Sender<Incoming>) {
    let mut conn = Conn::new(stream);
    let _ = conn.set_timeout(Some(HELLO_TIMEOUT));
    let own = socket::own_uid();
    match socket::peer_uid(conn.stream()) {
        Ok(uid) if socket::peer_allowed(uid, own) => {}
        Ok(uid) => {
            warn!("--upgrade-socket: refused a process of uid {uid} (only uid {own} or root may take over)");
            let reason =
                format!("uid {uid} may not take over from uid {own} (same user or root only)");
            let _ = conn.send(&Message::Refused { reason }, &[]);
            return;
        }
        Err(e) => {
            warn!("--upgrade-socket: cannot tell who connected ({e}); refused");
            return;
        }
    }
    if busy
        .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        info!("--upgrade-socket: refused a second successor: a handover is in progress");
        let reason = "a handover to another process is already in progress".to_string();
        let _ = conn.send(&Message::Refused { reason }, &[]);
        return;
    }
    let answer = conn
        .send(&Message::Hello { version: VERSION }, &[])
        .and_then(|()| conn.recv());
    match answer {
        Ok((Message::Speak { version }, _)) if version == VERSION => {
            info!("a successor connected to the upgrade socket: handing over");
            let _ = tx.send(Incoming::Successor(conn));
        }
        Ok((Message::CannotRead { reads }, _)) => {
            warn!(
                "the successor reads handover version {reads} only, this process speaks \
                 {VERSION}: falling back to a drain (as on SIGTERM)"
            );
            let _ = tx.send(Incoming::CannotRead { reads });
        }
        Ok((other, _)) => {
            warn!(
                "--upgrade-socket: unexpected {} from a successor; ignored",
                other.name()
            );
            busy.store(false, Ordering::SeqCst);
        }
        Err(e) => {
            info!("--upgrade-socket: a process connected and left before the handover: {e}");
            busy.store(false, Ordering::SeqCst);
        }
    }
}

/// A flow in the batch being shipped.
struct Shipped {
    worker: usize,
    handle: Option<FlowHandle>,
    /// Owned only for connections not started.
    owned: Option<OwnedFd>,
}

/// Hands the listeners and every flow to the successor on `conn`. `Ok(flows moved)` when all
/// is handed over: the caller stops the workers (they hold nothing any more) and exits. On
/// `Err` every flow not acknowledged has been resumed and accepting has resumed.
pub fn hand_over(
    mut conn: Conn,
    workers: &mut WorkerPool,
    listeners: &[RawFd],
    addr: SocketAddr,
) -> Result<u64, String> {
    let started = Instant::now();
    let _ = conn.set_timeout(Some(READY_TIMEOUT));
    let listeners_sent = conn
        .send(
            &Message::Listeners {
                addr: addr.to_string(),
                count: listeners.len() as u8,
            },
            listeners,
        )
        .map_err(|e| format!("sending the listeners: {e}"))
        .and_then(|()| match conn.recv() {
            Ok((Message::Ready, _)) => Ok(()),
            Ok((other, _)) => Err(format!("expected Ready, got {}", other.name())),
            Err(e) => Err(format!("waiting for the successor to start: {e}")),
        });
    // On failure here nothing was quiesced yet: the workers never stopped.
    listeners_sent?;
    info!(
        "the successor accepts on the listeners ({:?}); handing over the flows",
        started.elapsed()
    );
    let _ = conn.set_timeout(Some(ACK_TIMEOUT));
    let (tx, exports) = crossbeam_channel::unbounded();
    workers.broadcast(|| Command::Handover {
        exports: tx.clone(),
    });
    drop(tx);
    let mut shipper = Shipper {
        conn,
        exports,
        workers_left: workers.len(),
        batch: 0,
        moved: 0,
        pending_bytes: 0,
    };
    match shipper.run(workers) {
        Ok(()) => {
            let moved = shipper.moved;
            let _ = shipper.conn.send(&Message::Done { flows: moved }, &[]);
            info!(
                "handover complete: {moved} flows moved in {:?} ({} bytes read and not yet \
                 written went with them); exiting",
                started.elapsed(),
                shipper.pending_bytes
            );
            Ok(moved)
        }
        Err((e, unsent)) => {
            shipper.resume(workers, unsent);
            Err(e)
        }
    }
}

struct Shipper {
    conn: Conn,
    exports: Receiver<Exported>,
    workers_left: usize,
    batch: u64,
    moved: u64,
    /// Bytes read and not yet written, in the flows moved.
    pending_bytes: u64,
}

type Failure = (String, Vec<(usize, OwnedFd)>);

impl Shipper {
    fn run(&mut self, workers: &mut WorkerPool) -> Result<(), Failure> {
        loop {
            let mut states: Vec<FlowState> = Vec::new();
            let mut fds: Vec<RawFd> = Vec::new();
            let mut shipped: Vec<Shipped> = Vec::new();
            let mut bytes = 0;
            // Wait for the first export, then take what is ready, up to a batch.
            let mut first = true;
            loop {
                if states.len() >= BATCH_FLOWS || bytes >= BATCH_BYTES {
                    break;
                }
                // The size is checked before taking an export, so none is ever left over.
                let next = if first && self.workers_left > 0 {
                    match self.next_export() {
                        Ok(Some(e)) => e,
                        Ok(None) => {
                            self.workers_left = 0;
                            break;
                        }
                        Err(e) => return Err((e, owned(shipped))),
                    }
                } else {
                    match self.exports.try_recv() {
                        Ok(e) => e,
                        Err(_) => break,
                    }
                };
                first = false;
                match next {
                    Exported::Drained { .. } => self.workers_left -= 1,
                    Exported::Flow {
                        worker,
                        handle,
                        state,
                        client,
                        backend,
                    } => {
                        bytes += state.pipes.iter().map(|p| p.pending.len()).sum::<usize>();
                        fds.extend([client, backend]);
                        states.push(state);
                        shipped.push(Shipped {
                            worker,
                            handle: Some(handle),
                            owned: None,
                        });
                    }
                    Exported::Unstarted { worker, state, fd } => {
                        fds.push(fd.as_raw_fd());
                        states.push(state);
                        shipped.push(Shipped {
                            worker,
                            handle: None,
                            owned: Some(fd),
                        });
                    }
                }
                if self.workers_left == 0 && states.is_empty() {
                    break;
                }
            }
            if states.is_empty() {
                if self.workers_left == 0 {
                    return Ok(());
                }
                continue;
            }
            self.batch += 1;
            let batch = self.batch;
            let count = states.len() as u64;
            let message = Message::Flows {
                batch,
                flows: states,
            };
            let acked = self
                .conn
                .send(&message, &fds)
                .map_err(|e| format!("sending batch {batch}: {e}"))
                .and_then(|()| match self.conn.recv() {
                    Ok((Message::Ack { batch: b }, _)) if b == batch => Ok(()),
                    Ok((other, _)) => Err(format!("expected Ack {batch}, got {}", other.name())),
                    Err(e) => Err(format!("waiting for the ack of batch {batch}: {e}")),
                })
                .and_then(|()| {
                    self.conn
                        .send(&Message::Commit { batch }, &[])
                        .map_err(|e| format!("committing batch {batch}: {e}"))
                });
            if let Err(e) = acked {
                return Err((e, owned(shipped)));
            }
            // The successor holds them now: close our copies.
            let mut per_worker: Vec<Vec<FlowHandle>> = vec![Vec::new(); workers.len()];
            for s in shipped {
                if let (Some(handle), Some(list)) = (s.handle, per_worker.get_mut(s.worker)) {
                    list.push(handle);
                }
                drop(s.owned);
            }
            for (worker, handles) in per_worker.into_iter().enumerate() {
                if !handles.is_empty() {
                    workers.send_to(worker, Command::Release(handles));
                }
            }
            self.moved += count;
            self.pending_bytes += bytes as u64;
        }
    }

    /// Waits for the next export (`None`: every worker is gone), watching the successor
    /// meanwhile: flows still connecting can keep us waiting for seconds, and a successor that
    /// died in that time must not keep the flows already quiesced waiting too.
    fn next_export(&mut self) -> Result<Option<Exported>, String> {
        let started = Instant::now();
        loop {
            match self.exports.recv_timeout(WATCH_INTERVAL) {
                Ok(e) => return Ok(Some(e)),
                Err(RecvTimeoutError::Disconnected) => return Ok(None),
                Err(RecvTimeoutError::Timeout) => {}
            }
            if self.conn.peer_closed() {
                return Err("the successor closed the connection".into());
            }
            if started.elapsed() >= EXPORT_STALL {
                return Err(format!("the workers exported nothing for {EXPORT_STALL:?}"));
            }
        }
    }

    /// The successor failed: every worker takes its flows back and accepts again.
    fn resume(&mut self, workers: &mut WorkerPool, unsent: Vec<(usize, OwnedFd)>) {
        let mut per_worker: Vec<Vec<OwnedFd>> = (0..workers.len()).map(|_| Vec::new()).collect();
        let mut give_back = |worker: usize, fd: OwnedFd| {
            if let Some(list) = per_worker.get_mut(worker) {
                list.push(fd);
            }
        };
        for (worker, fd) in unsent {
            give_back(worker, fd);
        }
        while let Ok(e) = self.exports.try_recv() {
            if let Exported::Unstarted { worker, fd, .. } = e {
                give_back(worker, fd);
            }
        }
        for (worker, fds) in per_worker.into_iter().enumerate() {
            workers.send_to(worker, Command::Resume(fds));
        }
        // Connections a worker handed out after we looked, before it saw `Resume`: until every
        // worker has dropped its sender (it does on `Resume`).
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match self.exports.recv_deadline(deadline) {
                Ok(Exported::Unstarted { worker, fd, .. }) => {
                    workers.send_to(worker, Command::Resume(vec![fd]));
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }
}

fn owned(shipped: Vec<Shipped>) -> Vec<(usize, OwnedFd)> {
    shipped
        .into_iter()
        .filter_map(|s| Some((s.worker, s.owned?)))
        .collect()
}
