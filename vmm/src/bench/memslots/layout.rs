//! How a test area is cut into memslots, as KVM's `memslot_perf_test` cuts
//! it: `slots` slots of `pages / slots` pages each, the last one taking the
//! remainder, back to back in guest-physical and host address space. A
//! page's slot is found by division, as the selftest's `vm_gpa2hva` does.
//!
//! ```
//! use vmm::bench::memslots::SlotLayout;
//! let l = SlotLayout::new(0x2_0000_0000, 10, 3).unwrap();
//! assert_eq!(l.slot(2), (0x2_0000_0000 + 6 * 4096, 4)); // 3 + remainder 1
//! assert_eq!(l.slot_of_page(9), 2);
//! assert!(SlotLayout::new(0x2_0000_0000, 2, 3).is_none()); // a slot would be empty
//! ```

use crate::mm::addr::PAGE_SIZE;

/// A test area of `pages` 4 KiB pages at `base`, cut into `slots` slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotLayout {
    /// Guest-physical address of the first page.
    pub base: u64,
    /// Pages in the area.
    pub pages: u64,
    /// Slots over it.
    pub slots: u64,
    /// Pages of every slot but the last.
    pub pages_per_slot: u64,
}

impl SlotLayout {
    /// The layout, or `None` when a slot would hold no page (KVM's test
    /// skips that slot count too) or `slots` is 0.
    pub fn new(base: u64, pages: u64, slots: u64) -> Option<Self> {
        let pages_per_slot = pages.checked_div(slots).filter(|&p| p > 0)?;
        Some(Self {
            base,
            pages,
            slots,
            pages_per_slot,
        })
    }

    /// Bytes in the area.
    pub fn len(&self) -> u64 {
        self.pages * PAGE_SIZE
    }

    /// Whether the area is empty (never, for a built layout).
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// Slot `index`: (guest-physical start, pages).
    pub fn slot(&self, index: u64) -> (u64, u64) {
        let first = index * self.pages_per_slot;
        let pages = if index + 1 == self.slots {
            self.pages - first
        } else {
            self.pages_per_slot
        };
        (self.base + first * PAGE_SIZE, pages)
    }

    /// The slot holding page `page` of the area.
    pub fn slot_of_page(&self, page: u64) -> u64 {
        (page / self.pages_per_slot).min(self.slots - 1)
    }

    /// The pieces of `[page, page + count)` that lie in one slot each, as
    /// (first page, pages): how a host op over a range is split at slot
    /// boundaries.
    pub fn pieces(&self, page: u64, count: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let end = (page + count).min(self.pages);
        let mut at = page;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let slot = self.slot_of_page(at);
            let (start, pages) = self.slot(slot);
            let slot_end = (start - self.base) / PAGE_SIZE + pages;
            let n = slot_end.min(end) - at;
            let piece = (at, n);
            at += n;
            Some(piece)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_slots_cover_the_area_back_to_back() {
        let l = SlotLayout::new(1 << 33, 8192, 8191).unwrap();
        let mut next = l.base;
        for i in 0..l.slots {
            let (gpa, pages) = l.slot(i);
            assert_eq!(gpa, next);
            assert!(pages >= 1);
            next = gpa + pages * PAGE_SIZE;
        }
        assert_eq!(next, l.base + l.len());
        assert_eq!(l.slot(l.slots - 1).1, 2);
    }

    #[test]
    fn test_pieces_split_at_slot_boundaries() {
        let l = SlotLayout::new(0, 100, 7).unwrap(); // 14 pages each, last 16
        let p: Vec<_> = l.pieces(10, 30).collect();
        assert_eq!(p, vec![(10, 4), (14, 14), (28, 12)]);
        let all: u64 = l.pieces(0, 100).map(|(_, n)| n).sum();
        assert_eq!(all, 100);
        assert_eq!(l.pieces(90, 50).map(|(_, n)| n).sum::<u64>(), 10);
        for (first, n) in l.pieces(0, 100) {
            assert_eq!(l.slot_of_page(first), l.slot_of_page(first + n - 1));
        }
    }

    #[test]
    fn test_too_many_slots_is_refused() {
        assert!(SlotLayout::new(0, 4, 5).is_none());
        assert!(SlotLayout::new(0, 4, 0).is_none());
        assert!(SlotLayout::new(0, 4, 4).is_some());
    }
}
