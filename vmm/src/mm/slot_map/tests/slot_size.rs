//! The per-memslot page limit (`max_slot_pages`, KVM's
//! `KVM_MEM_MAX_NR_PAGES`): every op that creates or enlarges a memslot
//! respects it. Unit tests per path with a small limit, the real limit on an
//! 8 TiB `MAP_NORESERVE` mapping, and a property test: a map with a small
//! limit, run next to one without, cuts memory into more memslots but maps
//! every guest page the same.

use proptest::prelude::*;

use super::*;
use crate::mm::slot_map::{PlugSpec, SlotMapError, MAX_MEMSLOT_PAGES};

/// The small limit of these tests, in pages.
const LIMIT: u64 = 4;

fn limited(max_slot_pages: u64) -> SlotMap {
    SlotMap::new(SlotMapConfig {
        max_slot_pages,
        ..config(64, 1 << 30)
    })
}

/// Asserts `r` is a `SlotTooLarge` for `pages` pages.
fn too_large<T: std::fmt::Debug>(r: Result<T, SlotMapError>, pages: u64) {
    match r {
        Err(SlotMapError::SlotTooLarge {
            pages: p,
            max_pages,
            ..
        }) => assert_eq!((p, max_pages), (pages, LIMIT)),
        other => panic!("expected SlotTooLarge of {pages} pages, got {other:?}"),
    }
}

fn lens(map: &SlotMap) -> Vec<u64> {
    map.iter().map(|s| s.range().len() / P).collect()
}

#[test]
fn test_plug_and_plug_many_above_the_limit_are_refused_unchanged() {
    let m = anon(16);
    let map = plugged(&limited(LIMIT), 0, 2 * P, &m, 0);
    let before = snapshot(&map);
    too_large(
        map.plug(Gpa(8 * P), 5 * P, m.clone(), 4 * P, SlotFlags::NONE),
        5,
    );
    too_large(map.check_plug(Gpa(8 * P), 5 * P, P, SlotFlags::NONE), 5);
    let spec = |gpa: u64, pages: u64, off: u64| PlugSpec {
        gpa: Gpa(gpa * P),
        size: pages * P,
        mapping: m.clone(),
        offset: off * P,
        flags: SlotFlags::NONE,
    };
    too_large(map.plug_many(vec![spec(8, 1, 4), spec(10, 5, 6)]), 5);
    assert_eq!(snapshot(&map), before);
    // Exactly the limit is one memslot.
    let map = plugged(&map, 8 * P, 4 * P, &m, 4 * P);
    assert_eq!(lens(&map), [2, 4]);
}

#[test]
fn test_the_default_limit_is_kvm_max_nr_pages() {
    assert_eq!(MAX_MEMSLOT_PAGES, (1 << 31) - 1);
    let map = SlotMap::new(SlotMapConfig::default());
    assert_eq!(map.config().max_slot_pages, MAX_MEMSLOT_PAGES);
    let e = map.check_plug(Gpa(0), 1 << 43, P, SlotFlags::NONE);
    assert!(
        matches!(e, Err(SlotMapError::SlotTooLarge { pages, .. }) if pages == 1 << 31),
        "{e:?}"
    );
    assert!(e.unwrap_err().to_string().contains("KVM_MEM_MAX_NR_PAGES"));
    // An 8 TiB mapping (MAP_NORESERVE: nothing is allocated) holds the
    // largest memslot, and a grow into its last page is a second memslot.
    let m = Arc::new(HostMapping::new(&BackingKind::Anon, 1 << 43).unwrap());
    let map = plugged(&map, 0, (1 << 43) - P, &m, 0);
    let t = map.resize(Gpa(0), 1 << 43, None).unwrap();
    check_transition(&map, &t);
    assert_eq!(lens(&t.map), [MAX_MEMSLOT_PAGES, 1]);
    assert_eq!(
        t.map.mapping_at(Gpa(0)).len(),
        2,
        "one mapping, two memslots"
    );
}

#[test]
fn test_grow_whose_added_part_is_above_the_limit_is_refused_unchanged() {
    let m = anon(16);
    let map = plugged(&limited(LIMIT), 0, 2 * P, &m, 0);
    let before = snapshot(&map);
    // In place (the mapping has room) and with a grow mapping alike.
    too_large(map.resize(Gpa(0), 7 * P, None), 5);
    too_large(map.resize(Gpa(0), 7 * P, Some(anon(5))), 5);
    assert_eq!(snapshot(&map), before);
}

#[test]
fn test_grow_in_place_past_the_limit_adds_a_second_slot_of_the_mapping() {
    let m = anon(16);
    let map = plugged(&limited(LIMIT), 0, 3 * P, &m, 0);
    let t = map.resize(Gpa(0), 6 * P, None).unwrap();
    check_transition(&map, &t);
    assert_eq!(lens(&t.map), [3, 3]);
    assert_eq!(t.map.mapping_at(Gpa(0)).len(), 2);
    // Without the limit the grow continues the slot.
    let wide = plugged(&limited(MAX_MEMSLOT_PAGES), 0, 3 * P, &m, 0);
    assert_eq!(lens(&wide.resize(Gpa(0), 6 * P, None).unwrap().map), [6]);
    // Shrinking acts on the whole mapping.
    let t2 = t.map.resize(Gpa(0), P, None).unwrap();
    check_transition(&t.map, &t2);
    assert_eq!(lens(&t2.map), [1]);
}

#[test]
fn test_neighbours_whose_merge_exceeds_the_limit_stay_two_slots() {
    // Two plugs of one mapping, GPA-adjacent with contiguous offsets: they
    // would merge into one 8-page slot.
    let m = anon(8);
    let wide = plugged(&limited(MAX_MEMSLOT_PAGES), 0, 4 * P, &m, 0);
    assert_eq!(lens(&plugged(&wide, 4 * P, 4 * P, &m, 4 * P)), [8]);
    let map = plugged(&limited(LIMIT), 0, 4 * P, &m, 0);
    let map = plugged(&map, 4 * P, 4 * P, &m, 4 * P);
    assert_eq!(lens(&map), [4, 4]);
    let translation = |map: &SlotMap| -> Vec<Option<u64>> {
        (0..8)
            .map(|p| map.translate(Gpa(p * P)).map(|(h, _)| h.0))
            .collect()
    };
    let hvas = translation(&map);
    // protect and back: the pieces merge only up to the limit.
    let t = map.protect(Gpa(2 * P), 4 * P, true).unwrap();
    check_transition(&map, &t);
    assert_eq!(lens(&t.map), [2, 4, 2]);
    let t2 = t.map.protect(Gpa(2 * P), 4 * P, false).unwrap();
    check_transition(&t.map, &t2);
    assert!(lens(&t2.map).iter().all(|&n| n <= LIMIT));
    assert_eq!(translation(&t2.map), hvas);
    // dirty logging on and off.
    let t3 = t2.map.set_dirty_log(Gpa(P), 6 * P, true).unwrap();
    check_transition(&t2.map, &t3);
    let t4 = t3.map.set_dirty_log(Gpa(0), 8 * P, false).unwrap();
    check_transition(&t3.map, &t4);
    assert!(lens(&t4.map).iter().all(|&n| n <= LIMIT));
    assert_eq!(translation(&t4.map), hvas);
}

#[test]
fn test_a_move_back_does_not_merge_past_the_limit() {
    let m = anon(8);
    let map = plugged(&limited(LIMIT), 0, 4 * P, &m, 0);
    let map = plugged(&map, 4 * P, 4 * P, &m, 4 * P);
    let t = map.move_range(Gpa(4 * P), 4 * P, Gpa(32 * P)).unwrap();
    check_transition(&map, &t);
    let back = t.map.move_range(Gpa(32 * P), 4 * P, Gpa(4 * P)).unwrap();
    check_transition(&t.map, &back);
    assert_eq!(lens(&back.map), [4, 4]);
    // Moving the halves of one slot apart and back merges them again.
    let t = back.map.move_range(Gpa(2 * P), 2 * P, Gpa(32 * P)).unwrap();
    let t = t.map.move_range(Gpa(32 * P), 2 * P, Gpa(2 * P)).unwrap();
    assert_eq!(lens(&t.map), [4, 4]);
}

#[test]
fn test_an_unplug_lets_the_rest_merge_with_its_neighbour_within_the_limit() {
    // [0,3) and [3,6) of one mapping stay apart (6 > 4); unplugging the
    // last two pages leaves [3,4), which merges with [0,3) into 4 pages.
    let m = anon(8);
    let map = plugged(&limited(LIMIT), 0, 3 * P, &m, 0);
    let map = plugged(&map, 3 * P, 3 * P, &m, 3 * P);
    assert_eq!(lens(&map), [3, 3]);
    let t = map.unplug(Gpa(4 * P), 2 * P).unwrap();
    check_transition(&map, &t);
    assert_eq!(lens(&t.map), [4]);
}

/// An op of the property test: pages; plugs of one of two shared mappings
/// at an offset tied to the GPA, so neighbouring plugs often continue each
/// other and merge.
#[derive(Clone, Debug)]
enum Op {
    Plug { gpa: u64, n: u64, m: usize },
    Unplug { gpa: u64, n: u64 },
    Protect { gpa: u64, n: u64, ro: bool },
    DirtyLog { gpa: u64, n: u64, on: bool },
    Move { gpa: u64, n: u64, to: u64 },
    Resize { gpa: u64, n: u64 },
}

/// Guest window and mapping size, in pages.
const WINDOW: u64 = 40;
const MAP: u64 = 16;

fn op() -> impl Strategy<Value = Op> {
    let at = || 0..WINDOW;
    let n = || 1..=6u64;
    prop_oneof![
        4 => (at(), n(), 0..2usize).prop_map(|(gpa, n, m)| Op::Plug { gpa, n, m }),
        2 => (at(), n()).prop_map(|(gpa, n)| Op::Unplug { gpa, n }),
        2 => (at(), n(), any::<bool>()).prop_map(|(gpa, n, ro)| Op::Protect { gpa, n, ro }),
        2 => (at(), n(), any::<bool>()).prop_map(|(gpa, n, on)| Op::DirtyLog { gpa, n, on }),
        1 => (at(), n(), at()).prop_map(|(gpa, n, to)| Op::Move { gpa, n, to }),
        2 => (at(), 1..=10u64).prop_map(|(gpa, n)| Op::Resize { gpa, n }),
    ]
}

fn apply(map: &SlotMap, op: &Op, maps: &[Arc<HostMapping>]) -> Result<Transition, SlotMapError> {
    match *op {
        Op::Plug { gpa, n, m } => {
            let off = gpa % (MAP - 6);
            map.plug(
                Gpa(gpa * P),
                n * P,
                maps[m].clone(),
                off * P,
                SlotFlags::NONE,
            )
        }
        Op::Unplug { gpa, n } => map.unplug(Gpa(gpa * P), n * P),
        Op::Protect { gpa, n, ro } => map.protect(Gpa(gpa * P), n * P, ro),
        Op::DirtyLog { gpa, n, on } => map.set_dirty_log(Gpa(gpa * P), n * P, on),
        Op::Move { gpa, n, to } => map.move_range(Gpa(gpa * P), n * P, Gpa(to * P)),
        Op::Resize { gpa, n } => map.resize(Gpa(gpa * P), n * P, None),
    }
}

/// Every page of the window: its host address and access.
fn pages(map: &SlotMap) -> Vec<Option<(u64, bool, bool)>> {
    (0..WINDOW + 16)
        .map(|p| {
            map.translate(Gpa(p * P))
                .map(|(h, s)| (h.0, s.flags().read_only, s.flags().dirty_log))
        })
        .collect()
}

/// The extent of the mapping `resize` acts on at `gpa`.
fn extent(map: &SlotMap, gpa: u64) -> Option<(Gpa, Gpa)> {
    let run = map.mapping_at(Gpa(gpa * P));
    Some((run.first()?.range().start(), run.last()?.range().end()))
}

fn run(ops: &[Op]) {
    let maps = [anon(MAP), anon(MAP)];
    let mut small = limited(3);
    let mut wide = limited(MAX_MEMSLOT_PAGES);
    for op in ops {
        // A resize acts on the mapping at its address; the limit may cut
        // the same memory into other slots and chains, so compare only
        // resizes of the same extent.
        if let Op::Resize { gpa, .. } = op {
            if extent(&small, *gpa) != extent(&wide, *gpa) {
                continue;
            }
        }
        let s = apply(&small, op, &maps);
        let w = apply(&wide, op, &maps);
        match (s, w) {
            (Ok(s), Ok(w)) => {
                check_transition(&small, &s);
                small = s.map;
                wide = w.map;
            }
            // What the limit refuses changes neither (the unlimited map may
            // refuse it for another reason, or take it).
            (
                Err(SlotMapError::SlotTooLarge {
                    pages, max_pages, ..
                }),
                _,
            ) => {
                assert!(pages > max_pages && max_pages == 3, "{op:?}");
            }
            (Err(s), Err(w)) => assert_eq!(
                std::mem::discriminant(&s),
                std::mem::discriminant(&w),
                "{op:?}: {s} / {w}"
            ),
            (s, w) => panic!("{op:?}: limited {:?}, unlimited {:?}", s.err(), w.err()),
        }
        assert_eq!(pages(&small), pages(&wide), "after {op:?}");
        assert!(small.iter().all(|s| s.range().len() <= 3 * P));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// The limit changes how guest memory is cut into memslots, never what a
    /// guest page maps to; it refuses only ops that need one memslot above it.
    #[test]
    fn test_limited_map_maps_every_page_as_an_unlimited_one(ops in proptest::collection::vec(op(), 1..50)) {
        run(&ops);
    }
}
