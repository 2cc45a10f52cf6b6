//! The one error type of the slot map. Every op validates before it builds
//! anything, so an error always means "nothing changed".

use crate::mm::addr::{Gpa, GpaRange};

use super::slot::SlotId;

/// Why a slot-map op was refused. Messages name the values involved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotMapError {
    /// A size of zero bytes.
    #[error("{op}: size is zero")]
    ZeroSize {
        /// The op.
        op: &'static str,
    },
    /// `gpa + size` overflows the address space.
    #[error("{op}: range {gpa} + {size:#x} overflows")]
    RangeOverflow {
        /// The op.
        op: &'static str,
        /// Start.
        gpa: Gpa,
        /// Size.
        size: u64,
    },
    /// An address, size or offset is not a multiple of the required granule.
    #[error("{op}: {what} {value:#x} is not aligned to {align:#x}")]
    Misaligned {
        /// The op.
        op: &'static str,
        /// Which value ("gpa", "size", "offset", "new_gpa", "cut at"...).
        what: &'static str,
        /// The value.
        value: u64,
        /// The granule (4 KiB, or the mapping's page size).
        align: u64,
    },
    /// The range ends above the guest-physical width.
    #[error("{op}: range {range} ends above the guest-physical limit {max_gpa}")]
    BeyondMaxGpa {
        /// The op.
        op: &'static str,
        /// The range.
        range: GpaRange,
        /// Exclusive limit.
        max_gpa: Gpa,
    },
    /// The range overlaps a plugged slot (KVM would return `EEXIST`).
    #[error("{op}: range {range} overlaps {slot} at {slot_range}")]
    Overlap {
        /// The op.
        op: &'static str,
        /// The requested range.
        range: GpaRange,
        /// The slot in the way.
        slot: SlotId,
        /// Its range.
        slot_range: GpaRange,
    },
    /// `offset + size` runs past the end of the host mapping.
    #[error("{op}: mapping window [{offset:#x}, +{size:#x}) is outside the {mapping_len:#x}-byte mapping")]
    MappingTooSmall {
        /// The op.
        op: &'static str,
        /// Offset into the mapping.
        offset: u64,
        /// Bytes needed.
        size: u64,
        /// Mapping length.
        mapping_len: u64,
    },
    /// The host memory already backs another slot (aliases are refused so a
    /// discard can never zero memory still mapped elsewhere).
    #[error("{op}: mapping window [{offset:#x}, +{size:#x}) already backs {slot} at {slot_range}")]
    HostAliased {
        /// The op.
        op: &'static str,
        /// Offset into the mapping.
        offset: u64,
        /// Size.
        size: u64,
        /// The slot using that memory.
        slot: SlotId,
        /// Its range.
        slot_range: GpaRange,
    },
    /// Two plugs of one batch ([`SlotMap::plug_many`]) share guest range or
    /// host memory.
    ///
    /// [`SlotMap::plug_many`]: super::SlotMap::plug_many
    #[error("{op}: two plugs of the batch share {what}: {first} and {second}")]
    BatchOverlap {
        /// The op.
        op: &'static str,
        /// "range" or "host memory".
        what: &'static str,
        /// The earlier plug's range.
        first: GpaRange,
        /// The later plug's range.
        second: GpaRange,
    },
    /// The range covers the reserved range (the VMM's register page).
    #[error("{op}: range {range} overlaps the reserved range {reserved}")]
    Reserved {
        /// The operation.
        op: &'static str,
        /// The requested range.
        range: GpaRange,
        /// The reserved range.
        reserved: GpaRange,
    },
    /// The op would need more slots than the map allows (`max_slots`).
    #[error("{op}: needs {needed} slots but at most {max} are allowed")]
    TooManySlots {
        /// The op.
        op: &'static str,
        /// Slots the map would hold after the op.
        needed: usize,
        /// `KVM_CAP_NR_MEMSLOTS`.
        max: u32,
    },
    /// A read-only slot was asked for but KVM lacks `KVM_CAP_READONLY_MEM`.
    #[error("{op}: read-only slots are not supported by this KVM")]
    ReadOnlyUnsupported {
        /// The op.
        op: &'static str,
    },
    /// The range has nothing plugged in it at all.
    #[error("{op}: nothing is plugged in {range}")]
    NothingPlugged {
        /// The op.
        op: &'static str,
        /// The range.
        range: GpaRange,
    },
    /// The range must be fully plugged but has a hole.
    #[error("{op}: {hole} inside {range} is not plugged")]
    Hole {
        /// The op.
        op: &'static str,
        /// The requested range.
        range: GpaRange,
        /// The first hole.
        hole: GpaRange,
    },
    /// The op touches a fixed slot.
    #[error("{op}: {slot} at {slot_range} is fixed")]
    Fixed {
        /// The op.
        op: &'static str,
        /// The slot.
        slot: SlotId,
        /// Its range.
        slot_range: GpaRange,
    },
    /// No slot starts at the address.
    #[error("{op}: no slot starts at {gpa}")]
    NoSlotAt {
        /// The op.
        op: &'static str,
        /// The address.
        gpa: Gpa,
    },
    /// A move destination overlaps its source.
    #[error("{op}: destination {dst} overlaps source {src}")]
    DestinationOverlapsSource {
        /// The op.
        op: &'static str,
        /// Source range.
        src: GpaRange,
        /// Destination range.
        dst: GpaRange,
    },
    /// Growing a slot whose mapping has no free room after it, without a
    /// mapping for the added part.
    #[error("{op}: {slot} cannot grow by {grow:#x} bytes: its mapping has no free room after offset {end_offset:#x} (length {mapping_len:#x}) and no grow mapping was given")]
    NoRoomToGrow {
        /// The op.
        op: &'static str,
        /// The slot.
        slot: SlotId,
        /// Bytes to add.
        grow: u64,
        /// Offset just past the slot in its mapping.
        end_offset: u64,
        /// Mapping length.
        mapping_len: u64,
    },
    /// The op needs one memslot of more pages than one memslot may hold
    /// (`max_slot_pages`, KVM's `KVM_MEM_MAX_NR_PAGES`; KVM refuses such a
    /// memslot with `EINVAL`).
    #[error("{op}: {range} needs one memslot of {pages} pages, more than the {max_pages} one memslot may hold (KVM_MEM_MAX_NR_PAGES)")]
    SlotTooLarge {
        /// The op.
        op: &'static str,
        /// The range the memslot would cover.
        range: GpaRange,
        /// Its 4 KiB pages.
        pages: u64,
        /// `max_slot_pages`.
        max_pages: u64,
    },
}
