//! The two binaries as a user runs them: `vmm` hands `vmm bench` and
//! `vmm fuzz` to `vmm-harness` beside it, and carries none of the harness's
//! code itself (launch cost).

use std::path::Path;
use std::process::Command;

const VMM: &str = env!("CARGO_BIN_EXE_vmm");

fn run(bin: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin).args(args).output().expect("start");
    (
        out.status.code().expect("exited"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn test_launcher_hands_fuzz_to_the_harness_which_runs_it() {
    // The simulated backend: no /dev/kvm needed.
    let (status, stdout, stderr) = run(
        VMM,
        &["fuzz", "--backend", "sim", "--steps", "200", "--seed", "5"],
    );
    assert_eq!(status, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("seed 5") && stdout.contains("0 finding"),
        "{stdout}"
    );
}

#[test]
fn test_launcher_passes_bad_harness_flags_to_the_harness_which_refuses_them() {
    let (status, _, stderr) = run(VMM, &["bench", "faults", "--bogus"]);
    assert_eq!(status, 2, "{stderr}");
    assert!(stderr.contains("'--bogus'"), "{stderr}");
    assert!(stderr.contains("Usage: vmm bench faults"), "{stderr}");
    let (status, stdout, _) = run(VMM, &["bench", "memslots", "--help"]);
    assert_eq!(status, 0);
    assert!(stdout.starts_with("Memslot ops"), "{stdout}");
}

#[test]
fn test_launcher_without_its_harness_names_the_missing_binary() {
    let dir = std::env::temp_dir().join(format!("vmm-launcher-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let lonely = dir.join("vmm");
    std::fs::copy(VMM, &lonely).unwrap();
    let (status, _, stderr) = run(lonely.to_str().unwrap(), &["bench", "faults"]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(status, 2, "{stderr}");
    let expected = dir.join("vmm-harness");
    assert!(stderr.contains(&expected.display().to_string()), "{stderr}");
    assert!(stderr.contains("No such file"), "{stderr}");
}

#[test]
fn test_launcher_binary_carries_no_harness_code() {
    // Help texts of the benchmarks and the fuzzer are in the harness only:
    // if any subcommand's code were linked into the launcher, its clap
    // definitions (and these strings) would be too.
    let launcher = std::fs::read(VMM).unwrap();
    let harness = std::fs::read(Path::new(VMM).with_file_name("vmm-harness")).unwrap();
    let contains =
        |hay: &[u8], needle: &str| hay.windows(needle.len()).any(|w| w == needle.as_bytes());
    for needle in [
        "memslot_perf_test",
        "dirty_log_perf_test",
        "uffd-per-vcpu",
        "fail-every",
    ] {
        assert!(
            !contains(&launcher, needle),
            "the launcher links {needle:?}"
        );
    }
    for needle in ["memslot_perf_test", "fail-every"] {
        assert!(contains(&harness, needle), "the harness lacks {needle:?}");
    }
    assert!(contains(&launcher, "Launch a test guest"));
}
