//! The memory manager with the invalidation hub and the slot guards: what
//! subscribers see around each op, vetoes, guards held past the drain
//! bound, rollbacks, and teardown at drop.

use super::tests::{anon, assert_cells_match_map, config, P};
use super::*;
use crate::mm::notifier::{Interest, Replay, Subscriber};
use crate::mm::slot_map::SlotFlags;

/// Records what the hub delivers, in order.
#[derive(Default)]
struct Events(Mutex<Vec<String>>);

impl Subscriber for Events {
    fn invalidate_start(&self, range: GpaRange, reason: Reason) {
        self.0
            .lock()
            .unwrap()
            .push(format!("start {range} {reason}"));
    }
    fn invalidate_end(&self, range: GpaRange) {
        self.0.lock().unwrap().push(format!("end {range}"));
    }
    fn memory_added(&self, range: GpaRange, reason: Reason) {
        self.0
            .lock()
            .unwrap()
            .push(format!("added {range} {reason}"));
    }
}

fn take(events: &Events) -> Vec<String> {
    std::mem::take(&mut *events.0.lock().unwrap())
}

fn r(start: u64, len: u64) -> GpaRange {
    GpaRange::new(Gpa(start), len).unwrap()
}

#[test]
fn test_manager_hub_sees_start_end_around_every_op_that_takes_memory() {
    let kvm = Arc::new(SimKvm::new());
    let memory = MemoryManager::new(Arc::clone(&kvm), config()).unwrap();
    let events = Arc::new(Events::default());
    memory
        .hub()
        .subscribe(Interest::All, events.clone(), Replay::Plugged)
        .unwrap();
    let a = anon(8);
    memory
        .apply(|m| m.plug(Gpa(0), 8 * P, a.clone(), 0, SlotFlags::NONE))
        .unwrap();
    assert_eq!(take(&events), [format!("added {} plug", r(0, 8 * P))]);
    memory.apply(|m| m.protect(Gpa(2 * P), P, true)).unwrap();
    let protect = r(2 * P, P);
    assert_eq!(
        take(&events),
        [format!("start {protect} protect"), format!("end {protect}")]
    );
    memory.apply(|m| m.protect(Gpa(2 * P), P, false)).unwrap();
    assert!(take(&events).is_empty(), "unprotect takes nothing away");
    memory
        .apply(|m| m.move_range(Gpa(6 * P), 2 * P, Gpa(16 * P)))
        .unwrap();
    let (src, dst) = (r(6 * P, 2 * P), r(16 * P, 2 * P));
    assert_eq!(
        take(&events),
        [
            format!("start {src} move"),
            format!("end {src}"),
            format!("added {dst} move")
        ]
    );
    memory.apply(|m| m.unplug(Gpa(0), 4 * P)).unwrap();
    let gone = r(0, 4 * P);
    assert_eq!(
        take(&events),
        [format!("start {gone} unplug"), format!("end {gone}")]
    );
    assert_eq!(memory.hub().plugged(), vec![r(4 * P, 2 * P), dst]);
    // Resize: the tail goes as a shrink, comes back as a grow.
    memory.apply(|m| m.resize(Gpa(16 * P), P, None)).unwrap();
    let tail = r(17 * P, P);
    assert_eq!(
        take(&events),
        [format!("start {tail} shrink"), format!("end {tail}")]
    );
    memory
        .apply(|m| m.resize(Gpa(16 * P), 2 * P, None))
        .unwrap();
    assert_eq!(take(&events), [format!("added {tail} grow")]);
}

struct Veto;
impl Subscriber for Veto {
    fn invalidate_start(&self, _: GpaRange, _: Reason) {}
    fn invalidate_end(&self, _: GpaRange) {}
    fn check(&self, range: GpaRange, _: Reason) -> Result<(), String> {
        Err(format!("pinned {range}"))
    }
}

#[test]
fn test_manager_vetoed_op_issues_no_ioctl_and_changes_nothing() {
    let kvm = Arc::new(SimKvm::new());
    let memory = MemoryManager::new(Arc::clone(&kvm), config()).unwrap();
    let a = anon(8);
    memory
        .apply(|m| m.plug(Gpa(0), 8 * P, a.clone(), 0, SlotFlags::NONE))
        .unwrap();
    let id = memory
        .hub()
        .subscribe(Interest::Range(r(P, P)), Arc::new(Veto), Replay::None)
        .unwrap();
    let before = memory.load();
    let calls = kvm.calls();
    let err = memory.apply(|m| m.unplug(Gpa(0), 4 * P)).unwrap_err();
    assert!(matches!(err, MemslotError::Vetoed(_)), "{err}");
    assert!(err.to_string().contains("pinned"), "{err}");
    assert_eq!(kvm.calls(), calls);
    assert!(Arc::ptr_eq(&before, &memory.load()));
    assert_eq!(memory.hub().in_progress(), 0);
    memory.hub().unsubscribe(id).unwrap();
    memory.apply(|m| m.unplug(Gpa(0), 4 * P)).unwrap();
    assert_cells_match_map(&memory);
}

#[test]
fn test_manager_veto_of_a_later_range_delivers_nothing_for_the_earlier_ones() {
    // Two slots with a hole between them: an unplug over both is announced
    // as two ranges; a pin on the second refuses the op before the first
    // range's subscribers hear anything.
    let kvm = Arc::new(SimKvm::new());
    let memory = MemoryManager::new(Arc::clone(&kvm), config()).unwrap();
    let (a, b) = (anon(4), anon(4));
    memory
        .apply(|m| m.plug(Gpa(0), 4 * P, a.clone(), 0, SlotFlags::NONE))
        .unwrap();
    memory
        .apply(|m| m.plug(Gpa(6 * P), 4 * P, b.clone(), 0, SlotFlags::NONE))
        .unwrap();
    let events = Arc::new(Events::default());
    memory
        .hub()
        .subscribe(Interest::All, events.clone(), Replay::None)
        .unwrap();
    let veto = memory
        .hub()
        .subscribe(Interest::Range(r(7 * P, P)), Arc::new(Veto), Replay::None)
        .unwrap();
    let err = memory.apply(|m| m.unplug(Gpa(0), 10 * P)).unwrap_err();
    assert!(matches!(err, MemslotError::Vetoed(_)), "{err}");
    assert!(
        take(&events).is_empty(),
        "a refused op announced part of its change"
    );
    assert_eq!(memory.hub().in_progress(), 0);
    memory.hub().unsubscribe(veto).unwrap();
    memory.apply(|m| m.unplug(Gpa(0), 10 * P)).unwrap();
    assert_eq!(
        take(&events),
        [
            format!("start {} unplug", r(0, 4 * P)),
            format!("start {} unplug", r(6 * P, 4 * P)),
            format!("end {}", r(0, 4 * P)),
            format!("end {}", r(6 * P, 4 * P)),
        ]
    );
    assert_cells_match_map(&memory);
}

#[test]
fn test_manager_guard_held_past_bound_refuses_op_naming_slot_and_readers() {
    let kvm = Arc::new(SimKvm::new());
    let memory = MemoryManager::new(Arc::clone(&kvm), config()).unwrap();
    memory.set_drain_bound(std::time::Duration::from_millis(20));
    let a = anon(8);
    memory
        .apply(|m| m.plug(Gpa(0), 8 * P, a.clone(), 0, SlotFlags::NONE))
        .unwrap();
    let events = Arc::new(Events::default());
    memory
        .hub()
        .subscribe(Interest::All, events.clone(), Replay::None)
        .unwrap();
    let guard = memory.try_acquire(Gpa(5 * P)).unwrap();
    let calls = kvm.calls();
    let err = memory.apply(|m| m.unplug(Gpa(0), P)).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("slot 0: 1 reader(s) still hold it"), "{text}");
    assert_eq!(kvm.calls(), calls, "an ioctl was issued");
    // The drain comes before the invalidation (as `vma_start_write` before
    // `mmu_notifier_invalidate_range_start`): a change that never happened
    // is not announced, and the hub still has the range plugged.
    assert_eq!(take(&events), Vec::<String>::new());
    assert_eq!(memory.hub().plugged(), vec![r(0, 8 * P)]);
    drop(guard);
    let applied = memory.apply(|m| m.unplug(Gpa(0), P)).unwrap();
    assert!(applied.waited < std::time::Duration::from_millis(20));
    assert_cells_match_map(&memory);
}

#[test]
fn test_manager_rolled_back_op_keeps_cells_of_old_map() {
    let kvm = Arc::new(SimKvm::new());
    let memory = MemoryManager::new(Arc::clone(&kvm), config()).unwrap();
    let a = anon(8);
    memory
        .apply(|m| m.plug(Gpa(0), 8 * P, a.clone(), 0, SlotFlags::NONE))
        .unwrap();
    kvm.fail_calls(&[2], libc::EIO); // delete 0, create 1, create 2 (fails)
    let err = memory
        .apply(|m| m.protect(Gpa(2 * P), P, true))
        .unwrap_err();
    assert!(matches!(err, MemslotError::RolledBack { .. }), "{err}");
    assert_cells_match_map(&memory);
    memory.check_consistency().unwrap();
}

#[test]
fn test_manager_rolled_back_unplug_leaves_the_range_plugged_in_the_hub() {
    let kvm = Arc::new(SimKvm::new());
    let memory = MemoryManager::new(Arc::clone(&kvm), config()).unwrap();
    let a = anon(8);
    memory
        .apply(|m| m.plug(Gpa(0), 8 * P, a.clone(), 0, SlotFlags::NONE))
        .unwrap();
    kvm.fail_calls(&[1], libc::EIO); // delete 0, create the rest (fails)
    let err = memory.apply(|m| m.unplug(Gpa(0), 2 * P)).unwrap_err();
    assert!(matches!(err, MemslotError::RolledBack { .. }), "{err}");
    assert_eq!(memory.hub().plugged(), vec![r(0, 8 * P)]);
    memory.apply(|m| m.unplug(Gpa(0), 2 * P)).unwrap();
    assert_eq!(memory.hub().plugged(), vec![r(2 * P, 6 * P)]);
}

#[test]
fn test_manager_device_memory_never_uses_a_translation_after_unplug() {
    let kvm = Arc::new(SimKvm::new());
    let memory = Arc::new(MemoryManager::new(Arc::clone(&kvm), config()).unwrap());
    let (a, b) = (anon(8), anon(8));
    memory
        .apply(|m| m.plug(Gpa(0), 8 * P, a.clone(), 0, SlotFlags::NONE))
        .unwrap();
    let dev = crate::mm::guard::DeviceMemory::new(memory.clone(), memory.hub().clone()).unwrap();
    dev.write_u64(Gpa(2 * P), 11).unwrap();
    assert_eq!(dev.cached_pages(), 1);
    memory.apply(|m| m.unplug(Gpa(0), 8 * P)).unwrap();
    assert_eq!(dev.cached_pages(), 0, "invalidate_start dropped the page");
    memory
        .apply(|m| m.plug(Gpa(0), 8 * P, b.clone(), 0, SlotFlags::NONE))
        .unwrap();
    // The new memory (zero), not the old mapping's 11.
    assert_eq!(dev.read_u64(Gpa(2 * P)).unwrap(), 0);
    memory
        .apply(|m| m.move_range(Gpa(0), 8 * P, Gpa(16 * P)))
        .unwrap();
    assert!(matches!(
        dev.read_u64(Gpa(2 * P)),
        Err(GuardError::Unplugged { .. })
    ));
    dev.write_u64(Gpa(18 * P), 5).unwrap();
    // SAFETY: `b` is alive and 8 pages long; aligned word.
    let at_b = unsafe { (b.as_ptr().add(2 * P as usize) as *const u64).read() };
    assert_eq!(at_b, 5);
}

#[test]
fn test_manager_kept_at_drop_leaves_slots_and_memory_in_place() {
    let kvm = Arc::new(SimKvm::new());
    let memory = MemoryManager::new(Arc::clone(&kvm), config()).unwrap();
    let a = anon(4);
    let weak = Arc::downgrade(&a);
    memory
        .apply(|m| m.plug(Gpa(0), 4 * P, a, 0, SlotFlags::NONE))
        .unwrap();
    memory.keep_memory_at_drop();
    drop(memory);
    assert_eq!(kvm.memslots().len(), 1, "no delete was issued");
    assert!(
        weak.upgrade().is_some(),
        "the memory the slot names is still mapped"
    );
}

#[test]
fn test_manager_drop_deletes_slots_then_unmaps() {
    let kvm = Arc::new(SimKvm::new());
    let memory = MemoryManager::new(Arc::clone(&kvm), config()).unwrap();
    let a = anon(4);
    let weak = Arc::downgrade(&a);
    memory
        .apply(|m| m.plug(Gpa(0), 4 * P, a, 0, SlotFlags::NONE))
        .unwrap();
    drop(memory);
    assert!(kvm.memslots().is_empty());
    assert!(weak.upgrade().is_none(), "unmapped after the delete");
}

/// The announce-before-drain order (a model knob) delivers start/end for a
/// change a drain timeout then refuses; the real order announces nothing.
#[test]
fn test_manager_drain_timeout_announces_nothing_only_in_the_real_order() {
    for broken in [false, true] {
        let kvm = Arc::new(SimKvm::new());
        let mut memory = MemoryManager::new(Arc::clone(&kvm), config()).unwrap();
        memory.model_knobs_mut().invalidate_before_drain = broken;
        memory.set_drain_bound(std::time::Duration::from_millis(10));
        memory
            .apply(|m| m.plug(Gpa(0), 4 * P, anon(4), 0, SlotFlags::NONE))
            .unwrap();
        let events = Arc::new(Events::default());
        memory
            .hub()
            .subscribe(Interest::All, events.clone(), Replay::None)
            .unwrap();
        let guard = memory.try_acquire(Gpa(0)).unwrap();
        assert!(memory.apply(|m| m.unplug(Gpa(0), P)).is_err());
        drop(guard);
        let seen = take(&events);
        assert_eq!(seen.is_empty(), !broken, "broken={broken}: {seen:?}");
        assert_eq!(memory.hub().plugged(), vec![r(0, 4 * P)]);
    }
}
