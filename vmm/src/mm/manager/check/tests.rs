//! The incremental check on the simulated KVM: it passes after ops, and
//! corruption behind the manager's back is caught by the next incremental
//! check or, at the latest, by the periodic full one.

use std::sync::Arc;
use std::time::Duration;

use crate::mm::addr::{Gpa, Hva, PAGE_SIZE};
use crate::mm::backing::{BackingKind, HostMapping};
use crate::mm::manager::{
    Applied, CheckKind, Checker, MemoryManager, MemslotBackend, MemslotError, MemslotRegion, SimKvm,
};
use crate::mm::slot_map::{MemslotFlags, SlotFlags, SlotId, SlotMapConfig};

const P: u64 = PAGE_SIZE;

fn manager(max_slots: u32) -> (Arc<SimKvm>, MemoryManager) {
    let kvm = Arc::new(SimKvm::with_max_slots(max_slots));
    let config = SlotMapConfig {
        max_slots,
        ..SlotMapConfig::default()
    };
    let memory = MemoryManager::new(Arc::clone(&kvm), config).unwrap();
    (kvm, memory)
}

fn anon(pages: u64) -> Arc<HostMapping> {
    Arc::new(HostMapping::new(&BackingKind::Anon, pages * P).unwrap())
}

/// Creates a memslot directly on the simulated KVM, as a bug elsewhere in
/// the VMM calling `KVM_SET_USER_MEMORY_REGION` on the VM fd would.
fn stray(kvm: &SimKvm, id: u32, gpa: u64, flags: MemslotFlags) {
    let region = MemslotRegion {
        slot: SlotId(id),
        flags,
        gpa: Gpa(gpa),
        size: P,
        hva: Hva(0x1000),
    };
    // SAFETY: the simulated KVM never touches host memory.
    unsafe { kvm.set_memslot(&region) }.unwrap();
}

#[test]
fn test_check_changes_passes_after_every_kind_of_op() {
    let (_kvm, memory) = manager(64);
    let mut checker = Checker::new(1000);
    let a = anon(16);
    type Op<'a> = Box<dyn Fn(&MemoryManager) -> Result<Applied, MemslotError> + 'a>;
    let ops: Vec<Op<'_>> = vec![
        Box::new(|m: &MemoryManager| {
            m.apply(|map| map.plug(Gpa(0x10_0000), 16 * P, a.clone(), 0, SlotFlags::NONE))
        }),
        Box::new(|m| m.apply(|map| map.protect(Gpa(0x10_2000), P, true))),
        Box::new(|m| m.apply(|map| map.set_dirty_log(Gpa(0x10_0000), 16 * P, true))),
        Box::new(|m| m.apply(|map| map.move_range(Gpa(0x10_8000), 2 * P, Gpa(0x40_0000)))),
        Box::new(|m| m.apply(|map| map.unplug(Gpa(0x10_0000), 4 * P))),
    ];
    for op in ops {
        let applied = op(&memory).unwrap();
        let kind = checker.after_op(&memory, Some(&applied.changes)).unwrap();
        assert_eq!(kind, CheckKind::Incremental);
    }
    // A refused op changes nothing: the check with no changes passes.
    assert!(memory.apply(|map| map.unplug(Gpa(0x80_0000), P)).is_err());
    checker.after_op(&memory, Some(&[])).unwrap();
    checker.full(&memory).unwrap();
}

#[test]
fn test_check_changes_catches_a_touched_slot_deleted_behind_the_manager() {
    let (kvm, memory) = manager(64);
    let a = anon(4);
    let flags = SlotFlags {
        dirty_log: true,
        ..SlotFlags::NONE
    };
    let applied = memory
        .apply(|map| map.plug(Gpa(0x10_0000), 4 * P, a.clone(), 0, flags))
        .unwrap();
    let spec = memory.registered()[0];
    // SAFETY: a delete registers no memory.
    unsafe { kvm.set_memslot(&MemslotRegion::delete(&spec)) }.unwrap();
    let why = memory.check_changes(&applied.changes).unwrap_err();
    assert!(why.contains("not live in KVM"), "{why}");
}

#[test]
fn test_stray_dirty_logging_slot_in_the_op_range_is_caught_by_the_sweep() {
    let (kvm, memory) = manager(64);
    // A sweep budget that probes all 64 ids in one check.
    let mut checker = Checker::new(1000).with_sweep(Duration::from_secs(10));
    let a = anon(4);
    let applied = memory
        .apply(|map| map.plug(Gpa(0x10_0000), 4 * P, a.clone(), 0, SlotFlags::NONE))
        .unwrap();
    let applied_unplug = memory
        .apply(|map| map.unplug(Gpa(0x10_0000), 4 * P))
        .unwrap();
    checker.after_op(&memory, Some(&applied.changes)).unwrap();
    stray(&kvm, 40, 0x10_0000, MemslotFlags::LOG_DIRTY_PAGES);
    let why = checker
        .after_op(&memory, Some(&applied_unplug.changes))
        .unwrap_err();
    assert!(why.contains("slot 40"), "{why}");
}

#[test]
fn test_stray_missed_by_incremental_checks_is_caught_by_the_periodic_full_check() {
    let (kvm, memory) = manager(64);
    let mut checker = Checker::new(4).with_sweep(Duration::ZERO);
    let a = anon(64);
    stray(&kvm, 50, 0x100_0000, MemslotFlags::LOG_DIRTY_PAGES);
    let mut results = Vec::new();
    for i in 0..4 {
        let applied = memory
            .apply(|map| map.plug(Gpa(i * 2 * P), P, a.clone(), i * P, SlotFlags::NONE))
            .unwrap();
        results.push(checker.after_op(&memory, Some(&applied.changes)));
    }
    assert!(results[..3]
        .iter()
        .all(|r| *r == Ok(CheckKind::Incremental)));
    let why = results[3].clone().unwrap_err();
    assert!(why.contains("slot 50"), "{why}");
}

#[test]
fn test_sweep_probes_at_least_one_id_per_check_and_wraps() {
    let (kvm, memory) = manager(4);
    let mut checker = Checker::new(1000).with_sweep(Duration::ZERO);
    checker = checker.with_sweep(Duration::from_nanos(1));
    stray(&kvm, 2, 0x10_0000, MemslotFlags::LOG_DIRTY_PAGES);
    // One id per check (the budget is spent at once): ids 0 and 1 are fine,
    // id 2 is the stray.
    assert_eq!(
        checker.after_op(&memory, Some(&[])),
        Ok(CheckKind::Incremental)
    );
    assert_eq!(
        checker.after_op(&memory, Some(&[])),
        Ok(CheckKind::Incremental)
    );
    let why = checker.after_op(&memory, Some(&[])).unwrap_err();
    assert!(why.contains("slot 2"), "{why}");
    assert_eq!(memory.probe_ids(3..100, Duration::from_secs(1)), Ok(4));
}

#[test]
fn test_unknown_changes_get_a_full_check() {
    let (_kvm, memory) = manager(16);
    let mut checker = Checker::new(100);
    assert_eq!(checker.after_op(&memory, None), Ok(CheckKind::Full));
}
