//! Guest accesses that exit as MMIO outside the VMM's register page.
//!
//! Such an exit means no memslot covered the address when the vCPU touched
//! it: the memory is unplugged, or a memory op was between deleting and
//! re-creating the memslot (KVM cannot change a memslot in place), or the
//! slot is read-only and this was a write. The vCPU takes a guard on the slot
//! holding the address ([`crate::mm::guard`]); if the slot is being changed,
//! or no slot holds the address, it first waits until the op in flight is
//! done (on the slot-map writer lock, holding no guard) and looks again, so
//! it sees the map after the op that caused the exit:
//!
//! - the address is plugged (and writable, for a write): the access is
//!   carried out on the host memory behind it, under the guard, and the guest
//!   continues, so a guest touching a range being moved or re-protected sees
//!   the old or the new placement, never a hole; aligned accesses of up to 8
//!   bytes are done as one host load or store, so they are never torn;
//! - otherwise it is an access to unplugged memory, or a write to read-only
//!   memory, which the vCPU reports.
//!
//! The guard, not a lock, keeps the memory mapped during the access: an op
//! that wants to take the slot away waits for it to be released.

use crate::mm::addr::Gpa;
use crate::mm::manager::MemoryManager;

/// What became of an access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Performed on host memory; resume the guest.
    Emulated,
    /// No memory at the address (or the access crosses out of its slot).
    Unplugged,
    /// A write to a read-only slot.
    ReadOnly,
}

/// Carries out a guest access of `data.len()` bytes at `gpa` on the host
/// memory behind it, after any op in flight on that memory.
pub fn emulate(memory: &MemoryManager, gpa: u64, data: &mut [u8], write: bool) -> Access {
    let gpa = Gpa(gpa);
    let mut reader = memory.reader();
    let slot = match reader.try_acquire(gpa) {
        Ok(slot) => slot,
        Err(_) => {
            // Being changed, or not (yet) plugged: wait for the op in flight,
            // then decide on the map it left.
            memory.guarded().wait_for_writer();
            match reader.acquire(gpa) {
                Ok(slot) => slot,
                Err(_) => return Access::Unplugged,
            }
        }
    };
    let Ok(hva) = slot.hva(gpa, data.len() as u64) else {
        return Access::Unplugged;
    };
    if write && slot.read_only() {
        return Access::ReadOnly;
    }
    let ptr = hva.0 as *mut u8;
    // SAFETY: `ptr..ptr+len` lies inside the guarded slot (`hva` checked the
    // range) and its host memory stays mapped while `slot` lives. Guest
    // memory is shared with the guest by design, so volatile accesses of the
    // access's own width are the right tool.
    unsafe { copy(ptr, data, write) };
    drop(slot);
    if write {
        // After releasing the guard: see `MemoryManager::mark_dirty`.
        memory.mark_dirty(gpa, data.len() as u64);
    }
    Access::Emulated
}

/// # Safety
/// `ptr` must be valid for `data.len()` bytes of reads and writes.
unsafe fn copy(ptr: *mut u8, data: &mut [u8], write: bool) {
    macro_rules! sized {
        ($t:ty) => {{
            let p = ptr.cast::<$t>();
            if write {
                let v = <$t>::from_le_bytes(data.try_into().expect("size matches"));
                // SAFETY: valid and aligned per the caller and the match below.
                unsafe { p.write_volatile(v) };
            } else {
                // SAFETY: as above.
                data.copy_from_slice(&unsafe { p.read_volatile() }.to_le_bytes());
            }
        }};
    }
    match data.len() {
        8 if ptr as usize % 8 == 0 => sized!(u64),
        4 if ptr as usize % 4 == 0 => sized!(u32),
        2 if ptr as usize % 2 == 0 => sized!(u16),
        _ => {
            for (i, b) in data.iter_mut().enumerate() {
                // SAFETY: `i < len`, inside the range the caller vouches for.
                let p = unsafe { ptr.add(i) };
                if write {
                    // SAFETY: as above.
                    unsafe { p.write_volatile(*b) };
                } else {
                    // SAFETY: as above.
                    *b = unsafe { p.read_volatile() };
                }
            }
        }
    }
}
