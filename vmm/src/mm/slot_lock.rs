//! Per-slot reference-count lock: lockless readers, draining writers.
//!
//! Guest memory slots are read by vCPU exit handlers and device threads that
//! never take the slot-map lock: they find a slot in a published snapshot and
//! then pin it with a per-slot reference. A writer that removes, shrinks,
//! moves or re-protects a slot first *excludes* new readers, then waits for the
//! existing ones to drain, and only then unmaps or discards the host memory
//! behind the slot. This is the Linux `vm_refcnt` design (`mm/mmap_lock.c`:
//! `vma_start_read`, `__vma_enter_locked`, `vma_mark_detached`), with the
//! exclude flag at bit 30 like `VMA_LOCK_OFFSET`.
//!
//! # The count word
//! One `AtomicU32` per [`SlotCell`]:
//!
//! | value                 | meaning                                                  |
//! |-----------------------|----------------------------------------------------------|
//! | `0`                   | detached: no reader can ever get in (never resurrected)  |
//! | `1`                   | attached, only the map's own reference                   |
//! | `1 + n`               | attached, `n` readers inside                             |
//! | `EXCLUDE \| 1 + n`    | a writer excludes; `n` readers still draining            |
//! | `EXCLUDE \| 1`        | a writer excludes and no reader is inside                |
//!
//! # Invariants
//! 1. A reader gets in only by a compare-exchange from a value that is neither
//!    `0` nor has `EXCLUDE` set (`inc_not_zero` with the kernel's "limited"
//!    twist: the exclude test is part of the same CAS). So in the modification
//!    order of the word, every successful reader increment precedes the
//!    writer's exclude or follows the exclusion's release; none falls inside.
//!    A refused reader never touches the word, so while `EXCLUDE` is set the
//!    count only goes down and the writer's wait condition is monotone. (The
//!    older "increment, then drop the reference if `EXCLUDE` is set" form is
//!    also sound, but lets refused readers bump the count transiently, so
//!    they too would have to wake the writer; the kernel moved to the folded
//!    form, `__refcount_inc_not_zero_limited_acquire`, and so do we.)
//! 2. Only an excluded slot with no reader (`EXCLUDE | 1`) can be detached, by
//!    a compare-exchange to `0`: detach happens only at zero readers.
//! 3. The identity (generation, range) of a cell changes only while no reader
//!    is inside and none can get in: detached (`attach`) or excluded and
//!    drained ([`SlotExclusion::reshape`]).
//!
//! # Memory ordering
//! - **attach publishes identity before the count becomes non-zero.** The
//!   writer stores generation and range (relaxed), then stores `1` with
//!   `Release`. A reader's successful CAS is `Acquire`; the value it read is the
//!   `1` or a later read-modify-write in that store's release sequence, so it
//!   synchronizes with the attach, and the identity loads it makes *after* the
//!   increment see this attach's identity (or a later one, which invariant 3
//!   rules out while it holds the reference). Loading identity *before* the
//!   increment would be unsound: the cell could be recycled in between; that is
//!   why the reader re-validates after the increment (loom model 4 checks it,
//!   with a broken attach that publishes the count first).
//! - **reader accesses happen before the writer's teardown.** A reader drops
//!   its reference with a `Release` `fetch_sub`; the writer observes the
//!   drained value with an `Acquire` load (or the `AcqRel` detach CAS). All
//!   readers' decrements are in one release sequence, so the writer
//!   synchronizes with every reader that was inside, and whatever it unmaps
//!   afterwards cannot be under a reader.
//! - **writer changes are visible to later readers.** Releasing exclusion is a
//!   `Release` `fetch_and`; a reader admitted afterwards acquires it.
//!
//! # Waiting, and why no wake-up is lost
//! The writer parks on a per-cell `Mutex<()>` + `Condvar`. It re-reads the word
//! *while holding the mutex* and only then waits (which atomically unlocks).
//! The reader whose `fetch_sub` takes the word to `EXCLUDE | 1` then locks the
//! same mutex and notifies. Either the writer's load (under the mutex) already
//! sees that decrement, and it does not wait; or it does not see it, and then
//! the writer held the mutex from that load until it was parked, so the
//! reader's lock (which follows its decrement) can only succeed once the writer
//! is parked, and the notify reaches it. The reader cannot have locked,
//! notified and unlocked *before* the writer locked: the unlock would then
//! happen before the writer's load, which would have to see the decrement.
//! Exactly one decrement produces `EXCLUDE | 1` per exclusion (RMWs on one
//! word are totally ordered); if no reader was inside at exclude time, the
//! writer sees `EXCLUDE | 1` at once and never parks. Loom model 2 checks this
//! and catches a release that notifies without taking the mutex.
//!
//! # Bounded waits
//! [`SlotExclusion::wait_drained`] takes a bound. Past it, it returns
//! [`SlotLockError::DrainTimeout`] naming the slot and how many readers still
//! hold it, and the slot stays **excluded but attached**: the caller may call
//! `wait_drained` again, or drop the [`SlotExclusion`] (or call
//! [`SlotExclusion::release`]) to let readers in again. It never hangs silently.
//! A [`SlotExclusion`] dropped while its thread panics is *not* released: the
//! slot stays excluded (poisoned) rather than admit readers into memory a
//! half-done teardown may have unmapped.
//!
//! # Writers and lock order
//! Writers are serialized externally by the slot-map writer lock: `attach`,
//! `exclude` and everything done through a [`SlotExclusion`] must run under it.
//! The compare-exchanges turn most misuse into errors (`AlreadyExcluded`,
//! `AlreadyAttached`), but two concurrent `attach` calls on one detached cell
//! would race on the identity. Lock order: slot-map writer lock, then the
//! cell's wait mutex, which is a leaf (readers take it only in release, holding
//! nothing else). A reader holding a [`SlotReadGuard`] must never block on the
//! slot-map writer lock: a writer draining that slot would wait for it until
//! its bound expires.
//!
//! # Cell lifetime
//! Cells are reused, like KVM slot ids (a table of cells indexed by slot id,
//! the analogue of the kernel's `SLAB_TYPESAFE_BY_RCU` VMA cache): a reader may
//! hold a stale `(cell, generation)` from an old snapshot. The cell's memory
//! itself must outlive every reader, which the borrow in [`SlotReadGuard`]
//! enforces; the generation check catches the reuse.
//!
//! # Example
//! ```
//! use std::time::Duration;
//! use vmm::mm::addr::{Gpa, GpaRange};
//! use vmm::mm::slot_lock::{SlotCell, SlotLockError};
//!
//! let cell = SlotCell::new(3);
//! let range = GpaRange::new(Gpa(0x10_0000), 0x20_0000).unwrap();
//! let id = cell.attach(range).unwrap(); // under the slot-map writer lock
//!
//! // A reader: generation from its snapshot, the GPA it wants.
//! {
//!     let guard = cell.read(id.generation, Gpa(0x10_8000)).unwrap();
//!     assert_eq!(guard.range(), range);
//! } // released here
//!
//! // A writer removing the slot.
//! let mut ex = cell.exclude().unwrap();
//! assert_eq!(
//!     cell.read(id.generation, Gpa(0x10_8000)).unwrap_err(),
//!     SlotLockError::Excluded { slot: 3 }
//! );
//! ex.wait_drained(Duration::from_secs(1)).unwrap();
//! ex.detach().unwrap(); // now the host memory can go
//! assert!(!cell.is_attached());
//! ```

use std::fmt;
use std::sync::PoisonError;
use std::time::{Duration, Instant};

use crate::mm::addr::{Gpa, GpaRange};
use crate::mm::sync::{AtomicU32, AtomicU64, Condvar, Mutex, MutexGuard, Ordering};

/// Set in the count word while a writer excludes new readers (bit 30, as the
/// kernel's `VMA_LOCK_OFFSET`).
pub const EXCLUDE: u32 = 1 << 30;
/// The map's own reference, held from attach to detach.
const MAP_REF: u32 = 1;
/// The reference-count bits below [`EXCLUDE`].
const COUNT_MASK: u32 = EXCLUDE - 1;

/// Errors of the slot lock. Reader-side refusals (`Detached`, `Excluded`,
/// `Stale`, `NotCovered`, `TooManyReaders`) are normal outcomes: the reader
/// retries with a fresh snapshot or takes the slow path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotLockError {
    /// The cell holds no slot (never attached, or detached).
    #[error("slot {slot} is detached")]
    Detached {
        /// The slot id.
        slot: u32,
    },
    /// A writer excludes new readers from the slot.
    #[error("slot {slot} is excluded by a writer")]
    Excluded {
        /// The slot id.
        slot: u32,
    },
    /// The cell was recycled since the reader's snapshot.
    #[error("slot {slot} was recycled: expected generation {expected}, found {found}")]
    Stale {
        /// The slot id.
        slot: u32,
        /// The generation the reader's snapshot had.
        expected: u64,
        /// The cell's current generation.
        found: u64,
    },
    /// The slot does not contain the reader's address.
    #[error("slot {slot} {range} does not cover gpa {gpa}")]
    NotCovered {
        /// The slot id.
        slot: u32,
        /// The address the reader asked for.
        gpa: Gpa,
        /// The slot's range.
        range: GpaRange,
    },
    /// The reference count would overflow into the exclude bit.
    #[error("slot {slot} has too many readers ({readers})")]
    TooManyReaders {
        /// The slot id.
        slot: u32,
        /// Readers inside.
        readers: u32,
    },
    /// `attach` on a cell that is not detached.
    #[error("slot {slot} is already attached (count word {word:#x})")]
    AlreadyAttached {
        /// The slot id.
        slot: u32,
        /// The raw count word found.
        word: u32,
    },
    /// `exclude` while another exclusion is held (writers not serialized).
    #[error("slot {slot} is already excluded by another writer")]
    AlreadyExcluded {
        /// The slot id.
        slot: u32,
    },
    /// Readers still held the slot when the writer's bound expired. The slot
    /// stays excluded and attached.
    #[error(
        "slot {slot}: {readers} reader(s) still hold it after {waited:?} (bound {bound:?}); \
         it stays excluded"
    )]
    DrainTimeout {
        /// The slot id.
        slot: u32,
        /// Readers still inside.
        readers: u32,
        /// How long the writer waited.
        waited: Duration,
        /// The bound it was given.
        bound: Duration,
    },
    /// A detach or reshape was attempted while readers are inside.
    #[error("slot {slot}: {readers} reader(s) still hold it; wait for them to drain first")]
    NotDrained {
        /// The slot id.
        slot: u32,
        /// Readers inside.
        readers: u32,
    },
}

/// What a slot is: the generation of its current attachment and its GPA range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotIdentity {
    /// Bumped by every [`SlotCell::attach`] and [`SlotExclusion::reshape`]; a
    /// snapshot stores it next to the cell's slot id.
    pub generation: u64,
    /// The guest-physical range the slot covers.
    pub range: GpaRange,
}

/// A reusable slot cell: the count word, the slot's identity, and the place a
/// draining writer parks.
pub struct SlotCell {
    id: u32,
    refcnt: AtomicU32,
    generation: AtomicU64,
    start: AtomicU64,
    len: AtomicU64,
    wait_lock: Mutex<()>,
    drained: Condvar,
}

impl fmt::Debug for SlotCell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlotCell")
            .field("id", &self.id)
            .field("word", &format_args!("{:#x}", self.word()))
            .field("generation", &self.generation.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl SlotCell {
    /// A detached cell for slot id `id`.
    pub fn new(id: u32) -> Self {
        Self {
            id,
            refcnt: AtomicU32::new(0),
            generation: AtomicU64::new(0),
            start: AtomicU64::new(0),
            len: AtomicU64::new(0),
            wait_lock: Mutex::new(()),
            drained: Condvar::new(),
        }
    }

    /// The slot id this cell stands for.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Attaches the cell to `range` with a new generation and takes the map's
    /// reference. Writer side: call under the slot-map writer lock.
    ///
    /// Fails with `AlreadyAttached` unless the cell is detached.
    pub fn attach(&self, range: GpaRange) -> Result<SlotIdentity, SlotLockError> {
        let word = self.refcnt.load(Ordering::Acquire);
        if word != 0 {
            return Err(SlotLockError::AlreadyAttached {
                slot: self.id,
                word,
            });
        }
        // No reader can be inside or get in (the word is 0 and only a
        // serialized writer makes it non-zero), so nobody reads the identity.
        let identity = self.publish_identity(range);
        // Release: the identity stores above are visible to every reader whose
        // Acquire CAS reads this 1 or a later value (module docs).
        self.refcnt.store(MAP_REF, Ordering::Release);
        Ok(identity)
    }

    /// Takes a reader reference on the slot the reader found in its snapshot
    /// (`generation`) for address `gpa`.
    ///
    /// Fails if the cell is detached or excluded, or if, after the reference
    /// was taken, the cell turns out to hold another generation (recycled) or
    /// not to cover `gpa`; the reference is dropped again then. Lock-free: one
    /// load, one CAS and three relaxed loads; the guard's drop is one
    /// `fetch_sub`.
    #[inline]
    pub fn read(&self, generation: u64, gpa: Gpa) -> Result<SlotReadGuard<'_>, SlotLockError> {
        self.get_ref()?;
        // From here we own a reference; the identity cannot change under it.
        let guard = SlotReadGuard {
            cell: self,
            identity: self.load_identity(),
        };
        validate(&guard, generation, gpa)?;
        Ok(guard)
    }

    /// Sets [`EXCLUDE`]: from now on no new reader gets in. Readers already
    /// inside keep their references; wait for them with
    /// [`SlotExclusion::wait_drained`]. Writer side: call under the slot-map
    /// writer lock. Dropping the returned guard releases the exclusion.
    pub fn exclude(&self) -> Result<SlotExclusion<'_>, SlotLockError> {
        let mut word = self.refcnt.load(Ordering::Relaxed);
        loop {
            if word == 0 {
                return Err(SlotLockError::Detached { slot: self.id });
            }
            if word & EXCLUDE != 0 {
                return Err(SlotLockError::AlreadyExcluded { slot: self.id });
            }
            match self.refcnt.compare_exchange_weak(
                word,
                word | EXCLUDE,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    return Ok(SlotExclusion {
                        cell: self,
                        detached: false,
                    })
                }
                Err(actual) => word = actual,
            }
        }
    }

    /// Whether the cell holds a slot (the count word is non-zero).
    pub fn is_attached(&self) -> bool {
        self.word() != 0
    }

    /// Whether a writer currently excludes new readers.
    pub fn is_excluded(&self) -> bool {
        self.word() & EXCLUDE != 0
    }

    /// Readers inside right now (a racy snapshot, for diagnostics).
    pub fn readers(&self) -> u32 {
        readers_in(self.word())
    }

    /// The current identity, if attached. Writer side (stable only under the
    /// slot-map writer lock); readers get theirs from [`SlotReadGuard`].
    pub fn identity(&self) -> Option<SlotIdentity> {
        self.is_attached().then(|| self.load_identity())
    }

    fn word(&self) -> u32 {
        self.refcnt.load(Ordering::Acquire)
    }

    /// `inc_not_zero` that also refuses an excluded word, in one CAS.
    #[inline]
    fn get_ref(&self) -> Result<(), SlotLockError> {
        let mut word = self.refcnt.load(Ordering::Relaxed);
        loop {
            if word == 0 {
                return Err(SlotLockError::Detached { slot: self.id });
            }
            if word & EXCLUDE != 0 {
                return Err(SlotLockError::Excluded { slot: self.id });
            }
            if word & COUNT_MASK == COUNT_MASK {
                return Err(SlotLockError::TooManyReaders {
                    slot: self.id,
                    readers: readers_in(word),
                });
            }
            // Acquire on success: pairs with attach's Release store (identity)
            // and with the Release that ended a previous exclusion.
            match self.refcnt.compare_exchange_weak(
                word,
                word + 1,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(actual) => word = actual,
            }
        }
    }

    /// Drops one reader reference and wakes a draining writer if this was the
    /// last reader.
    #[inline]
    fn put_ref(&self) {
        // Release: this reader's accesses happen before the writer's teardown.
        let old = self.refcnt.fetch_sub(1, Ordering::Release);
        debug_assert!(
            old & COUNT_MASK > MAP_REF,
            "slot {}: reader release without a reference (word {old:#x})",
            self.id
        );
        if old == EXCLUDE | (MAP_REF + 1) {
            // The word is now EXCLUDE | 1: we were the last reader and a
            // writer may be parked. Taking the mutex is what makes the wake-up
            // impossible to lose (module docs).
            let _lock = self.lock_wait();
            self.drained.notify_one();
        }
    }

    fn lock_wait(&self) -> MutexGuard<'_, ()> {
        // The mutex guards no data, so a poisoned lock is still usable.
        self.wait_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores a new identity with a bumped generation. Callers guarantee that
    /// no reader is inside or can get in (invariant 3).
    fn publish_identity(&self, range: GpaRange) -> SlotIdentity {
        // 2^64 attachments cannot happen; wrapping keeps it total anyway.
        let generation = self.generation.load(Ordering::Relaxed).wrapping_add(1);
        self.generation.store(generation, Ordering::Relaxed);
        self.start.store(range.start().0, Ordering::Relaxed);
        self.len.store(range.len(), Ordering::Relaxed);
        SlotIdentity { generation, range }
    }

    fn load_identity(&self) -> SlotIdentity {
        let generation = self.generation.load(Ordering::Relaxed);
        let start = Gpa(self.start.load(Ordering::Relaxed));
        let len = self.len.load(Ordering::Relaxed);
        // Identity stores come from a valid `GpaRange`, and a reader sees one
        // attach's complete identity (module docs), so this cannot fail.
        let range = GpaRange::new(start, len)
            .unwrap_or_else(|| unreachable!("slot {}: torn identity {start}+{len:#x}", self.id));
        SlotIdentity { generation, range }
    }
}

/// Re-validates a reader's freshly referenced cell. On failure the guard is
/// dropped, which releases the reference.
#[inline]
fn validate(guard: &SlotReadGuard<'_>, generation: u64, gpa: Gpa) -> Result<(), SlotLockError> {
    let SlotIdentity {
        generation: found,
        range,
    } = guard.identity;
    let slot = guard.cell.id;
    if found != generation {
        return Err(SlotLockError::Stale {
            slot,
            expected: generation,
            found,
        });
    }
    if !range.contains(gpa) {
        return Err(SlotLockError::NotCovered { slot, gpa, range });
    }
    Ok(())
}

fn readers_in(word: u32) -> u32 {
    (word & COUNT_MASK).saturating_sub(MAP_REF)
}

/// A reader's reference on a slot; the host memory behind the slot stays
/// mapped while it lives. Released on drop.
#[must_use = "the slot is released as soon as the guard is dropped"]
#[derive(Debug)]
pub struct SlotReadGuard<'a> {
    cell: &'a SlotCell,
    identity: SlotIdentity,
}

impl SlotReadGuard<'_> {
    /// The slot id.
    pub fn slot_id(&self) -> u32 {
        self.cell.id
    }
    /// The validated identity.
    pub fn identity(&self) -> SlotIdentity {
        self.identity
    }
    /// The validated generation.
    pub fn generation(&self) -> u64 {
        self.identity.generation
    }
    /// The slot's GPA range.
    pub fn range(&self) -> GpaRange {
        self.identity.range
    }
}

impl Drop for SlotReadGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        self.cell.put_ref();
    }
}

/// A writer's exclusion of new readers from one slot. Dropping it (or
/// [`release`](Self::release)) lets readers in again, unless it detached the
/// slot.
#[must_use = "the exclusion is released as soon as it is dropped"]
#[derive(Debug)]
pub struct SlotExclusion<'a> {
    cell: &'a SlotCell,
    detached: bool,
}

impl SlotExclusion<'_> {
    /// The slot id.
    pub fn slot_id(&self) -> u32 {
        self.cell.id
    }

    /// Parks until no reader holds the slot, at most `bound`. Returns how long
    /// it waited. Past the bound, returns [`SlotLockError::DrainTimeout`] with
    /// the readers still inside; the slot stays excluded and attached, so the
    /// caller may call this again or release the exclusion.
    pub fn wait_drained(&mut self, bound: Duration) -> Result<Duration, SlotLockError> {
        let cell = self.cell;
        if self.detached {
            return Err(SlotLockError::Detached { slot: cell.id });
        }
        let started = Instant::now();
        // Fast path: nobody inside, no lock taken.
        if cell.word() == EXCLUDE | MAP_REF {
            return Ok(Duration::ZERO);
        }
        let deadline = started.checked_add(bound);
        let mut lock = cell.lock_wait();
        loop {
            // Acquire (in `word`), and read under the mutex: see module docs.
            let word = cell.word();
            debug_assert!(word & EXCLUDE != 0, "exclusion lost: {word:#x}");
            if word == EXCLUDE | MAP_REF {
                return Ok(started.elapsed());
            }
            let now = Instant::now();
            lock = match deadline {
                Some(deadline) if now >= deadline => {
                    return Err(SlotLockError::DrainTimeout {
                        slot: cell.id,
                        readers: readers_in(word),
                        waited: now.duration_since(started),
                        bound,
                    });
                }
                Some(deadline) => {
                    cell.drained
                        .wait_timeout(lock, deadline - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
                // The bound does not fit in an Instant: wait without one.
                None => cell
                    .drained
                    .wait(lock)
                    .unwrap_or_else(PoisonError::into_inner),
            };
        }
    }

    /// Detaches the slot (count word to 0): possible only with no reader
    /// inside, otherwise `NotDrained` and the exclusion stays. After success
    /// no reader can ever get into this attachment again and the host memory
    /// may be unmapped; the cell can be attached again.
    pub fn detach(&mut self) -> Result<(), SlotLockError> {
        let cell = self.cell;
        if self.detached {
            return Err(SlotLockError::Detached { slot: cell.id });
        }
        // Acquire: synchronizes with every reader's release. Release: orders
        // the writer's prior work before a later attach's readers.
        match cell.refcnt.compare_exchange(
            EXCLUDE | MAP_REF,
            0,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => {
                self.detached = true;
                Ok(())
            }
            Err(word) => Err(SlotLockError::NotDrained {
                slot: cell.id,
                readers: readers_in(word),
            }),
        }
    }

    /// Gives the drained, still attached slot a new range and generation (a
    /// shrink or move done in place). Readers holding the old generation are
    /// refused from then on. Fails with `NotDrained` if readers are inside.
    pub fn reshape(&mut self, range: GpaRange) -> Result<SlotIdentity, SlotLockError> {
        let cell = self.cell;
        if self.detached {
            return Err(SlotLockError::Detached { slot: cell.id });
        }
        let word = cell.word();
        if word != EXCLUDE | MAP_REF {
            return Err(SlotLockError::NotDrained {
                slot: cell.id,
                readers: readers_in(word),
            });
        }
        // Drained and excluded: no reader reads the identity until the
        // exclusion's Release fetch_and publishes it.
        Ok(cell.publish_identity(range))
    }

    /// Releases the exclusion (same as dropping it).
    pub fn release(self) {}
}

impl Drop for SlotExclusion<'_> {
    fn drop(&mut self) {
        // A writer that panics mid-teardown leaves the slot excluded, like a
        // poisoned lock: readers are refused rather than let into memory that
        // a half-done teardown may have unmapped.
        if !self.detached && !std::thread::panicking() {
            // Release: the writer's changes happen before readers admitted
            // afterwards.
            self.cell.refcnt.fetch_and(!EXCLUDE, Ordering::Release);
        }
    }
}

#[cfg(all(test, not(vmm_loom)))]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::thread;

    fn range(start: u64, len: u64) -> GpaRange {
        GpaRange::new(Gpa(start), len).unwrap()
    }

    fn attached(id: u32) -> (SlotCell, SlotIdentity) {
        let cell = SlotCell::new(id);
        let identity = cell.attach(range(0x10_0000, 0x10_0000)).unwrap();
        (cell, identity)
    }

    #[test]
    fn test_read_detached_cell_refused() {
        let cell = SlotCell::new(4);
        assert_eq!(
            cell.read(0, Gpa(0)).unwrap_err(),
            SlotLockError::Detached { slot: 4 }
        );
        assert_eq!(cell.word(), 0, "a refused reader must not touch the word");
    }

    #[test]
    fn test_read_attached_cell_counts_and_releases() {
        let (cell, id) = attached(1);
        let a = cell.read(id.generation, Gpa(0x10_0000)).unwrap();
        let b = cell.read(id.generation, Gpa(0x1f_ffff)).unwrap();
        assert_eq!(cell.readers(), 2);
        assert_eq!(a.identity(), id);
        assert_eq!(b.slot_id(), 1);
        drop((a, b));
        assert_eq!(cell.word(), MAP_REF);
    }

    #[test]
    fn test_read_excluded_cell_refused_until_release() {
        let (cell, id) = attached(2);
        let ex = cell.exclude().unwrap();
        assert_eq!(
            cell.read(id.generation, Gpa(0x10_0000)).unwrap_err(),
            SlotLockError::Excluded { slot: 2 }
        );
        assert_eq!(cell.word(), EXCLUDE | MAP_REF);
        ex.release();
        assert!(!cell.is_excluded());
        assert!(cell.read(id.generation, Gpa(0x10_0000)).is_ok());
    }

    #[test]
    fn test_wait_drained_reader_on_other_thread_wakes_promptly() {
        let bound = Duration::from_secs(5);
        let cell = std::sync::Arc::new(attached(5).0);
        let generation = cell.identity().unwrap().generation;
        let (held_tx, held_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let reader = {
            let cell = cell.clone();
            thread::spawn(move || {
                let guard = cell.read(generation, Gpa(0x10_0000)).unwrap();
                held_tx.send(()).unwrap();
                go_rx.recv().unwrap();
                // Give the writer time to park on the condvar.
                thread::sleep(Duration::from_millis(30));
                let released = Instant::now();
                drop(guard);
                released
            })
        };
        held_rx.recv().unwrap();
        let mut ex = cell.exclude().unwrap();
        go_tx.send(()).unwrap();
        let waited = ex.wait_drained(bound).unwrap();
        let woke = Instant::now();
        let released = reader.join().unwrap();
        let delay = woke.duration_since(released);
        assert!(
            waited >= Duration::from_millis(20),
            "did not wait: {waited:?}"
        );
        assert!(
            delay < Duration::from_millis(250),
            "wake-up took {delay:?} (bound {bound:?})"
        );
        ex.detach().unwrap();
        assert_eq!(cell.word(), 0);
    }

    #[test]
    fn test_wait_drained_timeout_names_slot_and_readers_and_stays_excluded() {
        let (cell, id) = attached(7);
        let a = cell.read(id.generation, Gpa(0x10_0000)).unwrap();
        let b = cell.read(id.generation, Gpa(0x10_1000)).unwrap();
        let mut ex = cell.exclude().unwrap();
        let bound = Duration::from_millis(20);
        let err = ex.wait_drained(bound).unwrap_err();
        match err {
            SlotLockError::DrainTimeout {
                slot: 7,
                readers: 2,
                waited,
                bound: b2,
            } => {
                assert!(waited >= bound, "returned early: {waited:?}");
                assert_eq!(b2, bound);
            }
            other => panic!("unexpected {other:?}"),
        }
        let msg = err.to_string();
        assert!(msg.contains("slot 7") && msg.contains("2 reader"), "{msg}");
        assert!(cell.is_excluded() && cell.is_attached());
        assert!(cell.read(id.generation, Gpa(0x10_0000)).is_err());
        // The caller retries once the readers are gone.
        drop((a, b));
        assert_eq!(ex.wait_drained(bound).unwrap(), Duration::ZERO);
        ex.detach().unwrap();
    }

    #[test]
    fn test_read_recycled_cell_other_generation_rejected() {
        let cell = SlotCell::new(9);
        let old = cell.attach(range(0x10_0000, 0x10_0000)).unwrap();
        let mut ex = cell.exclude().unwrap();
        ex.detach().unwrap();
        drop(ex);
        // Reattached for an overlapping range: coverage alone would accept.
        let new = cell.attach(range(0x18_0000, 0x10_0000)).unwrap();
        assert_ne!(old.generation, new.generation);
        assert_eq!(
            cell.read(old.generation, Gpa(0x18_0000)).unwrap_err(),
            SlotLockError::Stale {
                slot: 9,
                expected: old.generation,
                found: new.generation
            }
        );
        assert_eq!(cell.word(), MAP_REF, "the failed reader's reference leaked");
        assert!(cell.read(new.generation, Gpa(0x18_0000)).is_ok());
    }

    #[test]
    fn test_read_gpa_outside_range_not_covered() {
        let (cell, id) = attached(3);
        let err = cell.read(id.generation, Gpa(0x20_0000)).unwrap_err();
        assert_eq!(
            err,
            SlotLockError::NotCovered {
                slot: 3,
                gpa: Gpa(0x20_0000),
                range: id.range
            }
        );
        assert_eq!(cell.word(), MAP_REF);
    }

    #[test]
    fn test_detach_at_zero_readers_succeeds_and_allows_reattach() {
        let (cell, id) = attached(6);
        let mut ex = cell.exclude().unwrap();
        ex.detach().unwrap();
        assert_eq!(
            ex.detach().unwrap_err(),
            SlotLockError::Detached { slot: 6 }
        );
        drop(ex);
        assert_eq!(
            cell.word(),
            0,
            "dropping a detached exclusion must not touch the word"
        );
        assert_eq!(cell.identity(), None);
        assert_eq!(
            cell.read(id.generation, Gpa(0x10_0000)).unwrap_err(),
            SlotLockError::Detached { slot: 6 }
        );
        assert_eq!(
            cell.exclude().unwrap_err(),
            SlotLockError::Detached { slot: 6 }
        );
        assert!(cell.attach(id.range).is_ok());
    }

    #[test]
    fn test_detach_with_reader_inside_not_drained() {
        let (cell, id) = attached(8);
        let guard = cell.read(id.generation, Gpa(0x10_0000)).unwrap();
        let mut ex = cell.exclude().unwrap();
        assert_eq!(
            ex.detach().unwrap_err(),
            SlotLockError::NotDrained {
                slot: 8,
                readers: 1
            }
        );
        assert!(cell.is_excluded());
        drop(guard);
        ex.detach().unwrap();
    }

    #[test]
    fn test_exclude_twice_already_excluded() {
        let (cell, _) = attached(10);
        let _ex = cell.exclude().unwrap();
        assert_eq!(
            cell.exclude().unwrap_err(),
            SlotLockError::AlreadyExcluded { slot: 10 }
        );
    }

    #[test]
    fn test_attach_attached_cell_already_attached() {
        let (cell, _) = attached(11);
        assert_eq!(
            cell.attach(range(0, 0x1000)).unwrap_err(),
            SlotLockError::AlreadyAttached { slot: 11, word: 1 }
        );
    }

    #[test]
    fn test_reshape_drained_slot_bumps_generation() {
        let (cell, old) = attached(12);
        let mut ex = cell.exclude().unwrap();
        let new = ex.reshape(range(0x10_0000, 0x8000)).unwrap();
        drop(ex);
        assert_eq!(new.generation, old.generation + 1);
        assert!(matches!(
            cell.read(old.generation, Gpa(0x10_0000)),
            Err(SlotLockError::Stale { .. })
        ));
        assert!(matches!(
            cell.read(new.generation, Gpa(0x10_8000)),
            Err(SlotLockError::NotCovered { .. })
        ));
        assert_eq!(
            cell.read(new.generation, Gpa(0x10_7fff)).unwrap().range(),
            new.range
        );
    }

    #[test]
    fn test_reshape_with_reader_inside_not_drained() {
        let (cell, id) = attached(13);
        let _guard = cell.read(id.generation, Gpa(0x10_0000)).unwrap();
        let mut ex = cell.exclude().unwrap();
        assert_eq!(
            ex.reshape(range(0, 0x1000)).unwrap_err(),
            SlotLockError::NotDrained {
                slot: 13,
                readers: 1
            }
        );
        assert_eq!(cell.identity(), Some(id));
    }

    #[test]
    fn test_read_count_saturated_too_many_readers() {
        let (cell, id) = attached(14);
        cell.refcnt.store(COUNT_MASK, Ordering::Relaxed);
        assert_eq!(
            cell.read(id.generation, Gpa(0x10_0000)).unwrap_err(),
            SlotLockError::TooManyReaders {
                slot: 14,
                readers: COUNT_MASK - 1
            }
        );
        assert_eq!(cell.word(), COUNT_MASK);
    }

    #[test]
    fn test_wait_drained_many_readers_threads_all_drain() {
        let cell = std::sync::Arc::new(attached(15).0);
        let generation = cell.identity().unwrap().generation;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (cell, stop) = (cell.clone(), stop.clone());
                thread::spawn(move || {
                    let mut admitted = 0u32;
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok(g) = cell.read(generation, Gpa(0x10_0000)) {
                            admitted += 1;
                            drop(g);
                        }
                    }
                    admitted
                })
            })
            .collect();
        for _ in 0..200 {
            let mut ex = cell.exclude().unwrap();
            ex.wait_drained(Duration::from_secs(5)).unwrap();
            assert_eq!(cell.word(), EXCLUDE | MAP_REF);
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            r.join().unwrap();
        }
        assert_eq!(cell.word(), MAP_REF);
    }

    /// The range a recycle test attaches for `generation`: alternating,
    /// overlapping at 0x18_0000, so only the generation tells them apart.
    fn range_for(generation: u64) -> GpaRange {
        if generation % 2 == 1 {
            range(0x10_0000, 0x10_0000)
        } else {
            range(0x18_0000, 0x10_0000)
        }
    }

    #[test]
    fn test_read_racing_recycles_guard_matches_requested_identity() {
        use std::sync::atomic::{AtomicU32 as StdAtomicU32, AtomicU64 as StdAtomicU64};
        let cell = std::sync::Arc::new(SlotCell::new(16));
        // The "published snapshot": the generation readers look up.
        let snapshot = std::sync::Arc::new(StdAtomicU64::new(
            cell.attach(range_for(1)).unwrap().generation,
        ));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let admitted = std::sync::Arc::new(StdAtomicU32::new(0));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (cell, snapshot, stop, admitted) = (
                    cell.clone(),
                    snapshot.clone(),
                    stop.clone(),
                    admitted.clone(),
                );
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let generation = snapshot.load(Ordering::Acquire);
                        if let Ok(g) = cell.read(generation, Gpa(0x18_0000)) {
                            assert_eq!(g.generation(), generation);
                            assert_eq!(g.range(), range_for(generation));
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                        // Two spinning readers on a small machine would
                        // starve the writer's wake-up.
                        thread::yield_now();
                    }
                })
            })
            .collect();
        // At least 100 recycles, and keep going (bounded) until readers have
        // really been admitted, so the test cannot pass vacuously on a
        // loaded machine.
        let started = std::time::Instant::now();
        let mut cycles = 0;
        while cycles < 100
            || (admitted.load(Ordering::Relaxed) < 20
                && started.elapsed() < Duration::from_secs(20))
        {
            let mut ex = cell.exclude().unwrap();
            ex.wait_drained(Duration::from_secs(5)).unwrap();
            ex.detach().unwrap();
            drop(ex);
            let next = cell.generation.load(Ordering::Relaxed) + 1;
            let id = cell.attach(range_for(next)).unwrap();
            assert_eq!(id.generation, next);
            // Publish late: readers meanwhile try the stale generation.
            thread::yield_now();
            snapshot.store(id.generation, Ordering::Release);
            thread::sleep(Duration::from_micros(50));
            cycles += 1;
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            r.join().unwrap();
        }
        assert!(
            admitted.load(Ordering::Relaxed) > 0,
            "no reader ever got in"
        );
        assert_eq!(cell.word(), MAP_REF);
    }
}

#[cfg(all(test, vmm_loom))]
mod loom_tests {
    //! Loom models of the four properties. Each model has a deliberately
    //! broken variant, and a test asserting the model catches it.
    use super::*;
    use crate::mm::sync::{thread, Arc};
    use loom::cell::UnsafeCell;
    use loom::model::Builder;
    use std::panic::{catch_unwind, AssertUnwindSafe};

    /// Effectively unbounded (loom does not model timeouts anyway).
    const LONG: Duration = Duration::from_secs(3600);
    const GPA: Gpa = Gpa(0x18_0000);
    const MAPPED: u64 = 1;
    const DISCARDED: u64 = 2;

    fn range_a() -> GpaRange {
        GpaRange::new(Gpa(0x10_0000), 0x10_0000).unwrap()
    }
    fn range_b() -> GpaRange {
        GpaRange::new(Gpa(0x18_0000), 0x10_0000).unwrap()
    }

    /// A slot cell and the "host memory" behind it. Loom flags any access to
    /// `mem` not ordered by happens-before with the writer's discard.
    struct Shared {
        cell: SlotCell,
        mem: UnsafeCell<u64>,
    }

    fn shared() -> (Arc<Shared>, SlotIdentity) {
        let s = Arc::new(Shared {
            cell: SlotCell::new(1),
            mem: UnsafeCell::new(MAPPED),
        });
        let id = s.cell.attach(range_a()).unwrap();
        (s, id)
    }

    fn read_mem(s: &Shared) -> u64 {
        // SAFETY: loom's cell checks this read against concurrent writes.
        s.mem.with(|p| unsafe { *p })
    }

    fn discard_mem(s: &Shared, value: u64) {
        // SAFETY: loom's cell checks this write against concurrent accesses.
        s.mem.with_mut(|p| unsafe { *p = value })
    }

    /// Runs a model with a preemption bound; returns how many executions
    /// loom explored.
    fn check(bound: usize, f: impl Fn() + Sync + Send + 'static) -> usize {
        let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = runs.clone();
        let mut b = Builder::new();
        b.preemption_bound = Some(bound);
        b.check(move || {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            f();
        });
        runs.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Asserts that a correct model explored more than one interleaving.
    fn check_explores(bound: usize, f: impl Fn() + Sync + Send + 'static) {
        let runs = check(bound, f);
        assert!(runs > 1, "loom explored only {runs} execution(s)");
    }

    /// Asserts that the model fails, with a panic message containing `why`.
    fn assert_caught(bound: usize, why: &str, f: impl Fn() + Sync + Send + 'static) {
        let payload = catch_unwind(AssertUnwindSafe(|| check(bound, f)))
            .expect_err("loom did not catch the broken variant");
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("<non-string panic>");
        assert!(msg.contains(why), "caught for another reason: {msg}");
    }

    type ReadFn = for<'a> fn(&'a SlotCell, u64, Gpa) -> Result<SlotReadGuard<'a>, SlotLockError>;
    type PutFn = fn(SlotReadGuard<'_>);

    /// BROKEN: checks EXCLUDE with a load, then increments separately.
    fn read_check_then_inc(
        cell: &SlotCell,
        generation: u64,
        gpa: Gpa,
    ) -> Result<SlotReadGuard<'_>, SlotLockError> {
        let word = cell.refcnt.load(Ordering::Acquire);
        if word == 0 {
            return Err(SlotLockError::Detached { slot: cell.id });
        }
        if word & EXCLUDE != 0 {
            return Err(SlotLockError::Excluded { slot: cell.id });
        }
        cell.refcnt.fetch_add(1, Ordering::Acquire);
        let guard = SlotReadGuard {
            cell,
            identity: cell.load_identity(),
        };
        validate(&guard, generation, gpa)?;
        Ok(guard)
    }

    /// BROKEN: increments without re-validating the identity afterwards.
    fn read_no_revalidate(
        cell: &SlotCell,
        _generation: u64,
        _gpa: Gpa,
    ) -> Result<SlotReadGuard<'_>, SlotLockError> {
        cell.get_ref()?;
        Ok(SlotReadGuard {
            cell,
            identity: cell.load_identity(),
        })
    }

    fn put_correct(guard: SlotReadGuard<'_>) {
        drop(guard);
    }

    /// BROKEN: releases without ever notifying the writer.
    fn put_no_notify(guard: SlotReadGuard<'_>) {
        let cell = guard.cell;
        std::mem::forget(guard);
        cell.refcnt.fetch_sub(1, Ordering::Release);
    }

    /// BROKEN: notifies without taking the wait mutex (classic lost wake-up).
    fn put_notify_unlocked(guard: SlotReadGuard<'_>) {
        let cell = guard.cell;
        std::mem::forget(guard);
        if cell.refcnt.fetch_sub(1, Ordering::Release) == EXCLUDE | (MAP_REF + 1) {
            cell.drained.notify_one();
        }
    }

    /// BROKEN: publishes the count before the identity.
    fn attach_count_first(cell: &SlotCell, range: GpaRange) -> SlotIdentity {
        cell.refcnt.store(MAP_REF, Ordering::Release);
        cell.publish_identity(range)
    }

    fn attach_correct(cell: &SlotCell, range: GpaRange) -> SlotIdentity {
        cell.attach(range).unwrap()
    }

    /// Spawns `n` reader threads running `body` on the shared state.
    fn spawn_readers(
        s: &Arc<Shared>,
        n: usize,
        body: impl Fn(&Shared) + Send + Sync + Copy + 'static,
    ) -> Vec<thread::JoinHandle<()>> {
        (0..n)
            .map(|_| {
                let s = Arc::clone(s);
                thread::spawn(move || body(&s))
            })
            .collect()
    }

    fn join(readers: Vec<thread::JoinHandle<()>>) {
        for r in readers {
            r.join().unwrap();
        }
    }

    // ---- Model 1: no reader admitted after exclude ------------------------
    // The writer excludes, drains, then discards the memory while it holds
    // the exclusion (and restores it, like a re-protect). A reader that got a
    // guard reads the memory: loom flags the read if it is not ordered with
    // the discard, and the word must show no reader inside the exclusion.
    fn exclude_model(read: ReadFn, n: usize) -> impl Fn() + Sync + Send + 'static {
        move || {
            let (s, id) = shared();
            let readers = spawn_readers(&s, n, move |s| {
                if let Ok(guard) = read(&s.cell, id.generation, GPA) {
                    assert_eq!(read_mem(s), MAPPED, "reader admitted into discarded memory");
                    drop(guard);
                }
            });
            {
                let mut ex = s.cell.exclude().unwrap();
                ex.wait_drained(LONG).unwrap();
                assert_eq!(
                    s.cell.word(),
                    EXCLUDE | MAP_REF,
                    "reader inside an exclusion"
                );
                discard_mem(&s, DISCARDED);
                discard_mem(&s, MAPPED);
            }
            join(readers);
            assert_eq!(s.cell.word(), MAP_REF);
        }
    }

    #[test]
    fn test_loom_exclude_admits_no_reader() {
        check_explores(3, exclude_model(SlotCell::read, 2));
    }

    #[test]
    fn test_loom_exclude_check_then_inc_reader_caught() {
        assert_caught(
            3,
            "Causality violation",
            exclude_model(read_check_then_inc, 1),
        );
    }

    // ---- Model 2: no lost wake-up -------------------------------------------
    // The writer parks until the last reader leaves; loom reports a deadlock
    // if the wake-up is lost (loom's wait_timeout never times out).
    fn wakeup_model(put: PutFn, n: usize) -> impl Fn() + Sync + Send + 'static {
        move || {
            let (s, id) = shared();
            // Not dropped while unwinding from loom's deadlock panic: a loom
            // object touched after the execution aborted panics again.
            let s = std::mem::ManuallyDrop::new(s);
            let readers = spawn_readers(&s, n, move |s| {
                if let Ok(guard) = s.cell.read(id.generation, GPA) {
                    put(guard);
                }
            });
            let mut ex = s.cell.exclude().unwrap();
            ex.wait_drained(LONG).unwrap();
            ex.detach().unwrap();
            drop(ex);
            join(readers);
            drop(std::mem::ManuallyDrop::into_inner(s));
        }
    }

    #[test]
    fn test_loom_wait_drained_no_lost_wakeup() {
        check_explores(3, wakeup_model(put_correct, 2));
    }

    #[test]
    fn test_loom_wait_drained_release_without_notify_caught() {
        assert_caught(3, "deadlock", wakeup_model(put_no_notify, 1));
    }

    #[test]
    fn test_loom_wait_drained_notify_without_lock_caught() {
        assert_caught(3, "deadlock", wakeup_model(put_notify_unlocked, 1));
    }

    // ---- Model 3: detach only at zero ---------------------------------------
    // Readers race a writer that detaches and then frees the memory.
    fn detach_model(wait_first: bool, n: usize) -> impl Fn() + Sync + Send + 'static {
        move || {
            let (s, id) = shared();
            let readers = spawn_readers(&s, n, move |s| {
                if let Ok(guard) = s.cell.read(id.generation, GPA) {
                    assert_eq!(read_mem(s), MAPPED, "reader inside a detached slot");
                    drop(guard);
                }
            });
            let mut ex = s.cell.exclude().unwrap();
            if wait_first {
                ex.wait_drained(LONG).unwrap();
                ex.detach().unwrap();
            } else {
                // BROKEN: a detach that does not wait for readers.
                s.cell.refcnt.store(0, Ordering::Release);
                ex.detached = true;
            }
            drop(ex);
            discard_mem(&s, DISCARDED);
            assert_eq!(
                s.cell.read(id.generation, GPA).unwrap_err(),
                SlotLockError::Detached { slot: 1 }
            );
            join(readers);
            assert_eq!(s.cell.word(), 0);
        }
    }

    #[test]
    fn test_loom_detach_only_at_zero() {
        check_explores(3, detach_model(true, 2));
    }

    #[test]
    fn test_loom_detach_without_drain_caught() {
        assert_caught(3, "Causality violation", detach_model(false, 1));
    }

    // ---- Model 4: recycle race ----------------------------------------------
    // A reader with a snapshot of attachment A (gen g1) races a writer that
    // detaches the cell, replaces the memory, and reattaches it for an
    // overlapping range B (gen g1 + 1). A guard must match the snapshot the
    // reader asked with, and the memory it sees must be that attachment's.
    // With `with_new_reader`, a second reader asks for B's generation.
    fn recycle_model(
        read: ReadFn,
        attach: fn(&SlotCell, GpaRange) -> SlotIdentity,
        with_new_reader: bool,
    ) -> impl Fn() + Sync + Send + 'static {
        move || {
            let (s, a) = shared();
            let mut readers = spawn_readers(&s, 1, move |s| {
                if let Ok(guard) = read(&s.cell, a.generation, GPA) {
                    assert_eq!(guard.identity(), a, "guard for the wrong identity");
                    assert_eq!(read_mem(s), MAPPED, "guard over another slot's memory");
                    drop(guard);
                }
            });
            if with_new_reader {
                readers.extend(spawn_readers(&s, 1, move |s| {
                    if let Ok(guard) = read(&s.cell, a.generation + 1, GPA) {
                        assert_eq!(guard.range(), range_b(), "guard for the wrong identity");
                        assert_eq!(read_mem(s), DISCARDED, "guard over another slot's memory");
                        drop(guard);
                    }
                }));
            }
            let mut ex = s.cell.exclude().unwrap();
            ex.wait_drained(LONG).unwrap();
            ex.detach().unwrap();
            drop(ex);
            discard_mem(&s, DISCARDED); // B's memory replaces A's
            let b = attach(&s.cell, range_b());
            assert_eq!(b.generation, a.generation + 1);
            join(readers);
        }
    }

    #[test]
    fn test_loom_recycle_never_yields_wrong_identity() {
        check_explores(3, recycle_model(SlotCell::read, attach_correct, true));
    }

    #[test]
    fn test_loom_recycle_without_revalidation_caught() {
        assert_caught(
            3,
            "guard for the wrong identity",
            recycle_model(read_no_revalidate, attach_correct, false),
        );
    }

    #[test]
    fn test_loom_recycle_attach_count_before_identity_caught() {
        assert_caught(
            3,
            "guard over another slot's memory",
            recycle_model(SlotCell::read, attach_count_first, false),
        );
    }
}
