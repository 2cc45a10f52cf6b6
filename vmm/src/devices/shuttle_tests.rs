//! A shuttle model of the memory manager's ops racing pins and guard
//! readers, on the simulated KVM, with the real manager, hub, slot locks and
//! pin manager: randomized PCT schedules from a fixed seed.
//!
//! Oracles:
//! - no op succeeds over a live non-revocable pin, and such a pin is never
//!   revoked: the unplug of a range and a non-revocable pin of it never both
//!   go through;
//! - the hub's plugged set equals the map after every op;
//! - ops on other parts of a slot (a dirty-log toggle, an unplug elsewhere)
//!   never fail a pin or a reader of memory that stays plugged.
//!
//! The broken variant runs the vetoes and `invalidate_start` before the
//! drain (the order that let a pin slip in between veto and start): caught.
//!
//! Run: `RUSTFLAGS="--cfg vmm_shuttle" cargo test -p vmm --lib --release shuttle`.

use std::sync::Arc;
use std::time::Duration;

use super::pins::{PinError, PinManager};
use crate::mm::addr::{Gpa, PAGE_SIZE};
use crate::mm::backing::{BackingKind, HostMapping};
use crate::mm::guard::GuardError;
use crate::mm::manager::{MemoryManager, MemslotError, SimKvm};
use crate::mm::model_support::{assert_caught, pct};
use crate::mm::pin_account::{PinAccount, PinLimit};
use crate::mm::slot_map::{SlotFlags, SlotMapConfig};
use crate::mm::sync::thread;

const BASE: u64 = 0x4000_0000;
const P: u64 = PAGE_SIZE;
const ITERATIONS: usize = 2_000;

fn model(invalidate_before_drain: bool) -> impl Fn() + Send + Sync + 'static {
    move || {
        let mut memory = MemoryManager::new(SimKvm::new(), SlotMapConfig::default()).unwrap();
        memory.model_knobs_mut().invalidate_before_drain = invalidate_before_drain;
        // Shuttle may time any bounded wait out; only the oracles may fail.
        memory.set_drain_bound(Duration::from_secs(3600));
        let memory = Arc::new(memory);
        let mem = Arc::new(HostMapping::new(&BackingKind::Anon, 8 * P).unwrap());
        memory
            .apply(|m| m.plug(Gpa(BASE), 8 * P, mem, 0, SlotFlags::NONE))
            .unwrap();
        let account = Arc::new(PinAccount::new(PinLimit::Unlimited));
        let pins = Arc::new(PinManager::new(memory.clone(), account));

        // A long-term pin of memory the writer unplugs.
        let p = pins.clone();
        let pinner = thread::spawn(move || p.pin(Gpa(BASE + P), P, false, false));
        // A long-term pin of memory that stays plugged.
        let p = pins.clone();
        let bystander = thread::spawn(move || p.pin(Gpa(BASE + 6 * P), P, false, false));
        // A reader of memory that stays plugged.
        let m = memory.clone();
        let reader = thread::spawn(move || {
            for _ in 0..3 {
                let mut reader = m.reader();
                let guard = reader.acquire(Gpa(BASE + 7 * P)).unwrap();
                guard.read_u64(Gpa(BASE + 7 * P)).unwrap();
                drop(guard);
                thread::yield_now();
            }
        });

        let unplug = memory.apply(|m| m.unplug(Gpa(BASE), 2 * P));
        assert_eq!(
            memory.hub().plugged(),
            memory.load().plugged_ranges(),
            "after unplug"
        );
        memory
            .apply(|m| m.set_dirty_log(Gpa(BASE + 4 * P), 4 * P, true))
            .unwrap();
        assert_eq!(
            memory.hub().plugged(),
            memory.load().plugged_ranges(),
            "after toggle"
        );

        let pin = pinner.join().unwrap();
        let bystander = bystander.join().unwrap();
        reader.join().unwrap();
        match (&unplug, &pin) {
            // The pin waited for the unplug and found no memory.
            (Ok(_), Err(PinError::NotPlugged { .. })) => {}
            // Or it was in the table when the veto looked.
            (Err(MemslotError::Vetoed(_)), Ok(_)) => {}
            (unplug, pin) => panic!(
                "a non-revocable pin and the unplug of its memory both went through \
                 (or neither): unplug {unplug:?}, pin {pin:?}"
            ),
        }
        if let Ok(p) = &pin {
            assert!(!p.is_revoked(), "a non-revocable pin was revoked");
        }
        let bystander = bystander.expect("an op elsewhere in the slot failed a pin");
        assert!(!bystander.is_revoked());
        assert!(!matches!(
            unplug,
            Err(MemslotError::Guard(GuardError::Drain(_)))
        ));
    }
}

#[test]
fn test_shuttle_ops_pins_and_readers_keep_every_oracle() {
    pct(model(false), ITERATIONS);
}

#[test]
fn test_shuttle_invalidating_before_the_drain_is_caught() {
    assert_caught("both went through", ITERATIONS * 5, model(true));
}
