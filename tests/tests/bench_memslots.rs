//! `vmm bench memslots` on real KVM: a smoke run at a small slot count
//! through the CLI (the JSON has every test with sane figures), the stress
//! mode, and bad flags refused fast with exit 2. No timing assertion: speed
//! lives in scripts/bench-memslots.sh.

use std::process::Output;
use std::time::Instant;

use serde_json::Value;
use vmm_tests::kvm_or_skip;

use super::common::vmm;

fn json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is the JSON report")
}

fn positive(v: &Value, what: &str) -> f64 {
    let x = v
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {v}"));
    assert!(x.is_finite() && x > 0.0, "{what} = {x}");
    x
}

#[test]
fn test_bench_memslots_smoke_reports_every_test_for_ours_and_raw() {
    if !kvm_or_skip("bench memslots smoke") {
        return;
    }
    let out = vmm(&[
        "bench", "memslots", "--slots", "40", "--time", "20ms", "--rounds", "2", "--json",
    ]);
    let report = json(&out);
    assert_eq!(
        report["kvm_max_slots"].as_u64().map(|n| n >= 40),
        Some(true)
    );
    let tests = report["tests"].as_array().expect("tests");
    let names: Vec<&str> = tests.iter().filter_map(|t| t["test"].as_str()).collect();
    assert_eq!(
        names,
        [
            "map",
            "unmap",
            "unmap-chunked",
            "move-active",
            "move-inactive",
            "rw"
        ]
    );
    for t in tests {
        let name = t["test"].as_str().unwrap_or("?");
        assert_eq!(t["slots"], 40, "{name}");
        assert_eq!(t["area_slots"], 37, "{name}");
        for imp in ["ours", "raw"] {
            let f = &t[imp];
            assert!(
                f["iterations"].as_u64().is_some_and(|n| n >= 4),
                "{name} {imp}: {f}"
            );
            let p50 = positive(&f["median_us"], "median_us");
            assert!(positive(&f["p90_us"], "p90_us") >= p50, "{name} {imp}");
            positive(&f["populate_ms"], "populate_ms");
        }
        let ratio = positive(&t["ratio"], "ratio");
        let expect =
            t["ours"]["median_us"].as_f64().unwrap() / t["raw"]["median_us"].as_f64().unwrap();
        assert!(
            (ratio - expect).abs() < 1e-9,
            "{name}: ratio {ratio} vs {expect}"
        );
        assert_eq!(t["goal_met"].as_bool(), Some(ratio <= 1.2), "{name}");
    }
    assert_eq!(tests[3]["anchor"]["per_iteration_us"], 78.6);
}

#[test]
fn test_bench_memslots_skips_map_where_kvm_would() {
    if !kvm_or_skip("bench memslots skip") {
        return;
    }
    // 32 MiB has 8,192 pages: at 8,200 memslots an area slot would be empty.
    let out = vmm(&[
        "bench", "memslots", "--slots", "8200", "--tests", "map", "--json",
    ]);
    let report = json(&out);
    let t = &report["tests"][0];
    assert!(
        t["skipped"].as_str().is_some_and(|s| s.contains("KVM")),
        "{t}"
    );
    assert!(t["ours"].is_null() && t["ratio"].is_null());
}

#[test]
fn test_bench_memslots_stress_reports_slowdowns() {
    if !kvm_or_skip("bench memslots stress") {
        return;
    }
    let out = vmm(&[
        "bench",
        "memslots",
        "--stress",
        "--stress-size",
        "2M",
        "--time",
        "150ms",
        "--json",
    ]);
    let report = json(&out);
    let stress = report["stress"].as_array().expect("stress");
    assert_eq!(stress.len(), 2);
    for (s, imp) in stress.iter().zip(["ours", "raw"]) {
        assert_eq!(s["implementation"], imp);
        let quiet = positive(&s["quiet_passes_per_s"], "quiet");
        let churn = positive(&s["churn_passes_per_s"], "churn");
        positive(&s["pairs_per_s"], "pairs");
        assert!((positive(&s["slowdown"], "slowdown") - quiet / churn).abs() < 1e-6);
    }
}

#[test]
fn test_bench_memslots_bad_flags_exit_2_fast() {
    for (args, needle) in [
        (&["--slots", "4"][..], "--slots 4"),
        (&["--tests", "nonesuch"][..], "nonesuch"),
        (&["--stress", "--stress-size", "100"][..], "--stress-size"),
    ] {
        let t = Instant::now();
        let mut all = vec!["bench", "memslots"];
        all.extend_from_slice(args);
        let out = vmm(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(t.elapsed().as_secs() < 5, "{args:?} took {:?}", t.elapsed());
    }
    // Above KVM_CAP_NR_MEMSLOTS: known only with KVM, still before any VM.
    if kvm_or_skip("bench memslots slot limit") {
        let out = vmm(&["bench", "memslots", "--slots", "100000"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains("--slots 100000") && err.contains("KVM_CAP_NR_MEMSLOTS"),
            "{err}"
        );
    }
}
