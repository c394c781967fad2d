//! TCP Fast Open (RFC 7413): data in the SYN, which saves a round trip on a repeat connection.
//!
//! - Listener side, `--tcp-fastopen N`: TCP_FASTOPEN with a queue of N pending Fast Open
//!   requests. A client that holds a cookie from an earlier connection sends its first bytes in
//!   the SYN, and the kernel hands them to the accepted socket at once: the worker reads them
//!   without waiting for the handshake's last ACK. socket2 has no call for it: plain setsockopt.
//! - Backend side, `--backend-fastopen`: TCP_FASTOPEN_CONNECT on each backend socket before
//!   connect. With a cookie cached for the backend's address, the kernel does not send the SYN
//!   at connect: the connect (an io_uring Connect) completes at once, and the SYN leaves with
//!   the first bytes the worker sends, the client's first bytes (or the PROXY header). Without a
//!   cookie the connect is an ordinary one that also asks the backend for a cookie.
//!
//! What the backend side changes, honestly: with a cookie cached, "connected" no longer means
//! the backend answered. A backend that is down shows up only when the first bytes are sent (a
//! reset, or the SYN retransmitted until the idle timeout), after the flow has been committed to
//! it: no retry on another backend, no passive health mark, and a connect time near zero. And
//! no SYN leaves until there is something to send, so a protocol where the server speaks first
//! (SMTP, MySQL, FTP) would wait for ever: use it only where the client speaks first (HTTP, TLS,
//! Redis), or with `--send-proxy`. Both need the kernel's net.ipv4.tcp_fastopen to allow them
//! (bit 1 client, bit 2 server; the default 1 allows only the client side): [`sysctl_hint`].

use std::io;
use std::os::fd::AsRawFd;

use socket2::Socket;

/// Enables Fast Open on a listener with a queue of `queue` pending requests (TCP_FASTOPEN).
pub fn enable_on_listener(socket: &Socket, queue: u32) -> io::Result<()> {
    let value =
        libc::c_int::try_from(queue).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: the descriptor is open for the duration of the call (borrowed from `socket`), and
    // the option value points at a live c_int whose size is passed with it.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_FASTOPEN,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes the next connect on `socket` a Fast Open one (TCP_FASTOPEN_CONNECT, Linux 4.11).
pub fn enable_on_connect(socket: &Socket) -> io::Result<()> {
    nix::sys::socket::setsockopt(socket, nix::sys::socket::sockopt::TcpFastOpenConnect, &true)
        .map_err(io::Error::from)
}

/// A start-up warning when net.ipv4.tcp_fastopen does not allow what the flags ask for: the
/// options are accepted either way, but the kernel then silently does a normal handshake.
/// `None` when it allows them, or when the setting cannot be read.
pub fn sysctl_hint(listener: bool, backend: bool) -> Option<String> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_fastopen").ok()?;
    hint_for(text.trim().parse().ok()?, listener, backend)
}

fn hint_for(setting: u32, listener: bool, backend: bool) -> Option<String> {
    const CLIENT: u32 = 1;
    const SERVER: u32 = 2;
    let mut missing = Vec::new();
    if listener && setting & SERVER == 0 {
        missing.push("--tcp-fastopen needs bit 2 (server)");
    }
    if backend && setting & CLIENT == 0 {
        missing.push("--backend-fastopen needs bit 1 (client)");
    }
    (!missing.is_empty()).then(|| {
        format!(
            "net.ipv4.tcp_fastopen is {setting}: {}; set it to 3 for both, or the kernel does \
             ordinary handshakes",
            missing.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hint_names_the_missing_bit() {
        assert_eq!(hint_for(3, true, true), None);
        assert_eq!(hint_for(1, false, true), None);
        assert_eq!(hint_for(0, false, false), None);
        let hint = hint_for(1, true, false).unwrap();
        assert!(hint.contains("--tcp-fastopen needs bit 2"), "{hint}");
        let hint = hint_for(2, true, true).unwrap();
        assert!(hint.contains("--backend-fastopen needs bit 1"), "{hint}");
        assert!(!hint.contains("--tcp-fastopen"), "{hint}");
    }

    #[test]
    fn options_are_set_on_real_sockets() {
        use socket2::{Domain, Protocol, Type};
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        enable_on_listener(&socket, 64).unwrap();
        let got =
            nix::sys::socket::getsockopt(&socket, nix::sys::socket::sockopt::TcpFastOpenConnect)
                .unwrap();
        assert!(!got, "only TCP_FASTOPEN was set");
        enable_on_connect(&socket).unwrap();
        let got =
            nix::sys::socket::getsockopt(&socket, nix::sys::socket::sockopt::TcpFastOpenConnect)
                .unwrap();
        assert!(got);
    }
}
