//! The run's event loop on the main thread (event-manager): console output,
//! vCPU reports, the timeout and SIGINT/SIGTERM, each a subscriber of
//! [`super::events`]. It ends when every vCPU has reported; once a stop is
//! requested it kicks the vCPU threads until they leave `KVM_RUN`.

use std::cell::RefCell;
use std::io::Write;
use std::rc::Rc;
use std::sync::mpsc;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use super::config::{RunConfig, Verbosity};
use super::error::{setup_err, RunError};
use super::events::{
    Completion, ConsoleSink, LoopState, ReportSender, SignalStop, StopCause, Timeout,
};
use super::threads::VcpuThreads;
use crate::vcpu::{ConsoleLine, ConsoleSender, VcpuReport};

/// How often vCPU threads are kicked while a stop is pending: a kick that
/// lands just before a thread enters `KVM_RUN` is lost, so it is re-sent.
const KICK_INTERVAL_MS: i32 = 5;

/// How the loop ended.
#[derive(Debug)]
pub(super) struct LoopOutcome {
    /// Every vCPU's report, by index.
    pub reports: Vec<VcpuReport>,
    /// Why the vCPUs were stopped, if they were.
    pub stop: Option<StopCause>,
}

/// The event manager and the ends of its channels.
pub(super) struct EventLoop {
    em: EventManager<Box<dyn MutEventSubscriber>>,
    state: Rc<RefCell<LoopState>>,
    console: Rc<RefCell<ConsoleSink>>,
    console_tx: mpsc::Sender<ConsoleLine>,
    console_event: EventFd,
    done_tx: mpsc::Sender<VcpuReport>,
    done_event: EventFd,
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop").finish_non_exhaustive()
    }
}

fn new_event() -> Result<EventFd, RunError> {
    EventFd::new(EFD_NONBLOCK).map_err(setup_err("creating an eventfd"))
}

fn clone_event(event: &EventFd) -> Result<EventFd, RunError> {
    event.try_clone().map_err(setup_err("cloning an eventfd"))
}

impl EventLoop {
    /// The loop with its subscribers; console text goes to `out`.
    pub(super) fn new(config: &RunConfig, out: Box<dyn Write + Send>) -> Result<Self, RunError> {
        let state = Rc::new(RefCell::new(LoopState::default()));
        let mut em = EventManager::<Box<dyn MutEventSubscriber>>::new()
            .map_err(setup_err("creating the event loop"))?;
        let (console_tx, console_rx) = mpsc::channel();
        let console_event = new_event()?;
        let console = Rc::new(RefCell::new(ConsoleSink {
            event: clone_event(&console_event)?,
            rx: console_rx,
            out,
            quiet: config.verbosity == Verbosity::Quiet,
        }));
        em.add_subscriber(Box::new(console.clone()));
        let (done_tx, done_rx) = mpsc::channel();
        let done_event = new_event()?;
        em.add_subscriber(Box::new(Completion {
            event: clone_event(&done_event)?,
            rx: done_rx,
            state: state.clone(),
        }));
        em.add_subscriber(Box::new(timeout(config, state.clone())?));
        let signal_stop = SignalStop::install(state.clone())
            .map_err(setup_err("installing SIGINT/SIGTERM handlers"))?;
        em.add_subscriber(Box::new(signal_stop));
        Ok(Self {
            em,
            state,
            console,
            console_tx,
            console_event,
            done_tx,
            done_event,
        })
    }

    /// A sender of console lines to this loop (one that drops them if the
    /// run is quiet).
    pub(super) fn console_sender(&self) -> Result<ConsoleSender, RunError> {
        if self.console.borrow().quiet {
            return Ok(ConsoleSender::discard());
        }
        Ok(ConsoleSender::new(
            self.console_tx.clone(),
            clone_event(&self.console_event)?,
        ))
    }

    /// A sender of one vCPU's report to this loop.
    pub(super) fn report_sender(&self) -> Result<ReportSender, RunError> {
        Ok(ReportSender::new(
            self.done_tx.clone(),
            clone_event(&self.done_event)?,
        ))
    }

    /// Runs until every thread of `threads` has reported.
    pub(super) fn run_until_reported(&mut self, threads: &VcpuThreads) -> Result<(), RunError> {
        let mut stopping = false;
        while self.state.borrow().reports.len() < threads.len() {
            let wait_ms = if stopping { KICK_INTERVAL_MS } else { -1 };
            self.turn(wait_ms)?;
            if self.state.borrow().stop.is_none() {
                continue;
            }
            if !stopping {
                stopping = true;
                threads.request_stop();
            }
            threads.kick_running();
            if threads.all_finished() {
                // Every thread sent its report before ending: drain them.
                self.turn(0)?;
                break;
            }
        }
        Ok(())
    }

    fn turn(&mut self, wait_ms: i32) -> Result<(), RunError> {
        self.em
            .run_with_timeout(wait_ms)
            .map_err(setup_err("running the event loop"))?;
        Ok(())
    }

    /// Prints the console lines still queued.
    pub(super) fn drain_console(&self) {
        self.console.borrow_mut().drain();
    }

    /// The reports (sorted by vCPU) and the stop cause.
    pub(super) fn take_outcome(&self) -> LoopOutcome {
        let mut state = self.state.borrow_mut();
        let mut reports = std::mem::take(&mut state.reports);
        reports.sort_by_key(|r| r.index);
        LoopOutcome {
            reports,
            stop: state.stop.take(),
        }
    }

    /// Closes the event manager and its fds; returns the console.
    pub(super) fn close(self) -> Box<dyn Write + Send> {
        let out = std::mem::replace(
            &mut self.console.borrow_mut().out,
            Box::new(std::io::sink()),
        );
        out
    }
}

/// The subscriber that stops the run after `--timeout`.
fn timeout(config: &RunConfig, state: Rc<RefCell<LoopState>>) -> Result<Timeout, RunError> {
    let mut timer = TimerFd::new().map_err(setup_err("creating the timeout timer"))?;
    timer
        .reset(config.timeout, None)
        .map_err(setup_err("arming the timeout timer"))?;
    Ok(Timeout { timer, state })
}
