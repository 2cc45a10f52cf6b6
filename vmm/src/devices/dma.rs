//! The DMA engine: a device a guest programs to copy, fill or checksum
//! guest-physical ranges, served by a host thread, as a passthrough device's
//! DMA would be. It is how tests and scenarios make device access race with
//! memory hotplug.
//!
//! Per request (a [`DmaDescriptor`] in the submitting vCPU's mailbox):
//! 1. validate it (op, 8-byte alignment, no overflow);
//! 2. pin the ranges it touches, revocably, for the duration ([`PinManager`]):
//!    charged to the pin account and locked; unplugged or read-only memory
//!    fails as FAULT, the pin limit as NO_PIN;
//! 3. transfer in chunks of at most [`CHUNK`] bytes, each under slot guards
//!    (so the host memory cannot go away mid-chunk); before each chunk it
//!    checks its pins: a memory change that revoked them stops the transfer
//!    with REVOKED, and memory that vanished between chunks gives FAULT;
//!    every piece's address is translated through the [`Iommu`]'s stage-2
//!    table (a miss faults it in; the walk sets Accessed, and Dirty for the
//!    destination): a write the table does not allow (read-only memory) is a
//!    FAULT, a translation an invalidation kept racing is REVOKED. The
//!    table's host address must equal the slot guard's (asserted in debug
//!    builds, a FAULT otherwise): the guard keeps the memory alive, the table
//!    says where it is;
//! 4. unpin, write the checksum, and write the status last.
//!
//! So a transfer racing an unplug either completes before the unplug takes
//! the memory, or stops cleanly: never a host fault, never a leaked pin.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use guest_image::protocol::{dma_op, dma_status, DmaDescriptor};
use serde::Serialize;
use vm_memory::{Bytes, GuestAddress};

use super::iommu::{Iommu, IommuError};
use super::pins::{Pin, PinError, PinManager};
use crate::boot::memory::BootMemory;
use crate::kvm::memslots::MemslotApplier;
use crate::mm::addr::{Gpa, GpaRange, PAGE_SIZE};
use crate::mm::stage2::Access;

/// Largest piece transferred under one set of guards.
pub const CHUNK: u64 = 64 << 10;

/// Counters of the engine, for the report.
#[derive(Debug, Default, Serialize)]
pub struct DmaStats {
    /// Requests submitted.
    pub submitted: AtomicU64,
    /// Completed (DONE).
    pub done: AtomicU64,
    /// Failed: memory not plugged or not writable.
    pub faults: AtomicU64,
    /// Refused by the pin account.
    pub no_pin: AtomicU64,
    /// Stopped by a memory change.
    pub revoked: AtomicU64,
    /// Invalid requests.
    pub invalid: AtomicU64,
    /// Bytes transferred.
    pub bytes: AtomicU64,
}

/// A running DMA engine. Dropping it finishes queued requests and joins its thread.
#[derive(Debug)]
pub struct DmaEngine {
    tx: Option<Sender<u64>>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<DmaStats>,
}

impl DmaEngine {
    /// Starts the engine's thread; it translates through `iommu`.
    pub fn start(
        memory: Arc<MemslotApplier>,
        boot: BootMemory,
        pins: Arc<PinManager>,
        iommu: Arc<Iommu>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(DmaStats::default());
        let worker = Worker {
            memory,
            boot,
            pins,
            iommu,
            stats: stats.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("dma".into())
            .spawn(move || worker.serve(rx))?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
            stats,
        })
    }

    /// Queues the descriptor at guest-physical `descriptor` (in the boot region).
    pub fn submit(&self, descriptor: u64) {
        self.stats.submitted.fetch_add(1, Ordering::Relaxed);
        if let Some(tx) = &self.tx {
            // The worker only stops when we drop `tx`.
            let _ = tx.send(descriptor);
        }
    }

    /// The engine's counters.
    pub fn stats(&self) -> &DmaStats {
        &self.stats
    }
}

impl Drop for DmaEngine {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Worker {
    memory: Arc<MemslotApplier>,
    boot: BootMemory,
    pins: Arc<PinManager>,
    iommu: Arc<Iommu>,
    stats: Arc<DmaStats>,
}

impl Worker {
    fn serve(self, rx: Receiver<u64>) {
        for descriptor in rx {
            let mem = self.boot.memory();
            let Ok(words) = mem.read_obj::<[u64; 7]>(GuestAddress(descriptor)) else {
                continue; // not in the boot region: no descriptor to answer
            };
            let [op, src, dst, len, value, result, status] = words;
            let desc = DmaDescriptor {
                op,
                src,
                dst,
                len,
                value,
                result,
                status,
            };
            let (status, result) = match self.execute(&desc) {
                Ok(result) => (dma_status::DONE, result),
                Err(s) => (s, 0),
            };
            let counter = match status {
                dma_status::DONE => &self.stats.done,
                dma_status::FAULT => &self.stats.faults,
                dma_status::NO_PIN => &self.stats.no_pin,
                dma_status::REVOKED => &self.stats.revoked,
                _ => &self.stats.invalid,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            let at = |field: u64| GuestAddress(descriptor + field);
            let _ = mem.write_obj(result, at(40));
            // Status last: the guest polls it, and x86 keeps store order.
            std::sync::atomic::fence(Ordering::Release);
            let _ = mem.write_obj(status, at(48));
        }
    }

    fn execute(&self, d: &DmaDescriptor) -> Result<u64, u64> {
        let invalid = dma_status::INVALID;
        if d.len == 0 || d.len % 8 != 0 {
            return Err(invalid);
        }
        let range = |gpa: u64| GpaRange::new(Gpa(gpa), d.len).filter(|r| r.start().is_aligned(8));
        let (src, dst) = match d.op {
            dma_op::COPY => (
                Some(range(d.src).ok_or(invalid)?),
                Some(range(d.dst).ok_or(dma_status::INVALID)?),
            ),
            dma_op::FILL => (None, Some(range(d.dst).ok_or(invalid)?)),
            dma_op::CHECKSUM => (Some(range(d.src).ok_or(invalid)?), None),
            _ => return Err(invalid),
        };
        let src_pin = src.map(|r| self.pin(r, false)).transpose()?;
        let dst_pin = dst.map(|r| self.pin(r, true)).transpose()?;
        let pins: Vec<&Pin> = src_pin.iter().chain(dst_pin.iter()).collect();
        let mut sum = 0u64;
        let mut done = 0u64;
        while done < d.len {
            if pins.iter().any(|p| p.is_revoked()) {
                return Err(dma_status::REVOKED);
            }
            let n = CHUNK.min(d.len - done);
            let chunk = |base: u64| Gpa(base + done);
            match d.op {
                dma_op::COPY => self.copy_chunk(chunk(d.src), chunk(d.dst), n)?,
                dma_op::FILL => self.fill_chunk(chunk(d.dst), n, d.value)?,
                _ => sum = sum.wrapping_add(self.sum_chunk(chunk(d.src), n)?),
            }
            done += n;
            self.stats.bytes.fetch_add(n, Ordering::Relaxed);
        }
        Ok(sum)
        // The pins drop here: unlocked and uncharged.
    }

    fn pin(&self, r: GpaRange, write: bool) -> Result<Pin, u64> {
        // Pins are page-granular: cover the pages the transfer touches.
        let start = r.start().align_down(PAGE_SIZE);
        let end = r.end().0.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        self.pins
            .pin(start, end - start.0, write, true)
            .map_err(|e| match e {
                PinError::Limit { .. } => dma_status::NO_PIN,
                PinError::Busy { .. } => dma_status::REVOKED,
                PinError::BadRange { .. } => dma_status::INVALID,
                _ => dma_status::FAULT,
            })
    }

    /// Runs `f` on the host address of `[gpa, gpa + n)` split at slot and
    /// stage-2 leaf boundaries, each piece under a slot guard and translated
    /// through the IOMMU.
    fn each_piece(
        &self,
        gpa: Gpa,
        n: u64,
        write: bool,
        mut f: impl FnMut(u64, *mut u8, u64),
    ) -> Result<(), u64> {
        let fault = || dma_status::FAULT;
        let access = if write { Access::Write } else { Access::Read };
        let mut off = 0;
        while off < n {
            let at = Gpa(gpa.0 + off);
            let guard = self.memory.try_acquire(at).map_err(|_| fault())?;
            let tr = self.iommu.translate(at, access).map_err(|e| match e {
                IommuError::Busy { .. } => dma_status::REVOKED,
                _ => fault(),
            })?;
            debug_assert!(
                !(write && guard.read_only()),
                "the IOMMU let a write through to read-only {at}"
            );
            let leaf_end = tr.page_gpa.0 + tr.page_size.bytes();
            let len = (guard.range().end().0.min(leaf_end) - at.0).min(n - off);
            let hva = guard.hva(at, len).map_err(|_| fault())?;
            debug_assert_eq!(tr.hva, hva, "stage-2 and the slot map disagree on {at}");
            if tr.hva != hva {
                return Err(fault());
            }
            f(off, tr.hva.0 as *mut u8, len);
            if write {
                // Dirty was set before the write; a report taken in between
                // cleared it. Mark again after the write, so every write is
                // reported at least once. A table walk only: a leaf zapped
                // meanwhile had its Dirty bit harvested by the zap.
                let _ = self.iommu.table().translate(at, access);
            }
            off += len;
        }
        Ok(())
    }

    fn copy_chunk(&self, src: Gpa, dst: Gpa, n: u64) -> Result<(), u64> {
        // Bounce through a buffer: source and destination may overlap, or sit
        // in different slots with different piece boundaries.
        let mut buf = vec![0u8; n as usize];
        self.each_piece(src, n, false, |off, p, len| {
            // SAFETY: `p..p+len` is mapped guest memory held by a slot guard
            // for the duration of this call; `buf` has room at `off..off+len`.
            unsafe { std::ptr::copy(p, buf.as_mut_ptr().add(off as usize), len as usize) }
        })?;
        self.each_piece(dst, n, true, |off, p, len| {
            // SAFETY: as above, for the destination.
            unsafe { std::ptr::copy(buf.as_ptr().add(off as usize), p, len as usize) }
        })
    }

    fn fill_chunk(&self, dst: Gpa, n: u64, value: u64) -> Result<(), u64> {
        self.each_piece(dst, n, true, |_, p, len| {
            for i in 0..len / 8 {
                // SAFETY: inside the guarded piece; 8-byte aligned because the
                // range start is (checked) and pieces split at page bounds.
                unsafe { p.cast::<u64>().add(i as usize).write_volatile(value) };
            }
        })
    }

    fn sum_chunk(&self, src: Gpa, n: u64) -> Result<u64, u64> {
        let mut sum = 0u64;
        self.each_piece(src, n, false, |_, p, len| {
            for i in 0..len / 8 {
                // SAFETY: as in `fill_chunk`, reading.
                sum = sum.wrapping_add(unsafe { p.cast::<u64>().add(i as usize).read_volatile() });
            }
        })?;
        Ok(sum)
    }
}

/// Offsets used by `serve` must match the protocol's layout.
const _: () = assert!(core::mem::offset_of!(DmaDescriptor, result) == 40);
const _: () = assert!(core::mem::offset_of!(DmaDescriptor, status) == 48);
