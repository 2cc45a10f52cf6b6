//! Cost per op must not grow with the number of slots: an op on a map of
//! 30,000 slots shares the map's structure instead of copying it.

use std::time::{Duration, Instant};

use super::*;
use crate::mm::addr::Hva;
use crate::mm::slot_map::Slot;

/// A map with `n` one-page slots on one mapping, at even pages (a gap between
/// any two, so they never merge). Built by inserting directly, which is what
/// `n` plugs would produce (checked below) at a tenth of the time, then
/// rebuilding the readers' flat index as every op does.
fn map_with(n: u64, m: &Arc<HostMapping>) -> SlotMap {
    let mut map = SlotMap::new(SlotMapConfig::default());
    for i in 0..n {
        let slot = Slot {
            id: map.ids.alloc(),
            range: range(2 * i * P, P),
            mapping: m.clone(),
            offset: i * P,
            hva: Hva(m.hva().0 + i * P),
            flags: SlotFlags::NONE,
            generation: map.bump_generation(),
            chain: i,
        };
        map.host.insert(host_key(m, slot.offset), slot.range.len());
        map.slots.insert(slot.range.start(), slot);
    }
    map.next_chain = n;
    map.rebuild_flat();
    check_invariants(&map);
    map
}

#[test]
fn test_scale_bulk_build_equals_plugs() {
    let m = anon(20);
    let mut map = SlotMap::new(SlotMapConfig::default());
    for i in 0..20 {
        map = plugged(&map, 2 * i * P, P, &m, i * P);
    }
    assert_eq!(snapshot(&map), snapshot(&map_with(20, &m)));
}

/// Sorted times of `ops` plug+unplug pairs past the end of the map's slots.
fn time_pairs(map: &SlotMap, ops: u64, spare: &Arc<HostMapping>) -> Vec<Duration> {
    let base = 1 << 32;
    let mut times: Vec<Duration> = (0..ops)
        .map(|i| {
            let gpa = base + 2 * i * P;
            let start = Instant::now();
            let t = map
                .plug(Gpa(gpa), P, spare.clone(), i * P, SlotFlags::NONE)
                .unwrap();
            let u = t.map.unplug(Gpa(gpa), P).unwrap();
            let len = u.map.len();
            drop((t, u)); // Freeing the copied paths is part of the cost.
            let elapsed = start.elapsed();
            assert_eq!(len, map.len());
            elapsed
        })
        .collect();
    times.sort();
    times
}

#[test]
fn test_scale_op_on_30000_slots_costs_like_on_10() {
    const BIG: u64 = 30_000;
    const OPS: u64 = 100;
    let m = anon(BIG);
    let spare = anon(OPS);
    let small = map_with(10, &m);
    let build = Instant::now();
    let big = map_with(BIG, &m);
    let build = build.elapsed();
    assert_eq!(big.len(), BIG as usize);
    // Per-pair times, compared by their minimum (the intrinsic cost) and
    // median: totals are at the mercy of the other users of this machine.
    let (small_t, big_t) = (
        time_pairs(&small, OPS, &spare),
        time_pairs(&big, OPS, &spare),
    );
    let (min_s, min_b) = (small_t[0], big_t[0]);
    let (med_s, med_b) = (small_t[small_t.len() / 2], big_t[big_t.len() / 2]);
    eprintln!(
        "slot_map scale: plug+unplug pair min/median: {min_s:?}/{med_s:?} at 10 slots, \
         {min_b:?}/{med_b:?} at {BIG} slots (min ratio {:.2}); bulk build of {BIG}: {build:?}",
        min_b.as_secs_f64() / min_s.as_secs_f64()
    );
    // A B-tree 3 levels deep instead of 1 costs a few times more; an O(n)
    // copy of 30,000 slots would cost ~3,000 times more.
    assert!(
        min_b < min_s * 10,
        "a pair at {BIG} slots took {min_b:?} vs {min_s:?} at 10"
    );
}

#[test]
fn test_scale_op_leaves_old_map_and_shares_untouched_slots() {
    let m = anon(1000);
    let map = map_with(1000, &m);
    let t = map.unplug(Gpa(2 * 500 * P), P).unwrap();
    assert_eq!((map.len(), t.map.len()), (1000, 999));
    // Untouched slots are the same objects (generation) in both maps.
    let g = |map: &SlotMap, i: u64| map.slot_at(Gpa(2 * i * P)).unwrap().generation();
    assert_eq!(g(&map, 0), g(&t.map, 0));
    assert_eq!(g(&map, 999), g(&t.map, 999));
    assert_eq!(t.changes.len(), 1);
}
