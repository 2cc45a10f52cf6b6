//! Guest memory slots managed like a process's VMAs, with no KVM inside.
//!
//! A [`SlotMap`] maps the guest-physical address space to windows of host
//! mappings, the way `mm/vma.c` maps a process's address space. Ops
//! ([`plug`](SlotMap::plug) and [`plug_many`](SlotMap::plug_many) (a batch,
//! all or nothing), [`unplug`](SlotMap::unplug),
//! [`protect`](SlotMap::protect), [`set_dirty_log`](SlotMap::set_dirty_log),
//! [`move_range`](SlotMap::move_range), [`resize`](SlotMap::resize)) behave like
//! `mmap`/`munmap`/`mprotect`/`mremap`: they split slots at the range's edges
//! and merge neighbours afterwards. Each op validates first, then returns a
//! [`Transition`]: the new map plus the exact memslot changes that make KVM
//! agree with it (see [`transition`] for their order and the guest-visible
//! window). The layer that owns the VM fd applies them.
//!
//! # Invariants (after every op)
//! - Slots are sorted by GPA and never overlap; all lie below `max_gpa`.
//! - Merging is maximal: no two GPA-adjacent slots share a mapping, have
//!   contiguous offsets and equal flags (fixed slots never merge), unless
//!   together they hold more than `max_slot_pages` pages.
//! - No slot holds more than `max_slot_pages` pages (KVM's
//!   [`MAX_MEMSLOT_PAGES`]): a plug or grow that needs a larger slot is
//!   refused, and neighbours merge left to right only while the merged slot
//!   fits, so which neighbours stay apart can depend on the order of ops.
//! - Ids are unique, lowest-free-first, and below `max_slots`; `len() <= max_slots`.
//! - No two slots back the same host memory (so a discard never zeroes memory
//!   still mapped elsewhere).
//! - `[offset, offset + len)` of every slot lies inside its mapping; GPA, size
//!   and offset are aligned to the mapping's
//!   [granule](crate::mm::backing::HostMapping::granule): 2 MiB for hugetlb
//!   (a hugetlb page cannot be split), 4 KiB for all other memory, THP
//!   included (Linux splits a transparent huge page at 4 KiB; KVM and the
//!   IOMMU then map that 2 MiB region with 4 KiB pages by themselves).
//!
//! # Mappings (what `resize` acts on)
//! Like `mremap`, [`resize`](SlotMap::resize) acts on a whole *mapping*,
//! whatever slots it has been split into. Each slot carries a
//! [chain](Slot::chain): a plug starts a new one; every piece of a slot
//! (after an unplug, protect, dirty-log change or move) keeps it; the memory
//! a grow adds after a mapping joins its chain, even when a new host mapping
//! backs it; two slots that merge become one slot of the left one's chain
//! (as merged VMAs are one VMA). The mapping starting at a GPA
//! ([`mapping_at`](SlotMap::mapping_at)) is the maximal run of GPA-adjacent
//! slots, starting with the slot that starts at that GPA, that share its
//! chain. A hole (an unplug in the middle) or a moved-away piece ends it.
//!
//! # Persistence and cost
//! The map is an [`imbl::OrdMap`] keyed by slot start (plus a host-side index
//! and an [`imbl::OrdSet`] of free ids): cloning is O(1), an op clones the map
//! and edits the clone in O(k log n) for k slots it touches, sharing every
//! untouched node with the old map. A failed or abandoned op therefore leaves
//! the old map exactly as it was, and nothing is O(n) in the number of slots.
//!
//! # Concurrency
//! `SlotMap` is an immutable value. [`SharedSlotMap`] publishes the current one
//! for lock-free readers and serializes writers; see [`shared`].
//!
//! ```
//! use std::sync::Arc;
//! use vmm::mm::addr::{Gpa, Hva};
//! use vmm::mm::backing::{BackingKind, HostMapping};
//! use vmm::mm::slot_map::{MemslotChange, SlotFlags, SlotMap, SlotMapConfig};
//!
//! let mem = Arc::new(HostMapping::new(&BackingKind::Anon, 1 << 20).unwrap());
//! let map = SlotMap::new(SlotMapConfig::default());
//! let t = map.plug(Gpa(0x10_0000), 1 << 20, mem.clone(), 0, SlotFlags::NONE).unwrap();
//! assert_eq!(t.changes.len(), 1); // one Create
//! let map = t.map;
//! assert_eq!(map.translate(Gpa(0x10_2000)).unwrap().0, Hva(mem.hva().0 + 0x2000));
//!
//! // Punch a hole in the middle: the slot is split like munmap splits a VMA.
//! let t = map.unplug(Gpa(0x14_0000), 0x1000).unwrap();
//! assert!(matches!(t.changes[0], MemslotChange::Delete { .. }));
//! assert_eq!(t.map.len(), 2);
//! assert_eq!(t.discards[0].offset, 0x4_0000);
//! assert!(t.map.lookup(Gpa(0x14_0000)).is_none());
//! assert_eq!(map.len(), 1); // the old map is unchanged
//! ```

mod engine;
mod error;
mod ids;
mod ops;
pub mod shared;
mod slot;
pub mod transition;

#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::Arc;

use imbl::OrdMap;

use crate::mm::addr::{Gpa, GpaRange, Hva};
use crate::mm::backing::HostMapping;

pub use error::SlotMapError;
pub use shared::{SharedSlotMap, SlotMapWriter, SnapshotCache};
pub use slot::{MemslotFlags, MemslotSpec, Slot, SlotFlags, SlotId};
pub use transition::{ChangeKind, Discard, MemslotChange, SlotOp, Transition};

use ids::IdAlloc;

/// `KVM_CAP_NR_MEMSLOTS` measured on the development host.
pub const DEFAULT_MAX_SLOTS: u32 = 32764;

/// The most 4 KiB pages one memslot may hold: KVM's `KVM_MEM_MAX_NR_PAGES`
/// (`include/linux/kvm_host.h`: `(1 << 31) - 1`, so a page index within a
/// slot fits an `int`). `__kvm_set_memory_region` (`virt/kvm/kvm_main.c`)
/// refuses a larger `memory_size` with `EINVAL`: one byte short of 8 TiB is
/// the largest memslot.
pub const MAX_MEMSLOT_PAGES: u64 = (1 << 31) - 1;

/// What KVM allows; read from KVM capabilities by the layer that owns the VM.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct SlotMapConfig {
    /// `KVM_CAP_NR_MEMSLOTS`: the most slots (and one past the highest id).
    pub max_slots: u32,
    /// Exclusive guest-physical limit (`1 << guest physical address bits`).
    pub max_gpa: Gpa,
    /// `KVM_CAP_READONLY_MEM`.
    pub read_only_supported: bool,
    /// A guest-physical range no slot may cover (the VMM's MMIO register
    /// page: guest stores there must exit to the VMM).
    pub reserved: Option<GpaRange>,
    /// The most 4 KiB pages one memslot may hold ([`MAX_MEMSLOT_PAGES`]):
    /// a plug or grow that needs a larger slot is refused, and neighbours
    /// whose merged slot would be larger stay two slots.
    pub max_slot_pages: u64,
}

impl Default for SlotMapConfig {
    /// 32,764 slots, a 48-bit guest-physical space, read-only slots
    /// supported, KVM's [`MAX_MEMSLOT_PAGES`] per slot.
    fn default() -> Self {
        Self {
            max_slots: DEFAULT_MAX_SLOTS,
            max_gpa: Gpa(1 << 48),
            read_only_supported: true,
            reserved: None,
            max_slot_pages: MAX_MEMSLOT_PAGES,
        }
    }
}

/// One plug of a batch for [`SlotMap::plug_many`]: the arguments of
/// [`SlotMap::plug`].
#[derive(Clone, Debug)]
pub struct PlugSpec {
    /// First guest-physical address.
    pub gpa: Gpa,
    /// Bytes.
    pub size: u64,
    /// The host memory.
    pub mapping: Arc<HostMapping>,
    /// Byte offset of the slot's first byte in `mapping`.
    pub offset: u64,
    /// The slot's flags.
    pub flags: SlotFlags,
}

impl PlugSpec {
    /// `slots` slots of `pages` pages each, back to back in guest-physical
    /// space from `base`, slot `i` at `i * (pages + 1)` pages into
    /// `mapping`: the unused page between two slots' host windows keeps the
    /// map from merging them (the many-slot layout of the memslot benches).
    #[cfg(test)]
    pub(crate) fn apart(
        mapping: &Arc<HostMapping>,
        base: Gpa,
        slots: u64,
        pages: u64,
    ) -> Vec<PlugSpec> {
        use crate::mm::addr::PAGE_SIZE;
        (0..slots)
            .map(|i| PlugSpec {
                gpa: Gpa(base.0 + i * pages * PAGE_SIZE),
                size: pages * PAGE_SIZE,
                mapping: mapping.clone(),
                offset: i * (pages + 1) * PAGE_SIZE,
                flags: SlotFlags::NONE,
            })
            .collect()
    }
}

/// Key of the host-side index: (mapping identity, offset of a slot's first byte).
type HostKey = (usize, u64);

fn host_key(mapping: &Arc<HostMapping>, offset: u64) -> HostKey {
    (Arc::as_ptr(mapping) as usize, offset)
}

/// A persistent, ordered map of guest memory slots. See the module docs.
#[derive(Clone)]
pub struct SlotMap {
    config: SlotMapConfig,
    /// Slot start -> slot.
    slots: OrdMap<Gpa, Slot>,
    /// (mapping, offset) -> bytes: the host window of every slot, to find
    /// whether host memory is in use. It names no guest address, so a
    /// slot that moves (same mapping, offset and size) leaves it as it is.
    host: OrdMap<HostKey, u64>,
    ids: IdAlloc,
    next_generation: u64,
    /// The chain the next plug starts (see [`Slot::chain`]).
    next_chain: u64,
    /// The slots by GPA as a flat index, when there are at most
    /// [`FLAT_MAX`]: readers use it instead of walking the tree
    /// (`OrdMap::get_prev` builds a range iterator, ~35 ns; this is a few
    /// ns). Rebuilt by every op, O(`FLAT_MAX`) at most; `None` above it.
    /// Held inline, not behind an `Arc`: one dependent load less per lookup;
    /// the price is that `SlotMap::clone` (writer side) copies it.
    flat: Option<FlatIndex>,
}

/// Largest map that also keeps a flat index for readers.
pub const FLAT_MAX: usize = 64;

/// The readers' index of a small map: slot start addresses packed in one
/// array, and the slots in the same order. A lookup binary-searches the
/// packed starts (`partition_point`, compiled branch-free): 8 bytes per step
/// instead of a whole `Slot`, so 64 starts fit in 8 cache lines. Measured:
/// stage-2 bench (64 slots) 10.0 -> 7.2-8.1 ns per held-snapshot lookup against
/// a search over the `Slot`s; a branch-free linear count was cheaper alone at
/// 16 slots (4.8 ns against 5.4) but not inside the guard (guards bench:
/// 13.95 ns against 13.59) and much dearer at 64 (14 ns), so it was dropped.
#[derive(Clone)]
struct FlatIndex {
    starts: Box<[u64]>,
    slots: Box<[Slot]>,
}

impl FlatIndex {
    fn new<'a>(slots: impl Iterator<Item = &'a Slot>) -> Self {
        let slots: Box<[Slot]> = slots.cloned().collect();
        Self {
            starts: slots.iter().map(|s| s.range.start().0).collect(),
            slots,
        }
    }

    /// The last slot starting at or below `gpa` (slots are sorted by start).
    #[inline]
    fn floor(&self, gpa: Gpa) -> Option<&Slot> {
        let at_or_below = self.starts.partition_point(|&start| start <= gpa.0);
        self.slots.get(at_or_below.checked_sub(1)?)
    }
}

impl fmt::Debug for SlotMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlotMap")
            .field("config", &self.config)
            .field("len", &self.slots.len())
            .field("next_generation", &self.next_generation)
            .finish()
    }
}

impl SlotMap {
    /// An empty map.
    pub fn new(config: SlotMapConfig) -> Self {
        Self {
            config,
            slots: OrdMap::new(),
            host: OrdMap::new(),
            ids: IdAlloc::default(),
            next_generation: 0,
            next_chain: 0,
            flat: None,
        }
    }

    /// The limits the map enforces.
    pub fn config(&self) -> &SlotMapConfig {
        &self.config
    }

    /// Whether one memslot of `bytes` is within `max_slot_pages`.
    pub(crate) fn fits_one_memslot(&self, bytes: u64) -> bool {
        bytes / crate::mm::addr::PAGE_SIZE <= self.config.max_slot_pages
    }

    /// The slot containing `gpa`, in O(log n).
    #[inline]
    pub fn lookup(&self, gpa: Gpa) -> Option<&Slot> {
        let slot = match &self.flat {
            Some(flat) => flat.floor(gpa)?,
            None => self.slots.get_prev(&gpa)?.1,
        };
        slot.range.contains(gpa).then_some(slot)
    }

    /// Rebuilds the readers' flat index after an edit (see [`FLAT_MAX`]).
    pub(crate) fn rebuild_flat(&mut self) {
        self.flat = (self.slots.len() <= FLAT_MAX).then(|| FlatIndex::new(self.slots.values()));
    }

    /// The flat index's slots, if kept (test oracle); checks that its start
    /// array matches them.
    #[cfg(test)]
    pub(crate) fn flat(&self) -> Option<&[Slot]> {
        let flat = self.flat.as_ref()?;
        let starts: Vec<u64> = flat.slots.iter().map(|s| s.range.start().0).collect();
        assert_eq!(*flat.starts, *starts, "flat index starts out of step");
        Some(&flat.slots)
    }

    /// The host address of `gpa` and its slot, in O(log n).
    pub fn translate(&self, gpa: Gpa) -> Option<(Hva, &Slot)> {
        let slot = self.lookup(gpa)?;
        Some((slot.translate(gpa)?, slot))
    }

    /// The slot starting exactly at `gpa`.
    pub fn slot_at(&self, gpa: Gpa) -> Option<&Slot> {
        self.slots.get(&gpa)
    }

    /// The slots overlapping `range`, by ascending GPA, in O(log n + k).
    pub fn slots_in(&self, range: GpaRange) -> impl Iterator<Item = &Slot> + '_ {
        self.overlapping(range)
    }

    /// All slots by ascending GPA.
    pub fn iter(&self) -> impl Iterator<Item = &Slot> + '_ {
        self.slots.values()
    }

    /// The plugged guest ranges, adjacent slots merged, by ascending GPA
    /// (the form of the invalidation hub's plugged set).
    pub fn plugged_ranges(&self) -> Vec<GpaRange> {
        let mut out: Vec<GpaRange> = Vec::new();
        for s in self.iter() {
            match out.last_mut() {
                Some(last) if last.end() == s.range.start() => {
                    *last = GpaRange::from_bounds(last.start(), s.range.end()).unwrap_or(*last);
                }
                _ => out.push(s.range),
            }
        }
        out
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether no slot is plugged.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// What KVM's memslots must be, sorted by id: for a consistency check
    /// against the kernel (O(n)).
    pub fn expected_memslots(&self) -> Vec<MemslotSpec> {
        let mut v: Vec<MemslotSpec> = self.slots.values().map(Slot::spec).collect();
        v.sort_by_key(|s| s.id);
        v
    }
}
