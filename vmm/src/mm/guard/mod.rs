//! Host-side access to guest memory through per-slot guards: the slot map
//! wired to the per-slot refcount lock ([`crate::mm::slot_lock`]).
//!
//! Every slot of the map has a [`SlotCell`], kept in a table indexed by slot
//! id ([`SlotCells`]; cells are reused with the ids, like the kernel's
//! `SLAB_TYPESAFE_BY_RCU` VMA cache). A cell attached for a slot carries that
//! slot's [`Slot::generation`], which is unique per map lineage, as its
//! identity.
//!
//! [`SlotCell`]: crate::mm::slot_lock::SlotCell
//! [`Slot::generation`]: crate::mm::slot_map::Slot::generation
//!
//! # Readers
//! [`GuardedMap::try_acquire`] (or a per-thread [`GuestReader`]) finds the
//! slot of a GPA in the published snapshot without a lock, takes a reference
//! on its cell with increment-if-not-zero-and-not-excluded, then re-validates
//! that the cell still holds *that* slot object (generation) and that it
//! covers the GPA. A cell detached and re-attached to another slot between
//! the lookup and the increment is caught by the generation; the reader then
//! retries with a fresh snapshot. The result is a [`SlotRef`]: while it
//! lives, the host memory behind the slot is neither unmapped nor discarded.
//!
//! # Writers
//! A transition that deletes a slot (unplug, shrink, move, split for a
//! protect) first calls [`GuardedMap::exclude`]: every
//! such slot's cell gets the exclude flag (no new reader), then the writer
//! parks until the readers inside have left, at most a bound; past it the
//! error names the slot and how many readers hold it
//! ([`GuardError::Drain`]) and every exclusion is released, so nothing
//! changed. Walks hold their slots differently (by announcing the range of a
//! batch, see `announce` and [`GuestReader::walk`]): the writer first closes
//! the walks' gate and then also waits, within the same bound, for walks
//! announcing a slot it deletes. Only after that does the caller delete KVM
//! memslots and discard host memory; then [`Exclusions::commit`] detaches
//! the cells of deleted slots and attaches the cells of created slots,
//! *before* the new map is published ([`Committed::publish`], which opens
//! the gate again after it). Turning dirty logging on or off changes a slot in place and
//! keeps its identity (generation): it takes no memory away, so its readers
//! neither drain nor notice.
//!
//! # Why host memory is never released under a reader
//! A reader holds a reference on a cell whose generation is its slot's. The
//! cell of slot `S` is attached from before `S` is published until after a
//! writer excluded it, drained it and detached it; the owner of the memory
//! (the memory manager's mirror, or the published map for [`GuardedMap::apply`])
//! keeps `S`'s host mapping mapped for that whole time, and discards only
//! memory of slots already detached. So a reference on `S` implies that `S`'s
//! memory is mapped and not discarded until it is released.
//!
//! # Memory ordering
//! Cells carry the refcount lock's orderings (see [`crate::mm::slot_lock`]):
//! attach publishes the identity with a release store of the count, a reader's
//! acquire CAS sees it; a reader's release decrement happens before the
//! writer's teardown. Cells are attached before the map naming them is
//! published (arc-swap store is a release, the reader's load an acquire), so
//! a reader that found a slot in a snapshot finds its cell allocated.
//!
//! # Lock order
//! Slot-map writer lock → cell wait mutex (leaf). A reader holding a
//! [`SlotRef`] must not block on the writer lock: [`GuestReader::acquire`]
//! does when the slot is busy, so call it with no other guard held (or use
//! `try_acquire`); a writer draining a slot held by a blocked reader waits
//! only until its bound and then gives up with the diagnostic.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use vmm::mm::addr::Gpa;
//! use vmm::mm::backing::{BackingKind, HostMapping};
//! use vmm::mm::guard::{GuardError, GuardedMap};
//! use vmm::mm::slot_map::{SlotFlags, SlotMap, SlotMapConfig};
//!
//! let memory = GuardedMap::new(SlotMap::new(SlotMapConfig::default()));
//! let mem = Arc::new(HostMapping::new(&BackingKind::Anon, 0x10_0000).unwrap());
//! let bound = Duration::from_secs(1);
//! memory
//!     .apply(|m| m.plug(Gpa(0x10_0000), 0x10_0000, mem.clone(), 0, SlotFlags::NONE), bound)
//!     .unwrap();
//!
//! let mut reader = memory.reader();
//! {
//!     let slot = reader.try_acquire(Gpa(0x10_8000)).unwrap();
//!     slot.write_u64(Gpa(0x10_8000), 42).unwrap();
//!     assert_eq!(slot.read_u64(Gpa(0x10_8000)).unwrap(), 42);
//!     // While `slot` lives, an unplug of it cannot drain and gives up.
//!     let err = memory
//!         .apply(|m| m.unplug(Gpa(0x10_0000), 0x10_0000), Duration::from_millis(10))
//!         .unwrap_err();
//!     assert!(err.to_string().contains("1 reader(s) still hold it"), "{err}");
//! }
//! memory.apply(|m| m.unplug(Gpa(0x10_0000), 0x10_0000), bound).unwrap();
//! assert_eq!(
//!     reader.try_acquire(Gpa(0x10_8000)).unwrap_err(),
//!     GuardError::Unplugged { gpa: Gpa(0x10_8000) }
//! );
//! ```

mod access;
mod announce;
mod cells;
mod device;
#[cfg(all(test, vmm_shuttle, not(vmm_loom)))]
mod shuttle_tests;
#[cfg(all(test, not(vmm_loom), not(vmm_shuttle)))]
mod tests;
mod walk;
#[cfg(all(test, not(vmm_loom), not(vmm_shuttle)))]
mod walk_cost_tests;
#[cfg(all(test, not(vmm_loom), not(vmm_shuttle)))]
mod walk_tests;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::mm::addr::{Gpa, GpaRange};
use crate::mm::slot_lock::{current_shard, SlotExclusion, SlotLockError};
use crate::mm::slot_map::{
    MemslotChange, SharedSlotMap, Slot, SlotMap, SlotMapError, SlotMapWriter, SnapshotCache,
    Transition,
};

pub use access::SlotRef;
pub use cells::SlotCells;
pub use device::{DeviceMemory, SlotPage};
pub use walk::{Visit, ANNOUNCE_BATCH, WALK_BATCH};

/// How often a reader retries a lookup whose cell changed under it (a writer
/// between detaching and publishing) before it reports the slot busy.
const STALE_RETRIES: u32 = 64;

/// How long a waiting reader ([`GuestReader::acquire`],
/// [`DeviceMemory::access`]) waits for ops changing its slot before it gives
/// up with [`GuardError::Stuck`]: longer than any op's drain bound, so it
/// fires only on a slot left excluded (a writer that panicked mid-op) or on
/// ops that never pause.
pub const READER_WAIT_BOUND: Duration = Duration::from_secs(10);

/// Errors of guarded guest-memory access, reader and writer side.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuardError {
    /// No slot covers the address.
    #[error("guest address {gpa} is not plugged")]
    Unplugged {
        /// The address.
        gpa: Gpa,
    },
    /// A writer is changing the slot (excluded, or detached and not yet
    /// replaced in the published map). Retry, or wait with
    /// [`GuestReader::acquire`].
    #[error("slot {slot} holding guest address {gpa} is being changed")]
    Busy {
        /// The address.
        gpa: Gpa,
        /// The slot id.
        slot: u32,
    },
    /// The access does not fit in the guarded slot.
    #[error("access of {len} bytes at {gpa} leaves slot {slot}")]
    OutOfSlot {
        /// First byte.
        gpa: Gpa,
        /// Length.
        len: u64,
        /// The slot id.
        slot: u32,
    },
    /// A write to a read-only slot.
    #[error("guest address {gpa} is in read-only slot {slot}")]
    ReadOnly {
        /// The address.
        gpa: Gpa,
        /// The slot id.
        slot: u32,
    },
    /// An 8-byte access at an address that is not 8-byte aligned.
    #[error("u64 access at unaligned guest address {gpa}")]
    Unaligned {
        /// The address.
        gpa: Gpa,
    },
    /// The reference count of a slot is saturated.
    #[error("slot {slot} has too many readers")]
    TooManyReaders {
        /// The slot id.
        slot: u32,
    },
    /// Readers did not leave a slot the writer must change within its bound:
    /// the change was not made.
    #[error("change refused, nothing changed: {0}")]
    Drain(SlotLockError),
    /// A cell was not in the state the transition expects (a writer bug:
    /// writers not serialized, or a transition from another map).
    #[error("slot cell out of step with the map: {0}")]
    Cell(SlotLockError),
    /// The slot map refused the op (from [`GuardedMap::apply`]).
    #[error(transparent)]
    SlotMap(#[from] SlotMapError),
    /// A device access crosses a page boundary (device accesses go page by
    /// page through the translation cache).
    #[error("device access of {len} bytes at {gpa} crosses a page boundary")]
    CrossesPage {
        /// First byte.
        gpa: Gpa,
        /// Length.
        len: u64,
    },
    /// A slot stayed excluded past a waiting reader's bound
    /// ([`READER_WAIT_BOUND`]): a writer left it excluded, or ops on it never
    /// paused.
    #[error("slot {slot} holding guest address {gpa} stayed excluded for {waited:?} (reader bound {bound:?}): a writer left it excluded or never paused")]
    Stuck {
        /// The address.
        gpa: Gpa,
        /// The slot id.
        slot: u32,
        /// How long the reader waited.
        waited: Duration,
        /// The bound.
        bound: Duration,
    },
    /// The translation cache failed (not an unplugged page).
    #[error("translation cache: {0}")]
    Cache(String),
    /// Releasing host memory failed after the op was published.
    #[error("op applied, but discarding host memory failed: {0}")]
    Discard(String),
}

/// The published slot map plus one refcount lock per slot.
pub struct GuardedMap {
    shared: SharedSlotMap,
    cells: SlotCells,
    /// The walks' announcements and the writers' gate ([`announce`]).
    walks: announce::Announcements,
}

impl fmt::Debug for GuardedMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuardedMap")
            .field("shared", &self.shared)
            .field("cells", &self.cells)
            .field("walks", &self.walks)
            .finish()
    }
}

/// What one lookup attempt found.
enum Attempt<'a> {
    Got(SlotRef<'a>),
    /// The cell changed since the snapshot: reload and try again.
    Again {
        slot: u32,
    },
    Failed(GuardError),
}

impl GuardedMap {
    /// Publishes `map` and attaches a cell for each of its slots.
    pub fn new(map: SlotMap) -> Self {
        let cells = SlotCells::new(map.config().max_slots);
        for slot in map.iter() {
            // A fresh table: every cell is detached, so attach cannot fail.
            let _ = cells.attach(slot);
        }
        Self {
            shared: SharedSlotMap::new(map),
            cells,
            walks: announce::Announcements::new(),
        }
    }

    /// The published map and its writer lock: the low-level writer API
    /// (`begin_write`, then [`exclude`](Self::exclude),
    /// [`Exclusions::commit`] and [`Committed::publish`]). Publishing a map
    /// without committing its cells leaves its new slots unreachable to
    /// guards; publishing it other than through [`Committed::publish`]
    /// leaves walks counting every slot (the gate stays closed).
    pub fn shared(&self) -> &SharedSlotMap {
        &self.shared
    }

    /// Blocks until no writer holds the slot-map writer lock (the op in
    /// flight, if any, is over). Must not be called while holding a
    /// [`SlotRef`] (see the module docs).
    pub fn wait_for_writer(&self) {
        drop(self.shared.begin_write());
    }

    /// Waits for the op changing a slot a caller (waiting since
    /// `waiting_since`) wants: on the writer lock, and, once the wait has
    /// lasted a millisecond, a short sleep too, so a slot left excluded (a
    /// writer that panicked) costs its waiter little CPU until the caller's
    /// bound. Must not be called while holding a [`SlotRef`].
    pub fn wait_for_op(&self, waiting_since: Instant) {
        self.wait_for_writer();
        if waiting_since.elapsed() > Duration::from_millis(1) {
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// The cells, by slot id.
    pub fn cells(&self) -> &SlotCells {
        &self.cells
    }

    /// A snapshot of the published map. Lock-free.
    pub fn load(&self) -> Arc<SlotMap> {
        self.shared.load()
    }

    /// A per-thread reader with a cached snapshot (the fastest way to take
    /// guards repeatedly).
    pub fn reader(&self) -> GuestReader<'_> {
        GuestReader {
            map: self,
            cache: self.shared.cache(),
            shard: current_shard(),
        }
    }

    /// A guard on the slot holding `gpa`, without waiting. Lock-free.
    ///
    /// # Errors
    /// [`Unplugged`](GuardError::Unplugged), or
    /// [`Busy`](GuardError::Busy) while a writer changes the slot.
    pub fn try_acquire(&self, gpa: Gpa) -> Result<SlotRef<'_>, GuardError> {
        let mut last = 0;
        let shard = current_shard();
        for _ in 0..STALE_RETRIES {
            let snapshot = self.shared.load_guard();
            match self.attempt(&snapshot, gpa, shard) {
                Attempt::Got(r) => return Ok(r),
                Attempt::Failed(e) => return Err(e),
                Attempt::Again { slot } => last = slot,
            }
        }
        Err(GuardError::Busy { gpa, slot: last })
    }

    /// One try on `map`, on count-word `shard`.
    #[inline]
    fn attempt(&self, map: &SlotMap, gpa: Gpa, shard: usize) -> Attempt<'_> {
        let Some(slot) = map.lookup(gpa) else {
            return Attempt::Failed(GuardError::Unplugged { gpa });
        };
        let id = slot.id().0;
        let Some(cell) = self.cells.get(id) else {
            return Attempt::Again { slot: id };
        };
        match cell.read_on(shard, slot.generation(), gpa) {
            Ok(guard) => Attempt::Got(SlotRef::new(guard, slot)),
            Err(SlotLockError::Excluded { .. }) => {
                Attempt::Failed(GuardError::Busy { gpa, slot: id })
            }
            Err(SlotLockError::TooManyReaders { .. }) => {
                Attempt::Failed(GuardError::TooManyReaders { slot: id })
            }
            // Detached, recycled or reshaped since the snapshot.
            Err(_) => Attempt::Again { slot: id },
        }
    }

    /// Writer side, under the slot-map writer lock, before any teardown:
    /// excludes readers from every slot that `changes` deletes or changes,
    /// and waits (at most `bound` in total) until the readers inside left.
    ///
    /// # Errors
    /// [`GuardError::Drain`] naming the first slot still held and its
    /// readers; every exclusion taken is released again (nothing changed).
    /// [`GuardError::Cell`] if a cell is not attached as the map says.
    pub fn exclude(
        &self,
        changes: &[MemslotChange],
        bound: Duration,
    ) -> Result<Exclusions<'_>, GuardError> {
        let deleted: Vec<&Slot> = changes
            .iter()
            .filter_map(|change| match change {
                MemslotChange::Delete { slot } => Some(slot),
                // Dirty logging on or off: same memory, same identity; no
                // reader needs to leave.
                MemslotChange::SetFlags { .. } | MemslotChange::Create { .. } => None,
            })
            .collect();
        let mut exclusions = Exclusions {
            map: self,
            held: Vec::with_capacity(deleted.len()),
            waited: Duration::ZERO,
            gate_closed: false,
        };
        if deleted.is_empty() {
            return Ok(exclusions);
        }
        // Walks announced from here on count their slots (module docs of
        // `announce`); the gate stays closed until the new map is published.
        self.walks.close_gate();
        exclusions.gate_closed = true;
        for slot in &deleted {
            let cell =
                self.cells
                    .get(slot.id().0)
                    .ok_or(GuardError::Cell(SlotLockError::Detached {
                        slot: slot.id().0,
                    }))?;
            exclusions
                .held
                .push(cell.exclude().map_err(GuardError::Cell)?);
        }
        // The clock starts at the first slot found with readers inside: an
        // op whose slots are all drained already reads no clock.
        let mut started: Option<Instant> = None;
        for ex in exclusions
            .held
            .iter_mut()
            .filter(|_| !crate::mutants::on("drain-skipped"))
        {
            if ex.is_drained() {
                continue;
            }
            let since = *started.get_or_insert_with(Instant::now);
            let left = bound.saturating_sub(since.elapsed());
            ex.wait_drained(left).map_err(GuardError::Drain)?;
        }
        // Then the walks that announced a deleted slot before the gate
        // closed: they hold it until they move on.
        if !crate::mutants::on("drain-skipped") {
            let ranges: Vec<GpaRange> = deleted.iter().map(|s| s.range()).collect();
            let since = *started.get_or_insert_with(Instant::now);
            let left = bound.saturating_sub(since.elapsed());
            if let Err((walks, held)) = self.walks.wait_for_walks(&ranges, left) {
                return Err(GuardError::Drain(SlotLockError::DrainTimeout {
                    slot: deleted[held].id().0,
                    readers: walks,
                    waited: since.elapsed(),
                    bound,
                }));
            }
        }
        exclusions.waited = started.map_or(Duration::ZERO, |s| s.elapsed());
        Ok(exclusions)
    }

    /// Applies `op` to the published map with no KVM to keep in sync (pure
    /// users, tests): exclude and drain, commit the cells, publish, then
    /// discard host memory the map no longer uses.
    ///
    /// # Errors
    /// The op's [`SlotMapError`], or [`GuardError::Drain`] (nothing changed).
    pub fn apply<F>(&self, op: F, bound: Duration) -> Result<Transition, GuardError>
    where
        F: FnOnce(&SlotMap) -> Result<Transition, SlotMapError>,
    {
        let mut writer = self.shared.begin_write();
        let t = op(&writer.map())?;
        let exclusions = self.exclude(&t.changes, bound)?;
        exclusions
            .commit(&t.changes)?
            .publish(&mut writer, t.map.clone());
        // Still under the writer lock (as the memory manager): the cells of the
        // slots that used this memory are detached, nobody can hold it.
        for d in &t.discards {
            d.mapping
                .discard(d.offset, d.len)
                .map_err(|e| GuardError::Discard(e.to_string()))?;
        }
        Ok(t)
    }
}

/// The exclusions a writer holds for one transition (see
/// [`GuardedMap::exclude`]). Dropping it without
/// [`commit`](Self::commit) releases them (the change was abandoned or rolled
/// back: the cells keep their old slots).
#[must_use = "dropping the exclusions lets readers in again"]
pub struct Exclusions<'a> {
    map: &'a GuardedMap,
    held: Vec<SlotExclusion<'a>>,
    waited: Duration,
    /// Whether this op closed the walks' gate (it deletes a slot).
    gate_closed: bool,
}

impl Drop for Exclusions<'_> {
    fn drop(&mut self) {
        if !self.gate_closed {
            return;
        }
        if std::thread::panicking() {
            // The slots stay excluded (poisoned, see `slot_lock`), and so
            // must walks stay out of them: for good.
            self.map.walks.poison_gate();
        } else {
            // Abandoned (not committed): the old map stays published and
            // its slots keep their cells, so walks may trust it again. The
            // held exclusions are released after this, as the fields drop.
            self.map.walks.open_gate();
        }
    }
}

/// An op whose cells are committed (see [`Exclusions::commit`]): publish its
/// map with [`publish`](Self::publish), which opens the walks' gate after
/// it. Dropped unpublished, it poisons the gate: the published map still
/// names slots whose cells are detached, so walks count every slot (their
/// cells refuse them) from then on, whatever later ops do.
#[must_use = "publish the committed map with `Committed::publish`"]
#[derive(Debug)]
pub struct Committed<'a> {
    map: &'a GuardedMap,
    gate_closed: bool,
}

impl Committed<'_> {
    /// Publishes `map` (the op's new map) through `writer`, then lets walks
    /// trust snapshots again (the gate opens only once no published map
    /// names a slot the op deleted).
    pub fn publish(mut self, writer: &mut SlotMapWriter<'_>, map: SlotMap) {
        writer.publish(map);
        if std::mem::replace(&mut self.gate_closed, false) {
            self.map.walks.open_gate();
        }
    }
}

impl Drop for Committed<'_> {
    fn drop(&mut self) {
        if self.gate_closed {
            self.map.walks.poison_gate();
        }
    }
}

impl fmt::Debug for Exclusions<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Exclusions")
            .field("slots", &self.held.len())
            .field("waited", &self.waited)
            .finish()
    }
}

impl<'a> Exclusions<'a> {
    /// How long the writer waited for readers.
    pub fn waited(&self) -> Duration {
        self.waited
    }

    /// Number of slots excluded.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether no slot is excluded.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// After the teardown succeeded, before publishing the new map: detaches
    /// the cells of deleted slots and attaches created slots (a dirty-log
    /// change keeps its slot's identity, so its cell is untouched).
    ///
    /// # Errors
    /// [`GuardError::Cell`]: the cells were not in the state `changes`
    /// expects (only if `changes` is not the transition that was excluded).
    pub fn commit(mut self, changes: &[MemslotChange]) -> Result<Committed<'a>, GuardError> {
        let map = self.map;
        let mut held = std::mem::take(&mut self.held);
        // From here the gate is the committed op's to open (after publish);
        // on an error below it stays closed (the cells are out of step).
        let committed = Committed {
            map,
            gate_closed: std::mem::replace(&mut self.gate_closed, false),
        };
        for change in changes {
            let MemslotChange::Delete { slot } = change else {
                continue; // creates below; flag changes keep their cell
            };
            let pos = held
                .iter()
                .position(|ex| ex.slot_id() == slot.id().0)
                .ok_or(GuardError::Cell(SlotLockError::Detached {
                    slot: slot.id().0,
                }))?;
            held.swap_remove(pos).detach().map_err(GuardError::Cell)?;
        }
        for change in changes {
            if let MemslotChange::Create { slot } = change {
                map.cells.attach(slot).map_err(GuardError::Cell)?;
            }
        }
        Ok(committed)
    }
}

/// A reader with a cached snapshot of the map; one per thread.
pub struct GuestReader<'a> {
    map: &'a GuardedMap,
    cache: SnapshotCache<'a>,
    /// This thread's count-word shard, looked up once.
    shard: usize,
}

impl fmt::Debug for GuestReader<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestReader").finish_non_exhaustive()
    }
}

impl<'a> GuestReader<'a> {
    /// A guard on the slot holding `gpa`, without waiting. Lock-free: one
    /// atomic load (the cached snapshot), an O(log n) lookup, one CAS.
    ///
    /// # Errors
    /// As [`GuardedMap::try_acquire`].
    #[inline]
    pub fn try_acquire(&mut self, gpa: Gpa) -> Result<SlotRef<'a>, GuardError> {
        let map = self.map;
        let mut last = 0;
        for _ in 0..STALE_RETRIES {
            match map.attempt(self.cache.load(), gpa, self.shard) {
                Attempt::Got(r) => return Ok(r),
                Attempt::Failed(e) => return Err(e),
                Attempt::Again { slot } => last = slot,
            }
        }
        Err(GuardError::Busy { gpa, slot: last })
    }

    /// As [`try_acquire`](Self::try_acquire), but while a writer changes the
    /// slot, waits for that op to finish (on the writer lock) and looks
    /// again, so the answer reflects the map after the op. Must not be called
    /// while holding another [`SlotRef`] (see the module docs).
    ///
    /// # Errors
    /// [`Unplugged`](GuardError::Unplugged) (after any op in flight),
    /// [`TooManyReaders`](GuardError::TooManyReaders),
    /// [`Stuck`](GuardError::Stuck) after [`READER_WAIT_BOUND`].
    pub fn acquire(&mut self, gpa: Gpa) -> Result<SlotRef<'a>, GuardError> {
        self.acquire_within(gpa, READER_WAIT_BOUND)
    }

    /// As [`acquire`](Self::acquire), giving up after `bound`.
    ///
    /// # Errors
    /// As [`acquire`](Self::acquire), and [`Stuck`](GuardError::Stuck) past
    /// the bound.
    pub fn acquire_within(&mut self, gpa: Gpa, bound: Duration) -> Result<SlotRef<'a>, GuardError> {
        // The common case takes no clock reading: only a busy slot starts
        // the wait (a clock read is tens of ns, more in a nested guest).
        match self.try_acquire(gpa) {
            Err(GuardError::Busy { .. }) => {}
            other => return other,
        }
        let started = Instant::now();
        loop {
            match self.try_acquire(gpa) {
                Err(GuardError::Busy { slot, .. }) if started.elapsed() >= bound => {
                    return Err(GuardError::Stuck {
                        gpa,
                        slot,
                        waited: started.elapsed(),
                        bound,
                    })
                }
                Err(GuardError::Busy { .. }) => self.map.wait_for_op(started),
                other => return other,
            }
        }
    }
}
