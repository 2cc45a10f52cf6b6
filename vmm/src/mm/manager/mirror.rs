//! The mirror of what KVM holds, and the checks each memslot call must pass
//! against it before it is issued (KVM's rules for `__kvm_set_memory_region`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use vmm_sys_util::errno;

use crate::mm::addr::{Gfn, Gpa, GpaRange, Hva, PAGE_SIZE};
use crate::mm::backing::HostMapping;
use crate::mm::slot_map::{MemslotChange, MemslotFlags, MemslotSpec, SlotId, SlotMapConfig};

use super::backend::{MemslotBackend, MemslotRegion};
use super::dirty_mode::DirtyLogMode;
use super::error::{FailureCause, MemslotFailure, MemslotOp};

/// `KVM_MEM_MAX_NR_PAGES` (`include/linux/kvm_host.h`): the most pages a
/// memslot can have, so KVM never copies more than this many dirty bits.
const KVM_MEM_MAX_NR_PAGES: u64 = (1 << 31) - 1;

/// Bytes of the dirty-bitmap buffer: enough for the largest bitmap KVM can
/// copy out (`KVM_MEM_MAX_NR_PAGES` bits rounded up to 64), whatever slot an
/// id names. It is address space only (`MAP_NORESERVE`, touched as far as the
/// largest bitmap actually read).
pub(super) const DIRTY_BITMAP_BYTES: u64 = KVM_MEM_MAX_NR_PAGES.div_ceil(64) * 8;

/// A memslot KVM holds, and the mapping it points into (kept alive here).
pub(super) struct Registered {
    pub(super) spec: MemslotSpec,
    pub(super) mapping: Arc<HostMapping>,
}

/// One memslot call in the manager's terms (slots are built only by the map).
#[derive(Clone)]
pub(super) struct Step {
    pub(super) op: MemslotOp,
    pub(super) spec: MemslotSpec,
    pub(super) mapping: Arc<HostMapping>,
    /// For `SetFlags`: the flags KVM holds before the call.
    pub(super) old_flags: MemslotFlags,
    /// For `Move`: the guest-physical address KVM holds before the call.
    pub(super) from: Gpa,
}

impl Step {
    pub(super) fn of(change: &MemslotChange) -> Step {
        let (op, slot, old_flags) = match change {
            MemslotChange::Create { slot } => (MemslotOp::Create, slot, MemslotFlags::empty()),
            MemslotChange::Delete { slot } => (MemslotOp::Delete, slot, MemslotFlags::empty()),
            MemslotChange::SetFlags { slot, old_flags } => {
                (MemslotOp::SetFlags, slot, old_flags.memslot_flags())
            }
        };
        let spec = slot.spec();
        Step {
            op,
            spec,
            mapping: Arc::clone(slot.mapping()),
            old_flags,
            from: spec.gpa,
        }
    }

    /// `delete` then `create` as one `Move`, where KVM can do both in one
    /// call (`KVM_MR_MOVE`): the same id, size, host address, mapping and
    /// flags at another address, without dirty logging (a moved slot keeps
    /// its dirty bitmap in KVM, which the manager harvests at a delete). A
    /// delete and a create each cost KVM a memslot-set swap and an SRCU
    /// grace period, a move two in all; so a whole-slot move is one call and
    /// one grace period fewer.
    pub(super) fn fuse_move(delete: &Step, create: &Step) -> Option<Step> {
        let (d, c) = (&delete.spec, &create.spec);
        let same = delete.op == MemslotOp::Delete
            && create.op == MemslotOp::Create
            && d.id == c.id
            && d.size == c.size
            && d.hva == c.hva
            && d.flags == c.flags
            && d.gpa != c.gpa
            && !c.flags.contains(MemslotFlags::LOG_DIRTY_PAGES)
            && Arc::ptr_eq(&delete.mapping, &create.mapping);
        same.then(|| Step {
            op: MemslotOp::Move,
            spec: *c,
            mapping: Arc::clone(&create.mapping),
            old_flags: MemslotFlags::empty(),
            from: d.gpa,
        })
    }

    /// The call that restores the state before `self`.
    pub(super) fn inverse(&self) -> Step {
        let mut inv = self.clone();
        match self.op {
            MemslotOp::Create => inv.op = MemslotOp::Delete,
            MemslotOp::Delete => inv.op = MemslotOp::Create,
            MemslotOp::SetFlags => {
                inv.spec.flags = self.old_flags;
                inv.old_flags = self.spec.flags;
            }
            MemslotOp::Move => {
                inv.spec.gpa = self.from;
                inv.from = self.spec.gpa;
            }
            MemslotOp::GetDirtyLog | MemslotOp::ClearDirtyLog => {}
        }
        inv
    }

    pub(super) fn failure(&self, cause: FailureCause) -> MemslotFailure {
        MemslotFailure {
            op: self.op,
            spec: self.spec,
            cause,
        }
    }

    pub(super) fn region(&self) -> MemslotRegion {
        if self.op == MemslotOp::Delete {
            MemslotRegion::delete(&self.spec)
        } else {
            MemslotRegion::set(&self.spec)
        }
    }
}

pub(super) fn end_of(spec: &MemslotSpec) -> u64 {
    spec.gpa.0.saturating_add(spec.size)
}

/// Everything guarded by the state mutex.
pub(super) struct State {
    pub(super) by_id: BTreeMap<SlotId, Registered>,
    /// Slot start -> id, to find overlaps in O(log n).
    pub(super) by_gpa: BTreeMap<Gpa, SlotId>,
    /// Harvested dirty pages not yet reported.
    pub(super) pending: BTreeSet<Gfn>,
    /// `DIRTY_BITMAP_BYTES` of address space for `KVM_GET_DIRTY_LOG`.
    pub(super) bitmap: HostMapping,
    pub(super) poisoned: bool,
    /// The backend's dirty-log interface.
    pub(super) mode: DirtyLogMode,
    /// Dirty-ring entries naming no slot the mirror holds (or another
    /// address space): always 0 unless a harvest was missed.
    pub(super) unattributed: u64,
    /// A `KVM_RESET_DIRTY_RINGS` failure after a delete had taken effect,
    /// reported by the next [`dirty_pages`](super::MemoryManager::dirty_pages).
    pub(super) ring_error: Option<errno::Error>,
    /// The bitmap modes' blind windows measured so far.
    pub(super) windows: super::TeardownWindows,
    /// While an op's memslot calls run: the pages harvested so far, by
    /// guest frame *and* host page, until the op is known to have taken
    /// effect ([`settle_harvest`](Self::settle_harvest)). `None` outside
    /// an op: harvests go straight to `pending`.
    pub(super) journal: Option<Vec<(Gfn, Hva)>>,
}

impl State {
    /// The live slot overlapping `[gpa, end)`, if any (slots never overlap,
    /// so the last one starting below `end` is the only candidate).
    pub(super) fn overlapping(&self, gpa: Gpa, end: u64) -> Option<&MemslotSpec> {
        let (_, id) = self.by_gpa.range(..Gpa(end)).next_back()?;
        let spec = &self.by_id.get(id)?.spec;
        (end_of(spec) > gpa.0).then_some(spec)
    }

    /// Checks `step` against what KVM holds (KVM's rules for
    /// `__kvm_set_memory_region`), so the ioctl does exactly what it says.
    pub(super) fn validate(&self, step: &Step, config: &SlotMapConfig) -> Result<(), String> {
        let spec = &step.spec;
        let live = self.by_id.get(&spec.id).map(|r| r.spec);
        match step.op {
            MemslotOp::Create => {
                if spec.id.0 >= config.max_slots {
                    return Err(format!("id is not below max_slots {}", config.max_slots));
                }
                if let Some(l) = live {
                    return Err(format!("the id is live at {} size {:#x}", l.gpa, l.size));
                }
                if spec.size == 0
                    || spec.gpa.0 % PAGE_SIZE != 0
                    || spec.size % PAGE_SIZE != 0
                    || spec.hva.0 % PAGE_SIZE != 0
                {
                    return Err("gpa, size and hva must be non-zero multiples of 4 KiB".into());
                }
                if spec.size / PAGE_SIZE > config.max_slot_pages {
                    return Err(format!(
                        "{} pages are more than one memslot may hold ({}, KVM: EINVAL)",
                        spec.size / PAGE_SIZE,
                        config.max_slot_pages
                    ));
                }
                if spec.flags.contains(MemslotFlags::READONLY) && !config.read_only_supported {
                    return Err("KVM_MEM_READONLY is not supported".into());
                }
                let base = step.mapping.hva().0;
                let inside = spec.hva.0 >= base
                    && spec.hva.0 - base <= step.mapping.len()
                    && spec.size <= step.mapping.len() - (spec.hva.0 - base);
                if !inside {
                    return Err(format!(
                        "hva range lies outside its {:#x}-byte mapping at {}",
                        step.mapping.len(),
                        step.mapping.hva()
                    ));
                }
                if spec.gpa.0.checked_add(spec.size).is_none() {
                    return Err("range overflows".into());
                }
                if let Some(o) = self.overlapping(spec.gpa, end_of(spec)) {
                    return Err(format!(
                        "range overlaps live {} at {} size {:#x} (KVM: EEXIST)",
                        o.id, o.gpa, o.size
                    ));
                }
                Ok(())
            }
            MemslotOp::Delete => match live {
                Some(l) if l == *spec => Ok(()),
                Some(l) => Err(format!("KVM holds the id as {l:?}")),
                None => Err("the id is not live".into()),
            },
            MemslotOp::SetFlags => {
                let before = MemslotSpec {
                    flags: step.old_flags,
                    ..*spec
                };
                if (step.old_flags ^ spec.flags).contains(MemslotFlags::READONLY) {
                    return Err("only KVM_MEM_LOG_DIRTY_PAGES can change on a live slot".into());
                }
                match live {
                    Some(l) if l == before => Ok(()),
                    Some(l) => Err(format!("KVM holds the id as {l:?}")),
                    None => Err("the id is not live".into()),
                }
            }
            MemslotOp::Move => {
                let before = MemslotSpec {
                    gpa: step.from,
                    ..*spec
                };
                match live {
                    Some(l) if l == before => {}
                    Some(l) => return Err(format!("KVM holds the id as {l:?}")),
                    None => return Err("the id is not live".into()),
                }
                if spec.gpa.0 % PAGE_SIZE != 0 || spec.gpa.0.checked_add(spec.size).is_none() {
                    return Err("the new gpa must be 4 KiB aligned and not overflow".into());
                }
                match self.overlapping(spec.gpa, end_of(spec)) {
                    Some(o) if o.id != spec.id => Err(format!(
                        "range overlaps live {} at {} size {:#x} (KVM: EEXIST)",
                        o.id, o.gpa, o.size
                    )),
                    _ => Ok(()),
                }
            }
            MemslotOp::GetDirtyLog | MemslotOp::ClearDirtyLog => Ok(()),
        }
    }

    /// Updates the mirror after `step`'s ioctl succeeded.
    pub(super) fn record(&mut self, step: &Step) {
        match step.op {
            MemslotOp::Create => {
                self.by_gpa.insert(step.spec.gpa, step.spec.id);
                self.by_id.insert(
                    step.spec.id,
                    Registered {
                        spec: step.spec,
                        mapping: Arc::clone(&step.mapping),
                    },
                );
            }
            MemslotOp::Delete => {
                self.by_gpa.remove(&step.spec.gpa);
                // The mapping's Arc drops here: KVM no longer maps it.
                self.by_id.remove(&step.spec.id);
            }
            MemslotOp::SetFlags => {
                if let Some(r) = self.by_id.get_mut(&step.spec.id) {
                    r.spec.flags = step.spec.flags;
                }
            }
            MemslotOp::Move => {
                self.by_gpa.remove(&step.from);
                self.by_gpa.insert(step.spec.gpa, step.spec.id);
                if let Some(r) = self.by_id.get_mut(&step.spec.id) {
                    r.spec.gpa = step.spec.gpa;
                }
            }
            MemslotOp::GetDirtyLog | MemslotOp::ClearDirtyLog => {}
        }
    }

    /// `KVM_GET_DIRTY_LOG` of `id` into the buffer; returns the first
    /// `ceil(pages / 64)` words (a slot of `size` bytes).
    pub(super) fn read_bitmap(
        &mut self,
        vm: &dyn MemslotBackend,
        id: SlotId,
        size: u64,
    ) -> Result<&[u64], errno::Error> {
        let words = (size / PAGE_SIZE).div_ceil(64) as usize;
        if words as u64 * 8 > DIRTY_BITMAP_BYTES {
            // KVM refuses a memslot of more than KVM_MEM_MAX_NR_PAGES pages
            // (`EINVAL`); a backend that took one (the simulated KVM does)
            // cannot have its log read into the buffer.
            return Err(errno::Error::new(libc::E2BIG));
        }
        let buf = self.bitmap.as_ptr().cast::<u64>();
        // SAFETY: `words * 8 <= DIRTY_BITMAP_BYTES` (checked above), the
        // buffer is a live, page-aligned mapping of that many bytes, and only
        // this `&mut State` touches it.
        unsafe { std::ptr::write_bytes(buf, 0, words) };
        // SAFETY: the buffer holds DIRTY_BITMAP_BYTES, enough for the bitmap
        // of any slot KVM can hold under any id, so KVM's copy stays inside it
        // even if KVM's slot differed from the mirror.
        unsafe { vm.get_dirty_log_into(id, buf) }?;
        // SAFETY: in bounds as above; KVM finished writing when the ioctl
        // returned, and the borrow of `self` keeps others away until the
        // slice is dropped.
        Ok(unsafe { std::slice::from_raw_parts(buf, words) })
    }

    /// Reads and clears the dirty log of the live slot `spec` into `pending`.
    pub(super) fn harvest(
        &mut self,
        vm: &dyn MemslotBackend,
        spec: &MemslotSpec,
    ) -> Result<(), MemslotFailure> {
        let mut dirty = Vec::new();
        let read = self.harvest_into(vm, spec, &mut dirty);
        let first = spec.gpa.gfn().0;
        for gfn in dirty {
            let hva = Hva(spec.hva.0 + (gfn.0 - first) * PAGE_SIZE);
            keep(&mut self.pending, &mut self.journal, gfn, hva);
        }
        read
    }

    /// Reads and clears the dirty log of the live slot `spec`, appending
    /// its dirty pages to `dirty` in ascending order.
    fn harvest_into(
        &mut self,
        vm: &dyn MemslotBackend,
        spec: &MemslotSpec,
        dirty: &mut Vec<Gfn>,
    ) -> Result<(), MemslotFailure> {
        let pages = spec.size / PAGE_SIZE;
        let first = spec.gpa.gfn().0;
        let words = self
            .read_bitmap(vm, spec.id, spec.size)
            .map_err(|e| MemslotFailure {
                op: MemslotOp::GetDirtyLog,
                spec: *spec,
                cause: FailureCause::Errno(e.errno()),
            })?;
        // Bits past the slot's last page (in a last, partial word) are not
        // pages: that word is masked on its own, so the loop over the full
        // words stays bare.
        let full = (pages / 64) as usize;
        let (whole, part) = words.split_at(full.min(words.len()));
        let tail = part
            .first()
            .map_or(0, |&w| w & ((1u64 << (pages % 64)) - 1));
        // One count first, so the pages go in without reallocating; the
        // scan stops at the last dirty word, and passes over eight clean
        // words at a time (most logs are clean or nearly so).
        let mut left: u32 = whole.iter().map(|w| w.count_ones()).sum();
        dirty.reserve(left as usize + tail.count_ones() as usize);
        let mut push = |base: u64, mut bits: u64| {
            while bits != 0 {
                dirty.push(Gfn(first + base + u64::from(bits.trailing_zeros())));
                bits &= bits - 1;
            }
        };
        for (c, chunk) in whole.chunks(8).enumerate() {
            if left == 0 {
                break;
            }
            if chunk.iter().fold(0, |acc, w| acc | w) == 0 {
                continue;
            }
            for (i, &word) in chunk.iter().enumerate() {
                left -= word.count_ones();
                push((c * 8 + i) as u64 * 64, word);
            }
        }
        push(full as u64 * 64, tail);
        Ok(())
    }

    /// Ends an op's journal of harvested pages. If the op took effect
    /// (`rolled_back` false), each page is pending by the frame it was
    /// written at. If its calls were rolled back, the frames belong to the
    /// layout the op tried to make (a slot it created, then deleted in the
    /// rollback, is reported by *its* address): each page is attributed by
    /// host address to the dirty-logging slot that maps that host page now,
    /// `gfn = slot.gpa + (hva - slot.hva)`, and dropped where no logging slot
    /// maps it (memory that was not logged before the op needs no report).
    /// The slot map never lets two slots share host memory, so at most one
    /// slot maps each host page.
    pub(super) fn settle_harvest(&mut self, rolled_back: bool) {
        let Some(journal) = self.journal.take() else {
            return;
        };
        if !rolled_back {
            self.pending.extend(journal.into_iter().map(|(gfn, _)| gfn));
            return;
        }
        let mut logging: Vec<MemslotSpec> = self
            .by_id
            .values()
            .map(|r| r.spec)
            .filter(|s| s.flags.contains(MemslotFlags::LOG_DIRTY_PAGES))
            .collect();
        logging.sort_by_key(|s| s.hva.0);
        for (_, hva) in journal {
            let after = logging.partition_point(|s| s.hva.0 <= hva.0);
            let Some(slot) = after.checked_sub(1).map(|i| &logging[i]) else {
                continue;
            };
            let offset = hva.0 - slot.hva.0;
            if offset < slot.size {
                self.pending
                    .insert(Gfn(slot.gpa.gfn().0 + offset / PAGE_SIZE));
            }
        }
    }

    /// Before a delete or logging-off of the live dirty-logging slot `spec`:
    /// keeps what KVM's bitmap holds (KVM frees it with the change). The
    /// rings need nothing before; see [`harvest_rings`](Self::harvest_rings).
    pub(super) fn harvest_before_teardown(
        &mut self,
        vm: &dyn MemslotBackend,
        spec: &MemslotSpec,
    ) -> Result<(), MemslotFailure> {
        match self.mode {
            DirtyLogMode::Ring => Ok(()),
            DirtyLogMode::Bitmap | DirtyLogMode::Manual => self.harvest(vm, spec),
        }
    }

    /// For a report over `range`: appends the live dirty-logging slot
    /// `spec`'s logged pages to `dirty`, in ascending order (the caller
    /// keeps those outside `range` for later). Bitmap: the whole slot (a
    /// read clears it all). Manual: reads the bitmap, keeps only the pages
    /// inside `range`, and clears exactly those (`KVM_CLEAR_DIRTY_LOG` over
    /// the 64-page-aligned window around them, masked): the rest stays
    /// logged in KVM. Ring: nothing per slot (the rings are harvested once).
    pub(super) fn harvest_range(
        &mut self,
        vm: &dyn MemslotBackend,
        spec: &MemslotSpec,
        range: GpaRange,
        dirty: &mut Vec<Gfn>,
    ) -> Result<(), MemslotFailure> {
        match self.mode {
            DirtyLogMode::Ring => Ok(()),
            DirtyLogMode::Bitmap => self.harvest_into(vm, spec, dirty),
            DirtyLogMode::Manual => self.harvest_and_clear(vm, spec, range, dirty),
        }
    }

    fn harvest_and_clear(
        &mut self,
        vm: &dyn MemslotBackend,
        spec: &MemslotSpec,
        range: GpaRange,
        dirty: &mut Vec<Gfn>,
    ) -> Result<(), MemslotFailure> {
        let pages = spec.size / PAGE_SIZE;
        let first = spec.gpa.gfn().0;
        // The slot's pages inside `range`, relative to the slot: [lo, hi).
        let lo = range.start().0.max(spec.gpa.0).saturating_sub(spec.gpa.0) / PAGE_SIZE;
        let hi = (range.end().0.min(end_of(spec)).saturating_sub(spec.gpa.0)).div_ceil(PAGE_SIZE);
        if lo >= hi {
            return Ok(());
        }
        let failure = |op, e: errno::Error| MemslotFailure {
            op,
            spec: *spec,
            cause: FailureCause::Errno(e.errno()),
        };
        self.read_bitmap(vm, spec.id, spec.size)
            .map_err(|e| failure(MemslotOp::GetDirtyLog, e))?;
        // The clear window: KVM wants it to start at a multiple of 64 pages
        // and to be a multiple of 64 long unless it ends at the slot's end.
        let win_lo = lo & !63;
        let win_hi = hi.next_multiple_of(64).min(pages);
        let words = (win_lo / 64) as usize..(win_hi.div_ceil(64)) as usize;
        let buf = self.bitmap.as_ptr().cast::<u64>();
        // SAFETY: `read_bitmap` just filled the first ceil(pages / 64) words
        // of the buffer, which `words` lies within; only this `&mut State`
        // touches the buffer.
        let bits = unsafe { std::slice::from_raw_parts_mut(buf, pages.div_ceil(64) as usize) };
        let before = dirty.len();
        for w in words.clone() {
            let base = w as u64 * 64;
            // Keep only the bits of pages in [lo, hi): those are reported
            // and cleared; the others stay set in KVM.
            if base >= hi || base + 64 <= lo {
                bits[w] = 0;
                continue;
            }
            let mut mask = u64::MAX;
            if base < lo {
                mask &= u64::MAX << (lo - base);
            }
            if hi < base + 64 {
                mask &= (1u64 << (hi - base)) - 1;
            }
            bits[w] &= mask;
            let mut b = bits[w];
            while b != 0 {
                dirty.push(Gfn(first + base + u64::from(b.trailing_zeros())));
                b &= b - 1;
            }
        }
        if dirty.len() == before {
            return Ok(());
        }
        let num_pages = u32::try_from(win_hi - win_lo).expect("a slot has fewer than 2^31 pages");
        // SAFETY: the window's words lie inside the buffer (above), which
        // stays mapped and untouched by anything else during the call.
        let cleared =
            unsafe { vm.clear_dirty_log(spec.id, win_lo, num_pages, bits[words.start..].as_ptr()) };
        // Reported pages stay in `dirty` even if the clear failed: they were
        // written, and an uncleared bit only reports a page again.
        cleared.map_err(|e| failure(MemslotOp::ClearDirtyLog, e))
    }

    /// Collects every dirty-ring entry into `pending`, attributing an entry
    /// to `gone` if it names `gone`'s id (a slot just deleted or stopped
    /// logging, whose entries are still in the rings), else to the slot the
    /// mirror holds under the id. Then the rings are reset.
    pub(super) fn harvest_rings(
        &mut self,
        vm: &dyn MemslotBackend,
        gone: Option<&MemslotSpec>,
    ) -> Result<u64, errno::Error> {
        let mut got = Vec::new();
        let harvested = self.harvest_rings_into(vm, gone, &mut |gfn, hva| got.push((gfn, hva)));
        for (gfn, hva) in got {
            keep(&mut self.pending, &mut self.journal, gfn, hva);
        }
        harvested
    }

    /// [`harvest_rings`](Self::harvest_rings), handing each page (frame and
    /// host address) to `push` instead, in ring order: unsorted, possibly
    /// repeated.
    pub(super) fn harvest_rings_into(
        &mut self,
        vm: &dyn MemslotBackend,
        gone: Option<&MemslotSpec>,
        push: &mut dyn FnMut(Gfn, Hva),
    ) -> Result<u64, errno::Error> {
        let Self {
            by_id,
            unattributed,
            ..
        } = self;
        // Consecutive entries mostly name one slot: look it up once per run.
        let mut last: Option<(u32, Option<MemslotSpec>)> = None;
        vm.harvest_dirty_rings(&mut |slot, offset| {
            let (as_id, id) = (slot >> 16, SlotId(slot & 0xffff));
            let spec = match last {
                Some((named, spec)) if named == slot => spec,
                _ => {
                    let spec = match gone {
                        Some(g) if g.id == id => Some(*g),
                        _ => by_id.get(&id).map(|r| r.spec),
                    };
                    last = Some((slot, spec));
                    spec
                }
            };
            match spec {
                Some(s) if as_id == 0 && offset < s.size / PAGE_SIZE => {
                    push(
                        Gfn(s.gpa.gfn().0 + offset),
                        Hva(s.hva.0 + offset * PAGE_SIZE),
                    );
                }
                _ => *unattributed += 1,
            }
        })
    }
}

/// A harvested page: into the op's journal while an op runs, else pending.
fn keep(pending: &mut BTreeSet<Gfn>, journal: &mut Option<Vec<(Gfn, Hva)>>, gfn: Gfn, hva: Hva) {
    match journal {
        Some(j) => j.push((gfn, hva)),
        None => {
            pending.insert(gfn);
        }
    }
}
