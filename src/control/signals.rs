//! The signal thread: SIGHUP, SIGINT, SIGTERM and SIGUSR1 are caught from before the first worker starts
//! until the process exits, and forwarded to the control thread as a channel it can select on.

use std::thread::JoinHandle;

use crossbeam_channel::Receiver;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::{Handle, Signals};

use super::StartError;

pub struct SignalThread {
    handle: Handle,
    thread: JoinHandle<()>,
    received: Receiver<i32>,
}

impl SignalThread {
    /// Installs the handlers and starts forwarding. Call it before anything else starts: a
    /// SIGHUP or SIGTERM during start-up (a systemd reload right after start) must not kill the
    /// process with the default action; it waits in the channel until the control loop runs.
    pub fn start() -> Result<SignalThread, StartError> {
        let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP, SIGUSR1])
            .map_err(|e| StartError(format!("cannot install signal handlers: {e}")))?;
        let handle = signals.handle();
        // Unbounded: the forwarder must never block on a full channel, or `stop` could not end
        // it. Signals are few; nothing piles up.
        let (forward, received) = crossbeam_channel::unbounded();
        let thread = std::thread::Builder::new()
            .name("ringway-signals".into())
            .spawn(move || {
                for signal in signals.forever() {
                    if forward.send(signal).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| StartError(format!("cannot start the signal thread: {e}")))?;
        Ok(SignalThread {
            handle,
            thread,
            received,
        })
    }

    /// The signals caught so far and from now on, in order.
    pub fn received(&self) -> &Receiver<i32> {
        &self.received
    }

    /// Stops forwarding and returns the thread, which ends at once. The handlers stay installed
    /// (and do nothing) until the process exits, which is what comes next.
    pub fn stop(self) -> JoinHandle<()> {
        self.handle.close();
        self.thread
    }
}

/// `SIGINT`, `SIGTERM`, `SIGHUP` or `SIGUSR1`, for log lines.
pub fn name(signal: i32) -> &'static str {
    match signal {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        SIGHUP => "SIGHUP",
        SIGUSR1 => "SIGUSR1",
        _ => "a signal",
    }
}

/// SIGINT and SIGTERM ask the process to stop; SIGHUP asks for a reload; SIGUSR1 for the access
/// log to be reopened.
pub fn is_stop(signal: i32) -> bool {
    signal == SIGINT || signal == SIGTERM
}
