//! Loom models of the slot lock's properties. Each model has a deliberately
//! broken variant, and a test asserting the model catches it.
use super::model_variants::{put_no_notify, read_check_then_inc};
use super::*;
use crate::mm::model_support::panic_message;
use crate::mm::sync::{thread, Arc};
use loom::cell::UnsafeCell;
use loom::model::Builder;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

/// Effectively unbounded (loom does not model timeouts anyway).
const LONG: Duration = Duration::from_secs(3600);
const GPA: Gpa = Gpa(0x18_0000);
const MAPPED: u64 = 1;
const DISCARDED: u64 = 2;

fn range_a() -> GpaRange {
    GpaRange::new(Gpa(0x10_0000), 0x10_0000).unwrap()
}
fn range_b() -> GpaRange {
    GpaRange::new(Gpa(0x18_0000), 0x10_0000).unwrap()
}

/// A slot cell and the "host memory" behind it. Loom flags any access to
/// `mem` not ordered by happens-before with the writer's discard.
struct Shared {
    cell: SlotCell,
    mem: UnsafeCell<u64>,
}

fn shared() -> (Arc<Shared>, SlotIdentity) {
    let s = Arc::new(Shared {
        cell: SlotCell::new(1),
        mem: UnsafeCell::new(MAPPED),
    });
    let id = s.cell.attach(range_a()).unwrap();
    (s, id)
}

fn read_mem(s: &Shared) -> u64 {
    // SAFETY: loom's cell checks this read against concurrent writes.
    s.mem.with(|p| unsafe { *p })
}

fn discard_mem(s: &Shared, value: u64) {
    // SAFETY: loom's cell checks this write against concurrent accesses.
    s.mem.with_mut(|p| unsafe { *p = value })
}

/// Runs a model with a preemption bound; returns how many executions
/// loom explored.
fn check(bound: usize, f: impl Fn() + Sync + Send + 'static) -> usize {
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = runs.clone();
    let mut b = Builder::new();
    b.preemption_bound = Some(bound);
    b.check(move || {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        f();
    });
    runs.load(std::sync::atomic::Ordering::Relaxed)
}

/// Asserts that a correct model explored more than one interleaving.
fn check_explores(bound: usize, f: impl Fn() + Sync + Send + 'static) {
    let runs = check(bound, f);
    assert!(runs > 1, "loom explored only {runs} execution(s)");
}

/// Asserts that the model fails, with a panic message containing `why`.
fn assert_caught(bound: usize, why: &str, f: impl Fn() + Sync + Send + 'static) {
    assert_caught_any(bound, &[why], f);
}

/// Asserts that the model fails, with a panic message containing one of
/// `whys` (a race loom may report as a data race or as a failed assertion,
/// depending on which interleaving it explores first).
fn assert_caught_any(bound: usize, whys: &[&str], f: impl Fn() + Sync + Send + 'static) {
    let payload = catch_unwind(AssertUnwindSafe(|| check(bound, f)))
        .expect_err("loom did not catch the broken variant");
    let msg = panic_message(&*payload);
    assert!(
        whys.iter().any(|why| msg.contains(why)),
        "caught for another reason: {msg}"
    );
}

/// A reader's way in: cell, shard, generation, address.
type ReadFn = for<'a> fn(&'a SlotCell, usize, u64, Gpa) -> Result<SlotReadGuard<'a>, SlotLockError>;
/// A writer's exclusion, returned once the readers inside drained.
type ExcludeFn = for<'a> fn(&'a SlotCell) -> SlotExclusion<'a>;
type PutFn = fn(SlotReadGuard<'_>);

/// BROKEN: increments without re-validating the identity afterwards.
fn read_no_revalidate(
    cell: &SlotCell,
    shard: usize,
    _generation: u64,
    _gpa: Gpa,
) -> Result<SlotReadGuard<'_>, SlotLockError> {
    cell.get_ref(shard)?;
    Ok(SlotReadGuard {
        cell,
        shard,
        identity: cell.load_identity(shard),
    })
}

fn exclude_and_drain(cell: &SlotCell) -> SlotExclusion<'_> {
    let mut ex = cell.exclude().unwrap();
    ex.wait_drained(LONG).unwrap();
    ex
}

/// BROKEN: excludes and drains shard 0 only, as if the cell still had one
/// count word.
fn exclude_and_drain_first_shard_only(cell: &SlotCell) -> SlotExclusion<'_> {
    cell.exclude_shard(&cell.shards[0]).unwrap();
    while cell.shards[0].refcnt.load(Ordering::Acquire) != EXCLUDE | MAP_REF {
        thread::yield_now();
    }
    SlotExclusion {
        cell,
        detached: false,
    }
}

fn put_correct(guard: SlotReadGuard<'_>) {
    drop(guard);
}

/// BROKEN: notifies without taking the wait mutex (classic lost wake-up).
fn put_notify_unlocked(guard: SlotReadGuard<'_>) {
    let (cell, shard) = (guard.cell, guard.shard);
    std::mem::forget(guard);
    if cell.shards[shard].refcnt.fetch_sub(1, Ordering::Release) == EXCLUDE | (MAP_REF + 1) {
        cell.drained.notify_one();
    }
}

/// BROKEN: publishes the count before the identity.
fn attach_count_first(cell: &SlotCell, range: GpaRange) -> SlotIdentity {
    for shard in &cell.shards {
        shard.refcnt.store(MAP_REF, Ordering::Release);
    }
    let generation = cell.generation().wrapping_add(1);
    cell.publish_identity(range, generation)
}

fn attach_correct(cell: &SlotCell, range: GpaRange) -> SlotIdentity {
    cell.attach(range).unwrap()
}

/// Spawns one reader thread per entry of `shards`, running `body` on the
/// shared state with that count-word shard (`0..n`: readers on different
/// shards, `SHARDS` being 2 under loom).
fn spawn_readers(
    s: &Arc<Shared>,
    shards: impl IntoIterator<Item = usize>,
    body: impl Fn(&Shared, usize) + Send + Sync + Copy + 'static,
) -> Vec<thread::JoinHandle<()>> {
    shards
        .into_iter()
        .map(|shard| {
            let s = Arc::clone(s);
            thread::spawn(move || body(&s, shard % SHARDS))
        })
        .collect()
}

fn join(readers: Vec<thread::JoinHandle<()>>) {
    for r in readers {
        r.join().unwrap();
    }
}

// ---- Model 1: no reader admitted after exclude ------------------------
// The writer excludes, drains, then discards the memory while it holds
// the exclusion (and restores it, like a re-protect). A reader that got a
// guard reads the memory: loom flags the read if it is not ordered with
// the discard, and the word must show no reader inside the exclusion.
// Readers on both shards.
fn exclude_model(read: ReadFn, exclude: ExcludeFn, n: usize) -> impl Fn() + Sync + Send + 'static {
    move || {
        let (s, id) = shared();
        // Not dropped while unwinding from a caught failure (see model 2).
        let s = std::mem::ManuallyDrop::new(s);
        let readers = spawn_readers(&s, 0..n, move |s, shard| {
            if let Ok(guard) = read(&s.cell, shard, id.generation, GPA) {
                assert_eq!(read_mem(s), MAPPED, "reader admitted into discarded memory");
                drop(guard);
            }
        });
        {
            let _ex = exclude(&s.cell);
            discard_mem(&s, DISCARDED);
            discard_mem(&s, MAPPED);
            assert_eq!(s.cell.readers(), 0, "reader inside an exclusion");
        }
        join(readers);
        assert_eq!(s.cell.word(), MAP_REF);
        drop(std::mem::ManuallyDrop::into_inner(s));
    }
}

#[test]
fn test_loom_exclude_admits_no_reader() {
    check_explores(3, exclude_model(SlotCell::read_on, exclude_and_drain, 2));
}

#[test]
fn test_loom_exclude_check_then_inc_reader_caught() {
    assert_caught(
        3,
        "Causality violation",
        exclude_model(read_check_then_inc, exclude_and_drain, 1),
    );
}

#[test]
fn test_loom_exclude_of_one_shard_caught() {
    // Reader 1 is on shard 1, which this writer neither closes nor drains.
    assert_caught_any(
        3,
        &["Causality violation", "reader inside an exclusion"],
        exclude_model(SlotCell::read_on, exclude_and_drain_first_shard_only, 2),
    );
}

// ---- Model 2: no lost wake-up -------------------------------------------
// The writer parks until the last reader leaves; loom reports a deadlock
// if the wake-up is lost (loom's wait_timeout never times out).
fn wakeup_model(put: PutFn, n: usize) -> impl Fn() + Sync + Send + 'static {
    move || {
        let (s, id) = shared();
        // Not dropped while unwinding from loom's deadlock panic: a loom
        // object touched after the execution aborted panics again.
        let s = std::mem::ManuallyDrop::new(s);
        let readers = spawn_readers(&s, 0..n, move |s, shard| {
            if let Ok(guard) = s.cell.read_on(shard, id.generation, GPA) {
                put(guard);
            }
        });
        let mut ex = s.cell.exclude().unwrap();
        ex.wait_drained(LONG).unwrap();
        ex.detach().unwrap();
        drop(ex);
        join(readers);
        drop(std::mem::ManuallyDrop::into_inner(s));
    }
}

#[test]
fn test_loom_wait_drained_no_lost_wakeup() {
    check_explores(3, wakeup_model(put_correct, 2));
}

#[test]
fn test_loom_wait_drained_release_without_notify_caught() {
    assert_caught(3, "deadlock", wakeup_model(put_no_notify, 1));
}

#[test]
fn test_loom_wait_drained_notify_without_lock_caught() {
    assert_caught(3, "deadlock", wakeup_model(put_notify_unlocked, 1));
}

// ---- Model 3: detach only at zero ---------------------------------------
// Readers race a writer that detaches and then frees the memory.
fn detach_model(wait_first: bool, n: usize) -> impl Fn() + Sync + Send + 'static {
    move || {
        let (s, id) = shared();
        let readers = spawn_readers(&s, 0..n, move |s, shard| {
            if let Ok(guard) = s.cell.read_on(shard, id.generation, GPA) {
                assert_eq!(read_mem(s), MAPPED, "reader inside a detached slot");
                drop(guard);
            }
        });
        let mut ex = s.cell.exclude().unwrap();
        if wait_first {
            ex.wait_drained(LONG).unwrap();
            ex.detach().unwrap();
        } else {
            // BROKEN: a detach that does not wait for readers.
            for shard in &s.cell.shards {
                shard.refcnt.store(0, Ordering::Release);
            }
            ex.detached = true;
        }
        drop(ex);
        discard_mem(&s, DISCARDED);
        assert_eq!(
            s.cell.read(id.generation, GPA).unwrap_err(),
            SlotLockError::Detached { slot: 1 }
        );
        join(readers);
        assert_eq!(s.cell.word(), 0);
    }
}

#[test]
fn test_loom_detach_only_at_zero() {
    check_explores(3, detach_model(true, 2));
}

#[test]
fn test_loom_detach_without_drain_caught() {
    assert_caught(3, "Causality violation", detach_model(false, 1));
}

// ---- Model 4: recycle race ----------------------------------------------
// A reader with a snapshot of attachment A (gen g1) races a writer that
// detaches the cell, replaces the memory, and reattaches it for an
// overlapping range B (gen g1 + 1). A guard must match the snapshot the
// reader asked with, and the memory it sees must be that attachment's.
// With `with_new_reader`, a second reader asks for B's generation.
fn recycle_model(
    read: ReadFn,
    attach: fn(&SlotCell, GpaRange) -> SlotIdentity,
    with_new_reader: bool,
) -> impl Fn() + Sync + Send + 'static {
    move || {
        let (s, a) = shared();
        let mut readers = spawn_readers(&s, [0], move |s, shard| {
            if let Ok(guard) = read(&s.cell, shard, a.generation, GPA) {
                assert_eq!(guard.identity(), a, "guard for the wrong identity");
                assert_eq!(read_mem(s), MAPPED, "guard over another slot's memory");
                drop(guard);
            }
        });
        if with_new_reader {
            readers.extend(spawn_readers(&s, [1], move |s, shard| {
                if let Ok(guard) = read(&s.cell, shard, a.generation + 1, GPA) {
                    assert_eq!(guard.range(), range_b(), "guard for the wrong identity");
                    assert_eq!(read_mem(s), DISCARDED, "guard over another slot's memory");
                    drop(guard);
                }
            }));
        }
        let mut ex = s.cell.exclude().unwrap();
        ex.wait_drained(LONG).unwrap();
        ex.detach().unwrap();
        drop(ex);
        discard_mem(&s, DISCARDED); // B's memory replaces A's
        let b = attach(&s.cell, range_b());
        assert_eq!(b.generation, a.generation + 1);
        join(readers);
    }
}

#[test]
fn test_loom_recycle_never_yields_wrong_identity() {
    check_explores(3, recycle_model(SlotCell::read_on, attach_correct, true));
}

#[test]
fn test_loom_recycle_without_revalidation_caught() {
    assert_caught(
        3,
        "guard for the wrong identity",
        recycle_model(read_no_revalidate, attach_correct, false),
    );
}

#[test]
fn test_loom_recycle_attach_count_before_identity_caught() {
    assert_caught(
        3,
        "guard over another slot's memory",
        recycle_model(SlotCell::read_on, attach_count_first, false),
    );
}

// ---- Model 5: detach without a prior drain --------------------------------
// Readers on both shards race a writer that excludes and detaches at once:
// detach must refuse while any shard has a reader (putting back the shards
// it already zeroed), and succeed only after the drain. The memory is
// discarded right after the successful detach.
type DetachFn = fn(&mut SlotExclusion<'_>) -> Result<(), SlotLockError>;

fn detach_correct(ex: &mut SlotExclusion<'_>) -> Result<(), SlotLockError> {
    ex.detach()
}

/// BROKEN: checks shard 0 only, then zeroes the others.
fn detach_checking_first_shard_only(ex: &mut SlotExclusion<'_>) -> Result<(), SlotLockError> {
    let cell = ex.cell;
    cell.shards[0]
        .refcnt
        .compare_exchange(EXCLUDE | MAP_REF, 0, Ordering::AcqRel, Ordering::Acquire)
        .map_err(|word| SlotLockError::NotDrained {
            slot: cell.id,
            readers: readers_in(word),
        })?;
    for shard in &cell.shards[1..] {
        shard.refcnt.store(0, Ordering::Release);
    }
    ex.detached = true;
    Ok(())
}

fn early_detach_model(detach: DetachFn) -> impl Fn() + Sync + Send + 'static {
    move || {
        let (s, id) = shared();
        // Not dropped while unwinding from a caught failure (see model 2).
        let s = std::mem::ManuallyDrop::new(s);
        let readers = spawn_readers(&s, 0..2, move |s, shard| {
            if let Ok(guard) = s.cell.read_on(shard, id.generation, GPA) {
                assert_eq!(read_mem(s), MAPPED, "reader inside a detached slot");
                drop(guard);
            }
        });
        let mut ex = s.cell.exclude().unwrap();
        if let Err(e) = detach(&mut ex) {
            assert!(matches!(e, SlotLockError::NotDrained { .. }), "{e:?}");
            assert!(s.cell.is_excluded(), "a refused detach lost the exclusion");
            ex.wait_drained(LONG).unwrap();
            detach(&mut ex).unwrap();
        }
        drop(ex);
        discard_mem(&s, DISCARDED);
        join(readers);
        assert_eq!(s.cell.word(), 0);
        drop(std::mem::ManuallyDrop::into_inner(s));
    }
}

#[test]
fn test_loom_detach_before_drain_refused_until_every_shard_drained() {
    check_explores(3, early_detach_model(detach_correct));
}

#[test]
fn test_loom_detach_checking_one_shard_caught() {
    assert_caught(
        3,
        "Causality violation",
        early_detach_model(detach_checking_first_shard_only),
    );
}
