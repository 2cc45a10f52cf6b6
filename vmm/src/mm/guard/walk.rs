//! Walking a guest-physical range slot by slot: [`GuestReader::walk`].
//!
//! A host pass over many slots (a device scanning a buffer list, a migration
//! pass, the memslots bench's rw pass) could take one guard per slot with
//! [`GuestReader::acquire`], which looks every slot up from the root of the
//! map's B-tree. The walk instead holds one snapshot and moves through its
//! slots in address order with the map's range iterator, as the kernel's
//! `for_each_vma_range` walks a maple tree from one position: one seek per
//! snapshot, not per slot.
//!
//! Each slot is admitted exactly as [`GuestReader::try_acquire`] admits it:
//! increment-if-not-zero-and-not-excluded on the slot's cell, then
//! re-validation that the cell still holds the snapshot's slot object
//! (generation) and covers the address. So a snapshot older than the cell is
//! harmless: a slot deleted since, or its cell recycled for another slot, is
//! refused by the validation, and the walk reloads the map and seeks again
//! from where it stood. A slot a writer excludes is refused by the CAS, and
//! the walk waits for that op (on the writer lock, as `acquire` does) and
//! then continues on the map published after it; a slot deleted mid-walk is
//! therefore never visited after its exclusion. A hole is reported only
//! after checking that no map was published since the snapshot (else the
//! walk reloads first), so a hole is one the current map has too, at the
//! time it is reported.
//!
//! Slots are admitted a batch ([`WALK_BATCH`]) ahead of the visitor and
//! released together after it, the next batch's count words prefetched while
//! the current one is visited (see [`WALK_BATCH`]). Before visiting an
//! admitted slot the walk looks whether a writer has excluded it since
//! ([`SlotRef`]'s `exclusion_seen`); if so it lets the batch go and waits for
//! that op, so a writer's drain waits for at most the rest of a batch, and a
//! slot is not visited after an exclusion the walker can see. The visitor gets
//! each guard by reference; the walk holds no guard while it waits on the
//! writer lock, and the visitor must not block on it either (it runs with up
//! to a batch of guards held).

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{GuardError, GuardedMap, GuestReader, SlotRef, READER_WAIT_BOUND, STALE_RETRIES};
use crate::mm::addr::{Gpa, GpaRange};
use crate::mm::slot_lock::{SlotCell, SlotLockError, SlotReadGuard};
use crate::mm::slot_map::Slot;

/// What a walk meets, in ascending address order.
#[derive(Debug)]
pub enum Visit<'r, 'a> {
    /// A plugged slot, guarded for the duration of the call: its memory stays
    /// mapped until the visitor returns.
    Slot {
        /// The guard on the slot.
        slot: &'r SlotRef<'a>,
        /// The part of the walked range inside this slot.
        part: GpaRange,
    },
    /// A part of the walked range that no slot covers.
    Hole(GpaRange),
}

/// How the walk takes a reader reference on a slot's cell: the cell, the
/// reader's shard, the snapshot's generation, the address. The real one is
/// [`SlotCell::read_on`]; the models swap in broken ones.
pub(super) type Admit =
    for<'c> fn(&'c SlotCell, usize, u64, Gpa) -> Result<SlotReadGuard<'c>, SlotLockError>;

/// Why the walk left a snapshot.
enum Leave {
    /// A newer map was published (found at a hole): reload and go on.
    Newer,
    /// The cell changed since the snapshot: reload and try again.
    Stale { slot: u32 },
    /// A writer excludes the slot: wait for its op, then reload.
    Busy { slot: u32 },
    /// The slot's count is saturated.
    TooManyReaders { slot: u32 },
}

/// Slots a walk admits ahead of its visitor: their guards are taken
/// together, the slots visited in order, and the guards released together.
/// A reference count's increment and decrement are locked instructions,
/// which on x86 wait for every earlier load and store to complete; taken
/// one slot at a time they would stop the host's accesses to the previous
/// slot from overlapping with the next slot's, twice per slot.
pub const WALK_BATCH: usize = 16;

impl<'a> GuestReader<'a> {
    /// Visits `range` in ascending address order: every slot overlapping it
    /// (guarded while `visit` runs, with the part of `range` it holds; up to
    /// [`WALK_BATCH`] slots ahead are guarded too) and
    /// every hole between them, until the end or until `visit` breaks. While
    /// a writer changes a slot the walk reaches, it waits for that op (as
    /// [`acquire`](Self::acquire)) and continues on the map published after
    /// it. Must not be called while holding another [`SlotRef`] (see the
    /// module docs of [`crate::mm::guard`]).
    ///
    /// # Errors
    /// [`TooManyReaders`](GuardError::TooManyReaders),
    /// [`Stuck`](GuardError::Stuck) after [`READER_WAIT_BOUND`] on one slot.
    ///
    /// ```
    /// use std::ops::ControlFlow;
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use vmm::mm::addr::{Gpa, GpaRange};
    /// use vmm::mm::backing::{BackingKind, HostMapping};
    /// use vmm::mm::guard::{GuardedMap, Visit};
    /// use vmm::mm::slot_map::{SlotFlags, SlotMap, SlotMapConfig};
    ///
    /// let memory = GuardedMap::new(SlotMap::new(SlotMapConfig::default()));
    /// let mem = Arc::new(HostMapping::new(&BackingKind::Anon, 0x4000).unwrap());
    /// let bound = Duration::from_secs(1);
    /// for (gpa, offset) in [(0x10_0000, 0), (0x10_2000, 0x2000)] {
    ///     let plug = |m: &SlotMap| m.plug(Gpa(gpa), 0x1000, mem.clone(), offset, SlotFlags::NONE);
    ///     memory.apply(plug, bound).unwrap();
    /// }
    /// let mut seen = Vec::new();
    /// let range = GpaRange::new(Gpa(0x10_0000), 0x3000).unwrap();
    /// let flow = memory.reader().walk(range, |visit| {
    ///     match visit {
    ///         Visit::Slot { slot, part } => {
    ///             slot.write_u64(part.start(), 7).unwrap();
    ///             seen.push(("slot", part.start().0));
    ///         }
    ///         Visit::Hole(hole) => seen.push(("hole", hole.start().0)),
    ///     }
    ///     ControlFlow::<()>::Continue(())
    /// });
    /// assert_eq!(flow.unwrap(), ControlFlow::Continue(()));
    /// assert_eq!(seen, [("slot", 0x10_0000), ("hole", 0x10_1000), ("slot", 0x10_2000)]);
    /// ```
    pub fn walk<B>(
        &mut self,
        range: GpaRange,
        visit: impl FnMut(Visit<'_, 'a>) -> ControlFlow<B>,
    ) -> Result<ControlFlow<B>, GuardError> {
        self.walk_within(range, READER_WAIT_BOUND, visit)
    }

    /// As [`walk`](Self::walk), giving up after waiting `bound` for one slot.
    ///
    /// # Errors
    /// As [`walk`](Self::walk), with [`Stuck`](GuardError::Stuck) past `bound`.
    pub fn walk_within<B>(
        &mut self,
        range: GpaRange,
        bound: Duration,
        visit: impl FnMut(Visit<'_, 'a>) -> ControlFlow<B>,
    ) -> Result<ControlFlow<B>, GuardError> {
        self.walk_with(range, bound, SlotCell::read_on, visit)
    }

    /// The walk, admitting slots with `admit`.
    pub(super) fn walk_with<B>(
        &mut self,
        range: GpaRange,
        bound: Duration,
        admit: Admit,
        mut visit: impl FnMut(Visit<'_, 'a>) -> ControlFlow<B>,
    ) -> Result<ControlFlow<B>, GuardError> {
        let map = self.map;
        let shard = self.shard;
        let end = range.end();
        // Everything below `at` has been visited.
        let mut at = range.start();
        let mut stale = 0;
        let mut waiting_since: Option<Instant> = None;
        let mut batch: Vec<Entry<'a>> = Vec::with_capacity(WALK_BATCH);
        while at < end {
            let snapshot = Arc::clone(self.cache.load());
            let rest = GpaRange::from_bounds(at, end).expect("at < end");
            let mut slots = snapshot.slots_in(rest);
            // The next batch's slots, their count words already being
            // fetched: gathered before the current batch is visited, so the
            // fetches overlap with each other and with the visits, where one
            // admission after another would wait for each line in turn.
            let mut ahead = Vec::with_capacity(WALK_BATCH);
            let mut exhausted = gather(&mut slots, &mut ahead, map, shard);
            // Everything below `queued` is visited or in the batch.
            let mut queued = at;
            let mut leave = None;
            while leave.is_none() && queued < end {
                // Admit the gathered slots (and note the holes between them).
                for slot in ahead.drain(..) {
                    let start = slot.range().start();
                    if start > queued {
                        let hole = GpaRange::from_bounds(queued, start).expect("queued < start");
                        batch.push(Entry::Hole(hole));
                        queued = start;
                    }
                    let id = slot.id().0;
                    let Some(cell) = map.cells.get(id) else {
                        leave = Some(Leave::Stale { slot: id });
                        break;
                    };
                    match admit(cell, shard, slot.generation(), queued) {
                        Ok(guard) => {
                            let part_end = slot.range().end().min(end);
                            let part =
                                GpaRange::from_bounds(queued, part_end).expect("queued < slot end");
                            batch.push(Entry::Slot(SlotRef::new(guard, slot), part));
                            queued = part_end;
                        }
                        Err(SlotLockError::Excluded { .. }) => {
                            leave = Some(Leave::Busy { slot: id });
                            break;
                        }
                        Err(SlotLockError::TooManyReaders { .. }) => {
                            leave = Some(Leave::TooManyReaders { slot: id });
                            break;
                        }
                        // Detached, recycled or reshaped since the snapshot.
                        Err(_) => {
                            leave = Some(Leave::Stale { slot: id });
                            break;
                        }
                    }
                }
                ahead.clear();
                if exhausted && leave.is_none() && queued < end {
                    let hole = GpaRange::from_bounds(queued, end).expect("queued < end");
                    batch.push(Entry::Hole(hole));
                    queued = end;
                }
                if leave.is_none() && !exhausted {
                    exhausted = gather(&mut slots, &mut ahead, map, shard);
                }
                // Visit the batch in order; its guards are released together
                // afterwards.
                let mut flow = ControlFlow::Continue(());
                for entry in &batch {
                    flow = match entry {
                        Entry::Hole(hole) => {
                            if !Arc::ptr_eq(self.cache.load(), &snapshot) {
                                leave = Some(Leave::Newer);
                                break;
                            }
                            visit(Visit::Hole(*hole))
                        }
                        Entry::Slot(slot, part) => {
                            if slot.exclusion_seen() {
                                // Admitted before a writer excluded it: step
                                // back rather than visit it now.
                                leave = Some(Leave::Busy {
                                    slot: slot.slot_id(),
                                });
                                break;
                            }
                            stale = 0;
                            waiting_since = None;
                            visit(Visit::Slot { slot, part: *part })
                        }
                    };
                    at = entry.range().end();
                    if flow.is_break() {
                        break;
                    }
                }
                batch.clear();
                if let ControlFlow::Break(b) = flow {
                    return Ok(ControlFlow::Break(b));
                }
            }
            drop(ahead);
            drop(slots);
            let busy = match leave {
                None | Some(Leave::Newer) => continue,
                Some(Leave::TooManyReaders { slot }) => {
                    return Err(GuardError::TooManyReaders { slot })
                }
                Some(Leave::Stale { slot }) => {
                    stale += 1;
                    if stale < STALE_RETRIES {
                        continue;
                    }
                    slot
                }
                Some(Leave::Busy { slot }) => slot,
            };
            // As `acquire_within`: wait for the op changing the slot.
            let since = *waiting_since.get_or_insert_with(Instant::now);
            let waited = since.elapsed();
            if waited >= bound {
                return Err(GuardError::Stuck {
                    gpa: at,
                    slot: busy,
                    waited,
                    bound,
                });
            }
            stale = 0;
            drop(snapshot);
            map.wait_for_op(since);
        }
        Ok(ControlFlow::Continue(()))
    }
}

/// Takes the next batch of `slots` into `ahead` (empty) and starts fetching
/// their cells' count words on `shard`; returns whether `slots` ran out.
fn gather<'s>(
    slots: &mut impl Iterator<Item = &'s Slot>,
    ahead: &mut Vec<&'s Slot>,
    map: &GuardedMap,
    shard: usize,
) -> bool {
    ahead.extend(slots.take(WALK_BATCH));
    for slot in ahead.iter() {
        if let Some(cell) = map.cells.get(slot.id().0) {
            cell.prefetch(shard);
        }
    }
    ahead.len() < WALK_BATCH
}

/// One step of a batch: a slot admitted (guard and part of the range) or a
/// hole.
enum Entry<'a> {
    Slot(SlotRef<'a>, GpaRange),
    Hole(GpaRange),
}

impl Entry<'_> {
    fn range(&self) -> GpaRange {
        match self {
            Entry::Slot(_, part) | Entry::Hole(part) => *part,
        }
    }
}
