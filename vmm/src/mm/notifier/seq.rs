//! The fault-path sequence protocol, after KVM's `mmu_invalidate_seq` /
//! `mmu_invalidate_in_progress` / `mmu_invalidate_retry_gfn`
//! (`virt/kvm/kvm_main.c`, `include/linux/kvm_host.h`).
//!
//! A fault path (a reader) that builds a translation without holding the
//! writer's locks does:
//!
//! 1. `seq = read_begin()`;
//! 2. resolve the translation (slot-map lookup, no lock held here);
//! 3. take *its own* lock (the one its `invalidate_start` callback also takes),
//!    and call `retry(seq, range)`: if `true`, drop the result and start again;
//!    if `false`, install the result *under that same lock*.
//!
//! A writer brackets every change with [`SeqState::start`] and
//! [`SeqState::end`].
//!
//! # Invariants
//! - `in_progress` equals the number of `start`s without their `end`, and
//!   `ranges` holds exactly those invalidations' ranges; both change together
//!   under the `ranges` mutex.
//! - `seq` is bumped by every `end`, before `in_progress` is decremented. It is
//!   *not* bumped at `start` (as in KVM): an invalidation that started after
//!   `read_begin` and still runs is caught by the range check if it overlaps,
//!   and does not concern the reader if it does not.
//!
//! # Memory ordering (KVM's `smp_wmb`/`smp_rmb` pairing)
//! - `end`: `seq.fetch_add(Release)` then `in_progress.fetch_sub(Release)` —
//!   KVM's `mmu_invalidate_seq++; smp_wmb(); mmu_invalidate_in_progress--`.
//! - `retry`: `in_progress.load(Acquire)` then (if non-zero, the range list
//!   under the mutex) then `seq.load(Acquire)` — KVM's `smp_rmb()` between the
//!   two reads in `mmu_invalidate_retry_gfn`. If the reader sees the count
//!   drop to 0 it read from the release sequence of an `end`'s decrement, so
//!   it also sees that `end`'s `seq` bump.
//! - `read_begin`: `seq.load(Acquire)` — KVM's `smp_rmb()` after reading
//!   `mmu_invalidate_seq`: the resolve in step 2 is ordered after it, so a
//!   reader that saw an `end`'s bump also sees the teardown done before it.
//! - `start`: the range push and `in_progress` increment happen under the
//!   mutex; a reader that sees the increment (Acquire) and then takes the mutex
//!   necessarily takes it after the writer released it (a load cannot read a
//!   store that happens after it), so it sees the range.
//! - The last step — "retry returned false, so my install cannot miss a later
//!   start" — is what KVM gets from `mmu_lock`: the reader checks and installs
//!   under its lock `L`; the writer's `start` (increment) is sequenced before it
//!   delivers `invalidate_start`, which takes `L` to drop translations. Either
//!   the reader's critical section comes first (and the start drops what it
//!   installed) or it comes after and, synchronized by `L`, sees the increment.

use crate::mm::addr::GpaRange;
use crate::mm::sync::{AtomicU64, AtomicUsize, Condvar, Mutex, MutexGuard, Ordering};

/// A snapshot of the invalidation sequence count taken by
/// [`InvalidationHub::read_begin`](super::InvalidationHub::read_begin), to be
/// passed to [`InvalidationHub::retry`](super::InvalidationHub::retry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "a read sequence is only useful when checked with retry()"]
pub struct ReadSeq(pub(super) u64);

/// One running invalidation in the sequence state.
#[derive(Debug)]
struct Running {
    id: u64,
    range: GpaRange,
}

/// The sequence count, the in-progress count and the in-progress ranges.
#[derive(Debug)]
pub(super) struct SeqState {
    /// Bumped by every `end` (KVM's `mmu_invalidate_seq`).
    seq: AtomicU64,
    /// Number of invalidations between `start` and `end` (KVM's
    /// `mmu_invalidate_in_progress`); readable without the mutex.
    in_progress: AtomicUsize,
    /// The exact ranges in progress (KVM keeps their union instead).
    ranges: Mutex<Vec<Running>>,
    /// Signalled by an `end` that finds a waiter, for [`SeqState::wait_idle`].
    idle: Condvar,
    /// Threads in [`SeqState::wait_idle`]'s wait; changed and read only
    /// under `ranges`, so an `end` that finds 0 has no waiter to wake:
    /// a later waiter takes the mutex after that `end` and sees its range
    /// gone. (A notify is a futex syscall even with nobody waiting.)
    waiters: AtomicUsize,
    /// Broken on purpose (models only): `end` reads `waiters` before it
    /// takes the mutex, so a waiter arriving in between is never woken.
    #[cfg(test)]
    pub(super) early_waiter_check: bool,
}

/// Locks `m`, ignoring poisoning: every critical section in this module leaves
/// the protected data consistent before anything that can panic runs.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SeqState {
    pub(super) fn new() -> Self {
        Self {
            seq: AtomicU64::new(0),
            in_progress: AtomicUsize::new(0),
            ranges: Mutex::new(Vec::new()),
            idle: Condvar::new(),
            waiters: AtomicUsize::new(0),
            #[cfg(test)]
            early_waiter_check: false,
        }
    }

    /// Marks invalidation `id` of `range` as in progress (KVM's
    /// `mmu_invalidate_begin`). Must be called before any translation of
    /// `range` is torn down or any `invalidate_start` is delivered.
    pub(super) fn start(&self, id: u64, range: GpaRange) {
        let mut ranges = lock(&self.ranges);
        ranges.push(Running { id, range });
        self.in_progress.fetch_add(1, Ordering::Release);
    }

    /// Ends invalidation `id` (KVM's `mmu_invalidate_end`): bumps the sequence
    /// count, then drops the in-progress count. Returns `false` (and changes
    /// nothing) if `id` is not in progress.
    pub(super) fn end(&self, id: u64) -> bool {
        #[cfg(test)]
        let early = self
            .early_waiter_check
            .then(|| self.waiters.load(Ordering::Relaxed));
        let mut ranges = lock(&self.ranges);
        let Some(pos) = ranges.iter().position(|r| r.id == id) else {
            return false;
        };
        ranges.swap_remove(pos);
        // smp_wmb(): the bump is visible to anyone who sees the decrement.
        self.seq.fetch_add(1, Ordering::Release);
        self.in_progress.fetch_sub(1, Ordering::Release);
        let waiters = self.waiters.load(Ordering::Relaxed);
        #[cfg(test)]
        let waiters = early.unwrap_or(waiters);
        drop(ranges);
        if waiters > 0 {
            self.idle.notify_all();
        }
        true
    }

    /// KVM's `mmu_invalidate_seq` read followed by `smp_rmb()`.
    pub(super) fn read_begin(&self) -> ReadSeq {
        ReadSeq(self.seq.load(Ordering::Acquire))
    }

    /// KVM's `mmu_invalidate_retry_gfn` for a range: `true` if an overlapping
    /// invalidation is in progress or any invalidation ended since `seq`.
    pub(super) fn retry(&self, seq: ReadSeq, range: GpaRange) -> bool {
        if self.overlaps_in_progress(range) {
            return true;
        }
        // smp_rmb() between the in-progress read above and this one.
        self.seq.load(Ordering::Acquire) != seq.0
    }

    /// Whether an invalidation overlapping `range` is in progress now.
    pub(super) fn overlaps_in_progress(&self, range: GpaRange) -> bool {
        if self.in_progress.load(Ordering::Acquire) == 0 {
            return false;
        }
        lock(&self.ranges).iter().any(|r| r.range.overlaps(&range))
    }

    /// Number of invalidations in progress.
    pub(super) fn in_progress(&self) -> usize {
        self.in_progress.load(Ordering::Acquire)
    }

    /// Blocks until no invalidation overlapping `range` is in progress.
    pub(super) fn wait_idle(&self, range: GpaRange) {
        let mut ranges = lock(&self.ranges);
        while ranges.iter().any(|r| r.range.overlaps(&range)) {
            self.waiters.fetch_add(1, Ordering::Relaxed);
            ranges = self.idle.wait(ranges).unwrap_or_else(|e| e.into_inner());
            self.waiters.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(all(test, not(vmm_loom), not(vmm_shuttle)))]
mod tests {
    use super::*;
    use crate::mm::addr::Gpa;

    fn r(start: u64, len: u64) -> GpaRange {
        GpaRange::new(Gpa(start), len).unwrap()
    }

    #[test]
    fn test_seq_retry_overlapping_in_progress_is_true() {
        let s = SeqState::new();
        let seq = s.read_begin();
        s.start(1, r(0x1000, 0x1000));
        assert!(s.retry(seq, r(0x1000, 0x1000)));
        assert!(s.retry(s.read_begin(), r(0x1fff, 1)));
    }

    #[test]
    fn test_seq_retry_disjoint_in_progress_is_false() {
        let s = SeqState::new();
        s.start(1, r(0x1000, 0x1000));
        let seq = s.read_begin();
        assert!(!s.retry(seq, r(0x2000, 0x1000)));
    }

    #[test]
    fn test_seq_retry_after_end_is_true_even_disjoint() {
        let s = SeqState::new();
        let seq = s.read_begin();
        s.start(1, r(0x1000, 0x1000));
        assert!(s.end(1));
        assert!(s.retry(seq, r(0x8000, 0x1000)));
        assert!(!s.retry(s.read_begin(), r(0x1000, 0x1000)));
    }

    #[test]
    fn test_seq_end_unknown_id_changes_nothing() {
        let s = SeqState::new();
        let seq = s.read_begin();
        assert!(!s.end(7));
        assert_eq!(s.read_begin(), seq);
        assert_eq!(s.in_progress(), 0);
    }
}
