//! The memory manager's backend on real KVM: [`MemslotBackend`] for a VM fd
//! (the bitmap dirty log, `KVM_SET_USER_MEMORY_REGION`), and [`KvmMemslots`],
//! a VM fd set up for one of the three [`DirtyLogMode`]s, using
//! `KVM_SET_USER_MEMORY_REGION2` where the host has it.
//!
//! `KVM_GET_DIRTY_LOG` and `KVM_CLEAR_DIRTY_LOG` are issued here into a
//! caller's buffer (kvm-ioctls' `get_dirty_log` allocates a fresh bitmap per
//! call). The memslot flags `mm` defines are KVM's uapi bits, checked
//! against kvm-bindings at compile time.
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
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_dirty_log,
    kvm_dirty_log__bindgen_ty_1, kvm_enable_cap, kvm_userspace_memory_region,
    kvm_userspace_memory_region2, KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_CAP_USER_MEMORY2, KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmm_sys_util::errno;

use super::dirty_ring::DirtyRing;
use crate::mm::manager::{DirtyLogMode, MemslotBackend, MemslotRegion};
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
    vmm_sys_util::ioctl_iowr_nr!(
        KVM_CLEAR_DIRTY_LOG,
        kvm_bindings::KVMIO,
        0xc0,
        kvm_bindings::kvm_clear_dirty_log
    );
    vmm_sys_util::ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, kvm_bindings::KVMIO, 0xc7);
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

/// `KVM_GET_DIRTY_LOG` of `slot` into `bitmap`.
///
/// # Safety
/// `bitmap` must be valid for writes of the slot's bitmap as KVM holds it.
unsafe fn get_dirty_log(vm: &VmFd, slot: SlotId, bitmap: *mut u64) -> Result<(), errno::Error> {
    let log = kvm_dirty_log {
        slot: slot.0,
        padding1: 0,
        __bindgen_anon_1: kvm_dirty_log__bindgen_ty_1 {
            dirty_bitmap: bitmap.cast(),
        },
    };
    // SAFETY: `vm` is a VM fd; KVM reads `log` (borrowed for the call) and
    // writes the slot's bitmap to `bitmap`, which our caller guarantees is
    // large enough. Nothing else is touched.
    let ret = unsafe { libc::ioctl(vm.as_raw_fd(), nr::KVM_GET_DIRTY_LOG(), &log) };
    if ret == 0 {
        Ok(())
    } else {
        Err(errno::Error::last())
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
        // SAFETY: our caller upholds the same contract.
        unsafe { get_dirty_log(self, slot, bitmap) }
    }
}

/// Default bytes of each vCPU's dirty ring: 4,096 entries.
pub const DEFAULT_RING_BYTES: u32 = 64 << 10;

/// Why a dirty-log mode cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    /// The host's KVM lacks what the mode needs.
    #[error("--dirty-log {mode}: this host's KVM cannot: {reason}")]
    Unsupported {
        /// The mode asked for.
        mode: DirtyLogMode,
        /// What is missing (the capability and what KVM_CHECK_EXTENSION said).
        reason: String,
    },
    /// `KVM_ENABLE_CAP` failed.
    #[error("--dirty-log {mode}: KVM_ENABLE_CAP({cap}) failed: {source}")]
    Enable {
        /// The mode asked for.
        mode: DirtyLogMode,
        /// The capability.
        cap: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// A vCPU's ring could not be mapped.
    #[error("mapping the dirty ring of vCPU {vcpu}: {source}")]
    MapRing {
        /// The vCPU's index.
        vcpu: usize,
        /// The error.
        source: std::io::Error,
    },
}

/// What a host's KVM offers for dirty logging and memslots
/// (`KVM_CHECK_EXTENSION` on a VM fd).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct DirtyLogSupport {
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`: the flags KVM accepts (3: manual
    /// protect and initially set).
    pub manual_protect: u32,
    /// `KVM_CAP_DIRTY_LOG_RING_ACQ_REL`: the largest ring in bytes (0: none).
    pub ring_max_bytes: u32,
    /// `KVM_CAP_USER_MEMORY2`: `KVM_SET_USER_MEMORY_REGION2` exists.
    pub region2: bool,
}

impl DirtyLogSupport {
    /// Asks `vm` (a VM fd: the answers are per VM type).
    pub fn probe(vm: &VmFd) -> Self {
        Self::from_caps(|c| vm.check_extension_raw(libc::c_ulong::from(c)))
    }

    /// Asks `/dev/kvm` (the answers for the default VM type), without
    /// creating a VM.
    pub fn probe_system(kvm: &Kvm) -> Self {
        Self::from_caps(|c| kvm.check_extension_raw(libc::c_ulong::from(c)))
    }

    fn from_caps(check: impl Fn(u32) -> i32) -> Self {
        let cap = |c: u32| check(c).max(0) as u32;
        Self {
            manual_protect: cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2),
            ring_max_bytes: cap(KVM_CAP_DIRTY_LOG_RING_ACQ_REL),
            region2: cap(KVM_CAP_USER_MEMORY2) != 0,
        }
    }

    /// Why `mode` (with rings of `ring_bytes`) cannot be used, if it cannot.
    pub fn refusal(&self, mode: DirtyLogMode, ring_bytes: u32) -> Option<String> {
        let want = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET;
        match mode {
            DirtyLogMode::Bitmap => None,
            DirtyLogMode::Manual if self.manual_protect & want != want => Some(format!(
                "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 offers flags {:#x}, manual protect with initially-set needs {want:#x}",
                self.manual_protect
            )),
            DirtyLogMode::Manual => None,
            DirtyLogMode::Ring if self.ring_max_bytes == 0 => {
                Some("no KVM_CAP_DIRTY_LOG_RING_ACQ_REL (dirty ring with acquire/release)".into())
            }
            DirtyLogMode::Ring if !ring_bytes.is_power_of_two() || ring_bytes < 4096 => Some(
                format!("dirty ring size {ring_bytes} bytes: must be a power of two of at least 4096"),
            ),
            DirtyLogMode::Ring if ring_bytes > self.ring_max_bytes => Some(format!(
                "dirty ring size {ring_bytes} bytes exceeds KVM's maximum {}",
                self.ring_max_bytes
            )),
            DirtyLogMode::Ring => None,
        }
    }
}

/// A VM fd as the memory manager's backend, set up for a [`DirtyLogMode`]:
/// manual protect or the dirty ring enabled at creation, per-vCPU rings
/// mapped as vCPUs are attached, memslots set with
/// `KVM_SET_USER_MEMORY_REGION2` where the host has it.
///
/// ```
/// use std::sync::Arc;
/// use kvm_ioctls::Kvm;
/// use vmm::kvm::memslots::{KvmMemslots, DEFAULT_RING_BYTES};
/// use vmm::mm::manager::{DirtyLogMode, MemoryManager};
/// use vmm::mm::slot_map::SlotMapConfig;
///
/// let Ok(kvm) = Kvm::new() else {
///     assert!(std::env::var("VMM_REQUIRE_KVM").as_deref() != Ok("1"));
///     eprintln!("SKIP: /dev/kvm unavailable");
///     return;
/// };
/// let vm = Arc::new(kvm.create_vm().unwrap());
/// let backend =
///     Arc::new(KvmMemslots::new(vm.clone(), DirtyLogMode::Ring, DEFAULT_RING_BYTES).unwrap());
/// let vcpu = vm.create_vcpu(0).unwrap();
/// backend.attach_vcpu(0, &vcpu).unwrap();
/// let memory = MemoryManager::new(backend.clone(), SlotMapConfig::default()).unwrap();
/// assert_eq!(memory.dirty_log_mode(), DirtyLogMode::Ring);
/// ```
#[derive(Debug)]
pub struct KvmMemslots {
    vm: Arc<VmFd>,
    mode: DirtyLogMode,
    ring_bytes: u32,
    support: DirtyLogSupport,
    rings: Mutex<Vec<DirtyRing>>,
}

impl KvmMemslots {
    /// Sets `vm` up for `mode` (rings of `ring_bytes` per vCPU in ring
    /// mode): call before creating any vCPU (KVM refuses the ring after).
    ///
    /// # Errors
    /// [`DirtyLogError::Unsupported`] with the reason if the host lacks the
    /// mode (probed with `KVM_CHECK_EXTENSION`), [`DirtyLogError::Enable`]
    /// if `KVM_ENABLE_CAP` fails. Nothing is changed on refusal.
    pub fn new(vm: Arc<VmFd>, mode: DirtyLogMode, ring_bytes: u32) -> Result<Self, DirtyLogError> {
        let support = DirtyLogSupport::probe(&vm);
        if let Some(reason) = support.refusal(mode, ring_bytes) {
            return Err(DirtyLogError::Unsupported { mode, reason });
        }
        let enable = |cap: u32, name: &'static str, arg: u64| {
            let mut c = kvm_enable_cap {
                cap,
                ..Default::default()
            };
            c.args[0] = arg;
            vm.enable_cap(&c).map_err(|source| DirtyLogError::Enable {
                mode,
                cap: name,
                source,
            })
        };
        match mode {
            DirtyLogMode::Bitmap => {}
            DirtyLogMode::Manual => enable(
                KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
                u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET),
            )?,
            DirtyLogMode::Ring => enable(
                KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
                "KVM_CAP_DIRTY_LOG_RING_ACQ_REL",
                u64::from(ring_bytes),
            )?,
        }
        Ok(Self {
            vm,
            mode,
            ring_bytes,
            support,
            rings: Mutex::new(Vec::new()),
        })
    }

    /// Maps vCPU `index`'s dirty ring (ring mode; nothing otherwise). Every
    /// vCPU must be attached before it runs, or its ring is never harvested
    /// and it stops at `KVM_EXIT_DIRTY_RING_FULL` for good.
    ///
    /// # Errors
    /// [`DirtyLogError::MapRing`].
    pub fn attach_vcpu(&self, index: usize, vcpu: &VcpuFd) -> Result<(), DirtyLogError> {
        if self.mode != DirtyLogMode::Ring {
            return Ok(());
        }
        let ring =
            DirtyRing::map(vcpu, self.ring_bytes).map_err(|source| DirtyLogError::MapRing {
                vcpu: index,
                source,
            })?;
        self.rings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(ring);
        Ok(())
    }

    /// What the host offers (probed at creation).
    pub fn support(&self) -> DirtyLogSupport {
        self.support
    }

    /// Bytes of each vCPU's ring (ring mode).
    pub fn ring_bytes(&self) -> u32 {
        self.ring_bytes
    }

    /// Which memslot ioctl is used, and why (for `-v`).
    pub fn memslot_ioctl(&self) -> &'static str {
        if self.support.region2 {
            "KVM_SET_USER_MEMORY_REGION2"
        } else {
            "KVM_SET_USER_MEMORY_REGION (this host's KVM lacks KVM_CAP_USER_MEMORY2)"
        }
    }
}

impl MemslotBackend for KvmMemslots {
    unsafe fn set_memslot(&self, region: &MemslotRegion) -> Result<(), errno::Error> {
        if !self.support.region2 {
            // SAFETY: our caller upholds the contract, which is the same.
            return unsafe { self.vm.set_memslot(region) };
        }
        let r = kvm_region(region);
        let r2 = kvm_userspace_memory_region2 {
            slot: r.slot,
            flags: r.flags,
            guest_phys_addr: r.guest_phys_addr,
            memory_size: r.memory_size,
            userspace_addr: r.userspace_addr,
            ..Default::default()
        };
        // SAFETY: our caller upholds `MemslotBackend::set_memslot`'s
        // contract, which is `VmFd::set_user_memory_region2`'s (no
        // guest_memfd is named: the flags carry no KVM_MEM_GUEST_MEMFD).
        unsafe { self.vm.set_user_memory_region2(r2) }
    }

    unsafe fn get_dirty_log_into(
        &self,
        slot: SlotId,
        bitmap: *mut u64,
    ) -> Result<(), errno::Error> {
        // SAFETY: our caller upholds the same contract.
        unsafe { get_dirty_log(&self.vm, slot, bitmap) }
    }

    fn dirty_log_mode(&self) -> DirtyLogMode {
        self.mode
    }

    unsafe fn clear_dirty_log(
        &self,
        slot: SlotId,
        first_page: u64,
        num_pages: u32,
        bitmap: *const u64,
    ) -> Result<(), errno::Error> {
        let clear = kvm_clear_dirty_log {
            slot: slot.0,
            num_pages,
            first_page,
            __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
                dirty_bitmap: bitmap.cast_mut().cast(),
            },
        };
        // SAFETY: a VM fd; KVM reads `clear` and ceil(num_pages / 64) words
        // of `bitmap`, which our caller guarantees are readable. KVM only
        // reads the bitmap (the uapi pointer is not const).
        let ret = unsafe { libc::ioctl(self.vm.as_raw_fd(), nr::KVM_CLEAR_DIRTY_LOG(), &clear) };
        if ret == 0 {
            Ok(())
        } else {
            Err(errno::Error::last())
        }
    }

    fn harvest_dirty_rings(&self, sink: &mut dyn FnMut(u32, u64)) -> Result<u64, errno::Error> {
        if self.mode != DirtyLogMode::Ring {
            return Ok(0);
        }
        let mut rings = self.rings.lock().unwrap_or_else(|e| e.into_inner());
        let mut n = 0;
        for ring in rings.iter_mut() {
            for gfn in ring.harvest() {
                sink(gfn.slot, gfn.offset);
                n += 1;
            }
        }
        // Even with nothing collected: a full ring may be waiting for it.
        // SAFETY: a VM fd; the ioctl takes no argument.
        let ret = unsafe { libc::ioctl(self.vm.as_raw_fd(), nr::KVM_RESET_DIRTY_RINGS()) };
        if ret < 0 {
            return Err(errno::Error::last());
        }
        Ok(n)
    }
}

/// Whether the host's KVM offers `mode` (with rings of `ring_bytes`), asked
/// of `/dev/kvm` with `KVM_CHECK_EXTENSION`: no VM is created.
///
/// # Errors
/// The reason it cannot, as [`DirtyLogError::Unsupported`]; an error
/// opening `/dev/kvm` is reported the same way.
pub fn check_mode(mode: DirtyLogMode, ring_bytes: u32) -> Result<(), DirtyLogError> {
    let unsupported = |reason: String| DirtyLogError::Unsupported { mode, reason };
    let kvm = Kvm::new().map_err(|e| unsupported(format!("cannot open /dev/kvm: {e}")))?;
    match DirtyLogSupport::probe_system(&kvm).refusal(mode, ring_bytes) {
        Some(reason) => Err(unsupported(reason)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_refusal_names_the_missing_capability() {
        let none = DirtyLogSupport {
            manual_protect: 0,
            ring_max_bytes: 0,
            region2: false,
        };
        assert_eq!(none.refusal(DirtyLogMode::Bitmap, 4096), None);
        let manual = none.refusal(DirtyLogMode::Manual, 4096).unwrap();
        assert!(
            manual.contains("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2"),
            "{manual}"
        );
        let ring = none.refusal(DirtyLogMode::Ring, 4096).unwrap();
        assert!(ring.contains("KVM_CAP_DIRTY_LOG_RING_ACQ_REL"), "{ring}");
        let only_protect = DirtyLogSupport {
            manual_protect: 1,
            ..none
        };
        assert!(only_protect.refusal(DirtyLogMode::Manual, 0).is_some());
        let all = DirtyLogSupport {
            manual_protect: 3,
            ring_max_bytes: 1 << 20,
            region2: true,
        };
        assert_eq!(all.refusal(DirtyLogMode::Manual, 0), None);
        assert_eq!(all.refusal(DirtyLogMode::Ring, 4096), None);
        for bad in [0, 2048, 12 << 10, 2 << 20] {
            assert!(all.refusal(DirtyLogMode::Ring, bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn test_this_hosts_answers_match_the_vm_fds() {
        let Ok(kvm) = Kvm::new() else {
            assert!(std::env::var("VMM_REQUIRE_KVM").as_deref() != Ok("1"));
            eprintln!("SKIP: /dev/kvm unavailable");
            return;
        };
        let vm = kvm.create_vm().unwrap();
        assert_eq!(
            DirtyLogSupport::probe_system(&kvm),
            DirtyLogSupport::probe(&vm)
        );
    }
}
