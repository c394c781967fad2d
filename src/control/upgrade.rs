//! `--upgrade-socket` and `--takeover` around start-up and in the control loop.
//!
//! Fresh start with `--upgrade-socket`: the socket is bound before anything else (a live
//! process there is a start-up error), and its thread starts once the workers run.
//! `--takeover`: before start-up, connect to the running process and take its listeners; the
//! workers start on them; then adopt its flows; then serve the socket in its place.
//! In the control loop: a successor arrives -> `handover::old::hand_over`; on success the
//! workers are stopped (they hold nothing any more) and the process exits 0.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use log::{info, warn};
use socket2::Socket;

use super::control_loop::Control;
use super::threads::Threads;
use super::StartError;
use crate::config::Config;
use crate::handover::fds::Conn;
use crate::handover::new::{self, Takeover};
use crate::handover::old::{self, Incoming, UpgradeServer};
use crate::handover::socket::{self, Bound};
use crate::net;
use crate::worker::{Command, Edge};

/// What the control loop does after a successor came.
pub enum Next {
    /// The handover failed: keep serving (every flow resumed).
    Serve,
    /// Everything was handed over: the workers are told to stop; exit.
    Exit,
    /// The successor cannot read our handover version: drain, as on SIGTERM.
    Drain,
}

/// The upgrade state between flag parsing and the control loop.
pub struct Before {
    path: Option<std::path::PathBuf>,
    /// Bound before start-up (fresh start).
    bound: Option<Bound>,
    /// The connection to the previous process (`--takeover`).
    conn: Option<Conn>,
    listeners: Option<Vec<Socket>>,
}

impl Before {
    pub fn start(config: &Config) -> Result<Before, StartError> {
        let mut before = Before {
            path: config.upgrade_socket.clone(),
            bound: None,
            conn: None,
            listeners: None,
        };
        let Some(path) = &config.upgrade_socket else {
            return Ok(before);
        };
        if config.takeover {
            match new::connect(path).map_err(StartError)? {
                Takeover::Listeners { conn, listeners } => {
                    before.conn = Some(conn);
                    before.listeners = Some(listeners);
                }
                Takeover::Fallback => {}
            }
        } else {
            before.bound = Some(socket::bind_fresh(path).map_err(StartError)?);
        }
        Ok(before)
    }

    /// The listeners handed over, if any (start-up uses them instead of binding).
    pub fn listeners(&mut self) -> Option<Vec<Socket>> {
        self.listeners.take()
    }

    /// After start-up: adopt the flows (`--takeover`), then serve the upgrade socket.
    pub fn after_start(
        &mut self,
        control: &mut Control,
        threads: &mut Threads,
    ) -> Result<(), StartError> {
        let Some(path) = self.path.clone() else {
            return Ok(());
        };
        if let Some(mut conn) = self.conn.take() {
            // Under systemd (Type=notify, NotifyAccess=all, the successor started by
            // ExecReload: deploy/ringway.service), the successor reports MAINPID= its own PID
            // here: it holds the listeners, and the old main process cannot exit before
            // `adopt_flows` below has told it we are ready, so systemd follows us instead of
            // seeing its main process exit. See docs/operations.md, "Upgrades that keep every flow".
            match super::notify::main_pid(std::process::id()) {
                Ok(true) => info!("--takeover: told the service manager this is its main process"),
                Ok(false) => {}
                Err(e) => warn!("--takeover: cannot send MAINPID= to the service manager: {e}"),
            }
            let known: HashSet<Arc<str>> = control
                .backends
                .snapshot()
                .backends()
                .iter()
                .map(|b| Arc::clone(&b.name))
                .collect();
            let drain = control.config.drain_timeout;
            let mut removed: HashSet<String> = HashSet::new();
            let mut adopted = 0;
            let pauses = crate::handover::Pauses::new();
            let outcome = new::adopt_flows(
                &mut conn,
                &mut threads.workers,
                &mut adopted,
                &pauses,
                |batch| {
                    for flow in batch {
                        if let Some(name) = &flow.state.backend {
                            if !name.is_empty() && !known.contains(name.as_str()) {
                                removed.insert(name.clone());
                            }
                        }
                    }
                },
            );
            // The workers record each flow as they resume it: wait (briefly) for the last ones.
            let deadline = Instant::now() + std::time::Duration::from_secs(2);
            while pauses.count() < adopted && Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let pause = if adopted > 0 {
                format!("; pause per flow {}", pauses.summary())
            } else {
                String::new()
            };
            match outcome {
                Ok(()) => info!("--takeover: handover complete: {adopted} flows adopted{pause}"),
                // Nothing moved: the old process carries on with everything; leave it alone.
                Err(e) if adopted == 0 => {
                    return Err(StartError(format!(
                        "--takeover: the handover broke off before any flow moved ({e}); the \
                         process at {} keeps serving",
                        path.display()
                    )))
                }
                Err(e) => warn!(
                    "--takeover: the handover broke off ({e}); serving the {adopted} flows \
                     adopted so far{pause} (the old process resumes the rest)"
                ),
            }
            if !removed.is_empty() {
                let mut names: Vec<String> = removed.into_iter().collect();
                names.sort();
                match drain {
                    Some(d) => {
                        info!(
                            "adopted flows on backends not in this process's set ({}) close in {d:?} \
                             (--drain-timeout)",
                            names.join(", ")
                        );
                        let names: Vec<Arc<str>> =
                            names.iter().map(|n| Arc::from(n.as_str())).collect();
                        let deadline = Instant::now() + d;
                        threads.workers.broadcast(|| Command::CloseBackends {
                            names: names.clone(),
                            deadline,
                        });
                    }
                    None => info!(
                        "adopted flows on backends not in this process's set ({}) run until they \
                         end (no --drain-timeout)",
                        names.join(", ")
                    ),
                }
            }
        }
        let bound = match self.bound.take() {
            Some(bound) => bound,
            // Taking over: the previous process's socket is replaced under its feet; it no
            // longer removes the path at exit (the file is not its own any more).
            None => socket::bind_replacing(&path).map_err(StartError)?,
        };
        let server = UpgradeServer::start(bound).map_err(StartError)?;
        control.upgrades = server.incoming.clone();
        control.upgrade = Some(server);
        info!("waiting for a successor on {}", path.display());
        Ok(())
    }
}

impl Control {
    /// A successor connected to the upgrade socket.
    pub fn on_successor(&mut self, incoming: Incoming, threads: &mut Threads) -> Next {
        match incoming {
            Incoming::CannotRead { .. } => Next::Drain,
            Incoming::Successor(conn) => {
                match old::hand_over(
                    conn,
                    &mut threads.workers,
                    &self.listener_fds,
                    self.listen_addr,
                ) {
                    Ok(_) => {
                        self.handed_over = true;
                        self.handed_over_at = Some(Instant::now());
                        threads.workers.broadcast(|| Command::Stop);
                        Next::Exit
                    }
                    Err(e) => {
                        warn!(
                            "handover failed: {e}; every flow not handed over continues here \
                             and accepting resumed"
                        );
                        if let Some(server) = &self.upgrade {
                            server.idle();
                        }
                        Next::Serve
                    }
                }
            }
        }
    }
}

/// The admin listener. With `--upgrade-socket` it is shared (SO_REUSEPORT) so that a successor
/// can bind the same `--admin` address while this process still holds it; for that moment a
/// scrape reaches either process.
pub fn bind_admin(addr: SocketAddr, shared: bool) -> std::io::Result<std::net::TcpListener> {
    if !shared {
        return std::net::TcpListener::bind(addr);
    }
    let socket = Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(128)?;
    Ok(socket.into())
}

/// The listeners handed over, for `workers` workers: with more workers, new SO_REUSEPORT
/// listeners join them on the same address; with fewer, every listener is kept and the worker
/// count is raised to match (closing a listener would reset the connections queued on it).
/// Returns the listeners and the number of workers to run.
pub fn use_inherited(
    mut listeners: Vec<Socket>,
    workers: usize,
    backlog: i32,
    edge: &Edge,
    listen: SocketAddr,
) -> Result<(Vec<Socket>, usize), StartError> {
    let fail =
        |e: std::io::Error| StartError(format!("--takeover: the listeners handed over: {e}"));
    let first = listeners
        .first()
        .ok_or_else(|| StartError("--takeover: no listener was handed over".into()))?;
    let addr = net::local_addr(first).map_err(fail)?;
    if listen != addr && !(listen.port() == 0 && listen.ip() == addr.ip()) {
        warn!(
            "--listen {listen} differs from the listeners handed over ({addr}): serving {addr} \
             (to move to another address, start fresh and upgrade with SIGTERM)"
        );
    }
    for listener in &listeners {
        listener.set_nonblocking(true).map_err(fail)?;
        edge.configure_listener(listener).map_err(fail)?;
    }
    let have = listeners.len();
    if workers > have {
        let more = net::bind_listeners(addr, workers - have, backlog, |s| {
            edge.configure_listener(s)
        })
        .map_err(|e| StartError(format!("cannot listen on {addr}: {e}")))?;
        listeners.extend(more);
    } else if workers < have {
        info!(
            "--workers {workers} is below the {have} listeners handed over: running {have} \
             workers (closing a listener would reset the connections queued on it)"
        );
    }
    let count = listeners.len();
    Ok((listeners, count))
}
