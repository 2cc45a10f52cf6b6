//! KVM memslots kept equal to the slot map by the memory manager on real
//! `/dev/kvm`: every op, rollback at each position of a multi-change
//! transition, refusal before the ioctl, the slot budget, dirty pages.
//!
//! After each step [`Fixture::assert_kvm_matches`] checks KVM itself, not
//! only the manager's mirror: `check_consistency`, then destructive probes
//! with a spare slot id (creating a slot over each mapped range must fail
//! with `EEXIST`, over each gap must succeed) and re-issuing each slot's
//! exact spec (a no-op only if the id is live as specified; if it were not
//! live it would be a create over an occupied range, i.e. `EEXIST`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use kvm_ioctls::{Kvm, VmFd};
use vmm::mm::addr::{Gfn, Gpa, Hva};
use vmm::mm::backing::{BackingKind, HostMapping};
use vmm::mm::manager::{
    Applied, FailureCause, MemoryManager, MemslotBackend, MemslotError, MemslotOp, MemslotRegion,
};
use vmm::mm::slot_map::{
    MemslotChange, MemslotFlags, SlotFlags, SlotId, SlotMapConfig, SlotMapError,
};
use vmm_sys_util::errno::Error as Errno;
use vmm_tests::{kvm_or_skip, Rng};

mod dirty;
mod incremental;

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
/// Guest-physical window the tests use; probes cover all of it.
const ARENA: u64 = 64 * MIB;
/// A slot id the maps never hand out (their `max_slots` is small).
const PROBE_ID: u32 = 1000;
/// `KVM_MEM_LOG_DIRTY_PAGES`.
const LOG_DIRTY: u32 = MemslotFlags::LOG_DIRTY_PAGES.bits();

/// The VM fd, counting `KVM_SET_USER_MEMORY_REGION` calls and failing the
/// calls whose 0-based numbers are in `fail` with `EIO`, without issuing them.
struct Faulty {
    vm: VmFd,
    calls: AtomicUsize,
    fail: Mutex<Vec<usize>>,
    /// Runs once, just before the next memslot delete is issued (after the
    /// manager harvested the slot's dirty log): a window a test can fill.
    before_delete: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Faulty {
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
    /// Fails the calls `offsets` after the next one (0 = the next call).
    fn fail_next(&self, offsets: &[usize]) {
        let now = self.calls();
        *self.fail.lock().unwrap() = offsets.iter().map(|o| now + o).collect();
    }
    /// Issues `region` straight to KVM (not counted); returns the errno.
    fn raw(&self, region: MemslotRegion) -> Result<(), i32> {
        // SAFETY: probe regions point into the fixture's probe mapping, which
        // outlives the VM fd's use in each test, and are deleted right after.
        unsafe { self.vm.set_memslot(&region) }.map_err(|e| e.errno())
    }
}

impl MemslotBackend for Faulty {
    unsafe fn set_memslot(&self, region: &MemslotRegion) -> Result<(), Errno> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        if self.fail.lock().unwrap().contains(&n) {
            return Err(Errno::new(libc::EIO));
        }
        if region.size == 0 {
            if let Some(hook) = self.before_delete.lock().unwrap().take() {
                hook();
            }
        }
        // SAFETY: our caller upholds the same contract.
        unsafe { self.vm.set_memslot(region) }
    }
    unsafe fn get_dirty_log_into(&self, slot: SlotId, bitmap: *mut u64) -> Result<(), Errno> {
        // SAFETY: our caller upholds the same contract.
        unsafe { self.vm.get_dirty_log_into(slot, bitmap) }
    }
}

struct Fixture {
    memory: MemoryManager,
    faulty: Arc<Faulty>,
    /// ARENA bytes of host memory for probe slots (never touched).
    probe: HostMapping,
    _kvm: Kvm,
}

fn fixture(test: &str, max_slots: u32) -> Option<Fixture> {
    if !kvm_or_skip(test) {
        return None;
    }
    let kvm = Kvm::new().expect("open /dev/kvm");
    let faulty = Arc::new(Faulty {
        vm: kvm.create_vm().expect("KVM_CREATE_VM"),
        calls: AtomicUsize::new(0),
        fail: Mutex::new(Vec::new()),
        before_delete: Mutex::new(None),
    });
    let config = SlotMapConfig {
        max_slots,
        ..SlotMapConfig::default()
    };
    Some(Fixture {
        memory: MemoryManager::new(Arc::clone(&faulty), config).expect("memory"),
        faulty,
        probe: HostMapping::new(&BackingKind::Anon, ARENA).expect("probe mapping"),
        _kvm: kvm,
    })
}

fn anon(len: u64) -> Arc<HostMapping> {
    Arc::new(HostMapping::new(&BackingKind::Anon, len).expect("anon mapping"))
}

fn region(id: u32, gpa: u64, size: u64, hva: u64, flags: u32) -> MemslotRegion {
    MemslotRegion {
        slot: SlotId(id),
        flags: MemslotFlags::from_bits_retain(flags),
        gpa: Gpa(gpa),
        size,
        hva: Hva(hva),
    }
}

impl Fixture {
    /// Plugs `[gpa, +len)` backed by `mem` from its start, unflagged.
    fn plug(&self, gpa: u64, len: u64, mem: &Arc<HostMapping>) -> Applied {
        self.memory
            .apply(|m| m.plug(Gpa(gpa), len, mem.clone(), 0, SlotFlags::NONE))
            .unwrap()
    }

    /// Creates a probe slot over `[gpa, +size)`: `Ok` (then deleted again) or the errno.
    fn probe_create(&self, gpa: u64, size: u64) -> Result<(), i32> {
        let hva = self.probe.hva().0;
        self.faulty.raw(region(PROBE_ID, gpa, size, hva, 0))?;
        self.faulty
            .raw(region(PROBE_ID, gpa, 0, hva, 0))
            .expect("delete the probe slot");
        Ok(())
    }

    /// KVM's memslots in the arena are exactly the published map's.
    fn assert_kvm_matches(&self) {
        self.memory.check_consistency().expect("consistent");
        let map = self.memory.load();
        let mut at = 0;
        for s in map.iter() {
            let spec = s.spec();
            assert!(spec.gpa.0 + spec.size <= ARENA, "slot outside the arena");
            if spec.gpa.0 > at {
                assert_eq!(
                    self.probe_create(at, spec.gpa.0 - at),
                    Ok(()),
                    "a stray memslot in the gap [{at:#x}, {})",
                    spec.gpa
                );
            }
            assert_eq!(
                self.probe_create(spec.gpa.0, spec.size),
                Err(libc::EEXIST),
                "no memslot covers {spec:?}"
            );
            assert_eq!(
                self.faulty.raw(region(
                    spec.id.0,
                    spec.gpa.0,
                    spec.size,
                    spec.hva.0,
                    spec.flags.bits()
                )),
                Ok(()),
                "KVM does not hold {spec:?} as specified"
            );
            at = spec.gpa.0 + spec.size;
        }
        if at < ARENA {
            assert_eq!(
                self.probe_create(at, ARENA - at),
                Ok(()),
                "a stray memslot in [{at:#x}, {ARENA:#x})"
            );
        }
    }
}

fn fill(mem: &HostMapping, offset: u64, len: u64, byte: u8) {
    assert!(offset + len <= mem.len());
    // SAFETY: in bounds (checked); no guest runs in these tests while the
    // host writes, and nothing else holds a reference into the mapping.
    unsafe { std::ptr::write_bytes(mem.as_ptr().add(offset as usize), byte, len as usize) };
}

fn byte_at(hva: vmm::mm::addr::Hva) -> u8 {
    // SAFETY: `hva` comes from translating a plugged GPA of the current map,
    // whose mapping the memory and the map keep alive.
    unsafe { std::ptr::read_volatile(hva.0 as *const u8) }
}

#[test]
fn test_memslots_plug_and_unplug_across_edges_match_kvm() {
    let Some(f) = fixture("memslots plug/unplug", 16) else {
        return;
    };
    let a = anon(4 * MIB);
    let b = anon(4 * MIB);
    let t = f.plug(4 * MIB, 4 * MIB, &a);
    assert_eq!(t.changes.len(), 1);
    f.assert_kvm_matches();
    f.plug(8 * MIB, 4 * MIB, &b);
    f.assert_kvm_matches();

    // Unplug across the edge between the two slots: both are cut.
    fill(&a, 3 * MIB, MIB, 0xAA);
    let t = f.memory.apply(|m| m.unplug(Gpa(7 * MIB), 2 * MIB)).unwrap();
    assert_eq!(t.discarded, 2 * MIB);
    assert_eq!(t.map.len(), 2);
    f.assert_kvm_matches();
    // SAFETY: offset inside `a`; no guest runs.
    let discarded = unsafe { *a.as_ptr().add(3 * MIB as usize) };
    assert_eq!(discarded, 0, "unplugged host memory was released");

    // Unplug a hole inside a slot: split in two.
    f.memory.apply(|m| m.unplug(Gpa(5 * MIB), PAGE)).unwrap();
    assert_eq!(f.memory.load().len(), 3);
    f.assert_kvm_matches();
}

#[test]
fn test_memslots_protect_ro_then_rw_matches_kvm() {
    let Some(f) = fixture("memslots protect", 16) else {
        return;
    };
    let a = anon(4 * MIB);
    f.plug(0, 4 * MIB, &a);
    let t = f.memory.apply(|m| m.protect(Gpa(MIB), MIB, true)).unwrap();
    assert_eq!(t.map.len(), 3);
    assert!(t.map.lookup(Gpa(MIB)).unwrap().flags().read_only);
    f.assert_kvm_matches();
    let t = f
        .memory
        .apply(|m| m.protect(Gpa(0), 4 * MIB, false))
        .unwrap();
    assert_eq!(t.map.len(), 1, "merged back");
    f.assert_kvm_matches();
}

#[test]
fn test_memslots_move_keeps_host_bytes_at_new_gpa() {
    let Some(f) = fixture("memslots move", 16) else {
        return;
    };
    let a = anon(4 * MIB);
    fill(&a, MIB, MIB, 0x5A);
    f.plug(0, 4 * MIB, &a);
    let hva = f.memory.load().translate(Gpa(MIB + 0x123)).unwrap().0;
    f.memory
        .apply(|m| m.move_range(Gpa(MIB), MIB, Gpa(32 * MIB)))
        .unwrap();
    f.assert_kvm_matches();
    let map = f.memory.load();
    let (moved, _) = map.translate(Gpa(32 * MIB + 0x123)).unwrap();
    assert_eq!(moved, hva, "same host byte at the new GPA");
    assert_eq!(byte_at(moved), 0x5A, "its contents survived the move");
    assert!(map.lookup(Gpa(MIB)).is_none());
}

#[test]
fn test_memslots_resize_grow_and_shrink_match_kvm() {
    let Some(f) = fixture("memslots resize", 16) else {
        return;
    };
    let a = anon(8 * MIB);
    f.plug(MIB, 2 * MIB, &a);
    f.memory
        .apply(|m| m.resize(Gpa(MIB), 8 * MIB, None))
        .unwrap();
    assert_eq!(
        f.memory.load().slot_at(Gpa(MIB)).unwrap().range().len(),
        8 * MIB
    );
    f.assert_kvm_matches();
    // Grow past the mapping's end with a second mapping.
    let b = anon(2 * MIB);
    f.memory
        .apply(|m| m.resize(Gpa(MIB), 10 * MIB, Some(b.clone())))
        .unwrap();
    assert!(f.memory.load().lookup(Gpa(10 * MIB)).is_some());
    f.assert_kvm_matches();
    let t = f.memory.apply(|m| m.resize(Gpa(MIB), MIB, None)).unwrap();
    // Resize acts on the whole mapping, like mremap: the grown part backed
    // by `b` (a slot of its own) goes too.
    assert_eq!(t.discarded, 9 * MIB);
    assert_eq!(t.map.len(), 1);
    assert!(t.map.lookup(Gpa(10 * MIB)).is_none());
    f.assert_kvm_matches();
}

#[test]
fn test_memslots_dirty_log_on_and_off_matches_kvm() {
    let Some(f) = fixture("memslots dirty log", 16) else {
        return;
    };
    let a = anon(4 * MIB);
    f.plug(0, 4 * MIB, &a);
    let t = f
        .memory
        .apply(|m| m.set_dirty_log(Gpa(0), 4 * MIB, true))
        .unwrap();
    assert!(matches!(&t.changes[..], [MemslotChange::SetFlags { .. }]));
    f.assert_kvm_matches();
    assert_eq!(f.memory.dirty_pages(Gpa(0), 4 * MIB).unwrap(), vec![]);
    // Part of the slot: split, the middle stops logging.
    f.memory
        .apply(|m| m.set_dirty_log(Gpa(MIB), MIB, false))
        .unwrap();
    assert_eq!(f.memory.load().len(), 3);
    f.assert_kvm_matches();
    f.memory
        .apply(|m| m.set_dirty_log(Gpa(0), 4 * MIB, false))
        .unwrap();
    assert_eq!(f.memory.load().len(), 1);
    f.assert_kvm_matches();
}

/// Applies `op` with a failure injected at each position of its transition;
/// each time the map, the mirror and KVM stay as before. Returns the length
/// of the transition, which finally succeeds.
fn assert_rollback_at_each_position(
    f: &Fixture,
    op: impl Fn(&vmm::mm::slot_map::SlotMap) -> Result<vmm::mm::slot_map::Transition, SlotMapError>,
) -> usize {
    let total = op(&f.memory.load()).unwrap().changes.len();
    assert!(total >= 3, "a multi-change transition");
    for at in 0..total {
        let before = f.memory.load();
        let registered = f.memory.registered();
        f.faulty.fail_next(&[at]);
        let calls = f.faulty.calls();
        let err = f.memory.apply(&op).unwrap_err();
        match &err {
            MemslotError::RolledBack {
                index,
                total: t,
                failure,
            } => {
                assert_eq!((*index, *t), (at, total), "{err}");
                assert_eq!(failure.cause, FailureCause::Errno(libc::EIO), "{err}");
            }
            other => panic!("expected a rollback, got {other}"),
        }
        // `at` forward calls, the failed one, `at` undos.
        assert_eq!(f.faulty.calls() - calls, 2 * at + 1);
        assert!(Arc::ptr_eq(&before, &f.memory.load()), "map not published");
        assert_eq!(f.memory.registered(), registered);
        f.assert_kvm_matches();
    }
    f.faulty.fail_next(&[]);
    f.memory.apply(&op).unwrap();
    f.assert_kvm_matches();
    total
}

#[test]
fn test_memslots_split_failing_at_each_change_rolls_back() {
    let Some(f) = fixture("memslots rollback split", 16) else {
        return;
    };
    let a = anon(4 * MIB);
    f.plug(0, 4 * MIB, &a);
    // Write-protecting the middle: delete 1, create 3.
    let n = assert_rollback_at_each_position(&f, |m| m.protect(Gpa(MIB), MIB, true));
    assert_eq!(n, 4);
    assert_eq!(f.memory.load().len(), 3);
}

#[test]
fn test_memslots_flags_and_split_failing_at_each_change_rolls_back() {
    let Some(f) = fixture("memslots rollback flags", 16) else {
        return;
    };
    let a = anon(2 * MIB);
    let b = anon(2 * MIB);
    f.plug(0, 2 * MIB, &a);
    f.plug(2 * MIB, 2 * MIB, &b);
    // Dirty log over all of the first slot (SetFlags) and half of the second
    // (delete 1, create 2).
    let op = |m: &vmm::mm::slot_map::SlotMap| m.set_dirty_log(Gpa(0), 3 * MIB, true);
    let changes = op(&f.memory.load()).unwrap().changes;
    assert!(matches!(changes[0], MemslotChange::SetFlags { .. }));
    assert_eq!(assert_rollback_at_each_position(&f, op), 4);
}

#[test]
fn test_memslots_failed_undo_poisons_applier() {
    let Some(f) = fixture("memslots failed undo", 16) else {
        return;
    };
    let a = anon(4 * MIB);
    f.plug(0, 4 * MIB, &a);
    // Fail change 2 (a create), then the undo of change 1 (call 3).
    f.faulty.fail_next(&[2, 3]);
    let err = f
        .memory
        .apply(|m| m.protect(Gpa(MIB), MIB, true))
        .unwrap_err();
    match &err {
        MemslotError::RollbackFailed { index, undo, .. } => {
            assert_eq!(*index, 2);
            assert_eq!(undo.op, MemslotOp::Delete, "undoing create 1 is a delete");
        }
        other => panic!("expected RollbackFailed, got {other}"),
    }
    assert!(f.memory.check_consistency().is_err());
    f.faulty.fail_next(&[]);
    assert!(matches!(
        f.memory.apply(|m| m.unplug(Gpa(0), MIB)),
        Err(MemslotError::Poisoned)
    ));
}

#[test]
fn test_memslots_overlapping_plug_refused_before_ioctl() {
    let Some(f) = fixture("memslots overlap", 16) else {
        return;
    };
    let a = anon(4 * MIB);
    let b = anon(4 * MIB);
    f.plug(4 * MIB, 4 * MIB, &a);
    let calls = f.faulty.calls();
    let err = f
        .memory
        .apply(|m| m.plug(Gpa(6 * MIB), 4 * MIB, b.clone(), 0, SlotFlags::NONE))
        .unwrap_err();
    assert!(
        matches!(err, MemslotError::SlotMap(SlotMapError::Overlap { .. })),
        "{err}"
    );
    assert_eq!(f.faulty.calls(), calls, "no ioctl issued");
    // KVM itself would have said EEXIST.
    let raw = region(PROBE_ID, 6 * MIB, 4 * MIB, b.hva().0, 0);
    assert_eq!(f.faulty.raw(raw), Err(libc::EEXIST));
    f.assert_kvm_matches();
}

/// Applies a transition computed from `stale` (an old map) and checks the
/// memory refused its first change, naming `reason`, without any ioctl.
fn assert_stale_refused(
    f: &Fixture,
    op: impl FnOnce() -> Result<vmm::mm::slot_map::Transition, SlotMapError>,
    reason: &str,
) {
    let calls = f.faulty.calls();
    let before = f.memory.load();
    let err = f.memory.apply(|_| op()).unwrap_err();
    match &err {
        MemslotError::RolledBack {
            index: 0, failure, ..
        } => {
            assert_eq!(failure.op, MemslotOp::Create);
            match &failure.cause {
                FailureCause::Refused(why) => assert!(why.contains(reason), "{err}"),
                other => panic!("expected a refusal, got {other}"),
            }
        }
        other => panic!("expected a refusal, got {other}"),
    }
    assert_eq!(f.faulty.calls(), calls, "no ioctl issued");
    assert!(Arc::ptr_eq(&before, &f.memory.load()));
    f.assert_kvm_matches();
}

#[test]
fn test_memslots_transition_from_stale_map_refused_before_ioctl() {
    let Some(f) = fixture("memslots stale transition", 16) else {
        return;
    };
    let (a, c, d, x) = (anon(4 * MIB), anon(4 * MIB), anon(4 * MIB), anon(4 * MIB));
    let plug = |gpa: u64, mem: &Arc<HostMapping>| f.plug(gpa, 4 * MIB, mem);
    plug(0, &a); // id 0
    let stale1 = f.memory.load();
    plug(16 * MIB, &c); // id 1
    let stale2 = f.memory.load();
    f.memory
        .apply(|m| m.unplug(Gpa(16 * MIB), 4 * MIB))
        .unwrap();
    plug(8 * MIB, &d); // id 1 again, at [8, 12) MiB

    // From `stale1`, a plug at [32, 36) MiB creates id 1, which is live now
    // (KVM would take it as a change of that slot: EINVAL, or a move).
    assert_stale_refused(
        &f,
        || stale1.plug(Gpa(32 * MIB), 4 * MIB, x.clone(), 0, SlotFlags::NONE),
        "the id is live",
    );
    // From `stale2`, a plug at [9, 13) MiB creates id 2, free now, over live slot 1 (KVM: EEXIST).
    assert_stale_refused(
        &f,
        || stale2.plug(Gpa(9 * MIB), 4 * MIB, x.clone(), 0, SlotFlags::NONE),
        "overlaps live slot 1",
    );
}

#[test]
fn test_memslots_check_consistency_sees_dirty_logging_strays() {
    let Some(f) = fixture("memslots check strays", 16) else {
        return;
    };
    let a = anon(4 * MIB);
    f.plug(0, 4 * MIB, &a);
    f.memory
        .apply(|m| m.set_dirty_log(Gpa(0), 4 * MIB, true))
        .unwrap();
    f.memory.check_consistency().unwrap();
    let hva = f.probe.hva().0;
    // A dirty-logging slot behind the manager's back, with an id below max_slots.
    f.faulty
        .raw(region(15, 8 * MIB, MIB, hva, LOG_DIRTY))
        .unwrap();
    let why = f.memory.check_consistency().unwrap_err();
    assert!(why.contains("slot 15"), "{why}");
    f.faulty.raw(region(15, 8 * MIB, 0, hva, 0)).unwrap();
    f.memory.check_consistency().unwrap();
    // Logging switched off behind its back on a mirrored slot.
    let spec = f.memory.registered()[0];
    f.faulty
        .raw(region(spec.id.0, spec.gpa.0, spec.size, spec.hva.0, 0))
        .unwrap();
    let why = f.memory.check_consistency().unwrap_err();
    assert!(why.contains("not live"), "{why}");
    f.faulty
        .raw(region(
            spec.id.0,
            spec.gpa.0,
            spec.size,
            spec.hva.0,
            spec.flags.bits(),
        ))
        .unwrap();
    f.assert_kvm_matches();
}

#[test]
fn test_memslots_slot_budget_full_refuses_next_plug() {
    const MAX: u32 = 8;
    let Some(f) = fixture("memslots budget", MAX) else {
        return;
    };
    let mem = anon(u64::from(MAX + 1) * MIB);
    // One-page slots with gaps between them (no merging).
    for i in 0..u64::from(MAX) {
        f.memory
            .apply(|m| {
                m.plug(
                    Gpa(2 * i * MIB),
                    PAGE,
                    mem.clone(),
                    i * MIB,
                    SlotFlags::NONE,
                )
            })
            .unwrap();
    }
    assert_eq!(f.memory.registered().len(), MAX as usize);
    let calls = f.faulty.calls();
    let i = u64::from(MAX);
    let err = f
        .memory
        .apply(|m| {
            m.plug(
                Gpa(2 * i * MIB),
                PAGE,
                mem.clone(),
                i * MIB,
                SlotFlags::NONE,
            )
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            MemslotError::SlotMap(SlotMapError::TooManySlots { max: MAX, .. })
        ),
        "{err}"
    );
    assert_eq!(f.faulty.calls(), calls, "no ioctl issued");
    f.assert_kvm_matches();
}

#[test]
fn test_memslots_drop_deletes_registered_slots() {
    let Some(f) = fixture("memslots drop", 16) else {
        return;
    };
    let a = anon(4 * MIB);
    f.plug(0, 4 * MIB, &a);
    let Fixture {
        memory,
        faulty,
        probe,
        _kvm,
    } = f;
    drop(memory);
    assert_eq!(Arc::strong_count(&a), 1, "the memory released the mapping");
    let raw = region(PROBE_ID, 0, 4 * MIB, probe.hva().0, 0);
    assert_eq!(faulty.raw(raw), Ok(()), "KVM holds no slot over the range");
    faulty
        .raw(region(PROBE_ID, 0, 0, probe.hva().0, 0))
        .unwrap();
}

#[test]
fn test_memslots_random_ops_with_faults_match_kvm() {
    const U: u64 = 256 * 1024; // the unit of every address and size
    const SEED: u64 = 0x9E37_79B9_7F4A_7C15;
    let Some(f) = fixture("memslots random ops", 16) else {
        return;
    };
    let maps: Vec<Arc<HostMapping>> = (0..4).map(|_| anon(32 * U)).collect();
    let mut rng = Rng(SEED);
    let mut bump = [0u64; 4];
    let mut outcomes = [0usize; 4]; // ok, refused by the map, rolled back, other
    for step in 0..500 {
        let map = f.memory.load();
        let slots: Vec<(u64, u64)> = map
            .iter()
            .map(|s| (s.range().start().0, s.range().len()))
            .collect();
        let kind = rng.below(8);
        // Ops on plugged memory mostly take a range inside one slot (resize:
        // its start); plugs and the rest take any range in the arena.
        let (at, n) = match rng.below(4) {
            r if r > 0 && kind >= 3 && !slots.is_empty() => {
                let (start, len) = slots[rng.below(slots.len() as u64) as usize];
                let first = if kind == 7 { 0 } else { rng.below(len / U) };
                let n = (1 + rng.below(len / U - first)) * U;
                (
                    start + first * U,
                    if kind == 7 { n + U * rng.below(3) } else { n },
                )
            }
            _ => (rng.below(240) * U, (1 + rng.below(8)) * U),
        };
        let dst = rng.below(240) * U;
        // Plugs take fresh memory from a bump pointer per mapping, so most
        // are not refused as aliases of plugged memory.
        let m = rng.below(4) as usize;
        let mapping = maps[m].clone();
        if bump[m] + n > 32 * U {
            bump[m] = 0;
        }
        let off = bump[m];
        let flag = rng.below(2) == 0;
        let fail: Vec<usize> = match rng.below(24) {
            0..=5 => vec![rng.below(5) as usize],
            6 => vec![rng.below(5) as usize, rng.below(5) as usize + 1],
            _ => vec![],
        };
        f.faulty.fail_next(&fail);
        let result = f.memory.apply(|m| match kind {
            0..=2 => m.plug(Gpa(at), n, mapping, off, SlotFlags::NONE),
            3 => m.unplug(Gpa(at), n),
            4 => m.protect(Gpa(at), n, flag),
            5 => m.set_dirty_log(Gpa(at), n, flag),
            6 => m.move_range(Gpa(at), n, Gpa(dst)),
            _ => m.resize(Gpa(at), n, flag.then_some(mapping)),
        });
        f.faulty.fail_next(&[]);
        let context = format!("seed {SEED:#x} step {step}: kind {kind} at {at:#x} n {n:#x}");
        match &result {
            Ok(_) => {
                outcomes[0] += 1;
                if kind <= 2 {
                    bump[m] += n;
                }
            }
            Err(MemslotError::SlotMap(_)) => outcomes[1] += 1,
            Err(MemslotError::RolledBack { .. }) => {
                outcomes[2] += 1;
                assert!(Arc::ptr_eq(&map, &f.memory.load()), "{context}");
            }
            Err(MemslotError::RollbackFailed { .. }) => {
                // The mirror still shows what KVM holds; the map does not.
                assert!(f.memory.check_consistency().is_err(), "{context}");
                outcomes[3] += 1;
                break;
            }
            Err(e) => panic!("{context}: {e}"),
        }
        f.assert_kvm_matches();
    }
    eprintln!("random ops: {outcomes:?} (ok, refused by the map, rolled back, rollback failed)");
    assert!(outcomes[0] >= 100 && outcomes[2] >= 10, "{outcomes:?}");
}

/// KVM refuses a memslot of more than `KVM_MEM_MAX_NR_PAGES` (2^31 - 1)
/// pages with `EINVAL` and takes one of exactly that many; the slot map
/// refuses the larger plug itself (`SlotTooLarge`) before any ioctl, and
/// `MAX_MEMSLOT_PAGES` is KVM's number. The 8 TiB mapping is
/// `MAP_NORESERVE`: KVM does not touch it.
#[test]
fn test_kvm_refuses_a_memslot_above_max_nr_pages_as_the_slot_map_does() {
    let Some(f) = fixture(
        "test_kvm_refuses_a_memslot_above_max_nr_pages_as_the_slot_map_does",
        8,
    ) else {
        return;
    };
    let max = vmm::mm::slot_map::MAX_MEMSLOT_PAGES;
    let big = anon((max + 1) * PAGE);
    let hva = big.hva().0;
    let calls = f.faulty.calls();
    assert_eq!(
        f.faulty.raw(region(PROBE_ID, 0, (max + 1) * PAGE, hva, 0)),
        Err(libc::EINVAL),
        "KVM took a memslot of 2^31 pages"
    );
    f.faulty
        .raw(region(PROBE_ID, 0, max * PAGE, hva, 0))
        .expect("KVM refused a memslot of KVM_MEM_MAX_NR_PAGES pages");
    f.faulty
        .raw(region(PROBE_ID, 0, 0, hva, 0))
        .expect("delete");
    let flags = SlotFlags {
        dirty_log: true,
        ..SlotFlags::NONE
    };
    let err = f
        .memory
        .apply(|m| m.plug(Gpa(0), (max + 1) * PAGE, Arc::clone(&big), 0, flags))
        .unwrap_err();
    assert!(
        matches!(
            err,
            MemslotError::SlotMap(SlotMapError::SlotTooLarge { .. })
        ),
        "{err}"
    );
    assert_eq!(f.faulty.calls(), calls, "the refusal issued an ioctl");
    assert!(f.memory.load().is_empty());
    f.memory.check_consistency().unwrap();
}
