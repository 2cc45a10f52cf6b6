//! The table of slot cells, indexed by slot id.
//!
//! The cells of the first [`CHUNK`] ids are allocated with the table: every
//! VM uses them, and readers reach them with one index, no lazy-allocation
//! check. Higher ids are allocated in chunks on first use (a VM with a
//! handful of slots does not pay for 32,764 cells). No cell is freed or
//! moved while the table lives, so a reader may keep `&SlotCell` from any
//! snapshot: a stale one is caught by its generation, never a dangling
//! pointer. Chunk pointers are published with `OnceLock` (a release store,
//! an acquire load).

use std::fmt;
use std::sync::OnceLock;

use crate::mm::slot_lock::{SlotCell, SlotIdentity, SlotLockError};
use crate::mm::slot_map::Slot;

/// Cells per chunk (and in the eagerly allocated first one).
const CHUNK: usize = 64;

/// One [`SlotCell`] per possible slot id.
pub struct SlotCells {
    /// Ids `0..CHUNK`.
    first: Box<[SlotCell]>,
    /// Ids `CHUNK * (i + 1)..CHUNK * (i + 2)`, allocated on first use.
    chunks: Box<[OnceLock<Box<[SlotCell]>>]>,
}

impl fmt::Debug for SlotCells {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let allocated = 1 + self.chunks.iter().filter(|c| c.get().is_some()).count();
        f.debug_struct("SlotCells")
            .field("ids", &((1 + self.chunks.len()) * CHUNK))
            .field("allocated_chunks", &allocated)
            .finish()
    }
}

fn chunk(base: usize) -> Box<[SlotCell]> {
    (base..base + CHUNK)
        .map(|id| SlotCell::new(id as u32))
        .collect()
}

impl SlotCells {
    /// A table for ids below `max_slots`, with the first chunk allocated.
    pub fn new(max_slots: u32) -> Self {
        let n = (max_slots as usize).div_ceil(CHUNK).max(1);
        Self {
            first: chunk(0),
            chunks: (1..n).map(|_| OnceLock::new()).collect(),
        }
    }

    /// The cell of slot `id`, if it exists (a reader never needs more: cells
    /// are attached before their slot is published).
    #[inline]
    pub fn get(&self, id: u32) -> Option<&SlotCell> {
        let id = id as usize;
        match self.first.get(id) {
            Some(cell) => Some(cell),
            None => self
                .chunks
                .get(id / CHUNK - 1)?
                .get()
                .map(|c| &c[id % CHUNK]),
        }
    }

    /// Writer side, under the slot-map writer lock: attaches the cell of
    /// `slot`'s id with `slot`'s range and generation (allocating its chunk).
    ///
    /// # Errors
    /// `AlreadyAttached` if the cell holds a slot; `Detached` (standing for
    /// "no such cell") if the id is beyond the table.
    pub fn attach(&self, slot: &Slot) -> Result<SlotIdentity, SlotLockError> {
        let id = slot.id().0;
        let index = id as usize;
        let cell = if index < CHUNK {
            &self.first[index]
        } else {
            let base = index / CHUNK * CHUNK;
            let cells = self
                .chunks
                .get(index / CHUNK - 1)
                .ok_or(SlotLockError::Detached { slot: id })?
                .get_or_init(|| chunk(base));
            &cells[index % CHUNK]
        };
        cell.attach_as(slot.range(), slot.generation())
    }

    /// Ids of attached cells (a racy snapshot, for diagnostics and tests).
    pub fn attached(&self) -> Vec<u32> {
        let later = self.chunks.iter().filter_map(OnceLock::get);
        std::iter::once(&self.first)
            .chain(later)
            .flat_map(|c| c.iter())
            .filter(|c| c.is_attached())
            .map(SlotCell::id)
            .collect()
    }
}
