//! What `vmm bench faults` measures: the flags, parsed and validated before
//! any VM exists, and the per-configuration plan derived from them.
//!
//! Text forms: the flag-only enums derive `clap::ValueEnum` and `strum`'s
//! `Display`/`EnumString`; [`Backing`] and [`Pattern`] parse by hand because
//! they carry data (a [`BackingKind`], a stride size) that no derive parses.
//!
//! ```
//! use vmm::bench::{Backing, Pattern};
//! use vmm::mm::backing::BackingKind;
//! assert_eq!("uffd-copy".parse::<Backing>().unwrap(), Backing::UffdCopy);
//! assert_eq!("thp".parse::<Backing>().unwrap(), Backing::Host(BackingKind::Thp));
//! assert_eq!("stride=2M".parse::<Pattern>().unwrap(), Pattern::Stride(2 << 20));
//! assert!("stride=0".parse::<Pattern>().is_err());
//! ```

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::Args;
use guest_image::protocol::layout;

use super::workset::{Prefetch, WorksetOptions};
use crate::mm::addr::{HUGE_1G, HUGE_2M, PAGE_SIZE};
use crate::mm::backing::BackingKind;
use crate::units::{parse_duration, parse_size};

/// Guest-physical base of the test range: 4 GiB, 1 GiB-aligned so every guest
/// page size can map it, and far from the boot region and the result buffers.
pub const TEST_BASE: u64 = 4 << 30;

/// Most accesses one vCPU may time in one pass (8 bytes of result buffer each).
pub const MAX_ACCESSES_PER_VCPU: u64 = 1 << 22;

/// Errors in the bench configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// An unknown backing name.
    #[error("unknown backing {0:?}: expected anon, shared, memfd, thp, hugetlb, prefault, populate, file, file=PATH, uffd-zero, uffd-copy, uffd-minor or uffd-wp")]
    Backing(String),
    /// An unknown pattern.
    #[error("unknown pattern {0:?}: expected seq, random or stride=SIZE (e.g. stride=2M)")]
    Pattern(String),
    /// An unknown guest page size.
    #[error("unknown guest page size {0:?}: expected 4K, 2M or 1G")]
    GuestPage(String),
    /// The range size is not usable.
    #[error("--size {size:#x} must be a multiple of {align:#x} (the {what}) and at most {max:#x}")]
    Size {
        /// Requested size.
        size: u64,
        /// Required alignment.
        align: u64,
        /// Which constraint sets the alignment.
        what: &'static str,
        /// Largest size.
        max: u64,
    },
    /// Too many accesses per vCPU for the result buffer.
    #[error("{accesses} accesses per vCPU exceed the limit of {max}: use a larger stride or a smaller --size")]
    TooManyAccesses {
        /// Accesses of one vCPU.
        accesses: u64,
        /// The limit.
        max: u64,
    },
    /// More vCPUs than pages to split the range into.
    #[error("--size {size:#x} cannot be split into {vcpus} disjoint parts of whole pages")]
    Split {
        /// Range size.
        size: u64,
        /// vCPUs.
        vcpus: u64,
    },
    /// The guest page size the host cannot provide.
    #[error("--guest-page 1G needs CPUID pdpe1gb, which this host's KVM does not offer (shadow paging): use 4K or 2M")]
    NoGigPages,
    /// `--pre-fault-memory` on a KVM without `KVM_PRE_FAULT_MEMORY`.
    #[error("--pre-fault-memory needs KVM_PRE_FAULT_MEMORY (KVM_CAP_PRE_FAULT_MEMORY, Linux 6.10+ with a TDP MMU), which this host's KVM does not offer (KVM_CHECK_EXTENSION returned 0): use --backing populate or prefault to prefault the host side only")]
    NoPreFaultMemory,
    /// `--pre-fault-memory` on a KVM that has it: the bench does not issue
    /// it (it could not be tested where it was written).
    #[error("--pre-fault-memory: this host's KVM offers KVM_PRE_FAULT_MEMORY, but the bench does not issue it yet (written on a host without it, so never tested): use --backing populate or prefault")]
    PreFaultMemoryNotIssued,
    /// Churn, record or replay flags that do not fit together.
    #[error("{0}")]
    Workset(String),
    /// One userfaultfd per vCPU needs each vCPU to own its part.
    #[error("--uffd-per-vcpu needs --share disjoint: a range registers with one userfaultfd only, and shared vCPUs touch the whole range")]
    UffdPerVcpuShared,
    /// The handler delay is out of range.
    #[error("--handler-delay {0:?}: expected 0 or a delay up to 1s such as 10us, 2ms, 0.5s")]
    HandlerDelay(String),
    /// A uffd flag given without any uffd backing.
    #[error("{0} applies to the uffd backings only (uffd-zero, uffd-copy, uffd-minor, uffd-wp)")]
    UffdFlagWithoutUffd(&'static str),
    /// An output file cannot be written.
    #[error("cannot write {what} {path}: {reason}")]
    Output {
        /// Which output.
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// The OS error, as text.
        reason: String,
    },
}

/// Host memory behind the test range: a [`BackingKind`] of the memory
/// manager, or one of the bench's own ways to fill it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Backing {
    /// Host memory of this kind, first touched by the guest (`file=PATH`
    /// uses the user's file as is).
    Host(BackingKind),
    /// A shared file without a name (`file`): fresh for every configuration
    /// and round, nothing left behind.
    UnnamedFile,
    /// Private anonymous memory populated by the host before the guest runs:
    /// the guest still takes KVM faults, but no host page allocation.
    /// The host writes one byte per page (touch prefault), timed.
    Prefault,
    /// Private anonymous memory populated with `MADV_POPULATE_WRITE`
    /// (Linux 5.14+) before the guest runs, timed; fails where the kernel
    /// lacks it rather than falling back to touching.
    Populate,
    /// userfaultfd demand paging, missing pages resolved with UFFDIO_ZEROPAGE.
    UffdZero,
    /// userfaultfd demand paging, missing pages copied from a source (UFFDIO_COPY).
    UffdCopy,
    /// userfaultfd MINOR faults on a memfd whose page cache is filled
    /// beforehand; resolved with UFFDIO_CONTINUE.
    UffdMinor,
    /// userfaultfd write-protect: populated anonymous memory, protected;
    /// guest writes fault and are resolved by un-protecting.
    UffdWp,
}

impl Backing {
    /// Private anonymous memory, 4 KiB pages.
    pub const ANON: Backing = Backing::Host(BackingKind::Anon);
    /// Private anonymous memory with `MADV_HUGEPAGE`.
    pub const THP: Backing = Backing::Host(BackingKind::Thp);

    /// The host mapping kind that holds the memory ([`BackingKind::Anon`]
    /// for the bench's own kinds; `None` for the unnamed file).
    pub fn host_kind(&self) -> Option<&BackingKind> {
        match self {
            Backing::Host(k) => Some(k),
            Backing::UnnamedFile => None,
            Backing::Prefault
            | Backing::Populate
            | Backing::UffdZero
            | Backing::UffdCopy
            | Backing::UffdWp => Some(&BackingKind::Anon),
            Backing::UffdMinor => Some(&BackingKind::Memfd),
        }
    }

    /// Whether faults are resolved by the userfaultfd handler.
    pub fn is_uffd(&self) -> bool {
        matches!(
            self,
            Backing::UffdZero | Backing::UffdCopy | Backing::UffdMinor | Backing::UffdWp
        )
    }

    /// Alignment the range size and vCPU parts must respect.
    pub fn granule(&self) -> u64 {
        self.host_kind().map_or(PAGE_SIZE, BackingKind::page_size)
    }
}

impl fmt::Display for Backing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backing::Host(k) => k.fmt(f),
            Backing::UnnamedFile => f.write_str("file"),
            Backing::Prefault => f.write_str("prefault"),
            Backing::Populate => f.write_str("populate"),
            Backing::UffdZero => f.write_str("uffd-zero"),
            Backing::UffdCopy => f.write_str("uffd-copy"),
            Backing::UffdMinor => f.write_str("uffd-minor"),
            Backing::UffdWp => f.write_str("uffd-wp"),
        }
    }
}

impl FromStr for Backing {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.trim() {
            "prefault" | "prefaulted" => Backing::Prefault,
            "populate" => Backing::Populate,
            "file" => Backing::UnnamedFile,
            "uffd-zero" => Backing::UffdZero,
            "uffd-copy" => Backing::UffdCopy,
            "uffd-minor" => Backing::UffdMinor,
            "uffd-wp" => Backing::UffdWp,
            t => Backing::Host(t.parse().map_err(|_| ConfigError::Backing(s.to_string()))?),
        })
    }
}

/// The order in which a vCPU touches its part of the range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// One access per 4 KiB page, ascending, in one guest command.
    Sequential,
    /// One access per 4 KiB page in a seeded random order, one guest command
    /// per access (the exit between accesses is outside the timed window).
    Random,
    /// One access every `n` bytes, ascending, in one guest command.
    Stride(u64),
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Sequential => f.write_str("seq"),
            Pattern::Random => f.write_str("random"),
            Pattern::Stride(n) => write!(f, "stride={}", fmt_size(*n)),
        }
    }
}

impl FromStr for Pattern {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "seq" | "sequential" => Ok(Pattern::Sequential),
            "random" => Ok(Pattern::Random),
            t => t
                .strip_prefix("stride=")
                .and_then(|n| parse_size(n).ok())
                .map(Pattern::Stride)
                .ok_or_else(|| ConfigError::Pattern(s.to_string())),
        }
    }
}

impl Pattern {
    /// Bytes between two accesses of an ascending pattern.
    pub fn stride(self) -> u64 {
        match self {
            Pattern::Sequential | Pattern::Random => PAGE_SIZE,
            Pattern::Stride(n) => n,
        }
    }

    /// Number of accesses over `len` bytes.
    pub fn accesses(self, len: u64) -> u64 {
        len.div_ceil(self.stride())
    }
}

/// Read or write accesses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, strum::Display)]
#[strum(serialize_all = "lowercase")]
pub enum Access {
    /// Read one byte.
    Read,
    /// Write one byte.
    Write,
}

/// How vCPUs share the range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, strum::Display)]
#[strum(serialize_all = "lowercase")]
pub enum Share {
    /// Each vCPU touches its own part.
    Disjoint,
    /// Every vCPU touches the whole range (faults race).
    Shared,
}

/// Where the userfaultfd handler threads run relative to the vCPU their
/// uffd serves (vCPU 0 for the one uffd of the range; vCPU `k` for uffd `k`
/// with `--uffd-per-vcpu`). Pinned modes pin vCPU `i` to CPU `i` too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, strum::Display)]
#[strum(serialize_all = "lowercase")]
pub enum UffdCpu {
    /// Handlers pinned to their vCPU's CPU.
    Same,
    /// Handlers pinned to the CPU after their vCPU's.
    Other,
    /// No pinning: the scheduler decides.
    Any,
}

/// The page size of the guest's own page tables over the test range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::Display, strum::EnumString)]
#[strum(ascii_case_insensitive)]
pub enum GuestPage {
    /// 4 KiB PTEs (tables written into guest memory by the bench).
    #[strum(to_string = "4K", serialize = "4KiB")]
    Size4K,
    /// 2 MiB PDEs (the boot identity map).
    #[strum(to_string = "2M", serialize = "2MiB")]
    Size2M,
    /// A 1 GiB PDPTE (needs CPUID pdpe1gb).
    #[strum(to_string = "1G", serialize = "1GiB")]
    Size1G,
}

impl GuestPage {
    /// Bytes one guest leaf maps.
    pub fn bytes(self) -> u64 {
        match self {
            GuestPage::Size4K => PAGE_SIZE,
            GuestPage::Size2M => HUGE_2M,
            GuestPage::Size1G => HUGE_1G,
        }
    }
}

/// A human size: `64M`, `4K`, `123B`.
pub fn fmt_size(n: u64) -> String {
    for (shift, unit) in [(30, "G"), (20, "M"), (10, "K")] {
        if n >= 1 << shift && n % (1 << shift) == 0 {
            return format!("{}{unit}", n >> shift);
        }
    }
    format!("{n}B")
}

/// Checks `--record`, `--replay` and `--prefetch` against the backings (the
/// files are read later).
fn validate_workset(opts: &WorksetOptions, backings: &[Backing]) -> Result<(), String> {
    if opts.record.is_some() && backings.len() != 1 {
        return Err("--record records one configuration: give one --backing, not --compare".into());
    }
    if opts.replay.is_none() {
        return Ok(());
    }
    match opts.prefetch {
        Prefetch::Copy => {
            if let Some(b) = backings.iter().find(|b| **b != Backing::UffdCopy) {
                return Err(format!("--prefetch copy copies pages through the userfaultfd of --backing uffd-copy, not {b}"));
            }
        }
        Prefetch::Populate => {
            if let Some(b) = backings.iter().find(|b| b.is_uffd()) {
                return Err(format!("--prefetch populate would fault {b}'s pages through its userfaultfd: use --prefetch copy with uffd-copy, or a host backing such as anon"));
            }
        }
        Prefetch::None => {}
    }
    if let Some(b) = backings
        .iter()
        .find(|b| matches!(b, Backing::Prefault | Backing::Populate))
    {
        return Err(format!(
            "--replay on {b} compares nothing: {b} populates the whole range already"
        ));
    }
    Ok(())
}

fn parse_backing(s: &str) -> Result<Backing, String> {
    s.parse().map_err(|e: ConfigError| e.to_string())
}

fn parse_pattern(s: &str) -> Result<Pattern, String> {
    s.parse().map_err(|e: ConfigError| e.to_string())
}

/// `--handler-delay`: `0`, or a delay up to 1 s in us, ms or s.
fn parse_handler_delay(s: &str) -> Result<Duration, String> {
    let bad = || ConfigError::HandlerDelay(s.to_string()).to_string();
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "" if v == 0.0 => 0.0,
        "us" | "µs" => v / 1e6,
        "ms" => v / 1e3,
        "s" => v,
        _ => return Err(bad()),
    };
    if !(0.0..=1.0).contains(&secs) {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_guest_page(s: &str) -> Result<GuestPage, String> {
    s.trim()
        .parse()
        .map_err(|_| ConfigError::GuestPage(s.to_string()).to_string())
}

/// `vmm bench faults` flags: what to measure ([`FaultsConfig`]), which
/// backings, and where the results go.
#[derive(Debug, Clone, Args)]
#[command(
    about = "Guest page-fault latency per access: percentiles, JSON, a plot, raw-KVM and host baselines"
)]
pub struct FaultsArgs {
    /// What to measure.
    #[command(flatten)]
    pub measure: FaultsConfig,
    /// Host memory behind the range: anon, shared, memfd, thp, hugetlb, prefault, populate, file[=PATH], uffd-zero, uffd-copy, uffd-minor, uffd-wp.
    #[arg(long, value_name = "KIND", default_value = "anon", value_parser = parse_backing, conflicts_with = "compare")]
    pub backing: Backing,
    /// Several backings in one run, side by side (comma separated, e.g. anon,thp,prefault,uffd-zero).
    #[arg(long, value_name = "KIND,KIND,...", value_delimiter = ',', value_parser = parse_backing)]
    pub compare: Option<Vec<Backing>>,
    /// Skip the raw-KVM and host-only baselines.
    #[arg(long)]
    pub no_baselines: bool,
    /// Write an SVG plot of the latency distributions here.
    #[arg(long, value_name = "PATH")]
    pub plot: Option<PathBuf>,
    /// Print a JSON report on stdout (tables move to stderr).
    #[arg(long)]
    pub json: bool,
    /// Write every latency histogram into this directory as an HDR
    /// percentile distribution (`.hgrm`) and in log2 buckets (`.log2.txt`).
    #[arg(long, value_name = "DIR")]
    pub histograms: Option<PathBuf>,
    /// No progress bar.
    #[arg(short, long)]
    pub quiet: bool,
}

impl FaultsArgs {
    /// The validated bench configuration.
    pub fn to_config(&self) -> Result<FaultsConfig, ConfigError> {
        let cfg = FaultsConfig {
            backings: self
                .compare
                .clone()
                .filter(|c| !c.is_empty())
                .unwrap_or_else(|| vec![self.backing.clone()]),
            baselines: !self.no_baselines,
            progress: !self.quiet,
            ..self.measure.clone()
        };
        cfg.validate()?;
        if cfg.scaling && self.histograms.is_some() {
            return Err(ConfigError::Workset(
                "--histograms with --scaling: the sweep keeps only its pages/s table, not per-access histograms: run them separately".into(),
            ));
        }
        Ok(cfg)
    }
}

/// A validated bench: one configuration per backing, everything else shared.
/// Its flags are part of [`FaultsArgs`]; the backings, baselines and progress
/// come from that struct's own flags.
#[derive(Debug, Clone, Args)]
pub struct FaultsConfig {
    /// Size of the test range (e.g. 64M); split among vCPUs unless --share shared.
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_size)]
    pub size: u64,
    /// Access pattern: seq, random or stride=SIZE.
    #[arg(long, value_name = "PATTERN", default_value = "seq", value_parser = parse_pattern)]
    pub pattern: Pattern,
    /// Read or write each touched byte.
    #[arg(long, value_enum, default_value = "write")]
    pub access: Access,
    /// Number of vCPUs touching the range (1 to 64).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=layout::MAX_VCPUS))]
    pub vcpus: u64,
    /// Disjoint parts per vCPU, or the whole range shared by all.
    #[arg(long, value_enum, default_value = "disjoint")]
    pub share: Share,
    /// One configuration per backing, in this order (from --backing or --compare).
    #[arg(skip)]
    pub backings: Vec<Backing>,
    /// Page size of the guest's page tables over the range: 4K, 2M or 1G (1G needs CPUID pdpe1gb).
    #[arg(long, value_name = "SIZE", default_value = "2M", value_parser = parse_guest_page)]
    pub guest_page: GuestPage,
    /// Add a re-fault pass: MADV_DONTNEED the range (KVM's mmu-notifier path), then touch it again.
    #[arg(long)]
    pub refault: bool,
    /// userfaultfd handler placement: on the CPU of the vCPU its uffd serves, on another CPU, or unpinned.
    #[arg(long, value_enum, default_value = "any")]
    pub uffd_cpu: UffdCpu,
    /// Seed of the random pattern and of the uffd-copy contents.
    #[arg(long, value_name = "N", default_value_t = 0x5EED)]
    pub seed: u64,
    /// Whether to run the raw-KVM and host-only baselines (from --no-baselines).
    #[arg(skip)]
    pub baselines: bool,
    /// Repeat each configuration N times, alternating whether the tool or the
    /// raw baseline goes first; samples are merged.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rounds: u32,
    /// Give up after this long per configuration (e.g. 60s).
    #[arg(long, value_name = "DURATION", default_value = "120s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Show a progress bar on a terminal (from --quiet).
    #[arg(skip)]
    pub progress: bool,
    /// Prefault KVM's own mappings of the range with `KVM_PRE_FAULT_MEMORY`
    /// before the timed pass (refused where KVM lacks it).
    #[arg(long)]
    pub pre_fault_memory: bool,
    /// Ops a writer thread runs while the guest is timed, and their pacing.
    #[command(flatten)]
    pub churn: super::churn::ChurnOptions,
    /// Working-set record and replay.
    #[command(flatten)]
    pub workset: super::workset::WorksetOptions,
    /// userfaultfd: one uffd per vCPU part instead of one for the whole
    /// range (needs --share disjoint).
    #[arg(long)]
    pub uffd_per_vcpu: bool,
    /// userfaultfd: handler threads per uffd (1 to 64).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub uffd_handlers: u64,
    /// userfaultfd: delay injected before resolving each fault: 0, 10us, 2ms... up to 1s.
    #[arg(long, value_name = "DURATION", default_value = "0", value_parser = parse_handler_delay)]
    pub handler_delay: Duration,
    /// Pages/s against vCPU count (1, 2, 4... up to the host's CPUs, or to
    /// --vcpus when larger), --size per vCPU, one table for every backing.
    #[arg(long)]
    pub scaling: bool,
    /// What a memslot move or delete invalidates in KVM's page tables: slot or all (KVM's default-VM quirk).
    #[arg(long, value_name = "ZAP", value_enum, default_value_t = crate::kvm::zap::MemslotZap::Slot)]
    pub memslot_zap: crate::kvm::zap::MemslotZap,
}

impl FaultsConfig {
    /// A small default: `size` bytes, sequential writes, one vCPU, `backing`,
    /// 2 MiB guest pages, no re-fault pass, no baselines.
    pub fn small(size: u64, backing: Backing) -> Self {
        Self {
            size,
            pattern: Pattern::Sequential,
            access: Access::Write,
            vcpus: 1,
            share: Share::Disjoint,
            backings: vec![backing],
            guest_page: GuestPage::Size2M,
            refault: false,
            uffd_cpu: UffdCpu::Any,
            seed: 0x5EED,
            baselines: false,
            rounds: 1,
            timeout: Duration::from_secs(60),
            progress: false,
            pre_fault_memory: false,
            churn: super::churn::ChurnOptions::default(),
            workset: WorksetOptions::default(),
            uffd_per_vcpu: false,
            uffd_handlers: 1,
            handler_delay: Duration::ZERO,
            scaling: false,
            memslot_zap: crate::kvm::zap::MemslotZap::Slot,
        }
    }

    /// Whether the timed pass records each access's absolute start stamp
    /// (needed to attribute accesses to churn ops and to record a working
    /// set).
    pub fn wants_stamps(&self) -> bool {
        !self.churn.ops.is_empty() || self.workset.record.is_some()
    }

    /// The largest page size among the backings: sizes and vCPU parts are
    /// multiples of it.
    fn granule(&self) -> u64 {
        self.backings
            .iter()
            .map(Backing::granule)
            .max()
            .unwrap_or(PAGE_SIZE)
    }

    /// Checks sizes against backings, vCPUs and the result-buffer limit.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let granule = self.granule();
        let max = layout::IDENTITY_END - TEST_BASE;
        if self.size == 0 || self.size % granule != 0 || self.size > max {
            return Err(ConfigError::Size {
                size: self.size,
                align: granule,
                what: if granule == PAGE_SIZE {
                    "page size"
                } else {
                    "2 MiB page size of thp/hugetlb"
                },
                max,
            });
        }
        self.validate_uffd()?;
        if let Pattern::Stride(0) = self.pattern {
            return Err(ConfigError::Pattern("stride=0".into()));
        }
        if self.share == Share::Disjoint && self.size / granule < self.vcpus {
            return Err(ConfigError::Split {
                size: self.size,
                vcpus: self.vcpus,
            });
        }
        let per_vcpu = match self.share {
            Share::Disjoint => self.size.div_ceil(self.vcpus),
            Share::Shared => self.size,
        };
        let accesses = self.pattern.accesses(per_vcpu + granule);
        if accesses > MAX_ACCESSES_PER_VCPU {
            return Err(ConfigError::TooManyAccesses {
                accesses,
                max: MAX_ACCESSES_PER_VCPU,
            });
        }
        validate_workset(&self.workset, &self.backings).map_err(ConfigError::Workset)?;
        if !self.churn.ops.is_empty() && self.workset.replay.is_some() {
            return Err(ConfigError::Workset(
                "--churn with --replay would disturb the runs being compared: run them separately"
                    .into(),
            ));
        }
        if self
            .churn
            .ops
            .contains(&super::churn::ops::ChurnOp::Dontneed)
        {
            if let Some(b) = self.backings.iter().find(|b| b.is_uffd()) {
                return Err(ConfigError::Workset(format!(
                    "--churn dontneed with {b}: a dropped page comes back as a new missing fault (changing what the pass measures), uffd-wp would lose the protected contents and uffd-minor its page cache: churn {b} with plug, protect, collapse or dirty-log"
                )));
            }
        }
        if self.scaling {
            for (set, flag) in [
                (!self.churn.ops.is_empty(), "--churn"),
                (self.workset.record.is_some(), "--record"),
                (self.workset.replay.is_some(), "--replay"),
            ] {
                if set {
                    return Err(ConfigError::Workset(format!(
                        "--scaling with {flag}: the sweep runs one configuration per vCPU count, each with its own --size, so {flag} has no single configuration to act on: run them separately"
                    )));
                }
            }
        }
        Ok(())
    }

    /// The uffd flags: per-vCPU uffds need disjoint parts; uffd flags need a
    /// uffd backing.
    fn validate_uffd(&self) -> Result<(), ConfigError> {
        if self.uffd_per_vcpu && self.share == Share::Shared {
            return Err(ConfigError::UffdPerVcpuShared);
        }
        if !self.backings.iter().any(Backing::is_uffd) {
            for (set, flag) in [
                (self.uffd_per_vcpu, "--uffd-per-vcpu"),
                (self.uffd_handlers != 1, "--uffd-handlers"),
                (!self.handler_delay.is_zero(), "--handler-delay"),
            ] {
                if set {
                    return Err(ConfigError::UffdFlagWithoutUffd(flag));
                }
            }
        }
        Ok(())
    }

    /// The (offset, len) ranges registered with one userfaultfd each: every
    /// vCPU's part with `--uffd-per-vcpu`, else the whole range.
    pub fn uffd_parts(&self) -> Vec<(u64, u64)> {
        if self.uffd_per_vcpu {
            (0..self.vcpus).map(|i| self.part(i)).collect()
        } else {
            vec![(0, self.size)]
        }
    }

    /// The vCPU counts of `--scaling`: 1, 2, 4... below `top`, then `top`
    /// (the host's CPUs, or `--vcpus` when larger).
    pub fn scaling_counts(&self, host_cpus: u64) -> Vec<u64> {
        let top = self.vcpus.max(host_cpus).clamp(1, layout::MAX_VCPUS);
        let mut v: Vec<u64> = std::iter::successors(Some(1u64), |n| Some(n * 2))
            .take_while(|&n| n < top)
            .collect();
        v.push(top);
        v
    }

    /// vCPU `index`'s part of the test range as (offset, len) from
    /// [`TEST_BASE`]: granule-aligned disjoint parts, the last one taking the
    /// remainder, or the whole range when shared.
    pub fn part(&self, index: u64) -> (u64, u64) {
        if self.share == Share::Shared {
            return (0, self.size);
        }
        let granule = self.granule();
        let units = self.size / granule;
        let per = units / self.vcpus;
        let first = index * per;
        let count = if index + 1 == self.vcpus {
            units - first
        } else {
            per
        };
        (first * granule, count * granule)
    }

    /// Accesses of vCPU `index` in one pass.
    pub fn accesses(&self, index: u64) -> u64 {
        self.pattern.accesses(self.part(index).1)
    }
}

#[cfg(test)]
mod tests;
