//! `vmm bench dirty` flags, checked before any VM exists, the dirty-log
//! modes, and the module's error type.

use std::path::PathBuf;

use clap::Args;
use guest_image::protocol::layout;

use crate::mm::addr::{HUGE_2M, PAGE_SIZE};
use crate::mm::backing::BackingKind;
use crate::units::parse_size;

/// How dirty pages are tracked.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, strum::Display, serde::Serialize,
)]
#[strum(serialize_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum DirtyMode {
    /// `KVM_GET_DIRTY_LOG`: read a slot's bitmap, which also clears it and
    /// write-protects the pages again.
    Bitmap,
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` with initially-set: enabling
    /// protects nothing, `KVM_GET_DIRTY_LOG` only reads, `KVM_CLEAR_DIRTY_LOG`
    /// re-protects what was read.
    Manual,
    /// `KVM_CAP_DIRTY_LOG_RING_ACQ_REL`: each vCPU pushes dirty GFNs to its
    /// own ring; the VMM harvests and `KVM_RESET_DIRTY_RINGS` re-protects.
    Ring,
}

impl DirtyMode {
    /// Every mode.
    pub const ALL: [DirtyMode; 3] = [DirtyMode::Bitmap, DirtyMode::Manual, DirtyMode::Ring];
}

/// Host memory behind the measured area.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, strum::Display, serde::Serialize)]
#[strum(serialize_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum DirtyBacking {
    /// Private anonymous memory.
    Anon,
    /// Private anonymous memory with `MADV_HUGEPAGE`.
    Thp,
}

impl DirtyBacking {
    /// The memory manager's kind for it.
    pub fn kind(self) -> BackingKind {
        match self {
            DirtyBacking::Anon => BackingKind::Anon,
            DirtyBacking::Thp => BackingKind::Thp,
        }
    }

    /// The alignment of sizes and slots on it.
    pub fn granule(self) -> u64 {
        match self {
            DirtyBacking::Anon => PAGE_SIZE,
            DirtyBacking::Thp => HUGE_2M,
        }
    }
}

/// Errors of `vmm bench dirty`.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// A size is not usable.
    #[error("{flag} {size:#x}: must be a non-zero multiple of {align:#x} ({backing} backing) and at most {max:#x}")]
    Size {
        /// The flag.
        flag: &'static str,
        /// The size given.
        size: u64,
        /// The alignment needed.
        align: u64,
        /// The backing.
        backing: DirtyBacking,
        /// The largest size.
        max: u64,
    },
    /// More slots than the memory can be cut into.
    #[error("--slots {slots}: the {pages} pages of {granule:#x} cannot give each slot one (use fewer slots or a larger --size)")]
    Slots {
        /// Slots asked for.
        slots: u64,
        /// Granule-sized pages available.
        pages: u64,
        /// The granule.
        granule: u64,
    },
    /// `--write-percent` outside 1..=100.
    #[error("--write-percent {0}: must be 1 to 100")]
    WritePercent(u32),
    /// A mode the host's KVM lacks.
    #[error("--modes {mode}: this host's KVM lacks {cap}")]
    ModeUnavailable {
        /// The mode.
        mode: DirtyMode,
        /// The capability it needs.
        cap: &'static str,
    },
    /// The ring cannot hold one vCPU's writes of one iteration.
    #[error("ring mode: {pages} pages written per vCPU per iteration exceed the {entries}-entry dirty ring (KVM's largest here); lower --size or --write-percent, or add --vcpus")]
    RingTooSmall {
        /// Pages per vCPU per iteration.
        pages: u64,
        /// Ring entries.
        entries: u64,
    },
    /// An output file cannot be written.
    #[error("cannot write {what} {path}: {reason}")]
    Output {
        /// Which output.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        reason: String,
    },
    /// The bench VM or its guest failed.
    #[error(transparent)]
    Bench(#[from] crate::bench::BenchError),
    /// Host memory could not be mapped.
    #[error(transparent)]
    Backing(#[from] crate::mm::backing::BackingError),
    /// An op of the memory manager failed.
    #[error("{what}: {source}")]
    Memory {
        /// The op.
        what: &'static str,
        /// The manager's error.
        source: crate::mm::manager::MemslotError,
    },
    /// A raw KVM call failed.
    #[error("raw: {what}: {source}")]
    Kvm {
        /// The call.
        what: String,
        /// The errno.
        source: std::io::Error,
    },
    /// The raw program's guest failed.
    #[error("raw: vCPU {vcpu}: {detail}")]
    RawGuest {
        /// vCPU index.
        vcpu: usize,
        /// What happened.
        detail: String,
    },
    /// A collect missed pages the guest wrote.
    #[error(
        "{who} {mode}: iteration {iteration} collected {got} dirty pages and lost {missing} of the {wrote} the guest wrote (first lost GFN {first:#x})"
    )]
    Lost {
        /// Ours or raw.
        who: &'static str,
        /// The mode.
        mode: DirtyMode,
        /// The iteration.
        iteration: u32,
        /// Pages collected.
        got: u64,
        /// Pages written.
        wrote: u64,
        /// Written pages not collected.
        missing: u64,
        /// The first of them.
        first: u64,
    },
}

/// `vmm bench dirty` flags.
#[derive(Debug, Clone, Args)]
// A deferred subcommand's help opens with this, not the listing's line.
#[command(
    about = "Dirty-page tracking per mode (bitmap, manual, ring): vCPU pass, collect and clear times vs a raw program (KVM's dirty_log_perf_test)"
)]
pub struct DirtyArgs {
    /// Dirty-log modes, comma-separated: bitmap, manual, ring (default: every one this host's KVM has).
    #[arg(long, value_name = "MODE,...", value_delimiter = ',', value_enum)]
    pub modes: Vec<DirtyMode>,
    /// vCPUs, each dirtying its own part of the memory.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=layout::MAX_VCPUS))]
    pub vcpus: u64,
    /// Guest memory per vCPU (e.g. 64M, 1G).
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_size)]
    pub size: u64,
    /// Memslots the memory is split into (1 to 32,000).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=32_000))]
    pub slots: u64,
    /// Percent of its pages each vCPU writes per iteration (every round(100/W)-th page).
    #[arg(long, value_name = "W", default_value_t = 10)]
    pub write_percent: u32,
    /// Iterations of write, collect, clear.
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = clap::value_parser!(u32).range(2..=10_000))]
    pub iterations: u32,
    /// Host memory: anon or thp.
    #[arg(long, value_enum, default_value = "anon")]
    pub backing: DirtyBacking,
    /// Also time enabling dirty logging at each of these total sizes (e.g. 64M,256M,1G), per mode.
    #[arg(long, value_name = "SIZE,...", value_delimiter = ',', value_parser = parse_size)]
    pub enable_scan: Vec<u64>,
    /// Write an SVG plot of the per-iteration times to this file.
    #[arg(long, value_name = "PATH")]
    pub plot: Option<PathBuf>,
    /// A JSON report on stdout (the tables move to stderr).
    #[arg(long)]
    pub json: bool,
}

/// Largest total guest memory: the window from the area's base to the end
/// of the guest's identity map.
pub const MAX_TOTAL: u64 = layout::IDENTITY_END - super::AREA_BASE;

impl DirtyArgs {
    /// Pages (4 KiB) one vCPU writes per iteration, and the stride between
    /// them in pages.
    pub fn written_per_vcpu(&self) -> (u64, u64) {
        let step = (100 + u64::from(self.write_percent) / 2) / u64::from(self.write_percent.max(1));
        let pages = self.size / PAGE_SIZE;
        (pages.div_ceil(step.max(1)), step.max(1))
    }

    /// Checks what can be checked without KVM.
    ///
    /// # Errors
    /// [`DirtyError::WritePercent`], [`DirtyError::Size`], [`DirtyError::Slots`].
    pub fn validate(&self) -> Result<(), DirtyError> {
        if !(1..=100).contains(&self.write_percent) {
            return Err(DirtyError::WritePercent(self.write_percent));
        }
        let g = self.backing.granule();
        let size_ok = |flag, size: u64, total: u64| {
            if size == 0 || size % g != 0 || total > MAX_TOTAL {
                Err(DirtyError::Size {
                    flag,
                    size,
                    align: g,
                    backing: self.backing,
                    max: MAX_TOTAL,
                })
            } else {
                Ok(())
            }
        };
        size_ok("--size", self.size, self.size.saturating_mul(self.vcpus))?;
        for &s in &self.enable_scan {
            size_ok("--enable-scan", s, s)?;
        }
        let pages = self.size * self.vcpus / g;
        if self.slots > pages {
            return Err(DirtyError::Slots {
                slots: self.slots,
                pages,
                granule: g,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: DirtyArgs,
    }

    fn parse(a: &[&str]) -> DirtyArgs {
        Cli::try_parse_from(std::iter::once("x").chain(a.iter().copied()))
            .unwrap()
            .args
    }

    #[test]
    fn test_write_percent_sets_the_stride() {
        let a = parse(&["--size", "4M", "--write-percent", "10"]);
        assert_eq!(a.written_per_vcpu(), (103, 10)); // 1024 pages, every 10th
        let a = parse(&["--size", "4M", "--write-percent", "100"]);
        assert_eq!(a.written_per_vcpu(), (1024, 1));
        let a = parse(&["--size", "4M", "--write-percent", "3"]);
        assert_eq!(a.written_per_vcpu().1, 33);
    }

    #[test]
    fn test_bad_flags_are_named() {
        let e = parse(&["--write-percent", "0"]).validate().unwrap_err();
        assert!(e.to_string().contains("--write-percent 0"), "{e}");
        let e = parse(&["--size", "3K"]).validate().unwrap_err();
        assert!(e.to_string().contains("--size"), "{e}");
        let e = parse(&["--backing", "thp", "--size", "4M", "--slots", "3"])
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("--slots 3"), "{e}");
        for zero_or_many in ["0", "32001"] {
            let e = Cli::try_parse_from(["x", "--slots", zero_or_many])
                .err()
                .expect("refused");
            assert!(e.to_string().contains("1..=32000"), "{e}");
        }
        let e = parse(&["--enable-scan", "1M,5K"]).validate().unwrap_err();
        assert!(e.to_string().contains("--enable-scan 0x1400"), "{e}");
        parse(&[]).validate().unwrap();
    }
}
