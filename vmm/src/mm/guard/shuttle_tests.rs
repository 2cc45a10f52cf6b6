//! A shuttle model of [`GuestReader::walk`] racing a writer that unplugs a
//! slot (its memory discarded) and plugs another slot with other memory at
//! the same place, which reuses the cell: randomized PCT schedules from a
//! fixed seed, on the real map, cells and writer path ([`GuardedMap::apply`]).
//!
//! Oracle: every word a walk reads through a visited slot is one that slot's
//! memory holds (the old or the new slot's mark), never the zero of a page
//! discarded under it.
//!
//! The walk runs as it does (announced batches while the writer lock is
//! free, counted slots while an op runs) and with every announcement entry
//! taken (counted slots only). Two broken variants are caught: admitting
//! counted slots trusting the walk's snapshot (the reference is taken but
//! the cell's generation not re-validated: a walk that reaches the reused
//! cell on its old snapshot reads the old, discarded memory), and a writer
//! that does not wait for walks announcing the slot it deletes. (The fences
//! of the announcement protocol matter only under weak memory, which
//! shuttle does not model: loom checks them, in `announce`.)
//!
//! Run: `RUSTFLAGS="--cfg vmm_shuttle" cargo test -p vmm --lib --release shuttle`.
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::announce::Broken;
use super::walk::Admit;
use super::*;
use crate::mm::addr::{GpaRange, PAGE_SIZE};
use crate::mm::backing::{BackingKind, HostMapping};
use crate::mm::model_support::{assert_caught, pct};
use crate::mm::slot_lock::model_variants::read_trusting_snapshot;
use crate::mm::slot_lock::SlotCell;
use crate::mm::slot_map::{SlotFlags, SlotMapConfig};
use crate::mm::sync::thread;

const P: u64 = PAGE_SIZE;
const BASE: u64 = 0x10_0000;
const SLOTS: u64 = 3;
const OLD: u64 = 0x01d0_01d0;
const NEW: u64 = 0x0e30_0e30;
const ITERATIONS: usize = 2_000;
const BOUND: Duration = Duration::from_secs(3600);

/// Visits of the changing slot over all schedules of a model run: with its
/// old memory and with its new one (the real model is not vacuous: walks
/// meet both sides of the op). One pair per test, as tests run in parallel.
type Seen = [AtomicUsize; 2];
static SEEN_REAL: Seen = [const { AtomicUsize::new(0) }; 2];
static SEEN_COUNTED: Seen = [const { AtomicUsize::new(0) }; 2];
static SEEN_BROKEN: Seen = [const { AtomicUsize::new(0) }; 2];
static SEEN_NO_WAIT: Seen = [const { AtomicUsize::new(0) }; 2];

/// How the walker holds slots.
#[derive(Clone, Copy)]
enum Hold {
    /// As the walk does: announced batches while the gate is open, counted
    /// slots while a writer's op runs; the writer as `announce` has it, or
    /// one of its broken variants.
    Announced(Broken),
    /// Every announcement entry taken: the walk counts every slot.
    Counted,
}

fn model(admit: Admit, hold: Hold, seen: &'static Seen) -> impl Fn() + Send + Sync + 'static {
    move || {
        let config = SlotMapConfig {
            max_slots: 8,
            ..SlotMapConfig::default()
        };
        let g = Arc::new(GuardedMap::new(SlotMap::new(config)));
        if let Hold::Announced(broken) = hold {
            g.walks.set_broken(broken);
        }
        // One host page per slot and one between, so slots do not merge.
        let mem = Arc::new(HostMapping::new(&BackingKind::Anon, 2 * SLOTS * P).unwrap());
        for i in 0..SLOTS {
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
            let slot = g.try_acquire(Gpa(BASE + i * P)).unwrap();
            slot.write_u64(Gpa(BASE + i * P), OLD).unwrap();
        }
        let other = Arc::new(HostMapping::new(&BackingKind::Anon, P).unwrap());
        // SAFETY: `other` is a fresh page-sized mapping no one else uses yet.
        unsafe { (other.as_ptr() as *mut u64).write_volatile(NEW) };

        let walker = {
            let g = g.clone();
            thread::spawn(move || {
                let taken: Vec<_> = match hold {
                    Hold::Counted => std::iter::from_fn(|| g.walks.claim()).collect(),
                    Hold::Announced(_) => Vec::new(),
                };
                let visits = crate::mm::sync::AtomicUsize::new(0);
                let mut reader = g.reader();
                for _ in 0..2 {
                    let range = GpaRange::new(Gpa(BASE), SLOTS * P).unwrap();
                    let flow = reader.walk_with(range, BOUND, admit, |visit| {
                        // No yield here: shuttle's PCT lowers a yielding
                        // thread's priority, which would hand the writer
                        // every window. The walk's own atomics (admission,
                        // the exclusion look, release, announcements) are
                        // scheduling points, and so is this count: an
                        // announced batch takes no atomic per slot, and
                        // the writer must get a chance to run between its
                        // announcement and its reads.
                        if let Visit::Slot { slot, part } = visit {
                            visits.fetch_add(1, crate::mm::sync::Ordering::Relaxed);
                            let word = slot.read_u64(part.start()).unwrap();
                            assert!(
                                word == OLD || word == NEW,
                                "a walk read {word:#x} at {} through slot {}: memory discarded under it",
                                part.start(),
                                slot.slot_id()
                            );
                            if part.start().0 == BASE + (SLOTS - 1) * P {
                                seen[usize::from(word == NEW)].fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        ControlFlow::<()>::Continue(())
                    });
                    assert_eq!(flow.unwrap(), ControlFlow::Continue(()));
                }
                drop(taken);
            })
        };

        let last = Gpa(BASE + (SLOTS - 1) * P);
        g.apply(|m| m.unplug(last, P), BOUND).unwrap();
        g.apply(
            |m| m.plug(last, P, other.clone(), 0, SlotFlags::NONE),
            BOUND,
        )
        .unwrap();
        walker.join().unwrap();
    }
}

fn assert_met_both_sides(seen: &Seen) {
    assert!(
        seen[0].load(Ordering::Relaxed) > 0,
        "no walk met the old slot"
    );
    assert!(
        seen[1].load(Ordering::Relaxed) > 0,
        "no walk met the new slot"
    );
}

#[test]
fn test_shuttle_walk_never_visits_discarded_memory() {
    pct(
        model(SlotCell::read_on, Hold::Announced(Broken::None), &SEEN_REAL),
        ITERATIONS,
    );
    assert_met_both_sides(&SEEN_REAL);
}

#[test]
fn test_shuttle_walk_counting_every_slot_never_visits_discarded_memory() {
    pct(
        model(SlotCell::read_on, Hold::Counted, &SEEN_COUNTED),
        ITERATIONS,
    );
    assert_met_both_sides(&SEEN_COUNTED);
}

#[test]
fn test_shuttle_walk_trusting_its_snapshot_is_caught() {
    assert_caught(
        "memory discarded under it",
        ITERATIONS * 5,
        model(read_trusting_snapshot, Hold::Counted, &SEEN_BROKEN),
    );
}

#[test]
fn test_shuttle_writer_not_waiting_for_announced_walks_is_caught() {
    assert_caught(
        "memory discarded under it",
        ITERATIONS * 5,
        model(
            SlotCell::read_on,
            Hold::Announced(Broken::WriterSkipsWait),
            &SEEN_NO_WAIT,
        ),
    );
}
