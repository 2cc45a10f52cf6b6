//! Unit tests: entry encoding, index math, and each table operation.

use super::entry::*;
use super::*;
use crate::mm::addr::{Gfn, Gpa, GpaRange, Hva, HUGE_1G, HUGE_2M, PAGE_SIZE};

const HVA_BASE: u64 = 0x7f00_0000_0000;

fn range(start: u64, len: u64) -> GpaRange {
    GpaRange::new(Gpa(start), len).unwrap()
}

fn size_at(t: &Stage2Table, gpa: u64) -> Option<PageSize> {
    t.lookup(Gpa(gpa)).map(|tr| tr.page_size)
}

// ---- entry encoding and index math ----

#[test]
fn test_entry_leaf_4k_encodes_ept_fields() {
    let e = Entry::leaf(Hva(0x1234_5000), Perms::RW, PageSize::Size4K);
    assert_eq!(e.0 & PERM_MASK, READ | WRITE);
    assert_eq!((e.0 & MEMTYPE_MASK) >> MEMTYPE_SHIFT, MEMTYPE_WB);
    assert_ne!(e.0 & IGNORE_PAT, 0);
    assert_eq!(e.0 & LARGE, 0);
    assert_eq!(e.0 & (ACCESSED | DIRTY), 0);
    assert_eq!(e.frame_addr(), 0x1234_5000);
    assert_eq!(e.0, 0x1234_5000 | 0b11 | (6 << 3) | (1 << 6));
}

#[test]
fn test_entry_leaf_huge_sets_large_bit_and_decodes_as_leaf() {
    for (size, level) in [(PageSize::Size2M, 2), (PageSize::Size1G, 3)] {
        let e = Entry::leaf(Hva(HUGE_1G), Perms::RX, size);
        assert_ne!(e.0 & LARGE, 0);
        let Decoded::Leaf(l) = e.decode(level) else {
            panic!("{e:?} at level {level} is not a leaf")
        };
        assert_eq!(
            (l.hva, l.perms, l.accessed, l.dirty),
            (Hva(HUGE_1G), Perms::RX, false, false)
        );
    }
}

#[test]
fn test_entry_table_decodes_as_table_above_level_1() {
    let e = Entry::table(0x7f12_3456_7000);
    assert_eq!(e.0 & PERM_MASK, PERM_MASK);
    for level in 2..=4 {
        assert_eq!(e.decode(level), Decoded::Table(0x7f12_3456_7000));
    }
}

#[test]
fn test_entry_frozen_is_never_present() {
    assert_eq!(FROZEN & PERM_MASK, 0);
    for level in 1..=4 {
        assert_eq!(Entry(FROZEN).decode(level), Decoded::Frozen);
    }
    // A present entry with the frozen bit set is not a value we write.
    assert_eq!(Entry(FROZEN | READ).decode(1), Decoded::Corrupt);
}

#[test]
fn test_entry_poison_and_root_leaf_decode_corrupt() {
    for level in 1..=4 {
        assert_eq!(Entry(POISON).decode(level), Decoded::Corrupt);
    }
    let huge = Entry::leaf(Hva(0), Perms::R, PageSize::Size1G);
    assert_eq!(huge.decode(4), Decoded::Corrupt);
    assert_eq!(Entry(0x1000 | LARGE).decode(2), Decoded::Corrupt); // no permission bit
}

#[test]
fn test_entry_with_perms_keeps_other_bits() {
    let e = Entry(Entry::leaf(Hva(0x20_0000), Perms::RW, PageSize::Size2M).0 | ACCESSED | DIRTY);
    let p = e.with_perms(Perms::X);
    assert_eq!(p.perms(), Perms::X);
    assert_eq!(p.0 & !PERM_MASK, e.0 & !PERM_MASK);
}

#[test]
fn test_level_index_splits_gpa_into_9_bit_fields() {
    let gpa = 3 * (1u64 << 39) + 5 * HUGE_1G + 7 * HUGE_2M + 9 * PAGE_SIZE + 0x123;
    assert_eq!(
        [4, 3, 2, 1].map(|l| level_index(gpa, l)),
        [3, 5, 7, 9],
        "indices of {gpa:#x}"
    );
    assert_eq!(level_index(GPA_LIMIT - 1, 4), 511);
}

#[test]
fn test_level_size_matches_page_sizes() {
    for ps in [PageSize::Size4K, PageSize::Size2M, PageSize::Size1G] {
        assert_eq!(level_size(ps.level()), ps.bytes());
        assert_eq!(PageSize::from_level(ps.level()), Some(ps));
    }
    assert_eq!(level_size(4), 1 << 39);
    assert_eq!(PageSize::from_level(4), None);
}

#[test]
fn test_perms_validate_rejects_empty_and_write_only() {
    for bad in [Perms::NONE, Perms::W] {
        assert_eq!(
            bad.validate(),
            Err(Stage2Error::InvalidPerms { perms: bad })
        );
    }
    for good in [Perms::R, Perms::X, Perms::RW, Perms::RX, Perms::RWX] {
        assert_eq!(good.validate(), Ok(()));
    }
}

// ---- map / translate ----

#[test]
fn test_map_each_size_translates_with_offset() {
    let t = Stage2Table::new();
    let cases = [
        (PageSize::Size4K, 0x5000, HVA_BASE + 0x9000),
        (PageSize::Size2M, 3 * HUGE_2M, HVA_BASE + 8 * HUGE_2M),
        (PageSize::Size1G, 2 * HUGE_1G, HVA_BASE + 4 * HUGE_1G),
    ];
    for (size, gpa, hva) in cases {
        t.map(Gpa(gpa), Hva(hva), size, Perms::RW).unwrap();
        let off = size.bytes() - 8;
        let tr = t.translate(Gpa(gpa + off), Access::Read).unwrap();
        assert_eq!(tr.hva, Hva(hva + off), "{size}");
        assert_eq!(
            (tr.page_size, tr.page_gpa, tr.perms),
            (size, Gpa(gpa), Perms::RW)
        );
        assert!(
            t.translate(Gpa(gpa + size.bytes()), Access::Read).is_none(),
            "{size} end"
        );
    }
    assert_eq!(t.reclaim_stats().linked, 1 + 1 + 1 + 1); // root, L3, L2, L1
}

#[test]
fn test_map_invalid_arguments_fail_with_typed_errors() {
    let t = Stage2Table::new();
    let (g, h) = (Gpa(HUGE_2M), Hva(HUGE_2M));
    assert_eq!(
        t.map(Gpa(0x1000), h, PageSize::Size2M, Perms::R),
        Err(Stage2Error::MisalignedGpa {
            gpa: Gpa(0x1000),
            size: PageSize::Size2M
        })
    );
    assert_eq!(
        t.map(g, Hva(0x1000), PageSize::Size2M, Perms::R),
        Err(Stage2Error::MisalignedHva {
            hva: Hva(0x1000),
            size: PageSize::Size2M
        })
    );
    assert_eq!(
        t.map(Gpa(GPA_LIMIT), h, PageSize::Size4K, Perms::R),
        Err(Stage2Error::GpaOutOfRange {
            gpa: Gpa(GPA_LIMIT),
            size: PageSize::Size4K
        })
    );
    assert_eq!(
        t.map(g, Hva(FRAME_LIMIT), PageSize::Size4K, Perms::R),
        Err(Stage2Error::HvaOutOfRange {
            hva: Hva(FRAME_LIMIT)
        })
    );
    assert_eq!(
        t.map(g, h, PageSize::Size4K, Perms::W),
        Err(Stage2Error::InvalidPerms { perms: Perms::W })
    );
    assert!(t.dump().is_empty());
    assert_eq!(t.reclaim_stats().linked, 1);
}

#[test]
fn test_map_overlap_fails_and_changes_nothing() {
    let t = Stage2Table::new();
    t.map(
        Gpa(HUGE_2M + 0x3000),
        Hva(0x3000),
        PageSize::Size4K,
        Perms::R,
    )
    .unwrap();
    let before = t.dump();
    let err = t.map(Gpa(HUGE_2M), Hva(0), PageSize::Size2M, Perms::R);
    assert_eq!(
        err,
        Err(Stage2Error::AlreadyMapped {
            gpa: Gpa(HUGE_2M),
            size: PageSize::Size2M
        })
    );
    let err = t.map(Gpa(0), Hva(0), PageSize::Size1G, Perms::R);
    assert!(matches!(err, Err(Stage2Error::AlreadyMapped { .. })));
    let err = t.map(Gpa(HUGE_2M + 0x3000), Hva(0), PageSize::Size4K, Perms::R);
    assert!(matches!(err, Err(Stage2Error::AlreadyMapped { .. })));
    assert_eq!(t.dump(), before);
}

#[test]
fn test_translate_sets_accessed_and_dirty_only_for_writes() {
    let t = Stage2Table::new();
    t.map(Gpa(0), Hva(HUGE_2M), PageSize::Size2M, Perms::RWX)
        .unwrap();
    let l = t.lookup(Gpa(0)).unwrap();
    assert!(!l.accessed && !l.dirty);
    let r = t.translate(Gpa(0x10), Access::Exec).unwrap();
    assert!(r.accessed && !r.dirty);
    assert!(!t.lookup(Gpa(0)).unwrap().dirty);
    let w = t.translate(Gpa(0x20), Access::Write).unwrap();
    assert!(w.accessed && w.dirty);
    let l = t.lookup(Gpa(0)).unwrap();
    assert!(l.accessed && l.dirty);
}

#[test]
fn test_translate_denied_access_is_none_and_leaves_ad_clear() {
    let t = Stage2Table::new();
    t.map(Gpa(0x1000), Hva(0x1000), PageSize::Size4K, Perms::R)
        .unwrap();
    assert!(t.translate(Gpa(0x1000), Access::Write).is_none());
    assert!(t.translate(Gpa(0x1000), Access::Exec).is_none());
    let l = t.lookup(Gpa(0x1000)).unwrap();
    assert!(!l.accessed && !l.dirty);
    assert!(t.translate(Gpa(GPA_LIMIT), Access::Read).is_none());
}

// ---- unmap ----

#[test]
fn test_unmap_partial_2m_splits_and_keeps_the_rest() {
    let t = Stage2Table::new();
    t.map(Gpa(HUGE_2M), Hva(HVA_BASE), PageSize::Size2M, Perms::RW)
        .unwrap();
    assert_eq!(t.unmap(range(HUGE_2M + 0x4000, 0x2000)).unwrap(), 2);
    for page in 0..512u64 {
        let gpa = HUGE_2M + page * PAGE_SIZE;
        let tr = t.lookup(Gpa(gpa));
        if page == 4 || page == 5 {
            assert!(tr.is_none(), "page {page} still mapped");
        } else {
            let tr = tr.unwrap();
            assert_eq!(
                (tr.hva, tr.page_size),
                (Hva(HVA_BASE + page * PAGE_SIZE), PageSize::Size4K)
            );
        }
    }
}

#[test]
fn test_unmap_partial_1g_splits_down_to_4k_around_the_hole() {
    let t = Stage2Table::new();
    t.map(Gpa(HUGE_1G), Hva(HVA_BASE), PageSize::Size1G, Perms::R)
        .unwrap();
    let hole = HUGE_1G + 5 * HUGE_2M + 0x7000;
    assert_eq!(t.unmap(range(hole, PAGE_SIZE)).unwrap(), 1);
    assert_eq!(t.lookup(Gpa(hole)), None);
    assert_eq!(size_at(&t, hole + PAGE_SIZE), Some(PageSize::Size4K));
    assert_eq!(size_at(&t, HUGE_1G), Some(PageSize::Size2M));
    assert_eq!(size_at(&t, 2 * HUGE_1G - PAGE_SIZE), Some(PageSize::Size2M));
    let tr = t.lookup(Gpa(2 * HUGE_1G - 8)).unwrap();
    assert_eq!(tr.hva, Hva(HVA_BASE + HUGE_1G - 8));
    let mapped: u64 = t.dump().iter().map(|r| r.range.len()).sum();
    assert_eq!(mapped, HUGE_1G - PAGE_SIZE);
}

#[test]
fn test_unmap_everything_unlinks_all_tables_and_reclaims_them() {
    let t = Stage2Table::new();
    t.map(Gpa(0x1000), Hva(0x1000), PageSize::Size4K, Perms::R)
        .unwrap();
    t.map(Gpa(HUGE_1G), Hva(HUGE_1G), PageSize::Size2M, Perms::R)
        .unwrap();
    assert_eq!(t.reclaim_stats().linked, 5);
    assert_eq!(t.unmap(range(0x1000, PAGE_SIZE)).unwrap(), 1); // prunes L1, L2
    assert_eq!(t.reclaim_stats().linked, 3);
    assert_eq!(t.unmap(range(0, 1 << 39)).unwrap(), 512);
    let stats = t.reclaim_stats();
    assert_eq!((stats.linked, stats.retired), (1, 4));
    assert!(t.dump().is_empty());
    // Empty tables are gone, so a huge map over the same range succeeds.
    t.map(Gpa(0), Hva(0), PageSize::Size1G, Perms::R).unwrap();
}

#[test]
fn test_unmap_bad_range_fails() {
    let t = Stage2Table::new();
    assert!(matches!(
        t.unmap(range(0x10, PAGE_SIZE)),
        Err(Stage2Error::BadRange { .. })
    ));
    assert!(matches!(
        t.unmap(range(0, 0x10)),
        Err(Stage2Error::BadRange { .. })
    ));
    assert!(matches!(
        t.unmap(range(GPA_LIMIT, PAGE_SIZE)),
        Err(Stage2Error::BadRange { .. })
    ));
    assert_eq!(t.unmap(range(0, 0)), Ok(0));
}

// ---- protect ----

#[test]
fn test_protect_partial_huge_splits_only_when_perms_change() {
    let t = Stage2Table::new();
    t.map(Gpa(0), Hva(0), PageSize::Size2M, Perms::RW).unwrap();
    t.protect(range(0x1000, 0x1000), Perms::RW).unwrap();
    assert_eq!(
        size_at(&t, 0),
        Some(PageSize::Size2M),
        "same perms must not split"
    );
    t.protect(range(0x1000, 0x1000), Perms::RX).unwrap();
    assert_eq!(t.lookup(Gpa(0x1000)).unwrap().perms, Perms::RX);
    assert_eq!(t.lookup(Gpa(0x2000)).unwrap().perms, Perms::RW);
    assert_eq!(size_at(&t, 0x2000), Some(PageSize::Size4K));
    assert!(t.translate(Gpa(0x1000), Access::Write).is_none());
}

#[test]
fn test_protect_whole_huge_leaf_keeps_size_and_dirty() {
    let t = Stage2Table::new();
    t.map(Gpa(0), Hva(0), PageSize::Size1G, Perms::RW).unwrap();
    t.translate(Gpa(0), Access::Write).unwrap();
    t.protect(range(0, HUGE_1G), Perms::R).unwrap();
    let l = t.lookup(Gpa(0)).unwrap();
    assert_eq!(
        (l.page_size, l.perms, l.dirty),
        (PageSize::Size1G, Perms::R, true)
    );
    assert!(matches!(
        t.protect(range(0, HUGE_1G), Perms::W),
        Err(Stage2Error::InvalidPerms { .. })
    ));
}

// ---- take_dirty ----

#[test]
fn test_take_dirty_returns_written_frames_once() {
    let t = Stage2Table::new();
    for i in 0..4u64 {
        t.map(
            Gpa(i * PAGE_SIZE),
            Hva(i * PAGE_SIZE),
            PageSize::Size4K,
            Perms::RW,
        )
        .unwrap();
    }
    t.translate(Gpa(PAGE_SIZE), Access::Write).unwrap();
    t.translate(Gpa(3 * PAGE_SIZE), Access::Write).unwrap();
    t.translate(Gpa(2 * PAGE_SIZE), Access::Read).unwrap();
    assert_eq!(
        t.take_dirty(range(0, HUGE_2M)).unwrap(),
        vec![Gfn(1), Gfn(3)]
    );
    assert!(t.take_dirty(range(0, HUGE_2M)).unwrap().is_empty());
    assert!(
        t.lookup(Gpa(PAGE_SIZE)).unwrap().accessed,
        "accessed is kept"
    );
}

#[test]
fn test_take_dirty_partial_huge_reports_only_the_range() {
    let t = Stage2Table::new();
    t.map(Gpa(HUGE_2M), Hva(0), PageSize::Size2M, Perms::RW)
        .unwrap();
    t.translate(Gpa(HUGE_2M), Access::Write).unwrap();
    let first = HUGE_2M / PAGE_SIZE;
    assert_eq!(
        t.take_dirty(range(HUGE_2M, 2 * PAGE_SIZE)).unwrap(),
        vec![Gfn(first), Gfn(first + 1)]
    );
    let rest = t.take_dirty(range(0, HUGE_1G)).unwrap();
    assert_eq!(rest.len(), 510);
    assert_eq!(rest[0], Gfn(first + 2));
}

// ---- split / collapse ----

#[test]
fn test_split_2m_keeps_translations_and_ad_bits() {
    let t = Stage2Table::new();
    t.map(Gpa(0), Hva(HVA_BASE), PageSize::Size2M, Perms::RX)
        .unwrap();
    t.translate(Gpa(0), Access::Read).unwrap();
    assert_eq!(t.split(Gpa(0x3000)).unwrap(), PageSize::Size4K);
    for page in [0u64, 1, 511] {
        let l = t.lookup(Gpa(page * PAGE_SIZE)).unwrap();
        assert_eq!(
            (l.hva, l.page_size, l.perms, l.accessed),
            (
                Hva(HVA_BASE + page * PAGE_SIZE),
                PageSize::Size4K,
                Perms::RX,
                true
            )
        );
    }
    assert_eq!(t.split(Gpa(0)), Err(Stage2Error::NotHuge { gpa: Gpa(0) }));
    assert_eq!(
        t.split(Gpa(HUGE_1G)),
        Err(Stage2Error::NotMapped { gpa: Gpa(HUGE_1G) })
    );
}

fn map_2m_as_4k(t: &Stage2Table, gpa: u64, hva: u64, perms: Perms) {
    for i in 0..512u64 {
        let off = i * PAGE_SIZE;
        t.map(Gpa(gpa + off), Hva(hva + off), PageSize::Size4K, perms)
            .unwrap();
    }
}

#[test]
fn test_collapse_uniform_table_becomes_huge_leaf_and_ors_dirty() {
    let t = Stage2Table::new();
    map_2m_as_4k(&t, HUGE_2M, HVA_BASE, Perms::RW);
    t.translate(Gpa(HUGE_2M + 77 * PAGE_SIZE), Access::Write)
        .unwrap();
    let linked = t.reclaim_stats().linked;
    t.collapse(Gpa(HUGE_2M), PageSize::Size2M).unwrap();
    let l = t.lookup(Gpa(HUGE_2M + 5)).unwrap();
    assert_eq!(
        (l.hva, l.page_size, l.dirty),
        (Hva(HVA_BASE + 5), PageSize::Size2M, true)
    );
    let stats = t.reclaim_stats();
    assert_eq!((stats.linked, stats.retired), (linked - 1, 1));
    assert!(matches!(
        t.collapse(Gpa(HUGE_2M), PageSize::Size2M),
        Err(Stage2Error::NotCollapsible {
            reason: "already a leaf",
            ..
        })
    ));
}

#[test]
fn test_collapse_1g_from_2m_leaves() {
    let t = Stage2Table::new();
    t.map(Gpa(0), Hva(HUGE_1G), PageSize::Size1G, Perms::R)
        .unwrap();
    t.split(Gpa(0)).unwrap();
    t.collapse(Gpa(0), PageSize::Size1G).unwrap();
    assert_eq!(t.dump().len(), 1);
    assert_eq!(size_at(&t, HUGE_1G - 1), Some(PageSize::Size1G));
}

#[test]
fn test_collapse_irregular_tables_fail_and_change_nothing() {
    let t = Stage2Table::new();
    // Not fully populated.
    t.map(Gpa(0), Hva(0), PageSize::Size4K, Perms::R).unwrap();
    // Mixed permissions.
    map_2m_as_4k(&t, HUGE_2M, HUGE_2M, Perms::R);
    t.protect(range(HUGE_2M + PAGE_SIZE, PAGE_SIZE), Perms::RW)
        .unwrap();
    // Host memory not contiguous: swap two pages.
    map_2m_as_4k(&t, 2 * HUGE_2M, 4 * HUGE_2M, Perms::R);
    t.unmap(range(2 * HUGE_2M, 2 * PAGE_SIZE)).unwrap();
    t.map(
        Gpa(2 * HUGE_2M),
        Hva(4 * HUGE_2M + PAGE_SIZE),
        PageSize::Size4K,
        Perms::R,
    )
    .unwrap();
    t.map(
        Gpa(2 * HUGE_2M + PAGE_SIZE),
        Hva(4 * HUGE_2M),
        PageSize::Size4K,
        Perms::R,
    )
    .unwrap();
    // Host memory contiguous but not 2 MiB aligned.
    map_2m_as_4k(&t, 3 * HUGE_2M, 8 * HUGE_2M + PAGE_SIZE, Perms::R);
    let before = t.dump();
    for i in 0..4 {
        let r = t.collapse(Gpa(i * HUGE_2M), PageSize::Size2M);
        assert!(
            matches!(r, Err(Stage2Error::NotCollapsible { .. })),
            "region {i}: {r:?}"
        );
    }
    assert!(matches!(
        t.collapse(Gpa(0), PageSize::Size1G),
        Err(Stage2Error::NotCollapsible { .. })
    ));
    assert_eq!(
        t.collapse(Gpa(HUGE_1G), PageSize::Size2M),
        Err(Stage2Error::NotMapped { gpa: Gpa(HUGE_1G) })
    );
    assert_eq!(t.dump(), before);
    assert_eq!(t.reclaim_stats().retired, 0);
}

// ---- dump ----

#[test]
fn test_dump_merges_adjacent_runs_and_separates_sizes_and_perms() {
    let t = Stage2Table::new();
    t.map(Gpa(0), Hva(HVA_BASE), PageSize::Size2M, Perms::RW)
        .unwrap();
    t.map(
        Gpa(HUGE_2M),
        Hva(HVA_BASE + HUGE_2M),
        PageSize::Size2M,
        Perms::RW,
    )
    .unwrap();
    t.map(
        Gpa(2 * HUGE_2M),
        Hva(HVA_BASE + 2 * HUGE_2M),
        PageSize::Size4K,
        Perms::RW,
    )
    .unwrap();
    t.map(
        Gpa(2 * HUGE_2M + PAGE_SIZE),
        Hva(0x1000),
        PageSize::Size4K,
        Perms::RW,
    )
    .unwrap();
    t.map(
        Gpa(2 * HUGE_2M + 2 * PAGE_SIZE),
        Hva(0x2000),
        PageSize::Size4K,
        Perms::R,
    )
    .unwrap();
    let runs = t.dump();
    let got: Vec<_> = runs
        .iter()
        .map(|r| {
            (
                r.range.start().0,
                r.range.len(),
                r.hva.0,
                r.page_size,
                r.perms,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (0, 2 * HUGE_2M, HVA_BASE, PageSize::Size2M, Perms::RW),
            (
                2 * HUGE_2M,
                PAGE_SIZE,
                HVA_BASE + 2 * HUGE_2M,
                PageSize::Size4K,
                Perms::RW
            ),
            (
                2 * HUGE_2M + PAGE_SIZE,
                PAGE_SIZE,
                0x1000,
                PageSize::Size4K,
                Perms::RW
            ),
            (
                2 * HUGE_2M + 2 * PAGE_SIZE,
                PAGE_SIZE,
                0x2000,
                PageSize::Size4K,
                Perms::R
            ),
        ]
    );
    let json = serde_json::to_value(runs[0]).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"gpa": "0x0", "len": 2 * HUGE_2M, "hva": "0x7f0000000000",
                           "page_size": "2M", "perms": "rw-"})
    );
}

// ---- concurrent installs (lock-free `map`) ----

#[test]
fn test_table_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Stage2Table>();
}

#[test]
fn test_map_racing_installers_share_tables_and_free_losers() {
    let t = Stage2Table::new();
    let threads = 4u64;
    let wins = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for th in 0..threads {
            let (t, wins) = (&t, &wins);
            s.spawn(move || {
                for i in 0..256u64 {
                    // Every thread maps page i (one wins) and its own page.
                    let shared = Gpa(i * PAGE_SIZE);
                    if t.map(shared, Hva(shared.0), PageSize::Size4K, Perms::R)
                        .is_ok()
                    {
                        wins.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    let own = Gpa((256 + th * 64 + i % 64) * PAGE_SIZE);
                    let _ = t.map(own, Hva(own.0), PageSize::Size4K, Perms::R);
                }
            });
        }
    });
    assert_eq!(wins.into_inner(), 256);
    // One table per level: every loser freed its page instead of linking it.
    assert_eq!(t.reclaim_stats().linked, 4);
    assert_eq!(t.dump().len(), 1);
    assert_eq!(t.dump()[0].range.len(), 512 * PAGE_SIZE);
}

// ---- unmap with the dirty harvest in the same pass ----

#[test]
fn test_unmap_harvest_takes_dirty_from_cleared_leaves_tables_and_split_huge_leaves() {
    let t = Stage2Table::new();
    // A lower table of 4K leaves under [0, 2M), two of them dirty.
    for i in 0..512u64 {
        let gpa = Gpa(i * PAGE_SIZE);
        t.map(
            gpa,
            Hva(HVA_BASE + i * PAGE_SIZE),
            PageSize::Size4K,
            Perms::RW,
        )
        .unwrap();
    }
    t.translate(Gpa(3 * PAGE_SIZE), Access::Write).unwrap();
    t.translate(Gpa(511 * PAGE_SIZE + 8), Access::Write)
        .unwrap();
    // A dirty 2M leaf at [2M, 4M).
    t.map(
        Gpa(HUGE_2M),
        Hva(HVA_BASE + HUGE_2M),
        PageSize::Size2M,
        Perms::RW,
    )
    .unwrap();
    t.translate(Gpa(HUGE_2M + 0x10), Access::Write).unwrap();
    // The whole lower table is covered (torn down); the huge leaf only in
    // part (split, and only the covered frames reported).
    let (pages, dirty) = t.unmap_harvest(range(0, HUGE_2M + 2 * PAGE_SIZE)).unwrap();
    assert_eq!(pages, 514);
    let first_huge = HUGE_2M / PAGE_SIZE;
    assert_eq!(
        dirty,
        vec![Gfn(3), Gfn(511), Gfn(first_huge), Gfn(first_huge + 1)]
    );
    // The rest of the huge region keeps its Dirty (split copies A/D).
    assert!(t
        .translate(Gpa(HUGE_2M + 2 * PAGE_SIZE), Access::Read)
        .is_some());
    let rest = t.take_dirty(range(HUGE_2M, HUGE_2M)).unwrap();
    assert_eq!(rest.len(), 510);
    // Nothing left to harvest where the unmap ran.
    assert_eq!(t.unmap_harvest(range(0, HUGE_2M)).unwrap(), (0, vec![]));
}

// ---- the empty-skipping scan of a table page ----

/// `used` returns every entry of exactly the cache lines (eight entries)
/// that hold a non-empty entry, within any range, whatever the range's
/// ends are within a block of 64 entries, against a one-entry-at-a-time scan.
#[test]
fn test_page_used_finds_every_line_with_a_non_empty_entry_of_any_range() {
    let page = super::reclaim::TablePage::new_boxed();
    let filled = [
        0usize, 7, 8, 9, 63, 64, 127, 128, 200, 255, 256, 500, 510, 511,
    ];
    for &i in &filled {
        page.slot(i).store(
            (0x1000 * (i as u64 + 1)) | READ,
            std::sync::atomic::Ordering::Relaxed,
        );
    }
    assert!(!page.is_empty());
    let bounds = [
        0usize, 1, 6, 7, 8, 9, 15, 16, 62, 63, 64, 65, 127, 128, 255, 256, 499, 509, 510, 511,
    ];
    for &from in &bounds {
        for &to in bounds.iter().filter(|&&to| to >= from) {
            let want: Vec<usize> = (from..=to)
                .filter(|i| filled.iter().any(|f| f / 8 == i / 8))
                .collect();
            let got: Vec<usize> = page.used(from, to).collect();
            assert_eq!(got, want, "used({from}, {to})");
        }
    }
    let empty = super::reclaim::TablePage::new_boxed();
    assert!(empty.is_empty());
    assert_eq!(empty.used(0, ENTRIES - 1).count(), 0);
}
