//! What a host pass through [`GuestReader::walk`] costs against a raw loop
//! over the same memory, at 32,761 slots of 4 pages (the memslots bench's
//! rw test without a guest): each pass reads a word at the start of every
//! page and writes one in its second half. The passes alternate, so a busy
//! neighbour slows them alike; prints the median and the fastest of each,
//! and the ratios to the raw loop's.
//!
//! Two conditions: warm (the passes follow each other, the slot records
//! stay in the caches) and cold (a 64 MiB sweep before every pass, as the
//! bench guest's 512 MiB pass leaves them). Beside the walk, a pass that
//! gathers the snapshot's slots 256 at a time and reads each record just
//! before its pages, with no guard at all: the floor a walk could reach.
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

/// Reads the word at the start of every page from `hva` on (checking the
/// page number written there: `part` is the pages' guest range) and writes
/// one in its second half.
#[inline(always)]
fn touch(hva: u64, part: GpaRange) {
    let first = (part.start().0 - BASE) / PAGE_SIZE;
    for k in 0..part.len() / PAGE_SIZE {
        let hva = hva + k * PAGE_SIZE;
        // SAFETY: the callers pass a slot's host address of `part`, mapped
        // while the pass runs (the walk holds the slot while its visitor
        // runs; the unguarded pass runs while no writer exists).
        let word = unsafe { std::ptr::read_volatile(hva as *const u64) };
        assert_eq!(word as u8, (first + k) as u8);
        // SAFETY: as above.
        unsafe { std::ptr::write_volatile((hva + PAGE_SIZE / 2) as *mut u64, 7) };
    }
}

/// Sweeps `buf` so the walk's records and the pages are cold, as after the
/// bench guest's pass.
fn evict(buf: &mut [u64]) {
    for w in buf.iter_mut().step_by(8) {
        // SAFETY: a valid, aligned element of `buf`.
        unsafe { std::ptr::write_volatile(w, *w + 1) };
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
    let range = GpaRange::new(Gpa(BASE), SLOTS * PAGES * PAGE_SIZE).unwrap();
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
    let walked = || {
        let flow = g
            .reader()
            .walk(range, |visit| {
                let Visit::Slot { slot, part } = visit else {
                    panic!("hole");
                };
                touch(slot.hva(part.start(), part.len()).unwrap().0, part);
                ControlFlow::<()>::Continue(())
            })
            .unwrap();
        assert_eq!(flow, ControlFlow::Continue(()));
    };
    // With every announcement entry taken, the walk counts each slot.
    let counted = || {
        let claims: Vec<_> = std::iter::from_fn(|| g.walks.claim()).collect();
        walked();
        drop(claims);
    };
    let snapshot = g.load();
    let unguarded = || {
        let mut slots = snapshot.slots_in(range);
        let mut ahead: Vec<&Slot> = Vec::with_capacity(ANNOUNCE_BATCH);
        loop {
            ahead.clear();
            ahead.extend(slots.by_ref().take(ANNOUNCE_BATCH));
            if ahead.is_empty() {
                break;
            }
            for slot in &ahead {
                touch(slot.hva().0, slot.range());
            }
        }
    };
    let passes: [(&str, &dyn Fn()); 4] = [
        ("raw", &raw),
        ("walk", &walked),
        ("counted", &counted),
        ("no guard", &unguarded),
    ];
    let mut sweep = vec![0u64; 64 << 17];
    for cold in [false, true] {
        let mut times: Vec<Vec<Duration>> = vec![Vec::new(); passes.len()];
        for _ in 0..PASSES {
            for ((_, pass), t) in passes.iter().zip(&mut times) {
                if cold {
                    evict(&mut sweep);
                }
                let start = Instant::now();
                pass();
                t.push(start.elapsed());
            }
        }
        let fastest: Vec<Duration> = times.iter().map(|t| *t.iter().min().unwrap()).collect();
        let medians: Vec<Duration> = times.into_iter().map(median).collect();
        let line = |of: &[Duration]| {
            passes
                .iter()
                .zip(of)
                .skip(1)
                .map(|((name, _), d)| {
                    format!("{name} {:.3}", d.as_secs_f64() / of[0].as_secs_f64())
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let state = if cold { "cold" } else { "warm" };
        println!(
            "walk_cost {state}: {SLOTS} slots of {PAGES} pages, raw p50 {:?}; /raw p50: {}; /raw fastest: {}",
            medians[0],
            line(&medians),
            line(&fastest)
        );
    }
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
}
