//! The ops: each validates its arguments against the current map, then
//! describes its effect as an [`Edit`] for [`SlotMap::commit`].

use std::sync::Arc;

use crate::mm::addr::{Gpa, GpaRange, PAGE_SIZE};
use crate::mm::backing::HostMapping;

use super::engine::Edit;
use super::error::SlotMapError;
use super::slot::{Seg, Slot, SlotFlags};
use super::transition::{ChangeKind, Transition};
use super::PlugSpec;
use super::SlotMap;

fn check_aligned(
    op: &'static str,
    what: &'static str,
    value: u64,
    align: u64,
) -> Result<(), SlotMapError> {
    if value % align == 0 {
        Ok(())
    } else {
        Err(SlotMapError::Misaligned {
            op,
            what,
            value,
            align,
        })
    }
}

impl SlotMap {
    /// Checks `[gpa, gpa + size)`: non-zero, aligned to `align`, below the limit.
    fn check_range(
        &self,
        op: &'static str,
        gpa: Gpa,
        size: u64,
        align: u64,
    ) -> Result<GpaRange, SlotMapError> {
        if size == 0 {
            return Err(SlotMapError::ZeroSize { op });
        }
        let range =
            GpaRange::new(gpa, size).ok_or(SlotMapError::RangeOverflow { op, gpa, size })?;
        check_aligned(op, "gpa", gpa.0, align)?;
        check_aligned(op, "size", size, align)?;
        if range.end() > self.config.max_gpa {
            return Err(SlotMapError::BeyondMaxGpa {
                op,
                range,
                max_gpa: self.config.max_gpa,
            });
        }
        Ok(range)
    }

    /// Refuses `range` if it overlaps the reserved range or any slot.
    fn check_free(&self, op: &'static str, range: GpaRange) -> Result<(), SlotMapError> {
        if let Some(reserved) = self.config.reserved.filter(|r| r.overlaps(&range)) {
            return Err(SlotMapError::Reserved {
                op,
                range,
                reserved,
            });
        }
        match self.overlapping(range).next() {
            Some(s) => Err(SlotMapError::Overlap {
                op,
                range,
                slot: s.id,
                slot_range: s.range,
            }),
            None => Ok(()),
        }
    }

    /// Refuses a new memslot over `range` that holds more pages than one
    /// memslot may (`max_slot_pages`, KVM's `KVM_MEM_MAX_NR_PAGES`).
    pub(super) fn check_slot_size(
        &self,
        op: &'static str,
        range: GpaRange,
    ) -> Result<(), SlotMapError> {
        if self.fits_one_memslot(range.len()) {
            return Ok(());
        }
        Err(SlotMapError::SlotTooLarge {
            op,
            range,
            pages: range.len() / PAGE_SIZE,
            max_pages: self.config.max_slot_pages,
        })
    }

    /// Refuses host memory that already backs a slot.
    fn check_host_unused(
        &self,
        op: &'static str,
        mapping: &Arc<HostMapping>,
        offset: u64,
        size: u64,
    ) -> Result<(), SlotMapError> {
        match self.host_user(mapping, offset, size) {
            Some(s) => Err(SlotMapError::HostAliased {
                op,
                offset,
                size,
                slot: s.id,
                slot_range: s.range,
            }),
            None => Ok(()),
        }
    }

    /// The slots overlapping `range`, which must be fully plugged, not fixed,
    /// and cut only at page boundaries of the slots it cuts.
    fn covered(&self, op: &'static str, range: GpaRange) -> Result<Vec<Slot>, SlotMapError> {
        let slots: Vec<Slot> = self.overlapping(range).cloned().collect();
        let mut cursor = range.start();
        for s in &slots {
            if s.range.start() > cursor {
                return Err(hole(op, range, cursor, s.range.start()));
            }
            cursor = s.range.end();
        }
        if cursor < range.end() {
            return Err(hole(op, range, cursor, range.end()));
        }
        self.check_cuts(op, range, &slots)?;
        Ok(slots)
    }

    /// Refuses fixed slots and cuts inside a slot that are not aligned to the
    /// slot's mapping [granule](HostMapping::granule) (a hugetlb slot splits
    /// at 2 MiB only; THP, like all other memory, at 4 KiB).
    fn check_cuts(
        &self,
        op: &'static str,
        range: GpaRange,
        slots: &[Slot],
    ) -> Result<(), SlotMapError> {
        Self::check_not_fixed(op, slots)?;
        for edge in [range.start(), range.end()] {
            if let Some(s) = slots
                .iter()
                .find(|s| s.range.start() < edge && edge < s.range.end())
            {
                check_aligned(op, "cut at", edge.0, s.mapping.granule())?;
            }
        }
        Ok(())
    }

    /// The checks of [`plug`](SlotMap::plug) that need no host memory: the
    /// range is non-empty, does not wrap, is aligned to `granule` (the
    /// backing's [`granule`](crate::mm::backing::BackingKind::granule)), lies
    /// below the limit, fits one memslot (`max_slot_pages`) and is free;
    /// read-only slots are supported if asked for. Run it before allocating host memory for a plug, so a bad range
    /// is refused for what it is and nothing is allocated.
    ///
    /// # Errors
    /// As for [`plug`](SlotMap::plug), but for the host window.
    pub fn check_plug(
        &self,
        gpa: Gpa,
        size: u64,
        granule: u64,
        flags: SlotFlags,
    ) -> Result<GpaRange, SlotMapError> {
        self.check_plug_range("plug", gpa, size, granule, flags)
    }

    fn check_plug_range(
        &self,
        op: &'static str,
        gpa: Gpa,
        size: u64,
        granule: u64,
        flags: SlotFlags,
    ) -> Result<GpaRange, SlotMapError> {
        let range = self.check_range(op, gpa, size, granule.max(PAGE_SIZE))?;
        self.check_slot_size(op, range)?;
        if flags.read_only && !self.config.read_only_supported {
            return Err(SlotMapError::ReadOnlyUnsupported { op });
        }
        self.check_free(op, range)?;
        Ok(range)
    }

    /// Hotplugs `size` bytes at `gpa` backed by `mapping` from `offset`.
    ///
    /// `gpa`, `size` and `offset` must be aligned to the mapping's
    /// [granule](HostMapping::granule) (4 KiB; 2 MiB for hugetlb); the range
    /// must be free and below the limit, and hold at most `max_slot_pages`
    /// pages (KVM's `KVM_MEM_MAX_NR_PAGES`); the host window must lie inside
    /// the mapping and back no other slot. The new slot starts a new
    /// [chain](Slot::chain) and merges with neighbours that continue it.
    ///
    /// # Errors
    /// [`ZeroSize`](SlotMapError::ZeroSize), [`RangeOverflow`](SlotMapError::RangeOverflow),
    /// [`Misaligned`](SlotMapError::Misaligned), [`BeyondMaxGpa`](SlotMapError::BeyondMaxGpa),
    /// [`SlotTooLarge`](SlotMapError::SlotTooLarge),
    /// [`ReadOnlyUnsupported`](SlotMapError::ReadOnlyUnsupported),
    /// [`MappingTooSmall`](SlotMapError::MappingTooSmall), [`Overlap`](SlotMapError::Overlap),
    /// [`HostAliased`](SlotMapError::HostAliased), [`TooManySlots`](SlotMapError::TooManySlots).
    pub fn plug(
        &self,
        gpa: Gpa,
        size: u64,
        mapping: Arc<HostMapping>,
        offset: u64,
        flags: SlotFlags,
    ) -> Result<Transition, SlotMapError> {
        self.plug_all(
            "plug",
            vec![PlugSpec {
                gpa,
                size,
                mapping,
                offset,
                flags,
            }],
        )
    }

    /// Plugs every one of `plugs` in one transition, or none: each is
    /// checked as by [`plug`](SlotMap::plug), against the map and against
    /// the others (their ranges and host windows must not overlap), and the
    /// slot budget is checked for the whole batch. Each starts its own chain.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use vmm::mm::addr::Gpa;
    /// use vmm::mm::backing::{BackingKind, HostMapping};
    /// use vmm::mm::slot_map::{PlugSpec, SlotFlags, SlotMap, SlotMapConfig};
    ///
    /// let mem = Arc::new(HostMapping::new(&BackingKind::Anon, 0x2000).unwrap());
    /// let map = SlotMap::new(SlotMapConfig::default());
    /// let plug = |gpa, offset| PlugSpec {
    ///     gpa: Gpa(gpa),
    ///     size: 0x1000,
    ///     mapping: mem.clone(),
    ///     offset,
    ///     flags: SlotFlags::NONE,
    /// };
    /// let t = map.plug_many(vec![plug(0x10_0000, 0), plug(0x10_2000, 0x1000)]).unwrap();
    /// assert_eq!(t.map.len(), 2);
    /// // The second is beyond the limit: neither is plugged.
    /// assert!(map.plug_many(vec![plug(0x10_0000, 0), plug(1 << 48, 0x1000)]).is_err());
    /// ```
    ///
    /// # Errors
    /// As for [`plug`](SlotMap::plug), for the first plug refused (an empty
    /// batch is a [`ZeroSize`](SlotMapError::ZeroSize)), and
    /// [`BatchOverlap`](SlotMapError::BatchOverlap) when two plugs of the
    /// batch share guest range or host memory.
    pub fn plug_many(&self, plugs: Vec<PlugSpec>) -> Result<Transition, SlotMapError> {
        self.plug_all("plug", plugs)
    }

    fn plug_all(&self, op: &'static str, plugs: Vec<PlugSpec>) -> Result<Transition, SlotMapError> {
        if plugs.is_empty() {
            return Err(SlotMapError::ZeroSize { op });
        }
        let mut edit = Edit::default();
        for (i, p) in plugs.into_iter().enumerate() {
            // Each plug starts its own chain, numbered in batch order.
            let align = p.mapping.granule();
            let range = self.check_plug_range(op, p.gpa, p.size, align, p.flags)?;
            check_aligned(op, "offset", p.offset, align)?;
            if p.offset
                .checked_add(p.size)
                .is_none_or(|end| end > p.mapping.len())
            {
                return Err(SlotMapError::MappingTooSmall {
                    op,
                    offset: p.offset,
                    size: p.size,
                    mapping_len: p.mapping.len(),
                });
            }
            self.check_host_unused(op, &p.mapping, p.offset, p.size)?;
            edit.inserts.push(Seg {
                range,
                mapping: p.mapping,
                offset: p.offset,
                flags: p.flags,
                chain: self.next_chain + i as u64,
            });
            edit.new_chains += 1;
        }
        // The batch against itself, in O(k log k): neighbours by GPA, then by
        // host memory.
        edit.inserts.sort_by_key(|s| s.range.start());
        let conflict = |a: &Seg, b: &Seg, what| SlotMapError::BatchOverlap {
            op,
            what,
            first: a.range,
            second: b.range,
        };
        if let Some(w) = edit
            .inserts
            .windows(2)
            .find(|w| w[0].range.overlaps(&w[1].range))
        {
            return Err(conflict(&w[0], &w[1], "range"));
        }
        let mut host: Vec<&Seg> = edit.inserts.iter().collect();
        host.sort_by_key(|s| (Arc::as_ptr(&s.mapping) as usize, s.offset));
        if let Some(w) = host.windows(2).find(|w| {
            Arc::ptr_eq(&w[0].mapping, &w[1].mapping)
                && w[0].offset + w[0].range.len() > w[1].offset
        }) {
            return Err(conflict(w[0], w[1], "host memory"));
        }
        edit.windows = edit.inserts.iter().map(|s| s.range).collect();
        edit.added = edit.windows.clone();
        self.commit(op, edit)
    }

    /// Unplugs `[gpa, gpa + size)` like `munmap`: slots across the edges are
    /// split, holes inside are fine, but the range must hold some memory.
    /// The host memory unmapped is listed in [`Transition::discards`].
    ///
    /// # Errors
    /// Range errors as for [`plug`](SlotMap::plug) (4 KiB granule),
    /// [`NothingPlugged`](SlotMapError::NothingPlugged), [`Fixed`](SlotMapError::Fixed),
    /// [`Misaligned`](SlotMapError::Misaligned) for a cut inside a huge-page slot,
    /// [`TooManySlots`](SlotMapError::TooManySlots) when a split needs one slot too many.
    pub fn unplug(&self, gpa: Gpa, size: u64) -> Result<Transition, SlotMapError> {
        const OP: &str = "unplug";
        let size = match crate::mutants::on("unplug-keeps-last-page") {
            true if size > PAGE_SIZE => size - PAGE_SIZE,
            _ => size,
        };
        let range = self.check_range(OP, gpa, size, PAGE_SIZE)?;
        let slots: Vec<Slot> = self.overlapping(range).cloned().collect();
        if slots.is_empty() {
            return Err(SlotMapError::NothingPlugged { op: OP, range });
        }
        self.check_cuts(OP, range, &slots)?;
        let mut edit = Edit {
            windows: vec![range],
            ..Edit::default()
        };
        for s in &slots {
            if let Some(part) = s.range.intersect(&range) {
                let p = Seg::part(s, part);
                edit.discard(&p.mapping, p.offset, part.len());
                edit.removed(part, ChangeKind::Unmapped);
            }
        }
        self.commit(OP, edit)
    }

    /// Makes `[gpa, gpa + size)` read-only or writable like `mprotect`: the
    /// range must be fully plugged; slots are split at its edges and merged
    /// afterwards. KVM cannot toggle `KVM_MEM_READONLY` on a live slot, so
    /// every changed slot is a delete and a create.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use vmm::mm::addr::Gpa;
    /// use vmm::mm::backing::{BackingKind, HostMapping};
    /// use vmm::mm::slot_map::{ChangeKind, SlotFlags, SlotMap, SlotMapConfig};
    ///
    /// let mem = Arc::new(HostMapping::new(&BackingKind::Anon, 0x8000).unwrap());
    /// let map = SlotMap::new(SlotMapConfig::default());
    /// let map = map.plug(Gpa(0), 0x8000, mem, 0, SlotFlags::NONE).unwrap().map;
    /// let t = map.protect(Gpa(0x2000), 0x2000, true).unwrap();
    /// assert_eq!(t.map.len(), 3); // split at both edges
    /// assert!(t.map.lookup(Gpa(0x2000)).unwrap().flags().read_only);
    /// assert_eq!(t.removed[0].1, ChangeKind::WriteProtected);
    /// // Making it writable again merges the three slots back into one.
    /// assert_eq!(t.map.protect(Gpa(0), 0x8000, false).unwrap().map.len(), 1);
    /// ```
    ///
    /// # Errors
    /// Range errors as for [`unplug`](SlotMap::unplug), [`Hole`](SlotMapError::Hole),
    /// [`ReadOnlyUnsupported`](SlotMapError::ReadOnlyUnsupported).
    pub fn protect(
        &self,
        gpa: Gpa,
        size: u64,
        read_only: bool,
    ) -> Result<Transition, SlotMapError> {
        const OP: &str = "protect";
        if read_only && !self.config.read_only_supported {
            return Err(SlotMapError::ReadOnlyUnsupported { op: OP });
        }
        let kind = if read_only {
            ChangeKind::WriteProtected
        } else {
            ChangeKind::Unprotected
        };
        self.reflag(OP, gpa, size, kind, |f| SlotFlags { read_only, ..f })
    }

    /// Switches dirty logging of `[gpa, gpa + size)` on or off: like
    /// [`protect`](SlotMap::protect), but a slot wholly inside the range keeps
    /// its id and gets a flags-only [`MemslotChange::SetFlags`].
    ///
    /// [`MemslotChange::SetFlags`]: super::MemslotChange::SetFlags
    ///
    /// ```
    /// use std::sync::Arc;
    /// use vmm::mm::addr::Gpa;
    /// use vmm::mm::backing::{BackingKind, HostMapping};
    /// use vmm::mm::slot_map::{MemslotChange, SlotFlags, SlotMap, SlotMapConfig};
    ///
    /// let mem = Arc::new(HostMapping::new(&BackingKind::Anon, 0x8000).unwrap());
    /// let map = SlotMap::new(SlotMapConfig::default());
    /// let map = map.plug(Gpa(0), 0x8000, mem, 0, SlotFlags::NONE).unwrap().map;
    /// let t = map.set_dirty_log(Gpa(0), 0x8000, true).unwrap();
    /// assert!(matches!(&t.changes[..], [MemslotChange::SetFlags { .. }]));
    /// ```
    ///
    /// # Errors
    /// As for [`protect`](SlotMap::protect).
    pub fn set_dirty_log(&self, gpa: Gpa, size: u64, on: bool) -> Result<Transition, SlotMapError> {
        self.reflag(
            "set_dirty_log",
            gpa,
            size,
            ChangeKind::DirtyLog { on },
            |f| SlotFlags { dirty_log: on, ..f },
        )
    }

    fn reflag(
        &self,
        op: &'static str,
        gpa: Gpa,
        size: u64,
        kind: ChangeKind,
        set: impl Fn(SlotFlags) -> SlotFlags,
    ) -> Result<Transition, SlotMapError> {
        let range = self.check_range(op, gpa, size, PAGE_SIZE)?;
        let slots = self.covered(op, range)?;
        let mut edit = Edit {
            windows: vec![range],
            ..Edit::default()
        };
        for s in &slots {
            if let Some(part) = s.range.intersect(&range) {
                let mut p = Seg::part(s, part);
                p.flags = set(s.flags);
                if p.flags != s.flags {
                    edit.removed(part, kind);
                }
                edit.inserts.push(p);
            }
        }
        self.commit(op, edit)
    }

    /// Moves `[gpa, gpa + size)` to `new_gpa` like `mremap`: the same host
    /// memory (same mapping and offsets, so the same hva) appears at the new
    /// place and the old range becomes unplugged. The source must be fully
    /// plugged; the destination must be free and not overlap the source;
    /// `new_gpa` must be aligned to the granule of every moved mapping (2 MiB
    /// for hugetlb, else 4 KiB).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use vmm::mm::addr::Gpa;
    /// use vmm::mm::backing::{BackingKind, HostMapping};
    /// use vmm::mm::slot_map::{SlotFlags, SlotMap, SlotMapConfig};
    ///
    /// let mem = Arc::new(HostMapping::new(&BackingKind::Anon, 0x8000).unwrap());
    /// let map = SlotMap::new(SlotMapConfig::default());
    /// let map = map.plug(Gpa(0), 0x8000, mem, 0, SlotFlags::NONE).unwrap().map;
    /// let hva = map.translate(Gpa(0x4000)).unwrap().0;
    /// let t = map.move_range(Gpa(0x4000), 0x4000, Gpa(0x100_0000)).unwrap();
    /// assert_eq!(t.map.translate(Gpa(0x100_0000)).unwrap().0, hva);
    /// assert!(t.map.lookup(Gpa(0x4000)).is_none());
    /// ```
    ///
    /// # Errors
    /// Range errors, [`DestinationOverlapsSource`](SlotMapError::DestinationOverlapsSource),
    /// [`Hole`](SlotMapError::Hole), [`Fixed`](SlotMapError::Fixed),
    /// [`Overlap`](SlotMapError::Overlap) (destination occupied),
    /// [`TooManySlots`](SlotMapError::TooManySlots).
    pub fn move_range(
        &self,
        gpa: Gpa,
        size: u64,
        new_gpa: Gpa,
    ) -> Result<Transition, SlotMapError> {
        const OP: &str = "move_range";
        let src = self.check_range(OP, gpa, size, PAGE_SIZE)?;
        let dst = GpaRange::new(new_gpa, size).ok_or(SlotMapError::RangeOverflow {
            op: OP,
            gpa: new_gpa,
            size,
        })?;
        if dst.overlaps(&src) {
            return Err(SlotMapError::DestinationOverlapsSource { op: OP, src, dst });
        }
        let slots = self.covered(OP, src)?;
        let align = slots
            .iter()
            .map(|s| s.mapping.granule())
            .fold(PAGE_SIZE, u64::max);
        check_aligned(OP, "new_gpa", new_gpa.0, align)?;
        if dst.end() > self.config.max_gpa {
            return Err(SlotMapError::BeyondMaxGpa {
                op: OP,
                range: dst,
                max_gpa: self.config.max_gpa,
            });
        }
        self.check_free(OP, dst)?;
        let mut windows = vec![src, dst];
        windows.sort();
        let mut edit = Edit {
            windows,
            removed: vec![(src, ChangeKind::Unmapped)],
            added: vec![dst],
            ..Edit::default()
        };
        for s in &slots {
            if let Some(part) = s.range.intersect(&src) {
                let mut p = Seg::part(s, part);
                // In range: part lies inside src, and dst has src's length.
                p.range = GpaRange::new(Gpa(new_gpa.0 + (part.start().0 - gpa.0)), part.len())
                    .unwrap_or(p.range);
                edit.inserts.push(p);
            }
        }
        // The windows' slots: the source's (the destination is free).
        edit.touched = Some(slots);
        self.commit(OP, edit)
    }

    /// The mapping starting at `gpa`, as [`resize`](SlotMap::resize) acts
    /// on it: the slot starting there and the GPA-adjacent slots after it of
    /// the same [chain](Slot::chain), in order.
    pub fn mapping_at(&self, gpa: Gpa) -> Vec<&Slot> {
        let mut run: Vec<&Slot> = Vec::new();
        let mut next = self.slot_at(gpa);
        while let Some(s) = next {
            if run.last().is_some_and(|first| first.chain != s.chain) {
                break;
            }
            run.push(s);
            if crate::mutants::on("resize-first-slot") {
                break;
            }
            next = self.slot_at(s.range.end());
        }
        run
    }

    /// Resizes the mapping starting at `slot_gpa` to `new_size` bytes, like
    /// `mremap` without `MREMAP_MAYMOVE`.
    ///
    /// The *mapping* is the slot starting at `slot_gpa` and the GPA-adjacent
    /// slots after it of the same [chain](Slot::chain) ([`mapping_at`]):
    /// what one plug made, with what earlier grows added after it, however
    /// protects and dirty-log changes split it since. Shrinking unplugs the
    /// mapping's tail past `new_size` (listed in `discards`), whichever of
    /// its slots that covers. Growing needs the added range after the
    /// mapping's end free and below the limit; it continues the last slot in
    /// place when that slot's host mapping has unused room after it, else it
    /// backs the added part with `grow_mapping` from offset 0 (a new slot of
    /// the same chain, with the last slot's flags).
    ///
    /// [`mapping_at`]: SlotMap::mapping_at
    ///
    /// ```
    /// use std::sync::Arc;
    /// use vmm::mm::addr::Gpa;
    /// use vmm::mm::backing::{BackingKind, HostMapping};
    /// use vmm::mm::slot_map::{SlotFlags, SlotMap, SlotMapConfig};
    ///
    /// let mem = Arc::new(HostMapping::new(&BackingKind::Anon, 0x8000).unwrap());
    /// let map = SlotMap::new(SlotMapConfig::default());
    /// let map = map.plug(Gpa(0), 0x4000, mem, 0, SlotFlags::NONE).unwrap().map;
    /// let grown = map.resize(Gpa(0), 0x8000, None).unwrap().map; // room in `mem`
    /// assert_eq!(grown.lookup(Gpa(0x7000)).unwrap().range().len(), 0x8000);
    /// let t = grown.resize(Gpa(0), 0x1000, None).unwrap();
    /// assert_eq!(t.discards[0].len, 0x7000);
    /// // A grow backed by another mapping is a second slot of the same mapping:
    /// let other = Arc::new(HostMapping::new(&BackingKind::Anon, 0x2000).unwrap());
    /// let two = grown.resize(Gpa(0), 0xa000, Some(other)).unwrap().map;
    /// assert_eq!(two.mapping_at(Gpa(0)).len(), 2);
    /// let t = two.resize(Gpa(0), 0x1000, None).unwrap(); // shrinks both
    /// assert!(t.map.lookup(Gpa(0x9000)).is_none());
    /// ```
    ///
    /// # Errors
    /// [`NoSlotAt`](SlotMapError::NoSlotAt), [`Fixed`](SlotMapError::Fixed),
    /// [`ZeroSize`](SlotMapError::ZeroSize), [`Misaligned`](SlotMapError::Misaligned),
    /// [`BeyondMaxGpa`](SlotMapError::BeyondMaxGpa), [`Overlap`](SlotMapError::Overlap),
    /// [`SlotTooLarge`](SlotMapError::SlotTooLarge) (the added part alone is
    /// more than one memslot may hold), [`NoRoomToGrow`](SlotMapError::NoRoomToGrow), and for `grow_mapping`
    /// [`MappingTooSmall`](SlotMapError::MappingTooSmall) or
    /// [`HostAliased`](SlotMapError::HostAliased). A shrink reports errors as
    /// [`unplug`](SlotMap::unplug) of the tail.
    pub fn resize(
        &self,
        slot_gpa: Gpa,
        new_size: u64,
        grow_mapping: Option<Arc<HostMapping>>,
    ) -> Result<Transition, SlotMapError> {
        const OP: &str = "resize";
        let run = self.mapping_at(slot_gpa);
        let (Some(first), Some(last)) = (run.first(), run.last()) else {
            return Err(SlotMapError::NoSlotAt {
                op: OP,
                gpa: slot_gpa,
            });
        };
        Self::check_not_fixed(OP, run.iter().copied())?;
        if new_size == 0 {
            return Err(SlotMapError::ZeroSize { op: OP });
        }
        let granule = run
            .iter()
            .map(|s| s.mapping.granule())
            .fold(PAGE_SIZE, u64::max);
        check_aligned(OP, "new_size", new_size, granule)?;
        let len = last.range.end().0 - first.range.start().0;
        if new_size <= len {
            if new_size == len {
                return self.commit(OP, Edit::default());
            }
            let mut t = self.unplug(Gpa(slot_gpa.0 + new_size), len - new_size)?;
            t.op = super::SlotOp::Resize;
            return Ok(t);
        }
        let grow = new_size - len;
        let added = self.check_range(OP, last.range.end(), grow, PAGE_SIZE)?;
        // The added part is one new memslot (merged with the last slot only
        // while the two fit one memslot).
        self.check_slot_size(OP, added)?;
        self.check_free(OP, added)?;
        let end_offset = last.offset + last.range.len();
        let in_place = end_offset
            .checked_add(grow)
            .is_some_and(|e| e <= last.mapping.len())
            && !self.host_in_use(&last.mapping, end_offset, grow);
        let piece = if in_place {
            Seg {
                range: added,
                mapping: Arc::clone(&last.mapping),
                offset: end_offset,
                flags: last.flags,
                chain: last.chain,
            }
        } else {
            let Some(mapping) = grow_mapping else {
                return Err(SlotMapError::NoRoomToGrow {
                    op: OP,
                    slot: last.id,
                    grow,
                    end_offset,
                    mapping_len: last.mapping.len(),
                });
            };
            let align = mapping.granule();
            check_aligned(OP, "gpa", added.start().0, align)?;
            check_aligned(OP, "size", grow, align)?;
            if grow > mapping.len() {
                return Err(SlotMapError::MappingTooSmall {
                    op: OP,
                    offset: 0,
                    size: grow,
                    mapping_len: mapping.len(),
                });
            }
            self.check_host_unused(OP, &mapping, 0, grow)?;
            Seg {
                range: added,
                mapping,
                offset: 0,
                flags: last.flags,
                chain: last.chain,
            }
        };
        let edit = Edit {
            windows: vec![added],
            inserts: vec![piece],
            added: vec![added],
            ..Edit::default()
        };
        self.commit(OP, edit)
    }
}

fn hole(op: &'static str, range: GpaRange, start: Gpa, end: Gpa) -> SlotMapError {
    SlotMapError::Hole {
        op,
        range,
        hole: GpaRange::from_bounds(start, end).unwrap_or(range),
    }
}
