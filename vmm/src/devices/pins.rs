//! Pinning guest memory for device DMA: charged to the pin account, locked in
//! host RAM (`mlock`), and kept safe by invalidation ranges, as the kernel's
//! mmu notifiers keep a device's view of a process's memory safe.
//!
//! A pin holds no slot guard: what protects it is its subscription to the
//! memory manager's [`InvalidationHub`]:
//!
//! - a **non-revocable** pin (a long-term mapping, like VFIO's) vetoes every
//!   change that would take its memory away or reduce its access: unplug,
//!   shrink, move, protect and discard of an overlapping range are refused
//!   with an error naming the pin, and nothing changes;
//! - a **revocable** pin (a transfer in flight, like the DMA engine's) is
//!   revoked in `invalidate_start`, before KVM and the host tear anything
//!   down: it is unlocked and uncharged there, and its user sees
//!   [`Pin::is_revoked`] and stops (the DMA engine then reports REVOKED).
//!
//! Who gets which: the DMA engine pins revocably for the duration of each
//! transfer (hotplug must win over a transfer); scenario `pin` steps choose
//! (`revocable = false` models a passthrough mapping that must not move).
//!
//! Pinning itself races memory ops: it uses KVM's sequence protocol
//! (`read_begin` → check the range is plugged and lock it → register →
//! `retry`), undoing and retrying if an overlapping invalidation started or
//! finished in between, so no pin is ever registered over memory that an op
//! already began to take away.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::mm::addr::{Gpa, GpaRange, Hva, PAGE_SIZE};
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
    /// Memory kept changing under the pin attempt.
    #[error("cannot pin {range}: memory kept changing under it ({attempts} attempts)")]
    Busy {
        /// The range.
        range: GpaRange,
        /// Attempts made.
        attempts: u32,
    },
}

#[derive(Debug)]
struct PinRecord {
    range: GpaRange,
    revocable: bool,
    revoked: Arc<AtomicBool>,
    /// Host ranges locked (released on revoke or unpin).
    locked: Vec<(Hva, u64)>,
    pages: u64,
}

#[derive(Debug, Default)]
struct Table {
    next_id: u64,
    pins: BTreeMap<u64, PinRecord>,
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

    /// Unlocks and uncharges a record (once: `locked` is emptied).
    fn release(&self, rec: &mut PinRecord) {
        for (hva, len) in rec.locked.drain(..) {
            // SAFETY: munlock only changes residency of our own mapping's
            // pages; `hva..hva+len` was locked by this record and is still
            // mapped (the slot cannot be torn down before its invalidation
            // start, which is where a revocation calls this).
            unsafe { libc::munlock(hva.0 as *const libc::c_void, len as usize) };
        }
        if rec.pages > 0 {
            let _ = self.account.pinned().uncharge(rec.pages);
            let _ = self.account.dma_mappings().uncharge(1);
            rec.pages = 0;
        }
    }
}

impl Subscriber for PinState {
    fn check(&self, range: GpaRange, reason: Reason) -> Result<(), String> {
        match self
            .table()
            .pins
            .iter()
            .find(|(_, p)| !p.revocable && p.range.overlaps(&range))
        {
            Some((id, p)) => Err(format!(
                "{reason} of {range} refused: {} is pinned for device DMA by non-revocable pin #{id}",
                p.range
            )),
            None => Ok(()),
        }
    }

    fn invalidate_start(&self, range: GpaRange, _reason: Reason) {
        let mut table = self.table();
        for rec in table.pins.values_mut().filter(|p| p.range.overlaps(&range)) {
            rec.revoked.store(true, Ordering::Release);
            self.release(rec);
        }
    }

    fn invalidate_end(&self, _range: GpaRange) {}
}

/// Pins guest memory for devices; see the module docs.
#[derive(Debug)]
pub struct PinManager {
    memory: Arc<MemoryManager>,
    hub: Arc<InvalidationHub>,
    state: Arc<PinState>,
    subscription: SubscriptionId,
}

/// A live pin. Dropping it unpins (unlock, uncharge) unless it was revoked.
#[derive(Debug)]
pub struct Pin {
    id: u64,
    range: GpaRange,
    revoked: Arc<AtomicBool>,
    state: Arc<PinState>,
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
        let mut table = self.state.table();
        if let Some(mut rec) = table.pins.remove(&self.id) {
            self.state.release(&mut rec);
        }
    }
}

const ATTEMPTS: u32 = 16;

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
            memory,
            hub,
            state,
            subscription,
        }
    }

    /// The account pins are charged to.
    pub fn account(&self) -> &Arc<PinAccount> {
        &self.state.account
    }

    /// Pins `[gpa, gpa + len)`: every byte must be plugged (and writable if
    /// `write`). Charges the pin account and `mlock`s the host memory.
    pub fn pin(&self, gpa: Gpa, len: u64, write: bool, revocable: bool) -> Result<Pin, PinError> {
        let range = GpaRange::new(gpa, len)
            .filter(|r| !r.is_empty() && gpa.is_aligned(PAGE_SIZE) && len % PAGE_SIZE == 0)
            .ok_or(PinError::BadRange { gpa: gpa.0, len })?;
        for _ in 0..ATTEMPTS {
            let seq = self.hub.read_begin();
            if self.hub.retry(seq, range) {
                std::thread::yield_now();
                continue;
            }
            let pin = self.try_pin(range, write, revocable)?;
            if !self.hub.retry(seq, range) {
                return Ok(pin);
            }
            // An overlapping change started or finished while we pinned: the
            // memory we locked may be on its way out. Undo and look again.
            drop(pin);
        }
        Err(PinError::Busy {
            range,
            attempts: ATTEMPTS,
        })
    }

    fn try_pin(&self, range: GpaRange, write: bool, revocable: bool) -> Result<Pin, PinError> {
        let pages = range.len() / PAGE_SIZE;
        let account = &self.state.account;
        account
            .pinned()
            .try_charge(pages)
            .map_err(|source| PinError::Limit { range, source })?;
        if let Err(source) = account.dma_mappings().try_charge(1) {
            let _ = account.pinned().uncharge(pages);
            return Err(PinError::Limit { range, source });
        }
        let mut rec = PinRecord {
            range,
            revocable,
            revoked: Arc::new(AtomicBool::new(false)),
            locked: Vec::new(),
            pages,
        };
        if let Err(e) = self.lock_range(range, write, &mut rec) {
            self.state.release(&mut rec);
            return Err(e);
        }
        let mut table = self.state.table();
        table.next_id += 1;
        let id = table.next_id;
        let revoked = rec.revoked.clone();
        table.pins.insert(id, rec);
        Ok(Pin {
            id,
            range,
            revoked,
            state: self.state.clone(),
        })
    }

    /// Locks the host memory of every slot piece of `range`, each under a slot
    /// guard so it cannot be unmapped during the `mlock`.
    fn lock_range(
        &self,
        range: GpaRange,
        write: bool,
        rec: &mut PinRecord,
    ) -> Result<(), PinError> {
        let mut gpa = range.start();
        while gpa < range.end() {
            let guard = self
                .memory
                .try_acquire(gpa)
                .map_err(|_| PinError::NotPlugged { range, gpa: gpa.0 })?;
            if write && guard.read_only() {
                return Err(PinError::ReadOnly { range, gpa: gpa.0 });
            }
            let piece_end = guard.range().end().min(range.end());
            let len = piece_end.0 - gpa.0;
            let hva = guard
                .hva(gpa, len)
                .map_err(|_| PinError::NotPlugged { range, gpa: gpa.0 })?;
            // SAFETY: `hva..hva+len` is host memory of a slot we hold a guard
            // on, so it is mapped for the whole call; mlock changes only
            // residency, not contents.
            if unsafe { libc::mlock(hva.0 as *const libc::c_void, len as usize) } != 0 {
                return Err(PinError::Mlock {
                    range,
                    errno: std::io::Error::last_os_error().to_string(),
                });
            }
            rec.locked.push((hva, len));
            gpa = piece_end;
        }
        Ok(())
    }
}

impl Drop for PinManager {
    fn drop(&mut self) {
        let _ = self.hub.unsubscribe(self.subscription);
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
            (u64::MAX & !(P - 1), 2 * P),
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
}
