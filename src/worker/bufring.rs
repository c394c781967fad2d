//! The worker's provided-buffer ring: a pool of equal buffers that the kernel picks from when a
//! recv has data, so an idle flow holds no user-space buffer at all.
//!
//! Buffers come back when the send that carried their bytes completes. They go first onto a
//! free stack, and `publish` (once per event-loop turn) tops the ring up from the top of that
//! stack to a target that follows demand. The kernel consumes the ring in FIFO order, so feeding
//! it from a LIFO stack keeps the same few hot buffers cycling through the cache: with light
//! traffic a worker touches a few hundred KiB, not its whole pool, and its resident memory stays
//! small until load really needs more.
//!
//! After a burst the free stack holds buffers nobody needs right now; `trim` (on the worker's
//! tick, and `trim_quiet` as soon as the worker has nothing to do) hands the pages of those past
//! a small warm set back to the kernel with MADV_DONTNEED, so resident memory returns to what the
//! steady load needs instead of staying at the burst's high-water mark.

use std::alloc::{alloc, alloc_zeroed, dealloc, Layout};
use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use io_uring::IoUring;

use crate::flow::BufId;

pub struct BufRing {
    group: u16,
    entries: u16,
    buffer_size: u32,
    ring: *mut BufRingEntry,
    ring_layout: Layout,
    memory: *mut u8,
    memory_layout: Layout,
    /// Our copy of the tail; the shared one is written by `publish`.
    tail: u16,
    /// Buffers neither in the ring nor lent out; the most recently returned on top.
    free: Vec<BufId>,
    /// Buffers placed in the ring and not yet seen in a completion. The kernel may have used
    /// some already, so this is an upper bound, which keeps the tail from lapping the head.
    in_ring: u32,
    /// Buffers currently owned by user space (received, not yet returned).
    lent: u32,
    /// Extra ring depth after the ring ran dry; halves on every tick without a shortage.
    boost: u32,
    /// `ran_dry` already deepened the ring since the last `publish`.
    deepened_this_turn: bool,
    /// `dirty[bid]`: the buffer has been written since its pages were last given back.
    dirty: Vec<bool>,
    /// Dirty buffers in `free` (so a quiet worker knows in O(1) whether there is anything to trim).
    dirty_free: usize,
}

/// Free buffers kept resident beyond the ring's target, for the next burst. Small: a burst of
/// many flows' small messages (idle flows checked at once) dirties a page of every buffer it
/// cycles, and what is kept here stays resident while the flows sit idle. 16 covers what
/// `scripts/cpu-ab.sh rr` (32 connections) holds beyond the ring.
const WARM_SPARE: usize = 16;
/// Buffers `trim_quiet` gives back per call at most: about 1 us each for a buffer whose first
/// page only was written (small messages), about 1.6 us for a full 64 KiB one (bulk), so at most
/// about 50 us before the worker waits; a burst's leftovers go within a few quiet turns.
const TRIM_QUIET: usize = 32;
/// Buffers trimmed per tick at most: 16 x 64 KiB is about 25 us of page-table work, small
/// enough not to show in request latency, and still gives back 4 MiB a second per worker.
const TRIM_PER_TICK: usize = 16;
const PAGE: usize = 4096;

/// Buffers kept in the ring when there has been no shortage. The kernel takes ring entries in
/// FIFO order, so every buffer in the ring is written in turn: the depth is the relay's cache
/// working set (16 x 64 KiB = 1 MiB). Measured against 64 (4 MiB), `scripts/cpu-ab.sh`, 4
/// interleaved pairs each: CPU per GB bulk down 0.66 -> 0.55 s, bulk up 0.74 -> 0.55 s (medians),
/// rr unchanged; 8 was no better than 16. A turn that needs more runs dry once and `boost` deepens
/// the ring.
const BASE_DEPTH: u32 = 16;
/// Extra ring depth a shortage may add at most. What sits in the ring when a burst ends stays
/// resident (published buffers cannot be taken back, so `trim` cannot reach them): with a cap of
/// a quarter of the pool, 2,000 idle flows checked at once left 80 dirty buffers in the ring
/// (320 KiB, 160 B per flow), checked one after the other 16. 16 more is what `cpu-ab.sh rr`'s 32
/// connections use; a burst of more flows waits a turn for buffers (ENOBUFS, re-armed as
/// buffers come back) rather than deepening the ring.
const MAX_BOOST: u32 = 16;

impl BufRing {
    /// Allocates `entries` buffers of `buffer_size` bytes and registers them as group `group`.
    pub fn new(ring: &IoUring, group: u16, entries: u16, buffer_size: u32) -> io::Result<BufRing> {
        assert!(entries.is_power_of_two());
        let ring_layout = Layout::from_size_align(
            usize::from(entries) * std::mem::size_of::<BufRingEntry>(),
            4096,
        )
        .map_err(io::Error::other)?;
        // Page-aligned so whole pages of a buffer can be given back (`trim`). Not zeroed: the
        // kernel writes every byte we read, and a large block comes from mmap as untouched
        // pages, so unused buffers cost no resident memory.
        let memory_layout =
            Layout::from_size_align(usize::from(entries) * buffer_size as usize, PAGE)
                .map_err(io::Error::other)?;
        // SAFETY: both layouts have a non-zero size (entries >= 16 and buffer_size >= 512 are
        // enforced by the config); the pointers are freed in Drop with the same layouts.
        let (ring_ptr, memory) = unsafe {
            (
                alloc_zeroed(ring_layout) as *mut BufRingEntry,
                alloc(memory_layout),
            )
        };
        if ring_ptr.is_null() || memory.is_null() {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                "buffer ring allocation",
            ));
        }
        let mut this = BufRing {
            group,
            entries,
            buffer_size,
            ring: ring_ptr,
            ring_layout,
            memory,
            memory_layout,
            tail: 0,
            free: (0..entries).rev().collect(),
            in_ring: 0,
            lent: 0,
            boost: 0,
            deepened_this_turn: false,
            dirty: vec![false; usize::from(entries)],
            dirty_free: 0,
        };
        // SAFETY: `ring_ptr` points to `entries` zeroed, page-aligned entries that stay allocated
        // until this BufRing is dropped, which happens only after the ring is unregistered
        // (`unregister`) or the io_uring instance that uses it is gone (the worker drops the
        // BufRing after its IoUring).
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(ring_ptr as u64, entries, group, 0)?;
        }
        this.publish();
        Ok(this)
    }

    pub fn group(&self) -> u16 {
        self.group
    }

    /// Start of buffer `bid`.
    pub fn buffer(&self, bid: BufId) -> *const u8 {
        debug_assert!(bid < self.entries);
        // SAFETY: bid < entries, so the offset stays inside the allocation of entries * size.
        unsafe {
            self.memory
                .add(usize::from(bid) * self.buffer_size as usize)
        }
    }

    /// A buffer the kernel filled now belongs to user space until `give_back`.
    pub fn take(&mut self) {
        self.lent += 1;
        self.in_ring = self.in_ring.saturating_sub(1);
    }

    /// Buffer `bid` is free again (its bytes were sent or dropped).
    pub fn give_back(&mut self, bid: BufId) {
        debug_assert!(bid < self.entries);
        if let Some(dirty) = self.dirty.get_mut(usize::from(bid)) {
            *dirty = true;
            self.dirty_free += 1;
        }
        self.free.push(bid);
        self.lent = self.lent.saturating_sub(1);
    }

    /// Buffers user space holds now (received, not yet given back).
    pub fn lent(&self) -> u32 {
        self.lent
    }

    /// More than half the pool is lent out: flows get a budget of one buffer per direction and
    /// stalled ones move their bytes off the ring (see flow.rs), so the rest stays for others.
    pub fn tight(&self) -> bool {
        self.lent * 2 > u32::from(self.entries)
    }

    /// A recv found the ring empty: keep more buffers in it from now on (at most `MAX_BOOST`
    /// more: the kernel never gives ring buffers back, so what sits in the ring after a burst
    /// stays resident until traffic cycles it).
    ///
    /// The depth doubles at most once per refill (`publish`, once per event-loop turn): a burst
    /// of many small messages makes thousands of recvs find the ring empty in one turn, and
    /// doubling for each sent the depth straight to its cap, leaving that many buffers' pages
    /// resident after the burst (5,000 idle flows checked at once: 889 B of RSS per flow, 550-564 B
    /// with this rule).
    pub fn ran_dry(&mut self) {
        if self.deepened_this_turn {
            return;
        }
        self.deepened_this_turn = true;
        self.boost = (self.boost * 2)
            .clamp(BASE_DEPTH, MAX_BOOST)
            .min(u32::from(self.entries) / 4);
    }

    /// Called on every tick: a shortage long past no longer needs the extra depth.
    pub fn relax(&mut self) {
        self.boost /= 2;
    }

    /// Gives the pages of cold free buffers back to the kernel: those in the free stack below
    /// what the ring's target and a warm spare need. Called on the worker's tick.
    pub fn trim(&mut self) {
        self.trim_at_most(TRIM_PER_TICK);
    }

    /// `trim`, for a worker about to wait with nothing to do: returns at once unless a burst
    /// left more dirty free buffers than the warm set (the check is O(1)), so the pages a burst
    /// touched go back before its flows sit idle, not over the next seconds of ticks.
    pub fn trim_quiet(&mut self) {
        if self.dirty_free > self.target() as usize + WARM_SPARE {
            self.trim_at_most(TRIM_QUIET);
        }
    }

    fn trim_at_most(&mut self, limit: usize) {
        let target = self.target() as usize;
        let cold = self.free.len().saturating_sub(target + WARM_SPARE);
        let warm_dirty = self.free[cold..]
            .iter()
            .filter(|&&bid| self.dirty[usize::from(bid)])
            .count();
        let mut cold_dirty = self.dirty_free.saturating_sub(warm_dirty);
        let mut trimmed = 0;
        // From the warm set down: the most recently returned of the cold buffers are the ones
        // most likely dirty (the bottom of the stack is mostly never-used buffers).
        for i in (0..cold).rev() {
            if trimmed == limit || cold_dirty == 0 {
                break;
            }
            let bid = self.free[i];
            let dirty = &mut self.dirty[usize::from(bid)];
            if !*dirty {
                continue;
            }
            *dirty = false;
            self.dirty_free -= 1;
            cold_dirty -= 1;
            trimmed += 1;
            let start = self.buffer(bid) as usize;
            let first_page = start.next_multiple_of(PAGE);
            let end = (start + self.buffer_size as usize) / PAGE * PAGE;
            if end > first_page {
                // SAFETY: [first_page, end) lies inside buffer `bid`, which is in the free stack:
                // not in the ring (the kernel cannot write it) and not lent (no send reads it).
                // MADV_DONTNEED only drops its contents, which nobody needs; the next write by
                // the kernel gets fresh zero pages.
                unsafe {
                    libc::madvise(
                        first_page as *mut libc::c_void,
                        end - first_page,
                        libc::MADV_DONTNEED,
                    );
                }
            }
        }
    }

    /// Tops the ring up from the free stack and makes the new entries visible to the kernel.
    /// Returns how many buffers it added, so the worker can wake flows that ran dry.
    pub fn publish(&mut self) -> u32 {
        self.deepened_this_turn = false;
        let target = self.target();
        let mask = self.entries - 1;
        let mut added = 0;
        while self.in_ring < target {
            let Some(bid) = self.free.pop() else { break };
            if self.dirty[usize::from(bid)] {
                self.dirty_free -= 1;
            }
            // SAFETY: the index is masked into 0..entries, inside the ring allocation. The kernel
            // reads only entries between its head and the published tail; `in_ring` (an upper
            // bound of that distance) is below `entries`, so this slot is past the published
            // tail and not visible to the kernel until the store below.
            unsafe {
                let entry = &mut *self.ring.add(usize::from(self.tail & mask));
                entry.set_addr(self.buffer(bid) as u64);
                entry.set_len(self.buffer_size);
                entry.set_bid(bid);
            }
            self.tail = self.tail.wrapping_add(1);
            self.in_ring += 1;
            added += 1;
        }
        if added > 0 {
            // SAFETY: the tail field lives in the first entry of the ring allocation; the kernel
            // reads it with acquire ordering, so the Release store publishes the entries above.
            unsafe {
                let tail = BufRingEntry::tail(self.ring) as *const AtomicU16;
                (*tail).store(self.tail, Ordering::Release);
            }
        }
        added
    }

    /// Buffers to keep in the ring. Single-shot recvs take one buffer each, so the ring only
    /// needs what one event-loop turn's recvs can take; a shortage (ENOBUFS) deepens it for a
    /// while. It does not follow the buffers lent out: after a burst the ring would stay that
    /// deep, its pages resident, since published buffers cannot be taken back.
    fn target(&self) -> u32 {
        (BASE_DEPTH + self.boost).min(u32::from(self.entries))
    }

    pub fn unregister(&self, ring: &IoUring) {
        let _ = ring.submitter().unregister_buf_ring(self.group);
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with exactly these layouts; the kernel no longer uses the
        // memory because the ring was unregistered or its io_uring closed before this drop.
        unsafe {
            dealloc(self.ring as *mut u8, self.ring_layout);
            dealloc(self.memory, self.memory_layout);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pages of buffer `bid` that are resident now (mincore).
    fn resident_pages(bufs: &BufRing, bid: BufId) -> usize {
        let len = bufs.buffer_size as usize;
        let mut vec = vec![0u8; len.div_ceil(PAGE)];
        // SAFETY: the buffer is page-aligned and `len` bytes long, inside our allocation; mincore
        // writes one byte per page into `vec`, which has room for exactly that many.
        let rc =
            unsafe { libc::mincore(bufs.buffer(bid) as *mut libc::c_void, len, vec.as_mut_ptr()) };
        assert_eq!(rc, 0, "mincore: {}", io::Error::last_os_error());
        vec.iter().filter(|&&b| b & 1 == 1).count()
    }

    /// The kernel fills the buffers at the ring's head: here the test plays the kernel, taking
    /// what `publish` put in the ring (in order) and writing a small message into each.
    fn consume_ring(bufs: &mut BufRing, published: &[BufId], lent: &mut Vec<BufId>) {
        for &bid in published {
            bufs.take();
            // SAFETY: test only: `bid` is a buffer of the allocation, nobody else uses it.
            unsafe { *(bufs.buffer(bid) as *mut u8) = 1 };
            lent.push(bid);
        }
    }

    fn publish(bufs: &mut BufRing) -> Vec<BufId> {
        let before = bufs.free.clone();
        bufs.publish();
        before[bufs.free.len()..].iter().rev().copied().collect()
    }

    #[test]
    fn a_worker_going_quiet_gives_back_what_a_burst_of_small_messages_touched() {
        let ring = crate::worker::new_ring(8).expect("io_uring");
        let mut bufs = BufRing::new(&ring, 0, 256, 64 * 1024).expect("buffer ring");
        // `new` published the first BASE_DEPTH buffers of the free stack: 0, 1, 2...
        let mut in_ring: Vec<BufId> = (0..BASE_DEPTH as u16).collect();
        // A burst: many flows' messages arrive before any send completes, turn after turn, and
        // the ring runs dry each turn.
        let mut lent = Vec::new();
        for _ in 0..6 {
            consume_ring(&mut bufs, &in_ring, &mut lent);
            bufs.ran_dry();
            in_ring = publish(&mut bufs);
        }
        // The sends complete: every buffer comes back, dirty (one page written).
        for &bid in &lent {
            bufs.give_back(bid);
        }
        publish(&mut bufs);
        let touched = lent.len();
        assert!(touched > 100, "the burst touched {touched} buffers");
        // A few quiet turns (each trims at most TRIM_QUIET buffers).
        for _ in 0..touched.div_ceil(TRIM_QUIET) {
            bufs.trim_quiet();
        }
        let resident = (0..bufs.entries)
            .filter(|&bid| resident_pages(&bufs, bid) > 0)
            .count();
        // What stays: the ring (at most its deepest target) and the warm spare.
        let most = (BASE_DEPTH + MAX_BOOST) as usize * 2 + WARM_SPARE;
        assert!(
            resident <= most,
            "{resident} of the {touched} buffers the burst touched are still resident (at most {most})"
        );
        // Nothing left to trim: the next quiet turn is a no-op, and the warm buffers were kept.
        assert!(bufs.dirty_free <= bufs.target() as usize + WARM_SPARE);
        let top = *bufs.free.last().expect("free buffers");
        assert_eq!(
            resident_pages(&bufs, top),
            1,
            "the warm buffer on top was trimmed"
        );
        bufs.unregister(&ring);
    }
}
