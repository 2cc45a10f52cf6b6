//! Stopping the raw baseline when one of its parts fails or its time is up.
//!
//! The raw baseline runs one plain thread per vCPU, meeting at barriers
//! between passes, and for the userfaultfd kinds handler threads that
//! resolve the vCPUs' faults. Left alone, a vCPU that fails leaves the
//! others waiting at the next barrier for ever, and a handler that fails
//! leaves its vCPU in `KVM_RUN` on a fault nobody resolves. [`RawStop`] is
//! where every failure goes:
//! - [`RawStop::meet`] is the barrier: it returns the abort's reason to every
//!   thread waiting or arriving once the run is aborted;
//! - [`RawStop::abort`] keeps the first reason and wakes the barrier; a
//!   party whose thread panics aborts as its [`Participant`] drops;
//! - [`RawStop::supervise`], on the thread that started the vCPUs, aborts at
//!   the deadline (`--timeout`) and, once aborted, kicks every vCPU thread
//!   that has not finished out of `KVM_RUN` with the vCPU kick signal (as
//!   `vmm run` stops its vCPUs), again every millisecond until all finished;
//!   a vCPU then sees the abort at its next `EINTR`.
//!
//! The protocol: `abort` records the reason under the barrier's mutex and
//! only then notifies, so a thread about to wait either sees the reason
//! before it waits or is woken after (a reason set without the mutex, or
//! no notify, can be missed by a thread between its check and its wait:
//! the shuttle model in `raw_stop_shuttle_tests.rs` catches the variant
//! without the wake-up).

use std::time::{Duration, Instant};

use crate::mm::sync::{Condvar, Mutex};

#[derive(Debug, Default)]
struct State {
    /// Threads at the barrier in this generation.
    arrived: usize,
    /// Barrier generations completed.
    generation: u64,
    /// Parties that finished (each [`Participant`] dropped).
    finished: usize,
    /// Why the run was aborted, once it was.
    aborted: Option<String>,
}

/// The raw baseline's barrier, abort and supervisor (see the module docs).
#[derive(Debug)]
pub struct RawStop {
    parties: usize,
    state: Mutex<State>,
    cv: Condvar,
    /// The parties' threads, for kicks.
    threads: std::sync::Mutex<Vec<libc::pthread_t>>,
}

/// A party's membership: its thread is kicked on abort until this drops.
#[derive(Debug)]
pub struct Participant<'a> {
    stop: &'a RawStop,
}

impl Drop for Participant<'_> {
    fn drop(&mut self) {
        let mut s = self.stop.lock();
        s.finished += 1;
        if std::thread::panicking() {
            // The others would wait at the next meeting for ever.
            s.aborted
                .get_or_insert_with(|| "a raw baseline thread panicked".into());
        }
        self.stop.cv.notify_all();
    }
}

impl RawStop {
    /// A barrier for `parties` threads.
    pub fn new(parties: usize) -> Self {
        Self {
            parties,
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
            threads: std::sync::Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> crate::mm::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Joins the calling thread as a party (its thread id, for kicks).
    pub fn enter(&self) -> Participant<'_> {
        // SAFETY: pthread_self has no preconditions and always succeeds.
        let me = unsafe { libc::pthread_self() };
        self.threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(me);
        Participant { stop: self }
    }

    /// Waits until every party arrived: `Ok(true)` for one of them (the
    /// leader), `Ok(false)` for the others.
    ///
    /// # Errors
    /// The abort's reason, if the run was aborted before or while waiting.
    pub fn meet(&self) -> Result<bool, String> {
        let mut s = self.lock();
        if let Some(r) = &s.aborted {
            return Err(r.clone());
        }
        s.arrived += 1;
        if s.arrived == self.parties {
            s.arrived = 0;
            s.generation += 1;
            self.cv.notify_all();
            return Ok(true);
        }
        let generation = s.generation;
        loop {
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
            if s.generation != generation {
                return Ok(false);
            }
            if let Some(r) = &s.aborted {
                return Err(r.clone());
            }
        }
    }

    /// Aborts the run for `reason` (the first reason is kept) and wakes
    /// every waiter.
    pub fn abort(&self, reason: String) {
        self.abort_with(reason, true);
    }

    /// `abort`, optionally without the wake-up (the model's broken variant).
    #[cfg(all(test, vmm_shuttle))]
    pub(super) fn abort_for_model(&self, reason: String, notify: bool) {
        self.abort_with(reason, notify);
    }

    fn abort_with(&self, reason: String, notify: bool) {
        let mut s = self.lock();
        s.aborted.get_or_insert(reason);
        if notify {
            self.cv.notify_all();
        }
    }

    /// Why the run was aborted, if it was.
    pub fn aborted(&self) -> Option<String> {
        self.lock().aborted.clone()
    }

    /// Returns once every party finished: aborts at `deadline`, and while
    /// aborted kicks the parties' threads out of `KVM_RUN` every
    /// millisecond.
    pub fn supervise(&self, deadline: Instant, timeout: Duration) {
        let mut s = self.lock();
        loop {
            if s.finished >= self.parties {
                return;
            }
            if s.aborted.is_some() {
                drop(s);
                self.kick_all();
                s = self.lock();
                s = self
                    .cv
                    .wait_timeout(s, Duration::from_millis(1))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                s.aborted = Some(format!(
                    "timed out after {} (--timeout)",
                    crate::units::fmt_duration(timeout)
                ));
                self.cv.notify_all();
                continue;
            }
            s = self
                .cv
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn kick_all(&self) {
        let signal = crate::vcpu::kick_signal();
        for &t in self
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            // SAFETY: `t` is the id of a party's thread, which stays valid
            // until it is joined, and the caller joins the parties only
            // after `supervise` returned. The kick signal has a no-op
            // handler (installed by the raw baseline before its threads
            // start): it only interrupts a blocking call.
            unsafe { libc::pthread_kill(t, signal) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_meet_releases_every_party_and_names_one_leader() {
        let stop = RawStop::new(3);
        let leaders: usize = std::thread::scope(|s| {
            let hs: Vec<_> = (0..3).map(|_| s.spawn(|| stop.meet().unwrap())).collect();
            hs.into_iter().map(|h| usize::from(h.join().unwrap())).sum()
        });
        assert_eq!(leaders, 1);
    }

    #[test]
    fn test_an_abort_releases_waiters_with_the_first_reason() {
        let stop = RawStop::new(3);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| stop.meet());
            // The waiter may or may not have arrived yet: either way it
            // returns the reason.
            std::thread::sleep(Duration::from_millis(20));
            stop.abort("vCPU 2: KVM_RUN failed".into());
            stop.abort("a later reason".into());
            assert_eq!(waiter.join().unwrap(), Err("vCPU 2: KVM_RUN failed".into()));
        });
        assert_eq!(stop.meet(), Err("vCPU 2: KVM_RUN failed".into()));
    }

    #[test]
    fn test_a_party_that_panics_releases_the_others() {
        let stop = RawStop::new(2);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                let _p = stop.enter();
                stop.meet()
            });
            let failing = s.spawn(|| {
                let _p = stop.enter();
                panic!("a vCPU thread dies");
            });
            assert!(failing.join().is_err());
            assert_eq!(
                waiter.join().unwrap(),
                Err("a raw baseline thread panicked".into())
            );
        });
    }

    #[test]
    fn test_supervise_aborts_at_the_deadline_and_returns_when_parties_finish() {
        crate::vcpu::install_kick_handler().unwrap();
        let stop = RawStop::new(1);
        std::thread::scope(|s| {
            s.spawn(|| {
                let _p = stop.enter();
                // A party stuck until the abort (as a vCPU at a barrier
                // whose partner hangs).
                while stop.aborted().is_none() {
                    std::thread::sleep(Duration::from_millis(1));
                }
            });
            let started = Instant::now();
            stop.supervise(
                started + Duration::from_millis(50),
                Duration::from_millis(50),
            );
            assert!(started.elapsed() >= Duration::from_millis(50));
        });
        assert!(stop.aborted().unwrap().contains("timed out after 50"));
    }
}
