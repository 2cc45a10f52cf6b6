//! The orchestration of `vmm bench faults`: per configuration, the test
//! memory and its userfaultfd handler, the phases (prefault the result
//! buffers, timed first touch with the churn writer beside it, DONTNEED (or
//! re-arm) + timed re-fault, uffd verify) with KVM counters read between
//! them, then the baselines; the rounds of a configuration (`rounds`), of a
//! replay comparison (`replay_rounds`) and of the `--scaling` sweep.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;

use super::churn::attribution::{attribute, TimedAccess};
use super::churn::ops::ChurnTarget;
use super::churn::Writer;
use super::config::{Access, Backing, ConfigError, FaultsConfig, GuestPage, Share, TEST_BASE};
use super::error::BenchError;
use super::guest::GuestBench;
use super::host::Prefill;
use super::progress::Progress;
use super::report::{
    self, Baselines, ConfigResult, FaultsReport, PassResult, ScalingRow, Settings,
};
use super::stats::{counter_delta, ticks_to_ns, Summary};
use super::uffd::{Armed, Event, Handler, HandlerConfig, Mode, Outcome, UffdCounts, UffdError};
use super::workset::prefetch;
use super::workset::replay::{ReplayPass, ReplayResult};
use super::workset::{Prefetch, RecordOutput, Workset};
use super::{host, plan, raw, timeline};
use crate::mm::addr::{Gpa, GpaRange, PAGE_SIZE};
use crate::mm::backing::{BackingError, BackingKind, HostMapping};
use crate::plan::Command;

/// Runs every configuration of `cfg`, printing a table per configuration to
/// `out` as it completes; returns the whole report.
pub fn run_faults(cfg: &FaultsConfig, out: &mut dyn Write) -> Result<FaultsReport, BenchError> {
    cfg.validate()?;
    let kvm = Kvm::new().map_err(|e| BenchError::Setup(format!("cannot open /dev/kvm: {e}")))?;
    let pdpe1gb = host::kvm_has_pdpe1gb(&kvm);
    if cfg.guest_page == GuestPage::Size1G && !pdpe1gb {
        return Err(ConfigError::NoGigPages.into());
    }
    if cfg.pre_fault_memory {
        return Err(if host::kvm_has_pre_fault_memory(&kvm) {
            ConfigError::PreFaultMemoryNotIssued
        } else {
            ConfigError::NoPreFaultMemory
        }
        .into());
    }
    drop(kvm);
    let replay = cfg
        .workset
        .replay
        .as_deref()
        .map(|p| Workset::read(p, cfg.size))
        .transpose()
        .map_err(|e| ConfigError::Workset(e.to_string()))?;
    let mut record = cfg
        .workset
        .record
        .as_deref()
        .map(|path| {
            RecordOutput::create(path).map_err(|e| ConfigError::Output {
                what: "the working-set record",
                path: path.to_path_buf(),
                reason: e.to_string(),
            })
        })
        .transpose()?;
    let mut results = Vec::new();
    let mut tsc_khz = 0;
    let mut interrupted = None;
    let mut scaling = Vec::new();
    if cfg.scaling {
        let sweep = scaling_configs(cfg)?;
        interrupted = run_scaling(&sweep, out, &mut scaling, &mut tsc_khz)?;
        let _ = write!(out, "{}", report::scaling_table(&scaling));
    }
    for backing in cfg.backings.iter().filter(|_| !cfg.scaling) {
        if let Some(signal) = super::interrupt::caught() {
            interrupted = Some(signal);
            break;
        }
        let measured = match &replay {
            Some(set) => replay_rounds(cfg, backing, set),
            None => rounds(cfg, backing),
        };
        let r = match measured {
            Err(BenchError::Interrupted(signal)) => {
                interrupted = Some(signal);
                break;
            }
            other => other?,
        };
        if let (Some(out), Some(pass)) = (record.as_mut(), r.passes.first()) {
            out.write(&Workset::from_touches(cfg.size, &pass.touches, r.tsc_khz))?;
        }
        tsc_khz = tsc_khz.max(r.tsc_khz);
        let _ = write!(out, "{}", report::table(cfg, &r));
        let _ = out.flush();
        results.push(r);
    }
    let host = host::HostFacts::collect(tsc_khz, pdpe1gb);
    // An interrupted run's recording is partial: it replaces nothing.
    if let Some(out) = record.filter(|_| interrupted.is_none()) {
        let path = cfg.workset.record.clone().unwrap_or_default();
        out.keep().map_err(|e| ConfigError::Output {
            what: "the working-set record",
            path,
            reason: format!("renaming the finished recording into place: {e}"),
        })?;
    }
    let report = FaultsReport {
        host,
        settings: Settings::from(cfg),
        configurations: results,
        interrupted,
        scaling,
    };
    if report.configurations.len() > 1 {
        let _ = write!(out, "{}", report::comparison(&report));
    }
    Ok(report)
}

/// The `--scaling` sweep: per backing, per vCPU count, a configuration of
/// that many vCPUs on disjoint parts of `--size` each; all validated before
/// any runs.
fn scaling_configs(cfg: &FaultsConfig) -> Result<Vec<(Backing, FaultsConfig)>, BenchError> {
    let mut sweep = Vec::new();
    for backing in &cfg.backings {
        for n in cfg.scaling_counts(host::online_cpus() as u64) {
            let sub = FaultsConfig {
                vcpus: n,
                size: cfg.size * n,
                share: Share::Disjoint,
                backings: vec![backing.clone()],
                scaling: false,
                ..cfg.clone()
            };
            sub.validate()?;
            sweep.push((backing.clone(), sub));
        }
    }
    Ok(sweep)
}

/// Runs the sweep, printing each configuration's table; the signal that
/// stopped it, if one did.
fn run_scaling(
    sweep: &[(Backing, FaultsConfig)],
    out: &mut dyn Write,
    rows: &mut Vec<ScalingRow>,
    tsc_khz: &mut u32,
) -> Result<Option<&'static str>, BenchError> {
    for (backing, sub) in sweep {
        let mut r: Option<ConfigResult> = None;
        for round in 0..sub.rounds {
            if let Some(signal) = super::interrupt::caught() {
                return Ok(Some(signal));
            }
            match run_one(sub, backing, round % 2 == 1, None) {
                Err(BenchError::Interrupted(signal)) => return Ok(Some(signal)),
                Ok(one) => match r.as_mut() {
                    Some(r) => r.merge(one),
                    None => r = Some(one),
                },
                Err(e) => return Err(e),
            }
        }
        let Some(r) = r else { continue };
        *tsc_khz = (*tsc_khz).max(r.tsc_khz);
        let _ = write!(out, "{}", report::table(sub, &r));
        if let Some(p) = r.pass("first-touch") {
            rows.push(ScalingRow {
                backing: backing.to_string(),
                vcpus: sub.vcpus,
                pages: p.pages * u64::from(r.rounds),
                pages_per_sec: p.faults_per_sec,
                raw_pages_per_sec: r
                    .baselines
                    .as_ref()
                    .and_then(|b| b.raw.as_ref())
                    .map(|raw| raw.pages_per_sec),
                p50_ns: p.latency_ns.p50,
                p99_ns: p.latency_ns.p99,
                uffd: p.uffd.clone(),
            });
        }
    }
    Ok(None)
}

/// Every round of one configuration, merged; rounds alternate whether the
/// baselines or the tool go first.
fn rounds(cfg: &FaultsConfig, backing: &Backing) -> Result<ConfigResult, BenchError> {
    let mut r = run_one(cfg, backing, false, None)?;
    for round in 1..cfg.rounds {
        if r.skipped.is_some() {
            break;
        }
        r.merge(run_one(cfg, backing, round % 2 == 1, None)?);
    }
    Ok(r)
}

/// `--replay`: every round of the configuration twice, each on fresh memory
/// and a fresh VM: as usual, and with `set` prefetched before the VM is
/// built (that run without baselines). Rounds alternate which of
/// the two goes first, since the second allocates memory the first just
/// freed. Returns the usual result with the comparison attached.
fn replay_rounds(
    cfg: &FaultsConfig,
    backing: &Backing,
    set: &Workset,
) -> Result<ConfigResult, BenchError> {
    let quiet = FaultsConfig {
        baselines: false,
        ..cfg.clone()
    };
    let mut without: Option<ConfigResult> = None;
    let mut with: Option<ConfigResult> = None;
    let add = |acc: &mut Option<ConfigResult>, r: ConfigResult| match acc {
        Some(a) => a.merge(r),
        None => *acc = Some(r),
    };
    for round in 0..cfg.rounds {
        let prefetch_first = round % 2 == 1;
        for prefetched in [prefetch_first, !prefetch_first] {
            if prefetched {
                add(&mut with, run_one(&quiet, backing, false, Some(set))?);
            } else {
                add(&mut without, run_one(cfg, backing, round % 2 == 1, None)?);
            }
        }
        if without.as_ref().is_some_and(|r| r.skipped.is_some()) {
            break;
        }
    }
    let (Some(mut without), Some(with)) = (without, with) else {
        unreachable!("at least one round ran both");
    };
    if without.skipped.is_some() || with.skipped.is_some() {
        return Ok(without);
    }
    let per_round = |r: &ConfigResult| {
        let rounds = f64::from(r.rounds.max(1));
        r.passes
            .first()
            .map_or_else(ReplayPass::default, |p| ReplayPass {
                pf_fixed: p.kvm("pf_fixed") as f64 / rounds,
                uffd_faults: p.uffd.as_ref().map_or(0.0, |u| u.faults as f64) / rounds,
                guest_ms: p.samples_ns.iter().sum::<f64>() / 1e6 / rounds,
                wall_ms: p.wall_ms / rounds,
            })
    };
    let prefetch_ms = with.prefill.as_ref().map_or(0.0, |p| p.ms) / f64::from(with.rounds.max(1));
    let mut result = ReplayResult::new(
        cfg.workset.prefetch,
        set.pages.len() as u64,
        prefetch_ms,
        per_round(&without),
        per_round(&with),
    );
    result.with_verified = with.uffd_verified;
    without.replay = Some(result);
    Ok(without)
}

/// Runs one configuration: phases, then its baselines.
/// With `raw_first`, the baselines run before the tool (rounds alternate so
/// neither side always gets the warmer host). With `prefetch`, that working
/// set is prefetched (`--prefetch`) before the VM is built.
fn run_one(
    cfg: &FaultsConfig,
    backing: &Backing,
    raw_first: bool,
    prefetch: Option<&Workset>,
) -> Result<ConfigResult, BenchError> {
    let mut notes = Vec::new();
    let early = if cfg.baselines && raw_first {
        Some(baselines(cfg, backing)?)
    } else {
        None
    };
    let (test, mut prefill) = match host::map_prefilled(backing, cfg.size) {
        Ok((m, p)) => (Arc::new(m), p),
        Err(e @ BackingError::NoHugePages { .. }) => {
            return Ok(ConfigResult::skipped(backing, e.to_string()));
        }
        Err(e) => return Err(e.into()),
    };
    let cpus: Vec<Option<usize>> = (0..cfg.vcpus).map(|i| host::vcpu_cpu(cfg, i)).collect();
    let armed =
        match Mode::of(backing).map(|m| Armed::new(m, &test, &cfg.uffd_parts(), cfg.seed, true)) {
            None => None,
            Some(Ok(a)) => Some(Arc::new(a)),
            Some(Err(e @ UffdError::Unsupported { .. })) => {
                return Ok(ConfigResult::skipped(backing, e.to_string()));
            }
            Some(Err(e)) => return Err(e.into()),
        };
    if let (Some(set), Prefetch::Copy, Some(armed)) =
        (prefetch, cfg.workset.prefetch, armed.as_deref())
    {
        prefill = Some(prefetch::copy(armed, set)?);
    }
    let handler = armed
        .as_ref()
        .map(|a| {
            let hc = HandlerConfig {
                threads: cfg.uffd_handlers as usize,
                delay: cfg.handler_delay,
                cpus: host::uffd_handler_cpus(cfg),
            };
            Handler::spawn(a.clone(), &hc)
        })
        .transpose()?;
    match (prefetch, cfg.workset.prefetch) {
        (Some(set), Prefetch::Populate) => prefill = Some(prefetch::populate(&test, set)?),
        (Some(_), Prefetch::None) => {
            prefill = Some(Prefill {
                method: "none",
                pages: 0,
                calls: 0,
                ms: 0.0,
            })
        }
        _ => {}
    }
    let mut bench = GuestBench::new(cfg, test.clone(), &cpus)?;
    let tsc_khz = bench.tsc_khz();
    let uffd = armed.as_deref().zip(handler.as_ref());
    let outcome = measure(cfg, backing, &mut bench, &test, uffd);
    bench.shutdown();
    drop(handler);
    let Measured {
        passes,
        verified: uffd_verified,
        notes: measured_notes,
    } = outcome?;
    notes.extend(measured_notes);
    let baselines = match early {
        Some(b) => Some(b),
        None if cfg.baselines => Some(baselines(cfg, backing)?),
        None => None,
    };
    let mut result = ConfigResult {
        backing: backing.to_string(),
        skipped: None,
        passes,
        baselines,
        uffd_verified,
        notes,
        tsc_khz,
        rounds: 1,
        prefill,
        replay: None,
    };
    result.finish();
    Ok(result)
}

fn take_uffd(h: Option<&Handler>) -> Result<Option<Vec<Event>>, BenchError> {
    h.map(|h| {
        h.take()
            .map_err(|detail| BenchError::Setup(format!("uffd handler: {detail}")))
    })
    .transpose()
}

/// What the phases of one configuration produced.
struct Measured {
    passes: Vec<PassResult>,
    verified: Option<bool>,
    notes: Vec<String>,
}

/// The phases of one configuration on a ready VM.
fn measure(
    cfg: &FaultsConfig,
    backing: &Backing,
    bench: &mut GuestBench,
    test: &Arc<HostMapping>,
    uffd: Option<(&Armed, &Handler)>,
) -> Result<Measured, BenchError> {
    let handler = uffd.map(|(_, h)| h);
    let prepare = (0..bench.ram.results.len())
        .map(|i| {
            let (gpa, len) = bench.ram.results[i];
            let mut cmds = vec![plan::prefault_command(gpa, len)];
            if let Some(&(gpa, len)) = bench.ram.stamps.get(i) {
                cmds.push(plan::prefault_command(gpa, len));
            }
            cmds
        })
        .collect();
    let mut notes = Vec::new();
    bench.phase(prepare, cfg.timeout, |_| {})?;
    let mut passes = Vec::new();
    let names: &[&'static str] = if cfg.refault {
        &["first-touch", "re-fault"]
    } else {
        &["first-touch"]
    };
    for (k, name) in names.iter().enumerate() {
        if k > 0 {
            // The mmu-notifier path: the host drops the pages (or the
            // PTEs, or write access), KVM zaps its mappings; the next
            // touch faults again.
            match uffd {
                Some((armed, _)) => armed.rearm()?,
                None => {
                    test.discard(0, test.len())?;
                    host::prefill(backing, test)?;
                }
            }
        }
        let _ = take_uffd(handler)?;
        let before = bench.counters()?;
        let commands: Vec<Vec<Command>> = (0..cfg.vcpus)
            .map(|i| {
                let results = bench.ram.results[i as usize].0;
                let cmds = plan::pass_commands(cfg, i, results);
                match bench.ram.stamps.get(i as usize) {
                    Some(&(stamps, _)) => plan::with_stamps(cmds, results, stamps),
                    None => cmds,
                }
            })
            .collect();
        let total = commands.iter().map(|c| c.len() as u64).sum();
        let progress = Progress::new(
            cfg.progress,
            format!("{backing} {name}"),
            total,
            bench.progress.load(std::sync::atomic::Ordering::Relaxed),
        );
        let writer = start_churn(cfg, bench, test)?;
        let t = Instant::now();
        let phase_start = super::tsc::host_tsc();
        let phase = bench.phase(commands, cfg.timeout, |n| progress.tick(n));
        let phase_end = super::tsc::host_tsc();
        let wall = t.elapsed();
        let log = writer.map(Writer::finish);
        bench.set_retry_efault(false);
        phase?;
        progress.finish();
        let kvm = counter_delta(&bench.counters()?, &before);
        let events = take_uffd(handler)?;
        let mut pass = pass_result(cfg, bench, name, wall, kvm, events, test.hva().0);
        if cfg.wants_stamps() {
            pass.touches = timeline::touches(cfg, bench)?;
            timeline::check_on_host_clock(&pass.touches, phase_start, phase_end)?;
        }
        if let Some(log) = log {
            let accesses: Vec<TimedAccess> = pass
                .touches
                .iter()
                .map(|t| TimedAccess {
                    start: t.start,
                    ticks: t.ticks,
                })
                .collect();
            let ns_per_tick = 1e6 / f64::from(bench.tsc_khz().max(1));
            pass.churn = Some(attribute(&accesses, &log.windows, ns_per_tick));
            for e in log.errors {
                let e = format!("churn op failed during {name}: {e}");
                if !notes.contains(&e) {
                    notes.push(e);
                }
            }
        }
        passes.push(pass);
    }
    let retries = bench
        .efault_retries
        .swap(0, std::sync::atomic::Ordering::Relaxed);
    if retries > 0 {
        notes.push(format!("{retries} KVM_RUN calls failed with EFAULT on a page churn made read-only and were retried (the access waited)"));
    }
    let mut verified = None;
    if Mode::of(backing).is_some_and(Mode::has_pattern) {
        if cfg.access == Access::Read {
            let verify = (0..cfg.vcpus)
                .map(|i| {
                    let (off, len) = cfg.part(i);
                    let range =
                        GpaRange::new(Gpa(TEST_BASE + off), len).expect("inside the test range");
                    vec![Command::verify(range, cfg.seed)]
                })
                .collect();
            match bench.phase(verify, cfg.timeout, |_| {}) {
                Ok(_) => verified = Some(true),
                Err(BenchError::Guest { vcpu, detail }) => {
                    verified = Some(false);
                    notes.push(format!(
                        "guest VERIFY of the pages the handler mapped failed on vCPU {vcpu}: {detail}"
                    ));
                }
                Err(e) => return Err(e),
            }
        } else {
            notes.push("mapped content not verified: write accesses change the first byte of each touched page (use --access read)".into());
        }
    }
    Ok(Measured {
        passes,
        verified,
        notes,
    })
}

fn pass_result(
    cfg: &FaultsConfig,
    bench: &GuestBench,
    name: &'static str,
    wall: Duration,
    kvm: BTreeMap<String, i64>,
    events: Option<Vec<Event>>,
    test_hva: u64,
) -> PassResult {
    let tsc = bench.tsc_khz();
    let tids = bench.vcpu_tids();
    let events: Option<Vec<Event>> = events.map(|ev| {
        ev.into_iter()
            .map(|e| Event {
                page: e.page - test_hva,
                ..e
            })
            .collect()
    });
    let labels = events.as_deref().map(OutcomeLabels::new);
    let mut samples = Vec::new();
    let mut by_outcome: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut busiest = 0u64;
    let mut touched = Vec::new();
    for i in 0..cfg.vcpus {
        let ticks = bench.results(i as usize, cfg.accesses(i));
        busiest = busiest.max(ticks.iter().sum());
        let offsets = plan::touched_offsets(cfg, i);
        let mut seen = HashSet::new();
        for (&t, &off) in ticks.iter().zip(&offsets) {
            let ns = ticks_to_ns(t, tsc);
            samples.push(ns);
            let page = off & !(PAGE_SIZE - 1);
            if let Some(labels) = &labels {
                // Only a vCPU's first access to a page can fault.
                let label = if seen.insert(page) {
                    labels.of(page, tids[i as usize])
                } else {
                    NO_MESSAGE.to_string()
                };
                by_outcome.entry(label).or_default().push(ns);
            }
        }
        touched.extend(offsets.into_iter().map(|o| o & !(PAGE_SIZE - 1)));
    }
    touched.sort_unstable();
    touched.dedup();
    let busy_s = ticks_to_ns(busiest, tsc) / 1e9;
    let (uffd_pages, uffd_counts, uffd_events) = match events {
        Some(ev) => {
            let mut p: Vec<u64> = ev
                .iter()
                .filter(|e| matches!(e.outcome, Outcome::Resolved | Outcome::EagainRetry))
                .map(|e| e.page)
                .collect();
            p.sort_unstable();
            (p, Some(UffdCounts::of(&ev)), ev)
        }
        None => (Vec::new(), None, Vec::new()),
    };
    PassResult {
        pass: name,
        accesses: samples.len() as u64,
        pages: touched.len() as u64,
        latency_ns: Summary::from_ns(&samples),
        faults_per_sec: if busy_s > 0.0 {
            samples.len() as f64 / busy_s
        } else {
            0.0
        },
        wall_ms: wall.as_secs_f64() * 1e3,
        kvm,
        uffd: uffd_counts,
        histogram_log2: Vec::new(),
        latency_by_outcome: BTreeMap::new(),
        samples_ns: samples,
        samples_by_outcome: by_outcome,
        uffd_events,
        vcpu_tids: tids,
        touched_pages: touched,
        uffd_pages,
        churn: None,
        touches: Vec::new(),
    }
}

/// The label of an access no fault message of its vCPU was read for.
const NO_MESSAGE: &str = "no-message";

/// Which outcome each (page, faulting thread) had: the first message's.
/// Without thread ids (tid 0 in every message) a page's first message
/// labels every vCPU's first access to it.
struct OutcomeLabels {
    by_thread: HashMap<(u64, u32), Outcome>,
}

impl OutcomeLabels {
    fn new(events: &[Event]) -> Self {
        let mut by_thread = HashMap::new();
        for e in events {
            by_thread.entry((e.page, e.tid)).or_insert(e.outcome);
        }
        Self { by_thread }
    }

    fn of(&self, page: u64, tid: u32) -> String {
        self.by_thread
            .get(&(page, tid))
            .or_else(|| self.by_thread.get(&(page, 0)))
            .map_or(NO_MESSAGE.to_string(), |o| o.to_string())
    }
}

/// Starts the churn writer for a timed pass, if `--churn` asked for one.
fn start_churn(
    cfg: &FaultsConfig,
    bench: &GuestBench,
    test: &Arc<HostMapping>,
) -> Result<Option<Writer>, BenchError> {
    if cfg.churn.ops.is_empty() {
        return Ok(None);
    }
    let neighbour = Arc::new(HostMapping::new(
        &BackingKind::Anon,
        crate::mm::addr::HUGE_2M,
    )?);
    bench.set_retry_efault(cfg.churn.makes_read_only());
    let target = ChurnTarget {
        memory: bench.memory().clone(),
        test: test.clone(),
        base: Gpa(TEST_BASE),
        neighbour,
    };
    Writer::start(target, &cfg.churn)
        .map(Some)
        .map_err(|e| BenchError::Setup(format!("spawning the churn writer: {e}")))
}

/// The raw-KVM and host-only baselines (samples only; summaries and ratios
/// are computed by [`ConfigResult::finish`]).
fn baselines(cfg: &FaultsConfig, backing: &Backing) -> Result<Baselines, BenchError> {
    let r = raw::run(cfg, backing)?;
    let ns = |t: &[u64]| -> Vec<f64> { t.iter().map(|&t| ticks_to_ns(t, r.tsc_khz)).collect() };
    let raw = Some(report::RawBaseline {
        first: Summary::default(),
        refault: None,
        pages_per_sec: raw_pages_per_sec(cfg, &r.first, r.tsc_khz),
        samples_ns: ns(&r.first),
        refault_samples_ns: ns(&r.refault),
    });
    let tsc = raw_tsc_khz()?;
    let offsets = plan::touched_offsets(cfg, 0);
    let host_ticks = host::first_touch(backing, cfg.size, &offsets, cfg.access)?;
    Ok(Baselines {
        raw,
        ratio_tool_to_raw: None,
        ratio_tool_to_raw_mean: None,
        host: Summary::default(),
        host_kind: match (backing.is_uffd(), backing.host_kind()) {
            (true, Some(kind)) => format!("{kind} (no userfaultfd)"),
            _ => backing.to_string(),
        },
        ratio_guest_to_host: f64::NAN,
        host_samples_ns: host_ticks.iter().map(|&t| ticks_to_ns(t, tsc)).collect(),
    })
}

/// Accesses per second of guest time on the raw baseline's slowest vCPU
/// (`ticks` holds every vCPU's accesses, concatenated in vCPU order).
fn raw_pages_per_sec(cfg: &FaultsConfig, ticks: &[u64], tsc_khz: u32) -> f64 {
    let mut at = 0;
    let mut busiest = 0u64;
    for i in 0..cfg.vcpus {
        let n = cfg.accesses(i) as usize;
        let end = (at + n).min(ticks.len());
        busiest = busiest.max(ticks[at..end].iter().sum());
        at = end;
    }
    let s = ticks_to_ns(busiest, tsc_khz) / 1e9;
    if s > 0.0 {
        ticks.len() as f64 / s
    } else {
        0.0
    }
}

/// The TSC frequency KVM gives a fresh vCPU (guest TSC = host TSC on this
/// kind of host; used to convert the host floor's `rdtsc` ticks).
fn raw_tsc_khz() -> Result<u32, BenchError> {
    let e = |what: &str, err: kvm_ioctls::Error| BenchError::Setup(format!("{what}: {err}"));
    let kvm = Kvm::new().map_err(|x| e("open /dev/kvm", x))?;
    let vm = kvm.create_vm().map_err(|x| e("KVM_CREATE_VM", x))?;
    let vcpu = vm.create_vcpu(0).map_err(|x| e("KVM_CREATE_VCPU", x))?;
    vcpu.get_tsc_khz().map_err(|x| e("KVM_GET_TSC_KHZ", x))
}
