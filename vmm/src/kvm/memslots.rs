//! The one place that applies slot-map transitions to KVM memslots, with
//! rollback.
//!
//! A [`MemslotApplier`] owns the VM's [`SharedSlotMap`] and a handle to the
//! VM fd. [`apply`](MemslotApplier::apply) computes a [`Transition`] from the
//! current map, issues its [`MemslotChange`]s with
//! `KVM_SET_USER_MEMORY_REGION` in order, and only when all succeeded
//! publishes the new map and releases the host memory it no longer maps
//! ([`Transition::discards`]). If a change fails midway, the changes already
//! applied are undone in reverse order (a `Create` by deleting its slot, a
//! `Delete` by re-creating the old slot, a `SetFlags` by restoring
//! `old_flags`), so KVM holds exactly what it held before, the map is not
//! published, and the error names the change, slot, range and errno.
//!
//! # The mirror, and who owns registered memory
//! The applier keeps a *mirror* of what KVM holds: slot id -> the
//! [`MemslotSpec`] KVM accepted, plus an `Arc` of the [`HostMapping`] behind
//! it. The mirror changes only after an ioctl succeeded, so it always equals
//! KVM's memslots (given that nothing else calls `KVM_SET_USER_MEMORY_REGION`
//! on this VM). Holding the `Arc` there is what makes registering host memory
//! sound: a `HostMapping` is unmapped only when its last `Arc` drops, and the
//! mirror drops its `Arc` only after KVM confirmed deleting the slot (or, when
//! the applier is dropped, after deleting the slot; a mapping whose delete
//! fails is leaked, never unmapped under KVM). The old map's `Arc`s are not
//! relied upon: readers may drop old snapshots at any time.
//!
//! # Before the ioctl
//! The slot map validates every op (alignment, overlap that KVM would refuse
//! with `EEXIST`, slot count...), so a refused op is a [`SlotMapError`] and no
//! ioctl is issued. Each change is also checked against the mirror just before
//! its ioctl (the id is free or live as the change expects, a create overlaps
//! no live slot and lies inside its mapping, only dirty logging changes on a
//! live slot): a transition that would break one of KVM's rules is refused
//! with [`FailureCause::Refused`] and rolled back like an ioctl failure.
//!
//! # Dirty logging
//! KVM frees a slot's dirty bitmap when the slot is deleted or its logging is
//! switched off, and `KVM_GET_DIRTY_LOG` returns and clears a whole slot's
//! bitmap. So the applier harvests a dirty-logging slot's bitmap before either
//! change and keeps harvested pages in a pending set until
//! [`dirty_pages`](MemslotApplier::dirty_pages) reports them: no guest write
//! logged by KVM is lost, across splits, moves and rollbacks. A page is reported
//! at least once per write; pages harvested from a slot that is gone are still
//! reported by GPA (a conservative over-report).
//!
//! # Concurrency, lock order, memory ordering
//! Lock order: the slot map's writer lock ([`SharedSlotMap::begin_write`]),
//! then the applier's state mutex (mirror, pending dirty pages, bitmap
//! buffer). `apply` takes both; `dirty_pages` and `check_consistency` take
//! only the state mutex. Every memslot ioctl and every publish happens with
//! the state mutex held, so under it the published map and the mirror are
//! always observed as a matching pair. The new map is published (arc-swap: a
//! release store) after KVM agreed with it, so a reader that acquires the new
//! map finds KVM already holding its slots. A reader still holding an older
//! snapshot may translate a GPA KVM no longer maps; host memory stays mapped
//! while it holds the snapshot, but discarded ranges read as zeros.
//! Discards run before the writer lock is released, so no later op can plug
//! that host memory again before it is discarded.
//!
//! While a transition is applied, a range between its cluster's delete and
//! create has no memslot and a vCPU touching it exits as MMIO (see
//! [`crate::mm::slot_map::transition`]).
//!
//! ```
//! use std::sync::Arc;
//! use vmm::kvm::memslots::{Kvm, MemslotApplier};
//! use vmm::mm::addr::Gpa;
//! use vmm::mm::backing::{BackingKind, HostMapping};
//! use vmm::mm::slot_map::{SlotFlags, SlotMapConfig};
//!
//! let Ok(kvm) = Kvm::new() else { return }; // no /dev/kvm here
//! let vm = Arc::new(kvm.create_vm().unwrap());
//! let applier = MemslotApplier::new(vm, SlotMapConfig::default()).unwrap();
//! let mem = Arc::new(HostMapping::new(&BackingKind::Anon, 0x10_0000).unwrap());
//! applier
//!     .apply(|map| map.plug(Gpa(0x10_0000), 0x10_0000, mem.clone(), 0, SlotFlags::NONE))
//!     .unwrap();
//! // Write-protect the middle page: KVM gets delete 1, create 3.
//! let applied = applier.apply(|map| map.protect(Gpa(0x18_0000), 0x1000, true)).unwrap();
//! assert_eq!(applied.changes.len(), 4);
//! assert_eq!(applier.registered().len(), 3);
//! applier.apply(|map| map.set_dirty_log(Gpa(0x10_0000), 0x10_0000, true)).unwrap();
//! // ... run the guest; no vCPU ran, so nothing is dirty ...
//! assert!(applier.dirty_pages(Gpa(0x10_0000), 0x10_0000).unwrap().is_empty());
//! applier.check_consistency().unwrap();
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_bindings::{kvm_dirty_log, kvm_dirty_log__bindgen_ty_1};

use crate::mm::addr::{Gfn, Gpa, GpaRange, Hva, PAGE_SIZE};
use crate::mm::backing::{BackingError, BackingKind, HostMapping};
use crate::mm::slot_map::{
    ChangeKind, MemslotChange, MemslotSpec, SharedSlotMap, SlotId, SlotMap, SlotMapConfig,
    SlotMapError, Transition, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY,
};

/// The kvm-ioctls and kvm-bindings types this module's API uses, re-exported
/// so users (the integration tests) need not depend on those crates directly.
pub use kvm_bindings::kvm_userspace_memory_region;
pub use kvm_ioctls::{Error as KvmError, Kvm, VmFd};

mod nr {
    vmm_sys_util::ioctl_iow_nr!(
        KVM_GET_DIRTY_LOG,
        kvm_bindings::KVMIO,
        0x42,
        kvm_bindings::kvm_dirty_log
    );
}

/// `KVM_MEM_MAX_NR_PAGES` (`include/linux/kvm_host.h`): the most pages a
/// memslot can have, so KVM never copies more than this many dirty bits.
const KVM_MEM_MAX_NR_PAGES: u64 = (1 << 31) - 1;

/// Bytes of the dirty-bitmap buffer: enough for the largest bitmap KVM can
/// copy out (`KVM_MEM_MAX_NR_PAGES` bits rounded up to 64), whatever slot an
/// id names. It is address space only (`MAP_NORESERVE`, touched as far as the
/// largest bitmap actually read).
const DIRTY_BITMAP_BYTES: u64 = KVM_MEM_MAX_NR_PAGES.div_ceil(64) * 8;

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

/// Which memslot call failed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum MemslotOp {
    /// `KVM_SET_USER_MEMORY_REGION` creating a slot.
    Create,
    /// `KVM_SET_USER_MEMORY_REGION` with `memory_size = 0`.
    Delete,
    /// `KVM_SET_USER_MEMORY_REGION` changing only `KVM_MEM_LOG_DIRTY_PAGES`.
    SetFlags,
    /// `KVM_GET_DIRTY_LOG` (harvesting before a delete or logging-off, or for
    /// [`MemslotApplier::dirty_pages`]).
    GetDirtyLog,
}

impl fmt::Display for MemslotOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MemslotOp::Create => "create",
            MemslotOp::Delete => "delete",
            MemslotOp::SetFlags => "set flags",
            MemslotOp::GetDirtyLog => "get dirty log",
        })
    }
}

/// Why a memslot call failed.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum FailureCause {
    /// KVM returned this errno.
    Errno(i32),
    /// The applier refused the call before issuing it: given what KVM holds
    /// (the mirror), KVM would reject it or it would do something else than
    /// the change says.
    Refused(String),
}

impl fmt::Display for FailureCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailureCause::Errno(e) => {
                write!(f, "errno {e} ({})", io::Error::from_raw_os_error(*e))
            }
            FailureCause::Refused(why) => write!(f, "refused before the ioctl: {why}"),
        }
    }
}

/// One failed memslot call: what, on which slot, and why.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[error(
    "{op} of {} at {} size {:#x} (hva {}, flags {:#x}): {cause}",
    spec.id, spec.gpa, spec.size, spec.hva, spec.flags
)]
pub struct MemslotFailure {
    /// The call.
    pub op: MemslotOp,
    /// The slot as the call described it.
    pub spec: MemslotSpec,
    /// Why it failed.
    pub cause: FailureCause,
}

impl MemslotFailure {
    /// The errno KVM returned, if the call was issued.
    pub fn errno(&self) -> Option<i32> {
        match self.cause {
            FailureCause::Errno(e) => Some(e),
            FailureCause::Refused(_) => None,
        }
    }
}

/// Why [`MemslotApplier`] could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum MemslotError {
    /// The slot map refused the op; no ioctl was issued, nothing changed.
    #[error("refused before any ioctl: {0}")]
    SlotMap(#[from] SlotMapError),
    /// Change `index` of `total` failed; the `index` changes before it were
    /// undone, so KVM and the published map are as before the op.
    #[error("change {index} of {total} failed: {failure}; undid the {index} applied change(s), KVM and the map are unchanged")]
    RolledBack {
        /// Position of the failed change in `Transition::changes`.
        index: usize,
        /// Number of changes in the transition.
        total: usize,
        /// The failure.
        failure: MemslotFailure,
    },
    /// A change failed and undoing an earlier one failed too: KVM now differs
    /// from the published map (the mirror still shows what KVM holds) and
    /// the applier refuses further ops.
    #[error("change {index} failed: {failure}; undoing failed too: {undo}; KVM no longer matches the map")]
    RollbackFailed {
        /// Position of the failed change.
        index: usize,
        /// The failure.
        failure: MemslotFailure,
        /// The undo that failed.
        undo: Box<MemslotFailure>,
    },
    /// An earlier rollback failed; see [`MemslotError::RollbackFailed`].
    #[error("an earlier rollback failed; KVM no longer matches the slot map")]
    Poisoned,
    /// The op was applied and published, but releasing host memory failed.
    #[error("op applied, but discarding [{offset:#x}, +{len:#x}) of the mapping at {hva} failed: {source}")]
    Discard {
        /// The mapping's base address.
        hva: Hva,
        /// Offset into it.
        offset: u64,
        /// Length.
        len: u64,
        /// The error.
        source: BackingError,
    },
    /// A range whose end overflows.
    #[error("range {gpa} + {size:#x} overflows")]
    RangeOverflow {
        /// Start.
        gpa: Gpa,
        /// Size.
        size: u64,
    },
    /// Reading a dirty log failed.
    #[error("reading dirty pages: {0}")]
    DirtyLog(MemslotFailure),
    /// The dirty-bitmap buffer could not be mapped.
    #[error("dirty-bitmap buffer: {0}")]
    Buffer(BackingError),
}

/// What a successful [`MemslotApplier::apply`] did.
#[derive(Debug)]
pub struct Applied {
    /// The map now published.
    pub map: Arc<SlotMap>,
    /// The memslot changes issued, in order.
    pub changes: Vec<MemslotChange>,
    /// Guest ranges whose translation changed (for invalidation).
    pub removed: Vec<(GpaRange, ChangeKind)>,
    /// Guest ranges that became plugged.
    pub added: Vec<GpaRange>,
    /// Bytes of host memory released.
    pub discarded: u64,
}

/// A memslot KVM holds, and the mapping it points into (kept alive here).
struct Registered {
    spec: MemslotSpec,
    mapping: Arc<HostMapping>,
}

/// One memslot call in the applier's terms (slots are built only by the map).
#[derive(Clone)]
struct Step {
    op: MemslotOp,
    spec: MemslotSpec,
    mapping: Arc<HostMapping>,
    /// For `SetFlags`: the flags KVM holds before the call.
    old_flags: u32,
}

impl Step {
    fn of(change: &MemslotChange) -> Step {
        let (op, slot, old_flags) = match change {
            MemslotChange::Create { slot } => (MemslotOp::Create, slot, 0),
            MemslotChange::Delete { slot } => (MemslotOp::Delete, slot, 0),
            MemslotChange::SetFlags { slot, old_flags } => {
                (MemslotOp::SetFlags, slot, old_flags.kvm_flags())
            }
        };
        Step {
            op,
            spec: slot.spec(),
            mapping: Arc::clone(slot.mapping()),
            old_flags,
        }
    }

    /// The call that restores the state before `self`.
    fn inverse(&self) -> Step {
        let mut inv = self.clone();
        match self.op {
            MemslotOp::Create => inv.op = MemslotOp::Delete,
            MemslotOp::Delete => inv.op = MemslotOp::Create,
            MemslotOp::SetFlags => {
                inv.spec.flags = self.old_flags;
                inv.old_flags = self.spec.flags;
            }
            MemslotOp::GetDirtyLog => {}
        }
        inv
    }

    fn failure(&self, cause: FailureCause) -> MemslotFailure {
        MemslotFailure {
            op: self.op,
            spec: self.spec,
            cause,
        }
    }

    fn region(&self) -> kvm_userspace_memory_region {
        kvm_userspace_memory_region {
            slot: self.spec.id.0,
            flags: self.spec.flags,
            guest_phys_addr: self.spec.gpa.0,
            memory_size: if self.op == MemslotOp::Delete {
                0
            } else {
                self.spec.size
            },
            userspace_addr: self.spec.hva.0,
        }
    }
}

fn end_of(spec: &MemslotSpec) -> u64 {
    spec.gpa.0.saturating_add(spec.size)
}

/// Everything guarded by the state mutex.
struct State {
    by_id: BTreeMap<SlotId, Registered>,
    /// Slot start -> id, to find overlaps in O(log n).
    by_gpa: BTreeMap<Gpa, SlotId>,
    /// Harvested dirty pages not yet reported.
    pending: BTreeSet<Gfn>,
    /// `DIRTY_BITMAP_BYTES` of address space for `KVM_GET_DIRTY_LOG`.
    bitmap: HostMapping,
    poisoned: bool,
}

impl State {
    /// The live slot overlapping `[gpa, end)`, if any (slots never overlap,
    /// so the last one starting below `end` is the only candidate).
    fn overlapping(&self, gpa: Gpa, end: u64) -> Option<&MemslotSpec> {
        let (_, id) = self.by_gpa.range(..Gpa(end)).next_back()?;
        let spec = &self.by_id.get(id)?.spec;
        (end_of(spec) > gpa.0).then_some(spec)
    }

    /// Checks `step` against what KVM holds (KVM's rules for
    /// `__kvm_set_memory_region`), so the ioctl does exactly what it says.
    fn validate(&self, step: &Step, config: &SlotMapConfig) -> Result<(), String> {
        let spec = &step.spec;
        let live = self.by_id.get(&spec.id).map(|r| r.spec);
        match step.op {
            MemslotOp::Create => {
                if spec.id.0 >= config.max_slots {
                    return Err(format!("id is not below max_slots {}", config.max_slots));
                }
                if let Some(l) = live {
                    return Err(format!("the id is live at {} size {:#x}", l.gpa, l.size));
                }
                if spec.size == 0
                    || spec.gpa.0 % PAGE_SIZE != 0
                    || spec.size % PAGE_SIZE != 0
                    || spec.hva.0 % PAGE_SIZE != 0
                {
                    return Err("gpa, size and hva must be non-zero multiples of 4 KiB".into());
                }
                if spec.flags & !(KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY) != 0 {
                    return Err("unknown flags".into());
                }
                if spec.flags & KVM_MEM_READONLY != 0 && !config.read_only_supported {
                    return Err("KVM_MEM_READONLY is not supported".into());
                }
                let base = step.mapping.hva().0;
                let inside = spec.hva.0 >= base
                    && spec.hva.0 - base <= step.mapping.len()
                    && spec.size <= step.mapping.len() - (spec.hva.0 - base);
                if !inside {
                    return Err(format!(
                        "hva range lies outside its {:#x}-byte mapping at {}",
                        step.mapping.len(),
                        step.mapping.hva()
                    ));
                }
                if spec.gpa.0.checked_add(spec.size).is_none() {
                    return Err("range overflows".into());
                }
                if let Some(o) = self.overlapping(spec.gpa, end_of(spec)) {
                    return Err(format!(
                        "range overlaps live {} at {} size {:#x} (KVM: EEXIST)",
                        o.id, o.gpa, o.size
                    ));
                }
                Ok(())
            }
            MemslotOp::Delete => match live {
                Some(l) if l == *spec => Ok(()),
                Some(l) => Err(format!("KVM holds the id as {l:?}")),
                None => Err("the id is not live".into()),
            },
            MemslotOp::SetFlags => {
                let before = MemslotSpec {
                    flags: step.old_flags,
                    ..*spec
                };
                if (step.old_flags ^ spec.flags) & !KVM_MEM_LOG_DIRTY_PAGES != 0 {
                    return Err("only KVM_MEM_LOG_DIRTY_PAGES can change on a live slot".into());
                }
                match live {
                    Some(l) if l == before => Ok(()),
                    Some(l) => Err(format!("KVM holds the id as {l:?}")),
                    None => Err("the id is not live".into()),
                }
            }
            MemslotOp::GetDirtyLog => Ok(()),
        }
    }

    /// Updates the mirror after `step`'s ioctl succeeded.
    fn record(&mut self, step: &Step) {
        match step.op {
            MemslotOp::Create => {
                self.by_gpa.insert(step.spec.gpa, step.spec.id);
                self.by_id.insert(
                    step.spec.id,
                    Registered {
                        spec: step.spec,
                        mapping: Arc::clone(&step.mapping),
                    },
                );
            }
            MemslotOp::Delete => {
                self.by_gpa.remove(&step.spec.gpa);
                // The mapping's Arc drops here: KVM no longer maps it.
                self.by_id.remove(&step.spec.id);
            }
            MemslotOp::SetFlags => {
                if let Some(r) = self.by_id.get_mut(&step.spec.id) {
                    r.spec.flags = step.spec.flags;
                }
            }
            MemslotOp::GetDirtyLog => {}
        }
    }

    /// `KVM_GET_DIRTY_LOG` of `id` into the buffer; returns the first
    /// `ceil(pages / 64)` words (a slot of `size` bytes).
    fn read_bitmap<V: MemslotIoctls>(
        &mut self,
        vm: &V,
        id: SlotId,
        size: u64,
    ) -> Result<&[u64], kvm_ioctls::Error> {
        let words = (size / PAGE_SIZE).div_ceil(64) as usize;
        let buf = self.bitmap.as_ptr().cast::<u64>();
        // SAFETY: `words * 8 <= DIRTY_BITMAP_BYTES` (a slot has at most
        // KVM_MEM_MAX_NR_PAGES pages), the buffer is a live, page-aligned
        // mapping of that many bytes, and only this `&mut State` touches it.
        unsafe { std::ptr::write_bytes(buf, 0, words) };
        // SAFETY: the buffer holds DIRTY_BITMAP_BYTES, enough for the bitmap
        // of any slot KVM can hold under any id, so KVM's copy stays inside it
        // even if KVM's slot differed from the mirror.
        unsafe { vm.get_dirty_log_into(id.0, buf) }?;
        // SAFETY: in bounds as above; KVM finished writing when the ioctl
        // returned, and the borrow of `self` keeps others away until the
        // slice is dropped.
        Ok(unsafe { std::slice::from_raw_parts(buf, words) })
    }

    /// Reads and clears the dirty log of the live slot `spec` into `pending`.
    fn harvest<V: MemslotIoctls>(
        &mut self,
        vm: &V,
        spec: &MemslotSpec,
    ) -> Result<(), MemslotFailure> {
        let pages = spec.size / PAGE_SIZE;
        let first = spec.gpa.gfn().0;
        let mut dirty = Vec::new();
        let words = self
            .read_bitmap(vm, spec.id, spec.size)
            .map_err(|e| MemslotFailure {
                op: MemslotOp::GetDirtyLog,
                spec: *spec,
                cause: FailureCause::Errno(e.errno()),
            })?;
        for (w, &word) in words.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let page = w as u64 * 64 + u64::from(bits.trailing_zeros());
                if page < pages {
                    dirty.push(Gfn(first + page));
                }
                bits &= bits - 1;
            }
        }
        self.pending.extend(dirty);
        Ok(())
    }
}

/// Applies slot-map transitions to one VM's KVM memslots; see the module docs.
///
/// The VM must hold no memslot with an id below `max_slots` when the
/// applier is created, and nothing else may call `KVM_SET_USER_MEMORY_REGION`
/// on it afterwards (the mirror would no longer match KVM; memory safety
/// does not depend on it). Dropping the applier deletes every slot it
/// registered, so stop the vCPUs first.
pub struct MemslotApplier<V: MemslotIoctls = Arc<VmFd>> {
    vm: V,
    shared: SharedSlotMap,
    state: Mutex<State>,
}

impl<V: MemslotIoctls> fmt::Debug for MemslotApplier<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.lock_state();
        f.debug_struct("MemslotApplier")
            .field("map", &self.shared)
            .field("registered", &st.by_id.len())
            .field("pending_dirty", &st.pending.len())
            .field("poisoned", &st.poisoned)
            .finish()
    }
}

impl<V: MemslotIoctls> MemslotApplier<V> {
    /// An applier with an empty slot map limited by `config` (read
    /// `max_slots` from `KVM_CAP_NR_MEMSLOTS`, `read_only_supported` from
    /// `KVM_CAP_READONLY_MEM`).
    ///
    /// # Errors
    /// [`MemslotError::Buffer`] if the dirty-bitmap buffer (256 MiB of
    /// address space, no memory) cannot be mapped.
    pub fn new(vm: V, config: SlotMapConfig) -> Result<Self, MemslotError> {
        let bitmap = HostMapping::new(&BackingKind::Anon, DIRTY_BITMAP_BYTES)
            .map_err(MemslotError::Buffer)?;
        Ok(Self {
            vm,
            shared: SharedSlotMap::new(SlotMap::new(config)),
            state: Mutex::new(State {
                by_id: BTreeMap::new(),
                by_gpa: BTreeMap::new(),
                pending: BTreeSet::new(),
                bitmap,
                poisoned: false,
            }),
        })
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock happens only between an ioctl and
        // its `record`, which do not panic; the state is still what KVM holds.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The VM handle.
    pub fn vm(&self) -> &V {
        &self.vm
    }

    /// A snapshot of the published map. Lock-free.
    pub fn load(&self) -> Arc<SlotMap> {
        self.shared.load()
    }

    /// What KVM holds according to the mirror, sorted by id.
    pub fn registered(&self) -> Vec<MemslotSpec> {
        self.lock_state().by_id.values().map(|r| r.spec).collect()
    }

    /// Runs `op` on the current map and makes KVM and the published map
    /// agree with its result, or changes nothing.
    ///
    /// `op` must compute its transition from the map it is given (the
    /// writer lock guarantees that map is current). A transition computed
    /// from another map is refused before the ioctl only where one of its
    /// changes breaks KVM's rules against what is registered (reused live id,
    /// overlap, a delete of something else); otherwise it is applied and
    /// [`check_consistency`](Self::check_consistency) reports the divergence.
    ///
    /// # Errors
    /// [`SlotMap`](MemslotError::SlotMap) if `op` refuses (no ioctl issued);
    /// [`RolledBack`](MemslotError::RolledBack) if a change failed and was
    /// undone; [`RollbackFailed`](MemslotError::RollbackFailed) and then
    /// [`Poisoned`](MemslotError::Poisoned) if undoing failed too;
    /// [`Discard`](MemslotError::Discard) if the op took effect but host
    /// memory could not be released.
    pub fn apply<F>(&self, op: F) -> Result<Applied, MemslotError>
    where
        F: FnOnce(&SlotMap) -> Result<Transition, SlotMapError>,
    {
        let mut writer = self.shared.begin_write();
        let mut st = self.lock_state();
        if st.poisoned {
            return Err(MemslotError::Poisoned);
        }
        let base = writer.map();
        let Transition {
            map,
            changes,
            discards,
            removed,
            added,
        } = op(&base)?;
        let config = *base.config();
        let steps: Vec<Step> = changes.iter().map(Step::of).collect();
        for (index, step) in steps.iter().enumerate() {
            if let Err(failure) = self.execute(&mut st, step, &config) {
                for done in steps[..index].iter().rev() {
                    if let Err(undo) = self.execute(&mut st, &done.inverse(), &config) {
                        st.poisoned = true;
                        return Err(MemslotError::RollbackFailed {
                            index,
                            failure,
                            undo: Box::new(undo),
                        });
                    }
                }
                return Err(MemslotError::RolledBack {
                    index,
                    total: steps.len(),
                    failure,
                });
            }
        }
        writer.publish(map);
        let published = writer.map();
        drop(st);
        // Still under the writer lock: no op can plug this memory again
        // before it is discarded. KVM no longer maps it (the deletes above
        // succeeded) and the new map does not (the map never aliases memory).
        let mut discarded = 0;
        for d in &discards {
            d.mapping
                .discard(d.offset, d.len)
                .map_err(|source| MemslotError::Discard {
                    hva: d.mapping.hva(),
                    offset: d.offset,
                    len: d.len,
                    source,
                })?;
            discarded += d.len;
        }
        Ok(Applied {
            map: published,
            changes,
            removed,
            added,
            discarded,
        })
    }

    /// Validates `step` against the mirror, harvests the dirty log it would
    /// destroy, issues the ioctl and records its effect.
    fn execute(
        &self,
        st: &mut State,
        step: &Step,
        config: &SlotMapConfig,
    ) -> Result<(), MemslotFailure> {
        st.validate(step, config)
            .map_err(|why| step.failure(FailureCause::Refused(why)))?;
        let logging_before = match step.op {
            MemslotOp::Delete => step.spec.flags,
            MemslotOp::SetFlags => step.old_flags,
            _ => 0,
        } & KVM_MEM_LOG_DIRTY_PAGES
            != 0;
        let logging_after =
            step.op != MemslotOp::Delete && step.spec.flags & KVM_MEM_LOG_DIRTY_PAGES != 0;
        if logging_before && !logging_after {
            let live = MemslotSpec {
                flags: step.old_flags | KVM_MEM_LOG_DIRTY_PAGES,
                ..step.spec
            };
            st.harvest(&self.vm, &live)?;
        }
        // SAFETY: a delete (`memory_size` 0) registers no memory. A create or
        // flags change registers `[hva, hva + size)`, which `validate` checked
        // lies inside `step.mapping`, a live `HostMapping` (we hold an `Arc`
        // of it through `step`); a `HostMapping` is unmapped only when its last
        // `Arc` drops and is used only as guest memory (the slot map never
        // lets two slots share host memory). If the call succeeds, `record`
        // stores an `Arc` of the mapping in the mirror, which drops it only
        // after a successful delete of this slot, and `Drop` deletes every
        // registered slot before releasing its `Arc` (leaking it if the
        // delete fails). So the range stays mapped, and guest-only, for as
        // long as KVM may use it.
        let result = unsafe { self.vm.set_user_memory_region(step.region()) };
        result.map_err(|e| step.failure(FailureCause::Errno(e.errno())))?;
        st.record(step);
        Ok(())
    }

    /// The guest frames in `[gpa, gpa + size)` written since they were last
    /// reported, sorted. Reads and clears the dirty log of every dirty-logging
    /// slot overlapping the range (pages of those slots outside the range are
    /// kept for a later call), plus pages harvested when a dirty-logging slot
    /// was deleted or stopped logging.
    ///
    /// # Errors
    /// [`RangeOverflow`](MemslotError::RangeOverflow);
    /// [`DirtyLog`](MemslotError::DirtyLog) if `KVM_GET_DIRTY_LOG` fails
    /// (pages read before the failure stay pending).
    pub fn dirty_pages(&self, gpa: Gpa, size: u64) -> Result<Vec<Gfn>, MemslotError> {
        let range = GpaRange::new(gpa, size).ok_or(MemslotError::RangeOverflow { gpa, size })?;
        let mut st = self.lock_state();
        let mut logging = Vec::new();
        for (_, id) in st.by_gpa.range(..range.end()).rev() {
            let Some(r) = st.by_id.get(id) else { continue };
            if end_of(&r.spec) <= range.start().0 {
                break; // slots do not overlap: all earlier ones end before too
            }
            if r.spec.flags & KVM_MEM_LOG_DIRTY_PAGES != 0 {
                logging.push(r.spec);
            }
        }
        for spec in &logging {
            st.harvest(&self.vm, spec).map_err(MemslotError::DirtyLog)?;
        }
        let first = range.start().gfn();
        let last = Gfn(range.end().0.div_ceil(PAGE_SIZE));
        let dirty: Vec<Gfn> = st.pending.range(first..last).copied().collect();
        for g in &dirty {
            st.pending.remove(g);
        }
        Ok(dirty)
    }

    /// Checks that the published map, the mirror and KVM agree.
    ///
    /// What it sees:
    /// - the published map's [`SlotMap::expected_memslots`] equals the
    ///   mirror exactly (ids, GPAs, sizes, host addresses, flags), and the
    ///   mirror's GPA index matches its id index;
    /// - every mirrored dirty-logging slot is live in KVM with a dirty bitmap
    ///   (`KVM_GET_DIRTY_LOG` succeeds; the pages it returns are kept for
    ///   [`dirty_pages`](Self::dirty_pages), so the check loses nothing);
    /// - no id below `max_slots` that the mirror lacks, or holds without
    ///   logging, is a dirty-logging slot in KVM (`KVM_GET_DIRTY_LOG` must
    ///   fail with `ENOENT`) — this finds dirty-logging strays.
    ///
    /// What it cannot see (KVM has no "list memslots" ioctl, and every other
    /// probe changes state: re-issuing a slot's exact spec is a no-op if the
    /// slot is live but *creates* it if not): a slot without dirty logging
    /// missing from KVM or left behind in it, and the GPA, size and host
    /// address KVM holds for any slot. Tests find those with destructive
    /// probes (creating a slot over a range must fail with `EEXIST` exactly
    /// where the map has slots). Cost: O(n) plus one ioctl per id below
    /// `max_slots` (16 ms for 32,764 ids on the development host), with the
    /// state mutex held (ops wait).
    ///
    /// # Errors
    /// A description of the first disagreement.
    pub fn check_consistency(&self) -> Result<(), String> {
        let mut st = self.lock_state();
        if st.poisoned {
            return Err("poisoned: a rollback failed, KVM differs from the map".into());
        }
        let map = self.shared.load();
        let expected = map.expected_memslots();
        let mirror: Vec<MemslotSpec> = st.by_id.values().map(|r| r.spec).collect();
        if expected != mirror {
            let first = expected
                .iter()
                .zip(&mirror)
                .find(|(e, m)| e != m)
                .map_or_else(String::new, |(e, m)| format!(": map {e:?} vs KVM {m:?}"));
            return Err(format!(
                "map expects {} memslots, KVM holds {}{first}",
                expected.len(),
                mirror.len()
            ));
        }
        let index_ok = st.by_gpa.len() == st.by_id.len()
            && st
                .by_gpa
                .iter()
                .all(|(gpa, id)| st.by_id.get(id).is_some_and(|r| r.spec.gpa == *gpa));
        if !index_ok {
            return Err("the mirror's GPA index disagrees with its id index".into());
        }
        for id in (0..map.config().max_slots).map(SlotId) {
            let logged = st
                .by_id
                .get(&id)
                .map(|r| r.spec)
                .filter(|s| s.flags & KVM_MEM_LOG_DIRTY_PAGES != 0);
            match logged {
                Some(spec) => st
                    .harvest(&self.vm, &spec)
                    .map_err(|f| format!("mirrored dirty-logging slot not live in KVM: {f}"))?,
                None => match st.read_bitmap(&self.vm, id, PAGE_SIZE) {
                    Ok(_) => {
                        return Err(format!(
                            "KVM has a dirty-logging {id} the mirror does not (or not logging)"
                        ))
                    }
                    Err(e) if e.errno() == libc::ENOENT => {}
                    Err(e) => return Err(format!("KVM_GET_DIRTY_LOG probe of {id}: {e}")),
                },
            }
        }
        Ok(())
    }
}

impl<V: MemslotIoctls> Drop for MemslotApplier<V> {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        st.by_gpa.clear();
        for (_, reg) in std::mem::take(&mut st.by_id) {
            let step = Step {
                op: MemslotOp::Delete,
                spec: reg.spec,
                mapping: Arc::clone(&reg.mapping),
                old_flags: 0,
            };
            // SAFETY: a delete (`memory_size` 0) registers no memory.
            if unsafe { self.vm.set_user_memory_region(step.region()) }.is_err() {
                // KVM may still map it: never unmap memory under KVM.
                std::mem::forget(reg.mapping);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The applier against an in-memory KVM that enforces KVM's memslot rules:
    //! the pre-ioctl checks, dirty-page bookkeeping, and random op sequences
    //! with failures injected at random calls (forward changes and undos).

    use std::sync::atomic::{AtomicUsize, Ordering};

    use proptest::prelude::*;

    use super::*;
    use crate::mm::slot_map::SlotFlags;

    const P: u64 = PAGE_SIZE;

    /// `__kvm_set_memory_region`'s rules (`virt/kvm/kvm_main.c`), in memory:
    /// id -> (gpa, size, hva, flags). Calls whose 0-based number is in
    /// `fail` return `EIO` without effect. `dirty` holds the guest frames
    /// "written" since their slot's log was last read.
    #[derive(Default)]
    struct FakeKvm {
        slots: Mutex<BTreeMap<u32, (u64, u64, u64, u32)>>,
        calls: AtomicUsize,
        fail: Mutex<BTreeSet<usize>>,
        dirty: Mutex<BTreeSet<u64>>,
    }

    fn errno(e: i32) -> Result<(), kvm_ioctls::Error> {
        Err(kvm_ioctls::Error::new(e))
    }

    impl FakeKvm {
        fn specs(&self) -> Vec<MemslotSpec> {
            let slots = self.slots.lock().unwrap();
            slots
                .iter()
                .map(|(&id, &(gpa, size, hva, flags))| MemslotSpec {
                    id: SlotId(id),
                    gpa: Gpa(gpa),
                    size,
                    hva: Hva(hva),
                    flags,
                })
                .collect()
        }
        fn fail_next(&self, offsets: &[usize]) {
            let now = self.calls.load(Ordering::SeqCst);
            *self.fail.lock().unwrap() = offsets.iter().map(|o| now + o).collect();
        }
    }

    impl MemslotIoctls for FakeKvm {
        unsafe fn set_user_memory_region(
            &self,
            r: kvm_userspace_memory_region,
        ) -> Result<(), kvm_ioctls::Error> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            if self.fail.lock().unwrap().contains(&n) {
                return errno(libc::EIO);
            }
            let mut slots = self.slots.lock().unwrap();
            if r.guest_phys_addr % P != 0 || r.memory_size % P != 0 || r.userspace_addr % P != 0 {
                return errno(libc::EINVAL);
            }
            if r.memory_size == 0 {
                return match slots.remove(&r.slot) {
                    Some(_) => Ok(()),
                    None => errno(libc::EINVAL),
                };
            }
            let (gpa, size) = (r.guest_phys_addr, r.memory_size);
            if let Some(&(ogpa, osize, ohva, oflags)) = slots.get(&r.slot) {
                if ohva != r.userspace_addr
                    || osize != size
                    || (oflags ^ r.flags) & KVM_MEM_READONLY != 0
                {
                    return errno(libc::EINVAL);
                }
                if ogpa == gpa && oflags == r.flags {
                    return Ok(());
                }
            }
            let overlaps = slots
                .iter()
                .any(|(&id, &(g, s, _, _))| id != r.slot && g < gpa + size && gpa < g + s);
            if overlaps {
                return errno(libc::EEXIST);
            }
            slots.insert(r.slot, (gpa, size, r.userspace_addr, r.flags));
            Ok(())
        }

        unsafe fn get_dirty_log_into(
            &self,
            slot: u32,
            bitmap: *mut u64,
        ) -> Result<(), kvm_ioctls::Error> {
            let Some(&(gpa, size, _, flags)) = self.slots.lock().unwrap().get(&slot) else {
                return errno(libc::ENOENT);
            };
            if flags & KVM_MEM_LOG_DIRTY_PAGES == 0 {
                return errno(libc::ENOENT);
            }
            let pages = size / P;
            let words = pages.div_ceil(64) as usize;
            let (first, end) = (gpa / P, gpa / P + pages);
            let mut dirty = self.dirty.lock().unwrap();
            let hits: Vec<u64> = dirty.range(first..end).copied().collect();
            // SAFETY: the caller guarantees room for this slot's bitmap.
            let bits = unsafe { std::slice::from_raw_parts_mut(bitmap, words) };
            bits.fill(0);
            for g in hits {
                dirty.remove(&g);
                let i = (g - first) as usize;
                bits[i / 64] |= 1 << (i % 64);
            }
            Ok(())
        }
    }

    fn config() -> SlotMapConfig {
        SlotMapConfig {
            max_slots: 8,
            max_gpa: Gpa(64 * P),
            read_only_supported: true,
        }
    }

    fn anon(pages: u64) -> Arc<HostMapping> {
        Arc::new(HostMapping::new(&BackingKind::Anon, pages * P).unwrap())
    }

    fn step(
        op: MemslotOp,
        id: u32,
        gpa: u64,
        pages: u64,
        mapping: &Arc<HostMapping>,
        flags: u32,
    ) -> Step {
        Step {
            op,
            spec: MemslotSpec {
                id: SlotId(id),
                gpa: Gpa(gpa),
                size: pages * P,
                hva: mapping.hva(),
                flags,
            },
            mapping: Arc::clone(mapping),
            old_flags: 0,
        }
    }

    /// The state after creating 4 pages at 0 with id 0 from `a`.
    fn state_with_one_slot(a: &Arc<HostMapping>) -> State {
        let mut st = State {
            by_id: BTreeMap::new(),
            by_gpa: BTreeMap::new(),
            pending: BTreeSet::new(),
            bitmap: HostMapping::new(&BackingKind::Anon, P).unwrap(),
            poisoned: false,
        };
        st.record(&step(MemslotOp::Create, 0, 0, 4, a, 0));
        st
    }

    fn refusal(st: &State, s: &Step) -> String {
        st.validate(s, &config()).unwrap_err()
    }

    #[test]
    fn test_validate_create_over_live_slot_refused() {
        let (a, b) = (anon(8), anon(8));
        let st = state_with_one_slot(&a);
        let why = refusal(&st, &step(MemslotOp::Create, 1, 3 * P, 2, &b, 0));
        assert!(why.contains("overlaps live slot 0"), "{why}");
        let adjacent = step(MemslotOp::Create, 1, 4 * P, 2, &b, 0);
        assert_eq!(st.validate(&adjacent, &config()), Ok(()));
    }

    #[test]
    fn test_validate_create_with_live_id_refused() {
        let (a, b) = (anon(8), anon(8));
        let st = state_with_one_slot(&a);
        let why = refusal(&st, &step(MemslotOp::Create, 0, 8 * P, 2, &b, 0));
        assert!(why.contains("the id is live"), "{why}");
    }

    #[test]
    fn test_validate_create_outside_mapping_refused() {
        let (a, b) = (anon(8), anon(2));
        let st = state_with_one_slot(&a);
        let why = refusal(&st, &step(MemslotOp::Create, 1, 8 * P, 3, &b, 0));
        assert!(why.contains("outside its"), "{why}");
    }

    #[test]
    fn test_validate_create_id_at_max_slots_refused() {
        let (a, b) = (anon(8), anon(2));
        let st = state_with_one_slot(&a);
        let why = refusal(&st, &step(MemslotOp::Create, 8, 8 * P, 2, &b, 0));
        assert!(why.contains("max_slots"), "{why}");
    }

    #[test]
    fn test_validate_delete_of_other_spec_refused() {
        let a = anon(8);
        let st = state_with_one_slot(&a);
        let exact = step(MemslotOp::Delete, 0, 0, 4, &a, 0);
        assert_eq!(st.validate(&exact, &config()), Ok(()));
        let why = refusal(&st, &step(MemslotOp::Delete, 0, 0, 3, &a, 0));
        assert!(why.contains("KVM holds the id"), "{why}");
        let why = refusal(&st, &step(MemslotOp::Delete, 1, 0, 4, &a, 0));
        assert!(why.contains("not live"), "{why}");
    }

    #[test]
    fn test_validate_set_flags_toggling_readonly_refused() {
        let a = anon(8);
        let st = state_with_one_slot(&a);
        let why = refusal(
            &st,
            &step(MemslotOp::SetFlags, 0, 0, 4, &a, KVM_MEM_READONLY),
        );
        assert!(why.contains("only KVM_MEM_LOG_DIRTY_PAGES"), "{why}");
        let log = step(MemslotOp::SetFlags, 0, 0, 4, &a, KVM_MEM_LOG_DIRTY_PAGES);
        assert_eq!(st.validate(&log, &config()), Ok(()));
    }

    #[test]
    fn test_step_inverse_twice_is_identity() {
        let a = anon(8);
        let s = step(MemslotOp::SetFlags, 0, 0, 4, &a, KVM_MEM_LOG_DIRTY_PAGES);
        let inv = s.inverse();
        assert_eq!(
            (inv.op, inv.spec.flags, inv.old_flags),
            (MemslotOp::SetFlags, 0, KVM_MEM_LOG_DIRTY_PAGES)
        );
        let back = inv.inverse();
        assert_eq!((back.spec, back.old_flags), (s.spec, s.old_flags));
        let c = step(MemslotOp::Create, 0, 0, 4, &a, 0);
        assert_eq!(c.inverse().op, MemslotOp::Delete);
        assert_eq!(c.inverse().inverse().op, MemslotOp::Create);
    }

    #[test]
    fn test_dirty_pages_outside_range_stay_pending() {
        let kvm = Arc::new(FakeKvm::default());
        let ap = MemslotApplier::new(Arc::clone(&kvm), config()).unwrap();
        let a = anon(8);
        ap.apply(|m| m.plug(Gpa(0), 8 * P, a.clone(), 0, SlotFlags::NONE))
            .unwrap();
        ap.apply(|m| m.set_dirty_log(Gpa(0), 8 * P, true)).unwrap();
        kvm.dirty.lock().unwrap().extend([1, 3, 6]);
        assert_eq!(ap.dirty_pages(Gpa(2 * P), 2 * P).unwrap(), vec![Gfn(3)]);
        assert_eq!(ap.dirty_pages(Gpa(0), 8 * P).unwrap(), vec![Gfn(1), Gfn(6)]);
        assert_eq!(ap.dirty_pages(Gpa(0), 8 * P).unwrap(), vec![]);
    }

    #[test]
    fn test_dirty_pages_harvested_before_logging_off() {
        let kvm = Arc::new(FakeKvm::default());
        let ap = MemslotApplier::new(Arc::clone(&kvm), config()).unwrap();
        let a = anon(8);
        ap.apply(|m| m.plug(Gpa(0), 8 * P, a.clone(), 0, SlotFlags::NONE))
            .unwrap();
        ap.apply(|m| m.set_dirty_log(Gpa(0), 8 * P, true)).unwrap();
        kvm.dirty.lock().unwrap().extend([2, 7]);
        ap.apply(|m| m.set_dirty_log(Gpa(0), 8 * P, false)).unwrap();
        assert!(kvm.dirty.lock().unwrap().is_empty(), "harvested");
        assert_eq!(ap.dirty_pages(Gpa(0), 8 * P).unwrap(), vec![Gfn(2), Gfn(7)]);
    }

    #[test]
    fn test_check_consistency_finds_dirty_logging_stray() {
        let kvm = Arc::new(FakeKvm::default());
        let ap = MemslotApplier::new(Arc::clone(&kvm), config()).unwrap();
        ap.check_consistency().unwrap();
        kvm.slots
            .lock()
            .unwrap()
            .insert(5, (0, P, 0x1000, KVM_MEM_LOG_DIRTY_PAGES));
        let why = ap.check_consistency().unwrap_err();
        assert!(why.contains("slot 5"), "{why}");
    }

    #[test]
    fn test_drop_deletes_every_registered_slot() {
        let kvm = Arc::new(FakeKvm::default());
        let ap = MemslotApplier::new(Arc::clone(&kvm), config()).unwrap();
        let a = anon(8);
        ap.apply(|m| m.plug(Gpa(0), 2 * P, a.clone(), 0, SlotFlags::NONE))
            .unwrap();
        ap.apply(|m| m.plug(Gpa(4 * P), 2 * P, a.clone(), 4 * P, SlotFlags::NONE))
            .unwrap();
        assert_eq!(kvm.specs().len(), 2);
        drop(ap);
        assert!(kvm.specs().is_empty());
        assert_eq!(Arc::strong_count(&a), 1);
    }

    #[derive(Clone, Debug)]
    struct RandomOp {
        kind: u8,
        at: u64,
        n: u64,
        dst: u64,
        m: usize,
        flag: bool,
        /// Call offsets to fail (forward changes or undos).
        fail: Vec<usize>,
    }

    fn random_op() -> impl Strategy<Value = RandomOp> {
        (
            0..8u8,
            0..40u64,
            1..6u64,
            0..60u64,
            0..4usize,
            any::<bool>(),
            proptest::collection::vec(0..6usize, 0..3),
        )
            .prop_map(|(kind, at, n, dst, m, flag, fail)| RandomOp {
                kind,
                at,
                n,
                dst,
                m,
                flag,
                fail,
            })
    }

    /// `at >= 32` names the start of slot `at - 32` (mod the count).
    fn resolve(map: &SlotMap, at: u64) -> u64 {
        let starts: Vec<u64> = map.iter().map(|s| s.range().start().0).collect();
        match at.checked_sub(32) {
            Some(k) if !starts.is_empty() => starts[k as usize % starts.len()],
            _ => at * P,
        }
    }

    fn run(ops: &[RandomOp]) {
        let kvm = Arc::new(FakeKvm::default());
        let ap = MemslotApplier::new(Arc::clone(&kvm), config()).unwrap();
        let maps = [anon(16), anon(16), anon(16), anon(16)];
        for o in ops {
            let before = ap.load();
            let at = resolve(&before, o.at);
            kvm.fail_next(&o.fail);
            let mapping = maps[o.m].clone();
            let result = ap.apply(|m| match o.kind {
                0..=2 => m.plug(
                    Gpa(o.at * P),
                    o.n * P,
                    mapping,
                    o.dst % 12 * P,
                    SlotFlags::NONE,
                ),
                3 => m.unplug(Gpa(at), o.n * P),
                4 => m.protect(Gpa(at), o.n * P, o.flag),
                5 => m.set_dirty_log(Gpa(at), o.n * P, o.flag),
                6 => m.move_range(Gpa(at), o.n * P, Gpa(o.dst * P)),
                _ => m.resize(Gpa(at), o.n * P, o.flag.then_some(mapping)),
            });
            // The fake always equals the mirror: it changes only on success.
            assert_eq!(kvm.specs(), ap.registered(), "{o:?}: {result:?}");
            match result {
                Ok(applied) => {
                    assert!(Arc::ptr_eq(&applied.map, &ap.load()));
                    assert_eq!(kvm.specs(), applied.map.expected_memslots());
                }
                Err(MemslotError::SlotMap(_) | MemslotError::RolledBack { .. }) => {
                    assert!(Arc::ptr_eq(&before, &ap.load()), "{o:?}");
                    assert_eq!(kvm.specs(), before.expected_memslots(), "{o:?}");
                }
                Err(MemslotError::RollbackFailed { .. }) => {
                    assert!(ap.check_consistency().is_err());
                    let next = ap.apply(|m| m.unplug(Gpa(0), P));
                    assert!(matches!(next, Err(MemslotError::Poisoned)), "{next:?}");
                    return;
                }
                Err(e) => panic!("{o:?}: unexpected {e}"),
            }
            ap.check_consistency().unwrap();
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        #[test]
        fn test_applier_random_ops_with_failures_keep_kvm_equal_to_mirror(
            ops in proptest::collection::vec(random_op(), 1..40)
        ) {
            run(&ops);
        }
    }
}
