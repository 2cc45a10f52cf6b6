//! A set of disjoint guest-physical ranges: the hub's record of plugged
//! memory, replayed to new subscribers.
//!
//! Invariant: stored ranges are non-empty, disjoint and not adjacent
//! (touching ranges are merged), keyed by start.

use std::collections::BTreeMap;

use crate::mm::addr::{Gpa, GpaRange};

/// Disjoint, merged, non-empty ranges keyed by start address.
#[derive(Debug, Default, Clone)]
pub(super) struct RangeSet {
    /// start -> end (exclusive).
    map: BTreeMap<u64, u64>,
}

impl RangeSet {
    /// The first stored range overlapping `range`, if any.
    pub(super) fn first_overlap(&self, range: GpaRange) -> Option<GpaRange> {
        // The candidate starting before `range` ...
        let before = self
            .map
            .range(..=range.start().0)
            .next_back()
            .filter(|(_, &end)| end > range.start().0);
        // ... or the first one starting inside it.
        let inside = || self.map.range(range.start().0..range.end().0).next();
        before
            .or_else(inside)
            .and_then(|(&s, &e)| GpaRange::from_bounds(Gpa(s), Gpa(e)))
    }

    /// Adds `range` (non-empty, disjoint from the set), merging neighbours.
    pub(super) fn insert(&mut self, range: GpaRange) {
        debug_assert!(!range.is_empty() && self.first_overlap(range).is_none());
        let mut start = range.start().0;
        let mut end = range.end().0;
        if let Some((&s, &e)) = self.map.range(..=start).next_back() {
            if e == start {
                self.map.remove(&s);
                start = s;
            }
        }
        if let Some(e) = self.map.remove(&end) {
            end = e;
        }
        self.map.insert(start, end);
    }

    /// Removes every byte of `range` from the set, splitting ranges.
    pub(super) fn remove(&mut self, range: GpaRange) {
        let (rs, re) = (range.start().0, range.end().0);
        let hit: Vec<(u64, u64)> = self
            .map
            .range(..re)
            .rev()
            .take_while(|(_, &e)| e > rs)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in hit {
            self.map.remove(&s);
            if s < rs {
                self.map.insert(s, rs);
            }
            if e > re {
                self.map.insert(re, e);
            }
        }
    }

    /// The stored ranges in address order.
    pub(super) fn to_vec(&self) -> Vec<GpaRange> {
        self.map
            .iter()
            .filter_map(|(&s, &e)| GpaRange::from_bounds(Gpa(s), Gpa(e)))
            .collect()
    }
}

#[cfg(all(test, not(vmm_loom), not(vmm_shuttle)))]
mod tests {
    use super::*;

    fn r(start: u64, end: u64) -> GpaRange {
        GpaRange::from_bounds(Gpa(start), Gpa(end)).unwrap()
    }

    #[test]
    fn test_rangeset_insert_adjacent_merges() {
        let mut s = RangeSet::default();
        s.insert(r(0x2000, 0x3000));
        s.insert(r(0x0, 0x1000));
        s.insert(r(0x1000, 0x2000));
        assert_eq!(s.to_vec(), vec![r(0, 0x3000)]);
    }

    #[test]
    fn test_rangeset_remove_middle_splits() {
        let mut s = RangeSet::default();
        s.insert(r(0, 0x4000));
        s.insert(r(0x5000, 0x6000));
        s.remove(r(0x1000, 0x5800));
        assert_eq!(s.to_vec(), vec![r(0, 0x1000), r(0x5800, 0x6000)]);
    }

    #[test]
    fn test_rangeset_first_overlap_finds_both_sides() {
        let mut s = RangeSet::default();
        s.insert(r(0x1000, 0x2000));
        assert_eq!(s.first_overlap(r(0x1800, 0x9000)), Some(r(0x1000, 0x2000)));
        assert_eq!(s.first_overlap(r(0x0, 0x1001)), Some(r(0x1000, 0x2000)));
        assert_eq!(s.first_overlap(r(0x2000, 0x3000)), None);
        assert_eq!(s.first_overlap(r(0x0, 0x1000)), None);
    }
}
