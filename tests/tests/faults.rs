//! `vmm bench faults` on real KVM: tests that would catch a dishonest or
//! broken measurement. Ranges are small (2-8 MiB) so the
//! whole file runs in seconds; heavy runs live in scripts/bench-faults.sh.

use std::process::Command;

use vmm::bench::{
    run_faults, Access, Backing, BenchError, ConfigResult, FaultsConfig, FaultsReport, GuestPage,
    Pattern, Share,
};
use vmm::mm::backing::{BackingKind, HostMapping};
use vmm_tests::kvm_or_skip;

use super::common::{bench, FAULTS_SERIAL as SERIAL};

const MIB: u64 = 1 << 20;

fn config(size: u64, backings: &[Backing]) -> FaultsConfig {
    FaultsConfig {
        backings: backings.to_vec(),
        ..FaultsConfig::small(size, Backing::ANON)
    }
}

fn by_name<'a>(r: &'a FaultsReport, backing: &str) -> &'a ConfigResult {
    r.configurations
        .iter()
        .find(|c| c.backing == backing)
        .unwrap_or_else(|| panic!("no {backing} configuration"))
}

#[test]
fn test_faults_thp_per_4k_first_touch_is_below_anon_4k() {
    if !kvm_or_skip("faults: thp vs anon") {
        return;
    }
    // This host runs inside another VM with free page reporting: a free 2 MiB
    // block may have been handed back to the outer host, and zeroing it then
    // costs 512 outer faults (milliseconds). Touch and free THP memory first
    // so the allocator hands out backed blocks: the test is about KVM mapping
    // 2 MiB pages, not about the outer host. (`vmm bench faults` itself does
    // no such warm-up: it reports what the guest sees.)
    // Up to 3 measurements: one outer-host event (a multi-millisecond THP
    // zeroing) must not fail CI on a shared 2-core machine; a real
    // regression fails all three.
    let mut last = String::new();
    for _attempt in 0..3 {
        match thp_vs_anon_once() {
            Ok(()) => return,
            Err(e) => last = e,
        }
    }
    panic!("THP was not cheaper than anon per 4 KiB in 3 measurements; last: {last}");
}

fn thp_vs_anon_once() -> Result<(), String> {
    let warm = HostMapping::new(&BackingKind::Thp, 64 * MIB).unwrap();
    warm.populate();
    drop(warm);
    let r = bench(&config(16 * MIB, &[Backing::ANON, Backing::THP]));
    let anon = by_name(&r, "anon").pass("first-touch").unwrap();
    let thp = by_name(&r, "thp").pass("first-touch").unwrap();
    // Per 4 KiB: the cost of each 2 MiB of the range spread over its 512
    // pages, median over the 2 MiB chunks (robust to one chunk that hit
    // direct compaction on a busy host).
    let per_4k = |samples: &[f64]| {
        let mut chunks: Vec<f64> = samples
            .chunks(512)
            .map(|c| c.iter().sum::<f64>() / 512.0)
            .collect();
        chunks.sort_by(f64::total_cmp);
        chunks[chunks.len() / 2]
    };
    let (t, a) = (per_4k(&thp.samples_ns), per_4k(&anon.samples_ns));
    // KVM really maps 2 MiB pages for THP and 4 KiB ones for anon: counters,
    // not timing, so no retry can hide a regression here.
    assert!(thp.kvm("pages_2m") >= 2, "{:?}", thp.kvm);
    assert_eq!(anon.kvm("pages_2m"), 0, "{:?}", anon.kvm);
    if t * 2.0 < a && thp.latency_ns.p50 < anon.latency_ns.p50 {
        Ok(())
    } else {
        Err(format!(
            "thp {t} ns per 4 KiB (p50 {}) vs anon {a} ns (p50 {})",
            thp.latency_ns.p50, anon.latency_ns.p50
        ))
    }
}

#[test]
fn test_faults_prefaulted_is_below_first_touch() {
    if !kvm_or_skip("faults: prefault vs anon") {
        return;
    }
    let r = bench(&config(4 * MIB, &[Backing::ANON, Backing::Prefault]));
    let anon = by_name(&r, "anon").pass("first-touch").unwrap();
    let pre = by_name(&r, "prefault").pass("first-touch").unwrap();
    assert!(
        pre.latency_ns.p50 < anon.latency_ns.p50 && pre.latency_ns.mean < anon.latency_ns.mean,
        "prefault p50 {} mean {} vs anon p50 {} mean {}",
        pre.latency_ns.p50,
        pre.latency_ns.mean,
        anon.latency_ns.p50,
        anon.latency_ns.mean
    );
}

/// KVM maps at most PTE_PREFETCH_NUM (8) extra sptes per fault.
fn assert_pf_fixed_matches_pages(pf_fixed: i64, pages: u64, what: &str) {
    let pages = pages as i64;
    assert!(
        pf_fixed >= pages / 8 && pf_fixed <= pages + pages / 20 + 16,
        "{what}: pf_fixed {pf_fixed} for {pages} touched pages"
    );
}

#[test]
fn test_faults_kvm_counters_match_pages_touched() {
    if !kvm_or_skip("faults: counters") {
        return;
    }
    for (pattern, guest_page) in [
        (Pattern::Sequential, GuestPage::Size2M),
        (Pattern::Stride(16 << 10), GuestPage::Size2M),
        (Pattern::Random, GuestPage::Size4K),
    ] {
        let cfg = FaultsConfig {
            pattern,
            guest_page,
            ..config(4 * MIB, &[Backing::ANON, Backing::Prefault])
        };
        let r = bench(&cfg);
        for c in &r.configurations {
            let p = c.pass("first-touch").unwrap();
            let what = format!("{} {pattern} guest {guest_page}", c.backing);
            assert_eq!(p.pages, pattern.accesses(4 * MIB), "{what}");
            assert_pf_fixed_matches_pages(p.kvm("pf_fixed"), p.pages, &what);
            assert_eq!(p.accesses, p.latency_ns.count, "{what}");
        }
        // Anonymous first touch faults every page: no prefetch possible.
        let anon = by_name(&r, "anon").pass("first-touch").unwrap();
        assert!(anon.kvm("pf_fixed") >= anon.pages as i64, "{:?}", anon.kvm);
    }
}

#[test]
fn test_faults_two_vcpus_disjoint_parts_fault_each_page_once() {
    if !kvm_or_skip("faults: two vCPUs") {
        return;
    }
    let cfg = FaultsConfig {
        vcpus: 2,
        share: Share::Disjoint,
        ..config(4 * MIB, &[Backing::ANON])
    };
    let r = bench(&cfg);
    let p = r.configurations[0].pass("first-touch").unwrap();
    assert_eq!((p.accesses, p.pages), (1024, 1024));
    assert_pf_fixed_matches_pages(p.kvm("pf_fixed"), p.pages, "2 vCPUs");
}

#[test]
fn test_faults_uffd_copy_resolves_exactly_touched_pages_and_guest_verifies() {
    if !kvm_or_skip("faults: uffd-copy") {
        return;
    }
    // Every other page: the handler must resolve those and no neighbour.
    let cfg = FaultsConfig {
        pattern: Pattern::Stride(8 << 10),
        access: Access::Read,
        ..config(2 * MIB, &[Backing::UffdCopy])
    };
    let r = bench(&cfg);
    let c = &r.configurations[0];
    let p = c.pass("first-touch").unwrap();
    assert_eq!(p.pages, 256);
    assert_eq!(
        p.uffd_pages, p.touched_pages,
        "resolved pages = touched pages"
    );
    let u = p.uffd.as_ref().unwrap();
    assert_eq!(
        (u.faults, u.resolved, u.eexist, u.wake_only),
        (256, 256, 0, 0)
    );
    assert_eq!(c.uffd_verified, Some(true), "{:?}", c.notes);
    // A userfaultfd round trip costs more than an in-kernel anonymous fault.
    assert!(p.latency_ns.p50 > 5_000.0, "{}", p.latency_ns.p50);
}

#[test]
fn test_faults_uffd_minor_resolves_exactly_touched_pages_and_guest_verifies() {
    if !kvm_or_skip("faults: uffd-minor") {
        return;
    }
    // Every other page of a memfd whose page cache holds the FILL pattern:
    // each read is a MINOR fault resolved with UFFDIO_CONTINUE, and the
    // guest then verifies every word of the range.
    let cfg = FaultsConfig {
        pattern: Pattern::Stride(8 << 10),
        access: Access::Read,
        refault: true,
        ..config(2 * MIB, &[Backing::UffdMinor])
    };
    let r = bench(&cfg);
    let c = &r.configurations[0];
    assert_eq!(c.skipped, None);
    for pass in ["first-touch", "re-fault"] {
        let p = c.pass(pass).unwrap();
        assert_eq!(p.pages, 256, "{pass}");
        assert_eq!(p.uffd_pages, p.touched_pages, "{pass}: resolved = touched");
        let u = p.uffd.as_ref().unwrap();
        assert_eq!((u.faults, u.resolved, u.writes), (256, 256, 0), "{pass}");
        assert_eq!(p.latency_by_outcome["resolved"].count, 256, "{pass}");
        assert_pf_fixed_matches_pages(p.kvm("pf_fixed"), p.pages, pass);
    }
    assert_eq!(c.uffd_verified, Some(true), "{:?}", c.notes);
}

#[test]
fn test_faults_uffd_wp_faults_on_writes_only() {
    if !kvm_or_skip("faults: uffd-wp") {
        return;
    }
    let cfg = |access| FaultsConfig {
        access,
        refault: true,
        ..config(2 * MIB, &[Backing::UffdWp])
    };
    // Reads of write-protected, populated memory: KVM faults, the handler
    // hears nothing.
    let reads = bench(&cfg(Access::Read));
    for p in &reads.configurations[0].passes {
        let u = p.uffd.as_ref().unwrap();
        assert_eq!(u.faults, 0, "{}: reads must not fault: {u:?}", p.pass);
        assert_eq!(p.latency_by_outcome["no-message"].count, p.accesses);
        assert!(p.kvm("pf_fixed") > 0, "KVM still mapped the pages");
    }
    // Writes: one write fault per page, resolved by un-protecting; the
    // re-fault pass protects the range again and every page faults again.
    let writes = bench(&cfg(Access::Write));
    for p in &writes.configurations[0].passes {
        let u = p.uffd.as_ref().unwrap();
        assert_eq!(p.pages, 512);
        assert_eq!(
            (u.faults, u.writes, u.resolved),
            (512, 512, 512),
            "{}",
            p.pass
        );
        assert_eq!(p.uffd_pages, p.touched_pages, "{}", p.pass);
    }
}

#[test]
fn test_faults_uffd_per_vcpu_uffds_resolve_only_their_vcpus_pages() {
    if !kvm_or_skip("faults: per-vCPU uffds") {
        return;
    }
    let cfg = FaultsConfig {
        vcpus: 2,
        uffd_per_vcpu: true,
        uffd_handlers: 2,
        ..config(4 * MIB, &[Backing::UffdZero])
    };
    let r = bench(&cfg);
    let p = r.configurations[0].pass("first-touch").unwrap();
    assert_eq!(p.uffd.as_ref().unwrap().resolved, 1024);
    assert!(p.vcpu_tids.iter().all(|&t| t != 0), "{:?}", p.vcpu_tids);
    for k in 0..2u64 {
        let (start, len) = cfg.part(k);
        let mine: Vec<_> = p
            .uffd_events
            .iter()
            .filter(|e| e.uffd == k as usize)
            .collect();
        assert_eq!(mine.len(), 512, "uffd {k}");
        for e in &mine {
            assert!(
                e.page >= start && e.page < start + len,
                "uffd {k} resolved page {:#x} outside vCPU {k}'s part",
                e.page
            );
            assert_eq!(
                e.tid, p.vcpu_tids[k as usize],
                "uffd {k}: another thread faulted"
            );
        }
    }
}

#[test]
fn test_faults_uffd_shared_range_outcomes_add_up() {
    if !kvm_or_skip("faults: uffd outcomes") {
        return;
    }
    // Two vCPUs over the same pages, one uffd, two handler threads: every
    // page resolved once; the other vCPU's faults are races (EEXIST) or
    // wake-ups only, and every message has exactly one label.
    let cfg = FaultsConfig {
        vcpus: 2,
        share: Share::Shared,
        uffd_handlers: 2,
        ..config(2 * MIB, &[Backing::UffdZero])
    };
    let r = bench(&cfg);
    let p = r.configurations[0].pass("first-touch").unwrap();
    let u = p.uffd.as_ref().unwrap();
    assert_eq!(u.resolved, 512, "{u:?}");
    assert_eq!(
        u.faults,
        u.resolved + u.eexist + u.eagain_retry + u.wake_only
    );
    let labelled: u64 = p.latency_by_outcome.values().map(|s| s.count).sum();
    assert_eq!(labelled, p.accesses);
    assert_eq!(
        p.latency_by_outcome["resolved"].count,
        512,
        "{:?}",
        p.latency_by_outcome.keys()
    );
}

#[test]
fn test_faults_uffd_kinds_get_a_raw_baseline() {
    if !kvm_or_skip("faults: uffd raw baseline") {
        return;
    }
    // Writes: uffd-wp faults on writes only, so reads would leave both
    // its handlers (ours and raw's) idle and the ratio would say nothing.
    let cfg = FaultsConfig {
        baselines: true,
        access: Access::Write,
        ..config(
            4 * MIB,
            &[Backing::UffdCopy, Backing::UffdMinor, Backing::UffdWp],
        )
    };
    let r = bench(&cfg);
    for c in &r.configurations {
        let b = c.baselines.as_ref().unwrap();
        let raw = b
            .raw
            .as_ref()
            .unwrap_or_else(|| panic!("{}: no raw", c.backing));
        assert_eq!(raw.first.count, 1024, "{}", c.backing);
        let ratio = b.ratio_tool_to_raw.unwrap();
        // The 1.2 goal is for the script; here only a broken baseline fails
        // (a raw handler that never ran would hang, not be fast).
        assert!(
            (0.5..2.0).contains(&ratio),
            "{}: tool/raw {ratio}",
            c.backing
        );
    }
}

#[test]
fn test_faults_uffd_cli_histograms_scaling_and_bad_flags() {
    if !kvm_or_skip("faults: uffd CLI") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = empty_tmpdir("hist");
    let out = Command::new(env!("CARGO_BIN_EXE_vmm-cli"))
        .args(["bench", "faults", "--size", "1M", "--backing", "uffd-minor"])
        .args([
            "--access",
            "read",
            "--scaling",
            "--json",
            "-q",
            "--histograms",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    // The sweep keeps no per-access histograms: refused, not silently empty.
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--histograms with --scaling"), "{err}");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    let out = Command::new(env!("CARGO_BIN_EXE_vmm-cli"))
        .args(["bench", "faults", "--size", "1M", "--backing", "uffd-minor"])
        .args(["--access", "read", "--scaling", "--json", "-q"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("scaling: pages/s"), "{err}");
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = j["scaling"].as_array().unwrap();
    assert_eq!(rows[0]["vcpus"], 1);
    assert!(rows.len() >= 2, "{rows:?}");
    for row in rows {
        assert!(row["pages_per_sec"].as_f64().unwrap() > 0.0);
        assert!(row["raw_pages_per_sec"].as_f64().unwrap() > 0.0);
        assert_eq!(row["uffd"]["resolved"], row["pages"]);
    }
    // Without --scaling: the log2 histogram and outcome labels in the JSON,
    // HDR and log2 files per pass and outcome, a plot box per outcome.
    let plot = dir.join("plot.svg");
    let out = Command::new(env!("CARGO_BIN_EXE_vmm-cli"))
        .args(["bench", "faults", "--size", "1M", "--backing", "uffd-copy"])
        .args(["--json", "-q", "--histograms"])
        .arg(&dir)
        .arg("--plot")
        .arg(&plot)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pass = &j["configurations"][0]["passes"][0];
    let buckets = pass["histogram_log2"].as_array().unwrap();
    let total: u64 = buckets.iter().map(|b| b["count"].as_u64().unwrap()).sum();
    assert_eq!(total, 256);
    assert_eq!(pass["latency_by_outcome"]["resolved"]["count"], 256);
    assert_eq!(pass["uffd"]["eexist"], 0);
    let files = entries(&dir);
    for f in [
        "uffd-copy-first-touch.hgrm",
        "uffd-copy-first-touch.log2.txt",
        "uffd-copy-first-touch-resolved.hgrm",
        "uffd-copy-raw.hgrm",
    ] {
        assert!(files.contains(&f.to_string()), "{f} not in {files:?}");
    }
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(
        svg.contains("uffd-copy first-touch resolved") && svg.contains("uffd-copy raw KVM"),
        "a box per outcome and the raw baseline"
    );
    let hgrm = std::fs::read_to_string(dir.join("uffd-copy-first-touch.hgrm")).unwrap();
    assert!(hgrm.contains("Total count    =          256"), "{hgrm}");
    std::fs::remove_dir_all(&dir).unwrap();

    // A histogram directory that cannot be: refused at once, nothing made.
    let file = std::env::temp_dir().join(format!("vmm-faults-notadir-{}", std::process::id()));
    std::fs::write(&file, b"x").unwrap();
    let bad = Command::new(env!("CARGO_BIN_EXE_vmm-cli"))
        .args([
            "bench",
            "faults",
            "--size",
            "64M",
            "--backing",
            "uffd-copy",
            "--histograms",
        ])
        .arg(file.join("sub"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2), "{err}");
    assert!(err.contains("not a directory"), "{err}");
    std::fs::remove_file(&file).unwrap();

    for (flags, says) in [
        (
            &["--backing", "uffd-zero", "--handler-delay", "5s"][..],
            "--handler-delay",
        ),
        (
            &[
                "--backing",
                "uffd-zero",
                "--uffd-per-vcpu",
                "--share",
                "shared",
            ][..],
            "--share disjoint",
        ),
        (
            &["--backing", "anon", "--uffd-handlers", "2"][..],
            "uffd backings only",
        ),
    ] {
        let bad = Command::new(env!("CARGO_BIN_EXE_vmm-cli"))
            .args(["bench", "faults", "--size", "1M"])
            .args(flags)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&bad.stderr);
        assert_eq!(bad.status.code(), Some(2), "{flags:?}: {err}");
        assert!(err.contains(says), "{flags:?}: {err}");
    }
}

#[test]
fn test_faults_refault_after_dontneed_faults_again() {
    if !kvm_or_skip("faults: re-fault") {
        return;
    }
    let cfg = FaultsConfig {
        refault: true,
        ..config(4 * MIB, &[Backing::ANON, Backing::UffdZero])
    };
    let r = bench(&cfg);
    let anon = by_name(&r, "anon");
    let (first, again) = (
        anon.pass("first-touch").unwrap(),
        anon.pass("re-fault").unwrap(),
    );
    assert_pf_fixed_matches_pages(again.kvm("pf_fixed"), again.pages, "anon re-fault");
    // Real faults, not TLB hits: within a factor of the first touch.
    assert!(
        again.latency_ns.p50 > first.latency_ns.p50 / 4.0,
        "re-fault p50 {} vs first {}",
        again.latency_ns.p50,
        first.latency_ns.p50
    );
    let uffd = by_name(&r, "uffd-zero").pass("re-fault").unwrap();
    assert_eq!(
        uffd.uffd_pages, uffd.touched_pages,
        "every page resolved again"
    );
}

#[test]
fn test_faults_tool_median_is_close_to_raw_kvm_baseline() {
    if !kvm_or_skip("faults: raw baseline") {
        return;
    }
    let cfg = FaultsConfig {
        baselines: true,
        ..config(8 * MIB, &[Backing::ANON])
    };
    let r = bench(&cfg);
    let b = r.configurations[0].baselines.as_ref().unwrap();
    let ratio = b.ratio_tool_to_raw.unwrap();
    // The goal (1.05) is checked by scripts/bench-faults.sh on a quiet
    // machine; here only a gross difference (a broken measurement) fails.
    assert!((0.67..1.5).contains(&ratio), "tool/raw {ratio}");
    assert!(
        b.host.p50 < r.configurations[0].passes[0].latency_ns.p50,
        "host floor is below the guest"
    );
}

#[test]
fn test_faults_guest_4k_pages_keep_kvm_from_mapping_2m() {
    if !kvm_or_skip("faults: 4K guest pages") {
        return;
    }
    // THP host memory: KVM maps 2 MiB only where the guest page is >= 2 MiB.
    let cfg = FaultsConfig {
        guest_page: GuestPage::Size4K,
        ..config(4 * MIB, &[Backing::THP])
    };
    let p4k = bench(&cfg).configurations[0].passes[0].clone();
    assert_eq!(p4k.kvm("pages_2m"), 0, "{:?}", p4k.kvm);
    assert_pf_fixed_matches_pages(p4k.kvm("pf_fixed"), p4k.pages, "thp, 4K guest pages");
}

#[test]
fn test_faults_1g_guest_pages_refused_without_pdpe1gb() {
    if !kvm_or_skip("faults: 1G") {
        return;
    }
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    if vmm::bench::kvm_has_pdpe1gb(&kvm) {
        eprintln!("SKIP: this host's KVM offers pdpe1gb");
        return;
    }
    let cfg = FaultsConfig {
        guest_page: GuestPage::Size1G,
        ..config(2 * MIB, &[Backing::ANON])
    };
    let e = run_faults(&cfg, &mut Vec::new()).unwrap_err();
    assert!(matches!(e, BenchError::Config(_)), "{e}");
    assert!(e.to_string().contains("pdpe1gb"), "{e}");
}

#[test]
fn test_faults_cli_json_and_plot() {
    if !kvm_or_skip("faults: CLI") {
        return;
    }
    let plot = std::env::temp_dir().join(format!("vmm-faults-{}.svg", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_vmm-cli"))
        .args([
            "bench",
            "faults",
            "--size",
            "2M",
            "--compare",
            "anon,thp",
            "--refault",
            "--json",
            "-q",
        ])
        .arg("--plot")
        .arg(&plot)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("p99.9") && err.contains("tool/raw"),
        "tables on stderr: {err}"
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(j["host"]["kernel"].is_string() && j["host"]["thp_enabled"].is_string());
    let anon = &j["configurations"][0];
    assert_eq!(anon["backing"], "anon");
    assert!(anon["passes"][1]["kvm"]["pf_fixed"].as_i64().unwrap() > 0);
    assert!(anon["passes"][0]["latency_ns"]["p999"].as_f64().unwrap() > 0.0);
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.contains("thp re-fault") && svg.contains("anon raw KVM"));
    let _ = std::fs::remove_file(plot);

    let bad = Command::new(env!("CARGO_BIN_EXE_vmm-cli"))
        .args(["bench", "faults", "--size", "3M", "--backing", "thp"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--size"));
}

/// A fresh, empty directory for a child's TMPDIR.
fn empty_tmpdir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("vmm-faults-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn entries(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn test_faults_leave_nothing_in_tmpdir_even_when_killed() {
    if !kvm_or_skip("faults: temporary files") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = empty_tmpdir("killed");
    // A run that completes: the unnamed file and the copy source included.
    let done = Command::new(env!("CARGO_BIN_EXE_vmm-cli"))
        .env("TMPDIR", &tmp)
        .args([
            "bench",
            "faults",
            "--size",
            "2M",
            "--compare",
            "file,uffd-copy",
            "-q",
        ])
        .output()
        .unwrap();
    assert_eq!(
        done.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert_eq!(entries(&tmp), Vec::<String>::new(), "after a complete run");
    // A run killed while it measures (SIGKILL: no destructor runs).
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmm-cli"))
        .env("TMPDIR", &tmp)
        .args([
            "bench",
            "faults",
            "--size",
            "512M",
            "--compare",
            "file,uffd-copy",
            "-q",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(700));
    let still_running = child.try_wait().unwrap().is_none();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(still_running, "the run ended before it could be killed");
    assert_eq!(entries(&tmp), Vec::<String>::new(), "after SIGKILL");
    std::fs::remove_dir(&tmp).unwrap();
}

#[test]
fn test_faults_bad_plot_path_is_refused_before_measuring() {
    let t = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_vmm-cli"))
        .args(["bench", "faults", "--size", "64M", "--rounds", "3"])
        .args(["--plot", "/nonexistent/dir/x.svg"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("/nonexistent/dir/x.svg"), "{err}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("first-touch"),
        "nothing measured"
    );
    assert!(
        t.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn test_faults_sigint_stops_reports_what_was_measured_and_exits_1() {
    use std::io::{BufRead, BufReader};
    use std::time::{Duration, Instant};
    if !kvm_or_skip("faults: SIGINT") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = empty_tmpdir("sigint");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmm-cli"))
        .env("TMPDIR", &tmp)
        .args(["bench", "faults", "--size", "16M", "--rounds", "3"])
        .args(["--compare", "anon,memfd,shared,uffd-copy,thp"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the first configuration's table, then interrupt.
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("first-touch") {
            break;
        }
    }
    assert!(
        seen.contains("first-touch"),
        "no table before the end: {seen}"
    );
    // SAFETY: signalling our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("still running 20 s after SIGINT");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("interrupted by SIGINT"), "{err}");
    // It stopped: not every configuration got its table, and no comparison.
    let tables = seen.lines().chain(rest.iter().map(String::as_str));
    let headers = tables.filter(|l| l.contains(" — seq write,")).count();
    assert!(headers < 5, "it went on measuring: {rest:?}");
    assert!(
        !rest.iter().any(|l| l.starts_with("comparison")),
        "{rest:?}"
    );
    assert_eq!(entries(&tmp), Vec::<String>::new(), "after SIGINT");
    std::fs::remove_dir(&tmp).unwrap();
}

#[test]
fn test_raw_baseline_stops_at_its_timeout_instead_of_waiting_on_a_slow_handler() {
    if !kvm_or_skip("test_raw_baseline_stops_at_its_timeout_instead_of_waiting_on_a_slow_handler") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // 64 pages behind a handler that takes 2 s per fault: about two minutes
    // of work, cut short by the 300 ms timeout (the vCPU is kicked out of
    // its fault; the handler finishes the one it is sleeping on).
    let mut cfg = FaultsConfig::small(256 << 10, Backing::UffdZero);
    cfg.handler_delay = std::time::Duration::from_secs(2);
    cfg.timeout = std::time::Duration::from_millis(300);
    let started = std::time::Instant::now();
    let err = vmm::bench::raw_baseline(&cfg, &Backing::UffdZero)
        .expect_err("the baseline cannot finish in time");
    let took = started.elapsed();
    let msg = err.to_string();
    assert!(msg.contains("timed out after 300"), "{msg}");
    assert!(
        took < std::time::Duration::from_secs(10),
        "took {took:?}: {msg}"
    );
}
