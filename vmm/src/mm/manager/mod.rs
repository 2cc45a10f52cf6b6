//! The guest memory manager: one type that composes the slot map, the slot
//! locks, the invalidation hub, the mirror of the backend's memslots and the
//! dirty log, and the one writer of guest memory.
//!
//! A [`MemoryManager`] owns the VM's published slot map (a [`GuardedMap`]:
//! a [`SharedSlotMap`] with a refcount lock per slot), an
//! [`InvalidationHub`], and a [`MemslotBackend`]: real KVM (a VM fd, see
//! `vmm::kvm::memslots`) or [`SimKvm`], a simulated KVM that enforces
//! KVM's memslot rules in memory and injects failures at chosen calls, so
//! the whole manager (and the devices on it) runs without `/dev/kvm`.
//! [`apply`](MemoryManager::apply) computes a [`Transition`] from the
//! current map, issues its [`MemslotChange`]s to the backend in order, and
//! only when all succeeded publishes the new map and releases the host
//! memory it no longer maps ([`Transition::discards`]). If a change fails
//! midway, the changes already applied are undone in reverse order (a
//! `Create` by deleting its slot, a `Delete` by re-creating the old slot, a
//! `SetFlags` by restoring `old_flags`), so the backend holds exactly what it
//! held before, the map is not published, and the error names the change,
//! slot, range and errno.
//!
//! # The mirror, and who owns registered memory
//! The manager keeps a *mirror* of what KVM holds: slot id -> the
//! [`MemslotSpec`] KVM accepted, plus an `Arc` of the [`HostMapping`] behind
//! it. The mirror changes only after an ioctl succeeded, so it always equals
//! KVM's memslots (given that nothing else calls `KVM_SET_USER_MEMORY_REGION`
//! on this VM). Holding the `Arc` there is what makes registering host memory
//! sound: a `HostMapping` is unmapped only when its last `Arc` drops, and the
//! mirror drops its `Arc` only after KVM confirmed deleting the slot (or, when
//! the manager is dropped, after deleting the slot; a mapping whose delete
//! fails is leaked, never unmapped under KVM). The old map's `Arc`s are not
//! relied upon: readers may drop old snapshots at any time.
//!
//! # Before the ioctl
//! The slot map validates every op (alignment, overlap that KVM would refuse
//! with `EEXIST`, slot count...), so a refused op is a [`SlotMapError`] and no
//! ioctl is issued. Each change is also checked against the mirror just before
//! its ioctl (the id is free or live as the change expects, a create overlaps
//! no live slot and lies inside its mapping, only dirty logging changes on a
//! live slot): a transition that would break one of KVM's rules is refused
//! with [`FailureCause::Refused`] and rolled back like an ioctl failure.
//!
//! # Dirty logging
//! The backend's [`DirtyLogMode`] decides how logged pages reach
//! [`dirty_pages`](MemoryManager::dirty_pages) (see `docs/dirty-tracking.md`):
//! - bitmap: `KVM_GET_DIRTY_LOG` returns and clears a whole slot's bitmap;
//! - manual: the read keeps the bitmap; a report clears exactly the pages
//!   it covers with `KVM_CLEAR_DIRTY_LOG` (the rest stay logged in KVM);
//!   a memslot that starts logging has every bit set (initially set);
//! - ring: entries `(slot id, offset)` in per-vCPU rings, collected and
//!   reset by [`harvest_dirty_rings`](MemoryManager::harvest_dirty_rings).
//!
//! KVM frees a slot's bitmap when the slot is deleted or its logging is
//! switched off, so in the bitmap modes the manager reads a dirty-logging
//! slot's bitmap just before either change and keeps the pages in a pending
//! set until reported: no write KVM logged up to that read is lost, across
//! splits, moves and rollbacks. A write logged between the read and the
//! change is lost with the bitmap ([`teardown_windows`](MemoryManager::teardown_windows)
//! measures that window). Ring entries name slot ids, so in ring mode the
//! manager harvests the rings right *after* such a change and before any
//! later call can reuse the id, attributing the deleted id's entries to the
//! slot as it was: KVM's delete waited for every vCPU to leave the slot, so
//! nothing is lost. Pages harvested from a slot that is gone are reported by
//! the GPA they were written at.
//!
//! Pages harvested while an op's memslot calls run wait in a journal until
//! the op is settled: if it took effect, they are pending by the GPA they
//! were written at; if its calls were rolled back, that GPA belongs to the
//! layout the op tried to make (the rollback deleted the slots it created),
//! so each page goes by host address to the dirty-logging slot that maps
//! it after the rollback, or is dropped where none does (see
//! `docs/dirty-tracking.md`).
//!
//! # Concurrency, lock order, memory ordering
//! Lock order: the slot map's writer lock ([`SharedSlotMap::begin_write`]),
//! then the manager's state mutex (mirror, pending dirty pages, bitmap
//! buffer; every dirty-ring harvest runs under it, so there is one harvester
//! at a time). `apply` takes both; `dirty_pages` and `check_consistency` take
//! only the state mutex. Every memslot ioctl and every publish happens with
//! the state mutex held, so under it the published map and the mirror are
//! always observed as a matching pair. The new map is published (arc-swap: a
//! release store) after KVM agreed with it, so a reader that acquires the new
//! map finds KVM already holding its slots. A reader still holding an older
//! snapshot may translate a GPA KVM no longer maps; host memory stays mapped
//! while it holds the snapshot, but discarded ranges read as zeros.
//! Discards run before the writer lock is released, so no later op can plug
//! that host memory again before it is discarded.
//!
//! # Guards and invalidation ranges
//! The manager owns a [`GuardedMap`] (the published map plus one refcount
//! lock per slot, see [`crate::mm::guard`]) and an [`InvalidationHub`].
//! `apply`, under the writer lock:
//! 1. computes the transition;
//! 2. excludes new guards from every slot it deletes and waits for the
//!    guards inside, at most [`drain_bound`](MemoryManager::drain_bound)
//!    (past it the error names the slot and its readers; nothing changed and
//!    nothing was announced);
//! 3. `hub.begin_all` for the ranges it takes away or write-protects: the
//!    vetoes of all of them first (a refusal changes nothing), then
//!    `invalidate_start`;
//! 4. issues the memslot calls (with rollback);
//! 5. detaches and attaches cells; publishes; discards host memory;
//! 6. ends the invalidations (a refused or rolled-back op drops them: they
//!    end as changes that did not happen, and the hub's plugged set stays);
//!    announces added memory.
//!
//! The drain comes before the invalidation, as the kernel takes
//! `vma_start_write` (exclude and drain the VMA's readers) before
//! `mmu_notifier_invalidate_range_start`: a drain timeout then announces
//! nothing, and a device that registers state while holding guards (a pin,
//! an IOMMU fill) has registered it before the vetoes and the zap run, so
//! they see it; no fill of a draining slot can start. Dirty logging on or
//! off changes a slot in place with the same identity: it drains nothing.
//!
//! So host memory is never discarded or unmapped while a guard
//! ([`SlotRef`]) holds it. A reader that only holds a snapshot (no guard)
//! keeps the mappings alive, but may read discarded ranges as zeros: use
//! guards for host access.
//!
//! While a transition is applied, a range between its cluster's delete and
//! create has no memslot and a vCPU touching it exits as MMIO (see
//! [`crate::mm::slot_map::transition`]).
//!
//! A delete directly followed by the re-creation of the same slot (id,
//! size, host address, flags) at another address, as a whole-slot move
//! emits, is issued as one call that gives the live slot its new address
//! (KVM's `KVM_MR_MOVE`, [`MemslotOp::Move`]): KVM then swaps its memslot
//! set twice instead of three times, each swap waiting for an SRCU grace
//! period. Dirty-logging slots are not fused: KVM would carry their bitmap
//! over, while the manager harvests it at the delete.
//!
//! ```
//! use std::sync::Arc;
//! use vmm::mm::addr::Gpa;
//! use vmm::mm::backing::{BackingKind, HostMapping};
//! use vmm::mm::manager::{MemoryManager, SimKvm};
//! use vmm::mm::slot_map::{SlotFlags, SlotMapConfig};
//!
//! let kvm = Arc::new(SimKvm::new());
//! let memory = MemoryManager::new(kvm.clone(), SlotMapConfig::default()).unwrap();
//! let mem = Arc::new(HostMapping::new(&BackingKind::Anon, 0x10_0000).unwrap());
//! memory
//!     .apply(|map| map.plug(Gpa(0x10_0000), 0x10_0000, mem.clone(), 0, SlotFlags::NONE))
//!     .unwrap();
//! // Write-protect the middle page: the backend gets delete 1, create 3.
//! let applied = memory.apply(|map| map.protect(Gpa(0x18_0000), 0x1000, true)).unwrap();
//! assert_eq!(applied.changes.len(), 4);
//! assert_eq!(memory.registered().len(), 3);
//! assert_eq!(kvm.memslots(), memory.registered());
//! memory.apply(|map| map.set_dirty_log(Gpa(0x10_0000), 0x10_0000, true)).unwrap();
//! kvm.guest_write(Gpa(0x10_2000));
//! assert_eq!(memory.dirty_pages(Gpa(0x10_0000), 0x10_0000).unwrap().len(), 1);
//! // A failure injected at the next call is rolled back: nothing changed.
//! kvm.fail_calls(&[0], libc::EIO);
//! assert!(memory.apply(|map| map.unplug(Gpa(0x10_0000), 0x1000)).is_err());
//! memory.check_consistency().unwrap();
//! ```
//!
//! Files: `backend` (the [`MemslotBackend`] trait), `sim` (the simulated
//! KVM), `mirror` (what the backend holds, and the pre-call checks),
//! `error`, `dirty` (reports of written pages), and this file (apply with rollback, consistency
//! check).
//!
//! [`SharedSlotMap`]: crate::mm::slot_map::SharedSlotMap
//! [`SharedSlotMap::begin_write`]: crate::mm::slot_map::SharedSlotMap::begin_write

mod backend;
mod check;
mod dirty;
mod dirty_mode;
#[cfg(test)]
mod dirty_tests;
mod error;
#[cfg(test)]
mod hub_tests;
mod mirror;
#[cfg(test)]
mod move_cost_tests;
#[cfg(test)]
mod plug_many_tests;
mod probe;
mod sim;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::mm::addr::{Gpa, GpaRange};
use crate::mm::backing::{BackingKind, HostMapping};
use crate::mm::guard::{Exclusions, GuardError, GuardedMap, GuestReader, SlotRef};
use crate::mm::notifier::{Invalidation, InvalidationHub, Reason};
use crate::mm::slot_map::{
    ChangeKind, MemslotChange, MemslotFlags, MemslotSpec, SlotId, SlotMap, SlotMapConfig,
    SlotMapError, SlotMapWriter, SlotOp, Transition,
};

pub use backend::{MemslotBackend, MemslotRegion};
pub use check::{CheckKind, Checker, DEFAULT_FULL_EVERY, DEFAULT_SWEEP};
pub use dirty::TeardownWindows;
pub use dirty_mode::DirtyLogMode;
pub use error::{FailureCause, MemslotError, MemslotFailure, MemslotOp};
pub use probe::KvmProbe;
pub use sim::{SimKvm, SimWrite, SIM_MAX_SLOTS, SIM_RING_ENTRIES};

use mirror::{State, Step, DIRTY_BITMAP_BYTES};

/// What a successful [`MemoryManager::apply`] did.
#[derive(Debug)]
pub struct Applied {
    /// The map now published.
    pub map: Arc<SlotMap>,
    /// The memslot changes issued, in order.
    pub changes: Vec<MemslotChange>,
    /// Guest ranges whose translation changed (for invalidation).
    pub removed: Vec<(GpaRange, ChangeKind)>,
    /// Guest ranges that became plugged.
    pub added: Vec<GpaRange>,
    /// Bytes of host memory released.
    pub discarded: u64,
    /// How long the op waited for guard holders to leave the slots it changed.
    pub waited: Duration,
}

/// Deliberately broken behaviour, for the model checks to show they catch it.
#[cfg(test)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ModelKnobs {
    /// Run the vetoes and `invalidate_start` before the drain (the order
    /// that let a non-revocable pin slip in between veto and start).
    pub(crate) invalidate_before_drain: bool,
}

/// How long [`MemoryManager::apply`] waits for readers by default.
pub const DEFAULT_DRAIN_BOUND: Duration = Duration::from_secs(2);

/// One VM's guest memory: the slot map, its locks and invalidations, kept
/// in step with the backend's memslots; see the module docs.
///
/// The backend must hold no memslot with an id below `max_slots` when the
/// manager is created, and nothing else may change its memslots afterwards
/// (the mirror would no longer match; memory safety does not depend on it).
/// Dropping the manager deletes every slot it registered, so stop the vCPUs
/// first.
pub struct MemoryManager {
    backend: Box<dyn MemslotBackend>,
    memory: GuardedMap,
    hub: Arc<InvalidationHub>,
    drain_bound_ns: AtomicU64,
    /// Set by [`keep_memory_at_drop`](MemoryManager::keep_memory_at_drop).
    keep_at_drop: AtomicBool,
    /// Deliberately broken behaviour for the models to catch.
    #[cfg(test)]
    model: ModelKnobs,
    state: Mutex<State>,
}

impl fmt::Debug for MemoryManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.lock_state();
        f.debug_struct("MemoryManager")
            .field("map", self.memory.shared())
            .field("registered", &st.by_id.len())
            .field("pending_dirty", &st.pending.len())
            .field("poisoned", &st.poisoned)
            .finish()
    }
}

impl MemoryManager {
    /// A manager of guest memory on `backend`, with an empty slot map limited
    /// by `config` (on KVM read `max_slots` from `KVM_CAP_NR_MEMSLOTS`,
    /// `read_only_supported` from `KVM_CAP_READONLY_MEM`).
    ///
    /// # Errors
    /// [`MemslotError::Buffer`] if the dirty-bitmap buffer (256 MiB of
    /// address space, no memory) cannot be mapped.
    pub fn new(
        backend: impl MemslotBackend + 'static,
        config: SlotMapConfig,
    ) -> Result<Self, MemslotError> {
        let bitmap = HostMapping::new(&BackingKind::Anon, DIRTY_BITMAP_BYTES)
            .map_err(MemslotError::Buffer)?;
        let mode = backend.dirty_log_mode();
        Ok(Self {
            backend: Box::new(backend),
            memory: GuardedMap::new(SlotMap::new(config)),
            hub: Arc::new(InvalidationHub::new()),
            drain_bound_ns: AtomicU64::new(DEFAULT_DRAIN_BOUND.as_nanos() as u64),
            keep_at_drop: AtomicBool::new(false),
            #[cfg(test)]
            model: ModelKnobs::default(),
            state: Mutex::new(State {
                by_id: BTreeMap::new(),
                by_gpa: BTreeMap::new(),
                pending: BTreeSet::new(),
                bitmap,
                poisoned: false,
                mode,
                unattributed: 0,
                ring_error: None,
                windows: TeardownWindows::default(),
                journal: None,
            }),
        })
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock happens only between an ioctl and
        // its `record`, which do not panic; the state is still what KVM holds.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A snapshot of the published map. Lock-free.
    pub fn load(&self) -> Arc<SlotMap> {
        self.memory.load()
    }

    /// The published map with its slot cells: guarded host access. (Its
    /// writer API is for maps without KVM; changes to this map go through
    /// [`apply`](Self::apply).)
    pub fn guarded(&self) -> &GuardedMap {
        &self.memory
    }

    /// A per-thread reader taking guards on slots (see [`crate::mm::guard`]).
    pub fn reader(&self) -> GuestReader<'_> {
        self.memory.reader()
    }

    /// A guard on the slot holding `gpa`, without waiting (see
    /// [`GuardedMap::try_acquire`]).
    ///
    /// # Errors
    /// [`GuardError::Unplugged`], [`GuardError::Busy`] while an op changes the slot.
    pub fn try_acquire(&self, gpa: Gpa) -> Result<SlotRef<'_>, GuardError> {
        self.memory.try_acquire(gpa)
    }

    /// The invalidation hub every op reports to: `begin` (vetoes, then
    /// `invalidate_start`) before the KVM and host teardown of memory taken
    /// away or write-protected, `end` after it, `added` for memory plugged or
    /// moved in. Subscribe devices and translation caches here. Callbacks run
    /// on the op's thread under the slot-map writer lock: they must not call
    /// [`apply`](Self::apply).
    pub fn hub(&self) -> &Arc<InvalidationHub> {
        &self.hub
    }

    /// How long an op waits for guard holders before it gives up.
    pub fn drain_bound(&self) -> Duration {
        Duration::from_nanos(self.drain_bound_ns.load(Ordering::Relaxed))
    }

    /// Sets [`drain_bound`](Self::drain_bound) (default [`DEFAULT_DRAIN_BOUND`]).
    pub fn set_drain_bound(&self, bound: Duration) {
        let ns = u64::try_from(bound.as_nanos()).unwrap_or(u64::MAX);
        self.drain_bound_ns.store(ns, Ordering::Relaxed);
    }

    /// The deliberately broken behaviour to switch on (models only).
    #[cfg(test)]
    pub(crate) fn model_knobs_mut(&mut self) -> &mut ModelKnobs {
        &mut self.model
    }

    /// Makes dropping the manager leave every registered memslot in place
    /// and its host memory mapped for good (leaked), instead of deleting the
    /// slots one by one: for a process that exits right after, where the
    /// kernel tears the VM and the mappings down together and each delete
    /// would only cost an SRCU grace period. Always sound (memory the backend
    /// may use is never unmapped); a long-lived process must not use it.
    pub fn keep_memory_at_drop(&self) {
        self.keep_at_drop.store(true, Ordering::Relaxed);
    }

    /// What KVM holds according to the mirror, sorted by id.
    pub fn registered(&self) -> Vec<MemslotSpec> {
        self.lock_state().by_id.values().map(|r| r.spec).collect()
    }

    /// Runs `op` on the current map and makes KVM and the published map
    /// agree with its result, or changes nothing.
    ///
    /// `op` must compute its transition from the map it is given (the
    /// writer lock guarantees that map is current). A transition computed
    /// from another map is refused before the ioctl only where one of its
    /// changes breaks KVM's rules against what is registered (reused live id,
    /// overlap, a delete of something else); otherwise it is applied and
    /// [`check_consistency`](Self::check_consistency) reports the divergence.
    ///
    /// # Errors
    /// [`SlotMap`](MemslotError::SlotMap) if `op` refuses (no ioctl issued);
    /// [`RolledBack`](MemslotError::RolledBack) if a change failed and was
    /// undone; [`RollbackFailed`](MemslotError::RollbackFailed) and then
    /// [`Poisoned`](MemslotError::Poisoned) if undoing failed too;
    /// [`Discard`](MemslotError::Discard) if the op took effect but host
    /// memory could not be released.
    pub fn apply<F>(&self, op: F) -> Result<Applied, MemslotError>
    where
        F: FnOnce(&SlotMap) -> Result<Transition, SlotMapError>,
    {
        let writer = self.memory.shared().begin_write();
        if self.lock_state().poisoned {
            return Err(MemslotError::Poisoned);
        }
        let base = writer.map();
        let transition = op(&base)?;
        // The ranges it takes away or write-protects, for the hub.
        let announced: Vec<(GpaRange, Reason)> = transition
            .removed
            .iter()
            .filter_map(|&(range, kind)| Some((range, invalidation_reason(kind, transition.op)?)))
            .collect();
        #[cfg(test)]
        if self.model.invalidate_before_drain {
            // The broken order the models must catch: announce, then drain.
            let invalidations = self.hub.begin_all(&announced)?;
            let exclusions = self
                .memory
                .exclude(&transition.changes, self.drain_bound())
                .map_err(MemslotError::Guard)?;
            return self.commit(writer, &base, transition, exclusions, invalidations);
        }
        // 1. No new guard on a slot that goes away; wait for the guards
        //    inside (bounded; on timeout nothing changed and nothing was
        //    announced). First, as the kernel takes `vma_start_write` before
        //    `mmu_notifier_invalidate_range_start`: a pinner registers its
        //    pin while it still holds guards on the range, so once the drain
        //    is done every pin over the range is in the table for the vetoes
        //    below to see, and none can be added until the op is over.
        let exclusions = self
            .memory
            .exclude(&transition.changes, self.drain_bound())
            .map_err(MemslotError::Guard)?;
        // 2. Vetoes (of every range first), then invalidate_start, before
        //    anything is torn down. Dropping the invalidations on any early
        //    return ends them as changes that did not happen.
        let invalidations = self.hub.begin_all(&announced)?;
        self.commit(writer, &base, transition, exclusions, invalidations)
    }

    /// Steps 3-6 of [`apply`](Self::apply), once drained and announced: the
    /// backend with rollback, cells, publish, discards, ends, additions.
    fn commit(
        &self,
        mut writer: SlotMapWriter<'_>,
        base: &SlotMap,
        transition: Transition,
        exclusions: Exclusions<'_>,
        invalidations: Vec<Invalidation<'_>>,
    ) -> Result<Applied, MemslotError> {
        let Transition {
            op: slot_op,
            map,
            changes,
            discards,
            removed,
            added,
        } = transition;
        let waited = exclusions.waited();
        // 3. KVM, with rollback.
        let mut st = self.lock_state();
        let config = *base.config();
        let steps = fuse_moves(changes.iter().map(Step::of).collect());
        // Pages harvested by the calls below wait in the journal until it is
        // known which layout they belong to (see `State::settle_harvest`).
        st.journal = Some(Vec::new());
        for (index, step) in steps.iter().enumerate() {
            if let Err(failure) = self.execute(&mut st, step, &config) {
                for done in steps[..index].iter().rev() {
                    if let Err(undo) = self.execute(&mut st, &done.inverse(), &config) {
                        st.poisoned = true;
                        st.settle_harvest(false);
                        return Err(MemslotError::RollbackFailed {
                            index,
                            failure,
                            undo: Box::new(undo),
                        });
                    }
                }
                // KVM is as before: the exclusions are released (dropped) and
                // the cells keep the slots of the still published map.
                st.settle_harvest(true);
                return Err(MemslotError::RolledBack {
                    index,
                    total: steps.len(),
                    failure,
                });
            }
        }
        st.settle_harvest(false);
        // 4. Cells follow KVM (detach deleted, attach created)
        //    before the map naming the new slots is published.
        let committed = match exclusions.commit(&changes) {
            Ok(committed) => committed,
            Err(e) => {
                // KVM already holds the new slots; only a transition computed
                // from another map gets here. Refuse further ops like a
                // failed undo.
                st.poisoned = true;
                return Err(MemslotError::Guard(e));
            }
        };
        committed.publish(&mut writer, map);
        let published = writer.map();
        drop(st);
        // 5. Host teardown. Still under the writer lock: no op can plug this
        // memory again before it is discarded. KVM no longer maps it (the
        // deletes above succeeded), the new map does not (the map never
        // aliases memory), and no guard holds it (its slots' cells were
        // drained and detached). The op has taken effect whatever a discard
        // says, so a failure is reported only after the hub heard the rest.
        let mut discarded = 0;
        let mut discard_error = None;
        let discards = if crate::mutants::on("replug-not-zeroed") {
            Vec::new()
        } else {
            discards
        };
        for d in &discards {
            match d.mapping.discard(d.offset, d.len) {
                Ok(()) => discarded += d.len,
                Err(source) => {
                    discard_error.get_or_insert(MemslotError::Discard {
                        hva: d.mapping.hva(),
                        offset: d.offset,
                        len: d.len,
                        source,
                    });
                }
            }
        }
        // 6. invalidate_end, then announce the memory that appeared.
        for invalidation in invalidations {
            invalidation.end();
        }
        let reason = match slot_op {
            SlotOp::Move => Reason::Move,
            SlotOp::Resize => Reason::Grow,
            _ => Reason::Plug,
        };
        // Slots split around memory that stayed: subscribers split what
        // they cached across the new boundaries.
        for &(range, kind) in &removed {
            if matches!(kind, ChangeKind::Unprotected | ChangeKind::DirtyLog { .. }) {
                self.hub.reshaped(range);
            }
        }
        // Every range is announced even if one is refused; the first error
        // (a discard's before an announcement's) is reported.
        let mut announce_error = None;
        for &range in &added {
            if let Err(e) = self.hub.added(range, reason) {
                announce_error.get_or_insert(MemslotError::Announce(e));
            }
        }
        if let Some(e) = discard_error.or(announce_error) {
            return Err(e);
        }
        Ok(Applied {
            map: published,
            changes,
            removed,
            added,
            discarded,
            waited,
        })
    }

    /// Validates `step` against the mirror, harvests the dirty log it would
    /// destroy, issues the ioctl and records its effect.
    fn execute(
        &self,
        st: &mut State,
        step: &Step,
        config: &SlotMapConfig,
    ) -> Result<(), MemslotFailure> {
        st.validate(step, config)
            .map_err(|why| step.failure(FailureCause::Refused(why)))?;
        let logging_before = match step.op {
            MemslotOp::Delete => step.spec.flags,
            MemslotOp::SetFlags => step.old_flags,
            _ => MemslotFlags::empty(),
        }
        .contains(MemslotFlags::LOG_DIRTY_PAGES);
        let logging_after =
            step.op != MemslotOp::Delete && step.spec.flags.contains(MemslotFlags::LOG_DIRTY_PAGES);
        // The teardown window is timed only where there is one (a logging
        // slot's delete or logging switched off): no clock read otherwise.
        let window_start = (logging_before && !logging_after).then(std::time::Instant::now);
        if logging_before && !logging_after && !crate::mutants::on("dirty-harvest-dropped") {
            // The slot as KVM holds it now (a SetFlags step names the new flags).
            let live = match step.op {
                MemslotOp::SetFlags => MemslotSpec {
                    flags: step.old_flags,
                    ..step.spec
                },
                _ => step.spec,
            };
            st.harvest_before_teardown(&*self.backend, &live)?;
        }
        let early = crate::mutants::on("id-freed-before-delete");
        if early {
            st.record(step);
        }
        // SAFETY: a delete (`memory_size` 0) registers no memory. A create or
        // flags change registers `[hva, hva + size)`, which `validate` checked
        // lies inside `step.mapping`, a live `HostMapping` (we hold an `Arc`
        // of it through `step`); a `HostMapping` is unmapped only when its last
        // `Arc` drops and is used only as guest memory (the slot map never
        // lets two slots share host memory). If the call succeeds, `record`
        // stores an `Arc` of the mapping in the mirror, which drops it only
        // after a successful delete of this slot, and `Drop` deletes every
        // registered slot before releasing its `Arc` (leaking it if the
        // delete fails). So the range stays mapped, and guest-only, for as
        // long as KVM may use it.
        let result = unsafe { self.backend.set_memslot(&step.region()) };
        result.map_err(|e| step.failure(FailureCause::Errno(e.errno())))?;
        if let Some(start) = window_start.filter(|_| st.mode != DirtyLogMode::Ring) {
            st.windows.record(start.elapsed());
        }
        if !early {
            st.record(step);
        }
        if logging_before && !logging_after && st.mode == DirtyLogMode::Ring {
            // The rings still hold entries naming this slot, up to the
            // write KVM logged last before the call returned (it waited for
            // every vCPU to leave the old slot). Attribute them to the slot
            // as it was, now, before a later change can reuse the id.
            let gone = match step.op {
                MemslotOp::Delete => Some(&step.spec),
                _ => None,
            };
            if let Err(e) = st.harvest_rings(&*self.backend, gone) {
                // The change took effect; collected entries are kept. Only
                // the reset failed: report it with the next dirty pages.
                st.ring_error.get_or_insert(e);
            }
        }
        Ok(())
    }

    /// Checks that the published map, the mirror and KVM agree.
    ///
    /// What it sees:
    /// - the published map's [`SlotMap::expected_memslots`] equals the
    ///   mirror exactly (ids, GPAs, sizes, host addresses, flags), and the
    ///   mirror's GPA index matches its id index;
    /// - every mirrored dirty-logging slot is live in KVM with a dirty bitmap
    ///   (`KVM_GET_DIRTY_LOG` succeeds; the pages it returns are kept for
    ///   [`dirty_pages`](Self::dirty_pages), so the check loses nothing);
    /// - no id below `max_slots` that the mirror lacks, or holds without
    ///   logging, is a dirty-logging slot in KVM (`KVM_GET_DIRTY_LOG` must
    ///   fail with `ENOENT`) — this finds dirty-logging strays.
    ///
    /// In ring mode KVM refuses `KVM_GET_DIRTY_LOG` for every id, so only the
    /// map and the mirror are compared.
    ///
    /// What it cannot see (KVM has no "list memslots" ioctl, and every other
    /// probe changes state: re-issuing a slot's exact spec is a no-op if the
    /// slot is live but *creates* it if not): a slot without dirty logging
    /// missing from KVM or left behind in it, and the GPA, size and host
    /// address KVM holds for any slot. Tests find those with destructive
    /// probes (creating a slot over a range must fail with `EEXIST` exactly
    /// where the map has slots). Cost: O(n) plus one ioctl per id below
    /// `max_slots` (16 ms for 32,764 ids on the development host), with the
    /// state mutex held (ops wait).
    ///
    /// # Errors
    /// A description of the first disagreement.
    pub fn check_consistency(&self) -> Result<(), String> {
        let mut st = self.lock_state();
        if st.poisoned {
            return Err("poisoned: a rollback failed, KVM differs from the map".into());
        }
        let map = self.memory.load();
        let expected = map.expected_memslots();
        let mirror: Vec<MemslotSpec> = st.by_id.values().map(|r| r.spec).collect();
        if expected != mirror {
            let first = expected
                .iter()
                .zip(&mirror)
                .find(|(e, m)| e != m)
                .map_or_else(String::new, |(e, m)| format!(": map {e:?} vs KVM {m:?}"));
            return Err(format!(
                "map expects {} memslots, KVM holds {}{first}",
                expected.len(),
                mirror.len()
            ));
        }
        let index_ok = st.by_gpa.len() == st.by_id.len()
            && st
                .by_gpa
                .iter()
                .all(|(gpa, id)| st.by_id.get(id).is_some_and(|r| r.spec.gpa == *gpa));
        if !index_ok {
            return Err("the mirror's GPA index disagrees with its id index".into());
        }
        for id in (0..map.config().max_slots).map(SlotId) {
            check::probe(&mut st, &*self.backend, id)?;
        }
        Ok(())
    }
}

/// The memslot calls for `steps`: each delete directly followed by the
/// re-creation of the same slot at another address becomes one move
/// ([`Step::fuse_move`]), as KVM moves a slot in one call. A transition
/// that moves whole slots emits exactly such pairs (a cluster's deletes
/// come before its creates, and the freed id is the lowest free one).
fn fuse_moves(steps: Vec<Step>) -> Vec<Step> {
    let mut out: Vec<Step> = Vec::with_capacity(steps.len());
    for step in steps {
        if let Some(fused) = out.last().and_then(|prev| Step::fuse_move(prev, &step)) {
            *out.last_mut().expect("a last step") = fused;
        } else {
            out.push(step);
        }
    }
    out
}

/// The hub reason for a changed range, if the change takes memory away or
/// reduces access (`None`: nothing to invalidate).
fn invalidation_reason(kind: ChangeKind, op: SlotOp) -> Option<Reason> {
    match kind {
        ChangeKind::Unmapped => Some(match op {
            SlotOp::Move => Reason::Move,
            SlotOp::Resize => Reason::Shrink,
            _ => Reason::Unplug,
        }),
        ChangeKind::WriteProtected => Some(Reason::Protect),
        ChangeKind::Unprotected | ChangeKind::DirtyLog { .. } => None,
    }
}

impl AsRef<GuardedMap> for MemoryManager {
    fn as_ref(&self) -> &GuardedMap {
        &self.memory
    }
}

impl Drop for MemoryManager {
    fn drop(&mut self) {
        let keep = *self.keep_at_drop.get_mut();
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        st.by_gpa.clear();
        for (_, reg) in std::mem::take(&mut st.by_id) {
            if keep {
                // Never unmapped: the backend may go on using it.
                std::mem::forget(reg.mapping);
                continue;
            }
            let step = Step {
                op: MemslotOp::Delete,
                spec: reg.spec,
                mapping: Arc::clone(&reg.mapping),
                old_flags: MemslotFlags::empty(),
                from: reg.spec.gpa,
            };
            // SAFETY: a delete (`size` 0) registers no memory.
            if unsafe { self.backend.set_memslot(&step.region()) }.is_err()
                || crate::mutants::on("teardown-leaks-mappings")
            {
                // KVM may still map it: never unmap memory under KVM.
                std::mem::forget(reg.mapping);
            }
        }
    }
}
