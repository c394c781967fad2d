//! The successor's side (`--takeover`): take the listeners, start on them, then adopt the
//! flows batch by batch until the old process says it is done.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use log::{info, warn};
use socket2::Socket;

use super::fds::Conn;
use super::protocol::{answer_hello, Message};
use super::Adopted;
use crate::control::workers::WorkerPool;
use crate::worker::Command;

/// How long the old process may take to say hello, send listeners, or a next batch.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// What connecting to the running process gave.
pub enum Takeover {
    /// Its listeners, to use instead of binding; the connection continues with the flows.
    Listeners { conn: Conn, listeners: Vec<Socket> },
    /// It speaks a handover version this build cannot read: it drains (as on SIGTERM) and
    /// this process starts on listeners of its own.
    Fallback,
}

/// Connects to the process at `path` and receives its listeners. A missing process is an
/// error: a successor never silently starts fresh.
pub fn connect(path: &Path) -> Result<Takeover, String> {
    let where_ = path.display();
    let stream = UnixStream::connect(path)
        .map_err(|e| format!("--takeover: no Ringway process at {where_} ({e})"))?;
    let mut conn = Conn::new(stream);
    conn.set_timeout(Some(STEP_TIMEOUT))
        .map_err(|e| format!("--takeover: {where_}: {e}"))?;
    let version = match conn.recv() {
        Ok((Message::Hello { version }, _)) => version,
        Ok((Message::Refused { reason }, _)) => {
            return Err(format!(
                "--takeover: the process at {where_} refused the handover: {reason}"
            ))
        }
        Ok((other, _)) => {
            return Err(format!(
                "--takeover: {where_}: expected Hello, got {}",
                other.name()
            ))
        }
        Err(e) => return Err(format!("--takeover: {where_}: {e}")),
    };
    let answer = answer_hello(version);
    conn.send(&answer, &[])
        .map_err(|e| format!("--takeover: {where_}: {e}"))?;
    if let Message::CannotRead { reads } = answer {
        warn!(
            "--takeover: the process at {where_} speaks handover version {version}, this build \
             reads version {reads} only: starting on listeners of its own while it drains its \
             flows (as on SIGTERM)"
        );
        return Ok(Takeover::Fallback);
    }
    match conn.recv() {
        Ok((Message::Listeners { addr, count }, fds)) => {
            info!("--takeover: received {count} listeners on {addr} from {where_}");
            let listeners = fds.into_iter().map(Socket::from).collect();
            Ok(Takeover::Listeners { conn, listeners })
        }
        Ok((other, _)) => Err(format!(
            "--takeover: {where_}: expected Listeners, got {}",
            other.name()
        )),
        Err(e) => Err(format!("--takeover: {where_}: {e}")),
    }
}

/// Tells the old process that the workers accept on its listeners, then adopts its flows until
/// it is done. Flows of a batch are touched only once the old process commits it (it has
/// stopped touching them); a batch not committed is dropped here (the old process resumes it).
/// Returns the flows adopted; on `Err` the flows adopted so far stay.
pub fn adopt_flows(
    conn: &mut Conn,
    workers: &mut WorkerPool,
    adopted: &mut u64,
    pauses: &std::sync::Arc<super::Pauses>,
    mut on_batch: impl FnMut(&[Adopted]),
) -> Result<(), String> {
    conn.send(&Message::Ready, &[])
        .map_err(|e| format!("telling the old process we are ready: {e}"))?;
    let mut turn = 0usize;
    loop {
        match conn.recv() {
            Ok((Message::Flows { batch, flows }, fds)) => {
                conn.send(&Message::Ack { batch }, &[])
                    .map_err(|e| format!("acknowledging batch {batch}: {e}"))?;
                match conn.recv() {
                    Ok((Message::Commit { batch: b }, _)) if b == batch => {}
                    Ok((other, _)) => {
                        return Err(format!("expected Commit {batch}, got {}", other.name()))
                    }
                    Err(e) => return Err(format!("waiting for the commit of batch {batch}: {e}")),
                }
                let mut fds = fds.into_iter();
                let mut take = || -> Option<OwnedFd> { fds.next() };
                let mut received = Vec::with_capacity(flows.len());
                for state in flows {
                    let Some(client) = take() else { break };
                    let backend = if state.is_unstarted() { None } else { take() };
                    received.push(Adopted {
                        state,
                        client,
                        backend,
                    });
                }
                on_batch(&received);
                *adopted += received.len() as u64;
                // Spread over the workers in turn.
                let n = workers.len().max(1);
                let mut per_worker: Vec<Vec<Adopted>> = (0..n).map(|_| Vec::new()).collect();
                for flow in received {
                    per_worker[turn % n].push(flow);
                    turn += 1;
                }
                for (worker, flows) in per_worker.into_iter().enumerate() {
                    if !flows.is_empty() {
                        workers
                            .send_to(worker, Command::Adopt(flows, std::sync::Arc::clone(pauses)));
                    }
                }
            }
            Ok((Message::Done { .. }, _)) => return Ok(()),
            Ok((other, _)) => return Err(format!("unexpected {}", other.name())),
            Err(e) => return Err(e.to_string()),
        }
    }
}
