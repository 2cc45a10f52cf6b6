//! The invariants checked after memory ops, on either backend: what must
//! hold between the slot map, the manager's mirror of KVM, KVM itself, the
//! invalidation hub and the IOMMU's stage-2 table whatever the op did.
//!
//! - [`map_mirror`]: the map's expected memslots equal the mirror, one
//!   memslot per slot (no leaked slot id);
//! - [`hub_plugged`]: the hub's plugged set equals the map's slots merged;
//! - [`iommu_leaves`]: every mapped IOMMU leaf lies inside plugged slots,
//!   translates to the slot's host address for its GPA, and allows no write
//!   in a read-only slot (an invalidation zaps what an op takes away or
//!   write-protects, so a leaf outside this is stale);
//! - [`StepInvariants`]: all three after a memory op (the two O(n) ones
//!   sampled above [`FULL_UP_TO`] slots), and every
//!   [`probe_every`](StepInvariants::probe_every) ops
//!   [`MemoryManager::probe_kvm`]: KVM itself, by GPA, for a sampled slot
//!   and (when no vCPU runs a guest command) a sampled hole.
//!
//! The scenario driver runs [`StepInvariants`] after every memory op (so
//! `vmm run --scenario` and the fuzzer's real tier); the fuzzer's sim tier
//! runs the same functions after every step.

use crate::devices::iommu::Iommu;
use crate::mm::addr::{Gpa, GpaRange, Hva, PAGE_SIZE};
use crate::mm::manager::MemoryManager;
use crate::mm::slot_map::{MemslotSpec, SlotMap};
use crate::mm::stage2::{Access, MappedRun};

/// Memory ops between two KVM probes, by default: a probe costs up to two
/// memslot changes on real KVM (two SRCU grace periods), so one in 16 ops
/// keeps the fuzzer's real tier well above 500 steps/s (`docs/fuzzing.md`).
pub const DEFAULT_PROBE_EVERY: u32 = 16;

/// Up to this many slots the O(n) invariants ([`map_mirror`],
/// [`hub_plugged`]) run after every op; above it after one op in
/// [`SAMPLE_ABOVE`] (at 30,000 slots each costs about a millisecond).
pub const FULL_UP_TO: usize = 4096;

/// One op in this many runs the O(n) invariants above [`FULL_UP_TO`] slots.
pub const SAMPLE_ABOVE: u64 = 16;

/// Whether `action` is a memory op the invariants follow (one that changes
/// the map, or a `check`).
pub fn is_memory_op(action: &crate::scenario::Action) -> bool {
    use crate::scenario::Action as A;
    matches!(
        action,
        A::Plug(_)
            | A::Unplug(_)
            | A::Protect(_)
            | A::Move(_)
            | A::Resize(_)
            | A::DirtyLog(_)
            | A::PlugMany(_)
            | A::Check(_)
    )
}

/// An invariant that does not hold: its name (a finding's signature) and
/// what was seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Short name, e.g. `iommu-leaves`.
    pub name: &'static str,
    /// What differs.
    pub detail: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invariant {} broken: {}", self.name, self.detail)
    }
}

fn broken(name: &'static str, detail: String) -> Violation {
    Violation { name, detail }
}

/// The map's expected memslots equal the manager's mirror of KVM, and the
/// mirror holds one memslot per slot of the map (no leaked slot id).
///
/// # Errors
/// `map-mirror` or `slot-ids`.
pub fn map_mirror(memory: &MemoryManager) -> Result<(), Violation> {
    map_mirror_of(&memory.load(), &memory.registered())
}

/// [`map_mirror`] of a map and the mirror's memslots already read (for a
/// caller that compares those memslots with something else too).
///
/// # Errors
/// `map-mirror` or `slot-ids`.
pub fn map_mirror_of(map: &SlotMap, registered: &[MemslotSpec]) -> Result<(), Violation> {
    let expected = map.expected_memslots();
    if expected != registered {
        let at = expected
            .iter()
            .zip(registered)
            .position(|(a, b)| a != b)
            .unwrap_or(expected.len().min(registered.len()));
        return Err(broken(
            "map-mirror",
            format!(
                "the map expects {} memslots, the mirror holds {}; first difference: map {:?}, mirror {:?}",
                expected.len(),
                registered.len(),
                expected.get(at),
                registered.get(at)
            ),
        ));
    }
    if registered.len() != map.len() {
        return Err(broken(
            "slot-ids",
            format!(
                "{} memslots registered for {} slots",
                registered.len(),
                map.len()
            ),
        ));
    }
    Ok(())
}

/// The map's slots as maximal ranges (adjacent slots merged).
pub fn merged_slots(map: &SlotMap) -> Vec<GpaRange> {
    let mut merged: Vec<GpaRange> = Vec::new();
    for s in map.iter() {
        let r = s.range();
        match merged.last_mut() {
            Some(last) if last.end() == r.start() => {
                *last = GpaRange::from_bounds(last.start(), r.end()).unwrap_or(*last)
            }
            _ => merged.push(r),
        }
    }
    merged
}

/// The hub's plugged set equals the map's slots merged.
///
/// # Errors
/// `hub-plugged`.
pub fn hub_plugged(memory: &MemoryManager) -> Result<(), Violation> {
    let merged = merged_slots(&memory.load());
    let plugged = memory.hub().plugged();
    if plugged != merged {
        return Err(broken(
            "hub-plugged",
            format!("hub {plugged:?}, map {merged:?}"),
        ));
    }
    Ok(())
}

/// Every mapped leaf of `iommu`'s stage-2 table lies inside plugged slots
/// of `memory`'s map, translates to the slot's host address for each of its
/// GPAs, and allows no write in a read-only slot. Walks the whole table
/// (its runs of equal, contiguous leaves): O(runs + slots they cover).
///
/// Call it when no device fill can be in flight: a fill that raced an
/// invalidation installs a stale leaf for an instant before its `retry`
/// zaps it (`crate::devices::iommu`, invariant 2).
///
/// # Errors
/// `iommu-leaves`, naming the run and the slot.
pub fn iommu_leaves(memory: &MemoryManager, iommu: &Iommu) -> Result<(), Violation> {
    let map = memory.load();
    for run in iommu.dump() {
        check_run(&map, &run)?;
    }
    Ok(())
}

/// One run of equal, contiguous leaves against `map` (see [`iommu_leaves`]).
fn check_run(map: &SlotMap, run: &MappedRun) -> Result<(), Violation> {
    let mut at = run.range.start();
    while at < run.range.end() {
        let Some(slot) = map.lookup(at) else {
            return Err(broken(
                "iommu-leaves",
                format!(
                    "the IOMMU maps {at} ({} run {}, {}) but no slot is plugged there",
                    run.page_size, run.range, run.perms
                ),
            ));
        };
        let want = slot.translate(at);
        let have = run.hva.0 + (at.0 - run.range.start().0);
        if want.map(|h| h.0) != Some(have) {
            return Err(broken(
                "iommu-leaves",
                format!(
                    "the IOMMU maps {at} to host {have:#x}, its slot {} to {want:?}",
                    slot.range()
                ),
            ));
        }
        if slot.flags().read_only && run.perms.allows(Access::Write) {
            return Err(broken(
                "iommu-leaves",
                format!(
                    "the IOMMU maps {at} {} in read-only slot {}",
                    run.perms,
                    slot.range()
                ),
            ));
        }
        // Host addresses are contiguous within a slot: check the rest of
        // the run's overlap with it at once.
        at = slot.range().end().min(run.range.end());
    }
    Ok(())
}

/// The leaf mapping `gpa` now, if any, checked against `map` as
/// [`iommu_leaves`] checks every leaf; `Ok(false)` if nothing maps it. One table walk.
///
/// # Errors
/// `iommu-leaves`.
pub fn iommu_leaf_at(map: &SlotMap, iommu: &Iommu, gpa: Gpa) -> Result<bool, Violation> {
    let Some(t) = iommu.table().lookup(gpa) else {
        return Ok(false);
    };
    let Some(range) = GpaRange::new(t.page_gpa, t.page_size.bytes()) else {
        return Ok(true);
    };
    let run = MappedRun {
        range,
        hva: Hva(t.hva.0 - (gpa.0 - t.page_gpa.0)),
        page_size: t.page_size,
        perms: t.perms,
    };
    check_run(map, &run)?;
    Ok(true)
}

/// Device reads of `count` plugged pages chosen by `pick`, through the
/// IOMMU, as a device would make them: each miss fills a leaf (read
/// accesses set no Dirty bit, so `dirty-pages` counts are untouched). The
/// simulated tier has no DMA engine; these fills give [`iommu_leaves`]
/// leaves that later ops must zap. Returns the pages read.
pub fn device_reads(memory: &MemoryManager, iommu: &Iommu, pick: u64, count: u32) -> Vec<Gpa> {
    let map = memory.load();
    let slots = map.len() as u64;
    let mut read = Vec::new();
    if slots == 0 {
        return read;
    }
    let mut pick = pick;
    for _ in 0..count {
        pick = pick
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(0x632B_E59B_D9B4_E019);
        let Some(slot) = map.iter().nth((pick % slots) as usize) else {
            break;
        };
        let pages = slot.range().len() / PAGE_SIZE;
        let gpa = Gpa(slot.range().start().0 + (pick >> 32) % pages.max(1) * PAGE_SIZE);
        // A refusal (a busy slot) is the device's problem, not an invariant.
        if iommu.translate(gpa, Access::Read).is_ok() {
            read.push(gpa);
        }
    }
    read
}

/// Where hole probes may create their 1-page slot: above the map's reserved
/// (MMIO) window, inside the guest-physical width. (The probe picks a page
/// in the gap after a sampled slot: [`MemoryManager::probe_kvm`].)
pub fn hole_window(map: &SlotMap) -> Option<GpaRange> {
    let config = map.config();
    let from = config.reserved.map_or(0, |r| r.end().0);
    GpaRange::from_bounds(Gpa(from), config.max_gpa).filter(|r| !r.is_empty())
}

/// The invariants after each memory op, with their sampling state.
#[derive(Clone, Debug)]
pub struct StepInvariants {
    /// Ops between two KVM probes (0: never).
    pub probe_every: u32,
    ops: u64,
    probes: u64,
    /// Ops between two full walks of the IOMMU's table (1: every op).
    walk_every: u64,
    /// Pages the device read lately (their leaves checked between walks).
    tracked: Vec<Gpa>,
}

/// Pages [`StepInvariants::device_reads`] remembers for the checks between
/// full walks.
const TRACKED: usize = 16;

impl Default for StepInvariants {
    fn default() -> Self {
        Self::new(DEFAULT_PROBE_EVERY)
    }
}

impl StepInvariants {
    /// Probing KVM every `probe_every` ops (0: never).
    pub fn new(probe_every: u32) -> Self {
        Self {
            probe_every,
            ops: 0,
            probes: 0,
            walk_every: 1,
            tracked: Vec::new(),
        }
    }

    /// For a caller that knows every fill of the IOMMU (it makes them with
    /// [`device_reads`](Self::device_reads)): a full walk of the table
    /// every `walk_every` ops; between walks, the leaves of the pages read
    /// lately, one table lookup each. (A full walk visits every table page:
    /// it cost the simulated tier 28% of its time after every step.)
    pub fn walking_every(mut self, walk_every: u64) -> Self {
        self.walk_every = walk_every.max(1);
        self
    }

    /// [`device_reads`] of `count` pages, remembered for the leaf checks
    /// between full walks.
    pub fn device_reads(&mut self, memory: &MemoryManager, iommu: &Iommu, count: u32) {
        let read = device_reads(memory, iommu, self.ops, count);
        self.tracked.extend(read);
        if self.tracked.len() > TRACKED {
            let extra = self.tracked.len() - TRACKED;
            self.tracked.drain(..extra);
        }
    }

    /// KVM probes made so far.
    pub fn probes(&self) -> u64 {
        self.probes
    }

    /// After a memory op: [`map_mirror`] and [`hub_plugged`] (every op up
    /// to [`FULL_UP_TO`] slots, one in [`SAMPLE_ABOVE`] above), then
    /// [`iommu_leaves`] if `devices_idle`, then every `probe_every` ops a
    /// KVM probe of a slot, and of a hole if `vcpus_idle` (no vCPU runs a
    /// guest command that could touch the probe's page).
    ///
    /// # Errors
    /// The first invariant that does not hold (`kvm-probe` for a probe).
    pub fn after_op(
        &mut self,
        memory: &MemoryManager,
        iommu: &Iommu,
        devices_idle: bool,
        vcpus_idle: bool,
    ) -> Result<(), Violation> {
        let map = memory.load();
        if map.len() <= FULL_UP_TO || (self.ops + 1) % SAMPLE_ABOVE == 0 {
            map_mirror(memory)?;
            hub_plugged(memory)?;
        }
        self.devices_and_probes(memory, iommu, devices_idle, vcpus_idle)
    }

    /// Ops seen so far.
    pub fn ops(&self) -> u64 {
        self.ops
    }

    /// [`after_op`](Self::after_op) without the O(n) invariants (for a
    /// caller that checks those itself): counts the op, checks the IOMMU's
    /// leaves if `devices_idle` (all of them, or between walks those of
    /// the pages read lately: [`walking_every`](Self::walking_every)), and
    /// probes KVM every `probe_every` ops.
    ///
    /// # Errors
    /// `iommu-leaves` or `kvm-probe`.
    pub fn devices_and_probes(
        &mut self,
        memory: &MemoryManager,
        iommu: &Iommu,
        devices_idle: bool,
        vcpus_idle: bool,
    ) -> Result<(), Violation> {
        self.ops += 1;
        if devices_idle && self.ops % self.walk_every == 0 {
            iommu_leaves(memory, iommu)?;
        } else if devices_idle {
            let map = memory.load();
            let mut kept = Vec::with_capacity(self.tracked.len());
            for &gpa in &self.tracked {
                if iommu_leaf_at(&map, iommu, gpa)? {
                    kept.push(gpa);
                }
            }
            self.tracked = kept;
        }
        if self.probe_every > 0 && self.ops % u64::from(self.probe_every) == 0 {
            let pick = self.ops.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let holes = if vcpus_idle {
                hole_window(&memory.load())
            } else {
                None
            };
            memory
                .probe_kvm(pick, holes)
                .map_err(|e| broken("kvm-probe", e))?;
            self.probes += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::mm::backing::{BackingKind, HostMapping};
    use crate::mm::manager::{MemslotBackend, MemslotRegion, SimKvm};
    use crate::mm::slot_map::{SlotFlags, SlotMapConfig};
    use crate::mm::stage2::{PageSize, Perms};

    const BASE: u64 = 0x1_0000_0000;

    fn vm() -> (Arc<SimKvm>, Arc<MemoryManager>, Iommu, Arc<HostMapping>) {
        let kvm = Arc::new(SimKvm::new());
        let memory = Arc::new(MemoryManager::new(kvm.clone(), SlotMapConfig::default()).unwrap());
        let m = Arc::new(HostMapping::new(&BackingKind::Anon, 0x40_0000).unwrap());
        memory
            .apply(|map| map.plug(Gpa(BASE), 0x40_0000, m.clone(), 0, SlotFlags::NONE))
            .unwrap();
        let iommu = Iommu::new(memory.clone());
        (kvm, memory, iommu, m)
    }

    #[test]
    fn test_leaves_filled_by_device_reads_follow_every_op() {
        let (_kvm, memory, iommu, _m) = vm();
        device_reads(&memory, &iommu, 7, 8);
        assert!(!iommu.dump().is_empty());
        iommu_leaves(&memory, &iommu).unwrap();
        memory
            .apply(|m| m.protect(Gpa(BASE), 0x20_0000, true))
            .unwrap();
        iommu_leaves(&memory, &iommu).unwrap();
        memory
            .apply(|m| m.move_range(Gpa(BASE + 0x20_0000), 0x20_0000, Gpa(BASE + 0x100_0000)))
            .unwrap();
        device_reads(&memory, &iommu, 9, 8);
        iommu_leaves(&memory, &iommu).unwrap();
        let mut inv = StepInvariants::new(1);
        inv.after_op(&memory, &iommu, true, true).unwrap();
        assert_eq!(inv.probes(), 1);
    }

    #[test]
    fn test_a_leaf_outside_every_slot_is_found() {
        let (_kvm, memory, iommu, m) = vm();
        // A leaf no invalidation knows about: beyond the slot.
        iommu
            .table()
            .map(Gpa(BASE + 0x80_0000), m.hva(), PageSize::Size4K, Perms::R)
            .unwrap();
        let v = iommu_leaves(&memory, &iommu).unwrap_err();
        assert_eq!(v.name, "iommu-leaves");
        assert!(v.detail.contains("no slot is plugged there"), "{v}");
    }

    #[test]
    fn test_a_leaf_to_the_wrong_host_page_is_found() {
        let (_kvm, memory, iommu, m) = vm();
        iommu
            .table()
            .map(
                Gpa(BASE + 0x1000),
                Hva(m.hva().0 + 0x2000),
                PageSize::Size4K,
                Perms::RW,
            )
            .unwrap();
        let v = iommu_leaves(&memory, &iommu).unwrap_err();
        assert!(v.detail.contains("its slot"), "{v}");
    }

    #[test]
    fn test_a_writable_leaf_in_a_read_only_slot_is_found() {
        let (_kvm, memory, iommu, m) = vm();
        memory
            .apply(|map| map.protect(Gpa(BASE), 0x40_0000, true))
            .unwrap();
        iommu
            .table()
            .map(
                Gpa(BASE + 0x3000),
                Hva(m.hva().0 + 0x3000),
                PageSize::Size4K,
                Perms::RW,
            )
            .unwrap();
        let v = iommu_leaves(&memory, &iommu).unwrap_err();
        assert!(v.detail.contains("read-only slot"), "{v}");
    }

    #[test]
    fn test_a_slot_dropped_from_kvm_is_found_by_the_step_probe() {
        let (kvm, memory, iommu, _m) = vm();
        let victim = kvm.memslots()[0];
        let gone = MemslotRegion {
            slot: victim.id,
            flags: victim.flags,
            gpa: victim.gpa,
            size: 0,
            hva: victim.hva,
        };
        // SAFETY: a delete registers no memory.
        unsafe { kvm.set_memslot(&gone) }.unwrap();
        let mut inv = StepInvariants::new(4);
        let mut found = None;
        for _ in 0..4 {
            if let Err(v) = inv.after_op(&memory, &iommu, true, true) {
                found = Some(v);
                break;
            }
        }
        let v = found.expect("the fourth op probes");
        assert_eq!(v.name, "kvm-probe");
        assert_eq!(inv.probes(), 0);
    }

    /// Runs `text` through the scenario driver (the real tier's step
    /// loop) on a simulated VM, after `plant` broke something.
    fn run_driver(
        text: &str,
        plant: impl FnOnce(&SimKvm, &MemoryManager, &Iommu),
    ) -> crate::scenario::ScenarioReport {
        use crate::devices::pins::PinManager;
        use crate::mm::pin_account::{PinAccount, PinLimit};
        use std::sync::atomic::AtomicBool;

        let kvm = Arc::new(SimKvm::new());
        let memory = Arc::new(MemoryManager::new(kvm.clone(), SlotMapConfig::default()).unwrap());
        let iommu = Arc::new(Iommu::new(memory.clone()));
        plant(&kvm, &memory, &iommu);
        let account = Arc::new(PinAccount::new(PinLimit::Unlimited));
        crate::scenario::driver::Driver {
            scenario: Arc::new(crate::scenario::Scenario::parse(text).unwrap()),
            memory: memory.clone(),
            backing: BackingKind::Anon,
            links: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            pins: Arc::new(PinManager::new(memory, account)),
            iommu,
            held: Default::default(),
            console: Box::new(|_| {}),
        }
        .run()
    }

    const STEPS: &str = "probe_kvm_every = 2
        [[step]]
        do = \"plug\"
        gpa = \"0x1_0000_0000\"
        size = \"4M\"
        [[step]]
        do = \"plug\"
        gpa = \"0x1_0080_0000\"
        size = \"4M\"
        [[step]]
        do = \"protect\"
        gpa = \"0x1_0000_0000\"
        size = \"2M\"
        access = \"ro\"
        ";

    #[test]
    fn test_the_driver_checks_every_invariant_after_each_memory_op() {
        let report = run_driver(STEPS, |_, _, _| {});
        assert!(report.passed, "{:?}", report.failure());
    }

    #[test]
    fn test_the_driver_finds_a_stale_iommu_leaf() {
        let report = run_driver(STEPS, |_, _, iommu| {
            let m = HostMapping::new(&BackingKind::Anon, 0x1000).unwrap();
            iommu
                .table()
                .map(Gpa(0x2_0000_0000), m.hva(), PageSize::Size4K, Perms::R)
                .unwrap();
        });
        let failure = report.failure().unwrap();
        assert!(
            failure.contains("invariant iommu-leaves broken"),
            "{failure}"
        );
        assert_eq!(report.steps.len(), 1);
    }

    #[test]
    fn test_the_driver_finds_a_hub_out_of_step() {
        let report = run_driver(STEPS, |_, memory, _| {
            let r = GpaRange::new(Gpa(0x2_0000_0000), 0x1000).unwrap();
            memory
                .hub()
                .added(r, crate::mm::notifier::Reason::Plug)
                .unwrap();
        });
        let failure = report.failure().unwrap();
        assert!(
            failure.contains("invariant hub-plugged broken"),
            "{failure}"
        );
    }

    #[test]
    fn test_the_driver_finds_a_map_change_kvm_never_saw() {
        let report = run_driver(STEPS, |_, memory, _| {
            // Published without a memslot call: the map and the mirror part.
            let m = Arc::new(HostMapping::new(&BackingKind::Anon, 0x1000).unwrap());
            memory
                .guarded()
                .apply(
                    |map| map.plug(Gpa(0x3_0000_0000), 0x1000, m.clone(), 0, SlotFlags::NONE),
                    std::time::Duration::from_secs(1),
                )
                .unwrap();
        });
        let failure = report.failure().unwrap();
        assert!(failure.contains("invariant map-mirror broken"), "{failure}");
        assert!(!report.steps[0].passed);
    }

    #[test]
    fn test_the_driver_probe_finds_a_stray_kvm_slot() {
        let stray = HostMapping::new(&BackingKind::Anon, 0x100_0000).unwrap();
        let steps = format!(
            "{}{}",
            STEPS.replace("probe_kvm_every = 2", "probe_kvm_every = 1"),
            "[[step]]\ndo = \"check\"\n".repeat(8)
        );
        let report = run_driver(&steps, |kvm, _, _| {
            // KVM holds a slot over the holes next to the plugs, under an id
            // the manager will not use in three ops.
            let region = MemslotRegion {
                slot: crate::mm::slot_map::SlotId(500),
                flags: crate::mm::slot_map::MemslotFlags::empty(),
                gpa: Gpa(0x1_0040_0000),
                size: 0x40_0000,
                hva: stray.hva(),
            };
            // SAFETY: `stray` outlives the simulated VM's use of it (SimKvm
            // never touches memory).
            unsafe { kvm.set_memslot(&region) }.unwrap();
        });
        let failure = report.failure().unwrap();
        assert!(failure.contains("invariant kvm-probe broken"), "{failure}");
        assert!(
            failure.contains("KVM holds a memslot overlapping"),
            "{failure}"
        );
    }

    #[test]
    fn test_a_hub_that_missed_an_unplug_is_found() {
        let (_kvm, memory, _iommu, _m) = vm();
        hub_plugged(&memory).unwrap();
        // The hub hears of memory the map never plugged.
        memory
            .hub()
            .added(
                GpaRange::new(Gpa(BASE + 0x100_0000), 0x1000).unwrap(),
                crate::mm::notifier::Reason::Plug,
            )
            .unwrap();
        assert_eq!(hub_plugged(&memory).unwrap_err().name, "hub-plugged");
    }
}
