//! Probes of KVM's memslots themselves, beyond the manager's mirror.
//!
//! KVM has no "list memslots" ioctl, and [`MemoryManager::check_consistency`]
//! sees only dirty-logging slots (`KVM_GET_DIRTY_LOG` answers for a slot
//! with a bitmap; in ring mode for none). [`MemoryManager::probe_kvm`] asks
//! KVM about one sampled slot and one sampled hole by GPA, with calls that
//! change nothing when KVM agrees with the mirror, on either backend (real
//! KVM and [`SimKvm`](super::SimKvm) answer alike):
//!
//! - **a plugged slot**: a 1-page create under a *free* id over a page of a
//!   mirrored slot must fail with `EEXIST` (`__kvm_set_memory_region` refuses
//!   a new slot overlapping a live one before it allocates anything, so the
//!   refusal changes nothing). If it succeeds KVM had no slot there: the
//!   probe slot is deleted again at once and the probe fails. It points at
//!   the probed slot's own host page, so even that window maps nothing but
//!   this guest's memory.
//! - **a hole** (optional, see below): a 1-page create under a free id in a
//!   page no mirrored slot covers, in the gap after a sampled slot (its first
//!   page, where a wrong split or shrink would leave a slot, or a page
//!   further in, where a slot an op should have deleted would be), must succeed (`EEXIST` means KVM holds a
//!   slot the mirror lacks) and is deleted again. It points at a scratch page
//!   mapped for the probe and unmapped after the delete. The probe slot
//!   exists for two ioctls: a vCPU touching that page meanwhile would read
//!   the scratch page instead of exiting, so the caller asks for hole probes
//!   only where no vCPU can be running a guest command (the fuzzer's real
//!   tier: no asynchronous command in flight) and only inside a window it
//!   owns (the fuzzer's arena, never the MMIO window).
//!
//! Hole probes stay out of `[0xfe00_0000, 4 GiB)`, where x86 KVM keeps
//! private memslots of its own (the APIC access page among them) that no
//! mirror knows. Both need a free id below `max_slots`; with every id in use nothing is
//! probed. The probe holds the state mutex throughout, so no op's memslot
//! call interleaves with it. Cost: one failing ioctl for a slot (returns
//! before KVM's memslot swap), two memslot changes (each an SRCU grace period
//! on real KVM) and one 4 KiB `mmap` for a hole.

use vmm_sys_util::errno;

use crate::mm::addr::{Gpa, GpaRange, Hva, PAGE_SIZE};
use crate::mm::backing::{BackingKind, HostMapping};
use crate::mm::slot_map::{MemslotFlags, MemslotSpec, SlotId};

use super::backend::MemslotRegion;
use super::mirror::{end_of, State};
use super::MemoryManager;

/// What one [`MemoryManager::probe_kvm`] asked KVM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvmProbe {
    /// The slot probed with an overlapping create (`EEXIST`), and the page.
    pub slot: Option<(SlotId, Gpa)>,
    /// The hole page probed with a create and delete.
    pub hole: Option<Gpa>,
    /// The free id the probes used.
    pub free_id: Option<SlotId>,
}

impl MemoryManager {
    /// Probes KVM for one mirrored slot and, if `holes` names a window, one
    /// hole inside it; `pick` chooses which (any number: a counter, a
    /// random value). See the module docs for the calls and when hole
    /// probes are safe. Skips what it cannot probe (no free id, no slot, no
    /// hole in the window, a poisoned manager).
    ///
    /// # Errors
    /// A description of what KVM holds that the mirror does not say.
    pub fn probe_kvm(&self, pick: u64, holes: Option<GpaRange>) -> Result<KvmProbe, String> {
        let mut st = self.lock_state();
        let mut done = KvmProbe::default();
        if st.poisoned {
            return Ok(done);
        }
        let max = self.memory.load().config().max_slots;
        let Some(free) = free_id(&st, max) else {
            return Ok(done);
        };
        done.free_id = Some(free);
        if let Some(spec) = sampled_slot(&st, pick) {
            let pages = spec.size / PAGE_SIZE;
            let offset = (pick >> 20) % pages.max(1) * PAGE_SIZE;
            let gpa = Gpa(spec.gpa.0 + offset);
            let region = MemslotRegion {
                slot: free,
                flags: MemslotFlags::empty(),
                gpa,
                size: PAGE_SIZE,
                hva: Hva(spec.hva.0 + offset),
            };
            // SAFETY: the page lies inside the mirrored slot's mapping, which
            // the mirror keeps alive (we hold its lock) and which is this
            // guest's memory; if the create succeeds, the delete below drops
            // the probe slot before the lock is released.
            match unsafe { self.backend.set_memslot(&region) } {
                Err(e) if e.errno() == libc::EEXIST => {}
                Ok(()) => {
                    let deleted = delete(self, &mut st, &region);
                    return Err(format!(
                        "KVM has no memslot at {gpa}, where the mirror holds {spec:?}: a 1-page \
                         create under free {free} succeeded ({deleted})"
                    ));
                }
                Err(e) => {
                    return Err(format!(
                        "a 1-page create under free {free} over {gpa} of mirrored {spec:?}: \
                         expected EEXIST, got {e}"
                    ))
                }
            }
            done.slot = Some((spec.id, gpa));
        }
        let Some(hole) = holes.and_then(|w| hole_in(&st, w, pick)) else {
            return Ok(done);
        };
        let scratch = HostMapping::new(&BackingKind::Anon, PAGE_SIZE)
            .map_err(|e| format!("mapping the hole probe's scratch page: {e}"))?;
        let region = MemslotRegion {
            slot: free,
            flags: MemslotFlags::empty(),
            gpa: hole,
            size: PAGE_SIZE,
            hva: scratch.hva(),
        };
        // SAFETY: `scratch` is a live anonymous page of ours used for
        // nothing else; it is unmapped only after the delete below succeeds
        // (leaked otherwise).
        match unsafe { self.backend.set_memslot(&region) } {
            Ok(()) => {
                let deleted = delete(self, &mut st, &region);
                if deleted != "deleted again" {
                    std::mem::forget(scratch); // KVM may still map it
                    return Err(format!(
                        "the hole probe's slot at {hole} under {free}: {deleted}"
                    ));
                }
            }
            Err(e) if e.errno() == libc::EEXIST => {
                return Err(format!(
                    "KVM holds a memslot overlapping {hole}, where the mirror has none \
                     (a 1-page create under free {free} got EEXIST)"
                ))
            }
            Err(e) => {
                return Err(format!(
                    "a 1-page create under free {free} in the hole at {hole}: expected \
                     success, got {e}"
                ))
            }
        }
        done.hole = Some(hole);
        Ok(done)
    }
}

/// Deletes the probe's slot `region` again; poisons the manager if KVM
/// refuses (it then holds a slot nobody mirrors).
fn delete(manager: &MemoryManager, st: &mut State, region: &MemslotRegion) -> String {
    let gone = MemslotRegion { size: 0, ..*region };
    // SAFETY: a delete registers no memory.
    match unsafe { manager.backend.set_memslot(&gone) } {
        Ok(()) => "deleted again".into(),
        Err(e) => {
            st.poisoned = true;
            format!("deleting it again failed: {}", errno::Error::new(e.errno()))
        }
    }
}

/// The lowest id below `max` the mirror does not hold.
fn free_id(st: &State, max: u32) -> Option<SlotId> {
    let mut want = 0u32;
    for id in st.by_id.keys() {
        if id.0 != want {
            break;
        }
        want += 1;
    }
    (want < max).then_some(SlotId(want))
}

/// A mirrored slot chosen by `pick`: the first at or after a picked id,
/// wrapping to the first slot.
fn sampled_slot(st: &State, pick: u64) -> Option<MemslotSpec> {
    let last = st.by_id.keys().next_back()?.0 as u64;
    let from = SlotId((pick % (last + 1)) as u32);
    st.by_id
        .range(from..)
        .next()
        .or_else(|| st.by_id.iter().next())
        .map(|(_, r)| r.spec)
}

/// Where x86 KVM may hold private memslots of its own, above every user
/// id (the APIC access page at `0xfee0_0000`, the real-mode TSS and identity
/// page table below 4 GiB): they overlap no mirrored slot yet refuse a
/// create with `EEXIST`, so hole probes stay out of `[0xfe00_0000, 4 GiB)`.
const KVM_PRIVATE_SLOTS: (u64, u64) = (0xfe00_0000, 1 << 32);

/// Bytes past a slot's end a hole probe looks at: the gap after a
/// sampled slot, up to the next slot or this far.
const HOLE_REACH: u64 = 64 << 20;

/// A page no mirrored slot covers, inside `window`, next to a slot: in the
/// gap after a slot chosen by `pick` (up to the next slot, at most
/// [`HOLE_REACH`]), its first page half the time (an edge a wrong split or
/// shrink leaves covered), a page chosen by `pick` otherwise. `None` if that
/// gap is empty or outside `window`.
fn hole_in(st: &State, window: GpaRange, pick: u64) -> Option<Gpa> {
    let spec = sampled_slot(st, pick.rotate_left(17))?;
    let from = end_of(&spec).next_multiple_of(PAGE_SIZE);
    let next = st
        .by_gpa
        .range(Gpa(from)..)
        .next()
        .map_or(u64::MAX, |(gpa, _)| gpa.0);
    let to = next
        .min(from.saturating_add(HOLE_REACH))
        .min(window.end().0);
    let from = from.max(window.start().0.next_multiple_of(PAGE_SIZE));
    let pages = to.checked_sub(from)? / PAGE_SIZE;
    if pages == 0 {
        return None;
    }
    let page = if pick & 1 == 0 {
        from
    } else {
        from + (pick >> 1) % pages * PAGE_SIZE
    };
    // The mirror's slots do not overlap: nothing covers [from, next).
    debug_assert!(st.overlapping(Gpa(page), page + PAGE_SIZE).is_none());
    let private = KVM_PRIVATE_SLOTS;
    (page + PAGE_SIZE <= private.0 || page >= private.1).then_some(Gpa(page))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::mm::manager::{MemslotBackend, SimKvm};
    use crate::mm::slot_map::{SlotFlags, SlotMapConfig};

    const BASE: u64 = 0x1_0000_0000;

    fn manager(kvm: Arc<SimKvm>) -> MemoryManager {
        let memory = MemoryManager::new(kvm, SlotMapConfig::default()).unwrap();
        for (gpa, flags) in [
            (BASE, SlotFlags::NONE),
            (
                BASE + 0x40_0000,
                SlotFlags {
                    read_only: true,
                    ..SlotFlags::NONE
                },
            ),
        ] {
            let m = Arc::new(HostMapping::new(&BackingKind::Anon, 0x20_0000).unwrap());
            memory
                .apply(|map| map.plug(Gpa(gpa), 0x20_0000, m.clone(), 0, flags))
                .unwrap();
        }
        memory
    }

    fn window() -> GpaRange {
        GpaRange::new(Gpa(BASE), 0x100_0000).unwrap()
    }

    #[test]
    fn test_probes_of_an_agreeing_kvm_change_nothing() {
        let kvm = Arc::new(SimKvm::new());
        let memory = manager(kvm.clone());
        let before = kvm.memslots();
        let mut holes = std::collections::BTreeSet::new();
        for pick in 0..64u64 {
            let p = memory
                .probe_kvm(pick.wrapping_mul(0x9E37_79B9_7F4A_7C15), Some(window()))
                .unwrap();
            assert!(p.slot.is_some() && p.hole.is_some(), "{p:?}");
            let hole = p.hole.unwrap();
            assert!(memory.load().lookup(hole).is_none(), "{hole} is plugged");
            assert!(window().contains(hole));
            holes.insert(hole);
        }
        assert!(holes.len() > 4, "{holes:?}");
        assert_eq!(kvm.memslots(), before);
        memory.check_consistency().unwrap();
    }

    #[test]
    fn test_a_slot_dropped_behind_the_managers_back_is_found() {
        let kvm = Arc::new(SimKvm::new());
        let memory = manager(kvm.clone());
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
        // The manager's own check sees only dirty-logging slots.
        memory.check_consistency().unwrap();
        let found = (0..8)
            .map(|pick| memory.probe_kvm(pick, None))
            .find_map(Result::err)
            .expect("a probe of the dropped slot");
        assert!(found.contains("KVM has no memslot at"), "{found}");
        // The probe's own slot was deleted again.
        assert_eq!(kvm.memslots().len(), 1);
    }

    #[test]
    fn test_a_stray_slot_in_a_hole_is_found() {
        let kvm = Arc::new(SimKvm::new());
        let memory = manager(kvm.clone());
        let stray_mem = HostMapping::new(&BackingKind::Anon, 0x80_0000).unwrap();
        // A stray slot KVM holds over the rest of the window, under an id
        // the mirror does not use.
        let stray = MemslotRegion {
            slot: SlotId(100),
            flags: MemslotFlags::empty(),
            gpa: Gpa(BASE + 0x80_0000),
            size: 0x80_0000,
            hva: stray_mem.hva(),
        };
        // SAFETY: `stray_mem` outlives the slot: it is deleted below.
        unsafe { kvm.set_memslot(&stray) }.unwrap();
        let found = (0..64u64)
            .map(|pick| memory.probe_kvm(pick.wrapping_mul(0x9E37_79B9_7F4A_7C15), Some(window())))
            .find_map(Result::err)
            .expect("a hole probe inside the stray slot");
        assert!(found.contains("KVM holds a memslot overlapping"), "{found}");
        // SAFETY: a delete registers no memory.
        unsafe { kvm.set_memslot(&MemslotRegion { size: 0, ..stray }) }.unwrap();
    }

    #[test]
    fn test_no_free_id_probes_nothing() {
        let kvm = Arc::new(SimKvm::with_max_slots(2));
        let config = SlotMapConfig {
            max_slots: 2,
            ..SlotMapConfig::default()
        };
        let memory = MemoryManager::new(kvm, config).unwrap();
        for gpa in [BASE, BASE + 0x40_0000] {
            let m = Arc::new(HostMapping::new(&BackingKind::Anon, 0x20_0000).unwrap());
            memory
                .apply(|map| map.plug(Gpa(gpa), 0x20_0000, m.clone(), 0, SlotFlags::NONE))
                .unwrap();
        }
        assert_eq!(
            memory.probe_kvm(3, Some(window())).unwrap(),
            KvmProbe::default()
        );
    }
}
