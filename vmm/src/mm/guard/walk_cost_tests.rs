//! What a host pass through [`GuestReader::walk`] and
//! [`GuestReader::walk_batches`] costs against a raw loop
//! over the same memory, at 32,761 slots of 4 pages (the memslots bench's
//! rw test without a guest): each pass reads a word at the start of every
//! page and writes one in its second half. The two passes alternate, so a
//! busy neighbour slows both alike; prints the median of each and the ratio.
//! Ignored (a timing, not a check); run it in release:
//! `cargo test --release -p vmm --lib walk_cost -- --ignored --nocapture`.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use super::*;
use crate::mm::addr::{GpaRange, PAGE_SIZE};
use crate::mm::backing::{BackingKind, HostMapping};
use crate::mm::slot_map::{PlugSpec, SlotMapConfig};

const SLOTS: u64 = 32_761;
const PAGES: u64 = 4;
const BASE: u64 = 0x2_0000_0000;
const PASSES: usize = 60;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

/// Reads the word at the start of every page of `part` (checking the page
/// number written there) and writes one in its second half.
#[inline(always)]
fn touch(slot: &SlotRef<'_>, part: GpaRange) {
    let base = slot.hva(part.start(), part.len()).unwrap().0;
    let first = (part.start().0 - BASE) / PAGE_SIZE;
    for k in 0..part.len() / PAGE_SIZE {
        let hva = base + k * PAGE_SIZE;
        // SAFETY: inside `slot`, which the walk holds while its visitor runs
        // (the caller is that visitor).
        let word = unsafe { std::ptr::read_volatile(hva as *const u64) };
        assert_eq!(word as u8, (first + k) as u8);
        // SAFETY: as above.
        unsafe { std::ptr::write_volatile((hva + PAGE_SIZE / 2) as *mut u64, 7) };
    }
}

#[test]
#[ignore = "a timing; run in release with --nocapture"]
fn walk_cost() {
    let g = GuardedMap::new(SlotMap::new(SlotMapConfig::default()));
    // A page between two slots' host windows keeps them from merging.
    let mapping =
        Arc::new(HostMapping::new(&BackingKind::Anon, SLOTS * (PAGES + 1) * PAGE_SIZE).unwrap());
    let plugs = PlugSpec::apart(&mapping, Gpa(BASE), SLOTS, PAGES);
    g.apply(|m| m.plug_many(plugs), Duration::from_secs(10))
        .unwrap();
    let host = mapping.hva().0;
    let hva_of = |page: u64| host + (page + page / PAGES) * PAGE_SIZE;
    for page in 0..SLOTS * PAGES {
        // SAFETY: the page lies in `mapping`, mapped while it lives.
        unsafe { std::ptr::write_volatile(hva_of(page) as *mut u64, page as u8 as u64) };
    }
    let raw = || {
        for page in 0..SLOTS * PAGES {
            let hva = hva_of(page);
            // SAFETY: as above.
            let word = unsafe { std::ptr::read_volatile(hva as *const u64) };
            assert_eq!(word as u8, page as u8);
            // SAFETY: as above.
            unsafe { std::ptr::write_volatile((hva + PAGE_SIZE / 2) as *mut u64, 7) };
        }
    };
    let range = GpaRange::new(Gpa(BASE), SLOTS * PAGES * PAGE_SIZE).unwrap();
    let walked = || {
        let flow = g
            .reader()
            .walk(range, |visit| {
                let Visit::Slot { slot, part } = visit else {
                    panic!("hole");
                };
                touch(slot, part);
                ControlFlow::<()>::Continue(())
            })
            .unwrap();
        assert_eq!(flow, ControlFlow::Continue(()));
    };
    let batched = || {
        let flow = g
            .reader()
            .walk_batches(range, |steps| {
                for step in steps {
                    let WalkStep::Slot { slot, part } = step else {
                        panic!("hole");
                    };
                    touch(slot, *part);
                }
                ControlFlow::<()>::Continue(())
            })
            .unwrap();
        assert_eq!(flow, ControlFlow::Continue(()));
    };
    let (mut raws, mut walks, mut counted) = (Vec::new(), Vec::new(), Vec::new());
    let mut batches = Vec::new();
    for _ in 0..PASSES {
        let t = Instant::now();
        raw();
        raws.push(t.elapsed());
        let t = Instant::now();
        walked();
        walks.push(t.elapsed());
        let t = Instant::now();
        batched();
        batches.push(t.elapsed());
        // With every announcement entry taken, the walk counts each slot.
        let claims: Vec<_> = std::iter::from_fn(|| g.walks.claim()).collect();
        let t = Instant::now();
        walked();
        counted.push(t.elapsed());
        drop(claims);
    }
    let (r, w, c) = (median(raws), median(walks), median(counted));
    let b = median(batches);
    println!(
        "walk_cost: walk_batches {b:?}, walk/raw {:.3}, {:.1} ns a slot more",
        b.as_secs_f64() / r.as_secs_f64(),
        (b.as_nanos() as f64 - r.as_nanos() as f64) / SLOTS as f64
    );
    let snapshot = g.load();
    let t = Instant::now();
    let mut n = 0;
    for _ in 0..10 {
        n += snapshot.slots_in(range).count();
    }
    let iterate = t.elapsed() / 10;
    let t = Instant::now();
    for _ in 0..10 {
        let flow = g.reader().walk(range, |visit| {
            n += matches!(visit, Visit::Slot { .. }) as usize;
            ControlFlow::<()>::Continue(())
        });
        assert_eq!(flow, Ok(ControlFlow::Continue(())));
    }
    let empty = t.elapsed() / 10;
    println!("walk_cost: iterating the snapshot {iterate:?}, an empty walk {empty:?} ({n})");
    println!(
        "walk_cost: counting each slot {c:?}, walk/raw {:.3}",
        c.as_secs_f64() / r.as_secs_f64()
    );
    let per_slot = (w.as_nanos() as f64 - r.as_nanos() as f64) / SLOTS as f64;
    println!(
        "walk_cost: {SLOTS} slots of {PAGES} pages: raw {r:?}, walk {w:?}, walk/raw {:.3}, {per_slot:.1} ns a slot more",
        w.as_secs_f64() / r.as_secs_f64()
    );
}
