//! The `vmm fuzz` command: the campaign loop (one VM per chunk of steps),
//! findings written as scenario files and shrunk, the progress line and the
//! JSON report. Its flags are in [`super::args`].

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::ValueEnum;
use guest_image::protocol::{layout, MMIO_BASE, MMIO_SIZE};
use serde::Serialize;

use crate::mm::manager::DirtyLogMode;
use crate::scenario::step::Action;
use crate::scenario::{Outcome, Scenario};

use super::args::backend_name;
pub use super::args::{parse_seeds, Backend, FuzzArgs, SeedRange, DEFAULT_SIM_SLOTS};
use super::finding::Finding;
use super::gen::GenConfig;
use super::model::slots::Limits;
use super::model::Layout;
use super::timeline::{expectations, generate};
use super::{leaks, real, shrink, sim};

/// Why the campaign could not go on (not a finding).
#[derive(Debug, thiserror::Error)]
pub enum FuzzError {
    /// The real tier.
    #[error(transparent)]
    Real(#[from] real::RealError),
    /// The sim tier.
    #[error(transparent)]
    Sim(#[from] sim::SimError),
    /// A reproducer could not be read or written.
    #[error("{0}")]
    File(String),
    /// A flag value that cannot work.
    #[error("{0}")]
    Flags(String),
}

/// A finding as reported.
#[derive(Debug, Clone, Serialize)]
pub struct FindingReport {
    /// The chunk's seed (the generator's).
    pub seed: u64,
    /// What failed.
    #[serde(flatten)]
    pub finding: Finding,
    /// The timeline up to the failing step.
    pub reproducer: String,
    /// Its steps.
    pub steps: usize,
    /// The shrunk timeline.
    pub shrunk: String,
    /// Its steps.
    pub shrunk_steps: usize,
    /// Reruns of the shrunk timeline that failed the same way, "k/N".
    pub reproduced: String,
    /// The command that replays it.
    pub replay: String,
}

/// The JSON report.
#[derive(Debug, Clone, Serialize)]
pub struct FuzzReport {
    /// Campaign seed.
    pub seed: u64,
    /// Backend.
    pub backend: Backend,
    /// The VM's dirty-log mode.
    pub dirty_log: DirtyLogMode,
    /// The hotplug arena, `[start, end)`.
    pub arena: [u64; 2],
    /// Steps run.
    pub steps: u64,
    /// VMs built (chunks).
    pub runs: u64,
    /// Wall time.
    pub seconds: f64,
    /// Steps per second, VM setup included.
    pub steps_per_sec: f64,
    /// Steps by kind.
    pub ops: BTreeMap<String, u64>,
    /// Outcomes by kind.
    pub outcomes: BTreeMap<String, BTreeMap<String, u64>>,
    /// Findings (the campaign stops at the first).
    pub findings: Vec<FindingReport>,
}

/// What one run of a timeline gave.
struct Ran {
    finding: Option<Finding>,
    outcomes: Vec<(String, String)>,
}

struct Campaign {
    args: FuzzArgs,
    layout: Layout,
    cfg: GenConfig,
}

/// The model's layout for the sim tier.
fn sim_layout(args: &FuzzArgs) -> Layout {
    Layout {
        boot_end: layout::BOOT_SIZE,
        ram: (layout::RAM_BASE, args.mem),
        limits: Limits {
            max_gpa: 1 << 48,
            max_slots: args.max_slots.unwrap_or(DEFAULT_SIM_SLOTS) as usize,
            reserved: (MMIO_BASE, MMIO_BASE + MMIO_SIZE),
            read_only: true,
        },
        pin_limit: args.pin_limit,
        vcpus: args.vcpus,
        guest_end: layout::IDENTITY_END,
        dirty_log: args.dirty_log.unwrap_or_default(),
    }
}

fn outcome_name(actual: &str) -> String {
    let head = actual.split(':').next().unwrap_or("").trim();
    match head.parse::<Outcome>() {
        Ok(o) => o.name().to_string(),
        Err(_) if actual.starts_with("started") => "started".into(),
        Err(_) => "ok".into(),
    }
}

impl Campaign {
    fn new(args: FuzzArgs) -> Result<Self, FuzzError> {
        let layout = match args.backend {
            Backend::Real => real::layout_with(
                args.mem,
                args.vcpus,
                args.pin_limit,
                args.dirty_log.unwrap_or_default(),
            )?,
            Backend::Sim => sim_layout(&args),
        };
        let (a, s) = (args.arena_base, args.arena_size);
        let ram_end = layout.ram.0 + layout.ram.1;
        if a % (2 << 20) != 0 || s < (2 << 20) || s % (2 << 20) != 0 {
            return Err(FuzzError::Flags(
                "--arena-base and --arena-size must be multiples of 2 MiB (size at least 2M)"
                    .into(),
            ));
        }
        let end = a.saturating_add(s);
        if a < ram_end || end > layout.guest_end {
            return Err(FuzzError::Flags(format!(
                "the arena [{a:#x}, {end:#x}) must lie above guest RAM (ends {ram_end:#x}) and below {:#x}",
                layout.guest_end
            )));
        }
        if (args.fail_every > 0 || args.guard_reader || args.max_slots.is_some())
            && args.backend != Backend::Sim
        {
            return Err(FuzzError::Flags(
                "--fail-every, --guard-reader and --max-slots act on the simulated KVM: they need --backend sim"
                    .into(),
            ));
        }
        let cfg = GenConfig {
            arena_base: a,
            arena_size: s,
            guest: args.backend == Backend::Real,
            weights: args.weights,
            prefill: args.prefill,
        };
        Ok(Self { args, layout, cfg })
    }

    fn scenario(&self, layout: &Layout, actions: &[Action], title: &str) -> Scenario {
        let steps = expectations(layout, actions);
        let mut sc = real::scenario(
            title,
            &format!("written by vmm fuzz --backend {:?}", self.args.backend).to_lowercase(),
            layout,
            steps,
        );
        sc.probe_kvm_every = (self.args.probe_every
            != crate::scenario::invariants::DEFAULT_PROBE_EVERY)
            .then_some(self.args.probe_every);
        sc
    }

    /// Runs `actions` on a fresh VM of the backend; after its teardown,
    /// nothing it created may be left ([`leaks::Snapshot`]).
    fn run(&self, actions: &[Action]) -> Result<Ran, FuzzError> {
        self.run_on(&self.layout, actions)
    }

    /// Runs `actions` on a fresh VM of `layout`; after its teardown,
    /// nothing it created may be left ([`leaks::Snapshot`]).
    fn run_on(&self, layout: &Layout, actions: &[Action]) -> Result<Ran, FuzzError> {
        let before = leaks::Snapshot::now();
        let mut ran = self.run_vm(layout, actions)?;
        if ran.finding.is_none() {
            ran.finding = leak_finding(&before, actions.len(), actions.last());
        }
        Ok(ran)
    }

    /// [`run_on`](Self::run_on) without the leak check.
    fn run_vm(&self, layout: &Layout, actions: &[Action]) -> Result<Ran, FuzzError> {
        match self.args.backend {
            Backend::Sim => {
                let finding = sim::run_with(
                    layout,
                    actions,
                    &sim::SimOptions {
                        faults: &self.faults(actions),
                        guard_reader: self.args.guard_reader,
                        probe_every: self.args.probe_every,
                        ..Default::default()
                    },
                )?;
                let n = finding.as_ref().map_or(actions.len(), |f| f.step);
                let steps = expectations(layout, &actions[..n]);
                let outcomes = steps
                    .iter()
                    .map(|s| {
                        (
                            s.kind().to_string(),
                            super::timeline::allowed(s)
                                .first()
                                .map_or("ok", |o| o.name())
                                .to_string(),
                        )
                    })
                    .collect();
                Ok(Ran { finding, outcomes })
            }
            Backend::Real => {
                let sc = self.scenario(layout, actions, "fuzz");
                // A timeline the file reader would refuse is no reproducer.
                if let Err(e) = Scenario::parse(&sc.to_toml()) {
                    return Err(FuzzError::File(format!(
                        "generated an invalid scenario: {e}"
                    )));
                }
                let timeout = Duration::from_secs(60);
                let (finding, report) = real::run_with_report(sc, layout, timeout)?;
                let outcomes = report
                    .into_iter()
                    .map(|(k, a)| (k, outcome_name(&a)))
                    .collect();
                Ok(Ran { finding, outcomes })
            }
        }
    }

    /// The injected memslot failures of a sim-tier timeline: (0-based
    /// step, call offset) for about one step in `--fail-every`.
    fn faults(&self, actions: &[Action]) -> Vec<(usize, usize)> {
        fault_points(actions, self.args.fail_every)
    }

    /// Runs a candidate for the shrinker: an invalid one does not fail.
    fn try_run(&self, layout: &Layout, actions: &[Action]) -> Option<Finding> {
        self.run_on(layout, actions).ok().and_then(|r| r.finding)
    }

    /// The shrinker's last simplification, of the VM: one vCPU where the
    /// shrunk timeline uses only vCPU 0 and still fails the same way on it.
    fn fewer_vcpus(&self, s: &shrink::Shrunk) -> Layout {
        let one = Layout {
            vcpus: 1,
            ..self.layout.clone()
        };
        let only_vcpu0 = s.actions.iter().all(|a| a.vcpu().unwrap_or(0) == 0);
        if self.layout.vcpus > 1
            && only_vcpu0
            && self
                .try_run(&one, &s.actions)
                .is_some_and(|f| f.signature == s.finding.signature)
        {
            return one;
        }
        self.layout.clone()
    }

    fn replay_command(&self, path: &Path) -> String {
        match self.args.backend {
            Backend::Real => format!("vmm run --scenario {}", path.display()),
            Backend::Sim => format!(
                "vmm fuzz --replay {} --backend sim --max-slots {} --pin-limit {} --fail-every {}{}",
                path.display(),
                self.args.max_slots.unwrap_or(DEFAULT_SIM_SLOTS),
                self.args.pin_limit,
                self.args.fail_every,
                if self.args.guard_reader { " --guard-reader" } else { "" }
            ),
        }
    }

    fn write(
        &self,
        layout: &Layout,
        actions: &[Action],
        finding: &Finding,
        name: &str,
    ) -> Result<PathBuf, FuzzError> {
        std::fs::create_dir_all(&self.args.out)
            .map_err(|e| FuzzError::File(format!("creating {}: {e}", self.args.out.display())))?;
        let path = self.args.out.join(format!("{name}.toml"));
        let mut sc = self.scenario(layout, actions, name);
        if let Some(s) = sc.steps.get_mut(finding.step.saturating_sub(1)) {
            s.note = Some(format!(
                "the finding: got {}",
                finding.actual.chars().take(200).collect::<String>()
            ));
        }
        std::fs::write(&path, sc.to_toml())
            .map_err(|e| FuzzError::File(format!("writing {}: {e}", path.display())))?;
        Ok(path)
    }

    /// Writes, shrinks and reruns a finding.
    fn report_finding(
        &self,
        seed: u64,
        actions: &[Action],
        finding: Finding,
        say: &mut dyn FnMut(String),
    ) -> Result<FindingReport, FuzzError> {
        let base = format!(
            "{}-seed{seed}",
            self.args
                .backend
                .to_possible_value()
                .map_or("fuzz".into(), |v| v.get_name().to_string())
        );
        let cut = &actions[..finding.step.min(actions.len())];
        let full = self.write(&self.layout, cut, &finding, &base)?;
        say(format!(
            "reproducer ({} steps): {}",
            cut.len(),
            full.display()
        ));
        let s = shrink::shrink(cut.to_vec(), finding.clone(), self.args.shrink_runs, |c| {
            self.try_run(&self.layout, c)
        });
        let layout = self.fewer_vcpus(&s);
        let shrunk = self.write(&layout, &s.actions, &s.finding, &format!("{base}-min"))?;
        say(format!(
            "shrunk to {} steps in {} runs: {}",
            s.actions.len(),
            s.runs,
            shrunk.display()
        ));
        let mut k = 0;
        for _ in 0..self.args.reruns {
            if self
                .try_run(&layout, &s.actions)
                .is_some_and(|f| f.signature == s.finding.signature)
            {
                k += 1;
            }
        }
        let replay = self.replay_command(&shrunk);
        say(format!(
            "reproduced {k} of {} reruns; replay: {replay}",
            self.args.reruns
        ));
        Ok(FindingReport {
            seed,
            finding: s.finding,
            reproducer: full.display().to_string(),
            steps: cut.len(),
            shrunk: shrunk.display().to_string(),
            shrunk_steps: s.actions.len(),
            reproduced: format!("{k}/{}", self.args.reruns),
            replay,
        })
    }
}

/// The seed of chunk `k` of a campaign.
pub fn chunk_seed(seed: u64, k: u64) -> u64 {
    seed.wrapping_add(k.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Where a sim-tier timeline's memslot changes fail with `--fail-every N`:
/// a step fails if the hash of its text is 0 modulo `N`, at call
/// `(hash / N) % 4` of the step. Chosen by the step itself, not its
/// position, so a step keeps its failure when the shrinker drops others
/// and a reproducer replays with the same flag (0: no failures).
pub fn fault_points(actions: &[Action], every: u64) -> Vec<(usize, usize)> {
    if every == 0 {
        return Vec::new();
    }
    actions
        .iter()
        .enumerate()
        .filter_map(|(i, a)| {
            // FNV-1a of the step as the scenario file describes it.
            let h = crate::scenario::driver::describe(a)
                .bytes()
                .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                    (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
                });
            (h % every == 0).then_some((i, ((h / every) % 4) as usize))
        })
        .collect()
}

/// Runs `vmm fuzz`; returns the exit status (0 clean, 1 finding or error).
pub fn main(args: &FuzzArgs) -> i32 {
    let json = args.json;
    let mut say = |line: String| {
        if json {
            eprintln!("[fuzz] {line}");
        } else {
            println!("[fuzz] {line}");
        }
    };
    // A reproducer replays in the dirty-log mode its header names.
    let mut args = args.clone();
    let replaying = match &args.replay {
        Some(path) => match Scenario::load(path) {
            Ok(sc) => match replay_dirty_log(args.dirty_log, sc.dirty_log.as_deref()) {
                Ok(mode) => {
                    args.dirty_log = Some(mode);
                    Some((path.clone(), sc))
                }
                Err(e) => {
                    eprintln!("vmm fuzz: {}: {e}", path.display());
                    return 2;
                }
            },
            Err(e) => {
                eprintln!("vmm fuzz: {e}");
                return 2;
            }
        },
        None => None,
    };
    let args = &args;
    let campaign = match Campaign::new(args.clone()) {
        Ok(c) => c,
        Err(e @ FuzzError::Flags(_)) => {
            eprintln!("vmm fuzz: {e}");
            return 2;
        }
        Err(e) => {
            eprintln!("vmm fuzz: {e}");
            return 1;
        }
    };
    if let Some(path) = &args.convert {
        return match std::fs::read(path) {
            Ok(data) => {
                let title = path
                    .file_name()
                    .map_or("input".into(), |n| n.to_string_lossy());
                print!(
                    "{}",
                    super::bytes::scenario(&data, &campaign.layout, &title).to_toml()
                );
                0
            }
            Err(e) => {
                eprintln!("vmm fuzz: --convert {}: {e}", path.display());
                2
            }
        };
    }
    if let Some((path, sc)) = replaying {
        return replay(&campaign, &path, sc, &mut say);
    }
    if let Some(range) = args.seeds {
        return run_seeds(&campaign, range, &mut say);
    }
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let (report, status) = run_seed(&campaign, seed, &mut say);
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(j) => println!("{j}"),
            Err(e) => eprintln!("vmm fuzz: cannot encode the report: {e}"),
        }
    }
    status
}

/// `--seeds A..B`: one campaign per seed, past findings; a summary line,
/// and with `--json` an array of the seeds' reports. Exit status 1 if any
/// seed found something.
fn run_seeds(campaign: &Campaign, range: SeedRange, say: &mut dyn FnMut(String)) -> i32 {
    let mut reports = Vec::new();
    let mut status = 0;
    for seed in range.first..=range.last {
        let (report, s) = run_seed(campaign, seed, say);
        status = status.max(s);
        reports.push(report);
    }
    let found: Vec<String> = reports
        .iter()
        .filter(|r| !r.findings.is_empty())
        .map(|r| r.seed.to_string())
        .collect();
    say(format!(
        "seeds {}..{}: {} steps, {} with findings{}",
        range.first,
        range.last,
        reports.iter().map(|r| r.steps).sum::<u64>(),
        found.len(),
        if found.is_empty() {
            String::new()
        } else {
            format!(" (seeds {})", found.join(", "))
        }
    ));
    if campaign.args.json {
        match serde_json::to_string_pretty(&reports) {
            Ok(j) => println!("{j}"),
            Err(e) => eprintln!("vmm fuzz: cannot encode the report: {e}"),
        }
    }
    status
}

/// One seed's campaign: chunks until the budget is spent or a finding;
/// its report and exit status.
fn run_seed(campaign: &Campaign, seed: u64, say: &mut dyn FnMut(String)) -> (FuzzReport, i32) {
    let args = &campaign.args;
    let json = args.json;
    say(format!(
        "seed {seed}, backend {}, {} vCPU(s), arena [{:#x}, {:#x})",
        backend_name(args.backend),
        args.vcpus,
        args.arena_base,
        args.arena_base + args.arena_size
    ));
    let started = Instant::now();
    let total = args
        .steps
        .unwrap_or(if args.time.is_some() { u64::MAX } else { 1000 });
    let mut report = FuzzReport {
        seed,
        backend: args.backend,
        dirty_log: campaign.layout.dirty_log,
        arena: [args.arena_base, args.arena_base + args.arena_size],
        steps: 0,
        runs: 0,
        seconds: 0.0,
        steps_per_sec: 0.0,
        ops: BTreeMap::new(),
        outcomes: BTreeMap::new(),
        findings: Vec::new(),
    };
    let tty = !json && std::io::stderr().is_terminal();
    let mut status = 0;
    let mut k = 0;
    while report.steps < total && args.time.is_none_or(|t| started.elapsed() < t) {
        let cs = chunk_seed(seed, k);
        let n = args.chunk.min(total - report.steps) as usize;
        let actions = generate(cs, &campaign.cfg, &campaign.layout, n);
        let ran = match campaign.run(&actions) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("vmm fuzz: seed {seed} chunk {k} (seed {cs}): {e}");
                status = 1;
                break;
            }
        };
        report.runs += 1;
        report.steps += ran.outcomes.len() as u64;
        for (kind, outcome) in &ran.outcomes {
            *report.ops.entry(kind.clone()).or_default() += 1;
            *report
                .outcomes
                .entry(kind.clone())
                .or_default()
                .entry(outcome.clone())
                .or_default() += 1;
        }
        let rate = report.steps as f64 / started.elapsed().as_secs_f64().max(1e-9);
        if tty {
            let top: Vec<String> = report.ops.iter().map(|(k, v)| format!("{k} {v}")).collect();
            eprint!(
                "\r[fuzz] {} steps, {rate:.0} steps/s, {} finding(s); {}\x1b[K",
                report.steps,
                report.findings.len(),
                top.join(", ")
            );
            let _ = std::io::stderr().flush();
        }
        if args.verbose {
            say(format!(
                "chunk {k} (seed {cs}): {} steps, {rate:.0} steps/s",
                ran.outcomes.len()
            ));
        }
        if let Some(f) = ran.finding {
            if tty {
                eprintln!();
            }
            say(format!("FINDING (seed {seed}, chunk {k}, chunk seed {cs}) at step {} ({}): expected {}, got {}", f.step, f.what, f.expected, f.actual));
            match campaign.report_finding(cs, &actions, f, say) {
                Ok(r) => report.findings.push(r),
                Err(e) => eprintln!("vmm fuzz: {e}"),
            }
            status = 1;
            break;
        }
        k += 1;
    }
    if tty {
        eprintln!();
    }
    report.seconds = started.elapsed().as_secs_f64();
    report.steps_per_sec = report.steps as f64 / report.seconds.max(1e-9);
    say(format!(
        "seed {seed}: {} steps in {} VM(s), {:.1} s, {:.0} steps/s, {} finding(s)",
        report.steps,
        report.runs,
        report.seconds,
        report.steps_per_sec,
        report.findings.len()
    ));
    (report, status)
}

/// The dirty-log mode a reproducer replays in: its `dirty_log` header, as
/// `vmm run --scenario` takes it (a reproducer is written with the header
/// of the mode it failed in, so the replay needs no flag); `flag` where the
/// file has no header (else bitmap).
///
/// # Errors
/// [`FuzzError::Flags`] if `flag` names another mode than the header: the
/// replay would run another VM than the one the file describes.
pub fn replay_dirty_log(
    flag: Option<DirtyLogMode>,
    header: Option<&str>,
) -> Result<DirtyLogMode, FuzzError> {
    let Some(header) = header else {
        return Ok(flag.unwrap_or_default());
    };
    let mode: DirtyLogMode = header
        .parse()
        .map_err(|e| FuzzError::Flags(format!("the header's dirty_log {header:?}: {e}")))?;
    match flag {
        Some(f) if f != mode => Err(FuzzError::Flags(format!(
            "--dirty-log {f} conflicts with the file's header dirty_log = \"{mode}\" (drop the flag: a replay runs in the file's mode)"
        ))),
        _ => Ok(mode),
    }
}

/// The finding if the process holds more than `before` now that a VM
/// that ran `steps` steps (the last `last`) is torn down ([`leaks`]).
fn leak_finding(before: &leaks::Snapshot, steps: usize, last: Option<&Action>) -> Option<Finding> {
    let (name, detail) = leaks::Snapshot::now().leaked_since(before)?;
    Some(Finding {
        step: steps,
        kind: last.map_or("run", |a| a.kind()).to_string(),
        what: "the VM's teardown after the last step".into(),
        expected: "nothing left of the VM".into(),
        actual: format!("invariant {name} broken: {detail}"),
        signature: format!("invariant:{name}"),
    })
}

fn replay(campaign: &Campaign, path: &Path, sc: Scenario, say: &mut dyn FnMut(String)) -> i32 {
    // The VM the file describes (its dirty-log mode is in the campaign's
    // layout already, see `replay_dirty_log`).
    let mut layout = campaign.layout.clone();
    layout.ram.1 = sc.mem.map_or(layout.ram.1, |m| m.0);
    layout.vcpus = sc.vcpus.unwrap_or(layout.vcpus);
    if let Some(limit) = &sc.pin_limit {
        // Validated when the file was read.
        if let Ok(l) = limit.parse::<crate::mm::pin_account::PinLimit>() {
            layout.pin_limit = l.pages();
        }
    }
    let before = leaks::Snapshot::now();
    let steps = sc.steps.len();
    let last = sc.steps.last().map(|s| s.action.clone());
    let result = match campaign.args.backend {
        Backend::Sim => {
            let actions: Vec<Action> = sc.steps.iter().map(|s| s.action.clone()).collect();
            let faults = campaign.faults(&actions);
            sim::run_with(
                &layout,
                &actions,
                &sim::SimOptions {
                    faults: &faults,
                    guard_reader: campaign.args.guard_reader,
                    probe_every: campaign.args.probe_every,
                    ..Default::default()
                },
            )
            .map_err(FuzzError::from)
        }
        Backend::Real => real::run(sc, &layout, Duration::from_secs(60)).map_err(FuzzError::from),
    };
    let result = result.map(|f| f.or_else(|| leak_finding(&before, steps, last.as_ref())));
    match result {
        Ok(None) => {
            say(format!("{}: every step as predicted", path.display()));
            0
        }
        Ok(Some(f)) => {
            say(format!(
                "{}: step {} ({}): expected {}, got {}",
                path.display(),
                f.step,
                f.what,
                f.expected,
                f.actual
            ));
            1
        }
        Err(e) => {
            eprintln!("vmm fuzz: {e}");
            1
        }
    }
}
