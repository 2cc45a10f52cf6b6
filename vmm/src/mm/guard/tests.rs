use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use super::*;
use crate::mm::addr::{GpaRange, PAGE_SIZE};
use crate::mm::backing::{BackingKind, HostMapping};
use crate::mm::slot_map::{SlotFlags, SlotMapConfig};

const P: u64 = PAGE_SIZE;
const BASE: u64 = 0x10_0000;
const BOUND: Duration = Duration::from_secs(2);

fn anon(pages: u64) -> Arc<HostMapping> {
    Arc::new(HostMapping::new(&BackingKind::Anon, pages * P).unwrap())
}

fn config() -> SlotMapConfig {
    SlotMapConfig {
        max_slots: 200,
        ..SlotMapConfig::default()
    }
}

/// A map with `pages` pages of `mem` plugged at `BASE`.
fn plugged(mem: &Arc<HostMapping>, pages: u64) -> GuardedMap {
    let g = GuardedMap::new(SlotMap::new(config()));
    g.apply(
        |m| m.plug(Gpa(BASE), pages * P, mem.clone(), 0, SlotFlags::NONE),
        BOUND,
    )
    .unwrap();
    g
}

#[test]
fn test_guard_acquire_translates_like_map_and_releases_on_drop() {
    let mem = anon(8);
    let g = plugged(&mem, 8);
    let gpa = Gpa(BASE + 3 * P + 16);
    let slot = g.try_acquire(gpa).unwrap();
    let (hva, s) = g
        .load()
        .translate(gpa)
        .map(|(h, s)| (h, s.clone()))
        .unwrap();
    assert_eq!(slot.hva(gpa, 8).unwrap(), hva);
    assert_eq!(slot.generation(), s.generation());
    let cell = g.cells().get(s.id().0).unwrap();
    assert_eq!(cell.readers(), 1);
    drop(slot);
    assert_eq!(cell.readers(), 0);
}

#[test]
fn test_guard_access_outside_slot_or_unaligned_is_refused() {
    let mem = anon(2);
    let g = plugged(&mem, 2);
    let slot = g.try_acquire(Gpa(BASE)).unwrap();
    assert!(matches!(
        slot.read_u64(Gpa(BASE + 2 * P - 4)),
        Err(GuardError::Unaligned { .. })
    ));
    assert!(matches!(
        slot.hva(Gpa(BASE + 2 * P - 4), 8),
        Err(GuardError::OutOfSlot { len: 8, .. })
    ));
    assert!(matches!(
        slot.hva(Gpa(BASE - 8), 8),
        Err(GuardError::OutOfSlot { .. })
    ));
    assert!(matches!(
        slot.hva(Gpa(BASE + 8), u64::MAX),
        Err(GuardError::OutOfSlot { .. })
    ));
    assert!(matches!(
        slot.hva(Gpa(BASE + 2 * P + 8), 0),
        Err(GuardError::OutOfSlot { .. })
    ));
    // The last word, and an empty access at the very end, are inside.
    let last = slot.hva(Gpa(BASE + 2 * P - 8), 8).unwrap();
    assert_eq!(last.0, mem.hva().0 + 2 * P - 8);
    assert_eq!(
        slot.hva(Gpa(BASE + 2 * P), 0).unwrap().0,
        mem.hva().0 + 2 * P
    );
    assert_eq!(slot.hva(Gpa(BASE), 2 * P).unwrap(), mem.hva());
    let mut buf = [0u8; 3];
    slot.write(Gpa(BASE + 5), &[1, 2, 3]).unwrap();
    slot.read(Gpa(BASE + 5), &mut buf).unwrap();
    assert_eq!(buf, [1, 2, 3]);
}

#[test]
fn test_guard_hole_is_unplugged() {
    let mem = anon(2);
    let g = plugged(&mem, 2);
    assert_eq!(
        g.try_acquire(Gpa(BASE + 2 * P)).unwrap_err(),
        GuardError::Unplugged {
            gpa: Gpa(BASE + 2 * P)
        }
    );
}

#[test]
fn test_guard_unplug_waits_for_holder_and_discards_after() {
    let mem = anon(4);
    let g = plugged(&mem, 4);
    let gpa = Gpa(BASE + P);
    g.try_acquire(gpa).unwrap().write_u64(gpa, 0xfeed).unwrap();
    let held = Barrier::new(2);
    thread::scope(|s| {
        let (g, held) = (&g, &held);
        let holder = s.spawn(move || {
            let slot = g.try_acquire(gpa).unwrap();
            held.wait();
            thread::sleep(Duration::from_millis(60));
            // Still ours: not discarded while we hold it.
            let v = slot.read_u64(gpa).unwrap();
            drop(slot);
            v
        });
        held.wait();
        let started = Instant::now();
        g.apply(|m| m.unplug(Gpa(BASE), 4 * P), BOUND).unwrap();
        assert!(started.elapsed() >= Duration::from_millis(40));
        assert_eq!(holder.join().unwrap(), 0xfeed);
    });
    // Discarded after the holder left: anonymous memory reads zero.
    // SAFETY: `mem` is alive and 4 pages long.
    let word = unsafe { (mem.as_ptr().add(P as usize) as *const u64).read_volatile() };
    assert_eq!(word, 0);
}

#[test]
fn test_guard_drain_timeout_names_slot_and_changes_nothing() {
    let mem = anon(4);
    let g = plugged(&mem, 4);
    let before = g.load();
    let slot = g.try_acquire(Gpa(BASE)).unwrap();
    let id = slot.slot_id();
    let err = g
        .apply(|m| m.unplug(Gpa(BASE), P), Duration::from_millis(20))
        .unwrap_err();
    match &err {
        GuardError::Drain(SlotLockError::DrainTimeout { slot, readers, .. }) => {
            assert_eq!((*slot, *readers), (id, 1));
        }
        other => panic!("expected a drain timeout, got {other}"),
    }
    assert!(Arc::ptr_eq(&before, &g.load()), "the map was published");
    // The exclusion was released: new readers get in again.
    drop(g.try_acquire(Gpa(BASE + P)).unwrap());
    drop(slot);
    g.apply(|m| m.unplug(Gpa(BASE), P), BOUND).unwrap();
}

#[test]
fn test_guard_excluded_slot_is_busy_and_dropped_exclusion_readmits() {
    let mem = anon(4);
    let g = plugged(&mem, 4);
    let t = g.load().unplug(Gpa(BASE), 4 * P).unwrap();
    let ex = g.exclude(&t.changes, BOUND).unwrap();
    assert_eq!(ex.len(), 1);
    assert!(matches!(
        g.try_acquire(Gpa(BASE)),
        Err(GuardError::Busy { .. })
    ));
    drop(ex);
    drop(g.try_acquire(Gpa(BASE)).unwrap());
}

#[test]
fn test_guard_recycled_cell_is_caught_by_generation() {
    let a = anon(2);
    let b = anon(2);
    let g = plugged(&a, 2);
    let old = g.load();
    let old_id = old.lookup(Gpa(BASE)).unwrap().id();
    g.apply(|m| m.unplug(Gpa(BASE), 2 * P), BOUND).unwrap();
    // A new slot at BASE with other memory reuses the id, new generation.
    g.apply(
        |m| m.plug(Gpa(BASE), 2 * P, b.clone(), 0, SlotFlags::NONE),
        BOUND,
    )
    .unwrap();
    assert_eq!(g.load().lookup(Gpa(BASE)).unwrap().id(), old_id);
    // A reader still holding the old snapshot is refused by the cell...
    assert!(matches!(
        g.attempt(&old, Gpa(BASE), 0),
        Attempt::Again { .. }
    ));
    // ...and a fresh lookup lands on the new memory.
    let slot = g.try_acquire(Gpa(BASE)).unwrap();
    assert_eq!(slot.hva(Gpa(BASE), 1).unwrap(), b.hva());
}

#[test]
fn test_guard_protect_split_makes_middle_read_only() {
    let mem = anon(8);
    let g = plugged(&mem, 8);
    g.apply(|m| m.protect(Gpa(BASE + 2 * P), P, true), BOUND)
        .unwrap();
    let mid = g.try_acquire(Gpa(BASE + 2 * P)).unwrap();
    assert!(mid.read_only());
    assert!(matches!(
        mid.write_u64(Gpa(BASE + 2 * P), 1),
        Err(GuardError::ReadOnly { .. })
    ));
    let tail = g.try_acquire(Gpa(BASE + 5 * P)).unwrap();
    assert!(!tail.read_only());
    assert_eq!(
        tail.range(),
        GpaRange::new(Gpa(BASE + 3 * P), 5 * P).unwrap()
    );
    let mut attached = g.cells().attached();
    attached.sort_unstable();
    assert_eq!(attached.len(), 3);
}

#[test]
fn test_guard_dirty_log_toggle_neither_drains_nor_retags() {
    let mem = anon(4);
    let g = plugged(&mem, 4);
    // A reader holds a guard across the toggle: with a drain the op would
    // wait out its bound and fail.
    let held = g.try_acquire(Gpa(BASE)).unwrap();
    let before = held.generation();
    let started = Instant::now();
    g.apply(
        |m| m.set_dirty_log(Gpa(BASE), 4 * P, true),
        Duration::from_millis(50),
    )
    .unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(50),
        "it waited for the reader"
    );
    held.write_u64(Gpa(BASE), 1).unwrap();
    drop(held);
    let after = g.try_acquire(Gpa(BASE)).unwrap();
    assert_eq!(after.generation(), before);
    assert!(g.load().lookup(Gpa(BASE)).unwrap().flags().dirty_log);
}

#[test]
fn test_guard_blocking_acquire_waits_for_op_then_sees_result() {
    let mem = anon(4);
    let g = plugged(&mem, 4);
    let t = g.load().unplug(Gpa(BASE), 4 * P).unwrap();
    thread::scope(|s| {
        let mut w = g.shared().begin_write();
        let ex = g.exclude(&t.changes, BOUND).unwrap();
        let reader = s.spawn(|| g.reader().acquire(Gpa(BASE)).map(|r| r.slot_id()));
        thread::sleep(Duration::from_millis(30));
        assert!(!reader.is_finished(), "acquire did not wait for the op");
        ex.commit(&t.changes)
            .unwrap()
            .publish(&mut w, t.map.clone());
        drop(w);
        assert_eq!(
            reader.join().unwrap(),
            Err(GuardError::Unplugged { gpa: Gpa(BASE) })
        );
    });
}

/// Readers hold guards while a writer plugs and unplugs (which discards)
/// the same memory as fast as it can: a reader must never see memory
/// discarded under its guard (zero), nor the words change while it holds it.
#[test]
fn test_guard_stress_memory_never_discarded_under_guard() {
    let mem = anon(4);
    let g = GuardedMap::new(SlotMap::new(config()));
    let stop = AtomicBool::new(false);
    let acquired = AtomicU64::new(0);
    let ops = AtomicU64::new(0);
    let word = |k: u64| 0x5555_0000_0000 | k;
    thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                let mut reader = g.reader();
                while !stop.load(Ordering::Relaxed) {
                    let gpa = Gpa(BASE + 2 * P);
                    let Ok(slot) = reader.try_acquire(gpa) else {
                        continue;
                    };
                    let v = slot.read_u64(gpa).unwrap();
                    assert_eq!(v >> 32, 0x5555, "discarded under a guard: {v:#x}");
                    for _ in 0..50 {
                        std::hint::spin_loop();
                    }
                    assert_eq!(slot.read_u64(gpa).unwrap(), v, "changed under a guard");
                    acquired.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        let started = Instant::now();
        let mut k = 0;
        while started.elapsed() < Duration::from_millis(300) {
            k += 1;
            // Not plugged now: nobody can read it, so the writer may fill it.
            // SAFETY: `mem` is alive and 4 pages long; aligned word.
            unsafe { (mem.as_ptr().add(2 * P as usize) as *mut u64).write_volatile(word(k)) };
            g.apply(
                |m| m.plug(Gpa(BASE), 4 * P, mem.clone(), 0, SlotFlags::NONE),
                BOUND,
            )
            .unwrap();
            g.apply(|m| m.unplug(Gpa(BASE), 4 * P), BOUND).unwrap();
            ops.fetch_add(2, Ordering::Relaxed);
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert!(ops.load(Ordering::Relaxed) > 100);
    assert!(acquired.load(Ordering::Relaxed) > 0, "readers never got in");
}

#[test]
fn test_device_memory_caches_page_and_refetches_after_split() {
    let mem = anon(8);
    let g = Arc::new(plugged(&mem, 8));
    let hub = Arc::new(crate::mm::notifier::InvalidationHub::new());
    let dev = DeviceMemory::new(g.clone(), hub).unwrap();
    let gpa = Gpa(BASE + 5 * P + 8);
    dev.write_u64(gpa, 0xabc).unwrap();
    assert_eq!(dev.read_u64(gpa).unwrap(), 0xabc);
    assert_eq!(dev.cache().stats().fills, 1, "the second access is a hit");
    // Protecting another page splits the slot: our page's slot generation
    // changes without an invalidation of our page (no hub here at all).
    g.apply(|m| m.protect(Gpa(BASE + P), P, true), BOUND)
        .unwrap();
    assert_eq!(dev.read_u64(gpa).unwrap(), 0xabc);
    assert_eq!(
        dev.cache().stats().fills,
        2,
        "the stale entry was resolved again"
    );
    assert!(matches!(
        dev.write_u64(Gpa(BASE + P), 1),
        Err(GuardError::ReadOnly { .. })
    ));
    g.apply(|m| m.unplug(Gpa(BASE), 8 * P), BOUND).unwrap();
    assert_eq!(dev.read_u64(gpa), Err(GuardError::Unplugged { gpa }));
    assert!(matches!(
        dev.read(Gpa(BASE + P - 4), &mut [0; 8]),
        Err(GuardError::CrossesPage { len: 8, .. })
    ));
}

#[test]
fn test_readers_give_up_on_a_slot_left_excluded_naming_it() {
    let mem = anon(4);
    let g = Arc::new(plugged(&mem, 4));
    let hub = Arc::new(crate::mm::notifier::InvalidationHub::new());
    let mut dev = DeviceMemory::new(g.clone(), hub).unwrap();
    dev.read_u64(Gpa(BASE)).unwrap(); // cached before the writer vanishes
    dev.set_wait_bound(Duration::from_millis(50));
    // A writer that excluded the slot and never came back (it panicked
    // holding the exclusion, which here is simply never released).
    let t = g.load().unplug(Gpa(BASE), 4 * P).unwrap();
    std::mem::forget(g.exclude(&t.changes, BOUND).unwrap());
    let started = Instant::now();
    let reader = g
        .reader()
        .acquire_within(Gpa(BASE), Duration::from_millis(50));
    assert!(
        matches!(reader, Err(GuardError::Stuck { slot: 0, .. })),
        "{reader:?}"
    );
    let device = dev.read_u64(Gpa(BASE + 8));
    assert!(
        matches!(device, Err(GuardError::Stuck { slot: 0, .. })),
        "{device:?}"
    );
    assert!(device.unwrap_err().to_string().contains("stayed excluded"));
    assert!(started.elapsed() < Duration::from_secs(2), "bounded");
}
