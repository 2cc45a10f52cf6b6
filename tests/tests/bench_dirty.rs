//! `vmm bench dirty` on real KVM: a smoke run (the JSON has every phase of
//! every iteration, the pages collected match what the guest wrote, ours and
//! raw in bitmap mode, the plot), every mode on both implementations
//! collecting exactly the pages written, the ratios where a side clears
//! inside its collect, the enable scan, and bad flags refused fast with
//! exit 2. No timing assertion:
//! speed lives in scripts/bench-dirty.sh.

use std::process::Output;
use std::time::Instant;

use serde_json::Value;
use vmm_tests::kvm_or_skip;

use super::common::vmm;

fn report(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not the JSON report ({e}); stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Checks a mode run: `iterations` entries, each with a vCPU pass and a
/// collect, the pages at least `wrote` (exactly, after the first).
fn check_run(run: &Value, iterations: usize, wrote: u64, exact_from: usize) {
    let its = run["iterations"].as_array().expect("iterations");
    assert_eq!(its.len(), iterations, "{run}");
    for (k, it) in its.iter().enumerate() {
        assert!(it["vcpu_ns"].as_u64().is_some_and(|n| n > 0), "{it}");
        assert!(it["collect_ns"].as_u64().is_some_and(|n| n > 0), "{it}");
        let pages = it["pages"].as_u64().expect("pages");
        if k >= exact_from {
            assert_eq!(pages, wrote, "iteration {}: {it}", k + 1);
        } else {
            assert!(pages >= wrote, "iteration {}: {it}", k + 1);
        }
    }
    for f in ["populate_ms", "enable_ms", "disable_ms"] {
        assert!(run[f].as_f64().is_some_and(|x| x > 0.0), "{f}: {run}");
    }
}

#[test]
fn test_bench_dirty_bitmap_smoke_ours_and_raw_collect_what_the_guest_wrote() {
    if !kvm_or_skip("bench dirty bitmap") {
        return;
    }
    let plot = std::env::temp_dir().join(format!("bench-dirty-{}.svg", std::process::id()));
    let out = vmm(&[
        "bench",
        "dirty",
        "--modes",
        "bitmap",
        "--size",
        "4M",
        "--vcpus",
        "2",
        "--slots",
        "3",
        "--write-percent",
        "5",
        "--iterations",
        "3",
        "--json",
        "--plot",
        plot.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = report(&out);
    // 2 vCPUs x 1,024 pages, every 20th: 52 each.
    assert_eq!(r["pages_written"], 104);
    let m = &r["modes"][0];
    assert_eq!(m["mode"], "bitmap");
    check_run(&m["raw"], 3, 104, 0);
    check_run(&m["ours"], 3, 104, 0);
    for p in ["vcpu", "collect"] {
        assert!(m["ratio"][p].as_f64().is_some_and(|x| x > 0.0), "{p}: {m}");
    }
    assert!(m["ratio"]["clear"].is_null(), "bitmap has no clear phase");
    let svg = std::fs::read_to_string(&plot).expect("the plot was written");
    let _ = std::fs::remove_file(&plot);
    assert!(
        svg.contains("<svg") && svg.contains("bitmap ours collect"),
        "plot"
    );
}

#[test]
fn test_bench_dirty_every_mode_ours_and_raw_collect_exactly_what_the_guest_wrote() {
    if !kvm_or_skip("bench dirty every mode") {
        return;
    }
    let out = vmm(&[
        "bench",
        "dirty",
        "--modes",
        "bitmap,manual,ring",
        "--size",
        "4M",
        "--vcpus",
        "2",
        "--slots",
        "3",
        "--write-percent",
        "10",
        "--iterations",
        "3",
        "--enable-scan",
        "2M,8M",
        "--json",
    ]);
    // The bench itself fails (exit 1, "lost") if any collect misses a page
    // the guest wrote; here every mode ran for both implementations.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let r = report(&out);
    let wrote = r["pages_written"].as_u64().unwrap();
    // 2 vCPUs x 1,024 pages, every 10th: 103 each.
    assert_eq!(wrote, 206);
    let modes: Vec<&str> = r["modes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mode"].as_str().unwrap())
        .collect();
    assert_eq!(modes, ["bitmap", "manual", "ring"]);
    for m in r["modes"].as_array().unwrap() {
        let manual = m["mode"] == "manual";
        // Initially-set: the first manual collect reports every page of
        // the area; after it, exactly the pages written.
        let exact_from = usize::from(manual);
        for who in ["raw", "ours"] {
            check_run(&m[who], 3, wrote, exact_from);
            if manual {
                assert_eq!(m[who]["iterations"][0]["pages"], 2048, "{who}: {m}");
            }
        }
        // The manager's report re-protects what it returns: no clear
        // phase of its own in any mode.
        assert_eq!(m["ours"]["clear_in_collect"], true, "{m}");
        assert!(m["ours"]["iterations"]
            .as_array()
            .unwrap()
            .iter()
            .all(|it| it["clear_ns"] == 0));
        assert!(
            m["ratio"]["collect_and_clear"]
                .as_f64()
                .is_some_and(|x| x > 0.0),
            "{m}"
        );
        assert!(m["ratio"]["vcpu"].as_f64().is_some_and(|x| x > 0.0), "{m}");
        assert!(m["ratio"]["clear"].is_null(), "{m}");
        if m["mode"] == "bitmap" {
            assert!(m["ratio"]["collect"].as_f64().is_some(), "{m}");
        } else {
            // Raw clears separately: its collect alone is not ours'
            // counterpart, and the report says why.
            assert!(
                m["raw"]["iterations"][1]["clear_ns"]
                    .as_u64()
                    .is_some_and(|n| n > 0),
                "{m}"
            );
            assert!(m["ratio"]["collect"].is_null(), "{m}");
            assert!(
                m["ratio"]["note"]
                    .as_str()
                    .is_some_and(|n| n.contains("ours clears inside collect")),
                "{m}"
            );
        }
    }
    let scan = r["enable_scan"].as_array().unwrap();
    assert_eq!(scan.len(), 12, "2 sizes x 3 modes x ours, raw: {scan:?}");
    assert!(scan
        .iter()
        .all(|p| p["enable_ms"].as_f64().is_some_and(|x| x > 0.0)));
}

#[test]
fn test_bench_dirty_bad_flags_exit_2_fast_and_leave_no_plot() {
    let plot = std::env::temp_dir().join(format!("bench-dirty-bad-{}.svg", std::process::id()));
    for (args, needle) in [
        (&["--write-percent", "0"][..], "--write-percent 0"),
        (&["--size", "3K"][..], "--size"),
        (&["--modes", "nonesuch"][..], "nonesuch"),
        (
            &["--backing", "thp", "--size", "2M", "--slots", "2"][..],
            "--slots 2",
        ),
        (&["--iterations", "1"][..], "--iterations"),
        (
            &["--plot", "/nonexistent/dir/x.svg"][..],
            "/nonexistent/dir/x.svg",
        ),
    ] {
        let t = Instant::now();
        let mut all = vec!["bench", "dirty"];
        all.extend_from_slice(args);
        let out = vmm(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(t.elapsed().as_secs() < 5, "{args:?} took {:?}", t.elapsed());
    }
    let out = vmm(&[
        "bench",
        "dirty",
        "--write-percent",
        "0",
        "--plot",
        plot.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(!plot.exists(), "a refused run leaves no plot behind");
    if kvm_or_skip("bench dirty ring too small") {
        // 1 GiB at 100%: 262,144 pages per iteration cannot fit a ring.
        let out = vmm(&[
            "bench",
            "dirty",
            "--modes",
            "ring",
            "--size",
            "1G",
            "--write-percent",
            "100",
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("dirty ring"), "{err}");
    }
}
