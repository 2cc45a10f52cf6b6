//! A persistent allocator of KVM slot ids: lowest free id first, freed ids
//! reused. Clone is O(1); alloc and release are O(log n).
//!
//! Invariant: the live ids and `free` partition `[0, next)`, and `next - 1` is
//! never free (the top is trimmed on release). Handing out the lowest free id
//! means that with `c` live slots every id is below `c`, so ids stay below the
//! KVM slot limit whenever the count does.

use imbl::OrdSet;

use super::slot::SlotId;

#[derive(Clone, Debug, Default)]
pub(super) struct IdAlloc {
    next: u32,
    free: OrdSet<u32>,
}

impl IdAlloc {
    /// The lowest id not live.
    pub(super) fn alloc(&mut self) -> SlotId {
        if let Some(id) = self.free.remove_min() {
            return SlotId(id);
        }
        if crate::mutants::on("id-reused-live") && self.next > 1 {
            return SlotId(self.next - 1);
        }
        let id = self.next;
        // Cannot overflow: ids stay below the live count, which is below
        // `SlotMapConfig::max_slots: u32`.
        self.next += 1;
        SlotId(id)
    }

    /// Frees a live id.
    pub(super) fn release(&mut self, id: SlotId) {
        debug_assert!(id.0 < self.next && !self.free.contains(&id.0));
        self.free.insert(id.0);
        while self.next > 0 && self.free.remove(&(self.next - 1)).is_some() {
            self.next -= 1;
        }
    }

    /// Whether `id` is live (test oracle).
    #[cfg(test)]
    pub(super) fn is_live(&self, id: SlotId) -> bool {
        id.0 < self.next && !self.free.contains(&id.0)
    }

    /// Number of live ids (test oracle).
    #[cfg(test)]
    pub(super) fn live(&self) -> usize {
        self.next as usize - self.free.len()
    }
}
