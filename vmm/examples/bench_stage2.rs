//! Stage-2 table costs, ratios in one run:
//!
//! 1. **Walk vs slot-map lookup.** A translate of a mapped address through
//!    the IOMMU's table (the lock-free 4-level walk of 4 KiB leaves; 3 levels
//!    for 2 MiB leaves), against the slot-map lookup of the same address as
//!    a device without a table would do it, `memory.load().translate(gpa)`
//!    (an arc-swap load plus a binary search), and against the search alone
//!    on a snapshot held across the loop. The VM has `SLOTS` slots of 2 MiB
//!    (a 4 KiB hole between neighbours so they do not merge), every page
//!    faulted into the table first; addresses are a fixed pseudo-random
//!    sequence over all of them, the same for every contender.
//! 2. **Invalidation of 1 GiB.** `unmap` of a 1 GiB range mapped by 512
//!    2 MiB leaves, against the same range mapped by 262,144 4 KiB leaves
//!    (the table alone: no KVM, host addresses never dereferenced). Table
//!    pages are retired to the epoch collector inside the timed region;
//!    their reclamation happens later and is not timed.
//!
//! Every figure is the median of `ROUNDS` rounds. Run by
//! `scripts/bench-stage2.sh`; results in `docs/bench-stage2.md`.

use std::error::Error;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use kvm_ioctls::Kvm;
use vmm::devices::iommu::Iommu;
use vmm::mm::addr::{Gpa, GpaRange, Hva, HUGE_1G, HUGE_2M, PAGE_SIZE};
use vmm::mm::backing::{BackingKind, HostMapping};
use vmm::mm::manager::MemoryManager;
use vmm::mm::slot_map::{SlotFlags, SlotMapConfig};
use vmm::mm::stage2::{Access, PageSize, Perms, Stage2Table};

type Res<T> = Result<T, Box<dyn Error>>;

/// Slots of the lookup benchmark.
const SLOTS: u64 = 64;
/// Lookups per round.
const LOOKUPS: usize = 1 << 20;
/// Rounds per figure (the median is reported).
const ROUNDS: usize = 9;
/// Rounds of the 1 GiB unmap (each needs a fresh 1 GiB mapping).
const UNMAP_ROUNDS: usize = 7;
/// Guest base of the first slot.
const BASE: u64 = 1 << 32;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The median ns per call of `f` over `addrs`.
fn per_lookup(addrs: &[Gpa], mut f: impl FnMut(Gpa) -> u64) -> f64 {
    let rounds = (0..ROUNDS)
        .map(|_| {
            let t = Instant::now();
            let mut acc = 0u64;
            for &a in addrs {
                acc = acc.wrapping_add(f(a));
            }
            black_box(acc);
            t.elapsed().as_nanos() as f64 / addrs.len() as f64
        })
        .collect();
    median(rounds)
}

/// A VM with `SLOTS` 2 MiB slots of `kind`, every page faulted into `iommu`,
/// and the pseudo-random addresses to look up.
fn lookup_setup(kind: &BackingKind) -> Res<(Arc<MemoryManager>, Iommu, Vec<Gpa>)> {
    let vm = Arc::new(Kvm::new()?.create_vm()?);
    let memory = Arc::new(MemoryManager::new(vm, SlotMapConfig::default())?);
    let stride = HUGE_2M * 2;
    for i in 0..SLOTS {
        let mem = Arc::new(HostMapping::new(kind, HUGE_2M)?);
        memory.apply(|m| {
            m.plug(
                Gpa(BASE + i * stride),
                HUGE_2M,
                mem.clone(),
                0,
                SlotFlags::NONE,
            )
        })?;
    }
    let iommu = Iommu::new(memory.clone());
    for i in 0..SLOTS {
        for p in (0..HUGE_2M).step_by(PAGE_SIZE as usize) {
            iommu.translate(Gpa(BASE + i * stride + p), Access::Read)?;
        }
    }
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let addrs = (0..LOOKUPS)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let slot = x % SLOTS;
            let off = (x >> 16) % HUGE_2M / 8 * 8;
            Gpa(BASE + slot * stride + off)
        })
        .collect();
    Ok((memory, iommu, addrs))
}

struct Lookup {
    walk: f64,
    iommu: f64,
    load_translate: f64,
    snapshot_translate: f64,
}

fn bench_lookup(kind: &BackingKind, leaf: PageSize) -> Res<Lookup> {
    let (memory, iommu, addrs) = lookup_setup(kind)?;
    let table = iommu.table();
    let sizes = iommu.dump();
    if sizes.iter().any(|r| r.page_size != leaf) {
        return Err(format!("{kind} memory was not mapped with {leaf} leaves: {sizes:?}").into());
    }
    // Check once that both sides agree, so neither is optimized to nothing.
    for &a in addrs.iter().take(4096) {
        let t = table
            .translate(a, Access::Read)
            .ok_or("a mapped address missed")?;
        let (h, _) = memory
            .load()
            .translate(a)
            .ok_or("a plugged address has no slot")?;
        if t.hva != h {
            return Err(format!("table and slot map disagree on {a}").into());
        }
    }
    let walk = per_lookup(&addrs, |a| {
        table.translate(a, Access::Read).map_or(0, |t| t.hva.0)
    });
    let iommu_t = per_lookup(&addrs, |a| {
        iommu.translate(a, Access::Read).map_or(0, |t| t.hva.0)
    });
    let load_translate = per_lookup(&addrs, |a| {
        memory.load().translate(a).map_or(0, |(h, _)| h.0)
    });
    let snap = memory.load();
    let snapshot_translate = per_lookup(&addrs, |a| snap.translate(a).map_or(0, |(h, _)| h.0));
    Ok(Lookup {
        walk,
        iommu: iommu_t,
        load_translate,
        snapshot_translate,
    })
}

/// Median ms to unmap 1 GiB mapped with `size` leaves, and the ms to map it.
fn bench_unmap(size: PageSize) -> Res<(f64, f64)> {
    let gpa0 = 1u64 << 34;
    let hva0 = 1u64 << 40;
    let range = GpaRange::new(Gpa(gpa0), HUGE_1G).ok_or("range")?;
    let mut unmaps = Vec::new();
    let mut maps = Vec::new();
    for _ in 0..UNMAP_ROUNDS {
        let table = Stage2Table::new();
        let t = Instant::now();
        for off in (0..HUGE_1G).step_by(size.bytes() as usize) {
            table.map(Gpa(gpa0 + off), Hva(hva0 + off), size, Perms::RW)?;
        }
        maps.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let pages = table.unmap(range)?;
        unmaps.push(t.elapsed().as_secs_f64() * 1e3);
        if pages != HUGE_1G / PAGE_SIZE {
            return Err(format!("unmapped {pages} pages, expected {}", HUGE_1G / PAGE_SIZE).into());
        }
    }
    Ok((median(unmaps), median(maps)))
}

fn main() -> Res<()> {
    println!("stage-2 table benchmark: {SLOTS} slots x 2 MiB, {LOOKUPS} lookups x {ROUNDS} rounds (median)");
    let l4 = bench_lookup(&BackingKind::Anon, PageSize::Size4K)?;
    let l2 = bench_lookup(&BackingKind::Thp, PageSize::Size2M)?;
    println!();
    println!(
        "{:<52} {:>10} {:>10}",
        "lookup of a mapped address (ns/lookup)", "4K leaves", "2M leaves"
    );
    let row = |name: &str, a: f64, b: f64| println!("{name:<52} {a:>10.1} {b:>10.1}");
    row(
        "table walk (Stage2Table::translate, sets A)",
        l4.walk,
        l2.walk,
    );
    row("Iommu::translate (walk + hit counter)", l4.iommu, l2.iommu);
    row(
        "slot map: memory.load().translate(gpa)",
        l4.load_translate,
        l2.load_translate,
    );
    row(
        "slot map: snapshot.translate(gpa) (held snapshot)",
        l4.snapshot_translate,
        l2.snapshot_translate,
    );
    row(
        "ratio walk / load+translate",
        l4.walk / l4.load_translate,
        l2.walk / l2.load_translate,
    );
    row(
        "ratio walk / snapshot translate",
        l4.walk / l4.snapshot_translate,
        l2.walk / l2.snapshot_translate,
    );

    let (u2, m2) = bench_unmap(PageSize::Size2M)?;
    let (u4, m4) = bench_unmap(PageSize::Size4K)?;
    println!();
    println!("invalidation of 1 GiB (unmap), median of {UNMAP_ROUNDS} (ms)");
    println!(
        "{:<52} {:>10.3} (map: {m2:.2} ms)",
        "2 MiB leaves (512)", u2
    );
    println!(
        "{:<52} {:>10.3} (map: {m4:.2} ms)",
        "4 KiB leaves (262,144)", u4
    );
    println!("{:<52} {:>10.1}", "ratio 4K / 2M", u4 / u2);
    Ok(())
}
