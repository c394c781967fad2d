//! Zero-copy relay for bulk directions (`--splice auto`): the kernel pipes a worker lends to
//! flows, and the non-blocking splice(2) calls that move bytes socket -> pipe -> socket without
//! copying them through user space.
//!
//! Why splice(2) from the worker and not io_uring's `IORING_OP_SPLICE`: the latter always
//! punts to an io-wq thread (a non-blocking issue returns -EAGAIN), which would move the copy
//! work off this worker's CPU and break thread-per-core. Here the worker learns readiness from
//! the ring (a one-shot `POLL_ADD`, see flow.rs) and calls splice(2) with `SPLICE_F_NONBLOCK`
//! itself, so the bytes still move on the worker's own CPU, only without the two copies.
//!
//! The pool is bounded (HAProxy's `maxpipes`): at most `pipes_per_worker` pipes lent at once
//! per worker (64, fewer under a low open-file limit); a direction that finds none keeps
//! relaying through buffers. Pipes come back empty and are kept for reuse up to
//! `MAX_PIPES_KEPT`; a pipe that may hold bytes (a flow cut with bytes in it) is closed
//! instead. New pipes are made only when none is kept, so a worker never has more pipes than
//! its bound: `2 x bound` descriptors, which start-up sets aside from `--max-conns`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Pipes lent to flows at once, per worker, at most. Each holds at most a direction's byte
/// budget (4 x 64 KiB by default), so a worker's pipes pin at most 16 MiB by default.
pub const MAX_PIPES_IN_USE: usize = 64;

/// How many pipes each worker may lend: 64, or fewer when the open-file limit is low (a
/// sixty-fourth of it shared by the workers, at least one), so pipes never take the
/// descriptors flows need.
pub fn pipes_per_worker(fd_limit: u64, workers: usize) -> usize {
    (fd_limit / 64 / workers.max(1) as u64).clamp(1, MAX_PIPES_IN_USE as u64) as usize
}
/// Empty pipes kept for the next bulk direction (two descriptors each).
const MAX_PIPES_KEPT: usize = 16;
/// The kernel's default ceiling for an unprivileged pipe (`/proc/sys/fs/pipe-max-size`).
const PIPE_MAX_DEFAULT: u32 = 1 << 20;

/// One kernel pipe: bytes spliced in at `write`, out at `read`.
#[derive(Debug)]
pub struct KernelPipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl KernelPipe {
    /// A non-blocking pipe of at least `size` bytes.
    fn new(size: u32) -> io::Result<KernelPipe> {
        let mut fds = [-1; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both are open descriptors that nothing else owns.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: plain fcntl on a descriptor we own.
        let got =
            unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) };
        if got < 0 {
            // Over /proc/sys/fs/pipe-max-size, or the user's pipe pages are over
            // pipe-user-pages-soft: such a pipe would be one page, too small to pay.
            return Err(io::Error::last_os_error());
        }
        Ok(KernelPipe { read, write })
    }
}

/// A worker's pipes: lent to bulk directions, given back empty.
#[derive(Debug)]
pub struct PipePool {
    free: Vec<KernelPipe>,
    in_use: usize,
    /// Pipes lent at once, at most.
    bound: usize,
    /// Pipes lent since the last `trim_idle`.
    taken: usize,
    /// Bytes a flow may put in one pipe: the direction's byte budget.
    size: u32,
}

impl PipePool {
    /// A pool for pipes of `budget` bytes (capped at the kernel's default pipe-max-size), or
    /// the reason splice cannot work here (the first pipe cannot be made or sized).
    pub fn new(budget: u32, bound: usize) -> io::Result<PipePool> {
        let size = budget.min(PIPE_MAX_DEFAULT);
        let first = KernelPipe::new(size)?;
        Ok(PipePool {
            free: vec![first],
            in_use: 0,
            bound: bound.max(1),
            taken: 0,
            size,
        })
    }

    /// Bytes a flow may hold in one pipe.
    pub fn size(&self) -> u32 {
        self.size
    }

    pub fn in_use(&self) -> usize {
        self.in_use
    }

    /// An empty pipe, or none when the pool is at its bound or the kernel refuses another.
    pub fn take(&mut self) -> Option<KernelPipe> {
        if self.in_use >= self.bound {
            return None;
        }
        let pipe = match self.free.pop() {
            Some(pipe) => pipe,
            None => KernelPipe::new(self.size).ok()?,
        };
        self.in_use += 1;
        self.taken += 1;
        Some(pipe)
    }

    /// Called every tick: after a tick in which no pipe was lent, the spare pipes beyond one
    /// are closed, so a burst of bulk flows does not keep its pipes' descriptors for good
    /// (the one kept is the pipe made at start-up).
    pub fn trim_idle(&mut self) {
        if std::mem::take(&mut self.taken) == 0 {
            self.free.truncate(1);
        }
    }

    /// A pipe back from a flow; `empty` when the flow knows no byte is left in it (a pipe that
    /// may hold bytes is closed, so they cannot leak into another flow).
    pub fn give_back(&mut self, pipe: KernelPipe, empty: bool) {
        self.in_use = self.in_use.saturating_sub(1);
        if empty && self.free.len() < MAX_PIPES_KEPT.min(self.bound) {
            self.free.push(pipe);
        }
    }
}

/// The result of a splice(2) as the flow takes it: bytes moved (> 0), 0 for EOF, or -errno.
fn splice_result(moved: isize) -> i32 {
    if moved < 0 {
        -io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    } else {
        moved.min(i32::MAX as isize) as i32
    }
}

/// Moves up to `len` bytes from socket `source` into `pipe` without blocking.
pub fn into_pipe(source: RawFd, pipe: &KernelPipe, len: u32) -> i32 {
    // SAFETY: both descriptors are open for the call (the flow's socket is closed only at
    // release, and the pipe is owned by its slot); null offsets are required for sockets and
    // pipes.
    let moved = unsafe {
        libc::splice(
            source,
            std::ptr::null_mut(),
            pipe.write.as_raw_fd(),
            std::ptr::null_mut(),
            len as usize,
            libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
        )
    };
    splice_result(moved)
}

/// Moves up to `len` bytes from `pipe` to socket `destination` without blocking.
pub fn out_of_pipe(pipe: &KernelPipe, destination: RawFd, len: u32) -> i32 {
    // SAFETY: as in `into_pipe`.
    let moved = unsafe {
        libc::splice(
            pipe.read.as_raw_fd(),
            std::ptr::null_mut(),
            destination,
            std::ptr::null_mut(),
            len as usize,
            libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
        )
    };
    splice_result(moved)
}

/// Reads everything in `pipe` onto the end of `into` (the flow's spill), until the pipe is
/// empty; returns the bytes read. Used when a flow leaves splice with bytes still in the pipe
/// (an upgrade handover, a splice error), so they are sent, or handed over, like any spill.
pub fn drain(pipe: &KernelPipe, into: &mut Vec<u8>) -> io::Result<usize> {
    let mut total = 0;
    loop {
        into.reserve(64 * 1024);
        let spare = into.spare_capacity_mut();
        // SAFETY: `spare` is writable memory of `spare.len()` bytes owned by `into`; read(2)
        // writes at most that many, and only those it reports are marked initialised below.
        let got = unsafe {
            libc::read(
                pipe.read.as_raw_fd(),
                spare.as_mut_ptr().cast(),
                spare.len(),
            )
        };
        if got < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) => Ok(total),
                Some(libc::EINTR) => continue,
                _ => Err(e),
            };
        }
        if got == 0 {
            return Ok(total); // no writer: cannot happen while we hold both ends
        }
        // SAFETY: read(2) initialised `got` bytes right after the current length.
        unsafe { into.set_len(into.len() + got as usize) };
        total += got as usize;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (b, _) = listener.accept().unwrap();
        (a, b)
    }

    #[test]
    fn bytes_go_socket_to_pipe_to_socket_in_order() {
        let mut pool = PipePool::new(256 * 1024, 64).unwrap();
        let pipe = pool.take().unwrap();
        let (mut src_peer, src) = pair();
        let (dst, mut dst_peer) = pair();
        src.set_nonblocking(true).unwrap();
        dst.set_nonblocking(true).unwrap();
        assert_eq!(into_pipe(src.as_raw_fd(), &pipe, 1000), -libc::EAGAIN);
        src_peer.write_all(b"hello, pipe").unwrap();
        let mut moved = 0;
        while moved < 11 {
            let n = into_pipe(src.as_raw_fd(), &pipe, 1000);
            if n > 0 {
                moved += n;
            }
        }
        assert_eq!(out_of_pipe(&pipe, dst.as_raw_fd(), moved as u32), 11);
        let mut got = [0; 11];
        dst_peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello, pipe");
        drop(src_peer);
        let mut eof = -1;
        for _ in 0..1000 {
            eof = into_pipe(src.as_raw_fd(), &pipe, 1000);
            if eof != -libc::EAGAIN {
                break;
            }
            std::thread::yield_now();
        }
        assert_eq!(eof, 0, "EOF reads as 0");
        pool.give_back(pipe, true);
        assert_eq!(pool.in_use(), 0);
    }

    #[test]
    fn drain_reads_what_the_pipe_holds() {
        let mut pool = PipePool::new(64 * 1024, 64).unwrap();
        let pipe = pool.take().unwrap();
        let (mut peer, src) = pair();
        src.set_nonblocking(true).unwrap();
        peer.write_all(&[7u8; 5000]).unwrap();
        let mut moved = 0;
        while moved < 5000 {
            let n = into_pipe(src.as_raw_fd(), &pipe, 64 * 1024);
            if n > 0 {
                moved += n;
            }
        }
        let mut spill = b"old".to_vec();
        assert_eq!(drain(&pipe, &mut spill).unwrap(), 5000);
        assert_eq!(spill.len(), 5003);
        assert!(spill[3..].iter().all(|&b| b == 7));
        assert_eq!(drain(&pipe, &mut spill).unwrap(), 0);
        pool.give_back(pipe, true);
    }

    #[test]
    fn the_pool_is_bounded() {
        let mut pool = PipePool::new(16 * 1024, 40).unwrap();
        let mut lent = Vec::new();
        while let Some(pipe) = pool.take() {
            lent.push(pipe);
        }
        assert_eq!(lent.len(), 40);
        for pipe in lent {
            pool.give_back(pipe, true);
        }
        assert_eq!(pool.in_use(), 0);
        assert_eq!(pool.free.len(), MAX_PIPES_KEPT);
        pool.trim_idle(); // pipes were lent since the last trim: kept
        assert_eq!(pool.free.len(), MAX_PIPES_KEPT);
        pool.trim_idle(); // a tick without demand: back to one
        assert_eq!(pool.free.len(), 1);
    }

    #[test]
    fn a_low_open_file_limit_lends_fewer_pipes() {
        assert_eq!(pipes_per_worker(1 << 20, 2), MAX_PIPES_IN_USE);
        assert_eq!(pipes_per_worker(1024, 2), 8);
        assert_eq!(pipes_per_worker(64, 4), 1);
    }
}
