//! The manager on the simulated KVM, which enforces KVM's memslot rules:
//! the pre-ioctl checks, dirty-page bookkeeping, and random op sequences
//! with failures injected at random calls (forward changes and undos).

use proptest::prelude::*;

use super::mirror::{State, Step};
use super::*;
use crate::mm::addr::{Gfn, Hva, PAGE_SIZE};
use crate::mm::slot_map::{SlotFlags, MAX_MEMSLOT_PAGES};

pub(super) const P: u64 = PAGE_SIZE;

pub(super) fn config() -> SlotMapConfig {
    SlotMapConfig {
        max_slots: 8,
        max_gpa: Gpa(64 * P),
        read_only_supported: true,
        reserved: None,
        ..SlotMapConfig::default()
    }
}

pub(super) fn anon(pages: u64) -> Arc<HostMapping> {
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
pub(super) fn assert_cells_match_map(memory: &MemoryManager) {
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn test_manager_random_ops_with_failures_keep_kvm_equal_to_mirror(
        ops in proptest::collection::vec(random_op(), 1..40)
    ) {
        run(&ops);
    }
}
