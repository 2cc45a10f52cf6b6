//! The `vmm` command line as a user runs it: exit status, one-line errors,
//! JSON, help, bad input rejected before any VM is created, and signals.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use vmm_tests::kvm_or_skip;

use super::common::vmm;

/// Runs `vmm`, killing it (and failing) if it runs past `limit`.
fn vmm_within(args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmm-cli"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the vmm binary runs");
    let started = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?} still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("output")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn test_cli_bad_input_is_rejected_naming_flag_and_form() {
    // Each must fail at parse time (status 2, clap's usage error), i.e. before
    // any VM is created, and say which flag and what it accepts.
    let cases: [(&[&str], &str, &str); 6] = [
        (&["run", "--mem", "0"], "--mem", "greater than zero"),
        (&["run", "--mem", "3x"], "--mem", "256M"),
        (&["run", "--vcpus", "0"], "--vcpus", "1..=64"),
        (&["run", "--vcpus", "100000"], "--vcpus", "1..=64"),
        (
            &["run", "--guest", "/no/such/guest.elf"],
            "--guest",
            "not a built-in guest",
        ),
        (
            &["run", "--backing", "swap"],
            "--backing",
            "anon, shared, memfd",
        ),
    ];
    for (args, flag, form) in cases {
        let out = vmm(args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(flag) && err.contains(form), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}: nothing on stdout");
    }
}

#[test]
fn test_cli_bad_files_and_huge_values_are_refused_fast_and_leave_nothing() {
    let dir = std::env::temp_dir().join(format!("vmm-cli-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sparse = dir.join("sparse.elf");
    std::fs::File::create(&sparse)
        .unwrap()
        .set_len(20 << 30)
        .unwrap();
    let fifo = dir.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let missing = dir.join("missing.img");
    let (sparse, fifo) = (sparse.to_str().unwrap(), fifo.to_str().unwrap());
    let backing = format!("file={}", missing.display());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["run", "--guest", "/dev/zero"], "not a regular file"),
        (vec!["run", "--guest", fifo], "not a regular file"),
        (
            vec!["run", "--guest", sparse],
            "larger than the 4194304-byte limit",
        ),
        (vec!["run", "--backing", &backing], "cannot be used"),
        (
            vec!["run", "--backing", "file=/dev/null"],
            "not a regular file",
        ),
        (vec!["run", "--pin-limit", "16777216T"], "too large"),
        (vec!["run", "--timeout", "1000000000s"], "too large"),
        (vec!["run", "--mem", "18446744073709551615"], "too large"),
    ];
    for (args, problem) in cases {
        let out = vmm_within(&args, Duration::from_secs(5));
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        let first = err.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        assert!(err.contains(problem), "{args:?}: {err}");
        assert!(
            first.contains("error") || first.starts_with("vmm:"),
            "{args:?}: {first}"
        );
    }
    assert!(!missing.exists(), "--backing created the file");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn test_cli_help_describes_every_flag() {
    let out = vmm(&["run", "--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--mem",
        "--vcpus",
        "--backing",
        "--guest",
        "--timeout",
        "--json",
        "--verbose",
        "--quiet",
    ] {
        assert!(text.contains(flag), "{flag} missing from:\n{text}");
    }
    let top = vmm(&["--help"]);
    assert!(String::from_utf8_lossy(&top.stdout).contains("run"));
}

#[test]
fn test_cli_json_report_on_success() {
    if !kvm_or_skip("cli json") {
        return;
    }
    let out = vmm(&[
        "run", "--guest", "hello", "--mem", "2M", "--vcpus", "2", "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("stdout is only JSON");
    assert_eq!(report["outcome"], "ok");
    assert_eq!(report["vcpus"].as_array().unwrap().len(), 2);
    for key in ["setup_ms", "run_ms", "teardown_ms"] {
        assert!(report["timings"][key].as_f64().unwrap() > 0.0, "{key}");
    }
    assert!(report["kvm_stats"]["vcpu"]["pf_fixed"].as_u64().is_some());
    assert!(report["kvm_stats"]["vm"]["pages_4k"].as_u64().is_some());
    assert!(report["exits"]["mmio_doorbell"].as_u64().unwrap() >= 6);
    assert!(
        stderr(&out).contains("hello from vCPU 1"),
        "console goes to stderr with --json"
    );
}

#[test]
fn test_cli_guest_failure_exits_nonzero_with_one_line_reason() {
    if !kvm_or_skip("cli failure") {
        return;
    }
    let out = vmm(&["run", "--guest", "bad-insn", "--mem", "2M", "-q"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.starts_with("vmm: vCPU ") && err.contains(": guest exception #UD (vector 6"),
        "{err}"
    );
}

#[test]
fn test_cli_sigint_stops_guest_cleanly_with_report() {
    if !kvm_or_skip("cli sigint") {
        return;
    }
    // One vCPU runs on the main thread (stopped by the signal's action),
    // two on threads under the event loop.
    for vcpus in ["1", "2"] {
        sigint_stops_guest_cleanly_with_report(vcpus);
    }
}

fn sigint_stops_guest_cleanly_with_report(vcpus: &str) {
    let child = Command::new(env!("CARGO_BIN_EXE_vmm-cli"))
        .args([
            "run",
            "--guest",
            "spin",
            "--mem",
            "2M",
            "--vcpus",
            vcpus,
            "--timeout",
            "60s",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill(2) on our own live child; no memory is involved.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let started = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(1), "{vcpus}: {}", stderr(&out));
    assert!(
        stderr(&out).contains("interrupted by SIGINT"),
        "{vcpus}: {}",
        stderr(&out)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("a report after SIGINT");
    assert_eq!(report["outcome"], "failed");
    assert_eq!(report["vcpus"].as_array().map(Vec::len), vcpus.parse().ok());
}

#[test]
fn test_cli_sigint_then_sigterm_reports_the_first_signal() {
    if !kvm_or_skip("cli sigint then sigterm") {
        return;
    }
    for vcpus in ["1", "2"] {
        let child = Command::new(env!("CARGO_BIN_EXE_vmm-cli"))
            .args(["run", "--guest", "spin", "--mem", "2M", "--timeout", "60s"])
            .args(["--vcpus", vcpus])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        for signal in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: kill(2) on our own live child; no memory is involved.
            unsafe { libc::kill(child.id() as i32, signal) };
        }
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{vcpus}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("interrupted by SIGINT"),
            "{vcpus}: {}",
            stderr(&out)
        );
    }
}
