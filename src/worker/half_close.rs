//! shutdown(SHUT_WR) as a direct system call, not an io_uring operation.
//!
//! io_uring has no non-blocking path for IORING_OP_SHUTDOWN: the kernel marks every one
//! `REQ_F_FORCE_ASYNC` and hands it to an io-wq worker thread. On the connect workload (every
//! flow forwards two FINs) that thread wake-up, its context switches and the completion
//! handed back were 24% of the proxy's CPU (docs/benchmarks.md, "Connection cost: options
//! measured"). shutdown(2) on a TCP socket never sleeps (it queues a FIN and returns), so
//! calling it from the worker costs one system call and nothing else.

use std::os::fd::RawFd;

/// Half-closes `fd` for writing now; returns what the ring would have: 0 or `-errno`.
pub(super) fn shutdown_write(fd: RawFd) -> i32 {
    // SAFETY: a plain system call on a descriptor the flow's slot owns and keeps open (it is
    // closed only at release); no memory is passed.
    let res = unsafe { libc::shutdown(fd, libc::SHUT_WR) };
    if res == 0 {
        0
    } else {
        -std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    }
}
