//! io_uring instance set-up, with the fastest flags the kernel accepts and a clear message when
//! io_uring is not available at all.

use std::fmt;
use std::io;

use io_uring::IoUring;

#[derive(Debug)]
pub struct RingError(io::Error);

impl fmt::Display for RingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .unwrap_or(0);
        match self.0.raw_os_error() {
            Some(libc::EPERM) | Some(libc::ENOSYS) | Some(libc::EACCES) if disabled > 0 => write!(
                f,
                "io_uring is disabled on this host (sysctl kernel.io_uring_disabled = {disabled}); \
                 enable it with `sysctl -w kernel.io_uring_disabled=0` (or add this user to \
                 kernel.io_uring_group when it is 1)"
            ),
            Some(libc::EPERM) | Some(libc::ENOSYS) | Some(libc::EACCES) => write!(
                f,
                "io_uring is not available ({}): a seccomp profile (e.g. a container runtime's \
                 default) or an old kernel blocks io_uring_setup; allow the io_uring_setup, \
                 io_uring_enter and io_uring_register syscalls or run on Linux 6.0 or newer",
                self.0
            ),
            _ => write!(f, "cannot create an io_uring instance: {}", self.0),
        }
    }
}

impl std::error::Error for RingError {}

/// A ring with `entries` submission slots and 4x as many completion slots.
///
/// SINGLE_ISSUER + DEFER_TASKRUN let the kernel run completion work only when this thread asks
/// for completions, which saves interrupts and context switches; kernels before 6.1 get
/// COOP_TASKRUN, and older ones a plain ring. SUBMIT_ALL keeps submitting after a failed entry.
pub fn new_ring(entries: u32) -> Result<IoUring, RingError> {
    let cq = entries * 4;
    let fast = IoUring::builder()
        .setup_cqsize(cq)
        .setup_submit_all()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(entries);
    if let Ok(ring) = fast {
        return Ok(ring);
    }
    let coop = IoUring::builder()
        .setup_cqsize(cq)
        .setup_submit_all()
        .setup_coop_taskrun()
        .build(entries);
    if let Ok(ring) = coop {
        return Ok(ring);
    }
    IoUring::builder()
        .setup_cqsize(cq)
        .build(entries)
        .map_err(RingError)
}
