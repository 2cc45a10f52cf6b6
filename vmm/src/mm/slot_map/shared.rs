//! Publishing the current [`SlotMap`] to lock-free readers.
//!
//! Readers call [`SharedSlotMap::load`] and get an `Arc` snapshot: one atomic
//! pointer load (arc-swap), never a lock, never blocked by a writer. A snapshot
//! stays valid (and keeps its slots' host mappings alive) for as long as the
//! reader holds it, even after newer maps are published.
//!
//! Writers serialize on one mutex ([`SharedSlotMap::begin_write`]): compute a
//! transition from [`SlotMapWriter::map`], apply its memslot changes to KVM,
//! then [`SlotMapWriter::publish`] the new map (or drop the guard to abandon
//! it). Because the writer lock is held from reading the base map to
//! publishing, no transition is ever computed from a stale base.
//!
//! Memory ordering: arc-swap's store is a release and its load an acquire, so a
//! reader that sees the new map sees it fully built. Lock order: the writer
//! mutex is the outermost lock of the slot map; it is never taken by readers.

use std::fmt;
use std::sync::Arc;

// The writer lock is a model checker's under `--cfg vmm_shuttle`, so the
// whole manager (writers parking readers on it) runs under its scheduler.
use crate::mm::sync::{Mutex, MutexGuard};

use arc_swap::cache::Cache;
use arc_swap::{ArcSwap, Guard};

use super::error::SlotMapError;
use super::transition::Transition;
use super::SlotMap;

/// The current slot map, shared between lock-free readers and serialized writers.
///
/// ```
/// use std::sync::Arc;
/// use vmm::mm::addr::Gpa;
/// use vmm::mm::backing::{BackingKind, HostMapping};
/// use vmm::mm::slot_map::{SharedSlotMap, SlotFlags, SlotMap, SlotMapConfig};
///
/// let shared = SharedSlotMap::new(SlotMap::new(SlotMapConfig::default()));
/// let before = shared.load();
/// let mem = Arc::new(HostMapping::new(&BackingKind::Anon, 0x10000).unwrap());
/// let mut w = shared.begin_write();
/// let t = w.map().plug(Gpa(0), 0x10000, mem, 0, SlotFlags::NONE).unwrap();
/// // ... apply t.changes to KVM here, roll back and drop `w` on failure ...
/// w.publish(t.map);
/// drop(w);
/// assert!(shared.load().lookup(Gpa(0x1000)).is_some());
/// assert!(before.lookup(Gpa(0x1000)).is_none()); // old snapshots stay as they were
/// ```
pub struct SharedSlotMap {
    current: ArcSwap<SlotMap>,
    writer: Mutex<()>,
}

impl fmt::Debug for SharedSlotMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedSlotMap")
            .field("current", &*self.current.load())
            .finish()
    }
}

impl SharedSlotMap {
    /// Publishes `map` as the first current map.
    pub fn new(map: SlotMap) -> Self {
        Self {
            current: ArcSwap::from_pointee(map),
            writer: Mutex::new(()),
        }
    }

    /// A snapshot of the current map. Lock-free.
    pub fn load(&self) -> Arc<SlotMap> {
        self.current.load_full()
    }

    /// A snapshot without touching the map's reference count (arc-swap's
    /// debt slots): cheaper than [`load`](Self::load) for a short look, and
    /// no cache line is shared between readers. Hold it briefly; a long-held
    /// guard is promoted to a full `Arc` by the next writer.
    #[inline]
    pub fn load_guard(&self) -> Guard<Arc<SlotMap>> {
        self.current.load()
    }

    /// A per-thread snapshot cache: [`SnapshotCache::load`] is one atomic
    /// load and a compare while the map is unchanged, and reloads when a
    /// writer published. It keeps the last map it saw alive until the next
    /// `load` (with its host mappings).
    pub fn cache(&self) -> SnapshotCache<'_> {
        SnapshotCache {
            inner: Cache::new(&self.current),
        }
    }

    /// Takes the writer lock. Writers are serialized; readers are not affected.
    pub fn begin_write(&self) -> SlotMapWriter<'_> {
        // A poisoned lock only means a writer panicked while holding it; the
        // published map is still a complete, consistent value, so go on.
        let guard = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        SlotMapWriter {
            shared: self,
            base: self.current.load_full(),
            _guard: guard,
        }
    }

    /// Runs `op` on the current map and publishes its result at once, for
    /// users with no KVM to keep in sync (tests, tools). Returns the
    /// transition (its `map` is the one published).
    pub fn apply<F>(&self, op: F) -> Result<Transition, SlotMapError>
    where
        F: FnOnce(&SlotMap) -> Result<Transition, SlotMapError>,
    {
        let mut w = self.begin_write();
        let t = op(&w.map())?;
        w.publish(t.map.clone());
        Ok(t)
    }
}

/// A reader's cached view of a [`SharedSlotMap`] (see
/// [`SharedSlotMap::cache`]). Not `Sync`: one per reader thread.
pub struct SnapshotCache<'a> {
    inner: Cache<&'a ArcSwap<SlotMap>, Arc<SlotMap>>,
}

impl fmt::Debug for SnapshotCache<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SnapshotCache").finish_non_exhaustive()
    }
}

impl SnapshotCache<'_> {
    /// The current map: the cached one if no writer published since, else
    /// the new one (which is cached from then on). Lock-free.
    #[inline]
    pub fn load(&mut self) -> &Arc<SlotMap> {
        self.inner.load()
    }
}

/// The writer lock of a [`SharedSlotMap`], with the map it protects.
pub struct SlotMapWriter<'a> {
    shared: &'a SharedSlotMap,
    base: Arc<SlotMap>,
    _guard: MutexGuard<'a, ()>,
}

impl fmt::Debug for SlotMapWriter<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlotMapWriter")
            .field("base", &*self.base)
            .finish()
    }
}

impl SlotMapWriter<'_> {
    /// The current map (the base for the next transition).
    pub fn map(&self) -> Arc<SlotMap> {
        Arc::clone(&self.base)
    }

    /// Makes `map` current for new readers; it becomes the writer's base.
    pub fn publish(&mut self, map: SlotMap) {
        let map = Arc::new(map);
        self.shared.current.store(Arc::clone(&map));
        self.base = map;
    }
}
