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
//!    with REVOKED (memory that vanishes always revokes the pins first);
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
use std::time::Instant;

use guest_image::protocol::{dma_op, dma_status, DmaDescriptor};
use serde::Serialize;
use vm_memory::{Bytes, GuestAddress, VolatileMemory, VolatileSlice};

use super::iommu::{Iommu, IommuError};
use super::pins::{Pin, PinError, PinManager, DEFAULT_PIN_WAIT};
use crate::boot::memory::BootMemory;
use crate::mm::addr::{Gpa, GpaRange, PAGE_SIZE};
use crate::mm::guard::{GuardError, SlotRef};
use crate::mm::manager::MemoryManager;
use crate::mm::stage2::Access;

/// Largest piece transferred under one set of guards.
pub const CHUNK: u64 = 64 << 10;

/// Why a transfer did not complete; each maps to one protocol status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DmaError {
    /// A bad descriptor: unknown op, zero or unaligned length, unaligned or
    /// overflowing range (`INVALID`).
    #[error("invalid request")]
    Invalid,
    /// Memory not plugged, or not writable for a destination (`FAULT`).
    #[error("memory not plugged or not writable")]
    Fault,
    /// The pin account refused the charge (`NO_PIN`).
    #[error("pin limit reached")]
    NoPin,
    /// A memory change revoked the transfer's pins, or kept racing its
    /// translations (`REVOKED`).
    #[error("stopped by a memory change")]
    Revoked,
}

impl DmaError {
    /// The descriptor status the guest sees.
    pub fn status(self) -> u64 {
        match self {
            DmaError::Invalid => dma_status::INVALID,
            DmaError::Fault => dma_status::FAULT,
            DmaError::NoPin => dma_status::NO_PIN,
            DmaError::Revoked => dma_status::REVOKED,
        }
    }
}

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
        memory: Arc<MemoryManager>,
        boot: BootMemory,
        pins: Arc<PinManager>,
        iommu: Arc<Iommu>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(DmaStats::default());
        let worker = Worker {
            transfers: Transfers {
                memory,
                pins,
                iommu,
                stats: stats.clone(),
                #[cfg(test)]
                hook: None,
            },
            boot,
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

/// Runs one transfer on the caller's thread, as the engine's thread runs a
/// descriptor (pins, guarded chunks through `iommu`, the dirty bits of what
/// it wrote), without a boot region to read it from: for a VM without vCPUs
/// (the fuzzer's simulated tier). The checksum for `CHECKSUM`, else 0.
pub fn run_transfer(
    memory: &Arc<MemoryManager>,
    pins: &Arc<PinManager>,
    iommu: &Arc<Iommu>,
    descriptor: &DmaDescriptor,
) -> Result<u64, DmaError> {
    let transfers = Transfers {
        memory: memory.clone(),
        pins: pins.clone(),
        iommu: iommu.clone(),
        stats: Arc::new(DmaStats::default()),
        #[cfg(test)]
        hook: None,
    };
    transfers.execute(descriptor)
}

impl Drop for DmaEngine {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The engine's thread: reads descriptors from the boot region, runs them,
/// writes the result and then the status back.
struct Worker {
    transfers: Transfers,
    boot: BootMemory,
}

/// What a transfer needs: guarded memory, pins, the IOMMU and the counters.
struct Transfers {
    memory: Arc<MemoryManager>,
    pins: Arc<PinManager>,
    iommu: Arc<Iommu>,
    stats: Arc<DmaStats>,
    /// Tests: runs at each [`Stage`] of a piece, with the slot guard held,
    /// to force interleavings.
    #[cfg(test)]
    hook: Option<Box<dyn Fn(Stage, Gpa) + Send + Sync>>,
}

impl Worker {
    fn serve(self, rx: Receiver<u64>) {
        let stats = &self.transfers.stats;
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
            let outcome = self.transfers.execute(&desc);
            let (status, result) = match outcome {
                Ok(result) => (dma_status::DONE, result),
                Err(e) => (e.status(), 0),
            };
            let counter = match outcome {
                Ok(_) => &stats.done,
                Err(DmaError::Fault) => &stats.faults,
                Err(DmaError::NoPin) => &stats.no_pin,
                Err(DmaError::Revoked) => &stats.revoked,
                Err(DmaError::Invalid) => &stats.invalid,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            let at = |field: u64| GuestAddress(descriptor + field);
            let _ = mem.write_obj(result, at(40));
            // Status last: the guest polls it, and x86 keeps store order.
            std::sync::atomic::fence(Ordering::Release);
            let _ = mem.write_obj(status, at(48));
        }
    }
}

impl Transfers {
    fn execute(&self, d: &DmaDescriptor) -> Result<u64, DmaError> {
        if d.len == 0 || d.len % 8 != 0 {
            return Err(DmaError::Invalid);
        }
        let range = |gpa: u64| {
            GpaRange::new(Gpa(gpa), d.len)
                .filter(|r| r.start().is_aligned(8))
                .ok_or(DmaError::Invalid)
        };
        let (src, dst) = match d.op {
            dma_op::COPY => (Some(range(d.src)?), Some(range(d.dst)?)),
            dma_op::FILL => (None, Some(range(d.dst)?)),
            dma_op::CHECKSUM => (Some(range(d.src)?), None),
            _ => return Err(DmaError::Invalid),
        };
        let src_pin = src.map(|r| self.pin(r, false)).transpose()?;
        let dst_pin = dst.map(|r| self.pin(r, true)).transpose()?;
        let pins: Vec<&Pin> = src_pin.iter().chain(dst_pin.iter()).collect();
        let mut sum = 0u64;
        let mut done = 0u64;
        while done < d.len {
            if pins.iter().any(|p| p.is_revoked()) {
                return Err(DmaError::Revoked);
            }
            let n = CHUNK.min(d.len - done);
            let chunk = |base: u64| Gpa(base + done);
            match d.op {
                dma_op::COPY => self.copy_chunk(&pins, chunk(d.src), chunk(d.dst), n)?,
                dma_op::FILL => self.fill_chunk(&pins, chunk(d.dst), n, d.value)?,
                _ => sum = sum.wrapping_add(self.sum_chunk(&pins, chunk(d.src), n)?),
            }
            done += n;
            self.stats.bytes.fetch_add(n, Ordering::Relaxed);
        }
        Ok(sum)
        // The pins drop here: unlocked and uncharged.
    }

    fn pin(&self, r: GpaRange, write: bool) -> Result<Pin, DmaError> {
        // Pins are page-granular: cover the pages the transfer touches.
        let start = r.start().align_down(PAGE_SIZE);
        let end = r
            .end()
            .0
            .checked_next_multiple_of(PAGE_SIZE)
            .ok_or(DmaError::Invalid)?;
        self.pins
            .pin(start, end - start.0, write, true)
            .map_err(|e| match e {
                PinError::Limit { .. } => DmaError::NoPin,
                PinError::Busy { .. } => DmaError::Revoked,
                PinError::BadRange { .. } => DmaError::Invalid,
                _ => DmaError::Fault,
            })
    }

    /// A guard on the slot holding `at`, for a transfer holding `pins`.
    ///
    /// While an op changes the slot, waits for it (at most
    /// [`DEFAULT_PIN_WAIT`]): memory that stays plugged never fails a
    /// transfer. Checks the pins *after* the guard is taken: a pin is revoked
    /// in the invalidation's start, before the new memory can be published,
    /// so a transfer never writes into memory plugged after its pins were
    /// revoked.
    fn acquire(&self, at: Gpa, pins: &[&Pin]) -> Result<SlotRef<'_>, DmaError> {
        let revoked = || pins.iter().any(|p| p.is_revoked());
        let started = Instant::now();
        loop {
            let attempt = self.memory.try_acquire(at);
            if revoked() {
                return Err(DmaError::Revoked);
            }
            match attempt {
                Ok(guard) => return Ok(guard),
                Err(GuardError::Busy { .. }) if started.elapsed() < DEFAULT_PIN_WAIT => {
                    // No guard is held here: wait for the op.
                    self.memory.guarded().wait_for_op(started);
                }
                Err(GuardError::Busy { .. }) => return Err(DmaError::Revoked),
                Err(_) => return Err(DmaError::Fault),
            }
        }
    }

    /// Runs `f` on `[gpa, gpa + n)` split at slot and stage-2 leaf
    /// boundaries: each piece (its offset from `gpa`, and its memory as a
    /// [`VolatileSlice`]) under a slot guard and translated through the IOMMU.
    fn each_piece(
        &self,
        pins: &[&Pin],
        gpa: Gpa,
        n: u64,
        write: bool,
        mut f: impl FnMut(u64, VolatileSlice<'_>) -> Result<(), DmaError>,
    ) -> Result<(), DmaError> {
        let access = if write { Access::Write } else { Access::Read };
        let mut off = 0;
        while off < n {
            let at = Gpa(gpa.0 + off);
            let guard = self.acquire(at, pins)?;
            #[cfg(test)]
            if let Some(hook) = &self.hook {
                hook(Stage::Guarded, at);
            }
            let tr = self
                .iommu
                .translate_in(at, access, &guard)
                .map_err(|e| match e {
                    IommuError::Busy { .. } => DmaError::Revoked,
                    _ => DmaError::Fault,
                })?;
            debug_assert!(
                !(write && guard.read_only()),
                "the IOMMU let a write through to read-only {at}"
            );
            let leaf_end = tr.page_gpa.0 + tr.page_size.bytes();
            let len = (guard.range().end().0.min(leaf_end) - at.0).min(n - off);
            let piece = if write {
                guard.slice_for_write(at, len)
            } else {
                guard.slice(at, len)
            }
            .map_err(|_| DmaError::Fault)?;
            let hva = piece.ptr_guard().as_ptr() as u64;
            debug_assert_eq!(tr.hva.0, hva, "stage-2 and the slot map disagree on {at}");
            if tr.hva.0 != hva {
                return Err(DmaError::Fault);
            }
            #[cfg(test)]
            if let Some(hook) = &self.hook {
                hook(Stage::Translated, at);
            }
            f(off, piece)?;
            if write {
                // The walk set Dirty before the write, and a report taken in
                // between may have cleared it: note the write after it
                // landed, so it is in a later report.
                if let Some(written) = GpaRange::new(at, len) {
                    self.iommu.note_write(written);
                }
            }
            off += len;
        }
        Ok(())
    }

    fn copy_chunk(&self, pins: &[&Pin], src: Gpa, dst: Gpa, n: u64) -> Result<(), DmaError> {
        // Bounce through a buffer: source and destination may overlap, or sit
        // in different slots with different piece boundaries.
        let mut buf = vec![0u8; n as usize];
        self.each_piece(pins, src, n, false, |off, piece| {
            let at = off as usize;
            piece.copy_to(&mut buf[at..at + piece.len()]);
            Ok(())
        })?;
        self.each_piece(pins, dst, n, true, |off, piece| {
            let at = off as usize;
            piece.copy_from(&buf[at..at + piece.len()]);
            Ok(())
        })
    }

    fn fill_chunk(&self, pins: &[&Pin], dst: Gpa, n: u64, value: u64) -> Result<(), DmaError> {
        self.each_piece(pins, dst, n, true, |_, piece| {
            // 8-byte aligned: the range start is (checked) and pieces split at
            // page bounds; each element is one aligned store.
            let words = words_of(&piece)?;
            (0..words.len()).for_each(|i| words.store(i, value));
            Ok(())
        })
    }

    fn sum_chunk(&self, pins: &[&Pin], src: Gpa, n: u64) -> Result<u64, DmaError> {
        let mut sum = 0u64;
        self.each_piece(pins, src, n, false, |_, piece| {
            let words = words_of(&piece)?;
            sum = (0..words.len()).fold(sum, |s, i| s.wrapping_add(words.load(i)));
            Ok(())
        })?;
        Ok(sum)
    }
}

/// Where in a piece a test hook runs.
#[cfg(test)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stage {
    /// The slot guard is taken; the piece is not translated yet.
    Guarded,
    /// Translated; the data is not moved yet.
    Translated,
}

/// A piece as an array of `u64`s (pieces of a transfer are 8-byte aligned
/// and a multiple of 8 bytes long).
fn words_of<'a>(
    piece: &'a VolatileSlice<'_>,
) -> Result<vm_memory::volatile_memory::VolatileArrayRef<'a, u64>, DmaError> {
    piece
        .get_array_ref::<u64>(0, piece.len() / 8)
        .map_err(|_| DmaError::Fault)
}

/// Offsets used by `serve` must match the protocol's layout.
const _: () = assert!(core::mem::offset_of!(DmaDescriptor, result) == 40);
const _: () = assert!(core::mem::offset_of!(DmaDescriptor, status) == 48);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::backing::{BackingKind, HostMapping};
    use crate::mm::manager::SimKvm;
    use crate::mm::pin_account::{PinAccount, PinLimit};
    use crate::mm::slot_map::{SlotFlags, SlotMapConfig};

    const BASE: u64 = 0x4000_0000;
    const MIB: u64 = 1 << 20;

    /// The engine's transfers over a manager on the simulated KVM, with two
    /// 1 MiB slots at `BASE` (the second read-only) and a hole after them.
    fn transfers(pin_limit: PinLimit) -> Transfers {
        let memory = Arc::new(MemoryManager::new(SimKvm::new(), SlotMapConfig::default()).unwrap());
        for (i, flags) in [
            SlotFlags::NONE,
            SlotFlags {
                read_only: true,
                ..SlotFlags::NONE
            },
        ]
        .into_iter()
        .enumerate()
        {
            let mem = Arc::new(HostMapping::new(&BackingKind::Anon, MIB).unwrap());
            memory
                .apply(|m| m.plug(Gpa(BASE + i as u64 * MIB), MIB, mem, 0, flags))
                .unwrap();
        }
        let account = Arc::new(PinAccount::new(pin_limit));
        Transfers {
            pins: Arc::new(PinManager::new(memory.clone(), account)),
            iommu: Arc::new(Iommu::new(memory.clone())),
            memory,
            stats: Arc::new(DmaStats::default()),
            hook: None,
        }
    }

    fn desc(op: u64, src: u64, dst: u64, len: u64, value: u64) -> DmaDescriptor {
        DmaDescriptor {
            op,
            src,
            dst,
            len,
            value,
            result: 0,
            status: 0,
        }
    }

    fn word(t: &Transfers, gpa: u64) -> u64 {
        t.memory
            .try_acquire(Gpa(gpa))
            .unwrap()
            .read_u64(Gpa(gpa))
            .unwrap()
    }

    #[test]
    fn test_fill_copy_checksum_move_the_bytes_across_chunks() {
        let t = transfers(PinLimit::Unlimited);
        let len = 3 * CHUNK + 64; // several chunks and a tail
        t.execute(&desc(dma_op::FILL, 0, BASE, len, 0x1234))
            .unwrap();
        assert_eq!(word(&t, BASE + len - 8), 0x1234);
        assert_eq!(word(&t, BASE + len), 0, "past the range untouched");
        t.execute(&desc(dma_op::COPY, BASE, BASE + MIB / 2, len, 0))
            .unwrap();
        assert_eq!(word(&t, BASE + MIB / 2 + 2 * CHUNK), 0x1234);
        let sum = t.execute(&desc(dma_op::CHECKSUM, BASE + MIB / 2, 0, len, 0));
        assert_eq!(sum, Ok((len / 8).wrapping_mul(0x1234)));
        assert_eq!(t.pins.account().pinned().charged(), 0, "every pin released");
    }

    #[test]
    fn test_copy_from_a_read_only_slot_works_and_into_it_faults() {
        let t = transfers(PinLimit::Unlimited);
        let ro = BASE + MIB;
        assert_eq!(t.execute(&desc(dma_op::COPY, ro, BASE, 4096, 0)), Ok(0));
        let into = t.execute(&desc(dma_op::FILL, 0, ro, 4096, 7));
        assert_eq!(into, Err(DmaError::Fault));
        assert_eq!(word(&t, ro), 0);
    }

    #[test]
    fn test_unplugged_invalid_and_over_limit_requests_give_their_status() {
        let t = transfers(PinLimit::Pages(4));
        let hole = BASE + 2 * MIB;
        assert_eq!(
            t.execute(&desc(dma_op::FILL, 0, hole, 8, 1)),
            Err(DmaError::Fault)
        );
        for bad in [
            desc(dma_op::FILL, 0, BASE, 0, 1),
            desc(dma_op::FILL, 0, BASE, 12, 1),
            desc(dma_op::FILL, 0, BASE + 4, 8, 1),
            desc(dma_op::FILL, 0, u64::MAX - 7, 16, 1),
            // Fits below 2^64, but its page cover does not.
            desc(dma_op::FILL, 0, 0xFFFF_FFFF_FFFF_F000, 8, 1),
            desc(99, BASE, BASE, 8, 1),
        ] {
            assert_eq!(t.execute(&bad), Err(DmaError::Invalid), "{bad:?}");
        }
        let big = t.execute(&desc(dma_op::FILL, 0, BASE, 5 * 4096, 1));
        assert_eq!(big, Err(DmaError::NoPin));
        assert_eq!(DmaError::NoPin.status(), dma_status::NO_PIN);
    }

    /// Device threads fill pages through the IOMMU while a reporter takes
    /// dirty pages and a writer write-protects and unprotects the range (each
    /// protect zaps the IOMMU). Every write must be in a report that ended
    /// after the write began: a report that ended before it cannot have seen
    /// it, and no later report may miss it.
    #[test]
    fn test_every_device_write_completed_before_a_report_is_in_it_or_a_later_one() {
        use std::collections::BTreeSet;
        use std::sync::atomic::AtomicBool;
        use std::sync::Mutex;
        use std::time::{Duration, Instant};

        const PAGES: u64 = 32;
        let t = transfers(PinLimit::Unlimited);
        let clock = AtomicU64::new(0);
        let stop = AtomicBool::new(false);
        let writes: Mutex<Vec<(u64, u64)>> = Mutex::new(Vec::new());
        let reports: Mutex<Vec<(u64, BTreeSet<u64>)>> = Mutex::new(Vec::new());
        let tick = |clock: &AtomicU64| clock.fetch_add(1, Ordering::SeqCst) + 1;
        let all = GpaRange::new(Gpa(BASE), MIB).unwrap();
        let report = || {
            let pages = t.iommu.take_dirty(all).unwrap();
            let ended = tick(&clock);
            let set = pages.into_iter().map(|g| g.0).collect();
            reports.lock().unwrap().push((ended, set));
        };
        std::thread::scope(|s| {
            for seed in 1..=2u64 {
                let (t, clock, stop, writes) = (&t, &clock, &stop, &writes);
                s.spawn(move || {
                    let mut x = seed;
                    while !stop.load(Ordering::Relaxed) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let gpa = BASE + x % PAGES * 4096;
                        let fill = desc(dma_op::FILL, 0, gpa, 4096, x);
                        let began = tick(clock);
                        if t.execute(&fill).is_ok() {
                            writes.lock().unwrap().push((gpa >> 12, began));
                        }
                    }
                });
            }
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    report();
                }
            });
            // Protect and unprotect, leaving the devices room between pairs,
            // until enough writes completed (bounded in time).
            let until = Instant::now() + Duration::from_secs(10);
            while writes.lock().unwrap().len() < 300 && Instant::now() < until {
                for read_only in [true, false] {
                    t.memory
                        .apply(|m| m.protect(Gpa(BASE), PAGES * 4096, read_only))
                        .unwrap();
                }
                std::thread::sleep(Duration::from_micros(300));
            }
            stop.store(true, Ordering::Relaxed);
        });
        report();
        let reports = reports.into_inner().unwrap();
        let writes = writes.into_inner().unwrap();
        assert!(
            writes.len() > 100,
            "too few writes to mean anything: {}",
            writes.len()
        );
        for &(gfn, began) in &writes {
            let seen = reports
                .iter()
                .any(|(ended, pages)| *ended > began && pages.contains(&gfn));
            assert!(
                seen,
                "the write to frame {gfn:#x} begun at tick {began} was never reported"
            );
        }
    }

    /// The interleaving that lost a device write: the walk marks the page
    /// dirty, a report takes it, a protect starts while the transfer still
    /// holds its guard, then the write lands. The protect's zap must come
    /// after the write and its re-mark (the drain precedes the zap), so a
    /// later report has the page.
    #[test]
    fn test_a_write_racing_a_report_and_a_protect_is_still_reported() {
        use std::sync::Mutex;
        use std::time::Duration;

        let mut t = transfers(PinLimit::Unlimited);
        let page = GpaRange::new(Gpa(BASE), 4096).unwrap();
        let (memory, iommu) = (t.memory.clone(), t.iommu.clone());
        let protect = Arc::new(Mutex::new(None));
        let spawned = protect.clone();
        t.hook = Some(Box::new(move |stage, _| {
            if stage != Stage::Translated || spawned.lock().unwrap().is_some() {
                return;
            }
            // The report between the walk (Dirty set) and the write.
            assert_eq!(iommu.take_dirty(page).unwrap(), vec![page.start().gfn()]);
            let memory = memory.clone();
            *spawned.lock().unwrap() = Some(std::thread::spawn(move || {
                memory
                    .apply(|m| m.protect(Gpa(BASE), 4096, true))
                    .map(|_| ())
            }));
            // Give the protect time to get as far as it can.
            std::thread::sleep(Duration::from_millis(50));
        }));
        t.execute(&desc(dma_op::FILL, 0, BASE, 4096, 9)).unwrap();
        let protect = protect.lock().unwrap().take().unwrap();
        protect.join().unwrap().unwrap();
        assert_eq!(t.iommu.take_dirty(page).unwrap(), vec![page.start().gfn()]);
        assert_eq!(word(&t, BASE), 9);
    }

    /// An unplug and a replug of the destination between two pieces of one
    /// chunk: the transfer must not write into the memory plugged after its
    /// pin was revoked, so it ends REVOKED and the new memory stays zero.
    #[test]
    fn test_a_transfer_never_writes_into_memory_replugged_after_its_pin_was_revoked() {
        use std::sync::Mutex;
        use std::time::Duration;

        let mut t = transfers(PinLimit::Unlimited);
        let second = BASE + 4096;
        let memory = t.memory.clone();
        let replug = Arc::new(Mutex::new(None));
        let spawned = replug.clone();
        t.hook = Some(Box::new(move |stage, at| {
            if stage != Stage::Translated || at.0 != BASE || spawned.lock().unwrap().is_some() {
                return;
            }
            let memory = memory.clone();
            *spawned.lock().unwrap() = Some(std::thread::spawn(move || {
                memory.apply(|m| m.unplug(Gpa(second), 4096)).unwrap();
                let fresh = Arc::new(HostMapping::new(&BackingKind::Anon, 4096).unwrap());
                memory
                    .apply(|m| m.plug(Gpa(second), 4096, fresh, 0, SlotFlags::NONE))
                    .unwrap();
            }));
            std::thread::sleep(Duration::from_millis(50));
        }));
        let result = t.execute(&desc(dma_op::FILL, 0, BASE, 2 * 4096, 5));
        replug.lock().unwrap().take().unwrap().join().unwrap();
        assert_eq!(result, Err(DmaError::Revoked));
        assert_eq!(
            word(&t, BASE),
            5,
            "the first piece landed before the unplug"
        );
        assert_eq!(
            word(&t, second),
            0,
            "nothing written into the replugged page"
        );
        assert_eq!(t.pins.account().pinned().charged(), 0);
    }

    /// A protect of another page of the destination's slot starts while the
    /// transfer holds the slot's guard and before the piece is translated:
    /// the writer excludes the slot and waits for the guard. The fill of the
    /// untouched page must use the guard the transfer holds (a second guard
    /// would be refused while the slot is excluded), so the transfer, on
    /// memory that stays plugged, completes.
    #[test]
    fn test_a_fill_under_a_held_guard_survives_a_writer_waiting_on_the_slot() {
        use std::sync::Mutex;
        use std::time::Duration;

        let mut t = transfers(PinLimit::Unlimited);
        let memory = t.memory.clone();
        let protect = Arc::new(Mutex::new(None));
        let spawned = protect.clone();
        t.hook = Some(Box::new(move |stage, _| {
            if stage != Stage::Guarded || spawned.lock().unwrap().is_some() {
                return;
            }
            let memory = memory.clone();
            *spawned.lock().unwrap() = Some(std::thread::spawn(move || {
                memory
                    .apply(|m| m.protect(Gpa(BASE + 8 * 4096), 4096, true))
                    .map(|_| ())
            }));
            // Let the writer exclude the slot and start waiting for us.
            std::thread::sleep(Duration::from_millis(50));
        }));
        assert_eq!(t.execute(&desc(dma_op::FILL, 0, BASE, 4096, 3)), Ok(0));
        protect
            .lock()
            .unwrap()
            .take()
            .unwrap()
            .join()
            .unwrap()
            .unwrap();
        assert_eq!(word(&t, BASE), 3);
    }
}
