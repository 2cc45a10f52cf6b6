//! `vmm bench faults` prefault, churn and working-set replay on real KVM:
//! correctness, not timing (tiny ranges; figures live in
//! docs/fault-latency.md, from scripts/bench-churn.sh).

use std::process::Command;
use std::time::{Duration, Instant};

use vmm::bench::{
    Access, Backing, ChurnOp, ConfigResult, FaultsConfig, FaultsReport, Pattern, Prefetch, Workset,
};
use vmm_tests::kvm_or_skip;

use super::common::bench;

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

fn config(size: u64, backing: Backing) -> FaultsConfig {
    FaultsConfig::small(size, backing)
}

fn only(r: &FaultsReport) -> &ConfigResult {
    assert_eq!(r.configurations.len(), 1);
    &r.configurations[0]
}

fn tmp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("vmm-churn-{name}-{}", std::process::id()))
}

#[test]
fn test_populate_backing_is_timed_and_leaves_kvm_an_eighth_of_the_faults() {
    if !kvm_or_skip("churn: populate backing") {
        return;
    }
    let pages = 8 * MIB / PAGE;
    let cfg = FaultsConfig {
        backings: vec![Backing::ANON, Backing::Prefault, Backing::Populate],
        ..config(8 * MIB, Backing::ANON)
    };
    let r = bench(&cfg);
    let pf = |c: &ConfigResult| c.pass("first-touch").unwrap().kvm("pf_fixed") as u64;
    let [anon, touch, populate] = &r.configurations[..] else {
        panic!("three configurations");
    };
    assert!(anon.prefill.is_none());
    assert!(
        pf(anon) >= pages * 9 / 10,
        "anon faults every page: {}",
        pf(anon)
    );
    for (c, method) in [(touch, "touch"), (populate, "MADV_POPULATE_WRITE")] {
        let p = c.prefill.as_ref().expect("prefill timed");
        assert_eq!((p.method, p.pages), (method, pages), "{}", c.backing);
        assert!(p.ms > 0.0);
        // The host pages exist: KVM still faults (no KVM_PRE_FAULT_MEMORY
        // here) but maps 8 present neighbours per fault.
        assert!(
            pf(c) <= pages / 8 + pages / 20,
            "{}: pf_fixed {} for {pages} pages",
            c.backing,
            pf(c)
        );
    }
}

#[test]
fn test_pre_fault_memory_is_refused_with_the_reason() {
    if !kvm_or_skip("churn: --pre-fault-memory refused") {
        return;
    }
    let t = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_vmm-cli"))
        .args([
            "bench",
            "faults",
            "--size",
            "2M",
            "--pre-fault-memory",
            "-q",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("KVM_PRE_FAULT_MEMORY"), "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "refused before measuring"
    );
}

/// A planted slow op: `stall` holds the whole range read-only for 20 ms
/// every ~40 ms; a guest write in that window waits it out. 20 ms puts the
/// accesses it holds above the host's own noise (a loaded nested host has
/// 1 % of first touches at several ms). Its outliers must be charged to
/// it, which only happens if guest and host stamps are on one clock and the
/// windows are matched correctly.
#[test]
fn test_churn_planted_stall_is_named_as_the_cause_of_its_outliers() {
    if !kvm_or_skip("churn: planted stall") {
        return;
    }
    let hold = Duration::from_millis(20);
    // 16 MiB: a pass long enough (~60 ms of first touches) for two stall
    // windows even when the churn thread starts late on a loaded host (at
    // 8 MiB one full-suite run saw a single stall).
    let mut cfg = config(16 * MIB, Backing::ANON);
    cfg.churn.ops = vec![ChurnOp::Dontneed, ChurnOp::Stall(hold)];
    cfg.churn.churn_gap = Duration::from_millis(10);
    let r = bench(&cfg);
    let pass = only(&r).pass("first-touch").unwrap();
    let table = pass.churn.as_ref().expect("a churn table");
    let stall = table.row("stall").expect("a stall row");
    let dontneed = table.row("dontneed").expect("a dontneed row");
    assert!(
        stall.ops >= 2,
        "the pass saw at least two stalls: {table:?}"
    );
    assert_eq!(table.top_cause(), Some("stall"), "{table:?}");
    // The top cause is the op that cost the most time: a loaded host can
    // give dontneed more (but far shorter) outliers than the stall.
    assert!(stall.outliers >= 1 && dontneed.ops >= 1, "{table:?}");
    // The accesses a stall held waited for most of its 20 ms.
    let ms = |ns: f64| ns / 1e6;
    assert!(ms(stall.max_extra_ns) >= 12.0, "{table:?}");
    assert!(ms(stall.median_extra_ns) >= 4.0, "{table:?}");
    assert!(only(&r)
        .notes
        .iter()
        .any(|n| n.contains("EFAULT") && n.contains("retried")));
}

#[test]
fn test_churn_every_op_runs_beside_two_vcpus_and_both_passes() {
    if !kvm_or_skip("churn: every op") {
        return;
    }
    // 32 MiB: a pass long enough for the five op kinds to take their turns
    // (about 1 ms apart, some taking milliseconds on a loaded host) before
    // the vCPUs finish; at 8 MiB a loaded CI run ended the first-touch pass
    // after four.
    let mut cfg = config(32 * MIB, Backing::ANON);
    cfg.vcpus = 2;
    cfg.refault = true;
    cfg.churn.ops = vec![
        ChurnOp::Plug,
        ChurnOp::Protect,
        ChurnOp::Dontneed,
        ChurnOp::Collapse,
        ChurnOp::DirtyLog,
    ];
    let r = bench(&cfg);
    let c = only(&r);
    for pass in ["first-touch", "re-fault"] {
        let p = c.pass(pass).unwrap();
        assert_eq!(p.accesses, 32 * MIB / PAGE);
        let t = p.churn.as_ref().expect("a churn table per pass");
        let mut outliers = t.unattributed.outliers;
        for op in ["plug", "protect", "dontneed", "collapse", "dirty-log"] {
            let row = t
                .row(op)
                .unwrap_or_else(|| panic!("{pass}: no {op} row: {t:?}"));
            assert!(row.ops >= 1, "{pass}: {op} never ran");
            if op != "collapse" {
                // MADV_COLLAPSE refuses windows the guest has not populated.
                assert_eq!(row.failed, 0, "{pass}: {op} failed: {:?}", c.notes);
            }
            outliers += row.outliers;
        }
        // Every access above p99 is in exactly one row (p99 of this pass's
        // accesses, on the TSC, converted as the attribution does).
        let ns_per_tick = 1e6 / f64::from(c.tsc_khz);
        let above = p
            .touches
            .iter()
            .filter(|a| a.ticks as f64 * ns_per_tick > t.threshold_ns)
            .count() as u64;
        assert_eq!(p.touches.len() as u64, p.accesses);
        assert!(above >= 1 && above <= p.accesses / 100, "{pass}: {above}");
        assert_eq!(outliers, above, "{pass}: {t:?}");
    }
}

/// Records the working set of a pass over every other page, then replays it
/// under a full sequential pass: the prefetch must cover exactly the
/// recorded pages, so the timed pass asks userfaultfd for exactly the rest.
#[test]
fn test_replay_copy_prefetches_exactly_the_recorded_pages() {
    if !kvm_or_skip("churn: replay copy, partial set") {
        return;
    }
    let size = 4 * MIB;
    let pages = size / PAGE;
    let file = tmp("half.jsonl");
    let mut rec = config(size, Backing::ANON);
    rec.pattern = Pattern::Stride(2 * PAGE);
    rec.workset.record = Some(file.clone());
    bench(&rec);
    let set = Workset::read(&file, size).unwrap();
    assert_eq!(set.pages.len() as u64, pages / 2);
    assert!(set.pages.windows(2).all(|w| w[0].t_ns <= w[1].t_ns));
    let mut replay = config(size, Backing::UffdCopy);
    replay.access = Access::Read;
    replay.workset.replay = Some(file.clone());
    replay.workset.prefetch = Prefetch::Copy;
    let r = bench(&replay);
    std::fs::remove_file(&file).unwrap();
    let rp = only(&r).replay.as_ref().expect("a replay result");
    assert_eq!(rp.pages, pages / 2);
    assert_eq!(rp.without.uffd_faults, pages as f64);
    assert_eq!(rp.with.uffd_faults, (pages / 2) as f64, "{rp:?}");
    assert_eq!(
        rp.with_verified,
        Some(true),
        "copied content is the source's"
    );
    assert!(rp.prefetch_ms > 0.0);
}

#[test]
fn test_replay_of_a_full_set_cuts_uffd_faults_to_zero_and_kvm_faults_eightfold() {
    if !kvm_or_skip("churn: replay full set") {
        return;
    }
    let size = 8 * MIB;
    let pages = size / PAGE;
    let file = tmp("full.jsonl");
    let mut rec = config(size, Backing::ANON);
    rec.workset.record = Some(file.clone());
    bench(&rec);
    for (backing, prefetch) in [
        (Backing::UffdCopy, Prefetch::Copy),
        (Backing::ANON, Prefetch::Populate),
        (Backing::ANON, Prefetch::None),
    ] {
        let mut cfg = config(size, backing.clone());
        cfg.workset.replay = Some(file.clone());
        cfg.workset.prefetch = prefetch;
        let r = bench(&cfg);
        let rp = only(&r).replay.clone().expect("a replay result");
        assert!(rp.without.pf_fixed >= (pages * 9 / 10) as f64, "{rp:?}");
        if prefetch == Prefetch::None {
            // The control: nothing prefetched, every page faults again.
            assert!(rp.with.pf_fixed >= (pages * 9 / 10) as f64, "{rp:?}");
            continue;
        }
        assert_eq!(rp.with.uffd_faults, 0.0, "{backing}: {rp:?}");
        assert!(
            rp.with.pf_fixed <= (pages / 8 + pages / 20) as f64,
            "{backing}: KVM maps 8 present pages per fault: {rp:?}"
        );
        assert!(rp.pf_fixed_saved > 0.0 && rp.guest_ms_saved > 0.0, "{rp:?}");
    }
    std::fs::remove_file(&file).unwrap();
}

/// A full recorded set replayed with one uffd per vCPU: the set is one run
/// across both vCPUs' parts, so each batched `UFFDIO_COPY` must be split
/// between the two uffds, or the other part would still fault.
#[test]
fn test_replay_copy_with_per_vcpu_uffds_splits_runs_between_them() {
    if !kvm_or_skip("churn: replay copy, per-vCPU uffds") {
        return;
    }
    let size = 4 * MIB;
    let pages = size / PAGE;
    let file = tmp("pervcpu.jsonl");
    let mut rec = config(size, Backing::ANON);
    rec.workset.record = Some(file.clone());
    bench(&rec);
    let mut cfg = config(size, Backing::UffdCopy);
    cfg.vcpus = 2;
    cfg.uffd_per_vcpu = true;
    cfg.uffd_handlers = 2;
    cfg.access = Access::Read;
    cfg.workset.replay = Some(file.clone());
    cfg.workset.prefetch = Prefetch::Copy;
    let r = bench(&cfg);
    std::fs::remove_file(&file).unwrap();
    let rp = only(&r).replay.as_ref().expect("a replay result");
    assert_eq!(rp.pages, pages);
    assert_eq!(rp.without.uffd_faults, pages as f64, "{rp:?}");
    assert_eq!(rp.with.uffd_faults, 0.0, "both parts prefetched: {rp:?}");
    assert_eq!(rp.with_verified, Some(true), "copied content: {rp:?}");
}

/// The churn writer beside the userfaultfd kinds with one uffd per vCPU and
/// two handler threads each: every op runs without failing, both passes
/// get a churn table, every page is resolved by the handler, and the
/// minor-fault content is the page cache's.
#[test]
fn test_churn_beside_uffd_minor_and_wp_with_per_vcpu_uffds() {
    if !kvm_or_skip("churn: uffd kinds") {
        return;
    }
    // 16 MiB: a pass long enough (~0.2 s here) for the writer to reach
    // every op even while other tests load the host.
    let size = 16 * MIB;
    let pages = size / PAGE;
    for (backing, access) in [
        (Backing::UffdMinor, Access::Read),
        (Backing::UffdWp, Access::Write),
    ] {
        let mut cfg = config(size, backing.clone());
        cfg.vcpus = 2;
        cfg.refault = true;
        cfg.uffd_per_vcpu = true;
        cfg.uffd_handlers = 2;
        cfg.access = access;
        cfg.churn.ops = vec![ChurnOp::Protect, ChurnOp::DirtyLog, ChurnOp::Plug];
        let r = bench(&cfg);
        let c = only(&r);
        assert!(c.skipped.is_none(), "{backing}: {:?}", c.skipped);
        let mut ran = std::collections::BTreeMap::<String, u64>::new();
        for pass in ["first-touch", "re-fault"] {
            let p = c.pass(pass).unwrap();
            assert_eq!(p.accesses, pages, "{backing} {pass}");
            let t = p.churn.as_ref().expect("a churn table per pass");
            // A memslot change beside vCPUs waiting in userfaultfd can take
            // much of a short pass, so not every kind gets a turn in every
            // pass; none may fail.
            for row in t.rows.iter().filter(|r| r.op != "(none)") {
                assert_eq!(row.failed, 0, "{backing} {pass}: {}: {:?}", row.op, c.notes);
                *ran.entry(row.op.clone()).or_default() += row.ops;
            }
            assert!(
                t.row("protect").is_some_and(|r| r.ops >= 1),
                "{backing} {pass}: the first op never ran"
            );
            let mut served = p.uffd_pages.clone();
            served.dedup();
            assert_eq!(
                served.len() as u64,
                pages,
                "{backing} {pass}: handler-served pages"
            );
        }
        for op in ["protect", "dirty-log", "plug"] {
            assert!(
                ran.get(op).is_some_and(|&n| n >= 1),
                "{backing}: {op} never ran: {ran:?}"
            );
        }
        if backing == Backing::UffdMinor {
            assert_eq!(c.uffd_verified, Some(true), "{:?}", c.notes);
        }
    }
}

#[test]
fn test_record_and_replay_bad_input_exits_2_and_leaves_nothing() {
    if !kvm_or_skip("churn: record/replay bad input") {
        return;
    }
    let run = |args: &[&str]| {
        let t = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_vmm-cli"))
            .args(["bench", "faults", "--size", "2M", "--no-baselines", "-q"])
            .args(args)
            .output()
            .unwrap();
        assert!(t.elapsed() < Duration::from_secs(20));
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let bad = tmp("bad.jsonl");
    std::fs::write(&bad, "{\"format\":\"vmm-workset\",\"version\":1,\"page_size\":4096,\"range_size\":2097152,\"pages\":1}\n{\"offset\":4194304,\"t_ns\":0,\"latency_ns\":1,\"vcpu\":0}\n").unwrap();
    let (code, err) = run(&["--replay", bad.to_str().unwrap(), "--prefetch", "populate"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("line 2") && err.contains("offset 0x400000"),
        "{err}"
    );
    std::fs::remove_file(&bad).unwrap();
    let (code, err) = run(&["--churn", "plug,bogus"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("bogus"), "{err}");
    let (code, err) = run(&["--prefetch", "copy"]);
    assert_eq!(code, Some(2), "--prefetch without --replay: {err}");
    let (code, err) = run(&["--churn", "plug", "--replay", "/nonexistent"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--churn with --replay"), "{err}");
    // The churn and workset flags against the userfaultfd and scaling flags.
    let (code, err) = run(&["--backing", "uffd-copy", "--churn", "plug,dontneed"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--churn dontneed with uffd-copy"), "{err}");
    for flags in [
        &["--scaling", "--churn", "plug"][..],
        &["--scaling", "--record", "/nonexistent/x"][..],
        &["--scaling", "--replay", "/nonexistent"][..],
    ] {
        let (code, err) = run(flags);
        assert_eq!(code, Some(2), "{flags:?}: {err}");
        assert!(
            err.contains("--scaling with") && err.contains(flags[1]),
            "{flags:?}: {err}"
        );
    }
    let (code, err) = run(&[
        "--backing",
        "uffd-minor",
        "--replay",
        "/nonexistent",
        "--prefetch",
        "copy",
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("not uffd-minor"), "{err}");
    // A run that fails after the record file was created removes it.
    let rec = tmp("failed.jsonl");
    let (code, err) = run(&["--record", rec.to_str().unwrap(), "--timeout", "1ms"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(!rec.exists(), "a failed run left {rec:?} behind");
}

#[test]
fn test_churn_record_and_replay_through_the_cli_json() {
    if !kvm_or_skip("churn: CLI JSON") {
        return;
    }
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_vmm-cli"))
            .args([
                "bench",
                "faults",
                "--size",
                "2M",
                "--no-baselines",
                "-q",
                "--json",
            ])
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (j, err)
    };
    let file = tmp("cli.jsonl");
    let (j, err) = cli(&[
        "--churn",
        "dontneed,plug",
        "--record",
        file.to_str().unwrap(),
    ]);
    assert!(err.contains("churn during first-touch"), "{err}");
    assert_eq!(
        j["settings"]["churn"],
        serde_json::json!(["dontneed", "plug"])
    );
    let rows = &j["configurations"][0]["passes"][0]["churn"]["rows"];
    assert_eq!(rows[0]["op"], "dontneed");
    assert_eq!(rows[1]["op"], "plug");
    assert!(rows[0]["ops"].as_u64().unwrap() >= 1);
    assert_eq!(Workset::read(&file, 2 * MIB).unwrap().pages.len(), 512);
    let (j, err) = cli(&["--replay", file.to_str().unwrap(), "--prefetch", "populate"]);
    std::fs::remove_file(&file).unwrap();
    assert!(err.contains("after prefetch populate"), "{err}");
    let rp = &j["configurations"][0]["replay"];
    assert_eq!(rp["prefetch"], "populate");
    assert_eq!(rp["pages"], 512);
    assert_eq!(rp["without"]["pf_fixed"].as_f64().unwrap(), 512.0);
    assert!(
        rp["with"]["pf_fixed"].as_f64().unwrap() <= 64.0 + 26.0,
        "{rp}"
    );
}
