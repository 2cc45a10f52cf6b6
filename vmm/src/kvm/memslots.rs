//! The memory manager's backend on real KVM: [`MemslotBackend`] for a VM fd.
//!
//! `KVM_SET_USER_MEMORY_REGION` goes through kvm-ioctls; `KVM_GET_DIRTY_LOG`
//! is issued here into a caller's buffer (kvm-ioctls' `get_dirty_log`
//! allocates a fresh bitmap per call). The memslot flags `mm` defines are
//! KVM's uapi bits, checked against kvm-bindings at compile time.
//!
//! ```
//! use std::sync::Arc;
//! use kvm_ioctls::Kvm;
//! use vmm::mm::addr::Gpa;
//! use vmm::mm::backing::{BackingKind, HostMapping};
//! use vmm::mm::manager::MemoryManager;
//! use vmm::mm::slot_map::{SlotFlags, SlotMapConfig};
//!
//! let kvm = match Kvm::new() {
//!     Ok(kvm) => kvm,
//!     Err(e) => {
//!         // Without /dev/kvm: a printed skip, or a failure where KVM is required.
//!         assert!(std::env::var("VMM_REQUIRE_KVM").as_deref() != Ok("1"), "{e}");
//!         eprintln!("SKIP: /dev/kvm unavailable ({e})");
//!         return;
//!     }
//! };
//! let vm = Arc::new(kvm.create_vm().unwrap());
//! let memory = MemoryManager::new(vm, SlotMapConfig::default()).unwrap();
//! let mem = Arc::new(HostMapping::new(&BackingKind::Anon, 0x10_0000).unwrap());
//! memory
//!     .apply(|map| map.plug(Gpa(0x10_0000), 0x10_0000, mem.clone(), 0, SlotFlags::NONE))
//!     .unwrap();
//! memory.check_consistency().unwrap();
//! ```

use std::os::fd::AsRawFd;

use kvm_bindings::{
    kvm_dirty_log, kvm_dirty_log__bindgen_ty_1, kvm_userspace_memory_region,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::errno;

use crate::mm::manager::{MemslotBackend, MemslotRegion};
use crate::mm::slot_map::{MemslotFlags, SlotId};

// `mm`'s memslot flags are KVM's uapi bits; a mismatch fails the build.
const _: () = assert!(MemslotFlags::LOG_DIRTY_PAGES.bits() == KVM_MEM_LOG_DIRTY_PAGES);
const _: () = assert!(MemslotFlags::READONLY.bits() == KVM_MEM_READONLY);

mod nr {
    vmm_sys_util::ioctl_iow_nr!(
        KVM_GET_DIRTY_LOG,
        kvm_bindings::KVMIO,
        0x42,
        kvm_bindings::kvm_dirty_log
    );
}

/// The `kvm_userspace_memory_region` KVM takes for `region`.
pub fn kvm_region(region: &MemslotRegion) -> kvm_userspace_memory_region {
    kvm_userspace_memory_region {
        slot: region.slot.0,
        flags: region.flags.bits(),
        guest_phys_addr: region.gpa.0,
        memory_size: region.size,
        userspace_addr: region.hva.0,
    }
}

impl MemslotBackend for VmFd {
    unsafe fn set_memslot(&self, region: &MemslotRegion) -> Result<(), errno::Error> {
        // SAFETY: our caller upholds `MemslotBackend::set_memslot`'s
        // contract, which is `VmFd::set_user_memory_region`'s.
        unsafe { self.set_user_memory_region(kvm_region(region)) }
    }

    unsafe fn get_dirty_log_into(
        &self,
        slot: SlotId,
        bitmap: *mut u64,
    ) -> Result<(), errno::Error> {
        let log = kvm_dirty_log {
            slot: slot.0,
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
            Err(errno::Error::last())
        }
    }
}
