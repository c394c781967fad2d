//! ringway-load: test backends and load workloads for benchmarking Ringway (and any other
//! TCP proxy) on loopback.
//!
//! Everything that can be checked without a socket lives in small pure modules
//! (`duration`, `payload`, `sources`, `stats`); the event loops are in `server` and the
//! workload modules.

pub mod bulk;
pub mod connect;
pub mod duration;
pub mod idle;
pub mod net;
pub mod payload;
pub mod probe;
pub mod rr;
pub mod server;
pub mod soak;
pub mod sources;
pub mod stats;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// Options shared by every client workload.
#[derive(Clone, Debug)]
pub struct Common {
    pub target: SocketAddr,
    pub duration: Duration,
    pub conns: usize,
    pub threads: usize,
    /// Per-operation timeout (connect, one reply).
    pub timeout: Duration,
    /// Client source addresses to spread connections over (empty: let the kernel pick).
    pub sources: Vec<IpAddr>,
}

impl Common {
    /// The client connections handled by thread `t`: global indices `t, t+threads, ...`.
    pub fn conns_of_thread(&self, t: usize) -> Vec<usize> {
        (t..self.conns).step_by(self.threads.max(1)).collect()
    }

    pub fn source_for(&self, conn_index: usize) -> Option<IpAddr> {
        sources::pick(&self.sources, conn_index)
    }
}
