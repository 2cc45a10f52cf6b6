//! Walk announcements: how a walk over many slots holds them without a
//! reference count per slot.
//!
//! A walk ([`GuestReader::walk`](super::GuestReader::walk)) visits slots in
//! address order. Taking and dropping each slot's count ([`SlotCell`]) costs
//! two locked instructions and a write to a cache line per slot; over tens
//! of thousands of small slots that is most of a host pass's overhead. So a
//! walk may instead *announce* the guest-physical range it is about to visit,
//! as a hazard pointer announces the object it is about to use (Michael,
//! "Hazard Pointers", 2004), with the range playing the pointer's part:
//!
//! - **Walker.** Claims an announcement entry for the walk, then for every
//!   batch of slots: stores the batch's range in its entry, issues a full
//!   fence, and loads the *gate*. If the gate is open and no map was
//!   published since its snapshot, it visits the batch's slots with no
//!   per-slot atomic at all; otherwise it withdraws the announcement and
//!   admits the batch slot by slot through the cells' counts, as before.
//!   Its next announcement (a release store) or its withdrawal ends the
//!   previous one.
//! - **Writer** (under the slot-map writer lock, before any teardown, in
//!   [`GuardedMap::exclude`](super::GuardedMap::exclude)): closes the gate,
//!   issues a full fence, then waits (bounded) until no announced range
//!   overlaps a slot it deletes. The gate stays closed until the new map is
//!   published (or the op is abandoned), so no walker trusts a snapshot that
//!   still names a slot being torn down. A writer that fails in between (a
//!   panic, cells committed but not published) poisons the gate for good:
//!   the cells keep refusing the slots it left excluded or detached, and
//!   only counted walks would see that.
//!
//! # Why no walker visits memory under a teardown
//! The two fences order the walker's announcement against the writer's
//! gate store (the store-buffering pattern): either the walker's fence comes
//! first in the single total order of `SeqCst` fences, and then the writer's
//! load after its own fence sees the announcement and waits for it to end;
//! or the writer's fence comes first, and then the walker's load sees the
//! gate closed and falls back to the counts, which the writer drains. A
//! walker that loads the gate open after a writer finished synchronizes
//! with the writer's opening store (release, after its publish), so its
//! check that the snapshot is still the published one sees the new map. The
//! writer's load of an entry that no longer overlaps (acquire) synchronizes
//! with the walker's store that ended the overlap (release), so everything
//! the walker did in the announced range happens before the teardown. A
//! walk claims its entry with an acquire, so a walk reusing an entry is
//! ordered after the walk that gave it back, and a writer that
//! synchronizes with the new announcement does with the old walk's end.
//!
//! Loom checks this protocol (`test_loom_announced_walk_*` below), with
//! broken variants (no fence on either side) caught; shuttle runs the real
//! walk against a writer that unplugs and replugs a slot
//! (`guard::shuttle_tests`).
//!
//! # Encoding
//! An entry is one word, so a writer never reads a torn range: the first
//! page (40 bits, guest-physical addresses below 2^52) and the number of
//! pages (24 bits). A range that does not fit is announced larger (from
//! page 0, or to the top of the address space), which only makes writers
//! wait more: an announcement may cover more than the walk visits, never
//! less. `0` is "nothing announced".
//!
//! [`SlotCell`]: crate::mm::slot_lock::SlotCell

use std::fmt;
use std::time::{Duration, Instant};

use crate::mm::addr::{GpaRange, PAGE_SHIFT};
use crate::mm::sync::{fence, AtomicU32, AtomicU64, Ordering};

/// Announcement entries: walks in flight at once that can announce; a walk
/// that finds every entry taken admits its slots through the counts.
#[cfg(not(all(test, vmm_loom)))]
const ENTRIES: usize = 64;
/// Announcement entries (two under loom: the models stay small).
#[cfg(all(test, vmm_loom))]
const ENTRIES: usize = 2;
/// The gate's states: walks may announce; a writer's op is between closing
/// and opening it; a writer failed in between (sticky, see
/// [`Announcements::poison_gate`]).
const OPEN: u32 = 0;
const CLOSED: u32 = 1;
const POISONED: u32 = 2;
/// Bits of the page count in an entry.
const PAGES_BITS: u32 = 24;
/// The page count that means "to the top of the address space".
const TO_THE_TOP: u64 = (1 << PAGES_BITS) - 1;
/// First pages an entry can name (40 bits: addresses below 2^52).
const FIRST_PAGE_LIMIT: u64 = 1 << (64 - PAGES_BITS);

/// One entry, on its own cache line pair: a walker stores to it once per
/// batch, writers only read it.
#[repr(align(128))]
struct Entry {
    range: AtomicU64,
}

/// The gate and the announcement entries of one [`GuardedMap`](super::GuardedMap).
pub(super) struct Announcements {
    /// `OPEN`; `CLOSED` while a writer's exclusion phase runs (from
    /// [`close_gate`](Self::close_gate) until the new map is published or
    /// the op abandoned); `POISONED` for good after a writer failed in
    /// between ([`poison_gate`](Self::poison_gate)).
    gate: AtomicU32,
    /// Bit `i` set: entry `i` belongs to a walk in flight.
    claimed: AtomicU64,
    entries: [Entry; ENTRIES],
    /// Which broken variant a model runs (never changed while in use).
    #[cfg(all(test, any(vmm_loom, vmm_shuttle)))]
    broken: std::sync::atomic::AtomicU8,
}

impl fmt::Debug for Announcements {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Announcements")
            .field("gate", &self.gate.load(Ordering::Relaxed))
            .field(
                "claimed",
                &format_args!("{:#x}", self.claimed.load(Ordering::Relaxed)),
            )
            .finish()
    }
}

/// A walk's claim on one entry; withdrawn and given back on drop.
pub(super) struct Claim<'a> {
    table: &'a Announcements,
    index: usize,
}

/// A range as one entry word (see the module docs): never `0` for a
/// non-empty range, and never narrower than the range.
pub(super) fn encode(range: GpaRange) -> u64 {
    let first = range.start().0 >> PAGE_SHIFT;
    let last = (range.end().0 - 1) >> PAGE_SHIFT;
    if first >= FIRST_PAGE_LIMIT {
        // Beyond what an entry names: everything from page 0 up.
        return TO_THE_TOP;
    }
    let pages = (last - first + 1).min(TO_THE_TOP);
    first << PAGES_BITS | pages
}

/// Whether the announced `word` overlaps `range`.
pub(super) fn overlaps(word: u64, range: GpaRange) -> bool {
    let pages = word & TO_THE_TOP;
    if pages == 0 {
        return false;
    }
    let first = word >> PAGES_BITS;
    let want_first = range.start().0 >> PAGE_SHIFT;
    let want_last = (range.end().0 - 1) >> PAGE_SHIFT;
    if pages == TO_THE_TOP {
        return want_last >= first;
    }
    want_last >= first && want_first < first + pages
}

impl Announcements {
    pub(super) fn new() -> Self {
        Self {
            gate: AtomicU32::new(0),
            claimed: AtomicU64::new(0),
            entries: std::array::from_fn(|_| Entry {
                range: AtomicU64::new(0),
            }),
            #[cfg(all(test, any(vmm_loom, vmm_shuttle)))]
            broken: std::sync::atomic::AtomicU8::new(Broken::None as u8),
        }
    }

    /// Makes this table run a broken variant (models only, before use).
    #[cfg(all(test, any(vmm_loom, vmm_shuttle)))]
    pub(crate) fn set_broken(&self, broken: Broken) {
        self.broken
            .store(broken as u8, std::sync::atomic::Ordering::Relaxed);
    }

    #[cfg(all(test, any(vmm_loom, vmm_shuttle)))]
    fn broken(&self) -> Broken {
        match self.broken.load(std::sync::atomic::Ordering::Relaxed) {
            1 => Broken::WalkerSkipsFence,
            2 => Broken::WriterSkipsFence,
            3 => Broken::WriterSkipsWait,
            4 => Broken::ClaimRelaxed,
            _ => Broken::None,
        }
    }

    /// Claims a free entry for a walk, or `None` when all are taken.
    pub(super) fn claim(&self) -> Option<Claim<'_>> {
        let mut claimed = self.claimed.load(Ordering::Relaxed);
        loop {
            let free = !claimed;
            if free == 0 {
                return None;
            }
            let index = free.trailing_zeros() as usize;
            let bit = 1u64 << index;
            // Acquire: the walk that gave this entry back (release) is then
            // ordered before this one, so a writer that synchronizes with
            // this walk's announcement also synchronizes with that walk's
            // end (a fresh reviewer's loom model of two walkers found the
            // relaxed claim).
            #[cfg(not(all(test, any(vmm_loom, vmm_shuttle))))]
            let order = Ordering::Acquire;
            #[cfg(all(test, any(vmm_loom, vmm_shuttle)))]
            let order = if self.broken() == Broken::ClaimRelaxed {
                Ordering::Relaxed
            } else {
                Ordering::Acquire
            };
            let before = self.claimed.fetch_or(bit, order);
            if before & bit == 0 {
                return Some(Claim { table: self, index });
            }
            claimed = before | bit;
        }
    }

    /// Writer side, under the slot-map writer lock, before it excludes any
    /// slot: from now on walkers fall back to the counts; walks announced
    /// before are waited for with [`wait_for_walks`](Self::wait_for_walks).
    pub(super) fn close_gate(&self) {
        // Writers are serialized: a poisoned gate stays poisoned.
        if self.gate.load(Ordering::Relaxed) != POISONED {
            self.gate.store(CLOSED, Ordering::Relaxed);
        }
        #[cfg(all(test, any(vmm_loom, vmm_shuttle)))]
        if self.broken() == Broken::WriterSkipsFence {
            return;
        }
        // Orders the store above before the entry loads of
        // `wait_for_walks` (module docs: the store-buffering pattern).
        fence(Ordering::SeqCst);
    }

    /// Writer side: opens the gate again, after the new map is published
    /// (or the op abandoned with the old map still current), unless it is
    /// poisoned. Release: a walker that reads it open sees that map.
    pub(super) fn open_gate(&self) {
        if self.gate.load(Ordering::Relaxed) != POISONED {
            self.gate.store(OPEN, Ordering::Release);
        }
    }

    /// Writer side: a writer panicked, or committed cells without
    /// publishing, between closing the gate and opening it: slots may stay
    /// excluded over memory a half-done teardown changed, so walks count
    /// every slot from now on (its cell refuses them), whatever later ops do.
    pub(super) fn poison_gate(&self) {
        self.gate.store(POISONED, Ordering::Relaxed);
    }

    /// Writer side, after [`close_gate`](Self::close_gate): waits until no
    /// walk announces a range overlapping one of `deleted`, at most `bound`.
    /// On timeout, returns how many walks still announce one and the index
    /// in `deleted` of a range one of them holds.
    pub(super) fn wait_for_walks(
        &self,
        deleted: &[GpaRange],
        bound: Duration,
    ) -> Result<(), (u32, usize)> {
        #[cfg(all(test, any(vmm_loom, vmm_shuttle)))]
        if self.broken() == Broken::WriterSkipsWait {
            return Ok(());
        }
        let mut started: Option<Instant> = None;
        let mut spins = 0u32;
        loop {
            // Acquire: a claim seen given back was given back after its
            // walk withdrew (release), so that walk's accesses happen
            // before the teardown too (loom found the relaxed load).
            let claimed = self.claimed.load(Ordering::Acquire);
            let mut holding = 0;
            let mut held = 0;
            let mut bits = claimed;
            while bits != 0 {
                let index = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                // Acquire: a word that no longer overlaps was stored by the
                // walker after it was done with the range.
                let word = self.entries[index].range.load(Ordering::Acquire);
                if let Some(i) = deleted.iter().position(|&r| overlaps(word, r)) {
                    holding += 1;
                    held = i;
                }
            }
            if holding == 0 {
                return Ok(());
            }
            // A walk holds a batch of slots for as long as its visitor
            // takes on them: spin a little, then yield, then sleep.
            let since = *started.get_or_insert_with(Instant::now);
            if since.elapsed() >= bound {
                return Err((holding, held));
            }
            spins += 1;
            if cfg!(all(test, any(vmm_loom, vmm_shuttle))) {
                // The model checkers schedule at their yields.
                crate::mm::sync::thread::yield_now();
            } else if spins < 64 {
                std::hint::spin_loop();
            } else if spins < 256 {
                crate::mm::sync::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
    }
}

impl Claim<'_> {
    /// Announces `range` (ending the previous announcement) and returns
    /// whether the walker may visit it on its snapshot without counts: the
    /// gate is open. The caller must still check that its snapshot is the
    /// published map, *after* this returns `true`.
    #[inline]
    pub(super) fn announce(&self, range: GpaRange) -> bool {
        let entry = &self.table.entries[self.index].range;
        // Release: what the walker did under its previous announcement
        // happens before a writer's teardown that saw this one.
        entry.store(encode(range), Ordering::Release);
        #[cfg(all(test, any(vmm_loom, vmm_shuttle)))]
        if self.table.broken() == Broken::WalkerSkipsFence {
            return self.table.gate.load(Ordering::Acquire) == OPEN;
        }
        // Orders the store above before the gate load (module docs).
        fence(Ordering::SeqCst);
        self.table.gate.load(Ordering::Acquire) == OPEN
    }

    /// Ends the announcement (release: the walker's accesses under it
    /// happen before a teardown that sees it ended).
    #[inline]
    pub(super) fn withdraw(&self) {
        self.table.entries[self.index]
            .range
            .store(0, Ordering::Release);
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.withdraw();
        self.table
            .claimed
            .fetch_and(!(1u64 << self.index), Ordering::Release);
    }
}

/// The broken variants the models must catch, per table.
#[cfg(all(test, any(vmm_loom, vmm_shuttle)))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Broken {
    /// The real protocol.
    None = 0,
    /// The walker loads the gate without the fence after its announcement.
    WalkerSkipsFence = 1,
    /// The writer loads the entries without the fence after closing the gate.
    WriterSkipsFence = 2,
    /// The writer does not wait for announced walks.
    WriterSkipsWait = 3,
    /// A walk claims its entry without acquiring the previous owner's end.
    ClaimRelaxed = 4,
}

#[cfg(all(test, not(vmm_loom), not(vmm_shuttle)))]
mod tests {
    use super::*;
    use crate::mm::addr::Gpa;

    fn r(start: u64, len: u64) -> GpaRange {
        GpaRange::new(Gpa(start), len).unwrap()
    }

    #[test]
    fn test_an_announced_range_overlaps_exactly_the_pages_it_names() {
        let w = encode(r(0x10_0000, 0x3000));
        assert!(overlaps(w, r(0x10_0000, 1)));
        assert!(overlaps(w, r(0x10_2fff, 1)));
        assert!(overlaps(w, r(0xf_f000, 0x2000)));
        assert!(!overlaps(w, r(0x10_3000, 0x1000)));
        assert!(!overlaps(w, r(0xf_f000, 0x1000)));
        assert!(!overlaps(0, r(0, u64::MAX)));
    }

    #[test]
    fn test_a_range_too_large_for_an_entry_is_announced_larger_never_smaller() {
        // More pages than 24 bits count: to the top.
        let big = encode(r(0x1000, 1 << 50));
        assert!(overlaps(big, r(0x1000, 1)));
        assert!(overlaps(big, r(u64::MAX - 0x1fff, 0x1000)));
        assert!(!overlaps(big, r(0, 0x1000)));
        // A first page beyond 40 bits: everything.
        let high = encode(r(1 << 60, 0x1000));
        assert!(overlaps(high, r(0, 0x1000)));
        assert!(overlaps(high, r(1 << 60, 0x1000)));
        assert_ne!(encode(r(0, 0x1000)), 0);
    }

    #[test]
    fn test_claims_are_exclusive_and_come_back_on_drop() {
        let t = Announcements::new();
        let claims: Vec<_> = (0..ENTRIES).map(|_| t.claim().unwrap()).collect();
        assert!(t.claim().is_none());
        let mut seen: Vec<usize> = claims.iter().map(|c| c.index).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), ENTRIES);
        drop(claims);
        assert_eq!(t.claimed.load(Ordering::Relaxed), 0);
        assert!(t.claim().is_some());
    }

    #[test]
    fn test_a_writer_waits_for_an_overlapping_walk_and_names_it_on_timeout() {
        let t = Announcements::new();
        let c = t.claim().unwrap();
        assert!(c.announce(r(0x10_0000, 0x4000)));
        t.close_gate();
        // Not overlapping: no wait.
        assert_eq!(
            t.wait_for_walks(&[r(0x20_0000, 0x1000)], Duration::ZERO),
            Ok(())
        );
        assert_eq!(
            t.wait_for_walks(&[r(0x10_1000, 0x1000)], Duration::from_millis(5)),
            Err((1, 0))
        );
        // A walker announcing while the gate is closed is told to count.
        assert!(!c.announce(r(0x10_1000, 0x1000)));
        c.withdraw();
        assert_eq!(
            t.wait_for_walks(&[r(0x10_1000, 0x1000)], Duration::ZERO),
            Ok(())
        );
        t.open_gate();
        assert!(c.announce(r(0x10_1000, 0x1000)));
    }
}

#[cfg(all(test, vmm_loom))]
#[path = "announce_loom_tests.rs"]
mod loom_tests;
