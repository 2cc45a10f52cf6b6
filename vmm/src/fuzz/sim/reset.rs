//! Putting a simulated VM back in its boot state between timelines
//! ([`SimVm::reset`]), and what "the same state" means ([`BootState`]).

use std::sync::Arc;

use super::SimVm;
use crate::mm::addr::{Gpa, GpaRange};
use crate::mm::slot_map::{MemslotSpec, SlotFlags};
use crate::mm::stage2::MappedRun;

/// Everything a step or an invariant can observe of a VM before its first
/// step: KVM's memslots, the mirror, the map's slots (spec, offset, flags
/// and which neighbours continue one mapping), the hub's plugged ranges and
/// the dirty state not yet reported. Slot ids are included: a reset VM
/// hands out the same ids as a new one because ids are allocated lowest
/// free first.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct BootState {
    pub(super) kvm: Vec<MemslotSpec>,
    pub(super) registered: Vec<MemslotSpec>,
    pub(super) slots: Vec<(MemslotSpec, u64, SlotFlags)>,
    pub(super) chained: Vec<bool>,
    pub(super) plugged: Vec<GpaRange>,
    pub(super) dirty_backlog: (usize, usize, u64),
    pub(super) charged: (u64, u64),
    pub(super) stage2: Vec<MappedRun>,
}

impl SimVm {
    /// What the VM looks like now, in the terms of [`BootState`].
    pub(super) fn state(&self) -> BootState {
        let map = self.memory.load();
        BootState {
            kvm: self.kvm.memslots(),
            registered: self.memory.registered(),
            slots: map
                .iter()
                .map(|s| (s.spec(), s.offset(), s.flags()))
                .collect(),
            chained: map
                .iter()
                .zip(map.iter().skip(1))
                .map(|(a, b)| a.range().end() == b.range().start() && a.chain() == b.chain())
                .collect(),
            plugged: self.memory.hub().plugged(),
            dirty_backlog: (
                self.kvm.dirty_backlog(),
                self.memory.dirty_backlog(),
                self.memory.unattributed_ring_entries(),
            ),
            charged: (
                self.pins.account().pinned().charged(),
                self.pins.account().dma_mappings().charged(),
            ),
            stage2: self.iommu.dump(),
        }
    }

    /// Puts the VM back in the state [`new`](Self::new) built it in, for the
    /// next timeline: drops every pin (unlocking and uncharging it) and
    /// numbers pins from 1 again, clears injected failures, unplugs every
    /// slot but the fixed boot region and guest RAM (RAM too unless it is
    /// still the one slot it was at boot), reports and drops dirty pages
    /// still pending, plugs RAM again on its original mapping, flushes the
    /// IOMMU, drops the frames devices wrote that no report took, and
    /// restarts the step invariants. The pin
    /// manager and the IOMMU stay: a new one would subscribe to the hub
    /// under a new number, which veto messages show.
    ///
    /// `true` only if the consistency check of what the reset changed holds
    /// and everything a step can observe (KVM's memslots, the mirror, the map, the
    /// hub, dirty backlogs, budgets, the stage-2 table) equals what the new
    /// VM had; on `false` the caller must build a new VM.
    ///
    /// Guest memory contents are not reset: guest writes are simulated
    /// (nothing is stored), and what DMA transfers wrote through host
    /// mappings no step compares (a checksum of the libFuzzer tier has no
    /// expected sum); the pages a new timeline plugs are new mappings.
    pub fn reset(&mut self) -> bool {
        self.held.clear();
        self.kvm.fail_calls(&[], libc::EIO);
        if !self.pins.restart_numbering() {
            return false;
        }
        let (ram_start, ram_len) = self.layout.ram;
        let map = self.memory.load();
        // Guest RAM still one slot exactly as plugged at boot: kept (its
        // pages stay resident for the next timeline's pins).
        let ram_intact = self
            .boot
            .slots
            .iter()
            .find(|(spec, _, _)| spec.gpa == Gpa(ram_start))
            .is_some_and(|boot| {
                map.slot_at(Gpa(ram_start)).is_some_and(|s| {
                    (s.spec(), s.offset(), s.flags()) == *boot
                        && Arc::ptr_eq(s.mapping(), &self.ram)
                })
            });
        // Everything above the boot region, like `munmap`, in as few ops as
        // possible (an unplug fails on a fixed slot: then no reset).
        let max_gpa = self.layout.limits.max_gpa;
        let spans = if ram_intact {
            [
                (self.layout.boot_end, ram_start),
                (ram_start + ram_len, max_gpa),
            ]
        } else {
            [(self.layout.boot_end, max_gpa), (max_gpa, max_gpa)]
        };
        let mut changes = Vec::new();
        for (lo, hi) in spans {
            let Some(range) = GpaRange::from_bounds(Gpa(lo), Gpa(hi)) else {
                continue;
            };
            if range.is_empty() || map.slots_in(range).next().is_none() {
                continue;
            }
            match self.memory.apply(|m| m.unplug(Gpa(lo), hi - lo)) {
                Ok(applied) => changes.extend(applied.changes),
                Err(_) => return false,
            }
        }
        drop(map);
        // Pages harvested when logging slots went away; "not logging" when
        // there are none.
        let _ = self.memory.dirty_pages(Gpa(0), max_gpa);
        if !ram_intact {
            let ram = self.ram.clone();
            match self
                .memory
                .apply(|m| m.plug(Gpa(ram_start), ram_len, ram, 0, SlotFlags::NONE))
            {
                Ok(applied) => changes.extend(applied.changes),
                Err(_) => return false,
            }
        }
        self.checker = Self::checker();
        // The simulated device's reads left leaves in guest RAM, which the
        // reset kept: flushed, as a new VM's IOMMU has none.
        if self.iommu.flush().is_err() {
            return false;
        }
        // Frames DMA wrote and no `dirty-pages` reported (the zaps above
        // and the flush harvested their Dirty bits into the pending set):
        // dropped, as the KVM side's above, or the next timeline's
        // `dirty-pages` would report them.
        let Some(all) = GpaRange::from_bounds(Gpa(0), Gpa(max_gpa)) else {
            return false;
        };
        if self.iommu.take_dirty(all).is_err() {
            return false;
        }
        // The invariants' own state (the walk's step count, the device's
        // sampled pages) as a new VM starts it.
        *self
            .step_invariants
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Self::step_invariants();
        // What the reset changed, checked as after any op (the timeline's
        // last step ended with the full check).
        self.memory.check_changes(&changes).is_ok() && self.state() == self.boot
    }
}
