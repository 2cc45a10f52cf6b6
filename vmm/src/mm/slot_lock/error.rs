//! The slot lock's error enum.

use std::time::Duration;

use crate::mm::addr::{Gpa, GpaRange};

/// Errors of the slot lock. Reader-side refusals (`Detached`, `Excluded`,
/// `Stale`, `NotCovered`, `TooManyReaders`) are normal outcomes: the reader
/// retries with a fresh snapshot or takes the slow path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotLockError {
    /// The cell holds no slot (never attached, or detached).
    #[error("slot {slot} is detached")]
    Detached {
        /// The slot id.
        slot: u32,
    },
    /// A writer excludes new readers from the slot.
    #[error("slot {slot} is excluded by a writer")]
    Excluded {
        /// The slot id.
        slot: u32,
    },
    /// The cell was recycled since the reader's snapshot.
    #[error("slot {slot} was recycled: expected generation {expected}, found {found}")]
    Stale {
        /// The slot id.
        slot: u32,
        /// The generation the reader's snapshot had.
        expected: u64,
        /// The cell's current generation.
        found: u64,
    },
    /// The slot does not contain the reader's address.
    #[error("slot {slot} {range} does not cover gpa {gpa}")]
    NotCovered {
        /// The slot id.
        slot: u32,
        /// The address the reader asked for.
        gpa: Gpa,
        /// The slot's range.
        range: GpaRange,
    },
    /// The reference count would overflow into the exclude bit.
    #[error("slot {slot} has too many readers ({readers})")]
    TooManyReaders {
        /// The slot id.
        slot: u32,
        /// Readers inside.
        readers: u32,
    },
    /// `attach` on a cell that is not detached.
    #[error("slot {slot} is already attached (count word {word:#x})")]
    AlreadyAttached {
        /// The slot id.
        slot: u32,
        /// The raw count word found.
        word: u32,
    },
    /// `exclude` while another exclusion is held (writers not serialized).
    #[error("slot {slot} is already excluded by another writer")]
    AlreadyExcluded {
        /// The slot id.
        slot: u32,
    },
    /// Readers still held the slot when the writer's bound expired. The slot
    /// stays excluded and attached.
    #[error(
        "slot {slot}: {readers} reader(s) still hold it after {waited:?} (bound {bound:?}); \
         it stays excluded"
    )]
    DrainTimeout {
        /// The slot id.
        slot: u32,
        /// Readers still inside.
        readers: u32,
        /// How long the writer waited.
        waited: Duration,
        /// The bound it was given.
        bound: Duration,
    },
    /// A detach or reshape was attempted while readers are inside.
    #[error("slot {slot}: {readers} reader(s) still hold it; wait for them to drain first")]
    NotDrained {
        /// The slot id.
        slot: u32,
        /// Readers inside.
        readers: u32,
    },
}
