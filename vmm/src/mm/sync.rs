//! The synchronization primitives the lock-free parts of `mm` are written
//! against. Normal builds use `std`; model-checking builds
//! (`RUSTFLAGS="--cfg vmm_loom" cargo test -p vmm --lib loom`) swap in loom's
//! versions so the same code is explored under every interleaving loom allows.
//!
//! Only code under `mm` that is model-checked should import from here.

#[cfg(all(test, vmm_loom))]
#[allow(unused_imports)]
pub(crate) use loom::{
    sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering},
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread,
};

#[cfg(not(all(test, vmm_loom)))]
#[allow(unused_imports)]
pub(crate) use std::{
    sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering},
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread,
};
