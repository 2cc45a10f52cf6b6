//! Bad inputs: each gives its exact error, and the map is unchanged.

use super::*;
use crate::mm::slot_map::{PlugSpec, SlotId, SlotMapError};

const K64: u64 = 0x1_0000;
const MIB: u64 = 0x10_0000;

/// Three 64 KiB slots at 0, 128 KiB and 1 MiB (ids 0, 1, 2); at most three
/// slots; a 64 MiB guest-physical space.
fn base() -> SlotMap {
    let map = SlotMap::new(config(3, 64 * MIB));
    let map = plugged(&map, 0, K64, &anon(16), 0);
    let map = plugged(&map, 2 * K64, K64, &anon(16), 0);
    plugged(&map, MIB, K64, &anon(16), 0)
}

fn misaligned(op: &'static str, what: &'static str, value: u64, align: u64) -> SlotMapError {
    SlotMapError::Misaligned {
        op,
        what,
        value,
        align,
    }
}

#[test]
fn test_bad_input_table_each_gives_its_error_and_map_unchanged() {
    let map = base();
    let before = snapshot(&map);
    let fresh = anon(16);
    let plug = |gpa: u64, size: u64, off: u64| {
        map.plug(Gpa(gpa), size, fresh.clone(), off, SlotFlags::NONE)
    };
    let free = 4 * MIB;
    let mut table: Vec<(&str, Result<Transition, SlotMapError>, SlotMapError)> = vec![
        (
            "misaligned gpa",
            plug(free + 0x800, P, 0),
            misaligned("plug", "gpa", free + 0x800, P),
        ),
        (
            "misaligned size",
            plug(free, 0x1800, 0),
            misaligned("plug", "size", 0x1800, P),
        ),
        (
            "misaligned offset",
            plug(free, P, 0x800),
            misaligned("plug", "offset", 0x800, P),
        ),
        (
            "zero size",
            plug(free, 0, 0),
            SlotMapError::ZeroSize { op: "plug" },
        ),
        (
            "overflow",
            plug(u64::MAX - 0xfff, 2 * P, 0),
            SlotMapError::RangeOverflow {
                op: "plug",
                gpa: Gpa(u64::MAX - 0xfff),
                size: 2 * P,
            },
        ),
        (
            "overlapping",
            plug(K64 / 2, K64, 0),
            SlotMapError::Overlap {
                op: "plug",
                range: range(K64 / 2, K64),
                slot: SlotId(0),
                slot_range: range(0, K64),
            },
        ),
        (
            "beyond guest-physical width",
            plug(64 * MIB - P, 2 * P, 0),
            SlotMapError::BeyondMaxGpa {
                op: "plug",
                range: range(64 * MIB - P, 2 * P),
                max_gpa: Gpa(64 * MIB),
            },
        ),
        (
            "one slot too many",
            plug(free, P, 0),
            SlotMapError::TooManySlots {
                op: "plug",
                needed: 4,
                max: 3,
            },
        ),
        (
            "split needs one slot too many",
            map.unplug(Gpa(P), P),
            SlotMapError::TooManySlots {
                op: "unplug",
                needed: 4,
                max: 3,
            },
        ),
        (
            "mapping too small",
            plug(free, 8 * P, 12 * P),
            SlotMapError::MappingTooSmall {
                op: "plug",
                offset: 12 * P,
                size: 8 * P,
                mapping_len: 16 * P,
            },
        ),
        (
            "unplug of nothing",
            map.unplug(Gpa(free), P),
            SlotMapError::NothingPlugged {
                op: "unplug",
                range: range(free, P),
            },
        ),
        (
            "protect of a hole",
            map.protect(Gpa(0), 3 * K64, true),
            SlotMapError::Hole {
                op: "protect",
                range: range(0, 3 * K64),
                hole: range(K64, K64),
            },
        ),
        (
            "dirty log of a hole",
            map.set_dirty_log(Gpa(free), P, true),
            SlotMapError::Hole {
                op: "set_dirty_log",
                range: range(free, P),
                hole: range(free, P),
            },
        ),
        (
            "move of a hole",
            map.move_range(Gpa(K64 / 2), 2 * K64, Gpa(free)),
            SlotMapError::Hole {
                op: "move_range",
                range: range(K64 / 2, 2 * K64),
                hole: range(K64, K64),
            },
        ),
        (
            "move onto an occupied range",
            map.move_range(Gpa(0), K64, Gpa(MIB)),
            SlotMapError::Overlap {
                op: "move_range",
                range: range(MIB, K64),
                slot: SlotId(2),
                slot_range: range(MIB, K64),
            },
        ),
        (
            "move onto itself",
            map.move_range(Gpa(0), K64, Gpa(P)),
            SlotMapError::DestinationOverlapsSource {
                op: "move_range",
                src: range(0, K64),
                dst: range(P, K64),
            },
        ),
        (
            "move beyond guest-physical width",
            map.move_range(Gpa(0), K64, Gpa(64 * MIB - P)),
            SlotMapError::BeyondMaxGpa {
                op: "move_range",
                range: range(64 * MIB - P, K64),
                max_gpa: Gpa(64 * MIB),
            },
        ),
        (
            "resize of no slot",
            map.resize(Gpa(P), P, None),
            SlotMapError::NoSlotAt {
                op: "resize",
                gpa: Gpa(P),
            },
        ),
        (
            "resize onto a neighbour",
            map.resize(Gpa(0), 3 * K64, Some(anon(32))),
            SlotMapError::Overlap {
                op: "resize",
                range: range(K64, 2 * K64),
                slot: SlotId(1),
                slot_range: range(2 * K64, K64),
            },
        ),
        (
            "resize to zero",
            map.resize(Gpa(0), 0, None),
            SlotMapError::ZeroSize { op: "resize" },
        ),
    ];
    if let Ok(thp) = HostMapping::new(&BackingKind::Thp, 4 * MIB) {
        // THP is 4 KiB-granular like anon memory: only the 4 KiB rule applies.
        table.push((
            "THP gpa not 4 KiB aligned",
            map.plug(
                Gpa(free + 0x800),
                2 * MIB,
                Arc::new(thp),
                0,
                SlotFlags::NONE,
            ),
            misaligned("plug", "gpa", free + 0x800, P),
        ));
    }
    let check_plug = |gpa: u64, size: u64| {
        map.check_plug(Gpa(gpa), size, P, SlotFlags::NONE).map(|_| {
            map.plug(Gpa(gpa), size, fresh.clone(), 0, SlotFlags::NONE)
                .unwrap()
        })
    };
    table.push((
        "check_plug: a wrapping size, with no host memory",
        check_plug(free, u64::MAX - 0xfff),
        SlotMapError::RangeOverflow {
            op: "plug",
            gpa: Gpa(free),
            size: u64::MAX - 0xfff,
        },
    ));
    table.push((
        "check_plug: over a slot",
        check_plug(0, P),
        SlotMapError::Overlap {
            op: "plug",
            range: range(0, P),
            slot: SlotId(0),
            slot_range: range(0, K64),
        },
    ));
    let batch = |gpas: &[u64]| {
        let plugs = gpas
            .iter()
            .zip(0..)
            .map(|(&gpa, i)| PlugSpec {
                gpa: Gpa(gpa),
                size: P,
                mapping: fresh.clone(),
                offset: i * P,
                flags: SlotFlags::NONE,
            })
            .collect();
        map.plug_many(plugs)
    };
    table.push((
        "batch: the last plug beyond the limit",
        batch(&[free, 64 * MIB - P, 64 * MIB]),
        SlotMapError::BeyondMaxGpa {
            op: "plug",
            range: range(64 * MIB, P),
            max_gpa: Gpa(64 * MIB),
        },
    ));
    table.push((
        "batch: two plugs of one range",
        batch(&[free, free]),
        SlotMapError::BatchOverlap {
            op: "plug",
            what: "range",
            first: range(free, P),
            second: range(free, P),
        },
    ));
    table.push((
        "batch: more slots than allowed",
        batch(&[free, free + 2 * P]),
        SlotMapError::TooManySlots {
            op: "plug",
            needed: 5,
            max: 3,
        },
    ));
    for (name, got, want) in table {
        match got {
            Ok(t) => panic!("{name}: expected {want}, got Ok with {:?}", t.changes),
            Err(e) => assert_eq!(e, want, "{name}: {e}"),
        }
        assert_eq!(snapshot(&map), before, "{name}: map changed");
    }
    check_invariants(&map);
}
