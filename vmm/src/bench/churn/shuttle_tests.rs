//! Shuttle model of the churn protocol between the writer, a vCPU and the
//! main thread, with the real writer loop ([`run_ops`]) and the order
//! `bench::run` follows: enable EFAULT waiting, start the writer, run the
//! pass, stop and join the writer, disable waiting.
//!
//! The host page is an atomic "writable" flag; a protect op clears it and
//! sets it again (a yield between, where the vCPU may run); a plug op flips
//! a "plugged" flag that `restore` must clear. The vCPU's write succeeds when
//! the page is writable; otherwise it waits if waiting is enabled, and the
//! pass fails if not (`KVM_RUN` returns EFAULT to a loop that does not
//! expect it).
//!
//! Properties: the pass never fails; after the writer is joined the page is
//! writable and nothing is plugged. Broken variants the model must catch:
//! waiting enabled only after the writer started; a writer that checks for
//! stop inside an op (between making the page read-only and restoring it).
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

#[derive(Default)]
struct Host {
    writable: AtomicBool,
    plugged: AtomicBool,
    waiting: AtomicBool,
    stop: AtomicBool,
}

#[derive(Clone, Copy)]
struct Variant {
    /// Enable waiting before starting the writer (the real order).
    wait_first: bool,
    /// Look at `stop` between an op's two halves (broken).
    stop_inside_op: bool,
}

const REAL: Variant = Variant {
    wait_first: true,
    stop_inside_op: false,
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

fn vcpu_writes(h: &Host, n: usize) {
    for _ in 0..n {
        while !h.writable.load(Ordering::SeqCst) {
            assert!(
                h.waiting.load(Ordering::SeqCst),
                "EFAULT while the vCPU does not wait for it: the pass fails"
            );
            thread::yield_now();
        }
    }
}

fn model(v: Variant) {
    let h = Arc::new(Host::default());
    h.writable.store(true, Ordering::SeqCst);
    let start_writer = |h: &Arc<Host>| {
        let hw = h.clone();
        thread::spawn(move || {
            // The real writer runs until stopped; the model's also stops
            // after a budget of ops, so a schedule that favours it cannot
            // spin forever (the vCPU and main thread still run meanwhile).
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
        })
    };
    let writer = if v.wait_first {
        h.waiting.store(true, Ordering::SeqCst);
        start_writer(&h)
    } else {
        let w = start_writer(&h);
        h.waiting.store(true, Ordering::SeqCst);
        w
    };
    let hv = h.clone();
    let vcpu = thread::spawn(move || vcpu_writes(&hv, 2));
    vcpu.join().unwrap();
    h.stop.store(true, Ordering::SeqCst);
    let log = writer.join().unwrap();
    h.waiting.store(false, Ordering::SeqCst);
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
}

#[test]
fn shuttle_churn_broken_wait_enabled_after_writer_is_caught() {
    let broken = Variant {
        wait_first: false,
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
        ..REAL
    };
    assert_caught("stayed read-only", BROKEN_ITERATIONS, move || model(broken));
}
