//! The event loop's subscribers. Each owns one fd and one job; they share the
//! loop's [`LoopState`] through `Rc<RefCell<_>>` (the loop is single-threaded).

use std::cell::RefCell;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::vcpu::{ConsoleLine, GuestFailure, VcpuReport};

/// Why the loop asked the vCPUs to stop, other than a guest failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopCause {
    /// A vCPU failed; the others are stopped.
    GuestFailed,
    /// `--timeout` elapsed.
    Timeout,
    /// SIGINT or SIGTERM.
    Signal(&'static str),
}

/// What the subscribers learn, read by the run after each loop iteration.
#[derive(Debug, Default)]
pub struct LoopState {
    /// Reports of the vCPUs that ended.
    pub reports: Vec<VcpuReport>,
    /// Set once: why the run is being stopped.
    pub stop: Option<StopCause>,
}

/// Prints console lines from the vCPUs.
pub struct ConsoleSink {
    pub(super) event: EventFd,
    pub(super) rx: mpsc::Receiver<ConsoleLine>,
    pub(super) out: Box<dyn Write>,
    pub(super) quiet: bool,
}

impl ConsoleSink {
    /// Writes every pending line.
    pub fn drain(&mut self) {
        while let Ok(line) = self.rx.try_recv() {
            if self.quiet {
                continue;
            }
            let _ = writeln!(self.out, "[{}] {}", line.source, line.text);
        }
        let _ = self.out.flush();
    }
}

impl MutEventSubscriber for ConsoleSink {
    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.event.read();
        self.drain();
    }
    fn init(&mut self, ops: &mut EventOps) {
        ops.add(Events::new(&self.event, EventSet::IN))
            .expect("a fresh eventfd registers with epoll");
    }
}

/// Collects vCPU reports; the first real failure stops the others.
pub struct Completion {
    pub(super) event: EventFd,
    pub(super) rx: mpsc::Receiver<VcpuReport>,
    pub(super) state: Rc<RefCell<LoopState>>,
}

impl MutEventSubscriber for Completion {
    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.event.read();
        let mut st = self.state.borrow_mut();
        while let Ok(report) = self.rx.try_recv() {
            let real_failure =
                matches!(&report.failure, Some(f) if !matches!(f, GuestFailure::Stopped { .. }));
            if real_failure && st.stop.is_none() {
                st.stop = Some(StopCause::GuestFailed);
            }
            st.reports.push(report);
        }
    }
    fn init(&mut self, ops: &mut EventOps) {
        ops.add(Events::new(&self.event, EventSet::IN))
            .expect("a fresh eventfd registers with epoll");
    }
}

/// Fires once when `--timeout` elapses.
pub struct Timeout {
    pub(super) timer: TimerFd,
    pub(super) state: Rc<RefCell<LoopState>>,
}

impl MutEventSubscriber for Timeout {
    fn process(&mut self, _: Events, ops: &mut EventOps) {
        let _ = self.timer.wait();
        let _ = ops.remove(Events::new(&self.timer, EventSet::IN));
        self.state
            .borrow_mut()
            .stop
            .get_or_insert(StopCause::Timeout);
    }
    fn init(&mut self, ops: &mut EventOps) {
        ops.add(Events::new(&self.timer, EventSet::IN))
            .expect("a fresh timerfd registers with epoll");
    }
}

/// The eventfd the SIGINT/SIGTERM handler writes to (async-signal-safe).
static SIGNAL_EVENT_FD: AtomicI32 = AtomicI32::new(-1);
/// The last signal received.
static LAST_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_terminate(num: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    LAST_SIGNAL.store(num, Ordering::Relaxed);
    let fd = SIGNAL_EVENT_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let one = 1u64;
        // SAFETY: write(2) is async-signal-safe; `one` is 8 readable bytes and
        // `fd` is an eventfd kept open while the handler can point at it.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

/// Turns SIGINT/SIGTERM into a clean stop of the run.
pub struct SignalStop {
    pub(super) event: EventFd,
    pub(super) state: Rc<RefCell<LoopState>>,
}

impl SignalStop {
    /// Routes SIGINT and SIGTERM to `event` for the life of the returned value.
    pub fn install(
        event: EventFd,
        state: Rc<RefCell<LoopState>>,
    ) -> Result<Self, vmm_sys_util::errno::Error> {
        SIGNAL_EVENT_FD.store(event.as_raw_fd(), Ordering::Relaxed);
        vmm_sys_util::signal::register_signal_handler(libc::SIGINT, on_terminate)?;
        vmm_sys_util::signal::register_signal_handler(libc::SIGTERM, on_terminate)?;
        Ok(Self { event, state })
    }
}

impl Drop for SignalStop {
    fn drop(&mut self) {
        let _ = SIGNAL_EVENT_FD.compare_exchange(
            self.event.as_raw_fd(),
            -1,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
}

impl MutEventSubscriber for SignalStop {
    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.event.read();
        let name = if LAST_SIGNAL.load(Ordering::Relaxed) == libc::SIGTERM {
            "SIGTERM"
        } else {
            "SIGINT"
        };
        self.state
            .borrow_mut()
            .stop
            .get_or_insert(StopCause::Signal(name));
    }
    fn init(&mut self, ops: &mut EventOps) {
        ops.add(Events::new(&self.event, EventSet::IN))
            .expect("a fresh eventfd registers with epoll");
    }
}
