//! The sequence protocol and two deliberately broken versions of it, shared
//! by the loom and shuttle models: each model runs the real one (must pass)
//! and the broken ones (must be caught).
use std::sync::Arc;

use super::seq::{lock, ReadSeq, SeqState};
use crate::mm::addr::{Gpa, GpaRange};
use crate::mm::sync::{thread, AtomicU64, AtomicUsize, Mutex, Ordering};

/// The page every model works on.
pub(super) const PAGE: Gpa = Gpa(0x1000);

pub(super) fn page_range() -> GpaRange {
    GpaRange::new(PAGE, 0x1000).unwrap()
}

/// A writer/reader sequence protocol for one page.
pub(super) trait Protocol: Send + Sync + 'static {
    fn start(&self);
    fn end(&self);
    fn read_begin(&self) -> u64;
    fn retry(&self, seq: u64) -> bool;
}

/// The real protocol.
pub(super) struct Real(pub(super) SeqState);

impl Protocol for Real {
    fn start(&self) {
        self.0.start(1, page_range());
    }
    fn end(&self) {
        assert!(self.0.end(1));
    }
    fn read_begin(&self) -> u64 {
        self.0.read_begin().0
    }
    fn retry(&self, seq: u64) -> bool {
        self.0.retry(ReadSeq(seq), page_range())
    }
}

/// Broken: `retry` looks only at the sequence count, not at invalidations in
/// progress.
pub(super) struct IgnoresInProgress {
    pub(super) seq: AtomicU64,
}

impl Protocol for IgnoresInProgress {
    fn start(&self) {}
    fn end(&self) {
        self.seq.fetch_add(1, Ordering::Release);
    }
    fn read_begin(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }
    fn retry(&self, seq: u64) -> bool {
        self.seq.load(Ordering::Acquire) != seq
    }
}

/// Broken: the sequence count moves at `start` instead of at `end`.
pub(super) struct BumpsAtStartOnly {
    pub(super) seq: AtomicU64,
    pub(super) in_progress: AtomicUsize,
}

impl Protocol for BumpsAtStartOnly {
    fn start(&self) {
        self.seq.fetch_add(1, Ordering::Release);
        self.in_progress.fetch_add(1, Ordering::Release);
    }
    fn end(&self) {
        self.in_progress.fetch_sub(1, Ordering::Release);
    }
    fn read_begin(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }
    fn retry(&self, seq: u64) -> bool {
        self.in_progress.load(Ordering::Acquire) != 0 || self.seq.load(Ordering::Acquire) != seq
    }
}

/// What a protocol model shares: the protocol, the resolver's current answer
/// (1 before any change) and the fault path's installed translation.
pub(super) struct ProtocolState<P> {
    pub(super) proto: P,
    pub(super) generation: AtomicU64,
    pub(super) slot: Mutex<Option<u64>>,
}

impl<P: Protocol> ProtocolState<P> {
    pub(super) fn new(proto: P) -> Arc<Self> {
        Arc::new(Self {
            proto,
            generation: AtomicU64::new(1),
            slot: Mutex::new(None),
        })
    }

    /// Spawns the writer: invalidations moving the answer to 2, 3, ...
    /// `last`, each start → drop the translation → new answer → end.
    pub(super) fn spawn_invalidator(self: &Arc<Self>, last: u64) -> thread::JoinHandle<()> {
        let s = self.clone();
        thread::spawn(move || {
            for next in 2..=last {
                s.proto.start();
                *lock(&s.slot) = None; // invalidate_start: drop the translation
                s.generation.store(next, Ordering::Release); // teardown: new answer
                s.proto.end();
            }
        })
    }
}
