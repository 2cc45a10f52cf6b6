//! The synchronization primitives the lock-free parts of `mm` are written
//! against. Normal builds use `std`; model-checking builds swap in a
//! checker's versions so the same code runs under its scheduler:
//! - loom (`RUSTFLAGS="--cfg vmm_loom" cargo test -p vmm --lib loom`):
//!   every interleaving within a preemption bound, and weak-memory effects;
//! - shuttle (`RUSTFLAGS="--cfg vmm_shuttle" cargo test -p vmm --lib shuttle`):
//!   randomized (PCT) schedules of larger models than loom can exhaust,
//!   sequentially consistent.
//!
//! Only code under `mm` that is model-checked should import from here.

#[cfg(all(test, vmm_loom))]
#[allow(unused_imports)]
pub(crate) use loom::{
    sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering},
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread,
};

#[cfg(all(test, vmm_shuttle, not(vmm_loom)))]
#[allow(unused_imports)]
pub(crate) use shuttle::{
    sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering},
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread,
};

#[cfg(not(all(test, any(vmm_loom, vmm_shuttle))))]
#[allow(unused_imports)]
pub(crate) use std::{
    sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering},
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread,
};
