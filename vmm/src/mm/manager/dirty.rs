//! The dirty-log half of [`MemoryManager`]: reports of written pages in
//! every mode (bitmap, manual clear, ring), device writes merged in, and
//! the bitmap modes' blind-window statistics. See docs/dirty-tracking.md.

use std::time::Duration;

use super::mirror::end_of;
use super::{DirtyLogMode, MemoryManager, MemslotError};
use crate::mm::addr::{Gfn, Gpa, GpaRange, PAGE_SIZE};
use crate::mm::slot_map::MemslotFlags;

/// Statistics of the bitmap modes' blind windows; see
/// [`MemoryManager::teardown_windows`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TeardownWindows {
    /// Windows measured (deletes and logging-offs of dirty-logging slots).
    pub count: u64,
    /// Their total length.
    pub total: Duration,
    /// The longest.
    pub max: Duration,
}

impl TeardownWindows {
    pub(super) fn record(&mut self, window: Duration) {
        self.count += 1;
        self.total += window;
        self.max = self.max.max(window);
    }
}

impl MemoryManager {
    /// The guest frames in `[gpa, gpa + size)` written since they were last
    /// reported, sorted. Reads and clears the dirty log of every dirty-logging
    /// slot overlapping the range (pages of those slots outside the range are
    /// kept for a later call), plus pages harvested when a dirty-logging slot
    /// was deleted or stopped logging.
    ///
    /// # Errors
    /// [`RangeOverflow`](MemslotError::RangeOverflow);
    /// [`NotLogging`](MemslotError::NotLogging) if no slot overlapping the
    /// range logs dirty pages and no harvested page of the range is pending
    /// (KVM's `KVM_GET_DIRTY_LOG` says `ENOENT` there: "0 pages" would be a
    /// lie); [`DirtyLog`](MemslotError::DirtyLog) if `KVM_GET_DIRTY_LOG` fails
    /// (pages read before the failure stay pending).
    pub fn dirty_pages(&self, gpa: Gpa, size: u64) -> Result<Vec<Gfn>, MemslotError> {
        let mut dirty = Vec::new();
        self.dirty_pages_into(gpa, size, &mut dirty)?;
        Ok(dirty)
    }

    /// [`dirty_pages`](Self::dirty_pages) into a vector the caller keeps
    /// across reports: `out` is cleared, then holds the report (sorted,
    /// unique). A caller that reports periodically (a migration loop, the
    /// dirty-log bench) so keeps one allocation, as QEMU keeps its dirty
    /// bitmaps, instead of a fresh vector (and its first-touch page faults)
    /// per report. On an error `out` is left empty; what was read stays
    /// pending, as for `dirty_pages`.
    ///
    /// # Errors
    /// Those of [`dirty_pages`](Self::dirty_pages).
    pub fn dirty_pages_into(
        &self,
        gpa: Gpa,
        size: u64,
        out: &mut Vec<Gfn>,
    ) -> Result<(), MemslotError> {
        out.clear();
        let range = GpaRange::new(gpa, size).ok_or(MemslotError::RangeOverflow { gpa, size })?;
        let mut st = self.lock_state();
        let mut logging = Vec::new();
        for (_, id) in st.by_gpa.range(..range.end()).rev() {
            let Some(r) = st.by_id.get(id) else { continue };
            if end_of(&r.spec) <= range.start().0 {
                break; // slots do not overlap: all earlier ones end before too
            }
            if r.spec.flags.contains(MemslotFlags::LOG_DIRTY_PAGES) {
                logging.push(r.spec);
            }
        }
        let first = range.start().gfn();
        let last = Gfn(range.end().0.div_ceil(PAGE_SIZE));
        if logging.is_empty()
            && st.pending.range(first..last).next().is_none()
            && !crate::mutants::on("dirty-pages-silent")
        {
            return Err(MemslotError::NotLogging { range });
        }
        if let Some(e) = st.ring_error.take() {
            return Err(MemslotError::DirtyRings(e.into()));
        }
        // The pages are gathered in `out`, not through `pending`: the
        // slots' bitmaps come out in ascending order (slots ascending, each
        // bitmap walked upwards), so the common report (nothing pending in
        // the range) is one pass with no per-page tree insert and remove.
        // What a read returns outside the range, and everything gathered
        // before a failure, goes to `pending` as before.
        let fresh = out;
        if st.mode == DirtyLogMode::Ring {
            if let Err(e) =
                st.harvest_rings_into(&*self.backend, None, &mut |gfn, _| fresh.push(gfn))
            {
                st.pending.extend(fresh.drain(..));
                return Err(MemslotError::DirtyRings(e.into()));
            }
        }
        for spec in logging.iter().rev() {
            if let Err(e) = st.harvest_range(&*self.backend, spec, range, fresh) {
                st.pending.extend(fresh.drain(..));
                return Err(MemslotError::DirtyLog(e));
            }
        }
        if st.mode == DirtyLogMode::Ring {
            // Ring entries come in ring order, a page once per vCPU ring
            // that logged it.
            fresh.sort_unstable();
            fresh.dedup();
        }
        let lo = fresh.partition_point(|g| *g < first);
        let hi = fresh.partition_point(|g| *g < last);
        if hi - lo != fresh.len() {
            st.pending.extend(fresh[hi..].iter().copied());
            fresh.truncate(hi);
            st.pending.extend(fresh.drain(..lo));
        }
        let dirty = fresh;
        if st.pending.range(first..last).next().is_some() {
            // Pages kept from a teardown, an emulated write or an earlier
            // read outside its range: merge them in.
            let kept: Vec<Gfn> = st.pending.range(first..last).copied().collect();
            for g in &kept {
                st.pending.remove(g);
            }
            dirty.extend(kept);
            dirty.sort_unstable();
            dirty.dedup();
        }
        Ok(())
    }

    /// Harvested pages not yet reported by [`dirty_pages`](Self::dirty_pages),
    /// plus one if a dirty-ring reset failure waits to be reported: 0 on a
    /// new manager.
    pub fn dirty_backlog(&self) -> usize {
        let st = self.lock_state();
        st.pending.len() + usize::from(st.ring_error.is_some())
    }

    /// The dirty-log interface of the backend (fixed when the VM was
    /// created).
    pub fn dirty_log_mode(&self) -> DirtyLogMode {
        self.lock_state().mode
    }

    /// Collects every dirty-ring entry into the pages
    /// [`dirty_pages`](Self::dirty_pages) reports, and resets the rings:
    /// what a vCPU thread does on `KVM_EXIT_DIRTY_RING_FULL` before entering
    /// the guest again (KVM keeps exiting until its ring was reset). Returns
    /// the number of entries; 0 in the bitmap modes.
    ///
    /// # Errors
    /// [`DirtyRings`](MemslotError::DirtyRings) if `KVM_RESET_DIRTY_RINGS`
    /// fails (the entries collected are kept).
    pub fn harvest_dirty_rings(&self) -> Result<u64, MemslotError> {
        let mut st = self.lock_state();
        if st.mode != DirtyLogMode::Ring {
            return Ok(0);
        }
        st.harvest_rings(&*self.backend, None)
            .map_err(|e| MemslotError::DirtyRings(e.into()))
    }

    /// The bitmap modes' blind windows so far: for each delete or
    /// logging-off of a dirty-logging slot, the time from the start of the
    /// `KVM_GET_DIRTY_LOG` that harvested it to the return of the memslot
    /// call that freed its bitmap. A guest write logged in that window is
    /// lost with the bitmap (the ring mode has no such window).
    pub fn teardown_windows(&self) -> TeardownWindows {
        self.lock_state().windows
    }

    /// Dirty-ring entries that named no slot the manager knew (another
    /// address space, an id not registered, an offset past the slot): 0
    /// unless a harvest was missed. For tests and reports.
    pub fn unattributed_ring_entries(&self) -> u64 {
        self.lock_state().unattributed
    }

    /// Records a write the VMM made on a vCPU's behalf (an emulated access)
    /// to `[gpa, gpa + len)` as dirty, if dirty logging is on there: KVM's
    /// log only sees writes KVM itself let through. It takes the manager's
    /// state lock briefly (a writer drains guards before it takes that lock,
    /// so a caller may hold a guard).
    pub fn mark_dirty(&self, gpa: Gpa, len: u64) {
        let map = self.load();
        if len == 0 || !map.lookup(gpa).is_some_and(|s| s.flags().dirty_log) {
            return;
        }
        let last = Gfn((gpa.0 + len - 1) >> 12);
        let mut st = self.lock_state();
        for g in gpa.gfn().0..=last.0 {
            st.pending.insert(Gfn(g));
        }
    }
}
