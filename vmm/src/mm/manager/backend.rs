//! The memslot and dirty-log calls the memory manager makes, behind a trait, so the
//! whole manager runs on real KVM (`vmm::kvm::memslots` implements it for
//! a VM fd) or on [`SimKvm`](super::SimKvm), a simulated KVM that enforces
//! KVM's memslot rules in memory and injects failures at chosen calls.
//!
//! The trait speaks `mm`'s types ([`MemslotRegion`], [`MemslotFlags`],
//! [`SlotId`]): no KVM type crosses into `mm`.

use std::sync::Arc;

use vmm_sys_util::errno;

use crate::mm::addr::{Gpa, Hva};
use crate::mm::slot_map::{MemslotFlags, MemslotSpec, SlotId};

use super::dirty_mode::DirtyLogMode;

/// One `KVM_SET_USER_MEMORY_REGION` call: `size == 0` deletes slot `slot`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct MemslotRegion {
    /// Slot id.
    pub slot: SlotId,
    /// Memslot flags.
    pub flags: MemslotFlags,
    /// First guest-physical address.
    pub gpa: Gpa,
    /// Bytes; 0 deletes the slot.
    pub size: u64,
    /// Host address of the first byte.
    pub hva: Hva,
}

impl MemslotRegion {
    /// The call that creates (or changes the flags of) `spec`.
    pub fn set(spec: &MemslotSpec) -> Self {
        Self {
            slot: spec.id,
            flags: spec.flags,
            gpa: spec.gpa,
            size: spec.size,
            hva: spec.hva,
        }
    }

    /// The call that deletes `spec`'s slot.
    pub fn delete(spec: &MemslotSpec) -> Self {
        Self {
            size: 0,
            ..Self::set(spec)
        }
    }
}

/// The memslot calls the memory manager needs. Implemented for KVM's VM fd
/// in `vmm::kvm::memslots`, for [`SimKvm`](super::SimKvm), and for `Arc<T>`
/// (so a test keeps its own handle); tests wrap either to count calls or
/// inject failures.
pub trait MemslotBackend: Send + Sync {
    /// `KVM_SET_USER_MEMORY_REGION`.
    ///
    /// # Safety
    /// Unless `region.size` is 0 (a delete), the host range
    /// `[region.hva, +region.size)` must stay mapped, and serve as nothing but
    /// this guest's memory, until the backend has dropped the slot (a
    /// successful delete or move, or the VM's destruction).
    unsafe fn set_memslot(&self, region: &MemslotRegion) -> Result<(), errno::Error>;

    /// `KVM_GET_DIRTY_LOG` of slot `slot` into `bitmap` (read and clear).
    ///
    /// # Safety
    /// `bitmap` must be valid for writes of the slot's bitmap as the backend
    /// holds it (`ceil(pages / 64) * 8` bytes), whatever the slot's size there is.
    unsafe fn get_dirty_log_into(&self, slot: SlotId, bitmap: *mut u64)
        -> Result<(), errno::Error>;

    /// The dirty-log interface this backend was set up with (default:
    /// [`DirtyLogMode::Bitmap`]). In [`Manual`](DirtyLogMode::Manual) mode
    /// [`get_dirty_log_into`](Self::get_dirty_log_into) only reads; in
    /// [`Ring`](DirtyLogMode::Ring) mode it fails and the log is in
    /// [`harvest_dirty_rings`](Self::harvest_dirty_rings).
    fn dirty_log_mode(&self) -> DirtyLogMode {
        DirtyLogMode::Bitmap
    }

    /// `KVM_CLEAR_DIRTY_LOG`: clears (and write-protects again) the pages of
    /// slot `slot` whose bits are set in `bitmap`, bit `i` naming page
    /// `first_page + i`. `first_page` must be a multiple of 64, and
    /// `num_pages` too unless the range ends at the slot's end (KVM's
    /// rules). Only in [`Manual`](DirtyLogMode::Manual) mode; the default
    /// fails with `ENOTTY`.
    ///
    /// # Safety
    /// `bitmap` must be valid for reads of `ceil(num_pages / 64)` words.
    unsafe fn clear_dirty_log(
        &self,
        slot: SlotId,
        first_page: u64,
        num_pages: u32,
        bitmap: *const u64,
    ) -> Result<(), errno::Error> {
        let _ = (slot, first_page, num_pages, bitmap);
        Err(errno::Error::new(libc::ENOTTY))
    }

    /// Collects every dirty-ring entry published so far, calling
    /// `sink(slot, offset)` for each (`slot` as KVM writes it: address space
    /// in the high 16 bits, slot id in the low 16; `offset` in pages from
    /// the slot's start), then resets the collected entries
    /// (`KVM_RESET_DIRTY_RINGS`), which write-protects their pages again.
    /// Returns the number of entries. Only in [`Ring`](DirtyLogMode::Ring)
    /// mode; the default collects nothing.
    ///
    /// Entries name slots by id, so a caller must harvest after deleting a
    /// dirty-logging slot and before the id can name another slot.
    fn harvest_dirty_rings(&self, sink: &mut dyn FnMut(u32, u64)) -> Result<u64, errno::Error> {
        let _ = sink;
        Ok(0)
    }
}

impl<T: MemslotBackend + ?Sized> MemslotBackend for Arc<T> {
    unsafe fn set_memslot(&self, region: &MemslotRegion) -> Result<(), errno::Error> {
        // SAFETY: forwarded; our caller upholds the same contract.
        unsafe { (**self).set_memslot(region) }
    }
    unsafe fn get_dirty_log_into(
        &self,
        slot: SlotId,
        bitmap: *mut u64,
    ) -> Result<(), errno::Error> {
        // SAFETY: forwarded; our caller upholds the same contract.
        unsafe { (**self).get_dirty_log_into(slot, bitmap) }
    }
    fn dirty_log_mode(&self) -> DirtyLogMode {
        (**self).dirty_log_mode()
    }
    unsafe fn clear_dirty_log(
        &self,
        slot: SlotId,
        first_page: u64,
        num_pages: u32,
        bitmap: *const u64,
    ) -> Result<(), errno::Error> {
        // SAFETY: forwarded; our caller upholds the same contract.
        unsafe { (**self).clear_dirty_log(slot, first_page, num_pages, bitmap) }
    }
    fn harvest_dirty_rings(&self, sink: &mut dyn FnMut(u32, u64)) -> Result<u64, errno::Error> {
        (**self).harvest_dirty_rings(sink)
    }
}
