//! The table of slot cells, indexed by slot id.
//!
//! Cells are allocated in chunks on first use (a VM with a handful of slots
//! does not pay for 32,764 cells) and never freed or moved while the table
//! lives, so a reader may keep `&SlotCell` from any snapshot: a stale one is
//! caught by its generation, never a dangling pointer. Chunk pointers are
//! published with `OnceLock` (a release store, an acquire load).

use std::fmt;
use std::sync::OnceLock;

use crate::mm::slot_lock::{SlotCell, SlotIdentity, SlotLockError};
use crate::mm::slot_map::Slot;

/// Cells per chunk.
const CHUNK: usize = 64;

/// One [`SlotCell`] per possible slot id, allocated lazily.
pub struct SlotCells {
    chunks: Box<[OnceLock<Box<[SlotCell]>>]>,
}

impl fmt::Debug for SlotCells {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let allocated = self.chunks.iter().filter(|c| c.get().is_some()).count();
        f.debug_struct("SlotCells")
            .field("ids", &(self.chunks.len() * CHUNK))
            .field("allocated_chunks", &allocated)
            .finish()
    }
}

impl SlotCells {
    /// A table for ids below `max_slots`, nothing allocated yet.
    pub fn new(max_slots: u32) -> Self {
        let n = (max_slots as usize).div_ceil(CHUNK).max(1);
        Self {
            chunks: (0..n).map(|_| OnceLock::new()).collect(),
        }
    }

    /// The cell of slot `id`, if its chunk was ever allocated (a reader never
    /// needs more: cells are attached before their slot is published).
    #[inline]
    pub fn get(&self, id: u32) -> Option<&SlotCell> {
        let id = id as usize;
        self.chunks.get(id / CHUNK)?.get().map(|c| &c[id % CHUNK])
    }

    /// The cells of ids `0..64`, if allocated; never moved or freed while
    /// the table lives, so a reader may keep the slice.
    #[inline]
    pub fn first_chunk(&self) -> Option<&[SlotCell]> {
        self.chunks.first()?.get().map(|c| &c[..])
    }

    /// Writer side, under the slot-map writer lock: attaches the cell of
    /// `slot`'s id with `slot`'s range and generation (allocating its chunk).
    ///
    /// # Errors
    /// `AlreadyAttached` if the cell holds a slot; `Detached` (standing for
    /// "no such cell") if the id is beyond the table.
    pub fn attach(&self, slot: &Slot) -> Result<SlotIdentity, SlotLockError> {
        let id = slot.id().0;
        let chunk = self
            .chunks
            .get(id as usize / CHUNK)
            .ok_or(SlotLockError::Detached { slot: id })?;
        let base = (id as usize / CHUNK * CHUNK) as u32;
        let cells =
            chunk.get_or_init(|| (0..CHUNK as u32).map(|i| SlotCell::new(base + i)).collect());
        cells[id as usize % CHUNK].attach_as(slot.range(), slot.generation())
    }

    /// Ids of attached cells (a racy snapshot, for diagnostics and tests).
    pub fn attached(&self) -> Vec<u32> {
        self.chunks
            .iter()
            .filter_map(OnceLock::get)
            .flat_map(|c| c.iter())
            .filter(|c| c.is_attached())
            .map(SlotCell::id)
            .collect()
    }
}
