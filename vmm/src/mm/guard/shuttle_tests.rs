//! A shuttle model of [`GuestReader::walk`] racing a writer that unplugs a
//! slot (its memory discarded) and plugs another slot with other memory at
//! the same place, which reuses the cell: randomized PCT schedules from a
//! fixed seed, on the real map, cells and writer path ([`GuardedMap::apply`]).
//!
//! Oracle: every word a walk reads through a visited slot is one that slot's
//! memory holds (the old or the new slot's mark), never the zero of a page
//! discarded under it.
//!
//! The broken variant admits slots trusting the walk's snapshot (it takes the
//! reference but does not re-validate the cell's generation): a walk that
//! reaches the reused cell on its old snapshot reads the old, discarded
//! memory. Caught.
//!
//! Run: `RUSTFLAGS="--cfg vmm_shuttle" cargo test -p vmm --lib --release shuttle`.
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
static SEEN_BROKEN: Seen = [const { AtomicUsize::new(0) }; 2];

fn model(admit: Admit, seen: &'static Seen) -> impl Fn() + Send + Sync + 'static {
    move || {
        let config = SlotMapConfig {
            max_slots: 8,
            ..SlotMapConfig::default()
        };
        let g = Arc::new(GuardedMap::new(SlotMap::new(config)));
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
                let mut reader = g.reader();
                for _ in 0..2 {
                    let range = GpaRange::new(Gpa(BASE), SLOTS * P).unwrap();
                    let flow = reader.walk_with(range, BOUND, admit, |visit| {
                        // No yield here: shuttle's PCT lowers a yielding
                        // thread's priority, which would hand the writer
                        // every window; the walk's own atomics (admission,
                        // the exclusion look, release) are its yield points.
                        if let Visit::Slot { slot, part } = visit {
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

#[test]
fn test_shuttle_walk_never_visits_discarded_memory() {
    pct(model(SlotCell::read_on, &SEEN_REAL), ITERATIONS);
    assert!(
        SEEN_REAL[0].load(Ordering::Relaxed) > 0,
        "no walk met the old slot"
    );
    assert!(
        SEEN_REAL[1].load(Ordering::Relaxed) > 0,
        "no walk met the new slot"
    );
}

#[test]
fn test_shuttle_walk_trusting_its_snapshot_is_caught() {
    assert_caught(
        "memory discarded under it",
        ITERATIONS * 5,
        model(read_trusting_snapshot, &SEEN_BROKEN),
    );
}
