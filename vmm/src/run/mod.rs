//! `vmm run`: build a VM, run a guest program on every vCPU thread while the
//! main thread's event loop (event-manager) handles console output, vCPU
//! completion, the timeout and SIGINT/SIGTERM, then tear down and report.
//!
//! A run always ends with a [`RunReport`]: on success, on a guest failure, on
//! timeout and on a signal alike. Only a VM that cannot be built is an `Err`.

mod events;
pub mod report;
mod threads;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use crate::devices::dma::DmaEngine;
use crate::devices::iommu::Iommu;
use crate::devices::pins::PinManager;
use crate::mm::backing::BackingKind;
use crate::plan::{BuiltinGuest, PhaseBarrier, VcpuPlan};
use crate::scenario::driver::{channel_pair, Driver};
use crate::scenario::{Scenario, ScenarioReport};
use crate::vcpu::{self, fmt_duration, ConsoleSender, VcpuContext};
use crate::vm::{Vm, VmError, VmSpec};
use events::{Completion, ConsoleSink, LoopState, SignalStop, StopCause, Timeout};
pub use report::RunReport;

/// Which guest program to run.
#[derive(Debug, Clone)]
pub enum GuestSource {
    /// A built-in program over the built-in runtime.
    Builtin(BuiltinGuest),
    /// An ELF image file speaking the mailbox protocol; driven by the default plan.
    Image {
        /// Where it came from.
        path: PathBuf,
        /// Its bytes.
        bytes: Arc<[u8]>,
    },
}

impl GuestSource {
    fn name(&self) -> String {
        match self {
            GuestSource::Builtin(b) => b.to_string(),
            GuestSource::Image { path, .. } => path.display().to_string(),
        }
    }
}

/// How much the run prints on the console.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verbosity {
    /// Only errors.
    Quiet,
    /// Guest console and a summary.
    Normal,
    /// Also per-command progress.
    Verbose,
}

/// Everything `vmm run` needs, validated.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// vCPU count.
    pub vcpus: u64,
    /// Backing of guest RAM.
    pub backing: BackingKind,
    /// The guest.
    pub guest: GuestSource,
    /// Stop the guest after this long.
    pub timeout: Duration,
    /// Seed of the memory pattern.
    pub seed: u64,
    /// Console verbosity.
    pub verbosity: Verbosity,
    /// A scenario to run instead of the guest's built-in plan.
    pub scenario: Option<Arc<Scenario>>,
    /// Limit of pinned guest memory; `None`: the RLIMIT_MEMLOCK soft limit.
    pub pin_limit: Option<crate::mm::pin_account::PinLimit>,
}

impl RunConfig {
    /// The default run: 256 MiB anonymous RAM, 2 vCPUs, the default guest, 60 s.
    pub fn default_guest() -> Self {
        Self {
            mem_size: 256 << 20,
            vcpus: 2,
            backing: BackingKind::Anon,
            guest: GuestSource::Builtin(BuiltinGuest::Default),
            timeout: Duration::from_secs(60),
            seed: 0x005E_ED0F_CAFE,
            verbosity: Verbosity::Normal,
            scenario: None,
            pin_limit: None,
        }
    }
}

/// Errors that prevent a run from starting.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The VM could not be built.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The event loop or a thread could not be set up.
    #[error("{what}: {detail}")]
    Setup {
        /// The step.
        what: &'static str,
        /// The error.
        detail: String,
    },
}

fn setup_err<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> RunError {
    move |e| RunError::Setup {
        what,
        detail: e.to_string(),
    }
}

/// Runs the guest described by `config`, printing console output to `console`.
pub fn run(config: &RunConfig, console: Box<dyn Write>) -> Result<RunReport, RunError> {
    let t_setup = Instant::now();
    let image: Arc<[u8]> = match &config.guest {
        GuestSource::Builtin(_) => Arc::from(guest_image::RUNTIME_ELF),
        GuestSource::Image { bytes, .. } => bytes.clone(),
    };
    let mut vm = Vm::new(&VmSpec {
        vcpus: config.vcpus,
        mem_size: config.mem_size,
        backing: config.backing.clone(),
        image,
        pin_limit: config.pin_limit,
    })?;
    vcpu::install_kick_handler().map_err(setup_err("installing the vCPU kick handler"))?;

    let state = Rc::new(RefCell::new(LoopState::default()));
    let mut em = EventManager::<Box<dyn MutEventSubscriber>>::new()
        .map_err(setup_err("creating the event loop"))?;
    let new_event = || EventFd::new(EFD_NONBLOCK).map_err(setup_err("creating an eventfd"));
    let (console_tx, console_rx) = mpsc::channel();
    let console_event = new_event()?;
    let console_sink = Rc::new(RefCell::new(ConsoleSink {
        event: console_event
            .try_clone()
            .map_err(setup_err("cloning an eventfd"))?,
        rx: console_rx,
        out: console,
        quiet: config.verbosity == Verbosity::Quiet,
    }));
    em.add_subscriber(Box::new(console_sink.clone()));
    let (done_tx, done_rx) = mpsc::channel();
    let done_event = new_event()?;
    em.add_subscriber(Box::new(Completion {
        event: done_event
            .try_clone()
            .map_err(setup_err("cloning an eventfd"))?,
        rx: done_rx,
        state: state.clone(),
    }));
    let mut timer = TimerFd::new().map_err(setup_err("creating the timeout timer"))?;
    timer
        .reset(config.timeout, None)
        .map_err(setup_err("arming the timeout timer"))?;
    em.add_subscriber(Box::new(Timeout {
        timer,
        state: state.clone(),
    }));
    let signal_stop = SignalStop::install(new_event()?, state.clone())
        .map_err(setup_err("installing SIGINT/SIGTERM handlers"))?;
    em.add_subscriber(Box::new(signal_stop));

    let pins = Arc::new(PinManager::new(vm.memory.clone(), vm.pins.clone()));
    let iommu = Arc::new(Iommu::new(vm.memory.clone()));
    let dma = Arc::new(
        DmaEngine::start(
            vm.memory.clone(),
            vm.boot.clone(),
            pins.clone(),
            iommu.clone(),
        )
        .map_err(setup_err("starting the DMA engine"))?,
    );
    let stop = Arc::new(AtomicBool::new(false));
    let barrier = Arc::new(PhaseBarrier::new(config.vcpus as usize));
    let builtin = match &config.guest {
        GuestSource::Builtin(b) => *b,
        GuestSource::Image { .. } => BuiltinGuest::Default,
    };
    let setup_time = t_setup.elapsed();

    let t_run = Instant::now();
    let mut threads = threads::VcpuThreads::new(stop.clone(), barrier.clone());
    let mut links = Vec::new();
    for (index, fd) in vm.take_vcpus().into_iter().enumerate() {
        let index = index as u64;
        let plan: Box<dyn VcpuPlan> = if config.scenario.is_some() {
            let (plan, link) = channel_pair(stop.clone());
            links.push(link);
            Box::new(plan)
        } else {
            Box::new(builtin.plan(
                index,
                config.vcpus,
                vm.ram,
                config.seed,
                vm.identity_end,
                barrier.clone(),
            ))
        };
        let ctx = VcpuContext {
            index,
            vcpus: config.vcpus,
            entry: vm.entry,
            boot: vm.boot.clone(),
            memory: vm.memory.clone(),
            dma: Some(dma.clone()),
            plan,
            console: ConsoleSender::new(
                console_tx.clone(),
                console_event
                    .try_clone()
                    .map_err(setup_err("cloning an eventfd"))?,
            ),
            stop: stop.clone(),
            progress: config.verbosity >= Verbosity::Verbose,
        };
        let tx = done_tx.clone();
        let done = done_event
            .try_clone()
            .map_err(setup_err("cloning an eventfd"))?;
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                // A panic (a bug, or a plan's) must still produce a report, or
                // the run would wait for this vCPU forever.
                let report = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    vcpu::run_vcpu(fd, ctx)
                }))
                .unwrap_or_else(|panic| vcpu::VcpuReport {
                    index,
                    failure: Some(vcpu::GuestFailure::UnexpectedExit {
                        vcpu: index,
                        what: format!("the vCPU thread panicked: {}", panic_message(&panic)),
                    }),
                    commands: Vec::new(),
                    exits: Default::default(),
                });
                let _ = tx.send(report);
                let _ = done.write(1);
            })
            .map_err(setup_err("spawning a vCPU thread"))?;
        threads.push(handle);
    }
    let driver = match &config.scenario {
        None => None,
        Some(scenario) => {
            let console = ConsoleSender::new(
                console_tx.clone(),
                console_event
                    .try_clone()
                    .map_err(setup_err("cloning an eventfd"))?,
            );
            let driver = Driver {
                scenario: scenario.clone(),
                memory: vm.memory.clone(),
                backing: config.backing.clone(),
                links: std::mem::take(&mut links),
                pins: pins.clone(),
                iommu: iommu.clone(),
                held: Default::default(),
                stop: stop.clone(),
                console: Box::new(move |text| console.line("scenario".into(), text)),
            };
            let handle = std::thread::Builder::new()
                .name("scenario".into())
                .spawn(move || driver.run())
                .map_err(setup_err("spawning the scenario thread"))?;
            Some(handle)
        }
    };
    drop(console_tx);

    // The loop ends when every vCPU reported. Once a stop is requested, vCPU
    // threads are kicked every few milliseconds until they leave KVM_RUN.
    let mut stopping = false;
    while state.borrow().reports.len() < threads.len() {
        let wait_ms = if stopping { 5 } else { -1 };
        em.run_with_timeout(wait_ms)
            .map_err(setup_err("running the event loop"))?;
        if state.borrow().stop.is_some() {
            if !stopping {
                stopping = true;
                threads.request_stop();
            }
            threads.kick_running();
            if threads.all_finished() {
                // Every thread sent its report before ending: drain them.
                em.run_with_timeout(0)
                    .map_err(setup_err("running the event loop"))?;
                break;
            }
        }
    }
    threads.join();
    let scenario: Option<ScenarioReport> = driver.map(|d| {
        d.join().unwrap_or_else(|_| ScenarioReport {
            name: "scenario".into(),
            passed: false,
            steps: Vec::new(),
            not_run: 0,
        })
    });
    let run_time = t_run.elapsed();
    console_sink.borrow_mut().drain();

    let stats = vm.read_stats().unwrap_or_default();
    let stop_cause = state.borrow_mut().stop.take();
    let mut reports = std::mem::take(&mut state.borrow_mut().reports);
    reports.sort_by_key(|r| r.index);
    let error =
        first_error(&reports, stop_cause.as_ref(), config.timeout).or_else(|| match &scenario {
            Some(s) if !s.passed => Some(
                s.failure()
                    .unwrap_or_else(|| "the scenario thread panicked".into()),
            ),
            _ => None,
        });
    let mut exits: BTreeMap<&'static str, u64> = BTreeMap::new();
    for r in &reports {
        for (k, v) in &r.exits {
            *exits.entry(k).or_default() += v;
        }
    }
    let tsc_khz = vm.tsc_khz;
    // The DMA engine finishes queued requests and unpins before its stats
    // and the pin account are read; then the pin manager unsubscribes.
    let dma = Arc::try_unwrap(dma).map_err(|_| RunError::Setup {
        what: "stopping the DMA engine",
        detail: "still referenced".into(),
    })?;
    let dma_stats = report::DmaReport::from(dma.stats());
    drop(dma);
    // The table as the run left it; then the IOMMU unsubscribes.
    let stage2 = iommu.report();
    drop(iommu);
    drop(pins);
    let pins = vm.pins.snapshot();

    let t_teardown = Instant::now();
    drop(em);
    drop(vm);
    let teardown_time = t_teardown.elapsed();

    let report = RunReport::new(report::Parts {
        config,
        guest: match &config.scenario {
            Some(s) => format!("scenario {:?}", s.title()),
            None => config.guest.name(),
        },
        scenario,
        error,
        reports,
        exits,
        stats,
        tsc_khz,
        pins,
        dma: dma_stats,
        stage2,
        setup: setup_time,
        run: run_time,
        teardown: teardown_time,
    });
    if config.verbosity > Verbosity::Quiet {
        let mut sink = console_sink.borrow_mut();
        let _ = writeln!(sink.out, "{}", report.summary_line());
        let _ = writeln!(
            sink.out,
            "timings: setup {}, run {}, teardown {}",
            fmt_duration(setup_time),
            fmt_duration(run_time),
            fmt_duration(teardown_time)
        );
    }
    Ok(report)
}

/// The one-line reason a run failed, if it did: a guest failure beats a
/// timeout or signal (which only stopped the guest).
fn first_error(
    reports: &[vcpu::VcpuReport],
    cause: Option<&StopCause>,
    timeout: Duration,
) -> Option<String> {
    let real = reports
        .iter()
        .filter_map(|r| r.failure.as_ref())
        .find(|f| !matches!(f, vcpu::GuestFailure::Stopped { .. }));
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

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
