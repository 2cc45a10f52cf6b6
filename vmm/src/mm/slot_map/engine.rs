//! The one place slots are split, merged and diffed into memslot changes.
//!
//! An op describes its effect as an [`Edit`]: GPA `windows` whose current
//! contents go away, and `inserts` (pieces laid out inside those windows).
//! [`SlotMap::commit`] then:
//! 1. collects the slots overlapping the windows (refusing fixed ones) and
//!    keeps their parts outside the windows (the split at the edges);
//! 2. adds the GPA-adjacent neighbours of every piece as merge candidates
//!    (one level suffices: the old map was maximally merged, and whether two
//!    pieces merge depends only on their common boundary and, for the
//!    memslot size limit, their lengths: a slot beyond a neighbour did not
//!    merge with it, so it cannot merge with a merged piece that ends or
//!    starts with that neighbour either);
//! 3. sorts and merges the pieces, left to right, as long as the merged
//!    slot fits one memslot (`max_slot_pages`);
//! 4. diffs them against the old slots: a piece with exactly an old slot's
//!    memory keeps it (unchanged, or a flags-only change when only
//!    `dirty_log` differs); every other old slot is deleted and every other
//!    piece created;
//! 5. checks the slot budget, then edits a clone of the map, emitting the
//!    changes cluster by cluster (see [`transition`](super::transition)).
//!
//! Cost: O((k + log n) log n) for k touched slots; nothing walks the map.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::mm::addr::{Gpa, GpaRange, Hva};
use crate::mm::backing::HostMapping;

use super::error::SlotMapError;
use super::slot::{Seg, Slot};
use super::transition::{ChangeKind, Discard, MemslotChange, SlotOp, Transition};
use super::{host_key, HostKey, SlotMap};

/// What an op does, before splitting and merging.
#[derive(Default)]
pub(super) struct Edit {
    /// GPA ranges whose contents are replaced (sorted, disjoint).
    pub(super) windows: Vec<GpaRange>,
    /// New pieces, each inside a window, disjoint.
    pub(super) inserts: Vec<Seg>,
    pub(super) discards: Vec<Discard>,
    pub(super) removed: Vec<(GpaRange, ChangeKind)>,
    pub(super) added: Vec<GpaRange>,
    /// Chains the inserts start (plugs): numbered from the map's next chain.
    pub(super) new_chains: u64,
    /// The slots overlapping the windows, by GPA, when the op has already
    /// looked them up (a move: its source's slots; its destination is
    /// free): `commit` then does not seek them again.
    pub(super) touched: Option<Vec<Slot>>,
}

impl Edit {
    /// Records a changed range, coalescing with the previous one.
    pub(super) fn removed(&mut self, range: GpaRange, kind: ChangeKind) {
        if let Some((last, k)) = self.removed.last_mut() {
            if *k == kind && last.end() == range.start() {
                *last = GpaRange::from_bounds(last.start(), range.end()).unwrap_or(*last);
                return;
            }
        }
        self.removed.push((range, kind));
    }

    /// Records host memory to release, coalescing with the previous one.
    pub(super) fn discard(&mut self, mapping: &Arc<HostMapping>, offset: u64, len: u64) {
        if let Some(last) = self.discards.last_mut() {
            if Arc::ptr_eq(&last.mapping, mapping) && last.offset + last.len == offset {
                last.len += len;
                return;
            }
        }
        self.discards.push(Discard {
            mapping: Arc::clone(mapping),
            offset,
            len,
        });
    }
}

/// What [`SlotMap::overlapping`] yields: the slot (if any) its first
/// descent found, or one range walk. One iterator, not a chain of them: a
/// walk over thousands of slots pays one `next` per slot.
enum Overlapping<'a, I> {
    Few(Option<&'a Slot>),
    Many(I),
}

impl<'a, I: Iterator<Item = &'a Slot>> Iterator for Overlapping<'a, I> {
    type Item = &'a Slot;

    #[inline]
    fn next(&mut self) -> Option<&'a Slot> {
        match self {
            Overlapping::Few(few) => few.take(),
            Overlapping::Many(many) => many.next(),
        }
    }
}

impl SlotMap {
    /// Slots overlapping `r`, by GPA, in O(log n + k).
    ///
    /// One descent answers the common cases (no slot or one slot
    /// overlapping, as in every whole-slot move): the last slot starting
    /// before `r.end()` either ends at or before `r.start()` (then no slot
    /// overlaps: the ones before it end before it starts) or starts at or
    /// before `r.start()` (then it is the only one: slots do not overlap).
    /// Otherwise the range holds a slot's start and the general walk runs
    /// (one descent for the slot before `r.start()`, one for the range
    /// from there).
    /// Each descent of `imbl`'s range iterator costs a keyed seek and a
    /// cursor stack allocation.
    pub(super) fn overlapping(&self, r: GpaRange) -> impl Iterator<Item = &Slot> + '_ {
        let last = self.slots.range(..r.end()).next_back().map(|(_, s)| s);
        let (few, many) = match last {
            None => (None, false),
            Some(s) if s.range.end() <= r.start() => (None, false),
            Some(s) if s.range.start() <= r.start() => (Some(s), false),
            Some(_) => (None, true),
        };
        if !many {
            return Overlapping::Few(few);
        }
        // The walk starts at the slot holding `r.start()`, if one does.
        let from = self
            .slots
            .range(..r.start())
            .next_back()
            .map(|(_, s)| s)
            .filter(|s| s.range.end() > r.start())
            .map_or(r.start(), |s| s.range.start());
        Overlapping::Many(self.slots.range(from..r.end()).map(|(_, s)| s))
    }

    /// Whether host memory `[offset, offset + len)` of `mapping` already
    /// backs a slot, in O(log n).
    pub(super) fn host_in_use(&self, mapping: &Arc<HostMapping>, offset: u64, len: u64) -> bool {
        let last = host_key(mapping, offset + len - 1);
        // Host windows of one mapping are disjoint, so only the window starting
        // last at or before our end can overlap us.
        self.host
            .range(..=last)
            .next_back()
            .is_some_and(|(key, bytes)| key.0 == last.0 && key.1 + bytes > offset)
    }

    /// The slot already backed by host memory `[offset, offset + len)` of
    /// `mapping`, if any: [`host_in_use`](Self::host_in_use), then a walk of
    /// the slots to name it (O(n), for a refusal's message only).
    pub(super) fn host_user(
        &self,
        mapping: &Arc<HostMapping>,
        offset: u64,
        len: u64,
    ) -> Option<&Slot> {
        if !self.host_in_use(mapping, offset, len) {
            return None;
        }
        self.slots.values().find(|s| {
            Arc::ptr_eq(&s.mapping, mapping)
                && s.offset < offset + len
                && offset < s.offset + s.range.len()
        })
    }

    /// Refuses fixed slots among `slots`.
    pub(super) fn check_not_fixed<'a>(
        op: &'static str,
        slots: impl IntoIterator<Item = &'a Slot>,
    ) -> Result<(), SlotMapError> {
        match slots.into_iter().find(|s| s.flags.fixed) {
            Some(s) => Err(SlotMapError::Fixed {
                op,
                slot: s.id,
                slot_range: s.range,
            }),
            None => Ok(()),
        }
    }

    /// Applies `edit` to a clone of the map. See the module docs.
    pub(super) fn commit(&self, op: &'static str, edit: Edit) -> Result<Transition, SlotMapError> {
        // 0. No new piece is larger than one memslot may be (each op checks
        // its own first; this holds for every op).
        for p in &edit.inserts {
            self.check_slot_size(op, p.range)?;
        }
        // 1. Touched slots and what survives of them outside the windows.

        let mut old: BTreeMap<Gpa, Slot> = BTreeMap::new();
        match edit.touched {
            Some(touched) => {
                debug_assert!(
                    touched.iter().map(|s| s.range.start()).eq(edit
                        .windows
                        .iter()
                        .flat_map(|w| self.overlapping(*w))
                        .map(|s| s.range.start())),
                    "touched slots differ from the windows' slots"
                );
                old.extend(touched.into_iter().map(|s| (s.range.start(), s)));
            }
            None => {
                for w in &edit.windows {
                    for s in self.overlapping(*w) {
                        old.insert(s.range.start(), s.clone());
                    }
                }
            }
        }
        Self::check_not_fixed(op, old.values())?;
        let mut pieces: Vec<Seg> = Vec::with_capacity(old.len() * 2 + edit.inserts.len());
        for s in old.values() {
            remainders(s, &edit.windows, &mut pieces);
        }
        pieces.extend(edit.inserts);

        // 2. Neighbours that may merge.
        let mut neighbours = Vec::new();
        for p in &pieces {
            if let Some((_, prev)) = self.slots.range(..p.range.start()).next_back() {
                if prev.range.end() == p.range.start() {
                    neighbours.push(prev);
                }
            }
            if let Some(next) = self.slots.get(&p.range.end()) {
                neighbours.push(next);
            }
        }
        for n in neighbours {
            if !n.flags.fixed && !old.contains_key(&n.range.start()) {
                old.insert(n.range.start(), n.clone());
                pieces.push(Seg::of(n));
            }
        }

        // 3. Sort and merge.
        pieces.sort_by_key(|p| p.range.start());
        let mut merged: Vec<Seg> = Vec::with_capacity(pieces.len());
        for p in pieces {
            match merged.last_mut() {
                // Like KVM, one memslot holds at most `max_slot_pages`:
                // neighbours that would exceed it stay two slots.
                Some(last)
                    if last.merges_with(&p)
                        && self.fits_one_memslot(last.range.len() + p.range.len()) =>
                {
                    last.range = GpaRange::from_bounds(last.range.start(), p.range.end())
                        .unwrap_or(last.range);
                }
                Some(last) => {
                    debug_assert!(last.range.end() <= p.range.start(), "pieces overlap");
                    merged.push(p);
                }
                None => merged.push(p),
            }
        }

        // 4. Diff against the old slots.
        let mut kept: Vec<Gpa> = Vec::new();
        let mut set_flags: Vec<(Slot, Seg)> = Vec::new();
        let mut creates: Vec<Seg> = Vec::new();
        for p in merged {
            match old.get(&p.range.start()) {
                Some(s) if p.same_memory(s) && p.flags == s.flags => kept.push(s.range.start()),
                Some(s) if p.same_memory(s) && p.flags.read_only == s.flags.read_only => {
                    kept.push(s.range.start());
                    set_flags.push((s.clone(), p));
                }
                _ => creates.push(p),
            }
        }
        for k in &kept {
            old.remove(k);
        }
        let deletes = old; // Every touched slot not kept.

        // 5. Budget, read-only support, then build.
        let needed = self.slots.len() - deletes.len() + creates.len();
        if needed > self.config.max_slots as usize {
            return Err(SlotMapError::TooManySlots {
                op,
                needed,
                max: self.config.max_slots,
            });
        }
        if !self.config.read_only_supported && creates.iter().any(|c| c.flags.read_only) {
            return Err(SlotMapError::ReadOnlyUnsupported { op });
        }

        let mut map = self.clone();
        map.next_chain += edit.new_chains;
        let mut changes = Vec::with_capacity(deletes.len() + set_flags.len() + creates.len());
        for (old_slot, p) in set_flags {
            // Only dirty logging changes in place (KVM cannot toggle
            // read-only on a live slot): the same memory, range and access,
            // so the same identity. Guards on the slot stay valid and the
            // writer need not drain them.
            let slot = Slot {
                flags: p.flags,
                ..old_slot.clone()
            };
            map.slots.insert(slot.range.start(), slot.clone());
            changes.push(MemslotChange::SetFlags {
                slot,
                old_flags: old_slot.flags,
            });
        }
        // Host windows of deleted slots: removed from the host index at the
        // end unless a create reuses the window (a moved slot), so a move
        // leaves that index untouched.
        let mut gone_host: Vec<(HostKey, u64)> = Vec::new();
        let mut made_host: Vec<(HostKey, u64)> = Vec::new();
        for cluster in clusters(deletes.into_values().collect(), creates) {
            for slot in cluster.deletes {
                map.slots.remove(&slot.range.start());
                gone_host.push((host_key(&slot.mapping, slot.offset), slot.range.len()));
                map.ids.release(slot.id);
                changes.push(MemslotChange::Delete { slot });
            }
            for p in cluster.creates {
                let slot = Slot {
                    id: map.ids.alloc(),
                    range: p.range,
                    offset: p.offset,
                    hva: Hva(p.mapping.hva().0 + p.offset),
                    flags: p.flags,
                    generation: map.bump_generation(),
                    chain: p.chain,
                    mapping: p.mapping,
                };
                made_host.push((host_key(&slot.mapping, slot.offset), slot.range.len()));
                map.slots.insert(slot.range.start(), slot.clone());
                changes.push(MemslotChange::Create { slot });
            }
        }
        update_host_index(&mut map.host, gone_host, made_host);
        map.rebuild_flat();
        Ok(Transition {
            op: SlotOp::from_name(op),
            map,
            changes,
            discards: edit.discards,
            removed: edit.removed,
            added: edit.added,
        })
    }

    pub(super) fn bump_generation(&mut self) -> u64 {
        let g = self.next_generation;
        self.next_generation += 1;
        g
    }
}

/// Applies a transition's host windows to the host index: `gone` (of the
/// deleted slots) and `made` (of the created ones), each without duplicate
/// keys. A window in both with the same size (a slot moved elsewhere in
/// guest-physical space) is left as it is; the rest of `made` is inserted
/// (replacing a gone window at the same key), the rest of `gone` removed.
/// Independent of the order the changes were emitted in.
fn update_host_index(
    host: &mut imbl::OrdMap<HostKey, u64>,
    mut gone: Vec<(HostKey, u64)>,
    made: Vec<(HostKey, u64)>,
) {
    gone.sort_unstable();
    let mut kept = vec![false; gone.len()];
    for (key, bytes) in made {
        if let Ok(i) = gone.binary_search_by(|(k, _)| k.cmp(&key)) {
            kept[i] = true;
            if gone[i].1 == bytes {
                continue;
            }
        }
        host.insert(key, bytes);
    }
    for ((key, _), kept) in gone.into_iter().zip(kept) {
        if !kept {
            host.remove(&key);
        }
    }
}

/// Deletes and creates whose GPA ranges overlap, transitively: they must be
/// applied together (deletes first), but apart from other clusters.
#[derive(Default)]
struct Cluster {
    deletes: Vec<Slot>,
    creates: Vec<Seg>,
}

/// Groups `deletes` and `creates` into clusters, in the order they must be
/// applied: clusters that do not add slots first (by GPA), then those that do
/// (by GPA). So the live slot count never exceeds the larger of the old and
/// new counts, and ids handed out lowest-first stay below it.
fn clusters(deletes: Vec<Slot>, creates: Vec<Seg>) -> Vec<Cluster> {
    enum Item {
        Delete(Slot),
        Create(Seg),
    }
    let mut items: Vec<(GpaRange, Item)> = deletes
        .into_iter()
        .map(|s| (s.range, Item::Delete(s)))
        .chain(creates.into_iter().map(|p| (p.range, Item::Create(p))))
        .collect();
    items.sort_by_key(|(r, _)| r.start());
    let mut out: Vec<Cluster> = Vec::new();
    let mut end = Gpa(0);
    for (r, item) in items {
        if out.is_empty() || r.start() >= end {
            out.push(Cluster::default());
        }
        end = end.max(r.end());
        if let Some(c) = out.last_mut() {
            match item {
                Item::Delete(s) => c.deletes.push(s),
                Item::Create(p) => c.creates.push(p),
            }
        }
    }
    // Stable: each group keeps GPA order (no allocation for a few clusters).
    out.sort_by_key(|c| c.creates.len() > c.deletes.len());
    out
}

/// Pushes the parts of `slot` outside every window (`windows` sorted).
fn remainders(slot: &Slot, windows: &[GpaRange], out: &mut Vec<Seg>) {
    let mut cursor = slot.range.start();
    let end = slot.range.end();
    for w in windows {
        if w.end() <= cursor {
            continue;
        }
        if w.start() >= end {
            break;
        }
        if w.start() > cursor {
            if let Some(r) = GpaRange::from_bounds(cursor, w.start()) {
                out.push(Seg::part(slot, r));
            }
        }
        cursor = cursor.max(w.end());
    }
    if cursor < end {
        if let Some(r) = GpaRange::from_bounds(cursor, end) {
            out.push(Seg::part(slot, r));
        }
    }
}
