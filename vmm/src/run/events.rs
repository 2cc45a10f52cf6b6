//! The event loop's subscribers. Each owns one fd and one job; they share the
//! loop's [`LoopState`] through `Rc<RefCell<_>>` (the loop is single-threaded).

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{mpsc, Arc};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use signal_hook::SigId;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::failure::GuestFailure;
use crate::vcpu::{ConsoleLine, VcpuReport};

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

/// The signals that stop a run, with their names.
const STOP_SIGNALS: [(libc::c_int, &str); 2] =
    [(libc::SIGINT, "SIGINT"), (libc::SIGTERM, "SIGTERM")];

/// Turns SIGINT/SIGTERM into a clean stop of the run, through `signal-hook`:
/// one action records the first signal (an atomic compare-and-swap, which is
/// async-signal-safe), another wakes the loop through a socket pair (the
/// self-pipe pattern). Dropping it unregisters both.
pub struct SignalStop {
    wake: UnixStream,
    first: Arc<AtomicI32>,
    ids: Vec<SigId>,
    pub(super) state: Rc<RefCell<LoopState>>,
}

impl SignalStop {
    /// Routes SIGINT and SIGTERM to the loop for the life of the returned value.
    pub fn install(state: Rc<RefCell<LoopState>>) -> io::Result<Self> {
        let (wake, writer) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        writer.set_nonblocking(true)?;
        let mut stop = Self {
            wake,
            first: Arc::new(AtomicI32::new(0)),
            ids: Vec::new(),
            state,
        };
        for (signal, _) in STOP_SIGNALS {
            let first = stop.first.clone();
            let record = move || {
                let _ = first.compare_exchange(0, signal, Ordering::Relaxed, Ordering::Relaxed);
            };
            // SAFETY: the action only does a compare-and-swap on an atomic,
            // which is async-signal-safe; it allocates and locks nothing.
            stop.ids
                .push(unsafe { signal_hook::low_level::register(signal, record) }?);
            stop.ids.push(signal_hook::low_level::pipe::register(
                signal,
                writer.try_clone()?,
            )?);
        }
        Ok(stop)
    }

    /// The name of the first stop signal received, if any.
    pub fn first_signal(&self) -> Option<&'static str> {
        let first = self.first.load(Ordering::Relaxed);
        STOP_SIGNALS
            .iter()
            .find(|(s, _)| *s == first)
            .map(|(_, name)| *name)
    }
}

impl Drop for SignalStop {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

impl MutEventSubscriber for SignalStop {
    fn process(&mut self, _: Events, _: &mut EventOps) {
        let mut buf = [0u8; 16];
        while matches!((&self.wake).read(&mut buf), Ok(n) if n > 0) {}
        if let Some(name) = self.first_signal() {
            self.state
                .borrow_mut()
                .stop
                .get_or_insert(StopCause::Signal(name));
        }
    }
    fn init(&mut self, ops: &mut EventOps) {
        ops.add(Events::new(&self.wake, EventSet::IN))
            .expect("a fresh socket registers with epoll");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_of_two_stop_signals_is_reported() {
        let state = Rc::new(RefCell::new(LoopState::default()));
        let stop = SignalStop::install(state).expect("handlers install");
        assert_eq!(stop.first_signal(), None);
        // SAFETY: raise(2) runs the handlers registered above on this thread
        // before it returns; they only touch atomics and a socket.
        unsafe {
            libc::raise(libc::SIGINT);
            libc::raise(libc::SIGTERM);
        }
        assert_eq!(stop.first_signal(), Some("SIGINT"));
    }
}
