//! Loom models of the fault-path sequence protocol.
//!
//! Run with
//! `RUSTFLAGS="--cfg vmm_loom" cargo test -p vmm --lib --release mm::notifier::loom_tests`.
//!
//! - `protocol_model` runs a fault path (read_begin → resolve → check and
//!   install under its lock) against one invalidation (start → drop under the
//!   same lock → change what the resolver returns → end), generic over the
//!   protocol, and asserts the installed translation is never the old one. It
//!   is run on the real [`SeqState`] (must pass) and on two deliberately
//!   broken protocols (must be caught).
//! - `install_then_retry_model` is the IOMMU fill's shape: install first
//!   (a CAS into the empty leaf), then `retry`, and zap its own install when
//!   `retry` says so. Run on the real [`SeqState`] (must pass), and caught
//!   when the fault path skips the retry or checks before installing.
//! - `test_loom_hub_cache_*` runs the real hub and [`TranslationCache`]: a
//!   lookup racing an invalidation never returns or keeps the old translation.
//! - `test_loom_hub_subscribe_*`: registering during an invalidation yields a
//!   matched start/end pair (or nothing), never an end before its start.
//! - `test_loom_hub_unsubscribe_*`: once `unsubscribe` returns no callback of
//!   that subscriber is running or starts. A returning callback wakes the
//!   waiting `unsubscribe` only when a waiter is counted; caught when it
//!   looks for waiters before the critical section that leaves the running
//!   set.
//! - `test_loom_hub_subscribe_racing_veto_*`: a subscriber registering while
//!   `begin` runs the vetoes is either checked or registered after the
//!   record (then its start comes from the registration).
//! - `test_loom_hub_replay_*`: replay racing a plug reports it exactly once.
//! - `wait_idle_model`: a `wait_idle` racing the `end` it waits for is
//!   woken (`end` notifies only when a waiter is registered); caught when
//!   `end` looks for waiters before taking the mutex.
//!
//! Each model uses a preemption bound of 3; all of them together take well
//! under a second in a release build.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use loom::model::Builder;

use super::model_protocols::{BumpsAtStartOnly, IgnoresInProgress, Protocol, ProtocolState, Real};
use super::seq::{lock, SeqState};
use super::{Interest, InvalidationHub, Reason, Replay, Subscriber, TranslationCache};
use crate::mm::addr::{Gpa, GpaRange, Hva};
use crate::mm::sync::{thread, AtomicBool, AtomicU64, AtomicUsize, Mutex, Ordering};

use super::model_protocols::{page_range, PAGE};

fn builder(preemptions: usize) -> Builder {
    let mut b = Builder::new();
    b.preemption_bound = Some(preemptions);
    b
}

/// One invalidation racing one fault path; the fault path's translation is
/// the resolver's generation (1 before the change, 2 after).
fn protocol_model<P: Protocol>(make: fn() -> P) {
    builder(3).check(move || {
        let s = ProtocolState::new(make());
        let writer = s.spawn_invalidator(2);

        for _ in 0..2 {
            let seq = s.proto.read_begin();
            let resolved = s.generation.load(Ordering::Acquire);
            let mut installed = lock(&s.slot);
            if !s.proto.retry(seq) {
                *installed = Some(resolved);
                break;
            }
            drop(installed);
            thread::yield_now();
        }

        writer.join().unwrap();
        let kept = *lock(&s.slot);
        assert!(
            kept.is_none() || kept == Some(2),
            "stale translation kept: {kept:?}"
        );
    });
}

#[test]
fn test_loom_seq_fault_racing_invalidation_never_keeps_stale() {
    protocol_model(|| Real(SeqState::new()));
}

#[test]
fn test_loom_seq_retry_ignoring_in_progress_is_caught() {
    let caught = catch_unwind(AssertUnwindSafe(|| {
        protocol_model(|| IgnoresInProgress {
            seq: AtomicU64::new(0),
        })
    }));
    assert!(
        caught.is_err(),
        "the model missed a protocol that ignores in-progress"
    );
}

#[test]
fn test_loom_seq_bump_at_start_only_is_caught() {
    let caught = catch_unwind(AssertUnwindSafe(|| {
        protocol_model(|| BumpsAtStartOnly {
            seq: AtomicU64::new(0),
            in_progress: AtomicUsize::new(0),
        })
    }));
    assert!(
        caught.is_err(),
        "the model missed a protocol that bumps at start only"
    );
}

/// `wait_idle` racing the `end` of the invalidation it waits for: the
/// waiter must be woken (loom reports a deadlock otherwise). `end` wakes
/// only when it finds a waiter registered under the mutex.
fn wait_idle_model(early_waiter_check: bool) {
    builder(3).check(move || {
        let mut seq = SeqState::new();
        seq.early_waiter_check = early_waiter_check;
        let s = Arc::new(seq);
        s.start(1, page_range());
        let waiter = {
            let s = Arc::clone(&s);
            thread::spawn(move || s.wait_idle(page_range()))
        };
        assert!(s.end(1));
        waiter.join().unwrap();
    });
}

#[test]
fn test_loom_seq_wait_idle_racing_end_is_woken() {
    wait_idle_model(false);
}

#[test]
fn test_loom_seq_waiter_check_outside_the_mutex_is_caught() {
    let caught = catch_unwind(AssertUnwindSafe(|| wait_idle_model(true)));
    assert!(
        caught.is_err(),
        "the model missed an end that checks for waiters before locking"
    );
}

/// How an install-then-retry fault path orders its steps.
#[derive(Clone, Copy, PartialEq, Eq)]
enum FillShape {
    /// Install, then retry; zap the own install if the retry fails (the
    /// IOMMU's fill).
    InstallThenRetry,
    /// Broken: install and keep it, no retry.
    NoRetry,
    /// Broken: retry first, then install without a lock (the check can pass
    /// just before an invalidation zaps an empty leaf and ends).
    RetryThenInstall,
}

/// One invalidation (start → zap the leaf → new answer → end) racing a fault
/// path that installs lock-free into the leaf (0 = empty, else the answer's
/// generation). After both, the leaf must be empty or the new answer.
fn install_then_retry_model(shape: FillShape) {
    builder(3).check(move || {
        let s = Arc::new((SeqState::new(), AtomicU64::new(1), AtomicU64::new(0)));
        let w = s.clone();
        let writer = thread::spawn(move || {
            let (seq, generation, leaf) = &*w;
            seq.start(1, page_range());
            leaf.swap(0, Ordering::AcqRel); // invalidate_start: zap
            generation.store(2, Ordering::Release); // teardown: new answer
            assert!(seq.end(1));
        });
        let (seq, generation, leaf) = &*s;
        for _ in 0..2 {
            let begin = seq.read_begin();
            let resolved = generation.load(Ordering::Acquire);
            if shape == FillShape::RetryThenInstall {
                if seq.retry(begin, page_range()) {
                    thread::yield_now();
                    continue;
                }
                let _ = leaf.compare_exchange(0, resolved, Ordering::AcqRel, Ordering::Acquire);
                break;
            }
            // The table's install: a CAS on the empty leaf.
            let installed = leaf
                .compare_exchange(0, resolved, Ordering::AcqRel, Ordering::Acquire)
                .is_ok();
            if shape == FillShape::NoRetry || !seq.retry(begin, page_range()) {
                break;
            }
            if installed {
                // Zap our own install (only if it is still ours).
                let _ = leaf.compare_exchange(resolved, 0, Ordering::AcqRel, Ordering::Acquire);
            }
            thread::yield_now();
        }
        writer.join().unwrap();
        let kept = leaf.load(Ordering::Acquire);
        assert!(kept == 0 || kept == 2, "stale leaf kept: {kept}");
    });
}

#[test]
fn test_loom_install_then_retry_never_keeps_stale() {
    install_then_retry_model(FillShape::InstallThenRetry);
}

#[test]
fn test_loom_install_without_retry_is_caught() {
    let caught = catch_unwind(AssertUnwindSafe(|| {
        install_then_retry_model(FillShape::NoRetry)
    }));
    assert!(caught.is_err(), "the model missed a fill without retry");
}

#[test]
fn test_loom_retry_then_lock_free_install_is_caught() {
    let caught = catch_unwind(AssertUnwindSafe(|| {
        install_then_retry_model(FillShape::RetryThenInstall)
    }));
    assert!(
        caught.is_err(),
        "the model missed a check-then-install without a lock"
    );
}

/// The real hub and cache: a lookup racing `begin` → new resolver answer →
/// `end`. A lookup that starts after `begin` returned (the change is in
/// progress) or after `end` returned must see the new answer, and after both
/// threads are done the cache must not hold the old one.
#[test]
fn test_loom_hub_cache_lookup_racing_invalidation_never_stale() {
    static ITERATIONS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    builder(3).check(|| {
        ITERATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let hub = Arc::new(InvalidationHub::new());
        let generation = Arc::new(AtomicU64::new(1));
        let g = generation.clone();
        let cache = TranslationCache::with_shards(
            hub.clone(),
            move |gpa: Gpa| Some(Hva((g.load(Ordering::Acquire) << 32) | gpa.0)),
            1,
        )
        .unwrap();
        let begun = Arc::new(AtomicBool::new(false));

        let writer = {
            let (hub, generation, begun) = (hub.clone(), generation.clone(), begun.clone());
            thread::spawn(move || {
                let t = hub.begin(page_range(), Reason::Protect).unwrap();
                begun.store(true, Ordering::Release);
                generation.store(2, Ordering::Release);
                hub.end(t);
            })
        };

        let first = cache.lookup(PAGE).unwrap();
        assert!(first.0 >> 32 == 1 || first.0 >> 32 == 2);
        let in_progress_or_done = begun.load(Ordering::Acquire);
        let second = cache.lookup(PAGE).unwrap();
        if in_progress_or_done {
            assert_eq!(
                second.0 >> 32,
                2,
                "lookup after begin returned the old translation"
            );
        }

        writer.join().unwrap();
        assert_eq!(
            cache.lookup(PAGE).unwrap().0 >> 32,
            2,
            "stale entry left in the cache"
        );
    });
    // The model is not vacuous: it explored many interleavings.
    assert!(ITERATIONS.load(std::sync::atomic::Ordering::Relaxed) > 100);
}

/// Records callbacks (entry and exit) and test markers in one log.
#[derive(Default)]
struct Recorder {
    log: Mutex<Vec<&'static str>>,
}

impl Recorder {
    fn push(&self, ev: &'static str) {
        lock(&self.log).push(ev);
    }
    fn events(&self) -> Vec<&'static str> {
        lock(&self.log).clone()
    }
}

impl Subscriber for Recorder {
    fn invalidate_start(&self, _: GpaRange, _: Reason) {
        self.push("start");
        self.push("start-done");
    }
    fn invalidate_end(&self, _: GpaRange) {
        self.push("end");
    }
}

/// A subscriber registering while an invalidation begins and ends gets
/// either nothing or exactly `start` then `end`.
#[test]
fn test_loom_hub_subscribe_racing_invalidation_gets_matched_pair() {
    builder(3).check(|| {
        let hub = Arc::new(InvalidationHub::new());
        let writer = {
            let hub = hub.clone();
            thread::spawn(move || {
                let t = hub.begin(page_range(), Reason::Unplug).unwrap();
                hub.end(t);
            })
        };
        let rec = Arc::new(Recorder::default());
        hub.subscribe(Interest::All, rec.clone(), Replay::None)
            .unwrap();
        writer.join().unwrap();

        let evs = rec.events();
        assert!(
            evs.is_empty() || evs == ["start", "start-done", "end"],
            "unmatched deliveries: {evs:?}"
        );
    });
}

/// After `unsubscribe` returns no callback of the subscriber is running or
/// starts, while a writer delivers to it from another thread.
#[test]
fn test_loom_hub_unsubscribe_racing_delivery_then_silence() {
    unsubscribe_racing_delivery_model(InvalidationHub::new);
}

/// A returning callback wakes `unsubscribe` only if it waits; caught when
/// the callback looks for waiters before the critical section that leaves
/// the running set (the waiter sleeps forever: loom reports the deadlock).
#[test]
fn test_loom_hub_callback_waiter_check_outside_its_exit_is_caught() {
    let caught = catch_unwind(AssertUnwindSafe(|| {
        unsubscribe_racing_delivery_model(InvalidationHub::with_early_waiting_check)
    }));
    let message = caught
        .err()
        .and_then(|p| p.downcast::<String>().ok())
        .expect("the model missed a callback exit that checks for waiters too early");
    assert!(
        message.contains("deadlock"),
        "caught for another reason than the lost wake-up: {message}"
    );
}

fn unsubscribe_racing_delivery_model(make: fn() -> InvalidationHub) {
    builder(3).check(move || {
        let hub = Arc::new(make());
        let rec = Arc::new(Recorder::default());
        let id = hub
            .subscribe(Interest::All, rec.clone(), Replay::None)
            .unwrap();
        let writer = {
            let hub = hub.clone();
            thread::spawn(move || {
                let t = hub.begin(page_range(), Reason::Unplug).unwrap();
                hub.end(t);
            })
        };
        hub.unsubscribe(id).unwrap();
        rec.push("unsubscribed");
        writer.join().unwrap();

        let evs = rec.events();
        let marker = evs.iter().position(|e| *e == "unsubscribed").unwrap();
        assert_eq!(
            marker,
            evs.len() - 1,
            "callback after unsubscribe returned: {evs:?}"
        );
        assert!(
            evs[..marker].is_empty()
                || evs[..marker] == ["start", "start-done"]
                || evs[..marker] == ["start", "start-done", "end"],
            "torn or unordered callbacks: {evs:?}"
        );
    });
}

/// Vetoes everything; records on which thread a start reached it.
struct Vetoer {
    starts: Mutex<Vec<thread::ThreadId>>,
}

impl Subscriber for Vetoer {
    fn invalidate_start(&self, _: GpaRange, _: Reason) {
        lock(&self.starts).push(thread::current().id());
    }
    fn invalidate_end(&self, _: GpaRange) {}
    fn check(&self, _: GpaRange, _: Reason) -> Result<(), String> {
        Err("pinned".into())
    }
}

/// A vetoing subscriber registering while `begin` runs its checks: either
/// `begin` is refused, or the subscriber registered after the change was
/// recorded and got its start from the registration (on its own thread) —
/// never a start from the writer, which would mean it escaped the check.
#[test]
fn test_loom_hub_subscribe_racing_veto_check_is_never_skipped() {
    builder(3).check(|| {
        let hub = Arc::new(InvalidationHub::new());
        let vetoer = Arc::new(Vetoer {
            starts: Mutex::new(Vec::new()),
        });
        let writer = {
            let hub = hub.clone();
            thread::spawn(move || hub.begin(page_range(), Reason::Unplug).map(|t| t.end()))
        };
        hub.subscribe(Interest::All, vetoer.clone(), Replay::None)
            .unwrap();
        let writer_id = writer.thread().id();
        let result = writer.join().unwrap();

        let starts = lock(&vetoer.starts).clone();
        assert!(
            !starts.contains(&writer_id),
            "the writer delivered a start to a subscriber it never checked"
        );
        if result.is_err() {
            assert!(starts.is_empty());
        }
    });
}

/// Counts `memory_added` calls.
#[derive(Default)]
struct AddCounter {
    added: AtomicUsize,
}

impl Subscriber for AddCounter {
    fn invalidate_start(&self, _: GpaRange, _: Reason) {}
    fn invalidate_end(&self, _: GpaRange) {}
    fn memory_added(&self, _: GpaRange, _: Reason) {
        self.added.fetch_add(1, Ordering::Relaxed);
    }
}

/// A subscriber asking for the plugged-range replay while memory is being
/// plugged hears about that memory exactly once (from the replay or from the
/// writer), never zero or two times.
#[test]
fn test_loom_hub_replay_racing_plug_reports_exactly_once() {
    builder(3).check(|| {
        let hub = Arc::new(InvalidationHub::new());
        let writer = {
            let hub = hub.clone();
            thread::spawn(move || hub.added(page_range(), Reason::Plug).unwrap())
        };
        let counter = Arc::new(AddCounter::default());
        hub.subscribe(Interest::All, counter.clone(), Replay::Plugged)
            .unwrap();
        writer.join().unwrap();
        assert_eq!(counter.added.load(Ordering::Relaxed), 1);
    });
}
