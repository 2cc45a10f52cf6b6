//! What an op hands to the layer that keeps KVM in sync: the new map and the
//! exact memslot changes, host memory to release, and the guest ranges whose
//! translation changed.
//!
//! # Order of `changes`
//! [`MemslotChange::SetFlags`] come first. Then the deletes and creates, in
//! *clusters*: a cluster is a set of deleted and created slots whose GPA
//! ranges overlap (transitively); within a cluster all deletes come before
//! all creates. Clusters that do not add slots come first, then those that
//! do, each group by GPA. Applied in this order to a KVM whose memslots equal
//! [`SlotMap::expected_memslots`] of the old map, every step is valid:
//! - a create never overlaps a live slot: the slots it overlaps are in its
//!   cluster and already deleted; the others are disjoint from it;
//! - a create never reuses a live id: ids are handed out as the changes are
//!   emitted, lowest free first, from the ids free at that point;
//! - the live count never exceeds the larger of the old and new counts
//!   (first non-growing clusters, each never above its starting count; then
//!   growing ones, each never above its ending count), so ids, which stay
//!   below the live count, stay below `max_slots`.
//!
//! A rollback undoes the applied prefix in reverse: a `Create` is undone by
//! deleting its slot, a `SetFlags` by setting `old_flags`, a `Delete` by
//! re-creating its slot. Each undo restores the state before its change, so
//! the reverse sequence is valid too.
//!
//! # The guest-visible window
//! KVM cannot resize or split a memslot, nor toggle `KVM_MEM_READONLY` on a
//! live one: such changes are a delete followed by a create. Between the two
//! ioctls the range has no memslot, so a vCPU touching it exits to the VMM as
//! MMIO (`KVM_EXIT_MMIO`). Clustering keeps that window per cluster: a range
//! is without memslot only from its cluster's first delete to its last
//! create, not for the whole op; the VMM should treat an MMIO exit in a range of
//! `changes` as "retry after the op" rather than a guest error. A deleted slot
//! also loses its dirty bitmap: harvest the dirty log of a `Delete`d
//! dirty-logging slot before applying the delete. A `SetFlags` (dirty log on or
//! off) has no such window.
//!
//! [`SlotMap::expected_memslots`]: super::SlotMap::expected_memslots

use std::fmt;
use std::sync::Arc;

use crate::mm::addr::GpaRange;
use crate::mm::backing::HostMapping;

use super::slot::{Slot, SlotFlags};
use super::SlotMap;

/// One `KVM_SET_USER_MEMORY_REGION` call.
#[derive(Clone, Debug)]
pub enum MemslotChange {
    /// Delete the slot (`memory_size = 0`).
    Delete {
        /// The slot as KVM holds it now.
        slot: Slot,
    },
    /// Create the slot; its id is not live in KVM at this point.
    Create {
        /// The new slot.
        slot: Slot,
    },
    /// Change only `KVM_MEM_LOG_DIRTY_PAGES` of a live slot (same id, range, hva).
    SetFlags {
        /// The slot with its new flags.
        slot: Slot,
        /// The flags it had (for rollback).
        old_flags: SlotFlags,
    },
}

/// How the translation of a guest range changed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ChangeKind {
    /// The range no longer maps this memory (unplug, shrink, move source):
    /// every cached translation of it must go.
    Unmapped,
    /// The range became read-only: writable translations must go.
    WriteProtected,
    /// The range became writable.
    Unprotected,
    /// Dirty logging was switched on or off.
    DirtyLog {
        /// The new state.
        on: bool,
    },
}

/// Host memory no longer mapped into the guest. Release it (e.g.
/// [`HostMapping::discard`]) only after KVM dropped the slot that mapped it.
#[derive(Clone)]
pub struct Discard {
    /// The mapping.
    pub mapping: Arc<HostMapping>,
    /// Byte offset into it.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl fmt::Debug for Discard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Discard({:?} [{:#x}, +{:#x}))",
            self.mapping.hva(),
            self.offset,
            self.len
        )
    }
}

/// Which op produced a [`Transition`] (for the reason given to
/// invalidation subscribers: an unmapped range is an unplug, a shrink or a
/// move source; an added range a plug, a grow or a move destination).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SlotOp {
    /// [`SlotMap::plug`](super::SlotMap::plug).
    Plug,
    /// [`SlotMap::unplug`](super::SlotMap::unplug).
    Unplug,
    /// [`SlotMap::protect`](super::SlotMap::protect).
    Protect,
    /// [`SlotMap::set_dirty_log`](super::SlotMap::set_dirty_log).
    SetDirtyLog,
    /// [`SlotMap::move_range`](super::SlotMap::move_range).
    Move,
    /// [`SlotMap::resize`](super::SlotMap::resize) (grow or shrink).
    Resize,
}

impl SlotOp {
    /// The op of the name the slot map's errors use.
    pub(super) fn from_name(op: &'static str) -> Self {
        match op {
            "plug" => Self::Plug,
            "unplug" => Self::Unplug,
            "protect" => Self::Protect,
            "set_dirty_log" => Self::SetDirtyLog,
            "move_range" => Self::Move,
            "resize" => Self::Resize,
            // Every op commits under one of the names above
            // (`test_transition_op_names_every_op`).
            other => unreachable!("unknown slot map op {other}"),
        }
    }
}

/// The result of a successful op. The old map is untouched; dropping a
/// `Transition` abandons the op.
#[derive(Clone, Debug)]
pub struct Transition {
    /// The op.
    pub op: SlotOp,
    /// The map after the op.
    pub map: SlotMap,
    /// Memslot calls that turn KVM's old state into `map`'s, in a valid order.
    pub changes: Vec<MemslotChange>,
    /// Host memory to release after the changes are applied.
    pub discards: Vec<Discard>,
    /// Guest ranges whose existing translation changed, coalesced, by GPA.
    pub removed: Vec<(GpaRange, ChangeKind)>,
    /// Guest ranges that became plugged.
    pub added: Vec<GpaRange>,
}
