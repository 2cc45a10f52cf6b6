//! Shuttle models of the slot lock: larger than loom can exhaust (four
//! readers on three of the four shards, a writer going through several
//! detach/attach and reshape cycles), explored with randomized PCT schedules.
//! Shuttle runs schedules sequentially consistent, so these check the
//! protocol's logic (admission, drain, wake-up, identity); loom checks the
//! memory orderings on the small models.
//!
//! Run: `RUSTFLAGS="--cfg vmm_shuttle" cargo test -p vmm --lib --release shuttle`.
//!
//! The "memory" behind the slot is an atomic holding the generation of the
//! attachment it belongs to, or `DISCARDED` while the writer has it torn
//! down. A reader holding a guard for generation *g* must find *g* there.
use super::model_variants::{put_no_notify, read_check_then_inc};
use super::*;
use crate::mm::model_support::{self, pct};
use crate::mm::sync::{thread, Arc};
use std::time::Duration;

const GPA: Gpa = Gpa(0x18_0000);
const DISCARDED: u64 = u64::MAX;
/// Schedules for the real protocol, and for a broken variant (its bad
/// interleavings are narrow; a run stops at the first failure).
const ITERATIONS: usize = 10_000;
const BROKEN_ITERATIONS: usize = 50_000;

/// Guards taken per shard over all schedules of a run (the model is not
/// vacuous: readers on every shard do get in); one set per test, as tests
/// run in parallel.
type Admitted = [std::sync::atomic::AtomicUsize; 3];
static ADMITTED_REAL: Admitted = [const { std::sync::atomic::AtomicUsize::new(0) }; 3];
static ADMITTED_BROKEN: Admitted = [const { std::sync::atomic::AtomicUsize::new(0) }; 3];

fn range_a() -> GpaRange {
    GpaRange::new(Gpa(0x10_0000), 0x10_0000).unwrap()
}
fn range_b() -> GpaRange {
    GpaRange::new(Gpa(0x18_0000), 0x8_0000).unwrap()
}

struct Shared {
    cell: SlotCell,
    /// The memory: the generation it belongs to, or `DISCARDED`.
    mem: AtomicU64,
    /// The "published snapshot": the generation readers look for.
    published: AtomicU64,
}

/// How a reader gets in, and how a writer takes the slot (real or broken).
#[derive(Clone, Copy)]
struct Variant {
    read: for<'a> fn(&'a SlotCell, usize, u64, Gpa) -> Result<SlotReadGuard<'a>, SlotLockError>,
    reshape: fn(&mut SlotExclusion<'_>, GpaRange, u64),
    put: fn(SlotReadGuard<'_>),
}

const REAL: Variant = Variant {
    read: SlotCell::read_on,
    reshape: reshape_correct,
    put: put_correct,
};

fn put_correct(guard: SlotReadGuard<'_>) {
    drop(guard);
}

fn exclude_and_drain(cell: &SlotCell) -> SlotExclusion<'_> {
    let mut ex = cell.exclude().unwrap();
    ex.wait_drained(Duration::from_secs(3600)).unwrap();
    ex
}

/// BROKEN: a reshape that updates shard 0's copy of the identity only.
fn reshape_first_copy_only(ex: &mut SlotExclusion<'_>, range: GpaRange, generation: u64) {
    let shard = &ex.cell.shards[0];
    shard.generation.store(generation, Ordering::Relaxed);
    shard.start.store(range.start().0, Ordering::Relaxed);
    shard.len.store(range.len(), Ordering::Relaxed);
}

fn reshape_correct(ex: &mut SlotExclusion<'_>, range: GpaRange, generation: u64) {
    ex.reshape_as(range, generation).unwrap();
}

/// Four readers (shards 0, 1, 2 and 0 again), each taking three guards on
/// whatever generation is published, against a writer that re-protects
/// (reshape), unplugs and replugs (detach, attach) the slot twice, each
/// change under an exclusion drained of readers.
fn model(v: Variant, admitted: &'static Admitted) -> impl Fn() + Send + Sync + 'static {
    move || {
        let s = Arc::new(Shared {
            cell: SlotCell::new(7),
            mem: AtomicU64::new(0),
            published: AtomicU64::new(0),
        });
        let id = s.cell.attach(range_a()).unwrap();
        s.mem.store(id.generation, Ordering::SeqCst);
        s.published.store(id.generation, Ordering::SeqCst);

        let readers: Vec<_> = [0, 1, 2, 0]
            .into_iter()
            .map(|shard| {
                let s = s.clone();
                thread::spawn(move || {
                    for _ in 0..3 {
                        let generation = s.published.load(Ordering::SeqCst);
                        if let Ok(guard) = (v.read)(&s.cell, shard, generation, GPA) {
                            let found = s.mem.load(Ordering::SeqCst);
                            assert_eq!(
                                found,
                                guard.generation(),
                                "shard {shard}: guard on generation {} over memory of {found:#x}",
                                guard.generation()
                            );
                            admitted[shard].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            (v.put)(guard);
                        }
                        thread::yield_now();
                    }
                })
            })
            .collect();

        for round in 0..2 {
            // Re-protect in place: reshape under exclusion.
            let mut ex = exclude_and_drain(&s.cell);
            s.mem.store(DISCARDED, Ordering::SeqCst);
            let range = if round == 0 { range_b() } else { range_a() };
            let next = s.cell.generation() + 1;
            s.mem.store(next, Ordering::SeqCst);
            (v.reshape)(&mut ex, range, next);
            s.published.store(next, Ordering::SeqCst);
            drop(ex);

            // Unplug and replug: detach, discard, attach.
            let mut ex = exclude_and_drain(&s.cell);
            ex.detach().unwrap();
            drop(ex);
            s.mem.store(DISCARDED, Ordering::SeqCst);
            let next = s.cell.generation() + 1;
            s.mem.store(next, Ordering::SeqCst);
            let attached = s.cell.attach_as(range_a(), next).unwrap();
            s.published.store(attached.generation, Ordering::SeqCst);
        }

        for r in readers {
            r.join().unwrap();
        }
        assert_eq!(s.cell.word(), MAP_REF, "attached, no reader, not excluded");
    }
}

fn assert_caught(why: &str, f: impl Fn() + Send + Sync + 'static) {
    model_support::assert_caught(why, BROKEN_ITERATIONS, f);
}

#[test]
fn test_shuttle_slot_lock_readers_on_shards_vs_reshape_detach_attach_cycles() {
    pct(model(REAL, &ADMITTED_REAL), ITERATIONS);
    for (shard, n) in ADMITTED_REAL.iter().enumerate() {
        let n = n.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            n > ITERATIONS,
            "shard {shard}: only {n} guards in {ITERATIONS} schedules"
        );
    }
}

#[test]
fn test_shuttle_slot_lock_check_then_inc_reader_caught() {
    assert_caught(
        "over memory of",
        model(
            Variant {
                read: read_check_then_inc,
                ..REAL
            },
            &ADMITTED_BROKEN,
        ),
    );
}

#[test]
fn test_shuttle_slot_lock_reshape_of_one_identity_copy_caught() {
    // A reader on another shard, with the old generation, is let in over
    // the reshaped memory.
    assert_caught(
        "over memory of",
        model(
            Variant {
                reshape: reshape_first_copy_only,
                ..REAL
            },
            &ADMITTED_BROKEN,
        ),
    );
}

#[test]
fn test_shuttle_slot_lock_release_without_wakeup_caught() {
    assert_caught(
        "deadlock",
        model(
            Variant {
                put: put_no_notify,
                ..REAL
            },
            &ADMITTED_BROKEN,
        ),
    );
}
