//! [`SlotExclusion`]: a writer's hold on one slot, from exclude to release
//! or detach (see the module docs of [`crate::mm::slot_lock`]).

use std::sync::PoisonError;
use std::time::{Duration, Instant};

use super::{readers_in, total_readers, SlotCell, SlotIdentity, SlotLockError, EXCLUDE, MAP_REF};
use crate::mm::addr::GpaRange;
use crate::mm::sync::Ordering;

/// A writer's exclusion of new readers from one slot. Dropping it (or
/// [`release`](Self::release)) lets readers in again, unless it detached the
/// slot.
#[must_use = "the exclusion is released as soon as it is dropped"]
#[derive(Debug)]
pub struct SlotExclusion<'a> {
    pub(super) cell: &'a SlotCell,
    pub(super) detached: bool,
}

impl SlotExclusion<'_> {
    /// The slot id.
    pub fn slot_id(&self) -> u32 {
        self.cell.id
    }

    /// Whether no reader holds the slot now (the fast path of
    /// [`wait_drained`](Self::wait_drained): the same Acquire loads of the
    /// count words; `false` once detached).
    pub fn is_drained(&self) -> bool {
        !self.detached && self.cell.drained()
    }

    /// Parks until no reader holds the slot, at most `bound`. Returns how long
    /// it waited. Past the bound, returns [`SlotLockError::DrainTimeout`] with
    /// the readers still inside; the slot stays excluded and attached, so the
    /// caller may call this again or release the exclusion.
    pub fn wait_drained(&mut self, bound: Duration) -> Result<Duration, SlotLockError> {
        let cell = self.cell;
        if self.detached {
            return Err(SlotLockError::Detached { slot: cell.id });
        }
        // Fast path: nobody inside, no lock taken, no clock read.
        if cell.drained() {
            return Ok(Duration::ZERO);
        }
        let started = Instant::now();
        let deadline = started.checked_add(bound);
        let mut lock = cell.lock_wait();
        loop {
            // Acquire (in `words`), and read under the mutex: see module docs.
            let words = cell.words();
            debug_assert!(
                words.iter().all(|w| w & EXCLUDE != 0),
                "exclusion lost: {words:#x?}"
            );
            if words.iter().all(|&w| w == EXCLUDE | MAP_REF) {
                return Ok(started.elapsed());
            }
            let now = Instant::now();
            lock = match deadline {
                Some(deadline) if now >= deadline => {
                    return Err(SlotLockError::DrainTimeout {
                        slot: cell.id,
                        readers: total_readers(&words),
                        waited: now.duration_since(started),
                        bound,
                    });
                }
                Some(deadline) => {
                    cell.drained
                        .wait_timeout(lock, deadline - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
                // The bound does not fit in an Instant: wait without one.
                None => cell
                    .drained
                    .wait(lock)
                    .unwrap_or_else(PoisonError::into_inner),
            };
        }
    }

    /// Detaches the slot (count word to 0): possible only with no reader
    /// inside, otherwise `NotDrained` and the exclusion stays. After success
    /// no reader can ever get into this attachment again and the host memory
    /// may be unmapped; the cell can be attached again.
    pub fn detach(&mut self) -> Result<(), SlotLockError> {
        let cell = self.cell;
        if self.detached {
            return Err(SlotLockError::Detached { slot: cell.id });
        }
        for (i, shard) in cell.shards.iter().enumerate() {
            // Acquire: synchronizes with every reader's release. Release:
            // orders the writer's prior work before a later attach's readers.
            if let Err(word) = shard.refcnt.compare_exchange(
                EXCLUDE | MAP_REF,
                0,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                // Not drained (so not yet at zero readers): put back the
                // shards already detached, which had no reader and, being
                // excluded, admitted none.
                for done in &cell.shards[..i] {
                    done.refcnt.store(EXCLUDE | MAP_REF, Ordering::Release);
                }
                let others: u32 = cell.shards[i + 1..]
                    .iter()
                    .map(|s| readers_in(s.refcnt.load(Ordering::Relaxed)))
                    .sum();
                return Err(SlotLockError::NotDrained {
                    slot: cell.id,
                    readers: readers_in(word) + others,
                });
            }
        }
        self.detached = true;
        Ok(())
    }

    /// Gives the drained, still attached slot a new range and generation (a
    /// shrink or move done in place). Readers holding the old generation are
    /// refused from then on. Fails with `NotDrained` if readers are inside.
    pub fn reshape(&mut self, range: GpaRange) -> Result<SlotIdentity, SlotLockError> {
        // 2^64 attachments cannot happen; wrapping keeps it total anyway.
        let generation = self.cell.generation().wrapping_add(1);
        self.reshape_as(range, generation)
    }

    /// As [`reshape`](Self::reshape), with the caller's generation (see
    /// [`SlotCell::attach_as`]).
    pub fn reshape_as(
        &mut self,
        range: GpaRange,
        generation: u64,
    ) -> Result<SlotIdentity, SlotLockError> {
        let cell = self.cell;
        if self.detached {
            return Err(SlotLockError::Detached { slot: cell.id });
        }
        if !cell.drained() {
            return Err(SlotLockError::NotDrained {
                slot: cell.id,
                readers: cell.readers(),
            });
        }
        // Drained and excluded: no reader reads the identity until the
        // exclusion's Release fetch_and publishes it.
        Ok(cell.publish_identity(range, generation))
    }

    /// Releases the exclusion (same as dropping it).
    pub fn release(self) {}
}

impl Drop for SlotExclusion<'_> {
    fn drop(&mut self) {
        // A writer that panics mid-teardown leaves the slot excluded, like a
        // poisoned lock: readers are refused rather than let into memory that
        // a half-done teardown may have unmapped.
        if !self.detached && !std::thread::panicking() {
            for shard in &self.cell.shards {
                // Release: the writer's changes happen before readers admitted
                // afterwards on this shard.
                shard.refcnt.fetch_and(!EXCLUDE, Ordering::Release);
            }
        }
    }
}
