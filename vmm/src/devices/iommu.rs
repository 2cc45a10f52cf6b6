//! The IOMMU: device-side accesses translate guest-physical addresses through
//! a [`Stage2Table`] (EPT format, walked without locks) that is filled on
//! demand from the slot map and kept coherent by invalidation ranges, the way
//! KVM's TDP MMU fills its tables from memslots and zaps them from mmu
//! notifiers.
//!
//! # Invariants
//! 1. **No stale leaf survives an invalidation's start.** The IOMMU
//!    subscribes to the memory manager's [`InvalidationHub`]; the hub delivers
//!    `invalidate_start` before KVM and the host tear anything down, and
//!    [`Subscriber::invalidate_start`] zaps every leaf the range covers (see
//!    "Zap" below). Huge leaves the range covers in part are split first, so
//!    memory outside it never shows a hole.
//! 2. **A fill never installs what a racing change took away.** The fault
//!    path ([`Iommu::translate`] on a miss) follows KVM's sequence protocol:
//!    `seq = hub.read_begin()`, look the page up through a slot guard
//!    ([`MemoryManager::try_acquire`]), install the leaf, then
//!    `hub.retry(seq, page)`. If an overlapping invalidation is in progress or
//!    any ended since `read_begin`, the leaf may have been resolved from
//!    memory on its way out (the zap may have run before the install), so the
//!    fault zaps what it installed and starts again. Either the zap of the
//!    change runs after the install (and removes it), or the change was
//!    recorded before `retry` (and `retry` sees it).
//! 3. **Permissions follow the slot.** A read-only slot is mapped without
//!    write permission, so a device write to it fails
//!    ([`IommuError::Denied`]); a protect to read-only is an invalidation, so
//!    writable leaves of the range are zapped and refilled read-only. A
//!    protect back to read-write takes nothing away and is not announced, so
//!    a write that meets a read-only leaf of a slot that is writable now zaps
//!    the leaf and refills it (KVM's spurious-fault fix-up).
//! 4. **Leaf size follows the backing.** A 2 MiB leaf is used where the
//!    slot's backing is THP or hugetlb, the 2 MiB-aligned range around the
//!    address lies inside the slot, and its host address is 2 MiB aligned;
//!    otherwise 4 KiB.
//! 5. **Dirty bits are never lost.** Device writes set the leaf's Dirty bit
//!    (the walk does it by CAS). A zap unmaps the range in one exclusive pass
//!    and harvests Dirty from the values it cleared (a walker's Dirty CAS
//!    either landed before the clearing CAS or freeze, and is harvested, or
//!    failed), into a pending set; [`Iommu::take_dirty`] reports pending and
//!    live dirty frames of a range once each, like KVM's dirty log. And since
//!    the memory manager drains a slot's guards before the invalidation
//!    starts, a device write under a guard (with its re-mark after the
//!    write) is complete before the zap runs.
//!
//! # Memory safety
//! The table only *translates*; it does not keep host memory alive. A device
//! holds a slot guard on the memory it touches for as long as it touches it
//! (as [`crate::devices::dma`] does). The memory manager excludes and drains
//! a slot's guards before the invalidation starts (so before the zap) and
//! before tearing the slot down. So a translation obtained while a guard is
//! held stays valid until the guard is dropped, and no fill of that slot can
//! run between the zap and the teardown (a fill needs a guard).
//!
//! # Lock order
//! The table's writer lock is the innermost lock; the pending-dirty mutex is
//! taken alone (never while calling into the table). `invalidate_start` runs
//! on the memory manager's writer thread with the slot-map writer lock held,
//! after the drain, and takes the table's lock exclusive; the fault path
//! holds at most a slot guard while it takes the table's lock shared (the
//! writer holds no table lock while it drains). The fault path is bounded
//! ([`FAULT_ATTEMPTS`]), so a device whose fills keep racing invalidations
//! elsewhere (each ended invalidation forces a retry) eventually gives up
//! ([`IommuError::Busy`]) instead of spinning.
//!
//! ```
//! use std::sync::Arc;
//! use vmm::devices::iommu::Iommu;
//! use vmm::mm::manager::{MemoryManager, SimKvm};
//! use vmm::mm::addr::{Gpa, GpaRange};
//! use vmm::mm::backing::{BackingKind, HostMapping};
//! use vmm::mm::slot_map::{SlotFlags, SlotMapConfig};
//! use vmm::mm::stage2::{Access, PageSize};
//!
//! // The simulated KVM backend: the same manager runs on a VM fd.
//! let memory = Arc::new(MemoryManager::new(SimKvm::new(), SlotMapConfig::default()).unwrap());
//! let mem = Arc::new(HostMapping::new(&BackingKind::Anon, 0x10_0000).unwrap());
//! memory
//!     .apply(|m| m.plug(Gpa(0x10_0000), 0x10_0000, mem.clone(), 0, SlotFlags::NONE))
//!     .unwrap();
//! let iommu = Iommu::new(memory.clone());
//! let t = iommu.translate(Gpa(0x10_2008), Access::Write).unwrap(); // a fault fills it
//! assert_eq!(t.hva.0, mem.hva().0 + 0x2008);
//! assert_eq!(t.page_size, PageSize::Size4K);
//! let all = GpaRange::new(Gpa(0x10_0000), 0x10_0000).unwrap();
//! assert_eq!(iommu.take_dirty(all).unwrap().len(), 1);
//! memory.apply(|m| m.unplug(Gpa(0x10_0000), 0x10_0000)).unwrap();
//! assert!(iommu.dump().is_empty()); // zapped in invalidate_start
//! assert!(iommu.translate(Gpa(0x10_2008), Access::Read).is_err());
//! ```

use std::collections::BTreeSet;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;

use crate::mm::addr::{Gfn, Gpa, GpaRange, Hva, HUGE_2M, PAGE_SIZE};
use crate::mm::backing::BackingKind;
use crate::mm::guard::{GuardError, SlotRef};
use crate::mm::manager::MemoryManager;
use crate::mm::notifier::{InvalidationHub, Reason, Subscriber, SubscriptionId};
use crate::mm::stage2::{
    Access, MappedRun, PageSize, Perms, ReclaimStats, Stage2Error, Stage2Table, Translation,
};

/// How many times a translation may miss (a fill lost to a racing
/// invalidation, or a slot busy under a writer) before it fails as
/// [`IommuError::Busy`].
pub const FAULT_ATTEMPTS: u32 = 16;

/// Why a device-side access cannot be translated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IommuError {
    /// No memory is plugged at the address.
    #[error("device access to {gpa} ({access:?}): no memory is plugged there")]
    Unplugged {
        /// The address.
        gpa: Gpa,
        /// The access.
        access: Access,
    },
    /// The mapping does not allow the access (a write to read-only memory).
    #[error("device {access:?} access to {gpa} denied: the stage-2 leaf allows {perms}")]
    Denied {
        /// The address.
        gpa: Gpa,
        /// The access.
        access: Access,
        /// What the leaf allows.
        perms: Perms,
    },
    /// The memory kept changing under the fault path.
    #[error("device access to {gpa}: memory kept changing under it ({attempts} attempts)")]
    Busy {
        /// The address.
        gpa: Gpa,
        /// Attempts made.
        attempts: u32,
    },
    /// The table refused an operation.
    #[error("stage-2 table: {0}")]
    Table(#[from] Stage2Error),
}

/// Counters of the IOMMU (relaxed; for reports and tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct IommuStats {
    /// Translations served by the table without a fault.
    pub hits: u64,
    /// Leaves installed by the fault path (and kept).
    pub fills: u64,
    /// Of `fills`, the 2 MiB leaves.
    pub huge_fills: u64,
    /// Fills thrown away because an invalidation raced them.
    pub retries: u64,
    /// Invalidation ranges zapped.
    pub zaps: u64,
    /// 4 KiB pages unmapped by zaps.
    pub zapped_pages: u64,
    /// Translations refused (unplugged, denied, busy).
    pub failures: u64,
}

#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    fills: AtomicU64,
    huge_fills: AtomicU64,
    retries: AtomicU64,
    zaps: AtomicU64,
    zapped_pages: AtomicU64,
    failures: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// The part the hub holds: the table, dirty frames harvested by zaps, counters.
#[derive(Debug, Default)]
struct State {
    table: Stage2Table,
    /// Dirty frames of leaves zapped since they were last reported.
    pending_dirty: Mutex<BTreeSet<Gfn>>,
    counters: Counters,
}

/// The smallest 4 KiB-aligned range covering `range`, clipped to the table's
/// reach by the table's own checks.
fn page_cover(range: GpaRange) -> Option<GpaRange> {
    let start = range.start().align_down(PAGE_SIZE);
    let end = range.end().0.checked_next_multiple_of(PAGE_SIZE)?;
    GpaRange::from_bounds(start, Gpa(end))
}

impl State {
    fn pending(&self) -> MutexGuard<'_, BTreeSet<Gfn>> {
        // Plain inserts and removes: a panic elsewhere leaves the set whole.
        self.pending_dirty.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Unmaps `range`, harvesting Dirty from the values the unmap cleared
    /// (one exclusive pass, as KVM takes the dirty state from the old SPTE
    /// its atomic zap returns), so no device write marked before the leaf
    /// went away is lost (invariant 5).
    fn zap(&self, range: GpaRange) -> Result<u64, Stage2Error> {
        let Some(range) = page_cover(range) else {
            return Err(Stage2Error::BadRange { range });
        };
        let (pages, dirty) = self.table.unmap_harvest(range)?;
        if !dirty.is_empty() {
            self.pending().extend(dirty);
        }
        Ok(pages)
    }
}

impl Subscriber for State {
    fn invalidate_start(&self, range: GpaRange, reason: Reason) {
        if reason == Reason::Protect && crate::mutants::on("iommu-protect-keeps-leaves") {
            return;
        }
        bump(&self.counters.zaps, 1);
        match self.zap(range) {
            Ok(pages) => bump(&self.counters.zapped_pages, pages),
            // Hub ranges are page-granular slot ranges inside the 48-bit space;
            // a failure here would leave stale leaves, so it must be loud.
            Err(e) => panic!("IOMMU zap of {range} failed: {e}"),
        }
    }

    fn invalidate_end(&self, _range: GpaRange) {}

    fn reshaped(&self, range: GpaRange) {
        // A 2 MiB leaf is filled only where the aligned 2 MiB lies in one
        // slot (rule 4); split any that a new boundary cuts, keeping its
        // translation, permissions and A/D bits, so device writes are
        // tracked per page on each side of it.
        for edge in [range.start(), range.end()] {
            if edge.is_aligned(HUGE_2M) {
                continue; // no 2 MiB leaf straddles it
            }
            // Down to the 4 KiB leaf at `edge` (or none: nothing cached).
            while let Ok(size) = self.table.split(edge) {
                if size == PageSize::Size4K {
                    break;
                }
            }
        }
    }
}

/// A software IOMMU over the VM's guest memory; see the module docs.
pub struct Iommu {
    memory: Arc<MemoryManager>,
    hub: Arc<InvalidationHub>,
    state: Arc<State>,
    subscription: SubscriptionId,
}

impl fmt::Debug for Iommu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Iommu")
            .field("subscription", &self.subscription)
            .field("stats", &self.stats())
            .finish()
    }
}

/// What one fault attempt did.
enum Fill {
    /// A leaf is (now) in the table: walk again.
    Mapped,
    /// A racing change: try again.
    Again,
}

impl Iommu {
    /// An empty table over `memory`, subscribed to its hub.
    pub fn new(memory: Arc<MemoryManager>) -> Self {
        let hub = memory.hub().clone();
        let state = Arc::new(State::default());
        let subscription = hub.subscribe_all(state.clone());
        Self {
            memory,
            hub,
            state,
            subscription,
        }
    }

    /// The table (for benchmarks and tests).
    pub fn table(&self) -> &Stage2Table {
        &self.state.table
    }

    /// Unmaps every leaf, as an invalidation of the whole address space
    /// does (Dirty harvested into the pending set): the device's view as
    /// when it was attached, as an IOMMU domain flush on device reset.
    /// Returns the pages unmapped.
    ///
    /// # Errors
    /// [`IommuError::Table`] if the table refuses the range.
    pub fn flush(&self) -> Result<u64, IommuError> {
        let all = GpaRange::new(Gpa(0), crate::mm::stage2::entry::GPA_LIMIT)
            .expect("the table's whole space is a range");
        self.state.zap(all).map_err(IommuError::Table)
    }

    /// Translates a device-side `access` to `gpa`: a lock-free table walk
    /// that sets Accessed (and Dirty for a write); on a miss, the fault path
    /// fills the table from the slot map (see the module docs).
    ///
    /// # Errors
    /// [`IommuError::Unplugged`], [`IommuError::Denied`] (a write to
    /// read-only memory, or execute), [`IommuError::Busy`] (an invalidation of
    /// the page kept racing the fill), [`IommuError::Table`].
    pub fn translate(&self, gpa: Gpa, access: Access) -> Result<Translation, IommuError> {
        self.counted(self.try_translate(gpa, access, None))
    }

    /// As [`translate`](Self::translate), for a device that already holds a
    /// guard on the slot of `gpa`: a fill uses that guard instead of taking
    /// another. (Taking a second guard could meet a writer that excluded the
    /// slot and waits for the first one to drain: the fill would then fail
    /// for memory that stays plugged.)
    ///
    /// # Errors
    /// As [`translate`](Self::translate).
    pub fn translate_in(
        &self,
        gpa: Gpa,
        access: Access,
        guard: &SlotRef<'_>,
    ) -> Result<Translation, IommuError> {
        self.counted(self.try_translate(gpa, access, Some(guard)))
    }

    fn counted(&self, result: Result<Translation, IommuError>) -> Result<Translation, IommuError> {
        if result.is_err() {
            bump(&self.state.counters.failures, 1);
        }
        result
    }

    fn try_translate(
        &self,
        gpa: Gpa,
        access: Access,
        held: Option<&SlotRef<'_>>,
    ) -> Result<Translation, IommuError> {
        let held = held.filter(|g| g.range().contains(gpa));
        let table = &self.state.table;
        for attempt in 0..FAULT_ATTEMPTS {
            // One walk: the translation, the leaf that denies the access,
            // or a miss.
            let walked = table.translate_or_denied(gpa, access);
            if let Ok(t) = walked {
                if attempt == 0 {
                    bump(&self.state.counters.hits, 1);
                }
                return Ok(t);
            }
            if let Err(Some(t)) = walked {
                let denied = IommuError::Denied {
                    gpa,
                    access,
                    perms: t.perms,
                };
                if access != Access::Write {
                    return Err(denied);
                }
                let read_only = match held {
                    Some(g) => Ok(g.read_only()),
                    None => self.memory.try_acquire(gpa).map(|g| g.read_only()),
                };
                match read_only {
                    Ok(true) => return Err(denied),
                    Ok(false) => {
                        // Unprotecting is not an invalidation (nothing is
                        // taken away), so a read-only leaf can outlive its
                        // reason, like a spurious EPT violation in KVM: zap
                        // it and refill from the slot.
                        let leaf = GpaRange::new(t.page_gpa, t.page_size.bytes())
                            .ok_or(IommuError::Unplugged { gpa, access })?;
                        self.state.zap(leaf)?;
                    }
                    Err(GuardError::Unplugged { .. }) => {
                        return Err(IommuError::Unplugged { gpa, access })
                    }
                    // A writer is changing the slot: ask again.
                    Err(_) => std::thread::yield_now(),
                }
                continue;
            }
            match self.fill(gpa, access, held)? {
                Fill::Mapped => {}
                Fill::Again => std::thread::yield_now(),
            }
        }
        Err(IommuError::Busy {
            gpa,
            attempts: FAULT_ATTEMPTS,
        })
    }

    /// One attempt of the fault path for `gpa` (invariant 2).
    fn fill(
        &self,
        gpa: Gpa,
        access: Access,
        held: Option<&SlotRef<'_>>,
    ) -> Result<Fill, IommuError> {
        let seq = self.hub.read_begin();
        let own;
        let guard = match held {
            Some(g) => g,
            None => {
                own = match self.memory.try_acquire(gpa) {
                    Ok(g) => g,
                    Err(GuardError::Unplugged { .. }) => {
                        return Err(IommuError::Unplugged { gpa, access })
                    }
                    Err(_) => return Ok(Fill::Again), // a writer holds the slot
                };
                &own
            }
        };
        let perms = if guard.read_only() {
            Perms::R
        } else {
            Perms::RW
        };
        let (page, hva, size) = self.leaf_for(guard, gpa)?;
        let installed = match self.state.table.map(page.start(), hva, size, perms) {
            Ok(()) => true,
            // Another fault mapped it, or (for a 2 MiB leaf) 4 KiB leaves
            // remain in the region after a partial zap: fall back to 4 KiB.
            Err(Stage2Error::AlreadyMapped { .. }) if size == PageSize::Size4K => false,
            Err(Stage2Error::AlreadyMapped { .. }) => {
                let page4 = GpaRange::new(gpa.align_down(PAGE_SIZE), PAGE_SIZE)
                    .ok_or(IommuError::Unplugged { gpa, access })?;
                let hva4 = guard
                    .hva(page4.start(), PAGE_SIZE)
                    .map_err(|_| IommuError::Unplugged { gpa, access })?;
                match self
                    .state
                    .table
                    .map(page4.start(), hva4, PageSize::Size4K, perms)
                {
                    Ok(()) => return self.settle(seq, page4, false),
                    Err(Stage2Error::AlreadyMapped { .. }) => false,
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        };
        if !installed {
            return Ok(Fill::Mapped);
        }
        // `guard` lives until `settle` returned: see invariant 2.
        self.settle(seq, page, size == PageSize::Size2M)
    }

    /// The `retry` half of the fault path for a leaf just installed.
    fn settle(
        &self,
        seq: crate::mm::notifier::ReadSeq,
        page: GpaRange,
        huge: bool,
    ) -> Result<Fill, IommuError> {
        let c = &self.state.counters;
        if self.hub.retry(seq, page) {
            bump(&c.retries, 1);
            self.state.zap(page)?;
            return Ok(Fill::Again);
        }
        bump(&c.fills, 1);
        if huge {
            bump(&c.huge_fills, 1);
        }
        Ok(Fill::Mapped)
    }

    /// The leaf to install for `gpa` in the guarded slot (invariant 4).
    fn leaf_for(
        &self,
        guard: &SlotRef<'_>,
        gpa: Gpa,
    ) -> Result<(GpaRange, Hva, PageSize), IommuError> {
        let unplugged = || IommuError::Unplugged {
            gpa,
            access: Access::Read,
        };
        let base = gpa.align_down(HUGE_2M);
        if let Some(region) = GpaRange::new(base, HUGE_2M) {
            if self.huge_backed(guard, gpa, region) {
                let hva = guard.hva(base, HUGE_2M).map_err(|_| unplugged())?;
                if hva.is_aligned(HUGE_2M) {
                    return Ok((region, hva, PageSize::Size2M));
                }
            }
        }
        let page = GpaRange::new(gpa.align_down(PAGE_SIZE), PAGE_SIZE).ok_or_else(unplugged)?;
        let hva = guard
            .hva(page.start(), PAGE_SIZE)
            .map_err(|_| unplugged())?;
        Ok((page, hva, PageSize::Size4K))
    }

    /// Whether `region` (the 2 MiB around `gpa`) may be one leaf: it lies
    /// inside the guarded slot, and inside that slot as the published map
    /// holds it now, whose backing is THP or hugetlb. The guard does not
    /// carry the backing; the published map's slot of the same generation
    /// does (a snapshot without it means the slot changed: use 4 KiB). Its
    /// range may be smaller than the guard's when a dirty-log switch split
    /// the slot in place meanwhile (the hub's `reshaped` bracket makes a
    /// fill that read the older map retry).
    fn huge_backed(&self, guard: &SlotRef<'_>, gpa: Gpa, region: GpaRange) -> bool {
        let inside = |r: GpaRange| r.start() <= region.start() && region.end() <= r.end();
        let map = self.memory.load();
        inside(guard.range())
            && map
                .lookup(gpa)
                .filter(|s| s.generation() == guard.generation())
                .is_some_and(|s| {
                    inside(s.range())
                        && matches!(s.mapping().kind(), BackingKind::Thp | BackingKind::Hugetlb)
                })
    }

    /// The guest frames in `range` written by devices since they were last
    /// reported, ascending: Dirty bits of live leaves (cleared) and frames
    /// harvested when leaves were zapped.
    ///
    /// # Errors
    /// [`IommuError::Table`] if the range reaches past the 48-bit space.
    pub fn take_dirty(&self, range: GpaRange) -> Result<Vec<Gfn>, IommuError> {
        let Some(cover) = page_cover(range) else {
            return Err(Stage2Error::BadRange { range }.into());
        };
        let live = self.state.table.take_dirty(cover)?;
        let mut pending = self.state.pending();
        let first = cover.start().gfn();
        let last = cover.end().gfn();
        let mut out: BTreeSet<Gfn> = pending.range(first..last).copied().collect();
        for g in &out {
            pending.remove(g);
        }
        drop(pending);
        out.extend(live);
        Ok(out.into_iter().collect())
    }

    /// Records a device write to `range` as dirty, after the data landed:
    /// the next [`take_dirty`](Self::take_dirty) of it reports the frames,
    /// whatever happened to the leaf meanwhile (a report that cleared the
    /// walk's Dirty bit before the store, a leaf zapped by a racing fill).
    /// KVM's `mark_page_dirty` does the same for writes the host makes.
    pub fn note_write(&self, range: GpaRange) {
        let Some(cover) = page_cover(range) else {
            return;
        };
        let frames = (cover.start().gfn().0..cover.end().gfn().0).map(Gfn);
        self.state.pending().extend(frames);
    }

    /// Every mapping, ascending, adjacent leaves merged into runs.
    pub fn dump(&self) -> Vec<MappedRun> {
        self.state.table.dump()
    }

    /// The counters.
    pub fn stats(&self) -> IommuStats {
        let c = &self.state.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        IommuStats {
            hits: l(&c.hits),
            fills: l(&c.fills),
            huge_fills: l(&c.huge_fills),
            retries: l(&c.retries),
            zaps: l(&c.zaps),
            zapped_pages: l(&c.zapped_pages),
            failures: l(&c.failures),
        }
    }

    /// Table pages linked, retired and reclaimed.
    pub fn reclaim_stats(&self) -> ReclaimStats {
        self.state.table.reclaim_stats()
    }

    /// The report: runs, bytes mapped, counters.
    pub fn report(&self) -> Stage2Report {
        let runs = self.dump();
        Stage2Report {
            mapped_bytes: runs.iter().map(|r| r.range.len()).sum(),
            runs,
            stats: self.stats(),
        }
    }
}

impl Drop for Iommu {
    fn drop(&mut self) {
        let _ = self.hub.unsubscribe(self.subscription);
    }
}

/// The stage-2 table at the end of a run (`stage2` in the JSON report).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stage2Report {
    /// What is mapped, as runs of equal leaves.
    pub runs: Vec<MappedRun>,
    /// Total bytes mapped.
    pub mapped_bytes: u64,
    /// The IOMMU's counters.
    pub stats: IommuStats,
}

#[cfg(test)]
#[path = "iommu_tests.rs"]
mod tests;
