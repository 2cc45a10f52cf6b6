//! The manager on the simulated KVM, which enforces KVM's memslot rules:
//! the pre-ioctl checks, dirty-page bookkeeping, and random op sequences
//! with failures injected at random calls (forward changes and undos).

use proptest::prelude::*;

use super::mirror::{State, Step};
use super::*;
use crate::mm::addr::{Gfn, Hva, PAGE_SIZE};
use crate::mm::notifier::{Interest, Replay, Subscriber};
use crate::mm::slot_map::{SlotFlags, MAX_MEMSLOT_PAGES};

const P: u64 = PAGE_SIZE;

fn config() -> SlotMapConfig {
    SlotMapConfig {
        max_slots: 8,
        max_gpa: Gpa(64 * P),
        read_only_supported: true,
        reserved: None,
        ..SlotMapConfig::default()
    }
}

fn anon(pages: u64) -> Arc<HostMapping> {
    Arc::new(HostMapping::new(&BackingKind::Anon, pages * P).unwrap())
}

fn step(
    op: MemslotOp,
    id: u32,
    gpa: u64,
    pages: u64,
    mapping: &Arc<HostMapping>,
    flags: MemslotFlags,
) -> Step {
    Step {
        op,
        spec: MemslotSpec {
            id: SlotId(id),
            gpa: Gpa(gpa),
            size: pages * P,
            hva: mapping.hva(),
            flags,
        },
        mapping: Arc::clone(mapping),
        old_flags: MemslotFlags::empty(),
        from: Gpa(gpa),
    }
}

/// The state after creating 4 pages at 0 with id 0 from `a`.
fn state_with_one_slot(a: &Arc<HostMapping>) -> State {
    let mut st = State {
        by_id: BTreeMap::new(),
        by_gpa: BTreeMap::new(),
        pending: BTreeSet::new(),
        bitmap: HostMapping::new(&BackingKind::Anon, P).unwrap(),
        poisoned: false,
        mode: DirtyLogMode::Bitmap,
        unattributed: 0,
        ring_error: None,
        windows: TeardownWindows::default(),
        journal: None,
    };
    st.record(&step(MemslotOp::Create, 0, 0, 4, a, MemslotFlags::empty()));
    st
}

fn refusal(st: &State, s: &Step) -> String {
    st.validate(s, &config()).unwrap_err()
}

#[test]
fn test_validate_create_over_live_slot_refused() {
    let (a, b) = (anon(8), anon(8));
    let st = state_with_one_slot(&a);
    let why = refusal(
        &st,
        &step(MemslotOp::Create, 1, 3 * P, 2, &b, MemslotFlags::empty()),
    );
    assert!(why.contains("overlaps live slot 0"), "{why}");
    let adjacent = step(MemslotOp::Create, 1, 4 * P, 2, &b, MemslotFlags::empty());
    assert_eq!(st.validate(&adjacent, &config()), Ok(()));
}

#[test]
fn test_validate_create_with_live_id_refused() {
    let (a, b) = (anon(8), anon(8));
    let st = state_with_one_slot(&a);
    let why = refusal(
        &st,
        &step(MemslotOp::Create, 0, 8 * P, 2, &b, MemslotFlags::empty()),
    );
    assert!(why.contains("the id is live"), "{why}");
}

#[test]
fn test_validate_create_outside_mapping_refused() {
    let (a, b) = (anon(8), anon(2));
    let st = state_with_one_slot(&a);
    let why = refusal(
        &st,
        &step(MemslotOp::Create, 1, 8 * P, 3, &b, MemslotFlags::empty()),
    );
    assert!(why.contains("outside its"), "{why}");
}

#[test]
fn test_validate_create_id_at_max_slots_refused() {
    let (a, b) = (anon(8), anon(2));
    let st = state_with_one_slot(&a);
    let why = refusal(
        &st,
        &step(MemslotOp::Create, 8, 8 * P, 2, &b, MemslotFlags::empty()),
    );
    assert!(why.contains("max_slots"), "{why}");
}

#[test]
fn test_validate_delete_of_other_spec_refused() {
    let a = anon(8);
    let st = state_with_one_slot(&a);
    let exact = step(MemslotOp::Delete, 0, 0, 4, &a, MemslotFlags::empty());
    assert_eq!(st.validate(&exact, &config()), Ok(()));
    let why = refusal(
        &st,
        &step(MemslotOp::Delete, 0, 0, 3, &a, MemslotFlags::empty()),
    );
    assert!(why.contains("KVM holds the id"), "{why}");
    let why = refusal(
        &st,
        &step(MemslotOp::Delete, 1, 0, 4, &a, MemslotFlags::empty()),
    );
    assert!(why.contains("not live"), "{why}");
}

#[test]
fn test_validate_set_flags_toggling_readonly_refused() {
    let a = anon(8);
    let st = state_with_one_slot(&a);
    let why = refusal(
        &st,
        &step(MemslotOp::SetFlags, 0, 0, 4, &a, MemslotFlags::READONLY),
    );
    assert!(why.contains("only KVM_MEM_LOG_DIRTY_PAGES"), "{why}");
    let log = step(
        MemslotOp::SetFlags,
        0,
        0,
        4,
        &a,
        MemslotFlags::LOG_DIRTY_PAGES,
    );
    assert_eq!(st.validate(&log, &config()), Ok(()));
}

#[test]
fn test_step_inverse_twice_is_identity() {
    let a = anon(8);
    let s = step(
        MemslotOp::SetFlags,
        0,
        0,
        4,
        &a,
        MemslotFlags::LOG_DIRTY_PAGES,
    );
    let inv = s.inverse();
    assert_eq!(
        (inv.op, inv.spec.flags, inv.old_flags),
        (
            MemslotOp::SetFlags,
            MemslotFlags::empty(),
            MemslotFlags::LOG_DIRTY_PAGES
        )
    );
    let back = inv.inverse();
    assert_eq!((back.spec, back.old_flags), (s.spec, s.old_flags));
    let c = step(MemslotOp::Create, 0, 0, 4, &a, MemslotFlags::empty());
    assert_eq!(c.inverse().op, MemslotOp::Delete);
    assert_eq!(c.inverse().inverse().op, MemslotOp::Create);
}

#[test]
fn test_dirty_pages_outside_range_stay_pending() {
    let kvm = Arc::new(SimKvm::new());
    let memory = MemoryManager::new(Arc::clone(&kvm), config()).unwrap();
    let a = anon(8);
    memory
        .apply(|m| m.plug(Gpa(0), 8 * P, a.clone(), 0, SlotFlags::NONE))
        .unwrap();
    memory
        .apply(|m| m.set_dirty_log(Gpa(0), 8 * P, true))
        .unwrap();
    for g in [1, 3, 6] {
        assert!(kvm.guest_write(Gpa(g * P)));
    }
    assert_eq!(memory.dirty_pages(Gpa(2 * P), 2 * P).unwrap(), vec![Gfn(3)]);
    assert_eq!(
        memory.dirty_pages(Gpa(0), 8 * P).unwrap(),
        vec![Gfn(1), Gfn(6)]
    );
    assert_eq!(memory.dirty_pages(Gpa(0), 8 * P).unwrap(), vec![]);
}

#[test]
fn test_dirty_pages_harvested_before_logging_off() {
    let kvm = Arc::new(SimKvm::new());
    let memory = MemoryManager::new(Arc::clone(&kvm), config()).unwrap();
    let a = anon(8);
    memory
        .apply(|m| m.plug(Gpa(0), 8 * P, a.clone(), 0, SlotFlags::NONE))
        .unwrap();
    memory
        .apply(|m| m.set_dirty_log(Gpa(0), 8 * P, true))
        .unwrap();
    for g in [2, 7] {
        assert!(kvm.guest_write(Gpa(g * P)));
    }
    // Logging off frees KVM's log: the pages survive only if harvested first.
    memory
        .apply(|m| m.set_dirty_log(Gpa(0), 8 * P, false))
        .unwrap();
    assert_eq!(
        memory.dirty_pages(Gpa(0), 8 * P).unwrap(),
        vec![Gfn(2), Gfn(7)]
    );
}

#[test]
fn test_dirty_pages_without_logging_is_not_logging_not_zero_pages() {
    let kvm = Arc::new(SimKvm::new());
    let memory = MemoryManager::new(Arc::clone(&kvm), config()).unwrap();
    let a = anon(8);
    memory
        .apply(|m| m.plug(Gpa(0), 8 * P, a.clone(), 0, SlotFlags::NONE))
        .unwrap();
    for (gpa, size) in [(0, 8 * P), (16 * P, 4 * P)] {
        let err = memory.dirty_pages(Gpa(gpa), size).unwrap_err();
        assert!(matches!(err, MemslotError::NotLogging { .. }), "{err}");
    }
    // Logging on part of the range is enough; the rest reads as clean.
    memory
        .apply(|m| m.set_dirty_log(Gpa(4 * P), 4 * P, true))
        .unwrap();
    assert!(kvm.guest_write(Gpa(5 * P)));
    assert_eq!(memory.dirty_pages(Gpa(0), 8 * P).unwrap(), vec![Gfn(5)]);
    assert_eq!(memory.dirty_pages(Gpa(0), 8 * P).unwrap(), vec![]);
    memory.check_consistency().unwrap();
}

#[test]
fn test_check_consistency_finds_dirty_logging_stray() {
    let kvm = Arc::new(SimKvm::new());
    let memory = MemoryManager::new(Arc::clone(&kvm), config()).unwrap();
    memory.check_consistency().unwrap();
    let stray = MemslotRegion {
        slot: SlotId(5),
        flags: MemslotFlags::LOG_DIRTY_PAGES,
        gpa: Gpa(0),
        size: P,
        hva: Hva(0x1000),
    };
    // SAFETY: the simulated KVM never touches host memory.
    unsafe { kvm.set_memslot(&stray) }.unwrap();
    let why = memory.check_consistency().unwrap_err();
    assert!(why.contains("slot 5"), "{why}");
}

#[test]
fn test_drop_deletes_every_registered_slot() {
    let kvm = Arc::new(SimKvm::new());
    let memory = MemoryManager::new(Arc::clone(&kvm), config()).unwrap();
    let a = anon(8);
    memory
        .apply(|m| m.plug(Gpa(0), 2 * P, a.clone(), 0, SlotFlags::NONE))
        .unwrap();
    memory
        .apply(|m| m.plug(Gpa(4 * P), 2 * P, a.clone(), 4 * P, SlotFlags::NONE))
        .unwrap();
    assert_eq!(kvm.memslots().len(), 2);
    drop(memory);
    assert!(kvm.memslots().is_empty());
    assert_eq!(Arc::strong_count(&a), 1);
}

#[derive(Clone, Debug)]
struct RandomOp {
    kind: u8,
    at: u64,
    n: u64,
    dst: u64,
    m: usize,
    flag: bool,
    /// Call offsets to fail (forward changes or undos).
    fail: Vec<usize>,
}

fn random_op() -> impl Strategy<Value = RandomOp> {
    (
        0..8u8,
        0..40u64,
        1..6u64,
        0..60u64,
        0..4usize,
        any::<bool>(),
        proptest::collection::vec(0..6usize, 0..3),
    )
        .prop_map(|(kind, at, n, dst, m, flag, fail)| RandomOp {
            kind,
            at,
            n,
            dst,
            m,
            flag,
            fail,
        })
}

/// `at >= 32` names the start of slot `at - 32` (mod the count).
fn resolve(map: &SlotMap, at: u64) -> u64 {
    let starts: Vec<u64> = map.iter().map(|s| s.range().start().0).collect();
    match at.checked_sub(32) {
        Some(k) if !starts.is_empty() => starts[k as usize % starts.len()],
        _ => at * P,
    }
}

fn run(ops: &[RandomOp]) {
    let kvm = Arc::new(SimKvm::new());
    let memory = MemoryManager::new(Arc::clone(&kvm), config()).unwrap();
    let maps = [anon(16), anon(16), anon(16), anon(16)];
    for o in ops {
        let before = memory.load();
        let at = resolve(&before, o.at);
        kvm.fail_calls(&o.fail, libc::EIO);
        let mapping = maps[o.m].clone();
        let result = memory.apply(|m| match o.kind {
            0..=2 => m.plug(
                Gpa(o.at * P),
                o.n * P,
                mapping,
                o.dst % 12 * P,
                SlotFlags::NONE,
            ),
            3 => m.unplug(Gpa(at), o.n * P),
            4 => m.protect(Gpa(at), o.n * P, o.flag),
            5 => m.set_dirty_log(Gpa(at), o.n * P, o.flag),
            6 => m.move_range(Gpa(at), o.n * P, Gpa(o.dst * P)),
            _ => m.resize(Gpa(at), o.n * P, o.flag.then_some(mapping)),
        });
        // The fake always equals the mirror: it changes only on success.
        assert_eq!(kvm.memslots(), memory.registered(), "{o:?}: {result:?}");
        match result {
            Ok(applied) => {
                assert!(Arc::ptr_eq(&applied.map, &memory.load()));
                assert_eq!(kvm.memslots(), applied.map.expected_memslots());
            }
            Err(MemslotError::SlotMap(_) | MemslotError::RolledBack { .. }) => {
                assert!(Arc::ptr_eq(&before, &memory.load()), "{o:?}");
                assert_eq!(kvm.memslots(), before.expected_memslots(), "{o:?}");
            }
            Err(MemslotError::RollbackFailed { .. }) => {
                assert!(memory.check_consistency().is_err());
                let next = memory.apply(|m| m.unplug(Gpa(0), P));
                assert!(matches!(next, Err(MemslotError::Poisoned)), "{next:?}");
                return;
            }
            Err(e) => panic!("{o:?}: unexpected {e}"),
        }
        memory.check_consistency().unwrap();
        assert_cells_match_map(&memory);
        assert_eq!(
            memory.hub().plugged(),
            memory.load().plugged_ranges(),
            "{o:?}"
        );
    }
}

/// Every slot of the published map has its cell attached with its range and
/// generation, free of exclusion; no other cell is attached; a guard on
/// each slot can be taken.
fn assert_cells_match_map(memory: &MemoryManager) {
    let map = memory.load();
    let mut attached = memory.guarded().cells().attached();
    attached.sort_unstable();
    let mut ids: Vec<u32> = map.iter().map(|s| s.id().0).collect();
    ids.sort_unstable();
    assert_eq!(attached, ids);
    for slot in map.iter() {
        let cell = memory.guarded().cells().get(slot.id().0).unwrap();
        let identity = cell.identity().unwrap();
        assert_eq!(
            (identity.generation, identity.range),
            (slot.generation(), slot.range())
        );
        assert!(!cell.is_excluded());
        let guard = memory.try_acquire(slot.range().start()).unwrap();
        assert_eq!(guard.hva(slot.range().start(), 1).unwrap(), slot.hva());
    }
}

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

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn test_manager_random_ops_with_failures_keep_kvm_equal_to_mirror(
        ops in proptest::collection::vec(random_op(), 1..40)
    ) {
        run(&ops);
    }
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

#[test]
fn test_moving_a_whole_slot_is_one_kvm_move() {
    let kvm = Arc::new(SimKvm::new());
    let memory = MemoryManager::new(Arc::clone(&kvm), config()).unwrap();
    let a = anon(8);
    memory
        .apply(|m| m.plug(Gpa(0), 4 * P, a.clone(), 0, SlotFlags::NONE))
        .unwrap();
    let before = kvm.calls();
    let applied = memory
        .apply(|m| m.move_range(Gpa(0), 4 * P, Gpa(16 * P)))
        .unwrap();
    // The transition is still a delete and a create; KVM gets one call.
    assert_eq!(applied.changes.len(), 2);
    assert_eq!(kvm.calls() - before, 1, "one KVM_MR_MOVE");
    assert_eq!(kvm.memslots(), memory.registered());
    assert_eq!(memory.registered()[0].gpa, Gpa(16 * P));
    memory.check_consistency().unwrap();
    assert_cells_match_map(&memory);
    // A failed move changes nothing.
    kvm.fail_calls(&[0], libc::EIO);
    let failed = memory.apply(|m| m.move_range(Gpa(16 * P), 4 * P, Gpa(0)));
    assert!(
        matches!(failed, Err(MemslotError::RolledBack { .. })),
        "{failed:?}"
    );
    assert_eq!(kvm.memslots(), memory.registered());
    assert_eq!(memory.registered()[0].gpa, Gpa(16 * P));
    // Dirty logging: a logging slot moves as a delete and a create, so its
    // log is harvested before KVM drops it.
    memory
        .apply(|m| m.set_dirty_log(Gpa(16 * P), 4 * P, true))
        .unwrap();
    kvm.guest_write(Gpa(17 * P));
    let before = kvm.calls();
    memory
        .apply(|m| m.move_range(Gpa(16 * P), 4 * P, Gpa(0)))
        .unwrap();
    assert!(kvm.calls() - before >= 2, "delete and create, not a move");
    assert_eq!(
        memory.dirty_pages(Gpa(16 * P), 4 * P).unwrap(),
        [Gpa(17 * P).gfn()]
    );
    memory.check_consistency().unwrap();
}

#[test]
fn test_fuse_move_only_pairs_the_same_slot() {
    let a = anon(8);
    let del = step(MemslotOp::Delete, 3, 0, 4, &a, MemslotFlags::empty());
    let mut create = step(MemslotOp::Create, 3, 16 * P, 4, &a, MemslotFlags::empty());
    create.spec.hva = del.spec.hva;
    let m = Step::fuse_move(&del, &create).expect("same slot elsewhere");
    assert_eq!(
        (m.op, m.from, m.spec.gpa),
        (MemslotOp::Move, Gpa(0), Gpa(16 * P))
    );
    let back = m.inverse();
    assert_eq!(
        (back.op, back.from, back.spec.gpa),
        (MemslotOp::Move, Gpa(16 * P), Gpa(0))
    );
    let other_id = step(MemslotOp::Create, 4, 16 * P, 4, &a, MemslotFlags::empty());
    assert!(Step::fuse_move(&del, &other_id).is_none());
    let smaller = step(MemslotOp::Create, 3, 16 * P, 3, &a, MemslotFlags::empty());
    assert!(Step::fuse_move(&del, &smaller).is_none());
    let logging = step(
        MemslotOp::Create,
        3,
        16 * P,
        4,
        &a,
        MemslotFlags::LOG_DIRTY_PAGES,
    );
    let del_logging = step(
        MemslotOp::Delete,
        3,
        0,
        4,
        &a,
        MemslotFlags::LOG_DIRTY_PAGES,
    );
    assert!(Step::fuse_move(&del_logging, &logging).is_none());
    // The mirror accepts the move only from where KVM holds the slot.
    let mut st = state_with_one_slot(&a);
    let mv = Step::fuse_move(
        &step(MemslotOp::Delete, 0, 0, 4, &a, MemslotFlags::empty()),
        &step(MemslotOp::Create, 0, 16 * P, 4, &a, MemslotFlags::empty()),
    )
    .unwrap();
    st.validate(&mv, &config()).unwrap();
    st.record(&mv);
    assert!(st.validate(&mv, &config()).is_err(), "it is no longer at 0");
    st.validate(&mv.inverse(), &config()).unwrap();
}

/// A dirty-logging memslot of more pages than KVM allows (`KVM_MEM_MAX_NR_PAGES`,
/// 2^31 - 1) has a log larger than the 256 MiB bitmap buffer. The slot map
/// and the simulated KVM refuse such a slot now, but the mirror still does
/// not trust the backend: reading a log of that size is refused (`E2BIG`)
/// instead of zeroing past the buffer, which crashed the sim tier.
#[test]
fn test_a_logging_slot_above_kvm_max_pages_is_refused_not_overrun() {
    let a = anon(4);
    let mut st = state_with_one_slot(&a);
    // One bitmap word more than the buffer holds.
    let size = ((1u64 << 31) + 64) * P;
    let err = st.read_bitmap(&SimKvm::new(), SlotId(0), size).unwrap_err();
    assert_eq!(err.errno(), libc::E2BIG);
}

/// A plug of one page more than `KVM_MEM_MAX_NR_PAGES` (8 TiB, a
/// `MAP_NORESERVE` mapping) is refused by the slot map; a map configured
/// without that limit passes it to the simulated KVM, which refuses it with
/// `EINVAL` as KVM does. Either way nothing is left plugged.
#[test]
fn test_a_plug_above_kvm_max_pages_is_refused_by_the_map_and_by_sim_kvm() {
    let len = (MAX_MEMSLOT_PAGES + 1) * P;
    let mapping = Arc::new(HostMapping::new(&BackingKind::Anon, len).unwrap());
    let flags = SlotFlags {
        dirty_log: true,
        ..SlotFlags::NONE
    };
    let memory = MemoryManager::new(SimKvm::new(), SlotMapConfig::default()).unwrap();
    let err = memory
        .apply(|m| m.plug(Gpa(0), len, mapping.clone(), 0, flags))
        .unwrap_err();
    assert!(
        matches!(err, MemslotError::SlotMap(SlotMapError::SlotTooLarge { pages, max_pages, .. })
            if pages == MAX_MEMSLOT_PAGES + 1 && max_pages == MAX_MEMSLOT_PAGES),
        "{err}"
    );
    assert!(memory.load().is_empty());
    memory.check_consistency().unwrap();

    let unlimited = SlotMapConfig {
        max_slot_pages: u64::MAX,
        ..SlotMapConfig::default()
    };
    let memory = MemoryManager::new(SimKvm::new(), unlimited).unwrap();
    let err = memory
        .apply(|m| m.plug(Gpa(0), len, mapping.clone(), 0, flags))
        .unwrap_err();
    assert!(err.to_string().contains("Invalid argument"), "{err}");
    assert!(memory.load().is_empty());
    memory.check_consistency().unwrap();
    // The mirror's pre-ioctl check refuses it under the default limit.
    let st = state_with_one_slot(&anon(4));
    let create = step(
        MemslotOp::Create,
        1,
        0x1000_0000,
        MAX_MEMSLOT_PAGES + 1,
        &mapping,
        MemslotFlags::empty(),
    );
    let why = st.validate(&create, &SlotMapConfig::default()).unwrap_err();
    assert!(why.contains("more than one memslot may hold"), "{why}");
    st.validate(&create, &unlimited).unwrap();
    // One page less is a memslot KVM takes.
    let ok = MAX_MEMSLOT_PAGES * P;
    memory
        .apply(|m| m.plug(Gpa(0), ok, mapping.clone(), 0, SlotFlags::NONE))
        .unwrap();
    assert_eq!(memory.load().len(), 1);
}
