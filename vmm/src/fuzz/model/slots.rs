//! The slot map, modelled: slots as plain records (range, mapping, offset,
//! page size, flags), the ops' refusals in the order the real slot map checks
//! them, and the split/merge rules, so the model knows the exact slot count
//! (the budget) and which addresses start a slot (`resize`).

use imbl::OrdMap;

use crate::mm::slot_map::MAX_MEMSLOT_PAGES;
use crate::scenario::Outcome;

/// 4 KiB.
pub const PAGE: u64 = 4096;

/// One modelled slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MSlot {
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// Which host mapping (an index into [`Slots::mappings`]).
    pub map: usize,
    /// Offset of the first byte in the mapping.
    pub off: u64,
    /// Read-only.
    pub ro: bool,
    /// Dirty logging.
    pub log: bool,
    /// The boot region: no op may change it.
    pub fixed: bool,
    /// The mapping (plug and its grows) it belongs to, as the slot map's
    /// `Slot::chain`: numbered by plug; pieces, grows and merges keep it.
    pub chain: usize,
}

impl MSlot {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
    fn merges_with(&self, next: &MSlot) -> bool {
        !self.fixed
            && !next.fixed
            && (self.ro, self.log) == (next.ro, next.log)
            && self.end() == next.start
            && self.map == next.map
            && self.off + self.len == next.off
            && (self.len + next.len) / PAGE <= MAX_MEMSLOT_PAGES
    }
    fn part(&self, start: u64, end: u64) -> MSlot {
        MSlot {
            start,
            len: end - start,
            off: self.off + (start - self.start),
            ..*self
        }
    }
}

/// A host mapping: its page size and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MMapping {
    /// 4 KiB or 2 MiB.
    pub page_size: u64,
    /// Bytes.
    pub len: u64,
}

/// Limits the slot map is created with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Exclusive guest-physical limit.
    pub max_gpa: u64,
    /// The slot budget.
    pub max_slots: usize,
    /// The register page (no slot may cover it).
    pub reserved: (u64, u64),
    /// Whether read-only slots are supported.
    pub read_only: bool,
}

/// A range the op takes away or write-protects: vetoed by non-revocable
/// pins, revokes revocable ones.
pub type Removed = Vec<(u64, u64)>;

/// The modelled slot map.
#[derive(Debug, Clone)]
pub struct Slots {
    /// By start (persistent: a clone per op is O(1), so the model keeps
    /// up with tens of thousands of slots).
    pub slots: OrdMap<u64, MSlot>,
    /// Every host mapping ever created, by index.
    pub mappings: Vec<MMapping>,
    /// The limits.
    pub limits: Limits,
    /// The chain the next plug starts.
    pub next_chain: usize,
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// A pending change: the new slots, the host ranges to discard, the ranges
/// announced as taken away.
#[derive(Debug, Clone, Default)]
pub struct Change {
    /// The slot map after the op.
    pub slots: OrdMap<u64, MSlot>,
    /// (mapping, offset, len) released.
    pub discards: Vec<(usize, u64, u64)>,
    /// Ranges vetoable / revoking.
    pub removed: Removed,
    /// The host mapping the op creates, if it creates one.
    pub new_mapping: Option<MMapping>,
    /// Whether the op started a chain (a plug).
    pub new_chain: bool,
}

impl Slots {
    /// An empty map.
    pub fn new(limits: Limits) -> Self {
        Self {
            slots: OrdMap::new(),
            mappings: Vec::new(),
            limits,
            next_chain: 0,
        }
    }

    /// Makes `change` the current map (registering its new mapping).
    pub fn adopt(&mut self, change: &Change) {
        if change.new_chain {
            self.next_chain += 1;
        }
        if let Some(m) = change.new_mapping {
            self.mappings.push(m);
        }
        self.slots = change.slots.clone();
    }

    /// Adds a slot directly (the boot region, guest RAM) with a new mapping.
    pub fn seed_slot(&mut self, start: u64, len: u64, fixed: bool) {
        self.mappings.push(MMapping {
            page_size: PAGE,
            len,
        });
        let map = self.mappings.len() - 1;
        let chain = self.next_chain;
        self.next_chain += 1;
        self.slots.insert(
            start,
            MSlot {
                start,
                len,
                map,
                off: 0,
                ro: false,
                log: false,
                fixed,
                chain,
            },
        );
    }

    /// The granule `s` is cut at: 4 KiB for every backing the model knows
    /// (THP included; only hugetlb would need 2 MiB).
    fn psize(&self, _s: &MSlot) -> u64 {
        PAGE
    }

    /// The slot holding `gpa`.
    pub fn lookup(&self, gpa: u64) -> Option<&MSlot> {
        self.slots
            .range(..=gpa)
            .next_back()
            .map(|(_, s)| s)
            .filter(|s| gpa < s.end())
    }

    /// The slots overlapping `[r.0, r.1)`, by address.
    pub(super) fn overlapping(&self, r: (u64, u64)) -> Vec<MSlot> {
        let first = self.lookup(r.0).map_or(r.0, |s| s.start);
        self.slots
            .range(first..r.1)
            .map(|(_, s)| *s)
            .filter(|s| overlaps((s.start, s.end()), r))
            .collect()
    }

    fn check_range(&self, gpa: u64, size: u64, align: u64) -> Result<(u64, u64), Outcome> {
        if size == 0 {
            return Err(Outcome::ZeroSize);
        }
        let end = gpa.checked_add(size).ok_or(Outcome::RangeOverflow)?;
        if gpa % align != 0 || size % align != 0 {
            return Err(Outcome::Misaligned);
        }
        if end > self.limits.max_gpa {
            return Err(Outcome::BeyondMaxGpa);
        }
        Ok((gpa, end))
    }

    /// One memslot holds at most KVM's `KVM_MEM_MAX_NR_PAGES`.
    fn check_slot_size(r: (u64, u64)) -> Result<(), Outcome> {
        match (r.1 - r.0) / PAGE > MAX_MEMSLOT_PAGES {
            true => Err(Outcome::SlotTooLarge),
            false => Ok(()),
        }
    }

    fn check_free(&self, r: (u64, u64)) -> Result<(), Outcome> {
        let res = self.limits.reserved;
        if overlaps(res, r) {
            return Err(Outcome::Reserved);
        }
        if !self.overlapping(r).is_empty() {
            return Err(Outcome::Overlap);
        }
        Ok(())
    }

    fn check_cuts(&self, r: (u64, u64), slots: &[MSlot]) -> Result<(), Outcome> {
        if slots.iter().any(|s| s.fixed) {
            return Err(Outcome::Fixed);
        }
        for edge in [r.0, r.1] {
            if let Some(s) = slots.iter().find(|s| s.start < edge && edge < s.end()) {
                if edge % self.psize(s) != 0 {
                    return Err(Outcome::Misaligned);
                }
            }
        }
        Ok(())
    }

    fn covered(&self, r: (u64, u64)) -> Result<Vec<MSlot>, Outcome> {
        let slots = self.overlapping(r);
        let mut cursor = r.0;
        for s in &slots {
            if s.start > cursor {
                return Err(Outcome::Hole);
            }
            cursor = s.end();
        }
        if cursor < r.1 {
            return Err(Outcome::Hole);
        }
        self.check_cuts(r, &slots)?;
        Ok(slots)
    }

    /// The engine: cut the windows out of the slots they touch, add the
    /// inserts, merge with neighbours, count the budget.
    fn commit(
        &self,
        windows: &[(u64, u64)],
        inserts: Vec<MSlot>,
        discards: Vec<(usize, u64, u64)>,
        removed: Removed,
    ) -> Result<Change, Outcome> {
        let mut old: OrdMap<u64, MSlot> = OrdMap::new();
        for w in windows {
            for s in self.overlapping(*w) {
                old.insert(s.start, s);
            }
        }
        if old.values().any(|s| s.fixed) {
            return Err(Outcome::Fixed);
        }
        let mut pieces: Vec<MSlot> = Vec::new();
        for s in old.values() {
            // What is left of `s` outside every window.
            let mut parts = vec![(s.start, s.end())];
            for w in windows {
                parts = parts
                    .into_iter()
                    .flat_map(|(a, b)| {
                        let mut out = Vec::new();
                        if !overlaps((a, b), *w) {
                            out.push((a, b));
                        } else {
                            if a < w.0 {
                                out.push((a, w.0));
                            }
                            if w.1 < b {
                                out.push((w.1, b));
                            }
                        }
                        out
                    })
                    .collect();
            }
            pieces.extend(parts.into_iter().map(|(a, b)| s.part(a, b)));
        }
        pieces.extend(inserts);
        let mut neighbours = Vec::new();
        for p in &pieces {
            if let Some((_, prev)) = self.slots.range(..p.start).next_back() {
                if prev.end() == p.start {
                    neighbours.push(*prev);
                }
            }
            if let Some(next) = self.slots.get(&p.end()) {
                neighbours.push(*next);
            }
        }
        for n in neighbours {
            if !n.fixed && !old.contains_key(&n.start) {
                old.insert(n.start, n);
                pieces.push(n);
            }
        }
        pieces.sort_by_key(|p| p.start);
        let mut merged: Vec<MSlot> = Vec::new();
        for p in pieces {
            match merged.last_mut() {
                Some(last) if last.merges_with(&p) => last.len = p.end() - last.start,
                _ => merged.push(p),
            }
        }
        let mut kept = 0;
        let mut creates = 0;
        for p in &merged {
            match old.get(&p.start) {
                Some(s) if (s.len, s.map, s.off) == (p.len, p.map, p.off) => kept += 1,
                _ => creates += 1,
            }
        }
        let deletes = old.len() - kept;
        let needed = self.slots.len() - deletes + creates;
        if needed > self.limits.max_slots {
            return Err(Outcome::TooManySlots);
        }
        let mut slots = self.slots.clone();
        for s in old.keys() {
            slots.remove(s);
        }
        for p in merged {
            slots.insert(p.start, p);
        }
        Ok(Change {
            slots,
            discards,
            removed,
            new_mapping: None,
            new_chain: false,
        })
    }

    /// `plug` of fresh memory (page size `psize`, the mapping exactly `size`
    /// rounded up to it) with `ro`/`log` flags. Returns the change and the
    /// index the new mapping will have.
    pub fn plug(
        &self,
        gpa: u64,
        size: u64,
        psize: u64,
        ro: bool,
        log: bool,
    ) -> Result<Change, Outcome> {
        let r = self.check_range(gpa, size, PAGE)?;
        Self::check_slot_size(r)?;
        if ro && !self.limits.read_only {
            return Err(Outcome::ReadOnlyUnsupported);
        }
        self.check_free(r)?;
        let slot = MSlot {
            start: r.0,
            len: size,
            map: self.mappings.len(),
            off: 0,
            ro,
            log,
            fixed: false,
            chain: self.next_chain,
        };
        let mut c = self.commit(&[r], vec![slot], Vec::new(), Vec::new())?;
        c.new_chain = true;
        c.new_mapping = Some(MMapping {
            page_size: psize,
            // Whole host pages: the scenario maps the size rounded up.
            len: size
                .checked_next_multiple_of(psize.max(PAGE))
                .unwrap_or(size),
        });
        Ok(c)
    }

    /// `unplug`.
    pub fn unplug(&self, gpa: u64, size: u64) -> Result<Change, Outcome> {
        let r = self.check_range(gpa, size, PAGE)?;
        let slots = self.overlapping(r);
        if slots.is_empty() {
            return Err(Outcome::NotPlugged);
        }
        self.check_cuts(r, &slots)?;
        let mut discards = Vec::new();
        let mut removed = Vec::new();
        for s in &slots {
            let (a, b) = (s.start.max(r.0), s.end().min(r.1));
            discards.push((s.map, s.off + (a - s.start), b - a));
            removed.push((a, b));
        }
        self.commit(&[r], Vec::new(), discards, removed)
    }

    /// `protect` (`ro`) or `dirty-log` (`log`): the flag set on the range.
    pub fn reflag(
        &self,
        gpa: u64,
        size: u64,
        ro: Option<bool>,
        log: Option<bool>,
    ) -> Result<Change, Outcome> {
        if ro == Some(true) && !self.limits.read_only {
            return Err(Outcome::ReadOnlyUnsupported);
        }
        let r = self.check_range(gpa, size, PAGE)?;
        let slots = self.covered(r)?;
        let mut inserts = Vec::new();
        let mut removed = Vec::new();
        for s in &slots {
            let (a, b) = (s.start.max(r.0), s.end().min(r.1));
            let mut p = s.part(a, b);
            p.ro = ro.unwrap_or(p.ro);
            p.log = log.unwrap_or(p.log);
            if p.ro && !s.ro {
                removed.push((a, b));
            }
            inserts.push(p);
        }
        self.commit(&[r], inserts, Vec::new(), removed)
    }

    /// `move`.
    pub fn move_range(&self, gpa: u64, size: u64, to: u64) -> Result<Change, Outcome> {
        let src = self.check_range(gpa, size, PAGE)?;
        let dst_end = to.checked_add(size).ok_or(Outcome::RangeOverflow)?;
        let dst = (to, dst_end);
        if overlaps(src, dst) {
            return Err(Outcome::DestinationOverlapsSource);
        }
        let slots = self.covered(src)?;
        let align = slots.iter().map(|s| self.psize(s)).fold(PAGE, u64::max);
        if to % align != 0 {
            return Err(Outcome::Misaligned);
        }
        if dst_end > self.limits.max_gpa {
            return Err(Outcome::BeyondMaxGpa);
        }
        self.check_free(dst)?;
        let inserts = slots
            .iter()
            .map(|s| {
                let (a, b) = (s.start.max(src.0), s.end().min(src.1));
                let mut p = s.part(a, b);
                p.start = to + (a - gpa);
                p
            })
            .collect();
        let mut windows = vec![src, dst];
        windows.sort();
        self.commit(&windows, inserts, Vec::new(), vec![src])
    }

    /// `resize` of the slot starting at `gpa` (growing with a new mapping of
    /// the same kind when its own has no room).
    pub fn resize(&self, gpa: u64, new_size: u64) -> Result<Change, Outcome> {
        // The mapping at `gpa`: the slot starting there and the adjacent
        // slots after it of the same chain (mremap acts on the whole VMA).
        let mut run: Vec<MSlot> = Vec::new();
        let mut next = self.slots.get(&gpa).copied();
        while let Some(s) = next {
            if run.first().is_some_and(|f| f.chain != s.chain) {
                break;
            }
            run.push(s);
            next = self.slots.get(&s.end()).copied();
        }
        let (Some(first), Some(slot)) = (run.first().copied(), run.last().copied()) else {
            return Err(Outcome::NoSlotAt);
        };
        if run.iter().any(|s| s.fixed) {
            return Err(Outcome::Fixed);
        }
        if new_size == 0 {
            return Err(Outcome::ZeroSize);
        }
        let psize = run.iter().map(|s| self.psize(s)).fold(PAGE, u64::max);
        if new_size % psize != 0 {
            return Err(Outcome::Misaligned);
        }
        let len = slot.end() - first.start;
        if new_size <= len {
            if new_size == len {
                return Ok(Change {
                    slots: self.slots.clone(),
                    ..Change::default()
                });
            }
            return self.unplug(gpa + new_size, len - new_size);
        }
        let grow = new_size - len;
        let added = self.check_range(slot.end(), grow, PAGE)?;
        Self::check_slot_size(added)?;
        self.check_free(added)?;
        let end_off = slot.off + slot.len;
        let mapping = self.mappings[slot.map];
        let host_used = self.slots.values().any(|s| {
            s.map == slot.map && overlaps((s.off, s.off + s.len), (end_off, end_off + grow))
        });
        let in_place = end_off.checked_add(grow).is_some_and(|e| e <= mapping.len) && !host_used;
        let fresh = (!in_place).then_some(MMapping {
            page_size: mapping.page_size,
            len: grow
                .checked_next_multiple_of(mapping.page_size.max(PAGE))
                .unwrap_or(grow),
        });
        let piece = if in_place {
            MSlot {
                start: added.0,
                len: grow,
                off: end_off,
                ..slot
            }
        } else {
            MSlot {
                start: added.0,
                len: grow,
                map: self.mappings.len(),
                off: 0,
                ..slot
            }
        };
        let mut c = self.commit(&[added], vec![piece], Vec::new(), Vec::new())?;
        c.new_mapping = fresh;
        Ok(c)
    }

    /// The host page behind guest page `gpa`: (mapping, offset), and whether
    /// it is read-only.
    pub fn host(&self, gpa: u64) -> Option<(usize, u64, bool)> {
        self.lookup(gpa)
            .map(|s| (s.map, s.off + (gpa - s.start), s.ro))
    }
}
