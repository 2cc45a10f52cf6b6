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
//! # How a batch is held
//! Slots are gathered a batch at a time and held in one of two ways:
//!
//! - **Announced** (the common case): the walk stores the batch's span in
//!   its announcement entry and, if no writer is between excluding slots
//!   and publishing (the gate is open) and its snapshot is still the
//!   published map, visits the batch ([`ANNOUNCE_BATCH`] slots) with no
//!   per-slot atomic at all: a writer deleting one of them waits until the
//!   walk has moved on (see `announce` for the protocol and why it is
//!   sound). The batch is gathered as references into the snapshot, and
//!   each slot's record is read only as the slot is visited, so a record
//!   that has left the cache is fetched while the previous slot's memory
//!   accesses are in flight (docs/bench-memslots.md).
//! - **Counted** (while a writer's op runs, or with every announcement
//!   entry taken): each slot is admitted exactly as
//!   [`GuestReader::try_acquire`] admits it: increment-if-not-zero-and-not-
//!   excluded on the slot's cell, then re-validation that the cell still
//!   holds the snapshot's slot object (generation) and covers the address.
//!   So a snapshot older than the cell is harmless: a slot deleted since,
//!   or its cell recycled for another slot, is refused by the validation,
//!   and the walk reloads the map and seeks again from where it stood. A
//!   slot a writer excludes is refused by the CAS, and the walk waits for
//!   that op (on the writer lock, as `acquire` does, its announcement
//!   withdrawn) and then continues on the map published after it; a slot
//!   deleted mid-walk is therefore never visited after its exclusion.
//!   Counted batches are [`WALK_BATCH`] slots, their count words
//!   prefetched while the previous batch is visited, released together
//!   after it; before visiting each counted slot, the walk looks whether
//!   a writer has excluded it since ([`SlotRef`]'s `exclusion_seen`) and
//!   if so lets the batch go there, so a writer's drain waits for at most
//!   one batch.
//!
//! A hole is reported only after checking that no map was published since
//! the snapshot (else the walk reloads first), so a hole is one the current
//! map has too, at the time it is reported. The visitor gets each guard by
//! reference; the walk holds no guard while it waits on the writer lock,
//! and the visitor must not block on it either (it runs with a batch held).

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

/// Slots a counted batch holds: their guards are taken together, the slots
/// visited in order, and the guards released together.
/// A reference count's increment and decrement are locked instructions,
/// which on x86 wait for every earlier load and store to complete; taken
/// one slot at a time they would stop the host's accesses to the previous
/// slot from overlapping with the next slot's, twice per slot.
pub const WALK_BATCH: usize = 16;

/// Slots a walk announces at once (see [`crate::mm::guard`]'s `announce`):
/// a writer deleting one of them waits until the walk has visited them all,
/// so this bounds that wait to one batch of visits (tens of microseconds
/// for a pass over small slots' pages; a visitor that makes a system call
/// per slot makes it longer); larger batches spread the announcement's
/// fence over more slots.
pub const ANNOUNCE_BATCH: usize = 256;

impl<'a> GuestReader<'a> {
    /// Visits `range` in ascending address order: every slot overlapping it
    /// (guarded while `visit` runs, with the part of `range` it holds; the
    /// rest of its batch is guarded too) and every hole between them, until
    /// the end or until `visit` breaks. While a writer changes a slot the
    /// walk reaches, it waits for that op (as [`acquire`](Self::acquire))
    /// and continues on the map published after it. Must not be called while
    /// holding another [`SlotRef`] (see the module docs of
    /// [`crate::mm::guard`]).
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

    /// The walk, admitting counted slots with `admit`.
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
        // A counted batch's steps (announced batches are visited from the
        // gathered slots themselves).
        let mut batch: Vec<WalkStep<'a>> = Vec::new();
        // The walk's announcement entry, if one is free: a batch is then
        // held by announcing its span instead of counting each slot.
        let claim = map.walks.claim();
        // Whether the last batch was counted: only then are the next
        // batch's count words worth fetching ahead.
        let mut counting = claim.is_none();
        while at < end {
            let snapshot = Arc::clone(self.cache.load());
            let rest = GpaRange::from_bounds(at, end).expect("at < end");
            let mut slots = snapshot.slots_in(rest);
            // The next batch's slots (for a counted batch, their count
            // words already being fetched): gathered before the current
            // batch is visited, so the fetches overlap with each other and
            // with the visits, where one admission after another would wait
            // for each line in turn.
            let mut ahead = Vec::with_capacity(ANNOUNCE_BATCH);
            let mut exhausted = gather(&mut slots, &mut ahead, map, shard, counting);
            // Everything below `queued` is visited or in the batch.
            let mut queued = at;
            let mut leave = None;
            while leave.is_none() && queued < end {
                // Hold the gathered slots: by announcing their span, if the
                // gate is open and the snapshot is still the published map
                // (module docs of `announce`), else by counting each.
                let announced = match (&claim, ahead.last()) {
                    (Some(claim), Some(last)) => {
                        let span = GpaRange::from_bounds(queued, last.range().end().min(end))
                            .expect("the batch's last slot ends past queued");
                        let open = claim.announce(span);
                        if open && !Arc::ptr_eq(self.cache.load(), &snapshot) {
                            // A map was published since the snapshot: reload
                            // and announce on it, rather than count the rest.
                            claim.withdraw();
                            leave = Some(Leave::Newer);
                            break;
                        }
                        if !open {
                            claim.withdraw();
                        }
                        open
                    }
                    (Some(claim), None) => {
                        // Only the trailing hole is left: nothing to hold.
                        claim.withdraw();
                        false
                    }
                    (None, _) => false,
                };
                counting = !announced;
                let last_batch = exhausted;
                if announced {
                    let cache = &mut self.cache;
                    let fresh = || Arc::ptr_eq(cache.load(), &snapshot);
                    let (to, done) =
                        match visit_announced(&ahead, queued, end, last_batch, fresh, &mut visit) {
                            Announced::Visited { to, slots } => (to, slots),
                            Announced::Newer { to, slots } => {
                                leave = Some(Leave::Newer);
                                (to, slots)
                            }
                            Announced::Break(b) => return Ok(ControlFlow::Break(b)),
                        };
                    if done {
                        stale = 0;
                        waiting_since = None;
                    }
                    (at, queued) = (to, to);
                    ahead.clear();
                    if leave.is_none() && !exhausted {
                        exhausted = gather(&mut slots, &mut ahead, map, shard, counting);
                    }
                    continue;
                }
                for slot in ahead.drain(..) {
                    let start = slot.range().start();
                    if start > queued {
                        let hole = GpaRange::from_bounds(queued, start).expect("queued < start");
                        batch.push(WalkStep::Hole(hole));
                        queued = start;
                    }
                    let part_end = slot.range().end().min(end);
                    let part = GpaRange::from_bounds(queued, part_end).expect("queued < slot end");
                    let id = slot.id().0;
                    let Some(cell) = map.cells.get(id) else {
                        leave = Some(Leave::Stale { slot: id });
                        break;
                    };
                    match admit(cell, shard, slot.generation(), queued) {
                        Ok(guard) => {
                            batch.push(WalkStep::Slot {
                                slot: SlotRef::new(guard, slot),
                                part,
                            });
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
                if last_batch && leave.is_none() && queued < end {
                    let hole = GpaRange::from_bounds(queued, end).expect("queued < end");
                    batch.push(WalkStep::Hole(hole));
                    queued = end;
                }
                if leave.is_none() && !exhausted {
                    exhausted = gather(&mut slots, &mut ahead, map, shard, counting);
                }
                // Visit the batch's steps while they may still be: up to a
                // hole if a newer map was published (its slot may fill it),
                // and up to a slot a writer excluded since its admission
                // (step back rather than make the writer wait for it).
                for step in &batch {
                    let stop = match step {
                        // Looked at for every hole: the visits before it
                        // may have let a writer publish a map filling it.
                        WalkStep::Hole(_) => {
                            (!Arc::ptr_eq(self.cache.load(), &snapshot)).then_some(Leave::Newer)
                        }
                        WalkStep::Slot { slot, .. } => slot.exclusion_seen().then(|| Leave::Busy {
                            slot: slot.slot_id(),
                        }),
                    };
                    if let Some(stop) = stop {
                        leave = Some(stop);
                        break;
                    }
                    if let WalkStep::Slot { .. } = step {
                        stale = 0;
                        waiting_since = None;
                    }
                    if let ControlFlow::Break(b) = visit(step.visit()) {
                        return Ok(ControlFlow::Break(b));
                    }
                    at = step.range().end();
                }
                // The guards of a counted batch are released together.
                batch.clear();
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
            // Never wait on the writer while announcing: it may be waiting
            // for this walk to move on.
            if let Some(claim) = &claim {
                claim.withdraw();
            }
            map.wait_for_op(since);
        }
        Ok(ControlFlow::Continue(()))
    }
}

/// How far the visit of an announced batch got.
enum Announced<B> {
    /// Everything up to `to`; `slots`: whether a slot was among it.
    Visited { to: Gpa, slots: bool },
    /// Everything up to `to`, where a hole begins that a map published
    /// since the snapshot may have filled: the walk reloads there.
    Newer { to: Gpa, slots: bool },
    /// The visitor broke.
    Break(B),
}

/// Visits an announced batch, `slots` from `from` on (holes between them
/// and, for the walk's last batch, up to `end`), each slot's part computed
/// just before its visit: its record is read there, so a record that has
/// left the cache is fetched while the previous slot's memory accesses are
/// still in flight, not in a pass of its own over the whole batch first. A
/// hole is visited only while `fresh` says no map was published since the
/// snapshot (else the walk reloads there: a newer slot may fill it).
#[inline(always)]
fn visit_announced<'a, B>(
    slots: &[&Slot],
    from: Gpa,
    end: Gpa,
    last_batch: bool,
    mut fresh: impl FnMut() -> bool,
    visit: &mut impl FnMut(Visit<'_, 'a>) -> ControlFlow<B>,
) -> Announced<B> {
    let mut at = from;
    let mut any = false;
    for slot in slots {
        let range = slot.range();
        if range.start() > at {
            if let Some(stop) = visit_hole(at, range.start(), any, &mut fresh, visit) {
                return stop;
            }
            at = range.start();
        }
        let part_end = range.end().min(end);
        let part = GpaRange::from_bounds(at, part_end).expect("at < slot end");
        let held = SlotRef::announced(slot);
        if let ControlFlow::Break(b) = visit(Visit::Slot { slot: &held, part }) {
            return Announced::Break(b);
        }
        any = true;
        at = part_end;
    }
    if last_batch && at < end {
        if let Some(stop) = visit_hole(at, end, any, &mut fresh, visit) {
            return stop;
        }
        at = end;
    }
    Announced::Visited { to: at, slots: any }
}

/// Visits the hole `[at, to)` of an announced batch if no map was published
/// since the snapshot (`fresh`); `any`: whether the batch visited a slot
/// before it. `None` to go on.
fn visit_hole<'a, B>(
    at: Gpa,
    to: Gpa,
    any: bool,
    fresh: &mut impl FnMut() -> bool,
    visit: &mut impl FnMut(Visit<'_, 'a>) -> ControlFlow<B>,
) -> Option<Announced<B>> {
    if !fresh() {
        return Some(Announced::Newer { to: at, slots: any });
    }
    let hole = GpaRange::from_bounds(at, to).expect("at < to");
    match visit(Visit::Hole(hole)) {
        ControlFlow::Break(b) => Some(Announced::Break(b)),
        ControlFlow::Continue(()) => None,
    }
}

/// Takes the next batch of `slots` into `ahead` (empty) and, for a batch to
/// be counted (`counting`), starts fetching their cells' count words on
/// `shard`; returns whether `slots` ran out.
fn gather<'s>(
    slots: &mut impl Iterator<Item = &'s Slot>,
    ahead: &mut Vec<&'s Slot>,
    map: &GuardedMap,
    shard: usize,
    counting: bool,
) -> bool {
    let batch = if counting { WALK_BATCH } else { ANNOUNCE_BATCH };
    ahead.extend(slots.take(batch));
    for slot in ahead.iter().filter(|_| counting) {
        if let Some(cell) = map.cells.get(slot.id().0) {
            cell.prefetch(shard);
        }
    }
    ahead.len() < batch
}

/// One step of a counted batch, its guard taken.
#[derive(Debug)]
enum WalkStep<'a> {
    /// A plugged slot, guarded while the batch is visited.
    Slot {
        /// The guard on the slot.
        slot: SlotRef<'a>,
        /// The part of the walked range inside this slot.
        part: GpaRange,
    },
    /// A part of the walked range that no slot covers.
    Hole(GpaRange),
}

impl<'a> WalkStep<'a> {
    /// The part of the walked range this step covers.
    fn range(&self) -> GpaRange {
        match self {
            WalkStep::Slot { part, .. } | WalkStep::Hole(part) => *part,
        }
    }

    /// The step as a [`Visit`].
    fn visit(&self) -> Visit<'_, 'a> {
        match self {
            WalkStep::Slot { slot, part } => Visit::Slot { slot, part: *part },
            WalkStep::Hole(hole) => Visit::Hole(*hole),
        }
    }
}
