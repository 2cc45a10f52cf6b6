//! The threads of a run: one per vCPU, and the scenario driver's. Whatever
//! way `run()` returns (a normal end, an error while setting up, a panic),
//! dropping [`VcpuThreads`] stops, kicks and joins every vCPU thread, so no
//! guest keeps running and no VM leaks.

use std::io;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::VcpuFd;

use super::events::ReportSender;
use crate::failure::GuestFailure;
use crate::plan::PhaseBarrier;
use crate::scenario::driver::Driver;
use crate::scenario::ScenarioReport;
use crate::vcpu::{self, VcpuContext, VcpuReport};

/// How long [`VcpuThreads::join`] waits between kicks of threads that still
/// run.
const JOIN_KICK_INTERVAL: Duration = Duration::from_millis(1);

/// Owns the vCPU threads and what it takes to stop them.
#[derive(Debug)]
pub(super) struct VcpuThreads {
    handles: Vec<Option<JoinHandle<()>>>,
    stop: Arc<AtomicBool>,
    barrier: Arc<PhaseBarrier>,
}

impl VcpuThreads {
    pub(super) fn new(stop: Arc<AtomicBool>, barrier: Arc<PhaseBarrier>) -> Self {
        Self {
            handles: Vec::new(),
            stop,
            barrier,
        }
    }

    pub(super) fn push(&mut self, handle: JoinHandle<()>) {
        self.handles.push(Some(handle));
    }

    pub(super) fn len(&self) -> usize {
        self.handles.len()
    }

    /// Asks every vCPU to stop: sets the flag and releases barrier waiters.
    pub(super) fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.barrier.abort();
    }

    /// Kicks the threads still running out of `KVM_RUN` (they then see the
    /// stop flag). Re-sent by the caller until they end: a signal that lands
    /// just before a thread enters `KVM_RUN` is otherwise lost.
    pub(super) fn kick_running(&self) {
        for h in self.handles.iter().flatten().filter(|h| !h.is_finished()) {
            // SAFETY: the thread is not joined, so its pthread_t is valid; the
            // kick signal has a no-op handler (`vcpu::install_kick_handler`).
            unsafe { libc::pthread_kill(h.as_pthread_t(), vcpu::kick_signal()) };
        }
    }

    /// Whether every thread has ended (reported or not).
    pub(super) fn all_finished(&self) -> bool {
        self.handles.iter().flatten().all(JoinHandle::is_finished)
    }

    /// Joins threads that have all sent their reports: they are past
    /// `KVM_RUN` and about to end, so this waits without kicking.
    pub(super) fn join_reported(&mut self) {
        for h in self.handles.iter_mut().filter_map(Option::take) {
            // A vCPU thread catches its own panics; nothing to propagate.
            let _ = h.join();
        }
    }

    /// Joins every thread, stopping and kicking them if they still run.
    pub(super) fn join(&mut self) {
        if !self.all_finished() {
            self.request_stop();
        }
        while !self.all_finished() {
            self.kick_running();
            std::thread::sleep(JOIN_KICK_INTERVAL);
        }
        self.join_reported();
    }
}

impl Drop for VcpuThreads {
    fn drop(&mut self) {
        self.join();
    }
}

/// Starts the thread of vCPU `index`; it sends its report to `reports`, even
/// if it panics (a bug, or a plan's): otherwise the run would wait for this
/// vCPU forever.
pub(super) fn spawn_vcpu(
    index: u64,
    fd: VcpuFd,
    ctx: VcpuContext,
    reports: ReportSender,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("vcpu{index}"))
        .spawn(move || {
            let run = std::panic::AssertUnwindSafe(|| vcpu::run_vcpu(fd, ctx));
            let report = std::panic::catch_unwind(run)
                .unwrap_or_else(|panic| panicked_report(index, &panic));
            reports.send(report);
        })
}

pub(super) fn panicked_report(index: u64, panic: &Box<dyn std::any::Any + Send>) -> VcpuReport {
    VcpuReport {
        index,
        failure: Some(GuestFailure::UnexpectedExit {
            vcpu: index,
            what: format!("the vCPU thread panicked: {}", panic_message(panic)),
        }),
        commands: Vec::new(),
        exits: Default::default(),
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// The scenario driver's thread.
#[derive(Debug)]
pub(super) struct DriverThread(JoinHandle<ScenarioReport>);

impl DriverThread {
    /// Starts `driver` on its own thread.
    pub(super) fn spawn(driver: Driver) -> io::Result<Self> {
        std::thread::Builder::new()
            .name("scenario".into())
            .spawn(move || driver.run())
            .map(Self)
    }

    /// Its report; a failed one if the thread panicked.
    pub(super) fn join(self) -> ScenarioReport {
        self.0.join().unwrap_or_else(|_| ScenarioReport {
            name: "scenario".into(),
            passed: false,
            steps: Vec::new(),
            not_run: 0,
        })
    }
}
