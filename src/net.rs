//! Socket set-up with socket2: the per-worker SO_REUSEPORT listeners, backend sockets, and
//! name resolution at start-up.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::config::BackendSpec;

/// Binds `count` listeners on `addr` with SO_REUSEPORT, one per worker, so the kernel spreads
/// new connections over the workers and no accept wakes more than one ring. With port 0 the
/// first listener picks the port and the others join it.
/// `configure` sets options that accepted sockets inherit; `backlog` is capped by the kernel at
/// net.core.somaxconn.
pub fn bind_listeners(
    addr: SocketAddr,
    count: usize,
    backlog: i32,
    configure: impl Fn(&Socket) -> io::Result<()>,
) -> io::Result<Vec<Socket>> {
    let mut listeners = Vec::with_capacity(count);
    let mut bind_to = addr;
    for _ in 0..count {
        let socket = Socket::new(
            Domain::for_address(bind_to),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        configure(&socket)?;
        socket.bind(&SockAddr::from(bind_to))?;
        socket.listen(backlog)?;
        if bind_to.port() == 0 {
            bind_to = local_addr(&socket)?;
        }
        listeners.push(socket);
    }
    Ok(listeners)
}

pub fn local_addr(socket: &Socket) -> io::Result<SocketAddr> {
    socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("listener has no IP address"))
}

/// A non-blocking TCP socket for connecting to `addr` (options are the caller's: see
/// `worker::Edge::backend_socket`).
pub fn backend_socket(addr: &SocketAddr) -> io::Result<Socket> {
    Socket::new(
        Domain::for_address(*addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )
}

/// Resolves a backend's host once, at start-up; the first address wins.
pub fn resolve(spec: &BackendSpec) -> Result<SocketAddr, String> {
    let host = spec.host.as_str();
    (host, spec.port)
        .to_socket_addrs()
        .map_err(|e| format!("backend {}: cannot resolve '{}': {e}", spec.name, host))?
        .next()
        .ok_or_else(|| format!("backend {}: '{}' has no addresses", spec.name, host))
}
