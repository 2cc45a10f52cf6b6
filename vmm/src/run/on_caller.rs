//! A run of one vCPU on the calling thread: `vmm run --vcpus 1` without a
//! scenario. No vCPU thread and no event loop: console lines are printed as
//! the vCPU sends them, its report is the loop's return value, and the
//! timeout and SIGINT/SIGTERM stop it by signal ([`super::stop_signals`]).
//!
//! A launch of a trivial guest takes a few milliseconds, and handing its
//! vCPU to a thread and waiting for the report added about 9% to it on this
//! host (thread creation and its malloc arena, a cross-CPU wake-up at each
//! end; see docs/benchmarks.md). Several vCPUs, or a scenario driver that
//! commands them, still get the threaded run (`threads.rs`,
//! `event_loop.rs`).

use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::config::{RunConfig, Verbosity};
use super::devices::Devices;
use super::error::{setup_err, RunError};
use super::event_loop::LoopOutcome;
use super::events::write_line;
use super::stop_signals::StopSignals;
use super::threads::panicked_report;
use super::{vcpu_plan, ConsoleOut, Ran};
use crate::failure::GuestFailure;
use crate::plan::PhaseBarrier;
use crate::vcpu::{self, ConsoleSender, VcpuContext};
use crate::vm::Vm;

/// Whether `config` runs on the calling thread: one vCPU, no scenario.
pub(super) fn runs_on_caller(config: &RunConfig) -> bool {
    config.vcpus == 1 && config.scenario.is_none()
}

/// Runs the VM's one vCPU on this thread until it reports.
pub(super) fn run(
    config: &RunConfig,
    vm: &mut Vm,
    devices: &Devices,
    console: ConsoleOut,
    t_setup: Instant,
) -> Result<Ran, RunError> {
    let mut fds = vm.take_vcpus();
    let fd = match (fds.pop(), fds.is_empty()) {
        (Some(fd), true) => fd,
        _ => {
            return Err(RunError::Setup {
                what: "running the vCPU on the calling thread",
                detail: "the VM does not have exactly one vCPU".into(),
            })
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let barrier = Arc::new(PhaseBarrier::new(1));
    let out = Arc::new(Mutex::new(console));
    let ctx = VcpuContext {
        index: 0,
        vcpus: 1,
        entry: vm.entry,
        boot: vm.boot.clone(),
        memory: vm.memory.clone(),
        dma: devices.dma(),
        plan: vcpu_plan(config, vm, 0, &stop, &barrier, &mut Vec::new()),
        console: console_sender(config, &out),
        stop: stop.clone(),
        progress: config.verbosity >= Verbosity::Verbose,
    };
    let signals = StopSignals::arm(&fd, stop, config.timeout)
        .map_err(setup_err("arming the stop signals"))?;
    let setup = t_setup.elapsed();

    let t_run = Instant::now();
    let run = std::panic::AssertUnwindSafe(|| vcpu::run_vcpu(fd, ctx));
    let report = std::panic::catch_unwind(run).unwrap_or_else(|panic| panicked_report(0, &panic));
    let run = t_run.elapsed();
    let cause = signals.disarm();
    // A request that came after the guest ended stopped nothing.
    let stopped = matches!(report.failure, Some(GuestFailure::Stopped { .. }));
    let console = std::mem::replace(
        &mut *out.lock().unwrap_or_else(|e| e.into_inner()),
        Box::new(std::io::sink()),
    );
    Ok(Ran {
        outcome: LoopOutcome {
            reports: vec![report],
            stop: cause.filter(|_| stopped),
        },
        scenario: None,
        console,
        setup,
        run,
    })
}

/// Prints the vCPU's lines to `out` as they come (none if quiet).
fn console_sender(config: &RunConfig, out: &Arc<Mutex<ConsoleOut>>) -> ConsoleSender {
    if config.verbosity == Verbosity::Quiet {
        return ConsoleSender::discard();
    }
    let out = out.clone();
    ConsoleSender::to_sink(Box::new(move |line| {
        let mut out = out.lock().unwrap_or_else(|e| e.into_inner());
        write_line(&mut **out, &line);
        let _ = out.flush();
    }))
}
