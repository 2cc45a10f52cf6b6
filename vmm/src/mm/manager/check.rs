//! Consistency checks that cost what an op costs.
//!
//! [`MemoryManager::check_consistency`] compares the whole published map with
//! the whole mirror and probes `KVM_GET_DIRTY_LOG` for every id below
//! `max_slots` (32,764 ioctls on x86): milliseconds, whatever the op changed.
//! [`MemoryManager::check_changes`] checks what one op changed:
//! - the published map and the mirror agree on every slot overlapping a range
//!   the op's changes named (ids, GPAs, sizes, host addresses, flags);
//! - every id the op touched is, in KVM, what the mirror says: a
//!   dirty-logging slot answers `KVM_GET_DIRTY_LOG` (its pages are kept for
//!   [`MemoryManager::dirty_pages`]), any other id answers `ENOENT`;
//!
//! [`MemoryManager::probe_ids`] runs the same probe over further ids, within
//! a time budget: a [`Checker`] sweeps a rotating window after each op, so
//! strays among ids no op touched are found too, without a full check.
//!
//! Cost: O(k log n) for k changes plus one ioctl per probed id. The ioctl's
//! cost grows with the number of memslots KVM holds (KVM looks ids up in a
//! 128-bucket hash): about 0.4 us at 10 slots, 5-6 us at 30,000 on the
//! development host (`docs/benchmarks.md`); so the full check, which probes
//! every id below `max_slots`, costs about 185 ms at 30,000 slots, and the
//! sweep is bounded by time, not by a count of ids.
//!
//! A [`Checker`] runs the incremental check after each op and the full one
//! every [`full_every`](Checker::full_every) ops, after an op whose changes
//! are unknown (a rollback), and when asked ([`Checker::full`], e.g. at the
//! end of a run).

use std::collections::BTreeSet;
use std::ops::Range;
use std::time::{Duration, Instant};

use crate::mm::addr::{GpaRange, PAGE_SIZE};
use crate::mm::slot_map::{MemslotChange, MemslotFlags, MemslotSpec, SlotId, SlotMap};

use super::backend::MemslotBackend;
use super::dirty_mode::DirtyLogMode;
use super::mirror::{end_of, State};
use super::MemoryManager;

/// Ops between two full checks, by default: a full check probes all
/// `max_slots` ids (185-640 ms at 30,000 slots in a release build on the
/// development host, depending on its load), so this keeps its share of a
/// step's cost at or below about 0.6 ms there.
pub const DEFAULT_FULL_EVERY: u32 = 1024;

/// Time an incremental check spends, by default, probing ids beyond those
/// the op touched (at least one id per check).
pub const DEFAULT_SWEEP: Duration = Duration::from_micros(50);

impl MemoryManager {
    /// Checks what `changes` (an op's [`Applied::changes`]) did, where
    /// [`check_consistency`](Self::check_consistency) checks everything:
    /// the published map and the mirror agree on every slot overlapping a
    /// range the changes name, and every id they name is, in KVM, what the
    /// mirror says (a dirty-logging slot answers `KVM_GET_DIRTY_LOG`, its
    /// pages kept for [`dirty_pages`](Self::dirty_pages); any other id
    /// answers `ENOENT`). O(k log n) for k changes, one ioctl per id.
    ///
    /// [`Applied::changes`]: super::Applied::changes
    ///
    /// # Errors
    /// A description of the first disagreement.
    pub fn check_changes(&self, changes: &[MemslotChange]) -> Result<(), String> {
        let mut st = self.lock_state();
        if st.poisoned {
            return Err("poisoned: a rollback failed, KVM differs from the map".into());
        }
        let map = self.memory.load();
        let mut ids = BTreeSet::new();
        for change in changes {
            let slot = match change {
                MemslotChange::Create { slot }
                | MemslotChange::Delete { slot }
                | MemslotChange::SetFlags { slot, .. } => slot,
            };
            ids.insert(slot.id());
            compare_range(&map, &st, slot.range())?;
        }
        for id in ids {
            probe(&mut st, &*self.backend, id)?;
        }
        Ok(())
    }

    /// Probes the ids of `ids` (clipped to `max_slots`) as
    /// [`check_changes`](Self::check_changes) probes touched ones, in order,
    /// until `budget` is spent (at least one id). Returns the first id not
    /// probed (`ids.end` clipped when all were).
    ///
    /// # Errors
    /// A description of the first disagreement.
    pub fn probe_ids(&self, ids: Range<u32>, budget: Duration) -> Result<u32, String> {
        let mut st = self.lock_state();
        let max = self.memory.load().config().max_slots;
        let (mut id, end) = (ids.start.min(max), ids.end.min(max));
        let started = Instant::now();
        while id < end {
            probe(&mut st, &*self.backend, SlotId(id))?;
            id += 1;
            if started.elapsed() >= budget {
                break;
            }
        }
        Ok(id)
    }
}

/// The map's slots overlapping `range` against the mirror's.
fn compare_range(map: &SlotMap, st: &State, range: GpaRange) -> Result<(), String> {
    let expected: Vec<MemslotSpec> = map.slots_in(range).map(|s| s.spec()).collect();
    let mut mirrored = Vec::new();
    if let Some(spec) = st.overlapping(range.start(), range.start().0 + 1) {
        mirrored.push(*spec);
    }
    for (_, id) in st.by_gpa.range(range.start()..range.end()) {
        let spec =
            st.by_id.get(id).map(|r| r.spec).ok_or_else(|| {
                format!("the mirror's GPA index names {id}, its id index lacks it")
            })?;
        if mirrored.last() != Some(&spec) {
            mirrored.push(spec);
        }
    }
    mirrored.retain(|s| end_of(s) > range.start().0 && s.gpa < range.end());
    if expected != mirrored {
        return Err(format!(
            "in {range}: the map expects {expected:?}, the mirror of KVM holds {mirrored:?}"
        ));
    }
    Ok(())
}

/// Whether KVM agrees with the mirror about `id`: a mirrored dirty-logging
/// slot answers `KVM_GET_DIRTY_LOG` (pages kept as pending), any other id
/// `ENOENT`.
pub(super) fn probe(
    st: &mut State,
    backend: &dyn MemslotBackend,
    id: SlotId,
) -> Result<(), String> {
    if st.mode == DirtyLogMode::Ring {
        // KVM refuses KVM_GET_DIRTY_LOG while the dirty ring is on: there is
        // no per-slot log to probe.
        return Ok(());
    }
    let logged = st
        .by_id
        .get(&id)
        .map(|r| r.spec)
        .filter(|s| s.flags.contains(MemslotFlags::LOG_DIRTY_PAGES));
    match logged {
        Some(spec) => st
            .harvest(backend, &spec)
            .map_err(|f| format!("mirrored dirty-logging slot not live in KVM: {f}")),
        None => match st.read_bitmap(backend, id, PAGE_SIZE) {
            Ok(_) => Err(format!(
                "KVM has a dirty-logging {id} the mirror does not (or not logging)"
            )),
            Err(e) if e.errno() == libc::ENOENT => Ok(()),
            Err(e) => Err(format!("KVM_GET_DIRTY_LOG probe of {id}: {e}")),
        },
    }
}

/// Which check [`Checker::after_op`] ran.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum CheckKind {
    /// [`MemoryManager::check_changes`] with a sweep window.
    Incremental,
    /// [`MemoryManager::check_consistency`].
    Full,
}

/// Runs the consistency check after each op: incremental, with a full one
/// every [`full_every`](Self::full_every) ops.
///
/// The incremental check is [`MemoryManager::check_changes`], then
/// [`MemoryManager::probe_ids`] from a rotating cursor for the sweep budget,
/// so strays among ids no op touched are found too. The full check is
/// [`MemoryManager::check_consistency`]: every [`full_every`](Self::full_every)
/// ops, after an op whose changes are unknown (it failed after issuing some),
/// and when asked ([`full`](Self::full), e.g. at the end of a run). Costs:
/// `docs/benchmarks.md`.
#[derive(Clone, Debug)]
pub struct Checker {
    full_every: u32,
    sweep: Duration,
    since_full: u32,
    cursor: u32,
}

impl Default for Checker {
    fn default() -> Self {
        Self::new(DEFAULT_FULL_EVERY)
    }
}

impl Checker {
    /// A checker running a full check every `full_every` ops (0 or 1: after
    /// every op) and sweeping ids for [`DEFAULT_SWEEP`] per incremental check.
    pub fn new(full_every: u32) -> Self {
        Self {
            full_every: full_every.max(1),
            sweep: DEFAULT_SWEEP,
            since_full: 0,
            cursor: 0,
        }
    }

    /// Sets the time each incremental check spends probing ids beyond the
    /// touched ones (`Duration::ZERO`: no sweep).
    pub fn with_sweep(mut self, budget: Duration) -> Self {
        self.sweep = budget;
        self
    }

    /// Ops between two full checks.
    pub fn full_every(&self) -> u32 {
        self.full_every
    }

    /// The check after an op: `changes` are the op's changes (empty for a
    /// refused op, which must have changed nothing), `None` when they are
    /// unknown (the op failed after issuing some: a full check).
    ///
    /// # Errors
    /// A description of the first disagreement.
    pub fn after_op(
        &mut self,
        memory: &MemoryManager,
        changes: Option<&[MemslotChange]>,
    ) -> Result<CheckKind, String> {
        self.since_full += 1;
        match changes {
            Some(changes) if self.since_full < self.full_every => {
                memory.check_changes(changes)?;
                if !self.sweep.is_zero() {
                    let max = memory.load().config().max_slots;
                    let next = memory.probe_ids(self.cursor..max, self.sweep)?;
                    self.cursor = if next >= max { 0 } else { next };
                }
                Ok(CheckKind::Incremental)
            }
            _ => self.full(memory).map(|()| CheckKind::Full),
        }
    }

    /// A full check now (restarts the count to the next one).
    ///
    /// # Errors
    /// A description of the first disagreement.
    pub fn full(&mut self, memory: &MemoryManager) -> Result<(), String> {
        self.since_full = 0;
        memory.check_consistency()
    }
}

#[cfg(test)]
mod tests;
