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
//! # The count words
//! Each [`SlotCell`] has [`SHARDS`] count words (*shards*), each on its own
//! cache line; a reader uses one shard, chosen per thread
//! ([`current_shard`]), and every shard follows the table below. A writer
//! acts on all shards: attach and detach set every shard, exclude sets
//! [`EXCLUDE`] in every shard, and the slot is drained when every shard is
//! `EXCLUDE | 1`. Sharding is our addition to the kernel's design: the kernel
//! has one `vm_refcnt` per VMA and accepts that threads faulting on one VMA
//! bounce its cache line; a VMM has few slots (usually one RAM slot) and
//! every vCPU and device thread reads the same ones, so a single word would
//! move between cores on every access (docs/guards.md measures it). Each
//! shard on its own is exactly the kernel's protocol, so every argument below
//! holds per shard; the writer's conditions are the conjunction over shards.
//! Loom runs the models with two shards and readers on both, and catches a
//! writer that excludes and drains one shard only, and a detach that checks
//! one shard only.
//!
//! One shard word:
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
//! 2. Only an excluded slot with no reader (every shard `EXCLUDE | 1`) can be
//!    detached, by a compare-exchange of each shard to `0`: detach happens
//!    only at zero readers. (Once every shard is excluded and drained, no
//!    reader can change any of them, so the compare-exchanges cannot fail.)
//! 3. The identity (generation, range) of a cell changes only while no reader
//!    is inside and none can get in: detached (`attach`) or excluded and
//!    drained ([`SlotExclusion::reshape`]).
//!
//! # Memory ordering
//! - **attach publishes identity before the count becomes non-zero.** The
//!   writer stores generation and range (relaxed) into every shard's copy
//!   of the identity, then stores `1` with `Release` in each shard. A reader
//!   reads its own shard's copy, so its line is the only one it touches. A reader's successful CAS is `Acquire`; the value it read is the
//!   `1` or a later read-modify-write in that store's release sequence, so it
//!   synchronizes with the attach, and the identity loads it makes *after* the
//!   increment see this attach's identity (or a later one, which invariant 3
//!   rules out while it holds the reference). Loading identity *before* the
//!   increment would be unsound: the cell could be recycled in between; that is
//!   why the reader re-validates after the increment (loom model 4 checks it,
//!   with a broken attach that publishes the count first).
//! - **reader accesses happen before the writer's teardown.** A reader drops
//!   its reference with a `Release` `fetch_sub`; the writer observes each
//!   shard's drained value with an `Acquire` load (or the `AcqRel` detach
//!   CAS). All decrements of one shard are in one release sequence, so the
//!   writer synchronizes with every reader that was inside, and whatever it
//!   unmaps afterwards cannot be under a reader.
//! - **writer changes are visible to later readers.** Releasing exclusion is a
//!   `Release` `fetch_and` on each shard; a reader admitted afterwards on that
//!   shard acquires it.
//!
//! # Waiting, and why no wake-up is lost
//! The writer parks on a per-cell `Mutex<()>` + `Condvar`. It re-reads the
//! shards *while holding the mutex* and only then waits (which atomically
//! unlocks). The reader whose `fetch_sub` takes its shard to `EXCLUDE | 1`
//! then locks the same mutex and notifies; the writer wakes, re-reads every
//! shard and parks again if another shard still has readers. Per shard: Either the writer's load (under the mutex) already
//! sees that decrement, and it does not wait; or it does not see it, and then
//! the writer held the mutex from that load until it was parked, so the
//! reader's lock (which follows its decrement) can only succeed once the writer
//! is parked, and the notify reaches it. The reader cannot have locked,
//! notified and unlocked *before* the writer locked: the unlock would then
//! happen before the writer's load, which would have to see the decrement.
//! At most one decrement per shard produces `EXCLUDE | 1` per exclusion (RMWs
//! on one word are totally ordered), and it is the last one of that shard; if
//! no reader was inside at exclude time, the writer sees every shard at
//! `EXCLUDE | 1` at once and never parks. Loom model 2 checks this with
//! readers on both shards; its broken variants (a release that never
//! notifies, one that notifies without the mutex) are caught with one
//! reader. Model 5 has a writer detach before draining: refused (the shards
//! already zeroed put back) until every shard drained.
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

use crate::mm::addr::{Gpa, GpaRange};
use crate::mm::sync::{AtomicU32, AtomicU64, Condvar, Mutex, MutexGuard, Ordering};

/// Set in the count word while a writer excludes new readers (bit 30, as the
/// kernel's `VMA_LOCK_OFFSET`).
pub const EXCLUDE: u32 = 1 << 30;
/// The map's own reference, held from attach to detach.
const MAP_REF: u32 = 1;
/// The reference-count bits below [`EXCLUDE`].
const COUNT_MASK: u32 = EXCLUDE - 1;

/// Count words per cell (a power of two). Threads are spread over them round
/// robin, so up to this many threads read one slot without sharing a cache
/// line. Two under loom, which keeps the models small and still crosses
/// shards.
#[cfg(not(all(test, vmm_loom)))]
pub const SHARDS: usize = 4;
/// Count words per cell (two under loom).
#[cfg(all(test, vmm_loom))]
pub const SHARDS: usize = 2;

/// The shard this thread's readers use: threads get shards round robin, on
/// first use. Any shard is correct for any thread; this only keeps threads
/// apart. Under loom and shuttle every model thread would share one OS
/// thread-local, so the models pass shards explicitly
/// ([`SlotCell::read_on`]) instead.
#[cfg(not(all(test, any(vmm_loom, vmm_shuttle))))]
#[inline]
pub fn current_shard() -> usize {
    use std::sync::atomic::AtomicUsize as StdAtomicUsize;
    static NEXT: StdAtomicUsize = StdAtomicUsize::new(0);
    std::thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|s| *s)
}

/// The shard this thread's readers use (always 0 under loom and shuttle).
#[cfg(all(test, any(vmm_loom, vmm_shuttle)))]
pub fn current_shard() -> usize {
    0
}

/// One count word and a copy of the slot's identity, on its own cache line
/// pair (see [`SlotCell`]): a reader touches only its shard's line.
#[repr(align(128))]
struct Shard {
    refcnt: AtomicU32,
    generation: AtomicU64,
    start: AtomicU64,
    len: AtomicU64,
}

pub use error::SlotLockError;
pub use exclusion::SlotExclusion;

/// What a slot is: the generation of its current attachment and its GPA range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotIdentity {
    /// Bumped by every [`SlotCell::attach`] and [`SlotExclusion::reshape`]; a
    /// snapshot stores it next to the cell's slot id.
    pub generation: u64,
    /// The guest-physical range the slot covers.
    pub range: GpaRange,
}

/// A reusable slot cell: the count words, the slot's identity, and the place a
/// draining writer parks.
///
/// Each shard holds its own copy of the identity next to its count word, so
/// an uncontended read touches one line. Each shard, and the rest of the
/// cell, is aligned to 128 bytes (a cache line plus its prefetch pair on
/// x86): readers on different shards, and readers of neighbouring cells in a
/// table, never share a line.
#[repr(align(128))]
pub struct SlotCell {
    shards: [Shard; SHARDS],
    id: u32,
    wait_lock: Mutex<()>,
    drained: Condvar,
}

impl fmt::Debug for SlotCell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlotCell")
            .field("id", &self.id)
            .field("words", &format_args!("{:x?}", self.words()))
            .field("generation", &self.generation())
            .finish_non_exhaustive()
    }
}

impl SlotCell {
    /// A detached cell for slot id `id`.
    pub fn new(id: u32) -> Self {
        Self {
            shards: std::array::from_fn(|_| Shard {
                refcnt: AtomicU32::new(0),
                generation: AtomicU64::new(0),
                start: AtomicU64::new(0),
                len: AtomicU64::new(0),
            }),
            id,
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
        let generation = self.generation().wrapping_add(1);
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
        if let Some(&word) = self.words().iter().find(|&&w| w != 0) {
            return Err(SlotLockError::AlreadyAttached {
                slot: self.id,
                word,
            });
        }
        // No reader can be inside or get in (every shard is 0 and only a
        // serialized writer makes it non-zero), so nobody reads the identity.
        let identity = self.publish_identity(range, generation);
        for shard in &self.shards {
            // Release: the identity stores above are visible to every reader
            // whose Acquire CAS reads this 1 or a later value (module docs).
            shard.refcnt.store(MAP_REF, Ordering::Release);
        }
        Ok(identity)
    }

    /// Takes a reader reference on the slot the reader found in its snapshot
    /// (`generation`) for address `gpa`, on this thread's shard
    /// ([`current_shard`]).
    ///
    /// Fails if the cell is detached or excluded, or if, after the reference
    /// was taken, the cell turns out to hold another generation (recycled) or
    /// not to cover `gpa`; the reference is dropped again then. Lock-free: one
    /// load, one CAS and three relaxed loads; the guard's drop is one
    /// `fetch_sub`.
    #[inline]
    pub fn read(&self, generation: u64, gpa: Gpa) -> Result<SlotReadGuard<'_>, SlotLockError> {
        self.read_on(current_shard(), generation, gpa)
    }

    /// As [`read`](Self::read), on shard `shard` (taken modulo [`SHARDS`]): for
    /// a reader that looked its shard up once ([`current_shard`]) and reuses it.
    #[inline]
    pub fn read_on(
        &self,
        shard: usize,
        generation: u64,
        gpa: Gpa,
    ) -> Result<SlotReadGuard<'_>, SlotLockError> {
        let shard = shard % SHARDS;
        self.get_ref(shard)?;
        // From here we own a reference; the identity cannot change under it.
        let guard = SlotReadGuard {
            cell: self,
            shard,
            identity: self.load_identity(shard),
        };
        validate(&guard, generation, gpa)?;
        Ok(guard)
    }

    /// Sets [`EXCLUDE`]: from now on no new reader gets in. Readers already
    /// inside keep their references; wait for them with
    /// [`SlotExclusion::wait_drained`]. Writer side: call under the slot-map
    /// writer lock. Dropping the returned guard releases the exclusion.
    pub fn exclude(&self) -> Result<SlotExclusion<'_>, SlotLockError> {
        for (i, shard) in self.shards.iter().enumerate() {
            if let Err(e) = self.exclude_shard(shard) {
                // Only misuse gets here (writers not serialized): undo.
                for done in &self.shards[..i] {
                    done.refcnt.fetch_and(!EXCLUDE, Ordering::Release);
                }
                return Err(e);
            }
        }
        Ok(SlotExclusion {
            cell: self,
            detached: false,
        })
    }

    fn exclude_shard(&self, shard: &Shard) -> Result<(), SlotLockError> {
        let mut word = shard.refcnt.load(Ordering::Relaxed);
        loop {
            if word == 0 {
                return Err(SlotLockError::Detached { slot: self.id });
            }
            if word & EXCLUDE != 0 {
                return Err(SlotLockError::AlreadyExcluded { slot: self.id });
            }
            match shard.refcnt.compare_exchange_weak(
                word,
                word | EXCLUDE,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(actual) => word = actual,
            }
        }
    }

    /// Hints the CPU to fetch `shard`'s count word for writing (x86
    /// `prefetchw`): a reader that knows which cell it takes next (a walk
    /// over slots in address order) issues this while it works on the
    /// current one, so the next admission's CAS finds its line in cache
    /// instead of stalling on it. Only a hint: no access, no ordering, no
    /// effect on the protocol.
    #[inline]
    pub fn prefetch(&self, shard: usize) {
        #[cfg(all(target_arch = "x86_64", not(all(test, any(vmm_loom, vmm_shuttle)))))]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_ET0};
            let word = &self.shards[shard % SHARDS].refcnt as *const AtomicU32 as *const i8;
            // SAFETY: a prefetch never faults nor changes memory; `word`
            // points into `self`, which is live.
            #[allow(unused_unsafe)]
            unsafe {
                _mm_prefetch::<_MM_HINT_ET0>(word)
            };
        }
        #[cfg(not(all(target_arch = "x86_64", not(all(test, any(vmm_loom, vmm_shuttle))))))]
        let _ = shard;
    }

    /// Whether the cell holds a slot (its count words are non-zero). Writers
    /// attach, detach and exclude every shard together, so shard 0 answers
    /// for all of them (writer side and diagnostics).
    pub fn is_attached(&self) -> bool {
        self.shards[0].refcnt.load(Ordering::Acquire) != 0
    }

    /// Whether a writer currently excludes new readers.
    pub fn is_excluded(&self) -> bool {
        self.shards[0].refcnt.load(Ordering::Acquire) & EXCLUDE != 0
    }

    /// Readers inside right now, over all shards (a racy snapshot, for
    /// diagnostics).
    pub fn readers(&self) -> u32 {
        total_readers(&self.words())
    }

    /// The current identity, if attached. Writer side (stable only under the
    /// slot-map writer lock); readers get theirs from [`SlotReadGuard`].
    pub fn identity(&self) -> Option<SlotIdentity> {
        self.is_attached().then(|| self.load_identity(0))
    }

    /// Every shard's count word (Acquire loads).
    fn words(&self) -> [u32; SHARDS] {
        std::array::from_fn(|i| self.shards[i].refcnt.load(Ordering::Acquire))
    }

    /// Whether every shard is excluded with no reader inside.
    fn drained(&self) -> bool {
        self.words().iter().all(|&w| w == EXCLUDE | MAP_REF)
    }

    /// `inc_not_zero` on one shard that also refuses an excluded word, in one
    /// CAS.
    #[inline]
    fn get_ref(&self, shard: usize) -> Result<(), SlotLockError> {
        let refcnt = &self.shards[shard].refcnt;
        let mut word = refcnt.load(Ordering::Relaxed);
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
            match refcnt.compare_exchange_weak(word, word + 1, Ordering::Acquire, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(actual) => word = actual,
            }
        }
    }

    /// Drops one reader reference on `shard` and wakes a draining writer if
    /// this was the shard's last reader.
    #[inline(always)]
    fn put_ref(&self, shard: usize) {
        // Release: this reader's accesses happen before the writer's teardown.
        let old = self.shards[shard].refcnt.fetch_sub(1, Ordering::Release);
        debug_assert!(
            old & COUNT_MASK > MAP_REF,
            "slot {}: reader release without a reference (shard {shard}, word {old:#x})",
            self.id
        );
        if old == EXCLUDE | (MAP_REF + 1) {
            // The shard is now EXCLUDE | 1: we were its last reader and a
            // writer may be parked (waiting for this shard or another).
            self.wake_writer();
        }
    }

    /// The release's slow path, out of line so that the fast path (one
    /// `fetch_sub` and a compare) inlines into every guard's drop.
    #[cold]
    #[inline(never)]
    fn wake_writer(&self) {
        // Taking the mutex is what makes the wake-up impossible to lose
        // (module docs).
        let _lock = self.lock_wait();
        self.drained.notify_one();
    }

    fn lock_wait(&self) -> MutexGuard<'_, ()> {
        // The mutex guards no data, so a poisoned lock is still usable.
        self.wait_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores a new identity with a bumped generation. Callers guarantee that
    /// no reader is inside or can get in (invariant 3).
    /// Every shard's copy is written before any count word is published.
    fn publish_identity(&self, range: GpaRange, generation: u64) -> SlotIdentity {
        for shard in &self.shards {
            shard.generation.store(generation, Ordering::Relaxed);
            shard.start.store(range.start().0, Ordering::Relaxed);
            shard.len.store(range.len(), Ordering::Relaxed);
        }
        SlotIdentity { generation, range }
    }

    /// The generation of the current (or last) attachment. Writer side.
    fn generation(&self) -> u64 {
        self.shards[0].generation.load(Ordering::Relaxed)
    }

    /// `shard`'s copy of the identity.
    #[inline]
    fn load_identity(&self, shard: usize) -> SlotIdentity {
        let shard = &self.shards[shard];
        let generation = shard.generation.load(Ordering::Relaxed);
        let start = Gpa(shard.start.load(Ordering::Relaxed));
        let len = shard.len.load(Ordering::Relaxed);
        // Identity stores come from a valid `GpaRange`, and a reader sees one
        // attach's complete identity (module docs), so the parts are valid.
        let range = GpaRange::from_valid_parts(start, len);
        SlotIdentity { generation, range }
    }
}

#[cfg(test)]
impl SlotCell {
    /// The count word all shards agree on (tests check writer-visible states,
    /// where they always agree); panics if they differ.
    fn word(&self) -> u32 {
        let words = self.words();
        assert!(
            words.iter().all(|&w| w == words[0]),
            "slot {}: shards disagree: {words:x?}",
            self.id
        );
        words[0]
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

fn total_readers(words: &[u32]) -> u32 {
    words.iter().map(|&w| readers_in(w)).sum()
}

/// A reader's reference on a slot; the host memory behind the slot stays
/// mapped while it lives. Released on drop.
#[must_use = "the slot is released as soon as the guard is dropped"]
#[derive(Debug)]
pub struct SlotReadGuard<'a> {
    cell: &'a SlotCell,
    shard: usize,
    identity: SlotIdentity,
}

impl SlotReadGuard<'_> {
    /// Whether a writer has excluded the slot since this guard was taken (a
    /// relaxed load of the guard's count word). Only a hint for readers that
    /// hold a guard a while before they use it (a walk over slots admits a
    /// few ahead): one that sees the exclusion can step back early instead
    /// of making the writer wait. Safety never depends on it: the guard's
    /// reference keeps the memory whatever this returns.
    #[inline]
    pub fn exclusion_seen(&self) -> bool {
        self.cell.shards[self.shard].refcnt.load(Ordering::Relaxed) & EXCLUDE != 0
    }

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
    #[inline(always)]
    fn drop(&mut self) {
        self.cell.put_ref(self.shard);
    }
}

mod error;
mod exclusion;

#[cfg(all(test, not(vmm_loom), not(vmm_shuttle)))]
mod tests;

#[cfg(all(test, vmm_loom))]
mod loom_tests;

#[cfg(all(test, vmm_shuttle, not(vmm_loom)))]
mod shuttle_tests;

#[cfg(all(test, any(vmm_loom, vmm_shuttle)))]
pub(crate) mod model_variants;
