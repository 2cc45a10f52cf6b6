//! What one whole-slot move costs the manager in user space, at 32,761
//! slots, with a backend that accepts every call and does nothing: the
//! manager's own share of `vmm bench memslots`' move tests. Ignored (a
//! timing, not a check); run it in release:
//! `cargo test --release -p vmm --lib move_cost -- --ignored --nocapture`.

use std::time::Instant;

use vmm_sys_util::errno;

use super::*;
use crate::mm::addr::PAGE_SIZE;
use crate::mm::slot_map::PlugSpec;

/// Accepts every memslot call.
struct Null;

impl MemslotBackend for Null {
    unsafe fn set_memslot(&self, _: &MemslotRegion) -> Result<(), errno::Error> {
        Ok(())
    }
    unsafe fn get_dirty_log_into(&self, _: SlotId, _: *mut u64) -> Result<(), errno::Error> {
        Err(errno::Error::new(libc::ENOENT))
    }
}

#[test]
#[ignore = "a timing; run in release with --nocapture"]
fn move_cost() {
    const SLOTS: u64 = 32_761;
    const PAGES: u64 = 4;
    let base = 0x2_0000_0000u64;
    let memory = MemoryManager::new(Null, SlotMapConfig::default()).unwrap();
    let mapping =
        Arc::new(HostMapping::new(&BackingKind::Anon, SLOTS * (PAGES + 1) * PAGE_SIZE).unwrap());
    let plugs = PlugSpec::apart(&mapping, Gpa(base), SLOTS, PAGES);
    memory.apply(|m| m.plug_many(plugs)).unwrap();
    let home = Gpa(base + (SLOTS - 1) * PAGES * PAGE_SIZE);
    let away = Gpa(base + (SLOTS + 1) * PAGES * PAGE_SIZE);
    let size = PAGES * PAGE_SIZE;
    // MOVE_COST_EVICT=1: write 8 MiB between moves, as a vCPU and KVM's
    // memslot swap would between two of the bench's moves, so the
    // manager's data starts cold; the eviction is timed apart and taken off.
    let evict = std::env::var_os("MOVE_COST_EVICT").is_some();
    let mut junk = vec![0u64; if evict { 1 << 20 } else { 0 }];
    let thrash = |junk: &mut Vec<u64>| {
        for (i, w) in junk.iter_mut().enumerate().step_by(8) {
            *w = w.wrapping_add(i as u64);
        }
        std::hint::black_box(&junk);
    };
    for round in 0..3 {
        let n = if evict { 2_000u32 } else { 20_000 };
        let t = Instant::now();
        for _ in 0..2 * n {
            thrash(&mut junk);
        }
        let thrash_time = t.elapsed();
        let t = Instant::now();
        for _ in 0..n {
            thrash(&mut junk);
            memory.apply(|m| m.move_range(home, size, away)).unwrap();
            thrash(&mut junk);
            memory.apply(|m| m.move_range(away, size, home)).unwrap();
        }
        let per_move = t.elapsed().saturating_sub(thrash_time) / (2 * n);
        if std::env::var_os("MOVE_COST_APPLY_ONLY").is_some() {
            println!("round {round}: apply(move_range) {per_move:?} per move");
            continue;
        }
        let t = Instant::now();
        let map = memory.load();
        for _ in 0..n {
            let t = map.move_range(home, size, away).unwrap();
            std::hint::black_box(t.map.move_range(away, size, home).unwrap());
        }
        let per_transition = t.elapsed() / (2 * n);
        println!(
            "round {round}: apply(move_range) {per_move:?} per move, of which move_range alone {per_transition:?}"
        );
    }
    memory.check_consistency().unwrap();
}
