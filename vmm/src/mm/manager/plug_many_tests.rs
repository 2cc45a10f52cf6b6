//! `plug_many` is one transition: a memslot change failing at any position
//! of its batch rolls every earlier change back, leaving the slot map, the
//! mirror, KVM's memslots, the hub and the dirty log exactly as they were.

use super::*;
use crate::mm::addr::{Gfn, PAGE_SIZE};
use crate::mm::slot_map::{PlugSpec, SlotFlags};

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

/// A logging slot `[0, 4P)` of `a` with page 1 written, and the batch: a
/// page of `a` right after it (merged into it: its memslot is deleted and
/// re-created) and three one-page slots of `b` with holes between them.
fn setup(mode: DirtyLogMode) -> (Arc<SimKvm>, MemoryManager, Vec<PlugSpec>) {
    let kvm = Arc::new(SimKvm::new().with_dirty_log(mode));
    let memory = MemoryManager::new(Arc::clone(&kvm), config()).unwrap();
    let (a, b) = (anon(8), anon(3));
    let log = SlotFlags {
        dirty_log: true,
        ..SlotFlags::NONE
    };
    memory
        .apply(|m| m.plug(Gpa(0), 4 * P, a.clone(), 0, log))
        .unwrap();
    // Initially set (manual mode): take the first report so only the
    // guest's write is dirty.
    memory.dirty_pages(Gpa(0), 4 * P).unwrap();
    assert!(kvm.guest_write(Gpa(P)));
    let mut plugs = vec![PlugSpec {
        gpa: Gpa(4 * P),
        size: P,
        mapping: a,
        offset: 4 * P,
        flags: log,
    }];
    for i in 0..3 {
        plugs.push(PlugSpec {
            gpa: Gpa((8 + 2 * i) * P),
            size: P,
            mapping: b.clone(),
            offset: i * P,
            flags: SlotFlags::NONE,
        });
    }
    (kvm, memory, plugs)
}

/// What must not change: the map's slots and expected memslots, the
/// mirror, KVM's memslots and the hub's plugged ranges.
fn snapshot(kvm: &SimKvm, memory: &MemoryManager) -> impl PartialEq + std::fmt::Debug {
    let map = memory.load();
    let slots: Vec<_> = map
        .iter()
        .map(|s| (s.range(), s.flags(), s.id(), s.hva()))
        .collect();
    (
        slots,
        map.expected_memslots(),
        memory.registered(),
        kvm.memslots(),
        memory.hub().plugged(),
    )
}

#[test]
fn test_plug_many_failing_at_each_call_rolls_back_exactly() {
    for mode in [DirtyLogMode::Bitmap, DirtyLogMode::Manual] {
        // How many memslot changes the batch makes.
        let (kvm, memory, plugs) = setup(mode);
        let before = kvm.calls();
        memory.apply(|m| m.plug_many(plugs)).unwrap();
        let calls = kvm.calls() - before;
        assert!(
            calls >= 5,
            "{mode}: {calls} calls (a delete, a merged create, 3 creates)"
        );
        assert_eq!(memory.load().len(), 4);
        for at in 0..calls {
            let (kvm, memory, plugs) = setup(mode);
            let want = snapshot(&kvm, &memory);
            kvm.fail_calls(&[at], libc::EIO);
            let err = memory.apply(|m| m.plug_many(plugs.clone())).unwrap_err();
            assert!(
                matches!(err, MemslotError::RolledBack { .. }),
                "{mode}, call {at}: {err}"
            );
            assert_eq!(snapshot(&kvm, &memory), want, "{mode}, call {at}");
            memory.check_consistency().unwrap();
            // The guest's write survives the rollback (and, in manual mode,
            // a re-created logging memslot starts with every page set).
            let dirty = memory.dirty_pages(Gpa(0), 8 * P).unwrap();
            assert!(dirty.contains(&Gfn(1)), "{mode}, call {at}: {dirty:?}");
            if mode == DirtyLogMode::Bitmap {
                assert_eq!(dirty, vec![Gfn(1)], "{mode}, call {at}");
            }
            // Nothing is left half done: the batch then goes through.
            memory.apply(|m| m.plug_many(plugs)).unwrap();
            assert_eq!(memory.load().len(), 4, "{mode}, call {at}");
            memory.check_consistency().unwrap();
        }
    }
}
