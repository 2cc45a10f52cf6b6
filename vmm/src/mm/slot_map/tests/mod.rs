//! Tests of the slot map: per-op unit tests, a bad-input table, a property
//! test against a page-granular reference model with a simulated KVM memslot
//! table, a scale check and a concurrency smoke test of the shared map.

mod bad_input;
mod model;
mod ops;
mod scale;
mod shared;
mod slot_size;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use crate::mm::addr::{Gpa, GpaRange, PAGE_SIZE};
use crate::mm::backing::{BackingKind, HostMapping};

use super::slot::Seg;
use super::{
    host_key, MemslotChange, MemslotFlags, MemslotSpec, SlotFlags, SlotMap, SlotMapConfig,
    Transition,
};

pub(super) const P: u64 = PAGE_SIZE;

pub(super) fn anon(pages: u64) -> Arc<HostMapping> {
    Arc::new(HostMapping::new(&BackingKind::Anon, pages * P).unwrap())
}

pub(super) fn range(gpa: u64, len: u64) -> GpaRange {
    GpaRange::new(Gpa(gpa), len).unwrap()
}

pub(super) fn config(max_slots: u32, max_gpa: u64) -> SlotMapConfig {
    SlotMapConfig {
        max_slots,
        max_gpa: Gpa(max_gpa),
        read_only_supported: true,
        reserved: None,
        max_slot_pages: super::MAX_MEMSLOT_PAGES,
    }
}

/// Plugs and asserts success.
pub(super) fn plugged(
    map: &SlotMap,
    gpa: u64,
    size: u64,
    m: &Arc<HostMapping>,
    off: u64,
) -> SlotMap {
    let t = map
        .plug(Gpa(gpa), size, Arc::clone(m), off, SlotFlags::NONE)
        .unwrap();
    check_transition(map, &t);
    t.map
}

/// Everything observable about a map, for before/after comparisons.
pub(super) fn snapshot(map: &SlotMap) -> Vec<(u32, GpaRange, u64, SlotFlags, u64)> {
    map.iter()
        .map(|s| (s.id().0, s.range(), s.hva().0, s.flags(), s.generation()))
        .collect()
}

/// Checks every invariant of the module docs, in O(n).
pub(super) fn check_invariants(map: &SlotMap) {
    let cfg = map.config;
    let mut ids = HashSet::new();
    let mut gens = HashSet::new();
    let mut prev: Option<&super::Slot> = None;
    if let Some(flat) = map.flat() {
        let tree: Vec<(Gpa, u64)> = map
            .iter()
            .map(|s| (s.range.start(), s.generation))
            .collect();
        let flat: Vec<(Gpa, u64)> = flat
            .iter()
            .map(|s| (s.range.start(), s.generation))
            .collect();
        assert_eq!(flat, tree, "the readers' flat index differs from the tree");
    }
    if map.len() <= super::FLAT_MAX && map.next_generation > 0 {
        assert!(
            map.flat().is_some(),
            "a small map edited by an op has no flat index"
        );
    }
    for (key, s) in map.slots.iter() {
        assert_eq!(*key, s.range.start(), "key of {s:?}");
        assert!(!s.range.is_empty());
        assert!(
            s.range.len() / P <= cfg.max_slot_pages,
            "{s:?} holds more than {} pages",
            cfg.max_slot_pages
        );
        assert!(
            s.range.end() <= cfg.max_gpa,
            "{s:?} beyond {:?}",
            cfg.max_gpa
        );
        assert!(
            s.offset + s.range.len() <= s.mapping.len(),
            "{s:?} outside mapping"
        );
        assert_eq!(
            s.hva().0,
            s.mapping.hva().0 + s.offset,
            "{s:?}: cached host address out of step with mapping + offset"
        );
        let ps = s.mapping.granule();
        assert!(s.range.start().is_aligned(ps) && s.range.len() % ps == 0 && s.offset % ps == 0);
        assert!(s.id.0 < cfg.max_slots, "{s:?} id beyond {}", cfg.max_slots);
        assert!(ids.insert(s.id), "duplicate id {s:?}");
        assert!(gens.insert(s.generation), "duplicate generation {s:?}");
        assert!(map.ids.is_live(s.id), "{s:?} id not live in allocator");
        assert_eq!(
            map.host.get(&host_key(&s.mapping, s.offset)),
            Some(&s.range.len())
        );
        if let Some(p) = prev {
            assert!(p.range.end() <= s.range.start(), "{p:?} overlaps {s:?}");
            assert!(
                !Seg::of(p).merges_with(&Seg::of(s))
                    || !map.fits_one_memslot(p.range.len() + s.range.len()),
                "{p:?} and {s:?} not merged"
            );
        }
        prev = Some(s);
    }
    assert!(map.len() <= cfg.max_slots as usize);
    assert_eq!(map.ids.live(), map.len(), "allocator leaks ids");
    assert_eq!(map.host.len(), map.len(), "stale host index");
    // Host windows of one mapping are disjoint.
    let mut host: Vec<(usize, u64, u64)> = map
        .iter()
        .map(|s| {
            (
                Arc::as_ptr(&s.mapping) as usize,
                s.offset,
                s.offset + s.range.len(),
            )
        })
        .collect();
    host.sort();
    for w in host.windows(2) {
        assert!(w[0].0 != w[1].0 || w[0].2 <= w[1].1, "host aliasing {w:?}");
    }
}

/// A KVM memslot table that enforces `__kvm_set_memory_region`'s rules.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct KvmSim {
    max_slots: u32,
    /// `KVM_MEM_MAX_NR_PAGES` of the KVM the map was configured for.
    max_pages: u64,
    slots: BTreeMap<u32, MemslotSpec>,
}

impl KvmSim {
    pub(super) fn of(map: &SlotMap) -> Self {
        Self {
            max_slots: map.config().max_slots,
            max_pages: map.config().max_slot_pages,
            slots: map
                .expected_memslots()
                .into_iter()
                .map(|s| (s.id.0, s))
                .collect(),
        }
    }

    fn create(&mut self, s: MemslotSpec) -> Result<(), String> {
        if s.id.0 >= self.max_slots {
            return Err(format!("EINVAL: id {} >= {}", s.id.0, self.max_slots));
        }
        if s.size == 0 || s.gpa.0 % P != 0 || s.size % P != 0 || s.hva.0 % P != 0 {
            return Err(format!("EINVAL: misaligned {s:?}"));
        }
        if s.size / P > self.max_pages {
            return Err(format!("EINVAL: {s:?} above {} pages", self.max_pages));
        }
        if self.slots.contains_key(&s.id.0) {
            return Err(format!("EINVAL: create of live {s:?}"));
        }
        let r = range(s.gpa.0, s.size);
        if let Some(o) = self
            .slots
            .values()
            .find(|o| range(o.gpa.0, o.size).overlaps(&r))
        {
            return Err(format!("EEXIST: {s:?} overlaps {o:?}"));
        }
        self.slots.insert(s.id.0, s);
        Ok(())
    }

    fn delete(&mut self, s: MemslotSpec) -> Result<(), String> {
        match self.slots.get(&s.id.0) {
            Some(live) if *live == s => {
                self.slots.remove(&s.id.0);
                Ok(())
            }
            other => Err(format!("delete of {s:?} but KVM holds {other:?}")),
        }
    }

    fn set_flags(&mut self, s: MemslotSpec, old: MemslotFlags) -> Result<(), String> {
        let live = self
            .slots
            .get_mut(&s.id.0)
            .ok_or(format!("SetFlags of dead {s:?}"))?;
        if (live.gpa, live.size, live.hva, live.flags) != (s.gpa, s.size, s.hva, old) {
            return Err(format!("SetFlags {s:?} (old {old:?}) on {live:?}"));
        }
        if (live.flags ^ s.flags).contains(MemslotFlags::READONLY) {
            return Err(format!("EINVAL: READONLY toggled on live {live:?}"));
        }
        live.flags = s.flags;
        Ok(())
    }

    pub(super) fn apply(&mut self, c: &MemslotChange) -> Result<(), String> {
        match c {
            MemslotChange::Delete { slot } => self.delete(slot.spec()),
            MemslotChange::Create { slot } => self.create(slot.spec()),
            MemslotChange::SetFlags { slot, old_flags } => {
                self.set_flags(slot.spec(), old_flags.memslot_flags())
            }
        }
    }

    pub(super) fn undo(&mut self, c: &MemslotChange) -> Result<(), String> {
        match c {
            MemslotChange::Delete { slot } => self.create(slot.spec()),
            MemslotChange::Create { slot } => self.delete(slot.spec()),
            MemslotChange::SetFlags { slot, old_flags } => {
                let mut old = slot.spec();
                old.flags = old_flags.memslot_flags();
                self.set_flags(old, slot.flags().memslot_flags())
            }
        }
    }

    pub(super) fn specs(&self) -> Vec<MemslotSpec> {
        self.slots.values().copied().collect()
    }
}

/// Checks a successful transition: invariants of the new map, and its
/// changes replayed on a simulated KVM holding the old map, forwards (ends at
/// the new map) and backwards (rolls back to the old one).
pub(super) fn check_transition(old: &SlotMap, t: &Transition) {
    check_invariants(&t.map);
    let mut kvm = KvmSim::of(old);
    for c in &t.changes {
        if let Err(e) = kvm.apply(c) {
            panic!("change {c:?} rejected: {e}\nall changes: {:#?}", t.changes);
        }
    }
    assert_eq!(kvm.specs(), t.map.expected_memslots());
    for c in t.changes.iter().rev() {
        if let Err(e) = kvm.undo(c) {
            panic!("undo of {c:?} rejected: {e}");
        }
    }
    assert_eq!(kvm.specs(), old.expected_memslots());
}
