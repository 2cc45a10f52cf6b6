//! Device-side guest memory access: a [`TranslationCache`] on the
//! invalidation hub in front of the slot guards.
//!
//! A device touches the same few guest pages over and over (rings,
//! descriptors). [`DeviceMemory`] caches, per guest page, the host address
//! *and the slot (id, generation, read-only) it came from*. An access looks
//! the page up in the cache (no slot-map lookup on a hit), then takes the
//! slot's refcount with that generation — the same inc-not-zero and
//! re-validation as [`GuardedMap::try_acquire`] — and accesses memory under
//! that guard.
//!
//! Safety does not rest on the cache: the guard is what keeps the memory
//! mapped, and a cached (slot, generation) that no longer matches the cell is
//! refused by it. Coherence does: the cache subscribes to the hub, so an
//! invalidated page is dropped at `invalidate_start` and never returned after
//! `invalidate_end` (see [`TranslationCache`]). A page whose slot changed
//! without an invalidation of that page (its slot was split by a protect of
//! another page) is caught by the generation, forgotten, and resolved again.
//! A dirty-log toggle keeps the slot's generation; a cached page holds
//! nothing it changes.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::access::SlotRef;
use super::{GuardError, GuardedMap, READER_WAIT_BOUND};
use crate::mm::addr::{Gpa, Hva, PAGE_SIZE};
use crate::mm::notifier::{
    InvalidationHub, PageTranslation, TranslationCache, TranslationCacheError,
};
use crate::mm::slot_lock::SlotLockError;

/// How often an access retries a stale cached page before reporting busy.
const STALE_RETRIES: u32 = 16;

/// What [`DeviceMemory`] caches per guest page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotPage {
    /// Host address (of the page, or of the byte looked up).
    pub hva: Hva,
    /// The slot it belongs to.
    pub slot: u32,
    /// That slot's generation when resolved.
    pub generation: u64,
    /// Whether the slot was read-only.
    pub read_only: bool,
}

impl PageTranslation for SlotPage {
    fn at_offset(self, offset: u64) -> Option<Self> {
        Some(Self {
            hva: self.hva.checked_add(offset)?,
            ..self
        })
    }
}

/// Cached, guarded guest memory access for device emulation.
///
/// `M` is whatever owns the [`GuardedMap`] (the memory manager, or a
/// `GuardedMap` itself).
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use vmm::mm::addr::Gpa;
/// use vmm::mm::backing::{BackingKind, HostMapping};
/// use vmm::mm::guard::{DeviceMemory, GuardedMap};
/// use vmm::mm::notifier::InvalidationHub;
/// use vmm::mm::slot_map::{SlotFlags, SlotMap, SlotMapConfig};
///
/// let map = Arc::new(GuardedMap::new(SlotMap::new(SlotMapConfig::default())));
/// let mem = Arc::new(HostMapping::new(&BackingKind::Anon, 0x10000).unwrap());
/// let b = Duration::from_secs(1);
/// map.apply(|m| m.plug(Gpa(0x10000), 0x10000, mem.clone(), 0, SlotFlags::NONE), b).unwrap();
/// // The hub is the one the map's writer reports to (the memory manager's).
/// let hub = Arc::new(InvalidationHub::new());
/// let dev = DeviceMemory::new(map.clone(), hub).unwrap();
/// dev.write_u64(Gpa(0x10008), 7).unwrap();
/// assert_eq!(dev.read_u64(Gpa(0x10008)).unwrap(), 7);
/// assert_eq!(dev.cached_pages(), 1);
/// ```
pub struct DeviceMemory<M: AsRef<GuardedMap> + Send + Sync + 'static> {
    memory: Arc<M>,
    cache: TranslationCache<SlotPage>,
    wait_bound: Duration,
}

impl<M: AsRef<GuardedMap> + Send + Sync + 'static> fmt::Debug for DeviceMemory<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceMemory")
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

impl AsRef<GuardedMap> for GuardedMap {
    fn as_ref(&self) -> &GuardedMap {
        self
    }
}

impl<M: AsRef<GuardedMap> + Send + Sync + 'static> DeviceMemory<M> {
    /// A device view of `memory`, its cache subscribed to `hub` (which must
    /// be the hub `memory`'s writer brackets its changes with).
    ///
    /// # Errors
    /// Subscribing to the hub failed.
    pub fn new(memory: Arc<M>, hub: Arc<InvalidationHub>) -> Result<Self, TranslationCacheError> {
        let m = Arc::clone(&memory);
        let cache = TranslationCache::new(hub, move |page: Gpa| {
            let map = (*m).as_ref().load();
            let slot = map.lookup(page)?;
            Some(SlotPage {
                hva: slot.translate(page)?,
                slot: slot.id().0,
                generation: slot.generation(),
                read_only: slot.flags().read_only,
            })
        })?;
        Ok(Self {
            memory,
            cache,
            wait_bound: READER_WAIT_BOUND,
        })
    }

    /// Sets how long an access waits for ops changing its slot before
    /// [`GuardError::Stuck`] (default [`READER_WAIT_BOUND`]).
    pub fn set_wait_bound(&mut self, bound: Duration) {
        self.wait_bound = bound;
    }

    /// Runs `f` on a guard of the slot holding `[gpa, gpa + len)` and the
    /// host address of `gpa`: several accesses under one guard. Waits while
    /// the slot is being changed (so call it holding no other guard), at
    /// most the wait bound.
    ///
    /// # Errors
    /// [`GuardError::Unplugged`], [`GuardError::OutOfSlot`],
    /// [`GuardError::Busy`] if the cached slot kept changing,
    /// [`GuardError::Stuck`] past the wait bound, or `f`'s error.
    pub fn access<R>(
        &self,
        gpa: Gpa,
        len: u64,
        f: impl FnOnce(&SlotRef<'_>, Hva) -> Result<R, GuardError>,
    ) -> Result<R, GuardError> {
        let memory = (*self.memory).as_ref();
        let mut last = 0;
        let mut tries = 0;
        let started = Instant::now();
        while tries < STALE_RETRIES {
            let page = match self.cache.lookup(gpa) {
                Ok(page) => page,
                Err(TranslationCacheError::Unmapped { .. }) => {
                    return Err(GuardError::Unplugged { gpa })
                }
                Err(e) => return Err(GuardError::Cache(e.to_string())),
            };
            last = page.slot;
            let Some(cell) = memory.cells().get(page.slot) else {
                self.cache.forget(gpa);
                tries += 1;
                continue;
            };
            match cell.read(page.generation, gpa) {
                Ok(guard) => {
                    let offset = gpa.0 - guard.range().start().0;
                    let base = Hva(page.hva.0 - offset);
                    let slot = SlotRef::from_parts(guard, base, page.read_only);
                    slot.hva(gpa, len)?;
                    return f(&slot, page.hva);
                }
                Err(SlotLockError::Excluded { .. }) if started.elapsed() >= self.wait_bound => {
                    return Err(GuardError::Stuck {
                        gpa,
                        slot: page.slot,
                        waited: started.elapsed(),
                        bound: self.wait_bound,
                    })
                }
                Err(SlotLockError::Excluded { .. }) => {
                    // An op is changing the slot: wait for it on the writer
                    // lock (we hold no guard), then look again.
                    memory.wait_for_op(started);
                }
                Err(SlotLockError::TooManyReaders { slot, .. }) => {
                    return Err(GuardError::TooManyReaders { slot })
                }
                Err(_) => {
                    self.cache.forget(gpa);
                    tries += 1;
                }
            }
        }
        Err(GuardError::Busy { gpa, slot: last })
    }

    /// Reads the aligned `u64` at `gpa` (one host load, under the slot's guard).
    ///
    /// # Errors
    /// [`GuardError::Unplugged`], [`GuardError::Unaligned`], [`GuardError::Busy`].
    pub fn read_u64(&self, gpa: Gpa) -> Result<u64, GuardError> {
        self.access(gpa, 8, |slot, _| slot.read_u64(gpa))
    }

    /// Writes the aligned `u64` at `gpa` (one host store, under the slot's guard).
    ///
    /// # Errors
    /// As [`read_u64`](Self::read_u64), and [`GuardError::ReadOnly`].
    pub fn write_u64(&self, gpa: Gpa, value: u64) -> Result<(), GuardError> {
        self.access(gpa, 8, |slot, _| slot.write_u64(gpa, value))
    }

    /// Copies `buf.len()` bytes at `gpa` (within one page) into `buf`.
    ///
    /// # Errors
    /// As [`read_u64`](Self::read_u64), and [`GuardError::OutOfSlot`].
    pub fn read(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), GuardError> {
        check_one_page(gpa, buf.len() as u64)?;
        self.access(gpa, buf.len() as u64, |slot, _| slot.read(gpa, buf))
    }

    /// Copies `buf` to `gpa` (within one page).
    ///
    /// # Errors
    /// As [`write_u64`](Self::write_u64), and [`GuardError::OutOfSlot`].
    pub fn write(&self, gpa: Gpa, buf: &[u8]) -> Result<(), GuardError> {
        check_one_page(gpa, buf.len() as u64)?;
        self.access(gpa, buf.len() as u64, |slot, _| slot.write(gpa, buf))
    }

    /// Pages cached now.
    pub fn cached_pages(&self) -> usize {
        self.cache.len()
    }

    /// The cache (for its statistics).
    pub fn cache(&self) -> &TranslationCache<SlotPage> {
        &self.cache
    }
}

fn check_one_page(gpa: Gpa, len: u64) -> Result<(), GuardError> {
    let in_page = gpa.0 & (PAGE_SIZE - 1);
    if in_page + len > PAGE_SIZE {
        return Err(GuardError::CrossesPage { gpa, len });
    }
    Ok(())
}
