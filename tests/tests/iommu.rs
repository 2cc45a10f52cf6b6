//! The IOMMU on real KVM: the DMA engine copies through the stage-2
//! table while ranges are protected, moved and unplugged, with contents
//! matching a model; the table holds nothing for unplugged memory; read-only
//! memory refuses device writes but serves reads; device-only writes appear
//! in `dirty-pages`; and device threads translating through the table while
//! memory changes never see a stale translation.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use kvm_ioctls::Kvm;
use vmm::devices::iommu::{Iommu, IommuError};
use vmm::mm::addr::{Gpa, GpaRange};
use vmm::mm::backing::{BackingKind, HostMapping};
use vmm::mm::manager::MemoryManager;
use vmm::mm::slot_map::{SlotFlags, SlotMapConfig};
use vmm::mm::stage2::{Access, PageSize};
use vmm_tests::{config, kvm_or_skip, run};

fn scenario(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../scenarios")
        .join(name)
}

fn hex(v: &serde_json::Value) -> u64 {
    u64::from_str_radix(v.as_str().unwrap().trim_start_matches("0x"), 16).unwrap()
}

#[test]
fn test_iommu_dma_racing_protect_move_unplug_matches_model_and_reports_table() {
    if !kvm_or_skip("IOMMU DMA scenario") {
        return;
    }
    let path = scenario("iommu-dma.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_vmm-cli"))
        .args(["run", "--json", "--scenario", path.to_str().unwrap()])
        .output()
        .expect("vmm runs");
    let err = String::from_utf8_lossy(&out.stderr);
    // The scenario checks the model (B never receives zeros), the dump of the
    // unplugged range, the read-only refusal and the dirty-page union.
    assert_eq!(out.status.code(), Some(0), "{err}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let dma = &r["dma"];
    let n = |k: &str| dma[k].as_u64().unwrap();
    assert!(n("done") >= 1, "some copies completed: {dma}");
    assert!(
        n("faults") + n("revoked") >= 2,
        "copies met the unplug (one more FAULT is the refused fill): {dma}"
    );
    let s2 = &r["stage2"];
    let st = |k: &str| s2["stats"][k].as_u64().unwrap();
    assert!(st("fills") >= 1 && st("huge_fills") >= 1, "{s2}");
    assert!(st("hits") > st("fills"), "translations mostly hit: {s2}");
    assert!(
        st("zaps") >= 4,
        "protect, move, unplug, protect zapped: {s2}"
    );
    let runs = s2["runs"].as_array().unwrap();
    let unplugged = GpaRange::new(Gpa(0x1_0000_0000), 2 << 20).unwrap();
    let mut total = 0;
    for run in runs {
        let range = GpaRange::new(Gpa(hex(&run["gpa"])), run["len"].as_u64().unwrap()).unwrap();
        assert!(!range.overlaps(&unplugged), "stale mapping {run}");
        total += range.len();
    }
    assert_eq!(total, s2["mapped_bytes"].as_u64().unwrap());
    assert!(
        runs.iter()
            .any(|r| hex(&r["gpa"]) == 0x3_0000_0000 && r["page_size"] == "2M"),
        "the moved THP memory is mapped by a 2M leaf: {s2}"
    );
}

#[test]
fn test_iommu_dma_only_write_appears_in_dirty_pages() {
    if !kvm_or_skip("IOMMU dirty pages") {
        return;
    }
    let text = r#"
        [[step]]
        do = "plug"
        gpa = "0x1_0000_0000"
        size = "2M"
        flags = ["dirty-log"]
        [[step]]
        do = "dma-fill"
        gpa = "0x1_0000_2000"
        size = "8K"
        value = 5
        [[step]]
        do = "dirty-pages"
        gpa = "0x1_0000_0000"
        size = "2M"
        pages = 2
        [[step]]
        do = "dirty-pages"
        gpa = "0x1_0000_0000"
        size = "2M"
        pages = 0
    "#;
    let scenario = vmm::scenario::Scenario::parse(text).expect("valid scenario");
    let cfg = vmm::run::RunConfig {
        scenario: Some(Arc::new(scenario)),
        ..config("default", 16 << 20, 1)
    };
    let (report, console) = run(&cfg);
    assert!(report.succeeded(), "{:?}\n{console}", report.error);
    let steps = &report.scenario.as_ref().unwrap().steps;
    assert!(
        steps[2]
            .actual
            .contains("0 in KVM's log, 2 written by devices"),
        "only the table saw the DMA writes: {}",
        steps[2].actual
    );
}

/// An memory over a real VM with `len` bytes of `kind` plugged at `gpa`,
/// every 8-byte word of the host memory holding its own host address.
fn vm_with(kind: &BackingKind, gpa: Gpa, len: u64) -> (Arc<MemoryManager>, Arc<HostMapping>) {
    let kvm = Kvm::new().unwrap();
    let vm = Arc::new(kvm.create_vm().unwrap());
    let memory = Arc::new(MemoryManager::new(vm, SlotMapConfig::default()).unwrap());
    let mem = self_addressed(kind, len);
    memory
        .apply(|m| m.plug(gpa, len, mem.clone(), 0, SlotFlags::NONE))
        .unwrap();
    (memory, mem)
}

fn self_addressed(kind: &BackingKind, len: u64) -> Arc<HostMapping> {
    let mem = Arc::new(HostMapping::new(kind, len).unwrap());
    for off in (0..len).step_by(8) {
        let p = (mem.hva().0 + off) as *mut u64;
        // SAFETY: `p` is inside the mapping we own, 8-byte aligned, and no
        // other thread sees the mapping yet.
        unsafe { p.write(p as u64) };
    }
    mem
}

#[test]
fn test_iommu_protect_ro_refuses_device_write_serves_reads() {
    if !kvm_or_skip("IOMMU protect") {
        return;
    }
    let base = Gpa(0x1_0000_0000);
    let (memory, _mem) = vm_with(&BackingKind::Thp, base, 4 << 20);
    let iommu = Iommu::new(memory.clone());
    assert_eq!(
        iommu.translate(base, Access::Write).unwrap().page_size,
        PageSize::Size2M
    );
    memory.apply(|m| m.protect(base, 2 << 20, true)).unwrap();
    assert!(matches!(
        iommu.translate(Gpa(base.0 + 8), Access::Write),
        Err(IommuError::Denied { .. })
    ));
    let read = iommu.translate(Gpa(base.0 + 8), Access::Read).unwrap();
    assert_eq!(read.page_size, PageSize::Size2M);
    // SAFETY: the slot is plugged, 8-byte aligned, and nothing changes it
    // during this read.
    let word = unsafe { (read.hva.0 as *const u64).read_volatile() };
    assert_eq!(word, read.hva.0);
    memory.apply(|m| m.protect(base, 2 << 20, false)).unwrap();
    assert!(iommu.translate(base, Access::Write).is_ok());
    // The write before the protect was harvested by the zap, not lost.
    let all = GpaRange::new(base, 4 << 20).unwrap();
    assert_eq!(iommu.take_dirty(all).unwrap().len(), 512);
}

/// Device threads translate random addresses through the table, under a slot
/// guard as the DMA engine does, while the main thread protects, moves and
/// unplugs/replugs memory. Every translation must equal the guard's host
/// address and read the self-addressed word (a stale leaf into discarded or
/// moved memory would read zero or another address), and writes to
/// read-only memory must be refused.
#[test]
fn test_iommu_device_threads_never_see_stale_translation_under_memory_ops() {
    if !kvm_or_skip("IOMMU stress") {
        return;
    }
    const A: Gpa = Gpa(0x1_0000_0000);
    const B: Gpa = Gpa(0x2_0000_0000);
    const LEN: u64 = 4 << 20;
    let (memory, _mem) = vm_with(&BackingKind::Thp, A, LEN);
    let iommu = Arc::new(Iommu::new(memory.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let checked = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..2u64)
        .map(|t| {
            let (memory, iommu, stop, checked) =
                (memory.clone(), iommu.clone(), stop.clone(), checked.clone());
            std::thread::spawn(move || {
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (t + 1);
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let base = if x & 1 == 0 { A } else { B };
                    let gpa = Gpa(base.0 + (x >> 8) % LEN / 8 * 8);
                    let Ok(guard) = memory.try_acquire(gpa) else {
                        continue;
                    };
                    let write = x & 2 != 0;
                    let access = if write { Access::Write } else { Access::Read };
                    match iommu.translate(gpa, access) {
                        Ok(tr) => {
                            assert!(!(write && guard.read_only()), "write allowed to ro {gpa}");
                            assert_eq!(tr.hva, guard.hva(gpa, 8).unwrap(), "stale leaf for {gpa}");
                            // SAFETY: the guard keeps the slot's memory mapped
                            // and undiscarded; the address is 8-byte aligned.
                            let v = unsafe { (tr.hva.0 as *const u64).read_volatile() };
                            assert_eq!(v, tr.hva.0, "read through a stale leaf at {gpa}");
                            checked.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(IommuError::Denied { .. }) => assert!(write && guard.read_only()),
                        Err(IommuError::Busy { .. } | IommuError::Unplugged { .. }) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
            })
        })
        .collect();
    let two_m = 2 << 20;
    for round in 0..20u64 {
        let at = if round % 2 == 0 { A } else { B };
        let other = if round % 2 == 0 { B } else { A };
        memory.apply(|m| m.protect(at, two_m, true)).unwrap();
        memory.apply(|m| m.protect(at, two_m, false)).unwrap();
        // Unplug the upper half and plug fresh self-addressed memory there.
        let upper = Gpa(at.0 + two_m);
        memory.apply(|m| m.unplug(upper, two_m)).unwrap();
        let fresh = self_addressed(&BackingKind::Thp, two_m);
        memory
            .apply(|m| m.plug(upper, two_m, fresh.clone(), 0, SlotFlags::NONE))
            .unwrap();
        // Move the lower half away and back: same memory, other address.
        memory.apply(|m| m.move_range(at, two_m, other)).unwrap();
        memory.apply(|m| m.move_range(other, two_m, at)).unwrap();
        // Move the whole region to the other base for the next round.
        memory.apply(|m| m.move_range(at, LEN, other)).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    assert!(
        checked.load(Ordering::Relaxed) > 100,
        "the device threads translated"
    );
    // Everything left mapped is inside what is plugged now.
    let plugged = GpaRange::new(A, LEN).unwrap();
    for run in iommu.dump() {
        assert!(
            plugged.start() <= run.range.start() && run.range.end() <= plugged.end(),
            "stale run {run:?}"
        );
    }
    let s = iommu.stats();
    assert!(s.zaps >= 100 && s.fills > 0, "{s:?}");
}

#[test]
fn test_stage2_dump_step_gpa_without_size_is_rejected() {
    let err = vmm::scenario::Scenario::parse("[[step]]\ndo = \"stage2-dump\"\ngpa = \"1G\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("`gpa` and `size` go together"), "{err}");
}

#[test]
fn test_stage2_dump_step_wrong_expectation_fails_naming_runs() {
    if !kvm_or_skip("stage2-dump mismatch") {
        return;
    }
    let text = r#"
        [[step]]
        do = "plug"
        gpa = "0x1_0000_0000"
        size = "1M"
        [[step]]
        do = "dma-fill"
        gpa = "0x1_0000_0000"
        size = "4K"
        value = 1
        [[step]]
        do = "stage2-dump"
        runs = 2
    "#;
    let scenario = vmm::scenario::Scenario::parse(text).expect("valid scenario");
    let cfg = vmm::run::RunConfig {
        scenario: Some(Arc::new(scenario)),
        ..config("default", 16 << 20, 1)
    };
    let (report, _) = run(&cfg);
    let s = report.scenario.unwrap();
    assert!(!s.passed);
    let last = s.steps.last().unwrap();
    assert!(
        last.actual
            .starts_with("stage2-mismatch: 1 runs, 0x1000 bytes mapped")
            && last.actual.contains("expected 2 runs"),
        "{}",
        last.actual
    );
}
