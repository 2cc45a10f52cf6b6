//! [`Stage2Table`]: the table, `map`, and the lock-free walk.
//!
//! The walk reads one entry per level with one `Acquire` load and decides
//! from that value alone (see the `slot` module for the orderings). It runs
//! pinned to a `crossbeam_epoch` guard, which keeps every page it can reach
//! alive until it returns. On a frozen entry it backs off and restarts from
//! the root; a restart is always safe because a walk has no side effect until
//! its final Accessed/Dirty CAS, which fails if the leaf changed.

use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crossbeam_epoch::{self as epoch, Guard};

use super::entry::{
    gpa_fits, level_index, Access, Decoded, Entry, Leaf, PageSize, Perms, ACCESSED, DIRTY,
    FRAME_LIMIT, FRAME_MASK, GPA_LIMIT, ROOT_LEVEL,
};
use super::reclaim::{self, PageCounters, ReclaimStats, TablePage};
use super::{slot, Stage2Error};
use crate::mm::addr::{Gpa, Hva};

/// The result of a successful walk.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Translation {
    /// The host-virtual address of the translated byte (leaf base + offset).
    pub hva: Hva,
    /// The first guest-physical address of the leaf.
    pub page_gpa: Gpa,
    /// The size of the leaf.
    pub page_size: PageSize,
    /// The leaf's permissions.
    pub perms: Perms,
    /// The leaf's Accessed bit after the walk.
    pub accessed: bool,
    /// The leaf's Dirty bit after the walk.
    pub dirty: bool,
}

impl Translation {
    fn new(gpa: Gpa, leaf: Leaf, size: PageSize) -> Self {
        let offset = gpa.0 & (size.bytes() - 1);
        Translation {
            hva: Hva(leaf.hva.0 + offset),
            page_gpa: gpa.align_down(size.bytes()),
            page_size: size,
            perms: leaf.perms,
            accessed: leaf.accessed,
            dirty: leaf.dirty,
        }
    }
}

/// A 4-level stage-2 table in EPT format.
///
/// Share it by reference (`&Stage2Table` is `Send + Sync`): walkers call
/// [`translate`](Self::translate) from any thread without a lock while
/// writers map, unmap, protect, split and collapse (see the module docs for
/// the writer lock and the guarantees walkers get).
///
/// ```
/// use vmm::mm::addr::{Gpa, Hva};
/// use vmm::mm::stage2::{Access, PageSize, Perms, Stage2Table};
///
/// let t = Stage2Table::new();
/// t.map(Gpa(0x20_0000), Hva(0x7f00_0040_0000), PageSize::Size2M, Perms::RW).unwrap();
/// let tr = t.translate(Gpa(0x20_1234), Access::Write).unwrap();
/// assert_eq!(tr.hva, Hva(0x7f00_0040_1234));
/// assert_eq!(tr.page_size, PageSize::Size2M);
/// assert!(tr.dirty);
/// assert!(t.translate(Gpa(0x20_1234), Access::Exec).is_none()); // not executable
/// assert!(t.translate(Gpa(0x40_0000), Access::Read).is_none()); // not mapped
/// ```
#[derive(Debug)]
pub struct Stage2Table {
    /// The level-4 page; never unlinked, freed with the table.
    pub(super) root: Box<TablePage>,
    /// Shared by `map`, exclusive for range operations (see the module docs).
    writer: RwLock<()>,
    pub(super) counters: Arc<PageCounters>,
}

impl std::fmt::Debug for TablePage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TablePage({:p})", self)
    }
}

impl Default for Stage2Table {
    fn default() -> Self {
        Self::new()
    }
}

/// Spins briefly, then yields: the wait of a walker that met a frozen entry.
pub(super) fn snooze(spins: &mut u32) {
    if *spins < 64 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
    *spins = spins.saturating_add(1);
}

/// Panics on an entry this table never writes: reading one means a page was
/// reclaimed (and poisoned) while a walker could still reach it.
#[cold]
pub(super) fn corrupt(raw: u64, gpa: u64, level: u8) -> ! {
    panic!(
        "stage-2 walk of gpa {gpa:#x} read corrupt entry {raw:#018x} at level {level} \
         (a freed, poisoned table page?)"
    )
}

impl Stage2Table {
    /// An empty table (one root page).
    pub fn new() -> Self {
        let counters = Arc::new(PageCounters::default());
        counters.note_linked();
        Stage2Table {
            root: TablePage::new_boxed(),
            writer: RwLock::new(()),
            counters,
        }
    }

    /// Page accounting: pages linked, retired and reclaimed.
    pub fn reclaim_stats(&self) -> ReclaimStats {
        self.counters.snapshot()
    }

    pub(super) fn lock_shared(&self) -> RwLockReadGuard<'_, ()> {
        // A panicking writer leaves no broken invariant the lock protects (the
        // lock guards no data; entries are always valid values), so poisoning
        // is ignored.
        self.writer.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn lock_exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        // As in `lock_shared`.
        self.writer.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Maps the `size` page at `gpa` to the host page at `hva` with `perms`.
    ///
    /// Fails without changing anything if an address is misaligned or out of
    /// range, the permissions are invalid, or any part of the page is already
    /// mapped. Concurrent `map`s install lock-free; walkers see the leaf once
    /// this returns.
    ///
    /// ```
    /// use vmm::mm::addr::{Gpa, Hva};
    /// use vmm::mm::stage2::{PageSize, Perms, Stage2Error, Stage2Table};
    /// let t = Stage2Table::new();
    /// t.map(Gpa(0x4000_0000), Hva(0x7f80_0000_0000), PageSize::Size1G, Perms::RWX).unwrap();
    /// assert_eq!(
    ///     t.map(Gpa(0x4000_1000), Hva(0x1000), PageSize::Size4K, Perms::R),
    ///     Err(Stage2Error::AlreadyMapped { gpa: Gpa(0x4000_1000), size: PageSize::Size4K })
    /// );
    /// assert!(t.map(Gpa(0x1000), Hva(0x1000), PageSize::Size2M, Perms::R).is_err());
    /// ```
    pub fn map(&self, gpa: Gpa, hva: Hva, size: PageSize, perms: Perms) -> Result<(), Stage2Error> {
        if !gpa.is_aligned(size.bytes()) {
            return Err(Stage2Error::MisalignedGpa { gpa, size });
        }
        if !gpa_fits(gpa, size) {
            return Err(Stage2Error::GpaOutOfRange { gpa, size });
        }
        if !hva.is_aligned(size.bytes()) {
            return Err(Stage2Error::MisalignedHva { hva, size });
        }
        if hva
            .0
            .checked_add(size.bytes())
            .is_none_or(|end| end > FRAME_LIMIT)
        {
            return Err(Stage2Error::HvaOutOfRange { hva });
        }
        perms.validate()?;
        let leaf = Entry::leaf(hva, perms, size).0;
        let target = size.level();

        let _shared = self.lock_shared();
        let guard = epoch::pin();
        let mut table: &TablePage = &self.root;
        let mut level = ROOT_LEVEL;
        let mut spins = 0;
        loop {
            let slot = table.slot(level_index(gpa.0, level));
            if level == target {
                return match slot::publish(slot, 0, leaf) {
                    Ok(()) => Ok(()),
                    // Under the shared lock nothing freezes entries, so a
                    // failed install found a live mapping or table.
                    Err(_) => Err(Stage2Error::AlreadyMapped { gpa, size }),
                };
            }
            let raw = slot::read(slot);
            match Entry(raw).decode(level) {
                Decoded::Empty => {
                    let page = reclaim::alloc_page()?;
                    let entry = Entry::table(page.as_ptr() as u64).0;
                    match slot::publish(slot, 0, entry) {
                        Ok(()) => {
                            self.counters.note_linked();
                            // SAFETY: just linked by us while pinned; only an
                            // exclusive writer can unlink it, and we hold the
                            // shared lock.
                            table = unsafe { reclaim::page_at(Entry(entry).frame_addr(), &guard) };
                            level -= 1;
                        }
                        // SAFETY: the CAS failed, so no other thread saw `page`.
                        Err(_) => unsafe { reclaim::free_unpublished(page) },
                    }
                }
                Decoded::Table(addr) => {
                    // SAFETY: `addr` is a table pointer read while pinned.
                    table = unsafe { reclaim::page_at(addr, &guard) };
                    level -= 1;
                }
                Decoded::Leaf(_) => return Err(Stage2Error::AlreadyMapped { gpa, size }),
                Decoded::Frozen => snooze(&mut spins),
                Decoded::Corrupt => corrupt(raw, gpa.0, level),
            }
        }
    }

    /// Translates `gpa` for an `access`, as a device would: lock-free, and
    /// setting the leaf's Accessed bit (and Dirty for a write) by CAS.
    ///
    /// Returns `None` if `gpa` is not mapped or the leaf does not allow the
    /// access (an EPT violation); A/D bits are then left alone.
    pub fn translate(&self, gpa: Gpa, access: Access) -> Option<Translation> {
        self.walk(gpa, Some(access)).ok()
    }

    /// As [`translate`](Self::translate), telling a miss from a denial in
    /// the same walk: `Err(None)` if nothing maps `gpa`, `Err(Some(t))` if
    /// the leaf `t` maps it but does not allow `access` (its A/D bits then
    /// left alone). A fault path needs both answers; one walk gives them
    /// from one snapshot of the leaf.
    ///
    /// ```
    /// use vmm::mm::addr::{Gpa, Hva};
    /// use vmm::mm::stage2::{Access, PageSize, Perms, Stage2Table};
    /// let t = Stage2Table::new();
    /// t.map(Gpa(0x3000), Hva(0x9000), PageSize::Size4K, Perms::R).unwrap();
    /// assert!(t.translate_or_denied(Gpa(0x3000), Access::Read).is_ok());
    /// let denied = t.translate_or_denied(Gpa(0x3000), Access::Write).unwrap_err();
    /// assert_eq!(denied.unwrap().perms, Perms::R);
    /// assert_eq!(t.translate_or_denied(Gpa(0x4000), Access::Read), Err(None));
    /// ```
    pub fn translate_or_denied(
        &self,
        gpa: Gpa,
        access: Access,
    ) -> Result<Translation, Option<Translation>> {
        self.walk(gpa, Some(access))
    }

    /// Looks `gpa` up without checking permissions or touching A/D bits.
    ///
    /// ```
    /// use vmm::mm::addr::{Gpa, Hva};
    /// use vmm::mm::stage2::{PageSize, Perms, Stage2Table};
    /// let t = Stage2Table::new();
    /// t.map(Gpa(0x3000), Hva(0x9000), PageSize::Size4K, Perms::R).unwrap();
    /// let tr = t.lookup(Gpa(0x3010)).unwrap();
    /// assert_eq!(tr.hva, Hva(0x9010));
    /// assert!(!tr.accessed);
    /// ```
    pub fn lookup(&self, gpa: Gpa) -> Option<Translation> {
        self.walk(gpa, None).ok()
    }

    /// The walk: the translation, or why there is none (see
    /// [`translate_or_denied`](Self::translate_or_denied)).
    fn walk(&self, gpa: Gpa, access: Option<Access>) -> Result<Translation, Option<Translation>> {
        if gpa.0 >= GPA_LIMIT {
            return Err(None);
        }
        let guard = epoch::pin();
        let mut spins = 0;
        'restart: loop {
            let mut table: &TablePage = &self.root;
            let mut level = ROOT_LEVEL;
            loop {
                let slot = table.slot(level_index(gpa.0, level));
                let raw = slot::read(slot);
                // The common case above the leaf level, a table entry as
                // `Entry::table` writes it, in one test: what `decode` would
                // return as `Table` (a leaf needs LARGE or level 1).
                if level > 1 && raw & !FRAME_MASK == Entry::table(0).0 {
                    // SAFETY: `raw` is a table pointer read while pinned.
                    table = unsafe { reclaim::page_at(raw & FRAME_MASK, &guard) };
                    level -= 1;
                    continue;
                }
                match Entry(raw).decode(level) {
                    Decoded::Empty => return Err(None),
                    Decoded::Frozen => {
                        snooze(&mut spins);
                        continue 'restart;
                    }
                    Decoded::Corrupt => corrupt(raw, gpa.0, level),
                    Decoded::Table(addr) => {
                        // SAFETY: `addr` is a table pointer read while pinned.
                        table = unsafe { reclaim::page_at(addr, &guard) };
                        level -= 1;
                    }
                    Decoded::Leaf(mut leaf) => {
                        let size = PageSize::from_level(level)
                            .unwrap_or_else(|| corrupt(raw, gpa.0, level));
                        let Some(access) = access else {
                            return Ok(Translation::new(gpa, leaf, size));
                        };
                        if !leaf.perms.allows(access) {
                            return Err(Some(Translation::new(gpa, leaf, size)));
                        }
                        let want = ACCESSED | if access == Access::Write { DIRTY } else { 0 };
                        if raw & want != want {
                            if slot::update_leaf(slot, raw, raw | want).is_err() {
                                // The leaf changed (A/D by another walker, or a
                                // writer): decide again from a fresh walk.
                                continue 'restart;
                            }
                            leaf.accessed = true;
                            leaf.dirty |= access == Access::Write;
                        }
                        return Ok(Translation::new(gpa, leaf, size));
                    }
                }
            }
        }
    }

    /// Runs `f` on the root page with a pinned guard (for `edit` and `dump`).
    pub(super) fn with_root<R>(&self, f: impl FnOnce(&TablePage, &Guard) -> R) -> R {
        let guard = epoch::pin();
        f(&self.root, &guard)
    }
}

impl Drop for Stage2Table {
    fn drop(&mut self) {
        // SAFETY: `&mut self`: no walker or writer can hold a reference into
        // the table, and every linked page is reachable only from the root.
        unsafe { reclaim::free_subtree(&self.root, ROOT_LEVEL) };
    }
}
