//! The incremental consistency check on real KVM: a dirty-logging slot
//! created on the VM fd behind the manager's back, in the range an op just
//! unplugged, is found by the periodic full check or by the incremental
//! check's sweep; logging switched off on a slot the op touched is found by
//! that op's check itself.

use std::time::Duration;

use vmm::mm::manager::{CheckKind, Checker};

use super::*;

#[test]
fn test_memslots_incremental_check_finds_a_stray_in_the_op_range() {
    let Some(f) = fixture("memslots incremental check", 16) else {
        return;
    };
    let a = anon(2 * MIB);
    let hva = f.probe.hva().0;
    // No sweep: only the periodic full check (every 3 ops) can see id 15.
    let mut checker = Checker::new(3).with_sweep(Duration::ZERO);
    f.plug(0, 2 * MIB, &a);
    let applied = f.memory.apply(|m| m.unplug(Gpa(MIB), MIB)).unwrap();
    assert_eq!(
        checker.after_op(&f.memory, Some(&applied.changes)),
        Ok(CheckKind::Incremental)
    );
    // A dirty-logging slot in the range that op just unplugged.
    f.faulty.raw(region(15, MIB, MIB, hva, LOG_DIRTY)).unwrap();
    let applied = f.memory.apply(|m| m.unplug(Gpa(0), 0x8_0000)).unwrap();
    assert_eq!(
        checker.after_op(&f.memory, Some(&applied.changes)),
        Ok(CheckKind::Incremental),
        "the op's own ids do not include 15"
    );
    let applied = f
        .memory
        .apply(|m| m.protect(Gpa(0x8_0000), 0x1000, true))
        .unwrap();
    let why = checker
        .after_op(&f.memory, Some(&applied.changes))
        .unwrap_err();
    assert!(why.contains("slot 15"), "{why}");

    // With a sweep whose budget covers all 16 ids, the next incremental
    // check finds it.
    let mut checker = Checker::new(1000).with_sweep(Duration::from_secs(1));
    let why = checker.after_op(&f.memory, Some(&[])).unwrap_err();
    assert!(why.contains("slot 15"), "{why}");
    f.faulty.raw(region(15, MIB, 0, hva, 0)).unwrap();
    checker.after_op(&f.memory, Some(&[])).unwrap();
    f.memory.check_consistency().unwrap();
}

#[test]
fn test_memslots_incremental_check_finds_logging_switched_off_on_a_touched_slot() {
    let Some(f) = fixture("memslots incremental touched", 16) else {
        return;
    };
    let a = anon(2 * MIB);
    f.plug(0, 2 * MIB, &a);
    let applied = f
        .memory
        .apply(|m| m.set_dirty_log(Gpa(0), 2 * MIB, true))
        .unwrap();
    let spec = f.memory.registered()[0];
    f.faulty
        .raw(region(spec.id.0, spec.gpa.0, spec.size, spec.hva.0, 0))
        .unwrap();
    let why = f.memory.check_changes(&applied.changes).unwrap_err();
    assert!(why.contains("not live"), "{why}");
}
