//! Scenario files on real KVM: every shipped example passes (they exercise
//! each memory op on a running guest, with the KVM consistency check after
//! every op), a failed expectation fails the run naming the step, and a bad
//! file is rejected before any VM is created.

use std::path::PathBuf;
use std::process::Command;

use vmm_tests::{config, kvm_or_skip, run};

fn scenario_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scenarios")
}

fn run_scenario_text(text: &str) -> vmm::run::RunReport {
    let scenario = vmm::scenario::Scenario::parse(text).expect("valid scenario");
    let cfg = vmm::run::RunConfig {
        scenario: Some(std::sync::Arc::new(scenario)),
        ..config("default", 16 << 20, 1)
    };
    run(&cfg).0
}

#[test]
fn test_every_shipped_scenario_passes() {
    if !kvm_or_skip("shipped scenarios") {
        return;
    }
    // The examples, and the fuzzer's shrunk reproducers of fixed bugs.
    let mut files: Vec<_> = [scenario_dir(), scenario_dir().join("regressions")]
        .iter()
        .flat_map(|dir| std::fs::read_dir(dir).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "{files:?}");
    for path in files {
        let scenario = vmm::cli::parse_scenario(path.to_str().unwrap()).unwrap();
        let cfg = vmm::run::RunConfig {
            mem_size: scenario.mem.map_or(16 << 20, |n| n.0),
            vcpus: scenario.vcpus.unwrap_or(1),
            scenario: Some(scenario.clone()),
            // As `vmm run --scenario` does: the file's timeout, else the
            // CLI's default. A 30 s bound failed max-slots.toml under a
            // loaded host: its 32,762 memslot deletes each wait for KVM's
            // SRCU grace period (6 s alone in release, 12 s in debug).
            timeout: scenario
                .timeout
                .as_ref()
                .map_or(vmm::cli::DEFAULT_TIMEOUT, |t| t.duration()),
            ..config("default", 16 << 20, 1)
        };
        let (report, console) = run(&cfg);
        assert!(
            report.succeeded(),
            "{}: {:?}\n{console}",
            path.display(),
            report.error
        );
        let s = report.scenario.expect("a scenario report");
        assert!(s.passed && s.not_run == 0);
        assert_eq!(s.steps.len(), scenario.steps.len());
        assert!(s.steps.iter().all(|st| st.passed));
    }
}

#[test]
fn test_failed_expectation_fails_run_naming_step() {
    if !kvm_or_skip("failed expectation") {
        return;
    }
    let report = run_scenario_text(
        r#"
        [[step]]
        do = "plug"
        gpa = "0x1_0000_0000"
        size = "2M"
        [[step]]
        do = "read"
        gpa = "0x1_0000_0000"
        expect = "unplugged"
        [[step]]
        do = "check"
        "#,
    );
    let err = report.error.expect("step 2 fails");
    assert!(
        err.contains("step 2") && err.contains("expected unplugged, got ok"),
        "{err}"
    );
    let s = report.scenario.unwrap();
    assert_eq!(
        (s.steps.len(), s.not_run),
        (2, 1),
        "stops at the first failed step"
    );
    assert!(s.steps[0].passed && !s.steps[1].passed);
}

#[test]
fn test_unplug_during_verify_is_reported_as_unplugged_access() {
    if !kvm_or_skip("unplugged access report") {
        return;
    }
    // Without expecting it, an access to unplugged memory fails the run with
    // the address in the message.
    let report = run_scenario_text(
        r#"
        [[step]]
        do = "read"
        gpa = "0x2_0000_0008"
        "#,
    );
    let err = report.error.unwrap();
    assert!(
        err.contains("unplugged guest-physical address 0x200000008"),
        "{err}"
    );
}

#[test]
fn test_scenario_json_lists_each_step() {
    if !kvm_or_skip("scenario json") {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_vmm-cli"))
        .args(["run", "--json", "--scenario"])
        .arg(scenario_dir().join("delete-in-use.toml"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let steps = json["scenario"]["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 10);
    assert_eq!(steps[5]["kind"], "read");
    assert_eq!(steps[5]["expect"], "unplugged");
    assert!(steps[5]["actual"]
        .as_str()
        .unwrap()
        .starts_with("unplugged"));
    assert!(steps.iter().all(|s| s["passed"] == true));
}

#[test]
fn test_bad_scenario_file_rejected_before_vm() {
    let dir = std::env::temp_dir().join(format!("vmm-bad-scenario-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        ("[[step]]\ndo = \"plug\"\ngpa = 4096\n", "needs `size`"),
        (
            "[[step]]\ndo = \"teleport\"\n",
            "unknown step kind \"teleport\"",
        ),
        (
            "[[step]]\ndo = \"plug\"\ngpa = 4096\nsize = 4096\ncolour = 1\n",
            "unknown field `colour`",
        ),
        ("vcpus = 0\n[[step]]\ndo = \"check\"\n", "`vcpus`"),
        ("name = \"empty\"\n", "no [[step]]"),
        (
            "[[step]]\ndo = \"read\"\ngpa = 0\nasync = true\n[[step]]\ndo = \"read\"\ngpa = 0\n",
            "add a `wait` step",
        ),
        (
            "[[step]]\ndo = \"read\"\ngpa = 0\nasync = true\n",
            "never collected",
        ),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let path = dir.join(format!("bad{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_vmm-cli"))
            .args(["run", "--scenario"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {err}");
        assert!(
            err.contains("--scenario") && err.contains(want),
            "{text}: {err}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

// Regressions found in review (see the commit that fixed them).

#[test]
fn test_regression_page_crossing_unplugged_access_resets_cleanly() {
    if !kvm_or_skip("page-crossing unplugged access") {
        return;
    }
    // An 8-byte read across a page boundary exits in two MMIO fragments; the
    // reset must complete both, or the guest resumes inside the old command.
    let report = run_scenario_text(
        r#"
        [[step]]
        do = "read"
        gpa = "0x2_0000_0ffc"
        expect = "unplugged"
        [[step]]
        do = "write"
        gpa = "0x2_0000_1ffc"
        value = 7
        expect = "unplugged"
        [[step]]
        do = "read"
        gpa = "0x4000_0000"
        value = 0
        "#,
    );
    assert!(report.succeeded(), "{:?}", report.error);
}

#[test]
fn test_regression_register_page_cannot_be_plugged() {
    if !kvm_or_skip("register page reserved") {
        return;
    }
    let report = run_scenario_text(
        r#"
        [[step]]
        do = "plug"
        gpa = "0x3000_0000"
        size = "4K"
        expect = "reserved"
        [[step]]
        do = "read"
        gpa = "0x4000_0000"
        "#,
    );
    assert!(report.succeeded(), "{:?}", report.error);
}

#[test]
fn test_regression_sleep_step_honours_timeout() {
    if !kvm_or_skip("sleep vs timeout") {
        return;
    }
    let scenario =
        vmm::scenario::Scenario::parse("[[step]]\ndo = \"sleep\"\nduration = \"60s\"\n").unwrap();
    let cfg = vmm::run::RunConfig {
        scenario: Some(std::sync::Arc::new(scenario)),
        timeout: std::time::Duration::from_millis(300),
        ..config("default", 16 << 20, 1)
    };
    let started = std::time::Instant::now();
    let (report, _) = run(&cfg);
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert!(report.error.unwrap().contains("timeout"));
}

#[test]
fn test_bad_scenario_files_exit_2_naming_place_step_and_field() {
    let dir = std::env::temp_dir().join(format!("vmm-bad-scenario-at-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let plug = "[[step]]\ndo = \"plug\"\ngpa = \"0x1_0000_0000\"\nsize = \"2M\"\n";
    let cases = [
        (
            format!("{plug}[[step]]\ndo = \"unplug\"\ngpa = 0\nsize = 4096\naccess = \"ro\"\n"),
            ":9:1: step 2 (unplug): `access`",
        ),
        (
            format!("{plug}repeat = 2\n"),
            ":5:1: step 1 (plug): `repeat`",
        ),
        (
            format!("{plug}expect = \"sideways\"\n"),
            ":5:10: step 1 (plug): `expect`",
        ),
        (
            "vcpus = 1\n[[step]]\ndo = \"read\"\ngpa = 0\nvcpu = 1\n".to_string(),
            ":5:1: step 1 (read): `vcpu`",
        ),
        (
            "[[step]]\ndo = \"verify\"\ngpa = \"0xffff_ffff_ffff_fff8\"\nsize = 16\nseed = 1\n"
                .to_string(),
            ":4:1: step 1 (verify): `size`",
        ),
        (
            "[[step]]\ndo = \"spin\"\niterations = 1\nrepeat = 1000000000000\n".to_string(),
            ":4:1: step 1 (spin): `repeat`",
        ),
        (
            "timeout = \"soon\"\n[[step]]\ndo = \"check\"\n".to_string(),
            ":1:11: `timeout`",
        ),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let path = dir.join(format!("bad{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let started = std::time::Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_vmm-cli"))
            .args(["run", "--scenario"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err.lines().next().unwrap_or_default();
        assert_eq!(out.status.code(), Some(2), "{text}: {err}");
        assert!(
            first.contains(&format!("{}{want}", path.display())),
            "{text}: {first}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }
    // Not regular files: refused without reading them.
    let fifo = dir.join("fifo.toml");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo on a NUL-terminated path we own.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for path in [PathBuf::from("/dev/zero"), fifo] {
        let started = std::time::Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_vmm-cli"))
            .args(["run", "--scenario"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err.lines().next().unwrap_or_default();
        assert_eq!(out.status.code(), Some(2), "{}: {err}", path.display());
        assert!(
            first.contains("not a regular file") && first.contains("1048576 bytes"),
            "{first}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn test_scenario_header_timeout_applies_without_the_flag() {
    if !kvm_or_skip("scenario header timeout") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("vmm-scenario-timeout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("sleepy.toml");
    std::fs::write(
        &path,
        "timeout = \"300ms\"\nmem = \"16M\"\nvcpus = 1\n[[step]]\ndo = \"sleep\"\nduration = \"60s\"\n",
    )
    .unwrap();
    let started = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_vmm-cli"))
        .args(["run", "-q", "--scenario"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("timeout"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn test_scenario_pin_limit_header_sets_the_limit_the_flag_would() {
    if !kvm_or_skip("scenario pin_limit header") {
        return;
    }
    // 12 MiB pinned: 3,072 pages. The header's 4,096 pages allow it; a
    // 2,048-page limit (the flag, or this host's RLIMIT_MEMLOCK of 8 MiB)
    // refuses it. A fuzzer reproducer carries its limit this way.
    let steps = "[[step]]\ndo = \"plug\"\ngpa = \"0x1_0000_0000\"\nsize = \"16M\"\n\n\
                 [[step]]\ndo = \"pin\"\nname = \"p\"\ngpa = \"0x1_0000_0000\"\nsize = \"12M\"\nrevocable = false\n";
    let dir = std::env::temp_dir().join(format!("vmm-pin-limit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let with = dir.join("with.toml");
    let without = dir.join("without.toml");
    std::fs::write(
        &with,
        format!("mem = \"16M\"\npin_limit = \"4096p\"\n\n{steps}"),
    )
    .unwrap();
    std::fs::write(&without, format!("mem = \"16M\"\n\n{steps}")).unwrap();
    let status = |file: &std::path::Path, extra: &[&str]| {
        let mut args = vec!["run", "--scenario", file.to_str().unwrap(), "-q"];
        args.extend_from_slice(extra);
        let out = super::common::vmm(&args);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = status(&with, &["--pin-limit", "2048p"]);
    assert_eq!(ok, Some(0), "the header overrides the flag: {err}");
    let (refused, err) = status(&without, &["--pin-limit", "2048p"]);
    assert_eq!(refused, Some(1), "{err}");
    assert!(err.contains("pin-limit"), "{err}");
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, format!("pin_limit = \"lots\"\n\n{steps}")).unwrap();
    let (code, err) = status(&bad, &[]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("pin_limit"), "{err}");
}

/// KVM's default VM zaps every translation when any memslot is deleted or
/// moved (the `KVM_X86_QUIRK_SLOT_ZAP_ALL` quirk). The manager turns that off,
/// so unplugging and moving a slot the guest never touched leaves the
/// guest's own translations alone; with `--memslot-zap all` the same
/// timeline zaps shadow pages on every such change.
#[test]
fn test_memslot_changes_zap_only_their_slot_unless_asked_for_all() {
    if !kvm_or_skip("memslot zap policy") {
        return;
    }
    let text = r#"
[[step]]
do = "fill"
gpa = "0x4000_0000"
size = "1M"
seed = 3

[[step]]
do = "plug"
gpa = "0x1_0000_0000"
size = "2M"

[[step]]
do = "move"
gpa = "0x1_0000_0000"
size = "2M"
to = "0x1_0040_0000"

[[step]]
do = "unplug"
gpa = "0x1_0040_0000"
size = "2M"

[[step]]
do = "verify"
gpa = "0x4000_0000"
size = "1M"
seed = 3
"#;
    let zapped = |zap: vmm::kvm::zap::MemslotZap| {
        let scenario = vmm::scenario::Scenario::parse(text).expect("valid scenario");
        let cfg = vmm::run::RunConfig {
            scenario: Some(std::sync::Arc::new(scenario)),
            memslot_zap: zap,
            ..config("default", 16 << 20, 1)
        };
        let (report, console) = run(&cfg);
        assert_eq!(report.outcome, "ok", "{console}");
        assert_eq!(report.memslot_zap, zap.name(), "{console}");
        report.kvm_stats.vm["mmu_shadow_zapped"]
    };
    assert_eq!(zapped(vmm::kvm::zap::MemslotZap::Slot), 0);
    assert!(zapped(vmm::kvm::zap::MemslotZap::All) > 0);
}
