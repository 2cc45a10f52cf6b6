//! Table pages: allocation, and reclamation after an epoch grace period.
//!
//! A table page is a 4 KiB-aligned heap block of 512 atomic entries. It is
//! owned by the table entry that links it: it is reachable only through that
//! entry's frame field, never through a Rust reference held across calls.
//!
//! # Reclamation
//! Walkers take no lock, so a writer that unlinks a page cannot know whether a
//! walker is still reading it. Walkers pin a `crossbeam_epoch` guard for the
//! whole walk; a writer first unlinks the page (the freeze of its parent entry
//! is the unlinking store), then hands it to [`retire`], which defers the free
//! with `Guard::defer`. The deferred free runs only once every thread that was
//! pinned at that moment has unpinned: a walker pinned after the unlink cannot
//! reach the page (it is no longer linked), and a walker pinned before it holds
//! the epoch back. This is KVM's scheme (tables unlinked under RCU, freed by
//! `call_rcu`) with crossbeam's global collector standing in for RCU.
//!
//! Why crossbeam-epoch rather than an epoch scheme of our own: it is the
//! standard, widely checked implementation of exactly this contract, pinning
//! is a thread-local counter bump (cheap enough for every walk), and its
//! global collector needs no per-thread registration by device threads.
//! Reclamation is lazy: crossbeam runs deferred frees as threads pin and
//! flush, so [`ReclaimStats::freed`] lags `retired` until some thread does.
//!
//! # Poisoning
//! In test and debug builds a reclaimed page is overwritten with
//! [`POISON`](super::entry::POISON) before it goes. Walkers decode every entry
//! they read and panic on poison, so reading a page after its grace period is
//! caught. Test builds also keep the last `QUARANTINE_PAGES` freed pages
//! allocated (a quarantine), so that such a late read is a well-defined read of
//! poison rather than a use-after-free the test could miss.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64 as StdAtomicU64, Ordering as StdOrdering};
use std::sync::Arc;

use crossbeam_epoch::Guard;

use super::entry::{ENTRIES, FRAME_LIMIT};
use super::Stage2Error;
use crate::mm::sync::{AtomicU64, Ordering};

/// One table page: 512 entries, 4 KiB aligned so its address fits a frame field.
#[repr(C, align(4096))]
pub(crate) struct TablePage {
    entries: [AtomicU64; ENTRIES],
}

impl TablePage {
    /// A zeroed (all-empty) page on the heap.
    pub(crate) fn new_boxed() -> Box<TablePage> {
        Box::new(TablePage {
            entries: std::array::from_fn(|_| AtomicU64::new(0)),
        })
    }

    /// The slot at `index` (< 512).
    #[inline]
    pub(crate) fn slot(&self, index: usize) -> &AtomicU64 {
        &self.entries[index]
    }

    /// All 512 slots.
    pub(crate) fn slots(&self) -> &[AtomicU64; ENTRIES] {
        &self.entries
    }

    /// Whether every entry is empty.
    pub(crate) fn is_empty(&self) -> bool {
        self.used(0, ENTRIES - 1).next().is_none()
    }

    /// Which cache lines of the 64 entries in `block` (entries `64 * block
    /// ..`) hold a non-empty entry, as a mask of their entries: bits
    /// `8 * l .. 8 * l + 8` set when line `l` does. Each line's eight
    /// entries are OR-ed together, so an empty block costs one test and a
    /// sparse one a test per line, not one per entry (a test is a branch,
    /// and in a fuzzing build a compare callback: testing every entry of a
    /// page was most of a teardown's time there), and a dense one little
    /// more than the loads.
    fn occupied(&self, block: usize) -> u64 {
        let entries = &self.entries[block * 64..][..64];
        let mut ors = [0u64; 8];
        for (or, line) in ors.iter_mut().zip(entries.chunks_exact(8)) {
            *or = line
                .iter()
                .fold(0, |acc, e| acc | e.load(Ordering::Acquire));
        }
        if ors.iter().fold(0, |acc, v| acc | v) == 0 {
            return 0;
        }
        let mut mask = 0;
        for (l, &or) in ors.iter().enumerate() {
            if or != 0 {
                mask |= 0xff << (l * 8);
            }
        }
        mask
    }

    /// The indices in `from..=to` (below 512, `from <= to`) of every entry
    /// of every cache line that holds a non-empty entry, ascending: all the
    /// non-empty entries, and the empty ones sharing their lines (callers
    /// read and decode each slot, so an empty one is passed over there).
    ///
    /// For a holder of the writer lock exclusively (or of an unlinked page
    /// under it): then no install runs, so an entry read empty stays empty
    /// and a line left out has nothing to act on; walkers only change the
    /// Accessed/Dirty bits of leaves.
    pub(crate) fn used(&self, from: usize, to: usize) -> Used<'_> {
        let mut used = Used {
            page: self,
            block: from / 64,
            last: to / 64,
            mask: self.occupied(from / 64) & (!0 << (from % 64)),
            to,
        };
        used.clip();
        used
    }
}

/// The iterator of [`TablePage::used`].
pub(crate) struct Used<'a> {
    page: &'a TablePage,
    /// The block of 64 entries `mask` describes.
    block: usize,
    last: usize,
    /// Its entries not yet returned.
    mask: u64,
    to: usize,
}

impl Used<'_> {
    /// Drops from `mask` the entries past `to`, in the last block.
    fn clip(&mut self) {
        if self.block == self.last && self.to % 64 != 63 {
            self.mask &= (1 << (self.to % 64 + 1)) - 1;
        }
    }
}

impl Iterator for Used<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        while self.mask == 0 {
            if self.block >= self.last {
                return None;
            }
            self.block += 1;
            self.mask = self.page.occupied(self.block);
            self.clip();
        }
        let i = self.block * 64 + self.mask.trailing_zeros() as usize;
        self.mask &= self.mask - 1;
        Some(i)
    }
}

/// Counters of table pages, shared with deferred frees (which may run on any
/// thread after the table is gone, hence an `Arc` and std atomics: these are
/// statistics, not part of the model-checked protocol).
#[derive(Debug, Default)]
pub(crate) struct PageCounters {
    /// Pages linked into the table, the root included.
    linked: StdAtomicU64,
    /// Pages ever unlinked and handed to the epoch collector.
    retired: StdAtomicU64,
    /// Retired pages whose grace period ended and that were reclaimed.
    freed: StdAtomicU64,
}

/// A snapshot of a table's page accounting.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct ReclaimStats {
    /// Table pages currently linked into the table, the root included.
    pub linked: u64,
    /// Table pages unlinked so far and handed to epoch reclamation.
    pub retired: u64,
    /// Retired pages reclaimed so far (their grace period ended).
    pub freed: u64,
}

impl PageCounters {
    pub(crate) fn snapshot(&self) -> ReclaimStats {
        ReclaimStats {
            linked: self.linked.load(StdOrdering::Relaxed),
            retired: self.retired.load(StdOrdering::Relaxed),
            // Acquire pairs with the Release in `reclaim`: whoever sees the
            // count also sees the poison written before it.
            freed: self.freed.load(StdOrdering::Acquire),
        }
    }

    pub(crate) fn note_linked(&self) {
        self.linked.fetch_add(1, StdOrdering::Relaxed);
    }
}

/// Allocates a zeroed table page that is not yet linked; the caller either
/// publishes it (then calls [`PageCounters::note_linked`]) or gives it back
/// with [`free_unpublished`].
pub(crate) fn alloc_page() -> Result<NonNull<TablePage>, Stage2Error> {
    let page = NonNull::from(Box::leak(TablePage::new_boxed()));
    let addr = page.as_ptr() as u64;
    if addr.saturating_add(4096) > FRAME_LIMIT {
        // SAFETY: `page` came from `Box::leak` just above and was never shared.
        drop(unsafe { Box::from_raw(page.as_ptr()) });
        return Err(Stage2Error::TablePageUnaddressable { addr });
    }
    Ok(page)
}

/// Frees a page no other thread has seen (it lost its publish race).
///
/// # Safety
/// `page` came from [`alloc_page`] and was never stored in a table entry.
pub(crate) unsafe fn free_unpublished(page: NonNull<TablePage>) {
    // SAFETY: by the caller's contract the page is a leaked Box nobody else
    // can reach.
    drop(unsafe { Box::from_raw(page.as_ptr()) });
}

/// The page a table entry's frame field points at.
///
/// # Safety
/// `addr` was read from a table entry (with [`super::slot::read`]) while
/// `guard` was pinned, and the entry held a table pointer. Pages are retired
/// only after being unlinked, so the page outlives `guard`.
#[inline]
pub(crate) unsafe fn page_at(addr: u64, _guard: &Guard) -> &TablePage {
    // SAFETY: see the function contract: a linked page, kept alive by the pin.
    unsafe { &*(addr as *const TablePage) }
}

/// An unlinked page travelling to its deferred free.
struct RetiredPage(NonNull<TablePage>);

// SAFETY: a retired page is unlinked and owned by exactly one deferred free;
// its contents are atomics, which may be touched from any thread.
unsafe impl Send for RetiredPage {}

/// Hands the unlinked page at `addr` to epoch reclamation.
///
/// # Safety
/// `addr` is a table page that was linked into this table and has been
/// unlinked (its parent entry no longer points at it, nor does any other
/// entry) by the caller, who retires it exactly once.
pub(crate) unsafe fn retire(addr: u64, guard: &Guard, counters: &Arc<PageCounters>) {
    counters.linked.fetch_sub(1, StdOrdering::Relaxed);
    counters.retired.fetch_add(1, StdOrdering::Relaxed);
    // SAFETY: a table pointer's frame is the address of a live page, never 0.
    let page = RetiredPage(unsafe { NonNull::new_unchecked(addr as *mut TablePage) });
    let counters = Arc::clone(counters);
    guard.defer(move || reclaim(page, &counters));
}

/// Frees a page whose grace period ended, poisoning it first in test and
/// debug builds.
fn reclaim(page: RetiredPage, counters: &PageCounters) {
    // SAFETY: the grace period ended, so no walker holds the page; it was
    // allocated by `alloc_page` as a leaked Box, and `retire` ran once.
    let page = unsafe { Box::from_raw(page.0.as_ptr()) };
    #[cfg(any(test, debug_assertions))]
    for e in page.slots() {
        e.store(super::entry::POISON, Ordering::Relaxed);
    }
    counters.freed.fetch_add(1, StdOrdering::Release);
    quarantine(page);
}

/// How many freed pages test builds keep allocated (64 MiB).
#[cfg(test)]
pub(crate) const QUARANTINE_PAGES: usize = 16384;

#[cfg(test)]
static QUARANTINE: std::sync::Mutex<std::collections::VecDeque<Box<TablePage>>> =
    std::sync::Mutex::new(std::collections::VecDeque::new());

#[cfg(test)]
fn quarantine(page: Box<TablePage>) {
    let mut q = QUARANTINE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    q.push_back(page);
    while q.len() > QUARANTINE_PAGES {
        q.pop_front();
    }
}

/// Runs `f` on the freed page at `addr` if it is still in the quarantine
/// (which cannot evict it meanwhile); `None` if it is not there.
#[cfg(all(test, not(vmm_loom), not(vmm_shuttle)))]
pub(crate) fn with_quarantined<R>(addr: u64, f: impl FnOnce(&TablePage) -> R) -> Option<R> {
    let q = QUARANTINE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    q.iter()
        .find(|p| std::ptr::eq(&***p, addr as *const TablePage))
        .map(|p| f(p))
}

#[cfg(not(test))]
fn quarantine(page: Box<TablePage>) {
    drop(page);
}

/// Frees a whole subtree at teardown of the table (no walker can exist).
///
/// # Safety
/// `page` and every table it links are owned by the caller and unreachable
/// from any other thread.
pub(crate) unsafe fn free_subtree(page: &TablePage, level: u8) {
    if level <= 1 {
        return;
    }
    for e in page.slots() {
        let raw = e.load(Ordering::Relaxed);
        if let super::entry::Decoded::Table(addr) = super::entry::Entry(raw).decode(level) {
            // SAFETY: a linked child of a page the caller owns exclusively.
            let child = unsafe { &*(addr as *const TablePage) };
            // SAFETY: same ownership, one level down.
            unsafe { free_subtree(child, level - 1) };
            // SAFETY: a leaked Box from `alloc_page`, now unreachable.
            drop(unsafe { Box::from_raw(addr as *mut TablePage) });
        }
    }
}
