//! Taking guest memory away while everyone uses it, on real KVM.
//!
//! Two vCPUs fill and verify patterns over their own regions (zone V), two
//! host threads read and write guest memory through slot guards (zone H), and
//! a writer unplugs and replugs, moves away and back, and write-protects and
//! unprotects ranges of both zones as fast as it can. Zone V never loses
//! memory (moves and protects keep the bytes), so every verify that runs to
//! the end must match; zone H is also unplugged and replugged with fresh
//! memory, so the old mapping is unmapped once nothing refers to it.
//!
//! What fails the test: a verify mismatch (torn or stale data in the guest),
//! a host read that disagrees with the last write (stale) or whose words
//! disagree with each other (torn), a vCPU ending with a KVM error (a memslot
//! pointing at unmapped memory gives `EFAULT`), any unexpected guest fault, an
//! op error, or a SIGSEGV in the host threads (which kills the process).
//!
//! `VMM_STRESS_SECS` sets the duration (default 10 s, the CI run);
//! `scripts/soak.sh` runs it for longer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use vmm::failure::GuestFailure;
use vmm::mm::addr::{Gpa, GpaRange, PAGE_SIZE};
use vmm::mm::backing::{BackingKind, HostMapping};
use vmm::mm::guard::{DeviceMemory, GuardError, SlotRef};
use vmm::mm::manager::MemoryManager;
use vmm::mm::slot_map::SlotFlags;
use vmm::plan::{Command, CommandOutcome, Step, VcpuPlan};
use vmm::vcpu::{ConsoleSender, VcpuContext};
use vmm::vm::{Vm, VmSpec};
use vmm_sys_util::eventfd::EventFd;
use vmm_tests::{kvm_or_skip, Rng};

const MIB: u64 = 1 << 20;
/// Per-vCPU pattern region.
const VCPU_REGION: u64 = MIB;
/// Zone H: host threads' pages.
const HOST_ZONE: u64 = 2 * MIB;
/// Unit of the writer's ops.
const CHUNK: u64 = 64 << 10;
/// Words checked per page by the host threads (one per 512 bytes).
const WORDS: u64 = 8;

/// Failures seen by any thread; the first one stops the run.
#[derive(Default)]
struct Failures {
    list: Mutex<Vec<String>>,
    stop: AtomicBool,
}

impl Failures {
    fn fail(&self, what: String) {
        self.list.lock().unwrap().push(what);
        self.stop.store(true, Ordering::SeqCst);
    }
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
struct VcpuCounts {
    fills: AtomicU64,
    verifies: AtomicU64,
    interrupted: AtomicU64,
}

/// Fill, verify, next seed; a command cut short by an op (unplugged or
/// read-only access) is retried: a fill from scratch, a verify as it was
/// (the bytes must have survived the op).
struct PatternPlan {
    index: u64,
    region: GpaRange,
    seed: u64,
    verifying: bool,
    stop: Arc<AtomicBool>,
    failures: Arc<Failures>,
    counts: Arc<VcpuCounts>,
}

impl VcpuPlan for PatternPlan {
    fn next(&mut self) -> Result<Step, vmm::plan::Aborted> {
        if self.stop.load(Ordering::SeqCst) || self.failures.stopped() {
            return Ok(Step::Stop);
        }
        Ok(Step::Run(if self.verifying {
            Command::verify(self.region, self.seed)
        } else {
            Command::fill(self.region, self.seed)
        }))
    }

    fn completed(&mut self, outcome: &CommandOutcome) {
        match outcome {
            CommandOutcome::Done { .. } if self.verifying => {
                self.counts.verifies.fetch_add(1, Ordering::Relaxed);
                self.seed += 1;
                self.verifying = false;
            }
            CommandOutcome::Done { .. } => {
                self.counts.fills.fetch_add(1, Ordering::Relaxed);
                self.verifying = true;
            }
            CommandOutcome::Failed(
                GuestFailure::UnpluggedAccess { .. } | GuestFailure::ReadOnlyWrite { .. },
            ) => {
                self.counts.interrupted.fetch_add(1, Ordering::Relaxed);
            }
            CommandOutcome::Failed(f) => self
                .failures
                .fail(format!("vCPU {} (seed {:#x}): {f}", self.index, self.seed)),
        }
    }

    fn recoverable(&self) -> bool {
        true
    }
}

/// Zone H: one slot per chunk, each with its own host mapping (like DIMMs),
/// so an op on one chunk excludes readers from that chunk only.
fn plug_host_zone(memory: &MemoryManager, zone: GpaRange) -> Vec<Arc<HostMapping>> {
    (0..zone.len() / CHUNK)
        .map(|i| {
            let mapping = Arc::new(HostMapping::new(&BackingKind::Anon, CHUNK).unwrap());
            let gpa = Gpa(zone.start().0 + i * CHUNK);
            let m = mapping.clone();
            memory
                .apply(|map| map.plug(gpa, CHUNK, m, 0, SlotFlags::NONE))
                .unwrap();
            mapping
        })
        .collect()
}

/// One host thread: guarded read-check-write of its own pages of zone H.
/// Thread 0 takes guards with a [`GuestReader`](vmm::mm::guard::GuestReader)
/// (slot-map lookup per access); thread 1 through [`DeviceMemory`] (cached
/// translation on the hub, checked by the guard). `unplugs` counts completed
/// unplugs of zone H (bumped after each one).
fn host_thread(
    t: u64,
    memory: &Arc<MemoryManager>,
    zone: GpaRange,
    unplugs: &AtomicU64,
    failures: &Failures,
) -> (u64, u64) {
    let mut reader = memory.reader();
    let device = DeviceMemory::new(memory.clone(), memory.hub().clone()).unwrap();
    let pages: Vec<Gpa> = (0..zone.len() / PAGE_SIZE)
        .filter(|i| i % 2 == t)
        .map(|i| Gpa(zone.start().0 + i * PAGE_SIZE))
        .collect();
    // page -> (last value written, unplug count read while writing it)
    let mut last: HashMap<Gpa, (u64, u64)> = HashMap::new();
    let mut rng = Rng(0x9E37_79B9 + t);
    let (mut ops, mut misses, mut counter) = (0u64, 0u64, 0u64);
    while !failures.stopped() {
        let page = pages[rng.below(pages.len() as u64) as usize];
        let mut check = |slot: &SlotRef<'_>| {
            check_and_stamp(t, slot, page, unplugs, &mut last, &mut counter, failures)
        };
        let result = if t == 0 {
            reader.try_acquire(page).map(|slot| check(&slot))
        } else {
            device.access(page, PAGE_SIZE, |slot, _| {
                check(slot);
                Ok(())
            })
        };
        match result {
            Ok(()) => ops += 1,
            Err(GuardError::Unplugged { .. } | GuardError::Busy { .. }) => misses += 1,
            Err(e) => failures.fail(format!("host thread {t}: access {page}: {e}")),
        }
    }
    (ops, misses)
}

/// Under one guard: all words of `page` agree (not torn) and equal what this
/// thread last wrote, or zero if an unplug finished since (not stale); then
/// stamps a new value (unless read-only) and reads it back.
fn check_and_stamp(
    t: u64,
    slot: &SlotRef<'_>,
    page: Gpa,
    unplugs: &AtomicU64,
    last: &mut HashMap<Gpa, (u64, u64)>,
    counter: &mut u64,
    failures: &Failures,
) {
    {
        let unplugged = unplugs.load(Ordering::SeqCst);
        let word = |k: u64| Gpa(page.0 + k * (PAGE_SIZE / WORDS));
        let v0 = slot.read_u64(word(0)).unwrap();
        for k in 1..WORDS {
            let v = slot.read_u64(word(k)).unwrap();
            if v != v0 {
                failures.fail(format!(
                    "host thread {t}: torn page {page}: word 0 {v0:#x}, word {k} {v:#x}"
                ));
            }
        }
        let expected = last.get(&page).copied();
        let ok = match expected {
            None => v0 == 0,
            // No unplug finished since the write: the bytes must be ours.
            Some((v, u)) if u == unplugged => v0 == v,
            // Unplugged and replugged since: ours, or discarded (zero).
            Some((v, _)) => v0 == v || v0 == 0,
        };
        if !ok {
            failures.fail(format!(
                "host thread {t}: stale page {page}: found {v0:#x}, last wrote {expected:x?}, \
                 unplugs now {unplugged}"
            ));
        }
        if !slot.read_only() {
            *counter += 1;
            let stamp = (t + 1) << 56 | (page.0 >> 12 & 0xff_ffff) << 32 | (*counter & 0xffff_ffff);
            for k in 0..WORDS {
                slot.write_u64(word(k), stamp).unwrap();
            }
            // Still under the same guard: nothing may have discarded it.
            for k in (0..WORDS).rev() {
                let v = slot.read_u64(word(k)).unwrap();
                if v != stamp {
                    failures.fail(format!(
                        "host thread {t}: write lost under a guard at {}: wrote {stamp:#x}, read {v:#x}",
                        word(k)
                    ));
                }
            }
            last.insert(page, (stamp, unplugged));
        }
    }
}

/// The writer: one op pair after another on a random chunk of either zone,
/// until `duration` has passed. Returns the number of ops applied.
/// Guest-physical layout of the test.
#[derive(Clone, Copy)]
struct Zones {
    /// The vCPUs' pattern regions (the VM's RAM slot).
    v: GpaRange,
    /// The host threads' pages, one slot per chunk.
    h: GpaRange,
}

fn writer(
    memory: &MemoryManager,
    chunks: &mut [Arc<HostMapping>],
    zones: Zones,
    unplugs: &AtomicU64,
    failures: &Failures,
    duration: Duration,
) -> u64 {
    let parking = Gpa(zones.h.end().0.next_multiple_of(1 << 30) + (1 << 30));
    let mut rng = Rng(0x5eed);
    let mut ops = 0;
    let started = Instant::now();
    while started.elapsed() < duration && !failures.stopped() {
        let host = rng.below(2) == 0;
        let zone = if host { zones.h } else { zones.v };
        let chunk = Gpa(zone.start().0 + rng.below(zone.len() / CHUNK) * CHUNK);
        let index = ((chunk.0 - zone.start().0) / CHUNK) as usize;
        let kind = rng.below(3);
        let result = (|| -> Result<(), String> {
            let apply = |what: &str, op: &dyn Fn(&vmm::mm::slot_map::SlotMap) -> _| {
                memory
                    .apply(op)
                    .map(|_| ())
                    .map_err(|e| format!("{what} {chunk}: {e}"))
            };
            match kind {
                0 if host => {
                    apply("unplug", &|m| m.unplug(chunk, CHUNK))?;
                    unplugs.fetch_add(1, Ordering::SeqCst);
                    // Fresh memory: the old mapping is unmapped as soon as KVM
                    // and the last snapshot let go of it, so a guard that
                    // outlived its slot would fault (SIGSEGV), not just read
                    // zeros.
                    let fresh = HostMapping::new(&BackingKind::Anon, CHUNK)
                        .map_err(|e| format!("mapping a chunk: {e}"))?;
                    chunks[index] = Arc::new(fresh);
                    let mapping = chunks[index].clone();
                    apply("replug", &move |m| {
                        m.plug(chunk, CHUNK, mapping.clone(), 0, SlotFlags::NONE)
                    })?;
                }
                0 | 1 => {
                    apply("move away", &|m| m.move_range(chunk, CHUNK, parking))?;
                    apply("move back", &|m| m.move_range(parking, CHUNK, chunk))?;
                }
                _ => {
                    apply("protect", &|m| m.protect(chunk, CHUNK, true))?;
                    apply("unprotect", &|m| m.protect(chunk, CHUNK, false))?;
                }
            }
            Ok(())
        })();
        match result {
            Ok(()) => ops += 2,
            Err(e) => failures.fail(format!("writer: {e}")),
        }
    }
    ops
}

#[test]
fn test_stress_guards_vcpus_and_host_threads_survive_continuous_ops() {
    if !kvm_or_skip("test_stress_guards_vcpus_and_host_threads_survive_continuous_ops") {
        return;
    }
    let secs: u64 = std::env::var("VMM_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let duration = Duration::from_secs(secs);
    let mem_size = 2 * VCPU_REGION;
    let mut vm = Vm::new(&VmSpec {
        vcpus: 2,
        mem_size,
        backing: BackingKind::Anon,
        image: Arc::from(guest_image::RUNTIME_ELF),
        pin_limit: None,
        hotplug: true,
        kvm_stats: true,
        memslot_zap: vmm::kvm::zap::MemslotZap::default(),
    })
    .expect("the VM builds");
    let zone_v = vm.ram;
    let zone_h = GpaRange::new(zone_v.end(), HOST_ZONE).unwrap();
    let mut chunks = plug_host_zone(&vm.memory, zone_h);

    let failures = Arc::new(Failures::default());
    let stop = Arc::new(AtomicBool::new(false));
    let counts: Vec<Arc<VcpuCounts>> = (0..2).map(|_| Arc::default()).collect();
    let unplugs = AtomicU64::new(0);
    let (console_tx, _console_rx) = mpsc::channel();
    let event = EventFd::new(0).unwrap();

    let mut vcpu_threads = Vec::new();
    for (index, fd) in vm.take_vcpus().into_iter().enumerate() {
        let index = index as u64;
        let region =
            GpaRange::new(Gpa(zone_v.start().0 + index * VCPU_REGION), VCPU_REGION).unwrap();
        let ctx = VcpuContext {
            index,
            vcpus: 2,
            entry: vm.entry,
            boot: vm.boot.clone(),
            memory: vm.memory.clone(),
            dma: None,
            plan: Box::new(PatternPlan {
                index,
                region,
                seed: 0x1000 * (index + 1),
                verifying: false,
                stop: stop.clone(),
                failures: failures.clone(),
                counts: counts[index as usize].clone(),
            }),
            console: ConsoleSender::new(console_tx.clone(), event.try_clone().unwrap()),
            stop: Arc::new(AtomicBool::new(false)),
            progress: false,
        };
        vcpu_threads.push(std::thread::spawn(move || vmm::vcpu::run_vcpu(fd, ctx)));
    }

    let started = Instant::now();
    let (writer_ops, host) = std::thread::scope(|s| {
        let hosts: Vec<_> = (0..2)
            .map(|t| {
                let (memory, unplugs, failures) = (&vm.memory, &unplugs, &*failures);
                s.spawn(move || host_thread(t, memory, zone_h, unplugs, failures))
            })
            .collect();
        let zones = Zones {
            v: zone_v,
            h: zone_h,
        };
        let ops = writer(
            &vm.memory,
            &mut chunks,
            zones,
            &unplugs,
            &failures,
            duration,
        );
        failures.stop.store(true, Ordering::SeqCst);
        let host: Vec<(u64, u64)> = hosts.into_iter().map(|h| h.join().unwrap()).collect();
        (ops, host)
    });
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    // A guest gets `stop` at its next doorbell (commands take milliseconds);
    // one that never rings again is a failure, not a hang.
    let deadline = Instant::now() + Duration::from_secs(30);
    while vcpu_threads.iter().any(|t| !t.is_finished()) {
        assert!(Instant::now() < deadline, "a vCPU did not stop within 30 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    for t in vcpu_threads {
        let report = t.join().unwrap();
        if let Some(f) = report.failure {
            failures.fail(format!("vCPU {} ended: {f}", report.index));
        }
    }

    let host_ops: u64 = host.iter().map(|h| h.0).sum();
    let host_misses: u64 = host.iter().map(|h| h.1).sum();
    println!(
        "stress over {elapsed:.1} s: writer {writer_ops} ops ({:.0} ops/s); host readers \
         {host_ops} guarded read-check-writes ({:.0} ops/s), {host_misses} refused \
         (unplugged or busy)",
        writer_ops as f64 / elapsed,
        host_ops as f64 / elapsed,
    );
    println!(
        "host thread 0 (GuestReader): {} ops, {} refused; host thread 1 (DeviceMemory, \
         cached): {} ops, {} refused",
        host[0].0, host[0].1, host[1].0, host[1].1
    );
    for (i, c) in counts.iter().enumerate() {
        println!(
            "vCPU {i}: {} fills, {} verifies, {} commands cut short by ops",
            c.fills.load(Ordering::Relaxed),
            c.verifies.load(Ordering::Relaxed),
            c.interrupted.load(Ordering::Relaxed)
        );
    }
    let list = failures.list.lock().unwrap();
    assert!(
        list.is_empty(),
        "{} failure(s):\n{}",
        list.len(),
        list.join("\n")
    );
    assert!(elapsed >= duration.as_secs_f64());
    assert!(writer_ops > 100, "the writer barely ran: {writer_ops} ops");
    assert!(host_ops > 1000, "host threads barely ran: {host_ops}");
    for c in &counts {
        assert!(
            c.verifies.load(Ordering::Relaxed) > 0,
            "a vCPU never verified"
        );
    }
    vm.memory.check_consistency().unwrap();
}
