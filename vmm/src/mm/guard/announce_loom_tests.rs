//! Loom models of the walk announcement protocol (module docs of
//! `announce`): a walker announces a range, checks the gate and its
//! snapshot, and reads "guest memory" in the range; a writer closes the gate,
//! waits for walks announcing the range, then "discards" the memory (a
//! write), publishes a new map version and opens the gate. The memory is a
//! loom cell, so a read not ordered before the discard is a data race loom
//! reports; a read of the discarded value fails the assertion.
//!
//! Broken variants: the walker without the fence between its announcement
//! and the gate load, and the writer without the fence between closing the
//! gate and loading the announcements (the store-buffering pattern: both
//! loads can miss the other side's store). Both are caught. A second model
//! has two walkers, the second possibly reusing the first's entry: a
//! relaxed claim lets the writer synchronize with the second walk only and
//! discard under the first (caught).
//!
//! Run: `RUSTFLAGS="--cfg vmm_loom" cargo test -p vmm --lib --release loom`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use loom::cell::UnsafeCell;
use loom::model::Builder;

use super::*;
use crate::mm::addr::Gpa;
use crate::mm::model_support::panic_message;
use crate::mm::sync::{thread, Arc};

const LIVE: u64 = 0x1111;
const DISCARDED: u64 = 0;

struct Shared {
    table: Announcements,
    /// The published map's version: 0 names the slot, 1 no longer does.
    version: AtomicU64,
    mem: UnsafeCell<u64>,
}

fn slot() -> GpaRange {
    GpaRange::new(Gpa(0x10_0000), 0x1000).unwrap()
}

fn shared(broken: Broken) -> Arc<Shared> {
    let s = Arc::new(Shared {
        table: Announcements::new(),
        version: AtomicU64::new(0),
        mem: UnsafeCell::new(LIVE),
    });
    s.table.set_broken(broken);
    s
}

/// The writer's op: close the gate, wait for walks announcing the slot,
/// discard its memory, publish a map without it, open the gate.
fn delete_slot(s: &Shared) {
    s.table.close_gate();
    s.table
        .wait_for_walks(&[slot()], Duration::from_secs(3600))
        .unwrap();
    // SAFETY: loom's cell checks this write against the walkers' reads.
    s.mem.with_mut(|p| unsafe { *p = DISCARDED });
    s.version.store(1, Ordering::Release);
    s.table.open_gate();
}

/// A walker's read of the slot's memory under its announcement.
fn read_slot(s: &Shared) {
    // SAFETY: loom's cell checks this read against the writer's discard.
    let word = s.mem.with(|p| unsafe { *p });
    assert_eq!(word, LIVE, "a walk read memory discarded under it");
}

fn model(broken: Broken) -> impl Fn() + Sync + Send + 'static {
    move || {
        let s = shared(broken);
        let walker = {
            let s = s.clone();
            thread::spawn(move || {
                let claim = s.table.claim().unwrap();
                let snapshot = s.version.load(Ordering::Acquire);
                if claim.announce(slot())
                    && s.version.load(Ordering::Acquire) == snapshot
                    && snapshot == 0
                {
                    read_slot(&s);
                }
                drop(claim);
            })
        };
        delete_slot(&s);
        walker.join().unwrap();
    }
}

/// Two walkers: one reads the slot's memory, then gives its entry back;
/// the other may claim that entry and announce an unrelated range. A writer
/// that finds the entry holding the unrelated range must still be ordered
/// after the first walker's read.
fn reuse_model(broken: Broken) -> impl Fn() + Sync + Send + 'static {
    move || {
        let s = shared(broken);
        let reader = {
            let s = s.clone();
            thread::spawn(move || {
                let claim = s.table.claim().unwrap();
                if claim.announce(slot()) && s.version.load(Ordering::Acquire) == 0 {
                    read_slot(&s);
                }
            })
        };
        let other = {
            let s = s.clone();
            thread::spawn(move || {
                let claim = s.table.claim().unwrap();
                claim.announce(GpaRange::new(Gpa(0x80_0000), 0x1000).unwrap());
            })
        };
        delete_slot(&s);
        reader.join().unwrap();
        other.join().unwrap();
    }
}

fn check(f: impl Fn() + Sync + Send + 'static) {
    let mut b = Builder::new();
    b.preemption_bound = Some(3);
    b.check(f);
}

fn assert_caught(f: impl Fn() + Sync + Send + 'static) {
    let payload = catch_unwind(AssertUnwindSafe(|| check(f)))
        .expect_err("loom did not catch the broken variant");
    let msg = panic_message(&*payload);
    assert!(
        msg.contains("discarded under it") || msg.contains("Causality"),
        "caught for another reason: {msg}"
    );
}

#[test]
fn test_loom_announced_walk_never_reads_discarded_memory() {
    check(model(Broken::None));
}

#[test]
fn test_loom_announced_walk_without_the_walker_fence_is_caught() {
    assert_caught(model(Broken::WalkerSkipsFence));
}

#[test]
fn test_loom_announced_walk_without_the_writer_fence_is_caught() {
    assert_caught(model(Broken::WriterSkipsFence));
}

#[test]
fn test_loom_announced_walk_in_a_reused_entry_orders_the_previous_walk() {
    check(reuse_model(Broken::None));
}

#[test]
fn test_loom_announced_walk_claiming_its_entry_relaxed_is_caught() {
    assert_caught(reuse_model(Broken::ClaimRelaxed));
}
