//! The event loop's subscribers. Each owns one fd and one job; they share the
//! loop's [`LoopState`] through `Rc<RefCell<_>>` (the loop is single-threaded).

use std::cell::RefCell;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::mpsc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use signal_hook::iterator::backend::SignalDelivery;
use signal_hook::iterator::exfiltrator::SignalOnly;
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

/// Prints `line` to `out` as the run's console shows it.
pub(super) fn write_line(out: &mut dyn Write, line: &ConsoleLine) {
    let _ = writeln!(out, "[{}] {}", line.source, line.text);
}

/// Prints console lines from the vCPUs.
pub struct ConsoleSink {
    pub(super) event: EventFd,
    pub(super) rx: mpsc::Receiver<ConsoleLine>,
    pub(super) out: Box<dyn Write + Send>,
    pub(super) quiet: bool,
}

impl ConsoleSink {
    /// Writes every pending line.
    pub fn drain(&mut self) {
        while let Ok(line) = self.rx.try_recv() {
            if self.quiet {
                continue;
            }
            write_line(&mut *self.out, &line);
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

/// Where a vCPU thread sends its report when it ends.
#[derive(Debug)]
pub struct ReportSender {
    tx: mpsc::Sender<VcpuReport>,
    event: EventFd,
}

impl ReportSender {
    /// A sender that signals `event` after sending.
    pub fn new(tx: mpsc::Sender<VcpuReport>, event: EventFd) -> Self {
        Self { tx, event }
    }

    /// Sends `report` and wakes the loop.
    pub fn send(&self, report: VcpuReport) {
        // A closed receiver means the run is ending; nothing to do.
        let _ = self.tx.send(report);
        let _ = self.event.write(1);
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

/// The signals that stop a run, with their names, lowest number first.
const STOP_SIGNALS: [(libc::c_int, &str); 2] =
    [(libc::SIGINT, "SIGINT"), (libc::SIGTERM, "SIGTERM")];

/// Turns SIGINT/SIGTERM into a clean stop of the run, with `signal-hook`'s
/// self-pipe delivery: its handler marks the signal and writes to a socket
/// pair whose read end the loop watches. The first signal the loop sees is
/// the one reported; of two that arrived together, the lower-numbered one
/// (the order in which the kernel itself delivers pending signals), so
/// SIGINT then SIGTERM reports SIGINT. Dropping it unregisters the
/// handlers' actions.
pub struct SignalStop {
    delivery: SignalDelivery<UnixStream, SignalOnly>,
    pub(super) state: Rc<RefCell<LoopState>>,
}

impl SignalStop {
    /// Routes SIGINT and SIGTERM to the loop for the life of the returned value.
    pub fn install(state: Rc<RefCell<LoopState>>) -> io::Result<Self> {
        let (read, write) = UnixStream::pair()?;
        read.set_nonblocking(true)?;
        write.set_nonblocking(true)?;
        let signals = STOP_SIGNALS.map(|(signal, _)| signal);
        let delivery = SignalDelivery::with_pipe(read, write, SignalOnly, signals)?;
        Ok(Self { delivery, state })
    }

    /// The name of the first stop signal received since the last call, if any.
    pub fn first_signal(&mut self) -> Option<&'static str> {
        let pending: Vec<libc::c_int> = self.delivery.pending().collect();
        STOP_SIGNALS
            .iter()
            .find(|(signal, _)| pending.contains(signal))
            .map(|(_, name)| *name)
    }
}

impl MutEventSubscriber for SignalStop {
    fn process(&mut self, _: Events, _: &mut EventOps) {
        if let Some(name) = self.first_signal() {
            self.state
                .borrow_mut()
                .stop
                .get_or_insert(StopCause::Signal(name));
        }
    }
    fn init(&mut self, ops: &mut EventOps) {
        ops.add(Events::new(self.delivery.get_read(), EventSet::IN))
            .expect("a fresh socket registers with epoll");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_of_two_stop_signals_is_reported() {
        let state = Rc::new(RefCell::new(LoopState::default()));
        let mut stop = SignalStop::install(state).expect("handlers install");
        assert_eq!(stop.first_signal(), None);
        // SAFETY: raise(2) runs the handlers registered above on this thread
        // before it returns; they only set flags and write to a socket.
        unsafe {
            libc::raise(libc::SIGINT);
            libc::raise(libc::SIGTERM);
        }
        assert_eq!(stop.first_signal(), Some("SIGINT"));
    }
}
