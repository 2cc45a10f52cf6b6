//! `vmm bench faults`: how long a guest waits on a page fault, and what
//! drives it.
//!
//! For each configuration (one per backing), a guest at CPL3 — where faults
//! are real under this host's shadow MMU — touches the pages of a test range
//! plugged at [`config::TEST_BASE`], times each access with `rdtsc` (the
//! protocol's TIMED_TOUCH) and stores the deltas in a result buffer that was
//! faulted in beforehand. The VMM converts ticks with `KVM_GET_TSC_KHZ`,
//! reads KVM's binary statistics between phases (every vCPU parked, so each
//! delta belongs to one phase), and reports percentiles, a JSON document and
//! an SVG plot. Baselines from the same invocation: [`raw`] (minimal KVM,
//! identical pattern) and [`host::first_touch`] (no VM).
//!
//! Modules: [`config`] (flags), [`plan`] (the accesses), [`guest`] (the VM
//! and vCPU threads), [`page_tables`] (4K/1G guest page tables), [`uffd`]
//! (userfaultfd handler), [`host`] (host facts, floor), [`raw`] (baseline),
//! [`stats`] (percentiles), [`report`] (tables, JSON), [`plot`] (SVG); the
//! orchestration of phases and baselines is [`run_faults`].
//!
//! Threads: the main thread orchestrates phases; one thread per vCPU; one
//! userfaultfd handler thread for the uffd backings. No lock is held across
//! a phase; the only shared state is the uffd handler's page list (a mutex)
//! and the progress counter (a relaxed atomic, read for display only).

pub mod config;
pub mod guest;
pub mod host;
pub mod page_tables;
pub mod plan;
pub mod plot;
pub mod raw;
pub mod report;
pub mod stats;
pub mod uffd;

mod run;

use std::io::Write;
use std::time::Duration;

use config::ConfigError;
pub use run::run_faults;

use crate::mm::backing::BackingError;

/// Errors of a bench run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The VM could not be built.
    #[error(transparent)]
    Vm(#[from] crate::vm::VmError),
    /// Host memory could not be set up.
    #[error(transparent)]
    Backing(#[from] BackingError),
    /// Plugging the test range failed.
    #[error("plugging the test range: {0}")]
    Memory(#[from] crate::mm::manager::MemslotError),
    /// Guest page tables could not be built.
    #[error(transparent)]
    PageTables(#[from] page_tables::PageTableError),
    /// Boot tables could not be written (raw baseline).
    #[error(transparent)]
    Tables(#[from] crate::boot::tables::TablesError),
    /// The guest image could not be loaded (raw baseline).
    #[error(transparent)]
    Image(#[from] crate::boot::elf::ElfError),
    /// userfaultfd failed.
    #[error(transparent)]
    Uffd(#[from] uffd::UffdError),
    /// KVM statistics unavailable.
    #[error(transparent)]
    Stats(#[from] crate::kvm::stats::StatsError),
    /// A setup step failed.
    #[error("bench setup: {0}")]
    Setup(String),
    /// A guest command failed.
    #[error("vCPU {vcpu}: {detail}")]
    Guest {
        /// vCPU index.
        vcpu: u64,
        /// What happened.
        detail: String,
    },
    /// A phase did not finish in time.
    #[error("vCPU {vcpu} did not finish its phase within {after:?} (--timeout)")]
    Timeout {
        /// vCPU index.
        vcpu: u64,
        /// The limit.
        after: Duration,
    },
    /// Writing the plot or a temporary file failed.
    #[error("{what}: {source}")]
    Io {
        /// What was written.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

/// `vmm bench faults` with parsed flags: runs, prints, writes the plot;
/// returns the exit status (0 ok, 1 failure, 2 invalid configuration).
pub fn main_faults(args: &config::FaultsArgs) -> i32 {
    let cfg = match args.to_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmm: {e}");
            return 2;
        }
    };
    let mut out: Box<dyn Write> = if args.json {
        Box::new(std::io::stderr())
    } else {
        Box::new(std::io::stdout())
    };
    let report = match run_faults(&cfg, &mut *out) {
        Ok(r) => r,
        Err(BenchError::Config(e)) => {
            eprintln!("vmm: {e}");
            return 2;
        }
        Err(e) => {
            eprintln!("vmm: {e}");
            return 1;
        }
    };
    if let Some(path) = &args.plot {
        if let Err(e) = std::fs::write(path, plot::svg(&plot::series(&report))) {
            eprintln!("vmm: writing the plot {}: {e}", path.display());
            return 1;
        }
        let _ = writeln!(out, "plot: {}", path.display());
    }
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(j) => println!("{j}"),
            Err(e) => {
                eprintln!("vmm: cannot encode the report: {e}");
                return 1;
            }
        }
    }
    0
}
