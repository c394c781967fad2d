//! The worker's provided-buffer ring: a pool of equal buffers that the kernel picks from when a
//! multishot recv has data, so an idle flow holds no user-space buffer at all.
//!
//! Buffers go back to the ring (at its tail) when the send that carried their bytes completes.
//! Returns are published to the kernel in one tail update per event-loop turn (`publish`).

use std::alloc::{alloc_zeroed, dealloc, Layout};
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
    /// Buffers handed back since the last `publish`.
    returned_since_publish: u32,
    /// Buffers currently owned by user space (received, not yet returned).
    pub lent: u32,
}

impl BufRing {
    /// Allocates `entries` buffers of `buffer_size` bytes and registers them as group `group`.
    pub fn new(ring: &IoUring, group: u16, entries: u16, buffer_size: u32) -> io::Result<BufRing> {
        assert!(entries.is_power_of_two());
        let ring_layout = Layout::from_size_align(
            usize::from(entries) * std::mem::size_of::<BufRingEntry>(),
            4096,
        )
        .map_err(io::Error::other)?;
        let memory_layout =
            Layout::from_size_align(usize::from(entries) * buffer_size as usize, 4096)
                .map_err(io::Error::other)?;
        // SAFETY: both layouts have a non-zero size (entries >= 16 and buffer_size >= 512 are
        // enforced by the config); the pointers are freed in Drop with the same layouts.
        let (ring_ptr, memory) = unsafe {
            (
                alloc_zeroed(ring_layout) as *mut BufRingEntry,
                alloc_zeroed(memory_layout),
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
            returned_since_publish: 0,
            lent: u32::from(entries),
        };
        // SAFETY: `ring_ptr` points to `entries` zeroed, page-aligned entries that stay allocated
        // until this BufRing is dropped, which happens only after the ring is unregistered
        // (`unregister`) or the io_uring instance that uses it is gone (the worker drops the
        // BufRing after its IoUring).
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(ring_ptr as u64, entries, group, 0)?;
        }
        for bid in 0..entries {
            this.give_back(bid);
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
    }

    /// Puts buffer `bid` back at the tail of the ring (visible to the kernel after `publish`).
    pub fn give_back(&mut self, bid: BufId) {
        let mask = self.entries - 1;
        // SAFETY: the index is masked into 0..entries, inside the ring allocation; the kernel
        // only reads entries between its head and the published tail, and this one is past the
        // published tail until `publish`.
        unsafe {
            let entry = &mut *self.ring.add(usize::from(self.tail & mask));
            entry.set_addr(self.buffer(bid) as u64);
            entry.set_len(self.buffer_size);
            entry.set_bid(bid);
        }
        self.tail = self.tail.wrapping_add(1);
        self.returned_since_publish += 1;
        self.lent = self.lent.saturating_sub(1);
    }

    /// Makes returned buffers visible to the kernel. Returns how many were returned since the
    /// last call, so the worker can wake flows that ran dry.
    pub fn publish(&mut self) -> u32 {
        let returned = std::mem::take(&mut self.returned_since_publish);
        if returned > 0 {
            // SAFETY: the tail field lives in the first entry of the ring allocation; the kernel
            // reads it with acquire ordering, so the Release store publishes the entries above.
            unsafe {
                let tail = BufRingEntry::tail(self.ring) as *const AtomicU16;
                (*tail).store(self.tail, Ordering::Release);
            }
        }
        returned
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
