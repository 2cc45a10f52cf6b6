//! The one error type of a bench run ([`BenchError`]): every stage's error
//! converts into it, and [`super::faults`] turns it into an exit status.

use std::time::Duration;

/// Errors of a bench run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] super::config::ConfigError),
    /// The VM could not be built.
    #[error(transparent)]
    Vm(#[from] crate::vm::VmError),
    /// Host memory could not be set up.
    #[error(transparent)]
    Backing(#[from] crate::mm::backing::BackingError),
    /// Plugging the test range failed.
    #[error("plugging the test range: {0}")]
    Memory(#[from] crate::mm::manager::MemslotError),
    /// Guest page tables could not be built.
    #[error(transparent)]
    PageTables(#[from] crate::boot::paging::PageTableError),
    /// Boot tables could not be written (raw baseline).
    #[error(transparent)]
    Tables(#[from] crate::boot::tables::TablesError),
    /// The guest image could not be loaded (raw baseline).
    #[error(transparent)]
    Image(#[from] crate::boot::elf::ElfError),
    /// userfaultfd failed.
    #[error(transparent)]
    Uffd(#[from] super::uffd::UffdError),
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
    /// SIGINT or SIGTERM asked the bench to stop.
    #[error("interrupted by {0}")]
    Interrupted(&'static str),
    /// A phase did not finish in time.
    #[error("vCPU {vcpu} did not finish its phase within {after:?} (--timeout)")]
    Timeout {
        /// vCPU index.
        vcpu: u64,
        /// The limit.
        after: Duration,
    },
    /// Prefetching a replayed working set failed.
    #[error(transparent)]
    Prefetch(#[from] super::workset::prefetch::PrefetchError),
    /// Writing the working-set record failed.
    #[error(transparent)]
    Workset(#[from] super::workset::WorksetError),
    /// Writing the uffd-copy source failed.
    #[error("{what}: {source}")]
    Io {
        /// What was written.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}
