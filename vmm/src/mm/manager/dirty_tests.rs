//! The three dirty-log modes on the simulated KVM: exact dirty sets across
//! splits, moves, deletes and id reuse, manual clears by range, ring-full
//! handling, and logging toggles that wait for no reader.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::*;
use crate::mm::addr::{Gfn, PAGE_SIZE};
use crate::mm::slot_map::SlotFlags;
use vmm_sys_util::errno;

const P: u64 = PAGE_SIZE;

fn config() -> SlotMapConfig {
    SlotMapConfig {
        max_slots: 16,
        max_gpa: Gpa(1024 * P),
        read_only_supported: true,
        reserved: None,
        ..SlotMapConfig::default()
    }
}

fn anon(pages: u64) -> Arc<HostMapping> {
    Arc::new(HostMapping::new(&BackingKind::Anon, pages * P).unwrap())
}

fn manager(kvm: &Arc<SimKvm>) -> MemoryManager {
    MemoryManager::new(Arc::clone(kvm), config()).unwrap()
}

fn logging() -> SlotFlags {
    SlotFlags {
        dirty_log: true,
        ..SlotFlags::NONE
    }
}

fn gfns(pages: &[u64]) -> Vec<Gfn> {
    pages.iter().map(|&p| Gfn(p)).collect()
}

/// A guest write on `vcpu`, handling a full ring as the vCPU loop does
/// (harvest and reset, enter again).
fn write(kvm: &SimKvm, memory: &MemoryManager, vcpu: usize, page: u64) -> bool {
    loop {
        match kvm.guest_write_on(vcpu, Gpa(page * P)) {
            SimWrite::Written => return true,
            SimWrite::Exit => return false,
            SimWrite::RingFull => {
                memory.harvest_dirty_rings().unwrap();
            }
        }
    }
}

#[test]
fn test_dirty_log_toggle_waits_for_no_reader_and_keeps_the_slot() {
    for mode in DirtyLogMode::ALL {
        let kvm = Arc::new(SimKvm::new().with_dirty_log(mode));
        let memory = manager(&kvm);
        memory
            .apply(|m| m.plug(Gpa(0), 16 * P, anon(16), 0, SlotFlags::NONE))
            .unwrap();
        memory.set_drain_bound(Duration::from_secs(5));
        let generation = memory.load().lookup(Gpa(0)).unwrap().generation();
        let guard = memory.try_acquire(Gpa(0)).unwrap();
        for on in [true, false, true] {
            let started = Instant::now();
            let applied = memory
                .apply(|m| m.set_dirty_log(Gpa(0), 16 * P, on))
                .unwrap();
            // A drain would wait the whole 5 s bound for the guard below.
            assert!(started.elapsed() < Duration::from_secs(2), "{mode}");
            assert!(applied.waited < Duration::from_millis(100), "{mode}");
            let map = memory.load();
            let slot = map.lookup(Gpa(0)).unwrap();
            assert_eq!(
                (slot.generation(), slot.flags().dirty_log),
                (generation, on)
            );
        }
        assert_eq!(guard.read_u64(Gpa(8)).unwrap(), 0, "the guard still reads");
        // The same guard does block an op that changes the memslot's layout.
        memory.set_drain_bound(Duration::from_millis(20));
        let err = memory.apply(|m| m.protect(Gpa(0), P, true)).unwrap_err();
        assert!(matches!(err, MemslotError::Guard(_)), "{mode}: {err}");
        drop(guard);
        memory.check_consistency().unwrap();
    }
}

#[test]
fn test_manual_mode_starts_all_dirty_reads_without_clearing_and_clears_by_range() {
    let kvm = Arc::new(SimKvm::new().with_dirty_log(DirtyLogMode::Manual));
    let memory = manager(&kvm);
    memory
        .apply(|m| m.plug(Gpa(0), 200 * P, anon(200), 0, SlotFlags::NONE))
        .unwrap();
    memory
        .apply(|m| m.set_dirty_log(Gpa(0), 200 * P, true))
        .unwrap();
    // Initially set: the first report of a newly logging slot is all of it.
    assert_eq!(memory.dirty_pages(Gpa(0), 200 * P).unwrap().len(), 200);
    assert!(memory.dirty_pages(Gpa(0), 200 * P).unwrap().is_empty());
    for g in [3, 70, 100, 199] {
        assert!(kvm.guest_write(Gpa(g * P)));
    }
    // A report over pages 64..96 clears only page 70 (the clear window is
    // 64..128, masked to the range): 100 stays logged in KVM.
    assert_eq!(
        memory.dirty_pages(Gpa(64 * P), 32 * P).unwrap(),
        gfns(&[70])
    );
    // The slot's tail window ends at the slot's end (200 is no multiple of 64).
    assert_eq!(
        memory.dirty_pages(Gpa(150 * P), 50 * P).unwrap(),
        gfns(&[199])
    );
    assert_eq!(
        memory.dirty_pages(Gpa(0), 200 * P).unwrap(),
        gfns(&[3, 100])
    );
    assert!(memory.dirty_pages(Gpa(0), 200 * P).unwrap().is_empty());
    memory.check_consistency().unwrap();
}

#[test]
fn test_sim_manual_clear_follows_kvm_alignment_rules() {
    let kvm = SimKvm::new().with_dirty_log(DirtyLogMode::Manual);
    let region = MemslotRegion {
        slot: SlotId(0),
        flags: MemslotFlags::LOG_DIRTY_PAGES,
        gpa: Gpa(0),
        size: 100 * P,
        hva: crate::mm::addr::Hva(0x10_0000),
    };
    // SAFETY: the simulated KVM never touches host memory.
    unsafe { kvm.set_memslot(&region) }.unwrap();
    let ones = [u64::MAX; 2];
    // SAFETY: `ones` holds two words, enough for 128 pages.
    let clear = |first, n| unsafe { kvm.clear_dirty_log(SlotId(0), first, n, ones.as_ptr()) };
    assert_eq!(
        clear(1, 64).unwrap_err().errno(),
        libc::EINVAL,
        "first page unaligned"
    );
    assert_eq!(
        clear(0, 30).unwrap_err().errno(),
        libc::EINVAL,
        "short, not at the end"
    );
    assert_eq!(
        clear(64, 64).unwrap_err().errno(),
        libc::EINVAL,
        "past the end"
    );
    clear(64, 36).unwrap();
    let mut bits = [0u64; 2];
    // SAFETY: two words hold the bitmap of a 100-page slot.
    unsafe { kvm.get_dirty_log_into(SlotId(0), bits.as_mut_ptr()) }.unwrap();
    assert_eq!(
        bits,
        [u64::MAX, 0],
        "pages 64..100 cleared, 0..64 still set"
    );
    // SAFETY: as above.
    unsafe { kvm.get_dirty_log_into(SlotId(0), bits.as_mut_ptr()) }.unwrap();
    assert_eq!(bits[0], u64::MAX, "a read does not clear");
}

#[test]
fn test_ring_mode_full_rings_lose_no_write_and_report_each_page_once() {
    let kvm = Arc::new(
        SimKvm::new()
            .with_dirty_log(DirtyLogMode::Ring)
            .with_rings(2, 8),
    );
    let memory = manager(&kvm);
    memory
        .apply(|m| m.plug(Gpa(0), 256 * P, anon(256), 0, logging()))
        .unwrap();
    let mut written = BTreeSet::new();
    for i in 0..100u64 {
        let page = (i * 37) % 256;
        assert!(write(&kvm, &memory, (i % 2) as usize, page));
        // A second write before any harvest pushes nothing more.
        assert!(write(&kvm, &memory, (i % 2) as usize, page));
        written.insert(Gfn(page));
    }
    let reported = memory.dirty_pages(Gpa(0), 256 * P).unwrap();
    assert_eq!(reported, written.iter().copied().collect::<Vec<_>>());
    assert!(memory.dirty_pages(Gpa(0), 256 * P).unwrap().is_empty());
    assert_eq!(kvm.ring_backlog(), 0);
    assert_eq!(memory.unattributed_ring_entries(), 0);
    // KVM refuses the bitmap while the ring is on; the check skips it.
    let mut word = 0u64;
    // SAFETY: one word holds a bitmap of 64 pages; the call fails anyway.
    let e = unsafe { kvm.get_dirty_log_into(SlotId(0), &mut word) }.unwrap_err();
    assert_eq!(e.errno(), libc::ENXIO);
    memory.check_consistency().unwrap();
}

#[test]
fn test_ring_entries_of_a_deleted_slot_keep_its_layout_when_the_id_is_reused() {
    let kvm = Arc::new(SimKvm::new().with_dirty_log(DirtyLogMode::Ring));
    let memory = manager(&kvm);
    memory
        .apply(|m| m.plug(Gpa(0), 8 * P, anon(8), 0, logging()))
        .unwrap();
    let old_id = memory.registered()[0].id;
    for g in [1, 2] {
        assert!(kvm.guest_write(Gpa(g * P)));
    }
    // Unplug and plug elsewhere right away: the new slot gets the same id,
    // and the rings still hold (id, offset 1) and (id, offset 2).
    memory.apply(|m| m.unplug(Gpa(0), 8 * P)).unwrap();
    memory
        .apply(|m| m.plug(Gpa(64 * P), 8 * P, anon(8), 0, logging()))
        .unwrap();
    assert_eq!(memory.registered()[0].id, old_id, "the id was reused");
    assert!(kvm.guest_write(Gpa(65 * P)));
    assert_eq!(memory.dirty_pages(Gpa(0), 8 * P).unwrap(), gfns(&[1, 2]));
    assert_eq!(memory.dirty_pages(Gpa(64 * P), 8 * P).unwrap(), gfns(&[65]));
    assert_eq!(memory.unattributed_ring_entries(), 0);
}

/// Random ops and writes in `mode`; after each step the report must equal
/// the model exactly: pages written while their slot logged, reported at
/// the address they were written at, plus (manual mode) every page of each
/// memslot an op started logging on (initially set).
fn random_ops_report_exact_dirty_sets(mode: DirtyLogMode, seed: u64) -> usize {
    const PAGES: u64 = 64;
    let kvm = Arc::new(SimKvm::new().with_dirty_log(mode).with_rings(2, 16));
    let memory = manager(&kvm);
    let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let applied = memory
        .apply(|m| m.plug(Gpa(0), PAGES * P, anon(PAGES), 0, logging()))
        .unwrap();
    let mut expected: BTreeSet<Gfn> = BTreeSet::new();
    let mut reported = 0;
    let note = |applied: &Applied, expected: &mut BTreeSet<Gfn>| {
        if !mode.initially_set() {
            return;
        }
        for c in &applied.changes {
            let started = match c {
                MemslotChange::Create { slot } => Some(slot).filter(|s| s.flags().dirty_log),
                MemslotChange::SetFlags { slot, old_flags } => {
                    Some(slot).filter(|s| s.flags().dirty_log && !old_flags.dirty_log)
                }
                MemslotChange::Delete { .. } => None,
            };
            if let Some(slot) = started {
                let r = slot.range();
                expected.extend((r.start().gfn().0..r.end().gfn().0).map(Gfn));
            }
        }
    };
    note(&applied, &mut expected);
    for _ in 0..300 {
        let gpa = Gpa(next(PAGES + 8) * P);
        let size = (1 + next(8)) * P;
        let result = match next(10) {
            0..=3 => {
                let page = next(PAGES + 64);
                let logs = memory
                    .load()
                    .lookup(Gpa(page * P))
                    .is_some_and(|s| s.flags().dirty_log && !s.flags().read_only);
                if write(&kvm, &memory, next(2) as usize, page) && logs {
                    expected.insert(Gfn(page));
                }
                continue;
            }
            4 => memory.apply(|m| m.protect(gpa, size, next(2) == 0)),
            5 => memory.apply(|m| m.set_dirty_log(gpa, size, next(3) != 0)),
            6 => memory.apply(|m| m.move_range(gpa, size, Gpa((PAGES + next(56)) * P))),
            7 => memory.apply(|m| m.move_range(gpa, size, Gpa(next(PAGES) * P))),
            8 => memory.apply(|m| m.unplug(gpa, size)),
            _ => {
                let (start, len) = (next(PAGES + 32), 1 + next(16));
                let span = Gpa(start * P);
                let report = memory.dirty_pages(span, len * P);
                let want: Vec<Gfn> = expected
                    .range(Gfn(start)..Gfn(start + len))
                    .copied()
                    .collect();
                match report {
                    Ok(got) => {
                        assert_eq!(got, want, "{mode} seed {seed}");
                        reported += got.len();
                    }
                    Err(MemslotError::NotLogging { .. }) => assert!(want.is_empty()),
                    Err(e) => panic!("{mode} seed {seed}: {e}"),
                }
                for g in want {
                    expected.remove(&g);
                }
                continue;
            }
        };
        if let Ok(applied) = result {
            note(&applied, &mut expected);
        }
        memory.check_consistency().unwrap();
    }
    // Everything left, exactly, over the whole window.
    let rest: Vec<Gfn> = expected.iter().copied().collect();
    match memory.dirty_pages(Gpa(0), 128 * P) {
        Ok(got) => assert_eq!(got, rest, "{mode} seed {seed}"),
        Err(MemslotError::NotLogging { .. }) => assert!(rest.is_empty()),
        Err(e) => panic!("{e}"),
    }
    assert_eq!(memory.unattributed_ring_entries(), 0);
    reported + rest.len()
}

#[test]
fn test_random_ops_report_exact_dirty_sets_in_every_mode() {
    for mode in DirtyLogMode::ALL {
        let reported: usize = (1..=12)
            .map(|seed| random_ops_report_exact_dirty_sets(mode, seed))
            .sum();
        assert!(reported > 100, "{mode}: only {reported} pages reported");
    }
}

#[test]
fn test_a_report_is_sorted_unique_exact_and_keeps_what_lies_outside_its_range() {
    for mode in DirtyLogMode::ALL {
        let kvm = Arc::new(SimKvm::new().with_dirty_log(mode).with_rings(2, 16));
        let memory = manager(&kvm);
        // Two slots (host memory apart, so they stay two).
        for base in [0, 32] {
            memory
                .apply(|m| m.plug(Gpa(base * P), 32 * P, anon(32), 0, logging()))
                .unwrap();
        }
        assert_eq!(memory.registered().len(), 2, "{mode}");
        // Manual starts all dirty: drain that first.
        memory.dirty_pages(Gpa(0), 64 * P).unwrap();
        // Both vCPUs write page 20 (ring: one entry in each ring); enough
        // writes to fill a 16-entry ring, harvested into the pending pages
        // on the way; an emulated write to a page also written by the guest
        // and to one that was not.
        let written: Vec<u64> = (0..64).filter(|p| p % 3 == 2).collect();
        for (k, &p) in written.iter().enumerate() {
            assert!(write(&kvm, &memory, k % 2, p), "{mode}");
        }
        assert!(write(&kvm, &memory, 0, 20) && write(&kvm, &memory, 1, 20));
        memory.mark_dirty(Gpa(23 * P), 1);
        memory.mark_dirty(Gpa(24 * P), 1);
        let mut inside: Vec<u64> = written
            .iter()
            .copied()
            .filter(|p| (16..48).contains(p))
            .collect();
        inside.push(24);
        inside.sort_unstable();
        assert_eq!(
            memory.dirty_pages(Gpa(16 * P), 32 * P).unwrap(),
            gfns(&inside),
            "{mode}: the range crossing both slots"
        );
        let outside: Vec<u64> = written
            .iter()
            .copied()
            .filter(|p| !(16..48).contains(p))
            .collect();
        assert_eq!(
            memory.dirty_pages(Gpa(0), 64 * P).unwrap(),
            gfns(&outside),
            "{mode}: the rest, kept"
        );
        assert!(memory.dirty_pages(Gpa(0), 64 * P).unwrap().is_empty());
    }
}

/// A backend that lets a guest write land right after the memslot call
/// creating a slot at `at` (the window of an op, between its calls), and
/// then makes the op's next call fail.
struct WriteInWindow {
    kvm: Arc<SimKvm>,
    at: Gpa,
}

impl MemslotBackend for WriteInWindow {
    unsafe fn set_memslot(&self, region: &MemslotRegion) -> Result<(), errno::Error> {
        // SAFETY: forwarded; our caller upholds the same contract.
        unsafe { self.kvm.set_memslot(region) }?;
        if region.gpa == self.at && region.size != 0 {
            assert!(
                self.kvm.guest_write(self.at),
                "the new slot takes the write"
            );
            self.kvm.fail_calls(&[0], libc::EIO);
        }
        Ok(())
    }
    unsafe fn get_dirty_log_into(
        &self,
        slot: SlotId,
        bitmap: *mut u64,
    ) -> Result<(), errno::Error> {
        // SAFETY: forwarded; our caller upholds the same contract.
        unsafe { self.kvm.get_dirty_log_into(slot, bitmap) }
    }
    fn dirty_log_mode(&self) -> DirtyLogMode {
        self.kvm.dirty_log_mode()
    }
    unsafe fn clear_dirty_log(
        &self,
        slot: SlotId,
        first_page: u64,
        num_pages: u32,
        bitmap: *const u64,
    ) -> Result<(), errno::Error> {
        // SAFETY: forwarded; our caller upholds the same contract.
        unsafe {
            self.kvm
                .clear_dirty_log(slot, first_page, num_pages, bitmap)
        }
    }
    fn harvest_dirty_rings(&self, sink: &mut dyn FnMut(u32, u64)) -> Result<u64, errno::Error> {
        self.kvm.harvest_dirty_rings(sink)
    }
}

#[test]
fn test_a_rolled_back_move_reports_window_writes_where_the_memory_is_plugged_after() {
    // A page moved out of a logging slot to a lower address: the map
    // creates the page's new slot first, then deletes the old slot and
    // creates its two pieces. A guest write lands in the new slot, the
    // old slot's delete fails, and the rollback deletes the new slot
    // (harvesting its log: in manual mode every bit, initially set). The
    // old slot maps that host page again: the write is its page, and the
    // new address is unplugged, so it reports nothing.
    for mode in DirtyLogMode::ALL {
        for dest in [0x4u64, 0xf] {
            let kvm = Arc::new(SimKvm::new().with_dirty_log(mode));
            let backend = WriteInWindow {
                kvm: Arc::clone(&kvm),
                at: Gpa(dest * P),
            };
            let memory = MemoryManager::new(backend, config()).unwrap();
            memory
                .apply(|m| m.plug(Gpa(0x10 * P), 16 * P, anon(16), 0, logging()))
                .unwrap();
            memory.dirty_pages(Gpa(0x10 * P), 16 * P).unwrap();
            let moved = memory.apply(|m| m.move_range(Gpa(0x13 * P), P, Gpa(dest * P)));
            assert!(
                matches!(moved, Err(MemslotError::RolledBack { .. })),
                "{mode}: {moved:?}"
            );
            memory.check_consistency().unwrap();
            assert_eq!(kvm.memslots(), memory.registered());
            match memory.dirty_pages(Gpa(dest * P), P) {
                Err(MemslotError::NotLogging { .. }) => {}
                other => panic!("{mode}: the unplugged destination reported {other:?}"),
            }
            let at_home = memory.dirty_pages(Gpa(0x10 * P), 16 * P).unwrap();
            assert_eq!(at_home, gfns(&[0x13]), "{mode}, move to {dest:#x}");
        }
    }
}

#[test]
fn test_dirty_pages_into_replaces_the_callers_vector_and_reuses_its_buffer() {
    for mode in DirtyLogMode::ALL {
        let kvm = Arc::new(SimKvm::new().with_dirty_log(mode).with_rings(1, 64));
        let memory = manager(&kvm);
        // 70 pages: the bitmap's last word is partly past the slot's end.
        memory
            .apply(|m| m.plug(Gpa(0), 70 * P, anon(70), 0, logging()))
            .unwrap();
        memory.dirty_pages(Gpa(0), 70 * P).unwrap(); // manual starts all dirty
        let mut out = Vec::with_capacity(64);
        out.push(Gfn(999)); // a stale entry from an earlier report
        let buffer = out.as_ptr();
        for p in [69, 3, 65] {
            assert!(write(&kvm, &memory, 0, p), "{mode}");
        }
        memory.dirty_pages_into(Gpa(0), 70 * P, &mut out).unwrap();
        assert_eq!(out, gfns(&[3, 65, 69]), "{mode}: the report, nothing stale");
        assert_eq!(
            out.as_ptr(),
            buffer,
            "{mode}: the caller's buffer is reused"
        );
        // A report over part of the slot keeps the rest for later.
        for p in [66, 5] {
            assert!(write(&kvm, &memory, 0, p), "{mode}");
        }
        memory.dirty_pages_into(Gpa(0), 64 * P, &mut out).unwrap();
        assert_eq!(out, gfns(&[5]), "{mode}: inside the range");
        memory.dirty_pages_into(Gpa(0), 70 * P, &mut out).unwrap();
        assert_eq!(
            out,
            gfns(&[66]),
            "{mode}: the page kept from the last report"
        );
        assert_eq!(out.as_ptr(), buffer, "{mode}");
        // A failed report leaves the vector empty, not the last report.
        assert!(matches!(
            memory.dirty_pages_into(Gpa(100 * P), P, &mut out),
            Err(MemslotError::NotLogging { .. })
        ));
        assert!(out.is_empty(), "{mode}");
        memory.check_consistency().unwrap();
    }
}
