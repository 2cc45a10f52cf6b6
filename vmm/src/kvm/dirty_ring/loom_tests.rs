//! Loom models of the dirty-ring handshake (see the parent module's docs),
//! with the harvester's step being the one the real iterator runs
//! ([`collect_entry`]); only the broken variants swap an ordering.
//!
//! - publish: KVM writes the entry's offset, then stores `DIRTY` with
//!   release; the harvester loads `flags` and, seeing `DIRTY`, reads the
//!   offset. Checked: it reads the offset KVM wrote (loom flags the read as
//!   a data race otherwise). Broken: a relaxed load of `flags`.
//! - reuse: after the harvester stores `RESET`, the reset (`KVM_RESET_DIRTY_RINGS`)
//!   loads `flags` with acquire, frees the entry and KVM writes the next
//!   offset into it. Checked: the harvester's read happens before that
//!   write. Broken: a relaxed store of `RESET`.
//!
//! Run: `RUSTFLAGS="--cfg vmm_loom" cargo test -p vmm --lib --release kvm::dirty_ring`.

use std::panic::{catch_unwind, AssertUnwindSafe};

use loom::cell::UnsafeCell;
use loom::sync::atomic::AtomicU32;
use loom::sync::Arc;
use loom::thread;
use std::sync::atomic::Ordering;

use super::{
    collect_entry, EntryFlags, HarvestOrder, DIRTY_GFN_F_DIRTY, DIRTY_GFN_F_RESET, HARVEST_ORDER,
};

impl EntryFlags for AtomicU32 {
    fn load_flags(&self, order: Ordering) -> u32 {
        self.load(order)
    }
    fn store_flags(&self, value: u32, order: Ordering) {
        self.store(value, order)
    }
}

/// One ring entry: `flags` atomic, `offset` plain memory (as in the ring).
struct Entry {
    flags: AtomicU32,
    offset: UnsafeCell<u64>,
}

impl Entry {
    fn new() -> Self {
        Entry {
            flags: AtomicU32::new(0),
            offset: UnsafeCell::new(0),
        }
    }

    /// KVM's push (`kvm_dirty_ring_push`): the offset, then DIRTY with release.
    fn push(&self, offset: u64) {
        self.offset.with_mut(|p| {
            // SAFETY: `p` points to the cell's value, valid for writes; KVM
            // owns a free entry, and loom reports any access racing this one.
            unsafe { *p = offset }
        });
        self.flags.store(DIRTY_GFN_F_DIRTY, Ordering::Release);
    }

    /// The harvester's step.
    fn harvest(&self, order: HarvestOrder) -> Option<u64> {
        let read = || {
            self.offset.with(|p| {
                // SAFETY: `p` points to the cell's value, valid for reads;
                // whether KVM's write happens before it is what loom checks.
                unsafe { *p }
            })
        };
        collect_entry(&self.flags, read, order)
    }
}

fn publish_model(order: HarvestOrder) {
    loom::model(move || {
        let entry = Arc::new(Entry::new());
        let kvm = {
            let entry = entry.clone();
            thread::spawn(move || entry.push(7))
        };
        if let Some(offset) = entry.harvest(order) {
            assert_eq!(offset, 7, "harvested an offset KVM did not publish");
        }
        kvm.join().unwrap();
    });
}

fn reuse_model(order: HarvestOrder) {
    loom::model(move || {
        let entry = Arc::new(Entry::new());
        entry.push(7);
        let reset = {
            let entry = entry.clone();
            thread::spawn(move || {
                // KVM_RESET_DIRTY_RINGS, then KVM reuses the entry.
                if entry.flags.load(Ordering::Acquire) == DIRTY_GFN_F_RESET {
                    entry.flags.store(0, Ordering::Relaxed);
                    entry.push(9);
                }
            })
        };
        let got = entry.harvest(order);
        assert_eq!(got, Some(7));
        reset.join().unwrap();
    });
}

fn expect_caught(model: impl FnOnce()) {
    let err =
        catch_unwind(AssertUnwindSafe(model)).expect_err("loom found no failing interleaving");
    let msg = err
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| err.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    assert!(
        ["race", "Causality", "causality", "did not publish"]
            .iter()
            .any(|n| msg.contains(n)),
        "caught for another reason: {msg:?}"
    );
}

#[test]
fn loom_dirty_ring_harvest_reads_what_kvm_published() {
    publish_model(HARVEST_ORDER);
}

#[test]
fn loom_dirty_ring_relaxed_flags_load_is_caught() {
    expect_caught(|| {
        publish_model(HarvestOrder {
            load: Ordering::Relaxed,
            ..HARVEST_ORDER
        })
    });
}

#[test]
fn loom_dirty_ring_reset_orders_the_read_before_reuse() {
    reuse_model(HARVEST_ORDER);
}

#[test]
fn loom_dirty_ring_relaxed_reset_store_is_caught() {
    expect_caught(|| {
        reuse_model(HarvestOrder {
            reset: Ordering::Relaxed,
            ..HARVEST_ORDER
        })
    });
}
