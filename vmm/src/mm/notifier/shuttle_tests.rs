//! Shuttle models of the fault-path sequence protocol: larger than the loom
//! models (two fault paths, three invalidations in a row), explored with
//! randomized PCT schedules, sequentially consistent.
//!
//! Run: `RUSTFLAGS="--cfg vmm_shuttle" cargo test -p vmm --lib --release shuttle`.
//!
//! - `protocol_model`: fault paths (read_begin → resolve → check and install
//!   under the translation's lock) against a writer doing three
//!   invalidations (start → drop the translation → new answer → end). A
//!   translation installed must be the current answer at that moment, and
//!   what is left at the end must be the last one. Run on the real
//!   [`SeqState`] and on two broken protocols.
//! - `test_shuttle_hub_cache_*`: the real hub and [`TranslationCache`], two
//!   lookup threads against three invalidations: a lookup started after
//!   `begin` returned never answers older than that change, and the cache
//!   ends with the last answer.
use std::sync::Arc;

use super::model_protocols::{
    page_range, BumpsAtStartOnly, IgnoresInProgress, Protocol, ProtocolState, Real, PAGE,
};
use super::seq::{lock, SeqState};
use super::{InvalidationHub, Reason, TranslationCache};
use crate::mm::addr::{Gpa, Hva};
use crate::mm::model_support::{assert_caught, pct};
use crate::mm::sync::{thread, AtomicU64, AtomicUsize, Ordering};

/// Schedules for the real protocol, and for a broken one (a run stops at
/// the first failure).
const ITERATIONS: usize = 10_000;
const BROKEN_ITERATIONS: usize = 50_000;
/// The writer's answers go 1 (initial), 2, 3, 4.
const LAST: u64 = 4;

/// Translations installed over all schedules of a run (not vacuous); one
/// counter per test, as tests run in parallel.
static INSTALLED_REAL: AtomicCount = AtomicCount::new(0);
static INSTALLED_BROKEN: AtomicCount = AtomicCount::new(0);
type AtomicCount = std::sync::atomic::AtomicUsize;

fn protocol_model<P: Protocol>(
    make: fn() -> P,
    installs: &'static AtomicCount,
) -> impl Fn() + Send + Sync + 'static {
    move || {
        let s = ProtocolState::new(make());
        let writer = s.spawn_invalidator(LAST);
        let faults: Vec<_> = (0..2)
            .map(|_| {
                let s = s.clone();
                thread::spawn(move || {
                    for _ in 0..3 {
                        let seq = s.proto.read_begin();
                        let resolved = s.generation.load(Ordering::SeqCst);
                        let mut installed = lock(&s.slot);
                        if !s.proto.retry(seq) {
                            let now = s.generation.load(Ordering::SeqCst);
                            assert_eq!(resolved, now, "installed a stale translation");
                            *installed = Some(resolved);
                            installs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        drop(installed);
                        thread::yield_now();
                    }
                })
            })
            .collect();

        writer.join().unwrap();
        for f in faults {
            f.join().unwrap();
        }
        let kept = *lock(&s.slot);
        assert!(
            kept.is_none() || kept == Some(LAST),
            "installed a stale translation: {kept:?} kept"
        );
    }
}

#[test]
fn test_shuttle_seq_two_faults_vs_three_invalidations_never_stale() {
    pct(
        protocol_model(|| Real(SeqState::new()), &INSTALLED_REAL),
        ITERATIONS,
    );
    let n = INSTALLED_REAL.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        n > ITERATIONS,
        "only {n} installs in {ITERATIONS} schedules"
    );
}

#[test]
fn test_shuttle_seq_retry_ignoring_in_progress_caught() {
    assert_caught(
        "installed a stale translation",
        BROKEN_ITERATIONS,
        protocol_model(
            || IgnoresInProgress {
                seq: AtomicU64::new(0),
            },
            &INSTALLED_BROKEN,
        ),
    );
}

#[test]
fn test_shuttle_seq_bump_at_start_only_caught() {
    assert_caught(
        "installed a stale translation",
        BROKEN_ITERATIONS,
        protocol_model(
            || BumpsAtStartOnly {
                seq: AtomicU64::new(0),
                in_progress: AtomicUsize::new(0),
            },
            &INSTALLED_BROKEN,
        ),
    );
}

#[test]
fn test_shuttle_hub_cache_two_lookups_vs_three_invalidations_never_stale() {
    pct(
        || {
            let hub = Arc::new(InvalidationHub::new());
            let generation = Arc::new(AtomicU64::new(1));
            let g = generation.clone();
            let cache = Arc::new(
                TranslationCache::with_shards(
                    hub.clone(),
                    move |gpa: Gpa| Some(Hva((g.load(Ordering::SeqCst) << 32) | gpa.0)),
                    1,
                )
                .unwrap(),
            );
            // The last change whose `begin` has returned.
            let begun = Arc::new(AtomicU64::new(1));

            let writer = {
                let (hub, generation, begun) = (hub.clone(), generation.clone(), begun.clone());
                thread::spawn(move || {
                    for next in 2..=LAST {
                        let t = hub.begin(page_range(), Reason::Protect).unwrap();
                        begun.store(next, Ordering::SeqCst);
                        generation.store(next, Ordering::SeqCst);
                        hub.end(t);
                    }
                })
            };
            let lookups: Vec<_> = (0..2)
                .map(|_| {
                    let (cache, begun) = (cache.clone(), begun.clone());
                    thread::spawn(move || {
                        for _ in 0..3 {
                            let floor = begun.load(Ordering::SeqCst);
                            let answer = cache.lookup(PAGE).unwrap().0 >> 32;
                            assert!(
                                answer >= floor,
                                "lookup after begin of change {floor} answered {answer}"
                            );
                        }
                    })
                })
                .collect();

            writer.join().unwrap();
            for l in lookups {
                l.join().unwrap();
            }
            assert_eq!(
                cache.lookup(PAGE).unwrap().0 >> 32,
                LAST,
                "stale entry left in the cache"
            );
        },
        ITERATIONS,
    );
}

/// A boundary split in place: the writer publishes that a 2 MiB region is
/// now cut by a memslot boundary, then announces it with `reshaped`, whose
/// subscriber splits a huge translation it finds. A fault decides the
/// translation's size from the boundaries it reads (huge while uncut),
/// installs it under the translation's lock and drops it on `retry`. What is
/// left at the end must not be huge: with the sequence bracket a fault that
/// decided before the publish and installs after the split retries; without
/// it (the broken variant) the huge translation can outlive the split.
fn reshape_model(bracketed: bool) -> impl Fn() + Send + Sync + 'static {
    use crate::mm::sync::Mutex;

    /// The cached translation: `Some(true)` is a huge one.
    struct Splitter(Arc<Mutex<Option<bool>>>);
    impl super::Subscriber for Splitter {
        fn invalidate_start(&self, _: super::GpaRange, _: Reason) {}
        fn invalidate_end(&self, _: super::GpaRange) {}
        fn reshaped(&self, _: super::GpaRange) {
            let mut t = lock(&self.0);
            if *t == Some(true) {
                *t = Some(false);
            }
        }
    }

    move || {
        let hub = Arc::new(InvalidationHub::new());
        let cached = Arc::new(Mutex::new(None));
        hub.subscribe(
            super::Interest::All,
            Arc::new(Splitter(cached.clone())),
            super::Replay::None,
        )
        .unwrap();
        let cut = Arc::new(AtomicU64::new(0));
        let fault = {
            let (hub, cached, cut) = (hub.clone(), cached.clone(), cut.clone());
            thread::spawn(move || loop {
                let seq = hub.read_begin();
                let huge = cut.load(Ordering::SeqCst) == 0;
                *lock(&cached) = Some(huge);
                if !hub.retry(seq, page_range()) {
                    break;
                }
                *lock(&cached) = None;
                thread::yield_now();
            })
        };
        cut.store(1, Ordering::SeqCst);
        if bracketed {
            hub.reshaped(page_range());
        } else {
            hub.reshaped_unbracketed(page_range());
        }
        fault.join().unwrap();
        assert_ne!(
            *lock(&cached),
            Some(true),
            "a huge translation outlived the boundary that cuts it"
        );
    }
}

#[test]
fn test_shuttle_reshaped_leaves_no_translation_across_a_new_boundary() {
    pct(reshape_model(true), ITERATIONS);
}

#[test]
fn test_shuttle_reshaped_without_the_sequence_bracket_is_caught() {
    assert_caught(
        "a huge translation outlived the boundary that cuts it",
        BROKEN_ITERATIONS,
        reshape_model(false),
    );
}
