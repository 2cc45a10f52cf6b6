//! `vmm run`, in steps: build the VM, attach its devices, start a thread per
//! vCPU (and the scenario driver's), run the main thread's event loop
//! (event-manager: console output, vCPU completion, the timeout and
//! SIGINT/SIGTERM) until every vCPU has reported, tear down, report.
//! A single vCPU without a scenario runs on the calling thread instead,
//! stopped by signals (`on_caller.rs`, `stop_signals.rs`).
//!
//! A run always ends with a [`RunReport`]: on success, on a guest failure, on
//! timeout and on a signal alike. Only a VM that cannot be built is an `Err`.
//!
//! A run starts only what its guest can use: built-in guests never program
//! the DMA engine nor pin, so their VMs get no devices (the engine's thread
//! would be most of the setup cost of a trivial guest after KVM's own).

mod config;
mod devices;
mod error;
mod event_loop;
mod events;
mod on_caller;
pub mod report;
#[cfg(all(test, vmm_loom))]
mod stop_loom_tests;
mod stop_signals;
mod threads;

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::failure::GuestFailure;
use crate::mm::pin_account::PinStats;
use crate::plan::{PhaseBarrier, VcpuPlan};
use crate::scenario::driver::{channel_pair, Driver, VcpuLink};
use crate::scenario::{Scenario, ScenarioReport};
use crate::units::fmt_duration;
use crate::vcpu::{self, VcpuContext, VcpuReport};
use crate::vm::{Counters, Vm, VmSpec};
pub use config::{GuestSource, RunConfig, Verbosity};
use devices::{DeviceReport, Devices};
use error::setup_err;
pub use error::RunError;
use event_loop::{EventLoop, LoopOutcome};
use events::StopCause;
pub use report::RunReport;
use threads::{DriverThread, VcpuThreads};

/// How a run ends its VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Teardown {
    /// Delete every memslot and unmap guest memory: the process goes on.
    Full,
    /// The process exits right after the run (the `vmm` command): leave the
    /// memslots and guest memory to the kernel, which tears the VM and the
    /// mappings down together at exit, instead of deleting slots one by one
    /// (an SRCU grace period each).
    ProcessExits,
}

/// Where a run prints: the guest console, progress, the summary.
type ConsoleOut = Box<dyn Write + Send>;

/// Runs the guest described by `config`, printing console output to
/// `console`, with a [`Teardown::Full`].
pub fn run(config: &RunConfig, console: ConsoleOut) -> Result<RunReport, RunError> {
    run_with(config, console, Teardown::Full)
}

/// As [`run`], ending the VM as `teardown` says.
pub fn run_with(
    config: &RunConfig,
    console: ConsoleOut,
    teardown: Teardown,
) -> Result<RunReport, RunError> {
    let t_setup = Instant::now();
    let mut vm = build_vm(config)?;
    let mut console = console;
    if config.verbosity >= Verbosity::Verbose {
        let m = vm.memslots();
        let ring = match config.dirty_log {
            crate::mm::manager::DirtyLogMode::Ring => {
                format!(", {} KiB ring per vCPU", m.ring_bytes() >> 10)
            }
            _ => String::new(),
        };
        // The console is the run's output; a failed write only loses a line.
        let _ = writeln!(
            console,
            "[vmm] memslots via {}; dirty log {}{ring}; memslot zap {}",
            m.memslot_ioctl(),
            config.dirty_log,
            vm.zap_policy
        );
    }
    let devices = Devices::attach(&vm, config.may_use_devices())?;
    let ran = if on_caller::runs_on_caller(config) {
        on_caller::run(config, &mut vm, &devices, console, t_setup)?
    } else {
        run_on_threads(config, &mut vm, &devices, console, t_setup)?
    };
    let devices = devices.detach()?;
    let facts = VmFacts::read(&vm);

    let t_teardown = Instant::now();
    if teardown == Teardown::ProcessExits {
        vm.memory.keep_memory_at_drop();
    }
    drop(vm);
    let timings = PhaseTimes {
        setup: ran.setup,
        run: ran.run,
        teardown: t_teardown.elapsed(),
    };
    let mut console = ran.console;
    let report = build_report(config, ran.outcome, ran.scenario, devices, facts, &timings);
    if config.verbosity > Verbosity::Quiet {
        print_summary(&mut *console, &report, &timings);
    }
    Ok(report)
}

/// What running the vCPUs gave.
struct Ran {
    outcome: LoopOutcome,
    scenario: Option<ScenarioReport>,
    /// The console, back from the loop or the vCPU.
    console: ConsoleOut,
    /// From `run_with`'s start until the vCPUs could start.
    setup: Duration,
    run: Duration,
}

/// Runs a thread per vCPU (and the scenario driver's) under the event loop
/// until every vCPU has reported.
fn run_on_threads(
    config: &RunConfig,
    vm: &mut Vm,
    devices: &Devices,
    console: ConsoleOut,
    t_setup: Instant,
) -> Result<Ran, RunError> {
    let mut events = EventLoop::new(config, console)?;
    let setup = t_setup.elapsed();

    let t_run = Instant::now();
    let mut started = start_threads(config, vm, devices, &events)?;
    events.run_until_reported(&started.vcpus)?;
    started.vcpus.join_reported();
    let scenario = started.driver.map(DriverThread::join);
    let run = t_run.elapsed();
    events.drain_console();
    Ok(Ran {
        outcome: events.take_outcome(),
        scenario,
        console: events.close(),
        setup,
        run,
    })
}

/// Builds the VM and readies its vCPUs to be kicked.
fn build_vm(config: &RunConfig) -> Result<Vm, RunError> {
    let image: Arc<[u8]> = match &config.guest {
        GuestSource::Builtin(_) => Arc::from(guest_image::RUNTIME_ELF),
        GuestSource::Image { bytes, .. } => bytes.clone(),
    };
    let spec = VmSpec {
        vcpus: config.vcpus,
        mem_size: config.mem_size,
        backing: config.backing.clone(),
        image,
        pin_limit: config.pin_limit,
        hotplug: config.scenario.is_some(),
        kvm_stats: config.kvm_stats,
        memslot_zap: config.memslot_zap,
    };
    let dirty = crate::vm::DirtyLogConfig {
        mode: config.dirty_log,
        ring_bytes: config.dirty_ring_bytes,
    };
    let vm = Vm::with_dirty_log(&spec, dirty)?;
    vcpu::install_kick_handler().map_err(setup_err("installing the vCPU kick handler"))?;
    Ok(vm)
}

/// The threads a run started.
#[derive(Debug)]
struct Started {
    vcpus: VcpuThreads,
    driver: Option<DriverThread>,
}

/// Starts a thread per vCPU, then the scenario driver's if there is one.
fn start_threads(
    config: &RunConfig,
    vm: &mut Vm,
    devices: &Devices,
    events: &EventLoop,
) -> Result<Started, RunError> {
    let stop = Arc::new(AtomicBool::new(false));
    let barrier = Arc::new(PhaseBarrier::new(config.vcpus as usize));
    let mut vcpus = VcpuThreads::new(stop.clone(), barrier.clone());
    let mut links = Vec::new();
    for (index, fd) in vm.take_vcpus().into_iter().enumerate() {
        let index = index as u64;
        let plan = vcpu_plan(config, vm, index, &stop, &barrier, &mut links);
        let ctx = VcpuContext {
            index,
            vcpus: config.vcpus,
            entry: vm.entry,
            boot: vm.boot.clone(),
            memory: vm.memory.clone(),
            dma: devices.dma(),
            plan,
            console: events.console_sender()?,
            stop: stop.clone(),
            progress: config.verbosity >= Verbosity::Verbose,
        };
        let handle = threads::spawn_vcpu(index, fd, ctx, events.report_sender()?)
            .map_err(setup_err("spawning a vCPU thread"))?;
        vcpus.push(handle);
    }
    let driver = match &config.scenario {
        None => None,
        Some(scenario) => {
            let driver = scenario_driver(config, scenario, vm, devices, events, links, stop)?;
            let thread =
                DriverThread::spawn(driver).map_err(setup_err("spawning the scenario thread"))?;
            Some(thread)
        }
    };
    Ok(Started { vcpus, driver })
}

/// vCPU `index`'s plan: a link to the scenario driver (kept in `links`), or
/// the built-in program's.
fn vcpu_plan(
    config: &RunConfig,
    vm: &Vm,
    index: u64,
    stop: &Arc<AtomicBool>,
    barrier: &Arc<PhaseBarrier>,
    links: &mut Vec<VcpuLink>,
) -> Box<dyn VcpuPlan> {
    if config.scenario.is_some() {
        let (plan, link) = channel_pair(stop.clone());
        links.push(link);
        return Box::new(plan);
    }
    Box::new(
        config
            .builtin()
            .plan(index, config.vcpus, vm.ram, config.seed, barrier.clone()),
    )
}

fn scenario_driver(
    config: &RunConfig,
    scenario: &Arc<Scenario>,
    vm: &Vm,
    devices: &Devices,
    events: &EventLoop,
    links: Vec<VcpuLink>,
    stop: Arc<AtomicBool>,
) -> Result<Driver, RunError> {
    let console = events.console_sender()?;
    let attached = devices.attached().ok_or(RunError::Setup {
        what: "starting the scenario driver",
        detail: "the VM has no devices to pin with".into(),
    })?;
    Ok(Driver {
        scenario: scenario.clone(),
        memory: vm.memory.clone(),
        backing: config.backing.clone(),
        links,
        pins: attached.pins.clone(),
        iommu: attached.iommu.clone(),
        held: Default::default(),
        stop,
        console: Box::new(move |text| console.line("scenario".into(), text)),
    })
}

/// Wall time of each phase of a run.
#[derive(Debug)]
struct PhaseTimes {
    setup: Duration,
    run: Duration,
    teardown: Duration,
}

/// What the VM counted by the end of the run.
#[derive(Debug)]
struct VmFacts {
    stats: (Counters, Counters),
    tsc_khz: u32,
    pins: PinStats,
    zap_policy: crate::kvm::zap::ZapPolicy,
}

impl VmFacts {
    /// Reads them; call once the devices have unpinned.
    fn read(vm: &Vm) -> Self {
        Self {
            stats: vm.read_stats().unwrap_or_default(),
            tsc_khz: vm.tsc_khz,
            pins: vm.pins.snapshot(),
            zap_policy: vm.zap_policy,
        }
    }
}

/// The report of a run that ended with `outcome`.
fn build_report(
    config: &RunConfig,
    outcome: LoopOutcome,
    scenario: Option<ScenarioReport>,
    devices: DeviceReport,
    vm: VmFacts,
    timings: &PhaseTimes,
) -> RunReport {
    let LoopOutcome { reports, stop } = outcome;
    let error = first_error(&reports, stop.as_ref(), config.timeout)
        .or_else(|| scenario.as_ref().and_then(scenario_error));
    let exits = sum_exits(&reports);
    RunReport::new(report::Parts {
        config,
        guest: match &config.scenario {
            Some(s) => format!("scenario {:?}", s.title()),
            None => config.guest.name(),
        },
        scenario,
        error,
        reports,
        exits,
        stats: vm.stats,
        tsc_khz: vm.tsc_khz,
        zap_policy: vm.zap_policy,
        pins: vm.pins,
        dma: devices.dma,
        stage2: devices.stage2,
        setup: timings.setup,
        run: timings.run,
        teardown: timings.teardown,
    })
}

/// The failure of a scenario that did not pass.
fn scenario_error(scenario: &ScenarioReport) -> Option<String> {
    (!scenario.passed).then(|| {
        scenario
            .failure()
            .unwrap_or_else(|| "the scenario thread panicked".into())
    })
}

/// Exits summed over vCPUs, by reason.
fn sum_exits(reports: &[VcpuReport]) -> BTreeMap<&'static str, u64> {
    let mut exits: BTreeMap<&'static str, u64> = BTreeMap::new();
    for r in reports {
        for (k, v) in &r.exits {
            *exits.entry(k).or_default() += v;
        }
    }
    exits
}

fn print_summary(out: &mut dyn Write, report: &RunReport, timings: &PhaseTimes) {
    let _ = writeln!(out, "{}", report.summary_line());
    let _ = writeln!(
        out,
        "timings: setup {}, run {}, teardown {}",
        fmt_duration(timings.setup),
        fmt_duration(timings.run),
        fmt_duration(timings.teardown)
    );
}

/// The one-line reason a run failed, if it did: a guest failure beats a
/// timeout or signal (which only stopped the guest).
fn first_error(
    reports: &[VcpuReport],
    cause: Option<&StopCause>,
    timeout: Duration,
) -> Option<String> {
    let real = reports
        .iter()
        .filter_map(|r| r.failure.as_ref())
        .find(|f| !matches!(f, GuestFailure::Stopped { .. }));
    if let Some(f) = real {
        return Some(f.to_string());
    }
    match cause {
        Some(StopCause::Timeout) => Some(format!(
            "timeout: the guest was still running after {} (--timeout)",
            fmt_duration(timeout)
        )),
        Some(StopCause::Signal(name)) => {
            Some(format!("interrupted by {name}; the guest was stopped"))
        }
        Some(StopCause::GuestFailed) | None => reports
            .iter()
            .find_map(|r| r.failure.as_ref())
            .map(ToString::to_string),
    }
}
