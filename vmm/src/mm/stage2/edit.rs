//! Range operations and huge-leaf split/collapse. All of them hold the writer
//! lock exclusively, so no install races with them; walkers still do, and may
//! change the Accessed/Dirty bits of any leaf at any time. Every leaf update
//! is therefore a CAS from the value just read, retried when it fails, so an
//! A/D update is never lost and never resurrects an old value.
//!
//! A huge leaf that a range covers only partly is first split (one CAS that
//! publishes a fully populated lower table), then the covered part is edited,
//! so memory outside the range never shows a hole to a walker.

use crossbeam_epoch::Guard;

use super::entry::{
    gpa_fits, level_size, Decoded, Entry, PageSize, Perms, ACCESSED, DIRTY, ENTRIES, GPA_LIMIT,
    ROOT_LEVEL,
};
use super::reclaim::{self, TablePage};
use super::table::{corrupt, Stage2Table};
use super::{slot, Stage2Error};
use crate::mm::addr::{Gfn, Gpa, GpaRange, Hva, PAGE_SIZE};
use crate::mm::sync::AtomicU64;

/// What a range walk does to the leaves it covers.
enum RangeOp<'a> {
    /// Clear them; count the 4 KiB pages unmapped, and collect the frames of
    /// the leaves whose cleared value had Dirty set (when asked to).
    Unmap {
        pages: u64,
        dirty: Option<&'a mut Vec<Gfn>>,
    },
    /// Give them these permissions.
    Protect(Perms),
    /// Clear Dirty; collect the frames that had it.
    TakeDirty(&'a mut Vec<Gfn>),
}

/// A frozen entry seen under the exclusive lock: a writer died mid-operation.
#[cold]
fn stale_frozen(gpa: u64, level: u8) -> ! {
    panic!("stage-2 entry for gpa {gpa:#x} at level {level} left frozen by a failed writer")
}

fn check_range(range: GpaRange) -> Result<(u64, u64), Stage2Error> {
    let (start, end) = (range.start().0, range.end().0);
    if start % PAGE_SIZE != 0 || end % PAGE_SIZE != 0 || end > GPA_LIMIT {
        return Err(Stage2Error::BadRange { range });
    }
    Ok((start, end))
}

impl Stage2Table {
    /// Unmaps every page in `range` (4 KiB aligned), splitting huge leaves it
    /// covers only in part, and unlinking lower tables it empties (their pages
    /// are reclaimed after the epoch grace period). Returns the number of
    /// 4 KiB pages that were mapped. Dirty bits of unmapped leaves are dropped:
    /// use [`Stage2Table::unmap_harvest`] to keep them.
    ///
    /// ```
    /// use vmm::mm::addr::{Gpa, GpaRange, Hva};
    /// use vmm::mm::stage2::{Access, PageSize, Perms, Stage2Table};
    /// let t = Stage2Table::new();
    /// t.map(Gpa(0), Hva(0x4000_0000), PageSize::Size2M, Perms::RW).unwrap();
    /// let hole = GpaRange::new(Gpa(0x1000), 0x1000).unwrap();
    /// assert_eq!(t.unmap(hole).unwrap(), 1);
    /// assert!(t.translate(Gpa(0x1000), Access::Read).is_none());
    /// assert_eq!(t.translate(Gpa(0x2000), Access::Read).unwrap().hva, Hva(0x4000_2000));
    /// ```
    pub fn unmap(&self, range: GpaRange) -> Result<u64, Stage2Error> {
        self.unmap_range(range, None)
    }

    /// As [`unmap`](Self::unmap), harvesting Dirty in the same pass: the
    /// frames of every leaf whose *cleared* value had Dirty set (the value the
    /// clearing CAS or freeze replaced, as KVM takes the dirty state from the
    /// old SPTE its atomic zap returns), so no walker's Dirty bit set before
    /// the leaf went away is lost. Returns the pages unmapped and the dirty
    /// frames, ascending.
    ///
    /// ```
    /// use vmm::mm::addr::{Gfn, Gpa, GpaRange, Hva};
    /// use vmm::mm::stage2::{Access, PageSize, Perms, Stage2Table};
    /// let t = Stage2Table::new();
    /// t.map(Gpa(0x5000), Hva(0x1000), PageSize::Size4K, Perms::RW).unwrap();
    /// t.map(Gpa(0x6000), Hva(0x2000), PageSize::Size4K, Perms::RW).unwrap();
    /// t.translate(Gpa(0x6008), Access::Write).unwrap();
    /// let all = GpaRange::new(Gpa(0), 1 << 30).unwrap();
    /// assert_eq!(t.unmap_harvest(all).unwrap(), (2, vec![Gfn(6)]));
    /// ```
    pub fn unmap_harvest(&self, range: GpaRange) -> Result<(u64, Vec<Gfn>), Stage2Error> {
        let mut dirty = Vec::new();
        let pages = self.unmap_range(range, Some(&mut dirty))?;
        dirty.sort_unstable();
        Ok((pages, dirty))
    }

    fn unmap_range(
        &self,
        range: GpaRange,
        dirty: Option<&mut Vec<Gfn>>,
    ) -> Result<u64, Stage2Error> {
        let (start, end) = check_range(range)?;
        let mut op = RangeOp::Unmap { pages: 0, dirty };
        if start < end {
            let _excl = self.lock_exclusive();
            self.with_root(|root, guard| {
                self.edit_range(root, ROOT_LEVEL, 0, start, end, &mut op, guard)
            })?;
        }
        match op {
            RangeOp::Unmap { pages, .. } => Ok(pages),
            _ => unreachable!("the op is built above as Unmap"),
        }
    }

    /// Sets the permissions of every mapped page in `range` (4 KiB aligned)
    /// to `perms`, splitting huge leaves it covers in part when their
    /// permissions change. Accessed/Dirty bits are kept.
    ///
    /// ```
    /// use vmm::mm::addr::{Gpa, GpaRange, Hva};
    /// use vmm::mm::stage2::{Access, PageSize, Perms, Stage2Table};
    /// let t = Stage2Table::new();
    /// t.map(Gpa(0), Hva(0x20_0000), PageSize::Size2M, Perms::RW).unwrap();
    /// t.protect(GpaRange::new(Gpa(0), 0x1000).unwrap(), Perms::R).unwrap();
    /// assert!(t.translate(Gpa(0), Access::Write).is_none());
    /// assert!(t.translate(Gpa(0x1000), Access::Write).is_some());
    /// ```
    pub fn protect(&self, range: GpaRange, perms: Perms) -> Result<(), Stage2Error> {
        perms.validate()?;
        let (start, end) = check_range(range)?;
        if start < end {
            let mut op = RangeOp::Protect(perms);
            let _excl = self.lock_exclusive();
            self.with_root(|root, guard| {
                self.edit_range(root, ROOT_LEVEL, 0, start, end, &mut op, guard)
            })?;
        }
        Ok(())
    }

    /// Clears the Dirty bit of every leaf in `range` (4 KiB aligned) and
    /// returns the frames they map, ascending. A dirty huge leaf reports all
    /// its frames; one the range covers in part is split first, so only the
    /// frames inside the range are reported and cleared.
    ///
    /// ```
    /// use vmm::mm::addr::{Gfn, Gpa, GpaRange, Hva};
    /// use vmm::mm::stage2::{Access, PageSize, Perms, Stage2Table};
    /// let t = Stage2Table::new();
    /// t.map(Gpa(0x5000), Hva(0x1000), PageSize::Size4K, Perms::RW).unwrap();
    /// t.translate(Gpa(0x5008), Access::Write).unwrap();
    /// let all = GpaRange::new(Gpa(0), 1 << 30).unwrap();
    /// assert_eq!(t.take_dirty(all).unwrap(), vec![Gfn(5)]);
    /// assert!(t.take_dirty(all).unwrap().is_empty());
    /// ```
    pub fn take_dirty(&self, range: GpaRange) -> Result<Vec<Gfn>, Stage2Error> {
        let (start, end) = check_range(range)?;
        let mut dirty = Vec::new();
        if start < end {
            let mut op = RangeOp::TakeDirty(&mut dirty);
            let _excl = self.lock_exclusive();
            self.with_root(|root, guard| {
                self.edit_range(root, ROOT_LEVEL, 0, start, end, &mut op, guard)
            })?;
        }
        Ok(dirty)
    }

    /// Splits the huge leaf mapping `gpa` into a lower table of 512 leaves of
    /// the next size down (1G -> 2M, 2M -> 4K) with the same permissions and
    /// A/D bits, published in one CAS: a walker sees either the huge leaf or
    /// the full lower table, never a hole. Returns the new leaf size.
    ///
    /// ```
    /// use vmm::mm::addr::{Gpa, Hva};
    /// use vmm::mm::stage2::{PageSize, Perms, Stage2Table};
    /// let t = Stage2Table::new();
    /// t.map(Gpa(0), Hva(0x4000_0000), PageSize::Size1G, Perms::R).unwrap();
    /// assert_eq!(t.split(Gpa(0x1234)).unwrap(), PageSize::Size2M);
    /// assert_eq!(t.lookup(Gpa(0x20_0000)).unwrap().page_size, PageSize::Size2M);
    /// ```
    pub fn split(&self, gpa: Gpa) -> Result<PageSize, Stage2Error> {
        if gpa.0 >= GPA_LIMIT {
            return Err(Stage2Error::NotMapped { gpa });
        }
        let _excl = self.lock_exclusive();
        self.with_root(|root, guard| {
            let (slot, raw, level) = descend(root, gpa, 0, guard);
            match Entry(raw).decode(level) {
                Decoded::Empty => Err(Stage2Error::NotMapped { gpa }),
                Decoded::Leaf(_) if level == 1 => Err(Stage2Error::NotHuge { gpa }),
                Decoded::Leaf(_) => {
                    self.split_slot(slot, raw, level)?;
                    Ok(PageSize::from_level(level - 1).unwrap_or(PageSize::Size4K))
                }
                Decoded::Table(_) => unreachable!("descend passes through every table"),
                Decoded::Frozen => stale_frozen(gpa.0, level),
                Decoded::Corrupt => corrupt(raw, gpa.0, level),
            }
        })
    }

    /// Replaces the lower table under the `size` region at `gpa` by one huge
    /// leaf, when its 512 entries are leaves mapping contiguous host memory
    /// (aligned to `size`) with equal permissions. The leaf's A/D bits are the
    /// OR of the lower leaves'. Walkers wait (frozen lower leaves) rather than
    /// see a hole; the old table page is reclaimed after the grace period.
    ///
    /// ```
    /// use vmm::mm::addr::{Gpa, Hva};
    /// use vmm::mm::stage2::{PageSize, Perms, Stage2Table};
    /// let t = Stage2Table::new();
    /// for i in 0..512u64 {
    ///     t.map(Gpa(i << 12), Hva(0x20_0000 + (i << 12)), PageSize::Size4K, Perms::RW).unwrap();
    /// }
    /// t.collapse(Gpa(0), PageSize::Size2M).unwrap();
    /// assert_eq!(t.lookup(Gpa(0x1000)).unwrap().page_size, PageSize::Size2M);
    /// ```
    pub fn collapse(&self, gpa: Gpa, size: PageSize) -> Result<(), Stage2Error> {
        let not = |reason| Err(Stage2Error::NotCollapsible { gpa, size, reason });
        if size == PageSize::Size4K {
            return not("a 4K leaf has no lower table");
        }
        if !gpa.is_aligned(size.bytes()) {
            return Err(Stage2Error::MisalignedGpa { gpa, size });
        }
        if !gpa_fits(gpa, size) {
            return Err(Stage2Error::GpaOutOfRange { gpa, size });
        }
        let target = size.level();
        let _excl = self.lock_exclusive();
        self.with_root(|root, guard| {
            let (slot, raw, level) = descend(root, gpa, target, guard);
            match Entry(raw).decode(level) {
                Decoded::Empty => Err(Stage2Error::NotMapped { gpa }),
                Decoded::Table(addr) => {
                    // SAFETY: a table pointer read while pinned.
                    let child = unsafe { reclaim::page_at(addr, guard) };
                    self.collapse_slot(gpa, size, slot, raw, child, guard)
                }
                Decoded::Leaf(_) if level == target => not("already a leaf"),
                Decoded::Leaf(_) => not("inside a larger leaf"),
                Decoded::Frozen => stale_frozen(gpa.0, level),
                Decoded::Corrupt => corrupt(raw, gpa.0, level),
            }
        })
    }

    fn collapse_slot(
        &self,
        gpa: Gpa,
        size: PageSize,
        slot: &AtomicU64,
        raw: u64,
        child: &TablePage,
        guard: &Guard,
    ) -> Result<(), Stage2Error> {
        let not = |reason| Err(Stage2Error::NotCollapsible { gpa, size, reason });
        let level = size.level();
        let child_level = level - 1;
        let step = level_size(child_level);
        // The expected value of lower entry i, without its A/D bits.
        let mut base = None;
        for (i, s) in child.slots().iter().enumerate() {
            let v = slot::read(s);
            let leaf = match Entry(v).decode(child_level) {
                Decoded::Leaf(leaf) => leaf,
                Decoded::Empty => return not("the lower table is not fully populated"),
                Decoded::Table(_) => {
                    return not("the lower table holds tables (collapse them first)")
                }
                Decoded::Frozen => stale_frozen(gpa.0, child_level),
                Decoded::Corrupt => corrupt(v, gpa.0, child_level),
            };
            let (hva0, perms) = *base.get_or_insert((leaf.hva.0, leaf.perms));
            if hva0 % size.bytes() != 0 {
                return not("the host memory is not aligned to the huge page");
            }
            if leaf.hva.0 != hva0 + i as u64 * step || leaf.perms != perms {
                return not("the lower leaves are not contiguous with equal permissions");
            }
        }
        let Some((hva0, perms)) = base else {
            return not("the lower table is empty");
        };
        // Freeze each lower leaf, collecting its final A/D bits: a walker's
        // A/D CAS either lands before the freeze (and is collected) or fails.
        let mut saved = [0u64; ENTRIES];
        let mut ad = 0;
        let ad_mask = ACCESSED | DIRTY;
        for (i, s) in child.slots().iter().enumerate() {
            let mut v = slot::read(s);
            loop {
                match slot::freeze_if(s, v) {
                    Ok(()) => break,
                    // Only walkers race with us here, and only on A/D.
                    Err(now) if now & !ad_mask == v & !ad_mask => v = now,
                    Err(_) => {
                        Self::unfreeze_all(&child.slots()[..i], &saved[..i]);
                        return not("a lower leaf changed during the collapse");
                    }
                }
            }
            saved[i] = v;
            ad |= v & ad_mask;
        }
        let huge = Entry::leaf(Hva(hva0), perms, size).0 | ad;
        if slot::publish(slot, raw, huge).is_err() {
            Self::unfreeze_all(child.slots(), &saved);
            return not("the table entry changed during the collapse");
        }
        // SAFETY: the CAS above unlinked the page; retired once, here.
        unsafe { reclaim::retire(Entry(raw).frame_addr(), guard, &self.counters) };
        Ok(())
    }

    fn unfreeze_all(slots: &[AtomicU64], saved: &[u64]) {
        for (s, &v) in slots.iter().zip(saved) {
            slot::unfreeze(s, v);
        }
    }

    /// Replaces the huge leaf `raw` in `slot` (at `level` 2 or 3) by a fully
    /// populated lower table, in one CAS. If the leaf's A/D bits change under
    /// us the table is refilled and the CAS retried; if the slot stops holding
    /// a leaf, nothing is done and the caller re-reads the slot.
    fn split_slot(&self, slot: &AtomicU64, mut raw: u64, level: u8) -> Result<(), Stage2Error> {
        let page = reclaim::alloc_page()?;
        // SAFETY: the page is ours until published.
        let new = unsafe { page.as_ref() };
        let child_level = level - 1;
        let Some(child_size) = PageSize::from_level(child_level) else {
            // SAFETY: never published.
            unsafe { reclaim::free_unpublished(page) };
            return Ok(());
        };
        let table_entry = Entry::table(page.as_ptr() as u64).0;
        loop {
            let Decoded::Leaf(leaf) = Entry(raw).decode(level) else {
                // SAFETY: never published.
                unsafe { reclaim::free_unpublished(page) };
                return Ok(());
            };
            let ad = raw & (ACCESSED | DIRTY);
            for (i, s) in new.slots().iter().enumerate() {
                let hva = Hva(leaf.hva.0 + i as u64 * child_size.bytes());
                slot::init(s, Entry::leaf(hva, leaf.perms, child_size).0 | ad);
            }
            match slot::publish(slot, raw, table_entry) {
                Ok(()) => {
                    self.counters.note_linked();
                    return Ok(());
                }
                Err(now) => raw = now,
            }
        }
    }

    /// Freezes the lower table linked by `raw` in `slot` (at `level`), tears
    /// it down, clears the slot, and retires its pages. Returns the number of
    /// 4 KiB pages it mapped, or the slot's new value if it changed.
    fn zap_table(
        &self,
        slot: &AtomicU64,
        raw: u64,
        (level, base): (u8, u64),
        dirty: Option<&mut Vec<Gfn>>,
        guard: &Guard,
    ) -> Result<u64, u64> {
        slot::freeze_if(slot, raw)?;
        let mut pages = Vec::new();
        let mut torn = Torn {
            pages: &mut pages,
            dirty,
        };
        let mapped = teardown(Entry(raw).frame_addr(), level - 1, base, guard, &mut torn);
        slot::unfreeze(slot, 0);
        for page in pages {
            // SAFETY: `teardown` collected each page of the unlinked subtree
            // once; the freeze above unlinked its root.
            unsafe { reclaim::retire(page, guard, &self.counters) };
        }
        Ok(mapped)
    }

    /// Applies `op` to `[start, end)` within `table` (at `level`, whose entry
    /// 0 maps `base`).
    #[allow(clippy::too_many_arguments)]
    fn edit_range(
        &self,
        table: &TablePage,
        level: u8,
        base: u64,
        start: u64,
        end: u64,
        op: &mut RangeOp<'_>,
        guard: &Guard,
    ) -> Result<(), Stage2Error> {
        let size = level_size(level);
        let first = ((start - base) / size) as usize;
        let last = ((end - 1 - base) / size) as usize;
        // Cache lines of empty entries are passed over: every op leaves
        // them alone, and under the exclusive lock none is filled meanwhile.
        for i in table.used(first, last) {
            let e_start = base + i as u64 * size;
            let e_end = e_start + size;
            let covered = start <= e_start && e_end <= end;
            let slot = table.slot(i);
            loop {
                let raw = slot::read(slot);
                match Entry(raw).decode(level) {
                    Decoded::Empty => break,
                    Decoded::Frozen => stale_frozen(e_start, level),
                    Decoded::Corrupt => corrupt(raw, e_start, level),
                    Decoded::Table(addr) => {
                        if covered {
                            if let RangeOp::Unmap { pages, dirty } = op {
                                let at = (level, e_start);
                                match self.zap_table(slot, raw, at, dirty.as_deref_mut(), guard) {
                                    Ok(n) => *pages += n,
                                    Err(_) => continue,
                                }
                                break;
                            }
                        }
                        // SAFETY: a table pointer read while pinned.
                        let child = unsafe { reclaim::page_at(addr, guard) };
                        let (s, e) = (start.max(e_start), end.min(e_end));
                        self.edit_range(child, level - 1, e_start, s, e, op, guard)?;
                        // An emptied table maps nothing: no Dirty to harvest.
                        if matches!(op, RangeOp::Unmap { .. })
                            && child.is_empty()
                            && self
                                .zap_table(slot, raw, (level, e_start), None, guard)
                                .is_err()
                        {
                            continue;
                        }
                        break;
                    }
                    Decoded::Leaf(leaf) => {
                        let wants_split = match op {
                            RangeOp::Unmap { .. } => true,
                            RangeOp::Protect(p) => leaf.perms != *p,
                            RangeOp::TakeDirty(_) => leaf.dirty,
                        };
                        if !covered {
                            if !wants_split {
                                break;
                            }
                            // A huge leaf (a 4K leaf is always covered):
                            // split it, then edit the new lower table.
                            self.split_slot(slot, raw, level)?;
                            continue;
                        }
                        let new = match op {
                            RangeOp::Unmap { .. } => 0,
                            RangeOp::Protect(p) if leaf.perms == *p => break,
                            RangeOp::Protect(p) => Entry(raw).with_perms(*p).0,
                            RangeOp::TakeDirty(_) if !leaf.dirty => break,
                            RangeOp::TakeDirty(_) => raw & !DIRTY,
                        };
                        if slot::update_leaf(slot, raw, new).is_err() {
                            continue; // a walker set A/D: redo from the new value
                        }
                        match op {
                            RangeOp::Unmap { pages, dirty } => {
                                *pages += size / PAGE_SIZE;
                                if let Some(out) = dirty {
                                    if leaf.dirty {
                                        out.extend(
                                            (e_start / PAGE_SIZE..e_end / PAGE_SIZE).map(Gfn),
                                        );
                                    }
                                }
                            }
                            RangeOp::Protect(_) => {}
                            RangeOp::TakeDirty(out) => {
                                out.extend((e_start / PAGE_SIZE..e_end / PAGE_SIZE).map(Gfn))
                            }
                        }
                        break;
                    }
                }
            }
        }
        Ok(())
    }
}

/// What a teardown collects: the table pages to retire, and (when asked) the
/// frames of dirty leaves it froze.
struct Torn<'a, 'b> {
    pages: &'a mut Vec<u64>,
    dirty: Option<&'b mut Vec<Gfn>>,
}

/// Freezes the non-empty entries of the unlinked page at `addr` (a table at
/// `level` whose entry 0 maps `base`) and of the tables below it, collecting
/// the pages and dirty frames into `torn`. Returns the number of 4 KiB pages
/// the subtree mapped.
///
/// Cache lines of empty entries are passed over, not frozen (an empty entry
/// sharing a line with a mapping is frozen with it): the caller holds the writer
/// lock exclusively, so no install runs that could fill one (installs hold
/// it shared; split and collapse hold it exclusively), and nothing fills an
/// entry of a page once it is unlinked. A walker that reaches an empty
/// entry of the unlinked page misses, as it would have had it read the
/// entry before the unlink. Leaves are still frozen: a walker's A/D CAS may
/// race on them until the grace period ends.
fn teardown(addr: u64, level: u8, base: u64, guard: &Guard, torn: &mut Torn<'_, '_>) -> u64 {
    // SAFETY: `addr` was a table pointer read while `guard` is pinned, and
    // its pages are retired only after this returns.
    let page = unsafe { reclaim::page_at(addr, guard) };
    let size = level_size(level);
    let mut mapped = 0;
    for i in page.used(0, ENTRIES - 1) {
        let s = page.slot(i);
        let e_start = base + i as u64 * size;
        // The freeze returns the entry's last value: a walker's Dirty CAS
        // either landed before it (and is seen here) or failed.
        let old = slot::freeze(s);
        match Entry(old).decode(level) {
            Decoded::Table(a) => mapped += teardown(a, level - 1, e_start, guard, torn),
            Decoded::Leaf(leaf) => {
                mapped += size / PAGE_SIZE;
                if let (true, Some(out)) = (leaf.dirty, torn.dirty.as_deref_mut()) {
                    out.extend((e_start / PAGE_SIZE..(e_start + size) / PAGE_SIZE).map(Gfn));
                }
            }
            Decoded::Empty | Decoded::Frozen => {}
            Decoded::Corrupt => corrupt(old, 0, level),
        }
    }
    torn.pages.push(addr);
    mapped
}

/// Walks from `root` toward `gpa`, passing through table entries above level
/// `stop`, and returns the first entry it does not pass through: its slot,
/// raw value and level. At level `stop` a table entry is returned too.
fn descend<'g>(
    root: &'g TablePage,
    gpa: Gpa,
    stop: u8,
    guard: &'g Guard,
) -> (&'g AtomicU64, u64, u8) {
    let (mut table, mut level) = (root, ROOT_LEVEL);
    loop {
        let slot = table.slot(super::entry::level_index(gpa.0, level));
        let raw = slot::read(slot);
        match Entry(raw).decode(level) {
            Decoded::Table(addr) if level > stop => {
                // SAFETY: a table pointer read (one atomic load) while `guard`
                // is pinned: `page_at`'s contract.
                table = unsafe { reclaim::page_at(addr, guard) };
                level -= 1;
            }
            _ => return (slot, raw, level),
        }
    }
}
