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

/// `IORING_REGISTER_RING_FDS` and `IORING_ENTER_REGISTERED_RING` (the io-uring crate keeps its
/// constants private, and its `Submitter::register_ring_fd` is lost with the `Submitter`, which
/// `IoUring::submitter()` makes afresh each call).
const IORING_REGISTER_RING_FDS: libc::c_uint = 20;
const IORING_ENTER_REGISTERED_RING: u32 = 16;

/// How `io_uring_enter` names this ring: by an index into the thread's registered ring table
/// (the kernel then skips the descriptor lookup and its reference count on every call; the
/// table is per task, so only the registering thread may use it), or by its descriptor.
#[derive(Clone, Copy, Debug)]
pub struct RingHandle {
    fd: libc::c_int,
    flag: u32,
}

impl RingHandle {
    /// Registers `ring`'s descriptor for the calling thread; falls back to the plain descriptor
    /// on kernels before 5.18.
    pub fn register(ring: &IoUring) -> RingHandle {
        use std::os::fd::AsRawFd;
        let fd = ring.as_raw_fd();
        // struct io_uring_rsrc_update { __u32 offset; __u32 resv; __aligned_u64 data; }
        #[repr(C)]
        struct RsrcUpdate {
            offset: u32,
            resv: u32,
            data: u64,
        }
        let mut update = RsrcUpdate {
            offset: u32::MAX, // any free slot; the kernel writes back the one it chose
            resv: 0,
            data: fd as u64,
        };
        // SAFETY: io_uring_register with one valid io_uring_rsrc_update, which lives across the
        // call; the kernel only reads `data` and writes `offset`.
        let res = unsafe {
            libc::syscall(
                libc::SYS_io_uring_register,
                fd,
                IORING_REGISTER_RING_FDS,
                &mut update as *mut RsrcUpdate,
                1,
            )
        };
        if res == 1 {
            RingHandle {
                fd: update.offset as libc::c_int,
                flag: IORING_ENTER_REGISTERED_RING,
            }
        } else {
            RingHandle { fd, flag: 0 }
        }
    }

    /// `io_uring_enter(to_submit, min_complete, flags)` with no argument.
    ///
    /// # Safety
    /// Every entry in the submission queue must be valid until the kernel consumes it, and the
    /// caller must be the thread that called `register`.
    pub unsafe fn enter(&self, to_submit: u32, min_complete: u32, flags: u32) -> io::Result<usize> {
        // SAFETY: as the caller promises; no pointer is passed.
        let res = unsafe {
            libc::syscall(
                libc::SYS_io_uring_enter,
                self.fd,
                to_submit,
                min_complete,
                flags | self.flag,
                std::ptr::null::<libc::c_void>(),
                0usize,
            )
        };
        if res < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(res as usize)
        }
    }
}
