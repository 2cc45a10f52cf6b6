//! The invalidation hub: subscriptions, the writer API and the reader API.
//!
//! # Invariants
//! - `HubState::active` holds exactly the invalidations between `begin`'s
//!   record step and `end`'s removal step; each lists the subscriptions that
//!   were (or, if registering, are being) sent its start, with their clipped
//!   range. `end` delivers ends to exactly those that are still subscribed.
//! - `SeqState` in-progress records are a superset in time of `active`: added
//!   in the same critical section as the `active` entry (before any start is
//!   delivered) and removed after all ends are delivered.
//! - `HubState::generation` changes on every `subscribe`; `begin` re-runs the
//!   veto checks if it changed while they ran, so no subscriber that was
//!   registered when the change is recorded escaped its check.
//! - An entry's gate: `removed` is final; `running` lists the threads inside
//!   one of its callbacks; writers deliver only once `ready` (its registration
//!   replay is done) and never after `removed`.
//!
//! Lock order: `state` → seq `ranges`; a gate lock is taken with no other
//! lock held. No lock is held while a subscriber callback runs.

use std::fmt;
use std::sync::Arc;

use super::ranges::RangeSet;
use super::seq::{lock, ReadSeq, SeqState};
use super::{NotifierError, Reason, Subscriber};
use crate::mm::addr::GpaRange;
use crate::mm::sync::{thread, Condvar, Mutex, MutexGuard};

/// Identifies one subscription; returned by [`InvalidationHub::subscribe`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubscriptionId(u64);

impl fmt::Display for SubscriptionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Which changes a subscriber hears about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interest {
    /// Every change, unclipped.
    All,
    /// Changes overlapping this (non-empty) range, clipped to it.
    Range(GpaRange),
}

impl Interest {
    /// The part of `range` this interest covers, if any.
    fn clip(&self, range: GpaRange) -> Option<GpaRange> {
        match self {
            Self::All => (!range.is_empty()).then_some(range),
            Self::Range(r) => r.intersect(&range),
        }
    }
}

/// Whether a new subscriber is told about memory plugged before it came.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replay {
    /// Only future changes (and invalidations in progress).
    None,
    /// First `memory_added(range, Reason::Plug)` for every plugged range
    /// (clipped to the interest), then as [`Replay::None`].
    Plugged,
}

/// Delivery gate of one subscription.
#[derive(Debug, Default)]
struct Gate {
    /// The registration replay is done; writers may deliver.
    ready: bool,
    /// Unsubscribed: nothing more is delivered.
    removed: bool,
    /// Threads currently inside one of this subscriber's callbacks.
    running: Vec<thread::ThreadId>,
    /// Threads waiting on `gate_cv` (for `ready`, or for `running` to hold
    /// no thread but the waiter). A callback's return wakes only if there
    /// are some: a wake is a system call, and every op delivers to every
    /// subscriber.
    waiting: usize,
}

impl Gate {
    /// Waits on `cv` once, counted in `waiting` while it sleeps.
    fn wait<'a>(mut gate: MutexGuard<'a, Gate>, cv: &Condvar) -> MutexGuard<'a, Gate> {
        gate.waiting += 1;
        let mut gate = cv.wait(gate).unwrap_or_else(|e| e.into_inner());
        gate.waiting -= 1;
        gate
    }
}

/// One subscription.
struct Entry {
    id: SubscriptionId,
    interest: Interest,
    subscriber: Arc<dyn Subscriber>,
    gate: Mutex<Gate>,
    /// Signalled when `ready`/`removed` are set, and when a callback
    /// returns while a thread waits.
    gate_cv: Condvar,
    /// Broken on purpose (models only): a returning callback reads
    /// `waiting` in a critical section of its own, before the one that
    /// leaves `running`, so a waiter that comes between is never woken.
    #[cfg(test)]
    early_waiting_check: bool,
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("id", &self.id)
            .field("interest", &self.interest)
            .finish_non_exhaustive()
    }
}

/// Marks the current thread as inside a callback of `entry` until dropped
/// (also on unwind, so a panicking callback cannot wedge `unsubscribe`).
struct InCallback<'a> {
    entry: &'a Entry,
    me: thread::ThreadId,
}

impl Drop for InCallback<'_> {
    fn drop(&mut self) {
        #[cfg(test)]
        let early = self
            .entry
            .early_waiting_check
            .then(|| lock(&self.entry.gate).waiting);
        let mut gate = lock(&self.entry.gate);
        if let Some(pos) = gate.running.iter().position(|t| *t == self.me) {
            gate.running.swap_remove(pos);
        }
        // Read under the lock that left `running`: a waiter counted after
        // it sees `running` without this thread and does not sleep on it.
        let waiting = gate.waiting;
        #[cfg(test)]
        let waiting = early.unwrap_or(waiting);
        drop(gate);
        if waiting > 0 {
            self.entry.gate_cv.notify_all();
        }
    }
}

impl Entry {
    fn new(
        id: SubscriptionId,
        interest: Interest,
        subscriber: Arc<dyn Subscriber>,
        #[cfg_attr(not(test), allow(unused_variables))] hub: &InvalidationHub,
    ) -> Self {
        Self {
            id,
            interest,
            subscriber,
            gate: Mutex::new(Gate::default()),
            gate_cv: Condvar::new(),
            #[cfg(test)]
            early_waiting_check: hub.early_waiting_check,
        }
    }

    /// Enters a callback section, or `None` if unsubscribed. Writers pass
    /// `wait_ready = true` to wait for the registration replay.
    fn enter(&self, wait_ready: bool) -> Option<InCallback<'_>> {
        let me = thread::current().id();
        let mut gate = lock(&self.gate);
        while wait_ready && !gate.ready && !gate.removed {
            gate = Gate::wait(gate, &self.gate_cv);
        }
        if gate.removed {
            return None;
        }
        gate.running.push(me);
        Some(InCallback { entry: self, me })
    }

    /// Runs `f` on the subscriber unless it is unsubscribed.
    fn deliver<R>(&self, f: impl FnOnce(&dyn Subscriber) -> R) -> Option<R> {
        let _in = self.enter(true)?;
        Some(f(&*self.subscriber))
    }

    fn mark_ready(&self) {
        lock(&self.gate).ready = true;
        self.gate_cv.notify_all();
    }

    /// Stops deliveries and waits for callbacks running on other threads.
    fn close(&self) {
        let me = thread::current().id();
        let mut gate = lock(&self.gate);
        gate.removed = true;
        self.gate_cv.notify_all();
        while gate.running.iter().any(|t| *t != me) {
            gate = Gate::wait(gate, &self.gate_cv);
        }
    }
}

/// Lets writers deliver to a newly registered entry when dropped.
struct ReadyOnDrop<'a>(&'a Entry);

impl Drop for ReadyOnDrop<'_> {
    fn drop(&mut self) {
        self.0.mark_ready();
    }
}

/// Ends invalidation `id` in the sequence state when dropped.
struct ClearOnDrop<'a> {
    seq: &'a SeqState,
    id: u64,
}

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.seq.end(self.id);
    }
}

/// A subscription and the part of a change it was sent.
type Recipient = (Arc<Entry>, GpaRange);

/// An invalidation between `begin` and `end`.
#[derive(Debug)]
struct Active {
    id: u64,
    range: GpaRange,
    reason: Reason,
    recipients: Vec<Recipient>,
}

#[derive(Debug, Default)]
struct HubState {
    /// Subscriptions in registration order (the delivery order).
    entries: Vec<Arc<Entry>>,
    /// Bumped by every `subscribe`.
    generation: u64,
    active: Vec<Active>,
    plugged: RangeSet,
    next_subscription: u64,
    next_invalidation: u64,
}

impl HubState {
    fn recipients(&self, range: GpaRange) -> Vec<Recipient> {
        self.entries
            .iter()
            .filter_map(|e| e.interest.clip(range).map(|c| (Arc::clone(e), c)))
            .collect()
    }
}

/// Where guest-memory changes are announced and subscribers listen.
///
/// See the [module docs](super) for the protocol, delivery order and callback
/// rules.
#[derive(Debug)]
pub struct InvalidationHub {
    seq: SeqState,
    state: Mutex<HubState>,
    /// Gives every entry the broken wake of [`Entry`] (models only).
    #[cfg(test)]
    early_waiting_check: bool,
}

impl Default for InvalidationHub {
    fn default() -> Self {
        Self::new()
    }
}

/// An invalidation in progress, returned by [`InvalidationHub::begin`]. End it
/// with [`InvalidationHub::end`] (or [`Invalidation::end`]) after the change
/// took effect. Dropping it instead ends it as a change that did not happen
/// (a refused or rolled-back op, a panicking teardown): subscribers still get
/// their `invalidate_end` and the range is no longer blocked, but the hub's
/// plugged set is left as it was.
#[derive(Debug)]
#[must_use = "an invalidation must be ended after the teardown"]
pub struct Invalidation<'a> {
    hub: &'a InvalidationHub,
    id: u64,
    range: GpaRange,
    reason: Reason,
    ended: bool,
}

impl Invalidation<'_> {
    /// The invalidated range.
    pub fn range(&self) -> GpaRange {
        self.range
    }

    /// Why.
    pub fn reason(&self) -> Reason {
        self.reason
    }

    /// The change took effect: delivers `invalidate_end`, then bumps the
    /// sequence count and clears the in-progress record; an unplug, shrink
    /// or move range leaves the plugged set.
    pub fn end(mut self) {
        self.finish(true);
    }

    fn finish(&mut self, took_effect: bool) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        self.hub.finish(self.id, took_effect);
    }
}

impl Drop for Invalidation<'_> {
    /// Ends the invalidation as a change that did not happen.
    fn drop(&mut self) {
        self.finish(false);
    }
}

impl InvalidationHub {
    /// An empty hub: no subscriber, nothing plugged, sequence count 0.
    pub fn new() -> Self {
        Self {
            seq: SeqState::new(),
            state: Mutex::new(HubState::default()),
            #[cfg(test)]
            early_waiting_check: false,
        }
    }

    /// A hub whose subscriptions' returning callbacks look for waiters too
    /// early: the broken variant the loom model of `unsubscribe` must catch.
    #[cfg(all(test, vmm_loom))]
    pub(super) fn with_early_waiting_check() -> Self {
        Self {
            early_waiting_check: true,
            ..Self::new()
        }
    }

    /// Registers `subscriber` for `interest`.
    ///
    /// Before returning, delivers (in this order, on this thread) the
    /// [`Replay::Plugged`] replay and an `invalidate_start` for every
    /// overlapping invalidation in progress; their ends follow from the
    /// writers.
    ///
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// use vmm::mm::addr::{Gpa, GpaRange};
    /// use vmm::mm::notifier::{Interest, InvalidationHub, Reason, Replay, Subscriber};
    ///
    /// #[derive(Default)]
    /// struct Seen(Mutex<Vec<GpaRange>>);
    /// impl Subscriber for Seen {
    ///     fn invalidate_start(&self, _: GpaRange, _: Reason) {}
    ///     fn invalidate_end(&self, _: GpaRange) {}
    ///     fn memory_added(&self, range: GpaRange, _: Reason) {
    ///         self.0.lock().unwrap().push(range);
    ///     }
    /// }
    ///
    /// let hub = InvalidationHub::new();
    /// hub.added(GpaRange::new(Gpa(0), 0x4000).unwrap(), Reason::Plug).unwrap();
    /// let seen = Arc::new(Seen::default());
    /// let window = Interest::Range(GpaRange::new(Gpa(0x1000), 0x1000).unwrap());
    /// let id = hub.subscribe(window, seen.clone(), Replay::Plugged).unwrap();
    /// assert_eq!(*seen.0.lock().unwrap(), vec![GpaRange::new(Gpa(0x1000), 0x1000).unwrap()]);
    /// hub.unsubscribe(id).unwrap();
    /// ```
    pub fn subscribe(
        &self,
        interest: Interest,
        subscriber: Arc<dyn Subscriber>,
        replay: Replay,
    ) -> Result<SubscriptionId, NotifierError> {
        if let Interest::Range(r) = interest {
            if r.is_empty() {
                return Err(NotifierError::EmptyRange {
                    range: r,
                    what: "interest".into(),
                });
            }
        }
        let (entry, plugged, starts) = {
            let mut st = lock(&self.state);
            let id = SubscriptionId(st.next_subscription);
            st.next_subscription += 1;
            st.generation += 1;
            let entry = Arc::new(Entry::new(id, interest, subscriber, self));
            st.entries.push(Arc::clone(&entry));
            let plugged: Vec<GpaRange> = match replay {
                Replay::None => Vec::new(),
                Replay::Plugged => st
                    .plugged
                    .to_vec()
                    .into_iter()
                    .filter_map(|r| interest.clip(r))
                    .collect(),
            };
            let mut starts = Vec::new();
            for active in &mut st.active {
                if let Some(clipped) = interest.clip(active.range) {
                    active.recipients.push((Arc::clone(&entry), clipped));
                    starts.push((clipped, active.reason));
                }
            }
            (entry, plugged, starts)
        };
        // Marks the entry ready when this returns or unwinds, so a panicking
        // replay callback cannot leave writers waiting forever.
        let _ready = ReadyOnDrop(&entry);
        if let Some(_in) = entry.enter(false) {
            for range in plugged {
                entry.subscriber.memory_added(range, Reason::Plug);
            }
            for (range, reason) in starts {
                entry.subscriber.invalidate_start(range, reason);
            }
        }
        Ok(entry.id)
    }

    /// Subscribes `subscriber` to every change, without replay: the way a
    /// device that may touch any guest memory registers. Cannot fail (only a
    /// ranged interest can be refused, for being empty).
    pub fn subscribe_all(&self, subscriber: Arc<dyn Subscriber>) -> SubscriptionId {
        self.subscribe(Interest::All, subscriber, Replay::None)
            .unwrap_or_else(|e| unreachable!("Interest::All refused: {e}"))
    }

    /// Removes a subscription. When this returns, no callback of it runs on
    /// another thread and none will start. From inside its own callback it
    /// does not wait for that callback (no deadlock).
    pub fn unsubscribe(&self, id: SubscriptionId) -> Result<(), NotifierError> {
        let entry = {
            let mut st = lock(&self.state);
            let pos = st
                .entries
                .iter()
                .position(|e| e.id == id)
                .ok_or(NotifierError::UnknownSubscription { id })?;
            let entry = st.entries.remove(pos);
            for active in &mut st.active {
                active.recipients.retain(|(e, _)| e.id != id);
            }
            entry
        };
        entry.close();
        Ok(())
    }

    /// Starts invalidating `range` for `reason` (see the module docs). All
    /// vetoes run first; on success every overlapping subscriber has received
    /// `invalidate_start` (clipped) before this returns, and readers'
    /// [`retry`](Self::retry) reports the range as in progress.
    ///
    /// Errors: [`NotifierError::EmptyRange`], [`NotifierError::NotAnInvalidation`],
    /// [`NotifierError::Vetoed`] — in each case nothing was delivered or
    /// recorded.
    pub fn begin(
        &self,
        range: GpaRange,
        reason: Reason,
    ) -> Result<Invalidation<'_>, NotifierError> {
        let mut started = self.begin_all(&[(range, reason)])?;
        Ok(started.remove(0))
    }

    /// Starts invalidating several ranges as one change (an op that takes
    /// memory away in more than one place): the vetoes of *every* range run
    /// before any `invalidate_start`, so a refusal of one range delivers
    /// nothing for the others. On success the invalidations are returned in
    /// the order given, their starts delivered in that order.
    ///
    /// Errors: as [`begin`](Self::begin), for the first range at fault;
    /// nothing was delivered or recorded for any range.
    pub fn begin_all(
        &self,
        changes: &[(GpaRange, Reason)],
    ) -> Result<Vec<Invalidation<'_>>, NotifierError> {
        for &(range, reason) in changes {
            if range.is_empty() {
                return Err(NotifierError::EmptyRange {
                    range,
                    what: reason.to_string(),
                });
            }
            if !reason.invalidates() {
                return Err(NotifierError::NotAnInvalidation { range, reason });
            }
        }
        loop {
            let (generation, candidates) = {
                let st = lock(&self.state);
                let candidates: Vec<_> = changes
                    .iter()
                    .map(|&(range, reason)| (reason, st.recipients(range)))
                    .collect();
                (st.generation, candidates)
            };
            for (reason, recipients) in &candidates {
                for (entry, clipped) in recipients {
                    if let Some(Err(message)) = entry.deliver(|s| s.check(*clipped, *reason)) {
                        return Err(NotifierError::Vetoed {
                            subscription: entry.id,
                            range: *clipped,
                            reason: *reason,
                            message,
                        });
                    }
                }
            }
            let mut st = lock(&self.state);
            if st.generation != generation {
                continue; // someone subscribed meanwhile: check again
            }
            let mut started = Vec::with_capacity(changes.len());
            for &(range, reason) in changes {
                let id = st.next_invalidation;
                st.next_invalidation += 1;
                let recipients = st.recipients(range);
                st.active.push(Active {
                    id,
                    range,
                    reason,
                    recipients: recipients.clone(),
                });
                self.seq.start(id, range);
                // Made before delivering, so that a panicking callback still
                // ends the invalidation (through `Drop`) instead of wedging it.
                started.push((
                    Invalidation {
                        hub: self,
                        id,
                        range,
                        reason,
                        ended: false,
                    },
                    recipients,
                ));
            }
            drop(st);
            let mut invalidations = Vec::with_capacity(started.len());
            for (invalidation, recipients) in started {
                for (entry, clipped) in &recipients {
                    entry.deliver(|s| s.invalidate_start(*clipped, invalidation.reason));
                }
                invalidations.push(invalidation);
            }
            return Ok(invalidations);
        }
    }

    /// Ends an invalidation: same as [`Invalidation::end`].
    pub fn end(&self, invalidation: Invalidation<'_>) {
        debug_assert!(std::ptr::eq(invalidation.hub, self));
        invalidation.end();
    }

    fn finish(&self, id: u64, took_effect: bool) {
        let active = {
            let mut st = lock(&self.state);
            let Some(pos) = st.active.iter().position(|a| a.id == id) else {
                return;
            };
            let active = st.active.swap_remove(pos);
            let took_effect = took_effect || crate::mutants::on("rollback-unplugs");
            if took_effect && active.reason.unplugs() {
                st.plugged.remove(active.range);
            }
            active
        };
        // Clears the in-progress record even if an end callback panics.
        let _clear = ClearOnDrop { seq: &self.seq, id };
        for (entry, clipped) in &active.recipients {
            entry.deliver(|s| s.invalidate_end(*clipped));
        }
    }

    /// Announces that `range` became usable (`reason` is `Plug`, `Grow` or
    /// `Move`): records it as plugged and delivers `memory_added` (clipped)
    /// to overlapping subscribers before returning.
    pub fn added(&self, range: GpaRange, reason: Reason) -> Result<(), NotifierError> {
        if range.is_empty() {
            return Err(NotifierError::EmptyRange {
                range,
                what: reason.to_string(),
            });
        }
        if !reason.adds() {
            return Err(NotifierError::NotAnAddition { range, reason });
        }
        let recipients = {
            let mut st = lock(&self.state);
            if let Some(existing) = st.plugged.first_overlap(range) {
                return Err(NotifierError::AlreadyPlugged {
                    range,
                    reason,
                    existing,
                });
            }
            st.plugged.insert(range);
            st.recipients(range)
        };
        for (entry, clipped) in &recipients {
            entry.deliver(|s| s.memory_added(*clipped, reason));
        }
        Ok(())
    }

    /// Tells the subscribers interested in `range` that memslot boundaries
    /// now lie at its edges while its memory stayed
    /// ([`Subscriber::reshaped`]). No translation is taken away, but the
    /// delivery is bracketed on the sequence count like an invalidation (as
    /// KVM bumps `mmu_invalidate_seq` around a memslot change): a fault that
    /// read the count before the new boundaries were published and installs
    /// after it sees [`retry`](Self::retry), drops what it installed, and
    /// decides again on the new map.
    pub fn reshaped(&self, range: GpaRange) {
        self.reshape(range, true);
    }

    /// The broken variant the models must catch: the delivery without the
    /// sequence bracket, so a fault that decided on the old boundaries
    /// keeps what it installs.
    #[cfg(all(test, vmm_shuttle))]
    pub(crate) fn reshaped_unbracketed(&self, range: GpaRange) {
        self.reshape(range, false);
    }

    fn reshape(&self, range: GpaRange, bracket: bool) {
        if range.is_empty() {
            return;
        }
        let (id, recipients) = {
            let mut st = lock(&self.state);
            let id = st.next_invalidation;
            st.next_invalidation += 1;
            if bracket {
                self.seq.start(id, range);
            }
            (id, st.recipients(range))
        };
        // Ends the bracket even if a callback panics.
        let _clear = bracket.then_some(ClearOnDrop { seq: &self.seq, id });
        for (entry, clipped) in &recipients {
            entry.deliver(|s| s.reshaped(*clipped));
        }
    }

    /// Snapshot for the fault path (KVM's `mmu_invalidate_seq` read +
    /// `smp_rmb`). Resolve after this, then check with [`retry`](Self::retry).
    pub fn read_begin(&self) -> ReadSeq {
        self.seq.read_begin()
    }

    /// `true` if a translation of `range` resolved after `seq` was taken must
    /// be thrown away: an overlapping invalidation is in progress, or any
    /// invalidation ended since `read_begin`. Call it under the lock your
    /// `invalidate_start` takes, and install the translation under that same
    /// lock if it returns `false`.
    pub fn retry(&self, seq: ReadSeq, range: GpaRange) -> bool {
        self.seq.retry(seq, range)
    }

    /// Whether an invalidation overlapping `range` is in progress (recorded
    /// by `begin`, not yet fully ended).
    pub fn is_invalidating(&self, range: GpaRange) -> bool {
        self.seq.overlaps_in_progress(range)
    }

    /// Blocks until no invalidation overlapping `range` is in progress. Must
    /// not be called from a callback of that invalidation.
    pub fn wait_idle(&self, range: GpaRange) {
        self.seq.wait_idle(range);
    }

    /// Number of invalidations in progress.
    pub fn in_progress(&self) -> usize {
        self.seq.in_progress()
    }

    /// The plugged ranges (from `added` minus ended unplug/shrink/move
    /// invalidations), merged, in address order.
    pub fn plugged(&self) -> Vec<GpaRange> {
        lock(&self.state).plugged.to_vec()
    }

    /// Number of subscriptions.
    pub fn subscriber_count(&self) -> usize {
        lock(&self.state).entries.len()
    }
}

#[cfg(all(test, not(vmm_loom), not(vmm_shuttle)))]
mod tests;
