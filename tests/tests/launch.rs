//! Launching guests: the default guest on several backings and vCPU counts,
//! and guests that fail in each way `vmm run` must report clearly.

use std::time::Duration;

use guest_image::protocol::layout;
use vmm::mm::backing::BackingKind;
use vmm::plan::BuiltinGuest;
use vmm_tests::{config, kvm_or_skip, run};

const MIB: u64 = 1 << 20;

fn assert_default_guest_ok(backing: BackingKind, vcpus: u64, mem: u64) {
    let cfg = vmm::run::RunConfig {
        backing: backing.clone(),
        ..config("default", mem, vcpus)
    };
    let (report, console) = run(&cfg);
    assert!(
        report.succeeded(),
        "{backing}: {:?}\n{console}",
        report.error
    );
    assert_eq!(report.vcpus.len() as u64, vcpus);
    for v in &report.vcpus {
        assert!(v.failure.is_none());
        assert!(
            console.contains(&format!("hello from vCPU {}", v.index)),
            "{console}"
        );
        let verified: Vec<_> = v
            .commands
            .iter()
            .filter(|c| c.command.starts_with("verify"))
            .collect();
        assert_eq!(
            verified.len(),
            1,
            "vCPU {} verifies its neighbour's share",
            v.index
        );
    }
    // Every verify result counts the words it checked: together, all of RAM.
    let words: u64 = report
        .vcpus
        .iter()
        .flat_map(|v| &v.commands)
        .filter(|c| c.command.starts_with("verify"))
        .map(|c| c.results[0])
        .sum();
    assert_eq!(words * 8, mem, "verify covered all guest RAM");
}

#[test]
fn test_default_guest_one_vcpu_anon_succeeds() {
    if kvm_or_skip("default guest, 1 vCPU") {
        assert_default_guest_ok(BackingKind::Anon, 1, 64 * MIB);
    }
}

#[test]
fn test_default_guest_two_vcpus_memfd_succeeds() {
    if kvm_or_skip("default guest, 2 vCPUs, memfd") {
        assert_default_guest_ok(BackingKind::Memfd, 2, 64 * MIB);
    }
}

#[test]
fn test_default_guest_two_vcpus_shared_succeeds() {
    if kvm_or_skip("default guest, 2 vCPUs, shared") {
        assert_default_guest_ok(BackingKind::Shared, 2, 32 * MIB);
    }
}

#[test]
fn test_default_guest_file_backing_succeeds() {
    if kvm_or_skip("default guest, file backing") {
        let path = std::env::temp_dir().join(format!("vmm-test-guest-{}.img", std::process::id()));
        std::fs::File::create(&path)
            .unwrap()
            .set_len(16 * MIB)
            .unwrap();
        assert_default_guest_ok(BackingKind::File(path.clone()), 2, 16 * MIB);
        let _ = std::fs::remove_file(path);
    }
}

#[test]
fn test_default_guest_thp_is_mapped_with_2m_pages() {
    if !kvm_or_skip("default guest, THP") {
        return;
    }
    let cfg = vmm::run::RunConfig {
        backing: BackingKind::Thp,
        ..config("default", 64 * MIB, 2)
    };
    let (report, console) = run(&cfg);
    assert!(report.succeeded(), "{:?}\n{console}", report.error);
    let pages_2m = report.kvm_stats.vm["pages_2m"];
    let pf_fixed = report.kvm_stats.vcpu["pf_fixed"];
    // 64 MiB of THP: KVM maps 2 MiB pages, so far fewer faults than 4 KiB pages.
    assert!(pages_2m >= 16, "pages_2m {pages_2m}");
    assert!(pf_fixed < 16 * 1024 / 4, "pf_fixed {pf_fixed}");
}

#[test]
fn test_report_counts_faults_and_exits() {
    if !kvm_or_skip("report counters") {
        return;
    }
    let (report, _) = run(&config("default", 32 * MIB, 1));
    let pages = 32 * MIB / 4096;
    let pf_fixed = report.kvm_stats.vcpu["pf_fixed"];
    assert!(
        pf_fixed >= pages && pf_fixed < pages + 64,
        "pf_fixed {pf_fixed} for {pages} pages"
    );
    // ready + hello + fill + verify + stop = 5 doorbells, 1 console line.
    assert_eq!(report.exits["mmio_doorbell"], 5, "{:?}", report.exits);
    assert_eq!(report.exits["mmio_console"], 1);
    assert!(report.timings.run_ms > 0.0 && report.timings.setup_ms > 0.0);
    assert!(report.tsc_khz > 0);
}

#[test]
fn test_page_fault_guest_reports_vector_and_address() {
    if !kvm_or_skip("page-fault guest") {
        return;
    }
    let (report, _) = run(&config("page-fault", 2 * MIB, 1));
    let err = report.error.expect("a #PF fails the run");
    let cr2 = BuiltinGuest::fault_address();
    assert!(err.contains("#PF (vector 14"), "{err}");
    assert!(err.contains(&format!("CR2 {cr2:#x}")), "{err}");
    assert!(err.contains("at RIP 0x1"), "{err}");
}

#[test]
fn test_bad_insn_guest_reports_ud_and_rip() {
    if !kvm_or_skip("bad-insn guest") {
        return;
    }
    let (report, _) = run(&config("bad-insn", 2 * MIB, 2));
    let err = report.error.expect("a #UD fails the run");
    assert!(err.contains("#UD (vector 6"), "{err}");
    let rip = err
        .split("RIP ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap();
    let rip = u64::from_str_radix(rip.trim_start_matches("0x"), 16).unwrap();
    assert!(
        (layout::IMAGE_START..layout::IMAGE_END).contains(&rip),
        "RIP {rip:#x} inside the image"
    );
}

#[test]
fn test_verify_mismatch_names_address_expected_and_found() {
    if !kvm_or_skip("verify-mismatch guest") {
        return;
    }
    let (report, _) = run(&config("verify-mismatch", 4 * MIB, 1));
    let err = report.error.expect("a mismatch fails the run");
    // The first word of RAM differs: seed vs seed ^ 1.
    let seed = vmm::run::RunConfig::default_guest().seed;
    let addr = layout::RAM_BASE;
    let expected = guest_image::protocol::pattern_word(seed ^ 1, addr);
    let found = guest_image::protocol::pattern_word(seed, addr);
    assert_eq!(
        err,
        format!(
            "vCPU 0: verify mismatch at {addr:#x}: expected {expected:#018x}, found {found:#018x}"
        )
    );
}

#[test]
fn test_spin_guest_past_timeout_is_stopped_with_clear_error() {
    if !kvm_or_skip("spin guest timeout") {
        return;
    }
    // One vCPU runs on the calling thread, stopped by its timer's signal;
    // two run on threads under the event loop.
    for vcpus in [1, 2] {
        let cfg = vmm::run::RunConfig {
            timeout: Duration::from_millis(300),
            ..config("spin", 2 * MIB, vcpus)
        };
        let started = std::time::Instant::now();
        let (report, _) = run(&cfg);
        let err = report.error.expect("timeout fails the run");
        assert!(
            err.contains("timeout") && err.contains("--timeout"),
            "{vcpus} vCPU(s): {err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{vcpus} vCPU(s): stopped promptly"
        );
        assert!(report.vcpus.iter().all(|v| v.failure.is_some()));
    }
}

#[test]
fn test_single_vcpu_run_with_a_timeout_beyond_the_clock_succeeds() {
    if !kvm_or_skip("single vCPU, unbounded timeout") {
        return;
    }
    // The library takes any Duration: one past what `Instant` can add must
    // mean no timeout, not a panic while arming the timer.
    let cfg = vmm::run::RunConfig {
        timeout: Duration::MAX,
        ..config("hello", 2 * MIB, 1)
    };
    let (report, console) = run(&cfg);
    assert!(report.succeeded(), "{:?}\n{console}", report.error);
}

#[test]
fn test_single_vcpu_runs_in_one_process_keep_their_own_timeouts() {
    if !kvm_or_skip("concurrent single-vCPU timeouts") {
        return;
    }
    // Each run's timer raises the same signal in this process: a run must
    // stop at its own timeout, not at the other's, and a run that ends by
    // itself meanwhile must still succeed.
    let timed = |ms: u64, guest: &'static str| {
        std::thread::spawn(move || {
            let cfg = vmm::run::RunConfig {
                timeout: Duration::from_millis(ms),
                ..config(guest, 2 * MIB, 1)
            };
            let started = std::time::Instant::now();
            let (report, _) = run(&cfg);
            (report, started.elapsed())
        })
    };
    let long = timed(1500, "spin");
    let short = timed(200, "spin");
    let quick = timed(5000, "hello");
    let (short, short_took) = short.join().unwrap();
    let (long, long_took) = long.join().unwrap();
    let (quick, _) = quick.join().unwrap();
    assert!(short
        .error
        .as_deref()
        .is_some_and(|e| e.contains("timeout")));
    assert!(short_took < Duration::from_millis(1400), "{short_took:?}");
    let err = long.error.expect("the long run times out too");
    assert!(err.contains("1.50 s") || err.contains("1.5 s"), "{err}");
    assert!(long_took >= Duration::from_millis(1500), "{long_took:?}");
    assert!(quick.succeeded(), "{:?}", quick.error);
}

#[test]
fn test_hugetlb_without_huge_pages_fails_clearly() {
    if !kvm_or_skip("hugetlb refusal") {
        return;
    }
    let free: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("HugePages_Free:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let cfg = vmm::run::RunConfig {
        backing: BackingKind::Hugetlb,
        ..config("default", 4 * MIB, 1)
    };
    match vmm::run::run(&cfg, Box::new(std::io::sink())) {
        Ok(report) => assert!(free >= 2 && report.succeeded(), "{:?}", report.error),
        Err(e) => {
            assert!(
                free < 2,
                "the host has {free} huge pages but the run failed: {e}"
            );
            assert!(e.to_string().contains("nr_hugepages"), "{e}");
        }
    }
}

#[test]
fn test_regression_boot_memory_view_outlives_vm() {
    if !kvm_or_skip("boot memory view") {
        return;
    }
    use vm_memory::{Bytes, GuestAddress};
    let vm = vmm::vm::Vm::new(&vmm::vm::VmSpec {
        vcpus: 1,
        mem_size: 2 * MIB,
        backing: BackingKind::Anon,
        image: std::sync::Arc::from(guest_image::RUNTIME_ELF),
        pin_limit: None,
        hotplug: false,
        kvm_stats: true,
        memslot_zap: vmm::kvm::zap::MemslotZap::default(),
    })
    .unwrap();
    let boot = vm.boot.clone();
    drop(vm);
    // The view owns its mapping: reading the GDT after the VM is gone is fine.
    let null_descriptor: u64 = boot.memory().read_obj(GuestAddress(layout::GDT)).unwrap();
    assert_eq!(null_descriptor, 0);
}

#[test]
fn test_kvm_stats_are_read_only_when_the_report_carries_them() {
    if !kvm_or_skip("test_kvm_stats_are_read_only_when_the_report_carries_them") {
        return;
    }
    for wanted in [true, false] {
        let cfg = vmm::run::RunConfig {
            kvm_stats: wanted,
            ..config("hello", 2 * MIB, 1)
        };
        let (report, console) = run(&cfg);
        assert!(report.succeeded(), "{:?}\n{console}", report.error);
        assert_eq!(
            report.kvm_stats.vcpu.contains_key("pf_fixed"),
            wanted,
            "{:?}",
            report.kvm_stats
        );
        assert_eq!(report.kvm_stats.vm.contains_key("pages_4k"), wanted);
    }
}
