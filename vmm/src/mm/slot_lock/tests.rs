use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use super::*;

fn range(start: u64, len: u64) -> GpaRange {
    GpaRange::new(Gpa(start), len).unwrap()
}

fn attached(id: u32) -> (SlotCell, SlotIdentity) {
    let cell = SlotCell::new(id);
    let identity = cell.attach(range(0x10_0000, 0x10_0000)).unwrap();
    (cell, identity)
}

#[test]
fn test_read_detached_cell_refused() {
    let cell = SlotCell::new(4);
    assert_eq!(
        cell.read(0, Gpa(0)).unwrap_err(),
        SlotLockError::Detached { slot: 4 }
    );
    assert_eq!(cell.word(), 0, "a refused reader must not touch the word");
}

#[test]
fn test_read_attached_cell_counts_and_releases() {
    let (cell, id) = attached(1);
    let a = cell.read(id.generation, Gpa(0x10_0000)).unwrap();
    let b = cell.read(id.generation, Gpa(0x1f_ffff)).unwrap();
    assert_eq!(cell.readers(), 2);
    assert_eq!(a.identity(), id);
    assert_eq!(b.slot_id(), 1);
    drop((a, b));
    assert_eq!(cell.word(), MAP_REF);
}

#[test]
fn test_read_excluded_cell_refused_until_release() {
    let (cell, id) = attached(2);
    let ex = cell.exclude().unwrap();
    assert_eq!(
        cell.read(id.generation, Gpa(0x10_0000)).unwrap_err(),
        SlotLockError::Excluded { slot: 2 }
    );
    assert_eq!(cell.word(), EXCLUDE | MAP_REF);
    ex.release();
    assert!(!cell.is_excluded());
    assert!(cell.read(id.generation, Gpa(0x10_0000)).is_ok());
}

#[test]
fn test_wait_drained_reader_on_other_thread_wakes_promptly() {
    let bound = Duration::from_secs(5);
    let cell = std::sync::Arc::new(attached(5).0);
    let generation = cell.identity().unwrap().generation;
    let (held_tx, held_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let reader = {
        let cell = cell.clone();
        thread::spawn(move || {
            let guard = cell.read(generation, Gpa(0x10_0000)).unwrap();
            held_tx.send(()).unwrap();
            go_rx.recv().unwrap();
            // Give the writer time to park on the condvar.
            thread::sleep(Duration::from_millis(30));
            let released = Instant::now();
            drop(guard);
            released
        })
    };
    held_rx.recv().unwrap();
    let mut ex = cell.exclude().unwrap();
    go_tx.send(()).unwrap();
    let waited = ex.wait_drained(bound).unwrap();
    let woke = Instant::now();
    let released = reader.join().unwrap();
    let delay = woke.duration_since(released);
    assert!(
        waited >= Duration::from_millis(20),
        "did not wait: {waited:?}"
    );
    assert!(
        delay < Duration::from_millis(250),
        "wake-up took {delay:?} (bound {bound:?})"
    );
    ex.detach().unwrap();
    assert_eq!(cell.word(), 0);
}

#[test]
fn test_wait_drained_timeout_names_slot_and_readers_and_stays_excluded() {
    let (cell, id) = attached(7);
    let a = cell.read(id.generation, Gpa(0x10_0000)).unwrap();
    let b = cell.read(id.generation, Gpa(0x10_1000)).unwrap();
    let mut ex = cell.exclude().unwrap();
    let bound = Duration::from_millis(20);
    let err = ex.wait_drained(bound).unwrap_err();
    match err {
        SlotLockError::DrainTimeout {
            slot: 7,
            readers: 2,
            waited,
            bound: b2,
        } => {
            assert!(waited >= bound, "returned early: {waited:?}");
            assert_eq!(b2, bound);
        }
        other => panic!("unexpected {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("slot 7") && msg.contains("2 reader"), "{msg}");
    assert!(cell.is_excluded() && cell.is_attached());
    assert!(cell.read(id.generation, Gpa(0x10_0000)).is_err());
    // The caller retries once the readers are gone.
    drop((a, b));
    assert_eq!(ex.wait_drained(bound).unwrap(), Duration::ZERO);
    ex.detach().unwrap();
}

#[test]
fn test_read_recycled_cell_other_generation_rejected() {
    let cell = SlotCell::new(9);
    let old = cell.attach(range(0x10_0000, 0x10_0000)).unwrap();
    let mut ex = cell.exclude().unwrap();
    ex.detach().unwrap();
    drop(ex);
    // Reattached for an overlapping range: coverage alone would accept.
    let new = cell.attach(range(0x18_0000, 0x10_0000)).unwrap();
    assert_ne!(old.generation, new.generation);
    assert_eq!(
        cell.read(old.generation, Gpa(0x18_0000)).unwrap_err(),
        SlotLockError::Stale {
            slot: 9,
            expected: old.generation,
            found: new.generation
        }
    );
    assert_eq!(cell.word(), MAP_REF, "the failed reader's reference leaked");
    assert!(cell.read(new.generation, Gpa(0x18_0000)).is_ok());
}

#[test]
fn test_read_gpa_outside_range_not_covered() {
    let (cell, id) = attached(3);
    let err = cell.read(id.generation, Gpa(0x20_0000)).unwrap_err();
    assert_eq!(
        err,
        SlotLockError::NotCovered {
            slot: 3,
            gpa: Gpa(0x20_0000),
            range: id.range
        }
    );
    assert_eq!(cell.word(), MAP_REF);
}

#[test]
fn test_detach_at_zero_readers_succeeds_and_allows_reattach() {
    let (cell, id) = attached(6);
    let mut ex = cell.exclude().unwrap();
    ex.detach().unwrap();
    assert_eq!(
        ex.detach().unwrap_err(),
        SlotLockError::Detached { slot: 6 }
    );
    drop(ex);
    assert_eq!(
        cell.word(),
        0,
        "dropping a detached exclusion must not touch the word"
    );
    assert_eq!(cell.identity(), None);
    assert_eq!(
        cell.read(id.generation, Gpa(0x10_0000)).unwrap_err(),
        SlotLockError::Detached { slot: 6 }
    );
    assert_eq!(
        cell.exclude().unwrap_err(),
        SlotLockError::Detached { slot: 6 }
    );
    assert!(cell.attach(id.range).is_ok());
}

#[test]
fn test_detach_with_reader_inside_not_drained() {
    let (cell, id) = attached(8);
    let guard = cell.read(id.generation, Gpa(0x10_0000)).unwrap();
    let mut ex = cell.exclude().unwrap();
    assert_eq!(
        ex.detach().unwrap_err(),
        SlotLockError::NotDrained {
            slot: 8,
            readers: 1
        }
    );
    assert!(cell.is_excluded());
    drop(guard);
    ex.detach().unwrap();
}

#[test]
fn test_exclude_twice_already_excluded() {
    let (cell, _) = attached(10);
    let _ex = cell.exclude().unwrap();
    assert_eq!(
        cell.exclude().unwrap_err(),
        SlotLockError::AlreadyExcluded { slot: 10 }
    );
}

#[test]
fn test_attach_attached_cell_already_attached() {
    let (cell, _) = attached(11);
    assert_eq!(
        cell.attach(range(0, 0x1000)).unwrap_err(),
        SlotLockError::AlreadyAttached { slot: 11, word: 1 }
    );
}

#[test]
fn test_reshape_drained_slot_bumps_generation() {
    let (cell, old) = attached(12);
    let mut ex = cell.exclude().unwrap();
    let new = ex.reshape(range(0x10_0000, 0x8000)).unwrap();
    drop(ex);
    assert_eq!(new.generation, old.generation + 1);
    assert!(matches!(
        cell.read(old.generation, Gpa(0x10_0000)),
        Err(SlotLockError::Stale { .. })
    ));
    assert!(matches!(
        cell.read(new.generation, Gpa(0x10_8000)),
        Err(SlotLockError::NotCovered { .. })
    ));
    // Every shard's copy of the identity moved, not only this thread's.
    for s in 0..SHARDS {
        assert!(
            matches!(
                cell.read_on(s, old.generation, Gpa(0x10_0000)),
                Err(SlotLockError::Stale { .. })
            ),
            "shard {s} kept the old identity"
        );
        assert_eq!(
            cell.read_on(s, new.generation, Gpa(0x10_7fff))
                .unwrap()
                .identity(),
            new,
            "shard {s}"
        );
    }
}

#[test]
fn test_attach_and_reattach_publish_identity_on_every_shard() {
    let (cell, first) = attached(22);
    for s in 0..SHARDS {
        let guard = cell.read_on(s, first.generation, Gpa(0x10_0000)).unwrap();
        assert_eq!(guard.identity(), first, "shard {s}");
    }
    let mut ex = cell.exclude().unwrap();
    ex.wait_drained(Duration::from_secs(1)).unwrap();
    ex.detach().unwrap();
    drop(ex);
    let second = cell.attach(range(0x40_0000, 0x1000)).unwrap();
    for s in 0..SHARDS {
        assert!(
            matches!(
                cell.read_on(s, first.generation, Gpa(0x10_0000)),
                Err(SlotLockError::Stale { .. })
            ),
            "shard {s} kept the old identity"
        );
        let guard = cell.read_on(s, second.generation, Gpa(0x40_0000)).unwrap();
        assert_eq!(guard.identity(), second, "shard {s}");
    }
}

#[test]
fn test_reshape_with_reader_inside_not_drained() {
    let (cell, id) = attached(13);
    let _guard = cell.read(id.generation, Gpa(0x10_0000)).unwrap();
    let mut ex = cell.exclude().unwrap();
    assert_eq!(
        ex.reshape(range(0, 0x1000)).unwrap_err(),
        SlotLockError::NotDrained {
            slot: 13,
            readers: 1
        }
    );
    assert_eq!(cell.identity(), Some(id));
}

#[test]
fn test_read_count_saturated_too_many_readers() {
    let (cell, id) = attached(14);
    for shard in &cell.shards {
        shard.refcnt.store(COUNT_MASK, Ordering::Relaxed);
    }
    assert_eq!(
        cell.read(id.generation, Gpa(0x10_0000)).unwrap_err(),
        SlotLockError::TooManyReaders {
            slot: 14,
            readers: COUNT_MASK - 1
        }
    );
    assert_eq!(cell.word(), COUNT_MASK);
}

#[test]
fn test_wait_drained_many_readers_threads_all_drain() {
    let cell = std::sync::Arc::new(attached(15).0);
    let generation = cell.identity().unwrap().generation;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (cell, stop) = (cell.clone(), stop.clone());
            thread::spawn(move || {
                let mut admitted = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(g) = cell.read(generation, Gpa(0x10_0000)) {
                        admitted += 1;
                        drop(g);
                    }
                }
                admitted
            })
        })
        .collect();
    for _ in 0..200 {
        let mut ex = cell.exclude().unwrap();
        ex.wait_drained(Duration::from_secs(5)).unwrap();
        assert_eq!(cell.word(), EXCLUDE | MAP_REF);
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    assert_eq!(cell.word(), MAP_REF);
}

/// The range a recycle test attaches for `generation`: alternating,
/// overlapping at 0x18_0000, so only the generation tells them apart.
fn range_for(generation: u64) -> GpaRange {
    if generation % 2 == 1 {
        range(0x10_0000, 0x10_0000)
    } else {
        range(0x18_0000, 0x10_0000)
    }
}

#[test]
fn test_read_racing_recycles_guard_matches_requested_identity() {
    use std::sync::atomic::{AtomicU32 as StdAtomicU32, AtomicU64 as StdAtomicU64};
    let cell = std::sync::Arc::new(SlotCell::new(16));
    // The "published snapshot": the generation readers look up.
    let snapshot = std::sync::Arc::new(StdAtomicU64::new(
        cell.attach(range_for(1)).unwrap().generation,
    ));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let admitted = std::sync::Arc::new(StdAtomicU32::new(0));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (cell, snapshot, stop, admitted) = (
                cell.clone(),
                snapshot.clone(),
                stop.clone(),
                admitted.clone(),
            );
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let generation = snapshot.load(Ordering::Acquire);
                    if let Ok(g) = cell.read(generation, Gpa(0x18_0000)) {
                        assert_eq!(g.generation(), generation);
                        assert_eq!(g.range(), range_for(generation));
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                    // Two spinning readers on a small machine would
                    // starve the writer's wake-up.
                    thread::yield_now();
                }
            })
        })
        .collect();
    // At least 100 recycles, and keep going (bounded) until readers have
    // really been admitted, so the test cannot pass vacuously on a
    // loaded machine.
    let started = std::time::Instant::now();
    let mut cycles = 0;
    while cycles < 100
        || (admitted.load(Ordering::Relaxed) < 20 && started.elapsed() < Duration::from_secs(20))
    {
        let mut ex = cell.exclude().unwrap();
        ex.wait_drained(Duration::from_secs(5)).unwrap();
        ex.detach().unwrap();
        drop(ex);
        let next = cell.generation() + 1;
        let id = cell.attach(range_for(next)).unwrap();
        assert_eq!(id.generation, next);
        // Publish late: readers meanwhile try the stale generation.
        thread::yield_now();
        snapshot.store(id.generation, Ordering::Release);
        thread::sleep(Duration::from_micros(50));
        cycles += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    assert!(
        admitted.load(Ordering::Relaxed) > 0,
        "no reader ever got in"
    );
    assert_eq!(cell.word(), MAP_REF);
}

// ---- Shards -------------------------------------------------------------

#[test]
fn test_current_shard_stable_per_thread_and_spread_over_threads() {
    assert_eq!(current_shard(), current_shard(), "stable per thread");
    // Round robin over threads (other tests start threads concurrently, so
    // consecutive threads here need not be neighbours, but cannot all share
    // one shard).
    let seen: std::collections::BTreeSet<usize> = (0..2 * SHARDS)
        .map(|_| thread::spawn(current_shard).join().unwrap())
        .collect();
    assert!(seen.iter().all(|&s| s < SHARDS), "{seen:?}");
    assert!(seen.len() > 1, "every thread on one shard: {seen:?}");
}

#[test]
fn test_readers_on_every_shard_all_counted_excluded_and_drained() {
    let (cell, id) = attached(20);
    let guards: Vec<_> = (0..SHARDS)
        .map(|s| cell.read_on(s, id.generation, Gpa(0x10_0000)).unwrap())
        .collect();
    assert_eq!(cell.readers(), SHARDS as u32);
    for (s, shard) in cell.shards.iter().enumerate() {
        assert_eq!(
            shard.refcnt.load(Ordering::Relaxed),
            MAP_REF + 1,
            "shard {s}"
        );
    }
    let mut ex = cell.exclude().unwrap();
    for s in 0..SHARDS {
        assert_eq!(
            cell.read_on(s, id.generation, Gpa(0x10_0000)).unwrap_err(),
            SlotLockError::Excluded { slot: 20 },
            "shard {s} admitted a reader after exclude"
        );
    }
    match ex.wait_drained(Duration::from_millis(10)).unwrap_err() {
        SlotLockError::DrainTimeout { readers, .. } => assert_eq!(readers, SHARDS as u32),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(
        ex.detach().unwrap_err(),
        SlotLockError::NotDrained {
            slot: 20,
            readers: SHARDS as u32
        }
    );
    // All but the last shard drained: still not drained, and a detach that
    // fails on the last shard puts the others back.
    let mut guards = guards;
    let last = guards.pop().unwrap();
    drop(guards);
    assert_eq!(
        ex.detach().unwrap_err(),
        SlotLockError::NotDrained {
            slot: 20,
            readers: 1
        }
    );
    assert!(cell.is_attached() && cell.is_excluded());
    assert_eq!(cell.readers(), 1);
    drop(last);
    assert_eq!(cell.word(), EXCLUDE | MAP_REF);
    ex.detach().unwrap();
    assert_eq!(cell.word(), 0);
}

#[test]
fn test_wait_drained_waits_for_the_last_shard_to_drain() {
    // Two readers on different shards leave one after the other; the writer
    // must wake for the first, see the second still inside, and park again.
    let cell = std::sync::Arc::new(attached(21).0);
    let generation = cell.identity().unwrap().generation;
    let (held_tx, held_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let go_rx = std::sync::Arc::new(std::sync::Mutex::new(go_rx));
    let readers: Vec<_> = (0..2)
        .map(|s| {
            let (cell, held_tx, go_rx) = (cell.clone(), held_tx.clone(), go_rx.clone());
            thread::spawn(move || {
                let guard = cell.read_on(s, generation, Gpa(0x10_0000)).unwrap();
                held_tx.send(()).unwrap();
                go_rx.lock().unwrap().recv().unwrap();
                drop(guard);
            })
        })
        .collect();
    held_rx.recv().unwrap();
    held_rx.recv().unwrap();
    let mut ex = cell.exclude().unwrap();
    let releaser = thread::spawn(move || {
        go_tx.send(()).unwrap();
        thread::sleep(Duration::from_millis(30));
        go_tx.send(()).unwrap();
    });
    let waited = ex.wait_drained(Duration::from_secs(5)).unwrap();
    assert!(
        waited >= Duration::from_millis(25),
        "woke before the last shard drained: {waited:?}"
    );
    assert_eq!(cell.readers(), 0);
    ex.detach().unwrap();
    releaser.join().unwrap();
    for r in readers {
        r.join().unwrap();
    }
}

#[test]
fn test_cell_layout_one_line_pair_per_shard_plus_one() {
    // Each shard (count word + identity copy) on its own 128-byte block, and
    // the rest (id, wait mutex, condvar) on one more: docs/guards.md's cost.
    assert_eq!(std::mem::align_of::<SlotCell>(), 128);
    assert_eq!(std::mem::size_of::<SlotCell>(), (SHARDS + 1) * 128);
}
