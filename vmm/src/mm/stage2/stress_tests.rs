//! Reclamation and concurrency tests on real threads.
//!
//! Freed pages are poisoned and quarantined in test builds (see `reclaim`),
//! and every walk decodes what it reads and panics on poison, so a page freed
//! while a walker could still reach it fails these tests.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_epoch as epoch;

use super::entry::{level_index, POISON, ROOT_LEVEL};
use super::reclaim::{self, TablePage};
use super::*;
use crate::mm::addr::{Gpa, GpaRange, Hva, HUGE_1G, HUGE_2M, PAGE_SIZE};

/// Pins and flushes until `done` holds or `limit` passes; whether it held.
fn advance_epochs_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if done() {
            return true;
        }
        let g = epoch::pin();
        g.flush();
        drop(g);
        std::thread::yield_now();
    }
    done()
}

/// The address of the table page at `level` on the walk to `gpa`.
fn table_addr(t: &Stage2Table, gpa: u64, level: u8, guard: &epoch::Guard) -> u64 {
    let mut table: &TablePage = &t.root;
    let mut l = ROOT_LEVEL;
    loop {
        let raw = slot::read(table.slot(level_index(gpa, l)));
        let Decoded::Table(addr) = Entry(raw).decode(l) else {
            panic!("no table at level {} for {gpa:#x}", l - 1)
        };
        if l - 1 == level {
            return addr;
        }
        // SAFETY: a table pointer read while `guard` is pinned.
        table = unsafe { reclaim::page_at(addr, guard) };
        l -= 1;
    }
}

#[test]
fn test_reclaim_pinned_walker_keeps_zapped_page_until_unpinned() {
    let t = Stage2Table::new();
    let gpa = HUGE_1G + 0x5000;
    t.map(Gpa(gpa), Hva(0x5000), PageSize::Size4K, Perms::RW)
        .unwrap();

    // A walker is inside the level-1 table when the writer zaps it.
    let walker = epoch::pin();
    let l1_addr = table_addr(&t, gpa, 1, &walker);
    // SAFETY: read from a table entry while `walker` is pinned.
    let l1 = unsafe { reclaim::page_at(l1_addr, &walker) };
    assert_eq!(
        t.unmap(GpaRange::new(Gpa(0), 2 * HUGE_1G).unwrap())
            .unwrap(),
        1
    );
    assert_eq!(t.reclaim_stats().retired, 3); // L3, L2, L1

    // Other threads pin, flush and unpin: the grace period cannot end.
    std::thread::scope(|s| {
        s.spawn(|| advance_epochs_until(Duration::from_millis(50), || false));
    });
    advance_epochs_until(Duration::from_millis(20), || false);
    assert_eq!(t.reclaim_stats().freed, 0, "freed under a pinned walker");
    let leaf = level_index(gpa, 1);
    for (i, e) in l1.slots().iter().enumerate() {
        let v = slot::read(e);
        assert_ne!(v, POISON, "walker read poison while pinned");
        // The torn-down leaf is frozen (a walker's A/D CAS on it fails), and
        // so are the empty entries of its cache line; entries of the other
        // lines stay empty (nothing fills an unlinked page).
        let want = if i / 8 == leaf / 8 {
            Decoded::Frozen
        } else {
            Decoded::Empty
        };
        assert_eq!(Entry(v).decode(1), want, "entry {i} after the teardown");
    }

    // The walker leaves: the pages are reclaimed and poisoned.
    drop(walker);
    let freed = advance_epochs_until(Duration::from_secs(2), || t.reclaim_stats().freed == 3);
    assert!(freed, "not reclaimed after unpin: {:?}", t.reclaim_stats());
    let poisoned = reclaim::with_quarantined(l1_addr, |page| {
        page.slots().iter().all(|e| slot::read(e) == POISON)
    });
    assert_eq!(poisoned, Some(true), "freed page not poisoned (or evicted)");
}

/// The host address the writer maps `gpa` to: walkers check every
/// translation against it.
const HVA_OFFSET: u64 = 0x100_0000_0000;
const WINDOW_START: u64 = HUGE_1G;
const WINDOW: u64 = HUGE_1G;
const PERMS: [Perms; 4] = [Perms::R, Perms::RW, Perms::RX, Perms::RWX];
/// A 1 GiB region that stays mapped (RWX) the whole test: the writer only splits
/// and collapses it, so a walker must never miss there.
const STABLE_START: u64 = 0;

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// Random page-aligned gpa in the window, biased to its first 16 MiB so that
/// the writer keeps reshaping the same tables the walkers are in.
fn rand_gpa(s: &mut u64, align: u64) -> u64 {
    let span = if xorshift(s) % 4 == 0 {
        WINDOW
    } else {
        8 * HUGE_2M
    };
    WINDOW_START + (xorshift(s) % span) / align * align
}

#[derive(Default)]
struct OpCounts {
    maps: u64,
    unmapped_pages: u64,
    splits: u64,
    collapses: u64,
    protects: u64,
    dirty: u64,
    stable_collapses: u64,
}

fn writer_step(t: &Stage2Table, s: &mut u64, c: &mut OpCounts) {
    let perms = PERMS[(xorshift(s) % 4) as usize];
    match xorshift(s) % 10 {
        8 => {
            let gpa = STABLE_START + xorshift(s) % (8 * HUGE_2M) / PAGE_SIZE * PAGE_SIZE;
            if t.split(Gpa(gpa)).is_ok() {
                c.splits += 1;
            }
        }
        9 => {
            let size = if xorshift(s) % 4 == 0 {
                PageSize::Size1G
            } else {
                PageSize::Size2M
            };
            let gpa = STABLE_START + xorshift(s) % (8 * HUGE_2M) / size.bytes() * size.bytes();
            if t.collapse(Gpa(gpa), size).is_ok() {
                c.stable_collapses += 1;
            }
        }
        0 => {
            let size =
                [PageSize::Size4K, PageSize::Size2M, PageSize::Size1G][(xorshift(s) % 3) as usize];
            let gpa = rand_gpa(s, size.bytes());
            if t.map(Gpa(gpa), Hva(gpa + HVA_OFFSET), size, perms).is_ok() {
                c.maps += 1;
            }
        }
        1 => {
            // Fill a 2 MiB region with 4K leaves, ready to collapse.
            let base = rand_gpa(s, HUGE_2M);
            for i in 0..512 {
                let gpa = base + i * PAGE_SIZE;
                if t.map(Gpa(gpa), Hva(gpa + HVA_OFFSET), PageSize::Size4K, perms)
                    .is_ok()
                {
                    c.maps += 1;
                }
            }
        }
        2 => {
            let start = rand_gpa(s, PAGE_SIZE);
            let len = (xorshift(s) % 1024 + 1) * PAGE_SIZE;
            c.unmapped_pages += t.unmap(GpaRange::new(Gpa(start), len).unwrap()).unwrap();
        }
        3 => {
            let start = rand_gpa(s, PAGE_SIZE);
            let len = (xorshift(s) % 1024 + 1) * PAGE_SIZE;
            t.protect(GpaRange::new(Gpa(start), len).unwrap(), perms)
                .unwrap();
            c.protects += 1;
        }
        4 | 5 => {
            if t.split(Gpa(rand_gpa(s, PAGE_SIZE))).is_ok() {
                c.splits += 1;
            }
        }
        6 => {
            let size = if xorshift(s) % 4 == 0 {
                PageSize::Size1G
            } else {
                PageSize::Size2M
            };
            if t.collapse(Gpa(rand_gpa(s, size.bytes())), size).is_ok() {
                c.collapses += 1;
            }
        }
        _ => {
            let start = rand_gpa(s, PAGE_SIZE);
            let r = GpaRange::new(Gpa(start), 64 * PAGE_SIZE).unwrap();
            c.dirty += t.take_dirty(r).unwrap().len() as u64;
        }
    }
}

/// Walks random addresses until `stop`; checks every translation is one the
/// writer could have produced. Returns (hits, misses).
fn walker_loop(t: &Stage2Table, stop: &AtomicBool, seed: u64) -> (u64, u64) {
    let mut s = seed;
    let (mut hits, mut misses) = (0, 0);
    while !stop.load(Ordering::Relaxed) {
        if xorshift(&mut s) % 4 == 0 {
            let gpa = STABLE_START + xorshift(&mut s) % (8 * HUGE_2M);
            let tr = t.translate(Gpa(gpa), Access::Write);
            let tr = tr.unwrap_or_else(|| panic!("hole at {gpa:#x} in memory that stays mapped"));
            assert_eq!(tr.hva, Hva(gpa + HVA_OFFSET), "{tr:?}");
            hits += 1;
            continue;
        }
        let gpa = rand_gpa(&mut s, 8) + xorshift(&mut s) % 8;
        let access = [Access::Read, Access::Write, Access::Exec][(xorshift(&mut s) % 3) as usize];
        match t.translate(Gpa(gpa), access) {
            Some(tr) => {
                hits += 1;
                assert_eq!(
                    tr.hva,
                    Hva(gpa + HVA_OFFSET),
                    "translation of {gpa:#x}: {tr:?}"
                );
                assert!(tr.page_gpa.is_aligned(tr.page_size.bytes()), "{tr:?}");
                assert!(tr.page_gpa.0 <= gpa && gpa - tr.page_gpa.0 < tr.page_size.bytes());
                assert!(
                    PERMS.contains(&tr.perms) && tr.perms.allows(access),
                    "{tr:?}"
                );
                assert!(
                    tr.accessed && (access != Access::Write || tr.dirty),
                    "{tr:?}"
                );
            }
            None => misses += 1,
        }
    }
    (hits, misses)
}

#[test]
fn test_table_concurrent_walkers_see_only_valid_translations() {
    let t = Stage2Table::new();
    let stop = AtomicBool::new(false);
    let retired_before = t.reclaim_stats().retired;
    t.map(
        Gpa(STABLE_START),
        Hva(STABLE_START + HVA_OFFSET),
        PageSize::Size1G,
        Perms::RWX,
    )
    .unwrap();
    let mut counts = OpCounts::default();
    let walked = AtomicU64::new(0);
    std::thread::scope(|sc| {
        let walkers: Vec<_> = (0..2u64)
            .map(|i| {
                let (t, stop) = (&t, &stop);
                sc.spawn(move || walker_loop(t, stop, 0x9e37_79b9_7f4a_7c15 ^ (i + 1)))
            })
            .collect();
        // A faulting device: lock-free maps racing the writer's range
        // operations (through the writer lock) and the walkers.
        let faulter = {
            let (t, stop) = (&t, &stop);
            sc.spawn(move || {
                let mut s = 0x1234_5678_9abc_def1;
                let mut mapped = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let size = if xorshift(&mut s) % 8 == 0 {
                        PageSize::Size2M
                    } else {
                        PageSize::Size4K
                    };
                    let gpa = rand_gpa(&mut s, size.bytes());
                    let perms = PERMS[(xorshift(&mut s) % 4) as usize];
                    if t.map(Gpa(gpa), Hva(gpa + HVA_OFFSET), size, perms).is_ok() {
                        mapped += 1;
                    }
                }
                mapped
            })
        };
        let mut s = 0x2545_f491_4f6c_dd1d;
        let start = Instant::now();
        let mut ops = 0;
        // Run 0.8 s (longer, up to 2.5 s, on a loaded machine until every
        // kind of operation has succeeded at least once).
        let busy =
            |c: &OpCounts| c.splits > 0 && c.collapses > 0 && c.stable_collapses > 0 && c.dirty > 0;
        while ops < 20_000 {
            let elapsed = start.elapsed();
            if elapsed > Duration::from_millis(2500)
                || (elapsed > Duration::from_millis(800) && busy(&counts))
            {
                break;
            }
            writer_step(&t, &mut s, &mut counts);
            ops += 1;
        }
        stop.store(true, Ordering::Relaxed);
        let faulted = faulter.join().expect("faulter panicked");
        assert!(faulted > 0, "the faulter never mapped");
        for w in walkers {
            let (hits, misses) = w.join().expect("walker panicked");
            assert!(
                hits > 0 && misses > 0,
                "walkers did not race: {hits} hits, {misses} misses"
            );
            walked.fetch_add(hits + misses, Ordering::Relaxed);
        }
    });
    assert!(counts.maps > 0 && counts.unmapped_pages > 0 && counts.protects > 0);
    assert!(
        counts.splits > 0 && counts.collapses > 0,
        "splits {} collapses {}",
        counts.splits,
        counts.collapses
    );
    assert!(counts.dirty > 0, "walkers' writes never showed up as dirty");
    assert!(
        counts.stable_collapses > 0,
        "the stable region was never collapsed"
    );
    let stats = t.reclaim_stats();
    assert!(
        stats.retired > retired_before,
        "nothing was reclaimed: {stats:?}"
    );
    // The table is still consistent for a writer.
    t.unmap(GpaRange::new(Gpa(0), 4 * HUGE_1G).unwrap())
        .unwrap();
    assert!(t.dump().is_empty());
    assert_eq!(t.reclaim_stats().linked, 1);
    let freed_all = advance_epochs_until(Duration::from_secs(2), || {
        let s = t.reclaim_stats();
        s.freed == s.retired
    });
    assert!(
        freed_all,
        "retired pages not reclaimed: {:?}",
        t.reclaim_stats()
    );
    assert!(walked.into_inner() > 0);
}
