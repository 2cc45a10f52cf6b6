//! A guest page → host address cache for device-side guest memory access,
//! kept coherent by the hub's invalidations and sequence protocol.
//!
//! The cached value is a [`PageTranslation`]: a bare [`Hva`], or anything
//! that carries one (the guarded device access in [`crate::mm::guard`] caches
//! the slot id and generation with it, so every use is checked against the
//! slot's refcount lock).
//!
//! # Invariants
//! - An entry for page `p` was resolved after a `read_begin` and installed
//!   under `p`'s shard lock with `retry` false: no invalidation of `p` was in
//!   progress and none ended between the resolve and the install.
//! - `invalidate_start` removes every entry of its range under the shard
//!   locks, so once it has run no entry resolved before the change remains;
//!   fills of the range are refused (retry is true) until `end` finished.
//! - A hit is returned only if no overlapping invalidation is recorded in
//!   progress, so the cache never hands out a translation of a range while it
//!   is being invalidated — not even between `begin`'s record step and the
//!   delivery of `invalidate_start` to the cache.
//!
//! Hot path (hit): one shard lock (shards are picked by hashing the page
//! number, so threads rarely share one), one hash lookup and one atomic load of
//! the hub's in-progress count (a mutex only while some invalidation runs).
//!
//! Lock order: shard → hub seq ranges (inside `retry`). The resolver runs
//! with no lock held.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use super::seq::lock;
use super::{Interest, InvalidationHub, NotifierError, Reason, Replay, Subscriber, SubscriptionId};
use crate::mm::addr::{Gfn, Gpa, GpaRange, Hva, PAGE_SIZE};
use crate::mm::sync::{AtomicU64, Mutex, Ordering};

/// Largest range dropped page by page; larger ones sweep the shards.
const PER_PAGE_DROP_LIMIT: u64 = 64;

/// Errors of [`TranslationCache`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TranslationCacheError {
    /// The resolver has no mapping for the page.
    #[error("no host mapping for guest address {gpa}")]
    Unmapped {
        /// The address looked up.
        gpa: Gpa,
    },
    /// An invalidation of the page is in progress (only from
    /// [`TranslationCache::try_lookup`]).
    #[error("guest address {gpa} is being invalidated")]
    Busy {
        /// The address looked up.
        gpa: Gpa,
    },
    /// The resolver's page translation plus the offset overflows.
    #[error("translation of the page of {gpa} plus its offset overflows")]
    Overflow {
        /// The address looked up.
        gpa: Gpa,
    },
    /// Subscribing to the hub failed.
    #[error("cannot subscribe the translation cache: {0}")]
    Subscribe(#[from] NotifierError),
}

/// Counters of the slow path (relaxed; for tests and diagnostics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Resolver results accepted (installed, or reported unmapped).
    pub fills: u64,
    /// Resolver results thrown away because of a racing invalidation.
    pub retries: u64,
}

/// What a [`TranslationCache`] stores per guest page.
pub trait PageTranslation: Copy + Send + Sync + 'static {
    /// The translation of the byte `offset` bytes into the page (`None` on
    /// overflow).
    fn at_offset(self, offset: u64) -> Option<Self>;
}

impl PageTranslation for Hva {
    fn at_offset(self, offset: u64) -> Option<Self> {
        self.checked_add(offset)
    }
}

/// The part the hub holds (no reference back to the hub: no `Arc` cycle).
struct Shards<T> {
    shards: Box<[Mutex<HashMap<Gfn, T>>]>,
    mask: usize,
    fills: AtomicU64,
    retries: AtomicU64,
}

impl<T> Shards<T> {
    fn shard(&self, gfn: Gfn) -> &Mutex<HashMap<Gfn, T>> {
        // Fibonacci hashing spreads neighbouring pages over shards.
        let h = (gfn.0.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as usize;
        &self.shards[h & self.mask]
    }
}

impl<T: PageTranslation> Subscriber for Shards<T> {
    fn invalidate_start(&self, range: GpaRange, _reason: Reason) {
        let first = range.start().gfn().0;
        // `range` is non-empty, so `end - 1` does not underflow.
        let last = (range.end().0 - 1) >> crate::mm::addr::PAGE_SHIFT;
        if last - first < PER_PAGE_DROP_LIMIT {
            for gfn in (first..=last).map(Gfn) {
                lock(self.shard(gfn)).remove(&gfn);
            }
        } else {
            for shard in self.shards.iter() {
                lock(shard).retain(|gfn, _| !(first..=last).contains(&gfn.0));
            }
        }
    }

    // Fills stay refused until the hub clears the in-progress record, after
    // this returns; nothing to do here.
    fn invalidate_end(&self, _range: GpaRange) {}
}

type Resolver<T> = dyn Fn(Gpa) -> Option<T> + Send + Sync;

/// Caches guest page → host address translations for device accesses.
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use vmm::mm::addr::{Gpa, GpaRange, Hva};
/// use vmm::mm::notifier::{InvalidationHub, Reason, TranslationCache};
///
/// let hub = Arc::new(InvalidationHub::new());
/// let base = Arc::new(AtomicU64::new(0x7f00_0000_0000));
/// let b = base.clone();
/// // In production: the slot map's GPA -> HVA lookup.
/// let cache = TranslationCache::new(hub.clone(), move |gpa: Gpa| {
///     Some(Hva(b.load(Ordering::Acquire) + gpa.0))
/// })
/// .unwrap();
/// assert_eq!(cache.lookup(Gpa(0x1234)), Ok(Hva(0x7f00_0000_1234)));
///
/// // Move the backing: bracket the change with begin/end.
/// let t = hub.begin(GpaRange::new(Gpa(0), 0x10_0000).unwrap(), Reason::Protect).unwrap();
/// base.store(0x7e00_0000_0000, Ordering::Release);
/// hub.end(t);
/// assert_eq!(cache.lookup(Gpa(0x1234)), Ok(Hva(0x7e00_0000_1234)));
/// ```
pub struct TranslationCache<T: PageTranslation = Hva> {
    hub: Arc<InvalidationHub>,
    shards: Arc<Shards<T>>,
    resolver: Box<Resolver<T>>,
    subscription: SubscriptionId,
}

impl<T: PageTranslation> fmt::Debug for TranslationCache<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TranslationCache")
            .field("subscription", &self.subscription)
            .field("shards", &self.shards.shards.len())
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

/// The 4 KiB page holding `gpa` as a range. The last page of the address
/// space cannot be represented whole; `[page, u64::MAX)` covers every byte an
/// invalidation (itself a `GpaRange`) can contain.
fn page_range(page: Gpa) -> GpaRange {
    let end = page.checked_add(PAGE_SIZE).unwrap_or(Gpa(u64::MAX));
    // `page <= end` always holds, so `from_bounds` cannot fail.
    GpaRange::from_bounds(page, end).unwrap_or_else(|| unreachable!("page {page} > end {end}"))
}

/// Default number of shards of a [`TranslationCache`].
pub const DEFAULT_SHARDS: usize = 16;

impl<T: PageTranslation> TranslationCache<T> {
    /// Default number of shards.
    pub const DEFAULT_SHARDS: usize = DEFAULT_SHARDS;

    /// A cache with [`DEFAULT_SHARDS`](Self::DEFAULT_SHARDS) shards,
    /// subscribed to every change on `hub`. `resolver` maps a page-aligned
    /// guest address to the host address of that page (`None`: unmapped).
    pub fn new(
        hub: Arc<InvalidationHub>,
        resolver: impl Fn(Gpa) -> Option<T> + Send + Sync + 'static,
    ) -> Result<Self, TranslationCacheError> {
        Self::with_shards(hub, resolver, DEFAULT_SHARDS)
    }

    /// As [`new`](Self::new) with `shards` shards (rounded up to a power of
    /// two, at least 1).
    pub fn with_shards(
        hub: Arc<InvalidationHub>,
        resolver: impl Fn(Gpa) -> Option<T> + Send + Sync + 'static,
        shards: usize,
    ) -> Result<Self, TranslationCacheError> {
        let n = shards.max(1).next_power_of_two();
        let shards = Arc::new(Shards {
            shards: (0..n).map(|_| Mutex::new(HashMap::new())).collect(),
            mask: n - 1,
            fills: AtomicU64::new(0),
            retries: AtomicU64::new(0),
        });
        let subscriber: Arc<dyn Subscriber> = shards.clone();
        let subscription = hub.subscribe(Interest::All, subscriber, Replay::None)?;
        Ok(Self {
            hub,
            shards,
            resolver: Box::new(resolver),
            subscription,
        })
    }

    /// The host address of `gpa`: cached, or resolved and cached. Waits while
    /// an invalidation of its page is in progress, so the answer reflects the
    /// memory after that change. Must not be called from a callback of an
    /// invalidation of that page (use [`try_lookup`](Self::try_lookup)).
    pub fn lookup(&self, gpa: Gpa) -> Result<T, TranslationCacheError> {
        self.lookup_inner(gpa, true)
    }

    /// As [`lookup`](Self::lookup) but returns
    /// [`TranslationCacheError::Busy`] instead of waiting.
    pub fn try_lookup(&self, gpa: Gpa) -> Result<T, TranslationCacheError> {
        self.lookup_inner(gpa, false)
    }

    fn lookup_inner(&self, gpa: Gpa, wait: bool) -> Result<T, TranslationCacheError> {
        let page = gpa.align_down(PAGE_SIZE);
        let gfn = gpa.gfn();
        let range = page_range(page);
        let shard = self.shards.shard(gfn);
        {
            // Checked under the shard lock: `invalidate_start` cannot drop the
            // entry meanwhile, so the hit is valid at this point.
            let map = lock(shard);
            if let Some(&hva) = map.get(&gfn) {
                if !self.hub.is_invalidating(range) {
                    return Self::offset(gpa, page, hva);
                }
            }
        }
        loop {
            let seq = self.hub.read_begin();
            let resolved = (self.resolver)(page);
            {
                let mut map = lock(shard);
                if !self.hub.retry(seq, range) {
                    self.shards.fills.fetch_add(1, Ordering::Relaxed);
                    let hva = resolved.ok_or(TranslationCacheError::Unmapped { gpa })?;
                    map.insert(gfn, hva);
                    return Self::offset(gpa, page, hva);
                }
            }
            self.shards.retries.fetch_add(1, Ordering::Relaxed);
            if self.hub.is_invalidating(range) {
                if !wait {
                    return Err(TranslationCacheError::Busy { gpa });
                }
                self.hub.wait_idle(range);
            }
        }
    }

    fn offset(gpa: Gpa, page: Gpa, at_page: T) -> Result<T, TranslationCacheError> {
        at_page
            .at_offset(gpa.0 - page.0)
            .ok_or(TranslationCacheError::Overflow { gpa })
    }

    /// Drops the cached translation of `gpa`'s page, if any: for a user that
    /// found it stale by its own check (e.g. a slot generation that moved
    /// without an invalidation of this page). The next lookup resolves it
    /// again.
    pub fn forget(&self, gpa: Gpa) {
        let gfn = gpa.gfn();
        lock(self.shards.shard(gfn)).remove(&gfn);
    }

    /// Number of cached pages.
    pub fn len(&self) -> usize {
        self.shards.shards.iter().map(|s| lock(s).len()).sum()
    }

    /// Whether no page is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Slow-path counters.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            fills: self.shards.fills.load(Ordering::Relaxed),
            retries: self.shards.retries.load(Ordering::Relaxed),
        }
    }
}

impl<T: PageTranslation> Drop for TranslationCache<T> {
    fn drop(&mut self) {
        // Cannot fail: the subscription is ours and removed only here.
        let _ = self.hub.unsubscribe(self.subscription);
    }
}

#[cfg(all(test, not(vmm_loom), not(vmm_shuttle)))]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU64 as StdAtomicU64, AtomicUsize, Ordering as O};
    use std::time::{Duration, Instant};

    use super::*;

    fn r(start: u64, len: u64) -> GpaRange {
        GpaRange::new(Gpa(start), len).unwrap()
    }

    /// A cache whose resolver maps page `p` to `base + p` and counts calls.
    fn cache_with_base(
        hub: &Arc<InvalidationHub>,
    ) -> (TranslationCache, Arc<StdAtomicU64>, Arc<AtomicUsize>) {
        let base = Arc::new(StdAtomicU64::new(0x7f00_0000_0000));
        let calls = Arc::new(AtomicUsize::new(0));
        let (b, c) = (Arc::clone(&base), Arc::clone(&calls));
        let cache = TranslationCache::new(Arc::clone(hub), move |gpa: Gpa| {
            c.fetch_add(1, O::SeqCst);
            let base = b.load(O::Acquire);
            (base != 0).then(|| Hva(base + gpa.0))
        })
        .unwrap();
        (cache, base, calls)
    }

    #[test]
    fn test_cache_lookup_fills_once_then_hits() {
        let hub = Arc::new(InvalidationHub::new());
        let (cache, _, calls) = cache_with_base(&hub);
        assert_eq!(cache.lookup(Gpa(0x1234)), Ok(Hva(0x7f00_0000_1234)));
        assert_eq!(cache.lookup(Gpa(0x1ff8)), Ok(Hva(0x7f00_0000_1ff8)));
        assert_eq!(calls.load(O::SeqCst), 1);
        assert_eq!(cache.len(), 1);
        assert_eq!(
            cache.stats(),
            CacheStats {
                fills: 1,
                retries: 0
            }
        );
    }

    #[test]
    fn test_cache_after_change_never_returns_old_address() {
        let hub = Arc::new(InvalidationHub::new());
        let (cache, base, _) = cache_with_base(&hub);
        assert_eq!(cache.lookup(Gpa(0x5000)), Ok(Hva(0x7f00_0000_5000)));
        assert_eq!(cache.lookup(Gpa(0x9000)), Ok(Hva(0x7f00_0000_9000)));

        let t = hub.begin(r(0x0, 0x8000), Reason::Move).unwrap();
        base.store(0x6000_0000_0000, O::Release);
        hub.end(t);

        assert_eq!(cache.lookup(Gpa(0x5000)), Ok(Hva(0x6000_0000_5000)));
        // Outside the invalidated range the old (still valid) entry stays.
        assert_eq!(cache.lookup(Gpa(0x9000)), Ok(Hva(0x7f00_0000_9000)));
    }

    #[test]
    fn test_cache_large_invalidation_sweeps_shards() {
        let hub = Arc::new(InvalidationHub::new());
        let (cache, _, _) = cache_with_base(&hub);
        for page in 0..200u64 {
            cache.lookup(Gpa(page * PAGE_SIZE)).unwrap();
        }
        hub.begin(r(0x0, 100 * PAGE_SIZE), Reason::Discard)
            .unwrap()
            .end();
        assert_eq!(cache.len(), 100);
    }

    #[test]
    fn test_cache_unmapped_is_error_and_not_cached() {
        let hub = Arc::new(InvalidationHub::new());
        let (cache, base, calls) = cache_with_base(&hub);
        base.store(0, O::Release);
        assert_eq!(
            cache.lookup(Gpa(0x3000)),
            Err(TranslationCacheError::Unmapped { gpa: Gpa(0x3000) })
        );
        base.store(0x1000_0000, O::Release);
        hub.added(r(0x3000, 0x1000), Reason::Plug).unwrap();
        assert_eq!(cache.lookup(Gpa(0x3000)), Ok(Hva(0x1000_3000)));
        assert_eq!(calls.load(O::SeqCst), 2);
    }

    #[test]
    fn test_cache_during_invalidation_try_is_busy_and_lookup_waits() {
        let hub = Arc::new(InvalidationHub::new());
        let (cache, base, _) = cache_with_base(&hub);
        cache.lookup(Gpa(0x2000)).unwrap();
        let t = hub.begin(r(0x2000, 0x1000), Reason::Protect).unwrap();

        assert_eq!(
            cache.try_lookup(Gpa(0x2000)),
            Err(TranslationCacheError::Busy { gpa: Gpa(0x2000) })
        );
        assert_eq!(cache.len(), 0);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| cache.lookup(Gpa(0x2000)));
            std::thread::sleep(Duration::from_millis(20));
            assert!(
                !waiter.is_finished(),
                "lookup returned during the invalidation"
            );
            base.store(0x5000_0000, O::Release);
            hub.end(t);
            assert_eq!(waiter.join().unwrap(), Ok(Hva(0x5000_2000)));
        });
    }

    #[test]
    fn test_cache_hit_refused_between_record_and_start_delivery() {
        // A subscriber registered before the cache hears the start first; from
        // inside its callback the cache still holds the old entry, yet must
        // not hand it out: the invalidation is already recorded.
        #[derive(Default)]
        struct Probe {
            cache: std::sync::OnceLock<Arc<TranslationCache>>,
            seen: std::sync::Mutex<Option<(usize, Result<Hva, TranslationCacheError>)>>,
        }
        impl Subscriber for Probe {
            fn invalidate_start(&self, _: GpaRange, _: Reason) {
                let cache = self.cache.get().unwrap();
                *self.seen.lock().unwrap() = Some((cache.len(), cache.try_lookup(Gpa(0x1000))));
            }
            fn invalidate_end(&self, _: GpaRange) {}
        }
        let hub = Arc::new(InvalidationHub::new());
        let probe = Arc::new(Probe::default());
        hub.subscribe(Interest::All, probe.clone(), Replay::None)
            .unwrap();
        let (cache, _, _) = cache_with_base(&hub);
        let cache = Arc::new(cache);
        probe.cache.set(Arc::clone(&cache)).unwrap();
        cache.lookup(Gpa(0x1000)).unwrap();

        let t = hub.begin(r(0x1000, 0x1000), Reason::Protect).unwrap();

        assert_eq!(
            probe.seen.lock().unwrap().take(),
            Some((1, Err(TranslationCacheError::Busy { gpa: Gpa(0x1000) })))
        );
        assert_eq!(cache.len(), 0);
        hub.end(t);
        assert!(cache.lookup(Gpa(0x1000)).is_ok());
    }

    #[test]
    fn test_cache_drop_unsubscribes() {
        let hub = Arc::new(InvalidationHub::new());
        let (cache, _, _) = cache_with_base(&hub);
        assert_eq!(hub.subscriber_count(), 1);
        drop(cache);
        assert_eq!(hub.subscriber_count(), 0);
    }

    #[test]
    fn test_cache_stress_lookups_never_see_invalidated_generation() {
        const PAGES: u64 = 64;
        let hub = Arc::new(InvalidationHub::new());
        // Per page: the generation the resolver maps it to now, and the newest
        // generation whose invalidation has completed (older ones are dead).
        let live: Arc<Vec<StdAtomicU64>> = Arc::new((0..PAGES).map(|_| 0.into()).collect());
        let dead: Arc<Vec<StdAtomicU64>> = Arc::new((0..PAGES).map(|_| 0.into()).collect());
        let l = Arc::clone(&live);
        let cache = TranslationCache::with_shards(
            Arc::clone(&hub),
            move |gpa: Gpa| {
                let page = gpa.0 / PAGE_SIZE;
                Some(Hva((l[page as usize].load(O::Acquire) << 32) | gpa.0))
            },
            4,
        )
        .unwrap();
        let stop = AtomicBool::new(false);
        let lookups = AtomicUsize::new(0);
        let deadline = Instant::now() + Duration::from_millis(400);
        let mut rounds = 0u64;

        std::thread::scope(|s| {
            for t in 0..3u64 {
                let (cache, dead, stop, lookups) = (&cache, &dead, &stop, &lookups);
                s.spawn(move || {
                    let mut page = t;
                    while !stop.load(O::Relaxed) {
                        page = (page * 7 + 3) % PAGES;
                        let min = dead[page as usize].load(O::Acquire);
                        let hva = cache.lookup(Gpa(page * PAGE_SIZE + 8)).unwrap();
                        assert_eq!(hva.0 & 0xffff_ffff, page * PAGE_SIZE + 8);
                        assert!(
                            hva.0 >> 32 >= min,
                            "page {page}: gen {} < {min}",
                            hva.0 >> 32
                        );
                        lookups.fetch_add(1, O::Relaxed);
                    }
                });
            }
            let mut x = 0x2545_f491_4f6c_dd1du64;
            while Instant::now() < deadline {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let first = x % PAGES;
                let n = 1 + (x >> 32) % (PAGES - first).min(8);
                rounds += 1;
                let t = hub
                    .begin(r(first * PAGE_SIZE, n * PAGE_SIZE), Reason::Protect)
                    .unwrap();
                for p in first..first + n {
                    live[p as usize].store(rounds, O::Release);
                }
                hub.end(t);
                for p in first..first + n {
                    dead[p as usize].store(rounds, O::Release);
                }
            }
            stop.store(true, O::Relaxed);
        });
        assert!(rounds > 100, "only {rounds} invalidations");
        assert!(lookups.load(O::Relaxed) > 1000);
        assert!(cache.stats().fills > 100);
    }
}
