//! Guest accesses that exit as MMIO outside the VMM's register page.
//!
//! Such an exit means no memslot covered the address when the vCPU touched
//! it: the memory is unplugged, or a memory op was between deleting and
//! re-creating the memslot (KVM cannot change a memslot in place), or the
//! slot is read-only and this was a write. The vCPU waits until no op is in
//! flight, then looks at the current map:
//!
//! - the address is plugged (and writable, for a write): the access is
//!   carried out on the host memory behind it and the guest continues, so a
//!   guest touching a range being moved or re-protected sees the old or the
//!   new placement, never a hole; aligned accesses of up to 8 bytes are done
//!   as one host load or store, so they are never torn;
//! - otherwise it is an access to unplugged memory, or a write to read-only
//!   memory, which the vCPU reports.

use crate::kvm::memslots::MemslotApplier;
use crate::mm::addr::Gpa;

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

/// Carries out a guest access of `data.len()` bytes at `gpa` against the
/// current slot map, waiting for any in-flight op first.
pub fn emulate(memory: &MemslotApplier, gpa: u64, data: &mut [u8], write: bool) -> Access {
    memory.with_map_locked(|map| {
        let Some(slot) = map.lookup(Gpa(gpa)) else {
            return Access::Unplugged;
        };
        let last = gpa.checked_add(data.len() as u64 - 1).map(Gpa);
        if !last.is_some_and(|l| slot.range().contains(l)) {
            return Access::Unplugged;
        }
        if write && slot.flags().read_only {
            return Access::ReadOnly;
        }
        let Some(hva) = slot.translate(Gpa(gpa)) else {
            return Access::Unplugged;
        };
        let ptr = hva.0 as *mut u8;
        // SAFETY: `ptr..ptr+len` lies inside the slot's live host mapping
        // (checked above); no op can unmap it while the map lock is held.
        // Guest memory is shared with the guest by design, so volatile
        // accesses of the access's own width are the right tool.
        unsafe { copy(ptr, data, write) };
        Access::Emulated
    })
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
