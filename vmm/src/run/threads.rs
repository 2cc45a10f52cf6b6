//! The vCPU threads of a run. Whatever way `run()` returns (a normal end, an
//! error while setting up, a panic), dropping [`VcpuThreads`] stops, kicks and
//! joins every thread, so no guest keeps running and no VM leaks.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::plan::PhaseBarrier;
use crate::vcpu;

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

    /// Joins every thread, stopping and kicking them if they still run.
    pub(super) fn join(&mut self) {
        if !self.all_finished() {
            self.request_stop();
        }
        while !self.all_finished() {
            self.kick_running();
            std::thread::sleep(Duration::from_millis(5));
        }
        for h in self.handles.iter_mut().filter_map(Option::take) {
            // A vCPU thread catches its own panics; nothing to propagate.
            let _ = h.join();
        }
    }
}

impl Drop for VcpuThreads {
    fn drop(&mut self) {
        self.join();
    }
}
