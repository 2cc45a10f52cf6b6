//! The fault log the handler threads write and the bench reads between
//! passes, without serialising the handlers.
//!
//! The hazard: a vCPU wakes *inside* the handler's resolving ioctl, so it can
//! finish its pass, and the main thread can read the log, before the handler
//! has recorded the fault it just resolved. Holding the log's lock across
//! the ioctl closes that, but serialises N handler threads on one lock,
//! which is what a scaling measurement must not do. Instead each handler
//! holds an in-flight token ([`FaultLog::begin`]) from before it reads a
//! message until after it recorded it; [`FaultLog::take`] waits until no
//! token is out. Since no fault can complete before a token was taken for
//! it, everything a finished pass caused is in the log when `take` returns.
//! (The same idea as an SRCU read side: readers announce themselves before
//! touching shared state; the updater waits for the count to drain.)
//!
//! Model: `shuttle_tests` (`--cfg vmm_shuttle`), with a broken variant that
//! takes the token only after resolving.

#[cfg(all(test, vmm_shuttle))]
use shuttle::sync::{
    atomic::{AtomicUsize, Ordering},
    Mutex,
};
#[cfg(not(all(test, vmm_shuttle)))]
use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Mutex,
};

/// What a handler did with one fault message.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, strum::Display,
)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
pub enum Outcome {
    /// The handler's ioctl resolved the page (copied, zeroed, mapped, or
    /// un-protected it) and woke the waiters.
    Resolved,
    /// The ioctl found the page already resolved (`EEXIST`: another handler
    /// thread or uffd won the race); the handler woke the waiters.
    Eexist,
    /// The ioctl returned `EAGAIN` (the mapping was changing) at least once
    /// and was retried until it resolved the page.
    EagainRetry,
    /// A page the handler resolved earlier in the pass was still there
    /// (`EEXIST` on a page it knew): only `UFFDIO_WAKE` was needed.
    WakeOnly,
}

/// One fault message as handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// Page address (host).
    pub page: u64,
    /// Which uffd (index into the armed uffds) delivered it.
    pub uffd: usize,
    /// Faulting thread id (0 when the kernel does not report it).
    pub tid: u32,
    /// Whether the access was a write.
    pub write: bool,
    /// What the handler did.
    pub outcome: Outcome,
}

/// Events since the last [`FaultLog::take`], and the handler's error.
#[derive(Debug, Default)]
struct Inner {
    events: Vec<Event>,
    error: Option<String>,
}

/// Events of the handler threads (see the module documentation).
#[derive(Debug, Default)]
pub struct FaultLog {
    in_flight: AtomicUsize,
    inner: Mutex<Inner>,
}

/// A handler's announcement that it may resolve a fault; recording or
/// dropping it ends the announcement.
#[derive(Debug)]
pub struct InFlight<'a>(&'a FaultLog);

impl FaultLog {
    /// Announces a handler about to read and resolve a message: take this
    /// *before* reading it.
    pub fn begin(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self)
    }

    fn lock(&self) -> impl std::ops::DerefMut<Target = Inner> + '_ {
        // A handler never panics while holding the lock: a poisoned lock
        // still holds a consistent list.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the handler's error; [`FaultLog::take`] reports it.
    pub fn fail(&self, error: String) {
        self.lock().error.get_or_insert(error);
    }

    /// Waits until no handler is between `begin` and the end of its token,
    /// then returns the events since the last call (in recording order), or
    /// a handler's error.
    pub fn take(&self) -> Result<Vec<Event>, String> {
        while self.in_flight.load(Ordering::SeqCst) != 0 {
            yield_now();
        }
        let mut inner = self.lock();
        if let Some(e) = &inner.error {
            return Err(e.clone());
        }
        Ok(std::mem::take(&mut inner.events))
    }
}

impl InFlight<'_> {
    /// Records the event and ends the announcement.
    pub fn record(self, event: Event) {
        self.0.lock().events.push(event);
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(all(test, vmm_shuttle))]
fn yield_now() {
    shuttle::thread::yield_now();
}

#[cfg(not(all(test, vmm_shuttle)))]
fn yield_now() {
    std::thread::yield_now();
}

#[cfg(all(test, vmm_shuttle))]
mod shuttle_tests {
    //! A vCPU faults on a page and waits; a handler resolves it (sets the
    //! page) and records the fault; the main thread joins the vCPU, then
    //! takes the log: the fault must be in it. The broken variant takes its
    //! token after resolving, so the main thread can take the log in between.
    use super::*;
    use crate::mm::model_support::{assert_caught, pct};
    use shuttle::sync::atomic::AtomicBool;
    use shuttle::sync::Arc;
    use shuttle::thread;

    const ITERATIONS: usize = 2_000;
    const BROKEN_ITERATIONS: usize = 20_000;

    fn model(token_before_resolve: bool) {
        let log = Arc::new(FaultLog::default());
        let page = Arc::new(AtomicBool::new(false));
        let event = Event {
            page: 0x1000,
            uffd: 0,
            tid: 1,
            write: true,
            outcome: Outcome::Resolved,
        };
        let handler = {
            let (log, page) = (log.clone(), page.clone());
            thread::spawn(move || {
                if token_before_resolve {
                    let t = log.begin();
                    page.store(true, Ordering::SeqCst);
                    t.record(event);
                } else {
                    page.store(true, Ordering::SeqCst);
                    log.begin().record(event);
                }
            })
        };
        let vcpu = {
            let page = page.clone();
            thread::spawn(move || {
                while !page.load(Ordering::SeqCst) {
                    thread::yield_now();
                }
            })
        };
        vcpu.join().unwrap();
        let events = log.take().unwrap();
        assert_eq!(
            events,
            vec![event],
            "a completed fault is missing from the log"
        );
        handler.join().unwrap();
    }

    #[test]
    fn shuttle_fault_log_take_sees_every_completed_fault() {
        pct(|| model(true), ITERATIONS);
    }

    #[test]
    fn shuttle_fault_log_token_after_resolve_is_caught() {
        assert_caught(
            "a completed fault is missing from the log",
            BROKEN_ITERATIONS,
            || model(false),
        );
    }
}
