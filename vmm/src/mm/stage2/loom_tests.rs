//! Loom models of the slot protocol (`slot.rs`), on a reduced table: one
//! parent entry and lower tables of two entries. The protocol functions are
//! the ones the real table calls; only the broken variants swap one out.
//!
//! - publish/zap/walk: an installer (CAS into the linked table, or a new
//!   table published into the empty parent) races a zapper (freeze parent,
//!   freeze lower entries, clear) and a walker. Checked: a walker never sees
//!   an uninitialized table; FROZEN is never overwritten; an install is
//!   either torn down by the zap or linked after it, never lost. Broken:
//!   `Relaxed` publish, check-then-store install.
//! - the same with the table's writer lock, as the table runs it (installs
//!   hold it shared, the zap exclusively) and the zap's teardown passing
//!   over empty lower entries instead of freezing them: no install is lost
//!   and none lands in the unlinked table. Broken: that teardown with
//!   installs that do not take the lock.
//! - split vs a writing walker: the Dirty bit lands in the lower leaves.
//!   Broken: publishing the table by unconditional swap.
//! - collapse vs a writing walker: no hole, Dirty lands in the huge leaf.
//!   Broken: clearing lower leaves instead of freezing them.
//!
//! Run: `RUSTFLAGS="--cfg vmm_loom" cargo test -p vmm --lib --release mm::stage2`.
//!
//! Grace periods are not modelled: every table lives until the model ends
//! (the threaded tests check epoch reclamation with poisoned pages).

use std::panic::{catch_unwind, AssertUnwindSafe};

use super::entry::{Decoded, Entry, PageSize, Perms, ACCESSED, DIRTY, FROZEN};
use super::slot;
use crate::mm::addr::Hva;
use crate::mm::sync::{thread, Arc, AtomicU64, Ordering};
use loom::sync::RwLock;

/// A table page cut down to two entries. The model never dereferences a
/// frame field: each table has a fixed fake page address (below) that the
/// model maps back to the table, which keeps 4 KiB-aligned values off loom's
/// small coroutine stacks.
struct Mini {
    entries: [AtomicU64; 2],
}

impl Mini {
    fn new(e0: u64, e1: u64) -> Self {
        Mini {
            entries: [AtomicU64::new(e0), AtomicU64::new(e1)],
        }
    }
}

/// The fake page address of the table linked at the start.
const T1: u64 = 0x1000;
/// The fake page address of the installer's new table.
const T2: u64 = 0x2000;
/// The fake page address of the split's lower table.
const T3: u64 = 0x3000;

const LEAF_A: u64 = Entry::leaf(Hva(0xa000), Perms::R, PageSize::Size4K).0;
const LEAF_B: u64 = Entry::leaf(Hva(0xb000), Perms::RW, PageSize::Size4K).0;

type Publish = fn(&AtomicU64, u64, u64) -> Result<(), u64>;

/// The install primitive with a `Relaxed` publish: a walker can see the
/// pointer before the table's contents.
fn publish_relaxed(slot: &AtomicU64, expected: u64, new: u64) -> Result<(), u64> {
    slot.compare_exchange(expected, new, Ordering::Relaxed, Ordering::Relaxed)
        .map(drop)
}

/// The install primitive as a check-then-store instead of a CAS: it can
/// overwrite a value (FROZEN) stored between its check and its store.
fn publish_check_then_store(slot: &AtomicU64, expected: u64, new: u64) -> Result<(), u64> {
    let cur = slot.load(Ordering::Acquire);
    if cur != expected {
        return Err(cur);
    }
    slot.store(new, Ordering::Release);
    Ok(())
}

/// Runs a model that must fail, and checks it failed with one of `needles`
/// in its panic message (so it was caught for an intended reason).
fn expect_caught(model: impl FnOnce(), needles: &[&str]) {
    let err =
        catch_unwind(AssertUnwindSafe(model)).expect_err("loom found no failing interleaving");
    let msg = err
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| err.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    assert!(
        needles.iter().any(|n| msg.contains(n)),
        "caught for another reason: {msg:?}"
    );
}

fn builder(bound: usize) -> loom::model::Builder {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(bound);
    b
}

/// Where the installer's leaf B ended up.
#[derive(PartialEq, Eq, Debug)]
enum Installed {
    /// In the old table T1, before the zapper froze that entry.
    InOld,
    /// In a new table T2 it linked after the zap.
    InNew,
}

/// How the model's zapper and installer run: the protocol alone (every
/// lower entry frozen, no lock), or as the table runs them.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Teardown {
    /// Every lower entry frozen; no writer lock.
    FreezeAll,
    /// Empty lower entries passed over (`edit::teardown`); the zapper holds
    /// the writer lock exclusively, the installer shared when `locked`.
    SkipEmpty { installer_locks: bool },
}

struct PublishZap {
    /// The table's writer lock (`Stage2Table::writer`).
    writer: RwLock<()>,
    parent: AtomicU64,
    /// Linked at the start: [leaf A, empty].
    t1: Mini,
    /// The installer's fresh table, linked only if it wins.
    t2: Mini,
}

impl PublishZap {
    fn table(&self, addr: u64) -> &Mini {
        if addr == T1 {
            &self.t1
        } else {
            assert_eq!(addr, T2, "parent points at an unknown table");
            &self.t2
        }
    }

    /// Map leaf B at index 1, as `map` does: walk, CAS into an existing
    /// table, or build and publish a new one; restart on FROZEN.
    fn install(&self, publish: Publish, teardown: Teardown) -> Installed {
        let _shared = match teardown {
            Teardown::SkipEmpty {
                installer_locks: true,
            } => Some(self.writer.read().expect("lock poisoned")),
            _ => None,
        };
        loop {
            let p = slot::read(&self.parent);
            match Entry(p).decode(2) {
                Decoded::Table(addr) => match publish(&self.table(addr).entries[1], 0, LEAF_B) {
                    Ok(()) if addr == T1 => return Installed::InOld,
                    Ok(()) => return Installed::InNew,
                    Err(v) if v == FROZEN => thread::yield_now(),
                    Err(v) => panic!("index 1 unexpectedly holds {v:#x}"),
                },
                Decoded::Empty => {
                    slot::init(&self.t2.entries[1], LEAF_B);
                    if publish(&self.parent, 0, Entry::table(T2).0).is_ok() {
                        return Installed::InNew;
                    }
                }
                Decoded::Frozen => thread::yield_now(),
                other => panic!("parent decodes as {other:?}"),
            }
        }
    }

    /// Zap the parent as `unmap` does: freeze it, freeze every lower entry
    /// (collecting what they held; with [`Teardown::SkipEmpty`] an entry
    /// read empty is passed over, under the exclusive lock), clear it.
    fn zap(&self, teardown: Teardown) -> [u64; 2] {
        let _excl = match teardown {
            Teardown::SkipEmpty { .. } => Some(self.writer.write().expect("lock poisoned")),
            Teardown::FreezeAll => None,
        };
        let p = slot::read(&self.parent);
        assert_eq!(p, Entry::table(T1).0, "the zapper runs first on T1");
        slot::freeze_if(&self.parent, p).expect("only the zapper changes a linked table entry");
        let take = |e: &AtomicU64| match teardown {
            Teardown::SkipEmpty { .. } if slot::read(e) == 0 => 0,
            _ => slot::freeze(e),
        };
        let old = [take(&self.t1.entries[0]), take(&self.t1.entries[1])];
        slot::unfreeze(&self.parent, 0);
        old
    }

    /// One lock-free walk of both indices: what it reads must be a value
    /// some writer stored after initializing it.
    fn walk(&self) {
        let p = slot::read(&self.parent);
        let Decoded::Table(addr) = Entry(p).decode(2) else {
            return; // empty or frozen: nothing to read
        };
        let t = self.table(addr);
        for (i, e) in t.entries.iter().enumerate() {
            let v = slot::read(e);
            if addr == T2 && i == 1 {
                assert_eq!(v, LEAF_B, "walker saw an uninitialized table entry");
            }
            assert!(
                [0, LEAF_A, LEAF_B, FROZEN].contains(&v),
                "walker read {v:#x}"
            );
        }
    }
}

/// Installer vs zapper vs walker on one parent entry.
fn publish_zap_model(publish: Publish, teardown: Teardown, bound: usize) {
    builder(bound).check(move || {
        let m = Arc::new(PublishZap {
            writer: RwLock::new(()),
            parent: AtomicU64::new(Entry::table(T1).0),
            t1: Mini::new(LEAF_A, 0),
            t2: Mini::new(0, 0),
        });
        let installer = {
            let m = Arc::clone(&m);
            thread::spawn(move || m.install(publish, teardown))
        };
        let walker = {
            let m = Arc::clone(&m);
            thread::spawn(move || m.walk())
        };
        let zapped = m.zap(teardown);
        let installed = installer.join().expect("installer panicked");
        walker.join().expect("walker panicked");

        // FROZEN is never overwritten: T1 stays frozen after its teardown
        // (an entry the teardown passed over as empty stays empty: nothing
        // landed in the unlinked table).
        for (e, &was) in m.t1.entries.iter().zip(&zapped) {
            let now = e.load(Ordering::Relaxed);
            if teardown != Teardown::FreezeAll && was == 0 {
                assert_eq!(now, 0, "an install into T1 was lost");
            } else {
                assert_eq!(now, FROZEN, "an installer overwrote FROZEN");
            }
        }
        let parent = m.parent.load(Ordering::Relaxed);
        match installed {
            // Installed before the teardown reached it: the zapper saw it.
            Installed::InOld => {
                assert_eq!(zapped[1], LEAF_B, "an install into T1 was lost");
                assert_eq!(parent, 0);
            }
            // Installed after the zap: the new table is linked.
            Installed::InNew => {
                assert_eq!(zapped[1], 0);
                assert_eq!(parent, Entry::table(T2).0);
            }
        }
        assert_eq!(zapped[0], LEAF_A);
    });
}

#[test]
fn test_loom_publish_zap_walker_protocol_holds() {
    publish_zap_model(slot::publish, Teardown::FreezeAll, 3);
}

/// The table as it runs: installs under the shared lock, the zap under the
/// exclusive one, its teardown passing over empty entries.
#[test]
fn test_loom_teardown_skipping_empty_entries_under_the_writer_lock_holds() {
    publish_zap_model(
        slot::publish,
        Teardown::SkipEmpty {
            installer_locks: true,
        },
        3,
    );
}

/// Passing over empty entries is sound only because no install runs during
/// a zap: with a lock-free install, one lands in the empty entry after the
/// teardown read it, in a table already unlinked, and is lost.
#[test]
fn test_loom_teardown_skipping_empty_entries_without_the_lock_is_caught() {
    expect_caught(
        || {
            publish_zap_model(
                slot::publish,
                Teardown::SkipEmpty {
                    installer_locks: false,
                },
                3,
            )
        },
        &["an install into T1 was lost"],
    );
}

#[test]
fn test_loom_relaxed_publish_is_caught() {
    expect_caught(
        || publish_zap_model(publish_relaxed, Teardown::FreezeAll, 3),
        &["walker saw an uninitialized table entry"],
    );
}

/// A check-then-store install races the zapper's freeze: the store lands on
/// FROZEN. Loom 0.7 may report that execution through the second check
/// instead: it can let an RMW read a value older than a racing plain store
/// (tokio-rs/loom#254), so it sees the install "lost" rather than the
/// overwrite. Either check fails only for a non-atomic install.
#[test]
fn test_loom_check_then_store_install_is_caught() {
    expect_caught(
        || publish_zap_model(publish_check_then_store, Teardown::FreezeAll, 3),
        &[
            "an installer overwrote FROZEN",
            "an install into T1 was lost",
        ],
    );
}

/// Split vs a walker setting Dirty on the huge leaf: the split publishes a
/// filled lower table in one CAS from the leaf value it copied, so the Dirty
/// bit lands either in that copy or makes the CAS fail and the split retry.
fn split_dirty_model(publish: Publish, bound: usize) {
    const HUGE: u64 = Entry::leaf(Hva(0x20_0000), Perms::RW, PageSize::Size2M).0;
    builder(bound).check(move || {
        let m = Arc::new((AtomicU64::new(HUGE), Mini::new(0, 0)));
        let walker = {
            let m = Arc::clone(&m);
            thread::spawn(move || {
                // `translate(.., Write)` on the huge leaf.
                let v = slot::read(&m.0);
                match Entry(v).decode(2) {
                    Decoded::Leaf(_) => slot::update_leaf(&m.0, v, v | ACCESSED | DIRTY).is_ok(),
                    Decoded::Table(_) => false, // split first; the walker would walk on
                    other => panic!("walker read {other:?}"),
                }
            })
        };
        // `split_slot`: fill the lower table from the leaf, publish, retry.
        let child = &m.1;
        let mut v = slot::read(&m.0);
        loop {
            let ad = v & (ACCESSED | DIRTY);
            for (i, e) in child.entries.iter().enumerate() {
                let hva = Hva(0x20_0000 + i as u64 * 0x1000);
                slot::init(e, Entry::leaf(hva, Perms::RW, PageSize::Size4K).0 | ad);
            }
            match publish(&m.0, v, Entry::table(T3).0) {
                Ok(()) => break,
                Err(now) => v = now,
            }
        }
        let dirtied = walker.join().expect("walker panicked");
        if dirtied {
            for e in &child.entries {
                let v = e.load(Ordering::Relaxed);
                assert_ne!(v & DIRTY, 0, "split lost the walker's Dirty bit");
            }
        }
    });
}

/// The install primitive as an unconditional swap: a split that overwrites
/// whatever the leaf became.
fn publish_swap(slot: &AtomicU64, _expected: u64, new: u64) -> Result<(), u64> {
    slot.swap(new, Ordering::AcqRel);
    Ok(())
}

#[test]
fn test_loom_split_keeps_concurrent_dirty_bit() {
    split_dirty_model(slot::publish, 3);
}

#[test]
fn test_loom_split_by_swap_loses_dirty_bit_is_caught() {
    expect_caught(
        || split_dirty_model(publish_swap, 3),
        &["split lost the walker's Dirty bit"],
    );
}

/// How a collapse takes a lower leaf out of service.
type TakeLeaf = fn(&AtomicU64, u64) -> Result<(), u64>;

/// A broken collapse: it clears the lower leaves (as a zap would) instead of
/// freezing them, so a walker can find a hole in memory that stays mapped.
fn take_leaf_by_clearing(slot: &AtomicU64, expected: u64) -> Result<(), u64> {
    slot.compare_exchange(expected, 0, Ordering::AcqRel, Ordering::Acquire)
        .map(drop)
}

/// Collapse vs a walker writing through lower leaf 1: the walker never finds
/// a hole (a frozen leaf makes it restart; it then finds the huge leaf), and
/// its Dirty bit survives into the huge leaf wherever it landed.
fn collapse_model(take: TakeLeaf, bound: usize) {
    const HUGE: u64 = Entry::leaf(Hva(0x20_0000), Perms::RW, PageSize::Size2M).0;
    const L0: u64 = Entry::leaf(Hva(0x20_0000), Perms::RW, PageSize::Size4K).0;
    const L1: u64 = Entry::leaf(Hva(0x20_1000), Perms::RW, PageSize::Size4K).0;
    builder(bound).check(move || {
        let m = Arc::new((AtomicU64::new(Entry::table(T1).0), Mini::new(L0, L1)));
        let walker = {
            let m = Arc::clone(&m);
            thread::spawn(move || loop {
                // `translate(gpa of lower page 1, Write)`.
                let p = slot::read(&m.0);
                let (slot, v) = match Entry(p).decode(2) {
                    Decoded::Table(addr) => {
                        assert_eq!(addr, T1);
                        let v = slot::read(&m.1.entries[1]);
                        (&m.1.entries[1], v)
                    }
                    Decoded::Leaf(_) => (&m.0, p),
                    other => panic!("walker read parent {other:?}"),
                };
                match Entry(v).decode(1) {
                    Decoded::Frozen => thread::yield_now(),
                    Decoded::Empty => panic!("walker found a hole during the collapse"),
                    Decoded::Leaf(_) => {
                        if slot::update_leaf(slot, v, v | ACCESSED | DIRTY).is_ok() {
                            return;
                        }
                    }
                    other => panic!("walker read leaf {other:?}"),
                }
            })
        };
        // `collapse_slot`: take each lower leaf (retrying on A/D changes),
        // then publish the huge leaf with the OR of their A/D bits.
        let mut ad = 0;
        for e in &m.1.entries {
            let mut v = slot::read(e);
            while let Err(now) = take(e, v) {
                v = now;
            }
            ad |= v & (ACCESSED | DIRTY);
        }
        slot::publish(&m.0, Entry::table(T1).0, HUGE | ad).expect("parent changed");
        walker.join().expect("walker panicked");
        let huge = m.0.load(Ordering::Relaxed);
        assert_ne!(huge & DIRTY, 0, "collapse lost the walker's Dirty bit");
    });
}

#[test]
fn test_loom_collapse_never_shows_a_hole_and_keeps_dirty() {
    collapse_model(slot::freeze_if, 3);
}

#[test]
fn test_loom_collapse_by_clearing_shows_a_hole_is_caught() {
    expect_caught(
        || collapse_model(take_leaf_by_clearing, 3),
        &["walker found a hole during the collapse"],
    );
}
