//! `vmm fuzz` as a user runs it: a clean campaign on real KVM (also with
//! thousands of prefilled slots) and on the simulated tier (also with failing
//! ioctls and a guard reader) exits 0 with a JSON report; bad flags exit 2; a
//! replayed reproducer of a planted failure exits 1; a libFuzzer input
//! converts to a scenario that real KVM runs.

use std::process::Output;

use vmm_tests::kvm_or_skip;

use super::common::vmm;

fn report(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "JSON on stdout: {e}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn out_dir(name: &str) -> String {
    let dir = std::env::temp_dir().join(format!("vmm-fuzz-test-{name}-{}", std::process::id()));
    dir.display().to_string()
}

#[test]
fn test_fuzz_real_kvm_200_steps_is_clean() {
    if !kvm_or_skip("test_fuzz_real_kvm_200_steps_is_clean") {
        return;
    }
    let dir = out_dir("real");
    let out = vmm(&[
        "fuzz", "--steps", "200", "--seed", "1", "--json", "--out", &dir,
    ]);
    let r = report(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(r["seed"], 1);
    assert!(r["steps"].as_u64().unwrap() >= 200, "{r}");
    assert!(r["steps_per_sec"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["findings"].as_array().unwrap().is_empty(), "{r}");
    assert!(r["ops"]["plug"].as_u64().unwrap() > 0, "{r}");
}

#[test]
fn test_fuzz_sim_tier_is_clean_and_fast() {
    let dir = out_dir("sim");
    let out = vmm(&[
        "fuzz",
        "--backend",
        "sim",
        "--steps",
        "2000",
        "--seed",
        "1",
        "--json",
        "--out",
        &dir,
    ]);
    let r = report(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(r["backend"], "sim");
    assert_eq!(r["steps"], 2000);
    assert!(r["steps_per_sec"].as_f64().unwrap() > 0.0, "{r}");
}

#[test]
fn test_fuzz_bad_flags_exit_2() {
    for args in [
        &["fuzz", "--steps", "10", "--time", "1s"][..],
        &["fuzz", "--backend", "qemu"],
        &["fuzz", "--weights", "plug=x"],
        &["fuzz", "--backend", "sim", "--arena-base", "0x1000"],
        &["fuzz", "--fail-every", "5"],
        &["fuzz", "--guard-reader"],
        &["fuzz", "--backend", "sim", "--prefill", "40000"],
        &["fuzz", "--convert", "/nonexistent/input"],
        &["fuzz", "--max-slots", "12", "--steps", "5"],
        &["fuzz", "--seeds", "5..3"],
        &[
            "fuzz",
            "--weights",
            "plug=0,unplug=0,protect=0,move=0,resize=0,dirty=0,plug-many=0,pins=0,guest=0,dma=0",
        ],
        &["fuzz", "--seeds", "1..2", "--seed", "3"],
        &[
            "fuzz",
            "--backend",
            "sim",
            "--replay",
            "x.toml",
            "--steps",
            "10",
        ],
    ] {
        let out = vmm(args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn test_fuzz_arena_in_hex_below_ram_is_refused_for_its_place() {
    let out = vmm(&["fuzz", "--backend", "sim", "--arena-base", "0x1000"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("must be multiples of 2 MiB"), "{err}");
    let out = vmm(&["fuzz", "--backend", "sim", "--arena-base", "0x200000"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("must lie above guest RAM"), "{err}");
}

#[test]
fn test_fuzz_seed_range_runs_every_seed_and_reports_each() {
    let dir = out_dir("seeds");
    let out = vmm(&[
        "fuzz",
        "--backend",
        "sim",
        "--seeds",
        "7..9",
        "--steps",
        "100",
        "--json",
        "--out",
        &dir,
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reports: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let reports = reports.as_array().expect("an array, one report per seed");
    let seeds: Vec<u64> = reports
        .iter()
        .map(|r| r["seed"].as_u64().unwrap())
        .collect();
    assert_eq!(seeds, [7, 8, 9]);
    for r in reports {
        assert!(r["steps"].as_u64().unwrap() >= 100, "{r}");
        assert_eq!(r["dirty_log"], "bitmap", "{r}");
        assert_eq!(r["arena"][0].as_u64(), Some(4 << 30), "{r}");
    }
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("seeds 7..9:") && log.contains("0 with findings"),
        "{log}"
    );
}

#[test]
fn test_fuzz_replay_of_a_failing_timeline_exits_1() {
    let dir = out_dir("replay");
    std::fs::create_dir_all(&dir).unwrap();
    let file = format!("{dir}/wrong.toml");
    // Plugging the same range twice: the second is refused (`overlap`). The
    // sim replay judges by the model, which predicts that: clean (0).
    std::fs::write(
        &file,
        "[[step]]\ndo = \"plug\"\ngpa = \"4G\"\nsize = \"2M\"\n\n[[step]]\ndo = \"plug\"\ngpa = \"4G\"\nsize = \"2M\"\nexpect = \"overlap\"\n",
    )
    .unwrap();
    let out = vmm(&["fuzz", "--backend", "sim", "--replay", &file]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The real replay judges by the file: without `expect`, the second plug
    // must be ok, and it is not (1).
    if kvm_or_skip("test_fuzz_replay_of_a_failing_timeline_exits_1") {
        std::fs::write(
            &file,
            "[[step]]\ndo = \"plug\"\ngpa = \"4G\"\nsize = \"2M\"\n\n[[step]]\ndo = \"plug\"\ngpa = \"4G\"\nsize = \"2M\"\n",
        )
        .unwrap();
        let out = vmm(&["fuzz", "--replay", &file]);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

#[test]
fn test_fuzz_sim_tier_with_failing_ioctls_and_a_guard_reader_is_clean() {
    let dir = out_dir("sim-faults");
    let out = vmm(&[
        "fuzz",
        "--backend",
        "sim",
        "--steps",
        "600",
        "--seed",
        "3",
        "--fail-every",
        "5",
        "--guard-reader",
        "--json",
        "--out",
        &dir,
    ]);
    let r = report(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(r["steps"], 600);
    assert!(r["findings"].as_array().unwrap().is_empty(), "{r}");
}

#[test]
fn test_fuzz_real_kvm_with_prefilled_slots_is_clean() {
    if !kvm_or_skip("test_fuzz_real_kvm_with_prefilled_slots_is_clean") {
        return;
    }
    let dir = out_dir("prefill");
    let out = vmm(&[
        "fuzz",
        "--steps",
        "150",
        "--seed",
        "4",
        "--prefill",
        "2000",
        "--json",
        "--out",
        &dir,
    ]);
    let r = report(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(r["findings"].as_array().unwrap().is_empty(), "{r}");
    assert!(r["ops"]["plug-many"].as_u64().unwrap() >= 1, "{r}");
}

#[test]
fn test_fuzz_converts_a_corpus_input_into_a_scenario_real_kvm_runs() {
    if !kvm_or_skip("test_fuzz_converts_a_corpus_input_into_a_scenario_real_kvm_runs") {
        return;
    }
    let corpus = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus/memslots");
    // The biggest input of the corpus.
    let input = std::fs::read_dir(corpus)
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let out = vmm(&["fuzz", "--convert", input.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = out_dir("convert");
    std::fs::create_dir_all(&dir).unwrap();
    let file = format!("{dir}/input.toml");
    std::fs::write(&file, &out.stdout).unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("[[step]]"));
    let run = vmm(&["run", "--scenario", &file]);
    assert_eq!(
        run.status.code(),
        Some(0),
        "{}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
