//! Guarded guest-memory lookup against the usual alternatives, over the same
//! slots and the same host mappings:
//!
//! - `guard`: [`GuestReader::try_acquire`] + `hva` + release (a per-slot
//!   refcount taken and dropped, the snapshot cached per thread);
//! - `vm-memory`: `GuestMemoryAtomic::memory()` + `get_host_address` over
//!   `GuestMemoryMmap` regions built on the same mappings;
//! - `rwlock`: a `RwLock<BTreeMap>` of the same slots.
//!
//! Single-thread, then 1 and 2 reader threads while a writer plugs and
//! unplugs a slot of its own every ~50 µs (each map's own way). At the end it
//! measures every case again, interleaved round-robin (robust against load
//! from other processes), and prints the medians and ratios of those.
//!
//! Run: `cargo bench -p vmm --bench guards`

// criterion_group! defines an undocumented function.
#![allow(missing_docs)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion};
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
    GuestRegionMmap, MmapRegion,
};
use vmm::mm::addr::Gpa;
use vmm::mm::backing::{BackingKind, HostMapping};
use vmm::mm::guard::GuardedMap;
use vmm::mm::slot_map::{SlotFlags, SlotMap, SlotMapConfig};

const SLOTS: u64 = 16;
const SLOT_SIZE: u64 = 1 << 20;
const STRIDE: u64 = 2 << 20;
const BASE: u64 = 1 << 32;
/// The writer's own slot, past the readers' ones.
const CHURN_GPA: u64 = BASE + SLOTS * STRIDE;
const BOUND: Duration = Duration::from_secs(5);

/// Per-op medians (ns) by benchmark name, from every sample of this run.
static SAMPLES: Mutex<BTreeMap<String, Vec<f64>>> = Mutex::new(BTreeMap::new());

fn record(name: &str, ops: u64, elapsed: Duration) -> Duration {
    let ns = elapsed.as_nanos() as f64 / ops.max(1) as f64;
    SAMPLES
        .lock()
        .unwrap()
        .entry(name.to_string())
        .or_default()
        .push(ns);
    elapsed
}

fn median(name: &str) -> Option<f64> {
    let samples = SAMPLES.lock().unwrap();
    let mut v = samples.get(name)?.clone();
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

struct Fixture {
    mappings: Vec<Arc<HostMapping>>,
    churn_mapping: Arc<HostMapping>,
    guarded: GuardedMap,
    atomic: GuestMemoryAtomic<GuestMemoryMmap>,
    rwlock: RwLock<BTreeMap<u64, (u64, u64)>>,
    /// Random addresses over all slots.
    addrs: Vec<u64>,
    /// Random addresses over the even (`[0]`) and odd (`[1]`) slots.
    split: [Vec<u64>; 2],
}

fn region(mapping: &HostMapping, gpa: u64) -> Arc<GuestRegionMmap> {
    // SAFETY: `mapping` is a live read-write mapping of `len()` bytes; the
    // fixture owns it (in `mappings`) for longer than any region built here.
    let raw = unsafe {
        MmapRegion::build_raw(
            mapping.as_ptr(),
            mapping.len() as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            mapping.mmap_flags(),
        )
    }
    .unwrap();
    Arc::new(GuestRegionMmap::new(raw, GuestAddress(gpa)).unwrap())
}

fn fixture() -> Fixture {
    let mappings: Vec<Arc<HostMapping>> = (0..SLOTS)
        .map(|_| Arc::new(HostMapping::new(&BackingKind::Anon, SLOT_SIZE).unwrap()))
        .collect();
    let churn_mapping = Arc::new(HostMapping::new(&BackingKind::Anon, SLOT_SIZE).unwrap());
    let guarded = GuardedMap::new(SlotMap::new(SlotMapConfig::default()));
    let mut regions = Vec::new();
    let mut btree = BTreeMap::new();
    for (i, m) in mappings.iter().enumerate() {
        let gpa = BASE + i as u64 * STRIDE;
        let mc = m.clone();
        guarded
            .apply(
                |map| map.plug(Gpa(gpa), SLOT_SIZE, mc, 0, SlotFlags::NONE),
                BOUND,
            )
            .unwrap();
        regions.push(region(m, gpa));
        btree.insert(gpa, (SLOT_SIZE, m.hva().0));
    }
    let mem = GuestMemoryMmap::from_arc_regions(regions).unwrap();
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let addrs: Vec<u64> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            BASE + (x % SLOTS) * STRIDE + (x >> 20) % SLOT_SIZE
        })
        .collect();
    // Power-of-two lengths: the harness indexes with a mask, not a division.
    let half = |parity: u64| {
        let mut v: Vec<u64> = addrs
            .iter()
            .copied()
            .filter(|a| (a - BASE) / STRIDE % 2 == parity)
            .collect();
        v.truncate(1024);
        v
    };
    let split = [half(0), half(1)];
    Fixture {
        mappings,
        churn_mapping,
        guarded,
        atomic: GuestMemoryAtomic::new(mem),
        rwlock: RwLock::new(btree),
        addrs,
        split,
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Guard,
    VmMemory,
    RwLock,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Guard => "guard",
            Kind::VmMemory => "vm-memory",
            Kind::RwLock => "rwlock",
        }
    }
}

/// `iters` lookups of `addrs` (cyclic, starting at `offset`) with `kind`.
fn lookups(f: &Fixture, addrs: &[u64], kind: Kind, iters: u64, offset: usize) {
    assert!(addrs.len().is_power_of_two());
    let n = addrs.len() - 1;
    match kind {
        Kind::Guard => {
            let mut reader = f.guarded.reader();
            for i in 0..iters as usize {
                let gpa = Gpa(addrs[(i + offset) & n]);
                let slot = reader.try_acquire(gpa).unwrap();
                black_box(slot.hva(gpa, 8).unwrap());
            }
        }
        Kind::VmMemory => {
            for i in 0..iters as usize {
                let gpa = GuestAddress(addrs[(i + offset) & n]);
                let mem = f.atomic.memory();
                black_box(mem.get_host_address(gpa).unwrap());
            }
        }
        Kind::RwLock => {
            for i in 0..iters as usize {
                let gpa = addrs[(i + offset) & n];
                let map = f.rwlock.read().unwrap();
                let (start, (len, hva)) = map.range(..=gpa).next_back().unwrap();
                assert!(gpa < start + len);
                black_box(hva + (gpa - start));
            }
        }
    }
}

/// What a memslot update costs the writer while it is exclusive: one KVM
/// ioctl (10-26 µs measured on this host, see DESIGN.md; an op issues 1-4).
/// `sleep` rounds it up to the timer slack (~60-80 µs here); the point is
/// that each map's readers see the writer's exclusive section as they would
/// in the VMM. `GUARDS_BENCH_HOLD_US` overrides it (sensitivity runs).
fn hold() -> Duration {
    static HOLD: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *HOLD.get_or_init(|| {
        let us = std::env::var("GUARDS_BENCH_HOLD_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20);
        Duration::from_micros(us)
    })
}
/// Pause between two ops: 50 µs, or `GUARDS_BENCH_GAP_US` (0 = a writer
/// that churns continuously, as in the stress test).
fn gap() -> Duration {
    static GAP: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *GAP.get_or_init(|| {
        let us = std::env::var("GUARDS_BENCH_GAP_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(50);
        Duration::from_micros(us)
    })
}

/// The writer: plug and unplug its own slot, each map its own way, with the
/// KVM update (`HOLD`) inside what that map makes exclusive:
/// - guard: slot-map writer lock + exclusion of the churned slot only
///   (exactly the manager's sequence), readers of other slots go on;
/// - vm-memory: its update mutex, then `replace` (readers never wait);
/// - rwlock: the write lock (every reader waits).
fn churn(f: &Fixture, kind: Kind, stop: &AtomicBool) {
    let churn_region = region(&f.churn_mapping, CHURN_GPA);
    while !stop.load(Ordering::Relaxed) {
        for plug in [true, false] {
            match kind {
                Kind::Guard => {
                    let mut w = f.guarded.shared().begin_write();
                    let map = w.map();
                    let t = if plug {
                        let m = f.churn_mapping.clone();
                        map.plug(Gpa(CHURN_GPA), SLOT_SIZE, m, 0, SlotFlags::NONE)
                    } else {
                        map.unplug(Gpa(CHURN_GPA), SLOT_SIZE)
                    }
                    .unwrap();
                    let ex = f.guarded.exclude(&t.changes, BOUND).unwrap();
                    thread::sleep(hold());
                    ex.commit(&t.changes).unwrap().publish(&mut w, t.map);
                }
                Kind::VmMemory => {
                    let guard = f.atomic.lock().unwrap();
                    let current = f.atomic.memory();
                    let next = if plug {
                        current.insert_region(churn_region.clone()).unwrap()
                    } else {
                        current
                            .remove_region(GuestAddress(CHURN_GPA), SLOT_SIZE)
                            .unwrap()
                            .0
                    };
                    thread::sleep(hold());
                    guard.replace(next);
                }
                Kind::RwLock => {
                    let mut map = f.rwlock.write().unwrap();
                    thread::sleep(hold());
                    if plug {
                        map.insert(CHURN_GPA, (SLOT_SIZE, f.churn_mapping.hva().0));
                    } else {
                        map.remove(&CHURN_GPA);
                    }
                }
            }
            if !gap().is_zero() {
                thread::sleep(gap());
            }
        }
    }
}

fn bench_single(c: &mut Criterion) {
    let f = fixture();
    let mut g = c.benchmark_group("lookup_1t");
    for kind in [Kind::Guard, Kind::VmMemory, Kind::RwLock] {
        g.bench_function(kind.name(), |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                lookups(&f, &f.addrs, kind, iters, 0);
                record(&format!("lookup_1t/{}", kind.name()), iters, t.elapsed())
            })
        });
    }
    // The parts of the guard's cost: the snapshot lookup alone, and the
    // lookup plus the refcount without the rest.
    g.bench_function("map-lookup-only", |b| {
        b.iter_custom(|iters| {
            let mut cache = f.guarded.shared().cache();
            let n = f.addrs.len() - 1;
            let t = Instant::now();
            for i in 0..iters as usize {
                let gpa = Gpa(f.addrs[i & n]);
                black_box(cache.load().translate(gpa).unwrap().0);
            }
            record("lookup_1t/map-lookup-only", iters, t.elapsed())
        })
    });
    g.finish();
    drop(f.mappings);
}

/// `iters` lookups on each of `threads` threads started together; wall time.
fn threaded(f: &Fixture, kind: Kind, threads: u64, disjoint: bool, iters: u64) -> Duration {
    let start = Barrier::new(threads as usize + 1);
    thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (f, start) = (f, &start);
                let addrs = if disjoint {
                    &f.split[t as usize]
                } else {
                    &f.addrs
                };
                s.spawn(move || {
                    start.wait();
                    lookups(f, addrs, kind, iters, t as usize * 997);
                })
            })
            .collect();
        start.wait();
        let t0 = Instant::now();
        for h in handles {
            h.join().unwrap();
        }
        t0.elapsed()
    })
}

/// Readers while a writer churns: `shared` (every thread looks up over all
/// slots, so both hit the same refcounts) or `disjoint` (thread t over the
/// slots of parity t: a device per thread).
fn bench_churn(c: &mut Criterion) {
    let f = fixture();
    let mut g = c.benchmark_group("lookup_churn");
    for kind in [Kind::Guard, Kind::VmMemory, Kind::RwLock] {
        let stop = AtomicBool::new(false);
        thread::scope(|s| {
            s.spawn(|| churn(&f, kind, &stop));
            for (threads, disjoint) in [(1u64, false), (2, false), (1, true), (2, true)] {
                let pattern = if disjoint { "disjoint" } else { "shared" };
                let name = format!("{}/{pattern}/{threads}t", kind.name());
                g.bench_function(&name, |b| {
                    b.iter_custom(|iters| {
                        let elapsed = threaded(&f, kind, threads, disjoint, iters);
                        // Per op across all threads (throughput), and the
                        // wall time criterion sees per iteration.
                        record(&format!("lookup_churn/{name}"), iters * threads, elapsed);
                        elapsed
                    })
                });
            }
            stop.store(true, Ordering::Relaxed);
        });
    }
    g.finish();
}

/// The same measurements again, interleaved round-robin (each round measures
/// every case once), so that load from other processes on this shared host
/// hits all cases alike; each churn case runs with its own map's writer.
/// Recorded under
/// `il/...`; the ratios are computed from these.
fn interleaved() {
    /// Single-thread rounds (each ~1 ms per case: cheap, so many).
    const ROUNDS: usize = 300;
    /// Churn rounds (each ~10 ms per case).
    const CHURN_ROUNDS: usize = 20;
    const ITERS: u64 = 50_000;
    const CHURN_ITERS: u64 = 300_000;
    let f = fixture();
    let kinds = [Kind::Guard, Kind::VmMemory, Kind::RwLock];
    for round in 0..ROUNDS {
        for kind in kinds {
            let t = Instant::now();
            lookups(&f, &f.addrs, kind, ITERS, round * 31);
            record(&format!("il/lookup_1t/{}", kind.name()), ITERS, t.elapsed());
        }
    }
    // Each churn case runs with its own map's writer, started 2 ms before the
    // readers (so it is already churning, not just spawned) and stopped after.
    // No other thread runs meanwhile: idle helper threads polling a flag
    // would steal CPU from the readers on this 2-core host.
    for _ in 0..CHURN_ROUNDS {
        for kind in kinds {
            let stop = AtomicBool::new(false);
            thread::scope(|s| {
                s.spawn(|| churn(&f, kind, &stop));
                thread::sleep(Duration::from_millis(2));
                for (threads, disjoint) in [(1u64, false), (2, false), (1, true), (2, true)] {
                    let elapsed = threaded(&f, kind, threads, disjoint, CHURN_ITERS);
                    let pattern = if disjoint { "disjoint" } else { "shared" };
                    let name = format!("il/lookup_churn/{}/{pattern}/{threads}t", kind.name());
                    record(&name, CHURN_ITERS * threads, elapsed);
                }
                stop.store(true, Ordering::Relaxed);
            });
        }
    }
}

fn report() {
    let m = |n: &str| median(&format!("il/{n}")).unwrap_or(f64::NAN);
    println!(
        "\n== guards benchmark: medians of this run (ns per lookup); churn: write hold {:?}, gap {:?} ==",
        hold(),
        gap()
    );
    for (name, v) in SAMPLES.lock().unwrap().iter() {
        let mut v = v.clone();
        v.sort_by(f64::total_cmp);
        println!("{name:32} {:8.2} ns", v[v.len() / 2]);
    }
    let guard1 = m("lookup_1t/guard");
    println!(
        "single thread: guard / vm-memory = {:.2}x (goal <= 1.0x); guard / rwlock = {:.2}x",
        guard1 / m("lookup_1t/vm-memory"),
        guard1 / m("lookup_1t/rwlock"),
    );
    for pattern in ["shared", "disjoint"] {
        for kind in ["guard", "vm-memory", "rwlock"] {
            let one = m(&format!("lookup_churn/{kind}/{pattern}/1t"));
            let two = m(&format!("lookup_churn/{kind}/{pattern}/2t"));
            println!(
                "under churn, {pattern:8} slots: {kind:9} throughput 2 threads / 1 thread = {:.2}x",
                one / two
            );
        }
        let guard = m(&format!("lookup_churn/guard/{pattern}/2t"));
        println!(
            "under churn, {pattern:8} slots, 2 threads: guard is {:.2}x faster than rwlock \
             (goal >= 3x), {:.2}x vm-memory's speed",
            m(&format!("lookup_churn/rwlock/{pattern}/2t")) / guard,
            m(&format!("lookup_churn/vm-memory/{pattern}/2t")) / guard,
        );
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench_single, bench_churn
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    // `cargo test` runs each benchmark once to check it works: no ratios then.
    if std::env::args().any(|a| a == "--bench") {
        interleaved();
        report();
    }
}
