//! The two memslot ioctls the applier issues, behind a trait so tests can
//! wrap a real VM fd (fault injection, counting) or replace it.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use kvm_bindings::{kvm_dirty_log, kvm_dirty_log__bindgen_ty_1, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;

mod nr {
    vmm_sys_util::ioctl_iow_nr!(
        KVM_GET_DIRTY_LOG,
        kvm_bindings::KVMIO,
        0x42,
        kvm_bindings::kvm_dirty_log
    );
}

/// The two memslot ioctls the applier needs, so tests can wrap a real VM fd
/// (fault injection, counting). Implemented for [`VmFd`], `&T` and `Arc<T>`.
pub trait MemslotIoctls {
    /// `KVM_SET_USER_MEMORY_REGION`.
    ///
    /// # Safety
    /// As [`VmFd::set_user_memory_region`]: unless `region.memory_size` is 0
    /// (a delete), the host range `[userspace_addr, +memory_size)` must stay
    /// mapped, and serve as nothing but this guest's memory, until KVM has
    /// dropped the slot (a successful delete or move, or the VM's destruction).
    unsafe fn set_user_memory_region(
        &self,
        region: kvm_userspace_memory_region,
    ) -> Result<(), kvm_ioctls::Error>;

    /// `KVM_GET_DIRTY_LOG` of slot `slot` into `bitmap` (read and clear).
    ///
    /// # Safety
    /// `bitmap` must be valid for writes of the slot's bitmap as KVM holds it
    /// (`ceil(pages / 64) * 8` bytes), whatever the slot's size in KVM is.
    unsafe fn get_dirty_log_into(
        &self,
        slot: u32,
        bitmap: *mut u64,
    ) -> Result<(), kvm_ioctls::Error>;
}

impl MemslotIoctls for VmFd {
    unsafe fn set_user_memory_region(
        &self,
        region: kvm_userspace_memory_region,
    ) -> Result<(), kvm_ioctls::Error> {
        // SAFETY: our caller upholds this method's contract, which is
        // `VmFd::set_user_memory_region`'s.
        unsafe { VmFd::set_user_memory_region(self, region) }
    }

    unsafe fn get_dirty_log_into(
        &self,
        slot: u32,
        bitmap: *mut u64,
    ) -> Result<(), kvm_ioctls::Error> {
        let log = kvm_dirty_log {
            slot,
            padding1: 0,
            __bindgen_anon_1: kvm_dirty_log__bindgen_ty_1 {
                dirty_bitmap: bitmap.cast(),
            },
        };
        // SAFETY: `self` is a VM fd; KVM reads `log` (borrowed for the call) and
        // writes the slot's bitmap to `bitmap`, which our caller guarantees is
        // large enough. Nothing else is touched.
        let ret = unsafe { libc::ioctl(self.as_raw_fd(), nr::KVM_GET_DIRTY_LOG(), &log) };
        if ret == 0 {
            Ok(())
        } else {
            Err(kvm_ioctls::Error::last())
        }
    }
}

impl<T: MemslotIoctls + ?Sized> MemslotIoctls for &T {
    unsafe fn set_user_memory_region(
        &self,
        region: kvm_userspace_memory_region,
    ) -> Result<(), kvm_ioctls::Error> {
        // SAFETY: forwarded; our caller upholds the same contract.
        unsafe { (**self).set_user_memory_region(region) }
    }
    unsafe fn get_dirty_log_into(
        &self,
        slot: u32,
        bitmap: *mut u64,
    ) -> Result<(), kvm_ioctls::Error> {
        // SAFETY: forwarded; our caller upholds the same contract.
        unsafe { (**self).get_dirty_log_into(slot, bitmap) }
    }
}

impl<T: MemslotIoctls + ?Sized> MemslotIoctls for Arc<T> {
    unsafe fn set_user_memory_region(
        &self,
        region: kvm_userspace_memory_region,
    ) -> Result<(), kvm_ioctls::Error> {
        // SAFETY: forwarded; our caller upholds the same contract.
        unsafe { (**self).set_user_memory_region(region) }
    }
    unsafe fn get_dirty_log_into(
        &self,
        slot: u32,
        bitmap: *mut u64,
    ) -> Result<(), kvm_ioctls::Error> {
        // SAFETY: forwarded; our caller upholds the same contract.
        unsafe { (**self).get_dirty_log_into(slot, bitmap) }
    }
}
