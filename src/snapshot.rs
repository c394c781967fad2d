//! The immutable view of the backends that workers route by: addresses, selection table and
//! health mask. The control thread builds a new one for every change and hands each worker an
//! `Arc` of it; a worker never sees a half-updated set.

use std::net::SocketAddr;

use socket2::SockAddr;

use crate::balance::{Algorithm, BackendId, Table};

/// A backend as workers need it.
#[derive(Debug)]
pub struct Backend {
    /// Identity for hashing and the name in logs: the configured address text.
    pub name: String,
    pub addr: SocketAddr,
    /// The address in the form connect() takes; the kernel copies it when the connect is submitted.
    pub sockaddr: SockAddr,
}

pub struct Snapshot {
    pub backends: Vec<Backend>,
    pub table: Table,
    /// `healthy[i]`: backend i may take new flows.
    pub healthy: Vec<bool>,
}

impl Snapshot {
    /// `backends` pairs each identity with its resolved address.
    pub fn new(backends: Vec<(BackendId, SocketAddr)>, vnodes: u32, seed: u64) -> Snapshot {
        let ids: Vec<BackendId> = backends.iter().map(|(id, _)| id.clone()).collect();
        let table = Table::build(&ids, Algorithm::Ring, vnodes, None, seed);
        let healthy = vec![true; backends.len()];
        let backends = backends
            .into_iter()
            .map(|(id, addr)| Backend {
                name: id.name,
                addr,
                sockaddr: SockAddr::from(addr),
            })
            .collect();
        Snapshot {
            backends,
            table,
            healthy,
        }
    }

    /// The backend for a flow with `key_hash` that is healthy and for which `untried(i)` holds.
    pub fn choose(&self, key_hash: u64, untried: impl Fn(usize) -> bool) -> Option<usize> {
        self.table.choose(key_hash, |i| {
            self.healthy.get(i).copied().unwrap_or(false) && untried(i)
        })
    }
}
