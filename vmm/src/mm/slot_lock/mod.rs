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
///
/// Aligned to 128 bytes (a cache line plus its prefetch pair on x86) so that
/// readers of neighbouring cells in a table never share a line.
#[repr(align(128))]
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
        let generation = self.generation.load(Ordering::Relaxed).wrapping_add(1);
        self.attach_as(range, generation)
    }

    /// As [`attach`](Self::attach), with the generation chosen by the caller:
    /// the slot map's [`Slot::generation`](crate::mm::slot_map::Slot::generation),
    /// so a reader checks the cell against the slot object of its snapshot.
    /// The caller must never reuse a generation on this cell while a reader
    /// may still hold a snapshot with the old slot (the slot map's
    /// generations are unique per map lineage, which guarantees it).
    pub fn attach_as(
        &self,
        range: GpaRange,
        generation: u64,
    ) -> Result<SlotIdentity, SlotLockError> {
        let word = self.refcnt.load(Ordering::Acquire);
        if word != 0 {
            return Err(SlotLockError::AlreadyAttached {
                slot: self.id,
                word,
            });
        }
        // No reader can be inside or get in (the word is 0 and only a
        // serialized writer makes it non-zero), so nobody reads the identity.
        let identity = self.publish_identity(range, generation);
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
    fn publish_identity(&self, range: GpaRange, generation: u64) -> SlotIdentity {
        self.generation.store(generation, Ordering::Relaxed);
        self.start.store(range.start().0, Ordering::Relaxed);
        self.len.store(range.len(), Ordering::Relaxed);
        SlotIdentity { generation, range }
    }

    #[inline]
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
        // 2^64 attachments cannot happen; wrapping keeps it total anyway.
        let generation = cell.generation.load(Ordering::Relaxed).wrapping_add(1);
        Ok(cell.publish_identity(range, generation))
    }

    /// As [`reshape`](Self::reshape), with the caller's generation (see
    /// [`SlotCell::attach_as`]). Also used for a flags-only change, where the
    /// range stays and only the generation moves.
    pub fn reshape_as(
        &mut self,
        range: GpaRange,
        generation: u64,
    ) -> Result<SlotIdentity, SlotLockError> {
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
        // As in `reshape`: drained and excluded, nobody reads the identity.
        Ok(cell.publish_identity(range, generation))
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
mod tests;

#[cfg(all(test, vmm_loom))]
mod loom_tests;
