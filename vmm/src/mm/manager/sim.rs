//! A simulated KVM: the memslot rules of `__kvm_set_memory_region`
//! (`virt/kvm/kvm_main.c`) and the dirty log, in memory, as a
//! [`MemslotBackend`] the whole memory manager runs on without `/dev/kvm`.
//!
//! It is the second backend, not a stand-in for KVM's tests: it exists for
//! speed (the fuzzer's coverage-guided tier, property tests) and for what real
//! KVM cannot do on demand, failing a chosen call. The rules it enforces:
//! - alignment: GPA, size and host address are multiples of 4 KiB (`EINVAL`);
//! - a memslot of more than `KVM_MEM_MAX_NR_PAGES` pages
//!   ([`MAX_MEMSLOT_PAGES`](crate::mm::slot_map::MAX_MEMSLOT_PAGES)) is
//!   `EINVAL`;
//! - an id at or past `max_slots` is `EINVAL`;
//! - delete of an id that is not live is `EINVAL`;
//! - a live id may change only its GPA (a move) or
//!   `KVM_MEM_LOG_DIRTY_PAGES`: a new size, host address or `KVM_MEM_READONLY`
//!   is `EINVAL`;
//! - a new or moved slot overlapping another live slot is `EEXIST`;
//! - the dirty log of a slot exists only while it logs: reading it otherwise
//!   is `ENOENT`; turning logging off or deleting the slot frees it.
//!
//! Guest writes are simulated with [`SimKvm::guest_write`] (or
//! [`guest_write_on`](SimKvm::guest_write_on) a given vCPU), which logs the
//! page if its slot logs and is writable, as KVM's fault path would, in the
//! VM's [`DirtyLogMode`]:
//! - bitmap: `get_dirty_log_into` reads and clears the slot's bits;
//! - manual (initially set): starting to log on a slot (a create with
//!   logging, or logging switched on) sets every bit of it; a read does not
//!   clear; `clear_dirty_log` clears the bits of a mask by range, with KVM's
//!   alignment rules (`EINVAL` otherwise);
//! - ring: each vCPU has a ring of `ring_entries` `(slot, offset)` entries. A
//!   logged write pushes an entry unless the page's last entry was not reset
//!   yet (KVM leaves such a page writable); a vCPU whose ring is full
//!   cannot enter the guest ([`SimWrite::RingFull`], KVM's
//!   `KVM_EXIT_DIRTY_RING_FULL`) until a harvest resets it. Entries outlive
//!   their slot's delete, naming its id, as KVM's do; `get_dirty_log_into`
//!   fails with `ENXIO`, as KVM's does with the ring on.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use vmm_sys_util::errno;

use crate::mm::addr::{Gfn, Gpa, Hva, PAGE_SIZE};
use crate::mm::slot_map::{MemslotFlags, MemslotSpec, SlotId, MAX_MEMSLOT_PAGES};

use super::backend::{MemslotBackend, MemslotRegion};
use super::dirty_mode::DirtyLogMode;

/// KVM's default `KVM_CAP_NR_MEMSLOTS` on x86 (`KVM_USER_MEM_SLOTS`).
pub const SIM_MAX_SLOTS: u32 = 32_764;

/// A simulated KVM memslot table with a dirty log; see the module docs.
#[derive(Debug)]
pub struct SimKvm {
    max_slots: u32,
    mode: DirtyLogMode,
    state: Mutex<SimState>,
    calls: AtomicUsize,
}

/// What became of a simulated guest write ([`SimKvm::guest_write_on`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SimWrite {
    /// A live slot maps the page writable: written (and logged if it logs).
    Written,
    /// No slot, or a read-only one: the write exits to the VMM as MMIO.
    Exit,
    /// Ring mode: the vCPU's dirty ring is full; it cannot enter the guest
    /// until the rings are harvested and reset. Nothing was written.
    RingFull,
}

/// Entries per simulated dirty ring unless [`SimKvm::with_rings`] says
/// otherwise (KVM's smallest ring, 4 KiB of 16-byte entries).
pub const SIM_RING_ENTRIES: usize = 256;

#[derive(Debug, Default)]
struct SimState {
    slots: BTreeMap<SlotId, MemslotSpec>,
    /// Guest frames logged dirty since their slot's log was last read.
    dirty: BTreeSet<Gfn>,
    /// Memslot-change call numbers (0-based) that fail with the errno,
    /// without effect.
    fail: BTreeMap<usize, i32>,
    /// Ring mode: each vCPU's published, not yet harvested entries.
    rings: Vec<VecDeque<(u32, u64)>>,
    /// Ring mode: entries per ring.
    ring_entries: usize,
    /// Ring mode: pages with an entry not yet reset (KVM keeps them
    /// writable, so a second write pushes nothing).
    unreset: BTreeSet<(SlotId, u64)>,
}

impl Default for SimKvm {
    fn default() -> Self {
        Self::new()
    }
}

impl SimKvm {
    /// An empty VM with KVM's x86 slot count ([`SIM_MAX_SLOTS`]).
    pub fn new() -> Self {
        Self::with_max_slots(SIM_MAX_SLOTS)
    }

    /// An empty VM refusing ids at or past `max_slots`.
    pub fn with_max_slots(max_slots: u32) -> Self {
        Self {
            max_slots,
            mode: DirtyLogMode::Bitmap,
            state: Mutex::new(SimState {
                rings: vec![VecDeque::new()],
                ring_entries: SIM_RING_ENTRIES,
                ..SimState::default()
            }),
            calls: AtomicUsize::new(0),
        }
    }

    /// The same VM using dirty-log interface `mode` (as if its capability
    /// had been enabled before any vCPU was created).
    ///
    /// ```
    /// use vmm::mm::manager::{DirtyLogMode, MemslotBackend, SimKvm};
    /// let kvm = SimKvm::new().with_dirty_log(DirtyLogMode::Ring).with_rings(2, 64);
    /// assert_eq!(kvm.dirty_log_mode(), DirtyLogMode::Ring);
    /// ```
    pub fn with_dirty_log(mut self, mode: DirtyLogMode) -> Self {
        self.mode = mode;
        self
    }

    /// Ring mode: `vcpus` rings of `entries` entries each (default one ring
    /// of [`SIM_RING_ENTRIES`]).
    pub fn with_rings(self, vcpus: usize, entries: usize) -> Self {
        {
            let mut st = self.lock();
            st.rings = vec![VecDeque::new(); vcpus.max(1)];
            st.ring_entries = entries.max(1);
        }
        self
    }

    /// Entries published in the dirty rings and not yet harvested.
    pub fn ring_backlog(&self) -> usize {
        self.lock().rings.iter().map(VecDeque::len).sum()
    }

    /// Dirty-log state not yet read: pages logged in the bitmaps, ring
    /// entries not harvested and pages whose ring entry was not reset. A
    /// VM whose slots were all deleted (or stopped logging) and whose
    /// rings were harvested has none.
    pub fn dirty_backlog(&self) -> usize {
        let st = self.lock();
        st.dirty.len() + st.rings.iter().map(VecDeque::len).sum::<usize>() + st.unreset.len()
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        // The state is consistent between statements: a panic elsewhere
        // cannot leave it half-changed.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The live memslots, by id.
    pub fn memslots(&self) -> Vec<MemslotSpec> {
        self.lock().slots.values().copied().collect()
    }

    /// Memslot changes (`set_memslot` calls) made so far; dirty-log reads
    /// are not counted.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Makes the memslot changes at these offsets from now (0 = the next
    /// `set_memslot` call) fail with `errno` and no effect; replaces earlier
    /// injections.
    pub fn fail_calls(&self, offsets: &[usize], errno: i32) {
        let now = self.calls();
        self.lock().fail = offsets.iter().map(|o| (now + o, errno)).collect();
    }

    /// A guest write to `gpa`, as KVM's fault path sees it: `true` if a live
    /// slot maps it writable (and then logged if the slot logs), `false` if
    /// the write would exit to the VMM (no slot, or a read-only one).
    ///
    /// On vCPU 0; in ring mode a full ring makes it `false` with nothing
    /// written: use [`guest_write_on`](Self::guest_write_on) there.
    pub fn guest_write(&self, gpa: Gpa) -> bool {
        self.guest_write_on(0, gpa) == SimWrite::Written
    }

    /// A guest write to `gpa` by vCPU `vcpu` (modulo the number of rings);
    /// see [`SimWrite`].
    pub fn guest_write_on(&self, vcpu: usize, gpa: Gpa) -> SimWrite {
        let mut st = self.lock();
        let ring = vcpu % st.rings.len();
        if self.mode == DirtyLogMode::Ring && st.rings[ring].len() >= st.ring_entries {
            return SimWrite::RingFull;
        }
        let Some(spec) = st.slot_at(gpa).copied() else {
            return SimWrite::Exit;
        };
        if spec.flags.contains(MemslotFlags::READONLY) {
            return SimWrite::Exit;
        }
        if spec.flags.contains(MemslotFlags::LOG_DIRTY_PAGES) {
            if self.mode == DirtyLogMode::Ring {
                let offset = gpa.gfn().0 - spec.gpa.gfn().0;
                if st.unreset.insert((spec.id, offset)) {
                    st.rings[ring].push_back((spec.id.0, offset));
                }
            } else {
                st.dirty.insert(gpa.gfn());
            }
        }
        SimWrite::Written
    }

    /// Counts a memslot change; its injected failure, if any.
    fn call(&self, st: &mut SimState) -> Result<(), errno::Error> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        match st.fail.remove(&n) {
            Some(e) => Err(errno::Error::new(e)),
            None => Ok(()),
        }
    }
}

impl SimState {
    /// The live slot `slot` if it logs (KVM: `ENOENT` otherwise).
    fn logging(&self, slot: SlotId) -> Result<MemslotSpec, errno::Error> {
        self.slots
            .get(&slot)
            .copied()
            .filter(|s| s.flags.contains(MemslotFlags::LOG_DIRTY_PAGES))
            .ok_or_else(|| errno::Error::new(libc::ENOENT))
    }

    fn slot_at(&self, gpa: Gpa) -> Option<&MemslotSpec> {
        self.slots
            .values()
            .find(|s| s.gpa.0 <= gpa.0 && gpa.0 - s.gpa.0 < s.size)
    }

    fn overlaps_other(&self, id: SlotId, gpa: u64, size: u64) -> bool {
        self.slots
            .values()
            .any(|o| o.id != id && o.gpa.0 < gpa + size && gpa < o.gpa.0 + o.size)
    }

    /// Sets every bit of `spec`'s log (`KVM_DIRTY_LOG_INITIALLY_SET`).
    fn set_all(&mut self, spec: &MemslotSpec) {
        let first = spec.gpa.gfn().0;
        self.dirty
            .extend((first..first + spec.size / PAGE_SIZE).map(Gfn));
    }

    /// Drops the logged frames of `spec` (KVM frees the slot's bitmap; a
    /// new slot under the id starts write-protected, so its first writes
    /// push ring entries again). Entries already in the rings stay.
    fn free_log(&mut self, spec: &MemslotSpec) {
        let id = spec.id;
        self.unreset.retain(|(s, _)| *s != id);
        let first = spec.gpa.gfn();
        let end = Gfn(first.0 + spec.size / PAGE_SIZE);
        let gone: Vec<Gfn> = self.dirty.range(first..end).copied().collect();
        for g in gone {
            self.dirty.remove(&g);
        }
    }
}

fn einval() -> Result<(), errno::Error> {
    Err(errno::Error::new(libc::EINVAL))
}

impl MemslotBackend for SimKvm {
    unsafe fn set_memslot(&self, r: &MemslotRegion) -> Result<(), errno::Error> {
        let mut st = self.lock();
        self.call(&mut st)?;
        if r.slot.0 >= self.max_slots {
            return einval();
        }
        if r.gpa.0 % PAGE_SIZE != 0 || r.size % PAGE_SIZE != 0 || r.hva.0 % PAGE_SIZE != 0 {
            return einval();
        }
        if r.size / PAGE_SIZE > MAX_MEMSLOT_PAGES {
            // `__kvm_set_memory_region`: `memory_size >> PAGE_SHIFT` above
            // KVM_MEM_MAX_NR_PAGES is EINVAL.
            return einval();
        }
        if r.gpa.0.checked_add(r.size).is_none() {
            return einval();
        }
        let live = st.slots.get(&r.slot).copied();
        if r.size == 0 {
            let Some(old) = live else { return einval() };
            st.free_log(&old);
            st.slots.remove(&r.slot);
            return Ok(());
        }
        if let Some(old) = live {
            if old.hva != r.hva
                || old.size != r.size
                || (old.flags ^ r.flags).contains(MemslotFlags::READONLY)
            {
                return einval();
            }
        }
        if st.overlaps_other(r.slot, r.gpa.0, r.size) {
            return Err(errno::Error::new(libc::EEXIST));
        }
        if let Some(old) = live {
            let moved = old.gpa != r.gpa;
            let logging_off = !r.flags.contains(MemslotFlags::LOG_DIRTY_PAGES);
            if moved || logging_off {
                st.free_log(&old);
            }
        }
        let spec = MemslotSpec {
            id: r.slot,
            gpa: r.gpa,
            size: r.size,
            hva: Hva(r.hva.0),
            flags: r.flags,
        };
        let was_logging =
            live.is_some_and(|o| o.gpa == r.gpa && o.flags.contains(MemslotFlags::LOG_DIRTY_PAGES));
        if self.mode.initially_set()
            && r.flags.contains(MemslotFlags::LOG_DIRTY_PAGES)
            && !was_logging
        {
            st.set_all(&spec);
        }
        st.slots.insert(r.slot, spec);
        Ok(())
    }

    unsafe fn get_dirty_log_into(
        &self,
        slot: SlotId,
        bitmap: *mut u64,
    ) -> Result<(), errno::Error> {
        let mut st = self.lock();
        if self.mode == DirtyLogMode::Ring {
            return Err(errno::Error::new(libc::ENXIO));
        }
        let spec = st.logging(slot)?;
        let pages = spec.size / PAGE_SIZE;
        let words = pages.div_ceil(64) as usize;
        let first = spec.gpa.gfn().0;
        let hits: Vec<Gfn> = st
            .dirty
            .range(Gfn(first)..Gfn(first + pages))
            .copied()
            .collect();
        // SAFETY: the caller guarantees `bitmap` is valid for writes of this
        // slot's bitmap, `words` u64s.
        let bits = unsafe { std::slice::from_raw_parts_mut(bitmap, words) };
        bits.fill(0);
        for g in hits {
            if !self.mode.read_keeps_log() {
                st.dirty.remove(&g);
            }
            let i = (g.0 - first) as usize;
            bits[i / 64] |= 1 << (i % 64);
        }
        Ok(())
    }

    fn dirty_log_mode(&self) -> DirtyLogMode {
        self.mode
    }

    unsafe fn clear_dirty_log(
        &self,
        slot: SlotId,
        first_page: u64,
        num_pages: u32,
        bitmap: *const u64,
    ) -> Result<(), errno::Error> {
        let mut st = self.lock();
        if self.mode != DirtyLogMode::Manual {
            return Err(errno::Error::new(libc::EINVAL));
        }
        let spec = st.logging(slot)?;
        let pages = spec.size / PAGE_SIZE;
        let n = u64::from(num_pages);
        // KVM's rules (kvm_clear_dirty_log_protect).
        if first_page % 64 != 0
            || (n % 64 != 0 && first_page + n != pages)
            || first_page.checked_add(n).is_none_or(|end| end > pages)
        {
            return Err(errno::Error::new(libc::EINVAL));
        }
        // SAFETY: the caller guarantees `bitmap` holds ceil(num_pages / 64) words.
        let bits = unsafe { std::slice::from_raw_parts(bitmap, n.div_ceil(64) as usize) };
        let first = spec.gpa.gfn().0 + first_page;
        for i in 0..n {
            if bits[(i / 64) as usize] & (1 << (i % 64)) != 0 {
                st.dirty.remove(&Gfn(first + i));
            }
        }
        Ok(())
    }

    fn harvest_dirty_rings(&self, sink: &mut dyn FnMut(u32, u64)) -> Result<u64, errno::Error> {
        if self.mode != DirtyLogMode::Ring {
            return Ok(0);
        }
        let mut st = self.lock();
        let mut n = 0;
        for ring in 0..st.rings.len() {
            while let Some((slot, offset)) = st.rings[ring].pop_front() {
                sink(slot, offset);
                // The reset: the page is write-protected again.
                st.unreset.remove(&(SlotId(slot), offset));
                n += 1;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(slot: u32, gpa: u64, pages: u64, hva: u64, flags: MemslotFlags) -> MemslotRegion {
        MemslotRegion {
            slot: SlotId(slot),
            flags,
            gpa: Gpa(gpa),
            size: pages * PAGE_SIZE,
            hva: Hva(hva),
        }
    }

    fn set(kvm: &SimKvm, r: MemslotRegion) -> Result<(), i32> {
        // SAFETY: the simulated KVM never touches host memory.
        unsafe { kvm.set_memslot(&r) }.map_err(|e| e.errno())
    }

    #[test]
    fn test_sim_kvm_enforces_kvm_memslot_rules() {
        let kvm = SimKvm::with_max_slots(4);
        let none = MemslotFlags::empty();
        assert_eq!(set(&kvm, region(4, 0, 1, 0x1000, none)), Err(libc::EINVAL));
        assert_eq!(
            set(&kvm, region(0, 0x10, 1, 0x1000, none)),
            Err(libc::EINVAL)
        );
        set(&kvm, region(0, 0, 4, 0x1000, none)).unwrap();
        assert_eq!(
            set(&kvm, region(1, 0x3000, 1, 0x9000, none)),
            Err(libc::EEXIST)
        );
        // A live id: size, hva and READONLY are fixed; a move is allowed.
        assert_eq!(set(&kvm, region(0, 0, 2, 0x1000, none)), Err(libc::EINVAL));
        assert_eq!(set(&kvm, region(0, 0, 4, 0x2000, none)), Err(libc::EINVAL));
        let ro = MemslotFlags::READONLY;
        assert_eq!(set(&kvm, region(0, 0, 4, 0x1000, ro)), Err(libc::EINVAL));
        set(&kvm, region(0, 0x10000, 4, 0x1000, none)).unwrap();
        assert_eq!(kvm.memslots()[0].gpa, Gpa(0x10000));
        set(&kvm, region(0, 0x10000, 0, 0x1000, none)).unwrap();
        assert_eq!(
            set(&kvm, region(0, 0x10000, 0, 0x1000, none)),
            Err(libc::EINVAL)
        );
        assert!(kvm.memslots().is_empty());
    }

    #[test]
    fn test_sim_kvm_refuses_a_memslot_above_kvm_max_pages_with_einval() {
        let kvm = SimKvm::new();
        let log = MemslotFlags::LOG_DIRTY_PAGES;
        // 2^31 pages (8 TiB): one more than KVM_MEM_MAX_NR_PAGES.
        let too_big = region(0, 0, MAX_MEMSLOT_PAGES + 1, 0x1000, log);
        assert_eq!(set(&kvm, too_big), Err(libc::EINVAL));
        assert!(kvm.memslots().is_empty());
        // The largest memslot KVM takes (the simulated KVM never touches
        // the host memory behind it).
        let none = MemslotFlags::empty();
        set(&kvm, region(0, 0, MAX_MEMSLOT_PAGES, 0x1000, none)).unwrap();
        assert_eq!(kvm.memslots()[0].size, MAX_MEMSLOT_PAGES * PAGE_SIZE);
    }

    #[test]
    fn test_sim_kvm_logs_writes_only_while_logging_and_frees_the_log() {
        let kvm = SimKvm::new();
        let log = MemslotFlags::LOG_DIRTY_PAGES;
        let mut bits = [0u64; 1];
        // SAFETY: one word holds the bitmap of a 4-page slot.
        let read = |kvm: &SimKvm, bits: &mut [u64; 1]| unsafe {
            kvm.get_dirty_log_into(SlotId(0), bits.as_mut_ptr())
                .map_err(|e| e.errno())
        };
        set(&kvm, region(0, 0, 4, 0x1000, MemslotFlags::empty())).unwrap();
        assert!(kvm.guest_write(Gpa(0x1000)));
        assert_eq!(read(&kvm, &mut bits), Err(libc::ENOENT));
        set(&kvm, region(0, 0, 4, 0x1000, log)).unwrap();
        assert!(kvm.guest_write(Gpa(0x2008)));
        read(&kvm, &mut bits).unwrap();
        assert_eq!(bits[0], 0b100);
        read(&kvm, &mut bits).unwrap();
        assert_eq!(bits[0], 0, "a read clears");
        kvm.guest_write(Gpa(0x3000));
        set(&kvm, region(0, 0, 4, 0x1000, MemslotFlags::empty())).unwrap();
        set(&kvm, region(0, 0, 4, 0x1000, log)).unwrap();
        read(&kvm, &mut bits).unwrap();
        assert_eq!(bits[0], 0, "logging off freed the log");
        assert!(!kvm.guest_write(Gpa(0x8000)), "no slot there");
    }

    #[test]
    fn test_sim_kvm_injected_failure_has_no_effect() {
        let kvm = SimKvm::new();
        kvm.fail_calls(&[1], libc::EIO);
        set(&kvm, region(0, 0, 1, 0x1000, MemslotFlags::empty())).unwrap();
        assert_eq!(
            set(&kvm, region(1, 0x1000, 1, 0x2000, MemslotFlags::empty())),
            Err(libc::EIO)
        );
        assert_eq!(kvm.memslots().len(), 1);
        assert_eq!(kvm.calls(), 2);
    }
}
