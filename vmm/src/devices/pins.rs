//! Pinning guest memory for device DMA: charged to the pin account, locked in
//! host RAM (`mlock`), and kept safe by the memory manager's invalidations.
//!
//! The kernel's long-term pins (VFIO, iommufd) hold page references, and its
//! mmu notifiers have no veto. Ours hold neither a page reference nor a slot
//! guard once pinned; what keeps them safe is a subscription to the memory
//! manager's [`InvalidationHub`] with a veto:
//!
//! - a **non-revocable** pin (a long-term mapping, like VFIO's) vetoes, in
//!   the hub's `check`, every change that would take its memory away or
//!   reduce its access: unplug, shrink, move, protect and discard of an
//!   overlapping range are refused with an error naming the pin, and nothing
//!   changes. It is never revoked;
//! - a **revocable** pin (a transfer in flight, like the DMA engine's) is
//!   revoked in `invalidate_start`, before KVM and the host tear anything
//!   down: it is unlocked and uncharged there, and its user sees
//!   [`Pin::is_revoked`] and stops (the DMA engine then reports REVOKED).
//!
//! # Why a veto cannot be slipped past
//! A pin is registered (inserted in the table `check` reads) while the pinner
//! still holds slot guards on every piece of its range. The memory manager
//! excludes and drains a slot's guards *before* it runs the vetoes and
//! starts an invalidation (the kernel's `vma_start_write` before
//! `mmu_notifier_invalidate_range_start`). So for any op over the range,
//! either the pinner got its guards first, and the op's drain waits until
//! the pin is in the table, where the veto (or revocation) finds it; or the
//! op excluded the slot first, and the pinner's guard fails: it waits for
//! the op to finish (bounded) and looks at the memory that is there then.
//! That makes KVM's sequence-count retry unnecessary here.
//!
//! # mlock, counted
//! `mlock` does not nest: one `munlock` undoes any number of `mlock`s of a
//! page. Pins may overlap (a transfer over a long-term pin, two transfers),
//! so the pin state counts, per host page, the live pins covering it, and
//! locks a page on its first pin and unlocks it on its last. The host memory
//! locked is always the union of live pins.
//!
//! # Lifetime
//! The subscription and the memory manager live as long as the pin manager
//! or any [`Pin`] (both hold the registration), so a pin never outlives the
//! memory it locks, nor the veto and revocation that keep it mapped.
//!
//! Who gets which: the DMA engine pins revocably for the duration of each
//! transfer (hotplug must win over a transfer); scenario `pin` steps choose
//! (`revocable = false` models a passthrough mapping that must not move).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

// The table lock is a model checker's under `--cfg vmm_shuttle`, so the pin
// manager runs under its scheduler with the memory manager.
use crate::mm::sync::{Mutex, MutexGuard};

use crate::mm::addr::{Gpa, GpaRange, Hva, PAGE_SIZE};
use crate::mm::guard::{GuardError, SlotRef};
use crate::mm::manager::MemoryManager;
use crate::mm::notifier::{InvalidationHub, Reason, Subscriber, SubscriptionId};
use crate::mm::pin_account::{PinAccount, PinAccountError};

/// Why a range cannot be pinned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PinError {
    /// Empty, misaligned or overflowing range.
    #[error("cannot pin [{gpa:#x}, +{len:#x}): the range must be non-empty and 4 KiB aligned")]
    BadRange {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// Part of the range has no memory.
    #[error("cannot pin {range}: {gpa:#x} is not plugged")]
    NotPlugged {
        /// The range.
        range: GpaRange,
        /// The first address without memory.
        gpa: u64,
    },
    /// A writable pin over read-only memory.
    #[error("cannot pin {range} for writing: {gpa:#x} is read-only")]
    ReadOnly {
        /// The range.
        range: GpaRange,
        /// The first read-only address.
        gpa: u64,
    },
    /// The pin account refused the charge.
    #[error("cannot pin {range}: {source}")]
    Limit {
        /// The range.
        range: GpaRange,
        /// The account's refusal.
        source: PinAccountError,
    },
    /// `mlock` failed.
    #[error("cannot pin {range}: mlock failed: {errno}")]
    Mlock {
        /// The range.
        range: GpaRange,
        /// The OS error text.
        errno: String,
    },
    /// Memory ops kept changing the range for longer than the wait bound.
    #[error("cannot pin {range}: memory ops kept changing it for {waited:?} (bound {bound:?})")]
    Busy {
        /// The range.
        range: GpaRange,
        /// How long the pin waited.
        waited: Duration,
        /// The bound.
        bound: Duration,
    },
}

#[derive(Debug)]
struct PinRecord {
    range: GpaRange,
    revocable: bool,
    revoked: Arc<AtomicBool>,
    /// Host ranges counted in [`LockCounts`] (released on revoke or unpin).
    locked: Vec<(Hva, u64)>,
    pages: u64,
}

/// Live pins covering each locked host page (see the module docs).
#[derive(Debug, Default)]
struct LockCounts(BTreeMap<u64, u32>);

/// Host page runs `[start, end)` whose count crossed zero.
type Runs = Vec<(u64, u64)>;

fn push_page(runs: &mut Runs, page: u64) {
    match runs.last_mut() {
        Some((_, end)) if *end == page => *end += PAGE_SIZE,
        _ => runs.push((page, page + PAGE_SIZE)),
    }
}

impl LockCounts {
    /// Counts `[hva, +len)` once more; returns the runs to `mlock` (0 -> 1).
    fn add(&mut self, hva: Hva, len: u64) -> Runs {
        let mut runs = Runs::new();
        for page in (hva.0..hva.0 + len).step_by(PAGE_SIZE as usize) {
            let n = self.0.entry(page).or_insert(0);
            *n += 1;
            if *n == 1 {
                push_page(&mut runs, page);
            }
        }
        runs
    }

    /// Counts `[hva, +len)` once less; returns the runs to `munlock` (1 -> 0).
    fn remove(&mut self, hva: Hva, len: u64) -> Runs {
        let mut runs = Runs::new();
        for page in (hva.0..hva.0 + len).step_by(PAGE_SIZE as usize) {
            if let Some(n) = self.0.get_mut(&page) {
                *n -= 1;
                if *n == 0 || crate::mutants::on("munlock-shared") {
                    self.0.remove(&page);
                    push_page(&mut runs, page);
                }
            }
        }
        runs
    }
}

fn munlock(runs: Runs) {
    for (start, end) in runs {
        // SAFETY: munlock only changes residency of our own mapping's pages;
        // each run was locked by a pin that is still registered, so its slot
        // cannot have been torn down (a registered pin vetoes the teardown or
        // is released in its invalidation's start, which is where a
        // revocation calls this).
        unsafe { libc::munlock(start as *const libc::c_void, (end - start) as usize) };
    }
}

#[derive(Debug, Default)]
struct Table {
    next_id: u64,
    pins: BTreeMap<u64, PinRecord>,
    locks: LockCounts,
}

/// The shared state, subscribed to the hub.
#[derive(Debug)]
struct PinState {
    account: Arc<PinAccount>,
    table: Mutex<Table>,
}

impl PinState {
    fn table(&self) -> MutexGuard<'_, Table> {
        // The table is updated with plain inserts/removes; a panic elsewhere
        // cannot leave it half-updated.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Unlocks (counted) and uncharges a record, once: `locked` is emptied.
    fn release(&self, table: &mut Table, id: u64) {
        let Some(rec) = table.pins.get_mut(&id) else {
            return;
        };
        let locked = std::mem::take(&mut rec.locked);
        let pages = std::mem::take(&mut rec.pages);
        for (hva, len) in locked {
            munlock(table.locks.remove(hva, len));
        }
        if pages > 0 {
            let _ = self.account.pinned().uncharge(pages);
            let _ = self.account.dma_mappings().uncharge(1);
        }
    }
}

impl Subscriber for PinState {
    fn check(&self, range: GpaRange, reason: Reason) -> Result<(), String> {
        if crate::mutants::on("veto-ignored") {
            return Ok(());
        }
        let table = self.table();
        let blocking = table.pins.iter().find(|(_, p)| {
            !p.revocable && !p.revoked.load(Ordering::Relaxed) && p.range.overlaps(&range)
        });
        match blocking {
            Some((id, p)) => Err(format!(
                "{reason} of {range} refused: {} is pinned for device DMA by non-revocable pin #{id}",
                p.range
            )),
            None => Ok(()),
        }
    }

    fn invalidate_start(&self, range: GpaRange, _reason: Reason) {
        let mut table = self.table();
        let revoke: Vec<u64> = table
            .pins
            .iter()
            .filter(|(_, p)| p.revocable && p.range.overlaps(&range))
            .map(|(&id, _)| id)
            .collect();
        for id in revoke {
            if let Some(rec) = table.pins.get(&id) {
                rec.revoked.store(true, Ordering::Release);
            }
            self.release(&mut table, id);
        }
    }

    fn invalidate_end(&self, _range: GpaRange) {}
}

/// The pin state's subscription to the hub: unsubscribed when the manager
/// and every pin are gone.
#[derive(Debug)]
struct Registration {
    /// The memory the pins lock: it outlives every pin, so no pin's memory
    /// is torn down without its veto or revocation.
    memory: Arc<MemoryManager>,
    hub: Arc<InvalidationHub>,
    subscription: SubscriptionId,
    state: Arc<PinState>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = self.hub.unsubscribe(self.subscription);
    }
}

/// Pins guest memory for devices; see the module docs. Use one per memory
/// manager: the per-page mlock counts are the manager's own, so two pin
/// managers over the same memory would unlock each other's pages.
#[derive(Debug)]
pub struct PinManager {
    registration: Arc<Registration>,
    wait_bound: Duration,
}

/// A live pin. Dropping it unpins (unlock, uncharge) unless it was revoked.
#[derive(Debug)]
pub struct Pin {
    id: u64,
    range: GpaRange,
    revoked: Arc<AtomicBool>,
    registration: Arc<Registration>,
}

impl Pin {
    /// The pinned range.
    pub fn range(&self) -> GpaRange {
        self.range
    }
    /// Whether a memory change revoked the pin (its memory may be gone).
    pub fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::Acquire)
    }
    /// The pin's number (shown in veto messages).
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        let state = &self.registration.state;
        let mut table = state.table();
        state.release(&mut table, self.id);
        table.pins.remove(&self.id);
    }
}

/// How long a pin waits, by default, for memory ops on its range to finish.
pub const DEFAULT_PIN_WAIT: Duration = Duration::from_secs(2);

/// One attempt to pin.
enum Attempt {
    Pinned(Pin),
    /// A slot of the range is being changed: wait for the op, try again.
    Busy,
    Failed(PinError),
}

impl PinManager {
    /// A manager charging `account`, subscribed to `memory`'s hub.
    pub fn new(memory: Arc<MemoryManager>, account: Arc<PinAccount>) -> Self {
        let hub = memory.hub().clone();
        let state = Arc::new(PinState {
            account,
            table: Mutex::new(Table::default()),
        });
        let subscription = hub.subscribe_all(state.clone());
        Self {
            registration: Arc::new(Registration {
                memory,
                hub,
                subscription,
                state,
            }),
            wait_bound: DEFAULT_PIN_WAIT,
        }
    }

    /// Numbers the next pin 1 again, as on a new manager, if no pin is
    /// live (a number then names no other pin); `false`, changing nothing,
    /// otherwise.
    pub fn restart_numbering(&self) -> bool {
        let mut table = self.registration.state.table();
        if !table.pins.is_empty() || !table.locks.0.is_empty() {
            return false;
        }
        table.next_id = 0;
        true
    }

    /// Sets how long [`pin`](Self::pin) waits for memory ops changing its
    /// range (default [`DEFAULT_PIN_WAIT`]).
    pub fn set_wait_bound(&mut self, bound: Duration) {
        self.wait_bound = bound;
    }

    /// The account pins are charged to.
    pub fn account(&self) -> &Arc<PinAccount> {
        &self.registration.state.account
    }

    /// Pins `[gpa, gpa + len)`: every byte must be plugged (and writable if
    /// `write`). Charges the pin account and `mlock`s the host memory. While
    /// a memory op changes a slot of the range, waits for it (at most the
    /// wait bound) and then pins the memory that is there.
    ///
    /// # Errors
    /// [`PinError`]; nothing is charged or locked on error.
    pub fn pin(&self, gpa: Gpa, len: u64, write: bool, revocable: bool) -> Result<Pin, PinError> {
        let range = GpaRange::new(gpa, len)
            .filter(|r| !r.is_empty() && gpa.is_aligned(PAGE_SIZE) && len % PAGE_SIZE == 0)
            .ok_or(PinError::BadRange { gpa: gpa.0, len })?;
        let started = Instant::now();
        loop {
            match self.try_pin(range, write, revocable) {
                Attempt::Pinned(pin) => return Ok(pin),
                Attempt::Failed(e) => return Err(e),
                Attempt::Busy if started.elapsed() >= self.wait_bound => {
                    return Err(PinError::Busy {
                        range,
                        waited: started.elapsed(),
                        bound: self.wait_bound,
                    })
                }
                // We hold no guard here: wait for the op.
                Attempt::Busy => self.registration.memory.guarded().wait_for_op(started),
            }
        }
    }

    /// Takes guards on every piece of `range`, then, holding them, locks
    /// the pieces and registers the pin (see the module docs).
    fn try_pin(&self, range: GpaRange, write: bool, revocable: bool) -> Attempt {
        let pages = range.len() / PAGE_SIZE;
        let mut guards: Vec<SlotRef<'_>> = Vec::new();
        let mut pieces: Vec<(Hva, u64)> = Vec::new();
        let mut gpa = range.start();
        while gpa < range.end() {
            let guard = match self.registration.memory.try_acquire(gpa) {
                Ok(guard) => guard,
                Err(GuardError::Busy { .. }) => return Attempt::Busy,
                Err(_) => return Attempt::Failed(PinError::NotPlugged { range, gpa: gpa.0 }),
            };
            if write && guard.read_only() {
                return Attempt::Failed(PinError::ReadOnly { range, gpa: gpa.0 });
            }
            let piece_end = guard.range().end().min(range.end());
            let len = piece_end.0 - gpa.0;
            match guard.hva(gpa, len) {
                Ok(hva) => pieces.push((hva, len)),
                Err(_) => return Attempt::Failed(PinError::NotPlugged { range, gpa: gpa.0 }),
            }
            guards.push(guard);
            gpa = piece_end;
        }
        let state = &self.registration.state;
        let account = &state.account;
        if let Err(source) = account.pinned().try_charge(pages) {
            return Attempt::Failed(PinError::Limit { range, source });
        }
        if let Err(source) = account.dma_mappings().try_charge(1) {
            let _ = account.pinned().uncharge(pages);
            return Attempt::Failed(PinError::Limit { range, source });
        }
        let mut table = state.table();
        table.next_id += 1;
        let id = table.next_id;
        let revoked = Arc::new(AtomicBool::new(false));
        table.pins.insert(
            id,
            PinRecord {
                range,
                revocable,
                revoked: revoked.clone(),
                locked: Vec::new(),
                pages,
            },
        );
        for &(hva, len) in &pieces {
            let runs = table.locks.add(hva, len);
            if let Some(rec) = table.pins.get_mut(&id) {
                rec.locked.push((hva, len));
            }
            for (start, end) in runs {
                // SAFETY: `[start, end)` lies in host memory of a slot we hold
                // a guard on, so it is mapped for the whole call; mlock
                // changes only residency, not contents.
                let ret =
                    unsafe { libc::mlock(start as *const libc::c_void, (end - start) as usize) };
                if ret != 0 {
                    let errno = std::io::Error::last_os_error().to_string();
                    // Counted pages whose mlock failed are unlocked by the
                    // release anyway (munlock of an unlocked page is a no-op).
                    state.release(&mut table, id);
                    table.pins.remove(&id);
                    return Attempt::Failed(PinError::Mlock { range, errno });
                }
            }
        }
        drop(table);
        // The pin is registered: only now may an op over the range drain.
        drop(guards);
        Attempt::Pinned(Pin {
            id,
            range,
            revoked,
            registration: self.registration.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::backing::{BackingKind, HostMapping};
    use crate::mm::manager::{MemslotError, SimKvm};
    use crate::mm::pin_account::PinLimit;
    use crate::mm::slot_map::{SlotFlags, SlotMapConfig};

    const BASE: Gpa = Gpa(0x4000_0000);
    const P: u64 = PAGE_SIZE;

    /// A pin manager over 16 plugged pages at `BASE` on the simulated KVM.
    fn pins(limit: PinLimit) -> (Arc<MemoryManager>, PinManager) {
        let memory = Arc::new(MemoryManager::new(SimKvm::new(), SlotMapConfig::default()).unwrap());
        let mem = Arc::new(HostMapping::new(&BackingKind::Anon, 16 * P).unwrap());
        memory
            .apply(|m| m.plug(BASE, 16 * P, mem, 0, SlotFlags::NONE))
            .unwrap();
        let manager = PinManager::new(memory.clone(), Arc::new(PinAccount::new(limit)));
        (memory, manager)
    }

    #[test]
    fn test_non_revocable_pin_vetoes_unplug_and_nothing_changes() {
        let (memory, pins) = pins(PinLimit::Unlimited);
        let pin = pins.pin(Gpa(BASE.0 + 4 * P), 2 * P, true, false).unwrap();
        let before = memory.registered();
        let err = memory.apply(|m| m.unplug(BASE, 8 * P)).unwrap_err();
        assert!(matches!(err, MemslotError::Vetoed(_)), "{err}");
        assert!(
            err.to_string().contains(&format!("pin #{}", pin.id())),
            "{err}"
        );
        assert_eq!(memory.registered(), before);
        assert!(!pin.is_revoked());
        drop(pin);
        memory.apply(|m| m.unplug(BASE, 8 * P)).unwrap();
    }

    /// Pins are numbered from 1 again only when none is live (a revoked pin
    /// still holds its number until dropped).
    #[test]
    fn test_restart_numbering_only_without_live_pins() {
        let (memory, pins) = pins(PinLimit::Unlimited);
        let first = pins.pin(BASE, P, true, true).unwrap();
        assert_eq!(first.id(), 1);
        assert!(!pins.restart_numbering(), "a pin is live");
        memory.apply(|m| m.unplug(BASE, P)).unwrap();
        assert!(first.is_revoked());
        assert!(!pins.restart_numbering(), "the revoked pin still holds #1");
        assert_eq!(pins.pin(Gpa(BASE.0 + P), P, true, true).unwrap().id(), 2);
        drop(first);
        assert!(pins.restart_numbering());
        assert_eq!(pins.pin(Gpa(BASE.0 + P), P, true, true).unwrap().id(), 1);
    }

    #[test]
    fn test_revocable_pin_is_revoked_and_uncharged_by_unplug() {
        let (memory, pins) = pins(PinLimit::Unlimited);
        let pin = pins.pin(BASE, 4 * P, false, true).unwrap();
        assert_eq!(pins.account().pinned().charged(), 4);
        memory.apply(|m| m.unplug(Gpa(BASE.0 + 2 * P), P)).unwrap();
        assert!(pin.is_revoked());
        assert_eq!(pins.account().pinned().charged(), 0);
        drop(pin);
        assert_eq!(pins.account().pinned().charged(), 0, "not uncharged twice");
    }

    #[test]
    fn test_pin_refuses_holes_read_only_bad_ranges_and_the_limit() {
        let (memory, pins) = pins(PinLimit::Pages(8));
        memory
            .apply(|m| m.protect(Gpa(BASE.0 + 8 * P), 8 * P, true))
            .unwrap();
        let hole = pins.pin(Gpa(BASE.0 + 15 * P), 2 * P, false, true);
        assert!(matches!(hole, Err(PinError::NotPlugged { gpa, .. }) if gpa == BASE.0 + 16 * P));
        let ro = pins.pin(Gpa(BASE.0 + 6 * P), 4 * P, true, true);
        assert!(matches!(ro, Err(PinError::ReadOnly { gpa, .. }) if gpa == BASE.0 + 8 * P));
        assert!(pins.pin(Gpa(BASE.0 + 6 * P), 4 * P, false, true).is_ok());
        for (gpa, len) in [
            (BASE.0 + 1, P),
            (BASE.0, 0),
            (BASE.0, P + 1),
            (!(P - 1), 2 * P),
        ] {
            let bad = pins.pin(Gpa(gpa), len, false, true);
            assert!(
                matches!(bad, Err(PinError::BadRange { .. })),
                "{gpa:#x}+{len:#x}: {bad:?}"
            );
        }
        let over = pins.pin(BASE, 9 * P, false, true);
        assert!(matches!(over, Err(PinError::Limit { .. })), "{over:?}");
        assert_eq!(
            pins.account().pinned().charged(),
            0,
            "refusals leave no charge"
        );
    }

    /// Bytes of `mem` the kernel reports locked (`Locked:` of its VMAs in
    /// `/proc/self/smaps`): other tests' locks in this process do not count.
    fn locked_bytes(mem: &HostMapping) -> u64 {
        let (start, end) = (mem.hva().0, mem.hva().0 + mem.len());
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        let mut kib = 0;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((a, b)) = range.split_once('-') {
                    if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
                    {
                        inside = a >= start && b <= end;
                        continue;
                    }
                }
            }
            if let Some(v) = line.strip_prefix("Locked:") {
                if inside {
                    kib += v
                        .trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .unwrap();
                }
            }
        }
        kib * 1024
    }

    #[test]
    fn test_overlapping_pins_keep_the_union_locked() {
        let memory = Arc::new(MemoryManager::new(SimKvm::new(), SlotMapConfig::default()).unwrap());
        let mem = Arc::new(HostMapping::new(&BackingKind::Anon, 16 * P).unwrap());
        memory
            .apply(|m| m.plug(BASE, 16 * P, mem.clone(), 0, SlotFlags::NONE))
            .unwrap();
        let pins = PinManager::new(memory, Arc::new(PinAccount::new(PinLimit::Unlimited)));
        let a = pins.pin(BASE, 3 * P, false, true).unwrap();
        let b = pins.pin(Gpa(BASE.0 + P), 2 * P, false, true).unwrap();
        assert_eq!(locked_bytes(&mem), 3 * P);
        // munlock does not nest: releasing `a` must keep `b`'s pages locked.
        drop(a);
        assert_eq!(locked_bytes(&mem), 2 * P);
        drop(b);
        assert_eq!(locked_bytes(&mem), 0);
    }

    #[test]
    fn test_a_pin_outliving_its_manager_still_vetoes() {
        let (memory, pins) = pins(PinLimit::Unlimited);
        let pin = pins.pin(BASE, P, false, false).unwrap();
        drop(pins);
        let err = memory.apply(|m| m.unplug(BASE, P)).unwrap_err();
        assert!(matches!(err, MemslotError::Vetoed(_)), "{err}");
        drop(pin);
        assert_eq!(
            memory.hub().subscriber_count(),
            0,
            "unsubscribed with the last pin"
        );
        memory.apply(|m| m.unplug(BASE, P)).unwrap();
    }

    #[test]
    fn test_a_pin_keeps_its_memory_mapped_after_every_other_owner_is_gone() {
        let memory = Arc::new(MemoryManager::new(SimKvm::new(), SlotMapConfig::default()).unwrap());
        let mem = Arc::new(HostMapping::new(&BackingKind::Anon, 4 * P).unwrap());
        let weak = Arc::downgrade(&mem);
        memory
            .apply(|m| m.plug(BASE, 4 * P, mem, 0, SlotFlags::NONE))
            .unwrap();
        let pins = PinManager::new(memory, Arc::new(PinAccount::new(PinLimit::Unlimited)));
        let pin = pins.pin(BASE, 2 * P, true, false).unwrap();
        drop(pins);
        assert!(
            weak.upgrade().is_some(),
            "the pinned memory was unmapped under the pin"
        );
        drop(pin);
        assert!(weak.upgrade().is_none(), "released with the last pin");
    }

    /// Tries, from the writer's veto phase (after the pin manager's own
    /// check ran), to slip a non-revocable pin in on another thread.
    struct Racer {
        pins: std::sync::Weak<PinManager>,
        pinner: Mutex<Option<std::thread::JoinHandle<Result<Pin, PinError>>>>,
    }

    impl Subscriber for Racer {
        fn check(&self, _range: GpaRange, _reason: Reason) -> Result<(), String> {
            let mut pinner = self.pinner.lock().unwrap();
            if pinner.is_none() {
                let pins = self.pins.upgrade().unwrap();
                *pinner = Some(std::thread::spawn(move || pins.pin(BASE, P, false, false)));
                // Long enough for the pin to go through if nothing stops it.
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(())
        }
        fn invalidate_start(&self, _: GpaRange, _: Reason) {}
        fn invalidate_end(&self, _: GpaRange) {}
    }

    #[test]
    fn test_a_non_revocable_pin_cannot_slip_in_between_veto_and_start() {
        let (memory, pins) = pins(PinLimit::Unlimited);
        let pins = Arc::new(pins);
        let racer = Arc::new(Racer {
            pins: Arc::downgrade(&pins),
            pinner: Mutex::new(None),
        });
        let id = memory.hub().subscribe_all(racer.clone());
        let unplug = memory.apply(|m| m.unplug(BASE, 2 * P));
        let pin = racer.pinner.lock().unwrap().take().unwrap().join().unwrap();
        match (&unplug, &pin) {
            // The pin waited for the unplug, then found no memory.
            (Ok(_), Err(PinError::NotPlugged { .. })) => {}
            // Or the pin got in first and vetoed the unplug, unrevoked.
            (Err(MemslotError::Vetoed(_)), Ok(p)) => assert!(!p.is_revoked()),
            other => panic!("both went through, or neither: {other:?}"),
        }
        if let Ok(p) = &pin {
            assert!(!p.is_revoked(), "a non-revocable pin was revoked");
        }
        memory.hub().unsubscribe(id).unwrap();
    }
}
