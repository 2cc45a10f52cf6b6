//! The shared map: writers never lose each other's updates; readers always
//! see a complete map (never a half-applied op) without locking.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use super::*;
use crate::mm::slot_map::SharedSlotMap;

#[test]
fn test_shared_concurrent_writers_lose_no_update() {
    const PER_WRITER: u64 = 100;
    let shared = SharedSlotMap::new(SlotMap::new(config(1000, 1 << 40)));
    let m = anon(2 * PER_WRITER);
    thread::scope(|s| {
        for w in 0..2u64 {
            let (shared, m) = (&shared, &m);
            s.spawn(move || {
                for i in 0..PER_WRITER {
                    let k = w * PER_WRITER + i;
                    shared
                        .apply(|map| map.plug(Gpa(2 * k * P), P, m.clone(), k * P, SlotFlags::NONE))
                        .unwrap();
                }
            });
        }
    });
    let map = shared.load();
    assert_eq!(map.len(), 2 * PER_WRITER as usize);
    check_invariants(&map);
}

#[test]
fn test_shared_readers_see_whole_ops_only() {
    // The writer splits one slot into two and merges it back, over and over.
    // A reader must see either one 8-page slot or two 4-page slots with the
    // same translations: never a hole, never a half-applied op.
    let m = anon(8);
    let shared = SharedSlotMap::new(plugged(&SlotMap::new(config(10, 1 << 30)), 0, 8 * P, &m, 0));
    let stop = AtomicBool::new(false);
    let seen = [AtomicU32::new(0), AtomicU32::new(0)];
    thread::scope(|s| {
        let reader = s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let map = shared.load();
                for page in 0..8 {
                    let (hva, _) = map.translate(Gpa(page * P)).expect("hole seen");
                    assert_eq!(hva.0, m.hva().0 + page * P);
                }
                seen[map.len() - 1].fetch_add(1, Ordering::Relaxed);
            }
        });
        // Until the reader has seen both shapes a few times (bounded).
        let deadline = Instant::now() + Duration::from_secs(2);
        while seen.iter().any(|n| n.load(Ordering::Relaxed) < 10) && Instant::now() < deadline {
            let mut w = shared.begin_write();
            let t = w.map().set_dirty_log(Gpa(4 * P), 4 * P, true).unwrap();
            w.publish(t.map);
            let t = w.map().set_dirty_log(Gpa(4 * P), 4 * P, false).unwrap();
            w.publish(t.map);
        }
        stop.store(true, Ordering::Relaxed);
        reader.join().unwrap();
    });
    let seen = seen.map(|n| n.into_inner());
    eprintln!(
        "reader saw one slot {} times, two slots {} times",
        seen[0], seen[1]
    );
    assert!(seen.iter().all(|&n| n >= 10), "reader saw {seen:?}");
    assert_eq!(shared.load().len(), 1);
}

#[test]
fn test_shared_dropped_writer_publishes_nothing() {
    let shared = SharedSlotMap::new(SlotMap::new(config(10, 1 << 30)));
    {
        let w = shared.begin_write();
        let _abandoned = w
            .map()
            .plug(Gpa(0), P, anon(1), 0, SlotFlags::NONE)
            .unwrap();
    }
    assert!(shared.load().is_empty());
    let err = shared.apply(|map| map.unplug(Gpa(0), P)).unwrap_err();
    assert!(matches!(
        err,
        crate::mm::slot_map::SlotMapError::NothingPlugged { .. }
    ));
}
