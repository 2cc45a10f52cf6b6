//! Invalidation ranges: every change that takes guest memory away (or reduces
//! access to it) is bracketed `start(range)` → teardown → `end(range)` and
//! delivered to subscribers, and fault paths that build translations without
//! the writer's locks use KVM's sequence protocol to notice a racing change.
//!
//! Modelled on Linux `mm/mmu_notifier.c` (`mmu_interval_notifier`,
//! `mn_itree_inv_start_range`, `mmu_interval_read_begin`/`read_retry`) and KVM's
//! `mmu_invalidate_seq`/`mmu_invalidate_in_progress`/`mmu_invalidate_retry_gfn`.
//!
//! - [`InvalidationHub`] (in `hub.rs`): subscribers, the writer API
//!   ([`InvalidationHub::begin`], [`InvalidationHub::end`],
//!   [`InvalidationHub::added`]) and the reader API
//!   ([`InvalidationHub::read_begin`], [`InvalidationHub::retry`]).
//! - `seq.rs`: the sequence count and in-progress state, with the
//!   memory-ordering argument.
//! - [`TranslationCache`] (in `translation_cache.rs`): a guest-page → host
//!   address cache for device-side accesses, built on the protocol.
//!
//! # Writer protocol and delivery order
//! 1. `let t = hub.begin(range, reason)?` — every overlapping subscriber's
//!    [`Subscriber::check`] runs first; one refusal returns
//!    [`NotifierError::Vetoed`] and nothing was recorded or delivered. Then the
//!    invalidation is recorded as in progress (readers' `retry` sees it) and
//!    `invalidate_start` is delivered to each overlapping subscriber, clipped to
//!    its registered range. All starts are delivered before `begin` returns.
//!    A change in several places uses `hub.begin_all(&[(range, reason), ...])`:
//!    the checks of every range run before any start, so one refusal delivers
//!    nothing for the others.
//! 2. The caller tears down (KVM memslot, host mapping, ...).
//! 3. `hub.end(t)` — `invalidate_end` goes to the subscribers that got the
//!    start (and are still subscribed), then the sequence count is bumped and
//!    the in-progress record cleared. Dropping `t` without `end` ends it too.
//!
//! Memory that appears (plug, grow, move destination) is announced with
//! [`InvalidationHub::added`]. Empty ranges are never delivered: `begin`,
//! `added` and a range interest with an empty range are errors
//! ([`NotifierError::EmptyRange`]); a subscriber whose range does not overlap
//! a change hears nothing of it.
//!
//! # Fault-path protocol
//! `let seq = hub.read_begin()` → resolve → under your own lock (the one your
//! `invalidate_start` takes) `hub.retry(seq, range)`: `true` if an overlapping
//! invalidation is in progress (recorded by `begin`, not yet fully ended) or
//! any invalidation ended since `read_begin`. As in KVM the count moves at
//! `end` only: one that started since and still runs is caught by the
//! in-progress check when it overlaps and is irrelevant when it does not. See
//! `seq.rs` for the memory orderings (KVM's `smp_wmb`/`smp_rmb` pairing).
//!
//! # Subscribing while invalidations run
//! A subscriber that registers while an overlapping invalidation is in
//! progress receives `invalidate_start` for it (clipped) before `subscribe`
//! returns, and the matching `invalidate_end` when the writer ends it. With
//! [`Replay::Plugged`] it first receives `memory_added(range, Reason::Plug)`
//! for each plugged range (the hub tracks them from `added` and from the end of
//! unplug/shrink/move invalidations). Writers wait until this registration
//! replay is finished before delivering anything to the new subscriber, so it
//! sees events in a consistent order.
//!
//! After [`InvalidationHub::unsubscribe`] returns, no callback (including
//! `check`) starts on that subscriber, and none is running on another thread.
//! Called from inside one of that subscriber's own callbacks it does not wait
//! for the calling callback (so it cannot deadlock); the running callback is
//! the last. A subscriber removed between start and end gets no end.
//!
//! # Callback rules
//! Callbacks run on the writer's (or the registering) thread with no hub lock
//! held. They may call `read_begin`, `retry`, `plugged`, `subscribe` and
//! `unsubscribe`; they must not call the writer API (`begin`/`end`/`added`),
//! must not wait for an in-progress invalidation to finish (e.g.
//! [`TranslationCache::lookup`] of the range being invalidated), and two
//! callbacks on different threads must not unsubscribe each other.
//! `check` is a snapshot: a subscriber that can start refusing later (a pin)
//! must close the race itself with `read_begin`/`retry` around its pin.
//! A panicking callback is a bug in the subscriber, but leaves the hub
//! usable: the invalidation is still ended and the callback's gate released.
//!
//! # Lock order
//! `hub state` → `seq ranges`; `cache shard` → `seq ranges`; an entry's gate
//! lock is taken alone. No hub lock is held while a callback runs.
//!
//! ```
//! use std::sync::Arc;
//! use vmm::mm::addr::{Gpa, GpaRange};
//! use vmm::mm::notifier::{Interest, InvalidationHub, Reason, Replay, Subscriber};
//!
//! struct Log;
//! impl Subscriber for Log {
//!     fn invalidate_start(&self, range: GpaRange, reason: Reason) {
//!         println!("start {range} ({reason})");
//!     }
//!     fn invalidate_end(&self, range: GpaRange) {
//!         println!("end {range}");
//!     }
//! }
//!
//! let hub = InvalidationHub::new();
//! let ram = GpaRange::new(Gpa(0x10_0000), 0x10_0000).unwrap();
//! hub.added(ram, Reason::Plug).unwrap();
//! hub.subscribe(Interest::All, Arc::new(Log), Replay::None).unwrap();
//!
//! // Fault path: snapshot, resolve, check.
//! let seq = hub.read_begin();
//! assert!(!hub.retry(seq, ram));
//!
//! let t = hub.begin(ram, Reason::Unplug).unwrap();
//! assert!(hub.retry(seq, ram)); // in progress
//! // ... tear down the memslot and the mapping here ...
//! hub.end(t);
//! assert!(hub.retry(seq, ram)); // the sequence count moved
//! assert!(hub.plugged().is_empty());
//! ```

mod hub;
mod ranges;
mod seq;
mod translation_cache;

#[cfg(all(test, vmm_loom))]
mod loom_tests;
#[cfg(all(test, any(vmm_loom, vmm_shuttle)))]
mod model_protocols;
#[cfg(all(test, vmm_shuttle, not(vmm_loom)))]
mod shuttle_tests;

use std::fmt;

use crate::mm::addr::GpaRange;

pub use hub::{Interest, Invalidation, InvalidationHub, Replay, SubscriptionId};
pub use seq::ReadSeq;
pub use translation_cache::{
    CacheStats, PageTranslation, TranslationCache, TranslationCacheError, DEFAULT_SHARDS,
};

/// Why guest memory changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// A slot is removed.
    Unplug,
    /// A slot loses its tail (or head).
    Shrink,
    /// A slot moves to another guest-physical address: the old range is
    /// invalidated, the new one added.
    Move,
    /// Access is reduced (e.g. to read-only).
    Protect,
    /// Backing pages are dropped (`MADV_DONTNEED`); the range stays plugged.
    Discard,
    /// A slot is added.
    Plug,
    /// A slot gains a tail (or head).
    Grow,
}

impl Reason {
    /// Whether this change takes memory away or reduces access, i.e. must be
    /// bracketed by [`InvalidationHub::begin`]/[`InvalidationHub::end`].
    pub fn invalidates(self) -> bool {
        matches!(
            self,
            Self::Unplug | Self::Shrink | Self::Move | Self::Protect | Self::Discard
        )
    }

    /// Whether this change makes memory appear ([`InvalidationHub::added`]).
    pub fn adds(self) -> bool {
        matches!(self, Self::Plug | Self::Grow | Self::Move)
    }

    /// Whether the invalidated range is no longer plugged after `end`.
    pub(crate) fn unplugs(self) -> bool {
        matches!(self, Self::Unplug | Self::Shrink | Self::Move)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Unplug => "unplug",
            Self::Shrink => "shrink",
            Self::Move => "move",
            Self::Protect => "protect",
            Self::Discard => "discard",
            Self::Plug => "plug",
            Self::Grow => "grow",
        })
    }
}

/// A user of guest memory that must hear about every change to it.
///
/// All ranges passed in are non-empty and clipped to the subscriber's
/// [`Interest`]. See the module docs for what callbacks may call.
pub trait Subscriber: Send + Sync {
    /// `range` is about to change: stop using it and drop translations of it.
    /// No new translation of `range` may be created until the matching
    /// [`Subscriber::invalidate_end`].
    fn invalidate_start(&self, range: GpaRange, reason: Reason);

    /// The change announced by the matching `invalidate_start` is complete.
    fn invalidate_end(&self, range: GpaRange);

    /// `range` became usable (plug, grow, move destination, or a replay of
    /// plugged memory at registration, reported as [`Reason::Plug`]).
    fn memory_added(&self, _range: GpaRange, _reason: Reason) {}

    /// Memslot boundaries moved to the edges of `range` while the memory
    /// stayed (dirty logging switched, or access widened, over part of a
    /// slot): every translation stays valid, but one larger than a page
    /// that straddles an edge now spans two memslots with different flags.
    /// KVM splits its huge mappings when a memslot starts logging for the
    /// same reason: dirty state is tracked per mapping.
    fn reshaped(&self, _range: GpaRange) {}

    /// Veto: called before any `invalidate_start` of the change; an `Err`
    /// refuses the whole change (e.g. a pinned DMA buffer in `range`).
    fn check(&self, _range: GpaRange, _reason: Reason) -> Result<(), String> {
        Ok(())
    }
}

/// Errors of the invalidation hub.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NotifierError {
    /// A change or an interest with no byte in it.
    #[error("empty range {range} for {what}")]
    EmptyRange {
        /// The empty range.
        range: GpaRange,
        /// What was asked (a reason or "interest").
        what: String,
    },
    /// `begin` with a reason that does not take memory away.
    #[error("{reason} of {range} does not take memory away; use added()")]
    NotAnInvalidation {
        /// The range.
        range: GpaRange,
        /// The reason given.
        reason: Reason,
    },
    /// `added` with a reason that does not add memory.
    #[error("{reason} of {range} does not add memory; use begin()/end()")]
    NotAnAddition {
        /// The range.
        range: GpaRange,
        /// The reason given.
        reason: Reason,
    },
    /// `added` for memory that overlaps memory already plugged.
    #[error("cannot add {range} ({reason}): overlaps plugged {existing}")]
    AlreadyPlugged {
        /// The range to add.
        range: GpaRange,
        /// The reason given.
        reason: Reason,
        /// The plugged range it overlaps.
        existing: GpaRange,
    },
    /// A subscriber's [`Subscriber::check`] refused the change.
    #[error("subscription {subscription} refused {reason} of {range}: {message}")]
    Vetoed {
        /// The refusing subscription.
        subscription: SubscriptionId,
        /// The change's range, clipped to that subscription's interest.
        range: GpaRange,
        /// The change's reason.
        reason: Reason,
        /// The subscriber's explanation.
        message: String,
    },
    /// `unsubscribe` of an id that is not subscribed.
    #[error("subscription {id} is not registered")]
    UnknownSubscription {
        /// The id given.
        id: SubscriptionId,
    },
}
