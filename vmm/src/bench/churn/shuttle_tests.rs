//! Shuttle model of the churn protocol between the writer, the vCPUs and
//! the main thread, with the real writer loop ([`run_ops`]) and the order
//! `bench::run` follows: enable EFAULT waiting, start the writer, run the
//! pass; then stop and join the writer, disable waiting, and only then run
//! the next phase (a re-fault pass, a guest VERIFY).
//!
//! The host page is an atomic "writable" flag; a protect op clears it and
//! sets it again (a yield between, where a vCPU may run); a plug op flips
//! a "plugged" flag that `restore` must clear. A vCPU's write succeeds when
//! the page is writable; otherwise it waits if waiting is enabled, and its
//! phase fails if not (`KVM_RUN` returns EFAULT to a loop that does not
//! expect it).
//!
//! Properties: no phase fails; after the writer is joined the page is
//! writable and nothing is plugged. Broken variants the model must catch:
//! the next phase started before the writer was joined (it may still be
//! inside an op); a writer that checks for stop inside an op (between
//! making the page read-only and restoring it).
//!
//! Run: `RUSTFLAGS="--cfg vmm_shuttle" cargo test -p vmm --lib --release shuttle_churn`.

use std::time::Duration;

use super::ops::{ChurnError, ChurnOp};
use super::run_ops;
use crate::mm::model_support::{assert_caught, pct};
use crate::mm::sync::{thread, Arc, AtomicBool, Ordering};

const ITERATIONS: usize = 5_000;
const BROKEN_ITERATIONS: usize = 20_000;
/// Ops the model's writer runs at most.
const OP_BUDGET: u32 = 8;

type Counter = std::sync::atomic::AtomicUsize;

/// Writes that found the page read-only and waited, over all schedules of
/// the real variant (the model is not vacuous if some did); the broken
/// variants count elsewhere, as tests run in parallel.
static WAITED_REAL: Counter = Counter::new(0);
static WAITED_BROKEN: Counter = Counter::new(0);

#[derive(Default)]
struct Host {
    writable: AtomicBool,
    plugged: AtomicBool,
    waiting: AtomicBool,
    stop: AtomicBool,
}

#[derive(Clone, Copy)]
struct Variant {
    /// Join the writer before the next phase (the real order).
    join_first: bool,
    /// Look at `stop` between an op's two halves (broken).
    stop_inside_op: bool,
    /// Where waits are counted.
    waited: &'static Counter,
}

const REAL: Variant = Variant {
    join_first: true,
    stop_inside_op: false,
    waited: &WAITED_REAL,
};

fn op(h: &Host, op: ChurnOp, v: Variant) -> Result<(), ChurnError> {
    match op {
        ChurnOp::Protect => {
            h.writable.store(false, Ordering::SeqCst);
            thread::yield_now();
            if v.stop_inside_op && h.stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            h.writable.store(true, Ordering::SeqCst);
        }
        ChurnOp::Plug => {
            let now = h.plugged.load(Ordering::SeqCst);
            h.plugged.store(!now, Ordering::SeqCst);
        }
        _ => unreachable!("the model runs protect and plug"),
    }
    Ok(())
}

fn vcpu_writes(h: &Host, n: usize, waited: &Counter) {
    for _ in 0..n {
        while !h.writable.load(Ordering::SeqCst) {
            assert!(
                h.waiting.load(Ordering::SeqCst),
                "EFAULT while the vCPU does not wait for it: the phase fails"
            );
            waited.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            thread::yield_now();
        }
    }
}

fn model(v: Variant) {
    let h = Arc::new(Host::default());
    h.writable.store(true, Ordering::SeqCst);
    h.waiting.store(true, Ordering::SeqCst);
    let hw = h.clone();
    let writer = thread::spawn(move || {
        // The real writer runs until stopped; the model's also stops after
        // a budget of ops, so a schedule that favours it cannot spin
        // forever (the vCPU and main thread still run meanwhile).
        let budget = std::cell::Cell::new(OP_BUDGET);
        run_ops(
            &[ChurnOp::Protect, ChurnOp::Plug],
            Duration::ZERO,
            || {
                budget.set(budget.get().saturating_sub(1));
                hw.stop.load(Ordering::SeqCst) || budget.get() == 0
            },
            |o| op(&hw, o, v),
            || {
                hw.plugged.store(false, Ordering::SeqCst);
                Ok(())
            },
        )
    });
    let hv = h.clone();
    thread::spawn(move || vcpu_writes(&hv, 2, v.waited))
        .join()
        .unwrap();
    h.stop.store(true, Ordering::SeqCst);
    let (joined, running) = if v.join_first {
        (Some(writer.join().unwrap()), None)
    } else {
        (None, Some(writer))
    };
    h.waiting.store(false, Ordering::SeqCst);
    // The next phase: no churn, no waiting.
    let hv = h.clone();
    let next = thread::spawn(move || vcpu_writes(&hv, 1, v.waited));
    let log = match (joined, running) {
        (Some(log), _) => log,
        (None, Some(w)) => w.join().unwrap(),
        (None, None) => unreachable!("the writer is joined or running"),
    };
    next.join().unwrap();
    assert!(log.errors.is_empty());
    assert!(
        h.writable.load(Ordering::SeqCst),
        "the range stayed read-only after the writer ended"
    );
    assert!(
        !h.plugged.load(Ordering::SeqCst),
        "the neighbour stayed plugged after the writer ended"
    );
}

#[test]
fn shuttle_churn_writer_leaves_range_writable_and_vcpu_never_fails() {
    pct(|| model(REAL), ITERATIONS);
    assert!(
        WAITED_REAL.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "no schedule had a vCPU wait out a read-only page"
    );
}

#[test]
fn shuttle_churn_broken_next_phase_before_writer_joined_is_caught() {
    let broken = Variant {
        join_first: false,
        waited: &WAITED_BROKEN,
        ..REAL
    };
    assert_caught(
        "EFAULT while the vCPU does not wait",
        BROKEN_ITERATIONS,
        move || model(broken),
    );
}

#[test]
fn shuttle_churn_broken_stop_inside_op_is_caught() {
    let broken = Variant {
        stop_inside_op: true,
        waited: &WAITED_BROKEN,
        ..REAL
    };
    // The writer ends with the page read-only: the next phase, which does
    // not wait, meets it.
    assert_caught(
        "EFAULT while the vCPU does not wait",
        BROKEN_ITERATIONS,
        move || model(broken),
    );
}
