//! The atomic protocol on one entry slot. Every read or write of a table entry
//! goes through these functions, which is what the loom model checks.
//!
//! Memory ordering:
//! - [`read`] is one `Acquire` load. A slot may hold a table pointer, and the
//!   acquire pairs with the `Release` of [`publish`], so a walker that sees a
//!   pointer also sees every initializing store made to the lower table before
//!   it was published (the Rust analogue of the `smp_rmb()` in
//!   `pmd_read_atomic` the seed thread argues is critical).
//! - [`publish`] is a `Release` compare-and-swap (`Acquire` on failure, since
//!   the loser goes on to use what it found, possibly a table pointer).
//!   Compare-and-swap, never a plain store, so an install never overwrites
//!   a value it did not see: not a concurrent install and not [`FROZEN`].
//! - [`freeze`] / [`freeze_if`] are `AcqRel`: acquire what they replace (to
//!   tear it down), release so that later teardown is ordered after the freeze.
//! - [`unfreeze`] is a `Release` store by the only party allowed to change a
//!   frozen slot: the writer that froze it.
//! - [`update_leaf`] changes bits of a leaf in place (Accessed/Dirty set by a
//!   walker, permissions changed by a writer). It is `Release` on success so a
//!   permission change is ordered like an install; a failure means the leaf
//!   changed under the caller, who re-reads and retries.

use super::entry::FROZEN;
use crate::mm::sync::{AtomicU64, Ordering};

/// One `Acquire` load of a slot.
#[inline]
pub(crate) fn read(slot: &AtomicU64) -> u64 {
    slot.load(Ordering::Acquire)
}

/// Installs `new` if the slot still holds `expected`; otherwise returns what
/// it holds. See the module docs for the orderings.
#[inline]
pub(crate) fn publish(slot: &AtomicU64, expected: u64, new: u64) -> Result<(), u64> {
    slot.compare_exchange(expected, new, Ordering::Release, Ordering::Acquire)
        .map(drop)
}

/// Freezes the slot whatever it holds and returns the old value.
#[inline]
pub(crate) fn freeze(slot: &AtomicU64) -> u64 {
    slot.swap(FROZEN, Ordering::AcqRel)
}

/// Freezes the slot if it still holds `expected`; otherwise returns what it
/// holds.
#[inline]
pub(crate) fn freeze_if(slot: &AtomicU64, expected: u64) -> Result<(), u64> {
    slot.compare_exchange(expected, FROZEN, Ordering::AcqRel, Ordering::Acquire)
        .map(drop)
}

/// Ends a freeze: stores `value` (empty after a zap, the new leaf or table
/// after a replace) into a slot the caller froze.
#[inline]
pub(crate) fn unfreeze(slot: &AtomicU64, value: u64) {
    debug_assert_eq!(slot.load(Ordering::Relaxed), FROZEN);
    slot.store(value, Ordering::Release);
}

/// Replaces leaf `old` by `new` in place if the slot still holds `old`.
#[inline]
pub(crate) fn update_leaf(slot: &AtomicU64, old: u64, new: u64) -> Result<(), u64> {
    slot.compare_exchange(old, new, Ordering::Release, Ordering::Acquire)
        .map(drop)
}

/// Initializes a slot of a page no other thread can see yet. `Relaxed`: the
/// `Release` of the [`publish`] that links the page orders it.
#[inline]
pub(crate) fn init(slot: &AtomicU64, value: u64) {
    slot.store(value, Ordering::Relaxed);
}
