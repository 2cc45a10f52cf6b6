//! Unit tests of the IOMMU on the simulated KVM backend.

use super::*;
use crate::mm::backing::HostMapping;
use crate::mm::manager::SimKvm;
use crate::mm::slot_map::{SlotFlags, SlotMapConfig};

const BASE: Gpa = Gpa(0x4000_0000);

fn setup(
    kind: BackingKind,
    len: u64,
    flags: SlotFlags,
) -> (Arc<MemoryManager>, Arc<HostMapping>, Iommu) {
    let memory = Arc::new(MemoryManager::new(SimKvm::new(), SlotMapConfig::default()).unwrap());
    let mem = Arc::new(HostMapping::new(&kind, len).unwrap());
    let m = mem.clone();
    memory
        .apply(|map| map.plug(BASE, len, m.clone(), 0, flags))
        .unwrap();
    let iommu = Iommu::new(memory.clone());
    (memory, mem, iommu)
}

fn range(gpa: Gpa, len: u64) -> GpaRange {
    GpaRange::new(gpa, len).unwrap()
}

#[test]
fn test_translate_miss_fills_4k_leaf_then_hits() {
    let (_a, mem, iommu) = setup(BackingKind::Anon, 0x40_0000, SlotFlags::NONE);
    let t = iommu
        .translate(Gpa(BASE.0 + 0x1_2340), Access::Read)
        .unwrap();
    assert_eq!(t.hva.0, mem.hva().0 + 0x1_2340);
    assert_eq!(t.page_size, PageSize::Size4K);
    iommu
        .translate(Gpa(BASE.0 + 0x1_2000), Access::Write)
        .unwrap();
    let s = iommu.stats();
    assert_eq!((s.fills, s.hits), (1, 1));
    assert_eq!(iommu.dump().len(), 1);
}

#[test]
fn test_flush_unmaps_every_leaf_and_keeps_device_dirty_bits() {
    let (_a, _mem, iommu) = setup(BackingKind::Anon, 0x40_0000, SlotFlags::NONE);
    iommu.translate(BASE, Access::Read).unwrap();
    iommu
        .translate(Gpa(BASE.0 + 0x20_0000), Access::Write)
        .unwrap();
    assert_eq!(iommu.dump().len(), 2);
    assert_eq!(iommu.flush().unwrap(), 2);
    assert!(iommu.dump().is_empty());
    let dirty = iommu.take_dirty(range(BASE, 0x40_0000)).unwrap();
    assert_eq!(dirty, [Gfn((BASE.0 + 0x20_0000) / PAGE_SIZE)]);
    // Leaves fill again on the next access.
    iommu.translate(BASE, Access::Read).unwrap();
    assert_eq!(iommu.dump().len(), 1);
}

#[test]
fn test_translate_thp_slot_fills_2m_leaf() {
    let (_a, mem, iommu) = setup(BackingKind::Thp, 0x40_0000, SlotFlags::NONE);
    let t = iommu
        .translate(Gpa(BASE.0 + 0x20_1008), Access::Read)
        .unwrap();
    assert_eq!(t.page_size, PageSize::Size2M);
    assert_eq!(t.hva.0, mem.hva().0 + 0x20_1008);
    assert_eq!(iommu.stats().huge_fills, 1);
}

/// Dirty logging over two pages of a THP slot splits the memslot in
/// place: the 2 MiB leaf the device had is split at the new boundaries
/// (its translation kept), so a device write dirties one page, and a
/// new fill there is 4 KiB.
#[test]
fn test_logging_part_of_a_thp_slot_splits_its_2m_leaf() {
    let (memory, mem, iommu) = setup(BackingKind::Thp, 0x40_0000, SlotFlags::NONE);
    let at = Gpa(BASE.0 + 0x20_1000);
    assert_eq!(
        iommu.translate(at, Access::Read).unwrap().page_size,
        PageSize::Size2M
    );
    memory
        .apply(|m| m.set_dirty_log(at, 2 * PAGE_SIZE, true))
        .unwrap();
    let t = iommu.translate(at, Access::Write).unwrap();
    assert_eq!(
        (t.page_size, t.hva.0),
        (PageSize::Size4K, mem.hva().0 + 0x20_1000)
    );
    // The rest of the old leaf still translates, page by page.
    let next = iommu
        .translate(Gpa(BASE.0 + 0x3f_f000), Access::Read)
        .unwrap();
    assert_eq!(next.page_size, PageSize::Size4K);
    let dirty = iommu.take_dirty(range(BASE, 0x40_0000)).unwrap();
    assert_eq!(dirty, [Gfn(at.0 / PAGE_SIZE)]);
    // The other 2 MiB of the slot is untouched by the split: still huge.
    assert_eq!(
        iommu.translate(BASE, Access::Read).unwrap().page_size,
        PageSize::Size2M
    );
}

#[test]
fn test_translate_write_to_readonly_slot_is_denied() {
    let ro = SlotFlags {
        read_only: true,
        ..SlotFlags::NONE
    };
    let (_a, _m, iommu) = setup(BackingKind::Anon, 0x10_0000, ro);
    assert!(iommu.translate(BASE, Access::Read).is_ok());
    assert!(matches!(
        iommu.translate(BASE, Access::Write),
        Err(IommuError::Denied {
            perms: Perms::R,
            ..
        })
    ));
}

#[test]
fn test_protect_zaps_and_refills_readonly_keeping_dirty() {
    let (a, _m, iommu) = setup(BackingKind::Anon, 0x10_0000, SlotFlags::NONE);
    iommu.translate(BASE, Access::Write).unwrap();
    a.apply(|m| m.protect(BASE, 0x1000, true)).unwrap();
    assert!(iommu.dump().is_empty());
    assert!(matches!(
        iommu.translate(BASE, Access::Write),
        Err(IommuError::Denied { .. })
    ));
    assert!(iommu.translate(BASE, Access::Read).is_ok());
    assert_eq!(
        iommu.take_dirty(range(BASE, 0x10_0000)).unwrap(),
        vec![BASE.gfn()]
    );
    assert!(iommu.take_dirty(range(BASE, 0x10_0000)).unwrap().is_empty());
}

#[test]
fn test_write_after_unprotect_refills_writable_leaf() {
    let (a, _m, iommu) = setup(BackingKind::Anon, 0x10_0000, SlotFlags::NONE);
    a.apply(|m| m.protect(BASE, 0x10_0000, true)).unwrap();
    iommu.translate(BASE, Access::Read).unwrap();
    a.apply(|m| m.protect(BASE, 0x10_0000, false)).unwrap();
    let t = iommu.translate(BASE, Access::Write).unwrap();
    assert_eq!(t.perms, Perms::RW);
    assert!(t.dirty);
}

#[test]
fn test_unplug_part_of_huge_leaf_splits_keeping_rest_mapped() {
    let (a, _m, iommu) = setup(BackingKind::Thp, 0x40_0000, SlotFlags::NONE);
    iommu.translate(BASE, Access::Read).unwrap();
    a.apply(|m| m.unplug(BASE, HUGE_2M)).unwrap();
    assert!(matches!(
        iommu.translate(BASE, Access::Read),
        Err(IommuError::Unplugged { .. })
    ));
    let t = iommu
        .translate(Gpa(BASE.0 + HUGE_2M), Access::Read)
        .unwrap();
    assert_eq!(t.page_size, PageSize::Size2M);
    let runs = iommu.dump();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].range, range(Gpa(BASE.0 + HUGE_2M), HUGE_2M));
}

#[test]
fn test_move_zaps_old_range_and_new_range_faults_in() {
    let (a, mem, iommu) = setup(BackingKind::Anon, 0x10_0000, SlotFlags::NONE);
    iommu.translate(BASE, Access::Read).unwrap();
    let to = Gpa(0x1_0000_0000);
    a.apply(|m| m.move_range(BASE, 0x10_0000, to)).unwrap();
    assert!(iommu.translate(BASE, Access::Read).is_err());
    assert_eq!(iommu.translate(to, Access::Read).unwrap().hva, mem.hva());
    assert_eq!(iommu.dump()[0].range.start(), to);
}
