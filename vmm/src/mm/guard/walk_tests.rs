//! Unit tests of [`GuestReader::walk`].
use std::ops::ControlFlow;
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

/// What a walk reported: a slot (id, part) or a hole, as (start, end).
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Slot { id: u32, start: u64, end: u64 },
    Hole { start: u64, end: u64 },
}

fn range(start: u64, end: u64) -> GpaRange {
    GpaRange::from_bounds(Gpa(start), Gpa(end)).unwrap()
}

fn slot(id: u32, start: u64, end: u64) -> Seen {
    Seen::Slot { id, start, end }
}

fn hole(start: u64, end: u64) -> Seen {
    Seen::Hole { start, end }
}

fn seen(visit: &Visit<'_, '_>) -> Seen {
    match visit {
        Visit::Slot { slot, part } => Seen::Slot {
            id: slot.slot_id(),
            start: part.start().0,
            end: part.end().0,
        },
        Visit::Hole(h) => Seen::Hole {
            start: h.start().0,
            end: h.end().0,
        },
    }
}

/// Slots of one page each at `BASE + i * P` for every `i` in `pages`, each
/// backed by its own page of one mapping, holding the word `i` at its start.
fn pages_plugged(pages: &[u64]) -> (Arc<HostMapping>, GuardedMap) {
    let mem = Arc::new(HostMapping::new(&BackingKind::Anon, 64 * P).unwrap());
    let g = GuardedMap::new(SlotMap::new(SlotMapConfig {
        max_slots: 200,
        ..SlotMapConfig::default()
    }));
    for &i in pages {
        // A host page between slots, so the map does not merge neighbours.
        g.apply(
            |m| {
                m.plug(
                    Gpa(BASE + i * P),
                    P,
                    mem.clone(),
                    2 * i * P,
                    SlotFlags::NONE,
                )
            },
            BOUND,
        )
        .unwrap();
        let guard = g.try_acquire(Gpa(BASE + i * P)).unwrap();
        guard.write_u64(Gpa(BASE + i * P), i).unwrap();
    }
    (mem, g)
}

/// Takes every announcement entry of `g`: walks count every slot while the
/// result lives (the tests of counted batches).
fn counting(g: &GuardedMap) -> Vec<announce::Claim<'_>> {
    std::iter::from_fn(|| g.walks.claim()).collect()
}

fn id_at(g: &GuardedMap, page: u64) -> u32 {
    g.load().lookup(Gpa(BASE + page * P)).unwrap().id().0
}

fn walk_all(g: &GuardedMap, r: GpaRange) -> Vec<Seen> {
    let mut out = Vec::new();
    let flow = g.reader().walk(r, |v| {
        out.push(seen(&v));
        ControlFlow::<()>::Continue(())
    });
    assert_eq!(flow, Ok(ControlFlow::Continue(())));
    out
}

#[test]
fn test_walk_visits_the_slots_of_a_range_in_order_and_reports_holes() {
    let (_mem, g) = pages_plugged(&[1, 2, 4, 7]);
    let ids: Vec<u32> = [1, 2, 4, 7].iter().map(|&p| id_at(&g, p)).collect();
    let at = |page: u64| BASE + page * P;
    // From inside a hole to the middle of the last slot.
    let walked = walk_all(&g, range(at(0) + 8, at(7) + 16));
    assert_eq!(
        walked,
        [
            hole(at(0) + 8, at(1)),
            slot(ids[0], at(1), at(2)),
            slot(ids[1], at(2), at(3)),
            hole(at(3), at(4)),
            slot(ids[2], at(4), at(5)),
            hole(at(5), at(7)),
            slot(ids[3], at(7), at(7) + 16),
        ]
    );
    // From the middle of a slot to past the last one.
    let walked = walk_all(&g, range(at(2) + 8, at(9)));
    assert_eq!(
        walked,
        [
            slot(ids[1], at(2) + 8, at(3)),
            hole(at(3), at(4)),
            slot(ids[2], at(4), at(5)),
            hole(at(5), at(7)),
            slot(ids[3], at(7), at(8)),
            hole(at(8), at(9)),
        ]
    );
    // Nothing plugged: one hole.
    assert_eq!(walk_all(&g, range(at(10), at(12))), [hole(at(10), at(12))]);
}

#[test]
fn test_walk_guards_each_slot_while_visited_and_translates_like_acquire() {
    let (_mem, g) = pages_plugged(&[0, 1, 3]);
    let _counting = counting(&g);
    let mut reader = g.reader();
    let mut words = Vec::new();
    let flow = reader.walk(range(BASE, BASE + 4 * P), |v| {
        if let Visit::Slot { slot, part } = v {
            let cell = g.cells().get(slot.slot_id()).unwrap();
            assert_eq!(cell.readers(), 1, "the visited slot is held");
            let acquired = g.try_acquire(part.start()).unwrap();
            assert_eq!(slot.hva(part.start(), P), acquired.hva(part.start(), P));
            assert_eq!(slot.generation(), acquired.generation());
            words.push(slot.read_u64(part.start()).unwrap());
        }
        ControlFlow::<()>::Continue(())
    });
    assert_eq!(flow, Ok(ControlFlow::Continue(())));
    assert_eq!(words, [0, 1, 3]);
    for id in g.cells().attached() {
        assert_eq!(
            g.cells().get(id).unwrap().readers(),
            0,
            "slot {id} released"
        );
    }
}

#[test]
fn test_walk_stops_where_the_visitor_breaks_and_releases_the_slot() {
    let (_mem, g) = pages_plugged(&[0, 1, 2]);
    let mut visited = 0;
    let flow = g.reader().walk(range(BASE, BASE + 3 * P), |v| {
        visited += 1;
        match v {
            Visit::Slot { slot, .. } if visited == 2 => ControlFlow::Break(slot.slot_id()),
            _ => ControlFlow::Continue(()),
        }
    });
    assert_eq!(flow, Ok(ControlFlow::Break(id_at(&g, 1))));
    assert_eq!(visited, 2);
    assert_eq!(g.cells().get(id_at(&g, 1)).unwrap().readers(), 0);
}

#[test]
fn test_walk_refuses_an_excluded_slot_as_acquire_does() {
    let (_mem, g) = pages_plugged(&[0, 1, 2]);
    let victim = id_at(&g, 1);
    // A writer that excluded slot 1 and never came back.
    let t = g.load().unplug(Gpa(BASE + P), P).unwrap();
    std::mem::forget(g.exclude(&t.changes, BOUND).unwrap());
    let bound = Duration::from_millis(50);
    let acquired = g.reader().acquire_within(Gpa(BASE + P), bound);
    assert!(
        matches!(acquired, Err(GuardError::Stuck { slot, .. }) if slot == victim),
        "{acquired:?}"
    );
    let mut walked = Vec::new();
    let started = Instant::now();
    let flow = g
        .reader()
        .walk_within(range(BASE, BASE + 3 * P), bound, |v| {
            walked.push(seen(&v));
            ControlFlow::<()>::Continue(())
        });
    match flow {
        Err(GuardError::Stuck { gpa, slot, .. }) => {
            assert_eq!((gpa, slot), (Gpa(BASE + P), victim));
        }
        other => panic!("the walk went past an excluded slot: {other:?}"),
    }
    assert_eq!(walked, [slot(id_at(&g, 0), BASE, BASE + P)]);
    assert!(started.elapsed() < Duration::from_secs(2), "bounded");
}

/// Pages `0..n` plugged as one-page slots, where `n` is more than a walk
/// admits at once: the last slot is past the first batch.
fn beyond_batch() -> (Arc<HostMapping>, GuardedMap, u64) {
    let n = walk::WALK_BATCH as u64 + 4;
    let pages: Vec<u64> = (0..n).collect();
    let (mem, g) = pages_plugged(&pages);
    (mem, g, n)
}

#[test]
fn test_walk_does_not_visit_a_slot_deleted_after_its_snapshot() {
    let (_mem, g, n) = beyond_batch();
    let _counting = counting(&g);
    let last = BASE + (n - 1) * P;
    let mut walked = Vec::new();
    let flow = g.reader().walk(range(BASE, BASE + n * P), |v| {
        walked.push(seen(&v));
        if walked.len() == 1 {
            // While the first slot is visited (the walk holds its snapshot
            // and its first batch), another thread unplugs the last slot,
            // which the walk has not admitted: excluded, detached, its memory
            // discarded.
            thread::scope(|s| {
                s.spawn(|| g.apply(|m| m.unplug(Gpa(last), P), BOUND))
                    .join()
                    .unwrap()
                    .unwrap();
            });
        }
        ControlFlow::<()>::Continue(())
    });
    assert_eq!(flow, Ok(ControlFlow::Continue(())));
    assert_eq!(walked.len() as u64, n);
    assert_eq!(walked.last(), Some(&hole(last, last + P)));
    for (i, w) in walked.iter().take(n as usize - 1).enumerate() {
        assert!(
            matches!(w, Seen::Slot { start, .. } if *start == BASE + i as u64 * P),
            "{w:?}"
        );
    }
}

#[test]
fn test_walk_steps_back_from_an_admitted_slot_a_writer_then_excludes() {
    let (_mem, g) = pages_plugged(&[0, 1, 2]);
    let _counting = counting(&g);
    let ids: Vec<u32> = (0..3).map(|p| id_at(&g, p)).collect();
    let victim = g.cells().get(ids[2]).unwrap();
    let mut walked = Vec::new();
    thread::scope(|s| {
        let mut writer = None;
        let flow = g.reader().walk(range(BASE, BASE + 3 * P), |v| {
            walked.push(seen(&v));
            if walked.len() == 1 {
                // The walk has admitted all three slots. A writer unplugs
                // the third: it excludes it, then waits for the walk's
                // reference to drain.
                writer = Some(s.spawn(|| g.apply(|m| m.unplug(Gpa(BASE + 2 * P), P), BOUND)));
                let deadline = Instant::now() + BOUND;
                while !victim.is_excluded() {
                    assert!(Instant::now() < deadline, "the writer never excluded");
                    thread::yield_now();
                }
            }
            ControlFlow::<()>::Continue(())
        });
        assert_eq!(flow, Ok(ControlFlow::Continue(())));
        writer.unwrap().join().unwrap().unwrap();
    });
    // The third slot was admitted before the exclusion but never visited
    // after it: the walk let it go, waited for the op, and found a hole.
    assert_eq!(
        walked,
        [
            slot(ids[0], BASE, BASE + P),
            slot(ids[1], BASE + P, BASE + 2 * P),
            hole(BASE + 2 * P, BASE + 3 * P),
        ]
    );
}

#[test]
fn test_walk_visits_a_recycled_slot_with_its_new_memory() {
    let (_mem, g, n) = beyond_batch();
    let _counting = counting(&g);
    let last = BASE + (n - 1) * P;
    let other = Arc::new(HostMapping::new(&BackingKind::Anon, P).unwrap());
    let old_id = id_at(&g, n - 1);
    let mut words = Vec::new();
    let flow = g.reader().walk(range(BASE, BASE + n * P), |v| {
        if let Visit::Slot { slot, part } = v {
            words.push(slot.read_u64(part.start()).unwrap());
            if words.len() == 1 {
                // The last slot goes and a slot with other memory takes its
                // place (and its id) before the walk, on the old snapshot,
                // gets there.
                thread::scope(|s| {
                    s.spawn(|| {
                        g.apply(|m| m.unplug(Gpa(last), P), BOUND).unwrap();
                        g.apply(
                            |m| m.plug(Gpa(last), P, other.clone(), 0, SlotFlags::NONE),
                            BOUND,
                        )
                        .unwrap();
                        let fresh = g.try_acquire(Gpa(last)).unwrap();
                        assert_eq!(fresh.slot_id(), old_id, "the id is reused");
                        fresh.write_u64(Gpa(last), 0xa11ce).unwrap();
                    });
                });
            }
        }
        ControlFlow::<()>::Continue(())
    });
    assert_eq!(flow, Ok(ControlFlow::Continue(())));
    // Not the old slot's discarded page (0), nor its old word.
    let expected: Vec<u64> = (0..n - 1).chain([0xa11ce]).collect();
    assert_eq!(words, expected);
}

#[test]
fn test_walk_waits_for_the_op_excluding_a_slot_and_sees_its_result() {
    let (_mem, g) = pages_plugged(&[0, 1, 2]);
    let ids: Vec<u32> = (0..3).map(|p| id_at(&g, p)).collect();
    let t = g.load().unplug(Gpa(BASE + P), P).unwrap();
    let excluded = Barrier::new(2);
    thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut w = g.shared().begin_write();
            let ex = g.exclude(&t.changes, BOUND).unwrap();
            excluded.wait();
            thread::sleep(Duration::from_millis(40));
            ex.commit(&t.changes)
                .unwrap()
                .publish(&mut w, t.map.clone());
        });
        excluded.wait();
        let started = Instant::now();
        let walked = walk_all(&g, range(BASE, BASE + 3 * P));
        assert!(
            started.elapsed() >= Duration::from_millis(20),
            "the walk did not wait for the op"
        );
        assert_eq!(
            walked,
            [
                slot(ids[0], BASE, BASE + P),
                hole(BASE + P, BASE + 2 * P),
                slot(ids[2], BASE + 2 * P, BASE + 3 * P),
            ]
        );
        writer.join().unwrap();
    });
}

#[test]
fn test_an_unplug_of_a_slot_an_announced_walk_holds_gives_up_and_changes_nothing() {
    let (_mem, g) = pages_plugged(&[0, 1, 2]);
    let mut refused = None;
    let flow = g.reader().walk(range(BASE, BASE + 3 * P), |v| {
        if let Visit::Slot { part, .. } = v {
            if part.start().0 == BASE {
                // The walk announced all three slots: deleting the third
                // must wait for it, and gives up at its bound.
                refused = Some(
                    g.apply(
                        |m| m.unplug(Gpa(BASE + 2 * P), P),
                        Duration::from_millis(20),
                    )
                    .unwrap_err(),
                );
            }
        }
        ControlFlow::<()>::Continue(())
    });
    assert_eq!(flow, Ok(ControlFlow::Continue(())));
    let err = refused.unwrap();
    assert!(
        err.to_string().contains("1 reader(s) still hold it"),
        "{err}"
    );
    // Nothing changed, and the walk is over: the unplug goes through now.
    assert_eq!(g.load().iter().count(), 3);
    g.apply(|m| m.unplug(Gpa(BASE + 2 * P), P), BOUND).unwrap();
}

#[test]
fn test_a_writer_waits_for_an_announced_walk_which_never_sees_the_memory_go() {
    let (_mem, g) = pages_plugged(&[0, 1, 2]);
    let visited = Barrier::new(2);
    thread::scope(|s| {
        let writer = s.spawn(|| {
            visited.wait();
            g.apply(|m| m.unplug(Gpa(BASE + 2 * P), P), BOUND).unwrap();
            Instant::now()
        });
        let mut words = Vec::new();
        let mut last_visit = None;
        let flow = g.reader().walk(range(BASE, BASE + 3 * P), |v| {
            if let Visit::Slot { slot, part } = v {
                if part.start().0 == BASE {
                    visited.wait();
                    // The writer is excluding the third slot meanwhile.
                    thread::sleep(Duration::from_millis(30));
                }
                words.push(slot.read_u64(part.start()).unwrap());
                last_visit = Some(Instant::now());
            }
            ControlFlow::<()>::Continue(())
        });
        assert_eq!(flow, Ok(ControlFlow::Continue(())));
        // Every slot was visited with its memory: the discard waited.
        assert_eq!(words, [0, 1, 2]);
        let unplugged = writer.join().unwrap();
        assert!(
            unplugged > last_visit.unwrap(),
            "the unplug did not wait for the walk"
        );
    });
    assert!(g.load().lookup(Gpa(BASE + 2 * P)).is_none());
}

#[test]
fn test_after_a_writer_panicked_mid_op_walks_stay_out_of_its_slots_for_good() {
    let (_mem, g) = pages_plugged(&[0, 1, 2]);
    let t = g.load().unplug(Gpa(BASE + P), P).unwrap();
    thread::scope(|s| {
        let panicked = s
            .spawn(|| {
                let _w = g.shared().begin_write();
                let _ex = g.exclude(&t.changes, BOUND).unwrap();
                panic!("a writer dies between excluding and committing");
            })
            .join();
        assert!(panicked.is_err());
    });
    // A later op deletes another slot and publishes: the gate must not
    // reopen over the slot the dead writer left excluded.
    g.apply(|m| m.unplug(Gpa(BASE + 2 * P), P), BOUND).unwrap();
    let err = g
        .reader()
        .walk_within(range(BASE, BASE + 2 * P), Duration::from_millis(30), |_| {
            ControlFlow::<()>::Continue(())
        })
        .unwrap_err();
    assert!(
        matches!(err, GuardError::Stuck { slot, .. } if slot == id_at(&g, 1)),
        "{err:?}"
    );
}

#[test]
fn test_walk_announces_every_slot_with_a_free_entry_and_counts_every_slot_without() {
    // Past several announcement spans, and a hole after the last slot.
    let n = 3 * ANNOUNCE_BATCH as u64 + 5;
    let g = GuardedMap::new(SlotMap::new(SlotMapConfig::default()));
    let mem = Arc::new(HostMapping::new(&BackingKind::Anon, 2 * n * P).unwrap());
    let plugs = crate::mm::slot_map::PlugSpec::apart(&mem, Gpa(BASE), n, 1);
    g.apply(|m| m.plug_many(plugs), BOUND).unwrap();
    let whole = range(BASE, BASE + (n + 1) * P);
    let walk = |g: &GuardedMap| {
        let (mut announced, mut counted, mut holes) = (0, 0, 0);
        let flow = g.reader().walk(whole, |v| {
            match v {
                Visit::Slot { slot, .. } if slot.is_announced() => announced += 1,
                Visit::Slot { .. } => counted += 1,
                Visit::Hole(_) => holes += 1,
            }
            ControlFlow::<()>::Continue(())
        });
        assert_eq!(flow, Ok(ControlFlow::Continue(())));
        (announced, counted, holes)
    };
    assert_eq!(walk(&g), (n, 0, 1));
    let taken = counting(&g);
    assert_eq!(walk(&g), (0, n, 1));
    drop(taken);
}

#[test]
fn test_walk_visits_a_slot_plugged_into_a_hole_ahead_of_it_after_its_snapshot() {
    // Slots at pages 1 and 3, holes at 0 and 2. While the walk visits page
    // 1's slot, another thread plugs page 2: that hole is not reported (the
    // map the walk holds is no longer the published one, and the hole at
    // 0, reported before, does not vouch for it), and the walk goes on
    // with the newer map and visits the new slot. Announced (the walk's
    // own entry) and counted (every entry taken).
    for count in [false, true] {
        let (mem, g) = pages_plugged(&[1, 3]);
        let taken = count.then(|| counting(&g));
        let at = |page: u64| BASE + page * P;
        let mut out = Vec::new();
        let flow = g.reader().walk(range(at(0), at(4)), |v| {
            out.push(seen(&v));
            if out.len() == 2 {
                thread::scope(|s| {
                    s.spawn(|| {
                        let plug = |m: &SlotMap| {
                            m.plug(Gpa(at(2)), P, mem.clone(), 4 * P, SlotFlags::NONE)
                        };
                        g.apply(plug, BOUND).unwrap();
                    });
                });
            }
            ControlFlow::<()>::Continue(())
        });
        assert_eq!(flow, Ok(ControlFlow::Continue(())));
        let ids: Vec<u32> = [1, 2, 3].iter().map(|&p| id_at(&g, p)).collect();
        assert_eq!(
            out,
            [
                hole(at(0), at(1)),
                slot(ids[0], at(1), at(2)),
                slot(ids[1], at(2), at(3)),
                slot(ids[2], at(3), at(4)),
            ],
            "counted: {count}"
        );
        drop(taken);
    }
}
