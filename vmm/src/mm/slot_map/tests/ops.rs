//! One behaviour per test, per op.

use std::sync::Arc;

use super::*;
use crate::mm::addr::{Gpa, Hva};
use crate::mm::slot_map::{ChangeKind, MemslotChange, PlugSpec, SlotId, SlotMapError};

fn empty() -> SlotMap {
    SlotMap::new(config(100, 1 << 30))
}

fn kinds(t: &Transition) -> Vec<&'static str> {
    t.changes
        .iter()
        .map(|c| match c {
            MemslotChange::Delete { .. } => "delete",
            MemslotChange::Create { .. } => "create",
            MemslotChange::SetFlags { .. } => "flags",
        })
        .collect()
}

fn hva_of(map: &SlotMap, gpa: u64) -> Option<Hva> {
    map.translate(Gpa(gpa)).map(|(h, _)| h)
}

#[test]
fn test_plug_contiguous_neighbour_merges_into_one_slot() {
    let m = anon(8);
    let map = plugged(&empty(), 0, 4 * P, &m, 0);
    let t = map
        .plug(Gpa(4 * P), 4 * P, m.clone(), 4 * P, SlotFlags::NONE)
        .unwrap();
    check_transition(&map, &t);
    assert_eq!(kinds(&t), ["delete", "create"]);
    assert_eq!(t.map.len(), 1);
    assert_eq!(t.map.lookup(Gpa(0)).unwrap().range(), range(0, 8 * P));
    assert_eq!(t.added, [range(4 * P, 4 * P)]);
}

#[test]
fn test_plug_noncontiguous_offsets_stay_separate() {
    let m = anon(16);
    let map = plugged(&empty(), 0, 4 * P, &m, 0);
    let map = plugged(&map, 4 * P, 4 * P, &m, 8 * P);
    assert_eq!(map.len(), 2);
}

#[test]
fn test_plug_fills_gap_merges_both_neighbours() {
    let m = anon(12);
    let map = plugged(&empty(), 0, 4 * P, &m, 0);
    let map = plugged(&map, 8 * P, 4 * P, &m, 8 * P);
    let t = map
        .plug(Gpa(4 * P), 4 * P, m.clone(), 4 * P, SlotFlags::NONE)
        .unwrap();
    check_transition(&map, &t);
    assert_eq!(kinds(&t), ["delete", "delete", "create"]);
    assert_eq!(t.map.len(), 1);
    assert_eq!(hva_of(&t.map, 11 * P), Some(Hva(m.hva().0 + 11 * P)));
}

#[test]
fn test_unplug_middle_splits_at_edges_and_discards_exactly() {
    let m = anon(16);
    let map = plugged(&empty(), 0x10_0000, 16 * P, &m, 0);
    let t = map.unplug(Gpa(0x10_0000 + 4 * P), 2 * P).unwrap();
    check_transition(&map, &t);
    assert_eq!(kinds(&t), ["delete", "create", "create"]);
    let ranges: Vec<_> = t.map.iter().map(|s| s.range()).collect();
    assert_eq!(
        ranges,
        [range(0x10_0000, 4 * P), range(0x10_0000 + 6 * P, 10 * P)]
    );
    assert_eq!(t.discards.len(), 1);
    assert!(Arc::ptr_eq(&t.discards[0].mapping, &m));
    assert_eq!((t.discards[0].offset, t.discards[0].len), (4 * P, 2 * P));
    assert_eq!(
        t.removed,
        [(range(0x10_0000 + 4 * P, 2 * P), ChangeKind::Unmapped)]
    );
    // The right part keeps translating to the same host memory.
    assert_eq!(
        hva_of(&t.map, 0x10_0000 + 7 * P),
        Some(Hva(m.hva().0 + 7 * P))
    );
}

#[test]
fn test_unplug_across_holes_removes_every_slot_inside() {
    let (a, b) = (anon(4), anon(4));
    let map = plugged(&empty(), 0, 4 * P, &a, 0);
    let map = plugged(&map, 8 * P, 4 * P, &b, 0);
    let t = map.unplug(Gpa(0), 16 * P).unwrap();
    check_transition(&map, &t);
    assert!(t.map.is_empty());
    assert_eq!(t.discards.len(), 2);
    assert_eq!(t.removed.len(), 2);
}

#[test]
fn test_ids_freed_are_reused_lowest_first() {
    let ms: Vec<_> = (0..4).map(|_| anon(1)).collect();
    let mut map = empty();
    for (i, m) in ms.iter().enumerate() {
        map = plugged(&map, 2 * i as u64 * P, P, m, 0);
    }
    let ids: Vec<_> = map.iter().map(|s| s.id().0).collect();
    assert_eq!(ids, [0, 1, 2, 3]);
    let map = map.unplug(Gpa(2 * P), P).unwrap().map; // frees id 1
    let map = map.unplug(Gpa(0), P).unwrap().map; // frees id 0
    let (x, y) = (anon(1), anon(1));
    let map = plugged(&map, 20 * P, P, &x, 0);
    let map = plugged(&map, 30 * P, P, &y, 0);
    assert_eq!(map.lookup(Gpa(20 * P)).unwrap().id(), SlotId(0));
    assert_eq!(map.lookup(Gpa(30 * P)).unwrap().id(), SlotId(1));
}

#[test]
fn test_set_dirty_log_whole_slot_is_flags_only_change() {
    let m = anon(8);
    let map = plugged(&empty(), 0, 8 * P, &m, 0);
    let before = map.lookup(Gpa(0)).unwrap().clone();
    let t = map.set_dirty_log(Gpa(0), 8 * P, true).unwrap();
    check_transition(&map, &t);
    assert_eq!(kinds(&t), ["flags"]);
    let after = t.map.lookup(Gpa(0)).unwrap();
    assert_eq!((after.id(), after.range()), (before.id(), before.range()));
    assert!(after.flags().dirty_log);
    // Same memory, same access: the same identity, so guards survive it.
    assert_eq!(after.generation(), before.generation());
    assert_eq!(
        t.removed,
        [(range(0, 8 * P), ChangeKind::DirtyLog { on: true })]
    );
}

#[test]
fn test_set_dirty_log_part_splits_and_off_merges_back() {
    let m = anon(8);
    let map = plugged(&empty(), 0, 8 * P, &m, 0);
    let t = map.set_dirty_log(Gpa(2 * P), 2 * P, true).unwrap();
    check_transition(&map, &t);
    assert_eq!(t.map.len(), 3);
    assert!(t.map.lookup(Gpa(3 * P)).unwrap().flags().dirty_log);
    assert!(!t.map.lookup(Gpa(4 * P)).unwrap().flags().dirty_log);
    let t2 = t.map.set_dirty_log(Gpa(0), 8 * P, false).unwrap();
    check_transition(&t.map, &t2);
    assert_eq!(t2.map.len(), 1);
}

#[test]
fn test_set_dirty_log_already_in_state_changes_nothing() {
    let m = anon(8);
    let map = plugged(&empty(), 0, 8 * P, &m, 0);
    let t = map.set_dirty_log(Gpa(0), 4 * P, false).unwrap();
    assert!(t.changes.is_empty() && t.removed.is_empty());
    assert_eq!(snapshot(&t.map), snapshot(&map));
}

#[test]
fn test_protect_middle_splits_delete_create_then_unprotect_merges() {
    let m = anon(8);
    let map = plugged(&empty(), 0, 8 * P, &m, 0);
    let t = map.protect(Gpa(2 * P), 2 * P, true).unwrap();
    check_transition(&map, &t);
    assert_eq!(kinds(&t), ["delete", "create", "create", "create"]);
    let ro = t.map.lookup(Gpa(2 * P)).unwrap();
    assert!(ro.flags().read_only);
    assert_eq!(ro.range(), range(2 * P, 2 * P));
    assert_eq!(
        t.removed,
        [(range(2 * P, 2 * P), ChangeKind::WriteProtected)]
    );
    let t2 = t.map.protect(Gpa(0), 8 * P, false).unwrap();
    check_transition(&t.map, &t2);
    assert_eq!(t2.map.len(), 1);
    assert_eq!(hva_of(&t2.map, 5 * P), Some(Hva(m.hva().0 + 5 * P)));
}

#[test]
fn test_protect_whole_slot_toggles_readonly_by_delete_create() {
    let m = anon(4);
    let map = plugged(&empty(), 0, 4 * P, &m, 0);
    let t = map.protect(Gpa(0), 4 * P, true).unwrap();
    check_transition(&map, &t);
    assert_eq!(kinds(&t), ["delete", "create"]);
}

#[test]
fn test_move_range_keeps_host_memory_at_new_gpa() {
    let m = anon(8);
    let map = plugged(&empty(), 0, 8 * P, &m, 0);
    let old_hva = hva_of(&map, 3 * P).unwrap();
    // SAFETY: the page at `old_hva` is inside the live mapping `m`.
    unsafe { *(old_hva.0 as *mut u8) = 0xa5 };
    let t = map.move_range(Gpa(2 * P), 4 * P, Gpa(0x100_0000)).unwrap();
    check_transition(&map, &t);
    let new_hva = hva_of(&t.map, 0x100_0000 + P).unwrap();
    assert_eq!(new_hva, old_hva);
    // SAFETY: as above; the mapping is still alive (held by `m` and the map).
    assert_eq!(unsafe { *(new_hva.0 as *const u8) }, 0xa5);
    assert!(t.map.lookup(Gpa(3 * P)).is_none());
    assert_eq!(t.map.len(), 3);
    assert!(t.discards.is_empty());
    assert_eq!(t.removed, [(range(2 * P, 4 * P), ChangeKind::Unmapped)]);
    assert_eq!(t.added, [range(0x100_0000, 4 * P)]);
}

#[test]
fn test_move_of_whole_slots_leaves_the_host_index_untouched() {
    // Two slots apart in host memory (no merge); moving one keeps its host
    // window, so the host index is the very same persistent map.
    let m = anon(8);
    let map = plugged(&plugged(&empty(), 0, 2 * P, &m, 0), 2 * P, 2 * P, &m, 4 * P);
    let t = map.move_range(Gpa(2 * P), 2 * P, Gpa(64 * P)).unwrap();
    check_transition(&map, &t);
    assert!(t.map.host.ptr_eq(&map.host));
    // A move that changes the windows (the moved part splits a slot)
    // updates it: check_transition checks the index against the slots.
    let moved = t.map;
    let t = moved.move_range(Gpa(P), P, Gpa(32 * P)).unwrap();
    check_transition(&moved, &t);
    assert_eq!(t.map.host.len(), 3);
}

#[test]
fn test_move_range_back_to_origin_merges_again() {
    let m = anon(8);
    let map = plugged(&empty(), 0, 8 * P, &m, 0);
    let map = map.move_range(Gpa(4 * P), 4 * P, Gpa(64 * P)).unwrap().map;
    let t = map.move_range(Gpa(64 * P), 4 * P, Gpa(4 * P)).unwrap();
    check_transition(&map, &t);
    assert_eq!(t.map.len(), 1);
}

#[test]
fn test_resize_shrink_discards_tail() {
    let m = anon(8);
    let map = plugged(&empty(), 0, 8 * P, &m, 0);
    let t = map.resize(Gpa(0), 3 * P, None).unwrap();
    check_transition(&map, &t);
    assert_eq!(t.map.lookup(Gpa(0)).unwrap().range(), range(0, 3 * P));
    assert_eq!((t.discards[0].offset, t.discards[0].len), (3 * P, 5 * P));
}

#[test]
fn test_resize_grow_with_room_extends_in_place() {
    let m = anon(8);
    let map = plugged(&empty(), 0, 4 * P, &m, 0);
    let t = map.resize(Gpa(0), 8 * P, None).unwrap();
    check_transition(&map, &t);
    assert_eq!(t.map.len(), 1);
    assert_eq!(hva_of(&t.map, 7 * P), Some(Hva(m.hva().0 + 7 * P)));
    assert_eq!(t.added, [range(4 * P, 4 * P)]);
}

#[test]
fn test_resize_grow_without_room_uses_grow_mapping() {
    let (m, g) = (anon(4), anon(4));
    let map = plugged(&empty(), 0, 4 * P, &m, 0);
    let err = map.resize(Gpa(0), 6 * P, None).unwrap_err();
    assert!(
        matches!(err, SlotMapError::NoRoomToGrow { grow, .. } if grow == 2 * P),
        "{err}"
    );
    let t = map.resize(Gpa(0), 6 * P, Some(g.clone())).unwrap();
    check_transition(&map, &t);
    assert_eq!(t.map.len(), 2);
    assert_eq!(hva_of(&t.map, 5 * P), Some(Hva(g.hva().0 + P)));
}

#[test]
fn test_resize_grow_room_used_by_other_slot_needs_grow_mapping() {
    let m = anon(8);
    let map = plugged(&empty(), 0, 4 * P, &m, 0);
    let map = plugged(&map, 64 * P, 4 * P, &m, 4 * P);
    let err = map.resize(Gpa(0), 8 * P, None).unwrap_err();
    assert!(matches!(err, SlotMapError::NoRoomToGrow { .. }), "{err}");
}

#[test]
fn test_fixed_slot_refused_by_every_op() {
    let (boot, m) = (anon(4), anon(4));
    let fixed = SlotFlags {
        fixed: true,
        ..SlotFlags::NONE
    };
    let map = empty().plug(Gpa(0), 4 * P, boot, 0, fixed).unwrap().map;
    // A contiguous-looking neighbour never merges with the fixed slot.
    let map = plugged(&map, 4 * P, 4 * P, &m, 0);
    assert_eq!(map.len(), 2);
    let refused: Vec<Result<Transition, SlotMapError>> = vec![
        map.unplug(Gpa(0), 8 * P),
        map.protect(Gpa(P), P, true),
        map.set_dirty_log(Gpa(0), 4 * P, true),
        map.move_range(Gpa(0), 4 * P, Gpa(64 * P)),
        map.resize(Gpa(0), 2 * P, None),
    ];
    for r in refused {
        let err = r.unwrap_err();
        assert!(
            matches!(
                err,
                SlotMapError::Fixed {
                    slot: SlotId(0),
                    ..
                }
            ),
            "{err}"
        );
    }
}

#[test]
fn test_thp_slot_cuts_unplugs_protects_and_moves_at_4k() {
    let Ok(thp) = HostMapping::new(&BackingKind::Thp, 4 << 20) else {
        eprintln!("skipped: THP mapping unavailable on this host");
        return;
    };
    let thp = Arc::new(thp);
    let map = empty()
        .plug(Gpa(0), 4 << 20, thp.clone(), 0, SlotFlags::NONE)
        .unwrap()
        .map;
    let t = map.unplug(Gpa(0x30_1000), P).unwrap();
    check_transition(&map, &t);
    assert_eq!((t.discards[0].offset, t.discards[0].len), (0x30_1000, P));
    let t = map.protect(Gpa(0x10_1000), 2 * P, true).unwrap();
    check_transition(&map, &t);
    assert_eq!(t.map.len(), 3);
    let t = map.move_range(Gpa(0x20_3000), P, Gpa(0x80_5000)).unwrap();
    check_transition(&map, &t);
    assert_eq!(
        hva_of(&t.map, 0x80_5000),
        Some(Hva(thp.hva().0 + 0x20_3000))
    );
    let t = map.resize(Gpa(0), 0x30_3000, None).unwrap();
    check_transition(&map, &t);
    assert!(t.map.lookup(Gpa(0x30_3000)).is_none());
}

/// A grow backed by another mapping adds a slot to the mapping; a later
/// resize acts on all of it, like `mremap` on the whole VMA.
#[test]
fn test_resize_acts_on_the_whole_mapping_after_a_grow() {
    let (m, g1, g2) = (anon(512), anon(1024), anon(1024));
    // 2 MiB at 0, then grown to 6 MiB: the added 4 MiB is a second slot.
    let map = plugged(&empty(), 0, 0x20_0000, &m, 0);
    let t = map.resize(Gpa(0), 0x60_0000, Some(g1)).unwrap();
    check_transition(&map, &t);
    let grown = t.map;
    assert_eq!(grown.len(), 2);
    assert_eq!(grown.mapping_at(Gpa(0)).len(), 2);

    // Shrinking to 1 MiB takes the grown part too.
    let t = grown.resize(Gpa(0), 0x10_0000, None).unwrap();
    check_transition(&grown, &t);
    assert_eq!(t.map.len(), 1);
    assert!(t.map.lookup(Gpa(0x40_0000)).is_none());
    assert_eq!(
        t.removed,
        [(range(0x10_0000, 0x50_0000), ChangeKind::Unmapped)]
    );

    // Shrinking into the grown part keeps its head.
    let t = grown.resize(Gpa(0), 0x30_3000, None).unwrap();
    check_transition(&grown, &t);
    assert!(t.map.lookup(Gpa(0x30_2000)).is_some());
    assert!(t.map.lookup(Gpa(0x30_3000)).is_none());

    // A second grow extends the end of the whole mapping.
    let t = grown.resize(Gpa(0), 0xa0_0000, Some(g2)).unwrap();
    check_transition(&grown, &t);
    assert_eq!(t.added, [range(0x60_0000, 0x40_0000)]);
    assert_eq!(t.map.mapping_at(Gpa(0)).len(), 3);
    // Equal size: nothing to do.
    assert!(t
        .map
        .resize(Gpa(0), 0xa0_0000, None)
        .unwrap()
        .changes
        .is_empty());
}

/// An adjacent plug of other memory is another mapping: a resize of the
/// first stops at it (and a grow is refused as overlapping it).
#[test]
fn test_resize_stops_at_an_adjacent_plug() {
    let (a, b) = (anon(4), anon(4));
    let map = plugged(&empty(), 0, 4 * P, &a, 0);
    let map = plugged(&map, 4 * P, 4 * P, &b, 0);
    assert_eq!(map.mapping_at(Gpa(0)).len(), 1);
    let t = map.resize(Gpa(0), 2 * P, None).unwrap();
    assert!(t.map.lookup(Gpa(4 * P)).is_some());
    let err = map.resize(Gpa(0), 6 * P, Some(anon(4))).unwrap_err();
    assert!(matches!(err, SlotMapError::Overlap { .. }), "{err}");
}

#[test]
fn test_plug_many_is_one_transition_or_nothing() {
    let m = anon(4);
    let plugs: Vec<PlugSpec> = (0..4)
        .map(|i| PlugSpec {
            gpa: Gpa(2 * i * P),
            size: P,
            mapping: m.clone(),
            offset: i * P,
            flags: SlotFlags::NONE,
        })
        .collect();
    let map = empty();
    let t = map.plug_many(plugs.clone()).unwrap();
    check_transition(&map, &t);
    assert_eq!((t.map.len(), t.changes.len(), t.added.len()), (4, 4, 4));
    // Each plug is its own mapping.
    assert_eq!(t.map.mapping_at(Gpa(0)).len(), 1);
    let mut bad = plugs;
    bad[3].gpa = Gpa((1 << 30) - P / 2);
    assert!(map.plug_many(bad).is_err());
}

#[test]
fn test_read_only_unsupported_is_refused() {
    let cfg = SlotMapConfig {
        read_only_supported: false,
        ..config(10, 1 << 30)
    };
    let m = anon(4);
    let map = plugged(&SlotMap::new(cfg), 0, 4 * P, &m, 0);
    let ro = SlotFlags {
        read_only: true,
        ..SlotFlags::NONE
    };
    let e1 = map.plug(Gpa(8 * P), P, anon(1), 0, ro).unwrap_err();
    let e2 = map.protect(Gpa(0), P, true).unwrap_err();
    for e in [e1, e2] {
        assert!(matches!(e, SlotMapError::ReadOnlyUnsupported { .. }), "{e}");
    }
}

#[test]
fn test_translate_reports_slot_and_none_in_holes() {
    let m = anon(4);
    let map = plugged(&empty(), 8 * P, 4 * P, &m, 0);
    let (hva, slot) = map.translate(Gpa(9 * P + 5)).unwrap();
    assert_eq!(hva, Hva(m.hva().0 + P + 5));
    assert_eq!(slot.range(), range(8 * P, 4 * P));
    assert!(map.translate(Gpa(12 * P)).is_none());
    assert!(map.translate(Gpa(7 * P)).is_none());
}

#[test]
fn test_plug_host_alias_is_refused() {
    let m = anon(8);
    let map = plugged(&empty(), 0, 4 * P, &m, 0);
    let err = map
        .plug(Gpa(64 * P), 2 * P, m.clone(), 3 * P, SlotFlags::NONE)
        .unwrap_err();
    assert_eq!(
        err,
        SlotMapError::HostAliased {
            op: "plug",
            offset: 3 * P,
            size: 2 * P,
            slot: SlotId(0),
            slot_range: range(0, 4 * P)
        }
    );
}

#[test]
fn test_error_messages_name_values() {
    let m = anon(4);
    let map = plugged(&empty(), 0, 4 * P, &m, 0);
    let msg = map.protect(Gpa(0), 8 * P, true).unwrap_err().to_string();
    assert_eq!(
        msg,
        "protect: [0x4000, 0x8000) inside [0x0, 0x8000) is not plugged"
    );
}

#[test]
fn test_changes_are_clustered_so_each_range_is_briefly_unmapped() {
    let (a, b) = (anon(4), anon(4));
    let map = plugged(&empty(), 0, 4 * P, &a, 0);
    let map = plugged(&map, 4 * P, 4 * P, &b, 0);
    let t = map.protect(Gpa(0), 8 * P, true).unwrap();
    check_transition(&map, &t);
    // Not delete, delete, create, create: A is back before B goes away.
    assert_eq!(kinds(&t), ["delete", "create", "delete", "create"]);
}

#[test]
fn test_move_at_slot_limit_deletes_source_before_creating_destination() {
    // Two slots, limit two: creating the destination first would need a
    // third slot (id 2), which KVM refuses.
    let (a, s) = (anon(4), anon(4));
    let map = plugged(&SlotMap::new(config(2, 1 << 30)), 0, 4 * P, &a, 0);
    let map = plugged(&map, 100 * P, 4 * P, &s, 0);
    let t = map.move_range(Gpa(100 * P), 4 * P, Gpa(50 * P)).unwrap();
    check_transition(&map, &t);
    assert_eq!(kinds(&t), ["delete", "create"]);
    assert_eq!(t.map.lookup(Gpa(50 * P)).unwrap().id(), SlotId(1));
}

#[test]
fn test_transition_op_names_every_op() {
    use crate::mm::slot_map::SlotOp;
    let m = anon(16);
    let map = plugged(&SlotMap::new(config(100, 1 << 30)), 0, 8 * P, &m, 0);
    let t = map
        .plug(Gpa(8 * P), P, m.clone(), 8 * P, SlotFlags::NONE)
        .unwrap();
    assert_eq!(t.op, SlotOp::Plug);
    assert_eq!(map.unplug(Gpa(0), P).unwrap().op, SlotOp::Unplug);
    assert_eq!(map.protect(Gpa(0), P, true).unwrap().op, SlotOp::Protect);
    assert_eq!(
        map.set_dirty_log(Gpa(0), P, true).unwrap().op,
        SlotOp::SetDirtyLog
    );
    assert_eq!(
        map.move_range(Gpa(0), P, Gpa(32 * P)).unwrap().op,
        SlotOp::Move
    );
    assert_eq!(map.resize(Gpa(0), 4 * P, None).unwrap().op, SlotOp::Resize);
    assert_eq!(map.resize(Gpa(0), 12 * P, None).unwrap().op, SlotOp::Resize);
    assert_eq!(map.resize(Gpa(0), 8 * P, None).unwrap().op, SlotOp::Resize);
}

#[test]
fn test_reserved_range_refuses_plug_move_and_grow_unchanged() {
    let reserved = range(8 * P, P);
    let map = SlotMap::new(SlotMapConfig {
        reserved: Some(reserved),
        ..config(16, 1 << 30)
    });
    let m = anon(16);
    let map = plugged(&map, 0, 4 * P, &m, 0);
    let before = snapshot(&map);
    let is_reserved =
        |e: SlotMapError| matches!(e, SlotMapError::Reserved { reserved: r, .. } if r == reserved);
    let plug = map.plug(Gpa(6 * P), 4 * P, anon(4), 0, SlotFlags::NONE);
    assert!(is_reserved(plug.unwrap_err()));
    let mv = map.move_range(Gpa(0), 4 * P, Gpa(7 * P));
    assert!(is_reserved(mv.unwrap_err()));
    let grow = map.resize(Gpa(0), 12 * P, None);
    assert!(is_reserved(grow.unwrap_err()));
    assert_eq!(snapshot(&map), before);
    // Next to it is fine.
    plugged(&map, 9 * P, P, &m, 9 * P);
}

#[test]
fn test_slots_in_yields_exactly_the_slots_overlapping_any_range() {
    // Slots at pages [2, 4), [5, 6), [6, 9) and [12, 13) (host pages apart,
    // so none merge), and every range of whole pages from 0 to 15.
    let m = anon(32);
    let mut map = SlotMap::new(config(16, 1 << 30));
    for (first, pages, off) in [(2, 2, 0), (5, 1, 4), (6, 3, 8), (12, 1, 14)] {
        map = plugged(&map, first * P, pages * P, &m, off * P);
    }
    for start in 0..15 {
        for end in start + 1..16 {
            let r = range(start * P, (end - start) * P);
            let got: Vec<GpaRange> = map.slots_in(r).map(|s| s.range()).collect();
            let want: Vec<GpaRange> = map
                .iter()
                .map(|s| s.range())
                .filter(|s| s.start() < r.end() && r.start() < s.end())
                .collect();
            assert_eq!(got, want, "slots in pages [{start}, {end})");
        }
    }
}
