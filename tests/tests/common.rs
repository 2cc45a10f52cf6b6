//! Helpers shared by the integration test files (one test binary).

use std::process::{Command, Output};

use vmm::bench::{run_faults, FaultsConfig, FaultsReport};

/// The `vmm` command line with `args`, run to completion.
pub fn vmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmm-cli"))
        .args(args)
        .output()
        .expect("the vmm binary runs")
}

/// Fault-latency tests run one at a time: they compare latencies, count one
/// VM's faults, or stall guest writes on purpose (churn), and would disturb
/// each other. Held by [`bench`] and by tests that run `vmm bench faults`.
pub static FAULTS_SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `run_faults` of `cfg` under [`FAULTS_SERIAL`], its table on stderr.
pub fn bench(cfg: &FaultsConfig) -> FaultsReport {
    let _serial = FAULTS_SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut sink = Vec::new();
    let report = run_faults(cfg, &mut sink).unwrap_or_else(|e| panic!("bench failed: {e}"));
    eprintln!("{}", String::from_utf8_lossy(&sink));
    report
}
