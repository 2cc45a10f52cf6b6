//! One guest memory slot: a guest-physical range backed by a window of a host
//! mapping, with the flags KVM sees and the identity later checks rely on.

use std::fmt;
use std::sync::Arc;

use crate::mm::addr::{Gpa, GpaRange, Hva};
use crate::mm::backing::HostMapping;

bitflags::bitflags! {
    /// The flags of a memslot as the backend holds it. The bits are KVM's
    /// uapi values (`include/uapi/linux/kvm.h`); `vmm::kvm::memslots`
    /// checks them against kvm-bindings when it builds.
    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
    pub struct MemslotFlags: u32 {
        /// `KVM_MEM_LOG_DIRTY_PAGES`: the backend logs guest writes.
        const LOG_DIRTY_PAGES = 1 << 0;
        /// `KVM_MEM_READONLY`: guest writes exit to the VMM as MMIO.
        const READONLY = 1 << 1;
    }
}

/// A KVM memslot id (the low 16 bits of `kvm_userspace_memory_region::slot`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct SlotId(pub u32);

impl fmt::Display for SlotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "slot {}", self.0)
    }
}

/// The flags of a slot.
///
/// `read_only` and `dirty_log` map to KVM memslot flags
/// ([`SlotFlags::memslot_flags`]); `fixed` is the map's own: a fixed slot
/// (the boot region) is refused by every op and never merges. Named booleans
/// rather than a bitflags set: they are read one at a time far more often
/// than combined, and `fixed` never reaches the backend; the set that does
/// is the bitflags [`MemslotFlags`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct SlotFlags {
    /// Guest writes exit to the VMM as MMIO (`KVM_MEM_READONLY`).
    pub read_only: bool,
    /// KVM logs guest writes (`KVM_MEM_LOG_DIRTY_PAGES`).
    pub dirty_log: bool,
    /// No op may change, split, merge or remove this slot.
    pub fixed: bool,
}

impl SlotFlags {
    /// Writable, not logged, not fixed.
    pub const NONE: SlotFlags = SlotFlags {
        read_only: false,
        dirty_log: false,
        fixed: false,
    };

    /// The memslot flags the backend holds for a slot with these flags.
    pub fn memslot_flags(self) -> MemslotFlags {
        let mut f = MemslotFlags::empty();
        f.set(MemslotFlags::LOG_DIRTY_PAGES, self.dirty_log);
        f.set(MemslotFlags::READONLY, self.read_only);
        f
    }
}

/// A guest memory slot. Immutable: an op that changes a slot creates a new
/// `Slot` with a new [`generation`](Slot::generation).
#[derive(Clone)]
pub struct Slot {
    pub(super) id: SlotId,
    pub(super) range: GpaRange,
    pub(super) mapping: Arc<HostMapping>,
    pub(super) offset: u64,
    /// `mapping.hva() + offset`, kept so that readers translate without
    /// dereferencing the mapping (one cache line less per lookup).
    pub(super) hva: Hva,
    pub(super) flags: SlotFlags,
    pub(super) generation: u64,
    pub(super) chain: u64,
}

impl Slot {
    /// The KVM memslot id.
    pub fn id(&self) -> SlotId {
        self.id
    }
    /// The guest-physical range.
    pub fn range(&self) -> GpaRange {
        self.range
    }
    /// The host mapping behind the range.
    pub fn mapping(&self) -> &Arc<HostMapping> {
        &self.mapping
    }
    /// Byte offset of the slot's first byte inside [`mapping`](Slot::mapping).
    pub fn offset(&self) -> u64 {
        self.offset
    }
    /// The flags.
    pub fn flags(&self) -> SlotFlags {
        self.flags
    }
    /// The slot's identity, unique among the slot objects of one lineage of
    /// maps: two slots with the same generation have the same id, range,
    /// host memory and access. Any change of those makes a new slot object
    /// with a new generation; turning dirty logging on or off does not (it
    /// takes no memory away and changes no access), so readers' guards
    /// survive it. Lets a reader holding an old snapshot check its slot is
    /// still the current one.
    pub fn generation(&self) -> u64 {
        self.generation
    }
    /// The mapping this slot is part of, as [`SlotMap::resize`] sees it: a
    /// plug starts a new chain; the pieces it is split into, the memory a
    /// grow adds after it, and slots it merges with (the left one's chain
    /// wins, as merged VMAs become one) keep it. See the module docs of
    /// [`slot_map`](super).
    ///
    /// [`SlotMap::resize`]: super::SlotMap::resize
    pub fn chain(&self) -> u64 {
        self.chain
    }
    /// Host address of the slot's first byte (`userspace_addr`).
    #[inline]
    pub fn hva(&self) -> Hva {
        self.hva
    }
    /// Host address of `gpa`, if it lies inside the slot.
    #[inline]
    pub fn translate(&self, gpa: Gpa) -> Option<Hva> {
        let delta = gpa.offset_from(self.range.start())?;
        (delta < self.range.len()).then(|| Hva(self.hva().0 + delta))
    }
    /// What KVM must hold for this slot.
    pub fn spec(&self) -> MemslotSpec {
        MemslotSpec {
            id: self.id,
            gpa: self.range.start(),
            size: self.range.len(),
            hva: self.hva(),
            flags: self.flags.memslot_flags(),
        }
    }
}

impl fmt::Debug for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slot")
            .field("id", &self.id.0)
            .field("range", &format_args!("{}", self.range))
            .field("hva", &self.hva())
            .field("offset", &format_args!("{:#x}", self.offset))
            .field("flags", &self.flags)
            .field("generation", &self.generation)
            .field("chain", &self.chain)
            .finish()
    }
}

/// One memslot as the backend (`KVM_SET_USER_MEMORY_REGION`) takes it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct MemslotSpec {
    /// Slot id.
    pub id: SlotId,
    /// `guest_phys_addr`.
    pub gpa: Gpa,
    /// `memory_size`.
    pub size: u64,
    /// `userspace_addr`.
    pub hva: Hva,
    /// `flags`.
    pub flags: MemslotFlags,
}

/// A piece of guest memory being laid out by an op, before it gets an id.
#[derive(Clone)]
pub(super) struct Seg {
    pub(super) range: GpaRange,
    pub(super) mapping: Arc<HostMapping>,
    pub(super) offset: u64,
    pub(super) flags: SlotFlags,
    pub(super) chain: u64,
}

impl Seg {
    pub(super) fn of(slot: &Slot) -> Seg {
        Seg {
            range: slot.range,
            mapping: Arc::clone(&slot.mapping),
            offset: slot.offset,
            flags: slot.flags,
            chain: slot.chain,
        }
    }

    /// The part of `slot` inside `part` (which must lie inside the slot).
    pub(super) fn part(slot: &Slot, part: GpaRange) -> Seg {
        debug_assert!(part.start() >= slot.range.start() && part.end() <= slot.range.end());
        Seg {
            range: part,
            mapping: Arc::clone(&slot.mapping),
            offset: slot.offset + (part.start().0 - slot.range.start().0),
            flags: slot.flags,
            chain: slot.chain,
        }
    }

    /// Whether `next` continues `self` seamlessly, so the two merge into one
    /// slot: adjacent in GPA, same mapping, contiguous offsets, equal flags,
    /// neither fixed.
    pub(super) fn merges_with(&self, next: &Seg) -> bool {
        !crate::mutants::on("no-merge")
            && !self.flags.fixed
            && self.flags == next.flags
            && self.range.end() == next.range.start()
            && Arc::ptr_eq(&self.mapping, &next.mapping)
            && self.offset + self.range.len() == next.offset
    }

    /// Whether this piece is exactly `slot`'s memory (flags aside).
    pub(super) fn same_memory(&self, slot: &Slot) -> bool {
        self.range == slot.range
            && Arc::ptr_eq(&self.mapping, &slot.mapping)
            && self.offset == slot.offset
    }
}
