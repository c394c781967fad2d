//! Socket helpers: non-blocking client sockets with an optional source address, listeners.

use mio::net::{TcpListener, TcpStream};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

fn client_socket(target: SocketAddr, source: Option<IpAddr>) -> io::Result<Socket> {
    let sock = Socket::new(
        Domain::for_address(target),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    sock.set_tcp_nodelay(true)?;
    if let Some(ip) = source {
        sock.bind(&SockAddr::from(SocketAddr::new(ip, 0)))?;
    }
    Ok(sock)
}

/// Start a non-blocking connect. The result is known when the stream becomes writable:
/// see [`connect_result`].
pub fn start_connect(target: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let sock = client_socket(target, source)?;
    sock.set_nonblocking(true)?;
    match sock.connect(&SockAddr::from(target)) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(std::net::TcpStream::from(sock)))
}

/// After a writable event on a connecting stream: Ok(true) connected, Ok(false) still
/// in progress, Err(e) failed.
pub fn connect_result(stream: &TcpStream) -> io::Result<bool> {
    if let Some(e) = stream.take_error()? {
        return Err(e);
    }
    match stream.peer_addr() {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Blocking connect with a timeout, then switched to non-blocking for use with mio.
pub fn connect_blocking(
    target: SocketAddr,
    source: Option<IpAddr>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let sock = client_socket(target, source)?;
    sock.connect_timeout(&SockAddr::from(target), timeout)?;
    sock.set_nonblocking(true)?;
    Ok(TcpStream::from_std(std::net::TcpStream::from(sock)))
}

/// A non-blocking listener with SO_REUSEADDR and a deep backlog.
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.bind(&SockAddr::from(addr))?;
    sock.listen(4096)?;
    sock.set_nonblocking(true)?;
    Ok(TcpListener::from_std(std::net::TcpListener::from(sock)))
}

/// Is this error "try again later"?
pub fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// Short error kind for counters.
pub fn error_kind(prefix: &str, e: &io::Error) -> String {
    let k = match e.kind() {
        io::ErrorKind::ConnectionRefused => "refused",
        io::ErrorKind::ConnectionReset => "reset",
        io::ErrorKind::ConnectionAborted => "aborted",
        io::ErrorKind::BrokenPipe => "broken_pipe",
        io::ErrorKind::TimedOut => "timeout",
        io::ErrorKind::AddrInUse => "addr_in_use",
        io::ErrorKind::AddrNotAvailable => "addr_not_available",
        _ => match e.raw_os_error() {
            Some(libc::EMFILE) | Some(libc::ENFILE) => "too_many_files",
            Some(libc::ETIMEDOUT) => "timeout",
            Some(libc::EHOSTUNREACH) | Some(libc::ENETUNREACH) => "unreachable",
            _ => "other",
        },
    };
    format!("{prefix}_{k}")
}
