//! Shared harness for the integration tests, which run real guests on real
//! `/dev/kvm` (the KVM selftests model: one-line constructors, a report to
//! assert on).
//!
//! KVM tests call [`kvm_or_skip`] first. Without `/dev/kvm` they print why and
//! pass, unless `VMM_REQUIRE_KVM=1` (CI sets it): then they fail.

use std::io::Write;
use std::sync::{Arc, Mutex};

use vmm::run::{GuestSource, RunConfig, RunReport, Verbosity};

/// Whether KVM tests can run here; panics if they must (`VMM_REQUIRE_KVM=1`).
pub fn kvm_or_skip(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            let required = std::env::var("VMM_REQUIRE_KVM").is_ok_and(|v| v == "1");
            assert!(
                !required,
                "{test}: /dev/kvm is required (VMM_REQUIRE_KVM=1) but cannot be opened: {e}"
            );
            eprintln!("SKIP {test}: /dev/kvm unavailable ({e}); set VMM_REQUIRE_KVM=1 to make this a failure");
            false
        }
    }
}

/// A `Write` that keeps what the console printed.
#[derive(Clone, Default, Debug)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    /// Everything written so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("console buffer")).into_owned()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .expect("console buffer")
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A small default run: `mem` bytes, `vcpus` vCPUs, `guest`, 30 s timeout.
pub fn config(guest: &str, mem: u64, vcpus: u64) -> RunConfig {
    RunConfig {
        mem_size: mem,
        vcpus,
        guest: vmm::cli::parse_guest(guest).expect("a valid guest"),
        verbosity: Verbosity::Verbose,
        timeout: std::time::Duration::from_secs(30),
        ..RunConfig::default_guest()
    }
}

/// Runs `config` in-process; returns the report and the console text.
pub fn run(config: &RunConfig) -> (RunReport, String) {
    let console = Captured::default();
    let report = vmm::run::run(config, Box::new(console.clone())).expect("the VM builds");
    (report, console.text())
}

/// The guest source of a built-in by name.
pub fn builtin(name: &str) -> GuestSource {
    vmm::cli::parse_guest(name).expect("a built-in")
}

/// A xorshift64 generator: the sequence is reproducible from the seed (which
/// must not be 0), and it needs no dependency.
#[derive(Debug)]
pub struct Rng(pub u64);

impl Rng {
    /// The next number, reduced to `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}
