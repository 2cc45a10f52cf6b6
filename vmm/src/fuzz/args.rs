//! `vmm fuzz`'s flags ([`FuzzArgs`]): the generator's budget and seeds,
//! the backend and its VM, and what to do with findings.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde::Serialize;

use super::gen::Weights;
use crate::mm::manager::DirtyLogMode;
use crate::scenario::num::parse_num;
use crate::units::{parse_duration, parse_mem};

/// The sim tier's slot budget without `--max-slots`.
pub const DEFAULT_SIM_SLOTS: u64 = 64;

/// `--seeds A..B`: the seeds from `first` to `last`, both included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeedRange {
    /// The first seed.
    pub first: u64,
    /// The last seed.
    pub last: u64,
}

/// Parses `A..B` with `A <= B` (an inverted or empty range is refused: it
/// would run nothing and look clean).
pub fn parse_seeds(s: &str) -> Result<SeedRange, String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("{s:?} is not a seed range; expected A..B, e.g. 1..100"))?;
    let num = |t: &str| {
        t.trim()
            .parse::<u64>()
            .map_err(|_| format!("{s:?}: {t:?} is not a seed; expected A..B, e.g. 1..100"))
    };
    let (first, last) = (num(a)?, num(b)?);
    if first > last {
        return Err(format!(
            "{s:?} runs no seed: the first ({first}) is past the last ({last})"
        ));
    }
    Ok(SeedRange { first, last })
}

/// Which VM the timeline runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// A real KVM VM with vCPUs running guest commands.
    Real,
    /// The memory manager on the simulated KVM: no vCPUs; guest writes simulated.
    Sim,
}

pub(super) fn backend_name(b: Backend) -> &'static str {
    match b {
        Backend::Real => "real",
        Backend::Sim => "sim",
    }
}

/// `vmm fuzz` flags.
#[derive(Debug, Clone, Args)]
#[command(about = "Fuzz memory hotplug against a model; findings become shrunk scenario files")]
pub struct FuzzArgs {
    /// Seed of the campaign (default: from the clock; printed at start).
    #[arg(long, value_name = "N", conflicts_with = "seeds")]
    pub seed: Option<u64>,
    /// A shard of seeds, `A..B` (B included): one campaign per seed, each
    /// with the whole `--time`/`--steps` budget, going on past findings; a
    /// job runner spreads a long campaign by giving each job a range.
    #[arg(long, value_name = "A..B", value_parser = parse_seeds)]
    pub seeds: Option<SeedRange>,
    /// Run this long (e.g. 60s, 5m).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, conflicts_with = "steps")]
    pub time: Option<Duration>,
    /// Run this many steps (default 1000).
    #[arg(long, value_name = "N")]
    pub steps: Option<u64>,
    /// vCPUs of the real tier's VM.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=8))]
    pub vcpus: u64,
    /// Guest RAM of the VM (the arena is separate).
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_mem)]
    pub mem: u64,
    /// real (KVM with vCPUs) or sim (the memory manager on SimKvm).
    #[arg(long, value_enum, default_value_t = Backend::Real)]
    pub backend: Backend,
    /// First byte of the hotplug arena where most ops land (`4G`, `0x100000000`).
    #[arg(long, value_name = "GPA", default_value = "4G", value_parser = parse_num)]
    pub arena_base: u64,
    /// Length of the arena (`64M`, `0x4000000`).
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_num)]
    pub arena_size: u64,
    /// Dirty-log mode of the VM: bitmap (default), manual or ring (the
    /// model predicts each mode's exact dirty sets). With `--replay`, a
    /// file's `dirty_log` header decides; a flag naming another mode is
    /// refused.
    #[arg(long, value_name = "MODE")]
    pub dirty_log: Option<DirtyLogMode>,
    /// Slot budget of the sim tier (default 64; the real tier uses KVM's
    /// and refuses the flag).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(4..=32764))]
    pub max_slots: Option<u64>,
    /// Sim tier: about one step in N has a memslot change fail (`EIO`),
    /// which must roll back like the model (0: none). The step's text
    /// chooses, so a reproducer replays with the same flag.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub fail_every: u64,
    /// Sim tier: a device thread holds a guard on the first page of every
    /// memory op's range while the op runs (the op must wait for it).
    #[arg(long)]
    pub guard_reader: bool,
    /// Memory ops between two probes of KVM's own memslots (a sampled slot
    /// must refuse an overlapping create with EEXIST, a sampled hole must
    /// take a 1-page slot that is deleted again; 0: never).
    #[arg(long, value_name = "N", default_value_t = crate::scenario::invariants::DEFAULT_PROBE_EVERY)]
    pub probe_every: u32,
    /// One-page slots every VM starts with (one plug-many 2 GiB above the
    /// arena), to fuzz with many slots: e.g. 30000 on real KVM.
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=32764))]
    pub prefill: u64,
    /// Pin limit in 4 KiB pages.
    #[arg(long, value_name = "PAGES", default_value_t = 4096)]
    pub pin_limit: u64,
    /// Weights of the step families: plug=14,unplug=8,protect=8,move=6,
    /// resize=6,dirty=5,plug-many=2,pins=8,guest=20,dma=6 (named ones replace these).
    #[arg(long, value_name = "LIST", default_value = "", value_parser = |s: &str| s.parse::<Weights>())]
    pub weights: Weights,
    /// Steps per VM (a fresh VM for each chunk).
    #[arg(long, value_name = "N", default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub chunk: u64,
    /// Where reproducers are written.
    #[arg(long, value_name = "DIR", default_value = "fuzz-findings")]
    pub out: PathBuf,
    /// Candidate runs the shrinker may try.
    #[arg(long, value_name = "N", default_value_t = 200)]
    pub shrink_runs: usize,
    /// Reruns of the shrunk reproducer (reported as k of N).
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub reruns: usize,
    /// Replay a reproducer instead of generating (the file describes its
    /// VM and steps: the generator's flags do not apply).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["seed", "seeds", "time", "steps", "weights", "chunk", "prefill", "shrink_runs", "reruns"])]
    pub replay: Option<PathBuf>,
    /// Print a libFuzzer input (the coverage-guided tier's bytes) as a
    /// scenario file for the chosen backend's VM, then exit.
    #[arg(long, value_name = "INPUT", conflicts_with = "replay")]
    pub convert: Option<PathBuf>,
    /// Print a JSON report on stdout.
    #[arg(long)]
    pub json: bool,
    /// One line per chunk.
    #[arg(short, long)]
    pub verbose: bool,
}
