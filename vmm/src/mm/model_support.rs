//! What the model checks share: the message of a caught panic (loom and
//! shuttle), a deterministic PCT run and the check that a broken variant is
//! caught for the expected reason (shuttle).
//!
//! Run the shuttle models: `RUSTFLAGS="--cfg vmm_shuttle" cargo test -p vmm --lib --release shuttle`.
use std::any::Any;

/// The text of a panic payload caught from a model run.
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("<non-string panic>")
}

/// PCT depth: the number of priority-change points per schedule.
#[cfg(vmm_shuttle)]
const DEPTH: usize = 3;

#[cfg(vmm_shuttle)]
/// Runs `f` under `iterations` PCT schedules from a fixed seed, so CI
/// explores the same schedules every time (`VMM_SHUTTLE_SEED=N` picks
/// others, for longer exploration runs).
pub(crate) fn pct(f: impl Fn() + Send + Sync + 'static, iterations: usize) {
    let seed = std::env::var("VMM_SHUTTLE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5107_10c4);
    let scheduler = shuttle::scheduler::PctScheduler::new_from_seed(seed, DEPTH, iterations);
    shuttle::Runner::new(scheduler, shuttle::Config::default()).run(f);
}

#[cfg(vmm_shuttle)]
/// Asserts that some schedule among `iterations` makes `f` fail with a
/// panic message containing `why`.
pub(crate) fn assert_caught(why: &str, iterations: usize, f: impl Fn() + Send + Sync + 'static) {
    use std::panic::{catch_unwind, AssertUnwindSafe};
    let payload = catch_unwind(AssertUnwindSafe(|| pct(f, iterations)))
        .expect_err("shuttle did not catch the broken variant");
    let msg = panic_message(&*payload);
    assert!(msg.contains(why), "caught for another reason: {msg}");
}
